//! Errors of the data layer: each names the file and says what is wrong with it.

use std::path::{Path, PathBuf};

pub type Result<T, E = DataError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    // Not `source`: the message already holds the cause, and a source would be printed twice
    // by error reporters that walk the chain.
    #[error("{path}: {what}: {cause}")]
    Io { path: PathBuf, what: &'static str, cause: std::io::Error },

    #[error("{path}: not valid COCO JSON: {message}")]
    Json { path: PathBuf, message: String },

    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },

    #[error("{path}: cannot read the image: {message}")]
    Image { path: PathBuf, message: String },

    #[error("invalid mask: {0}")]
    Mask(String),

    #[error("invalid split '{spec}': {message} (expected e.g. train:0.7,val:0.15,test:0.15)")]
    SplitSpec { spec: String, message: String },

    #[error(
        "refusing to overwrite existing output: {}; choose another output directory or remove them first",
        .0.join(", ")
    )]
    WouldOverwrite(Vec<String>),
}

impl DataError {
    pub fn io(path: &Path, what: &'static str, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), what, cause: source }
    }

    pub fn invalid(path: &Path, message: impl Into<String>) -> Self {
        Self::Invalid { path: path.to_path_buf(), message: message.into() }
    }
}
