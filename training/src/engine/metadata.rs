//! `metadata.json` of a run: what was trained on, how, when, with which versions.

use std::path::Path;

use crate::error::TrainError;
use crate::split::StudentData;

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
    data: &StudentData,
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
