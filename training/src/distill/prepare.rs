//! Everything a distilled student run needs before its first epoch: the teacher opened from its
//! directory, its labels on the unlabelled images (and its masks on the labelled ones' boxes),
//! computed once and cached, checked for coverage, written for the user to look at, and turned
//! into training data. Recorded in the run as `distillation_config.yaml`.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::Serialize;

use super::labels::{
    LabelImage, LabelPass, Prompt, coverage, label_images, prompt_signals, teacher_dataset, write_teacher_labels,
};
use super::teacher::{TeacherWeights, open_teacher};
use super::{DistillConfig, TeacherData, TeacherLabelled};
use crate::engine::Verbosity;
use crate::error::AtPath;
use crate::error::TrainError;
use crate::split::StudentData;
use kiln_data::batch::FeatureMap;
use std::collections::HashMap;

/// Where the teachers and the unlabelled images are.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DistillRequest {
    /// An experiment (`experiments/NAME`, with `teachers/`), a teachers directory, or a trained kiln
    /// student (its run directory or weights file).
    pub teachers: PathBuf,
    /// Unlabelled images: a directory, or a COCO JSON whose images are used (annotations ignored).
    pub unlabeled: Option<PathBuf>,
    /// The directory a COCO JSON's `file_name`s are relative to (`--images`; by default as
    /// `kiln validate` finds it).
    pub images: Option<PathBuf>,
    /// Base weights replacing the ones the adapters recorded.
    pub grounding_dino_weights: Option<PathBuf>,
    pub sam_weights: Option<PathBuf>,
}

/// `distillation_config.yaml`: what taught the student, with what, on what.
#[derive(Debug, Clone, Serialize)]
pub struct DistillationRecord {
    pub teacher: String,
    pub teachers_dir: PathBuf,
    /// The key of the teacher's label cache: a hash of its weights, adapters, classes and thresholds.
    pub teacher_fingerprint: String,
    /// Class index → name and COCO category id, from the data (the teacher's classes are the same).
    pub classes: Vec<ClassEntry>,
    pub unlabeled: Option<PathBuf>,
    /// The directory the unlabelled COCO file's `file_name`s were read from, when given.
    pub images: Option<PathBuf>,
    pub label_cache: PathBuf,
    pub labelled_images: usize,
    pub unlabelled_images: usize,
    /// Teacher labels on the unlabelled images (after thresholds and NMS).
    pub teacher_labels: usize,
    /// Unlabelled images the teacher found nothing on.
    pub empty_images: usize,
    /// Images that could not be read or decoded, skipped (path: why).
    pub skipped: Vec<String>,
    pub labels_computed: usize,
    pub labels_reused: usize,
    pub labelling_seconds: f64,
    /// The loss weights and teacher-label settings.
    pub distill: DistillConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassEntry {
    pub index: usize,
    pub name: String,
    pub category_id: u64,
}

/// The teachers' contribution to a run, and what to tell the user.
pub struct Distillation {
    pub data: TeacherData,
    pub record: DistillationRecord,
    pub warnings: Vec<String>,
}

/// The file a distilled run records its teachers in.
pub const DISTILLATION_CONFIG: &str = "distillation_config.yaml";

/// Opens the teacher, labels what it can label (cached under the teacher's `label_cache/`), writes
/// `teacher_labels.json` and `teacher_labels.jpg` into `run_dir`, and returns the training data.
pub fn prepare_distillation(
    request: &DistillRequest,
    config: &DistillConfig,
    data: &StudentData,
    run_dir: &Path,
    device: &Device,
    verbosity: Verbosity,
) -> Result<Distillation, TrainError> {
    let classes = data.train.class_names();
    let category_ids = data.train.class_ids();
    let weights =
        TeacherWeights { grounding_dino: request.grounding_dino_weights.clone(), sam: request.sam_weights.clone() };
    let teacher = open_teacher(&request.teachers, &classes, config, &weights, device)?;
    let label_cache = label_cache_dir(&request.teachers);
    let mut warnings = Vec::new();

    let unlabelled = match &request.unlabeled {
        Some(source) => unlabelled_images(source, request.images.as_deref())?,
        None => Vec::new(),
    };
    if !unlabelled.is_empty() && !teacher.finds_objects() {
        warnings.push(format!(
            "{} only segments given boxes, so the {} unlabelled images teach nothing: add a GroundingDINO \
             teacher (`kiln train-teacher` on data with boxes) to label them",
            teacher.describe(),
            unlabelled.len()
        ));
    }
    let unlabelled_pass = if teacher.finds_objects() && !unlabelled.is_empty() {
        let pass = label_images(teacher.as_ref(), &unlabelled, &label_cache, verbosity, "labelling")?;
        if pass.images.is_empty() {
            let (path, why) = &pass.skipped[0];
            return Err(TrainError::Config(format!(
                "none of the {} unlabelled images could be read (the first, {}: {why}); check --unlabeled \
                 (and --images, the directory a COCO file's file_names are relative to)",
                pass.skipped.len(),
                path.display()
            )));
        }
        if let Some(warning) = coverage(&pass, config, &teacher.describe())? {
            warnings.push(warning);
        }
        Some(pass)
    } else {
        None
    };

    // A teacher that makes masks segments the labelled images' boxes too (mask distillation
    // there), and one that makes features gives their feature maps.
    let labelled_pass = if teacher.segments_boxes() || teacher.makes_features() {
        let index = data.train.class_index();
        let by_image = data.train.annotations_by_image();
        let images: Vec<LabelImage> = data
            .train
            .images
            .iter()
            .zip(&by_image)
            .map(|(image, annotations)| LabelImage {
                path: data.train_images.join(&image.file_name),
                file_name: image.file_name.clone(),
                prompts: annotations
                    .iter()
                    .map(|&a| &data.train.annotations[a])
                    .filter(|a| a.iscrowd == 0)
                    .filter_map(|a| {
                        let class = *index.get(&a.category_id)?;
                        let [x, y, w, h] = a.bbox?;
                        (w > 0.0 && h > 0.0).then_some(Prompt {
                            annotation_id: a.id,
                            class,
                            bbox: [x, y, x + w, y + h],
                        })
                    })
                    .collect(),
            })
            .filter(|image| teacher.makes_features() || !image.prompts.is_empty())
            .collect();
        Some(label_images(teacher.as_ref(), &images, &label_cache, verbosity, "segmenting")?)
    } else {
        None
    };

    let empty = LabelPass { images: Vec::new(), computed: 0, reused: 0, skipped: Vec::new(), seconds: 0.0 };
    let shown = unlabelled_pass.as_ref().or(labelled_pass.as_ref()).unwrap_or(&empty);
    write_teacher_labels(run_dir, shown, &classes, &category_ids)?;

    let mut skipped = Vec::new();
    for pass in [&unlabelled_pass, &labelled_pass].into_iter().flatten() {
        skipped.extend(pass.skipped.iter().map(|(path, why)| format!("{}: {why}", path.display())));
    }
    if !skipped.is_empty() {
        warnings.push(format!(
            "{} images could not be read and were skipped (listed in {DISTILLATION_CONFIG}); the first: {}",
            skipped.len(),
            skipped[0]
        ));
    }
    let unlabelled_dataset = match (&unlabelled_pass, &request.unlabeled) {
        (Some(pass), Some(_)) if !pass.images.is_empty() => {
            let (dataset, signals) = teacher_dataset(&pass.images, &classes, &category_ids);
            // `teacher_dataset` numbers the images from 1 in the pass's order.
            let features = pass
                .images
                .iter()
                .enumerate()
                .filter_map(|(i, image)| Some((i as u64 + 1, image.features.clone()?)))
                .collect();
            Some(TeacherLabelled { dataset, images_dir: unlabelled_root(&unlabelled), signals, features })
        }
        _ => None,
    };
    let labelled_features = match &labelled_pass {
        Some(pass) => {
            let ids: HashMap<&str, u64> = data.train.images.iter().map(|i| (i.file_name.as_str(), i.id)).collect();
            pass.images
                .iter()
                .filter_map(|image| Some((*ids.get(image.file_name.as_str())?, image.features.clone()?)))
                .collect()
        }
        None => HashMap::new(),
    };
    let feature_channels = match [&unlabelled_pass, &labelled_pass]
        .into_iter()
        .flatten()
        .flat_map(|p| &p.images)
        .find_map(|i| i.features.as_ref())
    {
        Some(file) => {
            let bytes = std::fs::read(file).at(file)?;
            Some(FeatureMap::from_bytes(&bytes, file)?.channels as usize)
        }
        None => None,
    };
    let pass_figures =
        |pass: &Option<LabelPass>| pass.as_ref().map_or((0, 0, 0.0), |p| (p.computed, p.reused, p.seconds));
    let (computed_u, reused_u, seconds_u) = pass_figures(&unlabelled_pass);
    let (computed_l, reused_l, seconds_l) = pass_figures(&labelled_pass);
    let record = DistillationRecord {
        teacher: teacher.describe(),
        teachers_dir: request.teachers.clone(),
        teacher_fingerprint: teacher.fingerprint(),
        classes: classes
            .iter()
            .zip(&category_ids)
            .enumerate()
            .map(|(index, (name, &category_id))| ClassEntry { index, name: name.clone(), category_id })
            .collect(),
        unlabeled: request.unlabeled.clone(),
        images: request.images.clone(),
        label_cache,
        labelled_images: data.train.images.len(),
        unlabelled_images: unlabelled_pass.as_ref().map_or(0, |p| p.images.len()),
        teacher_labels: unlabelled_pass.as_ref().map_or(0, |p| p.images.iter().map(|i| i.instances.len()).sum()),
        empty_images: unlabelled_pass
            .as_ref()
            .map_or(0, |p| p.images.iter().filter(|i| i.instances.is_empty()).count()),
        skipped,
        labels_computed: computed_u + computed_l,
        labels_reused: reused_u + reused_l,
        labelling_seconds: seconds_u + seconds_l,
        distill: *config,
    };
    let data = TeacherData {
        unlabelled: unlabelled_dataset,
        labelled_signals: labelled_pass.as_ref().map(|p| prompt_signals(&p.images)).unwrap_or_default(),
        labelled_features,
        feature_channels,
    };
    Ok(Distillation { data, record, warnings })
}

/// Teacher labels are cached beside the teacher, so every run taught by it (resumed, or another
/// run such as an ablation) reuses them: `<teachers>/label_cache/<fingerprint>/<image hash>.json`.
pub fn label_cache_dir(teachers: &Path) -> PathBuf {
    let root = if teachers.is_file() { teachers.parent().unwrap_or(Path::new(".")) } else { teachers };
    root.join("label_cache")
}

/// The unlabelled images of a directory (every image file in it) or of a COCO JSON's image list.
fn unlabelled_images(source: &Path, images: Option<&Path>) -> Result<Vec<LabelImage>, TrainError> {
    if source.is_dir() {
        let files = kiln_data::io::list_images(source)?;
        if files.is_empty() {
            return Err(TrainError::Config(format!(
                "{}: no images (.jpg, .png, ...) in the --unlabeled directory",
                source.display()
            )));
        }
        return Ok(files
            .into_iter()
            .map(|path| LabelImage {
                file_name: path.strip_prefix(source).unwrap_or(&path).to_string_lossy().into_owned(),
                path,
                prompts: Vec::new(),
            })
            .collect());
    }
    let loaded = kiln_data::load_dataset(source, images)?;
    Ok(loaded
        .dataset
        .images
        .iter()
        .map(|image| LabelImage {
            path: loaded.images_dir.join(&image.file_name),
            file_name: image.file_name.clone(),
            prompts: Vec::new(),
        })
        .collect())
}

/// The directory the unlabelled images' `file_name`s are relative to.
fn unlabelled_root(images: &[LabelImage]) -> PathBuf {
    images
        .first()
        .and_then(|image| {
            let mut root = image.path.clone();
            for _ in Path::new(&image.file_name).components() {
                root.pop();
            }
            Some(root)
        })
        .unwrap_or_default()
}
