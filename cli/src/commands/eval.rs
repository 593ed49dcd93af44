//! `kiln eval`: COCO box (and mask) AP of a trained student on a dataset, per class.

use std::path::PathBuf;

use crate::common::{DEVICE_HELP, DeviceArg, check_imgsz, load_student, open_device, progress_bar};

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("evaluated").required(true).args(["model", "teachers"]))]
pub struct Args {
    /// A run directory (uses weights/best.safetensors), a student .safetensors file, or an ONNX
    /// file kiln exported (FP32, FP16 or INT8; run by kiln's own ONNX interpreter, no Python).
    #[arg(long, value_name = "DIR|FILE")]
    pub model: Option<PathBuf>,
    /// Evaluate an experiment's teachers instead, the way they teach: GroundingDINO's boxes (from
    /// the class names) prompting SAM, no ground-truth prompts, on the same COCO metric.
    #[arg(long, value_name = "DIR")]
    pub teachers: Option<PathBuf>,
    /// GroundingDINO base weights replacing the ones its adapter recorded (with --teachers).
    #[arg(long, value_name = "FILE", requires = "teachers")]
    pub gdino_weights: Option<PathBuf>,
    /// SAM base weights replacing the ones its adapter recorded (with --teachers).
    #[arg(long, value_name = "FILE", requires = "teachers")]
    pub sam_weights: Option<PathBuf>,
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
    #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
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
    let loaded = kiln_data::load_dataset(&args.data, args.images.as_deref())?;
    let mut data = loaded.dataset;
    kiln_data::repair(&mut data);
    let Some(model) = &args.model else {
        let request = kiln_training::distill::prepare::DistillRequest {
            teachers: args.teachers.clone().expect("clap requires --model or --teachers"),
            unlabeled: None,
            images: None,
            grounding_dino_weights: args.gdino_weights.clone(),
            sam_weights: args.sam_weights.clone(),
        };
        let (teacher, evaluation) = kiln_training::commands::evaluate_teachers(
            &request,
            &data,
            &loaded.images_dir,
            &device,
            &progress_bar("images"),
        )?;
        println!("{teacher} on {}", args.data.display());
        print!("{}", evaluation.render(&data));
        return print_json(args, &evaluation);
    };
    if kiln_export::runtime::is_onnx(model) {
        anyhow::ensure!(
            args.imgsz.is_none() && !args.int8 && matches!(args.device, DeviceArg::Cpu),
            "an ONNX file's input size and precision are fixed in it and kiln's interpreter runs it on the CPU: drop --imgsz, --int8 and --device"
        );
        let evaluation = evaluate_onnx(model, &data, &loaded.images_dir)?;
        print!("{}", evaluation.render(&data));
        return print_json(args, &evaluation);
    }
    let student = load_student(model, args.int8, &device)?;
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
    print_json(args, &evaluation)
}

/// An exported model scored on `data` by kiln's interpreter, as `kiln eval` scores a student.
fn evaluate_onnx(
    path: &std::path::Path,
    data: &kiln_data::CocoDataset,
    images_dir: &std::path::Path,
) -> anyhow::Result<kiln_training::commands::Evaluation> {
    let exported = kiln_export::runtime::OnnxStudent::open(path, &kiln_models::device::cpu())?;
    anyhow::ensure!(
        data.class_names() == exported.classes,
        "{}: the model knows classes {:?} but the data has {:?}",
        path.display(),
        exported.classes,
        data.class_names()
    );
    let evaluation = kiln_training::commands::evaluate_predictor(
        data,
        images_dir,
        &exported.category_ids,
        exported.segment,
        &progress_bar("images"),
        |image| exported.predict(image, &kiln_training::commands::EVAL_PREDICT_OPTIONS).map_err(|e| e.to_string()),
    )?;
    println!(
        "{} {} ONNX ({}, {}x{}, kiln's interpreter) on {} images",
        exported.model_name,
        exported.precision,
        path.display(),
        exported.imgsz,
        exported.imgsz,
        data.images.len()
    );
    Ok(evaluation)
}

fn print_json(args: &Args, evaluation: &kiln_training::commands::Evaluation) -> anyhow::Result<()> {
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
