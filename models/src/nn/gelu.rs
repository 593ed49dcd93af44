//! GELU in its exact form, `0.5 x (1 + erf(x / sqrt 2))` (SAM's and GroundingDINO's MLPs, MiniLM),
//! in one vectorised pass on every core on flex, forward and backward.
//!
//! Why: Burn flex computes GELU on one thread, calling libm's `erff` per value, and its backward
//! pass likewise with `expf`; SAM vit_b's encoder runs it on 12 x 4096 x 3072 values per image.
//! Here erf is Abramowitz and Stegun's 7.1.26 (absolute error below 1.5e-7, float32's own step
//! near 1) over kiln's vectorised `exp`, so the loop vectorises; under autodiff the backward
//! pass is one pass too, written by hand: d/dx = 0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) /
//! sqrt(2 pi), from the saved input.
//!
//! Other backends, dtypes other than float32, and `KILN_FLEX_KERNELS=0` take Burn's `gelu`, which
//! this is tested against (values and gradients, `training/tests/fused_conv_training.rs`).

use burn::tensor::Tensor;

/// `0.5 x (1 + erf(x / sqrt 2))`: one pass on flex (with a one-pass backward under autodiff),
/// Burn's elsewhere.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if super::conv_act::flex_kernels()
        && let Some(y) = flex::gelu(&x)
    {
        return y;
    }
    burn::tensor::activation::gelu(x)
}

/// (0.5 (1 + erf(x / sqrt 2)), exp(-x^2 / 2)): the normal distribution's CDF at x and its
/// density times sqrt(2 pi).
#[inline(always)]
fn cdf_and_gaussian(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152_1, 1.061_405_4];
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let gaussian = super::conv_act::exp_f32(-z * z);
    let erf = 1.0 - poly * gaussian;
    let erf = if x < 0.0 { -erf } else { erf };
    (0.5 * (1.0 + erf), gaussian)
}

widest! {
    /// dst = gelu(src).
    pub(crate) fn gelu_to(src: &[f32], dst: &mut [f32]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = x * cdf_and_gaussian(x).0;
        }
    }
}

widest! {
    /// dst = grad * gelu'(x).
    pub(crate) fn gelu_gradient(x: &[f32], grad: &[f32], dst: &mut [f32]) {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for ((d, &x), &g) in dst.iter_mut().zip(x).zip(grad) {
            let (cdf, gaussian) = cdf_and_gaussian(x);
            *d = g * (cdf + x * gaussian * INV_SQRT_2PI);
        }
    }
}

#[cfg(feature = "flex")]
pub mod flex {
    use super::super::elementwise::{Kernels, apply};
    use super::{gelu_gradient, gelu_to};
    use burn::tensor::Tensor;

    /// The kernel itself: None when the tensor is not a float32 flex tensor (the caller falls back).
    pub fn gelu<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
        apply(x, Kernels { forward: gelu_to, gradient: gelu_gradient })
    }
}
