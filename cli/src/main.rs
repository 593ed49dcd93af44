//! `kiln`: from one labelled COCO dataset to a small prompt-free model for edge devices.
//! The commands are thin: each parses its arguments and calls the libraries; this file only
//! declares them, dispatches, and turns the outcome into an exit status.

use std::process::ExitCode;

mod commands;
mod common;

/// Counts the heap's bytes so a training run can say, before it starts, how much memory one step
/// takes (kiln_training::engine::memory).
#[global_allocator]
static ALLOCATOR: kiln_training::engine::memory::CountingAllocator = kiln_training::engine::memory::CountingAllocator;

use clap::{Parser, Subcommand};
use commands::{
    bench, demo, detect, eval, export, infer, info, optimize, segment, synth, train_student, train_teacher, validate,
};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Turn one labelled COCO dataset into a small, prompt-free model for edge devices.",
    long_about = "Turn one labelled COCO dataset into a small, prompt-free model for edge devices.\n\n\
        kiln inspects the data and does the rest: validate (inspect, repair, split), train the teachers \
        (GroundingDINO for boxes, SAM for masks), distil a one-stage student (YOLOv8, YOLOv8-seg, FastSAM), \
        export it. Every command fills its settings from the data and takes overrides on the command line.\n\n\
        Start with `kiln demo`, or `kiln validate --data annotations.json` on your own data."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Let the paths a dataset names (COCO file_name, YOLO list lines) lead outside their images
    /// directory: absolute paths, `..` and symlinks out are refused otherwise, since a downloaded
    /// dataset could make kiln read any file on the disk.
    #[arg(long, global = true)]
    allow_outside_paths: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect, repair, validate and split a COCO dataset (or a YOLO dataset), and report.
    ///
    /// Reads the annotation file, checks every image, derives missing `bbox` and `area` from the
    /// masks, reports every problem (errors stop the run, warnings do not), splits the images into
    /// train/val/test stratified by class, and writes the repaired file and one file per split into
    /// the output directory. The input is never modified and no existing file is replaced.
    /// Exits with status 1 when the data has errors.
    Validate(validate::Args),
    /// Generate a labelled dataset of shapes on textured backgrounds (COCO JSON + images).
    ///
    /// The embedded default kiln's demo and tests run on: several named shape classes, instance
    /// masks of the visible parts (polygons, or compressed RLE where shapes overlap), varied scale,
    /// rotation, colour and background. Reproducible with --seed.
    Synth(synth::Args),
    /// Describe a model: architecture, layers, parameters and GFLOPs at an image size.
    ///
    /// Models: yolov8n|s|m|l|x (detect), yolov8n-seg|... (segment), fastsam-s|x. With --weights,
    /// the checkpoint (an Ultralytics state dict, .pt/.pth or .safetensors) is loaded and checked
    /// key by key against the model.
    Info(info::Args),
    /// Train the student (YOLOv8-seg, YOLOv8 or FastSAM, chosen by the data) on a training split,
    /// validating on a validation split every epoch.
    ///
    /// Settings come from kiln's defaults (configs/student.yaml), then the data (student, class
    /// names), then these flags; the run saves them as student_config.yaml, with metadata.json,
    /// results.csv (losses and metrics per epoch), weights/best.safetensors (best mask mAP50-95, or
    /// box mAP50-95 without masks) and weights/last.safetensors, both holding the weights' moving
    /// average under Ultralytics' key names. An interrupted run continues with --resume.
    TrainStudent(train_student::Args),
    /// Fine-tune the teachers with LoRA, chosen by the data: GroundingDINO (text prompt -> boxes)
    /// when it has boxes, SAM (box prompt -> mask) when it has masks; a mask also gives a box.
    ///
    /// Settings come from kiln's defaults (configs/teacher.yaml), then the data, then these flags;
    /// they are saved as OUTPUT/teachers/teacher_config.yaml with metadata.json. GroundingDINO is
    /// prompted with every class name of the dataset ("name1 . name2 . ...") and learns from
    /// Hungarian-matched boxes (focal loss on the class names' tokens, L1 + GIoU on the boxes, on
    /// every decoder layer and the encoder proposals); validation box mAP is measured before
    /// training and after every epoch, the best adapter saved as
    /// OUTPUT/teachers/grounding_dino_lora/. Every ground-truth box, jittered, prompts SAM for its mask; the loss is focal + dice (20:1) plus MSE on the
    /// predicted IoU; only LoRA adapters train (on the mask decoder's attention by default), so the
    /// image encoder stays frozen and its embeddings are computed once and cached. Validation mask
    /// IoU is measured before training and after every epoch; the best adapter is saved as
    /// OUTPUT/teachers/sam_lora/{adapter_model.safetensors, adapter_config.json}: the pretrained
    /// base is never modified or copied. An interrupted run continues with --resume.
    TrainTeacher(train_teacher::Args),
    /// Run the GroundingDINO teacher on images with a text prompt and draw the boxes.
    ///
    /// The prompt lists class names separated by "." ("cat . dog ."). Writes OUTPUT/detections.json
    /// (COCO results with the phrase as category, plus its categories) and OUTPUT/pictures/ with the
    /// boxes drawn. With --adapter the teacher trained by `kiln train-teacher` is used (its base and
    /// settings are read from the experiment's teacher_config.yaml), and the prompt defaults to the
    /// classes it was trained on.
    Detect(detect::Args),
    /// Run the SAM teacher on images with box prompts and draw the masks.
    ///
    /// Boxes are COCO JSON (`images` with `file_name`, `annotations` with `bbox` as x, y, w, h): a
    /// dataset, or the predictions.json of `kiln infer`. Writes OUTPUT/masks.json (COCO results,
    /// scored by SAM's predicted IoU) and OUTPUT/pictures/ with the masks drawn. With --adapter the
    /// teacher trained by `kiln train-teacher` is used (its base and settings are read from the
    /// experiment's teacher_config.yaml).
    Segment(segment::Args),
    /// Evaluate a trained student on a COCO dataset: COCO box (and mask) AP, per class.
    ///
    /// The student may be a run directory, its .safetensors, or an ONNX file kiln exported (FP32,
    /// FP16, INT8), which kiln's own interpreter runs; --teachers scores an experiment's teachers.
    Eval(eval::Args),
    /// Run a trained student on a directory of images: COCO-results JSON, and pictures with the
    /// boxes, masks and class names drawn (--visualize).
    Infer(infer::Args),
    /// Export a trained student for deployment: ONNX (ONNX Runtime, TensorRT) or a TensorRT engine.
    ///
    /// The ONNX file takes `images` [B, 3, H, W] (RGB, 0..1, letterboxed) and gives `output0`
    /// [B, 4 + classes (+ 32), anchors]: boxes (cx, cy, w, h in input pixels), class probabilities
    /// and mask coefficients, and for segmentation models `output1` [B, 32, H/4, W/4], the mask
    /// prototypes: Ultralytics' layout, so its post-processing applies. BatchNorm is folded into the
    /// convolutions; class names, stride, size and task are in the model's metadata. With
    /// --format tensorrt the engine is built by `trtexec` when it is on PATH; otherwise the ONNX is
    /// written and the trtexec command printed.
    Export(export::Args),
    /// Measure inference speed: latency median and p90, throughput, peak memory, model size.
    ///
    /// A student runs on Burn (--device cpu or wgpu): network and box decoding, outputs read back
    /// to the host. An .onnx file (from `kiln export` or `kiln optimize`) runs on kiln's own ONNX
    /// interpreter (--engine kiln: Rust, no Python) or ONNX Runtime's CPU provider through an
    /// installed Python onnxruntime (--engine onnxruntime; `pip install onnxruntime`, KILN_PYTHON
    /// picks the python); by default ONNX Runtime when it is installed.
    Bench(bench::Args),
    /// Turn a trained student into its deployable forms and measure each: size, speed, accuracy.
    ///
    /// Reads the student (--name NAME: experiments/NAME/student; or --model DIR) and the splits its
    /// run recorded in metadata.json. Writes, into a new directory (EXPERIMENT/optimized or
    /// DIR/optimized): model.onnx (FP32), model.fp16.onnx, model.int8.onnx (Q/DQ, calibrated on
    /// the training split), a pruned student (--prune 0.3 of its channels by BatchNorm scale, then
    /// fine-tuned: pruned/ and model.pruned.onnx), the TensorRT engine when `trtexec` is on PATH
    /// (its exact command otherwise), and report.md / report.json / report.png: per artifact its
    /// file size, parameters, GFLOPs, latency (Burn flex for the safetensors; kiln's ONNX
    /// interpreter, and ONNX Runtime where a Python has it, for the ONNX files) and COCO box/mask
    /// mAP on the validation split, measured by running that artifact. Everything appears at the
    /// end or not at all; the directory the output goes in is locked while it runs.
    Optimize(optimize::Args),
    /// Run the main job on a dataset kiln generates itself: synth, validate, train-teacher,
    /// train-student (distilled, with unlabelled images), optimize, in one experiment directory.
    ///
    /// Every step is the command a user would type, printed before it runs, with the shipped tiny
    /// teacher bases (SAM tiny, GroundingDINO tiny_minilm with the all-MiniLM-L6-v2 text encoder
    /// from --text-encoder, default ../shared/weights/all-minilm-l6-v2). Ends with the optimize
    /// report (size, speed, accuracy of each deployable file) and where the pictures are.
    Demo(demo::Args),
}

/// Runs one command; `Ok(false)`: it ran and reported a failure itself (data errors), exit status 1.
fn dispatch(command: &Command) -> anyhow::Result<bool> {
    match command {
        Command::Validate(args) => validate::run(args),
        Command::Synth(args) => synth::run(args).map(|_| true),
        Command::Info(args) => info::run(args).map(|_| true),
        Command::TrainStudent(args) => train_student::run(args).map(|_| true),
        Command::TrainTeacher(args) => train_teacher::run(args).map(|_| true),
        Command::Detect(args) => detect::run(args).map(|_| true),
        Command::Segment(args) => segment::run(args).map(|_| true),
        Command::Eval(args) => eval::run(args).map(|_| true),
        Command::Infer(args) => infer::run(args).map(|_| true),
        Command::Export(args) => export::run(args).map(|_| true),
        Command::Bench(args) => bench::run(args).map(|_| true),
        Command::Optimize(args) => optimize::run(args).map(|_| true),
        Command::Demo(args) => demo::run(args),
    }
}

/// A `kiln` command line (without the program name) parsed and run as the binary runs it: how
/// `kiln demo` runs the very commands a user would type.
pub fn run_command_line(arguments: &[String]) -> anyhow::Result<bool> {
    let cli = Cli::try_parse_from(std::iter::once("kiln".to_string()).chain(arguments.iter().cloned()))?;
    dispatch(&cli.command)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    kiln_models::device::keep_freed_memory();
    kiln_data::paths::set_allow_outside_paths(cli.allow_outside_paths);
    // With --json, a failure is reported as JSON on stdout too, so scripts always get JSON.
    let json = matches!(&cli.command, Command::Validate(a) if a.json);
    let outcome = dispatch(&cli.command);
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            if json {
                println!("{}", serde_json::json!({"ok": false, "error": error.to_string()}));
            }
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
