//! `LayerNorm2d` of segment_anything/modeling/common.py: a channel-wise LayerNorm of an NCHW map
//! (eps 1e-6), used by SAM's necks and mask decoder.

use burn::module::{Module, Param};
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
