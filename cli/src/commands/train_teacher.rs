//! `kiln train-teacher`: fine-tune the teachers the data calls for (GroundingDINO, SAM) with LoRA.

use std::path::PathBuf;

use clap::ValueEnum;
use kiln_training::characteristics::{Characteristics, Environment, Intensity, ObjectTrait};
use kiln_training::presets::Preset;
use kiln_training::teacher::{TeacherOverrides, TrainTeacherRequest, render_teacher_summary, run_train_teacher_on};

use crate::common::{
    DevicesArg, GroundingDinoModelArg, SamModelArg, TRAIN_DEVICE_HELP, open_devices, run_output, value_name,
};

/// The teachers `--teacher` can single out; clap lists them in `--help` and refuses any other.
#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
pub enum TeacherArg {
    /// SAM (box prompt -> mask), called for by masks.
    Sam,
    /// GroundingDINO (text prompt -> boxes), called for by boxes (a mask also gives a box).
    #[value(name = "grounding_dino")]
    GroundingDino,
}

impl TeacherArg {
    /// The teacher's name as `TeacherOverrides::only` and `teacher_config.yaml` spell it.
    pub fn library_name(self) -> &'static str {
        match self {
            TeacherArg::Sam => "sam",
            TeacherArg::GroundingDino => "grounding_dino",
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Training split: COCO JSON (e.g. splits/train.json from `kiln validate`) or a YOLO dataset
    /// [default with --name: the experiment's splits/train.json].
    #[arg(long, value_name = "FILE", required_unless_present = "name")]
    pub data: Option<PathBuf>,
    /// Validation split, with the same categories [default with --name: splits/val.json].
    #[arg(long, value_name = "FILE", required_unless_present = "name")]
    pub val: Option<PathBuf>,
    /// The experiment `kiln validate --name` started (a name: experiments/NAME; a path: that directory): its splits
    /// and images are the defaults, and the teachers go to its teachers/.
    #[arg(long, value_name = "NAME|DIR", conflicts_with = "output")]
    pub name: Option<PathBuf>,
    /// Directory that the images' `file_name`s are relative to [default: as `kiln validate`].
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// Experiment directory; the teachers go to its teachers/ [default: experiments/teacher,
    /// experiments/teacher2, ...].
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// SAM size: vit_b, vit_l, vit_h, mobile (MobileSAM) or tiny (a small SAM for CPUs, tests and
    /// the demo; without --sam-weights it starts from the base kiln ships, pretrained on generated
    /// shapes) [default: vit_b].
    #[arg(long, value_enum)]
    pub sam: Option<SamModelArg>,
    /// The pretrained SAM checkpoint, as released (sam_vit_b_01ec64.pth, mobile_sam.pt) or kiln
    /// safetensors; it is read, never written.
    #[arg(long, value_name = "FILE")]
    pub sam_weights: Option<PathBuf>,
    /// LoRA rank [default: 8].
    #[arg(long, value_name = "N")]
    pub lora_r: Option<usize>,
    /// LoRA alpha (the update is scaled by alpha / r) [default: 16].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Comma-separated module-name suffixes that get adapters, like PEFT's target_modules
    /// [default: q_proj,k_proj,v_proj,out_proj: the mask decoder's attention]; `qkv` adapts the
    /// image encoder too (its embeddings are then computed at every step).
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub lora_targets: Option<Vec<String>>,
    /// Epochs [default: 10].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per step [default: 4].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Initial AdamW learning rate [default: 0.001].
    #[arg(long)]
    pub lr0: Option<f64>,
    /// Seed of the batch order, the box jitter, the adapters' initialisation (and of a random base).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Weight of the focal loss against dice's 1 [default: 20, SAM's ratio]. On small data a
    /// lower weight (e.g. 1) keeps the focal term from shrinking the masks.
    #[arg(long)]
    pub focal_weight: Option<f64>,
    /// Train every parameter instead of LoRA adapters, saving the whole model as
    /// teachers/sam_full/model.safetensors (e.g. to make a base for a new domain; LoRA is the default).
    #[arg(long)]
    pub full_finetune: bool,
    /// Recompute activations in the backward pass instead of keeping them (Burn's autodiff
    /// checkpointing, whole model): less memory for SAM's and GroundingDINO's encoders at some
    /// extra compute, for bases that do not fit otherwise.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Start --sam tiny / --gdino tiny_minilm from a random initialisation instead of the bases
    /// kiln ships for them (pretrained on generated shapes: models/bases/README.md).
    #[arg(long)]
    pub from_scratch: bool,
    #[arg(long, default_value = "cpu", help = TRAIN_DEVICE_HELP)]
    pub device: DevicesArg,
    /// Continue the interrupted run in --output from its last complete epoch, with its saved settings.
    #[arg(long)]
    pub resume: bool,
    /// Train only this teacher of those the data calls for: sam or grounding_dino.
    #[arg(long, value_name = "NAME", value_enum)]
    pub teacher: Option<TeacherArg>,
    /// GroundingDINO model: swint_ogc, swint_minilm (all-MiniLM-L6-v2 as text encoder), or the
    /// small tiny_minilm (without --gdino-weights it starts from the base kiln ships, pretrained on
    /// generated shapes; needs --text-encoder) and tiny (random initialisation, no files) [default:
    /// swint_ogc].
    #[arg(long, value_enum)]
    pub gdino: Option<GroundingDinoModelArg>,
    /// The pretrained GroundingDINO checkpoint, as released (groundingdino_swint_ogc.pth) or kiln
    /// safetensors; it is read, never written.
    #[arg(long, value_name = "FILE")]
    pub gdino_weights: Option<PathBuf>,
    /// A Hugging Face BERT model.safetensors as GroundingDINO's text encoder (all-MiniLM-L6-v2's
    /// for the *_minilm models) [default for *_minilm: KILN_TEXT_ENCODER, else
    /// ../shared/weights/all-minilm-l6-v2/model.safetensors beside the checkout or here].
    #[arg(long, value_name = "FILE")]
    pub text_encoder: Option<PathBuf>,
    /// A WordPiece tokenizer.json [default: the built-in bert-base-uncased tokenizer].
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Comma-separated module-name suffixes of GroundingDINO that get adapters [default: the
    /// deformable attention, fusion and FFN projections, feat_map and the box heads].
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub gdino_lora_targets: Option<Vec<String>>,
    /// GroundingDINO's input short side in pixels [default: 800, the official size].
    #[arg(long, value_name = "PX")]
    pub imgsz: Option<usize>,
    /// GroundingDINO's learning rate of the Swin backbone and BERT relative to --lr0 [default: 0.1,
    /// the official recipe's 1e-5 vs 1e-4].
    #[arg(long, value_name = "X")]
    pub backbone_lr_scale: Option<f64>,
    /// A few settings at once, overridden by any flag: quick (GroundingDINO 3 epochs at 512 px,
    /// LoRA rank 8; SAM 3 epochs, rank 4), dev (6 epochs at 640 px; SAM 5), production (the
    /// official recipes, the defaults), memory-efficient (batch 1, rank 8 / 4, 8 SAM prompts per
    /// image), high-quality (twice the epochs and the rank).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<Preset>,
    /// What the objects are like (small, large, thin, reflective, symmetric, occluded): with
    /// --environment, the teachers' light and camera augmentation (and GroundingDINO's vertical
    /// flip) through the table of README "Augmentation from what you know" [default: none].
    #[arg(long, value_name = "TRAITS", value_delimiter = ',')]
    pub objects: Vec<ObjectTrait>,
    /// What the scene and camera are like (outdoor, indoor, low-light, motion, fixed-camera,
    /// top-down, compressed).
    #[arg(long, value_name = "TRAITS", value_delimiter = ',')]
    pub environment: Vec<Environment>,
    /// How strongly the augmentation changes the images: low (x0.5), medium, high (x1.5).
    #[arg(long, value_name = "LEVEL", default_value = "medium")]
    pub augment_intensity: Intensity,
    /// Print the settings and the memory estimate (program and data, optimiser state, one
    /// training step at the batch size, measured on the first images at batch 1 and 2), then exit
    /// without training or writing anything. Every run prints the estimate when it starts and
    /// the measured peak when it ends (in memory.json).
    #[arg(long, conflicts_with = "resume")]
    pub dry_run: bool,
}

/// The training and validation splits and images: the flags, else the experiment's.
pub fn experiment_data(
    experiment: Option<&crate::common::Experiment>,
    data: &Option<PathBuf>,
    val: &Option<PathBuf>,
    images: &Option<PathBuf>,
) -> anyhow::Result<(PathBuf, PathBuf, Option<PathBuf>)> {
    let split = |given: &Option<PathBuf>, part: &str| match (given, experiment) {
        (Some(path), _) => Ok(path.clone()),
        (None, Some(experiment)) => experiment.split(part),
        (None, None) => unreachable!("clap requires --data and --val without --name"),
    };
    Ok((split(data, "train")?, split(val, "val")?, images.clone().or_else(|| experiment.and_then(|e| e.images()))))
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let experiment = args.name.as_deref().map(crate::common::Experiment::named);
    let (train, val, images) = experiment_data(experiment.as_ref(), &args.data, &args.val, &args.images)?;
    let output = match &experiment {
        Some(experiment) => experiment.dir.clone(),
        None => run_output(args.output.as_deref(), args.resume, "experiments/teacher", "experiment")?,
    };
    let devices = open_devices(&args.device)?;
    let device = devices[0].clone();
    let request = TrainTeacherRequest {
        train,
        val,
        images,
        output: output.clone(),
        resume: args.resume,
        device_name: kiln_models::device::describe(&device),
        overrides: TeacherOverrides {
            only: args.teacher.map(|teacher| teacher.library_name().to_string()),
            gdino: args.gdino.map(value_name),
            gdino_weights: args.gdino_weights.clone(),
            // tiny_minilm's frozen MiniLM is not in kiln's base: found where this project keeps it.
            text_encoder: args.text_encoder.clone().or_else(|| {
                let minilm = args.gdino.map(value_name).is_some_and(|m| m.ends_with("minilm"));
                minilm.then(crate::common::find_text_encoder).flatten()
            }),
            tokenizer: args.tokenizer.clone(),
            gdino_lora_targets: args.gdino_lora_targets.clone(),
            image_size: args.imgsz,
            backbone_lr_scale: args.backbone_lr_scale,
            sam: args.sam.map(value_name),
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
            gradient_checkpointing: args.gradient_checkpointing,
            from_scratch: args.from_scratch,
            preset: args.preset,
            characteristics: Characteristics {
                objects: args.objects.clone(),
                environment: args.environment.clone(),
                intensity: args.augment_intensity,
            },
        },
        dry_run: args.dry_run,
    };
    if args.dry_run {
        println!("kiln train-teacher --dry-run (nothing is trained or written)");
    } else {
        println!("kiln train-teacher -> {}", output.join("teachers").display());
    }
    let summary = run_train_teacher_on(&request, &devices, kiln_training::Verbosity::Progress, None)?;
    if args.dry_run {
        print!("{}", kiln_training::teacher::render_teacher_dry_run(&summary));
    } else {
        print!("{}", render_teacher_summary(&summary));
    }
    Ok(())
}
