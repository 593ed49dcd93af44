//! A transposed convolution whose stride equals its kernel (no padding, dilation or groups), the
//! learned 2x upsampling of YOLOv8-seg's mask prototypes, on flex as matrix products: with
//! `Z = W^T X` per image (`W` as `[c_in, c_out·kh·kw]`, `X` as `[c_in, h·w]`), output pixel
//! `(y·kh + p, x·kw + q)` of channel `o` is `Z[(o, p, q), (y, x)] + b[o]`: the kernel positions do
//! not overlap, so each output value is one dot product. Backward: `dZ` gathered from the output
//! gradient the same way, `dX = W dZ`, `dW = Σ_images X dZ^T` (each image's share computed apart,
//! added in image order: a run repeats itself exactly), `db` the gradient's sum per channel.
//!
//! Why: Burn flex runs this layer as a general transposed convolution (a scatter per value), and
//! its backward pass as two more convolutions through Burn's own conv3d: about 2.5 % of a
//! yolov8n-seg training step (batch 8, 320 px) in a profile where kiln's convolutions were most of
//! the rest. Every other configuration, other backends, dtypes other than float32 and
//! `KILN_FLEX_KERNELS=0` take burn-nn's `forward`, which this is tested against (values and the
//! gradients of the input, weight and bias: `training/tests/fused_conv_training.rs`).

use burn::nn::conv::ConvTranspose2d;
use burn::tensor::Tensor;

/// `layer.forward(x)`, by kiln's kernel where it applies (flex, float32, stride = kernel, no
/// padding, dilation or groups; inference and training).
pub fn conv_transpose2d(layer: &ConvTranspose2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if let Some(y) = flex::forward(layer, &x) {
        return y;
    }
    layer.forward(x)
}

#[cfg(feature = "flex")]
pub mod flex {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::flex::FlexTensor;
    use burn::backend::{Autodiff, Flex};
    use burn::nn::conv::ConvTranspose2d;
    use burn::tensor::{DType, Tensor, TensorData};
    use rayon::prelude::*;

    use super::super::conv_act::matmul;

    /// The sizes of one call.
    #[derive(Clone, Copy, Debug)]
    struct Shape {
        batch: usize,
        channels_in: usize,
        channels_out: usize,
        height: usize,
        width: usize,
        kernel: [usize; 2],
    }

    impl Shape {
        /// Rows of Z: c_out x kh x kw.
        fn rows(&self) -> usize {
            self.channels_out * self.kernel[0] * self.kernel[1]
        }
        fn positions(&self) -> usize {
            self.height * self.width
        }
        fn input_len(&self) -> usize {
            self.channels_in * self.positions()
        }
        fn output_len(&self) -> usize {
            self.rows() * self.positions()
        }
    }

    /// The layer on flex (autodiff or not) by kiln's kernel; None where it does not apply.
    pub fn forward(layer: &ConvTranspose2d, x: &Tensor<4>) -> Option<Tensor<4>> {
        let plain = layer.stride == layer.kernel_size
            && layer.padding == [0, 0]
            && layer.padding_out == [0, 0]
            && layer.dilation == [1, 1]
            && layer.groups == 1;
        if !plain || !super::super::conv_act::flex_kernels() || x.dtype() != DType::F32 {
            return None;
        }
        if let Ok(x) = x.clone().try_into_primitive::<Autodiff<Flex>>() {
            let weight = layer.weight.val().try_into_primitive::<Autodiff<Flex>>().ok()?;
            let bias = match &layer.bias {
                Some(bias) => Some(bias.val().try_into_primitive::<Autodiff<Flex>>().ok()?),
                None => None,
            };
            let (output, shape) =
                compute(x.primitive(), weight.primitive(), bias.as_ref().map(|b| b.primitive()), layer.kernel_size)?;
            let output = match bias {
                Some(bias) => {
                    let nodes = [x.node(), weight.node(), bias.node()];
                    match TransposedBiasBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
                        OpsKind::Tracked(prep) => {
                            prep.finish((x.into_primitive(), weight.into_primitive(), shape), output)
                        }
                        OpsKind::UnTracked(prep) => prep.finish(output),
                    }
                }
                None => {
                    let nodes = [x.node(), weight.node()];
                    match TransposedBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
                        OpsKind::Tracked(prep) => {
                            prep.finish((x.into_primitive(), weight.into_primitive(), shape), output)
                        }
                        OpsKind::UnTracked(prep) => prep.finish(output),
                    }
                }
            };
            return Some(Tensor::from_primitive::<Autodiff<Flex>>(output));
        }
        let x = x.clone().try_into_primitive::<Flex>().ok()?;
        let weight = layer.weight.val().try_into_primitive::<Flex>().ok()?;
        let bias = match &layer.bias {
            Some(bias) => Some(bias.val().try_into_primitive::<Flex>().ok()?),
            None => None,
        };
        let (output, _) = compute(&x, &weight, bias.as_ref(), layer.kernel_size)?;
        Some(Tensor::from_primitive::<Flex>(output))
    }

    /// The forward pass on flex tensors, or None where the shapes or dtypes do not fit.
    fn compute(
        x: &FlexTensor,
        weight: &FlexTensor,
        bias: Option<&FlexTensor>,
        kernel: [usize; 2],
    ) -> Option<(FlexTensor, Shape)> {
        if [Some(x), Some(weight), bias].into_iter().flatten().any(|t| t.dtype() != DType::F32) {
            return None;
        }
        let (x, weight) = (x.to_contiguous(), weight.to_contiguous());
        let &[batch, channels_in, height, width] = x.layout().shape().as_slice() else { return None };
        let &[weight_in, channels_out, kh, kw] = weight.layout().shape().as_slice() else { return None };
        let bias = bias.map(|b| b.to_contiguous().storage::<f32>().to_vec());
        if weight_in != channels_in || [kh, kw] != kernel || bias.as_ref().is_some_and(|b| b.len() != channels_out) {
            return None;
        }
        let shape = Shape { batch, channels_in, channels_out, height, width, kernel };
        let (x, weight) = (x.storage::<f32>(), weight.storage::<f32>());
        let mut output = vec![0f32; batch * shape.output_len()];
        if !output.is_empty() {
            output.par_chunks_mut(shape.output_len()).enumerate().for_each_init(Vec::new, |z, (image, out)| {
                z.resize(shape.output_len(), 0.0);
                // SAFETY: dst is the [rows, positions] `z`; lhs(r, c) = weight[c * rows + r] (the
                // [c_in, rows] weight transposed), rhs = this image's [c_in, positions] input.
                unsafe {
                    matmul(
                        [shape.rows(), shape.positions(), channels_in],
                        (z.as_mut_ptr(), shape.positions(), 1),
                        (weight.as_ptr(), 1, shape.rows()),
                        (x[image * shape.input_len()..].as_ptr(), shape.positions(), 1),
                        1.0,
                    )
                };
                scatter(z, out, &shape, bias.as_deref());
            });
        }
        let dims = [batch, channels_out, height * kh, width * kw];
        Some((FlexTensor::from_data(TensorData::new(output, dims)), shape))
    }

    /// One image: out[o][y·kh + p][x·kw + q] = z[(o·kh + p)·kw + q][y·w + x] + bias[o].
    fn scatter(z: &[f32], out: &mut [f32], shape: &Shape, bias: Option<&[f32]>) {
        let ([kh, kw], width) = (shape.kernel, shape.width);
        let row_len = width * kw;
        for (o, channel) in out.chunks_exact_mut(shape.positions() * kh * kw).enumerate() {
            let b = bias.map_or(0.0, |b| b[o]);
            for (out_row, line) in channel.chunks_exact_mut(row_len).enumerate() {
                let (y, p) = (out_row / kh, out_row % kh);
                for q in 0..kw {
                    let source = &z[((o * kh + p) * kw + q) * shape.positions() + y * width..][..width];
                    for (x, &value) in source.iter().enumerate() {
                        line[x * kw + q] = value + b;
                    }
                }
            }
        }
    }

    /// One image, scatter's inverse: dz[(o·kh + p)·kw + q][y·w + x] = g[o][y·kh + p][x·kw + q].
    fn gather(g: &[f32], dz: &mut [f32], shape: &Shape) {
        let ([kh, kw], width) = (shape.kernel, shape.width);
        let row_len = width * kw;
        for (o, channel) in g.chunks_exact(shape.positions() * kh * kw).enumerate() {
            for (out_row, line) in channel.chunks_exact(row_len).enumerate() {
                let (y, p) = (out_row / kh, out_row % kh);
                for q in 0..kw {
                    let target = &mut dz[((o * kh + p) * kw + q) * shape.positions() + y * width..][..width];
                    for (x, value) in target.iter_mut().enumerate() {
                        *value = line[x * kw + q];
                    }
                }
            }
        }
    }

    #[derive(Debug)]
    struct TransposedBackward;

    impl Backward<Flex, 2> for TransposedBackward {
        type State = (FlexTensor, FlexTensor, Shape);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let [node_x, node_weight] = ops.parents;
            let grad = grads.consume::<Flex>(&ops.node);
            let (x, weight, shape) = ops.state;
            register(node_x.map(|n| n.id), node_weight.map(|n| n.id), None, x, weight, grad, shape, grads);
        }
    }

    #[derive(Debug)]
    struct TransposedBiasBackward;

    impl Backward<Flex, 3> for TransposedBiasBackward {
        type State = (FlexTensor, FlexTensor, Shape);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let [node_x, node_weight, node_bias] = ops.parents;
            let grad = grads.consume::<Flex>(&ops.node);
            let (x, weight, shape) = ops.state;
            let bias = node_bias.map(|n| n.id);
            register(node_x.map(|n| n.id), node_weight.map(|n| n.id), bias, x, weight, grad, shape, grads);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn register(
        node_x: Option<burn::backend::autodiff::NodeId>,
        node_weight: Option<burn::backend::autodiff::NodeId>,
        node_bias: Option<burn::backend::autodiff::NodeId>,
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
        shape: Shape,
        grads: &mut Gradients,
    ) {
        let (x, weight, grad) = (x.to_contiguous(), weight.to_contiguous(), grad.to_contiguous());
        let (x, weight, grad) = (x.storage::<f32>(), weight.storage::<f32>(), grad.storage::<f32>());
        let (rows, positions, c_in) = (shape.rows(), shape.positions(), shape.channels_in);
        let (batch, weight_len) = (shape.batch, c_in * rows);
        let mut dz = vec![0f32; batch * shape.output_len()];
        dz.par_chunks_mut(shape.output_len())
            .zip(grad.par_chunks(shape.output_len()))
            .for_each(|(dz, g)| gather(g, dz, &shape));
        if let Some(node) = node_bias {
            let per_channel = positions * shape.kernel[0] * shape.kernel[1];
            let db: Vec<f32> = (0..shape.channels_out)
                .into_par_iter()
                .map(|o| {
                    let sum: f64 = (0..batch)
                        .map(|image| {
                            let start = image * shape.output_len() + o * per_channel;
                            grad[start..start + per_channel].iter().sum::<f32>() as f64
                        })
                        .sum();
                    sum as f32
                })
                .collect();
            grads.register::<Flex>(node, FlexTensor::from_data(TensorData::new(db, [shape.channels_out])));
        }
        if let Some(node) = node_x {
            let mut dx = vec![0f32; batch * shape.input_len()];
            dx.par_chunks_mut(shape.input_len()).enumerate().for_each(|(image, dx)| {
                // SAFETY: dst is this image's [c_in, positions] dx; lhs = the [c_in, rows] weight,
                // rhs = this image's [rows, positions] dz.
                unsafe {
                    matmul(
                        [c_in, positions, rows],
                        (dx.as_mut_ptr(), positions, 1),
                        (weight.as_ptr(), rows, 1),
                        (dz[image * shape.output_len()..].as_ptr(), positions, 1),
                        1.0,
                    )
                };
            });
            let dims = [batch, c_in, shape.height, shape.width];
            grads.register::<Flex>(node, FlexTensor::from_data(TensorData::new(dx, dims)));
        }
        if let Some(node) = node_weight {
            let mut shares = vec![0f32; batch * weight_len];
            shares.par_chunks_mut(weight_len).enumerate().for_each(|(image, share)| {
                // SAFETY: dst is this image's [c_in, rows] share; lhs = its [c_in, positions]
                // input, rhs(k, r) = dz[r][k] (its [rows, positions] dz transposed).
                unsafe {
                    matmul(
                        [c_in, rows, positions],
                        (share.as_mut_ptr(), rows, 1),
                        (x[image * shape.input_len()..].as_ptr(), positions, 1),
                        (dz[image * shape.output_len()..].as_ptr(), 1, positions),
                        1.0,
                    )
                };
            });
            let (first, rest) = shares.split_at_mut(weight_len);
            for share in rest.chunks_exact(weight_len) {
                first.iter_mut().zip(share).for_each(|(total, value)| *total += value);
            }
            shares.truncate(weight_len);
            let dims = [c_in, shape.channels_out, shape.kernel[0], shape.kernel[1]];
            grads.register::<Flex>(node, FlexTensor::from_data(TensorData::new(shares, dims)));
        }
    }
}
