//! Inference latency of a student however it is deployed: Burn (flex or wgpu) on the safetensors,
//! kiln's ONNX interpreter on an export, ONNX Runtime (an installed Python onnxruntime) on an
//! export. `kiln bench` prints one; `kiln optimize` reports every artifact's. One call is the
//! network and box decoding with every output read back to the host, as an application gets it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use kiln_models::YoloV8;
use kiln_models::device::read_floats;

use crate::ExportError;
use crate::int8::OnnxDetector;
use crate::interpreter::Value;

/// Seconds per call of the timed runs, in the order they ran.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Timings {
    pub engine: String,
    pub seconds: Vec<f64>,
}

impl Timings {
    fn percentile(&self, p: f64) -> f64 {
        let mut sorted = self.seconds.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.get(((sorted.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN)
    }

    pub fn median(&self) -> f64 {
        self.percentile(0.5)
    }

    pub fn p90(&self) -> f64 {
        self.percentile(0.9)
    }
}

/// The same deterministic pixels for every engine.
fn pixels(len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7919) % 255) as f32 / 255.0).collect()
}

fn timed<E>(
    runs: usize,
    warmup: usize,
    mut progress: impl FnMut(),
    mut call: impl FnMut() -> Result<(), E>,
) -> Result<Vec<f64>, E> {
    for _ in 0..warmup {
        call()?;
    }
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            call()?;
            progress();
            Ok(start.elapsed().as_secs_f64())
        })
        .collect()
}

/// A student run by Burn on `device` at `[batch, 3, size, size]`.
pub fn burn_student(
    model: &YoloV8,
    batch: usize,
    size: usize,
    (runs, warmup): (usize, usize),
    device: &Device,
    progress: impl FnMut(),
) -> Result<Vec<f64>, ExportError> {
    let input: Tensor<4> =
        Tensor::from_data(TensorData::new(pixels(batch * 3 * size * size), [batch, 3, size, size]), device);
    Ok(timed(runs, warmup, progress, || -> Result<(), kiln_models::DeviceError> {
        let output = model.forward(input.clone());
        let decoded = model.head.decode(&output, size);
        read_floats(decoded)?;
        if let Some(prototypes) = output.prototypes {
            read_floats(prototypes)?;
        }
        Ok(())
    })?)
}

/// An export run by kiln's interpreter (batch 1, its own input size).
pub fn kiln_interpreter(
    detector: &OnnxDetector,
    size: usize,
    (runs, warmup): (usize, usize),
    progress: impl FnMut(),
) -> Result<Vec<f64>, ExportError> {
    let input = Value::new(vec![1, 3, size, size], pixels(3 * size * size));
    timed(runs, warmup, progress, || detector.outputs(input.clone()).map(|_| ()))
}

/// What ONNX Runtime measured.
#[derive(Debug, Clone)]
pub struct OnnxRuntimeRun {
    pub version: String,
    pub seconds: Vec<f64>,
    pub input: Vec<usize>,
    pub peak_rss_kb: f64,
}

/// A Python that imports onnxruntime: `KILN_PYTHON`, else `python3`; the error says how to get one.
pub fn onnxruntime_python() -> Result<PathBuf, String> {
    let python = std::env::var_os("KILN_PYTHON").map(PathBuf::from).unwrap_or_else(|| "python3".into());
    let ok = std::process::Command::new(&python)
        .args(["-c", "import onnxruntime, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Ok(python)
    } else {
        Err(format!(
            "ONNX Runtime is not installed: `pip install onnxruntime numpy`, or set KILN_PYTHON to a python that has it ({} cannot import it)",
            python.display()
        ))
    }
}

/// `model` run by ONNX Runtime's CPU provider (`threads` 0: its own choice) through `python`.
pub fn onnxruntime(
    python: &Path,
    model: &Path,
    (runs, warmup): (usize, usize),
    threads: usize,
) -> Result<OnnxRuntimeRun, ExportError> {
    let failed = |message: String| ExportError::Io { path: model.to_path_buf(), message };
    let output = std::process::Command::new(python)
        .args(["-c", include_str!("onnxruntime_bench.py")])
        .arg(model)
        .args([runs.to_string(), warmup.to_string(), threads.to_string()])
        .output()
        .map_err(|e| failed(format!("cannot start {}: {e}", python.display())))?;
    if !output.status.success() {
        return Err(failed(format!(
            "ONNX Runtime could not run it: {}",
            String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or("")
        )));
    }
    let result: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| failed(format!("ONNX Runtime's answer is not JSON: {e}")))?;
    let numbers = |key: &str| -> Vec<f64> {
        result[key].as_array().map(|a| a.iter().filter_map(|v| v.as_f64()).collect()).unwrap_or_default()
    };
    Ok(OnnxRuntimeRun {
        version: result["version"].as_str().unwrap_or("?").to_string(),
        seconds: numbers("times"),
        input: numbers("input").into_iter().map(|v| v as usize).collect(),
        peak_rss_kb: result["peak_rss_kb"].as_f64().unwrap_or(0.0),
    })
}
