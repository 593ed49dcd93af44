//! One run per directory: a process writing a run holds an advisory lock (`flock`) on the run's
//! `.kiln.lock`, which records who holds it. A second `kiln` on the same directory (a new run, or
//! `--resume` while the first is alive) is refused with the holder's pid. The operating system
//! drops the lock when its process dies, even by `kill -9`, so a stale lock file is no obstacle: the
//! next run takes it over (and says whose it was).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{AtPath, TrainError};

/// The lock file inside a run directory.
pub const RUN_LOCK: &str = ".kiln.lock";

/// The lock on a run directory, held until dropped.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
    /// The directories `acquire` created, deepest first.
    created: Vec<PathBuf>,
    /// What the lock file said when it was taken over from a process that is gone.
    pub stale: Option<String>,
}

impl RunLock {
    /// Takes `dir`'s lock, creating `dir` when it does not exist; refused while another process
    /// holds it.
    pub fn acquire(dir: &Path) -> Result<RunLock, TrainError> {
        let created: Vec<PathBuf> =
            dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.exists()).map(Path::to_path_buf).collect();
        std::fs::create_dir_all(dir).at(dir)?;
        let path = dir.join(RUN_LOCK);
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).at(&path)?;
        let mut previous = String::new();
        // An unreadable record only makes the message poorer.
        let _ = file.read_to_string(&mut previous);
        let previous = previous.trim().to_string();
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(TrainError::Config(format!(
                    "{} is in use by another kiln process ({}); wait for it to end, stop it, or choose another \
                     --output",
                    dir.display(),
                    if previous.is_empty() { "starting".to_string() } else { previous }
                )));
            }
            Err(TryLockError::Error(error)) => {
                return Err(TrainError::Io {
                    path,
                    message: format!("cannot lock the run directory (one run per directory): {error}"),
                });
            }
        }
        let record = format!(
            "pid {} since {} ({})",
            std::process::id(),
            unix_time(),
            std::env::args().collect::<Vec<_>>().join(" ")
        );
        file.set_len(0).at(&path)?;
        file.seek(SeekFrom::Start(0)).at(&path)?;
        file.write_all(record.as_bytes()).at(&path)?;
        file.flush().at(&path)?;
        super::remove_stale_staging(dir);
        Ok(RunLock { file, path, created, stale: (!previous.is_empty()).then_some(previous) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    /// The lock goes with the file handle; a directory left holding only the lock file (a run that
    /// stopped before writing anything) is left as it was found: without the file, and gone if
    /// `acquire` created it.
    fn drop(&mut self) {
        let alone = self
            .path
            .parent()
            .and_then(|dir| std::fs::read_dir(dir).ok())
            .is_some_and(|entries| entries.flatten().all(|e| e.file_name() == RUN_LOCK));
        if alone {
            let _ = std::fs::remove_file(&self.path);
            // `remove_dir` removes empty directories only.
            for dir in &self.created {
                let _ = std::fs::remove_dir(dir);
            }
        }
        let _ = self.file.unlock();
    }
}

/// Seconds since the Unix epoch (UTC), enough to tell a run's start.
fn unix_time() -> String {
    let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("unix time {seconds}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-lock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = scratch("twice");
        let first = RunLock::acquire(&dir).unwrap();
        assert!(first.stale.is_none());
        std::fs::write(dir.join("results.csv"), "epoch\n").unwrap();
        let error = RunLock::acquire(&dir).unwrap_err().to_string();
        assert!(error.contains(&format!("pid {}", std::process::id())) && error.contains("in use"), "{error}");
        drop(first);
        let again = RunLock::acquire(&dir).expect("free once the holder is gone");
        assert!(again.stale.as_deref().is_some_and(|s| s.contains("pid")), "{:?}", again.stale);
        drop(again);
        assert!(dir.join(RUN_LOCK).is_file(), "a directory with a run keeps its lock file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stale_lock_file_is_taken_over_and_an_untouched_directory_left_clean() {
        let dir = scratch("stale");
        std::fs::create_dir_all(&dir).unwrap();
        // What a `kill -9`ed run leaves: the record, no lock (the kernel dropped it with the process).
        std::fs::write(dir.join(RUN_LOCK), "pid 999999 since unix time 1 (kiln train-student)").unwrap();
        let lock = RunLock::acquire(&dir).unwrap();
        assert_eq!(lock.stale.as_deref(), Some("pid 999999 since unix time 1 (kiln train-student)"));
        let record = std::fs::read_to_string(dir.join(RUN_LOCK)).unwrap();
        assert!(record.starts_with(&format!("pid {} ", std::process::id())), "{record}");
        drop(lock);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing but the lock was there: it goes");
        std::fs::remove_dir_all(&dir).unwrap();
        // Directories it had to create go with it when nothing was written.
        let nested = dir.join("experiment/teachers");
        drop(RunLock::acquire(&nested).unwrap());
        assert!(!dir.exists(), "the directories made for the lock are removed");
    }
}
