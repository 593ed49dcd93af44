//! `kiln demo`: the main job on a dataset kiln generates itself (synth, then validate).

use std::path::PathBuf;

use super::{synth, validate};
use crate::common::fresh_run_dir;

#[derive(clap::Args)]
pub struct Args {
    /// Run directory; `runs/demo`, `runs/demo2`, ... is taken when it already exists.
    #[arg(long, value_name = "DIR", default_value = "runs/demo")]
    pub output: PathBuf,
    #[command(flatten)]
    pub options: synth::SynthFlags,
}

/// Runs the steps in a fresh run directory; `Ok(false)` when validation finds errors.
pub fn run(args: &Args) -> anyhow::Result<bool> {
    let run = fresh_run_dir(&args.output);
    println!("kiln demo -> {}\n", run.display());
    let annotations = synth::generate(&run.join("data"), &args.options)?;
    println!();
    let validate = validate::Args {
        data: annotations,
        class_names: None,
        images: None,
        split: "train:0.7,val:0.15,test:0.15".into(),
        stratify: true,
        group_by: "auto".into(),
        seed: 42,
        output_dir: None,
        json: false,
    };
    validate::run(&validate)
}
