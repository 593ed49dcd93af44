//! The library side of `kiln train-teacher` and `kiln segment`: which teachers the data calls for
//! (GroundingDINO when it has boxes, SAM when it has masks), their config from defaults + data + overrides, and an experiment's
//! `teachers/` directory:
//!
//! ```text
//! teachers/teacher_config.yaml  teachers/metadata.json
//! teachers/sam_lora/{adapter_model.safetensors, adapter_config.json}   (best val mask IoU)
//! teachers/sam_train/{results.csv, results.png, val_masks.jpg, embeddings/, checkpoint/}
//! teachers/grounding_dino_lora/{adapter_model.safetensors, adapter_config.json} (best val box mAP)
//! teachers/grounding_dino_train/{results.csv, results.png, val_boxes.jpg, checkpoint/}
//! ```

pub mod detect;
pub mod grounding_dino;
pub mod grounding_loss;
pub mod mask_loss;
pub mod sam;
pub mod segment;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::Device;
use kiln_data::batch::CocoDetectionDataset;
use serde::{Deserialize, Serialize};

use crate::engine::Verbosity;
use crate::error::AtPath;
use crate::error::TrainError;
use crate::split::load_student_data;
use grounding_dino::{
    GroundingData, GroundingDinoTeacherConfig, GroundingRunOptions, GroundingTrainSummary, train_grounding_dino,
};
use sam::{SamData, SamRunOptions, SamTeacherConfig, SamTrainSummary, train_sam};

/// Every teacher's settings; saved as `teachers/teacher_config.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherConfig {
    /// GroundingDINO's settings; none when the data has no boxes (or another teacher was chosen).
    #[serde(default)]
    pub grounding_dino: Option<GroundingDinoTeacherConfig>,
    /// SAM's settings; none when the data has no masks (or another teacher was chosen).
    pub sam: Option<SamTeacherConfig>,
    /// The `--preset` the run started from, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<crate::presets::Preset>,
    /// What the user said about the objects and their scene (`--objects`, `--environment`), which
    /// chose each teacher's `augment`.
    #[serde(default, skip_serializing_if = "crate::characteristics::Characteristics::is_empty")]
    pub characteristics: crate::characteristics::Characteristics,
    /// Class names, in class-index order, from the dataset.
    pub classes: Vec<String>,
    pub category_ids: Vec<u64>,
}

/// kiln's defaults for the teachers (`configs/teacher.yaml`, built in).
pub const DEFAULT_TEACHER_CONFIG: &str = include_str!("../../../configs/teacher.yaml");

impl TeacherConfig {
    /// These settings under `preset` (from kiln's defaults, before the data and the flags); LoRA
    /// alpha stays twice the rank, as in the defaults.
    pub fn apply_preset(&mut self, preset: crate::presets::Preset) {
        if let Some(g) = self.grounding_dino.as_mut() {
            let short = g.image_size;
            let (epochs, image_size, batch, rank) =
                preset.grounding_dino((g.epochs, g.image_size, g.batch_size, g.lora.rank));
            g.max_size = g.max_size * image_size / short.max(1);
            (g.epochs, g.image_size, g.batch_size) = (epochs, image_size, batch);
            (g.lora.rank, g.lora.alpha) = (rank, 2.0 * rank as f64);
        }
        if let Some(s) = self.sam.as_mut() {
            let (epochs, batch, prompts, rank) =
                preset.sam((s.epochs, s.batch_size, s.max_prompts_per_image, s.lora.rank));
            (s.epochs, s.batch_size, s.max_prompts_per_image) = (epochs, batch, prompts);
            (s.lora.rank, s.lora.alpha) = (rank, 2.0 * rank as f64);
        }
        self.preset = Some(preset);
    }
}

impl Default for TeacherConfig {
    fn default() -> Self {
        serde_yaml::from_str(DEFAULT_TEACHER_CONFIG).expect("configs/teacher.yaml parses")
    }
}

/// What the user may override on the command line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TeacherOverrides {
    /// Train only this teacher (`sam` or `grounding_dino`) of those the data calls for.
    pub only: Option<String>,
    pub gdino: Option<String>,
    pub gdino_weights: Option<PathBuf>,
    pub text_encoder: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub gdino_lora_targets: Option<Vec<String>>,
    pub image_size: Option<usize>,
    pub backbone_lr_scale: Option<f64>,
    pub sam: Option<String>,
    pub sam_weights: Option<PathBuf>,
    pub lora_r: Option<usize>,
    pub lora_alpha: Option<f64>,
    pub lora_targets: Option<Vec<String>>,
    pub epochs: Option<usize>,
    pub batch_size: Option<usize>,
    pub lr0: Option<f64>,
    pub seed: Option<u64>,
    pub focal_weight: Option<f64>,
    pub full_finetune: bool,
    /// Recompute activations in the backward pass instead of keeping them (less memory).
    pub gradient_checkpointing: bool,
    /// Start a tiny preset from a random initialisation instead of kiln's shipped base.
    pub from_scratch: bool,
    /// Settings between the defaults and the flags (`crate::presets`).
    pub preset: Option<crate::presets::Preset>,
    /// The objects and their scene: the teachers' light and camera augmentation.
    pub characteristics: crate::characteristics::Characteristics,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainTeacherRequest {
    pub train: PathBuf,
    pub val: PathBuf,
    pub images: Option<PathBuf>,
    /// The experiment directory (`experiments/NAME`); the teachers go to its `teachers/`.
    pub output: PathBuf,
    pub resume: bool,
    /// The device in words (`kiln_models::device::describe`), recorded in `metadata.json`.
    pub device_name: String,
    pub overrides: TeacherOverrides,
    /// Build each teacher's run, estimate its memory and stop: nothing trained, nothing written.
    pub dry_run: bool,
}

/// Defaults, then what the data says (which teachers, classes), then the overrides.
pub fn teacher_config(
    summary: &kiln_data::DatasetSummary,
    classes: Vec<String>,
    category_ids: Vec<u64>,
    o: &TeacherOverrides,
) -> Result<TeacherConfig, TrainError> {
    let mut config = TeacherConfig { classes, category_ids, ..TeacherConfig::default() };
    if let Some(preset) = o.preset {
        config.apply_preset(preset);
    }
    config.characteristics = o.characteristics.clone();
    if let Some(g) = config.grounding_dino.as_mut() {
        g.augment = o.characteristics.teacher_recipe(true);
    }
    if let Some(s) = config.sam.as_mut() {
        s.augment = o.characteristics.teacher_recipe(false);
    }
    if !summary.has_boxes && !summary.has_masks {
        return Err(TrainError::Config("the training set has neither boxes nor masks: nothing to learn".into()));
    }
    let wanted = |name: &str| o.only.as_deref().is_none_or(|only| only == name);
    if let Some(only) = &o.only {
        let called = match only.as_str() {
            "sam" => summary.has_masks,
            "grounding_dino" => summary.has_boxes,
            other => {
                return Err(TrainError::Config(format!("unknown teacher {other:?}: use sam or grounding_dino")));
            }
        };
        if !called {
            return Err(TrainError::Config(format!(
                "the data does not call for {only}: SAM needs masks, GroundingDINO boxes (a mask also gives a box)"
            )));
        }
    }
    let gdino = config.grounding_dino.take().expect("configs/teacher.yaml has a grounding_dino section");
    config.grounding_dino =
        if summary.has_boxes && wanted("grounding_dino") { Some(gdino_overrides(gdino, o)?) } else { None };
    let sam = config.sam.take().expect("configs/teacher.yaml has a sam section");
    config.sam = if summary.has_masks && wanted("sam") { Some(sam_overrides(sam, o)?) } else { None };
    Ok(config)
}

fn sam_overrides(mut sam: SamTeacherConfig, o: &TeacherOverrides) -> Result<SamTeacherConfig, TrainError> {
    sam.model = o.sam.clone().unwrap_or(sam.model);
    sam::sam_config(&sam.model)?;
    sam.weights = o.sam_weights.clone().or(sam.weights);
    if let Some(path) = sam.weights.as_ref().filter(|path| !path.is_file()) {
        return Err(TrainError::Config(format!("{}: no such SAM checkpoint", path.display())));
    }
    sam.weights = shipped_base_unless_given("sam", &sam.model, sam.weights, o.from_scratch)?;
    if sam.lacks_weights() {
        return Err(TrainError::Config(format!(
            "SAM {} needs its pretrained weights: pass --sam-weights (e.g. sam_vit_b_01ec64.pth or mobile_sam.pt \
             from the official releases) or train only GroundingDINO with --teacher grounding_dino; only --sam tiny has \
             a base shipped with kiln (or trains from a random initialisation with --from-scratch)",
            sam.model
        )));
    }
    sam.lora.rank = o.lora_r.unwrap_or(sam.lora.rank);
    sam.lora.alpha = o.lora_alpha.unwrap_or(sam.lora.alpha);
    if let Some(targets) = &o.lora_targets {
        sam.lora.target_modules = targets.clone();
    }
    sam.epochs = o.epochs.unwrap_or(sam.epochs);
    sam.batch_size = o.batch_size.unwrap_or(sam.batch_size);
    sam.lr0 = o.lr0.unwrap_or(sam.lr0);
    sam.seed = o.seed.unwrap_or(sam.seed);
    sam.full_finetune |= o.full_finetune;
    sam.gradient_checkpointing |= o.gradient_checkpointing;
    sam.loss.focal_weight = o.focal_weight.unwrap_or(sam.loss.focal_weight);
    if sam.epochs == 0 || sam.batch_size == 0 || sam.lora.rank == 0 {
        return Err(TrainError::Config("--epochs, --batch-size and --lora-r must be at least 1".into()));
    }
    Ok(sam)
}

fn gdino_overrides(
    mut g: GroundingDinoTeacherConfig,
    o: &TeacherOverrides,
) -> Result<GroundingDinoTeacherConfig, TrainError> {
    g.model = o.gdino.clone().unwrap_or(g.model);
    grounding_dino::gdino_config(&g.model)?;
    g.weights = o.gdino_weights.clone().or(g.weights);
    g.text_encoder = o.text_encoder.clone().or(g.text_encoder);
    g.tokenizer = o.tokenizer.clone().or(g.tokenizer);
    for (path, what) in
        [(&g.weights, "GroundingDINO checkpoint"), (&g.text_encoder, "text encoder"), (&g.tokenizer, "tokenizer")]
    {
        if let Some(path) = path {
            if !path.is_file() {
                return Err(TrainError::Config(format!("{}: no such {what}", path.display())));
            }
        }
    }
    let given = g.weights.is_some();
    g.weights = shipped_base_unless_given("grounding_dino", &g.model, g.weights, o.from_scratch)?;
    if g.lacks_weights() {
        return Err(TrainError::Config(format!(
            "GroundingDINO {} needs its pretrained weights: pass --gdino-weights (groundingdino_swint_ogc.pth from \
             the official release) or train only SAM with --teacher sam; only --gdino tiny_minilm has a base shipped \
             with kiln, and the tiny presets train from a random initialisation with --from-scratch",
            g.model
        )));
    }
    // kiln's bases leave the frozen text encoder out of their file.
    if g.model.ends_with("minilm") && g.text_encoder.is_none() && (g.weights.is_none() || !given) {
        return Err(TrainError::Config(format!(
            "GroundingDINO {} has an all-MiniLM-L6-v2 text encoder: pass --text-encoder (its model.safetensors, from \
             huggingface.co/sentence-transformers/all-MiniLM-L6-v2), or set KILN_TEXT_ENCODER to it",
            g.model
        )));
    }
    g.lora.rank = o.lora_r.unwrap_or(g.lora.rank);
    g.lora.alpha = o.lora_alpha.unwrap_or(g.lora.alpha);
    if let Some(targets) = &o.gdino_lora_targets {
        g.lora.target_modules = targets.clone();
    }
    g.epochs = o.epochs.unwrap_or(g.epochs);
    g.batch_size = o.batch_size.unwrap_or(g.batch_size);
    g.lr0 = o.lr0.unwrap_or(g.lr0);
    g.seed = o.seed.unwrap_or(g.seed);
    g.image_size = o.image_size.unwrap_or(g.image_size);
    g.backbone_lr_scale = o.backbone_lr_scale.unwrap_or(g.backbone_lr_scale);
    g.max_size = g.max_size.max(g.image_size);
    g.full_finetune |= o.full_finetune;
    g.gradient_checkpointing |= o.gradient_checkpointing;
    if g.epochs == 0 || g.batch_size == 0 || g.lora.rank == 0 || g.image_size < 32 {
        return Err(TrainError::Config(
            "--epochs, --batch-size and --lora-r must be at least 1, --imgsz at least 32".into(),
        ));
    }
    Ok(g)
}

/// The weights given, else the base kiln ships for the preset (`models/bases/`, see
/// [`kiln_models::bases`]) unless `from_scratch`; none for a preset without a shipped base.
pub(crate) fn shipped_base_unless_given(
    teacher: &str,
    model: &str,
    weights: Option<PathBuf>,
    from_scratch: bool,
) -> Result<Option<PathBuf>, TrainError> {
    if weights.is_some() || from_scratch {
        return Ok(weights);
    }
    match kiln_models::bases::shipped(teacher, model) {
        None => Ok(None),
        Some(path) if path.is_file() => Ok(Some(path)),
        Some(path) => Err(TrainError::Config(format!(
            "{}: kiln's pretrained {teacher} {model} base is missing from the source tree: restore it (git checkout \
             models/bases), pass the weights to start from, or start from a random initialisation with --from-scratch",
            path.display()
        ))),
    }
}

/// What `kiln train-teacher` trained.
#[derive(Debug)]
pub struct TeacherSummary {
    pub config: TeacherConfig,
    pub grounding_dino: Option<GroundingTrainSummary>,
    pub sam: Option<SamTrainSummary>,
    pub teachers_dir: PathBuf,
}

/// Runs `kiln train-teacher`: trains the teachers the data calls for into `output/teachers`.
pub fn run_train_teacher(
    request: &TrainTeacherRequest,
    device: Device,
    verbosity: Verbosity,
) -> Result<TeacherSummary, TrainError> {
    run_train_teacher_for(request, device, verbosity, None)
}

/// [`run_train_teacher`], stopping after `stop_after_epochs` epochs (tests of resumption).
pub fn run_train_teacher_for(
    request: &TrainTeacherRequest,
    device: Device,
    verbosity: Verbosity,
    stop_after_epochs: Option<usize>,
) -> Result<TeacherSummary, TrainError> {
    run_train_teacher_on(request, &[device], verbosity, stop_after_epochs)
}

/// [`run_train_teacher_for`] on several devices together (`--device cuda:0,1`): each takes a
/// share of every step's batches (`crate::engine`'s data parallelism); the first steps the
/// optimiser and validates.
pub fn run_train_teacher_on(
    request: &TrainTeacherRequest,
    devices: &[Device],
    verbosity: Verbosity,
    stop_after_epochs: Option<usize>,
) -> Result<TeacherSummary, TrainError> {
    let Some(device) = devices.first().cloned() else {
        return Err(TrainError::Config("no device to train on".into()));
    };
    // A device that cannot run a convolution fails here, before any file is written.
    for device in devices {
        kiln_models::device::check(device)?;
    }
    let (data, summary) = load_student_data(&request.train, &request.val, request.images.as_deref())?;
    if request.dry_run {
        let mut config =
            teacher_config(&summary, data.train.class_names(), data.train.class_ids(), &request.overrides)?;
        // A batch holds at most the whole training set (the dry run trains on its first images).
        let images = data.train.images.len();
        if let Some(g) = config.grounding_dino.as_mut() {
            g.batch_size = g.batch_size.min(images);
        }
        if let Some(s) = config.sam.as_mut() {
            s.batch_size = s.batch_size.min(images);
        }
        let scratch = crate::engine::memory::DryRunDir::new("train-teacher")?;
        let data = data.first_images(crate::engine::memory::DRY_RUN_IMAGES);
        let (grounding_dino, sam) =
            train_teachers(&config, scratch.path(), &data, &[device], false, verbosity, None, true)?;
        return Ok(TeacherSummary { config, grounding_dino, sam, teachers_dir: request.output.join("teachers") });
    }
    let teachers = request.output.join("teachers");
    let output_existed = request.output.exists();
    // One run per directory: a kiln process already writing these teachers is refused.
    let _lock = crate::engine::RunLock::acquire(&teachers)?;
    let config_path = teachers.join("teacher_config.yaml");
    let config: TeacherConfig = if request.resume {
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| TrainError::Config(format!("{}: cannot resume: {e}", config_path.display())))?;
        serde_yaml::from_str(&text)
            .map_err(|e| TrainError::Config(format!("{}: cannot resume: {e}", config_path.display())))?
    } else {
        crate::engine::require_fresh_dir(&teachers)?;
        teacher_config(&summary, data.train.class_names(), data.train.class_ids(), &request.overrides)?
    };
    if config.classes != data.train.class_names() {
        return Err(TrainError::Config(format!(
            "the teachers in {} were trained on classes {:?}, the data has {:?}",
            teachers.display(),
            config.classes,
            data.train.class_names()
        )));
    }
    if !request.resume {
        kiln_data::io::write_atomic(
            &config_path,
            serde_yaml::to_string(&config).map_err(|e| TrainError::Config(e.to_string()))?.as_bytes(),
        )?;
        crate::engine::write_metadata(&teachers.join("metadata.json"), request, &data, &summary, &config)?;
    }
    let trained =
        train_teachers(&config, &teachers, &data, devices, request.resume, verbosity, stop_after_epochs, false);
    let any_checkpoint = ["sam_train", "grounding_dino_train"]
        .iter()
        .any(|run| !crate::engine::complete_checkpoints(&teachers.join(run).join("checkpoint"), &[]).is_empty());
    if trained.is_err() && !request.resume && !any_checkpoint {
        // A new run that failed before its first complete epoch leaves nothing behind.
        let _ = std::fs::remove_dir_all(&teachers);
        if !output_existed {
            let _ = std::fs::remove_dir(&request.output);
        }
    }
    let (grounding_dino, sam) = trained?;
    Ok(TeacherSummary { config: config.clone(), grounding_dino, sam, teachers_dir: teachers })
}

#[allow(clippy::too_many_arguments)]
fn train_teachers(
    config: &TeacherConfig,
    teachers: &Path,
    data: &crate::split::StudentData,
    devices: &[Device],
    resume: bool,
    verbosity: Verbosity,
    stop_after_epochs: Option<usize>,
    dry_run: bool,
) -> Result<(Option<GroundingTrainSummary>, Option<SamTrainSummary>), TrainError> {
    let grounding = match &config.grounding_dino {
        Some(g) => {
            let options = GroundingRunOptions {
                config: g.clone(),
                run_dir: teachers.join("grounding_dino_train"),
                adapter_dir: teachers.join(if g.full_finetune { "grounding_dino_full" } else { "grounding_dino_lora" }),
                device: devices[0].clone(),
                data_parallel: devices[1..].to_vec(),
                resume,
                verbosity,
                stop_after_epochs,
                dry_run,
            };
            let data = GroundingData {
                train: Arc::new(CocoDetectionDataset::new(data.train.clone(), &data.train_images)),
                val: Arc::new(CocoDetectionDataset::new(data.val.clone(), &data.val_images)),
                classes: config.classes.clone(),
                category_ids: config.category_ids.clone(),
            };
            Some(train_grounding_dino(options, data)?)
        }
        None => None,
    };
    let sam = match &config.sam {
        Some(sam_config) => {
            let options = SamRunOptions {
                config: sam_config.clone(),
                run_dir: teachers.join("sam_train"),
                adapter_dir: teachers.join(if sam_config.full_finetune { "sam_full" } else { "sam_lora" }),
                device: devices[0].clone(),
                data_parallel: devices[1..].to_vec(),
                resume,
                verbosity,
                stop_after_epochs,
                dry_run,
            };
            let sam_data = SamData {
                train: Arc::new(CocoDetectionDataset::new(data.train.clone(), &data.train_images)),
                val: Arc::new(CocoDetectionDataset::new(data.val.clone(), &data.val_images)),
                classes: config.classes.clone(),
            };
            Some(train_sam(options, sam_data)?)
        }
        None => None,
    };
    Ok((grounding, sam))
}

/// What `kiln train-teacher --dry-run` prints: each teacher's settings and memory estimate.
pub fn render_teacher_dry_run(summary: &TeacherSummary) -> String {
    let mut out = String::new();
    if let (Some(g), Some(run)) = (&summary.config.grounding_dino, &summary.grounding_dino) {
        out.push_str(&format!(
            "\nGroundingDINO {}: {} epochs, batch {}, {} px, lr0 {}, {}\n",
            g.model,
            g.epochs,
            g.batch_size,
            g.image_size,
            g.lr0,
            if g.full_finetune { "full fine-tuning".to_string() } else { run.lora.render() }
        ));
        if let Some(memory) = &run.memory {
            out.push_str(&memory.render_parts());
        }
    }
    if let (Some(s), Some(run)) = (&summary.config.sam, &summary.sam) {
        out.push_str(&format!(
            "\nSAM {}: {} epochs, batch {}, lr0 {}, {}{}\n",
            s.model,
            s.epochs,
            s.batch_size,
            s.lr0,
            if s.full_finetune { "full fine-tuning".to_string() } else { run.lora.render() },
            if run.cached_embeddings { " (image encoder frozen: its embeddings are computed once)" } else { "" }
        ));
        if let Some(memory) = &run.memory {
            out.push_str(&memory.render_parts());
        }
    }
    out.push_str("teachers are trained one after the other: the larger estimate is the run's\nnothing trained, nothing written\n");
    out
}

/// The closing summary of `kiln train-teacher`.
pub fn render_teacher_summary(summary: &TeacherSummary) -> String {
    let mut out = String::new();
    if let (Some(config), Some(g)) = (&summary.config.grounding_dino, &summary.grounding_dino) {
        let epochs = g.history.iter().filter(|r| r.epoch > 0).count();
        let how = if config.full_finetune {
            "fully fine-tuned".to_string()
        } else {
            format!("+ LoRA (r {}, alpha {}) trained", config.lora.rank, config.lora.alpha)
        };
        out.push_str(&format!(
            "\nGroundingDINO {} {how} for {epochs} epochs in {:.0} s{}\n",
            config.model,
            g.seconds,
            if g.stopped_early { " (stopped early: no improvement)" } else { "" }
        ));
        if !config.full_finetune {
            out.push_str(&format!("{}\n", g.lora.render()));
        }
        out.push_str(&format!(
            "val box mAP50: {:.4} at the start -> {:.4} at epoch {} ({:+.4}); mAP50-95 {:.4}\n",
            g.start_map50,
            g.best_map50,
            g.best_epoch,
            g.best_map50 - g.start_map50,
            g.best_map
        ));
        out.push_str(&format!(
            "{}  {} ({} bytes, {:.2} % of the base's {} bytes)\n",
            if config.full_finetune { "model  " } else { "adapter" },
            g.adapter_dir.display(),
            g.adapter_bytes,
            100.0 * g.adapter_bytes as f64 / g.base_bytes.max(1) as f64,
            g.base_bytes
        ));
    }
    if let (Some(config), Some(sam)) = (&summary.config.sam, &summary.sam) {
        let epochs = sam.history.iter().filter(|r| r.epoch > 0).count();
        let how = if config.full_finetune {
            "fully fine-tuned".to_string()
        } else {
            format!("+ LoRA (r {}, alpha {}) trained", config.lora.rank, config.lora.alpha)
        };
        out.push_str(&format!(
            "\nSAM {} {how} for {epochs} epochs in {:.0} s{}{}\n",
            config.model,
            sam.seconds,
            if sam.cached_embeddings { ", encoder frozen (embeddings cached)" } else { "" },
            if sam.stopped_early { " (stopped early: no improvement)" } else { "" }
        ));
        if !config.full_finetune {
            out.push_str(&format!("{}\n", sam.lora.render()));
        }
        out.push_str(&format!(
            "val mask IoU (ground-truth box prompts): {:.4} at the start -> {:.4} at epoch {} ({:+.4})\n",
            sam.start_iou,
            sam.best_iou,
            sam.best_epoch,
            sam.best_iou - sam.start_iou
        ));
        out.push_str(&format!(
            "{}  {} ({} bytes, {:.2} % of the base's {} bytes)\n",
            if config.full_finetune { "model  " } else { "adapter" },
            sam.adapter_dir.display(),
            sam.adapter_bytes,
            100.0 * sam.adapter_bytes as f64 / sam.base_bytes.max(1) as f64,
            sam.base_bytes
        ));
    }
    out.push_str(&format!("config   {}\n", summary.teachers_dir.join("teacher_config.yaml").display()));
    out
}

/// The SAM settings of an experiment's teachers (`teachers/teacher_config.yaml` beside an adapter
/// directory `teachers/sam_lora`), for running the adapted teacher.
pub fn sam_config_beside(adapter_dir: &Path) -> Option<SamTeacherConfig> {
    let path = adapter_dir.parent()?.join("teacher_config.yaml");
    let text = std::fs::read_to_string(path).ok()?;
    serde_yaml::from_str::<TeacherConfig>(&text).ok()?.sam
}

/// The GroundingDINO settings of an experiment's teachers (`teachers/teacher_config.yaml` beside an
/// adapter directory `teachers/grounding_dino_lora`).
pub fn grounding_dino_config_beside(adapter_dir: &Path) -> Option<GroundingDinoTeacherConfig> {
    let path = adapter_dir.parent()?.join("teacher_config.yaml");
    let text = std::fs::read_to_string(path).ok()?;
    serde_yaml::from_str::<TeacherConfig>(&text).ok()?.grounding_dino
}

/// The class names of an experiment's teachers (its `teacher_config.yaml` beside `adapter_dir`).
pub fn classes_beside(adapter_dir: &Path) -> Option<Vec<String>> {
    let path = adapter_dir.parent()?.join("teacher_config.yaml");
    let text = std::fs::read_to_string(path).ok()?;
    Some(serde_yaml::from_str::<TeacherConfig>(&text).ok()?.classes)
}

/// Where and how a teacher's fine-tuning saves its best weights: the adapter alone (LoRA), or
/// (full fine-tuning) the whole model under the official key names, either way with the base it
/// was trained on.
pub struct TeacherOutput {
    pub dir: PathBuf,
    pub adapter: kiln_models::lora::AdapterConfig,
    pub full_finetune: bool,
}

impl TeacherOutput {
    pub fn new(
        dir: PathBuf,
        lora: &kiln_models::lora::LoraConfig,
        base_name: String,
        base_hash: String,
        full_finetune: bool,
    ) -> Self {
        let adapter = kiln_models::lora::AdapterConfig {
            peft_type: "LORA".into(),
            lora: lora.clone(),
            base_model_name_or_path: base_name,
            base_weights_hash: base_hash,
            kiln_version: env!("CARGO_PKG_VERSION").into(),
        };
        Self { dir, adapter, full_finetune }
    }

    /// Saves `model`: its adapter, or with `save_full(path, metadata)` the whole model.
    pub fn save<M: burn::module::Module>(
        &self,
        model: &M,
        save_full: impl FnOnce(&Path, &[(String, String)]) -> Result<(), kiln_models::WeightsError>,
    ) -> Result<(), TrainError> {
        if self.full_finetune {
            let metadata = vec![
                ("kiln.model".to_string(), self.adapter.base_model_name_or_path.clone()),
                ("kiln.base_weights_hash".to_string(), self.adapter.base_weights_hash.clone()),
            ];
            std::fs::create_dir_all(&self.dir).at(&self.dir)?;
            Ok(save_full(&self.dir.join(FULL_WEIGHTS), &metadata)?)
        } else {
            Ok(kiln_models::lora::save_adapter(model, &self.dir, &self.adapter)?)
        }
    }

    /// The size of what a run saved in `dir`.
    pub fn saved_bytes(dir: &Path, full_finetune: bool) -> u64 {
        let saved = if full_finetune { FULL_WEIGHTS } else { kiln_models::lora::ADAPTER_WEIGHTS };
        std::fs::metadata(dir.join(saved)).map(|m| m.len()).unwrap_or(0)
    }
}

/// The whole model of a full fine-tuning, in its output directory.
pub const FULL_WEIGHTS: &str = "model.safetensors";

/// The teachers' schedule: warm-up over `warmup_epochs` (at most half the run) from 0, then the
/// linear decay to `lr0 * lrf`.
pub fn teacher_schedule(
    lr0: f64,
    lrf: f64,
    epochs: usize,
    iterations_per_epoch: usize,
    warmup_epochs: f64,
) -> crate::optim::WarmupLinearSchedule {
    let warmup = (warmup_epochs * iterations_per_epoch as f64).round() as usize;
    crate::optim::WarmupLinearSchedule {
        lr0,
        lrf,
        epochs,
        iterations_per_epoch,
        warmup_iterations: warmup.min(iterations_per_epoch * epochs / 2).max(1),
        warmup_start: 0.0,
        lead: 1,
        step: 0,
    }
}

/// `base` with the adapter in `dir` merged into it, for inference (the adapter must name this base,
/// `base_name` with weights `base_hash`), or the base alone without an adapter.
pub fn merge_adapter<M: burn::module::Module>(
    base: M,
    adapter: Option<&Path>,
    base_name: &str,
    base_hash: impl FnOnce() -> Result<String, TrainError>,
) -> Result<(M, Option<kiln_models::lora::AdapterConfig>), TrainError> {
    match adapter {
        None => Ok((base, None)),
        Some(dir) => {
            let (model, adapter_config) = kiln_models::lora::load_adapter(base, dir, base_name, &base_hash()?)?;
            Ok((kiln_models::lora::merge(model), Some(adapter_config)))
        }
    }
}
