//! Multi-scale deformable attention (Zhu et al. 2021, "Deformable DETR"; GroundingDINO's
//! `ms_deform_attn.py` `MultiScaleDeformableAttention` and its PyTorch path
//! `multi_scale_deformable_attn_pytorch`): each query samples `points` locations per head and level
//! around its reference point (bilinear, zero padding, `align_corners=False`, i.e. `grid_sample`),
//! weighted by a softmax over all levels' and points' weights jointly. Keys `sampling_offsets`,
//! `attention_weights`, `value_proj`, `output_proj`.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::ops::{GridSampleOptions, GridSamplePaddingMode, InterpolateMode};
use burn::tensor::{Bool, Device, Tensor, TensorData};

#[derive(Module, Debug)]
pub struct MsDeformAttn {
    pub sampling_offsets: Linear,
    pub attention_weights: Linear,
    pub value_proj: Linear,
    pub output_proj: Linear,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_levels: usize,
    #[module(skip)]
    pub num_points: usize,
}

/// Reference points of the queries: `[B, Nq, L, 2]` points (encoder) or `[B, Nq, L, 4]` boxes
/// (decoder, cx cy w h), normalised to the unpadded image.
pub enum Reference {
    Points(Tensor<4>),
    Boxes(Tensor<4>),
}

impl MsDeformAttn {
    /// Initialised as the official `init_weights`: zero offset weights with biases pointing each
    /// head in its own direction (point `p` at distance `p + 1`), uniform attention (zero weights
    /// and biases), Xavier projections with zero biases.
    pub fn new(dim: usize, num_heads: usize, num_levels: usize, num_points: usize, device: &Device) -> Self {
        let mut grid = Vec::with_capacity(num_heads * num_levels * num_points * 2);
        for m in 0..num_heads {
            let theta = m as f64 * 2.0 * std::f64::consts::PI / num_heads as f64;
            let (x, y) = (theta.cos(), theta.sin());
            let scale = x.abs().max(y.abs());
            for _ in 0..num_levels {
                for p in 0..num_points {
                    grid.extend([(x / scale * (p + 1) as f64) as f32, (y / scale * (p + 1) as f64) as f32]);
                }
            }
        }
        let offsets = grid.len();
        let zeros = |i: usize, o: usize| Linear {
            weight: Param::from_tensor(Tensor::zeros([i, o], device)),
            bias: Some(Param::from_tensor(Tensor::zeros([o], device))),
        };
        let mut sampling_offsets = zeros(dim, offsets);
        sampling_offsets.bias = Some(Param::from_tensor(Tensor::from_data(TensorData::new(grid, [offsets]), device)));
        Self {
            sampling_offsets,
            attention_weights: zeros(dim, num_heads * num_levels * num_points),
            value_proj: xavier_linear(dim, dim, device),
            output_proj: xavier_linear(dim, dim, device),
            num_heads,
            num_levels,
            num_points,
        }
    }

    /// `query [B, Nq, d]`, `value [B, Nv, d]` (the levels' cells concatenated in `shapes` order),
    /// `value_padding [B, Nv]` (true = padded, its values are zeroed) → `[B, Nq, d]`.
    pub fn forward(
        &self,
        query: Tensor<3>,
        value: Tensor<3>,
        value_padding: Option<Tensor<2, Bool>>,
        reference: &Reference,
        shapes: &[(usize, usize)],
    ) -> Tensor<3> {
        let [b, nq, d] = query.dims();
        let nv = value.dims()[1];
        let (m, l, p) = (self.num_heads, self.num_levels, self.num_points);
        let dh = d / m;
        let device = query.device();
        let mut value = self.value_proj.forward(value);
        if let Some(padding) = value_padding {
            value = value.mask_fill(padding.unsqueeze_dim::<3>(2).expand([b, nv, d]), 0.0);
        }
        let value = value.reshape([b, nv, m, dh]);
        let offsets = self.sampling_offsets.forward(query.clone()).reshape([b, nq, m, l, p, 2]);
        let weights = softmax(self.attention_weights.forward(query).reshape([b, nq, m, l * p]), 3);

        let locations = match reference {
            Reference::Points(points) => {
                let normaliser: Vec<f32> = shapes.iter().flat_map(|&(h, w)| [w as f32, h as f32]).collect();
                let normaliser =
                    Tensor::<1>::from_data(TensorData::new(normaliser, [l * 2]), &device).reshape([1, 1, 1, l, 1, 2]);
                points.clone().reshape([b, nq, 1, l, 1, 2]) + offsets / normaliser
            }
            Reference::Boxes(boxes) => {
                let centre = boxes.clone().narrow(3, 0, 2).reshape([b, nq, 1, l, 1, 2]);
                let size = boxes.clone().narrow(3, 2, 2).reshape([b, nq, 1, l, 1, 2]);
                centre + offsets / p as f64 * size * 0.5
            }
        };
        // grid_sample's [-1, 1] frame, laid out [B·M, Nq, P, 2] per level.
        let grids = (locations * 2.0 - 1.0).permute([0, 2, 3, 1, 4, 5]); // [B, M, L, Nq, P, 2]
        let options = GridSampleOptions::new(InterpolateMode::Bilinear)
            .with_padding_mode(GridSamplePaddingMode::Zeros)
            .with_align_corners(false);
        let mut start = 0;
        let mut sampled = Vec::with_capacity(l);
        for (level, &(h, w)) in shapes.iter().enumerate() {
            let level_value = value.clone().narrow(1, start, h * w).permute([0, 2, 3, 1]).reshape([b * m, dh, h, w]);
            let grid = grids.clone().narrow(2, level, 1).reshape([b * m, nq, p, 2]);
            sampled.push(level_value.grid_sample_2d(grid, options.clone())); // [B·M, Dh, Nq, P]
            start += h * w;
        }
        let sampled = Tensor::cat(sampled, 3); // [B·M, Dh, Nq, L·P]
        let weights = weights.permute([0, 2, 1, 3]).reshape([b * m, 1, nq, l * p]);
        let out = (sampled * weights).sum_dim(3).reshape([b, m * dh, nq]).swap_dims(1, 2);
        self.output_proj.forward(out)
    }
}

/// A Linear layer with Xavier-uniform weights and zero bias (the official `xavier_uniform_` +
/// `constant_(bias, 0)`).
pub fn xavier_linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    let mut linear = LinearConfig::new(d_in, d_out)
        .with_initializer(burn::nn::Initializer::XavierUniform { gain: 1.0 })
        .init(device);
    linear.bias = Some(Param::from_tensor(Tensor::zeros([d_out], device)));
    linear
}
