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

pub mod carried;
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
///
/// Burn initialises parameters lazily, at their first use: the values are drawn here, at once,
/// while the seeded generator is the one they come from. Left lazy, a module moved to another
/// device drew them there later, from that device's unseeded generator, so a seed did not fix
/// the start of a LibTorch run.
///
/// Flex's generator is one per process: two seeded draws at once (two runs in one process, or
/// parallel tests) would interleave their numbers, so the seeding and the draw hold one lock.
/// Random draws made elsewhere in the process while it is held still take numbers from it.
pub fn init_seeded<M: burn::module::Module>(seed: u64, autodiff: &Device, init: impl FnOnce(&Device) -> M) -> M {
    static SEEDED_DRAW: Mutex<()> = Mutex::new(());
    let _one_draw_at_a_time = SEEDED_DRAW.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    #[cfg(feature = "flex")]
    {
        let host = Device::flex().autodiff();
        host.seed(seed);
        let module = materialize(init(&host));
        if host == *autodiff { module } else { module.fork(autodiff) }
    }
    #[cfg(not(feature = "flex"))]
    {
        autodiff.seed(seed);
        materialize(init(autodiff))
    }
}

/// Draws every lazily initialised parameter of `module` now, in the module's order.
pub fn materialize<M: burn::module::Module>(module: M) -> M {
    struct Draw;
    impl burn::module::ModuleMapper for Draw {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<burn::tensor::Tensor<D>>,
        ) -> burn::module::Param<burn::tensor::Tensor<D>> {
            param.map(|tensor| tensor)
        }
        fn map_int<const D: usize>(
            &mut self,
            param: burn::module::Param<burn::tensor::Tensor<D, burn::tensor::Int>>,
        ) -> burn::module::Param<burn::tensor::Tensor<D, burn::tensor::Int>> {
            param.map(|tensor| tensor)
        }
    }
    module.map(&mut Draw)
}

/// Batches per epoch of a run on `devices` devices: each device takes an equal slice of the
/// `items` (the last ones a little more when they do not divide), and an iteration is one batch
/// on every device.
pub fn iterations_per_epoch(items: usize, batch_size: usize, devices: usize) -> usize {
    let devices = devices.max(1);
    (0..devices)
        .map(|k| ((k + 1) * items / devices - k * items / devices).div_ceil(batch_size.max(1)))
        .max()
        .unwrap_or(0)
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
    /// Devices (autodiff) beside `device` that each take a share of every step: data parallelism,
    /// see [`fit`]. Empty: one device.
    pub data_parallel: Vec<Device>,
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
        Self {
            run_dir,
            device,
            epochs,
            last_epoch,
            patience,
            iterations_per_epoch,
            verbosity,
            memory: None,
            data_parallel: Vec::new(),
        }
    }

    /// Also trains on `others` (autodiff devices), each taking its share of every step; the
    /// optimiser steps and the validation runs on `device`.
    pub fn with_data_parallel(mut self, others: Vec<Device>) -> Self {
        self.data_parallel = others;
        self
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
    type Model: LearnerModel + TrainStep<Output = StepOutput<Self::Parts>> + Send + Sync;
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
    /// How the gradients of several devices' batches make one step's: averaged (a loss that is a
    /// mean over its batch, the default) or summed (a loss scaled by its batch size, as
    /// Ultralytics' YOLOv8 loss: the sum is then the loss of the devices' batches together).
    const SUM_DEVICE_GRADIENTS: bool = false;

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
    train_loaders: &[Arc<dyn DataLoader<TrainInput<T>>>],
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
        let mut iterators: Vec<_> = train_loaders.iter().map(|loader| loader.iter()).collect();
        let mut position = 0usize;
        loop {
            let mut shares = Vec::with_capacity(iterators.len());
            for iterator in iterators.iter_mut() {
                shares.push(iterator.next().transpose()?);
            }
            if shares.iter().all(Option::is_none) {
                break;
            }
            let iteration = (epoch - 1) * batches + position;
            position += 1;
            let (grads, items) = if shares.len() == 1 {
                let output = learner.train_step(shares.pop().flatten().expect("a batch"));
                (output.grads, vec![output.item])
            } else {
                let model = learner.model();
                data_parallel_step(&model, shares, &settings.device, &settings.data_parallel, T::SUM_DEVICE_GRADIENTS)
            };
            let mut items = items;
            if let Some(failure) = items.iter_mut().find_map(|item| item.failure.take()) {
                return Err(failure);
            }
            learner.lr_step();
            task.optimizer_step(&mut live, learner, grads, iteration, position == batches);
            for item in items {
                bar.set_message(task.accumulate(&mut live, item)?);
            }
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

/// One step on several devices: each device's batch runs on a copy of `model` made for it (in its
/// own thread), the gradients come back to `main` and are summed, or averaged unless `sum`
/// ([`TrainTask::SUM_DEVICE_GRADIENTS`]), into the step's. BatchNorm statistics follow the main
/// device's batch only, as PyTorch's DDP keeps the first process's buffers. A device whose slice of
/// the epoch has run out (uneven slices) sits the step out.
fn data_parallel_step<M>(
    model: &M,
    shares: Vec<Option<M::Input>>,
    main: &Device,
    others: &[Device],
    sum: bool,
) -> (GradientsParams, Vec<M::Output>)
where
    M: TrainStep + burn::module::Module + Send + Sync,
    M::Output: Send,
{
    let mut shares = shares.into_iter();
    let main_share = shares.next().flatten();
    let (mut outputs, main_output) = std::thread::scope(|scope| {
        let handles: Vec<_> = shares
            .zip(others)
            .filter_map(|(share, device)| share.map(|batch| (batch, device)))
            .map(|(batch, device)| {
                let replica = model.clone().fork(device);
                scope.spawn(move || {
                    let output = TrainStep::step(&replica, batch);
                    (output.grads.to_device(main, &replica), output.item)
                })
            })
            .collect();
        let main_output = main_share.map(|batch| {
            let output = TrainStep::step(model, batch);
            (output.grads, output.item)
        });
        let outputs: Vec<_> =
            handles.into_iter().map(|handle| handle.join().expect("a device's training step panicked")).collect();
        (outputs, main_output)
    });
    if let Some(output) = main_output {
        outputs.insert(0, output);
    }
    let shares = outputs.len();
    let mut accumulator = burn::optim::GradientsAccumulator::new();
    let mut items = Vec::with_capacity(shares);
    for (grads, item) in outputs {
        accumulator.accumulate(model, grads);
        items.push(item);
    }
    let mut grads = accumulator.grads();
    if !sum && shares > 1 {
        grads = crate::optim::scale_gradients(grads, model, 1.0 / shares as f64);
    }
    (grads, items)
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
        let settings = self.task.settings();
        let device = settings.device.clone();
        // One slice of the epoch per device, each made on its device.
        let devices: Vec<Device> =
            std::iter::once(device.clone()).chain(settings.data_parallel.iter().cloned()).collect();
        let items = train_loader.num_items();
        let train_loaders: Vec<Arc<dyn DataLoader<TrainInput<T>>>> = if devices.len() == 1 {
            vec![train_loader.to_device(&device)]
        } else {
            let n = devices.len();
            (0..n).map(|k| train_loader.slice(k * items / n, (k + 1) * items / n).to_device(&devices[k])).collect()
        };
        let val_loader = val_loader.to_device(&device.clone().without_autodiff());
        learner.fork(&device);
        let mut processor = components.event_processor;
        let mut checkpointer = components.checkpointer;
        let result = fit(
            &*self.task,
            &mut learner,
            &train_loaders,
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::{Tensor, TensorData};
    use burn::train::TrainOutput;

    #[derive(Module, Debug)]
    struct Tiny {
        linear: Linear,
    }

    impl TrainStep for Tiny {
        type Input = (Tensor<2>, Tensor<2>);
        type Output = StepOutput<()>;

        fn step(&self, (x, y): Self::Input) -> TrainOutput<Self::Output> {
            let loss = (self.linear.forward(x) - y).powi_scalar(2).sum().reshape([1]);
            let grads = loss.backward();
            TrainOutput::new(self, grads, StepOutput::new(loss.detach(), (), 1))
        }
    }

    fn batch(seed: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let values = |n: usize, k: usize| (0..n).map(|i| ((i * 7 + seed * 13 + k) % 11) as f32 / 5.0 - 1.0).collect();
        (
            Tensor::from_data(TensorData::new(values(8, 0), [2, 4]), device),
            Tensor::from_data(TensorData::new(values(6, 3), [2, 3]), device),
        )
    }

    fn weight_grad(grads: &GradientsParams, model: &Tiny) -> Vec<f32> {
        kiln_models::device::read_floats(grads.get::<2>(model.linear.weight.id).expect("a gradient")).unwrap()
    }

    /// Several devices' batches make one step whose gradients are the sum (or mean) of each
    /// batch's own, whichever device ran it (two flex devices here: the copies, the threads, the
    /// move back to the main device and the combination are what is checked).
    #[test]
    fn data_parallel_gradients_are_the_sum_or_mean_of_each_batch_s() {
        let device = Device::flex().autodiff();
        device.seed(5);
        let model = Tiny { linear: LinearConfig::new(4, 3).init(&device) };
        let alone = |seed| weight_grad(&model.step(batch(seed, &device)).grads, &model);
        let (first, second) = (alone(1), alone(2));
        assert!(first.iter().zip(&second).any(|(a, b)| (a - b).abs() > 1e-3), "two different batches");
        let others = [device.clone()];
        for sum in [true, false] {
            let shares = vec![Some(batch(1, &device)), Some(batch(2, &device))];
            let (grads, items) = data_parallel_step(&model, shares, &device, &others, sum);
            assert_eq!(items.len(), 2);
            let combined = weight_grad(&grads, &model);
            for ((c, a), b) in combined.iter().zip(&first).zip(&second) {
                let expected = if sum { a + b } else { (a + b) / 2.0 };
                assert!((c - expected).abs() <= 1e-5, "sum {sum}: {c} vs {expected}");
            }
        }
        // A device whose slice ran out sits the step out: the other's batch alone.
        let (grads, items) = data_parallel_step(&model, vec![None, Some(batch(2, &device))], &device, &others, false);
        assert_eq!(items.len(), 1);
        for (c, b) in weight_grad(&grads, &model).iter().zip(&second) {
            assert!((c - b).abs() <= 1e-6);
        }
    }

    #[test]
    fn every_device_takes_an_equal_slice_of_the_epoch() {
        assert_eq!(iterations_per_epoch(10, 4, 1), 3);
        assert_eq!(iterations_per_epoch(16, 4, 2), 2);
        // 0..3, 3..6, 6..10: the largest slice decides.
        assert_eq!(iterations_per_epoch(10, 2, 3), 2);
        assert_eq!(iterations_per_epoch(10, 3, 3), 2);
    }
}
