//! Validation: every problem kiln can find in a COCO dataset, each with a severity, a count and the
//! first offending ids, so a user can find and fix them in their own tool. Errors stop the pipeline;
//! warnings are reported and the data goes on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::Serialize;

use crate::coco::{CocoDataset, Segmentation};
use crate::error::DataError;

/// How many offending ids a problem lists.
const EXAMPLES: usize = 5;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One kind of problem found in the data, with how often and where.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Problem {
    pub severity: Severity,
    /// Stable machine-readable name, e.g. `missing_image`.
    pub code: &'static str,
    pub message: String,
    pub count: usize,
    /// The first offending items, e.g. `annotation 17` or `image 3 (a.jpg)`.
    pub examples: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ImageCheck {
    pub listed: usize,
    pub found: usize,
    pub decoded: usize,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Validation {
    pub problems: Vec<Problem>,
    /// `None` when no image directory was given.
    pub images: Option<ImageCheck>,
    /// Pairs of image positions that look the same (perceptual hashes within
    /// [`NEAR_DUPLICATE_BITS`]), for the split's leakage check.
    #[serde(skip)]
    pub near_duplicates: Vec<(usize, usize)>,
}

/// Two images whose 64-bit difference hashes differ in at most this many bits look the same
/// (a re-encoded, resized or slightly re-lit copy of one picture).
pub const NEAR_DUPLICATE_BITS: u32 = 4;

/// Above this many images, only identical hashes are compared (the pairwise search is quadratic).
const PAIRWISE_LIMIT: usize = 20_000;

/// The difference hash (dHash) of an image: its grey 9x8 thumbnail, one bit per horizontal
/// neighbour pair (left brighter than right). Robust to scale, compression and uniform light.
pub fn difference_hash(image: &image::DynamicImage) -> u64 {
    let small = image::imageops::resize(&image.to_luma8(), 9, 8, image::imageops::FilterType::Triangle);
    let mut hash = 0u64;
    for y in 0..8 {
        for x in 0..8 {
            hash = hash << 1 | (small.get_pixel(x, y)[0] > small.get_pixel(x + 1, y)[0]) as u64;
        }
    }
    hash
}

/// Pairs (by position, first < second) whose hashes are within [`NEAR_DUPLICATE_BITS`].
pub fn near_duplicate_pairs(hashes: &[Option<u64>]) -> Vec<(usize, usize)> {
    let known: Vec<(usize, u64)> = hashes.iter().enumerate().filter_map(|(i, h)| h.map(|h| (i, h))).collect();
    let mut pairs = Vec::new();
    if known.len() <= PAIRWISE_LIMIT {
        for (a, &(i, hi)) in known.iter().enumerate() {
            for &(j, hj) in &known[a + 1..] {
                if (hi ^ hj).count_ones() <= NEAR_DUPLICATE_BITS {
                    pairs.push((i, j));
                }
            }
        }
    } else {
        let mut by_hash: HashMap<u64, Vec<usize>> = HashMap::new();
        for &(i, h) in &known {
            by_hash.entry(h).or_default().push(i);
        }
        for same in by_hash.values() {
            for (a, &i) in same.iter().enumerate() {
                pairs.extend(same[a + 1..].iter().map(|&j| (i, j)));
            }
        }
        pairs.sort_unstable();
    }
    pairs
}

impl Validation {
    pub fn errors(&self) -> usize {
        self.problems.iter().filter(|p| p.severity == Severity::Error).count()
    }

    pub fn warnings(&self) -> usize {
        self.problems.iter().filter(|p| p.severity == Severity::Warning).count()
    }

    pub fn has_errors(&self) -> bool {
        self.errors() > 0
    }

    pub fn problem(&self, code: &str) -> Option<&Problem> {
        self.problems.iter().find(|p| p.code == code)
    }
}

/// Collects offending items per problem code, in the order they are found.
#[derive(Default)]
struct Findings {
    items: BTreeMap<&'static str, (Severity, String, Vec<String>)>,
}

impl Findings {
    fn add(&mut self, severity: Severity, code: &'static str, message: &str, item: String) {
        self.items.entry(code).or_insert_with(|| (severity, message.to_string(), Vec::new())).2.push(item);
    }

    fn into_problems(self) -> Vec<Problem> {
        let mut problems: Vec<Problem> = self
            .items
            .into_iter()
            .map(|(code, (severity, message, items))| Problem {
                severity,
                code,
                message,
                count: items.len(),
                examples: items.into_iter().take(EXAMPLES).collect(),
            })
            .collect();
        problems.sort_by_key(|p| p.severity);
        problems
    }
}

fn duplicates<'a>(ids: impl Iterator<Item = &'a u64>) -> Vec<u64> {
    let mut seen = HashSet::new();
    let mut repeated = Vec::new();
    for &id in ids {
        if !seen.insert(id) {
            repeated.push(id);
        }
    }
    repeated
}

/// Checks the annotation file's content and, when `images_dir` is given, the images on disk.
pub fn validate(dataset: &CocoDataset, images_dir: Option<&Path>, progress: &ProgressBar) -> Validation {
    use Severity::{Error, Warning};
    let mut found = Findings::default();

    for id in duplicates(dataset.images.iter().map(|i| &i.id)) {
        found.add(Error, "duplicate_image_id", "image ids used more than once", format!("image {id}"));
    }
    for id in duplicates(dataset.annotations.iter().map(|a| &a.id)) {
        found.add(Error, "duplicate_annotation_id", "annotation ids used more than once", format!("annotation {id}"));
    }
    for id in duplicates(dataset.categories.iter().map(|c| &c.id)) {
        found.add(Error, "duplicate_category_id", "category ids used more than once", format!("category {id}"));
    }
    let mut names = HashSet::new();
    for category in &dataset.categories {
        if category.name.trim().is_empty() {
            found.add(
                Error,
                "empty_category_name",
                "categories without a name (class names become text prompts)",
                format!("category {}", category.id),
            );
        } else if !names.insert(category.name.trim().to_lowercase()) {
            found.add(
                Warning,
                "duplicate_category_name",
                "category names used by more than one id (they cannot be told apart in a text prompt)",
                format!("category {} ({})", category.id, category.name),
            );
        }
    }
    if dataset.categories.is_empty() {
        found.add(Error, "no_categories", "the file lists no categories", "categories".into());
    }
    if dataset.images.is_empty() {
        found.add(Error, "no_images", "the file lists no images", "images".into());
    }
    let mut file_names = HashSet::new();
    for image in &dataset.images {
        if image.width == 0 || image.height == 0 {
            found.add(
                Error,
                "zero_image_size",
                "images with zero width or height",
                format!("image {} ({})", image.id, image.file_name),
            );
        }
        if !file_names.insert(image.file_name.as_str()) {
            found.add(
                Warning,
                "duplicate_file_name",
                "image entries pointing at the same file",
                format!("image {} ({})", image.id, image.file_name),
            );
        }
    }

    let images: HashMap<u64, (u32, u32)> = dataset.images.iter().map(|i| (i.id, (i.width, i.height))).collect();
    let categories: HashSet<u64> = dataset.categories.iter().map(|c| c.id).collect();
    let mut used_categories = HashSet::new();
    for annotation in &dataset.annotations {
        let item = format!("annotation {}", annotation.id);
        let size = images.get(&annotation.image_id).copied();
        if size.is_none() {
            found.add(
                Error,
                "unknown_image",
                "annotations on image ids not listed in `images`",
                format!("{item} (image {})", annotation.image_id),
            );
        }
        if categories.contains(&annotation.category_id) {
            used_categories.insert(annotation.category_id);
        } else {
            found.add(
                Error,
                "unknown_category",
                "annotations with category ids not listed in `categories`",
                format!("{item} (category {})", annotation.category_id),
            );
        }
        let mask = annotation.mask();
        if mask.is_none() && annotation.bbox.is_none() {
            found.add(Error, "no_label", "annotations with neither a box nor a mask", item.clone());
        }
        if let Some(Segmentation::Polygons(polygons)) = mask {
            if polygons.iter().any(|p| p.len() % 2 != 0) {
                found.add(Error, "odd_polygon", "polygons with an odd number of coordinates", item.clone());
            } else if polygons.iter().any(|p| p.len() < 6) {
                found.add(Error, "short_polygon", "polygons with fewer than 3 points", item.clone());
            }
        }
        if let (Some(mask), Some((width, height))) = (mask, size) {
            match mask.to_rle(height, width) {
                Err(e) if matches!(mask, Segmentation::Polygons(_)) => found.add(
                    Error,
                    "polygon_far_outside",
                    "polygons with points far outside their image",
                    format!("{item}: {e}"),
                ),
                Err(e) => found.add(Error, "invalid_rle", "RLE masks that cannot be decoded", format!("{item}: {e}")),
                Ok(rle) if rle.area() == 0 => found.add(
                    Warning,
                    "empty_mask",
                    "masks covering no pixel (kept in the files, ignored in training)",
                    item.clone(),
                ),
                Ok(_) => {}
            }
        }
        if let Some([x, y, w, h]) = annotation.bbox {
            if !(w > 0.0 && h > 0.0) {
                found.add(
                    Warning,
                    "empty_box",
                    "boxes with zero or negative width or height (kept in the files, ignored in training)",
                    item.clone(),
                );
            } else if let Some((width, height)) = size {
                let (width, height) = (width as f64, height as f64);
                if x >= width || y >= height || x + w <= 0.0 || y + h <= 0.0 {
                    found.add(Error, "box_outside_image", "boxes entirely outside their image", item.clone());
                } else if x < -1.0 || y < -1.0 || x + w > width + 1.0 || y + h > height + 1.0 {
                    found.add(
                        Warning,
                        "box_crosses_image_border",
                        "boxes reaching more than 1 px beyond their image (clipped in training)",
                        item.clone(),
                    );
                }
            }
        }
    }
    for category in &dataset.categories {
        if !used_categories.contains(&category.id) {
            found.add(
                Warning,
                "unused_category",
                "categories without any instance",
                format!("category {} ({})", category.id, category.name),
            );
        }
    }

    // Every class under a tenth of the largest one, named with its count.
    let counts = instances_per_category(dataset);
    let present = dataset.categories.iter().filter_map(|c| counts.get(&c.id).filter(|&&n| n > 0).map(|&n| (c, n)));
    let most = present.clone().max_by_key(|&(c, n)| (n, std::cmp::Reverse(c.id)));
    let least = present.clone().map(|(_, n)| n).min();
    if let (Some((largest, most)), Some(least)) = (most, least)
        && most as f64 > crate::inspect::IMBALANCE_WARNING * least as f64
    {
        let ratio = most as f64 / least as f64;
        for (category, count) in present {
            if most as f64 > crate::inspect::IMBALANCE_WARNING * count as f64 {
                found.add(
                    Warning,
                    "class_imbalance",
                    &format!(
                        "classes with under a tenth of the instances of the largest ({} with {most}; max:min \
                         {ratio:.1}:1): label more of them, or expect the student to miss them",
                        largest.name
                    ),
                    format!("{} ({count})", category.name),
                );
            }
        }
    }

    let checked = images_dir.map(|dir| check_images(dataset, dir, progress, &mut found));
    let (image_check, near_duplicates) = match checked {
        Some((check, hashes)) => (Some(check), near_duplicate_pairs(&hashes)),
        None => (None, Vec::new()),
    };
    for &(a, b) in &near_duplicates {
        let (a, b) = (&dataset.images[a], &dataset.images[b]);
        found.add(
            Warning,
            "near_duplicate_images",
            "images that look the same as another (a copy in two splits inflates every metric)",
            format!("image {} ({}) ~ image {} ({})", a.id, a.file_name, b.id, b.file_name),
        );
    }
    Validation { problems: found.into_problems(), images: image_check, near_duplicates }
}

fn instances_per_category(dataset: &CocoDataset) -> HashMap<u64, usize> {
    let mut counts = HashMap::new();
    for annotation in &dataset.annotations {
        *counts.entry(annotation.category_id).or_insert(0) += 1;
    }
    counts
}

enum ImageState {
    /// The path leads outside the images directory (through a symlink: `..` and absolute paths
    /// are refused when the file is read).
    Outside(String),
    Missing,
    Unreadable(String),
    WrongSize(u32, u32),
    /// Decoded at the size the file says; its difference hash.
    Ok(u64),
}

/// Decodes every listed image (in parallel): finds missing, corrupt and mis-sized files.
fn check_images(
    dataset: &CocoDataset,
    dir: &Path,
    progress: &ProgressBar,
    found: &mut Findings,
) -> (ImageCheck, Vec<Option<u64>>) {
    progress.set_length(dataset.images.len() as u64);
    let states: Vec<ImageState> = dataset
        .images
        .par_iter()
        .map(|image| {
            let path: PathBuf = dir.join(&image.file_name);
            let inside = crate::paths::inside(dir, &image.file_name, &format!("image {}", image.id));
            let state = if let Err(outside) = inside {
                ImageState::Outside(outside.to_string())
            } else if !path.is_file() {
                ImageState::Missing
            } else {
                let decoded = std::fs::read(&path).map_err(|e| e.to_string()).and_then(|bytes| {
                    crate::io::decode_image(&bytes, &path).map_err(|e| match e {
                        DataError::Image { message, .. } => message,
                        other => other.to_string(),
                    })
                });
                match decoded {
                    Err(e) => ImageState::Unreadable(e),
                    Ok(decoded) if (decoded.width(), decoded.height()) != (image.width, image.height) => {
                        ImageState::WrongSize(decoded.width(), decoded.height())
                    }
                    Ok(decoded) => ImageState::Ok(difference_hash(&decoded)),
                }
            };
            progress.inc(1);
            state
        })
        .collect();
    progress.finish_and_clear();

    let mut check = ImageCheck { listed: dataset.images.len(), ..Default::default() };
    let mut hashes = vec![None; dataset.images.len()];
    for (position, (image, state)) in dataset.images.iter().zip(states).enumerate() {
        let item = format!("image {} ({})", image.id, image.file_name);
        match state {
            ImageState::Outside(e) => found.add(
                Severity::Error,
                "path_outside_images",
                &format!("images whose path leads outside {} (not read)", dir.display()),
                format!("{item}: {e}"),
            ),
            ImageState::Missing => found.add(
                Severity::Error,
                "missing_image",
                &format!("images listed in the file but missing under {}", dir.display()),
                item,
            ),
            ImageState::Unreadable(e) => {
                check.found += 1;
                found.add(Severity::Error, "corrupt_image", "images that cannot be decoded", format!("{item}: {e}"))
            }
            ImageState::WrongSize(w, h) => {
                check.found += 1;
                check.decoded += 1;
                found.add(
                    Severity::Error,
                    "image_size_mismatch",
                    "images whose size on disk differs from `width`/`height` in the file",
                    format!("{item}: file is {w}x{h}, JSON says {}x{}", image.width, image.height),
                )
            }
            ImageState::Ok(hash) => {
                check.found += 1;
                check.decoded += 1;
                hashes[position] = Some(hash);
            }
        }
    }
    (check, hashes)
}
