//! `kiln segment`: the SAM teacher on images with box prompts.

use std::path::PathBuf;

use kiln_training::teacher::segment::{SegmentOverrides, SegmentRequest, run_segment};

use crate::common::{DEVICE_HELP, DeviceArg, SamModelArg, open_device, progress_bar, value_name};

#[derive(clap::Args)]
pub struct Args {
    /// Directory the box file's `file_name`s are relative to.
    #[arg(long, value_name = "DIR")]
    pub images: PathBuf,
    /// Box prompts: COCO JSON (a dataset, or `kiln infer`'s predictions.json).
    #[arg(long, value_name = "FILE")]
    pub boxes: PathBuf,
    /// Where masks.json and pictures/ go; existing ones are never replaced.
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// A LoRA adapter directory written by `kiln train-teacher` (EXPERIMENT/teachers/sam_lora).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// SAM size [default: the adapter's, else vit_b].
    #[arg(long, value_enum)]
    pub sam: Option<SamModelArg>,
    /// The SAM checkpoint [default: the adapter's base].
    #[arg(long, value_name = "FILE")]
    pub sam_weights: Option<PathBuf>,
    /// Do not draw pictures, only write masks.json.
    #[arg(long)]
    pub no_pictures: bool,
    #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
    pub device: DeviceArg,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let overrides = SegmentOverrides { sam: args.sam.map(value_name), sam_weights: args.sam_weights.clone() };
    // Resolved before the device opens, so a bad setting is reported without waiting for a GPU.
    let request = SegmentRequest::resolve(
        args.images.clone(),
        args.boxes.clone(),
        args.output.clone(),
        args.adapter.clone(),
        !args.no_pictures,
        &overrides,
    )?;
    let device = open_device(args.device)?;
    let summary = run_segment(&request, &device, &progress_bar("images"))?;
    println!(
        "kiln segment: SAM {}{} on {} images: {} masks -> {}",
        request.sam.model,
        summary.adapter.map(|a| format!(" + LoRA ({a})")).unwrap_or_default(),
        summary.images,
        summary.masks,
        summary.predictions.display()
    );
    if let Some(dir) = summary.pictures {
        println!("pictures -> {}", dir.display());
    }
    Ok(())
}
