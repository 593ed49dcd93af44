//! Max pooling at stride 1 with "same" padding (k // 2 each side), chained: Ultralytics' `SPPF`
//! pools its input three times with one 5x5 `nn.MaxPool2d` and concatenates the four maps.
//!
//! Why: Burn flex computes a max pool as a 3-d pool with indices (an index per value, a window
//! bound check per tap): the three pools of a 160-px yolov8n-seg were 5 % of its inference on one
//! thread. Here, at inference on flex, each pool is separable (the maximum over the window's rows,
//! then over its columns: 2k comparisons a value, not k²), and the four maps are written straight
//! into the concatenation. A padded value never wins (PyTorch pads with -inf); NaN propagates,
//! as in PyTorch. Training (autodiff), other backends and `KILN_FLEX_KERNELS=0` take Burn's
//! `max_pool2d` and `cat`, which this is tested against.

use burn::nn::PaddingConfig2d;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::tensor::Tensor;

/// `cat([x, p(x), p(p(x)), ...], 1)` with `levels` pools p after x: a `kernel` x `kernel` max pool,
/// stride 1, padding kernel / 2 (`kernel` odd).
pub fn max_pool_pyramid(x: Tensor<4>, kernel: usize, levels: usize) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if super::conv_act::flex_kernels()
        && let Some(y) = flex::max_pool_pyramid(&x, kernel, levels)
    {
        return y;
    }
    composed(x, kernel, levels)
}

/// Burn's pools and concatenation.
fn composed(x: Tensor<4>, kernel: usize, levels: usize) -> Tensor<4> {
    let pool = same_max_pool(kernel);
    let mut maps = vec![x];
    for _ in 0..levels {
        let last = maps.last().expect("x is first").clone();
        maps.push(pool.forward(last));
    }
    Tensor::cat(maps, 1)
}

/// Burn's `kernel` x `kernel` max pool, stride 1, padding kernel / 2.
fn same_max_pool(kernel: usize) -> MaxPool2d {
    let pad = kernel / 2;
    MaxPool2dConfig::new([kernel, kernel])
        .with_strides([1, 1])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .init()
}

#[cfg(feature = "flex")]
pub mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{DType, Tensor, TensorData};
    use rayon::prelude::*;

    use super::super::conv_act::OutputPtr;

    /// Values per parallel task: a smaller map is pooled on the calling thread.
    const CHUNK: usize = 1 << 15;

    /// None where the kernel does not apply (autodiff, a dtype other than float32, an even kernel):
    /// the caller falls back.
    pub fn max_pool_pyramid(x: &Tensor<4>, kernel: usize, levels: usize) -> Option<Tensor<4>> {
        if kernel.is_multiple_of(2) || x.dtype() != DType::F32 {
            return None;
        }
        let x = x.clone().try_into_primitive::<Flex>().ok()?.to_contiguous();
        let &[batch, channels, height, width] = x.layout().shape().as_slice() else { return None };
        let plane = height * width;
        let source = x.storage::<f32>();
        let len = batch * (levels + 1) * channels * plane;
        let mut output = Vec::<f32>::with_capacity(len);
        let out = OutputPtr(output.as_mut_ptr());
        // One channel of one image: its plane copied, then pooled `levels` times, each level
        // into its place in the concatenation.
        let chain = |rows: &mut Vec<f32>, index: usize| {
            let (image, channel) = (index / channels, index % channels);
            // SAFETY: plane `channel` of group `level` of this image's output: within `output`
            // (allocated for all of them), and written by this call alone.
            let level_plane = |level: usize| unsafe {
                std::slice::from_raw_parts_mut(
                    out.at(((image * (levels + 1) + level) * channels + channel) * plane),
                    plane,
                )
            };
            let mut previous = level_plane(0);
            previous.copy_from_slice(&source[index * plane..(index + 1) * plane]);
            rows.resize(plane, 0.0);
            for level in 1..=levels {
                let next = level_plane(level);
                pool_plane(previous, next, rows, [height, width], kernel / 2);
                previous = next;
            }
        };
        let chains = batch * channels;
        if chains * plane >= 2 * CHUNK {
            (0..chains).into_par_iter().with_min_len((CHUNK / plane).max(1)).for_each_init(Vec::new, chain);
        } else {
            let mut rows = Vec::new();
            (0..chains).for_each(|index| chain(&mut rows, index));
        }
        // SAFETY: every chain wrote its `levels + 1` planes, the chains covering every image and channel.
        unsafe { output.set_len(len) };
        let dims = [batch, (levels + 1) * channels, height, width];
        Some(Tensor::from_primitive::<Flex>(FlexTensor::from_data(TensorData::new(output, dims))))
    }

    /// One plane pooled: the maximum over each row's window into `rows`, then over each column's
    /// window of `rows` into `dst`; windows clipped to the plane (the padding never wins).
    fn pool_plane(src: &[f32], dst: &mut [f32], rows: &mut [f32], [height, width]: [usize; 2], reach: usize) {
        for (line, out) in src.chunks_exact(width).zip(rows.chunks_exact_mut(width)) {
            for (x, value) in out.iter_mut().enumerate() {
                let window = &line[x.saturating_sub(reach)..(x + reach + 1).min(width)];
                *value = window.iter().copied().fold(f32::NEG_INFINITY, max_nan);
            }
        }
        for y in 0..height {
            let (y0, y1) = (y.saturating_sub(reach), (y + reach + 1).min(height));
            let out = &mut dst[y * width..(y + 1) * width];
            out.copy_from_slice(&rows[y0 * width..(y0 + 1) * width]);
            for line in rows[(y0 + 1) * width..y1 * width].chunks_exact(width) {
                for (o, &v) in out.iter_mut().zip(line) {
                    *o = max_nan(*o, v);
                }
            }
        }
    }

    /// max(a, b), NaN if either is (PyTorch's max pool propagates NaN; `f32::max` drops it).
    #[inline(always)]
    fn max_nan(a: f32, b: f32) -> f32 {
        if a > b || a.is_nan() { a } else { b }
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    fn floats(t: Tensor<4>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().expect("float32 tensor")
    }

    /// The kernel against Burn's max pools and concatenation, maps smaller and larger than the
    /// window, one image and several, on the calling thread and among the cores.
    #[test]
    fn pyramid_matches_burns_pools_and_concatenation() {
        let device = crate::device::cpu();
        for (dims, kernel, levels) in [
            ([1, 3, 1, 1], 5, 3),
            ([1, 2, 2, 3], 5, 3),
            ([2, 4, 5, 5], 5, 3),
            ([1, 128, 5, 5], 5, 3),
            ([1, 16, 20, 20], 3, 2),
            ([1, 64, 40, 40], 5, 3),
            ([3, 32, 33, 17], 5, 3),
        ] {
            let x = Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), &device);
            let fast = flex::max_pool_pyramid(&x, kernel, levels).expect("the kernel applies");
            let burn = composed(x, kernel, levels);
            assert_eq!(fast.dims(), burn.dims(), "{dims:?}");
            assert_eq!(floats(fast), floats(burn), "{dims:?} kernel {kernel}");
        }
    }

    #[test]
    fn a_nan_in_the_window_propagates() {
        let device = crate::device::cpu();
        let mut values = vec![1f32; 25];
        values[12] = f32::NAN;
        let x = Tensor::<4>::from_data(TensorData::new(values, [1, 1, 5, 5]), &device);
        let pooled = floats(flex::max_pool_pyramid(&x, 3, 1).unwrap());
        // The pooled map: NaN within one step of the centre, 1 at the corners.
        let level = &pooled[25..];
        assert!(level[6].is_nan() && level[12].is_nan() && level[18].is_nan());
        assert_eq!(level[0], 1.0);
    }
}
