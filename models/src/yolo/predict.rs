//! YOLOv8 inference after the network, as Ultralytics' predictor does it
//! (ultralytics/nn/modules/head.py `Detect._inference`, utils/nms.py `non_max_suppression`,
//! utils/ops.py `process_mask`, `scale_boxes`, `scale_masks`): DFL expectation and distance → box
//! decoding on the device, then confidence filter, class-aware NMS, mask assembly (coefficients ×
//! prototypes, crop to the box) and the way back to original-image coordinates on the host.

use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;
use kiln_data::{BinaryMask, Letterbox};

use super::YoloV8;
use super::head::{Head, HeadOutput, REG_MAX};
use crate::device::{DeviceError, read_floats};

/// Ultralytics' offset separating classes in class-aware NMS (`max_wh`).
const CLASS_OFFSET: f32 = 7680.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PredictOptions {
    /// Minimum class score.
    pub conf: f32,
    /// IoU above which NMS suppresses a lower-scored box of the same class.
    pub iou: f32,
    pub max_det: usize,
    /// Candidates kept for NMS, highest scores first.
    pub max_nms: usize,
    /// Every class above `conf` at an anchor is a candidate, not only its best (Ultralytics'
    /// validator does this: `multi_label=True`; its predictor does not).
    pub multi_label: bool,
}

impl Default for PredictOptions {
    /// Ultralytics' `predict` defaults.
    fn default() -> Self {
        Self { conf: 0.25, iou: 0.7, max_det: 300, max_nms: 30_000, multi_label: false }
    }
}

impl PredictOptions {
    /// Ultralytics' validator (`DetectionValidator.postprocess`): every class above 0.001 at every
    /// anchor, 300 detections per image. The COCO metric then counts a box's second-best class as
    /// a detection of its own, so an uncertain class costs less than with the best class alone.
    pub const fn validation() -> Self {
        Self { conf: 0.001, iou: 0.7, max_det: 300, max_nms: 30_000, multi_label: true }
    }
}

/// A detection after NMS in input (letterboxed) pixels, with its mask coefficients.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// `x1, y1, x2, y2`.
    pub bbox: [f32; 4],
    pub score: f32,
    pub class_id: usize,
    /// Every class's score at the anchor the detection came from (distillation reads them).
    pub class_scores: Vec<f32>,
    pub coefficients: Vec<f32>,
}

/// A detection in original-image pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// `x1, y1, x2, y2`, clipped to the image.
    pub bbox: [f32; 4],
    pub score: f32,
    pub class_id: usize,
    /// Every class's sigmoid score at the anchor the detection came from; `score` is the largest.
    pub class_scores: Vec<f32>,
    /// The instance mask at the original image size (segmentation models).
    pub mask: Option<BinaryMask>,
}

impl Head {
    /// `[B, 4 + nc (+ nm), A]`: boxes `cx, cy, w, h` in input pixels, class probabilities and mask
    /// coefficients, anchors ordered level by level, row-major (Ultralytics' eval output).
    pub fn decode(&self, output: &HeadOutput, input_height: usize) -> Tensor<3> {
        #[cfg(feature = "flex")]
        if crate::nn::flex_kernels()
            && let Some(decoded) = flex::decode(self, output, input_height)
        {
            return decoded;
        }
        self.decode_composed(output, input_height)
    }

    /// [`Head::decode`] as Burn operations (every backend; what the flex kernel is tested against).
    fn decode_composed(&self, output: &HeadOutput, input_height: usize) -> Tensor<3> {
        let device = output.levels[0].device();
        let [b, _, _, _] = output.levels[0].dims();
        let flatten = |levels: &[Tensor<4>]| -> Tensor<3> {
            Tensor::cat(
                levels
                    .iter()
                    .map(|t| {
                        let [b, c, h, w] = t.dims();
                        t.clone().reshape([b, c, h * w])
                    })
                    .collect(),
                2,
            )
        };
        let x = flatten(&output.levels);
        let anchors_count = x.dims()[2];
        let distances = self.dfl.forward(x.clone().narrow(1, 0, 4 * REG_MAX));
        let scores = sigmoid(x.narrow(1, 4 * REG_MAX, self.nc));
        let (points, strides) = anchor_points(&output.levels, input_height, &device);
        let lt = distances.clone().narrow(1, 0, 2);
        let rb = distances.narrow(1, 2, 2);
        let top_left = points.clone() - lt;
        let bottom_right = points + rb;
        let centre = (top_left.clone() + bottom_right.clone()) / 2.0;
        let size = bottom_right - top_left;
        let boxes = Tensor::cat(vec![centre, size], 1) * strides;
        let mut parts = vec![boxes, scores];
        if let Some(coefficients) = &output.coefficients {
            parts.push(flatten(coefficients));
        }
        let decoded = Tensor::cat(parts, 1);
        debug_assert_eq!(decoded.dims()[..1], [b]);
        debug_assert_eq!(decoded.dims()[2], anchors_count);
        decoded
    }
}

/// [`Head::decode`] in one pass over the head's outputs on flex at inference: the DFL expectation,
/// the boxes and the class sigmoids computed per level straight into the `[B, 4 + nc (+ nm), A]`
/// output, with a vectorised e^x. Burn's composition (about twenty operations, its softmax and
/// sigmoid through libm's `expf` one value at a time, on one thread) was 5 % of a 160-px
/// yolov8n-seg inference on flex, where ONNX Runtime runs the same decoding inside its graph.
#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{DType, Tensor, TensorData};

    use super::super::head::{Head, HeadOutput, REG_MAX};
    use crate::nn::conv_act::exp_f32;

    /// A float32 flex tensor's values, contiguous; None for anything else (autodiff included).
    fn values<const D: usize>(tensor: &Tensor<D>) -> Option<FlexTensor> {
        let tensor = tensor.clone().try_into_primitive::<Flex>().ok()?;
        (tensor.dtype() == DType::F32).then(|| tensor.to_contiguous())
    }

    /// None where the kernel does not apply (the caller takes Burn's path).
    pub(super) fn decode(head: &Head, output: &HeadOutput, input_height: usize) -> Option<Tensor<3>> {
        let levels: Vec<FlexTensor> = output.levels.iter().map(values).collect::<Option<_>>()?;
        let coefficients: Option<Vec<FlexTensor>> = match &output.coefficients {
            Some(levels) => Some(levels.iter().map(values).collect::<Option<_>>()?),
            None => None,
        };
        let bins = values(&head.dfl.conv.weight.val())?;
        let bins: [f32; REG_MAX] = bins.storage::<f32>().try_into().ok()?;
        let &[batch, channels, ..] = levels[0].layout().shape().as_slice() else { return None };
        let nc = channels.checked_sub(4 * REG_MAX)?;
        let nm = coefficients.as_ref().map_or(0, |c| c[0].layout().shape()[1]);
        // Every level [batch, channels, h, w], every coefficient level [batch, nm, h, w] of its size.
        let fits = |tensor: &FlexTensor, rows: usize, [h, w]: [usize; 2]| {
            tensor.layout().shape().as_slice() == [batch, rows, h, w]
        };
        let sizes: Vec<[usize; 2]> = levels.iter().map(|l| [l.layout().shape()[2], l.layout().shape()[3]]).collect();
        if levels.iter().zip(&sizes).any(|(level, &size)| !fits(level, channels, size))
            || coefficients.as_ref().is_some_and(|c| {
                c.len() != levels.len() || c.iter().zip(&sizes).any(|(level, &size)| !fits(level, nm, size))
            })
        {
            return None;
        }
        let anchors: usize = sizes.iter().map(|[h, w]| h * w).sum();
        let rows = 4 + nc + nm;
        let mut decoded = vec![0f32; batch * rows * anchors];
        let mut distances = vec![0f32; 4 * sizes.iter().map(|[h, w]| h * w).max().unwrap_or(0)];
        for image in 0..batch {
            let out = &mut decoded[image * rows * anchors..(image + 1) * rows * anchors];
            let mut first = 0;
            for (level, &[height, width]) in sizes.iter().enumerate() {
                let n = height * width;
                let x = &levels[level].storage::<f32>()[image * channels * n..(image + 1) * channels * n];
                for side in 0..4 {
                    expectation(
                        &x[side * REG_MAX * n..(side + 1) * REG_MAX * n],
                        &bins,
                        &mut distances[side * n..(side + 1) * n],
                    );
                }
                let stride = (input_height / height) as f32;
                let [left, top, right, bottom] = std::array::from_fn(|side| &distances[side * n..(side + 1) * n]);
                for j in 0..n {
                    let (px, py) = ((j % width) as f32 + 0.5, (j / width) as f32 + 0.5);
                    // As the composition: corners, then centre and size, then the stride.
                    let (x1, y1, x2, y2) = (px - left[j], py - top[j], px + right[j], py + bottom[j]);
                    out[first + j] = (x1 + x2) / 2.0 * stride;
                    out[anchors + first + j] = (y1 + y2) / 2.0 * stride;
                    out[2 * anchors + first + j] = (x2 - x1) * stride;
                    out[3 * anchors + first + j] = (y2 - y1) * stride;
                }
                for class in 0..nc {
                    let logits = &x[(4 * REG_MAX + class) * n..(4 * REG_MAX + class + 1) * n];
                    sigmoid(logits, &mut out[(4 + class) * anchors + first..(4 + class) * anchors + first + n]);
                }
                if let Some(coefficients) = &coefficients {
                    let c = &coefficients[level].storage::<f32>()[image * nm * n..(image + 1) * nm * n];
                    for k in 0..nm {
                        let row = (4 + nc + k) * anchors + first;
                        out[row..row + n].copy_from_slice(&c[k * n..(k + 1) * n]);
                    }
                }
                first += n;
            }
        }
        let dims = [batch, rows, anchors];
        Some(Tensor::from_primitive::<Flex>(FlexTensor::from_data(TensorData::new(decoded, dims))))
    }

    widest! {
        /// dst[j] = sum_i bins[i] e^(x_i[j] - m[j]) / sum_i e^(x_i[j] - m[j]), x_i the i-th of the
        /// REG_MAX rows of `logits` and m[j] their maximum: the DFL softmax's expectation.
        fn expectation(logits: &[f32], bins: &[f32; REG_MAX], dst: &mut [f32]) {
            let n = dst.len();
            let mut max = vec![f32::NEG_INFINITY; n];
            for row in logits.chunks_exact(n) {
                for (m, &v) in max.iter_mut().zip(row) {
                    *m = m.max(v);
                }
            }
            let (mut total, mut weighted) = (vec![0f32; n], vec![0f32; n]);
            for (row, &bin) in logits.chunks_exact(n).zip(bins) {
                for (((t, w), &v), &m) in total.iter_mut().zip(weighted.iter_mut()).zip(row).zip(&max) {
                    let e = exp_f32(v - m);
                    *t += e;
                    *w += e * bin;
                }
            }
            for ((d, &w), &t) in dst.iter_mut().zip(&weighted).zip(&total) {
                *d = w / t;
            }
        }
    }

    widest! {
        /// dst = 1 / (1 + e^-x).
        fn sigmoid(x: &[f32], dst: &mut [f32]) {
            for (d, &v) in dst.iter_mut().zip(x) {
                *d = 1.0 / (1.0 + exp_f32(-v));
            }
        }
    }
}

/// Anchor centres `[1, 2, A]` in grid units (cell + 0.5) and strides `[1, 1, A]` (Ultralytics'
/// `make_anchors`).
fn anchor_points(levels: &[Tensor<4>], input_height: usize, device: &Device) -> (Tensor<3>, Tensor<3>) {
    let (mut xs, mut ys, mut strides) = (Vec::new(), Vec::new(), Vec::new());
    for level in levels {
        let [_, _, h, w] = level.dims();
        let stride = (input_height / h) as f32;
        for y in 0..h {
            for x in 0..w {
                xs.push(x as f32 + 0.5);
                ys.push(y as f32 + 0.5);
                strides.push(stride);
            }
        }
    }
    let a = xs.len();
    xs.extend(ys);
    (
        Tensor::from_data(TensorData::new(xs, [1, 2, a]), device),
        Tensor::from_data(TensorData::new(strides, [1, 1, a]), device),
    )
}

/// Ultralytics' `non_max_suppression` (class-aware; the best class per box, or with
/// `multi_label` every class above `conf`) on one image's decoded predictions, `[4 + nc + nm, A]`
/// row-major.
pub fn non_max_suppression(decoded: &[f32], nc: usize, anchors: usize, options: &PredictOptions) -> Vec<Candidate> {
    let channels = decoded.len() / anchors;
    let at = |c: usize, a: usize| decoded[c * anchors + a];
    let multi_label = options.multi_label && nc > 1;
    let mut candidates: Vec<Candidate> = (0..anchors)
        .flat_map(|a| {
            let classes: Vec<(usize, f32)> = if multi_label {
                (0..nc).map(|c| (c, at(4 + c, a))).filter(|&(_, score)| score > options.conf).collect()
            } else {
                let best = (0..nc)
                    .map(|c| (c, at(4 + c, a)))
                    .fold((0, f32::NEG_INFINITY), |best, x| if x.1 > best.1 { x } else { best });
                if best.1 > options.conf { vec![best] } else { Vec::new() }
            };
            let (cx, cy, w, h) = (at(0, a), at(1, a), at(2, a), at(3, a));
            classes.into_iter().map(move |(class_id, score)| Candidate {
                bbox: [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0],
                score,
                class_id,
                class_scores: (0..nc).map(|c| at(4 + c, a)).collect(),
                coefficients: (4 + nc..channels).map(|c| at(c, a)).collect(),
            })
        })
        .collect();
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    candidates.truncate(options.max_nms);

    let shifted = |c: &Candidate| -> [f32; 4] {
        let offset = c.class_id as f32 * CLASS_OFFSET;
        c.bbox.map(|v| v + offset)
    };
    let mut kept: Vec<Candidate> = Vec::new();
    let mut suppressed = vec![false; candidates.len()];
    for i in 0..candidates.len() {
        if suppressed[i] {
            continue;
        }
        let box_i = shifted(&candidates[i]);
        for j in i + 1..candidates.len() {
            if !suppressed[j] && iou(&box_i, &shifted(&candidates[j])) > options.iou {
                suppressed[j] = true;
            }
        }
        kept.push(candidates[i].clone());
        if kept.len() == options.max_det {
            break;
        }
    }
    kept
}

/// torchvision's box IoU (areas without the +1 of older conventions).
fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let area = |r: &[f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    inter / (area(a) + area(b) - inter)
}

/// Source taps `(i0, i1, weight of i1)` of each output position of a bilinear resize from `input`
/// to `out` positions, PyTorch's `interpolate(mode="bilinear", align_corners=False)`.
fn bilinear_taps(out: usize, input: usize) -> Vec<(usize, usize, f32)> {
    let scale = input as f32 / out as f32;
    (0..out)
        .map(|o| {
            let s = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (s as usize).min(input - 1);
            let i1 = (i0 + 1).min(input - 1);
            (i0, i1, s - i0 as f32)
        })
        .collect()
}

/// Bilinear resize of a single-channel float image, computed only at the output rows and columns
/// `keep` accepts (the others stay 0): masks are cropped to their boxes, so most of a full-size
/// resize would be thrown away.
fn resize_bilinear_where(
    src: &[f32],
    (sh, sw): (usize, usize),
    (dh, dw): (usize, usize),
    keep_row: impl Fn(usize, &(usize, usize, f32)) -> bool,
    keep_col: impl Fn(usize, &(usize, usize, f32)) -> bool,
) -> Vec<f32> {
    let (rows, cols) = (bilinear_taps(dh, sh), bilinear_taps(dw, sw));
    let cols: Vec<(usize, (usize, usize, f32))> =
        cols.into_iter().enumerate().filter(|(x, tap)| keep_col(*x, tap)).collect();
    let mut out = vec![0f32; dh * dw];
    for (y, &(y0, y1, fy)) in rows.iter().enumerate() {
        if !keep_row(y, &(y0, y1, fy)) {
            continue;
        }
        for &(x, (x0, x1, fx)) in &cols {
            let top = src[y0 * sw + x0] * (1.0 - fx) + src[y0 * sw + x1] * fx;
            let bottom = src[y1 * sw + x0] * (1.0 - fx) + src[y1 * sw + x1] * fx;
            out[y * dw + x] = top * (1.0 - fy) + bottom * fy;
        }
    }
    out
}

/// Ultralytics' `process_mask(..., upsample=True)`: coefficients × prototypes, bilinear to the input
/// size, positive logits, cropped to the box. `prototypes` is `[nm, mh, mw]` row-major.
pub fn assemble_mask(
    candidate: &Candidate,
    prototypes: &[f32],
    (mh, mw): (usize, usize),
    (height, width): (usize, usize),
) -> BinaryMask {
    let plane = mh * mw;
    let mut logits = vec![0f32; plane];
    for (k, &coefficient) in candidate.coefficients.iter().enumerate() {
        for (value, &p) in logits.iter_mut().zip(&prototypes[k * plane..(k + 1) * plane]) {
            *value += coefficient * p;
        }
    }
    let [x1, y1, x2, y2] = candidate.bbox;
    let inside_y = |y: usize| (y as f32) >= y1 && (y as f32) < y2;
    let inside_x = |x: usize| (x as f32) >= x1 && (x as f32) < x2;
    let upsampled = resize_bilinear_where(&logits, (mh, mw), (height, width), |y, _| inside_y(y), |x, _| inside_x(x));
    let mut mask = BinaryMask::zeros(width as u32, height as u32);
    for y in (0..height).filter(|&y| inside_y(y)) {
        for x in (0..width).filter(|&x| inside_x(x)) {
            mask.data[y * width + x] = (upsampled[y * width + x] > 0.0) as u8;
        }
    }
    mask
}

/// Ultralytics' `scale_masks` + `> 0.5`: the letterbox padding cropped, bilinear to the original size.
pub fn mask_to_original(mask: &BinaryMask, letterbox: &Letterbox) -> BinaryMask {
    let (top, left) = (letterbox.pad_top as usize, letterbox.pad_left as usize);
    let (ch, cw) = (letterbox.content_height() as usize, letterbox.content_width() as usize);
    let width = mask.width as usize;
    let content: Vec<f32> = (top..top + ch)
        .flat_map(|y| (left..left + cw).map(move |x| (y, x)))
        .map(|(y, x)| mask.data[y * width + x] as f32)
        .collect();
    // Output pixels whose taps all fall on empty rows or columns are 0 without computing them.
    let rows_used: Vec<bool> = (0..ch).map(|y| content[y * cw..(y + 1) * cw].iter().any(|&v| v > 0.0)).collect();
    let cols_used: Vec<bool> = (0..cw).map(|x| (0..ch).any(|y| content[y * cw + x] > 0.0)).collect();
    let (oh, ow) = (letterbox.original_height as usize, letterbox.original_width as usize);
    let resized = resize_bilinear_where(
        &content,
        (ch, cw),
        (oh, ow),
        |_, &(i0, i1, _)| rows_used[i0] || rows_used[i1],
        |_, &(i0, i1, _)| cols_used[i0] || cols_used[i1],
    );
    BinaryMask { width: ow as u32, height: oh as u32, data: resized.iter().map(|&v| (v > 0.5) as u8).collect() }
}

/// Ultralytics' `scale_boxes`: input pixels → original pixels, clipped to the image.
pub fn box_to_original(bbox: [f32; 4], letterbox: &Letterbox) -> [f32; 4] {
    let b = letterbox.inverse_box(bbox.map(|v| v as f64));
    let (w, h) = (letterbox.original_width as f64, letterbox.original_height as f64);
    [b[0].clamp(0.0, w), b[1].clamp(0.0, h), b[2].clamp(0.0, w), b[3].clamp(0.0, h)].map(|v| v as f32)
}

/// Candidates of one image → detections in original-image pixels, with masks when `prototypes`
/// (`[nm, mh, mw]`) are given.
pub fn finish(
    candidates: Vec<Candidate>,
    prototypes: Option<(&[f32], (usize, usize))>,
    letterbox: &Letterbox,
) -> Vec<Detection> {
    let input = (letterbox.height as usize, letterbox.width as usize);
    candidates
        .into_iter()
        .map(|c| {
            let mask = prototypes.map(|(p, size)| mask_to_original(&assemble_mask(&c, p, size, input), letterbox));
            Detection {
                bbox: box_to_original(c.bbox, letterbox),
                score: c.score,
                class_id: c.class_id,
                class_scores: c.class_scores,
                mask,
            }
        })
        .collect()
}

impl YoloV8 {
    /// Letterboxes `image` to `image_size` (square), runs the model and returns its detections in
    /// original-image pixels, or the device's failure.
    pub fn predict(
        &self,
        image: &RgbImage,
        image_size: u32,
        options: &PredictOptions,
        device: &Device,
    ) -> Result<Vec<Detection>, DeviceError> {
        let letterbox = Letterbox::new(image.width(), image.height(), image_size, image_size);
        let canvas = letterbox.apply_image(image);
        let s = image_size as usize;
        let pixels = kiln_data::planar_pixels(&canvas);
        let input: Tensor<4> = Tensor::from_data(TensorData::new(pixels, [1, 3, s, s]), device);
        let output = self.forward(input);
        Ok(self.postprocess(&output, &[letterbox], options)?.remove(0))
    }

    /// Decoded head outputs of a batch → detections per image (or the device's failure, which
    /// shows when the outputs are read back).
    pub fn postprocess(
        &self,
        output: &HeadOutput,
        letterboxes: &[Letterbox],
        options: &PredictOptions,
    ) -> Result<Vec<Vec<Detection>>, DeviceError> {
        let decoded = self.head.decode(output, letterboxes[0].height as usize);
        let [b, c, a] = decoded.dims();
        let values = read_floats(decoded)?;
        let prototypes = match output.prototypes.clone() {
            Some(p) => {
                let [_, nm, mh, mw] = p.dims();
                Some((read_floats(p)?, nm, mh, mw))
            }
            None => None,
        };
        Ok((0..b)
            .map(|i| {
                let candidates = non_max_suppression(&values[i * c * a..(i + 1) * c * a], self.head.nc, a, options);
                let protos = prototypes.as_ref().map(|(p, nm, mh, mw)| {
                    let plane = nm * mh * mw;
                    (&p[i * plane..(i + 1) * plane], (*mh, *mw))
                });
                finish(candidates, protos, &letterboxes[i])
            })
            .collect())
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn floats(t: Tensor<3>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().expect("float32 tensor")
    }

    /// The one-pass decoding against the composition, detection and segmentation heads, one image
    /// and two, logits wide enough that the softmax's maximum matters.
    #[test]
    fn flex_decoding_matches_the_composed_one() {
        let device = crate::device::cpu();
        for (nc, masks, batch) in [(3, None, 1), (80, Some(32), 2), (1, Some(8), 1)] {
            let head = match masks {
                Some(nm) => Head::segment(nc, nm, 16, [16, 32, 64], &device),
                None => Head::detect(nc, [16, 32, 64], &device),
            };
            let random = |channels: usize, side: usize| {
                Tensor::<4>::random([batch, channels, side, side], Distribution::Normal(0.0, 4.0), &device)
            };
            let sides = [20, 10, 5];
            let output = HeadOutput {
                levels: sides.iter().map(|&s| random(4 * REG_MAX + nc, s)).collect(),
                coefficients: masks.map(|nm| sides.iter().map(|&s| random(nm, s)).collect()),
                prototypes: None,
            };
            let fast = flex::decode(&head, &output, 160).expect("the kernel applies");
            let composed = head.decode_composed(&output, 160);
            assert_eq!(fast.dims(), composed.dims());
            let (fast, composed) = (floats(fast), floats(composed));
            let worst = fast.iter().zip(&composed).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0f32, f32::max);
            // Float rounding: e^x within 2 ulp of libm, the sums in another order.
            assert!(worst < 2e-5, "nc {nc}, masks {masks:?}: worst relative difference {worst}");
        }
    }
}
