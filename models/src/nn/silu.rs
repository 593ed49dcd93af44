//! SiLU, `x * sigmoid(x)` (Ultralytics' `Conv` activation), in one pass over the tensor on flex, on
//! every core, forward and backward.
//!
//! Why: Burn composes SiLU as a sigmoid (one thread, libm's `expf` per value, a branch per value)
//! and a product, and differentiates the two separately: four passes in training, two of them
//! single-threaded, 12 % of a yolov8n-seg training step on flex. Here the forward pass is one
//! vectorised pass, and under autodiff the backward pass is one too, written by hand:
//! d/dx x·s(x) = s(x)·(1 + x·(1 − s(x))), from the saved input alone.
//!
//! Other backends, dtypes other than float32, and `KILN_FLEX_KERNELS=0` take Burn's `silu`, which
//! this is tested against (values and gradients, `training/tests/fused_conv_training.rs`).

use burn::tensor::Tensor;

/// `x * sigmoid(x)`: one pass on flex (with a one-pass backward under autodiff), Burn's
/// composition elsewhere.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if super::conv_act::flex_kernels()
        && let Some(y) = flex::silu(&x)
    {
        return y;
    }
    burn::tensor::activation::silu(x)
}

#[cfg(feature = "flex")]
pub mod flex {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{DType, Tensor, TensorData};
    use rayon::prelude::*;

    use super::super::conv_act::{silu_gradient, silu_to};

    /// Values per task: below two of these a tensor is done on the calling thread.
    const CHUNK: usize = 1 << 14;

    /// The kernel itself: None when the tensor is not a float32 flex tensor (the caller falls back).
    pub fn silu<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
        if x.dtype() != DType::F32 {
            return None;
        }
        if let Ok(tracked) = x.clone().try_into_primitive::<Autodiff<Flex>>() {
            if tracked.primitive().dtype() != DType::F32 {
                return None;
            }
            return Some(Tensor::from_primitive::<Autodiff<Flex>>(silu_tracked(tracked)));
        }
        let plain = x.clone().try_into_primitive::<Flex>().ok()?;
        (plain.dtype() == DType::F32).then(|| Tensor::from_primitive::<Flex>(forward(&plain)))
    }

    /// The backward step: the input is the state, the gradient is recomputed from it.
    #[derive(Debug)]
    struct SiluBackward;

    impl Backward<Flex, 1> for SiluBackward {
        type State = FlexTensor;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let _span = crate::nn::profile::span(crate::nn::profile::Kernel::SiluBackward);
            let input = ops.state;
            unary::<Flex, _>(ops.parents, ops.node, grads, |grad| backward(&input, &grad));
        }
    }

    // Compute-bound (the input saved, nothing recomputed by a checkpointer): kiln's student
    // training does not checkpoint, and a saved input is less than Burn's composition keeps
    // (the input and the sigmoid).
    fn silu_tracked(x: FloatTensor<Autodiff<Flex>>) -> FloatTensor<Autodiff<Flex>> {
        let _span = crate::nn::profile::span(crate::nn::profile::Kernel::SiluForward);
        let guard = x.node();
        let input = x.into_primitive();
        let output = forward(&input);
        match SiluBackward.prepare::<NoCheckpointing>([guard]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(input, output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        }
    }

    fn forward(x: &FlexTensor) -> FlexTensor {
        let x = x.to_contiguous();
        let src = x.storage::<f32>();
        let mut out = vec![0f32; src.len()];
        if src.len() < 2 * CHUNK {
            silu_to(src, &mut out);
        } else {
            out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(o, i)| silu_to(i, o));
        }
        FlexTensor::from_data(TensorData::new(out, x.layout().shape().as_slice().to_vec()))
    }

    fn backward(x: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
        let (x, grad) = (x.to_contiguous(), grad.to_contiguous());
        let (xs, gs) = (x.storage::<f32>(), grad.storage::<f32>());
        assert_eq!(xs.len(), gs.len(), "SiLU backward: the gradient has the input's shape");
        let mut out = vec![0f32; xs.len()];
        if xs.len() < 2 * CHUNK {
            silu_gradient(xs, gs, &mut out);
        } else {
            out.par_chunks_mut(CHUNK)
                .zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
                .for_each(|(o, (x, g))| silu_gradient(x, g, o));
        }
        FlexTensor::from_data(TensorData::new(out, x.layout().shape().as_slice().to_vec()))
    }
}
