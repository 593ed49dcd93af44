//! Blocks of SAM's encoders (segment_anything/modeling/common.py): `MLPBlock` (`lin1`, activation,
//! `lin2`) and the neck. `LayerNorm2d` and the decoder's `MLP`, which GroundingDINO uses too, are
//! in `crate::nn`.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;

use crate::nn::gelu;
use burn::tensor::{Device, Tensor};

use crate::nn::LayerNorm2d;

/// The encoders' neck to the prompt width: conv 1x1 (no bias), LayerNorm2d, conv 3x3 (no bias),
/// LayerNorm2d; keys `neck.{0,1,2,3}`.
pub type Neck = (Conv2d, LayerNorm2d, Conv2d, LayerNorm2d);

pub fn neck(c_in: usize, out: usize, device: &Device) -> Neck {
    (
        Conv2dConfig::new([c_in, out], [1, 1]).with_bias(false).init(device),
        LayerNorm2d::new(out, device),
        Conv2dConfig::new([out, out], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .with_bias(false)
            .init(device),
        LayerNorm2d::new(out, device),
    )
}

pub fn neck_forward(neck: &Neck, x: Tensor<4>) -> Tensor<4> {
    let (conv1, norm1, conv2, norm2) = neck;
    norm2.forward(conv2.forward(norm1.forward(conv1.forward(x))))
}

/// The activation of an MLP: GELU in the image encoder, ReLU in the two-way transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Gelu,
    Relu,
}

impl Activation {
    pub fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Activation::Gelu => gelu(x),
            Activation::Relu => relu(x),
        }
    }
}

/// `MLPBlock(embedding_dim, mlp_dim, act)`: `lin2(act(lin1(x)))`.
#[derive(Module, Debug)]
pub struct MlpBlock {
    pub lin1: Linear,
    pub lin2: Linear,
    #[module(skip)]
    pub activation: Activation,
}

impl MlpBlock {
    pub fn new(embedding_dim: usize, mlp_dim: usize, activation: Activation, device: &Device) -> Self {
        Self {
            lin1: LinearConfig::new(embedding_dim, mlp_dim).init(device),
            lin2: LinearConfig::new(mlp_dim, embedding_dim).init(device),
            activation,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.lin2.forward(self.activation.apply(self.lin1.forward(x)))
    }
}
