//! `kiln export` and `kiln bench`: the deployment commands, thin over kiln-export and kiln-models.

use std::path::PathBuf;

use clap::ValueEnum;
use kiln_export::tensorrt::{self, Precision};
use kiln_export::{ExportOptions, export_onnx};
use kiln_models::StudentInfo;

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
pub enum Format {
    /// ONNX (opset 18) for ONNX Runtime, TensorRT and any ONNX runtime.
    Onnx,
    /// A TensorRT engine built with `trtexec` (or, without it, the ONNX and the command to run).
    Tensorrt,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// A run directory (uses weights/best.safetensors) or a student .safetensors file.
    #[arg(long, value_name = "DIR|FILE")]
    pub model: PathBuf,
    #[arg(long, value_enum, default_value_t = Format::Onnx)]
    pub format: Format,
    /// Square input size, fixed in the graph [default: the size the model was trained at].
    #[arg(long)]
    pub imgsz: Option<u32>,
    /// Images per call, fixed in the graph.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// float16 weights, input and outputs (for GPUs and TensorRT FP16).
    #[arg(long)]
    pub half: bool,
    /// TensorRT precision: fp32, fp16 or int8.
    #[arg(long, default_value = "fp16")]
    pub precision: String,
    /// The file to write [default: beside the weights, `best.onnx` / `best.engine`]. An existing
    /// file is never replaced.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

fn default_output(info: &StudentInfo, extension: &str) -> PathBuf {
    info.weights.with_extension(extension)
}

pub fn run_export(args: &ExportArgs) -> anyhow::Result<()> {
    let device = crate::cpu_device();
    let info = StudentInfo::read(&args.model)?;
    let options = ExportOptions { imgsz: args.imgsz.unwrap_or(info.imgsz), batch: args.batch, half: args.half };
    let (onnx_path, engine) = match args.format {
        Format::Onnx => (args.output.clone().unwrap_or_else(|| default_output(&info, "onnx")), None),
        Format::Tensorrt => {
            let precision: Precision = args.precision.parse().map_err(anyhow::Error::msg)?;
            anyhow::ensure!(
                precision != Precision::Int8,
                "--precision int8 needs a calibrated Q/DQ model, which this kiln cannot make yet; use fp16"
            );
            let engine = args.output.clone().unwrap_or_else(|| default_output(&info, "engine"));
            anyhow::ensure!(!engine.exists(), "{}: exists; kiln never replaces a file", engine.display());
            // Its own ONNX beside the engine, so an earlier `--format onnx` export is left alone.
            (engine.with_extension("trt.onnx"), Some((engine, precision)))
        }
    };
    let summary = export_onnx(&info, &options, &onnx_path, &device)?;
    let shapes: Vec<String> = summary.outputs.iter().map(|(name, dims)| format!("{name} {dims:?}")).collect();
    println!(
        "kiln export: {} ({}) -> {}\n  {:.1} MB, {} nodes, {} BatchNorms folded into convolutions\n  images [{}, 3, {}, {}] -> {}",
        info.config,
        info.weights.display(),
        summary.path.display(),
        summary.bytes as f64 / 1e6,
        summary.nodes,
        summary.batch_norms_folded,
        options.batch,
        options.imgsz,
        options.imgsz,
        shapes.join(", "),
    );
    if let Some((engine, precision)) = engine {
        let arguments = tensorrt::trtexec_arguments(&summary.path, &engine, precision);
        match tensorrt::find_trtexec() {
            Some(trtexec) => {
                println!("building the TensorRT engine with {} ...", trtexec.display());
                tensorrt::build_engine(&trtexec, &arguments, &engine)?;
                println!("engine -> {}", engine.display());
            }
            None => println!(
                "trtexec is not on PATH: on the target device (TensorRT installed), build the engine with\n  {}",
                tensorrt::command_line(&arguments)
            ),
        }
    }
    Ok(())
}
