//! `kiln validate`: inspect, repair, validate and split a dataset, and report.

use std::path::PathBuf;

use kiln_data::{SplitOptions, SplitSpec, ValidateOptions};

use crate::common::progress_bar;

#[derive(clap::Args)]
pub struct Args {
    /// COCO annotation file (JSON), a YOLO dataset (its data yaml or the directory holding it), or
    /// a video dataset: the DAVIS / SAM 2 layout (a directory with JPEGImages/<video>/ and
    /// Annotations/<video>/*.png) or SA-V (a directory of <video>_manual.json with the frames).
    #[arg(long, value_name = "FILE|DIR")]
    pub data: PathBuf,
    /// A video dataset's class names: object id k (the mask value, or SA-V's masklet id + 1) is the
    /// k-th name in every video [default: classes.yaml in the dataset (VIDEO: {ID: CLASS}), else
    /// every object is `object`].
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub class_names: Option<Vec<String>>,
    /// Directory that the images' `file_name`s are relative to [default: `images/` beside the
    /// annotation file if it exists, else the file's directory].
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// Split by image into named parts with ratios summing to 1.
    #[arg(long, value_name = "SPEC", default_value = "train:0.7,val:0.15,test:0.15")]
    pub split: String,
    /// Keep each class's share close to its share overall in every part (iterative
    /// stratification); `--stratify false` splits at random.
    #[arg(long, value_name = "BOOL", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub stratify: bool,
    /// Keep images that belong together in one part, so frames of one video never sit in train and
    /// test at once: `video` (the images' `video_id` field), another field name of the images
    /// (`sequence`, ...), a regex on `file_name` whose first group names the group (`^([^/]+)/`: one
    /// directory per video), or `none`. Default: by `video_id` when the data has one, else by image.
    #[arg(long, value_name = "video|FIELD|REGEX|none", default_value = "auto")]
    pub group_by: String,
    /// Seed of the split: the same seed and data give the same split.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Where to write the repaired file and the splits [default: `splits/` beside the input, or
    /// the experiment's splits/ with --name].
    #[arg(long, value_name = "DIR", conflicts_with = "name")]
    pub output_dir: Option<PathBuf>,
    /// Start an experiment: the splits go to experiments/NAME/splits (a path: DIR/splits), with the
    /// images' directory recorded, so `kiln train-teacher --name NAME`, `train-student --name NAME`
    /// and `optimize --name NAME` need no other path.
    #[arg(long, value_name = "NAME|DIR")]
    pub name: Option<PathBuf>,
    /// Print the report as JSON on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs the validation; `Ok(false)` when the data has errors (the report lists them), so the
/// process exits with status 1 without an error message of its own.
pub fn run(args: &Args) -> anyhow::Result<bool> {
    let spec: SplitSpec = args.split.parse()?;
    let options = ValidateOptions {
        data: args.data.clone(),
        images: args.images.clone(),
        split: SplitOptions {
            spec,
            seed: args.seed,
            stratify: args.stratify,
            group_by: args.group_by.parse().map_err(anyhow::Error::msg)?,
        },
        output_dir: args
            .output_dir
            .clone()
            .or_else(|| args.name.as_deref().map(|name| crate::common::Experiment::named(name).splits())),
        class_names: args.class_names.clone(),
    };
    let mut report = kiln_data::run_validate(&options, &progress_bar("images"))?;
    if let (Some(name), true) = (&args.name, report.ok) {
        let experiment = crate::common::Experiment::named(name).dir;
        report.next_command = Some(format!("kiln train-teacher --name {}", experiment.display()));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(report.ok)
}
