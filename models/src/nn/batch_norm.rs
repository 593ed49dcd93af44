//! BatchNorm in training (the batch's own statistics), alone or followed by SiLU, in two passes
//! forward and two backward on flex, each over all cores: Ultralytics' `Conv` normalises every
//! convolution's output with it and applies SiLU.
//!
//! Why: Burn's `batch_norm_train` is composed of tensor operations: the mean and the variance
//! each from a copy of the input transposed to [channels, batch x positions], then five
//! element-wise passes for the output; its backward pass two more transposed copies and about
//! eight passes; SiLU two more (one each way). Profiled on the yolov8n-seg training step (flex,
//! batch 8, 320 px) those copies and passes were the largest share after the convolutions. Here
//! the forward pass reads the input once for the statistics (each plane's mean and squared
//! deviations in two passes over the plane in cache, so that a large mean does not cost the
//! variance its precision, merged plane by plane) and once for the output, SiLU applied to each
//! plane while it is in cache; the backward pass reads the input and the gradient once for the
//! two sums per channel (with SiLU: after its derivative, at the normalised values recomputed
//! from the input, kept for the second pass) and once for the input gradient, written by hand:
//! dx = gamma / sqrt(var + eps) * (g - mean(g) - x_hat * mean(g * x_hat)),
//! dgamma = sum(g * x_hat), dbeta = sum(g). Sums are per channel in float64 over float32 partial
//! sums, each channel on one thread, so a run repeats itself exactly.
//!
//! The running statistics are updated as burn-nn's `BatchNorm` updates them. Other backends,
//! inference, dtypes other than float32, and `KILN_FLEX_KERNELS=0` take burn-nn's `forward`, which
//! this is tested against (values, running statistics, the gradients of the input, `gamma` and
//! `beta`: `training/tests/fused_conv_training.rs`).

use burn::nn::BatchNorm;
use burn::tensor::Tensor;

/// `bn.forward(x)`, by kiln's kernel where it applies (training on flex, float32).
pub fn batch_norm(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if let Some(y) = on_flex(bn, &x, false) {
        return y;
    }
    bn.forward(x)
}

/// `silu(bn.forward(x))` (Ultralytics' `Conv` after its convolution), in training on flex one
/// kernel: the normalised values go through SiLU while they are in cache, and the backward pass
/// differentiates both in the same two passes (nothing but the input is kept).
pub fn batch_norm_silu(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if let Some(y) = on_flex(bn, &x, true) {
        return y;
    }
    super::silu(bn.forward(x))
}

#[cfg(feature = "flex")]
fn on_flex(bn: &BatchNorm, x: &Tensor<4>, silu: bool) -> Option<Tensor<4>> {
    if !(super::conv_act::flex_kernels() && x.device().is_autodiff() && bn.training.is_enabled()) {
        return None;
    }
    let (output, mean, variance) = flex::train(x, &bn.gamma.val(), &bn.beta.val(), bn.epsilon, silu)?;
    // As burn-nn's `BatchNorm::forward_train` updates them (the biased variance, detached).
    let device = output.device();
    let running_mean = bn.running_mean.value_sync().to_device(&device);
    let running_var = bn.running_var.value_sync().to_device(&device);
    let running_mean = running_mean.mul_scalar(1.0 - bn.momentum).add(mean.mul_scalar(bn.momentum));
    let running_var = running_var.mul_scalar(1.0 - bn.momentum).add(variance.mul_scalar(bn.momentum));
    bn.running_mean.update(running_mean.detach());
    bn.running_var.update(running_var.detach());
    Some(output)
}

#[cfg(feature = "flex")]
pub mod flex {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::flex::FlexTensor;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{DType, Tensor, TensorData};
    use rayon::prelude::*;

    use super::super::conv_act::{silu_gradient, silu_in_place};

    /// Values a task covers at least (smaller planes are grouped).
    const TASK_VALUES: usize = 1 << 14;

    /// The batch-statistics normalisation of a float32 flex autodiff tensor [batch, channels,
    /// height, width], followed by SiLU when `silu`: (output, batch mean, biased batch variance),
    /// the statistics detached; None for any other tensor (the caller falls back).
    pub fn train(
        x: &Tensor<4>,
        gamma: &Tensor<1>,
        beta: &Tensor<1>,
        epsilon: f64,
        silu: bool,
    ) -> Option<(Tensor<4>, Tensor<1>, Tensor<1>)> {
        if x.dtype() != DType::F32 || gamma.dtype() != DType::F32 || beta.dtype() != DType::F32 {
            return None;
        }
        let _span = crate::nn::profile::span(crate::nn::profile::Kernel::NormForward);
        let device = x.device();
        let x = x.clone().try_into_primitive::<Autodiff<Flex>>().ok()?;
        let gamma = gamma.clone().try_into_primitive::<Autodiff<Flex>>().ok()?;
        let beta = beta.clone().try_into_primitive::<Autodiff<Flex>>().ok()?;
        if [x.primitive(), gamma.primitive(), beta.primitive()].iter().any(|t| t.dtype() != DType::F32) {
            return None;
        }
        let input = x.primitive().to_contiguous();
        let dims = input.layout().shape().as_slice().to_vec();
        let &[batch, channels, height, width] = dims.as_slice() else { return None };
        let plane = height * width;
        let gamma_values = gamma.primitive().to_contiguous().storage::<f32>().to_vec();
        let beta_values = beta.primitive().to_contiguous().storage::<f32>().to_vec();
        if batch * plane == 0 || gamma_values.len() != channels || beta_values.len() != channels {
            return None;
        }
        let values = input.storage::<f32>();
        // Per channel, in one pass over memory: each plane's mean and sum of squared deviations
        // (two passes over a plane in cache), merged plane by plane (Chan et al.).
        let (mean, variance): (Vec<f64>, Vec<f64>) = (0..channels)
            .into_par_iter()
            .map(|c| {
                let (mut count, mut mean, mut m2) = (0f64, 0f64, 0f64);
                for p in planes(values, c, channels, plane) {
                    let n = p.len() as f64;
                    let plane_mean = sum(p) / n;
                    let plane_m2 = centred_squares(p, plane_mean as f32);
                    let delta = plane_mean - mean;
                    let total = count + n;
                    mean += delta * n / total;
                    m2 += plane_m2 + delta * delta * count * n / total;
                    count = total;
                }
                (mean, m2 / count)
            })
            .unzip();
        let inv_std: Vec<f32> = variance.iter().map(|v| (1.0 / (v + epsilon).sqrt()) as f32).collect();
        let mean: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
        let mut output = vec![0f32; values.len()];
        output
            .par_chunks_mut(plane)
            .zip(values.par_chunks(plane))
            .enumerate()
            .with_min_len(TASK_VALUES.div_ceil(plane))
            .for_each(|(index, (out, x))| {
                let c = index % channels;
                normalise(out, x, mean[c], inv_std[c] * gamma_values[c], beta_values[c]);
                if silu {
                    silu_in_place(out, 0.0);
                }
            });
        let output = FlexTensor::from_data(TensorData::new(output, dims));
        let nodes = [x.node(), gamma.node(), beta.node()];
        let state = Saved { input, gamma: gamma_values, beta: beta_values, mean: mean.clone(), inv_std, silu };
        let output = match BatchNormBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(state, output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        let statistic = |values: Vec<f32>| Tensor::<1>::from_data(TensorData::new(values, [channels]), &device);
        let variance = variance.iter().map(|&v| v as f32).collect();
        Some((Tensor::from_primitive::<Autodiff<Flex>>(output), statistic(mean), statistic(variance)))
    }

    /// What the backward pass reads: the input, gamma and beta, the batch's mean and
    /// 1/sqrt(var + eps), and whether SiLU followed.
    #[derive(Clone, Debug)]
    struct Saved {
        input: FlexTensor,
        gamma: Vec<f32>,
        beta: Vec<f32>,
        mean: Vec<f32>,
        inv_std: Vec<f32>,
        silu: bool,
    }

    #[derive(Debug)]
    struct BatchNormBackward;

    impl Backward<Flex, 3> for BatchNormBackward {
        type State = Saved;

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let _span = crate::nn::profile::span(crate::nn::profile::Kernel::NormBackward);
            let [node_x, node_gamma, node_beta] = ops.parents;
            let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
            let Saved { input, gamma, beta, mean, inv_std, silu } = ops.state;
            let dims = input.layout().shape().as_slice().to_vec();
            let (channels, plane) = (dims[1], dims[2] * dims[3]);
            let (x, g) = (input.storage::<f32>(), grad.storage::<f32>());
            assert_eq!(x.len(), g.len(), "BatchNorm backward: the gradient has the input's shape");
            let min_len = TASK_VALUES.div_ceil(plane);
            // Per plane, in parallel: with SiLU first the gradient at the normalised values (through
            // SiLU's derivative there, recomputed from the input; kept, the input gradient is then
            // written over it), then sum(g) and sum(g * (x - mean)) while the plane is in cache.
            let mut through_silu = if silu { vec![0f32; x.len()] } else { Vec::new() };
            let mut plane_sums = vec![(0f64, 0f64); x.len() / plane];
            let sum_plane = |index: usize, x: &[f32], g: &[f32], dz: Option<&mut [f32]>, z: &mut Vec<f32>| {
                let c = index % channels;
                match dz {
                    Some(dz) => {
                        z.resize(x.len(), 0.0);
                        normalise(z, x, mean[c], inv_std[c] * gamma[c], beta[c]);
                        silu_gradient(z, g, dz);
                        grad_sums(x, dz, mean[c])
                    }
                    None => grad_sums(x, g, mean[c]),
                }
            };
            if silu {
                plane_sums
                    .par_iter_mut()
                    .zip(through_silu.par_chunks_mut(plane).zip(x.par_chunks(plane).zip(g.par_chunks(plane))))
                    .enumerate()
                    .with_min_len(min_len)
                    .for_each_init(Vec::new, |z, (index, (sums, (dz, (x, g))))| {
                        *sums = sum_plane(index, x, g, Some(dz), z)
                    });
            } else {
                plane_sums
                    .par_iter_mut()
                    .zip(x.par_chunks(plane).zip(g.par_chunks(plane)))
                    .enumerate()
                    .with_min_len(min_len)
                    .for_each_init(Vec::new, |z, (index, (sums, (x, g)))| *sums = sum_plane(index, x, g, None, z));
            }
            // Per channel, image by image: sum(g) and sum(g * x_hat).
            let sums: Vec<(f64, f64)> = (0..channels)
                .map(|c| {
                    let (sg, sgx) =
                        plane_sums.iter().skip(c).step_by(channels).fold((0.0, 0.0), |(a, b), s| (a + s.0, b + s.1));
                    (sg, sgx * inv_std[c] as f64)
                })
                .collect();
            let through_silu = silu.then_some(through_silu);
            if let Some(node) = node_x {
                let count = (x.len() / channels) as f64;
                let constants = |index: usize| {
                    let c = index % channels;
                    let (mean_g, mean_gx) = ((sums[c].0 / count) as f32, (sums[c].1 / count) as f32);
                    (mean[c], inv_std[c], gamma[c] * inv_std[c], mean_g, mean_gx)
                };
                let dx = match through_silu {
                    Some(mut dz) => {
                        dz.par_chunks_mut(plane).zip(x.par_chunks(plane)).enumerate().with_min_len(min_len).for_each(
                            |(index, (dz, x))| {
                                let (m, s, scale, mean_g, mean_gx) = constants(index);
                                input_gradient_in_place(dz, x, m, s, scale, mean_g, mean_gx);
                            },
                        );
                        dz
                    }
                    None => {
                        let mut dx = vec![0f32; x.len()];
                        dx.par_chunks_mut(plane)
                            .zip(x.par_chunks(plane).zip(g.par_chunks(plane)))
                            .enumerate()
                            .with_min_len(min_len)
                            .for_each(|(index, (dx, (x, g)))| {
                                let (m, s, scale, mean_g, mean_gx) = constants(index);
                                input_gradient(dx, x, g, m, s, scale, mean_g, mean_gx);
                            });
                        dx
                    }
                };
                grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, dims)));
            }
            let per_channel = |values: Vec<f32>| FlexTensor::from_data(TensorData::new(values, [channels]));
            if let Some(node) = node_gamma {
                grads.register::<Flex>(node.id, per_channel(sums.iter().map(|s| s.1 as f32).collect()));
            }
            if let Some(node) = node_beta {
                grads.register::<Flex>(node.id, per_channel(sums.iter().map(|s| s.0 as f32).collect()));
            }
        }
    }

    /// The [height x width] planes of channel `c`, image by image.
    fn planes(values: &[f32], c: usize, channels: usize, plane: usize) -> impl Iterator<Item = &[f32]> {
        values.chunks_exact(plane).skip(c).step_by(channels)
    }

    /// Values per float32 partial sum: blocks of this many go into float64.
    const BLOCK: usize = 1024;
    /// Float32 accumulators per sum: two AVX-512 registers (two chains of additions in flight).
    const LANES: usize = 32;

    widest! {
        /// sum(v) over a slice, in float64 over float32 blocks.
        pub(crate) fn sum(values: &[f32]) -> f64 {
            let mut total = 0f64;
            for block in values.chunks(BLOCK) {
                let mut acc = [0f32; LANES];
                let chunks = block.chunks_exact(LANES);
                let rest: f32 = chunks.remainder().iter().sum();
                for chunk in chunks {
                    for i in 0..LANES {
                        acc[i] += chunk[i];
                    }
                }
                total += (acc.iter().sum::<f32>() + rest) as f64;
            }
            total
        }
    }

    widest! {
        /// sum((v - mean)^2) over one plane.
        fn centred_squares(values: &[f32], mean: f32) -> f64 {
            let mut total = 0f64;
            for block in values.chunks(BLOCK) {
                let mut acc = [0f32; LANES];
                let chunks = block.chunks_exact(LANES);
                let rest: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
                for chunk in chunks {
                    for i in 0..LANES {
                        let d = chunk[i] - mean;
                        acc[i] += d * d;
                    }
                }
                total += (acc.iter().sum::<f32>() + rest) as f64;
            }
            total
        }
    }

    widest! {
        /// out = (x - mean) * scale + shift.
        fn normalise(out: &mut [f32], x: &[f32], mean: f32, scale: f32, shift: f32) {
            out.iter_mut().zip(x).for_each(|(o, &v)| *o = (v - mean) * scale + shift);
        }
    }

    widest! {
        /// (sum(g), sum(g * (x - mean))) over one plane.
        fn grad_sums(x: &[f32], g: &[f32], mean: f32) -> (f64, f64) {
            let (mut sg, mut sgx) = (0f64, 0f64);
            for (x, g) in x.chunks(BLOCK).zip(g.chunks(BLOCK)) {
                let (mut a, mut b) = ([0f32; LANES], [0f32; LANES]);
                let (xc, gc) = (x.chunks_exact(LANES), g.chunks_exact(LANES));
                let (mut ra, mut rb) = (0f32, 0f32);
                for (&x, &g) in xc.remainder().iter().zip(gc.remainder()) {
                    ra += g;
                    rb += g * (x - mean);
                }
                for (x, g) in xc.zip(gc) {
                    for i in 0..LANES {
                        a[i] += g[i];
                        b[i] += g[i] * (x[i] - mean);
                    }
                }
                sg += (a.iter().sum::<f32>() + ra) as f64;
                sgx += (b.iter().sum::<f32>() + rb) as f64;
            }
            (sg, sgx)
        }
    }

    widest! {
        /// The same with g in `dx`, overwritten.
        fn input_gradient_in_place(dx: &mut [f32], x: &[f32], mean: f32, inv_std: f32, scale: f32, mean_g: f32, mean_gx: f32) {
            let projection = inv_std * mean_gx;
            for (d, &x) in dx.iter_mut().zip(x) {
                *d = scale * (*d - mean_g - (x - mean) * projection);
            }
        }
    }

    widest! {
        /// dx = scale * (g - mean_g - (x - mean) * inv_std * mean_gx).
        fn input_gradient(dx: &mut [f32], x: &[f32], g: &[f32], mean: f32, inv_std: f32, scale: f32, mean_g: f32, mean_gx: f32) {
            let projection = inv_std * mean_gx;
            for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                *d = scale * (g - mean_g - (x - mean) * projection);
            }
        }
    }
}
