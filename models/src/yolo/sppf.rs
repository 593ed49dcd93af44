//! Ultralytics `SPPF` (ultralytics/nn/modules/block.py): spatial pyramid pooling, fast — three
//! chained 5x5 max-pools. Keys: `cv1`, `cv2`.

use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::tensor::{Device, Tensor};

use super::conv::Conv;
use crate::nn::max_pool_pyramid;

#[derive(Module, Debug)]
pub struct Sppf {
    pub cv1: Conv,
    pub cv2: Conv,
    pub m: MaxPool2d,
}

impl Sppf {
    pub fn new(c1: usize, c2: usize, kernel: usize, device: &Device) -> Self {
        let hidden = c1 / 2;
        let pad = kernel / 2;
        Self {
            cv1: Conv::new(c1, hidden, 1, 1, 1, device),
            cv2: Conv::new(hidden * 4, c2, 1, 1, 1, device),
            m: MaxPool2dConfig::new([kernel, kernel])
                .with_strides([1, 1])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .init(),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        // `self.m`'s pool, three times (`nn::max_pool`: one pass on flex at inference).
        self.cv2.forward(max_pool_pyramid(self.cv1.forward(x), self.m.kernel_size[0], 3))
    }
}
