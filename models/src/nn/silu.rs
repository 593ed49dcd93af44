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
    use super::super::conv_act::{silu_gradient, silu_to};
    use super::super::elementwise::{Kernels, apply};
    use burn::tensor::Tensor;

    /// The kernel itself: None when the tensor is not a float32 flex tensor (the caller falls back).
    pub fn silu<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
        apply(x, Kernels { forward: silu_to, gradient: silu_gradient })
    }
}
