//! Ultralytics `Detect`, `DFL`, `Proto` and `Segment` heads (ultralytics/nn/modules/head.py and
//! block.py), YOLOv8 ("legacy") variant. Each branch is `Sequential(Conv, Conv, nn.Conv2d)`; here a
//! tuple module, so the state-dict keys are the official ones: `cv2.<level>.<0|1|2>`, `cv3...`,
//! `cv4...`, `dfl.conv.weight`, `proto.{cv1,upsample,cv2,cv3}`.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::tensor::{Device, Tensor, TensorData};

use super::conv::Conv;
use crate::lowering::StridedUpsample;
use crate::nn::{Activation, conv2d_activation};

/// Distribution Focal Loss bins per box side.
pub const REG_MAX: usize = 16;

/// Strides of the three detection levels (P3, P4, P5).
pub const STRIDES: [usize; 3] = [8, 16, 32];

pub type Branch = (Conv, Conv, Conv2d);

fn branch(c_in: usize, hidden: usize, c_out: usize, device: &Device) -> Branch {
    (
        Conv::new(c_in, hidden, 3, 1, 1, device),
        Conv::new(hidden, hidden, 3, 1, 1, device),
        Conv2dConfig::new([hidden, c_out], [1, 1]).init(device),
    )
}

/// A branch whose last convolution starts with every bias at `bias` (Ultralytics' `bias_init`).
fn branch_with_bias(c_in: usize, hidden: usize, c_out: usize, bias: f32, device: &Device) -> Branch {
    let mut b = branch(c_in, hidden, c_out, device);
    b.2.bias = Some(burn::module::Param::from_tensor(Tensor::full([c_out], bias, device)));
    b
}

/// `Detect.bias_init`: box logits at 2.0; class logits at the prior of 5 objects per 640-px
/// image spread over `nc` classes and the level's anchors (training from scratch starts calm).
fn class_prior(nc: usize, stride: usize) -> f32 {
    (5.0 / nc as f64 / (640.0 / stride as f64).powi(2)).ln() as f32
}

fn run(branch: &Branch, x: Tensor<4>) -> Tensor<4> {
    conv2d_activation(&branch.2, branch.1.forward(branch.0.forward(x)), Activation::Identity)
}

/// `DFL(c1=16)`: a fixed 1x1 conv with weights 0..15 that turns the 16-bin distribution of each box
/// side into its expectation. Stored in the checkpoint, never trained.
#[derive(Module, Debug)]
pub struct Dfl {
    pub conv: Conv2d,
}

impl Dfl {
    pub fn new(device: &Device) -> Self {
        let mut conv = Conv2dConfig::new([REG_MAX, 1], [1, 1]).with_bias(false).init(device);
        let bins: Vec<f32> = (0..REG_MAX).map(|i| i as f32).collect();
        conv.weight = Param::from_tensor(Tensor::from_data(TensorData::new(bins, [1, REG_MAX, 1, 1]), device))
            .set_require_grad(false);
        Self { conv }
    }

    /// `[B, 4 * 16, A]` logits → `[B, 4, A]` distances (in stride units): the softmax over each
    /// side's bins weighted by the conv's bin values, computed along the bin axis in place (no
    /// transpose), with only operations ONNX exporters know.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, _, a] = x.dims();
        let logits = x.reshape([b, 4, REG_MAX, a]);
        let (max, _) = logits.clone().max_dim_with_indices(2);
        let weights = (logits - max).exp();
        let bins = self.conv.weight.val().reshape([1, 1, REG_MAX, 1]);
        let expectation = (weights.clone() * bins).sum_dim(2) / weights.sum_dim(2);
        expectation.reshape([b, 4, a])
    }
}

/// `Detect(nc, ch)`, or `Segment(nc, nm, npr, ch)` when it carries the mask parts (`cv4`, `proto`):
/// one module, so both load from the official keys under `model.22`.
#[derive(Module, Debug)]
pub struct Head {
    /// Box branches: `4 * REG_MAX` outputs per level.
    pub cv2: Vec<Branch>,
    /// Class branches: `nc` outputs per level.
    pub cv3: Vec<Branch>,
    pub dfl: Dfl,
    /// Mask-coefficient branches (Segment only): `nm` outputs per level.
    pub cv4: Vec<Branch>,
    pub proto: Option<Proto>,
    pub nc: usize,
}

/// Raw head outputs.
#[derive(Debug, Clone)]
pub struct HeadOutput {
    /// Per level `[B, 4 * REG_MAX + nc, H, W]` (Ultralytics' training output of Detect).
    pub levels: Vec<Tensor<4>>,
    /// Per level `[B, nm, H, W]` mask coefficients (Segment).
    pub coefficients: Option<Vec<Tensor<4>>>,
    /// `[B, nm, H/4, W/4]` mask prototypes (Segment).
    pub prototypes: Option<Tensor<4>>,
}

impl Head {
    /// `Detect(nc, ch)`.
    pub fn detect(nc: usize, ch: [usize; 3], device: &Device) -> Self {
        let c2 = 16.max(ch[0] / 4).max(REG_MAX * 4);
        let c3 = ch[0].max(nc.min(100));
        Self {
            cv2: ch.iter().map(|&c| branch_with_bias(c, c2, 4 * REG_MAX, 2.0, device)).collect(),
            cv3: ch
                .iter()
                .zip(STRIDES)
                .map(|(&c, stride)| branch_with_bias(c, c3, nc, class_prior(nc, stride), device))
                .collect(),
            dfl: Dfl::new(device),
            cv4: Vec::new(),
            proto: None,
            nc,
        }
    }

    /// `Segment(nc, nm, npr, ch)`.
    pub fn segment(nc: usize, masks: usize, prototypes: usize, ch: [usize; 3], device: &Device) -> Self {
        let c4 = (ch[0] / 4).max(masks);
        Self {
            cv4: ch.iter().map(|&c| branch(c, c4, masks, device)).collect(),
            proto: Some(Proto::new(ch[0], prototypes, masks, device)),
            ..Self::detect(nc, ch, device)
        }
    }

    pub fn forward(&self, features: [Tensor<4>; 3]) -> HeadOutput {
        let prototypes = self.proto.as_ref().map(|p| p.forward(features[0].clone()));
        let coefficients =
            (!self.cv4.is_empty()).then(|| features.iter().zip(&self.cv4).map(|(x, b)| run(b, x.clone())).collect());
        let levels = features
            .into_iter()
            .enumerate()
            .map(|(i, x)| Tensor::cat(vec![run(&self.cv2[i], x.clone()), run(&self.cv3[i], x)], 1))
            .collect();
        HeadOutput { levels, coefficients, prototypes }
    }
}

/// `Proto(c1, c_=256, c2=32)`: the mask prototypes at 1/4 of the input resolution.
#[derive(Module, Debug)]
pub struct Proto {
    pub cv1: Conv,
    pub upsample: ConvTranspose2d,
    pub cv2: Conv,
    pub cv3: Conv,
    /// `upsample` in exportable form, set only on a copy made for export
    /// ([`crate::yolo::YoloV8::lowered_for_export`]); never saved or loaded.
    pub upsample_lowered: Option<StridedUpsample>,
}

impl Proto {
    pub fn new(c1: usize, hidden: usize, masks: usize, device: &Device) -> Self {
        Self {
            cv1: Conv::new(c1, hidden, 3, 1, 1, device),
            upsample: ConvTranspose2dConfig::new([hidden, hidden], [2, 2]).with_stride([2, 2]).init(device),
            cv2: Conv::new(hidden, hidden, 3, 1, 1, device),
            cv3: Conv::new(hidden, masks, 1, 1, 1, device),
            upsample_lowered: None,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.cv1.forward(x);
        let x = match &self.upsample_lowered {
            Some(lowered) => lowered.forward(x),
            None => crate::nn::conv_transpose2d(&self.upsample, x),
        };
        self.cv3.forward(self.cv2.forward(x))
    }
}
