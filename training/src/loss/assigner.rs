//! Task-aligned assigner: TOOD (Feng et al., 2021) as YOLOv8 uses it, following Ultralytics'
//! `ultralytics/utils/tal.py::TaskAlignedAssigner` (8.4), including its floor of one middle
//! stride on tiny ground-truth sides when choosing candidate anchors.
//!
//! The assignment takes no gradient, so it runs on the host over plain slices: the work is
//! anchors × ground truths per image, small beside the network, and exact tie-breaking (first index
//! wins, as PyTorch's argmax/topk on CPU) is easier to keep in scalar code than in tensor ops.

use super::bbox::ciou;

/// Hyper-parameters of the assigner (YOLOv8: top-k 10, alpha 0.5, beta 6.0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AssignerConfig {
    pub topk: usize,
    pub alpha: f32,
    pub beta: f32,
    /// Ground-truth sides shorter than this (pixels) are widened to it when choosing candidate
    /// anchors, so a tiny object still gets anchors (Ultralytics: the second stride, 16).
    pub min_side: f32,
}

impl Default for AssignerConfig {
    fn default() -> Self {
        Self { topk: 10, alpha: 0.5, beta: 6.0, min_side: 16.0 }
    }
}

/// What one image's ground truths look like to the assigner (pixels of the network input).
pub struct GroundTruth<'a> {
    /// `[M]` class index per slot.
    pub classes: &'a [usize],
    /// `[M]` `x1, y1, x2, y2`.
    pub boxes: &'a [[f32; 4]],
    /// `[M]` whether the slot holds an instance (batches pad to the largest count).
    pub valid: &'a [bool],
}

/// The assignment for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// `[A]` anchors that learn an object.
    pub foreground: Vec<bool>,
    /// `[A]` the ground-truth slot each anchor learns (0 for background, as Ultralytics).
    pub target_index: Vec<usize>,
    /// `[A, nc]` soft class targets: the normalised alignment metric at the assigned class.
    pub target_scores: Vec<f32>,
}

const EPS: f32 = 1e-9;

/// Assigns one image: `scores` `[A, nc]` (after sigmoid), `boxes` `[A]` predicted boxes and
/// `anchors` `[A]` anchor centres, both in input pixels.
pub fn assign(
    config: &AssignerConfig,
    scores: &[f32],
    num_classes: usize,
    boxes: &[[f32; 4]],
    anchors: &[[f32; 2]],
    truth: &GroundTruth,
) -> Assignment {
    let a = anchors.len();
    let m = truth.classes.len();
    let mut assignment =
        Assignment { foreground: vec![false; a], target_index: vec![0; a], target_scores: vec![0.0; a * num_classes] };
    if m == 0 {
        return assignment;
    }
    // Candidates: anchor centres strictly inside the (widened) box; their alignment
    // metric score^alpha * CIoU^beta and the CIoU itself.
    let mut overlaps = vec![0f32; m * a];
    let mut metric = vec![0f32; m * a];
    let mut inside = vec![false; m * a];
    for g in 0..m {
        if !truth.valid[g] {
            continue;
        }
        let [x1, y1, x2, y2] = widened(truth.boxes[g], config.min_side);
        let class = truth.classes[g];
        for (j, &[ax, ay]) in anchors.iter().enumerate() {
            if ax - x1 > EPS && ay - y1 > EPS && x2 - ax > EPS && y2 - ay > EPS {
                let overlap = ciou(truth.boxes[g], boxes[j]).max(0.0);
                inside[g * a + j] = true;
                overlaps[g * a + j] = overlap;
                metric[g * a + j] = scores[j * num_classes + class].powf(config.alpha) * overlap.powf(config.beta);
            }
        }
    }
    // The top-k anchors by metric per ground truth, kept only where they are candidates.
    let mut positive = vec![false; m * a];
    let mut order: Vec<usize> = (0..a).collect();
    for g in (0..m).filter(|&g| truth.valid[g]) {
        let row = &metric[g * a..(g + 1) * a];
        order.sort_by(|&p, &q| row[q].total_cmp(&row[p]).then(p.cmp(&q)));
        for &j in order.iter().take(config.topk) {
            positive[g * a + j] = inside[g * a + j];
        }
    }
    // An anchor claimed by several ground truths goes to the one it overlaps most.
    for j in 0..a {
        if (0..m).filter(|&g| positive[g * a + j]).count() > 1 {
            let best = argmax((0..m).map(|g| overlaps[g * a + j]));
            for g in 0..m {
                positive[g * a + j] = g == best;
            }
        }
    }
    for j in 0..a {
        if let Some(g) = (0..m).find(|&g| positive[g * a + j]) {
            assignment.foreground[j] = true;
            assignment.target_index[j] = g;
        }
    }
    // Soft targets: each ground truth's metric rescaled so its best anchor gets its best CIoU.
    let mut normalised = vec![0f32; a];
    for g in 0..m {
        let (mut best_metric, mut best_overlap) = (0f32, 0f32);
        for j in (0..a).filter(|&j| positive[g * a + j]) {
            best_metric = best_metric.max(metric[g * a + j]);
            best_overlap = best_overlap.max(overlaps[g * a + j]);
        }
        for j in 0..a {
            let value = if positive[g * a + j] { metric[g * a + j] * best_overlap / (best_metric + EPS) } else { 0.0 };
            normalised[j] = normalised[j].max(value);
        }
    }
    for j in (0..a).filter(|&j| assignment.foreground[j]) {
        let class = truth.classes[assignment.target_index[j]];
        assignment.target_scores[j * num_classes + class] = normalised[j];
    }
    assignment
}

fn widened([x1, y1, x2, y2]: [f32; 4], min_side: f32) -> [f32; 4] {
    let (cx, cy) = ((x1 + x2) / 2.0, (y1 + y2) / 2.0);
    let (w, h) = ((x2 - x1).max(0.0), (y2 - y1).max(0.0));
    let (w, h) = (if w < min_side { min_side } else { w }, if h < min_side { min_side } else { h });
    [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0]
}

/// Index of the first largest value.
fn argmax(values: impl Iterator<Item = f32>) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}
