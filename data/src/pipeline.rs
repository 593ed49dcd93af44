//! `kiln validate` as a library call: load (COCO JSON or a YOLO dataset), inspect, repair, validate,
//! split, write, and the report of it all. Nothing is written when the data has errors, and nothing
//! already on disk is replaced.

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use serde::Serialize;

use crate::coco::CocoDataset;
use crate::error::{DataError, Result};
use crate::inspect::{DatasetSummary, Recommendation, inspect};
use crate::repair::{RepairSummary, repair};
use crate::split::{PartSummary, SplitOptions, split, summarize};
use crate::validate::{Severity, Validation, validate};

#[derive(Debug, Clone)]
pub struct ValidateOptions {
    /// A COCO JSON file, or a YOLO data yaml (or the directory holding it).
    pub data: PathBuf,
    /// Where `file_name`s are relative to; by default `images/` beside the JSON when it exists,
    /// else the JSON's directory.
    pub images: Option<PathBuf>,
    pub split: SplitOptions,
    /// By default `splits/` beside the input.
    pub output_dir: Option<PathBuf>,
    /// A video dataset's class names by object id (`--class-names`): id k is the k-th.
    pub class_names: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ValidateReport {
    pub input: String,
    pub format: &'static str,
    pub images_dir: String,
    pub summary: DatasetSummary,
    pub repair: RepairSummary,
    pub validation: Validation,
    pub split: Option<SplitReport>,
    pub recommendation: Option<Recommendation>,
    pub written: Vec<String>,
    pub next_command: Option<String>,
    /// No errors: the outputs were written.
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SplitReport {
    pub spec: String,
    pub seed: u64,
    pub stratified: bool,
    /// Whole groups (videos) per part, when the split grouped images.
    pub grouping: Option<crate::split::Grouping>,
    pub parts: Vec<PartSummary>,
}

/// The loaded dataset and where its images are.
pub struct LoadedDataset {
    pub dataset: CocoDataset,
    pub images_dir: PathBuf,
    pub format: &'static str,
}

/// Reads COCO JSON, or imports a YOLO dataset when `data` is a yaml file or a directory.
pub fn load_dataset(data: &Path, images: Option<&Path>) -> Result<LoadedDataset> {
    if !data.exists() {
        return Err(DataError::invalid(data, "no such file or directory"));
    }
    if crate::video::is_davis_layout(data) || !crate::video::sav_annotation_files(data)?.is_empty() {
        return load_video_dataset(data, images, None);
    }
    let is_yolo = data.is_dir() || data.extension().is_some_and(|e| e == "yaml" || e == "yml");
    if is_yolo {
        let import = crate::yolo::import_yolo(data)?;
        let images_dir = images.map(Path::to_path_buf).unwrap_or(import.images_dir);
        return Ok(LoadedDataset { dataset: import.dataset, images_dir, format: "yolo" });
    }
    let dataset = CocoDataset::load(data)?;
    let images_dir = match images {
        Some(dir) => dir.to_path_buf(),
        None => {
            let parent = data.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let beside = parent.join("images");
            if beside.is_dir() { beside } else { parent.to_path_buf() }
        }
    };
    Ok(LoadedDataset { dataset, images_dir, format: "coco" })
}

/// A video dataset (DAVIS / SAM 2 layout, or SA-V) as COCO; `class_names` names object id k by
/// the k-th name (`--class-names`), otherwise `classes.yaml` in the dataset or `object`.
pub fn load_video_dataset(data: &Path, images: Option<&Path>, class_names: Option<&[String]>) -> Result<LoadedDataset> {
    let import = if crate::video::is_davis_layout(data) {
        crate::video::import_davis(data, class_names)?
    } else {
        crate::video::import_sav(data, class_names)?
    };
    let images_dir = images.map(Path::to_path_buf).unwrap_or(import.images_dir);
    Ok(LoadedDataset { dataset: import.dataset, images_dir, format: import.format })
}

/// The near-duplicate pairs (image positions) that `split` put in different parts, described.
fn leakage(dataset: &CocoDataset, split: &crate::Split, pairs: &[(usize, usize)]) -> Vec<String> {
    let mut part_of = vec![""; dataset.images.len()];
    for (name, images) in &split.parts {
        for &image in images {
            part_of[image] = name.as_str();
        }
    }
    pairs
        .iter()
        .filter(|&&(a, b)| part_of[a] != part_of[b])
        .map(|&(a, b)| {
            let (ia, ib) = (&dataset.images[a], &dataset.images[b]);
            format!(
                "image {} ({}, {}) ~ image {} ({}, {})",
                ia.id, ia.file_name, part_of[a], ib.id, ib.file_name, part_of[b]
            )
        })
        .collect()
}

pub fn run_validate(options: &ValidateOptions, progress: &ProgressBar) -> Result<ValidateReport> {
    let loaded = match &options.class_names {
        None => load_dataset(&options.data, options.images.as_deref())?,
        Some(names)
            if crate::video::is_davis_layout(&options.data)
                || !crate::video::sav_annotation_files(&options.data)?.is_empty() =>
        {
            load_video_dataset(&options.data, options.images.as_deref(), Some(names))?
        }
        Some(_) => {
            return Err(DataError::invalid(
                &options.data,
                "--class-names names the objects of a video dataset (DAVIS / SAM 2 layout or SA-V); this is not one, \
                 and its classes come from the file",
            ));
        }
    };
    let LoadedDataset { mut dataset, images_dir, format } = loaded;
    if !images_dir.is_dir() {
        return Err(DataError::invalid(
            &images_dir,
            "image directory not found; pass --images DIR (the directory `file_name`s are relative to)",
        ));
    }
    let mut summary = inspect(&dataset);
    let repair_summary = repair(&mut dataset);
    summary.count_object_sizes(&dataset);
    let validation = validate(&dataset, Some(&images_dir), progress);
    let recommendation = summary.recommendation();

    let mut report = ValidateReport {
        input: options.data.display().to_string(),
        format,
        images_dir: images_dir.display().to_string(),
        summary,
        repair: repair_summary,
        validation,
        split: None,
        recommendation,
        written: Vec::new(),
        next_command: None,
        ok: false,
    };
    if report.validation.has_errors() {
        return Ok(report);
    }

    let parts = split(&dataset, &options.split);
    let leaks = leakage(&dataset, &parts, &report.validation.near_duplicates);
    if !leaks.is_empty() {
        report.validation.problems.push(crate::validate::Problem {
            severity: Severity::Warning,
            code: "duplicates_across_splits",
            message: "images that look the same in two parts: leakage that inflates validation and test metrics \
                      (remove the copies, or give them one --group-by value)"
                .into(),
            count: leaks.len(),
            examples: leaks.into_iter().take(5).collect(),
        });
    }
    report.split = Some(SplitReport {
        spec: options.split.spec.to_string(),
        seed: options.split.seed,
        stratified: options.split.stratify,
        grouping: crate::split::image_groups(&dataset, &options.split.group_by).map(|(_, grouping)| grouping),
        parts: summarize(&dataset, &parts),
    });

    let output_dir = match &options.output_dir {
        Some(dir) => dir.clone(),
        None => options.data.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).join("splits"),
    };
    let stem = options.data.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "dataset".into());
    let full_name = if format == "coco" { format!("{stem}.repaired.json") } else { format!("{stem}.coco.json") };
    let mut outputs: Vec<(PathBuf, CocoDataset)> = vec![(output_dir.join(full_name), dataset.clone())];
    for (name, images) in &parts.parts {
        outputs.push((output_dir.join(format!("{name}.json")), dataset.subset(images)));
    }
    let input = std::fs::canonicalize(&options.data).ok();
    for (path, _) in &outputs {
        let resolved =
            path.parent().and_then(|p| std::fs::canonicalize(p).ok()).zip(path.file_name()).map(|(p, n)| p.join(n));
        if resolved.is_some() && resolved == input {
            return Err(DataError::invalid(path, "would overwrite the input file; choose another --output-dir"));
        }
    }
    let markdown = output_dir.join(REPORT_FILE);
    let metadata_path = output_dir.join(SPLITS_METADATA_FILE);
    crate::io::refuse_to_overwrite(
        outputs.iter().map(|(p, _)| p.as_path()).chain([markdown.as_path(), metadata_path.as_path()]),
    )?;
    let train = output_dir.join("train.json");
    let val = parts.part("val").filter(|v| !v.is_empty()).map(|_| output_dir.join("val.json"));
    report.next_command = Some(format!(
        "kiln train-teacher --data {}{} --images {}",
        train.display(),
        val.map(|v| format!(" --val {}", v.display())).unwrap_or_default(),
        images_dir.display()
    ));
    report.ok = true;
    let mut paths: Vec<&Path> = outputs.iter().map(|(p, _)| p.as_path()).collect();
    paths.push(&markdown);
    paths.push(&metadata_path);
    // What the next steps need to find the data without flags (`--name`): where the images are.
    let absolute = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let metadata = serde_json::json!({
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "data": absolute(&options.data),
        "images": absolute(&images_dir),
        "format": format,
        "split": options.split.spec.to_string(),
        "seed": options.split.seed,
        "parts": parts.parts.iter().map(|(name, images)| serde_json::json!({"name": name, "images": images.len()})).collect::<Vec<_>>(),
    });
    report.written = paths.iter().map(|p| p.display().to_string()).collect();
    let mut written: Vec<PathBuf> = Vec::new();
    for (path, part) in &outputs {
        if let Err(e) = part.save(path) {
            for done in &written {
                let _ = std::fs::remove_file(done);
            }
            return Err(e);
        }
        written.push(path.clone());
    }
    let metadata = serde_json::to_vec_pretty(&metadata).expect("a JSON value serialises");
    for (path, bytes) in [(&markdown, report.render_markdown().into_bytes()), (&metadata_path, metadata)] {
        if let Err(e) = crate::io::write_atomic(path, &bytes) {
            for done in &written {
                let _ = std::fs::remove_file(done);
            }
            return Err(e);
        }
        written.push(path.clone());
    }
    Ok(report)
}

/// The Markdown report `kiln validate` writes beside the splits.
pub const REPORT_FILE: &str = "report.md";

/// What `kiln validate` records beside the splits: the input, its images directory (absolute) and
/// the split, so later steps find the images from an experiment's name alone.
pub const SPLITS_METADATA_FILE: &str = "metadata.json";

impl ValidateReport {
    /// The report as Markdown (`report.md` beside the splits): the dataset, its classes with their
    /// object sizes and split counts, the problems, the split.
    pub fn render_markdown(&self) -> String {
        use std::fmt::Write;
        let s = &self.summary;
        let mut out = format!("# kiln validate: {}\n\n", self.input);
        let _ = writeln!(out, "| | |\n|---|---|");
        let _ = writeln!(out, "| format | {} |\n| images | {} (in `{}`) |", self.format, s.images, self.images_dir);
        let _ = writeln!(
            out,
            "| annotations | {} ({:.1} per image, at most {}; {} images without any) |",
            s.annotations,
            s.annotations_per_image.mean,
            s.annotations_per_image.max,
            s.annotations_per_image.images_without_annotations
        );
        let _ = writeln!(out, "| masks | {} |\n| boxes given | {} |", s.masks.total(), s.boxes_given);
        if let Some(i) = &s.imbalance {
            let _ = writeln!(
                out,
                "| class imbalance | {:.1}:1 ({} {} vs {} {}) |",
                i.ratio, i.most, i.most_instances, i.least, i.least_instances
            );
        }
        if let Some(r) = &self.recommendation {
            let _ = writeln!(out, "| teachers | {} |\n| student | {} |", r.teachers.join(", "), r.student);
        }
        let parts: Vec<&crate::split::PartSummary> = self.split.iter().flat_map(|sp| sp.parts.iter()).collect();
        let _ = write!(
            out,
            "\n## Classes\n\n| index | id | name | instances | images | tiny | huge | median box / image |"
        );
        for part in &parts {
            let _ = write!(out, " {} |", part.name);
        }
        let _ = write!(out, "\n|---|---|---|---|---|---|---|---|");
        out.push_str(&"---|".repeat(parts.len()));
        out.push('\n');
        for c in &s.class_mapping {
            let _ = write!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {:.1} % |",
                c.index,
                c.id,
                c.name,
                c.instances,
                c.images,
                c.tiny,
                c.huge,
                100.0 * c.median_area_share
            );
            for part in &parts {
                let _ = write!(out, " {} |", part.instances_per_class[c.index]);
            }
            out.push('\n');
        }
        let v = &self.validation;
        let _ = writeln!(out, "\n## Problems: {} errors, {} warnings\n", v.errors(), v.warnings());
        for p in &v.problems {
            let _ = writeln!(
                out,
                "- **{:?}** `{}`: {} ({}): {}",
                p.severity,
                p.code,
                p.message,
                p.count,
                p.examples.join("; ")
            );
        }
        if let Some(split) = &self.split {
            let _ = writeln!(
                out,
                "\n## Split\n\n{} (seed {}, {})",
                split.spec,
                split.seed,
                if split.stratified { "stratified by class" } else { "random" }
            );
            if let Some(g) = &split.grouping {
                let _ = writeln!(out, "; grouped by {} ({} groups, each in one part)", g.by, g.groups);
            }
            let _ = writeln!(out, "\n| part | images | annotations |\n|---|---|---|");
            for part in &split.parts {
                let _ = writeln!(out, "| {} | {} | {} |", part.name, part.images, part.annotations);
            }
        }
        if let Some(next) = &self.next_command {
            let _ = writeln!(out, "\nNext: `{next}`");
        }
        out
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let s = &self.summary;
        let mut out = String::new();
        let format = match self.format {
            "coco" => "COCO JSON",
            "yolo" => "YOLO dataset (imported)",
            "davis" => "DAVIS / SAM 2 video layout (imported; frames grouped by video)",
            "sa-v" => "SA-V videos (imported; frames grouped by video)",
            other => other,
        };
        let _ = writeln!(out, "kiln validate: {}\n", self.input);
        let _ = writeln!(out, "  Format       valid {format}");
        if let Some(images) = &self.validation.images {
            let _ = writeln!(
                out,
                "  Images       {} listed, {} found, {} readable  (in {})",
                images.listed, images.found, images.decoded, self.images_dir
            );
        }
        let p = &s.annotations_per_image;
        let _ = writeln!(
            out,
            "  Annotations  {} ({} crowd); per image {}..{}, mean {:.1}; {} images without annotations",
            s.annotations, s.crowd_annotations, p.min, p.max, p.mean, p.images_without_annotations
        );
        let m = &s.masks;
        if s.has_masks {
            let _ = writeln!(
                out,
                "  Masks        {} ({} polygons, {} RLE, {} compressed RLE)",
                m.total(),
                m.polygons,
                m.rle_uncompressed,
                m.rle_compressed
            );
        } else {
            let _ = writeln!(out, "  Masks        none");
        }
        let _ =
            writeln!(out, "  Boxes        {} given, {} derived from masks", s.boxes_given, self.repair.bbox_from_mask);
        let _ = writeln!(
            out,
            "  Areas        {} derived from masks, {} from boxes",
            self.repair.area_from_mask, self.repair.area_from_box
        );
        let _ = writeln!(
            out,
            "  Keypoints    {}",
            if s.has_keypoints { "present (not used by kiln's models)" } else { "none" }
        );

        let used: Vec<_> = s.class_mapping.iter().filter(|c| c.instances > 0).collect();
        let _ = writeln!(out, "  Classes      {} ({} with instances)", s.num_classes, used.len());
        let part_names: Vec<&str> = self.split.iter().flat_map(|sp| sp.parts.iter().map(|p| p.name.as_str())).collect();
        let _ = write!(
            out,
            "    {:>5} {:>6}  {:<20} {:>9} {:>7} {:>6} {:>6} {:>7}",
            "index", "id", "name", "instances", "images", "tiny", "huge", "median"
        );
        for name in &part_names {
            let _ = write!(out, " {name:>7}");
        }
        out.push('\n');
        for class in &used {
            let _ = write!(
                out,
                "    {:>5} {:>6}  {:<20} {:>9} {:>7} {:>6} {:>6} {:>6.1}%",
                class.index,
                class.id,
                class.name,
                class.instances,
                class.images,
                class.tiny,
                class.huge,
                100.0 * class.median_area_share
            );
            for part in self.split.iter().flat_map(|sp| sp.parts.iter()) {
                let _ = write!(out, " {:>7}", part.instances_per_class[class.index]);
            }
            out.push('\n');
        }

        let _ = writeln!(
            out,
            "    (tiny: box under {0}x{0} px; huge: over {1:.0} % of the image; median: box area / image area)",
            crate::inspect::TINY_OBJECT_SIDE,
            100.0 * crate::inspect::HUGE_OBJECT_SHARE
        );
        if let Some(i) = &s.imbalance {
            let _ = writeln!(
                out,
                "    imbalance {:.1}:1 ({} {} vs {} {}); density {:.1} objects per image (max {})",
                i.ratio,
                i.most,
                i.most_instances,
                i.least,
                i.least_instances,
                s.annotations_per_image.mean,
                s.annotations_per_image.max
            );
        }

        let v = &self.validation;
        let _ = writeln!(out, "\n  Problems     {} errors, {} warnings", v.errors(), v.warnings());
        for problem in &v.problems {
            let tag = match problem.severity {
                Severity::Error => "error  ",
                Severity::Warning => "warning",
            };
            let _ = writeln!(out, "    {tag} {}: {} ({})", problem.code, problem.message, problem.count);
            let more = if problem.count > problem.examples.len() { ", ..." } else { "" };
            let _ = writeln!(out, "            first: {}{more}", problem.examples.join("; "));
        }

        if let Some(split) = &self.split {
            let _ = writeln!(
                out,
                "\n  Split        {} (seed {}, {})",
                split.spec,
                split.seed,
                if split.stratified { "stratified by class" } else { "random" }
            );
            if let Some(g) = &split.grouping {
                let _ = writeln!(
                    out,
                    "    grouped by {} ({} groups, each in one part{})",
                    g.by,
                    g.groups,
                    if g.automatic {
                        "; the data has video ids, so frames of a video stay together: --group-by none to split frames"
                    } else {
                        ""
                    }
                );
            }
            for part in &split.parts {
                let _ =
                    writeln!(out, "    {:<8} {:>6} images {:>8} annotations", part.name, part.images, part.annotations);
            }
        }
        if let Some(r) = &self.recommendation {
            let _ = writeln!(out, "\n  Teachers     {}", r.teachers.join(", "));
            let _ = writeln!(out, "  Student      {} ({})", r.student, r.reason);
        }
        if !self.written.is_empty() {
            let _ = writeln!(out, "\n  Wrote        {}", self.written.join("\n               "));
        }
        if let Some(next) = &self.next_command {
            let _ = writeln!(out, "\n  Next         {next}");
        }
        if !self.ok {
            let _ = writeln!(
                out,
                "\n  The data has errors: nothing was written. Fix them in the annotation file (or your tool) and run kiln validate again."
            );
        }
        out
    }
}
