//! `kiln detect`: the GroundingDINO teacher on a directory of images with a text prompt.

use std::path::PathBuf;

use kiln_training::teacher::detect::{DetectOverrides, DetectRequest, run_detect};

use crate::common::{DEVICE_HELP, DeviceArg, GroundingDinoModelArg, open_device, progress_bar, value_name};

#[derive(clap::Args)]
pub struct Args {
    /// A directory of images.
    #[arg(long, value_name = "DIR")]
    pub images: PathBuf,
    /// Class names separated by "." ("cat . dog .") [default: the adapter's classes].
    #[arg(long)]
    pub prompt: Option<String>,
    /// Where detections.json and pictures/ go; existing ones are never replaced.
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// A LoRA adapter directory written by `kiln train-teacher` (EXPERIMENT/teachers/grounding_dino_lora).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// GroundingDINO model [default: the adapter's, else swint_ogc].
    #[arg(long, value_enum)]
    pub gdino: Option<GroundingDinoModelArg>,
    /// The GroundingDINO checkpoint (groundingdino_swint_ogc.pth) [default: the adapter's base].
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// A Hugging Face BERT model.safetensors replacing the checkpoint's text encoder [default: the adapter's].
    #[arg(long, value_name = "FILE")]
    pub text_encoder: Option<PathBuf>,
    /// Keep boxes whose best token probability exceeds this [default: 0.35].
    #[arg(long)]
    pub box_threshold: Option<f32>,
    /// Name a box by a class only if that class's best token exceeds this [default: 0.25].
    #[arg(long)]
    pub text_threshold: Option<f32>,
    /// Input short side in pixels [default: the adapter's, else 800].
    #[arg(long, value_name = "PX")]
    pub imgsz: Option<usize>,
    #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
    pub device: DeviceArg,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let overrides = DetectOverrides {
        gdino: args.gdino.map(value_name),
        weights: args.weights.clone(),
        text_encoder: args.text_encoder.clone(),
        box_threshold: args.box_threshold,
        text_threshold: args.text_threshold,
        image_size: args.imgsz,
    };
    // Resolved before the device opens, so a bad setting is reported without waiting for a GPU.
    let request = DetectRequest::resolve(
        args.images.clone(),
        args.prompt.clone(),
        args.output.clone(),
        args.adapter.clone(),
        &overrides,
    )?;
    let device = open_device(args.device)?;
    let summary = run_detect(&request, &device, &progress_bar("images"))?;
    println!(
        "kiln detect: GroundingDINO {}{} on {} images, prompt {:?}: {} boxes -> {}",
        request.config.model,
        summary.adapter.map(|a| format!(" + LoRA ({a})")).unwrap_or_default(),
        summary.images,
        summary.caption,
        summary.boxes,
        summary.detections.display()
    );
    println!("pictures -> {}", summary.pictures.display());
    Ok(())
}
