//! Scaled dot-product attention with SAM's decomposed relative-position bias, for inference on
//! flex, without the [heads, tokens, tokens] attention matrix.
//!
//! Why: SAM vit_b's global-attention blocks attend 4,096 tokens to 4,096 in 12 heads, so each
//! step of the composed form (scores, + the bias, softmax) is a fresh 805 MB tensor: the kernel
//! maps and zeroes every page of it on first touch (page faults were 20 % of the encoder's time on
//! this project's machine), and the softmax calls libm's `expf` per value (7 %). Here each task
//! takes 64 queries of one head: their scores (64 x tokens, in a buffer the thread keeps), the
//! bias added and the softmax taken while they are in cache (kiln's vectorised `exp`), then
//! multiplied by V into the output; both products are gemm's.
//!
//! Under autodiff (LoRA on the encoder's qkv), on other backends and with `KILN_FLEX_KERNELS=0`
//! the composed form runs, which this is tested against (`sam::image_encoder` tests).

/// Queries per task.
#[cfg(feature = "flex")]
const QUERIES: usize = 64;

#[cfg(feature = "flex")]
pub mod flex {
    use super::QUERIES;
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{DType, Tensor, TensorData};
    use rayon::prelude::*;

    /// softmax(scale q k^T + bias) v per head, where the bias of query i and key j on a
    /// `height x width` key grid is rel_h[i][j / width] + rel_w[i][j % width]. q, k, v: [heads,
    /// tokens, dim]; rel_h: [heads, tokens, height]; rel_w: [heads, tokens, width]. None unless every
    /// tensor is a float32 flex tensor without autodiff (the caller composes it then).
    pub fn rel_pos_attention(
        q: &Tensor<3>,
        k: &Tensor<3>,
        v: &Tensor<3>,
        rel_h: &Tensor<3>,
        rel_w: &Tensor<3>,
        scale: f32,
    ) -> Option<Tensor<3>> {
        if !super::super::conv_act::flex_kernels() {
            return None;
        }
        let plain = |t: &Tensor<3>| -> Option<FlexTensor> {
            let t = t.clone().try_into_primitive::<Flex>().ok()?;
            (t.dtype() == DType::F32).then(|| t.to_contiguous())
        };
        let (q, k, v, rel_h, rel_w) = (plain(q)?, plain(k)?, plain(v)?, plain(rel_h)?, plain(rel_w)?);
        let &[heads, tokens, dim] = q.layout().shape().as_slice() else { return None };
        let height = rel_h.layout().shape()[2];
        let width = rel_w.layout().shape()[2];
        if k.layout().shape().as_slice() != [heads, tokens, dim]
            || v.layout().shape().as_slice() != [heads, tokens, dim]
            || rel_h.layout().shape().as_slice() != [heads, tokens, height]
            || rel_w.layout().shape().as_slice() != [heads, tokens, width]
            || height * width != tokens
            || tokens == 0
            || dim == 0
        {
            return None;
        }
        let (qs, ks, vs) = (q.storage::<f32>(), k.storage::<f32>(), v.storage::<f32>());
        let (hs, ws) = (rel_h.storage::<f32>(), rel_w.storage::<f32>());
        let mut output = vec![0f32; heads * tokens * dim];
        // Each task writes its own rows of the output: chunks of QUERIES rows of one head.
        let rows_per_head = tokens * dim;
        output
            .par_chunks_mut(rows_per_head)
            .enumerate()
            .flat_map(|(head, out)| {
                out.par_chunks_mut(QUERIES * dim).enumerate().map(move |(block, out)| (head, block, out))
            })
            .for_each_init(Vec::new, |scores: &mut Vec<f32>, (head, block, out)| {
                let first = block * QUERIES;
                let rows = QUERIES.min(tokens - first);
                scores.resize(QUERIES * tokens, 0.0);
                let (q, k, v) = (&qs[head * rows_per_head..], &ks[head * rows_per_head..], &vs[head * rows_per_head..]);
                // SAFETY: scores is [rows, tokens] (row stride tokens); lhs(i, d) = q[(first + i) *
                // dim + d]; rhs(d, j) = k[j * dim + d] (k transposed); all within this head.
                unsafe {
                    crate::nn::conv_act::matmul(
                        [rows, tokens, dim],
                        (scores.as_mut_ptr(), tokens, 1),
                        (q[first * dim..].as_ptr(), dim, 1),
                        (k.as_ptr(), 1, dim),
                        scale,
                    )
                };
                for (i, row) in scores.chunks_exact_mut(tokens).take(rows).enumerate() {
                    let query = head * tokens + first + i;
                    softmax_with_bias(
                        row,
                        &hs[query * height..(query + 1) * height],
                        &ws[query * width..(query + 1) * width],
                    );
                }
                // SAFETY: out is this task's [rows, dim] block; lhs = scores [rows, tokens];
                // rhs(j, d) = v[j * dim + d].
                unsafe {
                    crate::nn::conv_act::matmul(
                        [rows, dim, tokens],
                        (out.as_mut_ptr(), dim, 1),
                        (scores.as_ptr(), tokens, 1),
                        (v.as_ptr(), dim, 1),
                        1.0,
                    )
                };
            });
        Some(Tensor::from_primitive::<Flex>(FlexTensor::from_data(TensorData::new(output, [heads, tokens, dim]))))
    }

    widest! {
        /// row = softmax(row + rel_h[j / width] + rel_w[j % width]), in place.
        fn softmax_with_bias(row: &mut [f32], rel_h: &[f32], rel_w: &[f32]) {
            const LANES: usize = 16;
            let width = rel_w.len();
            for (line, &bias) in row.chunks_exact_mut(width).zip(rel_h) {
                for (value, &b) in line.iter_mut().zip(rel_w) {
                    *value += bias + b;
                }
            }
            // Maximum and sum in 16 lanes (the loops vectorise).
            let mut lanes = [f32::NEG_INFINITY; LANES];
            let chunks = row.chunks_exact(LANES);
            let mut max = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            for chunk in chunks {
                for i in 0..LANES {
                    lanes[i] = lanes[i].max(chunk[i]);
                }
            }
            max = lanes.iter().fold(max, |m, &v| m.max(v));
            let mut sums = [0f32; LANES];
            let mut rest = 0f32;
            let mut chunks = row.chunks_exact_mut(LANES);
            for chunk in &mut chunks {
                for i in 0..LANES {
                    chunk[i] = crate::nn::conv_act::exp_f32(chunk[i] - max);
                    sums[i] += chunk[i];
                }
            }
            for value in chunks.into_remainder() {
                *value = crate::nn::conv_act::exp_f32(*value - max);
                rest += *value;
            }
            let inverse = 1.0 / (sums.iter().sum::<f32>() + rest);
            row.iter_mut().for_each(|value| *value *= inverse);
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::tensor::activation::softmax;
    use burn::tensor::{Device, Distribution, Tensor};

    /// The fused attention against the composed form (Burn's matmul, the bias broadcast, Burn's
    /// softmax), within 1e-5 of the output's scale: a grid smaller than one block of queries,
    /// one over several blocks with a partial last one, and wide score ranges.
    #[test]
    fn fused_attention_matches_the_composed_form() {
        let device = Device::flex();
        for (heads, height, width, dim, spread) in [(3, 5, 7, 8, 1.0), (2, 12, 12, 16, 3.0), (1, 9, 15, 64, 0.5)] {
            let tokens = height * width;
            let random = |shape: [usize; 3], s: f64| Tensor::<3>::random(shape, Distribution::Normal(0.0, s), &device);
            let (q, k, v) = (
                random([heads, tokens, dim], spread),
                random([heads, tokens, dim], spread),
                random([heads, tokens, dim], 1.0),
            );
            let (rel_h, rel_w) = (random([heads, tokens, height], 2.0), random([heads, tokens, width], 2.0));
            let scale = (dim as f32).powf(-0.5);
            let fused =
                super::flex::rel_pos_attention(&q, &k, &v, &rel_h, &rel_w, scale).expect("flex float32 tensors");
            let scores = (q * scale as f64).matmul(k.swap_dims(1, 2)).reshape([heads, height, width, height, width])
                + rel_h.reshape([heads, height, width, height]).unsqueeze_dim::<5>(4)
                + rel_w.reshape([heads, height, width, width]).unsqueeze_dim::<5>(3);
            let composed = softmax(scores.reshape([heads, tokens, tokens]), 2).matmul(v);
            let (a, b) = (crate::device::read_floats(fused).unwrap(), crate::device::read_floats(composed).unwrap());
            let scale_of = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale_of;
            assert!(worst < 1e-5, "{heads} heads {height}x{width} dim {dim}: {worst} of the scale");
        }
    }
}
