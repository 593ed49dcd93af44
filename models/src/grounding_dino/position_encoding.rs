//! GroundingDINO's sine position encodings (`backbone/position_encoding.py` `PositionEmbeddingSineHW`,
//! `models/GroundingDINO/utils.py` `get_sine_pos_embed`, `gen_sineembed_for_position`). None has
//! parameters. Channel `k` of a coordinate `u` is `sin(u / t_k)` for even `k` and `cos(u / t_k)` for
//! odd `k`, with `t_k = T^(2⌊k/2⌋ / n)`.

use std::f64::consts::PI;

use burn::tensor::{Device, Int, Tensor, TensorData};

fn sine_channel(value: f64, k: usize, feats: usize, temperature: f64) -> f32 {
    let t = temperature.powf(2.0 * (k / 2) as f64 / feats as f64);
    let u = value / t;
    (if k % 2 == 0 { u.sin() } else { u.cos() }) as f32
}

/// `PositionEmbeddingSineHW(feats, T, T, normalize=True)` of one level: `[B, 2·feats, h, w]`, the
/// first `feats` channels for y, the rest for x. `padding[b][i·w + j]` is true on padded cells;
/// positions are the cumulative counts of unpadded cells, normalised to `(0, 2π]`.
pub fn image_position_embedding(
    padding: &[Vec<bool>],
    h: usize,
    w: usize,
    feats: usize,
    temperature: f64,
    device: &Device,
) -> Tensor<4> {
    let batch = padding.len();
    let mut out = vec![0f32; batch * 2 * feats * h * w];
    let scale = 2.0 * PI;
    for (b, mask) in padding.iter().enumerate() {
        let mut y_embed = vec![0f64; h * w];
        let mut x_embed = vec![0f64; h * w];
        for j in 0..w {
            let mut count = 0.0;
            for i in 0..h {
                count += f64::from(u8::from(!mask[i * w + j]));
                y_embed[i * w + j] = count;
            }
        }
        for i in 0..h {
            let mut count = 0.0;
            for j in 0..w {
                count += f64::from(u8::from(!mask[i * w + j]));
                x_embed[i * w + j] = count;
            }
        }
        for i in 0..h {
            for j in 0..w {
                // PyTorch computes the normalisation in float32.
                let y = (y_embed[i * w + j] as f32 / (y_embed[(h - 1) * w + j] as f32 + 1e-6) * scale as f32) as f64;
                let x = (x_embed[i * w + j] as f32 / (x_embed[i * w + w - 1] as f32 + 1e-6) * scale as f32) as f64;
                for k in 0..feats {
                    out[((b * 2 * feats + k) * h + i) * w + j] = sine_channel(y, k, feats, temperature);
                    out[((b * 2 * feats + feats + k) * h + i) * w + j] = sine_channel(x, k, feats, temperature);
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(out, [batch, 2 * feats, h, w]), device)
}

/// `get_sine_pos_embed(position_ids[..., None], feats, exchange_xy=False)` with temperature 10000:
/// the text enhancer's positions, `[B, L, feats]`.
pub fn text_position_embedding(position_ids: &[Vec<i64>], feats: usize, device: &Device) -> Tensor<3> {
    let batch = position_ids.len();
    let len = position_ids.first().map_or(0, Vec::len);
    let mut out = Vec::with_capacity(batch * len * feats);
    for ids in position_ids {
        for &id in ids {
            let u = (id as f32 * (2.0 * PI) as f32) as f64;
            out.extend((0..feats).map(|k| sine_channel(u, k, feats, 10000.0)));
        }
    }
    Tensor::from_data(TensorData::new(out, [batch, len, feats]), device)
}

/// `gen_sineembed_for_position` of `[B, Q, 4]` boxes (cx, cy, w, h): `[B, Q, 4·feats]` in the order
/// y, x, w, h, temperature 10000 (`feats` is 128 in the official model: half the hidden width).
pub fn box_sine_embedding(boxes: Tensor<3>, feats: usize) -> Tensor<3> {
    let [b, q, _] = boxes.dims();
    let device = boxes.device();
    let inv_t: Vec<f32> =
        (0..feats).map(|k| (1.0 / 10000f64.powf(2.0 * (k / 2) as f64 / feats as f64)) as f32).collect();
    let inv_t = Tensor::<1>::from_data(TensorData::new(inv_t, [feats]), &device).reshape([1, 1, 1, feats]);
    let even: Vec<f32> = (0..feats).map(|k| if k % 2 == 0 { 1.0 } else { 0.0 }).collect();
    let even = Tensor::<1>::from_data(TensorData::new(even, [feats]), &device).reshape([1, 1, 1, feats]);
    let u = boxes.unsqueeze_dim::<4>(3) * (2.0 * PI) * inv_t;
    let embedded = u.clone().sin() * even.clone() + u.cos() * (even.neg() + 1.0);
    let order = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 0, 2, 3], [4]), &device);
    embedded.select(2, order).reshape([b, q, 4 * feats])
}
