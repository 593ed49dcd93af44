//! kiln's training engine: one epoch driver ([`fit`]) for every kind of run, inside burn-train's
//! `SupervisedTraining` + `Learner` (a custom training strategy). The driver owns what every run
//! shares: resume state, the optional epoch-0 baseline, best/last selection with one rule,
//! patience, checkpoints and their pruning, `results.csv`, progress bars and the per-epoch line.
//! A run is a [`TrainTask`]: it builds its model, data and optimiser, then supplies hooks (the
//! optimiser step, validation, saving weights, figures) and nothing else.
//!
//! Layout of a run directory (the task adds its own files):
//!
//! ```text
//! results.csv                                            (one row per epoch, the task's columns)
//! checkpoint/{model,optim,scheduler}-N.bpk               (burn-train: resume state)
//! checkpoint/state-N.json  checkpoint/<task files>-N     (kiln: history, best so far, task state)
//! ```

pub mod checkpoint;
pub mod lock;
pub mod memory;
pub mod metadata;
pub mod progress;
pub mod step;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::data::dataloader::DataLoader;
use burn::optim::GradientsParams;
use burn::tensor::Device;
use burn::train::{
    EventProcessorTraining, InferenceStep, Interrupter, Learner, LearnerEvent, LearnerModel, LearningCheckpointer,
    SupervisedLearningStrategy, SupervisedTrainingEventProcessor, TrainLoader, TrainStep, TrainingComponents,
    ValidLoader,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use checkpoint::{
    AtomicFileCheckpointer, complete_checkpoints, prune_checkpoints, remove_stale_staging, require_fresh_dir,
    resume_point,
};
pub use lock::{RUN_LOCK, RunLock};
pub use metadata::write_metadata;
pub use progress::{SilentRenderer, Verbosity, epoch_bar};
pub use step::StepOutput;

use crate::error::TrainError;

/// The autodiff device a run trains on: `device` with Burn's autodiff, and with its gradient
/// checkpointing (`Balanced`: memory-bound operations are recomputed in the backward pass, the
/// compute-bound ones keep their outputs) when asked. Burn applies it to the whole model; there is
/// no per-block checkpoint as in `torch.utils.checkpoint`.
pub fn autodiff_device(device: &Device, gradient_checkpointing: bool) -> Device {
    let autodiff = device.clone().without_autodiff().autodiff();
    if gradient_checkpointing { autodiff.gradient_checkpointing() } else { autodiff }
}

/// A module drawn from `seed` with the same numbers on every device. Burn's generators differ
/// between backends (flex, LibTorch, CubeCL), so the module is drawn on flex's autodiff device and
/// moved to `autodiff` (an autodiff device): a random base made for training on a GPU equals the
/// one inference on the CPU makes from the same seed. Without flex, drawn on `autodiff` itself.
pub fn init_seeded<M: burn::module::Module>(seed: u64, autodiff: &Device, init: impl FnOnce(&Device) -> M) -> M {
    #[cfg(feature = "flex")]
    {
        let host = Device::flex().autodiff();
        host.seed(seed);
        let module = init(&host);
        if host == *autodiff { module } else { module.fork(autodiff) }
    }
    #[cfg(not(feature = "flex"))]
    {
        autodiff.seed(seed);
        init(autodiff)
    }
}

/// The batches a task trains on and the ones it validates on.
pub type TrainInput<T> = <<T as TrainTask>::Model as TrainStep>::Input;
pub type StepItem<T> = StepOutput<<T as TrainTask>::Parts>;
pub type ValidInput<T> = <<T as TrainTask>::Model as InferenceStep>::Input;

/// One epoch's figures: a row of `results.csv`.
pub trait EpochRecord: Clone + Default + Serialize + DeserializeOwned {
    const CSV_HEADER: &'static str;
    fn csv_row(&self) -> String;
}

/// What every run needs to know to be driven.
#[derive(Debug, Clone)]
pub struct FitSettings {
    pub run_dir: PathBuf,
    /// The training device (with autodiff); validation runs on it without autodiff.
    pub device: Device,
    /// The run's length (for display and the schedule).
    pub epochs: usize,
    /// The last epoch this invocation trains (earlier than `epochs` in tests of resumption).
    pub last_epoch: usize,
    /// Epochs without improvement before stopping; 0: never.
    pub patience: usize,
    pub iterations_per_epoch: usize,
    pub verbosity: Verbosity,
    /// The memory estimate made before the run (`memory`), written with the measured peak to
    /// `memory.json` when it ends.
    pub memory: Option<memory::MemoryEstimate>,
}

impl FitSettings {
    /// Settings of a run of `epochs` epochs resumed after `resume_from` (or new), that stops after
    /// `stop_after_epochs` of this invocation when given (tests of resumption).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        run_dir: PathBuf,
        device: Device,
        epochs: usize,
        patience: usize,
        iterations_per_epoch: usize,
        verbosity: Verbosity,
        resume_from: Option<usize>,
        stop_after_epochs: Option<usize>,
    ) -> Self {
        let last_epoch = stop_after_epochs.map_or(epochs, |n| (resume_from.unwrap_or(0) + n).min(epochs));
        Self { run_dir, device, epochs, last_epoch, patience, iterations_per_epoch, verbosity, memory: None }
    }

    pub fn with_memory(mut self, estimate: Option<memory::MemoryEstimate>) -> Self {
        self.memory = estimate;
        self
    }
}

/// What the validation of one model measured.
pub struct Validation<V, S> {
    /// The task's validation figures (losses, metrics), for its epoch record.
    pub figures: V,
    /// Higher is better; the best epoch is the one with the highest fitness.
    pub fitness: f64,
    /// What the task draws (predictions on the first validation images, curves).
    pub shown: S,
}

/// A kind of training run on the engine. `Live` is what the task changes while it trains (running
/// sums of the epoch's losses, an EMA of the weights, pending accumulated gradients); `State` is
/// the part of it a resumed run needs back (saved in `state-N.json`).
pub trait TrainTask: Send + Sync + 'static {
    type Model: LearnerModel + TrainStep<Output = StepOutput<Self::Parts>>;
    /// The loss parts a step reports.
    type Parts: Send + 'static;
    type Record: EpochRecord;
    type State: Clone + Default + Serialize + DeserializeOwned;
    type Live;
    type Figures;
    type Shown;

    /// Task files kept with each checkpoint besides burn-train's and `state-N.json` (`{}` = epoch).
    const CHECKPOINT_FILES: &'static [&'static str] = &[];
    /// Whether the model is validated before any step (epoch 0: the base a fine-tuning starts
    /// from, which is also the first "best").
    const BASELINE: bool = false;

    fn settings(&self) -> &FitSettings;

    /// The live state at `starting_epoch` (after a resume: from `state` and the task's files).
    fn start(&self, starting_epoch: usize, state: &Self::State) -> Result<Self::Live, TrainError>;

    /// Called before each epoch's first batch (reset the running sums, tell the data the epoch).
    fn start_epoch(&self, live: &mut Self::Live, epoch: usize);

    /// The optimiser step after a batch's gradients: by default one step per batch. `iteration`
    /// counts batches from the run's start; `last_of_epoch` marks the epoch's last batch.
    fn optimizer_step(
        &self,
        _live: &mut Self::Live,
        learner: &mut Learner<Self::Model>,
        grads: GradientsParams,
        _iteration: usize,
        _last_of_epoch: bool,
    ) {
        learner.optimizer_step(grads);
    }

    /// Adds a batch's output to the epoch's running sums; returns the progress bar's message.
    fn accumulate(&self, live: &mut Self::Live, item: StepItem<Self>) -> Result<String, TrainError>;

    /// Validates the model being trained (or the task's copy of it, such as an EMA).
    fn validate(
        &self,
        live: &Self::Live,
        learner: &Learner<Self::Model>,
        loader: &dyn DataLoader<ValidInput<Self>>,
    ) -> Result<Validation<Self::Figures, Self::Shown>, TrainError>;

    /// The epoch's record from the live sums (zero at the baseline, epoch 0) and the validation.
    fn record(&self, live: &Self::Live, epoch: usize, figures: Self::Figures, lr: f64, seconds: f64) -> Self::Record;

    /// Saves the epoch's weights: the last ones if the task keeps them, and the best when `best`.
    fn save_weights(&self, live: &Self::Live, learner: &Learner<Self::Model>, best: bool) -> Result<(), TrainError>;

    /// Writes the run's pictures (`results.png`, predictions) from the history and what was shown.
    fn write_figures(&self, history: &[Self::Record], shown: &Self::Shown) -> Result<(), TrainError>;

    /// The line printed after each epoch.
    fn report(&self, record: &Self::Record) -> String;

    /// The task's state for `state-N.json` and its own checkpoint files for `epoch`.
    fn checkpoint(&self, live: &Self::Live, epoch: usize) -> Result<Self::State, TrainError>;
}

/// kiln's resume state of a run after an epoch: `checkpoint/state-N.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(bound = "R: EpochRecord, S: Serialize + DeserializeOwned + Default")]
pub struct RunState<R, S> {
    pub epoch: usize,
    /// The best fitness so far (runs from before the engine named it after their metric).
    #[serde(alias = "best_iou", alias = "best_map")]
    pub best_fitness: f64,
    pub best_epoch: usize,
    pub history: Vec<R>,
    /// The task's own state (the EMA's update count, ...).
    #[serde(flatten)]
    pub task: S,
}

impl<R: EpochRecord, S> RunState<R, S> {
    /// One rule for every run: the first record is the best so far (the baseline where there is
    /// one), then only a strictly higher fitness. The best went through JSON on resume, whose float
    /// parsing may differ in the last bit: a gain that small is no gain.
    pub fn improves(&self, fitness: f64) -> bool {
        self.history.is_empty() || fitness > self.best_fitness + 1e-12
    }
}

/// The task state of a task that keeps none beyond the engine's.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct NoTaskState {}

/// How [`fit`] ended.
pub struct FitOutcome<R, S> {
    pub state: RunState<R, S>,
    pub stopped_early: bool,
    pub seconds: f64,
}

/// The epoch driver.
#[allow(clippy::too_many_arguments)]
pub fn fit<T: TrainTask>(
    task: &T,
    learner: &mut Learner<T::Model>,
    train_loader: &dyn DataLoader<TrainInput<T>>,
    val_loader: &dyn DataLoader<ValidInput<T>>,
    starting_epoch: usize,
    checkpointer: &mut Option<LearningCheckpointer<T::Model>>,
    interrupter: &Interrupter,
    event_store: &burn::train::metric::store::EventStoreClient,
) -> Result<(RunState<T::Record, T::State>, bool), TrainError> {
    let settings = task.settings();
    let checkpoint_dir = settings.run_dir.join("checkpoint");
    let mut state: RunState<T::Record, T::State> = if starting_epoch > 1 {
        checkpoint::read_run_state(&checkpoint_dir, starting_epoch - 1)?
    } else {
        RunState::default()
    };
    let mut live = task.start(starting_epoch, &state.task)?;
    let report = |record: &T::Record| {
        if settings.verbosity == Verbosity::Progress {
            eprintln!("{}", task.report(record));
        }
    };
    if T::BASELINE && state.history.is_empty() {
        let started = Instant::now();
        task.start_epoch(&mut live, 0);
        let validation = task.validate(&live, learner, val_loader)?;
        let record = task.record(&live, 0, validation.figures, 0.0, started.elapsed().as_secs_f64());
        state.best_fitness = validation.fitness;
        task.save_weights(&live, learner, true)?;
        state.history.push(record.clone());
        write_results(&settings.run_dir, &state.history)?;
        task.write_figures(&state.history, &validation.shown)?;
        report(&record);
    }
    let mut stopped_early = false;
    let batches = settings.iterations_per_epoch;
    for epoch in starting_epoch..=settings.last_epoch {
        let started = Instant::now();
        task.start_epoch(&mut live, epoch);
        let bar = epoch_bar(settings.verbosity, batches as u64, &format!("epoch {epoch}/{}", settings.epochs));
        let mut iterator = train_loader.iter();
        let mut position = 0usize;
        while let Some(batch) = iterator.next() {
            let iteration = (epoch - 1) * batches + position;
            position += 1;
            let mut output = learner.train_step(batch?);
            if let Some(failure) = output.item.failure.take() {
                return Err(failure);
            }
            learner.lr_step();
            task.optimizer_step(&mut live, learner, output.grads, iteration, position == batches);
            bar.set_message(task.accumulate(&mut live, output.item)?);
            bar.inc(1);
            if interrupter.should_stop() {
                break;
            }
        }
        bar.finish_and_clear();
        if interrupter.should_stop() {
            break;
        }
        let validation = task.validate(&live, learner, val_loader)?;
        let lr = learner.lr_current().base();
        let record = task.record(&live, epoch, validation.figures, lr, started.elapsed().as_secs_f64());
        let improved = state.improves(validation.fitness);
        if improved {
            state.best_fitness = validation.fitness;
            state.best_epoch = epoch;
        }
        state.history.push(record.clone());
        state.epoch = epoch;
        task.save_weights(&live, learner, improved)?;
        write_results(&settings.run_dir, &state.history)?;
        task.write_figures(&state.history, &validation.shown)?;
        report(&record);
        // Resume state: kiln's files first, burn-train's last, so an epoch counts as complete only
        // once all are on disk (see `complete_checkpoints`).
        state.task = task.checkpoint(&live, epoch)?;
        checkpoint::write_run_state(&checkpoint_dir, epoch, &state)?;
        if let Some(checkpointer) = checkpointer.as_mut() {
            checkpointer.checkpoint(learner, epoch, event_store);
        }
        prune_checkpoints(&checkpoint_dir, epoch, T::CHECKPOINT_FILES);
        if settings.patience > 0 && epoch - state.best_epoch >= settings.patience {
            stopped_early = true;
            break;
        }
    }
    Ok((state, stopped_early))
}

/// `results.csv`: the header and one row per epoch record, written atomically.
fn write_results<R: EpochRecord>(run_dir: &std::path::Path, history: &[R]) -> Result<(), TrainError> {
    let mut csv = String::from(R::CSV_HEADER);
    csv.push('\n');
    for record in history {
        csv.push_str(&record.csv_row());
        csv.push('\n');
    }
    kiln_data::io::write_atomic(&run_dir.join("results.csv"), csv.as_bytes())?;
    Ok(())
}

type Outcome<R, S> = Arc<Mutex<Option<Result<(RunState<R, S>, bool), TrainError>>>>;

/// burn-train's frame around [`fit`]: the strategy it calls with the learner and the loaders.
struct TaskStrategy<T: TrainTask> {
    task: Arc<T>,
    outcome: Outcome<T::Record, T::State>,
}

impl<T: TrainTask> SupervisedLearningStrategy<T::Model> for TaskStrategy<T> {
    fn fit(
        &self,
        components: TrainingComponents<T::Model>,
        mut learner: Learner<T::Model>,
        train_loader: TrainLoader<T::Model>,
        val_loader: ValidLoader<T::Model>,
        starting_epoch: usize,
    ) -> (T::Model, SupervisedTrainingEventProcessor<T::Model>) {
        let device = self.task.settings().device.clone();
        let train_loader = train_loader.to_device(&device);
        let val_loader = val_loader.to_device(&device.clone().without_autodiff());
        learner.fork(&device);
        let mut processor = components.event_processor;
        let mut checkpointer = components.checkpointer;
        let result = fit(
            &*self.task,
            &mut learner,
            &*train_loader,
            &*val_loader,
            starting_epoch,
            &mut checkpointer,
            &components.interrupter,
            &components.event_store,
        );
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        let _ = processor.process_train(LearnerEvent::EndEpoch(starting_epoch));
        (learner.model(), processor)
    }
}

/// Runs `task` from `resume_from` (a complete checkpoint) or from the start: burn-train's
/// `SupervisedTraining` with its checkpointers (the last two epochs kept), kiln's silent
/// renderer, and [`fit`] as the training strategy.
pub fn launch<T: TrainTask>(
    task: T,
    learner: Learner<T::Model>,
    train_loader: Arc<dyn DataLoader<TrainInput<T>>>,
    val_loader: Arc<dyn DataLoader<ValidInput<T>>>,
    resume_from: Option<usize>,
) -> Result<FitOutcome<T::Record, T::State>, TrainError> {
    let start = Instant::now();
    let settings = task.settings().clone();
    let outcome: Outcome<T::Record, T::State> = Arc::new(Mutex::new(None));
    let strategy = TaskStrategy { task: Arc::new(task), outcome: outcome.clone() };
    let checkpoint_dir = settings.run_dir.join("checkpoint");
    let mut training = burn::train::SupervisedTraining::new(&settings.run_dir, train_loader, val_loader)
        .with_custom_checkpointers(
            AtomicFileCheckpointer::new(&checkpoint_dir, "model"),
            AtomicFileCheckpointer::new(&checkpoint_dir, "optim"),
            AtomicFileCheckpointer::new(&checkpoint_dir, "scheduler"),
        )
        .with_checkpointing_strategy(burn::train::checkpoint::KeepLastNCheckpoints::new(2))
        .with_application_logger(None)
        .renderer(Box::new(SilentRenderer))
        .num_epochs(settings.epochs)
        .with_training_strategy(burn::train::TrainingStrategy::Custom(Arc::new(strategy)));
    if let Some(epoch) = resume_from {
        training = training.checkpoint(epoch);
    }
    let result = training.launch(learner);
    if let Some(error) = result.error {
        return Err(TrainError::Training(error.to_string()));
    }
    let outcome = outcome.lock().unwrap_or_else(|e| e.into_inner()).take();
    let (state, stopped_early) =
        outcome.unwrap_or_else(|| Err(TrainError::Training("the training loop ended without a result".into())))?;
    if let Some(estimate) = settings.memory {
        let record = memory::MemoryRecord::now(estimate, &settings.device);
        let json = serde_json::to_string_pretty(&record).map_err(|e| TrainError::Training(e.to_string()))?;
        kiln_data::io::write_atomic(&settings.run_dir.join("memory.json"), json.as_bytes())?;
        if let (Verbosity::Progress, Some(line)) = (settings.verbosity, record.render()) {
            eprintln!("{line}");
        }
    }
    Ok(FitOutcome { state, stopped_early, seconds: start.elapsed().as_secs_f64() })
}
