//! Ultralytics `Conv` (ultralytics/nn/modules/conv.py): Conv2d without bias, BatchNorm
//! (eps 1e-3), SiLU. State-dict keys: `conv.weight`, `bn.{weight,bias,running_mean,running_var}`.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor, activation::silu};

#[derive(Module, Debug)]
pub struct Conv {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

impl Conv {
    /// `Conv(c1, c2, k, s)` with Ultralytics' `autopad` (k // 2) and `groups`.
    pub fn new(c1: usize, c2: usize, kernel: usize, stride: usize, groups: usize, device: &Device) -> Self {
        let conv = Conv2dConfig::new([c1, c2], [kernel, kernel])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(kernel / 2, kernel / 2, kernel / 2, kernel / 2))
            .with_groups(groups)
            .with_bias(false)
            .init(device);
        // Ultralytics trains with momentum 0.03 (PyTorch convention: weight of the new batch).
        let bn = BatchNormConfig::new(c2).with_epsilon(1e-3).with_momentum(0.03).init(device);
        Self { conv, bn }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        silu(self.bn.forward(self.conv.forward(x)))
    }
}
