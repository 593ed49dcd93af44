//! `kiln infer`: a trained student on a directory of images, as COCO results and pictures.

use std::path::PathBuf;

use kiln_models::yolo::predict::PredictOptions;

use crate::common::{DEVICE_HELP, DeviceArg, load_student, open_device, progress_bar};

#[derive(clap::Args)]
pub struct Args {
    /// A run directory (uses weights/best.safetensors), a student .safetensors file, or an ONNX
    /// file kiln exported (FP32, FP16 or INT8; run by kiln's own ONNX interpreter, no Python).
    #[arg(long, value_name = "DIR|FILE")]
    pub model: PathBuf,
    /// Directory of images (jpg, png, bmp, tiff, webp).
    #[arg(long, value_name = "DIR")]
    pub images: PathBuf,
    /// Where predictions.json (and pictures/) go; existing ones are never replaced.
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Minimum score of a detection.
    #[arg(long, default_value_t = 0.25)]
    pub conf: f32,
    /// IoU above which non-maximum suppression drops the lower-scored box of a class.
    #[arg(long, default_value_t = 0.7)]
    pub iou: f32,
    /// Input size [default: the size the model was trained at].
    #[arg(long)]
    pub imgsz: Option<u32>,
    /// Also write one picture per image with the predictions drawn, into OUTPUT/pictures.
    #[arg(long)]
    pub visualize: bool,
    #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
    pub device: DeviceArg,
    /// Run with Burn's INT8 weight quantisation (convolution weights as 8-bit integers, per tensor).
    #[arg(long)]
    pub int8: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.conf) && (0.0..=1.0).contains(&args.iou),
        "--conf and --iou are in 0..1"
    );
    let options = PredictOptions { conf: args.conf, iou: args.iou, ..Default::default() };
    if kiln_export::runtime::is_onnx(&args.model) {
        anyhow::ensure!(
            args.imgsz.is_none() && !args.int8 && matches!(args.device, DeviceArg::Cpu),
            "an ONNX file's input size and precision are fixed in it and kiln's interpreter runs it on the CPU: drop --imgsz, --int8 and --device"
        );
        let exported = kiln_export::runtime::OnnxStudent::open(&args.model, &kiln_models::device::cpu())?;
        let summary = kiln_training::commands::run_infer_with(
            &exported.classes,
            &exported.category_ids,
            &args.images,
            &args.output,
            args.visualize,
            &progress_bar("images"),
            |image| exported.predict(image, &options).map_err(|e| e.to_string()),
        )?;
        println!(
            "kiln infer: {} {} ONNX ({}, kiln's interpreter) on {} images: {} detections -> {}",
            exported.model_name,
            exported.precision,
            args.model.display(),
            summary.images,
            summary.detections,
            summary.predictions.display()
        );
        if let Some(dir) = summary.pictures {
            println!("pictures -> {}", dir.display());
        }
        return Ok(());
    }
    let device = open_device(args.device)?;
    let student = load_student(&args.model, args.int8, &device)?;
    let summary = kiln_training::commands::run_infer(
        &student,
        &args.images,
        &args.output,
        &options,
        args.imgsz,
        args.visualize,
        &device,
        &progress_bar("images"),
    )?;
    println!(
        "kiln infer: {} ({}) on {} images: {} detections -> {}",
        student.info().config,
        student.info().weights.display(),
        summary.images,
        summary.detections,
        summary.predictions.display()
    );
    if let Some(dir) = summary.pictures {
        println!("pictures -> {}", dir.display());
    }
    Ok(())
}
