//! `kiln`: from one labelled COCO dataset to a small prompt-free model for edge devices.
//! The commands are thin: each parses its arguments and calls the libraries.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod bench;
mod deploy;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_data::{SplitOptions, SplitSpec, SynthLabels, SynthOptions, ValidateOptions};

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
    Validate(ValidateArgs),
    /// Generate a labelled dataset of shapes on textured backgrounds (COCO JSON + images).
    ///
    /// The embedded default kiln's demo and tests run on: several named shape classes, instance
    /// masks of the visible parts (polygons, or compressed RLE where shapes overlap), varied scale,
    /// rotation, colour and background. Reproducible with --seed.
    Synth(SynthArgs),
    /// Describe a model: architecture, layers, parameters and GFLOPs at an image size.
    ///
    /// Models: yolov8n|s|m|l|x (detect), yolov8n-seg|... (segment), fastsam-s|x. With --weights,
    /// the checkpoint (an Ultralytics state dict, .pt/.pth or .safetensors) is loaded and checked
    /// key by key against the model.
    Info(InfoArgs),
    /// Train the student (YOLOv8-seg, YOLOv8 or FastSAM, chosen by the data) on a training split,
    /// validating on a validation split every epoch.
    ///
    /// Settings come from kiln's defaults (configs/student.yaml), then the data (student, class
    /// names), then these flags; the run saves them as student_config.yaml, with metadata.json,
    /// results.csv (losses and metrics per epoch), weights/best.safetensors (best mask mAP50-95, or
    /// box mAP50-95 without masks) and weights/last.safetensors, both holding the weights' moving
    /// average under Ultralytics' key names. An interrupted run continues with --resume.
    TrainStudent(TrainStudentArgs),
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
    TrainTeacher(TrainTeacherArgs),
    /// Run the GroundingDINO teacher on images with a text prompt and draw the boxes.
    ///
    /// The prompt lists class names separated by "." ("cat . dog ."). Writes OUTPUT/detections.json
    /// (COCO results with the phrase as category, plus its categories) and OUTPUT/pictures/ with the
    /// boxes drawn. With --adapter the teacher trained by `kiln train-teacher` is used (its base and
    /// settings are read from the experiment's teacher_config.yaml), and the prompt defaults to the
    /// classes it was trained on.
    Detect(DetectArgs),
    /// Run the SAM teacher on images with box prompts and draw the masks.
    ///
    /// Boxes are COCO JSON (`images` with `file_name`, `annotations` with `bbox` as x, y, w, h): a
    /// dataset, or the predictions.json of `kiln infer`. Writes OUTPUT/masks.json (COCO results,
    /// scored by SAM's predicted IoU) and OUTPUT/pictures/ with the masks drawn. With --adapter the
    /// teacher trained by `kiln train-teacher` is used (its base and settings are read from the
    /// experiment's teacher_config.yaml).
    Segment(SegmentArgs),
    /// Evaluate a trained student on a COCO dataset: COCO box (and mask) AP, per class.
    Eval(EvalArgs),
    /// Run a trained student on a directory of images: COCO-results JSON, and pictures with the
    /// boxes, masks and class names drawn (--visualize).
    Infer(InferArgs),
    /// Export a trained student for deployment: ONNX (ONNX Runtime, TensorRT) or a TensorRT engine.
    ///
    /// The ONNX file takes `images` [B, 3, H, W] (RGB, 0..1, letterboxed) and gives `output0`
    /// [B, 4 + classes (+ 32), anchors]: boxes (cx, cy, w, h in input pixels), class probabilities
    /// and mask coefficients, and for segmentation models `output1` [B, 32, H/4, W/4], the mask
    /// prototypes: Ultralytics' layout, so its post-processing applies. BatchNorm is folded into the
    /// convolutions; class names, stride, size and task are in the model's metadata. With
    /// --format tensorrt the engine is built by `trtexec` when it is on PATH; otherwise the ONNX is
    /// written and the trtexec command printed.
    Export(deploy::ExportArgs),
    /// Measure inference speed: latency median and p90, throughput, peak memory, model size.
    ///
    /// A student runs on Burn (--device cpu or wgpu): network and box decoding, outputs read back
    /// to the host. An .onnx file (from `kiln export`) runs on ONNX Runtime's CPU provider through
    /// an installed Python onnxruntime (`pip install onnxruntime`; KILN_PYTHON picks the python).
    Bench(bench::BenchArgs),
    /// Run the main job on a dataset kiln generates itself: synth, then validate (more steps join
    /// as they land).
    Demo(DemoArgs),
}

#[derive(Clone, Copy, ValueEnum, Debug)]
pub(crate) enum DeviceArg {
    /// The CPU (Burn's flex backend).
    Cpu,
    /// Any GPU through wgpu (Vulkan, Metal, DX12, or OpenGL where none of those has a driver;
    /// Mesa's lavapipe or llvmpipe on a CPU-only box).
    Wgpu,
    /// NVIDIA GPUs through CUDA (needs a kiln built with the `cuda` feature).
    Cuda,
}

#[derive(clap::Args)]
struct TrainStudentArgs {
    /// Training split: COCO JSON (e.g. splits/train.json from `kiln validate`) or a YOLO dataset.
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Validation split, with the same categories.
    #[arg(long, value_name = "FILE")]
    val: PathBuf,
    /// Directory that the images' `file_name`s are relative to [default: as `kiln validate`].
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// yolov8n-seg|s|m|l|x-seg, yolov8n|s|m|l|x, fastsam-s|x [default: from the data: boxes and
    /// masks -> yolov8n-seg, boxes -> yolov8n, masks of one class without boxes -> fastsam-s].
    #[arg(long)]
    model: Option<String>,
    /// Starting weights: an Ultralytics checkpoint (.pt) or kiln .safetensors [default: from scratch].
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    /// Epochs [default: 100, configs/student.yaml].
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per batch [default: 16].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Square input size, a multiple of 32 [default: 640].
    #[arg(long)]
    imgsz: Option<u32>,
    /// auto, sgd or adamw [default: auto, like Ultralytics].
    #[arg(long)]
    optimizer: Option<String>,
    /// Initial learning rate of SGD [default: 0.01].
    #[arg(long)]
    lr0: Option<f64>,
    /// Stop after this many epochs without improvement; 0 never stops early [default: 100].
    #[arg(long)]
    patience: Option<usize>,
    /// Turn mosaic off for the last N epochs [default: 10].
    #[arg(long)]
    close_mosaic: Option<usize>,
    /// Seed of the weights' initialisation, the batch order and the augmentation.
    #[arg(long)]
    seed: Option<u64>,
    /// Any other setting of student_config.yaml, as KEY=VALUE with dotted keys (repeatable), e.g.
    /// --set augment.mosaic=0 --set nbs=16 --set loss.box_gain=7.5.
    #[arg(long, value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Run directory [default: runs/student, runs/student2, ...].
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// Continue the interrupted run in --output from its last complete epoch, with its saved settings.
    #[arg(long)]
    resume: bool,
}

#[derive(clap::Args)]
struct TrainTeacherArgs {
    /// Training split: COCO JSON (e.g. splits/train.json from `kiln validate`) or a YOLO dataset.
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Validation split, with the same categories.
    #[arg(long, value_name = "FILE")]
    val: PathBuf,
    /// Directory that the images' `file_name`s are relative to [default: as `kiln validate`].
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// Experiment directory; the teachers go to its teachers/ [default: experiments/teacher,
    /// experiments/teacher2, ...].
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// SAM size: vit_b, vit_l, vit_h, mobile (MobileSAM) or tiny (a toy that trains from a random
    /// initialisation, for tests and the demo) [default: vit_b].
    #[arg(long, value_name = "NAME")]
    sam: Option<String>,
    /// The pretrained SAM checkpoint, as released (sam_vit_b_01ec64.pth, mobile_sam.pt) or kiln
    /// safetensors; it is read, never written.
    #[arg(long, value_name = "FILE")]
    sam_weights: Option<PathBuf>,
    /// LoRA rank [default: 8].
    #[arg(long, value_name = "N")]
    lora_r: Option<usize>,
    /// LoRA alpha (the update is scaled by alpha / r) [default: 16].
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Comma-separated module-name suffixes that get adapters, like PEFT's target_modules
    /// [default: q_proj,k_proj,v_proj,out_proj: the mask decoder's attention]; `qkv` adapts the
    /// image encoder too (its embeddings are then computed at every step).
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    lora_targets: Option<Vec<String>>,
    /// Epochs [default: 10].
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per step [default: 4].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Initial AdamW learning rate [default: 0.001].
    #[arg(long)]
    lr0: Option<f64>,
    /// Seed of the batch order, the box jitter, the adapters' initialisation (and of a random base).
    #[arg(long)]
    seed: Option<u64>,
    /// Weight of the focal loss against dice's 1 [default: 20, SAM's ratio]. On small data a
    /// lower weight (e.g. 1) keeps the focal term from shrinking the masks.
    #[arg(long)]
    focal_weight: Option<f64>,
    /// Train every parameter instead of LoRA adapters, saving the whole model as
    /// teachers/sam_full/model.safetensors (e.g. to make a base for a new domain; LoRA is the default).
    #[arg(long)]
    full_finetune: bool,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Continue the interrupted run in --output from its last complete epoch, with its saved settings.
    #[arg(long)]
    resume: bool,
    /// Train only this teacher of those the data calls for: sam or grounding_dino.
    #[arg(long, value_name = "NAME")]
    teacher: Option<String>,
    /// GroundingDINO model: swint_ogc, swint_minilm (all-MiniLM-L6-v2 as text encoder), or the toys
    /// tiny_minilm / tiny that train from a random initialisation [default: swint_ogc].
    #[arg(long, value_name = "NAME")]
    gdino: Option<String>,
    /// The pretrained GroundingDINO checkpoint, as released (groundingdino_swint_ogc.pth) or kiln
    /// safetensors; it is read, never written.
    #[arg(long, value_name = "FILE")]
    gdino_weights: Option<PathBuf>,
    /// A Hugging Face BERT model.safetensors as GroundingDINO's text encoder (all-MiniLM-L6-v2's
    /// for the *_minilm models).
    #[arg(long, value_name = "FILE")]
    text_encoder: Option<PathBuf>,
    /// A WordPiece tokenizer.json [default: the built-in bert-base-uncased tokenizer].
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,
    /// Comma-separated module-name suffixes of GroundingDINO that get adapters [default: the
    /// deformable attention, fusion and FFN projections, feat_map and the box heads].
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    gdino_lora_targets: Option<Vec<String>>,
    /// GroundingDINO's input short side in pixels [default: 800, the official size].
    #[arg(long, value_name = "PX")]
    imgsz: Option<usize>,
    /// GroundingDINO's learning rate of the Swin backbone and BERT relative to --lr0 [default: 0.1,
    /// the official recipe's 1e-5 vs 1e-4].
    #[arg(long, value_name = "X")]
    backbone_lr_scale: Option<f64>,
}

#[derive(clap::Args)]
struct DetectArgs {
    /// A directory of images.
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    /// Class names separated by "." ("cat . dog .") [default: the adapter's classes].
    #[arg(long)]
    prompt: Option<String>,
    /// Where detections.json and pictures/ go; existing ones are never replaced.
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// A LoRA adapter directory written by `kiln train-teacher` (EXPERIMENT/teachers/grounding_dino_lora).
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// GroundingDINO model [default: the adapter's, else swint_ogc].
    #[arg(long, value_name = "NAME")]
    gdino: Option<String>,
    /// The GroundingDINO checkpoint (groundingdino_swint_ogc.pth) [default: the adapter's base].
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    /// A Hugging Face BERT model.safetensors replacing the checkpoint's text encoder [default: the adapter's].
    #[arg(long, value_name = "FILE")]
    text_encoder: Option<PathBuf>,
    /// Keep boxes whose best token probability exceeds this [default: 0.35].
    #[arg(long)]
    box_threshold: Option<f32>,
    /// Name a box by a class only if that class's best token exceeds this [default: 0.25].
    #[arg(long)]
    text_threshold: Option<f32>,
    /// Input short side in pixels [default: the adapter's, else 800].
    #[arg(long, value_name = "PX")]
    imgsz: Option<usize>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
}

#[derive(clap::Args)]
struct SegmentArgs {
    /// Directory the box file's `file_name`s are relative to.
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    /// Box prompts: COCO JSON (a dataset, or `kiln infer`'s predictions.json).
    #[arg(long, value_name = "FILE")]
    boxes: PathBuf,
    /// Where masks.json and pictures/ go; existing ones are never replaced.
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// A LoRA adapter directory written by `kiln train-teacher` (EXPERIMENT/teachers/sam_lora).
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// SAM size [default: the adapter's, else vit_b].
    #[arg(long, value_name = "NAME")]
    sam: Option<String>,
    /// The SAM checkpoint [default: the adapter's base].
    #[arg(long, value_name = "FILE")]
    sam_weights: Option<PathBuf>,
    /// Do not draw pictures, only write masks.json.
    #[arg(long)]
    no_pictures: bool,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// A run directory (uses weights/best.safetensors) or a student .safetensors file.
    #[arg(long, value_name = "DIR|FILE")]
    model: PathBuf,
    /// COCO dataset to evaluate on (e.g. splits/val.json or splits/test.json).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Directory that the images' `file_name`s are relative to [default: as `kiln validate`].
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// Input size [default: the size the model was trained at].
    #[arg(long)]
    imgsz: Option<u32>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Run with Burn's INT8 weight quantisation (convolution weights as 8-bit integers, per tensor).
    #[arg(long)]
    int8: bool,
    /// Also print the metrics as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ValidateArgs {
    /// COCO annotation file (JSON), or a YOLO dataset: its data yaml or the directory holding it.
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Directory that the images' `file_name`s are relative to [default: `images/` beside the
    /// annotation file if it exists, else the file's directory].
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// Split by image into named parts with ratios summing to 1.
    #[arg(long, value_name = "SPEC", default_value = "train:0.7,val:0.15,test:0.15")]
    split: String,
    /// Keep each class's share close to its share overall in every part (iterative
    /// stratification); `--stratify false` splits at random.
    #[arg(long, value_name = "BOOL", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    stratify: bool,
    /// Seed of the split: the same seed and data give the same split.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Where to write the repaired file and the splits [default: `splits/` beside the input].
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Print the report as JSON on stdout instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum LabelsArg {
    Both,
    Boxes,
    Masks,
}

#[derive(clap::Args)]
struct SynthArgs {
    /// Output directory: `annotations.json` and `images/` are written there (never over existing ones).
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    #[command(flatten)]
    options: SynthFlags,
}

#[derive(clap::Args)]
struct SynthFlags {
    /// Number of images.
    #[arg(long = "num-images", default_value_t = 200)]
    images: usize,
    /// Number of classes (circle, square, triangle, star, hexagon, cross, heart, arrow: the first N).
    #[arg(long, default_value_t = 4)]
    classes: usize,
    /// Longest image side in pixels.
    #[arg(long, default_value_t = 320)]
    size: u32,
    /// Which labels the annotations carry: boxes and masks, boxes only, or masks only (no bbox/area).
    #[arg(long, value_enum, default_value_t = LabelsArg::Both)]
    labels: LabelsArg,
    /// Most objects per image.
    #[arg(long, default_value_t = 6)]
    max_objects: usize,
    /// Seed: the same seed and options give the same dataset.
    #[arg(long = "synth-seed", default_value_t = 0)]
    seed: u64,
}

impl SynthFlags {
    fn options(&self) -> SynthOptions {
        SynthOptions {
            images: self.images,
            classes: self.classes,
            size: self.size,
            labels: match self.labels {
                LabelsArg::Both => SynthLabels::Both,
                LabelsArg::Boxes => SynthLabels::Boxes,
                LabelsArg::Masks => SynthLabels::Masks,
            },
            seed: self.seed,
            max_objects: self.max_objects,
        }
    }
}

#[derive(clap::Args)]
struct InfoArgs {
    /// Model name, e.g. yolov8n-seg, yolov8s, fastsam-s.
    #[arg(long, value_name = "NAME")]
    model: String,
    /// Checkpoint to load and check against the model.
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    /// Number of classes [default: 80 for YOLOv8, 1 for FastSAM].
    #[arg(long)]
    classes: Option<usize>,
    /// Square input size the GFLOPs are given for (a multiple of 32).
    #[arg(long, default_value_t = 640)]
    imgsz: usize,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Run directory; `runs/demo`, `runs/demo2`, ... is taken when it already exists.
    #[arg(long, value_name = "DIR", default_value = "runs/demo")]
    output: PathBuf,
    #[command(flatten)]
    options: SynthFlags,
}

pub(crate) fn progress_bar(message: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:32}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

fn run_validate(args: &ValidateArgs) -> anyhow::Result<bool> {
    let spec: SplitSpec = args.split.parse()?;
    let options = ValidateOptions {
        data: args.data.clone(),
        images: args.images.clone(),
        split: SplitOptions { spec, seed: args.seed, stratify: args.stratify },
        output_dir: args.output_dir.clone(),
    };
    let report = kiln_data::run_validate(&options, &progress_bar("images"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(report.ok)
}

fn run_synth(output: &Path, flags: &SynthFlags) -> anyhow::Result<PathBuf> {
    let options = flags.options();
    let generated = kiln_data::synthesize(&options, output, &progress_bar("synth"))?;
    println!(
        "kiln synth: {} images, {} annotations, {} classes ({}) -> {}",
        generated.dataset.images.len(),
        generated.dataset.annotations.len(),
        options.classes,
        generated.dataset.class_names().join(", "),
        generated.annotations.display()
    );
    Ok(generated.annotations)
}

fn run_info(args: &InfoArgs) -> anyhow::Result<()> {
    use kiln_models::{Task, YoloConfig, YoloV8};
    let mut config: YoloConfig = args.model.parse().map_err(anyhow::Error::msg)?;
    if let Some(classes) = args.classes {
        anyhow::ensure!(classes > 0, "--classes must be at least 1");
        config = config.with_num_classes(classes);
    }
    anyhow::ensure!(args.imgsz >= 32 && args.imgsz % 32 == 0, "--imgsz must be a positive multiple of 32");
    let device = kiln_models::device::cpu();
    let model = match &args.weights {
        Some(path) => YoloV8::load(&config, path, &device)?,
        None => config.init(&device),
    };
    let cost = model.cost(args.imgsz, args.imgsz);
    let (depth, width, max_channels) = config.scale.multiples();
    let task = match config.task {
        Task::Detect => "detect (boxes)".to_string(),
        Task::Segment => format!("segment (boxes + masks: {} coefficients per anchor)", config.num_masks),
    };
    println!("{config}: YOLOv8 architecture, {task}");
    println!("  scale        depth x{depth}, width x{width}, max {max_channels} channels");
    println!("  classes      {}", config.num_classes);
    println!("  layers       23 (official yaml), {} convolutions", cost.convolutions);
    println!("  parameters   {}", group_thousands(kiln_models::parameter_count(&model)));
    println!("  GFLOPs       {:.1} at {}x{}", cost.flops / 1e9, args.imgsz, args.imgsz);
    match &args.weights {
        Some(path) => println!("  weights      {} (every key loaded)", path.display()),
        None => println!("  weights      none (random init); pass --weights FILE to load and check a checkpoint"),
    }
    Ok(())
}

fn group_thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `base`, or the first of `base2`, `base3`, ... that does not exist yet.
fn fresh_run_dir(base: &Path) -> PathBuf {
    if !base.exists() {
        return base.to_path_buf();
    }
    let name = base.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    (2..).map(|i| base.with_file_name(format!("{name}{i}"))).find(|p| !p.exists()).expect("an unused name")
}

fn run_demo(args: &DemoArgs) -> anyhow::Result<bool> {
    let run = fresh_run_dir(&args.output);
    println!("kiln demo -> {}\n", run.display());
    let annotations = run_synth(&run.join("data"), &args.options)?;
    println!();
    let validate = ValidateArgs {
        data: annotations,
        images: None,
        split: "train:0.7,val:0.15,test:0.15".into(),
        stratify: true,
        seed: 42,
        output_dir: None,
        json: false,
    };
    run_validate(&validate)
}

#[derive(clap::Args)]
struct InferArgs {
    /// A run directory (uses weights/best.safetensors) or a student .safetensors file.
    #[arg(long, value_name = "DIR|FILE")]
    model: PathBuf,
    /// Directory of images (jpg, png, bmp, tiff, webp).
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    /// Where predictions.json (and pictures/) go; existing ones are never replaced.
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// Minimum score of a detection.
    #[arg(long, default_value_t = 0.25)]
    conf: f32,
    /// IoU above which non-maximum suppression drops the lower-scored box of a class.
    #[arg(long, default_value_t = 0.7)]
    iou: f32,
    /// Input size [default: the size the model was trained at].
    #[arg(long)]
    imgsz: Option<u32>,
    /// Also write one picture per image with the predictions drawn, into OUTPUT/pictures.
    #[arg(long)]
    visualize: bool,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Run with Burn's INT8 weight quantisation (convolution weights as 8-bit integers, per tensor).
    #[arg(long)]
    int8: bool,
}

fn run_infer(args: &InferArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.conf) && (0.0..=1.0).contains(&args.iou),
        "--conf and --iou are in 0..1"
    );
    let device = device(args.device)?;
    let student = load_student(&args.model, args.int8, &device)?;
    let options = kiln_models::yolo::predict::PredictOptions { conf: args.conf, iou: args.iou, ..Default::default() };
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
        student.config,
        student.weights.display(),
        summary.images,
        summary.detections,
        summary.predictions.display()
    );
    if let Some(dir) = summary.pictures {
        println!("pictures -> {}", dir.display());
    }
    Ok(())
}

/// A student, with Burn's INT8 weight quantisation when asked.
fn load_student(
    path: &Path,
    int8: bool,
    device: &burn::tensor::Device,
) -> anyhow::Result<kiln_training::commands::LoadedStudent> {
    let mut student = kiln_training::commands::load_student(path, device)?;
    if int8 {
        student.model =
            kiln_models::detector::quantize_weights_int8(student.model, device).map_err(anyhow::Error::msg)?;
    }
    Ok(student)
}

/// Opens the device and checks that it runs a convolution; a GPU says which adapter and graphics
/// API it got (on stderr, so that machine-readable output stays clean).
pub(crate) fn device(arg: DeviceArg) -> anyhow::Result<burn::tensor::Device> {
    let backend = match arg {
        DeviceArg::Cpu => kiln_models::Backend::Cpu,
        DeviceArg::Wgpu => kiln_models::Backend::Wgpu,
        DeviceArg::Cuda => anyhow::bail!(
            "this kiln was built without CUDA: rebuild with `cargo build --release --features cuda` on a machine with the CUDA toolkit"
        ),
    };
    let device = backend.open()?;
    kiln_models::device::check(&device)?;
    if backend != kiln_models::Backend::Cpu {
        eprintln!("device: {}", kiln_models::device::describe(&device));
    }
    Ok(device)
}

fn run_train_student(args: &TrainStudentArgs) -> anyhow::Result<()> {
    use kiln_training::commands::{StudentOverrides, TrainStudentRequest, render_train_summary, run_train_student};
    let output = match (&args.output, args.resume) {
        (Some(dir), _) => dir.clone(),
        (None, false) => fresh_run_dir(Path::new("runs/student")),
        (None, true) => anyhow::bail!("--resume needs --output DIR: the run to continue"),
    };
    let optimizer = args.optimizer.as_deref().map(str::parse).transpose().map_err(anyhow::Error::msg)?;
    let device = device(args.device)?;
    let request = TrainStudentRequest {
        train: args.data.clone(),
        val: args.val.clone(),
        images: args.images.clone(),
        output: output.clone(),
        resume: args.resume,
        device_name: kiln_models::device::describe(&device),
        overrides: StudentOverrides {
            model: args.model.clone(),
            weights: args.weights.clone(),
            epochs: args.epochs,
            batch_size: args.batch_size,
            imgsz: args.imgsz,
            optimizer,
            lr0: args.lr0,
            patience: args.patience,
            seed: args.seed,
            close_mosaic: args.close_mosaic,
            set: args.set.clone(),
        },
    };
    println!("kiln train-student -> {}", output.display());
    let (config, summary) = run_train_student(&request, device, kiln_training::run::Verbosity::Progress)?;
    print!("{}", render_train_summary(&config, &summary, &output));
    Ok(())
}

fn run_train_teacher(args: &TrainTeacherArgs) -> anyhow::Result<()> {
    use kiln_training::teacher::{TeacherOverrides, TrainTeacherRequest, render_teacher_summary, run_train_teacher};
    let output = match (&args.output, args.resume) {
        (Some(dir), _) => dir.clone(),
        (None, false) => fresh_run_dir(Path::new("experiments/teacher")),
        (None, true) => anyhow::bail!("--resume needs --output DIR: the experiment to continue"),
    };
    let device = device(args.device)?;
    let request = TrainTeacherRequest {
        train: args.data.clone(),
        val: args.val.clone(),
        images: args.images.clone(),
        output: output.clone(),
        resume: args.resume,
        device_name: kiln_models::device::describe(&device),
        overrides: TeacherOverrides {
            only: args.teacher.clone(),
            gdino: args.gdino.clone(),
            gdino_weights: args.gdino_weights.clone(),
            text_encoder: args.text_encoder.clone(),
            tokenizer: args.tokenizer.clone(),
            gdino_lora_targets: args.gdino_lora_targets.clone(),
            image_size: args.imgsz,
            backbone_lr_scale: args.backbone_lr_scale,
            sam: args.sam.clone(),
            sam_weights: args.sam_weights.clone(),
            lora_r: args.lora_r,
            lora_alpha: args.lora_alpha,
            lora_targets: args.lora_targets.clone(),
            epochs: args.epochs,
            batch_size: args.batch_size,
            lr0: args.lr0,
            seed: args.seed,
            focal_weight: args.focal_weight,
            full_finetune: args.full_finetune,
        },
    };
    println!("kiln train-teacher -> {}", output.join("teachers").display());
    let summary = run_train_teacher(&request, device, kiln_training::run::Verbosity::Progress)?;
    print!("{}", render_teacher_summary(&summary));
    Ok(())
}

fn run_detect(args: &DetectArgs) -> anyhow::Result<()> {
    use kiln_training::teacher::detect::{DetectRequest, run_detect};
    use kiln_training::teacher::{TeacherConfig, grounding_dino_config_beside};
    let mut config = match &args.adapter {
        Some(dir) => grounding_dino_config_beside(dir).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no teacher_config.yaml beside this adapter (an adapter directory of `kiln train-teacher` is EXPERIMENT/teachers/grounding_dino_lora)",
                dir.display()
            )
        })?,
        None => TeacherConfig::default().grounding_dino.expect("configs/teacher.yaml has a grounding_dino section"),
    };
    if let Some(name) = &args.gdino {
        config.model = name.clone();
    }
    if let Some(weights) = &args.weights {
        config.weights = Some(weights.clone());
    }
    if let Some(text_encoder) = &args.text_encoder {
        config.text_encoder = Some(text_encoder.clone());
    }
    config.box_threshold = args.box_threshold.unwrap_or(config.box_threshold);
    config.text_threshold = args.text_threshold.unwrap_or(config.text_threshold);
    if let Some(size) = args.imgsz {
        anyhow::ensure!(size >= 32, "--imgsz {size} is too small (at least 32)");
        config.image_size = size;
        config.max_size = config.max_size.max(size);
    }
    if config.weights.is_none() && !config.model.starts_with("tiny") {
        anyhow::bail!(
            "GroundingDINO {} needs --weights (groundingdino_swint_ogc.pth); only the tiny toys run from a random initialisation",
            config.model
        );
    }
    let prompt = match (&args.prompt, &args.adapter) {
        (Some(prompt), _) => prompt.clone(),
        (None, Some(dir)) => {
            let classes = kiln_training::teacher::classes_beside(dir).unwrap_or_default();
            anyhow::ensure!(
                !classes.is_empty(),
                "{}: no classes in its teacher_config.yaml: pass --prompt",
                dir.display()
            );
            classes.join(" . ")
        }
        (None, None) => anyhow::bail!("--prompt is needed: the class names to find, e.g. \"cat . dog .\""),
    };
    let device = device(args.device)?;
    let request = DetectRequest {
        images: args.images.clone(),
        prompt,
        output: args.output.clone(),
        config,
        adapter: args.adapter.clone(),
    };
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

fn run_segment(args: &SegmentArgs) -> anyhow::Result<()> {
    use kiln_training::teacher::segment::{SegmentRequest, run_segment};
    use kiln_training::teacher::{TeacherConfig, sam_config_beside};
    let mut sam = match &args.adapter {
        Some(dir) => sam_config_beside(dir).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no teacher_config.yaml beside this adapter (an adapter directory of `kiln train-teacher` is EXPERIMENT/teachers/sam_lora)",
                dir.display()
            )
        })?,
        None => TeacherConfig::default().sam.expect("configs/teacher.yaml has a sam section"),
    };
    if let Some(name) = &args.sam {
        sam.model = name.clone();
    }
    if let Some(weights) = &args.sam_weights {
        sam.weights = Some(weights.clone());
    }
    if sam.weights.is_none() && sam.model != "tiny" {
        anyhow::bail!(
            "SAM {} needs --sam-weights (e.g. sam_vit_b_01ec64.pth); only tiny runs from a random initialisation",
            sam.model
        );
    }
    let device = device(args.device)?;
    let request = SegmentRequest {
        images: args.images.clone(),
        boxes: args.boxes.clone(),
        output: args.output.clone(),
        sam,
        adapter: args.adapter.clone(),
        pictures: !args.no_pictures,
    };
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

/// Input sizes must fit the network's strides; checked before any work so nothing panics later.
fn check_imgsz(imgsz: Option<u32>) -> anyhow::Result<()> {
    if let Some(size) = imgsz {
        anyhow::ensure!(size >= 32 && size % 32 == 0, "--imgsz {size} must be a positive multiple of 32");
    }
    Ok(())
}

fn run_eval(args: &EvalArgs) -> anyhow::Result<()> {
    check_imgsz(args.imgsz)?;
    let device = device(args.device)?;
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
    println!("{} ({}) on {}", student.config, student.weights.display(), args.data.display());
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = matches!(&cli.command, Command::Validate(a) if a.json);
    let outcome = match &cli.command {
        Command::Validate(args) => run_validate(args),
        Command::Synth(args) => run_synth(&args.output, &args.options).map(|_| true),
        Command::Info(args) => run_info(args).map(|_| true),
        Command::TrainStudent(args) => run_train_student(args).map(|_| true),
        Command::TrainTeacher(args) => run_train_teacher(args).map(|_| true),
        Command::Detect(args) => run_detect(args).map(|_| true),
        Command::Segment(args) => run_segment(args).map(|_| true),
        Command::Eval(args) => run_eval(args).map(|_| true),
        Command::Infer(args) => run_infer(args).map(|_| true),
        Command::Export(args) => deploy::run_export(args).map(|_| true),
        Command::Bench(args) => bench::run_bench(args).map(|_| true),
        Command::Demo(args) => run_demo(args),
    };
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
