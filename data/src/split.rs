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
}

impl Default for SplitOptions {
    fn default() -> Self {
        Self { spec: SplitSpec::default(), seed: 42, stratify: true }
    }
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

/// Splits the images. Each class that occurs in the data has at least one image in `train`.
pub fn split(dataset: &CocoDataset, options: &SplitOptions) -> Split {
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
