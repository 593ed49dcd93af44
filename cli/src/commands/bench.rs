//! `kiln bench`: inference latency of a student (Burn, on the CPU or wgpu) or of an ONNX file
//! (kiln's own interpreter, or ONNX Runtime through an installed Python onnxruntime), as a table.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use kiln_models::StudentInfo;
use kiln_models::device::read_floats;

use crate::common::{DeviceArg, open_device, progress_bar};

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
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
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
        (true, OnnxEngine::Auto) if onnxruntime_python().is_ok() => bench_onnxruntime(args)?,
        (true, OnnxEngine::Auto) => bench_kiln_onnx(args)?,
    };
    let mut times = measured.times.clone();
    times.sort_by(f64::total_cmp);
    let median = percentile(&times, 0.5);
    println!("kiln bench: {} ({} timed runs after {} warm-up)", args.model.display(), times.len(), args.warmup);
    println!("  {:<34} {}", "engine", measured.engine);
    println!("  {:<34} {}", "input", measured.input);
    println!("  {:<34} {:.1} ms", "latency median", median * 1e3);
    println!("  {:<34} {:.1} ms", "latency p90", percentile(&times, 0.9) * 1e3);
    println!("  {:<34} {:.1} images/s", "throughput", measured.batch as f64 / median);
    println!("  {:<34} {}", "peak memory (process RSS)", measured.peak_memory);
    println!("  {:<34} {:.1} MB", "model file", measured.model_bytes as f64 / 1e6);
    Ok(())
}

fn bench_student(args: &Args) -> anyhow::Result<Measured> {
    let device = open_device(args.device)?;
    let info = StudentInfo::read(&args.model)?;
    let mut model = info.load_model(&device)?;
    if args.int8 {
        model = kiln_models::detector::quantize_weights_int8(model, &device).map_err(anyhow::Error::msg)?;
    }
    let size = args.imgsz.unwrap_or(info.imgsz);
    anyhow::ensure!(size >= 32 && size % 32 == 0, "--imgsz {size} must be a positive multiple of 32");
    let s = size as usize;
    let pixels: Vec<f32> = (0..args.batch * 3 * s * s).map(|i| ((i * 7919) % 255) as f32 / 255.0).collect();
    let input: Tensor<4> = Tensor::from_data(TensorData::new(pixels, [args.batch, 3, s, s]), &device);
    // One call = the network and box decoding, with every output read back to the host (as an
    // application gets it), so asynchronous backends are timed to completion.
    let call = || -> Result<(), kiln_models::DeviceError> {
        let output = model.forward(input.clone());
        let decoded = model.head.decode(&output, s);
        read_floats(decoded)?;
        if let Some(prototypes) = output.prototypes {
            read_floats(prototypes)?;
        }
        Ok(())
    };
    for _ in 0..args.warmup {
        call()?;
    }
    let bar = progress_bar("runs");
    bar.set_length(args.runs as u64);
    let times = (0..args.runs)
        .map(|_| {
            let start = Instant::now();
            call()?;
            bar.inc(1);
            Ok(start.elapsed().as_secs_f64())
        })
        .collect::<Result<_, kiln_models::DeviceError>>()?;
    bar.finish_and_clear();
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
        peak_memory: peak_rss_kb()
            .map(|kb| format!("{:.0} MB", kb as f64 / 1024.0))
            .unwrap_or_else(|| "unknown".into()),
        model_bytes: file_size(&info.weights),
    })
}

fn bench_kiln_onnx(args: &Args) -> anyhow::Result<Measured> {
    anyhow::ensure!(
        args.imgsz.is_none() && args.batch == 1 && matches!(args.device, DeviceArg::Cpu) && !args.int8,
        "an ONNX file's input size and batch are fixed in it, and kiln's interpreter runs it on the CPU: drop --imgsz, --batch, --device and --int8 (export with --int8 instead)"
    );
    let exported = kiln_export::runtime::OnnxStudent::open(&args.model, &kiln_models::device::cpu())?;
    let s = exported.imgsz as usize;
    let pixels: Vec<f32> = (0..3 * s * s).map(|i| ((i * 7919) % 255) as f32 / 255.0).collect();
    let input = kiln_export::interpreter::Value::new(vec![1, 3, s, s], pixels);
    for _ in 0..args.warmup {
        exported.detector().outputs(input.clone())?;
    }
    let bar = progress_bar("runs");
    bar.set_length(args.runs as u64);
    let times = (0..args.runs)
        .map(|_| {
            let start = Instant::now();
            exported.detector().outputs(input.clone())?;
            bar.inc(1);
            Ok(start.elapsed().as_secs_f64())
        })
        .collect::<Result<_, kiln_export::ExportError>>()?;
    bar.finish_and_clear();
    Ok(Measured {
        engine: format!("kiln's ONNX interpreter (CPU), {} {}", exported.model_name, exported.precision),
        input: format!("[1, 3, {s}, {s}]"),
        times,
        batch: 1,
        peak_memory: peak_rss_kb()
            .map(|kb| format!("{:.0} MB", kb as f64 / 1024.0))
            .unwrap_or_else(|| "unknown".into()),
        model_bytes: file_size(&args.model),
    })
}

/// A Python that imports onnxruntime: `KILN_PYTHON`, else `python3`.
fn onnxruntime_python() -> anyhow::Result<PathBuf> {
    let python = std::env::var_os("KILN_PYTHON").map(PathBuf::from).unwrap_or_else(|| "python3".into());
    let ok = std::process::Command::new(&python)
        .args(["-c", "import onnxruntime, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    anyhow::ensure!(
        ok,
        "benchmarking an ONNX file needs ONNX Runtime: `pip install onnxruntime numpy`, or set KILN_PYTHON to a python that has it ({} cannot import it)",
        python.display()
    );
    Ok(python)
}

fn bench_onnxruntime(args: &Args) -> anyhow::Result<Measured> {
    anyhow::ensure!(args.model.is_file(), "{}: no such file", args.model.display());
    anyhow::ensure!(
        args.imgsz.is_none() && args.batch == 1 && matches!(args.device, DeviceArg::Cpu) && !args.int8,
        "an ONNX file's input size and batch are fixed in it, and it runs on ONNX Runtime's CPU provider: drop --imgsz, --batch, --device and --int8 (export with --int8 instead)"
    );
    let python = onnxruntime_python()?;
    let output = std::process::Command::new(python)
        // The script stays in cli/src beside the command line's sources, one level up from here.
        .args(["-c", include_str!("../onnxruntime_bench.py")])
        .arg(&args.model)
        .args([args.runs.to_string(), args.warmup.to_string(), args.threads.to_string()])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "ONNX Runtime could not run {}: {}",
        args.model.display(),
        String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or("")
    );
    let result: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let times = result["times"].as_array().map(|t| t.iter().filter_map(|v| v.as_f64()).collect()).unwrap_or_default();
    let input: Vec<String> =
        result["input"].as_array().map(|a| a.iter().map(|v| v.to_string()).collect()).unwrap_or_default();
    Ok(Measured {
        engine: format!("ONNX Runtime {} (CPU)", result["version"].as_str().unwrap_or("?")),
        input: format!("[{}]", input.join(", ")),
        times,
        batch: result["batch"].as_u64().unwrap_or(1) as usize,
        peak_memory: format!("{:.0} MB", result["peak_rss_kb"].as_f64().unwrap_or(0.0) / 1024.0),
        model_bytes: file_size(&args.model),
    })
}
