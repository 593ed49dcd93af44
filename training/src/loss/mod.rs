//! The YOLOv8 training loss (Ultralytics `utils/loss.py::v8DetectionLoss` and
//! `v8SegmentationLoss` with instance masks): task-aligned assignment, then
//! - box: `1 - CIoU` of the decoded box, weighted by the anchor's soft target;
//! - dfl: Distribution Focal Loss of the box-side distributions, same weights;
//! - cls: binary cross-entropy of every class logit against the soft targets;
//! - seg: per positive anchor, BCE of `coefficients · prototypes` against its object's mask,
//!   cropped to the object's box and normalised by the box area;
//!
//! each normalised by the sum of the soft targets (seg: by the number of positive anchors), scaled
//! by its gain (box 7.5, cls 0.5, dfl 1.5, seg = box), summed and multiplied by the batch size.

pub mod assigner;
pub mod bbox;
pub mod distill;

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln_data::batch::DetectionBatch;
use kiln_models::yolo::head::{HeadOutput, REG_MAX};
use serde::{Deserialize, Serialize};

pub use assigner::{AssignerConfig, Assignment, GroundTruth, assign};
use bbox::{ciou_tensor, distribution_focal_loss};
pub use distill::DistillLoss;
use distill::TeacherAnchors;
use kiln_data::batch::TeacherTargets;

/// The strides of YOLOv8's three detection levels.
pub const STRIDES: [usize; 3] = [8, 16, 32];

/// Gains and assigner settings (Ultralytics' defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    pub box_gain: f32,
    pub cls_gain: f32,
    pub dfl_gain: f32,
    pub topk: usize,
    pub alpha: f32,
    pub beta: f32,
    /// Where instance masks overlap, the smaller object's target keeps the shared cells and the
    /// larger one's loses them (Ultralytics' `overlap_mask`, on by default there and in
    /// configs/student.yaml); off, every target is the instance's whole mask. A config saved
    /// before the setting existed reads as off, as those runs trained.
    #[serde(default)]
    pub overlap_mask: bool,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self { box_gain: 7.5, cls_gain: 0.5, dfl_gain: 1.5, topk: 10, alpha: 0.5, beta: 6.0, overlap_mask: true }
    }
}

impl LossConfig {
    pub fn assigner(&self) -> AssignerConfig {
        AssignerConfig { topk: self.topk, alpha: self.alpha, beta: self.beta, min_side: STRIDES[1] as f32 }
    }
}

/// Ground truths of a batch, padded per image (the layout of [`DetectionBatch`]).
#[derive(Debug, Clone)]
pub struct Targets {
    /// `[B, M, 4]` `x1, y1, x2, y2` in input pixels.
    pub boxes: Tensor<3>,
    /// `[B, M]` class indexes.
    pub classes: Tensor<2, Int>,
    /// `[B, M]` 1 for a real instance, 0 for padding.
    pub valid: Tensor<2>,
    /// `[B, M, H/4, W/4]` instance masks at the prototypes' resolution.
    pub masks: Option<Tensor<4>>,
    /// Teacher signals per slot, when the batch has teacher labels or teacher masks.
    pub teacher: Option<TeacherTargets>,
}

impl From<&DetectionBatch> for Targets {
    fn from(batch: &DetectionBatch) -> Self {
        Self {
            boxes: batch.boxes.clone(),
            classes: batch.classes.clone(),
            valid: batch.valid.clone(),
            masks: batch.masks.clone(),
            teacher: batch.teacher.clone(),
        }
    }
}

/// Loss parts before their gains, as Ultralytics logs them after the gains (`box_loss`, ...).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LossParts {
    pub box_loss: f32,
    pub cls_loss: f32,
    pub dfl_loss: f32,
    /// Zero for detection models.
    pub seg_loss: f32,
    /// Logit distillation (zero without teacher labels).
    #[serde(default)]
    pub distill_logit_loss: f32,
    /// Mask distillation (zero without teacher masks).
    #[serde(default)]
    pub distill_mask_loss: f32,
    /// Feature distillation (zero without teacher features).
    #[serde(default)]
    pub distill_feature_loss: f32,
    /// The part of box + cls + dfl + seg (after gains) at anchors assigned to teacher labels;
    /// already included in those four, so not added by `sum()`.
    #[serde(default)]
    pub teacher_label_loss: f32,
}

impl LossParts {
    pub fn sum(&self) -> f32 {
        self.box_loss
            + self.cls_loss
            + self.dfl_loss
            + self.seg_loss
            + self.distill_logit_loss
            + self.distill_mask_loss
            + self.distill_feature_loss
    }
}

/// The loss to back-propagate (a one-element tensor) and its parts (with gains, per image).
#[derive(Debug, Clone)]
pub struct LossOutput {
    pub total: Tensor<1>,
    pub parts: LossParts,
    pub foreground: usize,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum LossError {
    #[error(
        "the target masks are {target:?} pixels but the prototypes are {prototypes:?}: masks must be made at a quarter of the input size"
    )]
    MaskSize { target: [usize; 2], prototypes: [usize; 2] },
    #[error("the model predicts masks but the batch has none (or the other way round)")]
    MasksMissing,
    #[error(
        "the student's projected features are {student:?} (channels, rows, columns) but the teacher's are {teacher:?}"
    )]
    FeatureSize { student: [usize; 3], teacher: [usize; 3] },
    #[error(transparent)]
    Device(#[from] kiln_models::DeviceError),
}

/// Anchor centres (grid units) and their strides, level by level, row-major: `make_anchors`.
pub fn anchors(levels: &[[usize; 2]]) -> (Vec<[f32; 2]>, Vec<f32>) {
    let mut points = Vec::new();
    let mut strides = Vec::new();
    for (&[h, w], &stride) in levels.iter().zip(&STRIDES) {
        for y in 0..h {
            for x in 0..w {
                points.push([x as f32 + 0.5, y as f32 + 0.5]);
                strides.push(stride as f32);
            }
        }
    }
    (points, strides)
}

/// `[B, C, H, W]` per level → `[B, A, C]`, anchors in `make_anchors` order.
pub fn flatten_levels(levels: &[Tensor<4>]) -> Tensor<3> {
    let flat: Vec<Tensor<3>> = levels
        .iter()
        .map(|level| {
            let [b, c, h, w] = level.dims();
            level.clone().reshape([b, c, h * w])
        })
        .collect();
    Tensor::cat(flat, 2).swap_dims(1, 2)
}

/// `max(x, 0) - x t + log(1 + e^-|x|)`: BCE with logits, element-wise.
fn bce_with_logits<const D: usize>(logits: Tensor<D>, targets: Tensor<D>) -> Tensor<D> {
    kiln_models::nn::bce_with_logits(logits, targets)
}

fn host_f32<const D: usize>(tensor: Tensor<D>) -> Result<Vec<f32>, LossError> {
    Ok(kiln_models::device::read_floats(tensor)?)
}

fn tensor_from<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn index_tensor(values: Vec<i64>, device: &Device) -> Tensor<1, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

/// The sum of the rows of `values` where `teacher` holds (for the teacher-label loss, which is only
/// logged: pass detached values), or `None` when it holds nowhere.
fn teacher_rows<const D: usize>(values: Tensor<D>, teacher: impl Iterator<Item = bool>) -> Option<Tensor<1>> {
    let rows: Vec<i64> = teacher.enumerate().filter(|&(_, t)| t).map(|(k, _)| k as i64).collect();
    if rows.is_empty() {
        return None;
    }
    let index = index_tensor(rows, &values.device());
    Some(values.select(0, index).sum())
}

/// The task-aligned assignment of a whole batch, from the head's raw output (no gradient).
pub struct BatchAssignment {
    pub assignments: Vec<Assignment>,
    /// `[B][M]` ground-truth boxes (input pixels) and classes.
    pub boxes: Vec<Vec<[f32; 4]>>,
    pub classes: Vec<Vec<usize>>,
    pub anchors: Vec<[f32; 2]>,
    pub strides: Vec<f32>,
}

/// The YOLOv8 loss of one batch.
pub fn yolo_loss(config: &LossConfig, output: &HeadOutput, targets: &Targets) -> Result<LossOutput, LossError> {
    yolo_loss_distilled(config, None, output, targets)
}

/// The YOLOv8 loss of one batch, and with `distill` and teacher signals in `targets`, the
/// distillation terms: teacher labels learn with the teacher's class probabilities as soft class
/// targets (times `teacher_labels`), and the logit and mask distillation terms are added.
pub fn yolo_loss_distilled(
    config: &LossConfig,
    distill: Option<&DistillLoss>,
    output: &HeadOutput,
    targets: &Targets,
) -> Result<LossOutput, LossError> {
    let device = output.levels[0].device();
    let [batch_size, channels, h0, w0] = output.levels[0].dims();
    let nc = channels - 4 * REG_MAX;
    let input_size = [h0 * STRIDES[0], w0 * STRIDES[0]];
    let predictions = flatten_levels(&output.levels); // [B, A, 64 + nc]
    let num_anchors = predictions.dims()[1];
    let pred_dist = predictions.clone().slice([0..batch_size, 0..num_anchors, 0..4 * REG_MAX]);
    let pred_scores = predictions.slice([0..batch_size, 0..num_anchors, 4 * REG_MAX..channels]);

    let level_sizes: Vec<[usize; 2]> = output.levels.iter().map(|l| [l.dims()[2], l.dims()[3]]).collect();
    let (anchor_points, anchor_strides) = anchors(&level_sizes);
    let pred_boxes = decode_boxes(pred_dist.clone(), &anchor_points, &device); // grid units

    let mut assignment =
        assign_batch(config, pred_scores.clone(), pred_boxes.clone(), targets, anchor_points, anchor_strides)?;
    let teacher = distill.zip(targets.teacher.as_ref());
    let max_objects = targets.boxes.dims()[1];
    let softened = match teacher {
        Some((weights, signals)) => {
            distill::soften_targets(&mut assignment, signals, max_objects, nc, weights.teacher_labels)
        }
        None => None,
    };
    let anchor_weights = softened.as_ref().map(|s| s.weights.as_slice());
    // The teacher anchors' shares of box, cls, dfl and seg (after gains), summed for the log.
    let mut teacher_shares: Vec<Tensor<1>> = Vec::new();
    let logit = match teacher {
        Some((weights, signals)) if weights.logit > 0.0 => {
            distill::logit_distillation(pred_scores.clone(), &assignment, signals, max_objects, weights.temperature)?
        }
        _ => None,
    };
    let mut target_scores = Vec::with_capacity(batch_size * num_anchors * nc);
    for a in &assignment.assignments {
        target_scores.extend_from_slice(&a.target_scores);
    }
    let target_scores_sum = match anchor_weights {
        None => target_scores.iter().sum::<f32>(),
        Some(w) => target_scores.chunks(nc).zip(w).map(|(row, w)| row.iter().sum::<f32>() * w).sum(),
    }
    .max(1.0);
    let target_scores = tensor_from(target_scores, [batch_size, num_anchors, nc], &device);
    let cls = match &softened {
        None => bce_with_logits(pred_scores.clone(), target_scores).sum() / target_scores_sum,
        Some(s) => {
            let w = tensor_from(s.weights.clone(), [batch_size, num_anchors, 1], &device);
            let weighted = bce_with_logits(pred_scores.clone(), target_scores) * w;
            let rows = weighted.clone().detach().reshape([batch_size * num_anchors, nc]);
            if let Some(share) = teacher_rows(rows, s.teacher.iter().copied()) {
                teacher_shares.push(share / target_scores_sum * config.cls_gain);
            }
            weighted.sum() / target_scores_sum
        }
    };

    // Positive anchors, flattened over the batch, with their fixed targets in grid units.
    let mut positive = Vec::new();
    let mut weights = Vec::new();
    let mut target_boxes = Vec::new();
    let mut target_distances = Vec::new();
    for (b, a) in assignment.assignments.iter().enumerate() {
        for j in (0..num_anchors).filter(|&j| a.foreground[j]) {
            let stride = assignment.strides[j];
            let gt = assignment.boxes[b][a.target_index[j]].map(|v| v / stride);
            let [ax, ay] = assignment.anchors[j];
            let limit = REG_MAX as f32 - 1.0 - 0.01;
            positive.push((b * num_anchors + j) as i64);
            let anchor_weight = anchor_weights.map_or(1.0, |w| w[b * num_anchors + j]);
            weights.push(a.target_scores[j * nc..(j + 1) * nc].iter().sum::<f32>() * anchor_weight);
            target_boxes.extend_from_slice(&gt);
            target_distances.push([ax - gt[0], ay - gt[1], gt[2] - ax, gt[3] - ay].map(|d| d.clamp(0.0, limit)));
        }
    }
    let n = positive.len();
    let zero = || Tensor::<1>::zeros([1], &device);
    let (box_loss, dfl) = if n == 0 {
        (zero(), zero())
    } else {
        let index = Tensor::<1, Int>::from_data(TensorData::new(positive.clone(), [n]), &device);
        let weight = tensor_from(weights, [n], &device);
        let predicted = pred_boxes.reshape([batch_size * num_anchors, 4]).select(0, index.clone());
        let iou = ciou_tensor(predicted, tensor_from(target_boxes, [n, 4], &device));
        let box_per_anchor = (iou.neg() + 1.0) * weight.clone();
        let logits = pred_dist.reshape([batch_size * num_anchors, 4, REG_MAX]).select(0, index);
        let dfl_per_anchor = distribution_focal_loss(logits, &target_distances) * weight;
        if let Some(s) = &softened {
            let is_teacher: Vec<bool> = positive.iter().map(|&i| s.teacher[i as usize]).collect();
            for (per_anchor, gain) in [(&box_per_anchor, config.box_gain), (&dfl_per_anchor, config.dfl_gain)] {
                if let Some(share) = teacher_rows(per_anchor.clone().detach(), is_teacher.iter().copied()) {
                    teacher_shares.push(share / target_scores_sum * gain);
                }
            }
        }
        (box_per_anchor.sum() / target_scores_sum, dfl_per_anchor.sum() / target_scores_sum)
    };

    let seg = match (&output.coefficients, &output.prototypes, &targets.masks) {
        (Some(coefficients), Some(prototypes), Some(masks)) => {
            let (seg, teacher_share) = mask_loss(
                coefficients,
                prototypes.clone(),
                masks.clone(),
                &assignment,
                softened.as_ref(),
                input_size,
                n,
            )?;
            teacher_shares.extend(teacher_share.map(|share| share * config.box_gain));
            Some(seg)
        }
        (None, None, _) => None,
        _ => return Err(LossError::MasksMissing),
    };

    let mask_distillation = match (teacher, &output.coefficients, &output.prototypes) {
        (Some((weights, signals)), Some(coefficients), Some(prototypes)) if weights.mask > 0.0 => {
            distill::mask_distillation(coefficients, prototypes.clone(), &assignment, signals, max_objects, input_size)?
        }
        _ => None,
    };

    let mut total = box_loss.clone() * config.box_gain + cls.clone() * config.cls_gain + dfl.clone() * config.dfl_gain;
    if let Some(seg) = &seg {
        total = total + seg.clone() * config.box_gain;
    }
    let distill_gain = |pick: fn(&DistillLoss) -> f32| distill.map_or(0.0, pick);
    if let Some(logit) = &logit {
        total = total + logit.clone() * distill_gain(|d| d.logit);
    }
    if let Some(mask) = &mask_distillation {
        total = total + mask.clone() * distill_gain(|d| d.mask);
    }
    let scalar = |t: Tensor<1>, gain: f32| -> Result<f32, LossError> { Ok(host_f32(t)?[0] * gain) };
    let parts = LossParts {
        box_loss: scalar(box_loss, config.box_gain)?,
        cls_loss: scalar(cls, config.cls_gain)?,
        dfl_loss: scalar(dfl, config.dfl_gain)?,
        seg_loss: match seg {
            Some(s) => scalar(s, config.box_gain)?,
            None => 0.0,
        },
        distill_logit_loss: match logit {
            Some(l) => scalar(l, distill_gain(|d| d.logit))?,
            None => 0.0,
        },
        distill_mask_loss: match mask_distillation {
            Some(m) => scalar(m, distill_gain(|d| d.mask))?,
            None => 0.0,
        },
        distill_feature_loss: 0.0,
        teacher_label_loss: match teacher_shares.into_iter().reduce(|a, b| a + b) {
            Some(t) => scalar(t, 1.0)?,
            None => 0.0,
        },
    };
    Ok(LossOutput { total: total * batch_size as f32, parts, foreground: n })
}

/// DFL expectation per side, then distances → `x1, y1, x2, y2` around the anchors (grid units).
pub fn decode_boxes(pred_dist: Tensor<3>, anchors: &[[f32; 2]], device: &Device) -> Tensor<3> {
    let [b, a, _] = pred_dist.dims();
    let bins = tensor_from((0..REG_MAX).map(|i| i as f32).collect(), [REG_MAX, 1], device);
    let distances = softmax(pred_dist.reshape([b * a * 4, REG_MAX]), 1).matmul(bins).reshape([b, a, 4]);
    let anchor = tensor_from(anchors.iter().flatten().copied().collect(), [1, a, 2], device);
    let left_top = distances.clone().slice([0..b, 0..a, 0..2]);
    let right_bottom = distances.slice([0..b, 0..a, 2..4]);
    Tensor::cat(vec![anchor.clone() - left_top, anchor + right_bottom], 2)
}

/// Runs the assigner on every image (detached predictions, input pixels).
pub fn assign_batch(
    config: &LossConfig,
    pred_scores: Tensor<3>,
    pred_boxes_grid: Tensor<3>,
    targets: &Targets,
    anchors_grid: Vec<[f32; 2]>,
    strides: Vec<f32>,
) -> Result<BatchAssignment, LossError> {
    let [batch_size, num_anchors, nc] = pred_scores.dims();
    let scores = host_f32(burn::tensor::activation::sigmoid(pred_scores.detach()))?;
    let boxes = host_f32(pred_boxes_grid.detach())?;
    let [_, m, _] = targets.boxes.dims();
    let gt_boxes = host_f32(targets.boxes.clone())?;
    let gt_classes: Vec<i64> = kiln_models::device::read_ints(targets.classes.clone())?;
    let gt_valid = host_f32(targets.valid.clone())?;
    let anchors_px: Vec<[f32; 2]> = anchors_grid.iter().zip(&strides).map(|(p, s)| [p[0] * s, p[1] * s]).collect();
    let config_assigner = config.assigner();
    let mut result = BatchAssignment {
        assignments: Vec::with_capacity(batch_size),
        boxes: Vec::with_capacity(batch_size),
        classes: Vec::with_capacity(batch_size),
        anchors: anchors_grid,
        strides,
    };
    for b in 0..batch_size {
        let image_boxes: Vec<[f32; 4]> =
            (0..m).map(|i| std::array::from_fn(|k| gt_boxes[(b * m + i) * 4 + k])).collect();
        let classes: Vec<usize> = (0..m).map(|i| gt_classes[b * m + i].max(0) as usize).collect();
        let valid: Vec<bool> = (0..m).map(|i| gt_valid[b * m + i] > 0.5).collect();
        let predicted: Vec<[f32; 4]> = (0..num_anchors)
            .map(|j| {
                let s = result.strides[j];
                std::array::from_fn(|k| boxes[(b * num_anchors + j) * 4 + k] * s)
            })
            .collect();
        let truth = GroundTruth { classes: &classes, boxes: &image_boxes, valid: &valid };
        let image_scores = &scores[b * num_anchors * nc..(b + 1) * num_anchors * nc];
        result.assignments.push(assign(&config_assigner, image_scores, nc, &predicted, &anchors_px, &truth));
        result.boxes.push(image_boxes);
        result.classes.push(classes);
    }
    Ok(result)
}

/// Mask loss summed over positive anchors, divided by their number (Ultralytics'
/// `calculate_segmentation_loss` with `overlap_mask=False`), and with teacher anchors, their share
/// of it (detached, for the log).
fn mask_loss(
    coefficients: &[Tensor<4>],
    prototypes: Tensor<4>,
    masks: Tensor<4>,
    assignment: &BatchAssignment,
    teacher: Option<&TeacherAnchors>,
    input_size: [usize; 2],
    positives: usize,
) -> Result<(Tensor<1>, Option<Tensor<1>>), LossError> {
    let device = prototypes.device();
    let [_, nm, mh, mw] = prototypes.dims();
    let [_, m, th, tw] = masks.dims();
    if [th, tw] != [mh, mw] {
        return Err(LossError::MaskSize { target: [th, tw], prototypes: [mh, mw] });
    }
    let coefficients = flatten_levels(coefficients); // [B, A, nm]
    let num_anchors = coefficients.dims()[1];
    let mut total = Tensor::<1>::zeros([1], &device);
    let mut teacher_sums = Vec::new();
    for (b, a) in assignment.assignments.iter().enumerate() {
        let anchors: Vec<usize> = (0..num_anchors).filter(|&j| a.foreground[j]).collect();
        if anchors.is_empty() {
            continue;
        }
        let n = anchors.len();
        let anchor_index = Tensor::<1, Int>::from_data(
            TensorData::new(anchors.iter().map(|&j| j as i64).collect::<Vec<_>>(), [n]),
            &device,
        );
        let object_index = Tensor::<1, Int>::from_data(
            TensorData::new(anchors.iter().map(|&j| a.target_index[j] as i64).collect::<Vec<_>>(), [n]),
            &device,
        );
        let image_coefficients =
            coefficients.clone().slice([b..b + 1, 0..num_anchors, 0..nm]).reshape([num_anchors, nm]);
        let image_prototypes = prototypes.clone().slice([b..b + 1, 0..nm, 0..mh, 0..mw]).reshape([nm, mh * mw]);
        let logits = image_coefficients.select(0, anchor_index).matmul(image_prototypes);
        let truth = masks.clone().slice([b..b + 1, 0..m, 0..mh, 0..mw]).reshape([m, mh * mw]).select(0, object_index);
        let boxes: Vec<[f32; 4]> = anchors.iter().map(|&j| assignment.boxes[b][a.target_index[j]]).collect();
        let mut weight = crop_weights(&boxes, input_size, [mh, mw]);
        if let Some(teacher) = teacher {
            for (row, &j) in weight.chunks_mut(mh * mw).zip(&anchors) {
                let w = teacher.weights[b * num_anchors + j];
                row.iter_mut().for_each(|v| *v *= w);
            }
        }
        let weight = tensor_from(weight, [n, mh * mw], &device);
        let loss = bce_with_logits(logits, truth) * weight;
        if let Some(teacher) = teacher {
            let rows = anchors.iter().map(|&j| teacher.teacher[b * num_anchors + j]);
            teacher_sums.extend(teacher_rows(loss.clone().detach(), rows));
        }
        total = total + loss.sum();
    }
    let positives = positives.max(1) as f32;
    Ok((total / positives, teacher_sums.into_iter().reduce(|a, b| a + b).map(|t| t / positives)))
}

/// Per box, `[mh * mw]` weights that are, inside the box (prototype pixels), one over the pixel
/// count and the box's area as a fraction of the image (the mean over the crop, favouring small
/// objects), and zero outside: Ultralytics' crop and normalisation of the mask loss.
pub fn crop_weights(boxes: &[[f32; 4]], input_size: [usize; 2], [mh, mw]: [usize; 2]) -> Vec<f32> {
    let mut weight = vec![0f32; boxes.len() * mh * mw];
    for (i, &[x1, y1, x2, y2]) in boxes.iter().enumerate() {
        let (nx1, nx2) = (x1 / input_size[1] as f32, x2 / input_size[1] as f32);
        let (ny1, ny2) = (y1 / input_size[0] as f32, y2 / input_size[0] as f32);
        let area = (nx2 - nx1) * (ny2 - ny1);
        let (cx1, cx2, cy1, cy2) = (nx1 * mw as f32, nx2 * mw as f32, ny1 * mh as f32, ny2 * mh as f32);
        let value = 1.0 / ((mh * mw) as f32 * area);
        for r in 0..mh {
            let rf = r as f32;
            if rf < cy1 || rf >= cy2 {
                continue;
            }
            for c in 0..mw {
                let cf = c as f32;
                if cf >= cx1 && cf < cx2 {
                    weight[(i * mh + r) * mw + c] = value;
                }
            }
        }
    }
    weight
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHANNELS: usize = 4 * REG_MAX + 2;

    fn wave(i: usize, frequency: f32) -> f32 {
        (i as f32 * frequency).sin()
    }

    /// Two 64 x 64 images, 2 classes, 4 mask coefficients: head outputs whose side distributions
    /// peak at bin 2 (boxes about 40 pixels wide on the first level, overlapping the objects).
    fn head_output(device: &Device) -> HeadOutput {
        let sides = [8usize, 4, 2];
        let levels: Vec<Tensor<4>> = sides
            .iter()
            .map(|&side| {
                let values: Vec<f32> = (0..2 * CHANNELS * side * side)
                    .map(|i| {
                        let c = i / (side * side) % CHANNELS;
                        if c < 4 * REG_MAX {
                            let peak = if c % REG_MAX == 2 { 5.0 } else { 0.0 };
                            peak + 0.3 * wave(i, 0.7)
                        } else {
                            0.5 * wave(i, 1.3) - 1.0
                        }
                    })
                    .collect();
                tensor_from(values, [2, CHANNELS, side, side], device)
            })
            .collect();
        let coefficients: Vec<Tensor<4>> = sides
            .iter()
            .map(|&side| {
                let values = (0..2 * 4 * side * side).map(|i| 0.5 * wave(i, 0.9)).collect();
                tensor_from(values, [2, 4, side, side], device)
            })
            .collect();
        let prototypes = tensor_from((0..2 * 4 * 16 * 16).map(|i| wave(i, 0.3)).collect(), [2, 4, 16, 16], device);
        HeadOutput { levels, coefficients: Some(coefficients), prototypes: Some(prototypes) }
    }

    /// Image 0: two objects (classes 0 and 1); image 1: one (class 0) and padding. Masks fill the
    /// boxes at the prototypes' resolution (4 pixels a cell).
    fn targets(device: &Device, teacher: Option<TeacherTargets>) -> Targets {
        let boxes: [[f32; 4]; 4] =
            [[8.0, 8.0, 40.0, 40.0], [30.0, 26.0, 60.0, 58.0], [12.0, 16.0, 44.0, 52.0], [0.0; 4]];
        let masks: Vec<f32> = boxes
            .iter()
            .flat_map(|&[x1, y1, x2, y2]| {
                (0..16 * 16).map(move |p| {
                    let (x, y) = ((p % 16) as f32 * 4.0 + 2.0, (p / 16) as f32 * 4.0 + 2.0);
                    if x > x1 && x < x2 && y > y1 && y < y2 { 1.0 } else { 0.0 }
                })
            })
            .collect();
        Targets {
            boxes: tensor_from(boxes.iter().flatten().copied().collect(), [2, 2, 4], device),
            classes: Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 1, 0, 0], [2, 2]), device),
            valid: tensor_from(vec![1.0, 1.0, 1.0, 0.0], [2, 2], device),
            masks: Some(tensor_from(masks, [2, 2, 16, 16], device)),
            teacher,
        }
    }

    fn signals(class_probs: Vec<Option<Vec<f32>>>) -> TeacherTargets {
        TeacherTargets { class_probs, soft_masks: vec![None; 4], features: None }
    }

    #[test]
    fn the_teacher_label_loss_is_the_teacher_anchors_share_of_the_yolo_loss() {
        let device = kiln_models::device::cpu();
        let output = head_output(&device);
        let config = LossConfig::default();
        let parts = |teacher_labels: f32, teacher: Option<TeacherTargets>| {
            let distill = DistillLoss { teacher_labels, logit: 1.0, temperature: 2.0, mask: 0.0, feature: 0.0 };
            yolo_loss_distilled(&config, Some(&distill), &output, &targets(&device, teacher)).unwrap().parts
        };
        let yolo = |p: &LossParts| p.box_loss + p.cls_loss + p.dfl_loss + p.seg_loss;

        // The second and third objects are the teacher's: a part of the four terms, not added again.
        let mixed = signals(vec![None, Some(vec![0.3, 0.6]), Some(vec![0.7, 0.2]), None]);
        let taught = parts(1.0, Some(mixed.clone()));
        assert!(taught.teacher_label_loss > 0.0 && taught.teacher_label_loss < yolo(&taught), "{taught:?}");
        assert_eq!(taught.sum(), yolo(&taught) + taught.distill_logit_loss);

        // Every object the teacher's: box, dfl and seg are all theirs, cls only at their anchors,
        // not at the background's.
        let every = signals(vec![Some(vec![0.9, 0.1]), Some(vec![0.3, 0.6]), Some(vec![0.7, 0.2]), None]);
        let all = parts(1.0, Some(every));
        let cls_share = all.teacher_label_loss - (all.box_loss + all.dfl_loss + all.seg_loss);
        assert!(cls_share > 1e-4 && cls_share < all.cls_loss, "{all:?}");

        // Ignored teacher labels have no share.
        assert_eq!(parts(0.0, Some(mixed)).teacher_label_loss, 0.0);

        // Without teacher labels, the plain loss and no share.
        let plain = yolo_loss(&config, &output, &targets(&device, None)).unwrap().parts;
        assert_eq!(plain.teacher_label_loss, 0.0);
        for teacher in [None, Some(signals(vec![None; 4]))] {
            assert_eq!(parts(1.0, teacher), plain);
        }
    }
}
