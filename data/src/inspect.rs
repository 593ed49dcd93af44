//! What a dataset holds: which labels (boxes, masks, keypoints), which classes, how many of each,
//! and so which teachers and student it calls for. Recomputed from the data every time.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::coco::{CocoDataset, RleCounts, Segmentation};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DatasetSummary {
    pub images: usize,
    pub annotations: usize,
    pub num_classes: usize,
    /// Boxes are usable for training: given in the file, or derivable from a mask.
    pub has_boxes: bool,
    pub has_masks: bool,
    pub has_keypoints: bool,
    pub boxes_given: usize,
    /// Annotations with a mask but no `bbox`: their box comes from the mask.
    pub boxes_from_masks: usize,
    pub masks: MaskCounts,
    pub crowd_annotations: usize,
    /// The dataset's own ids and names, in class-index order (index = position).
    pub class_mapping: Vec<ClassSummary>,
    pub annotations_per_image: PerImage,
    /// Instances of the most against the least frequent class with instances (`None` with fewer
    /// than two such classes); above [`IMBALANCE_WARNING`] validation warns.
    pub imbalance: Option<Imbalance>,
}

/// A max:min ratio of class instances above this is a warning: a student trained on it mostly
/// learns the large classes (resample, add labels of the rare ones, or weigh them).
pub const IMBALANCE_WARNING: f64 = 10.0;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Imbalance {
    /// `most.instances / least.instances`.
    pub ratio: f64,
    pub most: String,
    pub most_instances: usize,
    pub least: String,
    pub least_instances: usize,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MaskCounts {
    pub polygons: usize,
    pub rle_uncompressed: usize,
    pub rle_compressed: usize,
}

impl MaskCounts {
    pub fn total(&self) -> usize {
        self.polygons + self.rle_uncompressed + self.rle_compressed
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassSummary {
    pub index: usize,
    pub id: u64,
    pub name: String,
    pub instances: usize,
    pub images: usize,
    /// Objects whose box is under [`TINY_OBJECT_SIDE`]² pixels (hard for a stride-8 detector at
    /// the image's own size) and objects whose box covers over [`HUGE_OBJECT_SHARE`] of their image;
    /// counted once boxes are known (after repair: `object_sizes`).
    pub tiny: usize,
    pub huge: usize,
    /// Median box area as a share of its image's area.
    pub median_area_share: f64,
}

/// A box under this many pixels a side (its area under this squared) counts as tiny.
pub const TINY_OBJECT_SIDE: f64 = 16.0;
/// A box covering more than this share of its image counts as huge.
pub const HUGE_OBJECT_SHARE: f64 = 0.5;

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PerImage {
    pub min: usize,
    pub max: usize,
    pub mean: f64,
    pub images_without_annotations: usize,
}

/// The models the data calls for.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Recommendation {
    pub teachers: Vec<String>,
    pub student: String,
    pub reason: String,
}

pub fn inspect(dataset: &CocoDataset) -> DatasetSummary {
    let mut masks = MaskCounts::default();
    let (mut boxes_given, mut boxes_from_masks, mut crowd, mut keypoints) = (0, 0, 0, 0);
    let mut instances: HashMap<u64, usize> = HashMap::new();
    let mut images_of_class: HashMap<u64, HashSet<u64>> = HashMap::new();
    let mut per_image: HashMap<u64, usize> = HashMap::new();
    for annotation in &dataset.annotations {
        match annotation.mask() {
            Some(Segmentation::Polygons(_)) => masks.polygons += 1,
            Some(Segmentation::Rle(rle)) => match rle.counts {
                RleCounts::Uncompressed(_) => masks.rle_uncompressed += 1,
                RleCounts::Compressed(_) => masks.rle_compressed += 1,
            },
            None => {}
        }
        match (annotation.bbox.is_some(), annotation.mask().is_some()) {
            (true, _) => boxes_given += 1,
            (false, true) => boxes_from_masks += 1,
            (false, false) => {}
        }
        crowd += (annotation.iscrowd != 0) as usize;
        keypoints += annotation.has_keypoints() as usize;
        *instances.entry(annotation.category_id).or_default() += 1;
        images_of_class.entry(annotation.category_id).or_default().insert(annotation.image_id);
        *per_image.entry(annotation.image_id).or_default() += 1;
    }

    let class_ids = dataset.class_ids();
    let names: HashMap<u64, &str> = dataset.categories.iter().map(|c| (c.id, c.name.as_str())).collect();
    let class_mapping = class_ids
        .iter()
        .enumerate()
        .map(|(index, id)| ClassSummary {
            index,
            id: *id,
            name: names[id].to_string(),
            instances: instances.get(id).copied().unwrap_or(0),
            images: images_of_class.get(id).map_or(0, |s| s.len()),
            tiny: 0,
            huge: 0,
            median_area_share: 0.0,
        })
        .collect::<Vec<ClassSummary>>();
    let present: Vec<&ClassSummary> = class_mapping.iter().filter(|c| c.instances > 0).collect();
    let most = present.iter().max_by_key(|c| (c.instances, std::cmp::Reverse(c.index)));
    let least = present.iter().min_by_key(|c| (c.instances, c.index));
    let imbalance = match (most, least) {
        (Some(most), Some(least)) if present.len() >= 2 => Some(Imbalance {
            ratio: most.instances as f64 / least.instances as f64,
            most: most.name.clone(),
            most_instances: most.instances,
            least: least.name.clone(),
            least_instances: least.instances,
        }),
        _ => None,
    };

    let counts: Vec<usize> = dataset.images.iter().map(|i| per_image.get(&i.id).copied().unwrap_or(0)).collect();
    let annotations_per_image = PerImage {
        min: counts.iter().copied().min().unwrap_or(0),
        max: counts.iter().copied().max().unwrap_or(0),
        mean: if counts.is_empty() { 0.0 } else { counts.iter().sum::<usize>() as f64 / counts.len() as f64 },
        images_without_annotations: counts.iter().filter(|&&c| c == 0).count(),
    };

    DatasetSummary {
        images: dataset.images.len(),
        annotations: dataset.annotations.len(),
        num_classes: class_ids.len(),
        has_boxes: boxes_given + boxes_from_masks > 0,
        has_masks: masks.total() > 0,
        has_keypoints: keypoints > 0,
        boxes_given,
        boxes_from_masks,
        masks,
        crowd_annotations: crowd,
        class_mapping,
        annotations_per_image,
        imbalance,
    }
}

impl DatasetSummary {
    /// Fills each class's object-size figures from the boxes of `dataset` (run after `repair`, so
    /// that boxes derived from masks count).
    pub fn count_object_sizes(&mut self, dataset: &CocoDataset) {
        let index = dataset.class_index();
        let sizes: HashMap<u64, (u32, u32)> = dataset.images.iter().map(|i| (i.id, (i.width, i.height))).collect();
        let mut shares: Vec<Vec<f64>> = vec![Vec::new(); self.class_mapping.len()];
        for annotation in &dataset.annotations {
            let (Some(&class), Some([_, _, w, h]), Some(&(iw, ih))) =
                (index.get(&annotation.category_id), annotation.bbox, sizes.get(&annotation.image_id))
            else {
                continue;
            };
            let Some(summary) = self.class_mapping.get_mut(class) else { continue };
            let image_area = iw as f64 * ih as f64;
            if w * h < TINY_OBJECT_SIDE * TINY_OBJECT_SIDE {
                summary.tiny += 1;
            }
            if image_area > 0.0 && w * h > HUGE_OBJECT_SHARE * image_area {
                summary.huge += 1;
            }
            if image_area > 0.0 && (w * h).is_finite() {
                shares[class].push(w * h / image_area);
            }
        }
        for (summary, mut shares) in self.class_mapping.iter_mut().zip(shares) {
            shares.sort_by(f64::total_cmp);
            summary.median_area_share = shares.get(shares.len() / 2).copied().unwrap_or(0.0);
        }
    }
}

impl DatasetSummary {
    /// Teachers and student for this data.
    ///
    /// Every mask yields its box, so mask data trains the box teacher too. The student follows what
    /// the labels can teach: class-labelled masks → YOLOv8-seg; boxes only → YOLOv8; masks of a
    /// single class with no boxes of their own (class-agnostic "segment everything" data) → FastSAM,
    /// the YOLOv8-seg architecture pretrained for exactly that.
    pub fn recommendation(&self) -> Option<Recommendation> {
        let mut teachers = Vec::new();
        if self.has_boxes {
            teachers.push("GroundingDINO (text prompt -> boxes)".to_string());
        }
        if self.has_masks {
            teachers.push("SAM (box prompt -> masks)".to_string());
        }
        let (student, reason) = match (self.has_boxes, self.has_masks) {
            (_, true) if self.boxes_given == 0 && self.num_classes == 1 => {
                ("fastsam-s", "masks of a single class and no boxes of their own: class-agnostic segmentation")
            }
            (_, true) if self.boxes_given == 0 => {
                ("yolov8n-seg", "masks with classes (boxes derived from the masks): boxes + masks")
            }
            (_, true) => ("yolov8n-seg", "boxes and masks"),
            (true, false) => ("yolov8n", "boxes only"),
            (false, false) => return None,
        };
        Some(Recommendation { teachers, student: student.to_string(), reason: reason.to_string() })
    }
}
