//! GroundingDINO's fine-tuning loss (the DETR/DINO set criterion with token targets; the official
//! training code is unreleased, so this follows Open-GroundingDino's `matcher.py` / `SetCriterion`
//! and mmdetection's GroundingDINO head): a Hungarian matching per image and per prediction layer on
//! the cost `w_cls · C_focal + w_l1 · L1(cxcywh) + w_giou · (−GIoU)`, then a sigmoid focal loss over
//! every (query, real token) pair against the matched ground truth's phrase tokens, and L1 + (1 − GIoU)
//! on matched boxes, all divided by the number of ground-truth boxes. Applied to every decoder layer
//! and to the encoder's selected proposals.

use burn::tensor::{Bool, Int, Tensor, TensorData};
use kiln_models::device::{DeviceError, read_floats, read_ints};
use serde::{Deserialize, Serialize};

use super::mask_loss::sigmoid_focal;

/// Weights of the matching cost and of the loss; saved in `teacher_config.yaml`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GroundingLossConfig {
    pub cost_class: f64,
    pub cost_bbox: f64,
    pub cost_giou: f64,
    pub class_weight: f64,
    pub bbox_weight: f64,
    pub giou_weight: f64,
    pub focal_alpha: f64,
    pub focal_gamma: f64,
    /// Weight of the encoder-proposal ("interm") loss.
    pub encoder_weight: f64,
}

impl Default for GroundingLossConfig {
    fn default() -> Self {
        Self {
            cost_class: 2.0,
            cost_bbox: 5.0,
            cost_giou: 2.0,
            class_weight: 2.0,
            bbox_weight: 5.0,
            giou_weight: 2.0,
            focal_alpha: 0.25,
            focal_gamma: 2.0,
            encoder_weight: 1.0,
        }
    }
}

/// One image's ground truth: boxes as normalised cx, cy, w, h and each box's phrase tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct GroundingTarget {
    pub boxes: Vec<[f32; 4]>,
    pub tokens: Vec<Vec<usize>>,
}

/// The parts of the loss (already weighted), summed over the layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GroundingLossParts {
    pub class: f32,
    pub bbox: f32,
    pub giou: f32,
}

/// Minimum-cost assignment of every row to a distinct column of a `rows x cols` cost matrix
/// (`rows <= cols`), Kuhn–Munkres with potentials (O(rows² · cols)). Returns each row's column.
pub fn hungarian(cost: &[f64], rows: usize, cols: usize) -> Vec<usize> {
    assert!(rows <= cols, "hungarian: more rows ({rows}) than columns ({cols})");
    let at = |i: usize, j: usize| cost[(i - 1) * cols + (j - 1)];
    let (mut u, mut v) = (vec![0f64; rows + 1], vec![0f64; cols + 1]);
    let mut owner = vec![0usize; cols + 1]; // column -> row (1-based), 0 = free
    let mut way = vec![0usize; cols + 1];
    for i in 1..=rows {
        owner[0] = i;
        let mut j0 = 0;
        let mut min_to = vec![f64::INFINITY; cols + 1];
        let mut used = vec![false; cols + 1];
        loop {
            used[j0] = true;
            let i0 = owner[j0];
            let mut delta = f64::INFINITY;
            let mut j1 = 0;
            for j in 1..=cols {
                if !used[j] {
                    let reduced = at(i0, j) - u[i0] - v[j];
                    if reduced < min_to[j] {
                        min_to[j] = reduced;
                        way[j] = j0;
                    }
                    if min_to[j] < delta {
                        delta = min_to[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=cols {
                if used[j] {
                    u[owner[j]] += delta;
                    v[j] -= delta;
                } else {
                    min_to[j] -= delta;
                }
            }
            j0 = j1;
            if owner[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            owner[j0] = owner[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut assignment = vec![0usize; rows];
    for j in 1..=cols {
        if owner[j] != 0 {
            assignment[owner[j] - 1] = j - 1;
        }
    }
    assignment
}

fn to_corners(b: [f32; 4]) -> [f32; 4] {
    [b[0] - b[2] / 2.0, b[1] - b[3] / 2.0, b[0] + b[2] / 2.0, b[1] + b[3] / 2.0]
}

/// Generalised IoU of two x1 y1 x2 y2 boxes.
pub fn giou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let area = |r: [f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let inter = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0) * (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let union = area(a) + area(b) - inter;
    let hull = (a[2].max(b[2]) - a[0].min(b[0])) * (a[3].max(b[3]) - a[1].min(b[1]));
    let iou = inter / union.max(1e-7);
    iou - (hull - union) / hull.max(1e-7)
}

/// The matching of one image: for each ground truth, its query. `probabilities [Q * T]` are the
/// sigmoid of the logits (real tokens only, `T` of them), `boxes [Q * 4]` cx cy w h.
pub fn match_queries(
    config: &GroundingLossConfig,
    probabilities: &[f32],
    boxes: &[f32],
    tokens: usize,
    target: &GroundingTarget,
) -> Vec<usize> {
    let queries = boxes.len() / 4;
    let truths = target.boxes.len();
    if truths == 0 {
        return Vec::new();
    }
    let (alpha, gamma) = (config.focal_alpha, config.focal_gamma);
    let mut cost = vec![0f64; truths * queries];
    for q in 0..queries {
        let row = &probabilities[q * tokens..(q + 1) * tokens];
        let pred = [boxes[q * 4], boxes[q * 4 + 1], boxes[q * 4 + 2], boxes[q * 4 + 3]];
        for g in 0..truths {
            let phrase = &target.tokens[g];
            let class = if phrase.is_empty() {
                0.0
            } else {
                phrase
                    .iter()
                    .map(|&t| {
                        let p = row[t] as f64;
                        let pos = alpha * (1.0 - p).powf(gamma) * -(p + 1e-8).ln();
                        let neg = (1.0 - alpha) * p.powf(gamma) * -(1.0 - p + 1e-8).ln();
                        pos - neg
                    })
                    .sum::<f64>()
                    / phrase.len() as f64
            };
            let truth = target.boxes[g];
            let l1: f32 = (0..4).map(|k| (pred[k] - truth[k]).abs()).sum();
            let g_iou = giou(to_corners(pred), to_corners(truth));
            cost[g * queries + q] =
                config.cost_class * class + config.cost_bbox * l1 as f64 - config.cost_giou * g_iou as f64;
        }
    }
    hungarian(&cost, truths, queries)
}

/// The loss of one head's `logits [B, Q, T]` (-inf on padded tokens) and `boxes [B, Q, 4]`;
/// `token_mask [B, T]` is true on real tokens. Returns the weighted sum and its parts.
pub fn head_loss(
    config: &GroundingLossConfig,
    logits: Tensor<3>,
    boxes: Tensor<3>,
    token_mask: Tensor<2, Bool>,
    targets: &[GroundingTarget],
) -> Result<(Tensor<1>, GroundingLossParts), DeviceError> {
    let [b, q, t] = logits.dims();
    let device = logits.device();
    let real = token_mask.unsqueeze_dim::<3>(1).expand([b, q, t]);
    let logits = logits.mask_fill(real.clone().bool_not(), 0.0);
    let probabilities = read_floats(burn::tensor::activation::sigmoid(logits.clone().detach()))?;
    let box_values = read_floats(boxes.clone().detach())?;
    let lengths: Vec<usize> = read_ints(real.clone().narrow(1, 0, 1).reshape([b, t]).int().sum_dim(1))?
        .into_iter()
        .map(|n| n as usize)
        .collect();

    let mut token_targets = vec![0f32; b * q * t];
    let mut matched_queries = Vec::new();
    let mut matched_boxes = Vec::new();
    for (image, target) in targets.iter().enumerate() {
        let n = lengths[image];
        let rows: Vec<f32> = (0..q)
            .flat_map(|qq| probabilities[(image * q + qq) * t..(image * q + qq) * t + n].iter().copied())
            .collect();
        let assignment = match_queries(config, &rows, &box_values[image * q * 4..(image + 1) * q * 4], n, target);
        for (g, &query) in assignment.iter().enumerate() {
            for &token in &target.tokens[g] {
                if token < n {
                    token_targets[(image * q + query) * t + token] = 1.0;
                }
            }
            matched_queries.push((image * q + query) as i64);
            matched_boxes.extend_from_slice(&target.boxes[g]);
        }
    }
    let num_boxes = (matched_queries.len() as f64).max(1.0);
    let token_targets = Tensor::<3>::from_data(TensorData::new(token_targets, [b, q, t]), &device);
    let focal = sigmoid_focal(
        logits.reshape([b * q, t]),
        token_targets.reshape([b * q, t]),
        config.focal_alpha,
        config.focal_gamma,
    )
    .reshape([b, q, t])
        * real.float();
    let class = focal.sum() * (config.class_weight / num_boxes);
    let (bbox, g_iou) = if matched_queries.is_empty() {
        (Tensor::<1>::zeros([1], &device), Tensor::<1>::zeros([1], &device))
    } else {
        let m = matched_queries.len();
        let index = Tensor::<1, Int>::from_data(TensorData::new(matched_queries, [m]), &device);
        let predicted = boxes.reshape([b * q, 4]).select(0, index);
        let truth = Tensor::<2>::from_data(TensorData::new(matched_boxes, [m, 4]), &device);
        let l1 = (predicted.clone() - truth.clone()).abs().sum() * (config.bbox_weight / num_boxes);
        let g = (giou_tensor(predicted, truth).neg() + 1.0).sum() * (config.giou_weight / num_boxes);
        (l1, g)
    };
    let scalar = |x: &Tensor<1>| -> Result<f32, DeviceError> { Ok(read_floats(x.clone().detach())?[0]) };
    let parts = GroundingLossParts { class: scalar(&class)?, bbox: scalar(&bbox)?, giou: scalar(&g_iou)? };
    Ok((class + bbox + g_iou, parts))
}

/// GIoU of matched `[M, 4]` cx cy w h boxes (differentiable in `predicted`); `[M]`.
pub fn giou_tensor(predicted: Tensor<2>, target: Tensor<2>) -> Tensor<1> {
    let m = predicted.dims()[0];
    let corners = |x: Tensor<2>| {
        let centre = x.clone().narrow(1, 0, 2);
        let half = x.narrow(1, 2, 2) * 0.5;
        (centre.clone() - half.clone(), centre + half)
    };
    let ((a1, a2), (b1, b2)) = (corners(predicted), corners(target));
    let area = |lo: Tensor<2>, hi: Tensor<2>| {
        let size = (hi - lo).clamp_min(0.0);
        size.clone().narrow(1, 0, 1) * size.narrow(1, 1, 1)
    };
    let inter = area(a1.clone().max_pair(b1.clone()), a2.clone().min_pair(b2.clone()));
    let union = area(a1.clone(), a2.clone()) + area(b1.clone(), b2.clone()) - inter.clone();
    let hull = area(a1.min_pair(b1), a2.max_pair(b2));
    let iou = inter / union.clone().clamp_min(1e-7);
    (iou - (hull.clone() - union) / hull.clamp_min(1e-7)).reshape([m])
}
