//! Binary cross-entropy with logits, element by element (PyTorch's `BCEWithLogitsLoss` with
//! `reduction='none'`, which Ultralytics' YOLOv8 losses use for classes and masks):
//! `max(x, 0) - x t + log(1 + exp(-|x|))`, stable for any logit.
//!
//! Why: composed of tensor operations (clamp, product, difference, abs, negation, exp, log1p, sum)
//! it took eight passes forward and as many back, each on one thread in flex, over the mask loss's
//! [objects, 160 x 160] logits: with libm's `expf` and `log1pf` about 2 % of a yolov8n-seg training
//! step (batch 8, 320 px). On flex it is one pass each way, split among the cores; the gradient
//! is written by hand: d/dx = sigmoid(x) - t, d/dt = -x. Other backends and dtypes take the
//! composed form, which this is tested against (`training/tests/fused_conv_training.rs`).

use burn::tensor::Tensor;

/// The loss of each logit against its target (same shapes), not reduced.
pub fn bce_with_logits<const D: usize>(logits: Tensor<D>, targets: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if let Some(loss) = flex::forward(&logits, &targets) {
        return loss;
    }
    composed(logits, targets)
}

/// The composed form (every backend).
pub fn composed<const D: usize>(logits: Tensor<D>, targets: Tensor<D>) -> Tensor<D> {
    logits.clone().clamp_min(0.0) - logits.clone() * targets + logits.abs().neg().exp().log1p()
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

    /// Values per task.
    const CHUNK: usize = 1 << 14;

    /// Kiln's kernel on float32 flex tensors of one shape (autodiff or not); None elsewhere.
    pub fn forward<const D: usize>(logits: &Tensor<D>, targets: &Tensor<D>) -> Option<Tensor<D>> {
        if !super::super::conv_act::flex_kernels()
            || logits.dtype() != DType::F32
            || targets.dtype() != DType::F32
            || logits.dims() != targets.dims()
        {
            return None;
        }
        if let (Ok(x), Ok(t)) = (
            logits.clone().try_into_primitive::<Autodiff<Flex>>(),
            targets.clone().try_into_primitive::<Autodiff<Flex>>(),
        ) {
            let (xs, ts) = (x.primitive().to_contiguous(), t.primitive().to_contiguous());
            if xs.dtype() != DType::F32 || ts.dtype() != DType::F32 {
                return None;
            }
            let output = loss(&xs, &ts);
            let nodes = [x.node(), t.node()];
            let output = match BceBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish((xs, ts), output),
                OpsKind::UnTracked(prep) => prep.finish(output),
            };
            return Some(Tensor::from_primitive::<Autodiff<Flex>>(output));
        }
        let x = logits.clone().try_into_primitive::<Flex>().ok()?.to_contiguous();
        let t = targets.clone().try_into_primitive::<Flex>().ok()?.to_contiguous();
        (x.dtype() == DType::F32 && t.dtype() == DType::F32).then(|| Tensor::from_primitive::<Flex>(loss(&x, &t)))
    }

    fn loss(x: &FlexTensor, t: &FlexTensor) -> FlexTensor {
        let (xs, ts) = (x.storage::<f32>(), t.storage::<f32>());
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).zip(ts.par_chunks(CHUNK)).for_each(|((out, xs), ts)| {
            for ((o, &x), &t) in out.iter_mut().zip(xs).zip(ts) {
                *o = x.max(0.0) - x * t + (-x.abs()).exp().ln_1p();
            }
        });
        FlexTensor::from_data(TensorData::new(out, x.layout().shape().to_vec()))
    }

    #[derive(Debug)]
    struct BceBackward;

    impl Backward<Flex, 2> for BceBackward {
        type State = (FlexTensor, FlexTensor);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let [node_x, node_t] = ops.parents;
            let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
            let (x, t) = ops.state;
            let dims = x.layout().shape().to_vec();
            let (g, xs, ts) = (grad.storage::<f32>(), x.storage::<f32>(), t.storage::<f32>());
            if let Some(node) = node_x {
                let mut dx = vec![0f32; xs.len()];
                dx.par_chunks_mut(CHUNK)
                    .zip(xs.par_chunks(CHUNK))
                    .zip(ts.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                    .for_each(|((dx, xs), (ts, gs))| {
                        for (((d, &x), &t), &g) in dx.iter_mut().zip(xs).zip(ts).zip(gs) {
                            *d = g * (1.0 / (1.0 + (-x).exp()) - t);
                        }
                    });
                grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, dims.clone())));
            }
            if let Some(node) = node_t {
                let dt: Vec<f32> = xs.par_iter().zip(g.par_iter()).map(|(&x, &g)| -g * x).collect();
                grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dt, dims)));
            }
        }
    }
}
