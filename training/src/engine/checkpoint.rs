//! A run's resume state on disk: an epoch's checkpoint counts only when all its files are there
//! (burn-train's model, optimiser and scheduler records, kiln's `state-N.json`, the task's own),
//! only the last two are kept, and a run directory is never overwritten.

use std::path::{Path, PathBuf};

use burn::train::checkpoint::{Checkpoint, Checkpointer, CheckpointerError};

use crate::error::TrainError;

/// burn-train's `FileCheckpointer` with atomic writes: each record is written to a hidden staging
/// file beside its destination and renamed into place, so a process killed while it saves leaves
/// either the whole `{name}-N.bpk` or none (burn's own writes straight into the final name, and a
/// half-written record would count as a complete checkpoint on resume).
pub struct AtomicFileCheckpointer {
    directory: PathBuf,
    name: String,
}

impl AtomicFileCheckpointer {
    pub fn new(directory: &Path, name: &str) -> Self {
        std::fs::create_dir_all(directory).ok();
        Self { directory: directory.to_path_buf(), name: name.to_string() }
    }

    fn path(&self, epoch: usize) -> PathBuf {
        self.directory.join(format!("{}-{epoch}.bpk", self.name))
    }
}

impl<R: Checkpoint> Checkpointer<R> for AtomicFileCheckpointer {
    fn save(&self, epoch: usize, record: R) -> Result<(), CheckpointerError> {
        let path = self.path(epoch);
        let staging = self.directory.join(format!(".{}-{epoch}.bpk.{}.tmp", self.name, std::process::id()));
        let named = |e: &dyn std::fmt::Display| {
            CheckpointerError::Unknown(format!("{}: cannot write the checkpoint: {e}", path.display()))
        };
        let result = record.save(staging.clone()).map_err(|e| named(&e)).and_then(|_| {
            if !staging.exists() {
                return Ok(()); // a stateless record writes nothing
            }
            let synced = std::fs::File::open(&staging).and_then(|file| file.sync_all());
            synced
                .and_then(|_| kiln_data::io::fault_point(&path))
                .and_then(|_| std::fs::rename(&staging, &path))
                .map_err(|e| named(&e))
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&staging);
        }
        result
    }

    fn delete(&self, epoch: usize) -> Result<(), CheckpointerError> {
        match std::fs::remove_file(self.path(epoch)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CheckpointerError::IOError(e)),
            _ => Ok(()),
        }
    }

    fn restore(&self, epoch: usize) -> Result<R, CheckpointerError> {
        R::load(self.path(epoch))
    }
}

/// Removes the staging files (`.NAME.PID.tmp`) a killed kiln process left in `dir` and its
/// subdirectories: the caller holds the run's lock, so no live writer owns them. A teachers'
/// `label_cache/` is left alone: distilled student runs write it without that lock.
pub fn remove_stale_staging(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        match entry.file_type() {
            Ok(kind) if kind.is_dir() && name != "label_cache" => remove_stale_staging(&path),
            Ok(kind) if kind.is_file() && name.starts_with('.') && name.ends_with(".tmp") => {
                let _ = std::fs::remove_file(&path);
            }
            _ => {}
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use burn::store::ModuleRecord;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-checkpoint-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_checkpoint_appears_whole_under_its_name_and_restores() {
        let dir = scratch("atomic");
        let device = kiln_models::device::cpu();
        let linear = burn::nn::LinearConfig::new(3, 2).init(&device);
        let checkpointer = AtomicFileCheckpointer::new(&dir, "model");
        Checkpointer::<ModuleRecord>::save(&checkpointer, 4, linear.clone().into_record()).unwrap();
        let names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
        assert_eq!(names, ["model-4.bpk"], "no staging file is left beside the record");
        let restored: ModuleRecord = checkpointer.restore(4).unwrap();
        assert_eq!(restored.len(), linear.into_record().len());
        Checkpointer::<ModuleRecord>::delete(&checkpointer, 4).unwrap();
        Checkpointer::<ModuleRecord>::delete(&checkpointer, 4).expect("deleting what is gone is no error");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_staging_files_go_but_a_label_cache_and_real_files_stay() {
        let dir = scratch("staging");
        for sub in ["", "checkpoint", "label_cache/abc"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
            std::fs::write(dir.join(sub).join(".model-3.bpk.4242.tmp"), b"half").unwrap();
            std::fs::write(dir.join(sub).join("kept.json"), b"{}").unwrap();
        }
        remove_stale_staging(&dir);
        assert!(!dir.join(".model-3.bpk.4242.tmp").exists() && !dir.join("checkpoint/.model-3.bpk.4242.tmp").exists());
        assert!(dir.join("label_cache/abc/.model-3.bpk.4242.tmp").exists(), "another process may be labelling");
        for sub in ["", "checkpoint", "label_cache/abc"] {
            assert!(dir.join(sub).join("kept.json").exists());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
