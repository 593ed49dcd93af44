//! SAM's mask supervision (Kirillov et al. 2023, "Segment Anything", §3 and appendix A "Losses"):
//! focal loss (Lin et al. 2017, as `torchvision.ops.sigmoid_focal_loss`) and dice loss on the mask
//! logits in a 20:1 ratio, plus the mean-squared error between the IoU head's prediction and the IoU
//! of the predicted mask with the ground truth.

use burn::tensor::Tensor;
use kiln_models::device::{DeviceError, read_floats};
use serde::{Deserialize, Serialize};

/// Weights and focal-loss shape; saved in `teacher_config.yaml`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MaskLossConfig {
    pub focal_weight: f64,
    pub dice_weight: f64,
    pub iou_weight: f64,
    pub focal_alpha: f64,
    pub focal_gamma: f64,
}

impl Default for MaskLossConfig {
    fn default() -> Self {
        Self { focal_weight: 20.0, dice_weight: 1.0, iou_weight: 1.0, focal_alpha: 0.25, focal_gamma: 2.0 }
    }
}

/// The parts of the loss, each summed over masks (divide by the count for a mean).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MaskLossParts {
    pub focal: f32,
    pub dice: f32,
    pub iou: f32,
}

impl MaskLossParts {
    pub fn add(self, other: Self, weight: f32) -> Self {
        Self {
            focal: self.focal + other.focal * weight,
            dice: self.dice + other.dice * weight,
            iou: self.iou + other.iou * weight,
        }
    }

    pub fn weighted_sum(&self, config: &MaskLossConfig) -> f32 {
        config.focal_weight as f32 * self.focal
            + config.dice_weight as f32 * self.dice
            + config.iou_weight as f32 * self.iou
    }
}

pub struct MaskLossOutput {
    /// The weighted loss summed over the masks.
    pub total: Tensor<1>,
    pub parts: MaskLossParts,
    /// IoU of each thresholded predicted mask with its target (the IoU head's regression target).
    pub ious: Vec<f32>,
}

/// The loss of `logits` (`[N, H, W]`) and `predicted_iou` (`[N]`) against binary `targets`
/// (`[N, H, W]`), summed over the N masks; the focal loss is a per-mask mean over pixels.
pub fn mask_loss(
    config: &MaskLossConfig,
    logits: Tensor<3>,
    predicted_iou: Tensor<1>,
    targets: Tensor<3>,
) -> Result<MaskLossOutput, DeviceError> {
    let [n, h, w] = logits.dims();
    let logits = logits.reshape([n, h * w]);
    let targets = targets.reshape([n, h * w]);
    let focal = sigmoid_focal(logits.clone(), targets.clone(), config.focal_alpha, config.focal_gamma).mean_dim(1);
    let dice = dice(logits.clone(), targets.clone());
    // The IoU head learns the quality of the mask it predicted: the target is a constant.
    let predicted_mask = logits.detach().greater_elem(0.0).float();
    let intersection = (predicted_mask.clone() * targets.clone()).sum_dim(1);
    let union = (predicted_mask + targets).sum_dim(1) - intersection.clone();
    let actual_iou = (intersection / union.clamp_min(1.0)).reshape([n]);
    let iou = (predicted_iou - actual_iou.clone()).square();
    let (focal, dice) = (focal.reshape([n]).sum(), dice.sum());
    let iou = iou.sum();
    let total =
        focal.clone() * config.focal_weight + dice.clone() * config.dice_weight + iou.clone() * config.iou_weight;
    let scalar = |t: &Tensor<1>| -> Result<f32, DeviceError> { Ok(read_floats(t.clone().detach())?[0]) };
    Ok(MaskLossOutput {
        parts: MaskLossParts { focal: scalar(&focal)?, dice: scalar(&dice)?, iou: scalar(&iou)? },
        ious: read_floats(actual_iou)?,
        total,
    })
}

/// `torchvision.ops.sigmoid_focal_loss(reduction="none")`: binary cross-entropy scaled by
/// `(1 - p_t)^gamma` and, for `alpha >= 0`, by `alpha` on positives and `1 - alpha` on negatives.
pub fn sigmoid_focal(logits: Tensor<2>, targets: Tensor<2>, alpha: f64, gamma: f64) -> Tensor<2> {
    let p = burn::tensor::activation::sigmoid(logits.clone());
    // Stable BCE with logits: max(x, 0) - x t + log(1 + exp(-|x|)).
    let ce = logits.clone().clamp_min(0.0) - logits.clone() * targets.clone() + logits.abs().neg().exp().log1p();
    let p_t = p.clone() * targets.clone() + (p.neg() + 1.0) * (targets.clone().neg() + 1.0);
    let loss = ce * (p_t.neg() + 1.0).powf_scalar(gamma);
    if alpha >= 0.0 { loss * (targets.clone() * alpha + (targets.neg() + 1.0) * (1.0 - alpha)) } else { loss }
}

/// Dice loss per row: `1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)` on sigmoid probabilities.
pub fn dice(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    let [n, _] = logits.dims();
    let p = burn::tensor::activation::sigmoid(logits);
    let numerator = (p.clone() * targets.clone()).sum_dim(1) * 2.0 + 1.0;
    let denominator = p.sum_dim(1) + targets.sum_dim(1) + 1.0;
    (numerator / denominator).neg().add_scalar(1.0).reshape([n])
}
