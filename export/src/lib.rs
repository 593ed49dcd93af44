//! kiln's edge deployment. A trained student becomes an ONNX file that ONNX Runtime and TensorRT
//! run as they run an Ultralytics export (`images` in, `output0` boxes/scores/mask coefficients and
//! `output1` prototypes out, class names, stride, size and task in the metadata), and a TensorRT
//! engine where `trtexec` is installed.
//!
//! The graph comes from burn-onnx's exporter, which records the module's own forward pass; the
//! layers it cannot lower are swapped for equivalent exportable forms first
//! ([`kiln_models::lowering`]), and general graph passes ([`graph`]) finish the file.

#[doc(hidden)]
pub mod fuzz;
pub mod graph;
pub mod int8;
pub mod interpreter;
pub mod latency;
pub mod onnx;
pub mod optimize;
pub mod quantize;
pub mod runtime;
pub mod tensorrt;

use std::path::PathBuf;

pub use onnx::{ExportOptions, ExportSummary, onnx_bytes, save_model};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Weights(#[from] kiln_models::WeightsError),
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    #[error(transparent)]
    Device(#[from] kiln_models::DeviceError),
    #[error("the ONNX exporter cannot lower this model: {0}")]
    Exporter(String),
    #[error("ONNX graph: {0}")]
    Graph(String),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{0}")]
    Options(String),
}
