//! COCO-protocol evaluation of boxes and masks, following pycocotools' `cocoeval.py::COCOeval`
//! (evaluate → accumulate → summarize) step for step: greedy matching by score per image and
//! class at IoU thresholds 0.50:0.05:0.95, crowd regions and out-of-range areas ignored, at most
//! 100 detections per image, precision interpolated at 101 recall points. On top of it, the
//! precision and recall at the confidence with the best mean F1 (as Ultralytics reports P and R).

use std::collections::{BTreeMap, HashMap};

use kiln_data::coco::{CocoDataset, RleJson, Segmentation};
use kiln_data::mask::Rle;
use serde::{Deserialize, Serialize};

/// One prediction in COCO results form.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CocoResult {
    pub image_id: u64,
    pub category_id: u64,
    /// `[x, y, width, height]`.
    pub bbox: [f64; 4],
    pub score: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<RleJson>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IouType {
    Bbox,
    Segm,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("a prediction refers to image {0}, which is not in the ground truth")]
    UnknownImage(u64),
    #[error("mask evaluation needs masks: prediction {index} (image {image_id}) has no segmentation")]
    MissingMask { index: usize, image_id: u64 },
    #[error("annotation {id}: {message}")]
    BadMask { id: u64, message: String },
}

/// numpy's `linspace(start, stop, num)`: `i * step + start`, the last value exactly `stop`.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let step = (stop - start) / (num - 1) as f64;
    (0..num).map(|i| if i == num - 1 { stop } else { i as f64 * step + start }).collect()
}

/// Area ranges `all, small, medium, large` and detection caps `1, 10, 100`.
const AREA_RANGES: [[f64; 2]; 4] = [[0.0, 1e10], [0.0, 1024.0], [1024.0, 9216.0], [9216.0, 1e10]];
const MAX_DETS: [usize; 3] = [1, 10, 100];

struct Object {
    id: u64,
    bbox: [f64; 4],
    area: f64,
    crowd: bool,
    score: f64,
    mask: Option<Rle>,
}

/// Per image, class, area range: what `evaluateImg` returns.
struct ImageEval {
    /// `[T][D]` matched, ignored; detections sorted by score, at most 100.
    matched: Vec<Vec<bool>>,
    ignored: Vec<Vec<bool>>,
    scores: Vec<f64>,
    /// Ground truths that count (not ignored).
    counted: usize,
}

/// The accumulated evaluation of one IoU type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CocoEvaluation {
    pub iou_type: IouType,
    pub iou_thresholds: Vec<f64>,
    pub recall_thresholds: Vec<f64>,
    /// Category ids of the ground truth, ascending (pycocotools' `catIds`).
    pub category_ids: Vec<u64>,
    /// `[T][R][K][A][M]` flattened; -1 where a class has no ground truth.
    pub precision: Vec<f64>,
    /// `[T][K][A][M]` flattened.
    pub recall: Vec<f64>,
    /// The 12 numbers of `COCOeval.summarize()`.
    pub stats: [f64; 12],
    /// Precision and recall at the best mean-F1 confidence (IoU 0.5), and that confidence.
    pub best_f1: BestF1,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct BestF1 {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub confidence: f64,
}

/// Per-class AP figures.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassAp {
    pub category_id: u64,
    pub ap: f64,
    pub ap50: f64,
}

impl CocoEvaluation {
    fn index(&self, t: usize, r: usize, k: usize, a: usize, m: usize) -> usize {
        let (nr, nk) = (self.recall_thresholds.len(), self.category_ids.len());
        (((t * nr + r) * nk + k) * AREA_RANGES.len() + a) * MAX_DETS.len() + m
    }

    /// AP50-95.
    pub fn ap(&self) -> f64 {
        self.stats[0]
    }

    pub fn ap50(&self) -> f64 {
        self.stats[1]
    }

    /// AP over every IoU threshold and AP at 0.5, per class with ground truth.
    pub fn per_class(&self) -> Vec<ClassAp> {
        let (nt, nr) = (self.iou_thresholds.len(), self.recall_thresholds.len());
        let mut out = Vec::new();
        for (k, &category_id) in self.category_ids.iter().enumerate() {
            let values = |ts: std::ops::Range<usize>| {
                let v: Vec<f64> = ts
                    .flat_map(|t| (0..nr).map(move |r| (t, r)))
                    .map(|(t, r)| self.precision[self.index(t, r, k, 0, 2)])
                    .filter(|&p| p > -1.0)
                    .collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            };
            if let (Some(ap), Some(ap50)) = (values(0..nt), values(0..1)) {
                out.push(ClassAp { category_id, ap, ap50 });
            }
        }
        out
    }

    /// The precision at each recall threshold at IoU 0.5, averaged over classes (the PR curve).
    pub fn pr_curve_50(&self) -> Vec<(f64, f64)> {
        (0..self.recall_thresholds.len())
            .map(|r| {
                let v: Vec<f64> = (0..self.category_ids.len())
                    .map(|k| self.precision[self.index(0, r, k, 0, 2)])
                    .filter(|&p| p > -1.0)
                    .collect();
                let mean = if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
                (self.recall_thresholds[r], mean)
            })
            .collect()
    }
}

/// Evaluates `results` against `truth` as `COCOeval(truth, loadRes(results), iou_type)` does.
pub fn evaluate(truth: &CocoDataset, results: &[CocoResult], iou_type: IouType) -> Result<CocoEvaluation, EvalError> {
    let mut image_ids: Vec<u64> = truth.images.iter().map(|i| i.id).collect();
    image_ids.sort_unstable();
    image_ids.dedup();
    let mut category_ids: Vec<u64> = truth.categories.iter().map(|c| c.id).collect();
    category_ids.sort_unstable();
    category_ids.dedup();
    let sizes: HashMap<u64, (u32, u32)> = truth.images.iter().map(|i| (i.id, (i.height, i.width))).collect();

    let mut gts: HashMap<(u64, u64), Vec<Object>> = HashMap::new();
    for ann in &truth.annotations {
        let Some(&(h, w)) = sizes.get(&ann.image_id) else { continue };
        let mask = match (iou_type, &ann.segmentation) {
            (IouType::Segm, Some(s)) => {
                Some(s.to_rle(h, w).map_err(|e| EvalError::BadMask { id: ann.id, message: e.to_string() })?)
            }
            (IouType::Segm, None) => Some(Rle::empty(h, w)),
            _ => None,
        };
        let bbox = ann.bbox.or_else(|| mask.as_ref().map(|m| m.bbox())).unwrap_or([0.0; 4]);
        let area = ann.area.unwrap_or_else(|| mask.as_ref().map_or(bbox[2] * bbox[3], |m| m.area() as f64));
        gts.entry((ann.image_id, ann.category_id)).or_default().push(Object {
            id: ann.id,
            bbox,
            area,
            crowd: ann.iscrowd != 0,
            score: 0.0,
            mask,
        });
    }
    let mut dts: HashMap<(u64, u64), Vec<Object>> = HashMap::new();
    // loadRes keeps the results' order; _prepare then groups them per image in image-id order.
    let mut by_image: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, r) in results.iter().enumerate() {
        if !sizes.contains_key(&r.image_id) {
            return Err(EvalError::UnknownImage(r.image_id));
        }
        by_image.entry(r.image_id).or_default().push(i);
    }
    for indexes in by_image.values() {
        for &i in indexes {
            let r = &results[i];
            let (mask, bbox, area) = match iou_type {
                IouType::Bbox => (None, r.bbox, r.bbox[2] * r.bbox[3]),
                IouType::Segm => {
                    let json =
                        r.segmentation.as_ref().ok_or(EvalError::MissingMask { index: i, image_id: r.image_id })?;
                    let (h, w) = (json.size[0], json.size[1]);
                    let rle = Segmentation::Rle(json.clone())
                        .to_rle(h, w)
                        .map_err(|e| EvalError::BadMask { id: i as u64 + 1, message: e.to_string() })?;
                    // loadRes takes a result's area from its box whenever it has one, masks included.
                    (Some(rle), r.bbox, r.bbox[2] * r.bbox[3])
                }
            };
            dts.entry((r.image_id, r.category_id)).or_default().push(Object {
                id: i as u64 + 1,
                bbox,
                area,
                crowd: false,
                score: r.score,
                mask,
            });
        }
    }

    let iou_thresholds = linspace(0.5, 0.95, 10);
    let recall_thresholds = linspace(0.0, 1.0, 101);
    let max_det = MAX_DETS[MAX_DETS.len() - 1];
    // evaluateImg for every class, area range, image (pycocotools' loop order).
    let empty = Vec::new();
    let mut evals: Vec<Option<ImageEval>> = Vec::new();
    for &k in &category_ids {
        for range in AREA_RANGES {
            for &image in &image_ids {
                let g = gts.get(&(image, k)).unwrap_or(&empty);
                let d = dts.get(&(image, k)).unwrap_or(&empty);
                evals.push(evaluate_image(g, d, range, max_det, &iou_thresholds, iou_type));
            }
        }
    }

    let (nt, nr, nk, na, nm) =
        (iou_thresholds.len(), recall_thresholds.len(), category_ids.len(), AREA_RANGES.len(), MAX_DETS.len());
    let mut precision = vec![-1.0; nt * nr * nk * na * nm];
    let mut recall = vec![-1.0; nt * nk * na * nm];
    let ni = image_ids.len();
    for k in 0..nk {
        for a in 0..na {
            for (m, &cap) in MAX_DETS.iter().enumerate() {
                let images: Vec<&ImageEval> =
                    evals[(k * na + a) * ni..(k * na + a + 1) * ni].iter().flatten().collect();
                if images.is_empty() {
                    continue;
                }
                let mut entries: Vec<(f64, usize, usize)> = Vec::new(); // score, image, detection
                for (e, image) in images.iter().enumerate() {
                    for (d, &s) in image.scores.iter().take(cap).enumerate() {
                        entries.push((s, e, d));
                    }
                }
                // numpy's mergesort of -score: stable.
                entries.sort_by(|x, y| y.0.total_cmp(&x.0));
                let counted: usize = images.iter().map(|i| i.counted).sum();
                if counted == 0 {
                    continue;
                }
                for t in 0..nt {
                    let (mut tp, mut fp) = (0f64, 0f64);
                    let mut rc = Vec::with_capacity(entries.len());
                    let mut pr = Vec::with_capacity(entries.len());
                    for &(_, e, d) in &entries {
                        let (matched, ignored) = (images[e].matched[t][d], images[e].ignored[t][d]);
                        if matched && !ignored {
                            tp += 1.0;
                        }
                        if !matched && !ignored {
                            fp += 1.0;
                        }
                        rc.push(tp / counted as f64);
                        pr.push(tp / (fp + tp + f64::EPSILON));
                    }
                    let nd = rc.len();
                    recall[((t * nk + k) * na + a) * nm + m] = if nd > 0 { rc[nd - 1] } else { 0.0 };
                    for i in (1..nd).rev() {
                        if pr[i] > pr[i - 1] {
                            pr[i - 1] = pr[i];
                        }
                    }
                    for (r, &threshold) in recall_thresholds.iter().enumerate() {
                        let position = rc.partition_point(|&v| v < threshold);
                        let value = if position < nd { pr[position] } else { 0.0 };
                        precision[(((t * nr + r) * nk + k) * na + a) * nm + m] = value;
                        if position >= nd {
                            // pycocotools stops filling at the first threshold past the curve.
                            for rest in r + 1..nr {
                                precision[(((t * nr + rest) * nk + k) * na + a) * nm + m] = 0.0;
                            }
                            break;
                        }
                    }
                }
            }
        }
    }

    let mut evaluation = CocoEvaluation {
        iou_type,
        iou_thresholds,
        recall_thresholds,
        category_ids,
        precision,
        recall,
        stats: [0.0; 12],
        best_f1: BestF1::default(),
    };
    evaluation.stats = summarize(&evaluation);
    evaluation.best_f1 = best_f1(&evaluation, &gts, &dts, &image_ids);
    Ok(evaluation)
}

fn box_iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let w = (d[0] + d[2]).min(g[0] + g[2]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[1] + d[3]).min(g[1] + g[3]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let inter = w * h;
    let union = if crowd { d[2] * d[3] } else { d[2] * d[3] + g[2] * g[3] - inter };
    inter / union
}

fn object_iou(d: &Object, g: &Object, iou_type: IouType) -> f64 {
    match iou_type {
        IouType::Bbox => box_iou(&d.bbox, &g.bbox, g.crowd),
        IouType::Segm => {
            let (dm, gm) = (d.mask.as_ref().unwrap(), g.mask.as_ref().unwrap());
            // rleIou only measures masks whose boxes overlap, and -1 for masks of different sizes.
            if (dm.height, dm.width) != (gm.height, gm.width) {
                return -1.0;
            }
            if box_iou(&dm.bbox(), &gm.bbox(), g.crowd) <= 0.0 {
                return 0.0;
            }
            dm.iou(gm, g.crowd)
        }
    }
}

/// `COCOeval.evaluateImg` for one image, class and area range.
fn evaluate_image(
    gts: &[Object],
    dts: &[Object],
    range: [f64; 2],
    max_det: usize,
    thresholds: &[f64],
    iou_type: IouType,
) -> Option<ImageEval> {
    if gts.is_empty() && dts.is_empty() {
        return None;
    }
    let outside = |area: f64| area < range[0] || area > range[1];
    let gt_ignore: Vec<bool> = gts.iter().map(|g| g.crowd || outside(g.area)).collect();
    // Ground truths that count first (stable), detections by score (stable), capped.
    let mut gt_order: Vec<usize> = (0..gts.len()).collect();
    gt_order.sort_by_key(|&i| gt_ignore[i]);
    let mut dt_order: Vec<usize> = (0..dts.len()).collect();
    dt_order.sort_by(|&a, &b| dts[b].score.total_cmp(&dts[a].score));
    dt_order.truncate(max_det);

    let ious: Vec<Vec<f64>> =
        dt_order.iter().map(|&d| gt_order.iter().map(|&g| object_iou(&dts[d], &gts[g], iou_type)).collect()).collect();
    let nt = thresholds.len();
    let mut gt_matched = vec![vec![false; gt_order.len()]; nt];
    let mut matched = vec![vec![false; dt_order.len()]; nt];
    let mut ignored = vec![vec![false; dt_order.len()]; nt];
    for (t, &threshold) in thresholds.iter().enumerate() {
        for (di, _) in dt_order.iter().enumerate() {
            let mut best_iou = threshold.min(1.0 - 1e-10);
            let mut best: Option<usize> = None;
            for (gi, &g) in gt_order.iter().enumerate() {
                if gt_matched[t][gi] && !gts[g].crowd {
                    continue;
                }
                if let Some(m) = best
                    && !gt_ignore[gt_order[m]]
                    && gt_ignore[g]
                {
                    break;
                }
                if ious[di][gi] < best_iou {
                    continue;
                }
                best_iou = ious[di][gi];
                best = Some(gi);
            }
            if let Some(m) = best {
                ignored[t][di] = gt_ignore[gt_order[m]];
                // pycocotools records the ground truth's id: an id of 0 reads as "no match".
                matched[t][di] = gts[gt_order[m]].id != 0;
                gt_matched[t][m] = true;
            }
        }
    }
    for (di, &d) in dt_order.iter().enumerate() {
        if outside(dts[d].area) {
            for t in 0..nt {
                ignored[t][di] |= !matched[t][di];
            }
        }
    }
    Some(ImageEval {
        matched,
        ignored,
        scores: dt_order.iter().map(|&d| dts[d].score).collect(),
        counted: gt_ignore.iter().filter(|&&i| !i).count(),
    })
}

/// `COCOeval.summarize()`: AP (all, .5, .75, small, medium, large) and AR (1, 10, 100 detections,
/// small, medium, large).
fn summarize(e: &CocoEvaluation) -> [f64; 12] {
    let (nt, nr, nk) = (e.iou_thresholds.len(), e.recall_thresholds.len(), e.category_ids.len());
    let (na, nm) = (AREA_RANGES.len(), MAX_DETS.len());
    let mean = |values: Vec<f64>| {
        let v: Vec<f64> = values.into_iter().filter(|&x| x > -1.0).collect();
        if v.is_empty() { -1.0 } else { v.iter().sum::<f64>() / v.len() as f64 }
    };
    let ap = |t: Option<usize>, a: usize, m: usize| {
        let ts: Vec<usize> = t.map_or((0..nt).collect(), |t| vec![t]);
        mean(
            ts.iter()
                .flat_map(|&t| (0..nr).flat_map(move |r| (0..nk).map(move |k| e.index(t, r, k, a, m))))
                .map(|i| e.precision[i])
                .collect(),
        )
    };
    let ar = |a: usize, m: usize| {
        mean(
            (0..nt).flat_map(|t| (0..nk).map(move |k| ((t * nk + k) * na + a) * nm + m)).map(|i| e.recall[i]).collect(),
        )
    };
    let t75 = e.iou_thresholds.iter().position(|&t| t == 0.75);
    [
        ap(None, 0, 2),
        ap(Some(0), 0, 2),
        t75.map_or(-1.0, |t| ap(Some(t), 0, 2)),
        ap(None, 1, 2),
        ap(None, 2, 2),
        ap(None, 3, 2),
        ar(0, 0),
        ar(0, 1),
        ar(0, 2),
        ar(1, 2),
        ar(2, 2),
        ar(3, 2),
    ]
}

/// Precision and recall per class as functions of the confidence (IoU 0.5, every area, 100
/// detections), sampled on 1000 confidences; the confidence where the class-mean F1 peaks.
fn best_f1(
    e: &CocoEvaluation,
    gts: &HashMap<(u64, u64), Vec<Object>>,
    dts: &HashMap<(u64, u64), Vec<Object>>,
    image_ids: &[u64],
) -> BestF1 {
    const POINTS: usize = 1000;
    let mut curves: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
    for &k in &e.category_ids {
        let mut scored: Vec<(f64, bool)> = Vec::new();
        let mut counted = 0usize;
        for &image in image_ids {
            let g = gts.get(&(image, k)).map_or(&[][..], |v| v.as_slice());
            let d = dts.get(&(image, k)).map_or(&[][..], |v| v.as_slice());
            let Some(eval) = evaluate_image(g, d, AREA_RANGES[0], 100, &[0.5], e.iou_type) else { continue };
            counted += eval.counted;
            for (i, &s) in eval.scores.iter().enumerate() {
                if !eval.ignored[0][i] {
                    scored.push((s, eval.matched[0][i]));
                }
            }
        }
        if counted == 0 {
            continue;
        }
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let (mut precision, mut recall) = (vec![0.0; POINTS], vec![0.0; POINTS]);
        for p in 0..POINTS {
            let confidence = p as f64 / (POINTS - 1) as f64;
            let kept = scored.partition_point(|&(s, _)| s >= confidence);
            let tp = scored[..kept].iter().filter(|x| x.1).count() as f64;
            recall[p] = tp / counted as f64;
            precision[p] = if kept > 0 { tp / kept as f64 } else { 1.0 };
        }
        curves.push((precision, recall));
    }
    if curves.is_empty() {
        return BestF1::default();
    }
    let n = curves.len() as f64;
    let mut best = BestF1::default();
    for p in 0..POINTS {
        let precision = curves.iter().map(|c| c.0[p]).sum::<f64>() / n;
        let recall = curves.iter().map(|c| c.1[p]).sum::<f64>() / n;
        let f1 = curves.iter().map(|c| 2.0 * c.0[p] * c.1[p] / (c.0[p] + c.1[p] + 1e-16)).sum::<f64>() / n;
        if f1 > best.f1 {
            best = BestF1 { precision, recall, f1, confidence: p as f64 / (POINTS - 1) as f64 };
        }
    }
    best
}
