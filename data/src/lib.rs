//! kiln's data layer: COCO datasets read, inspected, repaired, validated, split, imported from the
//! YOLO layout, synthesised, rasterised and batched into Burn tensors.

#[cfg(feature = "batch")]
pub mod batch;
pub mod coco;
pub mod draw;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod inspect;
pub mod io;
pub mod letterbox;
pub mod mask;
pub mod paths;
pub mod pipeline;
pub mod repair;
pub mod rng;
pub mod split;
pub mod synth;
pub mod validate;
pub mod video;
pub mod yolo;

#[cfg(feature = "batch")]
pub use batch::{CocoDetectionDataset, DetectionBatch, DetectionBatcher, DetectionItem, InstanceLabel};
pub use coco::{CocoAnnotation, CocoCategory, CocoDataset, CocoImage, RleCounts, RleJson, Segmentation};
pub use error::{DataError, Result};
pub use inspect::{DatasetSummary, Recommendation, inspect};
pub use letterbox::{Letterbox, planar_pixels};
pub use mask::{BinaryMask, Rle};
pub use pipeline::{LoadedDataset, SPLITS_METADATA_FILE, ValidateOptions, ValidateReport, load_dataset, run_validate};
pub use repair::{RepairSummary, repair};
pub use split::{GroupBy, Split, SplitOptions, SplitSpec, split};
pub use synth::{SynthLabels, SynthOptions, SynthStyle, synthesize};
pub use validate::{Problem, Severity, Validation, validate};
pub use yolo::import_yolo;
