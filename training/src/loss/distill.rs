//! Distillation terms beside the YOLOv8 loss, each on only when the batch carries what it needs:
//! - teacher labels: an anchor assigned to a teacher's label learns the teacher's class
//!   probabilities as its soft class target (the normalised alignment times `p`, instead of the
//!   one-hot target), and all its loss terms count `teacher_labels` times (0: the anchor is
//!   ignored, neither object nor background);
//! - logit distillation: at those anchors, the student's class scores against the teacher's
//!   probabilities, both softened by the temperature `T` (Hinton et al.'s recipe for the
//!   per-class Bernoulli outputs of a sigmoid classifier): `T² · mean over anchors of
//!   Σ_c KL(σ(z_t/T) ‖ σ(z_s/T))`, with `z_t = logit(p)`;
//! - mask distillation: at every anchor whose object has teacher mask probabilities `q`, the
//!   student's mask logits against them inside the object's box, weighted as the YOLOv8 mask loss
//!   weights its crop: `Σ crop_weight · KL(q ‖ σ(m))`, divided by the number of such anchors.
//!
//! The KL forms are the binary cross-entropy minus the targets' entropy: the same gradients, and
//! zero when the student matches its teacher.

use burn::tensor::{Int, Tensor, TensorData};
use kiln_data::batch::{BatchFeatures, TeacherTargets};

use super::{BatchAssignment, LossError, bce_with_logits, crop_weights, flatten_levels, tensor_from};

/// The distillation weights the loss needs (from `configs/distill.yaml`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistillLoss {
    pub teacher_labels: f32,
    pub logit: f32,
    pub temperature: f32,
    pub mask: f32,
    pub feature: f32,
}

/// Probabilities kept off 0 and 1 before their logit is taken.
const PROBABILITY_EPS: f32 = 1e-4;

/// What [`soften_targets`] made of a batch's anchors, flat over the batch (`[B * A]`).
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherAnchors {
    /// Each anchor's weight in the loss: the teacher-label weight at teacher anchors, 1 elsewhere.
    pub weights: Vec<f32>,
    /// Whether the anchor learns a teacher label: its weight cannot tell when that weight is 1.
    pub teacher: Vec<bool>,
}

/// Turns the one-hot targets of anchors assigned to teacher labels into the teacher's class
/// probabilities (scaled by the anchor's normalised alignment), and returns those anchors and
/// each anchor's weight (`weight` at those anchors, 1 elsewhere), or `None` when no anchor learns
/// a teacher label.
pub fn soften_targets(
    assignment: &mut BatchAssignment,
    signals: &TeacherTargets,
    max_objects: usize,
    nc: usize,
    weight: f32,
) -> Option<TeacherAnchors> {
    let anchors = assignment.anchors.len();
    let mut weights = vec![1f32; assignment.assignments.len() * anchors];
    let mut teacher = vec![false; weights.len()];
    for (b, a) in assignment.assignments.iter_mut().enumerate() {
        for j in (0..anchors).filter(|&j| a.foreground[j]) {
            let Some(Some(probs)) = signals.class_probs.get(b * max_objects + a.target_index[j]) else {
                continue;
            };
            let row = &mut a.target_scores[j * nc..(j + 1) * nc];
            let alignment: f32 = row.iter().sum();
            for (target, &p) in row.iter_mut().zip(probs) {
                *target = alignment * p;
            }
            weights[b * anchors + j] = weight;
            teacher[b * anchors + j] = true;
        }
    }
    teacher.contains(&true).then_some(TeacherAnchors { weights, teacher })
}

/// `-(q ln q + (1 - q) ln(1 - q))`, zero at 0 and 1.
fn bernoulli_entropy(q: f32) -> f32 {
    let term = |p: f32| if p > 0.0 { -p * p.ln() } else { 0.0 };
    term(q) + term(1.0 - q)
}

/// The logit distillation term (without its weight), or `None` when no anchor learns a teacher
/// label. `pred_scores` `[B, A, nc]` are the student's class logits.
pub fn logit_distillation(
    pred_scores: Tensor<3>,
    assignment: &BatchAssignment,
    signals: &TeacherTargets,
    max_objects: usize,
    temperature: f32,
) -> Result<Option<Tensor<1>>, LossError> {
    let [batch_size, anchors, nc] = pred_scores.dims();
    let t = temperature.max(1e-3);
    let mut index = Vec::new();
    let mut soft = Vec::new();
    for (b, a) in assignment.assignments.iter().enumerate() {
        for j in (0..anchors).filter(|&j| a.foreground[j]) {
            if let Some(Some(probs)) = signals.class_probs.get(b * max_objects + a.target_index[j]) {
                index.push((b * anchors + j) as i64);
                soft.extend(probs.iter().map(|&p| {
                    let p = p.clamp(PROBABILITY_EPS, 1.0 - PROBABILITY_EPS);
                    1.0 / (1.0 + (-(p / (1.0 - p)).ln() / t).exp())
                }));
            }
        }
    }
    let n = index.len();
    if n == 0 {
        return Ok(None);
    }
    let device = pred_scores.device();
    let entropy: f32 = soft.iter().map(|&q| bernoulli_entropy(q)).sum();
    let index = Tensor::<1, Int>::from_data(TensorData::new(index, [n]), &device);
    let student = pred_scores.reshape([batch_size * anchors, nc]).select(0, index) / t;
    let bce = bce_with_logits(student, tensor_from(soft, [n, nc], &device)).sum();
    Ok(Some((bce - entropy) * (t * t / n as f32)))
}

/// The mask distillation term (without its weight), or `None` when no anchor's object has
/// teacher mask probabilities.
pub fn mask_distillation(
    coefficients: &[Tensor<4>],
    prototypes: Tensor<4>,
    assignment: &BatchAssignment,
    signals: &TeacherTargets,
    max_objects: usize,
    input_size: [usize; 2],
) -> Result<Option<Tensor<1>>, LossError> {
    let device = prototypes.device();
    let [_, nm, mh, mw] = prototypes.dims();
    let coefficients = flatten_levels(coefficients); // [B, A, nm]
    let anchors = coefficients.dims()[1];
    let mut total = Tensor::<1>::zeros([1], &device);
    let mut count = 0usize;
    for (b, a) in assignment.assignments.iter().enumerate() {
        let mut chosen = Vec::new();
        let mut soft = Vec::new();
        let mut boxes = Vec::new();
        for j in (0..anchors).filter(|&j| a.foreground[j]) {
            let slot = b * max_objects + a.target_index[j];
            if let Some(Some(mask)) = signals.soft_masks.get(slot) {
                if mask.len() != mh * mw {
                    let side = (mask.len() as f64).sqrt().round() as usize;
                    return Err(LossError::MaskSize { target: [side, side], prototypes: [mh, mw] });
                }
                chosen.push(j as i64);
                soft.extend_from_slice(mask);
                boxes.push(assignment.boxes[b][a.target_index[j]]);
            }
        }
        let n = chosen.len();
        if n == 0 {
            continue;
        }
        let weights = crop_weights(&boxes, input_size, [mh, mw]);
        let entropy: f32 = soft.iter().zip(&weights).map(|(&q, &w)| w * bernoulli_entropy(q)).sum();
        let index = Tensor::<1, Int>::from_data(TensorData::new(chosen, [n]), &device);
        let image_coefficients =
            coefficients.clone().slice([b..b + 1, 0..anchors, 0..nm]).reshape([anchors, nm]).select(0, index);
        let image_prototypes = prototypes.clone().slice([b..b + 1, 0..nm, 0..mh, 0..mw]).reshape([nm, mh * mw]);
        let logits = image_coefficients.matmul(image_prototypes);
        let weighted = bce_with_logits(logits, tensor_from(soft, [n, mh * mw], &device))
            * tensor_from(weights, [n, mh * mw], &device);
        total = total + weighted.sum() - entropy;
        count += n;
    }
    Ok((count > 0).then(|| total / count as f32))
}

/// The feature distillation term (without its weight): the mean squared difference between the
/// student's projected features `[B, C, g, g]` and the teacher's, over the channels of the cells a
/// teacher feature lies under; `None` when there is none.
pub fn feature_distillation(projected: Tensor<4>, teacher: &BatchFeatures) -> Result<Option<Tensor<1>>, LossError> {
    let [b, c, h, w] = projected.dims();
    if [c, h, w] != [teacher.channels, teacher.grid, teacher.grid] {
        return Err(LossError::FeatureSize {
            student: [c, h, w],
            teacher: [teacher.channels, teacher.grid, teacher.grid],
        });
    }
    let cells: f32 = teacher.valid.iter().sum();
    if cells == 0.0 {
        return Ok(None);
    }
    let device = projected.device();
    let target = tensor_from(teacher.values.clone(), [b, c, h, w], &device);
    let valid = tensor_from(teacher.valid.clone(), [b, 1, h, w], &device);
    let difference = projected - target;
    let squared = difference.clone() * difference * valid;
    Ok(Some(squared.sum() / (cells * c as f32)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::Assignment;

    /// One image, 3 anchors, 2 classes; anchor 0 learns teacher slot 0, anchor 2 ground truth 1.
    fn assignment() -> BatchAssignment {
        BatchAssignment {
            assignments: vec![Assignment {
                foreground: vec![true, false, true],
                target_index: vec![0, 0, 1],
                target_scores: vec![0.8, 0.0, 0.0, 0.0, 0.0, 0.5],
            }],
            boxes: vec![vec![[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 32.0, 32.0]]],
            classes: vec![vec![0, 1]],
            anchors: vec![[0.5, 0.5], [1.5, 0.5], [2.5, 0.5]],
            strides: vec![8.0; 3],
        }
    }

    fn signals() -> TeacherTargets {
        TeacherTargets {
            class_probs: vec![Some(vec![0.7, 0.2]), None],
            soft_masks: vec![Some(vec![0.9, 0.1, 0.5, 0.0]), None],
            features: None,
        }
    }

    #[test]
    fn teacher_labels_become_soft_weighted_targets() {
        let mut a = assignment();
        let anchors = soften_targets(&mut a, &signals(), 2, 2, 0.5).unwrap();
        let scores = &a.assignments[0].target_scores;
        assert!((scores[0] - 0.8 * 0.7).abs() < 1e-6 && (scores[1] - 0.8 * 0.2).abs() < 1e-6);
        // Ground truth keeps its one-hot target and full weight.
        assert_eq!(&scores[4..6], &[0.0, 0.5]);
        assert_eq!(anchors, TeacherAnchors { weights: vec![0.5, 1.0, 1.0], teacher: vec![true, false, false] });
        // At full weight, only the flags tell the teacher's anchor from the others.
        let full = soften_targets(&mut assignment(), &signals(), 2, 2, 1.0).unwrap();
        assert_eq!(full, TeacherAnchors { weights: vec![1.0; 3], teacher: vec![true, false, false] });
        let mut none = assignment();
        let no_teacher = TeacherTargets { class_probs: vec![None, None], soft_masks: vec![None, None], features: None };
        assert!(soften_targets(&mut none, &no_teacher, 2, 2, 1.0).is_none());
    }

    #[test]
    fn logit_distillation_is_the_tempered_kl_and_its_gradient() {
        let device = kiln_models::device::cpu().autodiff();
        let t = 2.0f32;
        let logits = [0.3f32, -1.2, 2.0, 0.1, -0.4, 0.9];
        let scores = Tensor::<3>::from_data(TensorData::new(logits.to_vec(), [1, 3, 2]), &device).require_grad();
        let loss = logit_distillation(scores.clone(), &assignment(), &signals(), 2, t).unwrap().unwrap();
        // By hand: anchor 0 only, classes 0 and 1.
        let sigma = |x: f32| 1.0 / (1.0 + (-x).exp());
        let mut expected = 0.0;
        let mut gradient = [0f32; 2];
        for (c, p) in [0.7f32, 0.2].into_iter().enumerate() {
            let q = sigma((p / (1.0 - p)).ln() / t);
            let s = sigma(logits[c] / t);
            expected += q * (q / s).ln() + (1.0 - q) * ((1.0 - q) / (1.0 - s)).ln();
            // d/dz of T² KL(q ‖ σ(z/T)) = T (σ(z/T) - q)
            gradient[c] = t * (s - q);
        }
        expected *= t * t;
        let value = kiln_models::device::read_floats(loss.clone()).unwrap()[0];
        assert!((value - expected).abs() < 1e-5, "{value} vs {expected}");
        let grads = loss.backward();
        let g = kiln_models::device::read_floats(scores.grad(&grads).unwrap()).unwrap();
        assert!((g[0] - gradient[0]).abs() < 1e-5 && (g[1] - gradient[1]).abs() < 1e-5, "{g:?} vs {gradient:?}");
        assert!(g[2..].iter().all(|&v| v == 0.0), "only the teacher's anchor learns: {g:?}");
        // A student that already matches its teacher has nothing left to learn.
        let matching: Vec<f32> = [0.7f32, 0.2].iter().map(|p| (p / (1.0 - p)).ln()).chain([0.0; 4]).collect();
        let scores = Tensor::<3>::from_data(TensorData::new(matching, [1, 3, 2]), &device);
        let loss = logit_distillation(scores, &assignment(), &signals(), 2, t).unwrap().unwrap();
        assert!(kiln_models::device::read_floats(loss).unwrap()[0].abs() < 1e-5);
    }

    #[test]
    fn mask_distillation_is_the_crop_weighted_kl() {
        let device = kiln_models::device::cpu();
        // Prototypes 2 x 2 (input 8 x 8), one mask coefficient: logits = coefficient * prototype.
        let prototypes = Tensor::<4>::from_data(TensorData::new(vec![1.0f32, -2.0, 0.5, 3.0], [1, 1, 2, 2]), &device);
        let coefficients =
            vec![Tensor::<4>::from_data(TensorData::new(vec![2.0f32, 1.0, -1.0], [1, 1, 1, 3]), &device)];
        let mut a = assignment();
        // Anchor 0's box covers the left column of the 8 x 8 input.
        a.boxes[0][0] = [0.0, 0.0, 4.0, 8.0];
        let loss = mask_distillation(&coefficients, prototypes, &a, &signals(), 2, [8, 8]).unwrap().unwrap();
        let sigma = |x: f32| 1.0 / (1.0 + (-x).exp());
        let q = [0.9f32, 0.1, 0.5, 0.0];
        let logits = [2.0f32, -4.0, 1.0, 6.0];
        // Crop weight: 1 / (4 pixels * 0.5 of the image) on the left column (pixels 0 and 2).
        let mut expected = 0.0;
        for i in [0usize, 2] {
            let s = sigma(logits[i]);
            let kl = |q: f32| {
                let part = |a: f32, b: f32| if a > 0.0 { a * (a / b).ln() } else { 0.0 };
                part(q, s) + part(1.0 - q, 1.0 - s)
            };
            expected += 0.5 * kl(q[i]);
        }
        let value = kiln_models::device::read_floats(loss).unwrap()[0];
        assert!((value - expected).abs() < 1e-5, "{value} vs {expected}");
    }

    #[test]
    fn feature_distillation_is_the_masked_mean_squared_error_and_its_gradient() {
        let device = kiln_models::device::cpu().autodiff();
        // One image, 2 channels, a 2 x 2 grid; the teacher covers cells 0 and 3.
        let student = [1.0f32, 2.0, 3.0, 4.0, -1.0, 0.5, 0.0, 2.0];
        let teacher = BatchFeatures {
            channels: 2,
            grid: 2,
            values: vec![0.0, 9.0, 9.0, 1.0, 1.0, 9.0, 9.0, -2.0],
            valid: vec![1.0, 0.0, 0.0, 1.0],
        };
        let projected = Tensor::<4>::from_data(TensorData::new(student.to_vec(), [1, 2, 2, 2]), &device).require_grad();
        let loss = feature_distillation(projected.clone(), &teacher).unwrap().unwrap();
        let cells = [0usize, 3, 4, 7];
        let expected: f32 = cells.iter().map(|&i| (student[i] - teacher.values[i]).powi(2)).sum::<f32>() / 4.0;
        let value = kiln_models::device::read_floats(loss.clone()).unwrap()[0];
        assert!((value - expected).abs() < 1e-5, "{value} vs {expected}");
        let g = kiln_models::device::read_floats(projected.grad(&loss.backward()).unwrap()).unwrap();
        for i in 0..8 {
            let want = if cells.contains(&i) { 2.0 * (student[i] - teacher.values[i]) / 4.0 } else { 0.0 };
            assert!((g[i] - want).abs() < 1e-5, "cell {i}: {} vs {want}", g[i]);
        }
        let none = BatchFeatures { valid: vec![0.0; 4], ..teacher.clone() };
        let projected = Tensor::<4>::from_data(TensorData::new(student.to_vec(), [1, 2, 2, 2]), &device);
        assert!(feature_distillation(projected.clone(), &none).unwrap().is_none());
        let wrong = BatchFeatures { channels: 3, values: vec![0.0; 12], ..teacher };
        assert!(feature_distillation(projected, &wrong).is_err());
    }
}
