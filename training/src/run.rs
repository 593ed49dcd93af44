//! A student training run: burn-train's `SupervisedTraining` + `Learner` with kiln's own epoch
//! loop (a custom training strategy) so that each epoch can keep the weight EMA, evaluate it with
//! the COCO protocol, write `results.csv`, `weights/{last,best}.safetensors` and a resumable
//! checkpoint, and stop early. Layout of a run directory:
//!
//! ```text
//! student_config.yaml  metadata.json  results.csv
//! weights/last.safetensors  weights/best.safetensors   (EMA weights, official key names)
//! checkpoint/{model,optim,scheduler}-N.bpk             (burn-train: resume state)
//! checkpoint/ema-N.safetensors  checkpoint/state-N.json (kiln: EMA and best-so-far)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::data::dataloader::DataLoader;
use burn::data::dataloader::DataLoaderBuilder;
use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::optim::GradientsAccumulator;
use burn::tensor::Device;
use burn::train::EventProcessorTraining;
use burn::train::{
    Learner, LearnerEvent, SupervisedLearningStrategy, SupervisedTrainingEventProcessor, TrainLoader,
    TrainingComponents, ValidLoader,
};
use indicatif::ProgressBar;
use kiln_data::batch::{CocoDetectionDataset, DetectionBatch};
use kiln_data::coco::CocoDataset;
use kiln_data::mask::Rle;
use kiln_models::yolo::predict::PredictOptions;
use kiln_models::yolo::{Task, YoloConfig, YoloV8};
use serde::{Deserialize, Serialize};

use crate::augment::AugmentConfig;
use crate::data::{EpochCounter, TrainBatcher, TrainDataset, ValDataset, val_batcher};
use crate::eval::{CocoEvaluation, CocoResult, IouType, evaluate};
use crate::loss::{LossConfig, LossParts};
use crate::student::{
    ModelEma, OptimizerChoice, OptimizerKind, Student, YoloLrSchedule, bias_group, build_optimizer, choose_optimizer,
};

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
    pub seed: u64,
    pub loss: LossConfig,
    pub augment: AugmentConfig,
    /// Class names, in class-index order, from the dataset.
    pub classes: Vec<String>,
    /// Category id per class index, from the dataset.
    pub category_ids: Vec<u64>,
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

impl EpochRecord {
    /// What "best" means: mask mAP50-95 when the model makes masks, else box mAP50-95.
    pub fn fitness(&self, masks: bool) -> f64 {
        if masks { self.mask_map } else { self.box_map }
    }

    pub const CSV_HEADER: &'static str = "epoch,train/box_loss,train/seg_loss,train/cls_loss,train/dfl_loss,\
metrics/precision(B),metrics/recall(B),metrics/mAP50(B),metrics/mAP50-95(B),\
metrics/precision(M),metrics/recall(M),metrics/mAP50(M),metrics/mAP50-95(M),\
val/box_loss,val/seg_loss,val/cls_loss,val/dfl_loss,lr,seconds";

    pub fn csv_row(&self) -> String {
        let t = &self.train;
        let v = &self.val;
        format!(
            "{},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.6},{:.1}",
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
            self.seconds
        )
    }
}

/// What kiln keeps beside burn-train's checkpoint to resume exactly.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RunState {
    epoch: usize,
    ema_updates: usize,
    best_fitness: f64,
    best_epoch: usize,
    history: Vec<EpochRecord>,
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
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    #[error(transparent)]
    Weights(#[from] kiln_models::weights::WeightsError),
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),
    #[error(transparent)]
    Device(#[from] kiln_models::DeviceError),
    #[error(transparent)]
    Loss(#[from] crate::loss::LossError),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
    #[error("training failed: {0}")]
    Training(String),
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io { path: path.to_path_buf(), message: e.to_string() }
}

/// Datasets and where the images are.
pub struct StudentData {
    pub train: CocoDataset,
    pub val: CocoDataset,
    pub train_images: PathBuf,
    pub val_images: PathBuf,
}

/// How the run reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    Quiet,
    Progress,
}

pub struct TrainOptions {
    pub config: StudentConfig,
    pub output: PathBuf,
    pub device: Device,
    /// Continue the run in `output` from its last complete epoch.
    pub resume: bool,
    pub verbosity: Verbosity,
    /// Stop after this many epochs of this invocation (tests of resumption); none: run to the end.
    pub stop_after_epochs: Option<usize>,
}

/// Trains a student. The run directory must be new (or `resume` set, to continue it).
pub fn train_student(options: TrainOptions, data: StudentData) -> Result<TrainSummary, TrainError> {
    let TrainOptions { config, output, device, resume, verbosity, stop_after_epochs } = options;
    let yolo_config: YoloConfig = config.model.parse().map_err(|e: String| TrainError::Config(e))?;
    let yolo_config = yolo_config.with_num_classes(config.classes.len());
    let masks = yolo_config.task == Task::Segment;
    if config.imgsz % 32 != 0 || config.imgsz < 64 {
        return Err(TrainError::Config(format!("--imgsz {} must be a multiple of 32, at least 64", config.imgsz)));
    }
    if data.train.images.is_empty() || data.val.images.is_empty() {
        return Err(TrainError::Config("the training and validation sets both need images".into()));
    }
    let checkpoint_dir = output.join("checkpoint");
    let resume_from = if resume {
        Some(crate::engine::resume_point(&output, &checkpoint_dir, &["ema-{}.safetensors"])?)
    } else {
        None
    };
    std::fs::create_dir_all(output.join("weights")).map_err(|e| io_error(&output, e))?;
    kiln_data::io::write_atomic(
        &output.join("student_config.yaml"),
        serde_yaml::to_string(&config).map_err(|e| TrainError::Config(e.to_string()))?.as_bytes(),
    )?;

    let train_source = Arc::new(CocoDetectionDataset::new(data.train.clone(), &data.train_images));
    let val_source = Arc::new(CocoDetectionDataset::new(data.val.clone(), &data.val_images));
    let epoch_counter = EpochCounter::default();
    let mask_downsample = masks.then_some(4);
    let train_dataset = TrainDataset::new(
        train_source.clone(),
        config.augment,
        config.imgsz,
        mask_downsample,
        config.seed,
        config.epochs,
        config.close_mosaic,
        epoch_counter.clone(),
    );
    if resume_from.is_none() {
        write_training_samples(&train_dataset, &config.classes, &output.join("train_batches.jpg"))?;
    }
    let iterations_per_epoch = data.train.images.len().div_ceil(config.batch_size);
    // The data loaders run on the training thread: batches then come in a fixed order, which makes
    // a resumed run equal to an uninterrupted one.
    let train_loader = DataLoaderBuilder::new(TrainBatcher { image_size: config.imgsz, mask_downsample })
        .batch_size(config.batch_size)
        .num_workers(0)
        .set_device(device.clone().autodiff())
        .build(train_dataset);
    let val_loader = DataLoaderBuilder::new(val_batcher(config.imgsz, masks))
        .batch_size(config.batch_size)
        .num_workers(0)
        .set_device(device.clone())
        .build(ValDataset(val_source.clone()));

    let autodiff = device.clone().autodiff();
    autodiff.seed(config.seed);
    let yolo = match &config.weights {
        Some(path) => YoloV8::load(&yolo_config, path, &autodiff)?,
        None => yolo_config.init(&autodiff),
    };
    let initial_ema = burn::module::Module::valid(&yolo);
    let student = Student { yolo, loss: config.loss, max_grad_norm: config.max_grad_norm };
    let accumulation = Accumulation::new(config.nbs, config.batch_size);
    let samples = data.train.images.len();
    let choice = choose_optimizer(
        config.optimizer,
        config.lr0,
        config.momentum,
        samples.div_ceil(config.batch_size.max(accumulation.nbs)) * config.epochs,
        config.classes.len(),
    );
    let optimizer = build_optimizer(&choice, config.weight_decay * accumulation.weight_decay_scale());
    // Ultralytics 8.4: the warm-up leaves at least the last epoch at the scheduled rate.
    let warmup_epochs = config.warmup_epochs.min(config.epochs.saturating_sub(1) as f64).max(0.0);
    let warmup = ((warmup_epochs * iterations_per_epoch as f64).round() as usize).max(1);
    let schedule = |warmup_start: f64| YoloLrSchedule {
        lr0: choice.lr0,
        lrf: config.lrf,
        epochs: config.epochs,
        iterations_per_epoch,
        warmup_iterations: warmup,
        warmup_start,
        step: 0,
    };
    // `auto` starts the biases' warm-up at 0 too, as Ultralytics does.
    let bias_start = if config.optimizer == OptimizerKind::Auto { 0.0 } else { config.warmup_bias_lr };
    let scheduler = ModuleLrScheduler::new(schedule(0.0)).with_group(bias_group(), schedule(bias_start));
    let last_epoch = stop_after_epochs.map_or(config.epochs, |n| (resume_from.unwrap_or(0) + n).min(config.epochs));

    let strategy = KilnStrategy {
        device: autodiff.clone(),
        output: output.clone(),
        config: config.clone(),
        choice,
        masks,
        val_truth: data.val.clone(),
        val_source: val_source.clone(),
        epoch_counter,
        initial_ema,
        verbosity,
        last_epoch,
        outcome: Arc::new(std::sync::Mutex::new(None)),
        iterations_per_epoch,
        accumulation,
        warmup_iterations: warmup,
    };
    let outcome = strategy.outcome.clone();
    let start = Instant::now();
    let mut summary = crate::engine::launch(
        &output,
        train_loader,
        val_loader,
        config.epochs,
        resume_from,
        Arc::new(strategy),
        outcome,
        Learner::new(student, optimizer, scheduler),
    )?;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

struct KilnStrategy {
    device: Device,
    output: PathBuf,
    config: StudentConfig,
    choice: OptimizerChoice,
    masks: bool,
    val_truth: CocoDataset,
    val_source: Arc<CocoDetectionDataset>,
    epoch_counter: EpochCounter,
    initial_ema: YoloV8,
    verbosity: Verbosity,
    last_epoch: usize,
    outcome: crate::engine::Outcome<TrainSummary>,
    iterations_per_epoch: usize,
    accumulation: Accumulation,
    warmup_iterations: usize,
}

/// Ultralytics' gradient accumulation to a nominal batch size: `round(nbs / batch)` batches per
/// optimiser step, ramped up linearly from 1 over the warm-up (rounding half to even, as Python).
#[derive(Debug, Clone, Copy)]
pub struct Accumulation {
    pub nbs: usize,
    pub batch_size: usize,
    /// Batches per optimiser step after the warm-up.
    pub batches: usize,
}

impl Accumulation {
    pub fn new(nbs: usize, batch_size: usize) -> Self {
        let nbs = nbs.max(1);
        let batch_size = batch_size.max(1);
        Self { nbs, batch_size, batches: ((nbs as f64 / batch_size as f64).round_ties_even() as usize).max(1) }
    }

    /// Weight decay is given for a batch of `nbs` images (`weight_decay * batch * accumulate / nbs`).
    pub fn weight_decay_scale(&self) -> f64 {
        (self.batch_size * self.batches) as f64 / self.nbs as f64
    }

    /// Batches per step at global batch `iteration` (0-based) of a `warmup`-batch warm-up.
    pub fn at(&self, iteration: usize, warmup: usize) -> usize {
        if iteration > warmup {
            return self.batches;
        }
        let t = iteration as f64 / warmup.max(1) as f64;
        ((1.0 + t * (self.batches as f64 - 1.0)).round_ties_even() as usize).max(1)
    }
}

impl SupervisedLearningStrategy<Student> for KilnStrategy {
    fn fit(
        &self,
        components: TrainingComponents<Student>,
        mut learner: Learner<Student>,
        train_loader: TrainLoader<Student>,
        val_loader: ValidLoader<Student>,
        starting_epoch: usize,
    ) -> (Student, SupervisedTrainingEventProcessor<Student>) {
        let train_loader = train_loader.to_device(&self.device);
        let val_loader = val_loader.to_device(&self.device.clone().inner());
        learner.fork(&self.device);
        let mut processor = components.event_processor;
        let mut checkpointer = components.checkpointer;
        let (interrupter, event_store) = (components.interrupter, components.event_store);
        let result = self.epochs(
            &mut learner,
            &*train_loader,
            &*val_loader,
            starting_epoch,
            &mut checkpointer,
            &interrupter,
            &event_store,
        );
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        let _ = processor.process_train(LearnerEvent::EndEpoch(starting_epoch));
        (learner.model(), processor)
    }
}

impl KilnStrategy {
    fn epochs(
        &self,
        learner: &mut Learner<Student>,
        train_loader: &dyn DataLoader<DetectionBatch>,
        val_loader: &dyn DataLoader<DetectionBatch>,
        starting_epoch: usize,
        checkpointer: &mut Option<burn::train::LearningCheckpointer<Student>>,
        interrupter: &burn::train::Interrupter,
        event_store: &burn::train::metric::store::EventStoreClient,
    ) -> Result<TrainSummary, TrainError> {
        let checkpoint_dir = self.output.join("checkpoint");
        let (mut ema, mut state) = if starting_epoch > 1 {
            let previous = starting_epoch - 1;
            let yolo_config = self.initial_ema_config();
            let ema_model = YoloV8::load(
                &yolo_config,
                &checkpoint_dir.join(format!("ema-{previous}.safetensors")),
                &self.device.clone().inner(),
            )?;
            let state: RunState = crate::engine::read_run_state(&checkpoint_dir, previous)?;
            (ModelEma::new(burn::module::Module::valid(&ema_model), state.ema_updates), state)
        } else {
            (ModelEma::new(self.initial_ema.clone(), 0), RunState::default())
        };
        let metadata = self.weights_metadata();
        let last_weights = self.output.join("weights/last.safetensors");
        let best_weights = self.output.join("weights/best.safetensors");
        let mut stopped_early = false;
        let batches = self.iterations_per_epoch;
        for epoch in starting_epoch..=self.last_epoch {
            let started = Instant::now();
            self.epoch_counter.set(epoch);
            let bar = self.bar(batches as u64, &format!("epoch {epoch}/{}", self.config.epochs));
            let mut sums = LossParts::default();
            let mut seen = 0usize;
            let mut iterator = train_loader.iter();
            // Gradients are summed over `accumulation.at(..)` batches per optimiser step (as
            // Ultralytics' `last_opt_step`), and flushed at the end of each epoch so that every
            // epoch is self-contained and a resumed run repeats the uninterrupted one exactly.
            let mut accumulator = GradientsAccumulator::<Student>::new();
            let (mut position, mut pending) = (0usize, 0usize);
            while let Some(batch) = iterator.next() {
                let batch = batch.map_err(|e| TrainError::Training(e.to_string()))?;
                let images = batch.images.dims()[0];
                let iteration = (epoch - 1) * batches + position;
                position += 1;
                let output = learner.train_step(batch);
                if let Some(failure) = output.item.failure {
                    return Err(failure.into());
                }
                learner.lr_step();
                accumulator.accumulate(&learner.model(), output.grads);
                pending += 1;
                if pending >= self.accumulation.at(iteration, self.warmup_iterations) || position == batches {
                    learner.optimizer_step(accumulator.grads());
                    ema.update(&learner.model().yolo);
                    pending = 0;
                }
                let parts = output.item.parts;
                sums = add(sums, parts, images as f32);
                seen += images;
                bar.set_message(format!(
                    "box {:.3} cls {:.3} dfl {:.3}{}",
                    sums.box_loss / seen as f32,
                    sums.cls_loss / seen as f32,
                    sums.dfl_loss / seen as f32,
                    if self.masks { format!(" seg {:.3}", sums.seg_loss / seen as f32) } else { String::new() }
                ));
                bar.inc(1);
                if interrupter.should_stop() {
                    break;
                }
            }
            bar.finish_and_clear();
            if interrupter.should_stop() {
                break;
            }
            let train = scale(sums, 1.0 / seen.max(1) as f32);
            let (val, box_eval, mask_eval, shown) = self.validate(&ema.model, val_loader)?;
            let lr = learner.lr_current().base();
            let record = EpochRecord {
                epoch,
                train,
                val,
                box_precision: box_eval.best_f1.precision,
                box_recall: box_eval.best_f1.recall,
                box_map50: box_eval.ap50().max(0.0),
                box_map: box_eval.ap().max(0.0),
                mask_precision: mask_eval.as_ref().map_or(0.0, |e| e.best_f1.precision),
                mask_recall: mask_eval.as_ref().map_or(0.0, |e| e.best_f1.recall),
                mask_map50: mask_eval.as_ref().map_or(0.0, |e| e.ap50().max(0.0)),
                mask_map: mask_eval.as_ref().map_or(0.0, |e| e.ap().max(0.0)),
                lr,
                seconds: started.elapsed().as_secs_f64(),
            };
            state.history.push(record);
            state.epoch = epoch;
            state.ema_updates = ema.updates;
            let fitness = record.fitness(self.masks);
            let improved = state.best_epoch == 0 || fitness > state.best_fitness;
            ema.model.save(&last_weights, &metadata)?;
            if improved {
                state.best_fitness = fitness;
                state.best_epoch = epoch;
                ema.model.save(&best_weights, &metadata)?;
            }
            self.write_results(&state.history)?;
            self.write_plots(&state.history, &box_eval, mask_eval.as_ref(), &shown)?;
            self.report(&record);
            // Resume state: kiln's files first, burn-train's last, so an epoch counts as complete
            // only once all are on disk (see `complete_checkpoints`).
            ema.model.save(&checkpoint_dir.join(format!("ema-{epoch}.safetensors")), &metadata)?;
            crate::engine::write_run_state(&checkpoint_dir, epoch, &state)?;
            if let Some(checkpointer) = checkpointer.as_mut() {
                checkpointer.checkpoint(learner, epoch, event_store);
            }
            crate::engine::prune_checkpoints(&checkpoint_dir, epoch, &["ema-{}.safetensors"]);
            if self.config.patience > 0 && epoch - state.best_epoch >= self.config.patience {
                stopped_early = true;
                break;
            }
        }
        let best = state.history.iter().find(|r| r.epoch == state.best_epoch).copied().unwrap_or_default();
        Ok(TrainSummary {
            history: state.history,
            best_epoch: state.best_epoch,
            best,
            last_weights,
            best_weights,
            stopped_early,
            seconds: 0.0,
        })
    }

    fn initial_ema_config(&self) -> YoloConfig {
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
    }

    fn bar(&self, length: u64, prefix: &str) -> ProgressBar {
        crate::engine::epoch_bar(self.verbosity, length, prefix)
    }

    fn report(&self, r: &EpochRecord) {
        if self.verbosity == Verbosity::Quiet {
            return;
        }
        let masks = if self.masks {
            format!(
                "  mask P {:.3} R {:.3} mAP50 {:.3} mAP50-95 {:.3}",
                r.mask_precision, r.mask_recall, r.mask_map50, r.mask_map
            )
        } else {
            String::new()
        };
        eprintln!(
            "epoch {:>3}/{}  loss {:.3}  box P {:.3} R {:.3} mAP50 {:.3} mAP50-95 {:.3}{masks}  ({:.0}s)",
            r.epoch,
            self.config.epochs,
            r.train.sum(),
            r.box_precision,
            r.box_recall,
            r.box_map50,
            r.box_map,
            r.seconds
        );
    }

    fn write_plots(
        &self,
        history: &[EpochRecord],
        boxes: &CocoEvaluation,
        masks: Option<&CocoEvaluation>,
        shown: &[Vec<kiln_models::yolo::predict::Detection>],
    ) -> Result<(), TrainError> {
        use crate::plots;
        plots::save(&plots::results_figure(history, self.masks), &self.output.join("results.png"))?;
        let mask_curve = masks.map(|m| m.pr_curve_50());
        plots::save(&plots::pr_figure(&boxes.pr_curve_50(), mask_curve.as_deref()), &self.output.join("pr_curve.png"))?;
        let mut pictures = Vec::new();
        for (index, detections) in shown.iter().enumerate() {
            let mut image = self.val_source.load(index)?.image;
            plots::draw_detections(&mut image, detections, &self.config.classes);
            pictures.push(image);
        }
        if !pictures.is_empty() {
            plots::save(&plots::grid(&pictures, 4, 320), &self.output.join("val_predictions.jpg"))?;
        }
        Ok(())
    }

    fn write_results(&self, history: &[EpochRecord]) -> Result<(), TrainError> {
        let mut csv = String::from(EpochRecord::CSV_HEADER);
        csv.push('\n');
        for record in history {
            csv.push_str(&record.csv_row());
            csv.push('\n');
        }
        kiln_data::io::write_atomic(&self.output.join("results.csv"), csv.as_bytes())?;
        Ok(())
    }

    /// Validation loss and COCO metrics of `model` (the EMA) on the validation set.
    fn validate(
        &self,
        model: &YoloV8,
        loader: &dyn DataLoader<DetectionBatch>,
    ) -> Result<
        (LossParts, CocoEvaluation, Option<CocoEvaluation>, Vec<Vec<kiln_models::yolo::predict::Detection>>),
        TrainError,
    > {
        let options = PredictOptions { conf: 0.001, iou: 0.7, max_det: 100, max_nms: 30_000 };
        let mut shown = Vec::new();
        let bar = self.bar(loader.num_items() as u64, "validating");
        let mut results = Vec::new();
        let mut sums = LossParts::default();
        let mut seen = 0usize;
        let mut iterator = loader.iter();
        while let Some(batch) = iterator.next() {
            let batch = batch.map_err(|e| TrainError::Training(e.to_string()))?;
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
    }
}

fn scale(a: LossParts, factor: f32) -> LossParts {
    add(LossParts::default(), a, factor)
}

/// The training and validation sets as a student run uses them: read (COCO JSON or a YOLO
/// dataset), repaired in memory (boxes and areas derived from masks), checked to share one class
/// list; plus the summary that picks the student.
pub fn load_student_data(
    train: &Path,
    val: &Path,
    images: Option<&Path>,
) -> Result<(StudentData, kiln_data::DatasetSummary), TrainError> {
    let read = |path: &Path| -> Result<(CocoDataset, PathBuf, kiln_data::DatasetSummary), TrainError> {
        let loaded = kiln_data::load_dataset(path, images)?;
        let mut dataset = loaded.dataset;
        // Inspected as given (the student follows what the user labelled), then repaired.
        let summary = kiln_data::inspect(&dataset);
        kiln_data::repair(&mut dataset);
        if !loaded.images_dir.is_dir() {
            return Err(TrainError::Config(format!(
                "{}: image directory {} not found; pass --images DIR (the directory `file_name`s are relative to)",
                path.display(),
                loaded.images_dir.display()
            )));
        }
        Ok((dataset, loaded.images_dir, summary))
    };
    let (train_set, train_images, summary) = read(train)?;
    let (val_set, val_images, _) = read(val)?;
    if train_set.class_ids() != val_set.class_ids() || train_set.class_names() != val_set.class_names() {
        return Err(TrainError::Config(format!(
            "{} and {} have different categories: split one dataset with `kiln validate --split` so both share its classes",
            train.display(),
            val.display()
        )));
    }
    if train_set.categories.is_empty() {
        return Err(TrainError::Config(format!("{}: the dataset has no categories", train.display())));
    }
    Ok((StudentData { train: train_set, val: val_set, train_images, val_images }, summary))
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
        let b = Accumulation::new(64, 24);
        assert_eq!(b.batches, 3);
        assert_eq!(b.weight_decay_scale(), 72.0 / 64.0);
        assert_eq!(Accumulation::new(64, 128).batches, 1);
    }
}
