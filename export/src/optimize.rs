//! `kiln optimize`: every deployable form of a trained student, each measured on itself. From the
//! student's weights it writes ONNX FP32, FP16 and INT8 Q/DQ (calibrated on the student's training
//! split), builds the TensorRT engine where `trtexec` exists (the exact command otherwise), and
//! reports for each artifact its file size, parameters, GFLOPs, latency (Burn flex on the
//! safetensors; kiln's interpreter and, where installed, ONNX Runtime on the ONNX files) and COCO
//! box/mask mAP on the validation split, computed by running that artifact, not the student.
//!
//! The data is found from the run's `metadata.json` (the training and validation splits it was
//! trained on); the outputs are staged beside the output directory and moved into place whole at
//! the end, so a failed or killed run leaves nothing, and an existing directory is never touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use indicatif::ProgressBar;
use kiln_models::StudentInfo;
use kiln_training::commands::{EVAL_PREDICT_OPTIONS, Evaluation, evaluate_predictor, evaluate_student};

use crate::int8::{calibration_inputs, quantize_model};
use crate::quantize::{ActivationType, Calibration};
use crate::runtime::OnnxStudent;
use crate::{ExportError, ExportOptions, latency, onnx_bytes, save_model, tensorrt};

/// What `kiln optimize` is asked to do.
#[derive(Debug, Clone)]
pub struct OptimizeRequest {
    /// A student run directory or its weights file.
    pub model: PathBuf,
    /// The directory to create (refused when it exists).
    pub output: PathBuf,
    /// Calibration images [default: the run's training split, from its metadata.json].
    pub calibration: Option<PathBuf>,
    /// Where accuracy is measured [default: the run's validation split].
    pub val: Option<PathBuf>,
    /// Directory of the splits' images [default: the run's].
    pub images: Option<PathBuf>,
    pub calibration_images: usize,
    pub calibration_method: Calibration,
    pub activations: ActivationType,
    /// Timed runs and warm-up runs of each latency.
    pub runs: usize,
    pub warmup: usize,
    /// Also time the ONNX files in ONNX Runtime when a Python with it is found.
    pub onnxruntime: bool,
}

/// One deployable file and what it measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Artifact {
    pub name: String,
    /// Its path, relative to the report's directory (the student's: absolute).
    pub file: PathBuf,
    pub bytes: u64,
    pub parameters: usize,
    pub gflops: f64,
    /// Median milliseconds per image (batch 1) by engine.
    pub latency_ms: BTreeMap<String, f64>,
    pub box_map50: f64,
    pub box_map50_95: f64,
    pub mask_map50: Option<f64>,
    pub mask_map50_95: Option<f64>,
}

/// The TensorRT step: built here, or the command for the target device.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorRtStep {
    pub engine: Option<PathBuf>,
    pub command: String,
}

/// Everything `kiln optimize` measured; `report.json`, and `report.md` in words.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OptimizeReport {
    pub model: String,
    pub weights: PathBuf,
    pub imgsz: u32,
    pub val: PathBuf,
    pub val_images: usize,
    pub calibration: PathBuf,
    pub calibration_images: usize,
    pub calibration_method: String,
    pub artifacts: Vec<Artifact>,
    pub tensorrt: TensorRtStep,
    pub latency_runs: usize,
    pub host: String,
    pub output: PathBuf,
}

/// The splits a run was trained on, from its `metadata.json` (`request.train`, `val`, `images`).
fn run_data(weights: &Path) -> (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>) {
    let run = weights.parent().and_then(Path::parent);
    let Some(metadata) = run.map(|r| r.join("metadata.json")).filter(|m| m.is_file()) else {
        return (None, None, None);
    };
    let Ok(json) = std::fs::read(&metadata)
        .map_err(|_| ())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).map_err(|_| ()))
    else {
        return (None, None, None);
    };
    let path = |key: &str| json["request"][key].as_str().map(PathBuf::from);
    (path("train"), path("val"), path("images"))
}

fn stage_dir(output: &Path) -> Result<PathBuf, ExportError> {
    let io = |message: String| ExportError::Io { path: output.to_path_buf(), message };
    if output.exists() {
        return Err(io("exists; kiln never replaces earlier outputs: remove it or choose another --output".into()));
    }
    let name = output.file_name().ok_or_else(|| io("not a directory path".into()))?;
    let staging = output.with_file_name(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| io(format!("cannot create {}: {e}", staging.display())))?;
    Ok(staging)
}

/// Removes the staging directory unless the run reached its end.
struct Staging(PathBuf, bool);

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.1 {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn scores(evaluation: &Evaluation) -> (f64, f64, Option<f64>, Option<f64>) {
    (
        evaluation.boxes.ap50(),
        evaluation.boxes.ap(),
        evaluation.masks.as_ref().map(|m| m.ap50()),
        evaluation.masks.as_ref().map(|m| m.ap()),
    )
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    std::fs::write(path, bytes).map_err(|e| ExportError::Io { path: path.to_path_buf(), message: e.to_string() })
}

/// Runs the whole optimisation; `progress(label)` gives a bar for each long step.
pub fn optimize(
    request: &OptimizeRequest,
    device: &Device,
    progress: &dyn Fn(&str) -> ProgressBar,
) -> Result<OptimizeReport, ExportError> {
    let info = StudentInfo::read(&request.model)?;
    let (run_train, run_val, run_images) = run_data(&info.weights);
    let missing = |what: &str, flag: &str| {
        ExportError::Options(format!(
            "{}: no {what} given and the run has no metadata.json naming one: pass {flag} FILE",
            request.model.display()
        ))
    };
    let calibration_path =
        request.calibration.clone().or(run_train).ok_or_else(|| missing("calibration split", "--calibration"))?;
    let val_path = request.val.clone().or(run_val).ok_or_else(|| missing("validation split", "--val"))?;
    let images = request.images.clone().or(run_images);
    let calibration_data = kiln_data::load_dataset(&calibration_path, images.as_deref())?;
    let val_loaded = kiln_data::load_dataset(&val_path, images.as_deref())?;
    let mut val = val_loaded.dataset;
    kiln_data::repair(&mut val);
    if val.class_names() != info.classes {
        return Err(ExportError::Options(format!(
            "{}: the student knows classes {:?} but the data has {:?}",
            val_path.display(),
            info.classes,
            val.class_names()
        )));
    }
    let staging = Staging(stage_dir(&request.output)?, false);
    let stage = |name: &str| staging.0.join(name);

    let model = info.load_model(device)?;
    let imgsz = info.imgsz;
    let parameters = kiln_models::parameter_count(&model);
    let gflops = model.cost(imgsz as usize, imgsz as usize).flops / 1e9;
    let options = |half| ExportOptions { imgsz, batch: 1, half };

    // The ONNX files.
    let (fp32, folded) = onnx_bytes(&model, &info, &options(false), device)?;
    save_model(&fp32, &stage("model.onnx"), folded)?;
    let (fp16, _) = onnx_bytes(&model, &info, &options(true), device)?;
    save_model(&fp16, &stage("model.fp16.onnx"), folded)?;
    let inputs =
        calibration_inputs(&calibration_data.dataset, &calibration_data.images_dir, imgsz, request.calibration_images)?;
    let bar = progress("calibrating INT8");
    let passes = if matches!(request.calibration_method, Calibration::Percentile(_)) { 2 } else { 1 };
    bar.set_length((inputs.len() * passes) as u64);
    let (int8, _) =
        quantize_model(&fp32, &inputs, request.calibration_method, request.activations, device, || bar.inc(1))?;
    bar.finish_and_clear();
    save_model(&int8, &stage("model.int8.onnx"), folded)?;

    // TensorRT: from the FP16 ONNX (what `trtexec --fp16` builds best from the FP32 graph).
    let arguments = tensorrt::trtexec_arguments(
        &request.output.join("model.onnx"),
        &request.output.join("model.engine"),
        tensorrt::Precision::Fp16,
    );
    let command = tensorrt::command_line(&arguments);
    let engine = match tensorrt::find_trtexec() {
        Some(trtexec) => {
            let staged =
                tensorrt::trtexec_arguments(&stage("model.onnx"), &stage("model.engine"), tensorrt::Precision::Fp16);
            tensorrt::build_engine(&trtexec, &staged, &stage("model.engine"))?;
            Some(PathBuf::from("model.engine"))
        }
        None => None,
    };

    // Accuracy and latency of each artifact, measured on itself.
    let python = if request.onnxruntime { latency::onnxruntime_python().ok() } else { None };
    let timing = (request.runs, request.warmup);
    let median_ms =
        |seconds: &[f64]| latency::Timings { engine: String::new(), seconds: seconds.to_vec() }.median() * 1e3;
    let mut artifacts = Vec::new();
    let student = kiln_models::Detector::from_model(model.clone(), info.clone(), device);
    let evaluation =
        evaluate_student(&student, &val, &val_loaded.images_dir, Some(imgsz), 8, device, &progress("student val"))
            .map_err(|e| ExportError::Options(e.to_string()))?;
    let bar = progress("student latency");
    bar.set_length(request.runs as u64);
    let flex = latency::burn_student(&model, 1, imgsz as usize, timing, device, || bar.inc(1))?;
    bar.finish_and_clear();
    let (box_map50, box_map50_95, mask_map50, mask_map50_95) = scores(&evaluation);
    artifacts.push(Artifact {
        name: "student (safetensors, FP32)".into(),
        file: info.weights.clone(),
        bytes: std::fs::metadata(&info.weights).map(|m| m.len()).unwrap_or(0),
        parameters,
        gflops,
        latency_ms: BTreeMap::from([(format!("Burn {}", kiln_models::device::describe(device)), median_ms(&flex))]),
        box_map50,
        box_map50_95,
        mask_map50,
        mask_map50_95,
    });
    for (name, file) in
        [("ONNX FP32", "model.onnx"), ("ONNX FP16", "model.fp16.onnx"), ("ONNX INT8 Q/DQ", "model.int8.onnx")]
    {
        let path = stage(file);
        let exported = OnnxStudent::open(&path, &kiln_models::device::cpu())?;
        let evaluation = evaluate_predictor(
            &val,
            &val_loaded.images_dir,
            &exported.category_ids,
            exported.segment,
            &progress(&format!("{name} val")),
            |image| exported.predict(image, &EVAL_PREDICT_OPTIONS).map_err(|e| e.to_string()),
        )
        .map_err(|e| ExportError::Options(e.to_string()))?;
        let bar = progress(&format!("{name} latency"));
        bar.set_length(request.runs as u64);
        let interpreted = latency::kiln_interpreter(exported.detector(), imgsz as usize, timing, || bar.inc(1))?;
        bar.finish_and_clear();
        let mut latency_ms = BTreeMap::from([("kiln ONNX interpreter".to_string(), median_ms(&interpreted))]);
        if let Some(python) = &python {
            let run = latency::onnxruntime(python, &path, timing, 0)?;
            latency_ms.insert(format!("ONNX Runtime {}", run.version), median_ms(&run.seconds));
        }
        let (box_map50, box_map50_95, mask_map50, mask_map50_95) = scores(&evaluation);
        artifacts.push(Artifact {
            name: name.into(),
            file: PathBuf::from(file),
            bytes: exported.bytes,
            parameters,
            gflops,
            latency_ms,
            box_map50,
            box_map50_95,
            mask_map50,
            mask_map50_95,
        });
    }

    let report = OptimizeReport {
        model: info.config.to_string(),
        weights: info.weights.clone(),
        imgsz,
        val: val_path,
        val_images: val.images.len(),
        calibration: calibration_path,
        calibration_images: inputs.len(),
        calibration_method: request.calibration_method.to_string(),
        artifacts,
        tensorrt: TensorRtStep { engine, command },
        latency_runs: request.runs,
        host: format!("{} CPU threads", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        output: request.output.clone(),
    };
    let json = serde_json::to_vec_pretty(&report).map_err(|e| ExportError::Options(e.to_string()))?;
    write_file(&stage("report.json"), &json)?;
    write_file(&stage("report.md"), report.markdown().as_bytes())?;
    std::fs::rename(&staging.0, &request.output).map_err(|e| ExportError::Io {
        path: request.output.clone(),
        message: format!("cannot move the finished outputs into place: {e}"),
    })?;
    let mut staging = staging;
    staging.1 = true;
    Ok(report)
}

impl OptimizeReport {
    /// The engines any artifact was timed on, in a fixed order.
    fn engines(&self) -> Vec<String> {
        let mut engines: Vec<String> = self.artifacts.iter().flat_map(|a| a.latency_ms.keys().cloned()).collect();
        engines.sort();
        engines.dedup();
        engines
    }

    /// The table of artifacts, as Markdown.
    pub fn table(&self) -> String {
        let engines = self.engines();
        let masks = self.artifacts.iter().any(|a| a.mask_map50.is_some());
        let mut header =
            vec!["artifact", "file", "size", "parameters", "GFLOPs"].into_iter().map(String::from).collect::<Vec<_>>();
        header.extend(engines.iter().map(|e| format!("{e} ms")));
        header.extend(["box mAP50", "box mAP50-95"].map(String::from));
        if masks {
            header.extend(["mask mAP50", "mask mAP50-95"].map(String::from));
        }
        let mut out = format!("| {} |\n|{}\n", header.join(" | "), "---|".repeat(header.len()));
        for a in &self.artifacts {
            let file = a.file.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            let mut cells = vec![
                a.name.clone(),
                format!("`{file}`"),
                format!("{:.1} MB", a.bytes as f64 / 1e6),
                format!("{:.2} M", a.parameters as f64 / 1e6),
                format!("{:.2}", a.gflops),
            ];
            cells
                .extend(engines.iter().map(|e| a.latency_ms.get(e).map(|ms| format!("{ms:.1}")).unwrap_or("–".into())));
            cells.extend([format!("{:.3}", a.box_map50), format!("{:.3}", a.box_map50_95)]);
            if masks {
                let cell = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or("–".into());
                cells.extend([cell(a.mask_map50), cell(a.mask_map50_95)]);
            }
            out += &format!("| {} |\n", cells.join(" | "));
        }
        out
    }

    /// `report.md`: the table and what it was measured on.
    pub fn markdown(&self) -> String {
        let tensorrt = match &self.tensorrt.engine {
            Some(engine) => {
                format!("TensorRT engine: `{}` (built with `{}`).", engine.display(), self.tensorrt.command)
            }
            None => format!(
                "TensorRT: `trtexec` is not installed here; on the target device build the engine with\n\n```sh\n{}\n```",
                self.tensorrt.command
            ),
        };
        format!(
            "# kiln optimize: {model} at {size}x{size}\n\n{table}\n\
             Accuracy: COCO mAP on `{val}` ({val_images} images), each artifact run on its own (the ONNX files by \
             kiln's interpreter, FP16 with float16 storage). Latency: median of {runs} runs, batch 1, {host}. \
             INT8: Q/DQ, calibrated ({method}) on {calibration_images} images of `{calibration}`. Parameters and \
             GFLOPs are the network's (the ONNX files store the same weights).\n\n{tensorrt}\n",
            model = self.model,
            size = self.imgsz,
            table = self.table(),
            val = self.val.display(),
            val_images = self.val_images,
            runs = self.latency_runs,
            host = self.host,
            method = self.calibration_method,
            calibration_images = self.calibration_images,
            calibration = self.calibration.display(),
        )
    }
}
