//! A student training run: a task on kiln's training engine (`crate::engine`) that keeps an EMA
//! of the weights, accumulates gradients to Ultralytics' nominal batch, evaluates the EMA with the
//! COCO protocol each epoch, and saves it. Layout of a run directory:
//!
//! ```text
//! student_config.yaml  metadata.json  results.csv  results.png  pr_curve.png
//! train_batches.jpg  val_predictions.jpg
//! weights/last.safetensors  weights/best.safetensors   (EMA weights, official key names)
//! checkpoint/{model,optim,scheduler}-N.bpk             (burn-train: resume state)
//! checkpoint/ema-N.safetensors  checkpoint/state-N.json (kiln: EMA and best-so-far)
//! checkpoint/grads-N.bin  (kiln: a step's gradients the epoch's end left pending, if any)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Device;
use burn::train::Learner;
use kiln_data::batch::{CocoDetectionDataset, DetectionBatch};
use kiln_data::coco::CocoDataset;
use kiln_data::mask::Rle;
use kiln_models::yolo::predict::{Detection, PredictOptions};
use kiln_models::yolo::{Task, YoloConfig, YoloV8};
use serde::{Deserialize, Serialize};

use std::collections::HashMap;

use crate::augment::AugmentConfig;
use crate::characteristics::Characteristics;
use crate::data::{EpochCounter, TrainBatcher, TrainDataset, ValDataset, val_batcher};
use crate::distill::{DistillConfig, TeacherData};
use crate::engine::carried::CarriedGradients;
use crate::engine::memory::{MemoryEstimate, MemoryPlan};
use crate::engine::{FitSettings, TrainTask, Validation, Verbosity};
use crate::error::{AtPath, TrainError};
use crate::eval::{CocoEvaluation, CocoResult, IouType, evaluate};
use crate::loss::{DistillLoss, LossConfig, LossParts};
use crate::optim::{
    OptimizerChoice, OptimizerKind, WarmupLinearSchedule, bias_group, build_optimizer, choose_optimizer,
};
use crate::plots;
use crate::split::StudentData;
use crate::student::{ModelEma, Student, StudentStep};

/// What a student's convolutions compute in while it trains (`--precision`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Float32 throughout.
    #[default]
    F32,
    /// Mixed precision: bf16 convolutions, float32 weights and everything else.
    Bf16,
    /// The same in f16 (GPUs without bf16 units), with dynamic loss scaling
    /// ([`crate::student::LossScaler`]): f16's range is too narrow for small gradients.
    F16,
}

impl Precision {
    pub fn compute_dtype(self) -> Option<burn::tensor::FloatDType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(burn::tensor::FloatDType::BF16),
            Precision::F16 => Some(burn::tensor::FloatDType::F16),
        }
    }
}

/// Everything a student run is made of; saved as `student_config.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudentConfig {
    pub model: String,
    /// Starting weights (an Ultralytics checkpoint or kiln safetensors); none: from scratch.
    pub weights: Option<PathBuf>,
    pub epochs: usize,
    pub batch_size: usize,
    pub imgsz: u32,
    pub optimizer: OptimizerKind,
    pub lr0: f64,
    pub lrf: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    /// Learning rate the biases start the warm-up from (Ultralytics' `warmup_bias_lr`).
    #[serde(default = "default_warmup_bias_lr")]
    pub warmup_bias_lr: f64,
    /// Nominal batch size (Ultralytics' `nbs`): the gradients of `round(nbs / batch_size)` batches
    /// are summed into one optimiser step (ramped up from 1 during the warm-up), and weight decay
    /// is scaled by `batch_size * accumulate / nbs`.
    #[serde(default = "default_nbs")]
    pub nbs: usize,
    pub close_mosaic: usize,
    /// Epochs without improvement before stopping; 0: never.
    pub patience: usize,
    pub max_grad_norm: f32,
    /// What the convolutions compute in while training: `f32`, `bf16` or `f16` (mixed precision:
    /// half-type convolutions over float32 weights, BatchNorm, loss and optimiser in float32; f16
    /// with dynamic loss scaling). Validation, the EMA and the saved weights are float32 either way.
    #[serde(default)]
    pub precision: Precision,
    pub seed: u64,
    pub loss: LossConfig,
    pub augment: AugmentConfig,
    /// What the user said about the objects and their scene (`--objects`, `--environment`,
    /// `--augment-intensity`), which chose `augment` (`crate::characteristics`).
    #[serde(default, skip_serializing_if = "Characteristics::is_empty")]
    pub characteristics: Characteristics,
    /// The `--preset` the run started from, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<crate::presets::Preset>,
    /// Class names, in class-index order, from the dataset.
    pub classes: Vec<String>,
    /// Category id per class index, from the dataset.
    pub category_ids: Vec<u64>,
    /// Distillation's weights and teacher-label settings, when the student learns from teachers
    /// (`configs/distill.yaml`; absent from a supervised run's config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
}

impl StudentConfig {
    /// These settings under `preset` (from kiln's defaults, before the data and the flags); the
    /// last third of a short run keeps mosaic off at most.
    pub fn apply_preset(&mut self, preset: crate::presets::Preset) {
        (self.epochs, self.imgsz, self.batch_size) = preset.student((self.epochs, self.imgsz, self.batch_size));
        self.close_mosaic = self.close_mosaic.min(self.epochs / 3);
        self.preset = Some(preset);
    }
}

impl Default for StudentConfig {
    fn default() -> Self {
        serde_yaml::from_str(DEFAULT_STUDENT_CONFIG).expect("configs/student.yaml parses")
    }
}

fn default_warmup_bias_lr() -> f64 {
    0.1
}

fn default_nbs() -> usize {
    64
}

/// kiln's defaults for a student run (`configs/student.yaml`, built in).
pub const DEFAULT_STUDENT_CONFIG: &str = include_str!("../../configs/student.yaml");

/// Validation images drawn with predictions in `val_predictions.jpg`.
const SHOWN_IMAGES: usize = 8;

/// What one epoch measured.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train: LossParts,
    pub val: LossParts,
    pub box_precision: f64,
    pub box_recall: f64,
    pub box_map50: f64,
    pub box_map: f64,
    pub mask_precision: f64,
    pub mask_recall: f64,
    pub mask_map50: f64,
    pub mask_map: f64,
    pub lr: f64,
    pub seconds: f64,
}

/// `results.csv` in Ultralytics' column names.
impl crate::engine::EpochRecord for EpochRecord {
    const CSV_HEADER: &'static str = "epoch,train/box_loss,train/seg_loss,train/cls_loss,train/dfl_loss,\
metrics/precision(B),metrics/recall(B),metrics/mAP50(B),metrics/mAP50-95(B),\
metrics/precision(M),metrics/recall(M),metrics/mAP50(M),metrics/mAP50-95(M),\
val/box_loss,val/seg_loss,val/cls_loss,val/dfl_loss,lr,seconds,train/distill_logit_loss,train/distill_mask_loss,train/distill_feature_loss,\
train/teacher_label_loss";

    fn csv_row(&self) -> String {
        let t = &self.train;
        let v = &self.val;
        format!(
            "{},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.6},{:.1},{:.5},{:.5},{:.5},{:.5}",
            self.epoch,
            t.box_loss,
            t.seg_loss,
            t.cls_loss,
            t.dfl_loss,
            self.box_precision,
            self.box_recall,
            self.box_map50,
            self.box_map,
            self.mask_precision,
            self.mask_recall,
            self.mask_map50,
            self.mask_map,
            v.box_loss,
            v.seg_loss,
            v.cls_loss,
            v.dfl_loss,
            self.lr,
            self.seconds,
            t.distill_logit_loss,
            t.distill_mask_loss,
            t.distill_feature_loss,
            t.teacher_label_loss
        )
    }
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub history: Vec<EpochRecord>,
    pub best_epoch: usize,
    pub best: EpochRecord,
    pub last_weights: PathBuf,
    pub best_weights: PathBuf,
    pub stopped_early: bool,
    pub seconds: f64,
    /// The memory estimate made when the run started (none when resumed).
    pub memory: Option<MemoryEstimate>,
    /// The run stopped after its memory estimate (`--dry-run`): nothing trained.
    pub dry_run: bool,
}

impl TrainSummary {
    fn dry_run(memory: Option<MemoryEstimate>) -> Self {
        Self {
            history: Vec::new(),
            best_epoch: 0,
            best: EpochRecord::default(),
            last_weights: PathBuf::new(),
            best_weights: PathBuf::new(),
            stopped_early: false,
            seconds: 0.0,
            memory,
            dry_run: true,
        }
    }
}

pub struct TrainOptions {
    pub config: StudentConfig,
    pub output: PathBuf,
    pub device: Device,
    /// Devices beside `device` that take a share of every step (data parallelism, `--device
    /// cuda:0,1`); empty: one device.
    pub data_parallel: Vec<Device>,
    /// Continue the run in `output` from its last complete epoch.
    pub resume: bool,
    pub verbosity: Verbosity,
    /// Stop after this many epochs of this invocation (tests of resumption); none: run to the end.
    pub stop_after_epochs: Option<usize>,
    /// Stop after the memory estimate, before the first step.
    pub dry_run: bool,
}

/// Trains a student. The run directory must be new (or `resume` set, to continue it).
pub fn train_student(options: TrainOptions, data: StudentData) -> Result<TrainSummary, TrainError> {
    train_student_with(options, data, None)
}

/// Trains a student on its labelled data and, with `teachers`, on what the teachers add.
pub fn train_student_with(
    options: TrainOptions,
    data: StudentData,
    teachers: Option<TeacherData>,
) -> Result<TrainSummary, TrainError> {
    let TrainOptions { config, output, device, data_parallel, resume, verbosity, stop_after_epochs, dry_run } = options;
    // An iteration is one batch on every device: a step sees `devices` batches.
    let devices = 1 + data_parallel.len();
    let yolo_config: YoloConfig = config.model.parse().map_err(|e: String| TrainError::Config(e))?;
    let yolo_config = yolo_config.with_num_classes(config.classes.len());
    let masks = yolo_config.task == Task::Segment;
    if config.imgsz % 32 != 0 || config.imgsz < 64 {
        return Err(TrainError::Config(format!("--imgsz {} must be a multiple of 32, at least 64", config.imgsz)));
    }
    if data.train.images.is_empty() || data.val.images.is_empty() {
        return Err(TrainError::Config("the training and validation sets both need images".into()));
    }
    // Refused before anything is written.
    if let Some(dtype) = config.precision.compute_dtype() {
        if let Some(lacking) = std::iter::once(&device).chain(&data_parallel).find(|d| !d.supports_dtype(dtype)) {
            return Err(TrainError::Config(format!(
                "--precision {}: {} cannot compute in it; use --precision f32 or another device",
                serde_yaml::to_string(&config.precision).unwrap_or_default().trim(),
                kiln_models::device::describe(lacking)
            )));
        }
    }
    let logit_weight = match (config.distill, teachers.as_ref().and_then(|t| t.logit_weight)) {
        (Some(_), Some(chosen)) => Some(chosen),
        (Some(settings), None) => Some(settings.logit_weight()?),
        (None, _) => None,
    };
    let checkpoint_dir = output.join("checkpoint");
    let resume_from = if resume { crate::engine::resume_point(&checkpoint_dir, &["ema-{}.safetensors"]) } else { None };
    std::fs::create_dir_all(output.join("weights")).at(&output)?;
    kiln_data::io::write_atomic(
        &output.join("student_config.yaml"),
        serde_yaml::to_string(&config).map_err(|e| TrainError::Config(e.to_string()))?.as_bytes(),
    )?;

    let (labelled_signals, labelled_features, unlabelled, feature_channels) = match teachers {
        Some(t) => (t.labelled_signals, t.labelled_features, t.unlabelled, t.feature_channels),
        None => (HashMap::new(), HashMap::new(), None, None),
    };
    let train_source = Arc::new(
        CocoDetectionDataset::new(data.train.clone(), &data.train_images)
            .with_signals(labelled_signals)
            .with_features(labelled_features),
    );
    let mut train_sources = vec![train_source.clone()];
    if let Some(part) = unlabelled {
        train_sources.push(Arc::new(
            CocoDetectionDataset::new(part.dataset, part.images_dir)
                .with_signals(part.signals)
                .with_features(part.features),
        ));
    }
    let train_images: usize = train_sources.iter().map(|s| burn::data::dataset::Dataset::len(s.as_ref())).sum();
    let val_source = Arc::new(CocoDetectionDataset::new(data.val.clone(), &data.val_images));
    let epoch_counter = EpochCounter::default();
    let mask_downsample = masks.then_some(4);
    let train_dataset = Arc::new(
        TrainDataset::new(
            train_sources,
            config.augment,
            config.imgsz,
            mask_downsample,
            config.seed,
            config.epochs,
            config.close_mosaic,
            epoch_counter.clone(),
        )
        .with_mosaic_buffer(train_images.min(config.batch_size * 8).min(1000))
        .with_overlap_masks(config.loss.overlap_mask),
    );
    if resume_from.is_none() {
        write_training_samples(&train_dataset, &config.classes, &output.join("train_batches.jpg"))?;
    }
    let iterations_per_epoch = crate::engine::iterations_per_epoch(train_images, config.batch_size, devices);
    // The data loaders run on the training thread: batches then come in a fixed order, which makes
    // a resumed run equal to an uninterrupted one.
    let train_loader = DataLoaderBuilder::new(TrainBatcher { image_size: config.imgsz, mask_downsample })
        .batch_size(config.batch_size)
        .num_workers(0)
        .set_device(device.clone().autodiff())
        .build(train_dataset.clone());
    let val_loader = DataLoaderBuilder::new(val_batcher(config.imgsz, masks, config.loss.overlap_mask))
        .batch_size(config.batch_size)
        .num_workers(0)
        .set_device(device.clone())
        .build(ValDataset(val_source.clone()));

    let autodiff = device.clone().autodiff();
    // From scratch: PyTorch's draws in Ultralytics' order, so `--seed s` starts from the weights
    // Ultralytics' `seed=s` run starts from; on the host, so one start on every device.
    let yolo = match &config.weights {
        Some(path) => YoloV8::load(&yolo_config, path, &autodiff)?,
        None => {
            crate::engine::init_seeded(config.seed, &autodiff, |on| yolo_config.init_drawn_as_pytorch(config.seed, on))
        }
    };
    let initial_ema = burn::module::Module::valid(&yolo);
    // Mixed precision on the model that trains only: the EMA validates and saves in float32.
    let yolo = yolo.with_compute(config.precision.compute_dtype());
    let distill = config.distill.map(|d| DistillLoss {
        teacher_labels: d.teacher_labels,
        logit: logit_weight.unwrap_or(0.0),
        temperature: d.temperature,
        mask: d.mask,
        feature: d.feature,
    });
    // Drawn from its own seed, so that the model's initial weights do not depend on it; P4's width
    // is the model's own (a pruned student's may be narrower than its config's).
    let projection = match (feature_channels, distill) {
        (Some(channels), Some(d)) if d.feature > 0.0 => {
            let width = yolo.bottom_up_p4.cv2.bn.gamma.dims()[0];
            Some(crate::engine::init_seeded(config.seed.wrapping_add(1), &autodiff, |on| {
                burn::nn::conv::Conv2dConfig::new([width, channels], [1, 1]).init(on)
            }))
        }
        _ => None,
    };
    // f16: PyTorch's GradScaler grows from 2^16; kiln's loss is scaled by the batch size (as
    // Ultralytics'), so its gradients are larger and it starts lower.
    let loss_scaler = (config.precision == Precision::F16).then(|| crate::student::LossScaler::new(1024.0, 2000));
    let student =
        Student { yolo, projection, loss: config.loss, distill, max_grad_norm: config.max_grad_norm, loss_scaler };
    let accumulation =
        Accumulation::new(config.nbs, config.batch_size * devices).within(iterations_per_epoch * config.epochs);
    let samples = train_images;
    let choice = choose_optimizer(
        config.optimizer,
        config.lr0,
        config.momentum,
        samples.div_ceil((config.batch_size * devices).max(accumulation.nbs)) * config.epochs,
        config.classes.len(),
    );
    let optimizer = build_optimizer(&choice, config.weight_decay * accumulation.weight_decay_scale());
    // Ultralytics 8.4: the warm-up leaves at least the last epoch at the scheduled rate.
    let warmup_epochs = config.warmup_epochs.min(config.epochs.saturating_sub(1) as f64).max(0.0);
    // Ultralytics' `nw`: 0 is no warm-up at all.
    let warmup = (warmup_epochs * iterations_per_epoch as f64).round() as usize;
    let schedule = |warmup_start: f64| WarmupLinearSchedule {
        lr0: choice.lr0,
        lrf: config.lrf,
        epochs: config.epochs,
        iterations_per_epoch,
        warmup_iterations: warmup,
        warmup_start,
        lead: 0,
        step: 0,
    };
    // `auto` starts the biases' warm-up at 0 too, as Ultralytics does.
    let bias_start = if config.optimizer == OptimizerKind::Auto { 0.0 } else { config.warmup_bias_lr };
    let scheduler = ModuleLrScheduler::new(schedule(0.0)).with_group(bias_group(), schedule(bias_start));

    // The step measured on the most annotated images, in mosaics of them: a step's worst case.
    let batcher = TrainBatcher { image_size: config.imgsz, mask_downsample };
    let heaviest = crate::data::most_annotated_first(&data.train);
    let batch_of = |images: usize| -> Result<DetectionBatch, TrainError> {
        let items = (0..images)
            .map(|i| {
                let mosaic: Vec<usize> = (0..4).map(|k| heaviest[(i + k) % heaviest.len()]).collect();
                train_dataset.sample_of(&mosaic, i as u64)
            })
            .collect::<Result<_, _>>()?;
        Ok(burn::data::dataloader::batcher::Batcher::batch(&batcher, items, &autodiff))
    };
    let plan = MemoryPlan {
        batch_size: config.batch_size,
        optimizer_slots: choice.state_slots(),
        accumulates: accumulation.batches > 1,
        ema: true,
    };
    let memory = crate::engine::memory::estimate_at_start(
        &student,
        batch_of,
        plan,
        (!dry_run).then_some(train_images),
        &autodiff,
        resume_from.is_some(),
        verbosity,
    )?;
    if dry_run {
        return Ok(TrainSummary::dry_run(memory));
    }
    let task = StudentTask {
        settings: FitSettings::new(
            output.clone(),
            autodiff.clone(),
            config.epochs,
            config.patience,
            iterations_per_epoch,
            verbosity,
            resume_from,
            stop_after_epochs,
        )
        .with_memory(memory.clone())
        .with_data_parallel(data_parallel.iter().map(|d| d.clone().autodiff()).collect()),
        widths: match &config.weights {
            Some(path) => kiln_models::yolo::prune::widths_in_file(path)?,
            None => None,
        },
        config: config.clone(),
        choice,
        masks,
        val_truth: data.val.clone(),
        val_source: val_source.clone(),
        epoch_counter,
        initial_ema,
        accumulation,
        warmup_iterations: warmup,
    };
    let outcome = crate::engine::launch(
        task,
        Learner::new(student, optimizer, scheduler),
        train_loader,
        val_loader,
        resume_from,
    )?;
    let state = outcome.state;
    let best = state.history.iter().find(|r| r.epoch == state.best_epoch).copied().unwrap_or_default();
    Ok(TrainSummary {
        history: state.history,
        best_epoch: state.best_epoch,
        best,
        last_weights: output.join("weights/last.safetensors"),
        best_weights: output.join("weights/best.safetensors"),
        stopped_early: outcome.stopped_early,
        seconds: outcome.seconds,
        memory,
        dry_run: false,
    })
}

/// The student run on the engine: the EMA of the weights is what is validated and saved.
struct StudentTask {
    settings: FitSettings,
    config: StudentConfig,
    /// The channel widths of a pruned student being fine-tuned (from its weights file), saved
    /// with every checkpoint and weights file so they load back.
    widths: Option<kiln_models::yolo::prune::Widths>,
    choice: OptimizerChoice,
    masks: bool,
    val_truth: CocoDataset,
    val_source: Arc<CocoDetectionDataset>,
    epoch_counter: EpochCounter,
    initial_ema: YoloV8,
    accumulation: Accumulation,
    warmup_iterations: usize,
}

/// What the student changes while it trains.
struct StudentLive {
    ema: ModelEma,
    /// Gradients summed over the batches of one optimiser step.
    accumulator: GradientsAccumulator<Student>,
    pending: usize,
    /// The accumulated gradients the epoch's end left pending, read for its checkpoint.
    carried: Option<Result<CarriedGradients, TrainError>>,
    /// A resumed run's pending gradients, put back before its first batch's are added.
    restore: Option<CarriedGradients>,
    sums: LossParts,
    seen: usize,
}

/// What a resumed student run needs back beyond its EMA file.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct StudentState {
    ema_updates: usize,
    /// Batches whose gradients the epoch's end left pending (in `grads-N.bin`).
    #[serde(default)]
    pending_batches: usize,
}

/// The validation of an epoch: losses and the COCO evaluations.
struct StudentFigures {
    val: LossParts,
    boxes: CocoEvaluation,
    masks: Option<CocoEvaluation>,
}

/// What the student's figures draw: the PR curves and the first validation images' detections.
struct StudentShown {
    box_curve: Vec<(f64, f64)>,
    mask_curve: Option<Vec<(f64, f64)>>,
    detections: Vec<Vec<Detection>>,
}

impl TrainTask for StudentTask {
    type Model = Student;
    type Parts = LossParts;
    type Record = EpochRecord;
    type State = StudentState;
    type Live = StudentLive;
    type Figures = StudentFigures;
    type Shown = StudentShown;
    const CHECKPOINT_FILES: &'static [&'static str] = &["ema-{}.safetensors", "grads-{}.bin"];
    // Ultralytics' loss is scaled by the batch size: the devices' batches sum to the whole step's.
    const SUM_DEVICE_GRADIENTS: bool = true;

    fn settings(&self) -> &FitSettings {
        &self.settings
    }

    fn start(&self, starting_epoch: usize, state: &StudentState) -> Result<StudentLive, TrainError> {
        let ema = if starting_epoch > 1 {
            let checkpoint = self.settings.run_dir.join(format!("checkpoint/ema-{}.safetensors", starting_epoch - 1));
            let ema_model = YoloV8::load(&self.yolo_config(), &checkpoint, &self.settings.device.clone().inner())?;
            ModelEma::new(burn::module::Module::valid(&ema_model), state.ema_updates)
        } else {
            ModelEma::new(self.initial_ema.clone(), 0)
        };
        let restore = if starting_epoch > 1 && state.pending_batches > 0 {
            let path = self.settings.run_dir.join(format!("checkpoint/grads-{}.bin", starting_epoch - 1));
            Some(CarriedGradients::load(&path)?)
        } else {
            None
        };
        Ok(StudentLive {
            ema,
            accumulator: GradientsAccumulator::new(),
            pending: if restore.is_some() { state.pending_batches } else { 0 },
            carried: None,
            restore,
            sums: LossParts::default(),
            seen: 0,
        })
    }

    fn start_epoch(&self, live: &mut StudentLive, epoch: usize) {
        self.epoch_counter.set(epoch);
        live.sums = LossParts::default();
        live.seen = 0;
    }

    /// Gradients are summed over `accumulation.at(..)` batches per optimiser step, counted across
    /// epochs as Ultralytics' `last_opt_step` (a step the epoch's end cuts goes on in the next
    /// epoch; the last epoch's unfinished one is not taken), and the EMA follows every step.
    fn optimizer_step(
        &self,
        live: &mut StudentLive,
        learner: &mut Learner<Student>,
        grads: GradientsParams,
        iteration: usize,
        last_of_epoch: bool,
    ) {
        if let Some(restore) = live.restore.take() {
            match restore.to_grads(&learner.model(), &self.settings.device.clone().inner()) {
                Ok(pending) => live.accumulator.accumulate(&learner.model(), pending),
                Err(e) => {
                    eprintln!("warning: {e}; the resumed run's first step starts without them");
                    live.pending = 0;
                }
            }
        }
        live.accumulator.accumulate(&learner.model(), grads);
        live.pending += 1;
        live.carried = None;
        if live.pending >= self.accumulation.at(iteration, self.warmup_iterations) {
            learner.optimizer_step(live.accumulator.grads());
            live.ema.update(&learner.model().yolo);
            live.pending = 0;
        } else if last_of_epoch {
            // Without a step (whose EMA update does it) the last batch's BatchNorm update stays
            // aside (burn applies it at the next forward), and the checkpoint would miss it.
            let _ = burn::module::Module::valid(&learner.model().yolo);
            let pending = live.accumulator.grads();
            live.carried = Some(CarriedGradients::read(&learner.model(), &pending));
            live.accumulator.accumulate(&learner.model(), pending);
        }
    }

    fn accumulate(&self, live: &mut StudentLive, item: StudentStep) -> Result<String, TrainError> {
        live.sums = add(live.sums, item.parts, item.count as f32);
        live.seen += item.count;
        let mean = scale(live.sums, 1.0 / live.seen.max(1) as f32);
        let seg = if self.masks { format!(" seg {:.3}", mean.seg_loss) } else { String::new() };
        let distill = if self.config.distill.is_some() {
            format!(
                " kd-logit {:.3} kd-mask {:.3} kd-feature {:.3} kd-label {:.3}",
                mean.distill_logit_loss, mean.distill_mask_loss, mean.distill_feature_loss, mean.teacher_label_loss
            )
        } else {
            String::new()
        };
        Ok(format!("box {:.3} cls {:.3} dfl {:.3}{seg}{distill}", mean.box_loss, mean.cls_loss, mean.dfl_loss))
    }

    fn validate(
        &self,
        live: &StudentLive,
        _learner: &Learner<Student>,
        loader: &dyn DataLoader<DetectionBatch>,
    ) -> Result<Validation<StudentFigures, StudentShown>, TrainError> {
        let (val, boxes, masks, detections) = self.validate_model(&live.ema.model, loader)?;
        // What "best" means: mask mAP50-95 when the model makes masks, else box mAP50-95.
        let fitness = match &masks {
            Some(masks) if self.masks => masks.ap().max(0.0),
            _ => boxes.ap().max(0.0),
        };
        let shown = StudentShown {
            box_curve: boxes.pr_curve_50(),
            mask_curve: masks.as_ref().map(|m| m.pr_curve_50()),
            detections,
        };
        Ok(Validation { figures: StudentFigures { val, boxes, masks }, fitness, shown })
    }

    fn record(&self, live: &StudentLive, epoch: usize, figures: StudentFigures, lr: f64, seconds: f64) -> EpochRecord {
        let (boxes, masks) = (&figures.boxes, figures.masks.as_ref());
        EpochRecord {
            epoch,
            train: scale(live.sums, 1.0 / live.seen.max(1) as f32),
            val: figures.val,
            box_precision: boxes.best_f1.precision,
            box_recall: boxes.best_f1.recall,
            box_map50: boxes.ap50().max(0.0),
            box_map: boxes.ap().max(0.0),
            mask_precision: masks.map_or(0.0, |e| e.best_f1.precision),
            mask_recall: masks.map_or(0.0, |e| e.best_f1.recall),
            mask_map50: masks.map_or(0.0, |e| e.ap50().max(0.0)),
            mask_map: masks.map_or(0.0, |e| e.ap().max(0.0)),
            lr,
            seconds,
        }
    }

    fn save_weights(&self, live: &StudentLive, _learner: &Learner<Student>, best: bool) -> Result<(), TrainError> {
        let metadata = self.weights_metadata();
        live.ema.model.save(&self.settings.run_dir.join("weights/last.safetensors"), &metadata)?;
        if best {
            live.ema.model.save(&self.settings.run_dir.join("weights/best.safetensors"), &metadata)?;
        }
        Ok(())
    }

    fn write_figures(&self, history: &[EpochRecord], shown: &StudentShown) -> Result<(), TrainError> {
        let run_dir = &self.settings.run_dir;
        plots::save(&results_figure(history, self.masks), &run_dir.join("results.png"))?;
        plots::save(&plots::pr_figure(&shown.box_curve, shown.mask_curve.as_deref()), &run_dir.join("pr_curve.png"))?;
        let mut pictures = Vec::new();
        for (index, detections) in shown.detections.iter().enumerate() {
            let mut image = self.val_source.load(index)?.image;
            plots::draw_detections(&mut image, detections, &self.config.classes);
            pictures.push(image);
        }
        if !pictures.is_empty() {
            plots::save(&plots::grid(&pictures, 4, 320), &run_dir.join("val_predictions.jpg"))?;
        }
        Ok(())
    }

    fn report(&self, r: &EpochRecord) -> String {
        let masks = if self.masks {
            format!(
                "  mask P {:.3} R {:.3} mAP50 {:.3} mAP50-95 {:.3}",
                r.mask_precision, r.mask_recall, r.mask_map50, r.mask_map
            )
        } else {
            String::new()
        };
        format!(
            "epoch {:>3}/{}  loss {:.3}  box P {:.3} R {:.3} mAP50 {:.3} mAP50-95 {:.3}{masks}  ({:.0}s)",
            r.epoch,
            self.config.epochs,
            r.train.sum(),
            r.box_precision,
            r.box_recall,
            r.box_map50,
            r.box_map,
            r.seconds
        )
    }

    fn checkpoint(&self, live: &StudentLive, epoch: usize) -> Result<StudentState, TrainError> {
        let path = self.settings.run_dir.join(format!("checkpoint/ema-{epoch}.safetensors"));
        live.ema.model.save(&path, &self.weights_metadata())?;
        let pending_batches = match &live.carried {
            Some(Ok(carried)) => {
                carried.save(&self.settings.run_dir.join(format!("checkpoint/grads-{epoch}.bin")))?;
                live.pending
            }
            Some(Err(e)) => return Err(TrainError::Training(format!("reading the pending gradients back: {e}"))),
            None => 0,
        };
        Ok(StudentState { ema_updates: live.ema.updates, pending_batches })
    }
}

impl StudentTask {
    fn yolo_config(&self) -> YoloConfig {
        let config: YoloConfig = self.config.model.parse().expect("checked before training");
        config.with_num_classes(self.config.classes.len())
    }

    fn weights_metadata(&self) -> Vec<(String, String)> {
        vec![
            ("kiln.model".into(), self.config.model.clone()),
            ("kiln.classes".into(), serde_json::to_string(&self.config.classes).expect("names serialise")),
            ("kiln.category_ids".into(), serde_json::to_string(&self.config.category_ids).expect("ids serialise")),
            ("kiln.imgsz".into(), self.config.imgsz.to_string()),
            ("kiln.optimizer".into(), format!("{:?}", self.choice.kind).to_lowercase()),
        ]
        .into_iter()
        .chain(self.widths.as_ref().map(|w| {
            (kiln_models::yolo::prune::WIDTHS_KEY.into(), serde_json::to_string(w).expect("widths serialise"))
        }))
        .collect()
    }

    /// Validation loss and COCO metrics of `model` (the EMA) on the validation set, with the
    /// detections of the first images (score 0.25 and up) to draw.
    fn validate_model(
        &self,
        model: &YoloV8,
        loader: &dyn DataLoader<DetectionBatch>,
    ) -> Result<(LossParts, CocoEvaluation, Option<CocoEvaluation>, Vec<Vec<Detection>>), TrainError> {
        let options = PredictOptions::validation();
        // Validated as inference runs it: BatchNorm folded into the convolutions (on flex, kiln's
        // fused convolution: the same outputs to float rounding, the network's forward pass in a
        // third of the time), on a copy: the EMA keeps its BatchNorm to go on averaging and saving.
        let folded = model.clone().fold_batch_norms();
        let model = &folded;
        let mut shown = Vec::new();
        let bar = crate::engine::epoch_bar(self.settings.verbosity, loader.num_items() as u64, "validating");
        let mut results = Vec::new();
        let mut sums = LossParts::default();
        let mut seen = 0usize;
        let mut iterator = loader.iter();
        while let Some(batch) = iterator.next() {
            let batch = batch?;
            let images = batch.images.dims()[0];
            let output = model.forward(batch.images.clone());
            let loss = crate::loss::yolo_loss(&self.config.loss, &output, &crate::loss::Targets::from(&batch))?;
            sums = add(sums, loss.parts, images as f32);
            seen += images;
            let detections = model.postprocess(&output, &batch.letterboxes, &options)?;
            for (image_id, detections) in batch.image_ids.iter().zip(detections) {
                results.extend(to_coco_results(*image_id, &detections, &self.config.category_ids));
                if shown.len() < SHOWN_IMAGES {
                    shown.push(detections.into_iter().filter(|d| d.score >= 0.25).collect());
                }
            }
            bar.inc(images as u64);
        }
        bar.finish_and_clear();
        let box_eval = evaluate(&self.val_truth, &results, IouType::Bbox)?;
        let mask_eval = if self.masks { Some(evaluate(&self.val_truth, &results, IouType::Segm)?) } else { None };
        Ok((scale(sums, 1.0 / seen.max(1) as f32), box_eval, mask_eval, shown))
    }
}

/// `results.png`: train and val losses, then box (and mask) precision, recall, mAP50, mAP50-95.
pub fn results_figure(history: &[EpochRecord], masks: bool) -> image::RgbImage {
    use crate::plots::{BLUE, ORANGE, chart, tile};
    let series = |f: &dyn Fn(&EpochRecord) -> f64| history.iter().map(|r| (r.epoch as f64, f(r))).collect::<Vec<_>>();
    let both = |title: &str, t: &dyn Fn(&EpochRecord) -> f64, v: &dyn Fn(&EpochRecord) -> f64| {
        chart(title, &[("train", BLUE, series(t)), ("val", ORANGE, series(v))], 320, 200)
    };
    let one = |title: &str, f: &dyn Fn(&EpochRecord) -> f64| chart(title, &[("", BLUE, series(f))], 320, 200);
    let mut panels = vec![
        both("box loss", &|r| r.train.box_loss as f64, &|r| r.val.box_loss as f64),
        both("cls loss", &|r| r.train.cls_loss as f64, &|r| r.val.cls_loss as f64),
        both("dfl loss", &|r| r.train.dfl_loss as f64, &|r| r.val.dfl_loss as f64),
    ];
    if masks {
        panels.push(both("seg loss", &|r| r.train.seg_loss as f64, &|r| r.val.seg_loss as f64));
    }
    panels.extend([
        one("precision (B)", &|r| r.box_precision),
        one("recall (B)", &|r| r.box_recall),
        one("mAP50 (B)", &|r| r.box_map50),
        one("mAP50-95 (B)", &|r| r.box_map),
    ]);
    if masks {
        panels.extend([
            one("precision (M)", &|r| r.mask_precision),
            one("recall (M)", &|r| r.mask_recall),
            one("mAP50 (M)", &|r| r.mask_map50),
            one("mAP50-95 (M)", &|r| r.mask_map),
        ]);
    }
    tile(&panels, 4)
}

/// Ultralytics' gradient accumulation to a nominal batch size: `round(nbs / batch)` batches per
/// optimiser step, ramped up linearly from 1 over the warm-up (rounding half to even, as Python).
#[derive(Debug, Clone, Copy)]
pub struct Accumulation {
    pub nbs: usize,
    pub batch_size: usize,
    /// Batches per optimiser step after the warm-up.
    pub batches: usize,
    /// `round(nbs / batch_size)`, what the weight decay is scaled by even where a short run
    /// caps `batches`.
    nominal: usize,
}

impl Accumulation {
    pub fn new(nbs: usize, batch_size: usize) -> Self {
        let nbs = nbs.max(1);
        let batch_size = batch_size.max(1);
        let nominal = ((nbs as f64 / batch_size as f64).round_ties_even() as usize).max(1);
        Self { nbs, batch_size, batches: nominal, nominal }
    }

    /// At most the run's `batches` in one step (Ultralytics 8.4 caps `accumulate` at the run's
    /// batches, so that a run shorter than one nominal batch still takes a step).
    pub fn within(self, batches: usize) -> Self {
        Self { batches: self.batches.min(batches.max(1)), ..self }
    }

    /// Weight decay is given for a batch of `nbs` images (`weight_decay * batch * accumulate / nbs`).
    pub fn weight_decay_scale(&self) -> f64 {
        (self.batch_size * self.nominal) as f64 / self.nbs as f64
    }

    /// Batches per step at global batch `iteration` (0-based) of a `warmup`-batch warm-up.
    pub fn at(&self, iteration: usize, warmup: usize) -> usize {
        if warmup == 0 || iteration > warmup {
            return self.batches;
        }
        let t = iteration as f64 / warmup.max(1) as f64;
        ((1.0 + t * (self.batches as f64 - 1.0)).round_ties_even() as usize).max(1)
    }
}

/// Training samples shown with their labels.
const SHOWN_SAMPLES: usize = 16;

/// `train_batches.jpg`: the first epoch's first augmented samples with their boxes, classes and
/// masks, to check the labels and the augmentation at a glance.
fn write_training_samples(dataset: &TrainDataset, classes: &[String], path: &Path) -> Result<(), TrainError> {
    let mut pictures = Vec::new();
    for position in 0..SHOWN_SAMPLES.min(burn::data::dataset::Dataset::len(dataset)) {
        let sample = dataset.sample(1, position)?;
        let mut image = sample.image;
        crate::plots::draw_labels(&mut image, &sample.boxes, &sample.masks, classes);
        pictures.push(image);
    }
    if !pictures.is_empty() {
        crate::plots::save(&crate::plots::grid(&pictures, 4, 320), path)?;
    }
    Ok(())
}

/// Detections of one image as COCO results (boxes `x, y, w, h`; masks as compressed RLE).
pub fn to_coco_results(
    image_id: u64,
    detections: &[kiln_models::yolo::predict::Detection],
    category_ids: &[u64],
) -> Vec<CocoResult> {
    detections
        .iter()
        .map(|d| {
            let [x1, y1, x2, y2] = d.bbox.map(|v| v as f64);
            CocoResult {
                image_id,
                category_id: category_ids.get(d.class_id).copied().unwrap_or(d.class_id as u64),
                bbox: [x1, y1, x2 - x1, y2 - y1],
                score: d.score as f64,
                segmentation: d.mask.as_ref().map(|m| Rle::encode(m).to_json(true)),
            }
        })
        .collect()
}

fn add(a: LossParts, b: LossParts, weight: f32) -> LossParts {
    LossParts {
        box_loss: a.box_loss + b.box_loss * weight,
        cls_loss: a.cls_loss + b.cls_loss * weight,
        dfl_loss: a.dfl_loss + b.dfl_loss * weight,
        seg_loss: a.seg_loss + b.seg_loss * weight,
        distill_logit_loss: a.distill_logit_loss + b.distill_logit_loss * weight,
        distill_mask_loss: a.distill_mask_loss + b.distill_mask_loss * weight,
        distill_feature_loss: a.distill_feature_loss + b.distill_feature_loss * weight,
        teacher_label_loss: a.teacher_label_loss + b.teacher_label_loss * weight,
    }
}

fn scale(a: LossParts, factor: f32) -> LossParts {
    add(LossParts::default(), a, factor)
}

#[cfg(test)]
mod tests {
    use super::Accumulation;

    #[test]
    fn accumulation_follows_ultralytics() {
        let a = Accumulation::new(64, 8);
        assert_eq!(a.batches, 8);
        assert_eq!(a.weight_decay_scale(), 1.0);
        // Ramped from 1 over the warm-up, rounding half to even as numpy does (4.5 -> 4).
        assert_eq!([a.at(0, 96), a.at(48, 96), a.at(96, 96), a.at(500, 96)], [1, 4, 8, 8]);
        assert_eq!(a.at(0, 0), 8, "without a warm-up (Ultralytics' nw = 0) every step is a nominal one");
        let b = Accumulation::new(64, 24);
        assert_eq!(b.batches, 3);
        assert_eq!(b.weight_decay_scale(), 72.0 / 64.0);
        assert_eq!(Accumulation::new(64, 128).batches, 1);
        // A run of 12 batches in all steps after at most 12; its weight decay stays scaled by 16.
        let short = Accumulation::new(64, 4).within(12);
        assert_eq!((short.batches, short.weight_decay_scale()), (12, 1.0));
    }
}
