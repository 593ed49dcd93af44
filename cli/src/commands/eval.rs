//! `kiln eval`: COCO box (and mask) AP of a trained student on a dataset, per class.

use std::path::PathBuf;

use crate::common::{DeviceArg, check_imgsz, load_student, open_device, progress_bar};

#[derive(clap::Args)]
pub struct Args {
    /// A run directory (uses weights/best.safetensors) or a student .safetensors file.
    #[arg(long, value_name = "DIR|FILE")]
    pub model: PathBuf,
    /// COCO dataset to evaluate on (e.g. splits/val.json or splits/test.json).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Directory that the images' `file_name`s are relative to [default: as `kiln validate`].
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// Input size [default: the size the model was trained at].
    #[arg(long)]
    pub imgsz: Option<u32>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Run with Burn's INT8 weight quantisation (convolution weights as 8-bit integers, per tensor).
    #[arg(long)]
    pub int8: bool,
    /// Also print the metrics as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    check_imgsz(args.imgsz)?;
    let device = open_device(args.device)?;
    let student = load_student(&args.model, args.int8, &device)?;
    let loaded = kiln_data::load_dataset(&args.data, args.images.as_deref())?;
    let mut data = loaded.dataset;
    kiln_data::repair(&mut data);
    let evaluation = kiln_training::commands::evaluate_student(
        &student,
        &data,
        &loaded.images_dir,
        args.imgsz,
        args.batch_size,
        &device,
        &progress_bar("images"),
    )?;
    println!("{} ({}) on {}", student.info().config, student.info().weights.display(), args.data.display());
    print!("{}", evaluation.render(&data));
    if args.json {
        let json = serde_json::json!({
            "box": {"map50": evaluation.boxes.ap50(), "map50_95": evaluation.boxes.ap(), "stats": evaluation.boxes.stats,
                    "precision": evaluation.boxes.best_f1.precision, "recall": evaluation.boxes.best_f1.recall},
            "mask": evaluation.masks.as_ref().map(|m| serde_json::json!({"map50": m.ap50(), "map50_95": m.ap(), "stats": m.stats,
                    "precision": m.best_f1.precision, "recall": m.best_f1.recall})),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(())
}
