//! `kiln optimize`: a trained student's deployable forms (ONNX FP32, FP16, INT8; TensorRT), each
//! measured on itself, in one report; thin over `kiln_export::optimize`.

use std::path::{Path, PathBuf};

use kiln_export::optimize::{OptimizeRequest, optimize};
use kiln_export::quantize::Calibration;

use super::export::ActivationsArg;
use crate::common::progress_bar;

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("student").required(true).args(["experiment", "model"]))]
pub struct Args {
    /// An experiment: its student (EXPERIMENT/student) is optimised into EXPERIMENT/optimized. A
    /// bare name means experiments/NAME, a path (runs/x, ./x) that directory.
    #[arg(long, visible_alias = "name", value_name = "NAME|DIR")]
    pub experiment: Option<PathBuf>,
    /// A student run directory (or its weights file) instead; outputs go to DIR/optimized.
    #[arg(long, value_name = "DIR|FILE")]
    pub model: Option<PathBuf>,
    /// The directory to create [default: as above]; an existing one is never touched.
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// COCO JSON whose images calibrate INT8 [default: the training split the run recorded].
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
    /// COCO JSON every artifact is scored on [default: the validation split the run recorded].
    #[arg(long, value_name = "FILE")]
    pub val: Option<PathBuf>,
    /// Directory the splits' `file_name`s are relative to [default: the run's].
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// How many calibration images (spread over the split).
    #[arg(long, default_value_t = 64)]
    pub calibration_images: usize,
    /// Calibration method: minmax, or percentile[:P] (P of the absolute values).
    #[arg(long, default_value = "percentile:99.99")]
    pub calibration_method: String,
    /// INT8 activations: int8 (zero point 0, TensorRT) or uint8 (ONNX Runtime's CPU provider).
    #[arg(long, value_enum, ignore_case = true, default_value_t = ActivationsArg::Int8)]
    pub int8_activations: ActivationsArg,
    /// Timed runs per artifact and engine (after 3 warm-up runs).
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Structured channel pruning: the share of the prunable channels removed (ranked by
    /// BatchNorm scale inside each layer), then fine-tuned on the
    /// training split and exported as model.pruned.onnx; 0: no pruned model.
    #[arg(long, value_name = "RATIO", default_value_t = 0.3)]
    pub prune: f64,
    /// Round each pruned layer's width to a multiple of this many channels: CPU convolution
    /// kernels work on blocks of 16 channels with AVX-512 (8 with AVX2, 4 on ARM NEON), so a width
    /// between two multiples costs as much as the next one up.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub prune_multiple: usize,
    /// Fine-tuning epochs of the pruned model, at a third of the student's learning rate
    /// [default: half the student's epochs, at least 3].
    #[arg(long, value_name = "N")]
    pub prune_epochs: Option<usize>,
    /// Skip ONNX Runtime even when a Python with it is installed (KILN_PYTHON or python3).
    #[arg(long)]
    pub no_onnxruntime: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.runs >= 1 && args.calibration_images >= 1,
        "--runs and --calibration-images must be at least 1"
    );
    // Checked before any export, so a bad value costs nothing and leaves nothing behind.
    anyhow::ensure!((0.0..1.0).contains(&args.prune), "--prune {} must be in 0..1 (0: no pruned model)", args.prune);
    anyhow::ensure!(args.prune_multiple >= 1, "--prune-multiple must be at least 1 (1: no rounding)");
    let (model, default_output) = match (&args.experiment, &args.model) {
        (Some(name), _) => {
            let experiment = crate::common::Experiment::named(name);
            let dir = experiment.dir.clone();
            anyhow::ensure!(
                dir.is_dir(),
                "{}: no such experiment; `kiln train-teacher --output {}` starts one",
                dir.display(),
                dir.display()
            );
            let student = experiment.student();
            anyhow::ensure!(
                student.join("weights/best.safetensors").is_file(),
                "{}: the experiment has no student yet ({} missing): run `kiln train-student --teachers {} ...` first",
                dir.display(),
                student.join("weights/best.safetensors").display(),
                dir.display()
            );
            (student, experiment.optimized())
        }
        (None, Some(model)) => {
            let dir = if model.is_dir() {
                model.clone()
            } else {
                // weights/best.safetensors of a run: the run directory; any other file: its folder.
                let parent = model.parent().unwrap_or(Path::new("."));
                if parent.file_name().is_some_and(|n| n == "weights") {
                    parent.parent().unwrap_or(parent).to_path_buf()
                } else {
                    parent.to_path_buf()
                }
            };
            (model.clone(), dir.join("optimized"))
        }
        (None, None) => unreachable!("clap requires --experiment or --model"),
    };
    let request = OptimizeRequest {
        model,
        output: args.output.clone().unwrap_or(default_output),
        calibration: args.calibration.clone(),
        val: args.val.clone(),
        images: args.images.clone(),
        calibration_images: args.calibration_images,
        calibration_method: args.calibration_method.parse::<Calibration>().map_err(anyhow::Error::msg)?,
        activations: args.int8_activations.into(),
        runs: args.runs,
        warmup: 3,
        onnxruntime: !args.no_onnxruntime,
        prune: args.prune,
        prune_epochs: args.prune_epochs,
        prune_multiple: args.prune_multiple,
    };
    println!("kiln optimize: {} -> {}", request.model.display(), request.output.display());
    let device = kiln_models::device::cpu();
    let report = optimize(&request, &device, &|label| progress_bar(label))?;
    println!(
        "\n{} at {}x{}, scored on {} ({} images), latency median of {} runs (batch 1):\n",
        report.model,
        report.imgsz,
        report.imgsz,
        report.val.display(),
        report.val_images,
        report.latency_runs
    );
    print!("{}", report.table());
    match &report.tensorrt.engine {
        Some(engine) => println!("\nTensorRT engine -> {}", request.output.join(engine).display()),
        None => println!(
            "\ntrtexec is not installed: on the target device, build the TensorRT engine with\n  {}",
            report.tensorrt.command
        ),
    }
    println!("\nreport -> {} (and report.json)", request.output.join("report.md").display());
    Ok(())
}
