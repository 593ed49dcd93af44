//! An element-wise activation on flex (SiLU, GELU): forward in one pass over the tensor, split
//! among the cores, and under autodiff a backward pass of its own, also one pass, recomputing the
//! derivative from the saved input. Each activation gives its two slice functions ([`Kernels`]);
//! this holds what they share: the dtype and backend checks, the autodiff registration, the split.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

/// Values per task: below two of these a tensor is done on the calling thread.
const CHUNK: usize = 1 << 14;

/// An activation's slice functions.
#[derive(Clone, Copy)]
pub(crate) struct Kernels {
    /// dst = f(src).
    pub forward: fn(&[f32], &mut [f32]),
    /// dst = grad * f'(x): (x, grad, dst).
    pub gradient: fn(&[f32], &[f32], &mut [f32]),
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kernels")
    }
}

/// f(x) by the kernels: None when the tensor is not a float32 flex tensor (the caller falls back).
pub(crate) fn apply<const D: usize>(x: &Tensor<D>, kernels: Kernels) -> Option<Tensor<D>> {
    if x.dtype() != DType::F32 {
        return None;
    }
    if let Ok(tracked) = x.clone().try_into_primitive::<Autodiff<Flex>>() {
        if tracked.primitive().dtype() != DType::F32 {
            return None;
        }
        return Some(Tensor::from_primitive::<Autodiff<Flex>>(apply_tracked(tracked, kernels)));
    }
    let plain = x.clone().try_into_primitive::<Flex>().ok()?;
    (plain.dtype() == DType::F32).then(|| Tensor::from_primitive::<Flex>(forward(&plain, kernels)))
}

/// The backward step: the input and the kernels are the state, the derivative is recomputed.
#[derive(Debug)]
struct ElementwiseBackward;

impl Backward<Flex, 1> for ElementwiseBackward {
    type State = (FlexTensor, Kernels);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (input, kernels) = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| backward(&input, &grad, kernels));
    }
}

// Compute-bound (the input saved, nothing recomputed by a checkpointer): kiln's student training
// does not checkpoint, and a saved input is less than Burn's compositions keep.
fn apply_tracked(x: FloatTensor<Autodiff<Flex>>, kernels: Kernels) -> FloatTensor<Autodiff<Flex>> {
    let guard = x.node();
    let input = x.into_primitive();
    let output = forward(&input, kernels);
    match ElementwiseBackward.prepare::<NoCheckpointing>([guard]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((input, kernels), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

fn forward(x: &FlexTensor, kernels: Kernels) -> FlexTensor {
    let x = x.to_contiguous();
    let src = x.storage::<f32>();
    let mut out = vec![0f32; src.len()];
    if src.len() < 2 * CHUNK {
        (kernels.forward)(src, &mut out);
    } else {
        out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(o, i)| (kernels.forward)(i, o));
    }
    FlexTensor::from_data(TensorData::new(out, x.layout().shape().as_slice().to_vec()))
}

fn backward(x: &FlexTensor, grad: &FlexTensor, kernels: Kernels) -> FlexTensor {
    let (x, grad) = (x.to_contiguous(), grad.to_contiguous());
    let (xs, gs) = (x.storage::<f32>(), grad.storage::<f32>());
    assert_eq!(xs.len(), gs.len(), "activation backward: the gradient has the input's shape");
    let mut out = vec![0f32; xs.len()];
    if xs.len() < 2 * CHUNK {
        (kernels.gradient)(xs, gs, &mut out);
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
            .for_each(|(o, (x, g))| (kernels.gradient)(x, g, o));
    }
    FlexTensor::from_data(TensorData::new(out, x.layout().shape().as_slice().to_vec()))
}
