//! The embeddable entry point: a trained kiln student (`kiln train-student` writes it) loaded from
//! its `.safetensors` file, whose header carries the architecture, class names, category ids and
//! input size, and run on an image: the detections come back in original-image pixels with their
//! class names and masks. No CLI, no training code: an edge app depends on `kiln-models` only and
//! picks its backend with a Cargo feature (`flex` for the CPU, `wgpu` for any GPU) and opens the
//! device with [`crate::device`] (`Backend::Wgpu.open()?`), which turns a missing driver into an
//! error. Half-precision files load everywhere: weights become float32 on the host.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::Device;
use image::RgbImage;
use kiln_data::BinaryMask;

use crate::device::{Backend, DeviceError};
use crate::weights::{WeightsError, read_safetensors_metadata};
use crate::yolo::predict::PredictOptions;
use crate::yolo::{YoloConfig, YoloV8};

/// What a student file says about itself (the `kiln.*` keys of its safetensors header).
#[derive(Debug, Clone, PartialEq)]
pub struct StudentInfo {
    /// Architecture with the dataset's class count (`yolov8n-seg`, `fastsam-s`, ...).
    pub config: YoloConfig,
    /// Class names in class-id order, from the dataset it was trained on.
    pub classes: Vec<String>,
    /// The dataset's COCO category id of each class.
    pub category_ids: Vec<u64>,
    /// The square input size it was trained at.
    pub imgsz: u32,
    /// The weights file.
    pub weights: PathBuf,
}

impl StudentInfo {
    /// Reads `path`: a run directory (its `weights/best.safetensors`) or a kiln `.safetensors` file.
    pub fn read(path: &Path) -> Result<Self, WeightsError> {
        let weights = if path.is_dir() { path.join("weights/best.safetensors") } else { path.to_path_buf() };
        let not_a_student = |message: String| WeightsError::Read { path: weights.clone(), message };
        if !weights.is_file() {
            return Err(not_a_student("no such weights file (a run directory holds weights/best.safetensors)".into()));
        }
        let metadata = read_safetensors_metadata(&weights)?;
        let field = |key: &str| {
            metadata.get(key).cloned().ok_or_else(|| {
                not_a_student(format!(
                    "not a kiln student (no `{key}` in its metadata); train one with `kiln train-student`"
                ))
            })
        };
        let classes: Vec<String> = serde_json::from_str(&field("kiln.classes")?)
            .map_err(|e| not_a_student(format!("bad class list in its metadata: {e}")))?;
        let category_ids: Vec<u64> = serde_json::from_str(&field("kiln.category_ids")?)
            .map_err(|e| not_a_student(format!("bad category ids in its metadata: {e}")))?;
        let imgsz: u32 =
            field("kiln.imgsz")?.parse().map_err(|e| not_a_student(format!("bad input size in its metadata: {e}")))?;
        let config: YoloConfig = field("kiln.model")?.parse().map_err(not_a_student)?;
        if classes.len() != category_ids.len() || classes.is_empty() {
            return Err(not_a_student(format!(
                "its metadata lists {} class names but {} category ids",
                classes.len(),
                category_ids.len()
            )));
        }
        Ok(Self { config: config.with_num_classes(classes.len()), classes, category_ids, imgsz, weights })
    }

    /// Builds the model on `device` and loads the weights (all keys, exact shapes).
    pub fn load_model(&self, device: &Device) -> Result<YoloV8, WeightsError> {
        Ok(YoloV8::load(&self.config, &self.weights, device)?.valid())
    }
}

/// One object found in an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// `x1, y1, x2, y2` in original-image pixels, clipped to the image.
    pub bbox: [f32; 4],
    pub score: f32,
    /// Index into [`Detector::classes`].
    pub class_id: usize,
    pub class_name: String,
    /// The dataset's COCO category id of the class.
    pub category_id: u64,
    /// Every class's score (sigmoid) at the anchor the detection came from; `score` is the largest.
    pub class_scores: Vec<f32>,
    /// The instance mask at the original image size (segmentation students).
    pub mask: Option<BinaryMask>,
}

/// A trained student ready to run: `Detector::load(path, &device)?.predict(&image)?`.
#[derive(Debug)]
pub struct Detector {
    model: YoloV8,
    info: StudentInfo,
    device: Device,
    /// Score and NMS thresholds (Ultralytics' predict defaults).
    pub options: PredictOptions,
    /// Square input size; the size the model was trained at unless changed (a multiple of 32).
    pub imgsz: u32,
}

/// Why a student could not be opened: its file, or the device.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

impl Detector {
    /// Opens `backend`'s device, checks that it runs (a missing driver or a GPU that cannot run
    /// the model is an error that says what to do), and loads the student onto it:
    /// `Detector::open("best.safetensors", Backend::Wgpu)?`.
    pub fn open(path: impl AsRef<Path>, backend: Backend) -> Result<Self, DetectorError> {
        let device = backend.open()?;
        crate::device::check(&device)?;
        Ok(Self::load(path, &device)?)
    }

    /// Loads a student (a run directory or its `.safetensors` file) onto `device`, its BatchNorms
    /// folded into the convolutions for inference ([`YoloV8::fold_batch_norms`]).
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self, WeightsError> {
        let info = StudentInfo::read(path.as_ref())?;
        let model = info.load_model(device)?.fold_batch_norms();
        Ok(Self { model, imgsz: info.imgsz, info, device: device.clone(), options: PredictOptions::default() })
    }

    /// A student already in memory (quantised, about to be exported) with its file's description.
    pub fn from_model(model: YoloV8, info: StudentInfo, device: &Device) -> Self {
        Self { model, imgsz: info.imgsz, info, device: device.clone(), options: PredictOptions::default() }
    }

    /// Burn's INT8 weight quantisation, for native inference: see [`quantize_weights_int8`].
    pub fn quantized_int8(mut self) -> Result<Self, String> {
        self.model = quantize_weights_int8(self.model, &self.device)?;
        Ok(self)
    }

    pub fn with_options(mut self, options: PredictOptions) -> Self {
        self.options = options;
        self
    }

    /// Runs at another square size (rounded up to a multiple of 32, the network's largest stride).
    pub fn with_imgsz(mut self, imgsz: u32) -> Self {
        self.imgsz = imgsz.div_ceil(32).max(1) * 32;
        self
    }

    pub fn info(&self) -> &StudentInfo {
        &self.info
    }

    pub fn classes(&self) -> &[String] {
        &self.info.classes
    }

    pub fn model(&self) -> &YoloV8 {
        &self.model
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The detections of one image, best first, or the device's failure (a GPU that cannot run
    /// the model, a lost device).
    pub fn predict(&self, image: &RgbImage) -> Result<Vec<Detection>, DeviceError> {
        Ok(self
            .model
            .predict(image, self.imgsz, &self.options, &self.device)?
            .into_iter()
            .map(|d| Detection {
                bbox: d.bbox,
                score: d.score,
                class_id: d.class_id,
                class_name: self.info.classes[d.class_id].clone(),
                category_id: self.info.category_ids[d.class_id],
                class_scores: d.class_scores,
                mask: d.mask,
            })
            .collect())
    }
}

/// Burn's post-training weight quantisation of a student: every convolution's weights stored as
/// symmetric 8-bit integers with one scale per tensor (a quarter of their float32 memory), and
/// dequantised for compute by the backend. The DFL's fixed bin values (0..15, used as exact
/// numbers) and BatchNorm stay float. CPU (flex) only: on wgpu, Burn 0.22 has no native int8
/// storage there and its packed int8 weights give wrong detections (checked in the tests), so
/// other devices get an error that points to the INT8 ONNX export instead.
pub fn quantize_weights_int8(model: YoloV8, device: &Device) -> Result<YoloV8, String> {
    #[cfg(feature = "flex")]
    let supported = *device == Device::flex();
    #[cfg(not(feature = "flex"))]
    let supported = false;
    if !supported {
        return Err(format!(
            "Burn's INT8 weights run on the CPU backend only (not {device:?}); for INT8 on a GPU export a \
             calibrated model: `kiln export --int8 --calibration FILE` (ONNX Runtime, TensorRT)"
        ));
    }
    let dfl = model.head.dfl.clone();
    let mut quantized = model.map(&mut ConvWeightsInt8);
    quantized.head.dfl = dfl;
    Ok(quantized)
}

/// Quantises 4-D (convolution) weights, packing four values per u32 word along an axis whose size
/// is a multiple of 4 (every backend reads that layout; GPU backends may lack native int8).
struct ConvWeightsInt8;

impl burn::module::ModuleMapper for ConvWeightsInt8 {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<burn::tensor::Tensor<D>>,
    ) -> burn::module::Param<burn::tensor::Tensor<D>> {
        use burn::tensor::quantization::{
            Calibration, QuantScheme, QuantStore, QuantValue, compute_q_params, compute_range,
        };
        if D != 4 {
            return param;
        }
        let dims = param.val().dims();
        let Some(axis) = (0..D).find(|&i| dims[D - 1 - i] % 4 == 0) else { return param };
        param.map(|tensor| {
            let scheme = QuantScheme::default().with_value(QuantValue::Q8S).with_store(QuantStore::PackedU32(axis));
            let range = compute_range(&scheme, &tensor, &Calibration::MinMax);
            let qparams = compute_q_params(&scheme, range);
            tensor.quantize(&scheme, qparams)
        })
    }
}
