//! Everything a distilled student run needs before its first epoch: the teacher opened from its
//! directory, its labels on the unlabelled images (and its masks on the labelled ones' boxes),
//! computed once and cached, checked for coverage, written for the user to look at, and turned
//! into training data. Recorded in the run as `distillation_config.yaml`.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::Serialize;

use super::labels::{
    LabelImage, LabelPass, NamingAccuracy, Prompt, ThresholdChoice, best_f1_threshold, coverage, label_images,
    naming_accuracy, prompt_signals, teacher_dataset, write_teacher_labels,
};
use super::teacher::{TeacherWeights, open_teacher};
use super::{AUTO_THRESHOLD_FLOOR, DistillConfig, TeacherData, TeacherInstance, TeacherLabelled, ValueOrAuto};
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
    /// Labels computed and reused, over every pass: the unlabelled images, the labelled ones'
    /// masks and features, and (for `auto` settings) the check of the teacher on the labelled images.
    pub labels_computed: usize,
    pub labels_reused: usize,
    pub labelling_seconds: f64,
    /// The loss weights and teacher-label settings.
    pub distill: DistillConfig,
    /// With `box_threshold: auto`: the threshold chosen and the teacher's F1 there.
    pub threshold_choice: Option<ThresholdChoice>,
    /// With `logit: auto`: how well the teacher names what it finds, and the weight chosen.
    pub naming: Option<NamingAccuracy>,
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
    /// What the run decided from the data (the `auto` threshold), to show the user.
    pub notes: Vec<String>,
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
    let mut notes = Vec::new();

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
    let labels_unlabelled = teacher.finds_objects() && !unlabelled.is_empty();
    // `auto` settings are chosen from the teacher's own labels on the labelled images.
    let chooses = matches!(config.box_threshold, ValueOrAuto::Auto) || matches!(config.logit, ValueOrAuto::Auto);
    let on_labelled = match labels_unlabelled && chooses {
        true => Some(unprompted_on_labelled(teacher.as_ref(), data, &label_cache, verbosity)?),
        false => None,
    };
    let (computed_c, reused_c, seconds_c) =
        on_labelled.as_ref().map_or((0, 0, 0.0), |c| (c.computed, c.reused, c.seconds));
    let on_labelled = on_labelled.map(|checked| checked.pairs);
    let scored: Vec<(&[TeacherInstance], &[Prompt])> =
        on_labelled.iter().flatten().map(|(found, truth)| (found.as_slice(), truth.as_slice())).collect();
    let threshold_choice = match config.box_threshold {
        ValueOrAuto::Auto if on_labelled.is_some() => {
            let choice = best_f1_threshold(&scored, AUTO_THRESHOLD_FLOOR).ok_or_else(|| {
                TrainError::Config(format!(
                    "distill.box_threshold auto chooses the threshold on the labelled images' boxes, and none of \
                     the {} could be read or has a box: set a value (`--set distill.box_threshold=0.25`)",
                    data.train.images.len()
                ))
            })?;
            notes.push(format!(
                "distill.box_threshold auto: {:.3}, where the teacher's labels on the {} labelled images reach \
                 their best F1 {:.3} (precision {:.3}, recall {:.3}: {} of {} labels match one of {} objects)",
                choice.threshold,
                data.train.images.len(),
                choice.f1,
                choice.precision,
                choice.recall,
                choice.matched,
                choice.labels,
                choice.objects
            ));
            if choice.matched == 0 {
                warnings.push(format!(
                    "distill.box_threshold auto: the teacher ({}) finds none of the {} objects of the labelled \
                     images (IoU 0.5, same class), so its labels are kept down to the floor {}: train the teachers \
                     longer or set a threshold (`--set distill.box_threshold=0.25`)",
                    teacher.describe(),
                    choice.objects,
                    AUTO_THRESHOLD_FLOOR
                ));
            }
            Some(choice)
        }
        _ => None,
    };
    // What the labels are filtered at: the choice, or the settings as given.
    let mut effective = threshold_choice.map_or(*config, |choice| config.with_threshold(choice.threshold));
    let naming = match config.logit {
        ValueOrAuto::Auto if on_labelled.is_some() => {
            let naming = naming_accuracy(&scored, effective.labelling_box_threshold(), classes.len());
            notes.push(format!(
                "distill.logit auto: {:.3}, the teacher's naming above chance: of the objects of the labelled \
                 images it finds ({}), it names {} right ({:.1} %; chance {:.1} % with {} classes){}",
                naming.weight,
                naming.located,
                naming.named,
                100.0 * naming.accuracy,
                100.0 / classes.len().max(1) as f64,
                classes.len(),
                if naming.located > 0 && naming.located < super::labels::NAMING_MIN_LOCATED && classes.len() > 1 {
                    format!(
                        ": fewer than {} found, too few to judge, so full weight",
                        super::labels::NAMING_MIN_LOCATED
                    )
                } else {
                    String::new()
                }
            ));
            Some(naming)
        }
        _ => None,
    };
    // Without labels on unlabelled images the logit distillation has no anchors to act on.
    effective.logit = ValueOrAuto::Value(match (config.logit, naming) {
        (ValueOrAuto::Value(weight), _) => weight,
        (ValueOrAuto::Auto, Some(naming)) => naming.weight,
        (ValueOrAuto::Auto, None) => 0.0,
    });
    let unlabelled_pass = if labels_unlabelled {
        let mut pass = label_images(teacher.as_ref(), &unlabelled, &label_cache, verbosity, "labelling")?;
        if let Some(choice) = threshold_choice {
            for image in &mut pass.images {
                image.instances.retain(|instance| instance.score >= choice.threshold);
            }
        }
        if pass.images.is_empty() {
            let (path, why) = &pass.skipped[0];
            return Err(TrainError::Config(format!(
                "none of the {} unlabelled images could be read (the first, {}: {why}); check --unlabeled \
                 (and --images, the directory a COCO file's file_names are relative to)",
                pass.skipped.len(),
                path.display()
            )));
        }
        if let Some(warning) = coverage(&pass, &effective, &teacher.describe(), threshold_choice.as_ref())? {
            warnings.push(warning);
        }
        Some(pass)
    } else {
        None
    };

    // A teacher that makes masks segments the labelled images' boxes too (mask distillation
    // there), and one that makes features gives their feature maps.
    let labelled_pass = if teacher.segments_boxes() || teacher.makes_features() {
        let images: Vec<LabelImage> = labelled_images(data)?
            .into_iter()
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
        labels_computed: computed_u + computed_l + computed_c,
        labels_reused: reused_u + reused_l + reused_c,
        labelling_seconds: seconds_u + seconds_l + seconds_c,
        distill: *config,
        threshold_choice,
        naming,
    };
    let data = TeacherData {
        unlabelled: unlabelled_dataset,
        labelled_signals: labelled_pass.as_ref().map(|p| prompt_signals(&p.images)).unwrap_or_default(),
        labelled_features,
        feature_channels,
        logit_weight: effective.logit_weight().ok(),
    };
    Ok(Distillation { data, record, warnings, notes })
}

/// The labelled training images with their ground-truth boxes as prompts (crowd and empty boxes
/// left out), in the data's order.
fn labelled_images(data: &StudentData) -> Result<Vec<LabelImage>, TrainError> {
    let index = data.train.class_index();
    let by_image = data.train.annotations_by_image();
    let mut images = Vec::with_capacity(data.train.images.len());
    for (image, annotations) in data.train.images.iter().zip(&by_image) {
        let what = format!("image {}", image.id);
        images.push(LabelImage {
            path: kiln_data::paths::inside(&data.train_images, &image.file_name, &what)?,
            file_name: image.file_name.clone(),
            prompts: annotations
                .iter()
                .map(|&a| &data.train.annotations[a])
                .filter(|a| a.iscrowd == 0)
                .filter_map(|a| {
                    let class = *index.get(&a.category_id)?;
                    let [x, y, w, h] = a.bbox?;
                    (w > 0.0 && h > 0.0).then_some(Prompt { annotation_id: a.id, class, bbox: [x, y, x + w, y + h] })
                })
                .collect(),
        });
    }
    Ok(images)
}

/// The `auto` settings' evidence: the teacher finds objects on the labelled images without their
/// boxes (cached like any labels), beside each image's ground truth. The teachers were tuned on
/// these images, so what they show leans optimistic (more precise than on new images); they are
/// still the only images whose truth a run may use.
fn unprompted_on_labelled(
    teacher: &dyn crate::distill::Teacher,
    data: &StudentData,
    label_cache: &Path,
    verbosity: Verbosity,
) -> Result<CheckedTeacher, TrainError> {
    let truth = labelled_images(data)?;
    let unprompted: Vec<LabelImage> =
        truth.iter().map(|image| LabelImage { prompts: Vec::new(), ..image.clone() }).collect();
    let pass = label_images(teacher, &unprompted, label_cache, verbosity, "checking the teacher")?;
    let mut prompts: HashMap<String, Vec<Prompt>> =
        truth.into_iter().map(|image| (image.file_name, image.prompts)).collect();
    let (computed, reused, seconds) = (pass.computed, pass.reused, pass.seconds);
    let pairs = pass
        .images
        .into_iter()
        .filter_map(|image| Some((image.instances, prompts.remove(&image.file_name)?)))
        .collect();
    Ok(CheckedTeacher { pairs, computed, reused, seconds })
}

/// The teacher's unprompted labels on the labelled images beside their truth, and what the pass
/// cost (counted in the run's labelling figures).
struct CheckedTeacher {
    pairs: Vec<(Vec<TeacherInstance>, Vec<Prompt>)>,
    computed: usize,
    reused: usize,
    seconds: f64,
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
    loaded
        .dataset
        .images
        .iter()
        .map(|image| {
            let what = format!("image {} of {}", image.id, source.display());
            Ok(LabelImage {
                path: kiln_data::paths::inside(&loaded.images_dir, &image.file_name, &what)?,
                file_name: image.file_name.clone(),
                prompts: Vec::new(),
            })
        })
        .collect::<Result<_, kiln_data::DataError>>()
        .map_err(TrainError::from)
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
