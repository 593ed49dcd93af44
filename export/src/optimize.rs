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
    /// Structured channel pruning: the share of the prunable channels removed (0: none).
    pub prune: f64,
    /// Epochs the pruned model is fine-tuned for on the training split (labels only) [default:
    /// half the student's own epochs, at least 3].
    pub prune_epochs: Option<usize>,
    /// Each pruned width is rounded to a multiple of this many channels (see
    /// `kiln_models::yolo::prune::prune`).
    pub prune_multiple: usize,
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

/// The pruning step: the ratio, the widths kept, and the fine-tuning run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PruningSummary {
    pub ratio: f64,
    pub criterion: String,
    pub groups: usize,
    pub channels_before: usize,
    pub channels_after: usize,
    pub epochs: usize,
    /// Fine-tuned with the student's own teachers (their cached labels on its unlabelled images),
    /// or on the labels alone.
    pub taught: bool,
    /// Box / mask mAP50 on the validation split right after pruning, before any fine-tuning.
    pub box_map50_before_finetune: f64,
    pub mask_map50_before_finetune: Option<f64>,
    /// The fine-tuning run directory (inside the output).
    pub run: PathBuf,
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
    /// What pruning removed and how the fine-tuning went, when `--prune` asked for it.
    pub pruning: Option<PruningSummary>,
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
    let name = output.file_name().ok_or_else(|| io("not a directory path".into()))?.to_string_lossy().into_owned();
    remove_stale_staging(output, &name);
    let staging = output.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| io(format!("cannot create {}: {e}", staging.display())))?;
    Ok(staging)
}

/// Staging directories of earlier runs killed before their end (`kill -9`, power loss): their
/// process is gone, so nothing will finish them.
fn remove_stale_staging(output: &Path, name: &str) {
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let prefix = format!(".{name}.");
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(".tmp")) else { continue };
        let alive = pid.parse::<u32>().is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
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
    // One kiln per directory: the output's parent (the student's run, or the experiment) is locked
    // while this runs, so a second optimize, or a run still writing the student, is refused with
    // the holder's pid instead of racing it.
    let parent = request.output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let _lock = kiln_training::engine::RunLock::acquire(parent).map_err(|e| ExportError::Options(e.to_string()))?;
    let staging = Staging(stage_dir(&request.output)?, false);
    let stage = |name: &str| staging.0.join(name);

    let model = info.load_model(device)?;
    let imgsz = info.imgsz;
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

    // A pruned student, fine-tuned on the same engine, exported like any student.
    let mut students = vec![("student (safetensors, FP32)".to_string(), model.clone(), info.clone())];
    let mut onnx_files =
        vec![("ONNX FP32", "model.onnx"), ("ONNX FP16", "model.fp16.onnx"), ("ONNX INT8 Q/DQ", "model.int8.onnx")];
    let mut pruning = None;
    if request.prune > 0.0 {
        let (pruned, pruned_info, summary) = prune_and_finetune(
            request,
            &info,
            &model,
            (&calibration_path, &val_path, images.as_deref()),
            &stage("pruned"),
            device,
        )?;
        let (pruned_fp32, folded) = onnx_bytes(&pruned, &pruned_info, &options(false), device)?;
        save_model(&pruned_fp32, &stage("model.pruned.onnx"), folded)?;
        let name = format!("pruned {:.0} % (safetensors)", request.prune * 100.0);
        students.push((name, pruned, pruned_info));
        onnx_files.push(("pruned ONNX FP32", "model.pruned.onnx"));
        pruning = Some(summary);
    }

    // Accuracy and latency of each artifact, measured on itself.
    let python = if request.onnxruntime { latency::onnxruntime_python().ok() } else { None };
    let timing = (request.runs, request.warmup);
    let median_ms =
        |seconds: &[f64]| latency::Timings { engine: String::new(), seconds: seconds.to_vec() }.median() * 1e3;
    let mut artifacts = Vec::new();
    for (name, model, info) in &students {
        let student = kiln_models::Detector::from_model(model.clone(), info.clone(), device);
        let evaluation = evaluate_student(
            &student,
            &val,
            &val_loaded.images_dir,
            Some(imgsz),
            8,
            device,
            &progress(&format!("{name} val")),
        )
        .map_err(|e| ExportError::Options(e.to_string()))?;
        let bar = progress(&format!("{name} latency"));
        bar.set_length(request.runs as u64);
        let flex = latency::burn_student(model, 1, imgsz as usize, timing, device, || bar.inc(1))?;
        bar.finish_and_clear();
        let (box_map50, box_map50_95, mask_map50, mask_map50_95) = scores(&evaluation);
        artifacts.push(Artifact {
            name: name.clone(),
            // Inside the output (the pruned run): relative to it, as the ONNX files.
            file: info.weights.strip_prefix(&staging.0).map(Path::to_path_buf).unwrap_or_else(|_| info.weights.clone()),
            bytes: std::fs::metadata(&info.weights).map(|m| m.len()).unwrap_or(0),
            parameters: kiln_models::parameter_count(model),
            gflops: model.cost(imgsz as usize, imgsz as usize).flops / 1e9,
            latency_ms: BTreeMap::from([(format!("Burn {}", kiln_models::device::describe(device)), median_ms(&flex))]),
            box_map50,
            box_map50_95,
            mask_map50,
            mask_map50_95,
        });
    }
    for (name, file) in onnx_files {
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
        // The ONNX files store the network of the student they came from.
        let source = if file.contains("pruned") { &artifacts[students.len() - 1] } else { &artifacts[0] };
        let (parameters, gflops) = (source.parameters, source.gflops);
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
        pruning,
        latency_runs: request.runs,
        host: format!("{} CPU threads", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        output: request.output.clone(),
    };
    let json = serde_json::to_vec_pretty(&report).map_err(|e| ExportError::Options(e.to_string()))?;
    write_file(&stage("report.json"), &json)?;
    write_file(&stage("report.md"), report.markdown().as_bytes())?;
    kiln_training::plots::save(&report.picture(), &stage("report.png"))?;
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
            // Files inside the output by their path there; the student by its name.
            let file = if a.file.is_relative() {
                a.file.display().to_string()
            } else {
                a.file.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
            };
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

    /// `report.png`: each artifact's latency (per engine) and accuracy as bars.
    pub fn picture(&self) -> image::RgbImage {
        use kiln_training::plots::{BLUE, ORANGE, bar_chart};
        let mut panels = Vec::new();
        for engine in self.engines() {
            let rows: Vec<(String, f64)> = self
                .artifacts
                .iter()
                .filter_map(|a| a.latency_ms.get(&engine).map(|ms| (a.name.clone(), *ms)))
                .collect();
            panels.push(bar_chart(&format!("latency, ms per image ({engine}, batch 1)"), &rows, BLUE, 560));
        }
        let rows = |f: &dyn Fn(&Artifact) -> Option<f64>| -> Vec<(String, f64)> {
            self.artifacts.iter().filter_map(|a| f(a).map(|v| (a.name.clone(), v))).collect()
        };
        panels.push(bar_chart("box mAP50 (val)", &rows(&|a| Some(a.box_map50)), ORANGE, 560));
        if self.artifacts.iter().any(|a| a.mask_map50.is_some()) {
            panels.push(bar_chart("mask mAP50 (val)", &rows(&|a| a.mask_map50), ORANGE, 560));
        }
        // Stacked, each panel at its own height.
        let height = panels.iter().map(|p| p.height()).sum::<u32>();
        let mut picture = image::RgbImage::from_pixel(560, height, image::Rgb([255, 255, 255]));
        let mut y = 0;
        for panel in &panels {
            image::imageops::overlay(&mut picture, panel, 0, y);
            y += panel.height() as i64;
        }
        picture
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
        let pruning = match &self.pruning {
            Some(p) => format!(
                "Pruning: {:.0} % of each prunable group ({} groups: {} → {} channels; criterion: {}), \
                 then {} epochs of fine-tuning on the training split ({}; run in `{}/`). Box mAP50 \
                 right after pruning, before fine-tuning: {:.3}{}.\n\n",
                p.ratio * 100.0,
                p.groups,
                p.channels_before,
                p.channels_after,
                p.criterion,
                p.epochs,
                if p.taught {
                    "with the student's teachers and unlabelled images, their labels from the cache"
                } else {
                    "labels only"
                },
                p.run.display(),
                p.box_map50_before_finetune,
                p.mask_map50_before_finetune.map(|m| format!(" (mask {m:.3})")).unwrap_or_default(),
            ),
            None => String::new(),
        };
        format!(
            "# kiln optimize: {model} at {size}x{size}\n\n![latency and accuracy per artifact](report.png)\n\n{table}\n{pruning}\
             Accuracy: COCO mAP on `{val}` ({val_images} images), each artifact run on its own (the ONNX files by \
             kiln's interpreter, FP16 with float16 storage). Latency: median of {runs} runs, batch 1, {host}. \
             INT8: Q/DQ, calibrated ({method}) on {calibration_images} images of `{calibration}`. Parameters and \
             GFLOPs are the network's (the ONNX files store the same weights).\n\n{tensorrt}\n",
            model = self.model,
            size = self.imgsz,
            table = self.table(),
            pruning = pruning,
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

/// The student's distillation settings as `distill.KEY=VALUE` (the teachers' thresholds select
/// the same cached labels).
fn distill_settings(config: &kiln_training::run::StudentConfig) -> Vec<String> {
    let Some(serde_yaml::Value::Mapping(map)) = config.distill.as_ref().and_then(|d| serde_yaml::to_value(d).ok())
    else {
        return Vec::new();
    };
    map.iter()
        .filter_map(|(key, value)| {
            let key = key.as_str()?;
            let value = serde_yaml::to_string(value).ok()?;
            Some(format!("distill.{key}={}", value.trim()))
        })
        .collect()
}

/// A distilled student's teachers and unlabelled images, from its run's `metadata.json`: the
/// pruned model is fine-tuned on what the student learned from (their labels come from the cache).
fn distill_request(weights: &Path) -> Option<kiln_training::distill::prepare::DistillRequest> {
    let metadata = weights.parent()?.parent()?.join("metadata.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(metadata).ok()?).ok()?;
    let distill = &json["request"]["distill"];
    let path = |key: &str| distill[key].as_str().map(PathBuf::from);
    let teachers = path("teachers").filter(|t| t.exists())?;
    Some(kiln_training::distill::prepare::DistillRequest {
        teachers,
        unlabeled: path("unlabeled"),
        images: path("images"),
        grounding_dino_weights: path("grounding_dino_weights"),
        sam_weights: path("sam_weights"),
    })
}

/// Prunes `model` (BatchNorm scale, `request.prune` of every prunable group), scores it as pruned,
/// then fine-tunes it for `request.prune_epochs` on the training split with the student's own
/// settings, and its teachers when it was distilled, into `run_dir`, on the same engine as every
/// student run. Returns the fine-tuned best weights.
fn prune_and_finetune(
    request: &OptimizeRequest,
    info: &StudentInfo,
    model: &kiln_models::YoloV8,
    (train, val_path, images): (&Path, &Path, Option<&Path>),
    run_dir: &Path,
    device: &Device,
) -> Result<(kiln_models::YoloV8, StudentInfo, PruningSummary), ExportError> {
    use kiln_models::yolo::prune;
    let failed = |e: kiln_training::TrainError| ExportError::Options(format!("fine-tuning the pruned student: {e}"));
    let before = prune::widths(model);
    let (pruned, widths) = prune::prune(model, request.prune, request.prune_multiple).map_err(ExportError::Options)?;
    // The pruned start, a student file like any other (its widths in the metadata).
    let start = run_dir.with_file_name("pruned_start.safetensors");
    let metadata = vec![
        ("kiln.model".to_string(), info.config.to_string()),
        ("kiln.classes".to_string(), serde_json::to_string(&info.classes).expect("names serialise")),
        ("kiln.category_ids".to_string(), serde_json::to_string(&info.category_ids).expect("ids serialise")),
        ("kiln.imgsz".to_string(), info.imgsz.to_string()),
        (prune::WIDTHS_KEY.to_string(), serde_json::to_string(&widths).expect("widths serialise")),
    ];
    pruned.save(&start, &metadata)?;
    let loaded = kiln_data::load_dataset(val_path, images)?;
    let mut val = loaded.dataset;
    kiln_data::repair(&mut val);
    let start_info = StudentInfo::read(&start)?;
    let as_pruned = kiln_models::Detector::from_model(pruned.clone(), start_info, device);
    let hidden = ProgressBar::hidden();
    let before_finetune =
        evaluate_student(&as_pruned, &val, &loaded.images_dir, Some(info.imgsz), 8, device, &hidden).map_err(failed)?;

    // The student's own recipe, read from its run (defaults where it has none).
    let run_config = info
        .weights
        .parent()
        .and_then(Path::parent)
        .map(|run| run.join("student_config.yaml"))
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| serde_yaml::from_str::<kiln_training::run::StudentConfig>(&text).ok())
        .unwrap_or_default();
    let epochs = request.prune_epochs.unwrap_or((run_config.epochs / 2).max(3));
    let overrides = kiln_training::commands::StudentOverrides {
        model: Some(info.config.to_string()),
        weights: Some(start.clone()),
        epochs: Some(epochs),
        batch_size: Some(run_config.batch_size),
        imgsz: Some(info.imgsz),
        optimizer: Some(run_config.optimizer),
        // Recovering from pruning, not learning anew, but from far below the student (the
        // 30-minute student fell from 0.96 to 0.41 box mAP50 when 30 % of every group went):
        // a third of its rate recovered it where a tenth or all of it did not (README, Pruning).
        lr0: Some(run_config.lr0 / 3.0),
        // No mosaic: the student ended its own training without it (its last `close_mosaic`
        // epochs), and a short recovery from there did worse with it (README, Pruning).
        close_mosaic: Some(epochs),
        // From trained weights: no warm-up from a zero learning rate, the run's nominal batch.
        set: vec!["warmup_epochs=0".into(), format!("nbs={}", run_config.nbs)]
            .into_iter()
            .chain(distill_settings(&run_config))
            .collect(),
        ..Default::default()
    };
    let train_request = kiln_training::commands::TrainStudentRequest {
        train: train.to_path_buf(),
        val: val_path.to_path_buf(),
        images: images.map(Path::to_path_buf),
        output: run_dir.to_path_buf(),
        resume: false,
        device_name: kiln_models::device::describe(device),
        overrides,
        distill: distill_request(&info.weights),
        dry_run: false,
    };
    let taught = train_request.distill.is_some();
    kiln_training::commands::run_train_student(&train_request, device.clone(), kiln_training::Verbosity::Progress)
        .map_err(failed)?;
    let best = run_dir.join("weights/best.safetensors");
    let tuned_info = StudentInfo::read(&best)?;
    let tuned = tuned_info.load_model(device)?;
    let summary = PruningSummary {
        ratio: request.prune,
        criterion: "BatchNorm |gamma| per group (Network Slimming), removed channels' constant folded into the readers"
            .into(),
        groups: before.len(),
        channels_before: before.values().sum(),
        channels_after: widths.values().sum(),
        epochs,
        box_map50_before_finetune: before_finetune.boxes.ap50(),
        mask_map50_before_finetune: before_finetune.masks.as_ref().map(|m| m.ap50()),
        run: PathBuf::from("pruned"),
        taught,
    };
    Ok((tuned, tuned_info, summary))
}
