//! What every kiln training run shares, student or teacher: progress bars drawn by kiln (burn-train's
//! own renderer kept silent), the rule that an epoch's checkpoint counts only when all its files are
//! on disk, run directories that are never overwritten, and `metadata.json`.

use std::path::Path;

use burn::train::logger::{EvaluationProgressLogger, TrainingProgressLogger};
use burn::train::metric::MetricDefinition;
use burn::train::renderer::{
    EvaluationName, MetricState, MetricsRenderer, MetricsRendererEvaluation, MetricsRendererTraining,
};
use indicatif::{ProgressBar, ProgressStyle};

use crate::run::{TrainError, Verbosity};

/// A bar for one epoch's batches (hidden when quiet).
pub fn epoch_bar(verbosity: Verbosity, length: u64, prefix: &str) -> ProgressBar {
    if verbosity == Verbosity::Quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(length);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

/// Checkpointed epochs whose every file exists (burn-train's model, optimiser and scheduler
/// records, kiln's `state-N.json`, and `extra` files named with `{}` for the epoch), newest last.
pub fn complete_checkpoints(dir: &Path, extra: &[&str]) -> Vec<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut epochs: Vec<usize> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("state-")?.strip_suffix(".json")?.parse().ok()
        })
        .filter(|n: &usize| {
            ["model", "optim", "scheduler"].iter().all(|k| dir.join(format!("{k}-{n}.bpk")).is_file())
                && extra.iter().all(|pattern| dir.join(pattern.replace("{}", &n.to_string())).is_file())
        })
        .collect();
    epochs.sort_unstable();
    epochs
}

/// The newest complete checkpoint of a run to resume, or an error saying there is none.
pub fn resume_point(run: &Path, checkpoint_dir: &Path, extra: &[&str]) -> Result<usize, TrainError> {
    complete_checkpoints(checkpoint_dir, extra).last().copied().ok_or_else(|| {
        TrainError::Config(format!("{}: no complete checkpoint to resume from; start a new run instead", run.display()))
    })
}

/// A new run needs a directory that does not exist or is empty: nothing the user has is replaced.
pub fn require_fresh_dir(dir: &Path) -> Result<(), TrainError> {
    if dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(TrainError::Config(format!(
            "{} already holds a run; pass --resume to continue it, or choose another --output",
            dir.display()
        )));
    }
    Ok(())
}

/// `metadata.json` of a run: what was trained on, how, when, with which versions.
#[derive(Debug, serde::Serialize)]
struct RunMetadata<'a, R: serde::Serialize, C: serde::Serialize> {
    kiln_version: &'static str,
    burn_version: &'static str,
    started_unix_seconds: u64,
    request: &'a R,
    train_summary: &'a kiln_data::DatasetSummary,
    train_images: usize,
    val_images: usize,
    config: &'a C,
}

/// Writes `path` (`metadata.json`) atomically.
pub fn write_metadata<R: serde::Serialize, C: serde::Serialize>(
    path: &Path,
    request: &R,
    data: &crate::run::StudentData,
    train_summary: &kiln_data::DatasetSummary,
    config: &C,
) -> Result<(), TrainError> {
    let metadata = RunMetadata {
        kiln_version: env!("CARGO_PKG_VERSION"),
        burn_version: "0.22.1",
        started_unix_seconds: unix_seconds(),
        request,
        train_summary,
        train_images: data.train.images.len(),
        val_images: data.val.images.len(),
        config,
    };
    kiln_data::io::write_atomic(
        path,
        serde_json::to_string_pretty(&metadata).expect("metadata serialises").as_bytes(),
    )?;
    Ok(())
}

/// Seconds since the Unix epoch, for `metadata.json`.
pub fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// kiln's resume state after `epoch` (history, best so far, ...): `checkpoint/state-N.json`.
pub fn read_run_state<T: serde::de::DeserializeOwned>(checkpoint_dir: &Path, epoch: usize) -> Result<T, TrainError> {
    let path = checkpoint_dir.join(format!("state-{epoch}.json"));
    let io = |message: String| TrainError::Io { path: path.clone(), message };
    let bytes = std::fs::read(&path).map_err(|e| io(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| io(e.to_string()))
}

/// Writes kiln's resume state after `epoch`, atomically.
pub fn write_run_state<T: serde::Serialize>(checkpoint_dir: &Path, epoch: usize, state: &T) -> Result<(), TrainError> {
    let path = checkpoint_dir.join(format!("state-{epoch}.json"));
    kiln_data::io::write_atomic(&path, &serde_json::to_vec(state).expect("state serialises"))?;
    Ok(())
}

/// Removes the kiln files of checkpoints older than the two burn-train keeps.
pub fn prune_checkpoints(dir: &Path, epoch: usize, patterns: &[&str]) {
    for old in 1..epoch.saturating_sub(1) {
        let _ = std::fs::remove_file(dir.join(format!("state-{old}.json")));
        for pattern in patterns {
            let _ = std::fs::remove_file(dir.join(pattern.replace("{}", &old.to_string())));
        }
    }
}

/// kiln draws its own progress; burn-train's renderer stays silent.
pub struct SilentRenderer;

impl MetricsRendererTraining for SilentRenderer {
    fn update_train(&mut self, _state: MetricState) {}
    fn update_valid(&mut self, _state: MetricState) {}
}

impl MetricsRendererEvaluation for SilentRenderer {
    fn update_test(&mut self, _name: EvaluationName, _state: MetricState) {}
}

impl TrainingProgressLogger for SilentRenderer {
    fn start(&mut self, _: usize, _: usize, _: Option<usize>, _: Option<&str>) {}
    fn update_epoch(&mut self, _epoch: usize) {}
    fn start_split(&mut self, _split: &str, _total_items: usize) {}
    fn update_split(&mut self, _items_processed: usize) {}
    fn end_split(&mut self) {}
    fn end(&mut self) {}
    fn log_event_training(&mut self, _event: String) {}
}

impl EvaluationProgressLogger for SilentRenderer {
    fn start_global_progress(&mut self, _total_tests: usize) {}
    fn start_test(&mut self, _name: &str, _total_items: usize) {}
    fn update_test_progress(&mut self, _items_processed: usize) {}
    fn end_test(&mut self) {}
    fn end_global_progress(&mut self) {}
    fn log_event_evaluation(&mut self, _event: String) {}
}

impl MetricsRenderer for SilentRenderer {
    fn manual_close(&mut self) {}
    fn register_metric(&mut self, _definition: MetricDefinition) {}
}

/// Where a custom training strategy leaves its result for the code that launched it.
pub type Outcome<T> = std::sync::Arc<std::sync::Mutex<Option<Result<T, TrainError>>>>;

/// Runs a kiln epoch loop (`strategy`, which stores its result in `outcome`) inside burn-train's
/// `SupervisedTraining`: its checkpointers (the last two epochs kept), kiln's own silent renderer,
/// and resumption from `resume_from`.
#[allow(clippy::too_many_arguments)]
pub fn launch<M: burn::train::LearnerModel + 'static, T>(
    run_dir: &Path,
    train_loader: std::sync::Arc<dyn burn::data::dataloader::DataLoader<<M as burn::train::TrainStep>::Input>>,
    val_loader: std::sync::Arc<dyn burn::data::dataloader::DataLoader<<M as burn::train::InferenceStep>::Input>>,
    epochs: usize,
    resume_from: Option<usize>,
    strategy: burn::train::CustomLearningStrategy<M>,
    outcome: Outcome<T>,
    learner: burn::train::Learner<M>,
) -> Result<T, TrainError> {
    let mut training = burn::train::SupervisedTraining::new(run_dir, train_loader, val_loader)
        .with_default_checkpointers()
        .with_checkpointing_strategy(burn::train::checkpoint::KeepLastNCheckpoints::new(2))
        .with_application_logger(None)
        .renderer(Box::new(SilentRenderer))
        .num_epochs(epochs)
        .with_training_strategy(burn::train::TrainingStrategy::Custom(strategy));
    if let Some(epoch) = resume_from {
        training = training.checkpoint(epoch);
    }
    let result = training.launch(learner);
    if let Some(error) = result.error {
        return Err(TrainError::Training(error.to_string()));
    }
    let outcome = outcome.lock().unwrap_or_else(|e| e.into_inner()).take();
    outcome.unwrap_or_else(|| Err(TrainError::Training("the training loop ended without a result".into())))
}
