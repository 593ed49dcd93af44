//! `kiln export --int8`: the FP32 graph calibrated on real images of the dataset and rewritten
//! with Q/DQ nodes ([`crate::quantize`]); [`OnnxDetector`] runs either graph on the CPU through
//! kiln's interpreter with the student's own post-processing, so the accuracy change is measured
//! the same way `kiln eval` measures a student.

use std::path::Path;

use burn::tensor::Device;
use image::RgbImage;
use kiln_data::{CocoDataset, Letterbox};
use kiln_models::yolo::predict::{Detection, PredictOptions, finish, non_max_suppression};
use onnx_ir::ModelProto;

use crate::ExportError;
use crate::interpreter::{Interpreter, Value};
use crate::quantize::{ActivationType, Calibration, calibrate, insert_qdq};

/// Letterboxed `[1, 3, size, size]` RGB 0..1 input of an image, as the student sees it.
pub fn letterboxed_input(image: &RgbImage, size: u32) -> (Value, Letterbox) {
    let letterbox = Letterbox::new(image.width(), image.height(), size, size);
    let pixels = kiln_data::planar_pixels(&letterbox.apply_image(image));
    (Value::new(vec![1, 3, size as usize, size as usize], pixels), letterbox)
}

/// Up to `limit` images of `data` (spread evenly over the file), letterboxed to `size`.
pub fn calibration_inputs(
    data: &CocoDataset,
    images_dir: &Path,
    size: u32,
    limit: usize,
) -> Result<Vec<Value>, ExportError> {
    let n = data.images.len();
    if n == 0 {
        return Err(ExportError::Options("the calibration dataset has no images".into()));
    }
    let count = limit.clamp(1, n);
    (0..count)
        .map(|i| {
            let image = &data.images[i * n / count];
            let path = kiln_data::paths::inside(images_dir, &image.file_name, &format!("image {}", image.id))?;
            Ok(letterboxed_input(&kiln_data::io::read_rgb_image(&path)?, size).0)
        })
        .collect()
}

/// What quantisation did.
#[derive(Debug, Clone)]
pub struct Int8Summary {
    pub calibration: Calibration,
    pub activations: ActivationType,
    pub images: usize,
    pub activations_quantised: usize,
    pub convolutions: usize,
}

/// The Q/DQ model of `fp32` (an FP32 kiln export), calibrated on `inputs`.
pub fn quantize_model(
    fp32: &ModelProto,
    inputs: &[Value],
    calibration: Calibration,
    activations: ActivationType,
    device: &Device,
    progress: impl FnMut(),
) -> Result<(ModelProto, Int8Summary), ExportError> {
    let graph = fp32.graph.as_ref().ok_or_else(|| ExportError::Graph("no graph".into()))?;
    let interpreter = Interpreter::new(graph, device)?;
    let amax = calibrate(&interpreter, graph, inputs, calibration, progress)?;
    let mut shapes = std::collections::HashMap::new();
    interpreter.run(inputs[0].clone(), |name, value| {
        shapes.insert(name.to_string(), value.shape.clone());
    })?;
    let mut quantised = fp32.clone();
    let graph = quantised.graph.as_mut().expect("checked");
    crate::graph::resize_full_rank(graph, &shapes)?;
    let convolutions = insert_qdq(graph, &amax, activations)?;
    crate::graph::set_metadata(
        &mut quantised,
        "kiln.int8",
        &format!("{calibration}, {} images, {activations:?} activations", inputs.len()),
    );
    let summary =
        Int8Summary { calibration, activations, images: inputs.len(), activations_quantised: amax.len(), convolutions };
    Ok((quantised, summary))
}

/// A kiln ONNX export run by kiln's interpreter, with the student's post-processing.
pub struct OnnxDetector {
    interpreter: Interpreter,
    classes: usize,
    imgsz: u32,
}

impl OnnxDetector {
    pub fn new(model: &ModelProto, classes: usize, imgsz: u32, device: &Device) -> Result<Self, ExportError> {
        let graph = model.graph.as_ref().ok_or_else(|| ExportError::Graph("no graph".into()))?;
        Ok(Self { interpreter: Interpreter::new(graph, device)?, classes, imgsz })
    }

    /// Raw outputs (`output0`, and `output1` for segmentation) of one letterboxed input.
    pub fn outputs(&self, input: Value) -> Result<Vec<Value>, ExportError> {
        self.interpreter.run(input, |_, _| {})
    }

    pub fn predict(&self, image: &RgbImage, options: &PredictOptions) -> Result<Vec<Detection>, ExportError> {
        let (input, letterbox) = letterboxed_input(image, self.imgsz);
        let outputs = self.outputs(input)?;
        Ok(detections_from_outputs(&outputs, self.classes, &letterbox, options))
    }
}

/// Ultralytics-layout outputs of one image (batch 1) → detections in original-image pixels.
pub fn detections_from_outputs(
    outputs: &[Value],
    classes: usize,
    letterbox: &Letterbox,
    options: &PredictOptions,
) -> Vec<Detection> {
    let decoded = &outputs[0];
    let anchors = decoded.shape[2];
    let candidates = non_max_suppression(&decoded.data, classes, anchors, options);
    let prototypes = outputs.get(1).map(|p| (p.data.as_slice(), (p.shape[2], p.shape[3])));
    finish(candidates, prototypes, letterbox)
}
