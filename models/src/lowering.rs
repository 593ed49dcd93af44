//! Equivalent forms of layers in the operations every ONNX exporter and runtime knows, for export
//! only: the result is the same function (same products, sums in another order), so an exported
//! graph matches the native model to float rounding. Each `from_*` returns `None` for a
//! configuration it does not cover; the caller keeps the original layer, and an exporter that
//! cannot lower it says so.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Tensor, TensorData};

/// A transposed convolution whose stride equals its kernel (no padding, dilation or groups), the
/// learned 2x upsampling of YOLOv8's mask prototypes, as: a 1x1 convolution to `kh·kw` groups of
/// output channels (one per position inside the kernel), nearest upsampling by the kernel, and
/// constant masks that give each output pixel the group of its position. Every output pixel
/// `(y·kh + p, x·kw + q)` is then `Σ_c W[c, o, p, q] · in[c, y, x] + b[o]`, the transposed
/// convolution's definition.
#[derive(Module, Debug)]
pub struct StridedUpsample {
    /// `[kh·kw·c_out, c_in, 1, 1]`, group `p·kw + q` holding `W[:, :, p, q]` transposed.
    pub conv: Conv2d,
    pub bias: Option<Param<Tensor<1>>>,
    pub kernel: [usize; 2],
    pub channels_out: usize,
}

impl StridedUpsample {
    pub fn from_conv_transpose(layer: &ConvTranspose2d) -> Option<Self> {
        let plain = layer.stride == layer.kernel_size
            && layer.padding == [0, 0]
            && layer.padding_out == [0, 0]
            && layer.dilation == [1, 1]
            && layer.groups == 1;
        if !plain {
            return None;
        }
        let [kh, kw] = layer.kernel_size;
        let [c_in, c_out] = layer.channels;
        let weight = layer.weight.val().permute([2, 3, 1, 0]).reshape([kh * kw * c_out, c_in, 1, 1]);
        let mut conv = Conv2dConfig::new([c_in, kh * kw * c_out], [1, 1]).with_bias(false).init(&weight.device());
        conv.weight = Param::from_tensor(weight);
        Some(Self { conv, bias: layer.bias.clone(), kernel: [kh, kw], channels_out: c_out })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let [kh, kw] = self.kernel;
        let (height, width) = (h * kh, w * kw);
        let device = x.device();
        let grouped = self.conv.forward(x);
        let upsampled =
            interpolate(grouped, InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([height, width]));
        let mut out: Option<Tensor<4>> = None;
        for p in 0..kh {
            for q in 0..kw {
                let mask: Vec<f32> = (0..height * width)
                    .map(|i| ((i / width) % kh == p && (i % width) % kw == q) as u8 as f32)
                    .collect();
                let mask = Tensor::<4>::from_data(TensorData::new(mask, [1, 1, height, width]), &device);
                let group = p * kw + q;
                let part = upsampled.clone().narrow(1, group * self.channels_out, self.channels_out) * mask;
                out = Some(match out {
                    Some(sum) => sum + part,
                    None => part,
                });
            }
        }
        let out = out.expect("a kernel has at least one position");
        match &self.bias {
            Some(bias) => out + bias.val().reshape([1, self.channels_out, 1, 1]),
            None => out,
        }
    }
}
