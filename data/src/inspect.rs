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
}

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
        })
        .collect();

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
