//! The labelling pass: a teacher run once over images, streamed (one image in memory at a time)
//! and cached on disk by teacher fingerprint and image content (`<cache>/<fingerprint>/<image
//! SHA-256>.json`), so a killed run resumes where it stopped and every run taught by the same
//! teacher reuses its labels. Then what the labels become: the teacher-labelled training set with
//! its signals, the prompted images' soft masks, `teacher_labels.json` and its picture, and the
//! coverage check.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_data::DataError;
use kiln_data::batch::TeacherSignal;
use kiln_data::coco::{CocoAnnotation, CocoCategory, CocoDataset, CocoImage, RleJson, Segmentation};
use kiln_data::io::{ResultCategory, ResultImage, ResultsDocument};
use kiln_models::lora::{LoraError, file_sha256};
use serde::{Deserialize, Serialize};

use super::teacher::fnv1a_hex;
use super::{DistillConfig, Teacher, TeacherInstance};
use crate::engine::{Verbosity, epoch_bar};
use crate::error::TrainError;

/// The COCO results document of a run's teacher labels.
pub const TEACHER_LABELS: &str = "teacher_labels.json";
/// Its picture: the first images with their teacher labels drawn.
pub const TEACHER_LABELS_PICTURE: &str = "teacher_labels.jpg";
const SHOWN_IMAGES: usize = 16;

/// An image to label.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelImage {
    pub path: PathBuf,
    /// Relative to its images directory.
    pub file_name: String,
    /// Ground-truth boxes for a teacher that segments (a labelled image); empty for an unlabelled one.
    pub prompts: Vec<Prompt>,
}

/// A ground-truth box given to the teacher.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// The annotation it comes from, which the teacher's mask is attached to.
    pub annotation_id: u64,
    pub class: usize,
    /// `x1, y1, x2, y2` in original pixels.
    pub bbox: [f64; 4],
}

/// An image with what the teacher said about it.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledImage {
    pub path: PathBuf,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
    pub prompts: Vec<Prompt>,
    /// For prompts, one per prompt in their order (or none); otherwise the objects found.
    pub instances: Vec<TeacherInstance>,
    /// The teacher's feature map of the image (a file in the cache, read when training needs it).
    pub features: Option<PathBuf>,
}

/// What a labelling pass did.
#[derive(Debug, Clone, Default)]
pub struct LabelPass {
    /// The images labelled (computed or from the cache), in the order given; skipped ones are not here.
    pub images: Vec<LabelledImage>,
    pub computed: usize,
    pub reused: usize,
    /// Images that could not be read or decoded: path and why.
    pub skipped: Vec<(PathBuf, String)>,
    pub seconds: f64,
}

/// A cache file: one image's labels.
#[derive(Debug, Serialize, Deserialize)]
struct CachedLabels {
    width: u32,
    height: u32,
    instances: Vec<TeacherInstance>,
}

/// Labels `images` with `teacher`, reusing the labels cached under
/// `cache_dir/<teacher fingerprint>/` and caching the new ones as soon as they are computed. A
/// missing, unreadable or undecodable image is skipped and recorded, not fatal; a teacher's
/// failure (the device) is.
pub fn label_images(
    teacher: &dyn Teacher,
    images: &[LabelImage],
    cache_dir: &Path,
    verbosity: Verbosity,
    what: &str,
) -> Result<LabelPass, TrainError> {
    let started = Instant::now();
    let dir = cache_dir.join(teacher.fingerprint());
    let bar = epoch_bar(verbosity, images.len() as u64, what);
    let mut pass = LabelPass { images: Vec::with_capacity(images.len()), ..LabelPass::default() };
    for image in images {
        match label_one(teacher, image, &dir)? {
            Outcome::Computed(labelled) => {
                pass.computed += 1;
                pass.images.push(labelled);
            }
            Outcome::Reused(labelled) => {
                pass.reused += 1;
                pass.images.push(labelled);
            }
            Outcome::Skipped(reason) => pass.skipped.push((image.path.clone(), reason)),
        }
        bar.inc(1);
        let rate = (pass.computed + pass.reused) as f64 / started.elapsed().as_secs_f64().max(1e-6);
        bar.set_message(format!("{rate:.1} images/s, {} cached", pass.reused));
    }
    bar.finish_and_clear();
    pass.seconds = started.elapsed().as_secs_f64();
    Ok(pass)
}

enum Outcome {
    Computed(LabelledImage),
    Reused(LabelledImage),
    Skipped(String),
}

fn label_one(teacher: &dyn Teacher, image: &LabelImage, dir: &Path) -> Result<Outcome, TrainError> {
    let hash = match file_sha256(&image.path) {
        Ok(hash) => hash,
        Err(LoraError::File { message, .. }) => return Ok(Outcome::Skipped(format!("cannot read: {message}"))),
        Err(other) => return Ok(Outcome::Skipped(other.to_string())),
    };
    let cached_path = cache_file(dir, &hash, &image.prompts);
    // Written before the labels, whose file marks a complete entry.
    let features_path = teacher.makes_features().then(|| cached_path.with_extension("features"));
    let labelled = |cached: CachedLabels| LabelledImage {
        path: image.path.clone(),
        file_name: image.file_name.clone(),
        width: cached.width,
        height: cached.height,
        prompts: image.prompts.clone(),
        instances: cached.instances,
        features: features_path.clone(),
    };
    if let Some(cached) = read_cache(&cached_path, image.prompts.len())
        && features_path.as_ref().is_none_or(|f| f.is_file())
    {
        return Ok(Outcome::Reused(labelled(cached)));
    }
    let decoded = match kiln_data::io::read_rgb_image(&image.path) {
        Ok(decoded) => decoded,
        Err(e) => return Ok(Outcome::Skipped(skip_reason(e))),
    };
    let prompts: Vec<(usize, [f64; 4])> = image.prompts.iter().map(|p| (p.class, p.bbox)).collect();
    let (instances, features) = if teacher.makes_features() {
        teacher.label_with_features(&decoded, &prompts)?
    } else {
        (teacher.label(&decoded, &prompts)?, None)
    };
    if let (Some(path), Some(features)) = (&features_path, features) {
        kiln_data::io::write_atomic(path, &features.to_bytes())?;
    }
    let cached = CachedLabels { width: decoded.width(), height: decoded.height(), instances };
    // Compact: soft masks are long lists of small numbers.
    let bytes = serde_json::to_vec(&cached)
        .map_err(|e| TrainError::Io { path: cached_path.clone(), message: format!("cannot serialise: {e}") })?;
    kiln_data::io::write_atomic(&cached_path, &bytes)?;
    Ok(Outcome::Computed(labelled(cached)))
}

/// The cache file of an image's labels: by content, and for a prompted image by its prompts too
/// (edited annotations are segmented anew).
fn cache_file(dir: &Path, image_hash: &str, prompts: &[Prompt]) -> PathBuf {
    if prompts.is_empty() {
        return dir.join(format!("{image_hash}.json"));
    }
    let key: String = prompts.iter().map(|p| format!("{} {:?};", p.class, p.bbox)).collect();
    dir.join(format!("{image_hash}-{}.json", fnv1a_hex(&key)))
}

/// Cached labels, if the file is there and whole; a teacher that segments prompts answers each of
/// them or none.
fn read_cache(path: &Path, prompts: usize) -> Option<CachedLabels> {
    let bytes = std::fs::read(path).ok()?;
    let cached: CachedLabels = serde_json::from_slice(&bytes).ok()?;
    (prompts == 0 || cached.instances.is_empty() || cached.instances.len() == prompts).then_some(cached)
}

/// Why an image is skipped, without its path (recorded beside it).
fn skip_reason(error: DataError) -> String {
    match error {
        DataError::Io { what, cause, .. } => format!("{what}: {cause}"),
        DataError::Image { message, .. } => format!("cannot decode the image: {message}"),
        other => other.to_string(),
    }
}

/// Class-aware NMS: best score first, a box is dropped when it overlaps an already kept box of its
/// class by IoU above `iou`; at most `max` kept.
pub fn class_aware_nms(mut instances: Vec<TeacherInstance>, iou: f32, max: usize) -> Vec<TeacherInstance> {
    instances.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<TeacherInstance> = Vec::new();
    for candidate in instances {
        if kept.len() >= max {
            break;
        }
        if kept.iter().any(|k| k.class == candidate.class && box_iou(&k.bbox, &candidate.bbox) > iou as f64) {
            continue;
        }
        kept.push(candidate);
    }
    kept
}

/// IoU of two `x1, y1, x2, y2` boxes (0 when both are empty).
fn box_iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let area = |r: &[f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let intersection = w * h;
    let union = area(a) + area(b) - intersection;
    if union > 0.0 { intersection / union } else { 0.0 }
}

/// `x1, y1, x2, y2` → COCO's `x, y, w, h`.
fn coco_box([x1, y1, x2, y2]: [f64; 4]) -> [f64; 4] {
    [x1, y1, x2 - x1, y2 - y1]
}

/// The categories of the data's classes (class index order).
fn categories(classes: &[String], category_ids: &[u64]) -> Vec<CocoCategory> {
    classes
        .iter()
        .zip(category_ids)
        .map(|(name, &id)| CocoCategory { id, name: name.clone(), supercategory: None, extra: Default::default() })
        .collect()
}

/// The teacher's mask of an instance in COCO's compressed form; none when it has no (or an empty) mask.
fn segmentation(instance: &TeacherInstance) -> Option<RleJson> {
    instance.mask.as_ref().filter(|rle| rle.area() > 0).map(|rle| rle.to_json(true))
}

/// The teacher-labelled images as a COCO dataset (images and annotations numbered from 1, the
/// teacher's instances as annotations, with their masks when it made them) and the teacher's
/// signals (class probabilities, soft masks) by annotation id. Images without instances stay, as
/// background.
pub fn teacher_dataset(
    images: &[LabelledImage],
    classes: &[String],
    category_ids: &[u64],
) -> (CocoDataset, HashMap<u64, TeacherSignal>) {
    let mut dataset = CocoDataset { categories: categories(classes, category_ids), ..CocoDataset::default() };
    let mut signals = HashMap::new();
    for (position, image) in images.iter().enumerate() {
        let image_id = position as u64 + 1;
        dataset.images.push(CocoImage {
            id: image_id,
            file_name: image.file_name.clone(),
            width: image.width,
            height: image.height,
            extra: Default::default(),
        });
        for instance in &image.instances {
            let Some(&category_id) = category_ids.get(instance.class) else { continue };
            let id = dataset.annotations.len() as u64 + 1;
            let [x, y, w, h] = coco_box(instance.bbox);
            let mask = segmentation(instance);
            let area = match &instance.mask {
                Some(rle) if mask.is_some() => rle.area() as f64,
                _ => w * h,
            };
            dataset.annotations.push(CocoAnnotation {
                id,
                image_id,
                category_id,
                segmentation: mask.map(Segmentation::Rle),
                bbox: Some([x, y, w, h]),
                area: Some(area),
                iscrowd: 0,
                keypoints: None,
                num_keypoints: None,
                extra: Default::default(),
            });
            signals.insert(
                id,
                TeacherSignal {
                    class_probs: Some(instance.class_probs.clone()),
                    soft_mask: instance.soft_mask.clone(),
                },
            );
        }
    }
    (dataset, signals)
}

/// The soft masks a teacher made for labelled images' prompts, by the prompts' annotation ids (the
/// i-th instance answers the i-th prompt); the ground truth keeps its own classes.
pub fn prompt_signals(images: &[LabelledImage]) -> HashMap<u64, TeacherSignal> {
    images
        .iter()
        .flat_map(|image| image.prompts.iter().zip(&image.instances))
        .filter_map(|(prompt, instance)| {
            let soft_mask = instance.soft_mask.clone()?;
            Some((prompt.annotation_id, TeacherSignal { class_probs: None, soft_mask: Some(soft_mask) }))
        })
        .collect()
}

/// One annotation of `teacher_labels.json`.
#[derive(Debug, Serialize)]
struct LabelAnnotation {
    id: u64,
    image_id: u64,
    category_id: u64,
    /// `x, y, w, h`.
    bbox: [f64; 4],
    score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    segmentation: Option<RleJson>,
}

/// Writes the teacher's labels into `run_dir`: `teacher_labels.json` (COCO results: images from 1,
/// the data's categories, one annotation per label with its score and mask) and
/// `teacher_labels.jpg` (the first images with the labels drawn; none without images).
pub fn write_teacher_labels(
    run_dir: &Path,
    pass: &LabelPass,
    classes: &[String],
    category_ids: &[u64],
) -> Result<(), TrainError> {
    let mut images = Vec::with_capacity(pass.images.len());
    let mut annotations = Vec::new();
    for (position, image) in pass.images.iter().enumerate() {
        let image_id = position as u64 + 1;
        images.push(ResultImage {
            id: image_id,
            file_name: image.file_name.clone(),
            width: image.width,
            height: image.height,
        });
        for instance in &image.instances {
            let Some(&category_id) = category_ids.get(instance.class) else { continue };
            annotations.push(LabelAnnotation {
                id: annotations.len() as u64 + 1,
                image_id,
                category_id,
                bbox: coco_box(instance.bbox),
                score: instance.score,
                segmentation: segmentation(instance),
            });
        }
    }
    let categories =
        classes.iter().zip(category_ids).map(|(name, &id)| ResultCategory { id, name: name.clone() }).collect();
    kiln_data::io::write_json_atomic(
        &run_dir.join(TEACHER_LABELS),
        &ResultsDocument { images, categories, annotations },
    )?;
    let mut pictures = Vec::new();
    for image in pass.images.iter().take(SHOWN_IMAGES) {
        // An image gone since it was labelled is left out of the picture, not an error.
        let Ok(mut picture) = kiln_data::io::read_rgb_image(&image.path) else { continue };
        draw_instances(&mut picture, &image.instances, classes);
        pictures.push(picture);
    }
    if !pictures.is_empty() {
        crate::plots::save(&crate::plots::grid(&pictures, 4, 320), &run_dir.join(TEACHER_LABELS_PICTURE))?;
    }
    Ok(())
}

/// Teacher labels drawn: masks tinted, boxes outlined, `class score` labels.
fn draw_instances(image: &mut image::RgbImage, instances: &[TeacherInstance], classes: &[String]) {
    use kiln_data::draw;
    for instance in instances {
        if let Some(rle) = &instance.mask {
            draw::tint_mask(image, &rle.decode(), draw::class_colour(instance.class), 0.45);
        }
    }
    let thickness = (image.width().max(image.height()) / 320).max(1);
    let scale = if image.width().max(image.height()) >= 800 { 2 } else { 1 };
    for instance in instances {
        let colour = draw::class_colour(instance.class);
        draw::rectangle(image, instance.bbox, colour, thickness);
        let name = classes.get(instance.class).map_or_else(|| instance.class.to_string(), Clone::clone);
        draw::label(image, instance.bbox[0], instance.bbox[1], &format!("{name} {:.2}", instance.score), colour, scale);
    }
}

/// Whether the teacher labelled enough of the unlabelled (prompt-free) images: an error when it
/// found nothing on any of them (its labels would teach only "background"), a warning when the
/// share of empty ones exceeds `empty_warning`. `chosen`: the threshold `auto` chose, if it did.
pub fn coverage(
    pass: &LabelPass,
    config: &DistillConfig,
    teacher: &str,
    chosen: Option<&ThresholdChoice>,
) -> Result<Option<String>, TrainError> {
    let unlabelled: Vec<&LabelledImage> = pass.images.iter().filter(|i| i.prompts.is_empty()).collect();
    if unlabelled.is_empty() {
        return Ok(None);
    }
    let threshold = config.labelling_box_threshold();
    let settings = match chosen {
        Some(choice) => format!(
            "at the threshold distill.box_threshold auto chose, {:.3} (the teacher's best F1, {:.3}, on the labelled \
             images it was tuned on: its scores on new images are lower)",
            choice.threshold, choice.f1
        ),
        None => format!(
            "at distill.box_threshold {threshold} (GroundingDINO: and distill.text_threshold {}, which its phrases \
             must reach)",
            config.labelling_text_threshold()
        ),
    };
    let empty = unlabelled.iter().filter(|i| i.instances.is_empty()).count();
    if empty == unlabelled.len() {
        return Err(TrainError::Config(format!(
            "the teacher ({teacher}) found NOTHING on any of the {} unlabelled images {settings}: set a lower \
             threshold (e.g. `--set distill.box_threshold={}`), check that the images show the classes, or train \
             the teachers longer",
            unlabelled.len(),
            (threshold / 2.0 * 1000.0).round() / 1000.0
        )));
    }
    let fraction = empty as f64 / unlabelled.len() as f64;
    if fraction > config.empty_warning {
        return Ok(Some(format!(
            "the teacher ({teacher}) found nothing on {empty} of the {} unlabelled images ({:.0} %, more than \
             distill.empty_warning {:.0} %) {settings}: consider a lower threshold (e.g. `--set \
             distill.box_threshold={}`) or training the teachers longer",
            unlabelled.len(),
            100.0 * fraction,
            100.0 * config.empty_warning,
            (threshold / 2.0 * 1000.0).round() / 1000.0
        )));
    }
    Ok(None)
}

/// The score threshold `distill.box_threshold: auto` chooses, and how the teacher does there.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ThresholdChoice {
    pub threshold: f32,
    pub f1: f64,
    pub precision: f64,
    pub recall: f64,
    /// Teacher labels kept at `threshold` on the labelled images, and the true ones they match.
    pub labels: usize,
    pub matched: usize,
    /// Ground-truth objects on the labelled images.
    pub objects: usize,
}

/// The score at which the teacher's labels on labelled images reach their best F1 against the
/// ground truth: a label is right when it has the class of a not yet matched true box it overlaps
/// by IoU ≥ 0.5 (greedy, best score first, as COCO matches). Greedy matching in score order makes
/// each label's verdict independent of the labels below it, so one pass scores every threshold.
/// `None` without ground truth; with no label right, F1 is 0 at the floor.
pub fn best_f1_threshold(images: &[(&[TeacherInstance], &[Prompt])], floor: f32) -> Option<ThresholdChoice> {
    let objects: usize = images.iter().map(|(_, truth)| truth.len()).sum();
    if objects == 0 {
        return None;
    }
    let mut verdicts: Vec<(f32, bool)> = Vec::new();
    for (found, truth) in images {
        let mut order: Vec<&TeacherInstance> = found.iter().filter(|i| i.score >= floor).collect();
        order.sort_by(|a, b| b.score.total_cmp(&a.score));
        let mut taken = vec![false; truth.len()];
        for label in order {
            let best = truth
                .iter()
                .enumerate()
                .filter(|(t, object)| !taken[*t] && object.class == label.class)
                .map(|(t, object)| (t, box_iou(&label.bbox, &object.bbox)))
                .filter(|&(_, iou)| iou >= 0.5)
                .max_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((t, _)) = best {
                taken[t] = true;
            }
            verdicts.push((label.score, best.is_some()));
        }
    }
    verdicts.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut choice = ThresholdChoice {
        threshold: floor,
        f1: 0.0,
        precision: 0.0,
        recall: 0.0,
        labels: verdicts.len(),
        matched: 0,
        objects,
    };
    let mut matched = 0;
    for (k, &(score, right)) in verdicts.iter().enumerate() {
        matched += right as usize;
        // A threshold keeps every label of a score, so only the last of equal scores is a cut.
        if verdicts.get(k + 1).is_some_and(|next| next.0 == score) {
            continue;
        }
        let (precision, recall) = (matched as f64 / (k + 1) as f64, matched as f64 / objects as f64);
        let f1 = if matched == 0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
        if f1 > choice.f1 {
            choice = ThresholdChoice { threshold: score, f1, precision, recall, labels: k + 1, matched, objects };
        }
    }
    Some(choice)
}

/// How well the teacher names what it finds, which `distill.logit: auto` weighs the logit
/// distillation by: its labels on the labelled images (at the run's box threshold) are matched to
/// the true objects regardless of class (greedy, best score first, IoU ≥ 0.5, each object once, as
/// COCO matches), and the accuracy is the share of matched labels that give their object its
/// class: the teacher's best guess on each object it finds. Duplicates are left out, since
/// class-aware NMS keeps one box per class on an object, and counting them would judge a teacher
/// by its second guesses.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NamingAccuracy {
    /// Objects a label found (matched), and of those, the ones the label gives their class.
    pub located: usize,
    pub named: usize,
    pub classes: usize,
    /// `named / located` (0 when nothing is located).
    pub accuracy: f64,
    /// `(accuracy - 1/C) / (1 - 1/C)`, clamped to `[0, 1]`: the accuracy above chance (Cohen's kappa
    /// against a uniform guess), so a teacher that names at chance teaches no class scores. 1 with
    /// one class (there is nothing to name wrong) and when it locates fewer than
    /// [`NAMING_MIN_LOCATED`] objects (too few to judge); 0 when no label locates an object.
    pub weight: f32,
}

/// Fewer objects located than this say too little about a teacher's naming to weigh its class
/// scores by it: one object more or less named right moves the accuracy by more than 5 points. (In
/// `tests/distill.rs` a kiln student teaching from 8 labelled images locates 5 and names 3: 0.6 of
/// 2 classes would weigh its class scores 0.2, and the student it taught reached box / mask mAP50
/// 0.043 / 0.042; at full weight 0.095 / 0.119, the labels-only student 0 / 0.) The weight then
/// stays 1.
pub const NAMING_MIN_LOCATED: usize = 20;

/// The teacher's [`NamingAccuracy`] on labelled images (`images`: its unprompted labels and the
/// ground truth), counting its labels scoring at least `threshold`.
pub fn naming_accuracy(images: &[(&[TeacherInstance], &[Prompt])], threshold: f32, classes: usize) -> NamingAccuracy {
    let (mut located, mut named) = (0, 0);
    for (found, truth) in images {
        let mut order: Vec<&TeacherInstance> = found.iter().filter(|i| i.score >= threshold).collect();
        order.sort_by(|a, b| b.score.total_cmp(&a.score));
        let mut taken = vec![false; truth.len()];
        for label in order {
            let nearest = truth
                .iter()
                .enumerate()
                .filter(|(t, _)| !taken[*t])
                .map(|(t, object)| (t, box_iou(&label.bbox, &object.bbox)))
                .filter(|&(_, iou)| iou >= 0.5)
                .max_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((t, _)) = nearest {
                taken[t] = true;
                located += 1;
                named += (truth[t].class == label.class) as usize;
            }
        }
    }
    let accuracy = if located == 0 { 0.0 } else { named as f64 / located as f64 };
    let weight = match (classes, located) {
        (0 | 1, _) => 1.0,
        (_, 0) => 0.0,
        (_, n) if n < NAMING_MIN_LOCATED => 1.0,
        (c, _) => {
            let chance = 1.0 / c as f64;
            ((accuracy - chance) / (1.0 - chance)).clamp(0.0, 1.0) as f32
        }
    };
    NamingAccuracy { located, named, classes, accuracy, weight }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use image::{Rgb, RgbImage};
    use kiln_data::batch::{CocoDetectionDataset, SoftMask};
    use kiln_data::mask::{BinaryMask, Rle};

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-distill-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn instance(class: usize, bbox: [f64; 4], score: f32) -> TeacherInstance {
        let mut class_probs = vec![0.05; 2];
        class_probs[class] = score;
        TeacherInstance { class, class_probs, score, bbox, mask: None, soft_mask: None }
    }

    /// Labels every image with one masked box inside its border, counting its calls.
    struct CountingTeacher {
        classes: Vec<String>,
        calls: Cell<usize>,
    }

    impl Teacher for CountingTeacher {
        fn describe(&self) -> String {
            "a counting test teacher".into()
        }
        fn fingerprint(&self) -> String {
            "counting-teacher".into()
        }
        fn classes(&self) -> &[String] {
            &self.classes
        }
        fn finds_objects(&self) -> bool {
            true
        }
        fn makes_masks(&self) -> bool {
            true
        }
        fn segments_boxes(&self) -> bool {
            true
        }
        fn label(&self, image: &RgbImage, _prompts: &[(usize, [f64; 4])]) -> Result<Vec<TeacherInstance>, TrainError> {
            self.calls.set(self.calls.get() + 1);
            let (w, h) = (image.width(), image.height());
            let mut mask = BinaryMask::zeros(w, h);
            mask.data[(h / 2 * w + w / 2) as usize] = 1;
            let soft =
                SoftMask { region: [0.0, 0.0, w as f64, h as f64], width: 2, height: 2, data: vec![0, 64, 128, 255] };
            Ok(vec![TeacherInstance {
                mask: Some(Rle::encode(&mask)),
                soft_mask: Some(soft),
                ..instance(1, [1.0, 1.0, w as f64 - 1.0, h as f64 - 1.0], 0.75)
            }])
        }
    }

    fn counting_teacher() -> CountingTeacher {
        CountingTeacher { classes: vec!["cat".into(), "dog".into()], calls: Cell::new(0) }
    }

    fn label_image(dir: &Path, name: &str) -> LabelImage {
        LabelImage { path: dir.join(name), file_name: name.to_string(), prompts: Vec::new() }
    }

    #[test]
    fn the_auto_threshold_is_the_score_of_best_f1() {
        let truth = |class, bbox| Prompt { annotation_id: 0, class, bbox };
        let first_truth = [truth(0, [0.0, 0.0, 10.0, 10.0]), truth(1, [20.0, 20.0, 30.0, 30.0])];
        let first = [
            instance(0, [0.0, 0.0, 10.0, 10.0], 0.9),    // right
            instance(0, [0.0, 0.0, 10.0, 10.0], 0.8),    // a duplicate: wrong
            instance(1, [21.0, 20.0, 30.0, 30.0], 0.6),  // right (IoU 0.9)
            instance(0, [20.0, 20.0, 30.0, 30.0], 0.55), // the wrong class: wrong
            instance(1, [50.0, 50.0, 60.0, 60.0], 0.3),  // nothing there: wrong
        ];
        let second_truth = [truth(0, [5.0, 5.0, 15.0, 15.0])];
        let second = [instance(0, [5.0, 5.0, 15.0, 14.0], 0.4), instance(0, [5.0, 5.0, 15.0, 15.0], 0.01)];
        let images: Vec<(&[TeacherInstance], &[Prompt])> = vec![(&first, &first_truth), (&second, &second_truth)];
        let choice = best_f1_threshold(&images, 0.05).unwrap();
        // Cuts: 0.9 (1/1, 1/3) F1 0.5; 0.8 (1/2) 0.4; 0.6 (2/3, 2/3) 0.667; 0.55 (2/4) 0.571;
        // 0.4 (3/5, 3/3) 0.75; 0.3 (3/6) 0.667. The 0.01 label is below the floor.
        assert_eq!(choice.threshold, 0.4);
        assert!((choice.f1 - 0.75).abs() < 1e-9, "{choice:?}");
        assert_eq!((choice.labels, choice.matched, choice.objects), (5, 3, 3));
        assert!((choice.precision - 0.6).abs() < 1e-9 && (choice.recall - 1.0).abs() < 1e-9);
        // Nothing right: F1 0 at the floor; no ground truth: no choice.
        let wrong = [instance(1, [0.0, 0.0, 10.0, 10.0], 0.9)];
        let none = best_f1_threshold(&[(&wrong[..], &first_truth[..1])], 0.05).unwrap();
        assert_eq!((none.threshold, none.f1, none.matched), (0.05, 0.0, 0));
        assert!(best_f1_threshold(&[(&wrong[..], &[][..])], 0.05).is_none());
    }

    #[test]
    fn nms_keeps_the_best_of_each_class_and_at_most_max() {
        let instances = vec![
            instance(0, [0.0, 0.0, 10.0, 10.0], 0.6),
            instance(0, [1.0, 0.0, 11.0, 10.0], 0.9),
            // Same place, other class: kept.
            instance(1, [0.0, 0.0, 10.0, 10.0], 0.5),
            // Same class, apart: kept.
            instance(0, [50.0, 50.0, 60.0, 60.0], 0.4),
        ];
        let kept = class_aware_nms(instances.clone(), 0.7, 10);
        let scores: Vec<f32> = kept.iter().map(|i| i.score).collect();
        assert_eq!(scores, vec![0.9, 0.5, 0.4]);
        assert_eq!(kept[0].bbox, [1.0, 0.0, 11.0, 10.0]);
        // IoU of the two class-0 boxes is 90 / 110: above 0.9 neither suppresses the other.
        assert_eq!(class_aware_nms(instances.clone(), 0.9, 10).len(), 4);
        assert_eq!(class_aware_nms(instances, 0.7, 2).len(), 2);
        assert_eq!(box_iou(&[0.0, 0.0, 0.0, 0.0], &[0.0, 0.0, 0.0, 0.0]), 0.0);
    }

    #[test]
    fn labels_are_cached_and_reused() {
        let dir = scratch("cache");
        RgbImage::from_pixel(8, 6, Rgb([200, 10, 10])).save(dir.join("a.png")).unwrap();
        RgbImage::from_pixel(5, 7, Rgb([10, 200, 10])).save(dir.join("b.png")).unwrap();
        let images = vec![label_image(&dir, "a.png"), label_image(&dir, "b.png")];
        let teacher = counting_teacher();
        let cache = dir.join("cache");
        let first = label_images(&teacher, &images, &cache, Verbosity::Quiet, "labelling").unwrap();
        assert_eq!((first.computed, first.reused, first.skipped.len(), teacher.calls.get()), (2, 0, 0, 2));
        assert_eq!((first.images[1].width, first.images[1].height), (5, 7));
        assert!(cache.join("counting-teacher").is_dir());
        let second = label_images(&teacher, &images, &cache, Verbosity::Quiet, "labelling").unwrap();
        assert_eq!((second.computed, second.reused, teacher.calls.get()), (0, 2, 2));
        assert_eq!(second.images, first.images);
        // Prompts are part of the key: the same image with boxes is labelled anew.
        let prompted = vec![LabelImage {
            prompts: vec![Prompt { annotation_id: 7, class: 0, bbox: [0.0, 0.0, 4.0, 4.0] }],
            ..label_image(&dir, "a.png")
        }];
        let third = label_images(&teacher, &prompted, &cache, Verbosity::Quiet, "segmenting").unwrap();
        assert_eq!((third.computed, teacher.calls.get()), (1, 3));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unreadable_images_are_skipped_and_recorded() {
        let dir = scratch("corrupt");
        RgbImage::from_pixel(4, 4, Rgb([1, 2, 3])).save(dir.join("good.png")).unwrap();
        std::fs::write(dir.join("bad.png"), b"not an image").unwrap();
        let images = vec![label_image(&dir, "bad.png"), label_image(&dir, "good.png"), label_image(&dir, "gone.png")];
        let teacher = counting_teacher();
        let pass = label_images(&teacher, &images, &dir.join("cache"), Verbosity::Quiet, "labelling").unwrap();
        assert_eq!((pass.computed, pass.images.len(), teacher.calls.get()), (1, 1, 1));
        assert_eq!(pass.images[0].file_name, "good.png");
        let skipped: Vec<&Path> = pass.skipped.iter().map(|(p, _)| p.as_path()).collect();
        assert_eq!(skipped, vec![dir.join("bad.png").as_path(), dir.join("gone.png").as_path()]);
        assert!(pass.skipped[0].1.contains("decode"), "{:?}", pass.skipped);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn teacher_dataset_round_trips_through_the_detection_dataset() {
        let dir = scratch("dataset");
        RgbImage::from_pixel(20, 10, Rgb([9, 9, 9])).save(dir.join("x.png")).unwrap();
        RgbImage::from_pixel(6, 6, Rgb([9, 9, 9])).save(dir.join("y.png")).unwrap();
        let mut mask = BinaryMask::zeros(20, 10);
        for x in 2..6 {
            mask.data[3 * 20 + x] = 1;
        }
        let soft = SoftMask { region: [1.0, 1.0, 9.0, 6.0], width: 1, height: 1, data: vec![200] };
        let masked = TeacherInstance {
            mask: Some(Rle::encode(&mask)),
            soft_mask: Some(soft.clone()),
            ..instance(1, [2.0, 3.0, 6.0, 4.0], 0.8)
        };
        let images = vec![
            LabelledImage {
                features: None,
                path: dir.join("x.png"),
                file_name: "x.png".into(),
                width: 20,
                height: 10,
                prompts: Vec::new(),
                instances: vec![masked, instance(0, [10.0, 2.0, 18.0, 9.0], 0.6)],
            },
            LabelledImage {
                features: None,
                path: dir.join("y.png"),
                file_name: "y.png".into(),
                width: 6,
                height: 6,
                prompts: Vec::new(),
                instances: Vec::new(),
            },
        ];
        let classes = vec!["cat".to_string(), "dog".to_string()];
        let (dataset, signals) = teacher_dataset(&images, &classes, &[3, 8]);
        assert_eq!(dataset.images.iter().map(|i| i.id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(dataset.class_names(), classes);
        let ids: Vec<(u64, u64, u64)> = dataset.annotations.iter().map(|a| (a.id, a.image_id, a.category_id)).collect();
        assert_eq!(ids, vec![(1, 1, 8), (2, 1, 3)]);
        assert_eq!(dataset.annotations[0].bbox, Some([2.0, 3.0, 4.0, 1.0]));
        assert_eq!(dataset.annotations[0].area, Some(4.0));
        assert!(matches!(dataset.annotations[0].segmentation, Some(Segmentation::Rle(_))));
        assert_eq!(dataset.annotations[1].segmentation, None);
        assert_eq!(signals[&1], TeacherSignal { class_probs: Some(vec![0.05, 0.8]), soft_mask: Some(soft) });
        assert_eq!(signals[&2].soft_mask, None);

        let detection = CocoDetectionDataset::new(dataset, &dir).with_signals(signals);
        let item = detection.load(0).unwrap();
        assert_eq!(item.instances.len(), 2);
        assert_eq!((item.instances[0].class, item.instances[0].bbox), (1, [2.0, 3.0, 6.0, 4.0]));
        assert_eq!(item.instances[0].teacher.as_ref().unwrap().class_probs, Some(vec![0.05, 0.8]));
        let decoded = item.instances[0].segmentation.as_ref().unwrap().to_rle(10, 20).unwrap().decode();
        assert_eq!(decoded, mask);
        assert!(detection.load(1).unwrap().instances.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn prompt_signals_follow_the_prompts() {
        let soft = SoftMask { region: [0.0, 0.0, 4.0, 4.0], width: 1, height: 1, data: vec![255] };
        let image = LabelledImage {
            features: None,
            path: PathBuf::from("a.png"),
            file_name: "a.png".into(),
            width: 4,
            height: 4,
            prompts: vec![
                Prompt { annotation_id: 11, class: 0, bbox: [0.0, 0.0, 2.0, 2.0] },
                Prompt { annotation_id: 12, class: 1, bbox: [1.0, 1.0, 3.0, 3.0] },
            ],
            instances: vec![
                instance(0, [0.0, 0.0, 2.0, 2.0], 1.0),
                TeacherInstance { soft_mask: Some(soft.clone()), ..instance(1, [1.0, 1.0, 3.0, 3.0], 1.0) },
            ],
        };
        let signals = prompt_signals(&[image]);
        assert_eq!(signals.len(), 1);
        assert_eq!(signals[&12], TeacherSignal { class_probs: None, soft_mask: Some(soft) });
    }

    #[test]
    fn coverage_fails_when_nothing_is_found_and_warns_when_little_is() {
        let config = DistillConfig { empty_warning: 0.5, ..DistillConfig::default() };
        let image = |instances: Vec<TeacherInstance>| LabelledImage {
            features: None,
            path: PathBuf::from("a.png"),
            file_name: "a.png".into(),
            width: 4,
            height: 4,
            prompts: Vec::new(),
            instances,
        };
        let pass = |images: Vec<LabelledImage>| LabelPass { images, ..LabelPass::default() };
        let found = || vec![instance(0, [0.0, 0.0, 2.0, 2.0], 0.9)];

        let none = coverage(&pass(vec![image(Vec::new()), image(Vec::new())]), &config, "GroundingDINO tiny", None);
        let message = none.unwrap_err().to_string();
        assert!(message.contains("GroundingDINO tiny") && message.contains("box_threshold"), "{message}");

        let sparse =
            coverage(&pass(vec![image(Vec::new()), image(Vec::new()), image(found())]), &config, "t", None).unwrap();
        assert!(sparse.is_some_and(|w| w.contains("2 of the 3")));

        let choice =
            ThresholdChoice { threshold: 0.3, f1: 0.5, precision: 0.5, recall: 0.5, labels: 4, matched: 2, objects: 4 };
        let chosen = config.with_threshold(choice.threshold);
        let two_empty = pass(vec![image(Vec::new()), image(Vec::new()), image(found())]);
        let auto = coverage(&two_empty, &chosen, "t", Some(&choice)).unwrap().unwrap();
        assert!(auto.contains("auto chose, 0.300") && auto.contains("distill.box_threshold=0.15"), "{auto}");
        assert_eq!(coverage(&pass(vec![image(Vec::new()), image(found())]), &config, "t", None).unwrap(), None);
        assert_eq!(coverage(&pass(Vec::new()), &config, "t", None).unwrap(), None);
    }

    #[test]
    fn naming_accuracy_is_the_share_of_found_objects_named_right_above_chance() {
        let truth = [
            Prompt { annotation_id: 1, class: 0, bbox: [0.0, 0.0, 10.0, 10.0] },
            Prompt { annotation_id: 2, class: 1, bbox: [20.0, 20.0, 30.0, 30.0] },
            Prompt { annotation_id: 3, class: 1, bbox: [40.0, 0.0, 50.0, 10.0] },
        ];
        let found = [
            instance(0, [0.0, 0.0, 10.0, 10.0], 0.9),   // finds object 1, names it right
            instance(0, [20.0, 20.0, 30.0, 29.0], 0.8), // finds object 2, names it wrong
            instance(1, [20.0, 20.0, 31.0, 30.0], 0.7), // a duplicate on object 2: not counted
            instance(1, [40.0, 0.0, 50.0, 11.0], 0.65), // finds object 3, names it right
            instance(1, [50.0, 50.0, 60.0, 60.0], 0.6), // finds nothing: not counted
            instance(1, [0.0, 0.0, 10.0, 10.0], 0.01),  // below the threshold
        ];
        // Seven such images: 21 objects located, enough to judge.
        let images = [(&found[..], &truth[..]); 7];
        let four = naming_accuracy(&images, 0.5, 4);
        assert_eq!((four.located, four.named, four.classes), (21, 14, 4));
        assert!((four.accuracy - 2.0 / 3.0).abs() < 1e-12);
        // (2/3 - 1/4) / (3/4)
        assert!((four.weight - 5.0 / 9.0).abs() < 1e-6, "{four:?}");
        // (2/3 - 1/2) / (1/2)
        assert!((naming_accuracy(&images, 0.5, 2).weight - 1.0 / 3.0).abs() < 1e-6);
        // At chance or below the class scores teach nothing.
        assert_eq!(naming_accuracy(&[(&found[1..2], &truth[..]); 20], 0.5, 2).weight, 0.0);
        // One image: 3 objects located are too few to judge; the class scores keep their weight.
        let one = naming_accuracy(&images[..1], 0.5, 4);
        assert_eq!((one.located, one.weight), (3, 1.0));
        assert_eq!(naming_accuracy(&[(&found[1..2], &truth[..]); 19], 0.5, 2).weight, 1.0);
        // One class: nothing to name wrong. Nothing located: no evidence of naming at all.
        assert_eq!(naming_accuracy(&images, 0.5, 1).weight, 1.0);
        let nothing = naming_accuracy(&[(&found[4..5], &truth[..])], 0.5, 4);
        assert_eq!((nothing.located, nothing.accuracy, nothing.weight), (0, 0.0, 0.0));
    }
}
