//! What can stop a training, evaluation or inference run, with the conversions that let every
//! layer use `?`; [`AtPath`] names the file of a bare I/O error.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    #[error(transparent)]
    Weights(#[from] kiln_models::weights::WeightsError),
    #[error(transparent)]
    Adapter(#[from] kiln_models::lora::LoraError),
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),
    #[error(transparent)]
    Device(#[from] kiln_models::DeviceError),
    #[error(transparent)]
    Loss(#[from] crate::loss::LossError),
    /// A batch the data loader could not make (an unreadable image, ...).
    #[error("training failed: {0}")]
    Batch(#[from] burn::data::dataset::DatasetError),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
    #[error("training failed: {0}")]
    Training(String),
}

/// `.at(path)`: an I/O (or any displayable) error becomes a [`TrainError::Io`] naming the file.
pub trait AtPath<T> {
    fn at(self, path: &Path) -> Result<T, TrainError>;
}

impl<T, E: std::fmt::Display> AtPath<T> for Result<T, E> {
    fn at(self, path: &Path) -> Result<T, TrainError> {
        self.map_err(|e| TrainError::Io { path: path.to_path_buf(), message: e.to_string() })
    }
}
