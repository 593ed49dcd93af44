//! From token logits to named boxes (the official `util/inference.py` `predict`, phrases taken from
//! the caption's class names): a query is kept when its best token probability exceeds the box
//! threshold; it is named by the phrase whose tokens score highest, if that phrase's best token
//! exceeds the text threshold; its box goes to original image pixels (cx cy w h → x1 y1 x2 y2).
//! There is no NMS, as in the official code.

use burn::tensor::Tensor;
use burn::tensor::activation::sigmoid;

use crate::device::{DeviceError, read_floats};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PostprocessOptions {
    pub box_threshold: f32,
    pub text_threshold: f32,
}

impl Default for PostprocessOptions {
    /// The official README's 0.35 / 0.25.
    fn default() -> Self {
        Self { box_threshold: 0.35, text_threshold: 0.25 }
    }
}

/// A box found for a phrase of the caption.
#[derive(Debug, Clone, PartialEq)]
pub struct GroundedBox {
    /// x1, y1, x2, y2 in original image pixels.
    pub bbox: [f32; 4],
    pub score: f32,
    /// Index of the phrase (class name) in the caption.
    pub phrase: usize,
    /// Every phrase's score (its tokens' best probability), in phrase order; `phrase` is the best.
    pub class_scores: Vec<f32>,
}

/// Boxes of one image from its `logits [Q, T]` and `boxes [Q, 4]`; `phrase_tokens` lists each
/// phrase's token positions; `size` is the original `(height, width)`. Best score first.
pub fn grounded_boxes(
    logits: Tensor<2>,
    boxes: Tensor<2>,
    phrase_tokens: &[Vec<usize>],
    size: (usize, usize),
    options: &PostprocessOptions,
) -> Result<Vec<GroundedBox>, DeviceError> {
    let [queries, tokens] = logits.dims();
    let probabilities = read_floats(sigmoid(logits))?;
    let boxes = read_floats(boxes)?;
    let (h, w) = (size.0 as f32, size.1 as f32);
    let mut found = Vec::new();
    for q in 0..queries {
        let row = &probabilities[q * tokens..(q + 1) * tokens];
        let best = row.iter().copied().filter(|p| p.is_finite()).fold(0f32, f32::max);
        if best <= options.box_threshold {
            continue;
        }
        let phrase_score =
            |tokens_of: &Vec<usize>| tokens_of.iter().filter(|&&t| t < tokens).map(|&t| row[t]).fold(0f32, f32::max);
        let class_scores: Vec<f32> = phrase_tokens.iter().map(phrase_score).collect();
        // The best phrase; of equal scores the first (`max_by` alone would give the last).
        let best_phrase =
            class_scores.iter().copied().enumerate().max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
        let Some((phrase, score)) = best_phrase else {
            continue;
        };
        if score <= options.text_threshold {
            continue;
        }
        let b = &boxes[q * 4..q * 4 + 4];
        let (cx, cy, bw, bh) = (b[0] * w, b[1] * h, b[2] * w, b[3] * h);
        found.push(GroundedBox {
            bbox: [cx - bw / 2.0, cy - bh / 2.0, cx + bw / 2.0, cy + bh / 2.0],
            score: best,
            phrase,
            class_scores,
        });
    }
    found.sort_by(|a, b| b.score.total_cmp(&a.score));
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn a_box_is_named_by_its_best_phrase_and_ties_go_to_the_first() {
        let device = crate::device::cpu();
        // Two queries over 4 tokens; phrases at tokens [1] and [2, 3].
        let logits = Tensor::<2>::from_data(
            TensorData::new(vec![-9.0f32, 2.0, 2.0, -9.0, -9.0, 0.0, 1.0, 3.0], [2, 4]),
            &device,
        );
        let boxes =
            Tensor::<2>::from_data(TensorData::new(vec![0.5f32, 0.5, 0.2, 0.4, 0.25, 0.25, 0.5, 0.5], [2, 4]), &device);
        let options = PostprocessOptions { box_threshold: 0.3, text_threshold: 0.25 };
        let found = grounded_boxes(logits, boxes, &[vec![1], vec![2, 3]], (100, 200), &options).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].phrase, 1, "query 2: token 3 scores best");
        assert_eq!(found[1].phrase, 0, "query 1: a tie between the phrases goes to the first");
        assert_eq!(found[1].bbox, [80.0, 30.0, 120.0, 70.0]);
    }
}
