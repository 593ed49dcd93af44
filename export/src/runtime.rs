//! A kiln ONNX export (`kiln export`, `kiln optimize`: FP32, FP16 or INT8 Q/DQ) opened for
//! `kiln eval`, `infer` and `bench` without Python: the class names, category ids, input size and
//! task come from the metadata kiln wrote into the file, and the graph runs on kiln's interpreter
//! with the student's own post-processing ([`OnnxDetector`]).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use image::RgbImage;
use kiln_models::yolo::predict::{Detection, PredictOptions};
use onnx_ir::{Message, ModelProto};

use crate::ExportError;
use crate::int8::OnnxDetector;

/// What an exported model computes in, as the report names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Float32,
    Float16,
    /// Q/DQ nodes around the convolutions (float32 elsewhere).
    Int8,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Float32 => "FP32",
            Precision::Float16 => "FP16",
            Precision::Int8 => "INT8",
        })
    }
}

/// An exported student, read and ready to run.
pub struct OnnxStudent {
    pub path: PathBuf,
    /// The architecture it was exported from (`yolov8n-seg`, ...).
    pub model_name: String,
    pub classes: Vec<String>,
    pub category_ids: Vec<u64>,
    pub imgsz: u32,
    pub segment: bool,
    pub precision: Precision,
    pub bytes: u64,
    detector: OnnxDetector,
}

/// Whether `path` names an ONNX file (by its extension, as the commands choose their engine).
pub fn is_onnx(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// Reads and parses an ONNX file; every failure names the file.
pub fn read_model(path: &Path) -> Result<ModelProto, ExportError> {
    let io = |message: String| ExportError::Io { path: path.to_path_buf(), message };
    let bytes = std::fs::read(path).map_err(|e| io(format!("cannot read it: {e}")))?;
    let model = ModelProto::parse_from_bytes(&bytes).map_err(|e| {
        io(format!("not an ONNX model ({e}); the file may be truncated or corrupt: export it again with `kiln export`"))
    })?;
    if model.graph.is_none() {
        return Err(io("an ONNX model without a graph; export it again with `kiln export`".into()));
    }
    Ok(model)
}

fn metadata<'m>(model: &'m ModelProto, key: &str) -> Option<&'m str> {
    model.metadata_props.iter().find(|p| p.key == key).map(|p| p.value.as_str())
}

impl OnnxStudent {
    /// Opens a kiln export: refuses files that are not ONNX, lack kiln's metadata, or take more
    /// than one image per call (the interpreter runs image by image).
    pub fn open(path: &Path, device: &Device) -> Result<Self, ExportError> {
        let model = read_model(path)?;
        let bad = |message: String| ExportError::Io { path: path.to_path_buf(), message };
        let field = |key: &str| {
            metadata(&model, key).ok_or_else(|| {
                bad(format!(
                    "no `{key}` in its metadata: not a kiln export (kiln runs the ONNX files `kiln export` and `kiln optimize` write)"
                ))
            })
        };
        let classes: Vec<String> = serde_json::from_str(field("kiln.classes")?)
            .map_err(|e| bad(format!("bad class list in its metadata: {e}")))?;
        let category_ids: Vec<u64> = serde_json::from_str(field("kiln.category_ids")?)
            .map_err(|e| bad(format!("bad category ids in its metadata: {e}")))?;
        if classes.is_empty() || classes.len() != category_ids.len() {
            return Err(bad(format!(
                "its metadata lists {} class names and {} category ids",
                classes.len(),
                category_ids.len()
            )));
        }
        let imgsz: u32 = field("imgsz")?
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .next()
            .and_then(|v| v.trim().parse().ok())
            .filter(|&s: &u32| s >= 32 && s % 32 == 0)
            .ok_or_else(|| {
                bad(format!("bad input size `{}` in its metadata", metadata(&model, "imgsz").unwrap_or("")))
            })?;
        let batch = metadata(&model, "batch").unwrap_or("1");
        if batch != "1" {
            return Err(bad(format!(
                "exported for batch {batch}; kiln runs ONNX files image by image: export with --batch 1"
            )));
        }
        let segment = field("task")? == "segment";
        let precision = if metadata(&model, "kiln.int8").is_some() {
            Precision::Int8
        } else if metadata(&model, "kiln.half") == Some("true") {
            Precision::Float16
        } else {
            Precision::Float32
        };
        let model_name = field("kiln.model")?.to_string();
        let detector = OnnxDetector::new(&model, classes.len(), imgsz, device).map_err(|e| bad(e.to_string()))?;
        let bytes = Message::compute_size(&model);
        Ok(Self {
            path: path.to_path_buf(),
            model_name,
            classes,
            category_ids,
            imgsz,
            segment,
            precision,
            bytes,
            detector,
        })
    }

    /// Detections in `image`'s own pixels.
    pub fn predict(&self, image: &RgbImage, options: &PredictOptions) -> Result<Vec<Detection>, ExportError> {
        self.detector.predict(image, options)
    }

    /// The detector, for raw outputs.
    pub fn detector(&self) -> &OnnxDetector {
        &self.detector
    }
}
