//! Blocks several models share, each in the file of its own and named as the official code names
//! it (the parameter keys follow).

pub mod batch_norm;
pub mod conv_act;
pub mod layer_norm_2d;
pub mod mlp;
pub mod silu;

pub use batch_norm::batch_norm;
pub use conv_act::{Activation, conv2d_activation, flex_kernels, on_flex_workers, runs_kiln_kernel, set_flex_kernels};
pub use layer_norm_2d::LayerNorm2d;
pub use mlp::Mlp;
pub use silu::silu;
