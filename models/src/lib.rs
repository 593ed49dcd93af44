//! kiln's models: Burn modules whose parameter names map onto the official checkpoints.

pub mod bases;
pub mod detector;
pub mod device;
#[doc(hidden)]
pub mod fuzz;
pub mod grounding_dino;
pub mod lora;
pub mod lowering;
#[macro_use]
pub mod nn;
pub mod sam;
pub mod torch_init;
pub mod weights;
pub mod yolo;

pub use detector::{Detection, Detector, DetectorError, StudentInfo};
pub use device::{Backend, DeviceError};
pub use weights::{MismatchReport, WeightsError, parameter_count};
pub use yolo::predict::PredictOptions;
pub use yolo::{Scale, Task, YoloConfig, YoloV8};
