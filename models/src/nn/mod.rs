//! Blocks several models share, each in the file of its own and named as the official code names
//! it (the parameter keys follow).

/// `fn name(args) -> ret { body }`, compiled twice: for AVX-512 (chosen at run time where the
/// CPU has it: plain loops then run 16 floats an instruction, not the baseline's SSE 4) and for
/// the baseline. For loops LLVM vectorises by itself (`nn::batch_norm`'s sums and passes).
macro_rules! widest {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub mod attention;
pub mod batch_norm;
pub mod bce;
pub mod conv_act;
pub mod conv_transpose;
#[cfg(feature = "flex")]
mod elementwise;
pub mod gelu;
pub mod layer_norm_2d;
pub mod max_pool;
pub mod mlp;
pub mod profile;
pub mod silu;

pub use batch_norm::{batch_norm, batch_norm_silu};
pub use bce::bce_with_logits;
pub use conv_act::{
    Activation, conv2d_activation, flex_kernels, on_flex_workers, on_flex_workers_training, runs_kiln_kernel,
    set_flex_kernels,
};
pub use conv_transpose::conv_transpose2d;
pub use gelu::gelu;
pub use layer_norm_2d::LayerNorm2d;
pub use max_pool::max_pool_pyramid;
pub use mlp::Mlp;
pub use silu::silu;
