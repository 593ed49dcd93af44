//! Reproducible train/val/test split by image, stratified for multi-label images with iterative
//! stratification (Sechidis, Tsoumakas & Vlahavas, "On the Stratification of Multi-label Data",
//! ECML PKDD 2011): the rarest class is placed first, each image goes to the split that still wants
//! that class most, so every class's share per split stays close to its share overall.

use std::collections::HashMap;
use std::str::FromStr;

use serde::Serialize;

use crate::coco::CocoDataset;
use crate::error::DataError;
use crate::rng::SeededRng;

/// Named parts and their ratios, e.g. `train:0.7,val:0.15,test:0.15`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SplitSpec {
    pub parts: Vec<(String, f64)>,
}

impl Default for SplitSpec {
    fn default() -> Self {
        "train:0.7,val:0.15,test:0.15".parse().unwrap()
    }
}

impl FromStr for SplitSpec {
    type Err = DataError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let fail = |message: String| DataError::SplitSpec { spec: spec.to_string(), message };
        let mut parts: Vec<(String, f64)> = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, ratio) = part.split_once(':').ok_or_else(|| fail(format!("'{part}' is not name:ratio")))?;
            let name = name.trim();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(fail(format!("'{name}' is not a usable split name (letters, digits, _ and -)")));
            }
            let ratio: f64 = ratio.trim().parse().map_err(|_| fail(format!("'{ratio}' is not a number")))?;
            if !(0.0..=1.0).contains(&ratio) {
                return Err(fail(format!("ratio {ratio} is outside 0..1")));
            }
            if parts.iter().any(|(n, _)| n == name) {
                return Err(fail(format!("'{name}' appears twice")));
            }
            parts.push((name.to_string(), ratio));
        }
        if !parts.iter().any(|(n, _)| n == "train") {
            return Err(fail("a 'train' part is required".into()));
        }
        let total: f64 = parts.iter().map(|(_, r)| r).sum();
        if (total - 1.0).abs() > 1e-6 {
            return Err(fail(format!("ratios sum to {total}, not 1")));
        }
        Ok(Self { parts })
    }
}

impl std::fmt::Display for SplitSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.parts.iter().map(|(n, r)| format!("{n}:{r}")).collect();
        f.write_str(&parts.join(","))
    }
}

#[derive(Debug, Clone)]
pub struct SplitOptions {
    pub spec: SplitSpec,
    pub seed: u64,
    pub stratify: bool,
    /// Images that belong together (frames of one video) go to one part. `Auto` groups by the
    /// images' `video_id` when the data has one, and splits by image otherwise.
    pub group_by: GroupBy,
}

impl Default for SplitOptions {
    fn default() -> Self {
        Self { spec: SplitSpec::default(), seed: 42, stratify: true, group_by: GroupBy::Auto }
    }
}

/// What keeps images together in a split (`--group-by`).
#[derive(Debug, Clone, PartialEq)]
pub enum GroupBy {
    /// The images' `video_id` field when any image has one; by image otherwise.
    Auto,
    /// By image (`--group-by none`).
    None,
    /// The value of this field of each image (`video_id`, `sequence`, ...; `--group-by video` is
    /// `video_id`). Images without it are groups of their own.
    Field(String),
    /// The first capture group (or the whole match) of this regex on each `file_name`, e.g.
    /// `^([^/]+)/` for one directory per video. Images it does not match are groups of their own.
    Pattern(String),
}

/// The field `--group-by video` and `Auto` read.
pub const VIDEO_FIELD: &str = "video_id";

impl FromStr for GroupBy {
    type Err = String;

    /// `auto`, `none`, `video` (the `video_id` field), a field name (letters, digits, `_`, `-`), or
    /// anything else as a regex on `file_name`.
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        Ok(match text {
            "" => return Err("empty --group-by: give video, a field name, a regex on file_name, or none".into()),
            "auto" => GroupBy::Auto,
            "none" => GroupBy::None,
            "video" => GroupBy::Field(VIDEO_FIELD.into()),
            field if field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => {
                GroupBy::Field(field.into())
            }
            pattern => {
                regex::Regex::new(pattern).map_err(|e| format!("--group-by {pattern:?} is not a valid regex: {e}"))?;
                GroupBy::Pattern(pattern.into())
            }
        })
    }
}

/// How a split grouped its images, for the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Grouping {
    /// `video_id`, another field, or `file_name =~ REGEX`.
    pub by: String,
    pub groups: usize,
    /// Chosen because the data has video ids (no `--group-by` given).
    pub automatic: bool,
}

/// The group key of every image (by position) under `group_by`, with what it is; `None` when the
/// split is by image.
pub fn image_groups(dataset: &CocoDataset, group_by: &GroupBy) -> Option<(Vec<String>, Grouping)> {
    let (field, pattern, automatic) = match group_by {
        GroupBy::None => return None,
        GroupBy::Auto => {
            if !dataset.images.iter().any(|i| i.extra.contains_key(VIDEO_FIELD)) {
                return None;
            }
            (Some(VIDEO_FIELD.to_string()), None, true)
        }
        GroupBy::Field(field) => (Some(field.clone()), None, false),
        GroupBy::Pattern(pattern) => (None, Some(regex::Regex::new(pattern).ok()?), false),
    };
    let keys: Vec<String> = dataset
        .images
        .iter()
        .map(|image| {
            let key = match (&field, &pattern) {
                (Some(field), _) => image.extra.get(field).map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                }),
                (_, Some(pattern)) => pattern
                    .captures(&image.file_name)
                    .map(|c| c.get(1).or_else(|| c.get(0)).map_or(String::new(), |m| m.as_str().to_string())),
                _ => None,
            };
            // Ungrouped images stand alone: a key no field value or file name can produce.
            key.map(|k| format!("g:{k}")).unwrap_or_else(|| format!("image:{}", image.id))
        })
        .collect();
    let groups = keys.iter().collect::<std::collections::HashSet<_>>().len();
    let by = match (&field, group_by) {
        (Some(field), _) => field.clone(),
        (_, GroupBy::Pattern(p)) => format!("file_name =~ {p}"),
        _ => String::new(),
    };
    Some((keys, Grouping { by, groups, automatic }))
}

/// Image positions (indexes into `dataset.images`) per part, in the spec's order.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub parts: Vec<(String, Vec<usize>)>,
}

impl Split {
    pub fn part(&self, name: &str) -> Option<&[usize]> {
        self.parts.iter().find(|(n, _)| n == name).map(|(_, images)| images.as_slice())
    }
}

/// Splits the images. Each class that occurs in the data has at least one image in `train`. With
/// groups (`options.group_by`), every group's images go to one part.
pub fn split(dataset: &CocoDataset, options: &SplitOptions) -> Split {
    if let Some((keys, _)) = image_groups(dataset, &options.group_by) {
        return grouped_split(dataset, options, &keys);
    }
    let n = dataset.images.len();
    let num_classes = dataset.class_ids().len();
    let labels = classes_per_image(dataset);
    let ratios: Vec<f64> = options.spec.parts.iter().map(|(_, r)| *r).collect();
    let capacity = largest_remainder(&ratios, n);

    let mut rng = SeededRng::new(options.seed);
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);

    let assignment = if options.stratify {
        iterative_stratification(&order, &labels, num_classes, &ratios, capacity, &mut rng)
    } else {
        let mut assignment = vec![0; n];
        let mut position = 0;
        for (part, &count) in capacity.iter().enumerate() {
            for &image in &order[position..position + count] {
                assignment[image] = part;
            }
            position += count;
        }
        assignment
    };
    let train = options.spec.parts.iter().position(|(name, _)| name == "train").unwrap_or(0);
    let assignment = ensure_every_class_in_train(assignment, &labels, num_classes, train, &order);

    let parts = options
        .spec
        .parts
        .iter()
        .enumerate()
        .map(|(part, (name, _))| (name.clone(), (0..n).filter(|&i| assignment[i] == part).collect()))
        .collect();
    Split { parts }
}

/// The split of whole groups: groups, largest first (ties in seeded random order), each go to the
/// part that most needs what they hold: its share of images still missing plus, stratified, its
/// share of each of the group's classes still missing (image counts per class). Then every class is
/// made present in train by moving its smallest group there.
fn grouped_split(dataset: &CocoDataset, options: &SplitOptions, keys: &[String]) -> Split {
    let n = dataset.images.len();
    let labels = classes_per_image(dataset);
    let num_classes = dataset.class_ids().len();
    let ratios: Vec<f64> = options.spec.parts.iter().map(|(_, r)| *r).collect();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (image, key) in keys.iter().enumerate() {
        let g = *index.entry(key.as_str()).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(image);
    }
    let class_counts = |group: &[usize]| {
        let mut counts = vec![0usize; num_classes];
        for &image in group {
            for &class in &labels[image] {
                counts[class] += 1;
            }
        }
        counts
    };
    let group_classes: Vec<Vec<usize>> = groups.iter().map(|g| class_counts(g)).collect();
    let totals = class_counts(&(0..n).collect::<Vec<_>>());

    let mut rng = SeededRng::new(options.seed);
    let mut order: Vec<usize> = (0..groups.len()).collect();
    rng.shuffle(&mut order);
    order.sort_by_key(|&g| std::cmp::Reverse(groups[g].len())); // stable: ties keep the shuffle

    let parts = ratios.len();
    let mut images = vec![0usize; parts];
    let mut per_class = vec![vec![0usize; num_classes]; parts];
    let mut assignment = vec![0usize; groups.len()];
    for &g in &order {
        let score = |p: usize| {
            let want = ratios[p] * n as f64;
            let mut score = (want - images[p] as f64) / n.max(1) as f64;
            if options.stratify {
                for (class, &count) in group_classes[g].iter().enumerate() {
                    if count > 0 {
                        let want = ratios[p] * totals[class] as f64;
                        score += (want - per_class[p][class] as f64) / totals[class] as f64;
                    }
                }
            }
            score
        };
        let best = (0..parts).map(score).fold(f64::NEG_INFINITY, f64::max);
        let candidates: Vec<usize> = (0..parts).filter(|&p| score(p) >= best - 1e-12).collect();
        let part = *rng.pick(&candidates);
        assignment[g] = part;
        images[part] += groups[g].len();
        for (class, &count) in group_classes[g].iter().enumerate() {
            per_class[part][class] += count;
        }
    }
    // Every class in train: its smallest group elsewhere moves there.
    let train = options.spec.parts.iter().position(|(name, _)| name == "train").unwrap_or(0);
    for class in 0..num_classes {
        if per_class[train][class] > 0 || totals[class] == 0 {
            continue;
        }
        let smallest = (0..groups.len()).filter(|&g| group_classes[g][class] > 0).min_by_key(|&g| groups[g].len());
        if let Some(g) = smallest {
            let from = assignment[g];
            assignment[g] = train;
            for (c, &count) in group_classes[g].iter().enumerate() {
                per_class[from][c] -= count;
                per_class[train][c] += count;
            }
        }
    }
    let mut image_part = vec![0usize; n];
    for (g, group) in groups.iter().enumerate() {
        for &image in group {
            image_part[image] = assignment[g];
        }
    }
    let parts = options
        .spec
        .parts
        .iter()
        .enumerate()
        .map(|(part, (name, _))| (name.clone(), (0..n).filter(|&i| image_part[i] == part).collect()))
        .collect();
    Split { parts }
}

/// Image counts per part: the ratios applied to `n`, rounded so they sum to `n` exactly.
fn largest_remainder(ratios: &[f64], n: usize) -> Vec<usize> {
    let exact: Vec<f64> = ratios.iter().map(|r| r * n as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut by_remainder: Vec<usize> = (0..ratios.len()).collect();
    by_remainder
        .sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())).then(a.cmp(&b)));
    let mut missing = n - counts.iter().sum::<usize>();
    for &part in by_remainder.iter().cycle() {
        if missing == 0 {
            break;
        }
        counts[part] += 1;
        missing -= 1;
    }
    counts
}

fn iterative_stratification(
    order: &[usize],
    labels: &[Vec<usize>],
    num_classes: usize,
    ratios: &[f64],
    mut capacity: Vec<usize>,
    rng: &mut SeededRng,
) -> Vec<usize> {
    const UNASSIGNED: usize = usize::MAX;
    let parts = ratios.len();
    let mut assignment = vec![UNASSIGNED; labels.len()];
    let mut images_of_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    for &image in order {
        for &class in &labels[image] {
            images_of_class[class].push(image);
        }
    }
    // How many more images of each class each part wants.
    let mut wanted: Vec<Vec<f64>> =
        ratios.iter().map(|r| images_of_class.iter().map(|images| r * images.len() as f64).collect()).collect();
    let mut remaining: Vec<usize> = images_of_class.iter().map(Vec::len).collect();
    let totals = remaining.clone();
    let n = labels.len();

    let assign = |image: usize,
                  part: usize,
                  assignment: &mut Vec<usize>,
                  capacity: &mut Vec<usize>,
                  wanted: &mut Vec<Vec<f64>>,
                  remaining: &mut Vec<usize>| {
        assignment[image] = part;
        capacity[part] -= 1;
        for &class in &labels[image] {
            wanted[part][class] -= 1.0;
            remaining[class] -= 1;
        }
    };

    loop {
        // The rarest class still holding unassigned images.
        let Some(class) = (0..num_classes).filter(|&c| remaining[c] > 0).min_by_key(|&c| (remaining[c], c)) else {
            break;
        };
        for &image in &images_of_class[class].clone() {
            if assignment[image] != UNASSIGNED {
                continue;
            }
            let open: Vec<usize> = (0..parts).filter(|&p| capacity[p] > 0).collect();
            let scores: Vec<f64> =
                open.iter().map(|&p| need(p, &labels[image], &wanted, &capacity, &totals, ratios, n)).collect();
            let best = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let candidates: Vec<usize> =
                open.iter().zip(&scores).filter(|(_, s)| **s >= best - 1e-12).map(|(&p, _)| p).collect();
            let part = *rng.pick(&candidates);
            assign(image, part, &mut assignment, &mut capacity, &mut wanted, &mut remaining);
        }
    }
    // Images without any annotation fill the remaining room.
    for &image in order {
        if assignment[image] == UNASSIGNED {
            let part = (0..parts).max_by_key(|&p| (capacity[p], std::cmp::Reverse(p))).unwrap_or(0);
            assign(image, part, &mut assignment, &mut capacity, &mut wanted, &mut remaining);
        }
    }
    assignment
}

/// How much part `p` still needs an image with these labels: for every class, the share of its
/// remaining quota the image would fill — of images *with* the class when the image has it, of
/// images *without* it otherwise. Counting absences matters for very common classes: an image
/// lacking a class present in 90 % of images is as informative as a rare class's image.
fn need(
    p: usize,
    image_labels: &[usize],
    wanted: &[Vec<f64>],
    capacity: &[usize],
    totals: &[usize],
    ratios: &[f64],
    n: usize,
) -> f64 {
    let mut score = 0.0;
    let mut next = image_labels.iter().peekable();
    for class in 0..totals.len() {
        let has = next.next_if_eq(&&class).is_some();
        let (quota, expected) = if has {
            (wanted[p][class], ratios[p] * totals[class] as f64)
        } else {
            (capacity[p] as f64 - wanted[p][class], ratios[p] * (n - totals[class]) as f64)
        };
        if expected > 0.0 {
            score += quota / expected;
        }
    }
    score
}

/// Moves one image of each class missing from train into it, and, to keep the part sizes, sends
/// back a train image whose classes all stay in train without it.
fn ensure_every_class_in_train(
    mut assignment: Vec<usize>,
    labels: &[Vec<usize>],
    num_classes: usize,
    train: usize,
    order: &[usize],
) -> Vec<usize> {
    let train_count = |assignment: &[usize]| {
        let mut counts = vec![0usize; num_classes];
        for (image, &part) in assignment.iter().enumerate() {
            if part == train {
                for &class in &labels[image] {
                    counts[class] += 1;
                }
            }
        }
        counts
    };
    let mut in_train = train_count(&assignment);
    for class in 0..num_classes {
        if in_train[class] > 0 {
            continue;
        }
        let Some(&image) = order.iter().find(|&&i| labels[i].contains(&class)) else {
            continue;
        };
        let donor = assignment[image];
        assignment[image] = train;
        for &c in &labels[image] {
            in_train[c] += 1;
        }
        let swap_back = order
            .iter()
            .copied()
            .find(|&i| i != image && assignment[i] == train && labels[i].iter().all(|&c| in_train[c] >= 2));
        if let Some(other) = swap_back {
            assignment[other] = donor;
            for &c in &labels[other] {
                in_train[c] -= 1;
            }
        }
    }
    assignment
}

/// Per part: images, annotations and instances per class index.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PartSummary {
    pub name: String,
    pub images: usize,
    pub annotations: usize,
    pub instances_per_class: Vec<usize>,
}

pub fn summarize(dataset: &CocoDataset, split: &Split) -> Vec<PartSummary> {
    let class_index = dataset.class_index();
    let by_image = dataset.annotations_by_image();
    split
        .parts
        .iter()
        .map(|(name, images)| {
            let mut instances_per_class = vec![0; class_index.len()];
            let mut annotations = 0;
            for &image in images {
                for &a in &by_image[image] {
                    annotations += 1;
                    if let Some(&c) = class_index.get(&dataset.annotations[a].category_id) {
                        instances_per_class[c] += 1;
                    }
                }
            }
            PartSummary { name: name.clone(), images: images.len(), annotations, instances_per_class }
        })
        .collect()
}

/// Number of images per class index in each part (what stratification balances).
pub fn images_per_class(dataset: &CocoDataset, split: &Split) -> HashMap<String, Vec<usize>> {
    let labels = classes_per_image(dataset);
    let num_classes = dataset.class_ids().len();
    split
        .parts
        .iter()
        .map(|(name, images)| {
            let mut counts = vec![0; num_classes];
            for &class in images.iter().flat_map(|&image| &labels[image]) {
                counts[class] += 1;
            }
            (name.clone(), counts)
        })
        .collect()
}

/// For each image (by position), the sorted distinct class indexes of its annotations.
fn classes_per_image(dataset: &CocoDataset) -> Vec<Vec<usize>> {
    let class_index = dataset.class_index();
    dataset
        .annotations_by_image()
        .into_iter()
        .map(|annotations| {
            let mut classes: Vec<usize> = annotations
                .iter()
                .filter_map(|&a| class_index.get(&dataset.annotations[a].category_id).copied())
                .collect();
            classes.sort_unstable();
            classes.dedup();
            classes
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_and_rejects_bad_input() {
        let spec: SplitSpec = "train:0.8, val:0.2".parse().unwrap();
        assert_eq!(spec.parts, vec![("train".to_string(), 0.8), ("val".to_string(), 0.2)]);
        for bad in ["train:0.5,val:0.2", "val:1.0", "train", "train:x", "train:0.5,train:0.5", "train:1.5,val:-0.5"] {
            assert!(bad.parse::<SplitSpec>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn largest_remainder_sums_to_n() {
        assert_eq!(largest_remainder(&[0.7, 0.15, 0.15], 8), vec![6, 1, 1]);
        assert_eq!(largest_remainder(&[0.7, 0.15, 0.15], 100), vec![70, 15, 15]);
        assert_eq!(largest_remainder(&[0.5, 0.5], 3).iter().sum::<usize>(), 3);
    }
}
