//! `kiln export --format onnx`: a student → an ONNX file in Ultralytics' layout.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use burn_onnx::export::OnnxExporter;
use kiln_models::yolo::Task;
use kiln_models::{StudentInfo, YoloConfig, YoloV8};
use onnx_ir::{Message, ModelProto};

use crate::{ExportError, graph};

#[derive(Debug, Clone, PartialEq)]
pub struct ExportOptions {
    /// Square input size (a multiple of 32).
    pub imgsz: u32,
    /// Images per call, fixed in the graph.
    pub batch: usize,
    /// float16 weights, input and outputs.
    pub half: bool,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub path: PathBuf,
    pub bytes: u64,
    pub nodes: usize,
    pub batch_norms_folded: usize,
    pub outputs: Vec<(String, Vec<i64>)>,
}

/// The Ultralytics-style metadata of an export (`names` and `imgsz` as Python literals, as
/// Ultralytics' `AutoBackend` reads them), plus kiln's own keys.
fn metadata(info: &StudentInfo, options: &ExportOptions) -> Vec<(String, String)> {
    let names = info
        .classes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{i}: '{}'", n.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect::<Vec<_>>()
        .join(", ");
    let task = match info.config.task {
        Task::Detect => "detect",
        Task::Segment => "segment",
    };
    vec![
        ("description".into(), format!("kiln {} student", info.config)),
        ("author".into(), "kiln".into()),
        ("version".into(), env!("CARGO_PKG_VERSION").into()),
        ("stride".into(), "32".into()),
        ("task".into(), task.into()),
        ("batch".into(), options.batch.to_string()),
        ("imgsz".into(), format!("[{0}, {0}]", options.imgsz)),
        ("names".into(), format!("{{{names}}}")),
        ("kiln.model".into(), info.config.to_string()),
        ("kiln.classes".into(), serde_json::to_string(&info.classes).expect("names serialise")),
        ("kiln.category_ids".into(), serde_json::to_string(&info.category_ids).expect("ids serialise")),
        ("kiln.half".into(), options.half.to_string()),
    ]
}

/// The ONNX model of `model`: the traced forward pass through decoding (boxes `cx, cy, w, h` in
/// input pixels, class probabilities, mask coefficients: `output0` `[B, 4 + nc (+ 32), anchors]`)
/// and, for segmentation, the prototypes (`output1` `[B, 32, H/4, W/4]`), BatchNorm folded.
pub fn onnx_bytes(
    model: &YoloV8,
    info: &StudentInfo,
    options: &ExportOptions,
    device: &Device,
) -> Result<(ModelProto, usize), ExportError> {
    if options.imgsz == 0 || options.imgsz % 32 != 0 {
        return Err(ExportError::Options(format!(
            "--imgsz {} is not a multiple of 32 (the network's largest stride)",
            options.imgsz
        )));
    }
    if options.batch == 0 {
        return Err(ExportError::Options("--batch must be at least 1".into()));
    }
    let size = options.imgsz as usize;
    let lowered = independent_copy(model, &info.config, device)?.lowered_for_export();
    let sample = Tensor::<4>::zeros([options.batch, 3, size, size], device);
    let exporter = OnnxExporter::new();
    let exported = match info.config.task {
        Task::Segment => exporter.export(&lowered, sample, |m: &YoloV8, images| {
            let output = m.forward(images);
            let decoded = m.head.decode(&output, size);
            (decoded, output.prototypes.expect("a segmentation head makes prototypes"))
        }),
        Task::Detect => exporter.export(&lowered, sample, |m: &YoloV8, images| m.head.decode(&m.forward(images), size)),
    }
    .map_err(|e| ExportError::Exporter(e.to_string()))?;
    let mut onnx = ModelProto::parse_from_bytes(exported.as_bytes())
        .map_err(|e| ExportError::Graph(format!("the exporter wrote an unreadable model: {e}")))?;
    let graph = onnx.graph.as_mut().ok_or_else(|| ExportError::Graph("no graph".into()))?;
    let outputs: &[&str] = match info.config.task {
        Task::Segment => &["output0", "output1"],
        Task::Detect => &["output0"],
    };
    graph::name_inputs_outputs(graph, &["images"], outputs)?;
    let folded = graph::fold_batch_norms(graph)?;
    graph::remove_dead(graph);
    if options.half {
        graph::convert_to_float16(graph)?;
    }
    graph.name = info.config.to_string();
    onnx.producer_name = "kiln".into();
    onnx.producer_version = env!("CARGO_PKG_VERSION").into();
    for (key, value) in metadata(info, options) {
        graph::set_metadata(&mut onnx, &key, &value);
    }
    Ok((onnx, folded))
}

/// A copy that shares nothing with `model`. A module's `clone` shares its BatchNorm running
/// statistics (they sit behind a lock), and export moves those onto its capture device, which
/// would leave `model` unusable; rebuilding from the tensors' values avoids that.
fn independent_copy(model: &YoloV8, config: &YoloConfig, device: &Device) -> Result<YoloV8, ExportError> {
    use burn::store::ModuleSnapshot;
    // Cut to the model's channel widths first (a pruned student).
    let widths = kiln_models::yolo::prune::widths(model);
    let mut copy =
        kiln_models::yolo::prune::with_widths(config.init(device), &widths).map_err(ExportError::Exporter)?;
    // A model loaded for inference (a `Detector`'s) has its BatchNorms folded: so has its copy.
    if model.is_folded() {
        copy = copy.fold_batch_norms();
    }
    let result = copy.apply(model.collect(None, None, false), None, None, false);
    if !result.errors.is_empty() || !result.missing.is_empty() || !result.unused.is_empty() {
        return Err(ExportError::Exporter(format!(
            "copying the model for export failed: {} errors, {} missing, {} unused tensors",
            result.errors.len(),
            result.missing.len(),
            result.unused.len()
        )));
    }
    Ok(copy)
}

fn refuse_existing(path: &Path) -> Result<(), ExportError> {
    if path.exists() {
        return Err(ExportError::Io {
            path: path.to_path_buf(),
            message: "exists; kiln never replaces a file: choose another --output or remove it".into(),
        });
    }
    Ok(())
}

/// Writes `model` to `path` (whole or not at all; an existing file is never replaced).
pub fn save_model(model: &ModelProto, path: &Path, batch_norms_folded: usize) -> Result<ExportSummary, ExportError> {
    refuse_existing(path)?;
    let bytes = model.write_to_bytes().map_err(|e| ExportError::Graph(format!("cannot serialise: {e}")))?;
    write_new(path, &bytes)?;
    let graph = model.graph.as_ref().ok_or_else(|| ExportError::Graph("no graph".into()))?;
    let outputs = graph
        .output
        .iter()
        .map(|o| {
            let dims = o
                .type_
                .as_ref()
                .filter(|t| t.has_tensor_type())
                .map(|t| t.tensor_type().shape.dim.iter().map(|d| d.dim_value()).collect())
                .unwrap_or_default();
            (o.name.clone(), dims)
        })
        .collect();
    Ok(ExportSummary {
        path: path.to_path_buf(),
        bytes: bytes.len() as u64,
        nodes: graph.node.len(),
        batch_norms_folded,
        outputs,
    })
}

/// Writes a new file atomically: beside it first, then renamed into place.
pub(crate) fn write_new(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    let io = |message: String| ExportError::Io { path: path.to_path_buf(), message };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io(format!("cannot create its directory: {e}")))?;
    }
    let name = path.file_name().ok_or_else(|| io("not a file path".into()))?;
    let staging = path.with_file_name(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let result = std::fs::write(&staging, bytes).and_then(|_| std::fs::rename(&staging, path));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&staging);
        io(e.to_string())
    })
}
