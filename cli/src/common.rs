//! What several commands share: the `--device` flag and opening it, progress bars, fresh run
//! directories, the input-size check and loading a trained student.

use std::path::{Path, PathBuf};

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};

/// What `--device` takes: `cpu`, `wgpu`, `tch`, `tch-cpu`, `cuda` or `cuda:N` (see [`DEVICE_HELP`]).
/// A backend this build lacks is refused when the command opens it, with the rebuild to run.
pub type DeviceArg = kiln_models::Backend;

/// What the training commands' `--device` takes: one device, or several GPUs training together
/// (`cuda:0,1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicesArg(pub Vec<kiln_models::Backend>);

impl std::str::FromStr for DevicesArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        kiln_models::device::parse_devices(text).map(DevicesArg)
    }
}

/// Opens every device of a training run (each checked as [`open_device`] checks one).
pub fn open_devices(devices: &DevicesArg) -> anyhow::Result<Vec<burn::tensor::Device>> {
    devices.0.iter().map(|&backend| open_device(backend)).collect()
}

/// The training commands' `--device` help: [`DEVICE_HELP`] and several GPUs.
pub const TRAIN_DEVICE_HELP: &str = "Where to train: cpu (Burn's flex backend), wgpu (any GPU through Vulkan, Metal, \
DX12 or OpenGL), tch (LibTorch: its first CUDA GPU when present, its CPU otherwise; a build with `--features tch`), \
tch-cpu (LibTorch on the CPU: on a CPU it trains several times faster than flex), cuda or cuda:N (NVIDIA GPU N \
through Burn's CUDA backend; a build with `--features cuda`), or cuda:0,1 (several GPUs train together: each takes \
--batch images of every step, whose gradients are combined on the first)";

/// `--device`'s help, the same on every command.
pub const DEVICE_HELP: &str = "Where to run: cpu (Burn's flex backend), wgpu (any GPU through Vulkan, Metal, DX12 \
or OpenGL; Mesa's lavapipe or llvmpipe on a CPU-only box), tch (LibTorch: its first CUDA GPU when \
present, its CPU otherwise; a build with `--features tch`), tch-cpu (LibTorch on the CPU), cuda or \
cuda:N (NVIDIA GPU N through Burn's CUDA backend; a build with `--features cuda`)";

/// The student architectures, each an official preset (its class count follows the data).
#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
pub enum StudentModelArg {
    #[value(name = "yolov8n-seg")]
    Yolov8nSeg,
    #[value(name = "yolov8s-seg")]
    Yolov8sSeg,
    #[value(name = "yolov8m-seg")]
    Yolov8mSeg,
    #[value(name = "yolov8l-seg")]
    Yolov8lSeg,
    #[value(name = "yolov8x-seg")]
    Yolov8xSeg,
    #[value(name = "yolov8n")]
    Yolov8n,
    #[value(name = "yolov8s")]
    Yolov8s,
    #[value(name = "yolov8m")]
    Yolov8m,
    #[value(name = "yolov8l")]
    Yolov8l,
    #[value(name = "yolov8x")]
    Yolov8x,
    #[value(name = "fastsam-s")]
    FastsamS,
    #[value(name = "fastsam-x")]
    FastsamX,
}

/// SAM's presets: the official ViT-B/L/H, MobileSAM, and a tiny one for tests and the demo.
#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
pub enum SamModelArg {
    #[value(name = "vit_b")]
    VitB,
    #[value(name = "vit_l")]
    VitL,
    #[value(name = "vit_h")]
    VitH,
    Mobile,
    Tiny,
}

/// GroundingDINO's presets: the official Swin-T OGC (BERT base), Swin-T with MiniLM, and tiny ones.
#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
pub enum GroundingDinoModelArg {
    #[value(name = "swint_ogc")]
    SwintOgc,
    #[value(name = "swint_minilm")]
    SwintMinilm,
    #[value(name = "tiny_minilm")]
    TinyMinilm,
    Tiny,
}

/// The name a closed-set value has on the command line, which is the name the libraries take.
pub fn value_name(value: impl ValueEnum) -> String {
    value.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
}

/// Opens the device and checks that it runs a convolution; a GPU says which adapter and graphics
/// API it got (on stderr, so that machine-readable output stays clean).
pub fn open_device(backend: DeviceArg) -> anyhow::Result<burn::tensor::Device> {
    let device = backend.open()?;
    kiln_models::device::check(&device)?;
    if backend != kiln_models::Backend::Cpu {
        eprintln!("device: {}", kiln_models::device::describe(&device));
    }
    Ok(device)
}

pub fn progress_bar(message: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:32}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// `base`, or the first of `base2`, `base3`, ... that does not exist yet.
pub fn fresh_run_dir(base: &Path) -> PathBuf {
    if !base.exists() {
        return base.to_path_buf();
    }
    let name = base.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    (2..).map(|i| base.with_file_name(format!("{name}{i}"))).find(|p| !p.exists()).expect("an unused name")
}

/// The run directory of a training command: `--output`, or a fresh one under `base` for a new
/// run; resuming needs to be told which run (`what`: "run", "experiment").
pub fn run_output(output: Option<&Path>, resume: bool, base: &str, what: &str) -> anyhow::Result<PathBuf> {
    match (output, resume) {
        (Some(dir), _) => Ok(dir.to_path_buf()),
        (None, false) => Ok(fresh_run_dir(Path::new(base))),
        (None, true) => anyhow::bail!("--resume needs --output DIR: the {what} to continue"),
    }
}

/// Input sizes must fit the network's strides; checked before any work so nothing panics later.
pub fn check_imgsz(imgsz: Option<u32>) -> anyhow::Result<()> {
    if let Some(size) = imgsz {
        anyhow::ensure!(size >= 32 && size % 32 == 0, "--imgsz {size} must be a positive multiple of 32");
    }
    Ok(())
}

/// A student, with Burn's INT8 weight quantisation when asked.
pub fn load_student(path: &Path, int8: bool, device: &burn::tensor::Device) -> anyhow::Result<kiln_models::Detector> {
    let student = kiln_training::commands::load_student(path, device)?;
    Ok(if int8 { student.quantized_int8().map_err(anyhow::Error::msg)? } else { student })
}

/// One experiment's directory, `experiments/NAME/`: `splits/` (`kiln validate --name`),
/// `teachers/` (`kiln train-teacher --name`), `student/` (`kiln train-student --name`) and
/// `optimized/` (`kiln optimize --name`); each step finds the previous one's output there.
pub struct Experiment {
    pub dir: PathBuf,
}

impl Experiment {
    /// A bare name is `experiments/NAME`; a path (`runs/demo`, `./shapes`, absolute) is that
    /// directory.
    pub fn named(name: &Path) -> Self {
        let dir = if name.is_absolute() || name.components().count() > 1 {
            name.to_path_buf()
        } else {
            Path::new("experiments").join(name)
        };
        Self { dir }
    }

    pub fn splits(&self) -> PathBuf {
        self.dir.join("splits")
    }

    /// `splits/PART.json`, or an error saying which command makes it.
    pub fn split(&self, part: &str) -> anyhow::Result<PathBuf> {
        let path = self.splits().join(format!("{part}.json"));
        anyhow::ensure!(
            path.is_file(),
            "{}: no such split in the experiment; `kiln validate --data FILE --name {}` writes the splits (with a {part} part: --split train:0.7,{part}:0.15,...)",
            path.display(),
            self.dir.display()
        );
        Ok(path)
    }

    /// The images directory `kiln validate` recorded beside the splits.
    pub fn images(&self) -> Option<PathBuf> {
        let metadata = std::fs::read(self.splits().join(kiln_data::SPLITS_METADATA_FILE)).ok()?;
        let json: serde_json::Value = serde_json::from_slice(&metadata).ok()?;
        json["images"].as_str().map(PathBuf::from)
    }

    /// The unlabelled part of the split, when it has one (`unl` or `unlabeled`).
    pub fn unlabeled(&self) -> Option<PathBuf> {
        ["unl", "unlabeled", "unlabelled"].iter().map(|p| self.splits().join(format!("{p}.json"))).find(|p| p.is_file())
    }

    pub fn has_teachers(&self) -> bool {
        self.dir.join("teachers").is_dir()
    }

    pub fn student(&self) -> PathBuf {
        self.dir.join("student")
    }

    pub fn optimized(&self) -> PathBuf {
        self.dir.join("optimized")
    }
}

/// Where the all-MiniLM-L6-v2 text encoder of GroundingDINO `tiny_minilm` is looked for when no
/// `--text-encoder` is given: `KILN_TEXT_ENCODER`, then `../shared/weights/all-minilm-l6-v2`
/// beside the checkout (this project's data) or the current directory.
pub fn text_encoder_candidates() -> Vec<PathBuf> {
    let relative = Path::new("shared/weights/all-minilm-l6-v2/model.safetensors");
    std::env::var_os("KILN_TEXT_ENCODER")
        .map(PathBuf::from)
        .into_iter()
        .chain([Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(relative), Path::new("..").join(relative)])
        .collect()
}

/// The first of [`text_encoder_candidates`] that exists.
pub fn find_text_encoder() -> Option<PathBuf> {
    text_encoder_candidates().into_iter().find(|p| p.is_file()).map(|p| std::fs::canonicalize(&p).unwrap_or(p))
}
