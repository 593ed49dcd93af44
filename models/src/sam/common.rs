//! Blocks shared by SAM's encoder and decoder (segment_anything/modeling/common.py): `LayerNorm2d`
//! (channel-wise LayerNorm of an NCHW map, eps 1e-6) and `MLPBlock` (`lin1`, activation, `lin2`).

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::{gelu, relu};
use burn::tensor::{Device, Tensor};

/// LayerNorm over the channels of `[batch, channels, height, width]`; keys `weight`, `bias`.
#[derive(Module, Debug)]
pub struct LayerNorm2d {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
}

impl LayerNorm2d {
    pub const EPS: f64 = 1e-6;

    pub fn new(channels: usize, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([channels], device)),
            bias: Param::from_tensor(Tensor::zeros([channels], device)),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, channels, _, _] = x.dims();
        let centred = x.clone() - x.mean_dim(1);
        let variance = centred.clone().square().mean_dim(1);
        let normalised = centred / (variance + Self::EPS).sqrt();
        normalised * self.weight.val().reshape([1, channels, 1, 1]) + self.bias.val().reshape([1, channels, 1, 1])
    }
}

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

/// The mask decoder's `MLP(input_dim, hidden_dim, output_dim, num_layers)`: Linear layers with ReLU
/// between them; keys `layers.<i>`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub layers: Vec<Linear>,
}

impl Mlp {
    pub fn new(input_dim: usize, hidden_dim: usize, output_dim: usize, num_layers: usize, device: &Device) -> Self {
        let layers = (0..num_layers)
            .map(|i| {
                let d_in = if i == 0 { input_dim } else { hidden_dim };
                let d_out = if i + 1 == num_layers { output_dim } else { hidden_dim };
                LinearConfig::new(d_in, d_out).init(device)
            })
            .collect();
        Self { layers }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let last = self.layers.len() - 1;
        self.layers.iter().enumerate().fold(x, |x, (i, layer)| {
            let y = layer.forward(x);
            if i < last { relu(y) } else { y }
        })
    }
}
