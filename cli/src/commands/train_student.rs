//! `kiln train-student`: train the student on a training split, validating every epoch.

use std::path::PathBuf;

use clap::ValueEnum;
use kiln_training::characteristics::{Characteristics, Environment, Intensity, ObjectTrait};
use kiln_training::commands::{StudentOverrides, TrainStudentRequest, render_train_summary, run_train_student_on};
use kiln_training::distill::prepare::DistillRequest;
use kiln_training::optim::OptimizerKind;
use kiln_training::presets::Preset;

use crate::common::{DevicesArg, StudentModelArg, TRAIN_DEVICE_HELP, open_devices, run_output, value_name};

/// The optimisers `--optimizer` offers; clap lists them in `--help` and refuses any other.
#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
pub enum OptimizerArg {
    /// Ultralytics' choice: SGD for long runs, AdamW with a rate scaled to the class count for short ones.
    Auto,
    /// SGD with Nesterov momentum.
    Sgd,
    /// AdamW.
    Adamw,
}

impl From<OptimizerArg> for OptimizerKind {
    fn from(arg: OptimizerArg) -> Self {
        match arg {
            OptimizerArg::Auto => OptimizerKind::Auto,
            OptimizerArg::Sgd => OptimizerKind::Sgd,
            OptimizerArg::Adamw => OptimizerKind::Adamw,
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
    /// The experiment (a name: experiments/NAME; a path: that directory) of `kiln validate --name` and `kiln
    /// train-teacher --name`: its splits and images are the defaults; its teachers, when it has
    /// them, teach on its unlabelled split (splits/unl.json) or --unlabeled; the student goes to
    /// its student/.
    #[arg(long, value_name = "NAME|DIR", conflicts_with = "output")]
    pub name: Option<PathBuf>,
    /// Directory that the images' `file_name`s are relative to [default: as `kiln validate`].
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// The student [default: from the data: boxes and masks -> yolov8n-seg, boxes -> yolov8n,
    /// masks of one class without boxes -> fastsam-s].
    #[arg(long, value_enum, ignore_case = true)]
    pub model: Option<StudentModelArg>,
    /// Starting weights: an Ultralytics checkpoint (.pt) or kiln .safetensors [default: from scratch].
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Epochs [default: 100, configs/student.yaml].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per batch [default: 16].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Square input size, a multiple of 32 [default: 640].
    #[arg(long)]
    pub imgsz: Option<u32>,
    /// auto, sgd or adamw [default: auto, like Ultralytics].
    // Any case, as the library's parser accepted before the values became an enum.
    #[arg(long, value_enum, ignore_case = true)]
    pub optimizer: Option<OptimizerArg>,
    /// Initial learning rate of SGD [default: 0.01].
    #[arg(long)]
    pub lr0: Option<f64>,
    /// Stop after this many epochs without improvement; 0 never stops early [default: 100].
    #[arg(long)]
    pub patience: Option<usize>,
    /// Turn mosaic off for the last N epochs [default: 10].
    #[arg(long)]
    pub close_mosaic: Option<usize>,
    /// What the convolutions compute in while training: f32, or bf16 (mixed precision: bf16
    /// convolutions over float32 weights, with BatchNorm, the loss and the optimiser in float32;
    /// for GPUs with bf16 units, e.g. --device cuda or tch on Ampere and newer), or f16 (the same
    /// in f16 with dynamic loss scaling, for older GPUs). Validation and the saved weights are
    /// float32 either way. [default: f32]
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// Seed of the weights' initialisation, the batch order and the augmentation. From scratch, a
    /// seed starts from the weights Ultralytics' run with the same `seed` starts from (PyTorch's
    /// draws).
    #[arg(long)]
    pub seed: Option<u64>,
    /// A few settings at once, overridden by any flag: quick (10 epochs at 320 px), dev (30 at
    /// 480), production (Ultralytics' recipe, the default), memory-efficient (batch 4, the same
    /// effective batch through gradient accumulation), high-quality (300 epochs).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<Preset>,
    /// What the objects are like, comma-separated: small, large, thin, reflective, symmetric,
    /// occluded. With --environment it chooses the augmentation through one table (README
    /// "Augmentation from what you know"); the recipe it became is saved in student_config.yaml
    /// [default: Ultralytics' recipe].
    #[arg(long, value_name = "TRAITS", value_delimiter = ',')]
    pub objects: Vec<ObjectTrait>,
    /// What the scene and camera are like, comma-separated: outdoor, indoor, low-light, motion,
    /// fixed-camera, top-down, compressed.
    #[arg(long, value_name = "TRAITS", value_delimiter = ',')]
    pub environment: Vec<Environment>,
    /// How strongly the augmentation changes the images: low (x0.5), medium, high (x1.5).
    #[arg(long, value_name = "LEVEL", default_value = "medium")]
    pub augment_intensity: Intensity,
    /// Any other setting of student_config.yaml, as KEY=VALUE with dotted keys (repeatable), e.g.
    /// --set augment.mosaic=0 --set nbs=16 --set loss.box_gain=7.5.
    #[arg(long, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[arg(long, default_value = "cpu", help = TRAIN_DEVICE_HELP)]
    pub device: DevicesArg,
    /// Run directory [default: runs/student, runs/student2, ...].
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Continue the interrupted run in --output from its last complete epoch, with its saved settings.
    #[arg(long)]
    pub resume: bool,
    /// Distil teachers into the student: an experiment from `kiln train-teacher` (its `teachers/`
    /// adapters decide what teaches: GroundingDINO -> boxes and class probabilities, SAM -> masks,
    /// both -> the Grounded-SAM chain), or a trained kiln student (run directory or weights) as a
    /// teacher of a smaller one. Loss weights: configs/distill.yaml, --set distill.KEY=VALUE.
    /// Output then defaults to EXPERIMENT/student.
    #[arg(long, value_name = "DIR")]
    pub teachers: Option<PathBuf>,
    /// Unlabelled images the teachers label (a directory, or a COCO JSON whose image list is used,
    /// its file_names relative to --images when given);
    /// labels are computed once and cached beside the teachers.
    #[arg(long, value_name = "DIR|FILE", requires = "teachers")]
    pub unlabeled: Option<PathBuf>,
    /// GroundingDINO base weights replacing the ones its adapter recorded.
    #[arg(long, value_name = "FILE", requires = "teachers")]
    pub gdino_weights: Option<PathBuf>,
    /// SAM base weights replacing the ones its adapter recorded.
    #[arg(long, value_name = "FILE", requires = "teachers")]
    pub sam_weights: Option<PathBuf>,
    /// Print the settings and the memory estimate (program and data, optimiser state, one
    /// training step at the batch size, measured on the first images at batch 1 and 2), then exit
    /// without training or writing anything. Every run prints the estimate when it starts and
    /// the measured peak when it ends (in memory.json).
    #[arg(long, conflicts_with = "resume")]
    pub dry_run: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    // Taught by an experiment's teachers, the student joins that experiment.
    let default_output = match &args.teachers {
        Some(dir) if dir.join("teachers").is_dir() => dir.join("student"),
        _ => PathBuf::from("runs/student"),
    };
    let experiment = args.name.as_deref().map(crate::common::Experiment::named);
    let (train, val, images) =
        super::train_teacher::experiment_data(experiment.as_ref(), &args.data, &args.val, &args.images)?;
    // The experiment's teachers teach unless --teachers names others.
    let teachers =
        args.teachers.clone().or_else(|| experiment.as_ref().filter(|e| e.has_teachers()).map(|e| e.dir.clone()));
    let unlabeled = match (&args.unlabeled, &experiment, &teachers) {
        (Some(given), _, _) => Some(given.clone()),
        (None, Some(experiment), Some(_)) => Some(experiment.unlabeled().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: the experiment has teachers but no unlabelled split for them to label: pass --unlabeled DIR|FILE, or split with an unl part (`kiln validate --split train:0.2,unl:0.6,val:0.2 --name ...`)",
                experiment.dir.display()
            )
        })?),
        _ => None,
    };
    let output = match &experiment {
        Some(experiment) => experiment.student(),
        None => run_output(args.output.as_deref(), args.resume, &default_output.to_string_lossy(), "run")?,
    };
    let devices = open_devices(&args.device)?;
    let device = devices[0].clone();
    let request = TrainStudentRequest {
        train,
        val,
        images: images.clone(),
        output: output.clone(),
        resume: args.resume,
        device_name: kiln_models::device::describe(&device),
        overrides: StudentOverrides {
            model: args.model.map(value_name),
            weights: args.weights.clone(),
            epochs: args.epochs,
            batch_size: args.batch_size,
            imgsz: args.imgsz,
            optimizer: args.optimizer.map(OptimizerKind::from),
            lr0: args.lr0,
            patience: args.patience,
            seed: args.seed,
            close_mosaic: args.close_mosaic,
            precision: args.precision.map(|p| match p {
                PrecisionArg::F32 => kiln_training::run::Precision::F32,
                PrecisionArg::Bf16 => kiln_training::run::Precision::Bf16,
                PrecisionArg::F16 => kiln_training::run::Precision::F16,
            }),
            preset: args.preset,
            characteristics: Characteristics {
                objects: args.objects.clone(),
                environment: args.environment.clone(),
                intensity: args.augment_intensity,
            },
            set: args.set.clone(),
        },
        distill: teachers.as_ref().map(|teachers| DistillRequest {
            teachers: teachers.clone(),
            unlabeled,
            images,
            grounding_dino_weights: args.gdino_weights.clone(),
            sam_weights: args.sam_weights.clone(),
        }),
        dry_run: args.dry_run,
    };
    if args.dry_run {
        println!("kiln train-student --dry-run (nothing is trained or written)");
    } else {
        println!("kiln train-student -> {}", output.display());
    }
    let (config, summary) = run_train_student_on(&request, &devices, kiln_training::Verbosity::Progress)?;
    if args.dry_run {
        print!("{}", kiln_training::commands::render_dry_run(&config, summary.memory.as_ref(), teachers.is_some()));
    } else {
        print!("{}", render_train_summary(&config, &summary, &output));
    }
    Ok(())
}

/// `--precision`'s values.
#[derive(Clone, Copy, clap::ValueEnum, Debug, PartialEq, Eq)]
pub enum PrecisionArg {
    F32,
    Bf16,
    F16,
}
