//! A run's resume state on disk: an epoch's checkpoint counts only when all its files are there
//! (burn-train's model, optimiser and scheduler records, kiln's `state-N.json`, the task's own),
//! only the last two are kept, and a run directory is never overwritten.

use std::path::Path;

use crate::error::TrainError;

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

/// The newest complete checkpoint of a run to resume, if it has one.
pub fn resume_point(checkpoint_dir: &Path, extra: &[&str]) -> Option<usize> {
    // A run killed before its first epoch ended (e.g. while its teachers were labelling) has none:
    // it starts again from the first epoch, in the same directory, with its saved settings.
    complete_checkpoints(checkpoint_dir, extra).last().copied()
}

/// A new run needs a directory that does not exist or is empty: nothing the user has is replaced.
pub fn require_fresh_dir(dir: &Path) -> Result<(), TrainError> {
    // The run lock this process holds on `dir` is not a run.
    let holds_a_run =
        |mut entries: std::fs::ReadDir| entries.any(|e| e.map_or(true, |e| e.file_name() != super::RUN_LOCK));
    if dir.exists() && std::fs::read_dir(dir).map(holds_a_run).unwrap_or(true) {
        return Err(TrainError::Config(format!(
            "{} already holds a run; pass --resume to continue it, or choose another --output",
            dir.display()
        )));
    }
    Ok(())
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
