//! `kiln synth`: a labelled dataset of shapes on textured backgrounds, also the first step of
//! `kiln demo`.

use std::path::{Path, PathBuf};

use clap::ValueEnum;
use kiln_data::{SynthLabels, SynthOptions, SynthStyle};

use crate::common::progress_bar;

#[derive(clap::Args)]
pub struct Args {
    /// Output directory: `annotations.json` and `images/` are written there (never over existing ones).
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    #[command(flatten)]
    pub options: SynthFlags,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LabelsArg {
    Both,
    Boxes,
    Masks,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum StyleArg {
    /// Shaded shapes of 6–24 % of the short side on gradients, stripes, checkerboards and clouds.
    Default,
    /// Another domain with the same classes: flat saturated shapes of 5–16 % of the short side
    /// on bright speckle, radial light, fine stripes or grain (for transfer experiments).
    Shifted,
}

/// The generator's settings, shared with `kiln demo`.
#[derive(clap::Args)]
pub struct SynthFlags {
    /// Number of images.
    #[arg(long = "num-images", default_value_t = 200)]
    pub images: usize,
    /// Number of classes (circle, square, triangle, star, hexagon, cross, heart, arrow: the first N).
    #[arg(long, default_value_t = 4)]
    pub classes: usize,
    /// Longest image side in pixels.
    #[arg(long, default_value_t = 320)]
    pub size: u32,
    /// Which labels the annotations carry: boxes and masks, boxes only, or masks only (no bbox/area).
    #[arg(long, value_enum, default_value_t = LabelsArg::Both)]
    pub labels: LabelsArg,
    /// Most objects per image.
    #[arg(long, default_value_t = 6)]
    pub max_objects: usize,
    /// Seed: the same seed and options give the same dataset.
    #[arg(long = "synth-seed", default_value_t = 0)]
    pub seed: u64,
    /// The look of the scenes: kiln's default, or a shifted domain (other backgrounds, colours and
    /// object sizes) to evaluate a model pretrained on the default one.
    #[arg(long, value_enum, default_value_t = StyleArg::Default)]
    pub style: StyleArg,
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
            style: match self.style {
                StyleArg::Default => SynthStyle::Default,
                StyleArg::Shifted => SynthStyle::Shifted,
            },
        }
    }
}

/// Generates the dataset; returns its annotation file.
pub fn run(args: &Args) -> anyhow::Result<PathBuf> {
    generate(&args.output, &args.options)
}

/// Generates a dataset into `output` and reports it; returns its annotation file.
pub fn generate(output: &Path, flags: &SynthFlags) -> anyhow::Result<PathBuf> {
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
