//! Box regression losses of YOLOv8: Complete-IoU (Zheng et al., "Distance-IoU Loss", 2020) and the
//! Distribution Focal Loss of GFL (Li et al., 2020) over `reg_max = 16` bins, following
//! Ultralytics' `utils/metrics.py::bbox_iou(CIoU=True)`, `utils/loss.py::{BboxLoss, DFLoss}`.

use std::f32::consts::PI;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Tensor, TensorData};

/// Ultralytics' `eps` in `bbox_iou`.
const EPS: f32 = 1e-7;

/// CIoU of two `x1, y1, x2, y2` boxes, as the assigner uses it (no gradient).
pub fn ciou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let (w1, h1) = (a[2] - a[0], a[3] - a[1] + EPS);
    let (w2, h2) = (b[2] - b[0], b[3] - b[1] + EPS);
    let inter = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0) * (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let union = w1 * h1 + w2 * h2 - inter + EPS;
    let iou = inter / union;
    let cw = a[2].max(b[2]) - a[0].min(b[0]);
    let ch = a[3].max(b[3]) - a[1].min(b[1]);
    let c2 = cw * cw + ch * ch + EPS;
    let rho2 = ((b[0] + b[2] - a[0] - a[2]).powi(2) + (b[1] + b[3] - a[1] - a[3]).powi(2)) / 4.0;
    let v = 4.0 / (PI * PI) * ((w2 / h2).atan() - (w1 / h1).atan()).powi(2);
    let alpha = v / (v - iou + (1.0 + EPS));
    iou - (rho2 / c2 + v * alpha)
}

/// CIoU of predicted boxes `[N, 4]` (differentiable) against fixed target boxes `[N, 4]`; `[N]`.
/// The trade-off weight `alpha` takes no gradient, as in the reference.
pub fn ciou_tensor(predicted: Tensor<2>, target: Tensor<2>) -> Tensor<1> {
    let n = predicted.dims()[0];
    let col = |t: &Tensor<2>, i: usize| t.clone().slice([0..n, i..i + 1]).reshape([n]);
    let (b1x1, b1y1, b1x2, b1y2) = (col(&predicted, 0), col(&predicted, 1), col(&predicted, 2), col(&predicted, 3));
    let (b2x1, b2y1, b2x2, b2y2) = (col(&target, 0), col(&target, 1), col(&target, 2), col(&target, 3));
    let w1 = b1x2.clone() - b1x1.clone();
    let h1 = b1y2.clone() - b1y1.clone() + EPS;
    let w2 = b2x2.clone() - b2x1.clone();
    let h2 = b2y2.clone() - b2y1.clone() + EPS;
    let inter_w = (b1x2.clone().min_pair(b2x2.clone()) - b1x1.clone().max_pair(b2x1.clone())).clamp_min(0.0);
    let inter_h = (b1y2.clone().min_pair(b2y2.clone()) - b1y1.clone().max_pair(b2y1.clone())).clamp_min(0.0);
    let inter = inter_w * inter_h;
    let union = w1.clone() * h1.clone() + w2.clone() * h2.clone() - inter.clone() + EPS;
    let iou = inter / union;
    let cw = b1x2.clone().max_pair(b2x2.clone()) - b1x1.clone().min_pair(b2x1.clone());
    let ch = b1y2.clone().max_pair(b2y2.clone()) - b1y1.clone().min_pair(b2y1.clone());
    let c2 = cw.powi_scalar(2) + ch.powi_scalar(2) + EPS;
    let rho2 = ((b2x1 + b2x2 - b1x1 - b1x2).powi_scalar(2) + (b2y1 + b2y2 - b1y1 - b1y2).powi_scalar(2)) / 4.0;
    let v = ((w2 / h2).atan() - (w1 / h1).atan()).powi_scalar(2) * (4.0 / (PI * PI));
    let alpha = (v.clone() / (v.clone() - iou.clone() + (1.0 + EPS))).detach();
    iou - (rho2 / c2 + v * alpha)
}

/// Distribution Focal Loss per box: `logits` `[N, 4, reg_max]`, `targets` `[N, 4]` distances in
/// grid units (already clamped to `[0, reg_max - 1.01]`); returns `[N]`, the mean over the 4 sides
/// of the cross-entropy against the two bins around each target, weighted by nearness.
pub fn distribution_focal_loss(logits: Tensor<3>, targets: &[[f32; 4]]) -> Tensor<1> {
    let [n, sides, bins] = logits.dims();
    let mut weights = vec![0f32; n * sides * bins];
    for (i, target) in targets.iter().enumerate() {
        for (s, &t) in target.iter().enumerate() {
            let t = t.clamp(0.0, bins as f32 - 1.0 - 0.01);
            let left = t as usize;
            let base = (i * sides + s) * bins;
            weights[base + left] += (left + 1) as f32 - t;
            weights[base + left + 1] += t - left as f32;
        }
    }
    let weights = Tensor::<3>::from_data(TensorData::new(weights, [n, sides, bins]), &logits.device());
    let log_probabilities = log_softmax(logits, 2);
    -(log_probabilities * weights).sum_dim(2).reshape([n, sides]).mean_dim(1).reshape([n])
}
