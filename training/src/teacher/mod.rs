//! The library side of `kiln train-teacher` and `kiln segment`: which teachers the data calls for
//! (SAM when it has masks), their config from defaults + data + overrides, and an experiment's
//! `teachers/` directory:
//!
//! ```text
//! teachers/teacher_config.yaml  teachers/metadata.json
//! teachers/sam_lora/{adapter_model.safetensors, adapter_config.json}   (best val mask IoU)
//! teachers/sam_train/{results.csv, results.png, val_masks.jpg, embeddings/, checkpoint/}
//! ```

pub mod mask_loss;
pub mod sam;
pub mod segment;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::Device;
use kiln_data::batch::CocoDetectionDataset;
use serde::{Deserialize, Serialize};

use crate::run::{TrainError, Verbosity, load_student_data};
use sam::{SamData, SamRunOptions, SamTeacherConfig, SamTrainSummary, train_sam};

/// Every teacher's settings; saved as `teachers/teacher_config.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherConfig {
    /// SAM's settings; none when the data has no masks.
    pub sam: Option<SamTeacherConfig>,
    /// Class names, in class-index order, from the dataset.
    pub classes: Vec<String>,
    pub category_ids: Vec<u64>,
}

/// kiln's defaults for the teachers (`configs/teacher.yaml`, built in).
pub const DEFAULT_TEACHER_CONFIG: &str = include_str!("../../../configs/teacher.yaml");

impl Default for TeacherConfig {
    fn default() -> Self {
        serde_yaml::from_str(DEFAULT_TEACHER_CONFIG).expect("configs/teacher.yaml parses")
    }
}

/// What the user may override on the command line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TeacherOverrides {
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
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainTeacherRequest {
    pub train: PathBuf,
    pub val: PathBuf,
    pub images: Option<PathBuf>,
    /// The experiment directory (`experiments/NAME`); the teachers go to its `teachers/`.
    pub output: PathBuf,
    pub resume: bool,
    pub device_name: String,
    pub overrides: TeacherOverrides,
}

/// Defaults, then what the data says (which teachers, classes), then the overrides.
pub fn teacher_config(
    summary: &kiln_data::DatasetSummary,
    classes: Vec<String>,
    category_ids: Vec<u64>,
    o: &TeacherOverrides,
) -> Result<TeacherConfig, TrainError> {
    let mut config = TeacherConfig { classes, category_ids, ..TeacherConfig::default() };
    if !summary.has_masks {
        return Err(TrainError::Config(if summary.has_boxes {
            "the training set has boxes but no masks: its teacher is GroundingDINO, which kiln does not train yet; \
             SAM needs masks"
                .into()
        } else {
            "the training set has neither boxes nor masks: nothing to learn".into()
        }));
    }
    let mut sam = config.sam.take().expect("configs/teacher.yaml has a sam section");
    sam.model = o.sam.clone().unwrap_or(sam.model);
    sam::sam_config(&sam.model)?;
    sam.weights = o.sam_weights.clone().or(sam.weights);
    if let Some(path) = &sam.weights {
        if !path.is_file() {
            return Err(TrainError::Config(format!("{}: no such SAM checkpoint", path.display())));
        }
    } else if sam.model != "tiny" {
        return Err(TrainError::Config(format!(
            "SAM {} needs its pretrained weights: pass --sam-weights (e.g. sam_vit_b_01ec64.pth or mobile_sam.pt \
             from the official releases); only --sam tiny trains from a random initialisation, for tests and the demo",
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
    sam.loss.focal_weight = o.focal_weight.unwrap_or(sam.loss.focal_weight);
    if sam.epochs == 0 || sam.batch_size == 0 || sam.lora.rank == 0 {
        return Err(TrainError::Config("--epochs, --batch-size and --lora-r must be at least 1".into()));
    }
    config.sam = Some(sam);
    Ok(config)
}

/// What `kiln train-teacher` trained.
#[derive(Debug)]
pub struct TeacherSummary {
    pub config: TeacherConfig,
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
    let (data, summary) = load_student_data(&request.train, &request.val, request.images.as_deref())?;
    let teachers = request.output.join("teachers");
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
    let output_existed = request.output.exists();
    std::fs::create_dir_all(&teachers)
        .map_err(|e| TrainError::Io { path: teachers.clone(), message: e.to_string() })?;
    if !request.resume {
        kiln_data::io::write_atomic(
            &config_path,
            serde_yaml::to_string(&config).map_err(|e| TrainError::Config(e.to_string()))?.as_bytes(),
        )?;
        crate::engine::write_metadata(&teachers.join("metadata.json"), request, &data, &summary, &config)?;
    }
    let trained = train_teachers(&config, &teachers, &data, device, request.resume, verbosity, stop_after_epochs);
    if trained.is_err()
        && !request.resume
        && crate::engine::complete_checkpoints(&teachers.join("sam_train/checkpoint"), &[]).is_empty()
    {
        // A new run that failed before its first complete epoch leaves nothing behind.
        let _ = std::fs::remove_dir_all(&teachers);
        if !output_existed {
            let _ = std::fs::remove_dir(&request.output);
        }
    }
    Ok(TeacherSummary { config: config.clone(), sam: trained?, teachers_dir: teachers })
}

fn train_teachers(
    config: &TeacherConfig,
    teachers: &Path,
    data: &crate::run::StudentData,
    device: Device,
    resume: bool,
    verbosity: Verbosity,
    stop_after_epochs: Option<usize>,
) -> Result<Option<SamTrainSummary>, TrainError> {
    Ok(match &config.sam {
        Some(sam_config) => {
            let options = SamRunOptions {
                config: sam_config.clone(),
                run_dir: teachers.join("sam_train"),
                adapter_dir: teachers.join(if sam_config.full_finetune { "sam_full" } else { "sam_lora" }),
                device,
                resume,
                verbosity,
                stop_after_epochs,
            };
            let sam_data = SamData {
                train: Arc::new(CocoDetectionDataset::new(data.train.clone(), &data.train_images)),
                val: Arc::new(CocoDetectionDataset::new(data.val.clone(), &data.val_images)),
                classes: config.classes.clone(),
            };
            Some(train_sam(options, sam_data)?)
        }
        None => None,
    })
}

/// The closing summary of `kiln train-teacher`.
pub fn render_teacher_summary(summary: &TeacherSummary) -> String {
    let mut out = String::new();
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
