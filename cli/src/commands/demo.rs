//! `kiln demo`: the main job on a dataset kiln generates itself. Each step is the `kiln` command a
//! user would type, printed and then run through the same parser, in one experiment directory:
//! synth → validate → train-teacher → train-student (distilled) → optimize.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::synth;
use crate::common::fresh_run_dir;

#[derive(clap::Args)]
pub struct Args {
    /// Experiment directory; `runs/demo`, `runs/demo2`, ... is taken when it already exists.
    #[arg(long, value_name = "DIR", default_value = "runs/demo")]
    pub output: PathBuf,
    #[command(flatten)]
    pub options: synth::SynthFlags,
    /// The all-MiniLM-L6-v2 text encoder GroundingDINO tiny_minilm reads class names with
    /// [default: KILN_TEXT_ENCODER, else ../shared/weights/all-minilm-l6-v2/model.safetensors beside
    /// the checkout or the current directory].
    #[arg(long, value_name = "FILE")]
    pub text_encoder: Option<PathBuf>,
    /// Input size of the teachers and the student.
    #[arg(long, default_value_t = 160)]
    pub imgsz: u32,
    /// Epochs of the teachers' LoRA.
    #[arg(long, default_value_t = 4)]
    pub teacher_epochs: usize,
    /// Epochs of the student.
    #[arg(long, default_value_t = 15)]
    pub epochs: usize,
    /// Stop after validate (the demo of the data step alone, seconds instead of minutes).
    #[arg(long)]
    pub validate_only: bool,
}

/// Where the MiniLM text encoder is: the flag, else [`crate::common::find_text_encoder`].
fn text_encoder(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        anyhow::ensure!(path.is_file(), "--text-encoder {}: no such file", path.display());
        return Ok(path.to_path_buf());
    }
    crate::common::find_text_encoder().ok_or_else(|| {
        anyhow::anyhow!(
            "the demo's GroundingDINO reads class names with all-MiniLM-L6-v2, which was not found (looked at {}): pass --text-encoder FILE (its model.safetensors, tokenizer.json beside it), or --validate-only",
            crate::common::text_encoder_candidates().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    })
}

/// Runs the steps in a fresh experiment directory; `Ok(false)` when validation finds errors.
pub fn run(args: &Args) -> anyhow::Result<bool> {
    let started = Instant::now();
    let encoder = if args.validate_only { None } else { Some(text_encoder(args.text_encoder.as_deref())?) };
    let run = fresh_run_dir(&args.output);
    let dir = run.display().to_string();
    println!("kiln demo -> {dir}\n");
    let mut timings: Vec<(&str, f64)> = Vec::new();
    let step_started = Instant::now();
    let annotations = synth::generate(&run.join("data"), &args.options)?;
    timings.push(("synth", step_started.elapsed().as_secs_f64()));
    let (imgsz, teacher_epochs, epochs) =
        (args.imgsz.to_string(), args.teacher_epochs.to_string(), args.epochs.to_string());
    let data = annotations.display().to_string();
    let mut steps: Vec<(&str, Vec<&str>)> =
        vec![("validate", vec!["validate", "--data", &data, "--name", &dir, "--split", "train:0.15,unl:0.6,val:0.25"])];
    let encoder_arg = encoder.as_ref().map(|e| e.display().to_string()).unwrap_or_default();
    if !args.validate_only {
        steps.push((
            "train-teacher",
            vec![
                "train-teacher",
                "--name",
                &dir,
                "--sam",
                "tiny",
                "--gdino",
                "tiny_minilm",
                "--text-encoder",
                &encoder_arg,
                "--imgsz",
                &imgsz,
                "--epochs",
                &teacher_epochs,
                "--batch-size",
                "4",
                "--lr0",
                "0.001",
            ],
        ));
        steps.push((
            "train-student",
            vec![
                "train-student",
                "--name",
                &dir,
                "--model",
                "yolov8n-seg",
                "--imgsz",
                &imgsz,
                "--epochs",
                &epochs,
                "--batch-size",
                "8",
                "--optimizer",
                "adamw",
                "--lr0",
                "0.003",
                "--close-mosaic",
                "3",
                "--set",
                "nbs=8",
                "--set",
                "distill.box_threshold=0.1",
                "--set",
                "distill.text_threshold=0.1",
            ],
        ));
        steps.push(("optimize", vec!["optimize", "--name", &dir, "--runs", "10", "--calibration-images", "32"]));
    }
    let total = steps.len() + 1;
    for (index, (name, arguments)) in steps.iter().enumerate() {
        println!("\n[{}/{total}] kiln {}\n", index + 2, arguments.join(" "));
        let step_started = Instant::now();
        let arguments: Vec<String> = arguments.iter().map(|a| a.to_string()).collect();
        if !crate::run_command_line(&arguments)? {
            return Ok(false);
        }
        timings.push((name, step_started.elapsed().as_secs_f64()));
    }
    println!("\nkiln demo: done in {:.1} min -> {dir}", started.elapsed().as_secs_f64() / 60.0);
    for (name, seconds) in &timings {
        println!("  {name:<14} {seconds:>6.0} s");
    }
    if !args.validate_only {
        println!("pictures:");
        for (what, path) in [
            ("what the teachers taught (first 16 unlabelled images)", "student/teacher_labels.jpg"),
            ("the student on validation images", "student/val_predictions.jpg"),
            ("its training curves", "student/results.png"),
            ("the report", "optimized/report.md"),
        ] {
            let path = run.join(path);
            if path.exists() {
                println!("  {what:<56} {}", path.display());
            }
        }
    }
    Ok(true)
}
