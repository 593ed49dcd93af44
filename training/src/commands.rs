//! The library side of `kiln train-student`, `kiln eval` and `kiln infer`: the config from
//! defaults + data + overrides, the run directory, `metadata.json`, loading a trained student (as
//! the embeddable `Detector`), evaluating it, running it on images, and the tables the CLI prints.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use kiln_data::batch::{CocoDetectionDataset, DetectionBatcher};
use kiln_data::coco::CocoDataset;
use kiln_data::io::{ResultCategory, ResultImage, ResultsDocument, StagedOutput};
use kiln_models::Detector;
use kiln_models::yolo::predict::PredictOptions;
use kiln_models::yolo::{Task, YoloConfig};
use serde::Serialize;

use crate::characteristics::Characteristics;
use crate::distill::DistillConfig;
use crate::distill::prepare::{DISTILLATION_CONFIG, DistillRequest, prepare_distillation};
use crate::engine::Verbosity;
use crate::engine::memory::MemoryEstimate;
use crate::error::TrainError;
use crate::eval::{CocoEvaluation, IouType, evaluate};
use crate::optim::OptimizerKind;
use crate::run::{StudentConfig, TrainOptions, TrainSummary, to_coco_results, train_student_with};
use crate::split::{StudentData, load_student_data};

/// What the user may override on the command line (everything else: `configs/student.yaml`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StudentOverrides {
    pub model: Option<String>,
    pub weights: Option<PathBuf>,
    pub epochs: Option<usize>,
    pub batch_size: Option<usize>,
    pub imgsz: Option<u32>,
    pub optimizer: Option<OptimizerKind>,
    pub lr0: Option<f64>,
    pub patience: Option<usize>,
    pub seed: Option<u64>,
    pub close_mosaic: Option<usize>,
    /// What the convolutions compute in (mixed precision).
    pub precision: Option<crate::run::Precision>,
    /// The objects and their scene, choosing the augmentation (`crate::characteristics`).
    pub characteristics: Characteristics,
    /// Settings between the defaults and the flags (`crate::presets`).
    pub preset: Option<crate::presets::Preset>,
    /// Any other setting of `student_config.yaml` as `key=value` (nested keys with dots, e.g.
    /// `augment.mosaic=0`), applied last.
    pub set: Vec<String>,
}

/// Applies `key=value` settings (the key a dotted path into the config's YAML, the value YAML) to
/// `config`; an unknown key or a value of the wrong type is an error naming it.
pub fn apply_settings<T: Serialize + serde::de::DeserializeOwned>(config: T, settings: &[String]) -> Result<T, String> {
    if settings.is_empty() {
        return Ok(config);
    }
    let mut tree = serde_yaml::to_value(&config).map_err(|e| e.to_string())?;
    for setting in settings {
        let (key, value) = setting
            .split_once('=')
            .ok_or_else(|| format!("--set {setting:?}: expected KEY=VALUE, e.g. augment.mosaic=0"))?;
        let value: serde_yaml::Value =
            serde_yaml::from_str(value).map_err(|e| format!("--set {setting:?}: the value is not YAML: {e}"))?;
        let mut node = &mut tree;
        for part in key.trim().split('.') {
            let known =
                node.as_mapping().map(|m| m.keys().filter_map(|k| k.as_str().map(str::to_owned)).collect::<Vec<_>>());
            node = match node.get_mut(part) {
                Some(child) => child,
                None => {
                    return Err(format!(
                        "--set {setting:?}: no setting {key:?}{}",
                        known.map_or(String::new(), |k| format!(" (known here: {})", k.join(", ")))
                    ));
                }
            };
        }
        *node = value;
    }
    serde_yaml::from_value(tree).map_err(|e| format!("--set {}: {e}", settings.join(" ")))
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainStudentRequest {
    pub train: PathBuf,
    pub val: PathBuf,
    pub images: Option<PathBuf>,
    pub output: PathBuf,
    pub resume: bool,
    /// The device in words (`kiln_models::device::describe`: the GPU adapter and its graphics
    /// API), recorded in `metadata.json`.
    pub device_name: String,
    pub overrides: StudentOverrides,
    /// Teachers to distil (with the unlabelled images they label); none: labels only.
    pub distill: Option<DistillRequest>,
    /// Build the run, estimate its memory and stop: nothing trained, nothing written.
    pub dry_run: bool,
}

/// Defaults, then what the data says (student, classes), then the overrides. A distilled run
/// (`distilling`) starts from `configs/distill.yaml` too, so `--set distill.KEY=VALUE` reaches it.
pub fn student_config(
    data: &StudentData,
    summary: &kiln_data::DatasetSummary,
    o: &StudentOverrides,
    distilling: bool,
) -> Result<StudentConfig, TrainError> {
    let mut config = StudentConfig::default();
    config.distill = distilling.then(DistillConfig::default);
    if let Some(preset) = o.preset {
        config.apply_preset(preset);
    }
    config.model = match &o.model {
        Some(model) => model.clone(),
        None => summary.recommendation().map(|r| r.student).ok_or_else(|| {
            TrainError::Config("the training set has neither boxes nor masks: nothing to learn".into())
        })?,
    };
    let parsed: YoloConfig = config.model.parse().map_err(TrainError::Config)?;
    if parsed.task == Task::Segment && !summary.has_masks {
        return Err(TrainError::Config(format!(
            "{} predicts masks but the training set has none: use a detection model such as yolov8n",
            config.model
        )));
    }
    config.classes = data.train.class_names();
    config.category_ids = data.train.class_ids();
    if config.model.starts_with("fastsam") && config.classes.len() != 1 {
        return Err(TrainError::Config(format!(
            "FastSAM segments one class, but the data has {}: use yolov8n-seg",
            config.classes.len()
        )));
    }
    config.weights = o.weights.clone().or(config.weights);
    config.epochs = o.epochs.unwrap_or(config.epochs);
    config.batch_size = o.batch_size.unwrap_or(config.batch_size);
    config.imgsz = o.imgsz.unwrap_or(config.imgsz);
    config.optimizer = o.optimizer.unwrap_or(config.optimizer);
    config.lr0 = o.lr0.unwrap_or(config.lr0);
    config.patience = o.patience.unwrap_or(config.patience);
    config.seed = o.seed.unwrap_or(config.seed);
    config.close_mosaic = o.close_mosaic.unwrap_or(config.close_mosaic);
    config.precision = o.precision.unwrap_or(config.precision);
    // Defaults, then the characteristics' recipe, then `--set augment.KEY=VALUE`.
    config.augment = o.characteristics.recipe(config.augment);
    config.characteristics = o.characteristics.clone();
    let config = apply_settings(config, &o.set).map_err(TrainError::Config)?;
    if config.epochs == 0 || config.batch_size == 0 {
        return Err(TrainError::Config("--epochs and --batch-size must be at least 1".into()));
    }
    Ok(config)
}

/// Runs `kiln train-student`. A new run needs a new (or empty) output directory; `resume`
/// continues the run already there with its own saved config.
pub fn run_train_student(
    request: &TrainStudentRequest,
    device: Device,
    verbosity: Verbosity,
) -> Result<(StudentConfig, TrainSummary), TrainError> {
    run_train_student_on(request, &[device], verbosity)
}

/// [`run_train_student`] on several devices together (`--device cuda:0,1`): each takes a share of
/// every step's batches (`crate::engine`'s data parallelism); the first steps the optimiser,
/// validates and runs the teachers.
pub fn run_train_student_on(
    request: &TrainStudentRequest,
    devices: &[Device],
    verbosity: Verbosity,
) -> Result<(StudentConfig, TrainSummary), TrainError> {
    let Some(device) = devices.first().cloned() else {
        return Err(TrainError::Config("no device to train on".into()));
    };
    // A device that cannot run a convolution fails here, before any file is written.
    for device in devices {
        kiln_models::device::check(device)?;
    }
    let (data, summary) = load_student_data(&request.train, &request.val, request.images.as_deref())?;
    if request.dry_run {
        // The labelled part of the step: the teachers' targets add a few small tensors per image.
        let mut config = student_config(&data, &summary, &request.overrides, false)?;
        config.batch_size = config.batch_size.min(data.train.images.len());
        let scratch = crate::engine::memory::DryRunDir::new("train-student")?;
        let options = TrainOptions {
            config: config.clone(),
            output: scratch.path().to_path_buf(),
            device,
            data_parallel: Vec::new(),
            resume: false,
            verbosity,
            stop_after_epochs: None,
            dry_run: true,
        };
        let data = data.first_images(crate::engine::memory::DRY_RUN_IMAGES);
        let summary = train_student_with(options, data, None)?;
        return Ok((config, summary));
    }
    let output_existed = request.output.exists();
    // One run per directory: a kiln process already writing here (a new run or a resume) is refused.
    let _lock = crate::engine::RunLock::acquire(&request.output)?;
    let config_path = request.output.join("student_config.yaml");
    let config = if request.resume {
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| TrainError::Config(format!("{}: cannot resume: {e}", config_path.display())))?;
        serde_yaml::from_str(&text)
            .map_err(|e| TrainError::Config(format!("{}: cannot resume: {e}", config_path.display())))?
    } else {
        crate::engine::require_fresh_dir(&request.output)?;
        student_config(&data, &summary, &request.overrides, request.distill.is_some())?
    };
    // A resumed distilled run finds its teachers in its own record unless they are given again.
    let distill_request = match (&request.distill, request.resume, config.distill.is_some()) {
        (Some(given), _, _) => {
            Some(DistillRequest { images: given.images.clone().or_else(|| request.images.clone()), ..given.clone() })
        }
        (None, true, true) => Some(recorded_distill_request(&request.output)?),
        _ => None,
    };
    if distill_request.is_some() && config.distill.is_none() {
        return Err(TrainError::Config(format!(
            "the run in {} was trained without teachers: resume it without --teachers",
            request.output.display()
        )));
    }
    if config.classes != data.train.class_names() {
        return Err(TrainError::Config(format!(
            "the run in {} was trained on classes {:?}, the data has {:?}",
            request.output.display(),
            config.classes,
            data.train.class_names()
        )));
    }
    if !request.resume && verbosity == Verbosity::Progress && !config.characteristics.is_empty() {
        let changed = crate::characteristics::changes(&StudentConfig::default().augment, &config.augment);
        eprintln!(
            "augmentation for {}: {}",
            config.characteristics.describe(),
            if changed.is_empty() { "the default recipe".to_string() } else { changed.join(", ") }
        );
    }
    if !request.resume {
        crate::engine::write_metadata(&request.output.join("metadata.json"), request, &data, &summary, &config)?;
        // Saved before the teachers label anything, so a run killed while they do can be resumed.
        kiln_data::io::write_atomic(
            &config_path,
            serde_yaml::to_string(&config).map_err(|e| TrainError::Config(e.to_string()))?.as_bytes(),
        )?;
    }
    let teachers = match (&distill_request, &config.distill) {
        (Some(distill), Some(settings)) => {
            let prepared = prepare_distillation(distill, settings, &data, &request.output, &device, verbosity);
            let prepared = match prepared {
                Ok(prepared) => prepared,
                Err(error) => {
                    // A new run whose teachers cannot teach leaves nothing behind.
                    if !request.resume {
                        remove_new_run(&request.output, output_existed);
                    }
                    return Err(error);
                }
            };
            if verbosity == Verbosity::Progress {
                for note in &prepared.notes {
                    eprintln!("{note}");
                }
            }
            for warning in &prepared.warnings {
                eprintln!("warning: {warning}");
            }
            kiln_data::io::write_atomic(
                &request.output.join(DISTILLATION_CONFIG),
                serde_yaml::to_string(&prepared.record).map_err(|e| TrainError::Config(e.to_string()))?.as_bytes(),
            )?;
            Some(prepared.data)
        }
        _ => None,
    };
    let options = TrainOptions {
        config: config.clone(),
        output: request.output.clone(),
        device,
        data_parallel: devices[1..].to_vec(),
        resume: request.resume,
        verbosity,
        stop_after_epochs: None,
        dry_run: false,
    };
    let summary = train_student_with(options, data, teachers)?;
    Ok((config, summary))
}

/// Removes what a new run wrote: the directory, or (when it existed, empty, before) its content.
fn remove_new_run(output: &Path, existed: bool) {
    if !existed {
        let _ = std::fs::remove_dir_all(output);
    } else if let Ok(entries) = std::fs::read_dir(output) {
        for entry in entries.flatten() {
            let path = entry.path();
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
    }
}

/// The teachers a distilled run recorded in its `distillation_config.yaml`.
fn recorded_distill_request(run_dir: &Path) -> Result<DistillRequest, TrainError> {
    let path = run_dir.join(DISTILLATION_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        TrainError::Config(if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "{}: the run stopped before its teachers finished labelling: resume it with --teachers and \
                 --unlabeled again (the labels already computed are cached and reused)",
                run_dir.display()
            )
        } else {
            format!("{}: cannot resume the distilled run: {e}", path.display())
        })
    })?;
    let record: serde_yaml::Value = serde_yaml::from_str(&text)
        .map_err(|e| TrainError::Config(format!("{}: cannot resume the distilled run: {e}", path.display())))?;
    let path_of = |key: &str| record.get(key).and_then(|v| v.as_str()).map(PathBuf::from);
    let teachers = path_of("teachers_dir")
        .ok_or_else(|| TrainError::Config(format!("{}: no teachers_dir: pass --teachers again", path.display())))?;
    Ok(DistillRequest { teachers, unlabeled: path_of("unlabeled"), images: path_of("images"), ..Default::default() })
}

/// Loads `path` (a run directory, its `weights/best.safetensors`, or a kiln `.safetensors` file)
/// as the embeddable [`Detector`]: the one loaded-student type of eval, infer, export and bench.
pub fn load_student(path: &Path, device: &Device) -> Result<Detector, TrainError> {
    Ok(Detector::load(path, device)?)
}

/// Box (and mask) COCO evaluation of a student on a dataset.
pub struct Evaluation {
    pub boxes: CocoEvaluation,
    pub masks: Option<CocoEvaluation>,
    pub images: usize,
    pub class_names: Vec<String>,
}

pub fn evaluate_student(
    student: &Detector,
    data: &CocoDataset,
    images_dir: &Path,
    imgsz: Option<u32>,
    batch_size: usize,
    device: &Device,
    progress: &indicatif::ProgressBar,
) -> Result<Evaluation, TrainError> {
    let info = student.info();
    if data.class_names() != info.classes {
        return Err(TrainError::Config(format!(
            "the model knows classes {:?} but the data has {:?}",
            info.classes,
            data.class_names()
        )));
    }
    let imgsz = imgsz.unwrap_or(info.imgsz);
    let dataset = CocoDetectionDataset::new(data.clone(), images_dir);
    let batcher = DetectionBatcher { image_size: imgsz, mask_downsample: None, overlap_masks: false };
    let options = EVAL_PREDICT_OPTIONS;
    let n = data.images.len();
    progress.set_length(n as u64);
    let mut results = Vec::new();
    for start in (0..n).step_by(batch_size.max(1)) {
        let items: Vec<_> = (start..(start + batch_size).min(n)).map(|i| dataset.load(i)).collect::<Result<_, _>>()?;
        let batch = batcher.try_batch(&items, device)?;
        let output = student.model().forward(batch.images.clone());
        let detections = student.model().postprocess(&output, &batch.letterboxes, &options)?;
        for (image_id, detections) in batch.image_ids.iter().zip(detections) {
            results.extend(to_coco_results(*image_id, &detections, &info.category_ids));
        }
        progress.inc(items.len() as u64);
    }
    progress.finish_and_clear();
    let boxes = evaluate(data, &results, IouType::Bbox)?;
    let masks = if info.config.task == Task::Segment { Some(evaluate(data, &results, IouType::Segm)?) } else { None };
    Ok(Evaluation { boxes, masks, images: n, class_names: data.class_names() })
}

/// Teachers evaluated like a student (`kiln eval --teachers`): the chain on every image without
/// ground-truth prompts (GroundingDINO's boxes prompting SAM), scored with the same COCO
/// evaluation, so teacher and student figures compare. Returns the teacher in words too.
pub fn evaluate_teachers(
    request: &DistillRequest,
    data: &CocoDataset,
    images_dir: &Path,
    device: &Device,
    progress: &indicatif::ProgressBar,
) -> Result<(String, Evaluation), TrainError> {
    // Every box worth ranking, as the student's evaluation keeps every detection above 0.001.
    let config = DistillConfig {
        box_threshold: crate::distill::ValueOrAuto::Value(TEACHER_EVAL_THRESHOLD),
        text_threshold: TEACHER_EVAL_THRESHOLD,
        ..DistillConfig::default()
    };
    let weights = crate::distill::teacher::TeacherWeights {
        grounding_dino: request.grounding_dino_weights.clone(),
        sam: request.sam_weights.clone(),
    };
    let teacher =
        crate::distill::teacher::open_teacher(&request.teachers, &data.class_names(), &config, &weights, device)?;
    if !teacher.finds_objects() {
        return Err(TrainError::Config(format!(
            "{}: {} segments given boxes only, so it cannot be scored without prompts; its mask IoU on \
             ground-truth boxes is in the teachers' results.csv",
            request.teachers.display(),
            teacher.describe()
        )));
    }
    let evaluation =
        evaluate_predictor(data, images_dir, &data.class_ids(), teacher.makes_masks(), progress, |image| {
            let instances = teacher.label(image, &[]).map_err(|e| e.to_string())?;
            Ok(instances
                .into_iter()
                .map(|i| kiln_models::yolo::predict::Detection {
                    bbox: i.bbox.map(|v| v as f32),
                    score: i.score,
                    class_id: i.class,
                    mask: i.mask.map(|rle| rle.decode()),
                    class_scores: i.class_probs,
                })
                .collect())
        })?;
    Ok((teacher.describe(), evaluation))
}

/// The least teacher score `kiln eval --teachers` keeps.
pub const TEACHER_EVAL_THRESHOLD: f32 = 0.01;

/// The evaluation settings `kiln eval` uses: Ultralytics' validator's (every class above 0.001,
/// 300 detections), as training validates.
pub const EVAL_PREDICT_OPTIONS: PredictOptions = PredictOptions::validation();

/// COCO box (and, with `masks`, mask) evaluation of any predictor on a dataset, one image at a
/// time: how an exported or quantised model is scored the same way as the student it came from.
/// `predict` gets each image at its original size and returns detections in its pixels.
pub fn evaluate_predictor(
    data: &CocoDataset,
    images_dir: &Path,
    category_ids: &[u64],
    masks: bool,
    progress: &indicatif::ProgressBar,
    mut predict: impl FnMut(&image::RgbImage) -> Result<Vec<kiln_models::yolo::predict::Detection>, String>,
) -> Result<Evaluation, TrainError> {
    progress.set_length(data.images.len() as u64);
    let mut results = Vec::new();
    for image in &data.images {
        let path = kiln_data::paths::inside(images_dir, &image.file_name, &format!("image {}", image.id))?;
        let pixels = kiln_data::io::read_rgb_image(&path)?;
        let detections = predict(&pixels).map_err(TrainError::Config)?;
        results.extend(to_coco_results(image.id, &detections, category_ids));
        progress.inc(1);
    }
    progress.finish_and_clear();
    let boxes = evaluate(data, &results, IouType::Bbox)?;
    let masks = if masks { Some(evaluate(data, &results, IouType::Segm)?) } else { None };
    Ok(Evaluation { boxes, masks, images: data.images.len(), class_names: data.class_names() })
}

impl Evaluation {
    /// The metrics table: all classes, then each class (instances from the data).
    pub fn render(&self, data: &CocoDataset) -> String {
        let mut instances = vec![0usize; self.class_names.len()];
        let index = data.class_index();
        for a in data.annotations.iter().filter(|a| a.iscrowd == 0) {
            if let Some(&i) = index.get(&a.category_id) {
                instances[i] += 1;
            }
        }
        let mut out = String::new();
        let header = if self.masks.is_some() {
            format!(
                "{:<16}{:>8}{:>10}  {:>7}{:>7}{:>7} {:>9}  {:>7}{:>7}{:>7} {:>9}\n",
                "class", "images", "instances", "Box(P", "R", "mAP50", "mAP50-95)", "Mask(P", "R", "mAP50", "mAP50-95)"
            )
        } else {
            format!(
                "{:<16}{:>8}{:>10}  {:>7}{:>7}{:>7} {:>9}\n",
                "class", "images", "instances", "Box(P", "R", "mAP50", "mAP50-95)"
            )
        };
        out.push_str(&header);
        let row =
            |name: &str, images: String, inst: usize, b: (f64, f64, f64, f64), m: Option<(f64, f64, f64, f64)>| {
                let mut line =
                    format!("{:<16}{:>8}{:>10}  {:>7.3}{:>7.3}{:>7.3} {:>9.3}", name, images, inst, b.0, b.1, b.2, b.3);
                if let Some(m) = m {
                    line.push_str(&format!("  {:>7.3}{:>7.3}{:>7.3} {:>9.3}", m.0, m.1, m.2, m.3));
                }
                line.push('\n');
                line
            };
        let whole = |e: &CocoEvaluation| (e.best_f1.precision, e.best_f1.recall, e.ap50().max(0.0), e.ap().max(0.0));
        out.push_str(&row(
            "all",
            self.images.to_string(),
            instances.iter().sum(),
            whole(&self.boxes),
            self.masks.as_ref().map(whole),
        ));
        let box_classes = self.boxes.per_class();
        let mask_classes = self.masks.as_ref().map(|m| m.per_class());
        for (k, name) in self.class_names.iter().enumerate() {
            let id = self.boxes.category_ids.get(k).copied();
            let find = |list: &Vec<crate::eval::ClassAp>| {
                list.iter().find(|c| Some(c.category_id) == id).map(|c| (c.ap50, c.ap))
            };
            let Some((b50, b)) = find(&box_classes) else { continue };
            let m = mask_classes.as_ref().and_then(|l| find(l)).map(|(m50, m)| (f64::NAN, f64::NAN, m50, m));
            out.push_str(
                &row(name, String::new(), instances[k], (f64::NAN, f64::NAN, b50, b), m).replace("NaN", "  -"),
            );
        }
        out
    }
}

/// The closing table of a training run.
pub fn render_train_summary(config: &StudentConfig, summary: &TrainSummary, output: &Path) -> String {
    let b = &summary.best;
    let mut out = format!(
        "\n{} trained for {} epochs in {:.0} s{}\n",
        config.model,
        summary.history.len(),
        summary.seconds,
        if summary.stopped_early { " (stopped early: no improvement)" } else { "" }
    );
    out.push_str(&format!(
        "best epoch {}: box mAP50 {:.3} mAP50-95 {:.3} (P {:.3} R {:.3})",
        summary.best_epoch, b.box_map50, b.box_map, b.box_precision, b.box_recall
    ));
    if config.model.contains("seg") || config.model.starts_with("fastsam") {
        out.push_str(&format!("; mask mAP50 {:.3} mAP50-95 {:.3}", b.mask_map50, b.mask_map));
    }
    out.push_str(&format!(
        "\nweights  {} (best), {} (last)\nresults  {}\n",
        summary.best_weights.display(),
        summary.last_weights.display(),
        output.join("results.csv").display()
    ));
    out
}

/// What `kiln train-student --dry-run` prints: the settings and the memory estimate.
pub fn render_dry_run(config: &StudentConfig, memory: Option<&MemoryEstimate>, teachers: bool) -> String {
    let mut out = format!(
        "\n{} on {} classes: {} epochs, batch {}, {} px, optimiser {:?} (lr0 {}), seed {}\n",
        config.model,
        config.classes.len(),
        config.epochs,
        config.batch_size,
        config.imgsz,
        config.optimizer,
        config.lr0,
        config.seed
    );
    if let Some(memory) = memory {
        out.push_str(&memory.render_parts());
    }
    if teachers {
        out.push_str(
            "  (the step is the labelled one: the teachers' targets and features add a little per image, and their \
             labelling runs before training, one teacher at a time)\n",
        );
    }
    out.push_str("nothing trained, nothing written\n");
    out
}

/// What `kiln infer` wrote.
#[derive(Debug)]
pub struct InferSummary {
    pub images: usize,
    pub detections: usize,
    pub predictions: PathBuf,
    pub pictures: Option<PathBuf>,
}

/// Runs a student on every image of `images` (sorted by name): `predictions.json` (COCO results,
/// `image_id` = position in that order + 1, with an `images` list giving each id's file) and,
/// with `visualize`, one picture per image with the detections drawn. Nothing existing is
/// replaced, and a failure leaves nothing behind.
#[allow(clippy::too_many_arguments)]
pub fn run_infer(
    student: &Detector,
    images: &Path,
    output: &Path,
    options: &PredictOptions,
    imgsz: Option<u32>,
    visualize: bool,
    device: &Device,
    progress: &indicatif::ProgressBar,
) -> Result<InferSummary, TrainError> {
    let info = student.info();
    let imgsz = imgsz.unwrap_or(info.imgsz);
    run_infer_with(&info.classes, &info.category_ids, images, output, visualize, progress, |image| {
        student.model().predict(image, imgsz, options, device).map_err(|e| e.to_string())
    })
}

/// [`run_infer`] for any predictor (an exported ONNX model, a quantised one): `predict` gets each
/// image at its original size and returns detections in its pixels.
pub fn run_infer_with(
    classes: &[String],
    category_ids: &[u64],
    images: &Path,
    output: &Path,
    visualize: bool,
    progress: &indicatif::ProgressBar,
    mut predict: impl FnMut(&image::RgbImage) -> Result<Vec<kiln_models::yolo::predict::Detection>, String>,
) -> Result<InferSummary, TrainError> {
    let files = kiln_data::io::list_images(images)?;
    let staged = StagedOutput::begin(output, "predictions.json", visualize)?;
    progress.set_length(files.len() as u64);
    let mut results = Vec::new();
    let mut listed = Vec::new();
    for (position, file) in files.iter().enumerate() {
        let image = kiln_data::io::read_rgb_image(file)?;
        let detections = predict(&image).map_err(|e| TrainError::Config(format!("{}: {e}", file.display())))?;
        let entry = ResultImage::listed(position, file, &image);
        results.extend(to_coco_results(entry.id, &detections, category_ids));
        if let Some(picture_path) = staged.picture(&kiln_data::io::picture_stem(file, entry.id)) {
            let mut picture = image;
            crate::plots::draw_detections(&mut picture, &detections, classes);
            crate::plots::save(&picture, &picture_path)?;
        }
        listed.push(entry);
        progress.inc(1);
    }
    progress.finish_and_clear();
    let categories =
        category_ids.iter().zip(classes).map(|(&id, name)| ResultCategory { id, name: name.clone() }).collect();
    let detections = results.len();
    let (predictions, pictures) =
        staged.finish(&ResultsDocument { images: listed, categories, annotations: results })?;
    Ok(InferSummary { images: files.len(), detections, predictions, pictures })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_reach_nested_keys_and_refuse_unknown_ones() {
        let config = StudentConfig::default();
        let set = |s: &[&str]| apply_settings(config.clone(), &s.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let changed = set(&["augment.mosaic=0", "nbs=16", "loss.box_gain=5"]).unwrap();
        assert_eq!((changed.augment.mosaic, changed.nbs, changed.loss.box_gain), (0.0, 16, 5.0));
        assert_eq!(changed.epochs, config.epochs);
        let unknown = set(&["augment.mosiac=0"]).unwrap_err();
        assert!(unknown.contains("augment.mosiac") && unknown.contains("mosaic"), "{unknown}");
        assert!(set(&["nbs=many"]).unwrap_err().contains("nbs"));
        assert!(set(&["nbs"]).unwrap_err().contains("KEY=VALUE"));
    }
}
