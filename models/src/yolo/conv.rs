//! Ultralytics `Conv` (ultralytics/nn/modules/conv.py): Conv2d without bias, BatchNorm
//! (eps 1e-3), SiLU. State-dict keys: `conv.weight`, `bn.{weight,bias,running_mean,running_var}`.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, FloatDType, Tensor};

use crate::nn::{Activation, batch_norm_silu, conv2d_activation, silu};

#[derive(Module, Debug)]
pub struct Conv {
    pub conv: Conv2d,
    pub bn: BatchNorm,
    /// BatchNorm folded into `conv` (inference only, [`Conv::fold_batch_norm`]): the forward pass
    /// skips `bn`, which keeps the values it had.
    #[module(skip)]
    pub folded: bool,
    /// Mixed precision (`--precision bf16`): the convolution computes in this type, its weights
    /// and everything around it (BatchNorm, SiLU, the loss) stay float32. None: float32.
    #[module(skip)]
    pub compute: Option<FloatDType>,
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
        Self { conv, bn, folded: false, compute: None }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = match self.compute {
            Some(dtype) => conv_in(&self.conv, x, dtype),
            // Folded: the bias and SiLU in the convolution's output loop where the backend has one.
            None if self.folded => return conv2d_activation(&self.conv, x, Activation::Silu),
            // Training (and an unfolded model): kiln's flex kernel and backward pass where they
            // apply (see `conv_act`), then BatchNorm and SiLU as one kernel (`nn::batch_norm`).
            None => conv2d_activation(&self.conv, x, Activation::Identity),
        };
        if self.folded {
            return silu(y);
        }
        batch_norm_silu(&self.bn, y)
    }

    /// Folds the BatchNorm (inference statistics) into the convolution, as ONNX export does:
    /// `W' = W * g / sqrt(var + eps)` per output channel and the bias `b' = beta - mean * g /
    /// sqrt(var + eps)`, so that inference runs one pass per layer instead of two. For a model in
    /// inference mode (`valid()`) only: training would update the statistics `bn` no longer reads.
    pub fn fold_batch_norm(&mut self) {
        if self.folded {
            return;
        }
        let scale = self.bn.gamma.val() / (self.bn.running_var.value() + self.bn.epsilon).sqrt();
        let channels = scale.dims()[0];
        let shift = self.bn.beta.val() - self.bn.running_mean.value() * scale.clone();
        let shift = match &self.conv.bias {
            Some(bias) => shift + bias.val() * scale.clone(),
            None => shift,
        };
        let weight = self.conv.weight.val() * scale.reshape([channels, 1, 1, 1]);
        self.conv.weight = Param::from_tensor(weight);
        self.conv.bias = Some(Param::from_tensor(shift));
        self.folded = true;
    }
}

/// `conv` computed in `dtype` on a float32 input, its output back in float32: mixed precision as
/// PyTorch's autocast runs a convolution. The weights stay float32 (the optimiser's master copy)
/// and receive float32 gradients through the casts, which Burn's autodiff differentiates. A
/// padding other than kiln's symmetric explicit one runs in float32.
pub fn conv_in(conv: &Conv2d, x: Tensor<4>, dtype: FloatDType) -> Tensor<4> {
    let padding = match conv.padding {
        PaddingConfig2d::Explicit(a, b, c, d) if a == b && b == c && c == d => [a, a],
        PaddingConfig2d::Valid => [0, 0],
        _ => return conv.forward(x),
    };
    let options = ConvOptions::new(conv.stride, padding, conv.dilation, conv.groups);
    let weight = conv.weight.val().cast(dtype);
    let bias = conv.bias.as_ref().map(|bias| bias.val().cast(dtype));
    burn::tensor::module::conv2d(x.cast(dtype), weight, bias, options).cast(FloatDType::F32)
}
