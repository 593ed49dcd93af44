//! `kiln export`: a trained student as ONNX (FP32, FP16 or calibrated INT8 Q/DQ) or a TensorRT
//! engine, thin over kiln-export.

use std::path::PathBuf;

use clap::ValueEnum;
use kiln_export::int8::{OnnxDetector, calibration_inputs, quantize_model};
use kiln_export::quantize::{ActivationType, Calibration};
use kiln_export::tensorrt::{self, Precision};
use kiln_export::{ExportOptions, onnx_bytes, save_model};
use kiln_models::StudentInfo;
use kiln_training::commands::{EVAL_PREDICT_OPTIONS, evaluate_predictor, evaluate_student};

use crate::common::progress_bar;

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
pub enum Format {
    /// ONNX (opset 18) for ONNX Runtime, TensorRT and any ONNX runtime.
    Onnx,
    /// A TensorRT engine built with `trtexec` (or, without it, the ONNX and the command to run).
    Tensorrt,
}

/// TensorRT's build precisions; clap lists them in `--help` and refuses any other.
#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
pub enum PrecisionArg {
    /// Float32 throughout.
    Fp32,
    /// Float16 kernels allowed (`trtexec --fp16`).
    Fp16,
    /// INT8 where the calibrated Q/DQ model quantises, FP16 elsewhere (needs --int8 and --calibration).
    Int8,
}

impl From<PrecisionArg> for Precision {
    fn from(arg: PrecisionArg) -> Self {
        match arg {
            PrecisionArg::Fp32 => Precision::Fp32,
            PrecisionArg::Fp16 => Precision::Fp16,
            PrecisionArg::Int8 => Precision::Int8,
        }
    }
}

/// How INT8 activations are stored; clap lists them in `--help` and refuses any other.
#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
pub enum ActivationsArg {
    /// Signed, zero point 0: what TensorRT's explicit quantisation requires.
    Int8,
    /// Unsigned, zero point 128: what ONNX Runtime's CPU provider fuses into integer convolutions.
    Uint8,
}

impl From<ActivationsArg> for ActivationType {
    fn from(arg: ActivationsArg) -> Self {
        match arg {
            ActivationsArg::Int8 => ActivationType::Int8,
            ActivationsArg::Uint8 => ActivationType::Uint8,
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
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
    /// TensorRT precision: fp32, fp16 or int8 (int8 needs --int8 and --calibration).
    // Any case, as the library's parser accepted before the values became an enum.
    #[arg(long, value_enum, ignore_case = true, default_value_t = PrecisionArg::Fp16)]
    pub precision: PrecisionArg,
    /// Post-training INT8: a Q/DQ ONNX model (ONNX Runtime, TensorRT explicit quantisation),
    /// calibrated on images of --calibration.
    #[arg(long, requires = "calibration")]
    pub int8: bool,
    /// COCO JSON (or YOLO dataset) whose images calibrate INT8, e.g. splits/train.json.
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
    /// Directory that the calibration and validation images' `file_name`s are relative to
    /// [default: as `kiln validate`].
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// Calibration method: minmax, or percentile[:P] (P of the absolute values, default 99.99).
    #[arg(long, default_value = "percentile:99.99")]
    pub calibration_method: String,
    /// INT8 activations: int8 (signed, zero point 0: TensorRT) or uint8 (zero point 128: ONNX
    /// Runtime's CPU provider, which fuses only these into integer convolutions).
    #[arg(long, value_enum, ignore_case = true, default_value_t = ActivationsArg::Int8)]
    pub int8_activations: ActivationsArg,
    /// How many calibration images (spread over the file).
    #[arg(long, default_value_t = 64)]
    pub calibration_images: usize,
    /// Validation split on which the INT8 model's mAP is compared with the FP32 student's
    /// [default: val.json beside the calibration file, when there is one].
    #[arg(long, value_name = "FILE")]
    pub val: Option<PathBuf>,
    /// The file to write [default: beside the weights: best.onnx, best.int8.onnx, best.engine].
    /// An existing file is never replaced.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let device = kiln_models::device::cpu();
    let info = StudentInfo::read(&args.model)?;
    let options = ExportOptions { imgsz: args.imgsz.unwrap_or(info.imgsz), batch: args.batch, half: args.half };
    anyhow::ensure!(
        !(args.int8 && args.half),
        "--int8 and --half exclude each other: INT8 keeps float32 around its integer layers"
    );
    let suffix = if args.int8 { "int8.onnx" } else { "onnx" };
    let (onnx_path, engine) = match args.format {
        Format::Onnx => (args.output.clone().unwrap_or_else(|| info.weights.with_extension(suffix)), None),
        Format::Tensorrt => {
            let precision = Precision::from(args.precision);
            anyhow::ensure!(
                (precision == Precision::Int8) == args.int8,
                "--precision int8 goes with --int8 --calibration FILE (TensorRT builds INT8 from the calibrated Q/DQ model)"
            );
            let engine = args.output.clone().unwrap_or_else(|| info.weights.with_extension("engine"));
            anyhow::ensure!(!engine.exists(), "{}: exists; kiln never replaces a file", engine.display());
            // Its own ONNX beside the engine, so an earlier `--format onnx` export is left alone.
            (engine.with_extension(format!("trt.{suffix}")), Some((engine, precision)))
        }
    };
    anyhow::ensure!(
        !onnx_path.exists(),
        "{}: exists; kiln never replaces a file: choose another --output",
        onnx_path.display()
    );
    if args.batch != 1 && args.int8 {
        anyhow::bail!("--int8 exports batch 1 (the calibration and the mAP check run image by image)");
    }
    let model = info.load_model(&device)?;
    let (fp32, folded) = onnx_bytes(&model, &info, &options, &device)?;
    let fp32_size = onnx_ir::Message::compute_size(&fp32);
    let summary = if args.int8 {
        let quantised = int8(args, &info, &model, &fp32, options.imgsz, &device, fp32_size)?;
        save_model(&quantised, &onnx_path, folded)?
    } else {
        save_model(&fp32, &onnx_path, folded)?
    };
    let shapes: Vec<String> = summary.outputs.iter().map(|(name, dims)| format!("{name} {dims:?}")).collect();
    println!(
        "kiln export: {} ({}) -> {}\n  {}, {} nodes, {} BatchNorms folded into convolutions\n  images [{}, 3, {}, {}] -> {}",
        info.config,
        info.weights.display(),
        summary.path.display(),
        megabytes(summary.bytes),
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
                if let Err(error) = tensorrt::build_engine(&trtexec, &arguments, &engine) {
                    // The ONNX was written for this engine only: leave nothing behind.
                    let _ = std::fs::remove_file(&summary.path);
                    return Err(error.into());
                }
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

/// Calibrates and quantises `fp32`, and compares its mAP with the student's on the val split.
fn int8(
    args: &Args,
    info: &StudentInfo,
    model: &kiln_models::YoloV8,
    fp32: &onnx_ir::ModelProto,
    imgsz: u32,
    device: &burn::tensor::Device,
    fp32_size: u64,
) -> anyhow::Result<onnx_ir::ModelProto> {
    let method: Calibration = args.calibration_method.parse().map_err(anyhow::Error::msg)?;
    let activations = ActivationType::from(args.int8_activations);
    anyhow::ensure!(
        !(activations == ActivationType::Uint8 && args.format == Format::Tensorrt),
        "TensorRT needs int8 activations (zero point 0): drop --int8-activations uint8"
    );
    let calibration = args.calibration.as_deref().expect("clap requires it with --int8");
    let loaded = kiln_data::load_dataset(calibration, args.images.as_deref())?;
    let inputs = calibration_inputs(&loaded.dataset, &loaded.images_dir, imgsz, args.calibration_images)?;
    let bar = progress_bar("calibrating");
    let passes = if matches!(method, Calibration::Percentile(_)) { 2 } else { 1 };
    bar.set_length((inputs.len() * passes) as u64);
    let (quantised, summary) = quantize_model(fp32, &inputs, method, activations, device, || bar.inc(1))?;
    bar.finish_and_clear();
    let int8_size = onnx_ir::Message::compute_size(&quantised);
    println!(
        "INT8: {} convolutions quantised (weights per channel, {} {:?} activations per tensor), calibrated with {} on {} images of {}",
        summary.convolutions,
        summary.activations_quantised,
        summary.activations,
        summary.calibration,
        summary.images,
        calibration.display()
    );
    println!("  size: FP32 {} -> INT8 {}", megabytes(fp32_size), megabytes(int8_size));
    let val = args.val.clone().or_else(|| {
        let sibling = calibration.with_file_name("val.json");
        (sibling.is_file() && sibling != calibration).then_some(sibling)
    });
    let Some(val) = val else {
        println!("  (no --val split given and no val.json beside the calibration file: accuracy not compared)");
        return Ok(quantised);
    };
    let loaded = kiln_data::load_dataset(&val, args.images.as_deref())?;
    let mut data = loaded.dataset;
    kiln_data::repair(&mut data);
    // The student already loaded for the export, scored as `kiln eval` scores it.
    let student = |model: kiln_models::YoloV8| kiln_models::Detector::from_model(model, info.clone(), device);
    let masks = info.config.task == kiln_models::Task::Segment;
    let reference = evaluate_student(
        &student(model.clone()),
        &data,
        &loaded.images_dir,
        Some(imgsz),
        8,
        device,
        &progress_bar("FP32 val"),
    )?;
    let burn_int8 =
        student(kiln_models::detector::quantize_weights_int8(model.clone(), device).map_err(anyhow::Error::msg)?);
    let burn_eval =
        evaluate_student(&burn_int8, &data, &loaded.images_dir, Some(imgsz), 8, device, &progress_bar("Burn INT8"))?;
    let detector = OnnxDetector::new(&quantised, info.classes.len(), imgsz, device)?;
    let quantised_eval =
        evaluate_predictor(&data, &loaded.images_dir, &info.category_ids, masks, &progress_bar("INT8 val"), |image| {
            detector.predict(image, &EVAL_PREDICT_OPTIONS).map_err(|e| e.to_string())
        })?;
    let row = |name: &str, e: &kiln_training::commands::Evaluation| match &e.masks {
        Some(m) => format!(
            "  {name:<48} box mAP50 {:.4}  mAP50-95 {:.4}   mask mAP50 {:.4}  mAP50-95 {:.4}",
            e.boxes.ap50(),
            e.boxes.ap(),
            m.ap50(),
            m.ap()
        ),
        None => format!("  {name:<48} box mAP50 {:.4}  mAP50-95 {:.4}", e.boxes.ap50(), e.boxes.ap()),
    };
    println!(
        "accuracy on {} ({} images):\n{}\n{}\n{}",
        val.display(),
        data.images.len(),
        row("FP32 (Burn)", &reference),
        row("INT8 Q/DQ ONNX (this export)", &quantised_eval),
        row("INT8 weights in Burn (eval, infer, bench --int8)", &burn_eval)
    );
    let mut change = format!(
        "  change of the Q/DQ model: box mAP50 {:+.2} points",
        100.0 * (quantised_eval.boxes.ap50() - reference.boxes.ap50())
    );
    if let (Some(q), Some(r)) = (&quantised_eval.masks, &reference.masks) {
        change += &format!(", mask mAP50 {:+.2} points", 100.0 * (q.ap50() - r.ap50()));
    }
    println!("{change}");
    Ok(quantised)
}
