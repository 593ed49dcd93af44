//! `kiln info`: a model's architecture, layers, parameters and GFLOPs, and whether a checkpoint
//! fits it.

use std::path::PathBuf;

use kiln_models::{Task, YoloConfig, YoloV8};

#[derive(clap::Args)]
pub struct Args {
    /// Model name, e.g. yolov8n-seg, yolov8s, fastsam-s.
    #[arg(long, value_name = "NAME")]
    pub model: String,
    /// Checkpoint to load and check against the model.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Number of classes [default: 80 for YOLOv8, 1 for FastSAM].
    #[arg(long)]
    pub classes: Option<usize>,
    /// Square input size the GFLOPs are given for (a multiple of 32).
    #[arg(long, default_value_t = 640)]
    pub imgsz: usize,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
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
