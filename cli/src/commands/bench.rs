//! `kiln bench`: inference latency of a student (Burn, on the CPU or wgpu) or of an ONNX file
//! (kiln's own interpreter, or ONNX Runtime through an installed Python onnxruntime), as a table.

use kiln_export::latency;
use kiln_models::StudentInfo;
use std::path::{Path, PathBuf};

use crate::common::{DEVICE_HELP, DeviceArg, open_device, progress_bar};

#[derive(clap::Args)]
pub struct Args {
    /// A student (run directory or .safetensors, run by Burn) or an .onnx file (run by --engine).
    #[arg(long, value_name = "DIR|FILE")]
    pub model: PathBuf,
    /// What runs an .onnx file: kiln's own interpreter (Rust, no Python), ONNX Runtime (a Python
    /// with onnxruntime: KILN_PYTHON or python3), or auto: ONNX Runtime when it is installed.
    #[arg(long, value_enum, default_value_t = OnnxEngine::Auto)]
    pub engine: OnnxEngine,
    /// Backend for a student: the CPU (flex) or wgpu. ONNX files run on ONNX Runtime's CPU provider.
    #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
    pub device: DeviceArg,
    /// Square input size [default: the size the model was trained at; an ONNX file's own].
    #[arg(long)]
    pub imgsz: Option<u32>,
    /// Images per call.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Timed runs (after the warm-up).
    #[arg(long, default_value_t = 30)]
    pub runs: usize,
    /// Untimed runs first (kernel compilation on wgpu, caches).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Burn's INT8 weight quantisation for a student (convolution weights as 8-bit integers).
    #[arg(long)]
    pub int8: bool,
    /// Threads for ONNX Runtime [default: its own choice].
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

#[derive(Clone, Copy, clap::ValueEnum, Debug, PartialEq, Eq)]
pub enum OnnxEngine {
    Auto,
    Kiln,
    Onnxruntime,
}

struct Measured {
    engine: String,
    input: String,
    times: Vec<f64>,
    batch: usize,
    peak_memory: String,
    model_bytes: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank]
}

/// Peak resident memory of this process (Linux `VmHWM`).
fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs >= 1 && args.batch >= 1, "--runs and --batch must be at least 1");
    let is_onnx = args.model.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx"));
    let measured = match (is_onnx, args.engine) {
        (false, _) => bench_student(args)?,
        (true, OnnxEngine::Kiln) => bench_kiln_onnx(args)?,
        (true, OnnxEngine::Onnxruntime) => bench_onnxruntime(args)?,
        (true, OnnxEngine::Auto) if latency::onnxruntime_python().is_ok() => bench_onnxruntime(args)?,
        (true, OnnxEngine::Auto) => bench_kiln_onnx(args)?,
    };
    let mut times = measured.times.clone();
    times.sort_by(f64::total_cmp);
    let median = percentile(&times, 0.5);
    println!("kiln bench: {} ({} timed runs after {} warm-up)", args.model.display(), times.len(), args.warmup);
    println!("  {:<34} {}", "engine", measured.engine);
    println!("  {:<34} {}", "input", measured.input);
    println!("  {:<34} {} ms", "latency median", milliseconds(median));
    println!("  {:<34} {} ms", "latency p90", milliseconds(percentile(&times, 0.9)));
    println!("  {:<34} {:.1} images/s", "throughput", measured.batch as f64 / median);
    println!("  {:<34} {}", "peak memory (process RSS)", measured.peak_memory);
    println!("  {:<34} {:.1} MB", "model file", measured.model_bytes as f64 / 1e6);
    Ok(())
}

/// Three significant figures from 1 ms on (2.43, 31.2): a tenth of a millisecond is 4 % of a
/// 160-px model's latency.
fn milliseconds(seconds: f64) -> String {
    let ms = seconds * 1e3;
    if ms < 10.0 { format!("{ms:.2}") } else { format!("{ms:.1}") }
}

fn bench_student(args: &Args) -> anyhow::Result<Measured> {
    let device = open_device(args.device)?;
    let info = StudentInfo::read(&args.model)?;
    // As `kiln infer` and the Detector run it: BatchNorms folded into the convolutions.
    let mut model = info.load_model(&device)?.fold_batch_norms();
    if args.int8 {
        model = kiln_models::detector::quantize_weights_int8(model, &device).map_err(anyhow::Error::msg)?;
    }
    let size = args.imgsz.unwrap_or(info.imgsz);
    anyhow::ensure!(size >= 32 && size % 32 == 0, "--imgsz {size} must be a positive multiple of 32");
    let s = size as usize;
    let bar = progress_bar("runs");
    bar.set_length(args.runs as u64);
    let times = latency::burn_student(&model, args.batch, s, (args.runs, args.warmup), &device, || bar.inc(1))?;
    bar.finish_and_clear();
    if kiln_models::nn::profile::enabled() {
        // KILN_PROFILE=1: kiln's kernels per run (the warm-up runs counted in).
        println!("{}", kiln_models::nn::profile::report(args.runs + args.warmup));
    }
    Ok(Measured {
        engine: format!(
            "Burn on the {}, {}{}",
            kiln_models::device::describe(&device),
            info.config,
            if args.int8 { ", INT8 weights" } else { "" }
        ),
        input: format!("[{}, 3, {s}, {s}] float32", args.batch),
        times,
        batch: args.batch,
        peak_memory: peak_memory(),
        model_bytes: file_size(&info.weights),
    })
}

fn peak_memory() -> String {
    peak_rss_kb().map(|kb| format!("{:.0} MB", kb as f64 / 1024.0)).unwrap_or_else(|| "unknown".into())
}

fn onnx_only(args: &Args, engine: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.imgsz.is_none() && args.batch == 1 && matches!(args.device, DeviceArg::Cpu) && !args.int8,
        "an ONNX file's input size and batch are fixed in it, and {engine} runs it on the CPU: drop --imgsz, --batch, --device and --int8 (export with --int8 instead)"
    );
    Ok(())
}

fn bench_kiln_onnx(args: &Args) -> anyhow::Result<Measured> {
    onnx_only(args, "kiln's interpreter")?;
    let exported = kiln_export::runtime::OnnxStudent::open(&args.model, &kiln_models::device::cpu())?;
    let s = exported.imgsz as usize;
    let bar = progress_bar("runs");
    bar.set_length(args.runs as u64);
    let times = latency::kiln_interpreter(exported.detector(), s, (args.runs, args.warmup), || bar.inc(1))?;
    bar.finish_and_clear();
    Ok(Measured {
        engine: format!("kiln's ONNX interpreter (CPU), {} {}", exported.model_name, exported.precision),
        input: format!("[1, 3, {s}, {s}]"),
        times,
        batch: 1,
        peak_memory: peak_memory(),
        model_bytes: file_size(&args.model),
    })
}

fn bench_onnxruntime(args: &Args) -> anyhow::Result<Measured> {
    anyhow::ensure!(args.model.is_file(), "{}: no such file", args.model.display());
    onnx_only(args, "ONNX Runtime's CPU provider")?;
    let python = latency::onnxruntime_python().map_err(anyhow::Error::msg)?;
    let run = latency::onnxruntime(&python, &args.model, (args.runs, args.warmup), args.threads)?;
    let input: Vec<String> = run.input.iter().map(|v| v.to_string()).collect();
    Ok(Measured {
        engine: format!("ONNX Runtime {} (CPU)", run.version),
        input: format!("[{}]", input.join(", ")),
        batch: run.input.first().copied().unwrap_or(1),
        times: run.seconds,
        peak_memory: format!("{:.0} MB", run.peak_rss_kb / 1024.0),
        model_bytes: file_size(&args.model),
    })
}
