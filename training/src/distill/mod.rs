//! Distillation: prompted teachers (GroundingDINO: class names → boxes; SAM: boxes → masks; or a
//! trained kiln student) label images once, and the prompt-free student learns from those labels
//! beside the ground truth, as a task on the same engine as every other run (the student run).
//!
//! - [`Teacher`]: the interface every teacher is (image → boxes, per-class probabilities, optional
//!   masks and their probabilities); `teacher` opens one from a directory.
//! - `labels`: the labelling pass (streamed, cached on disk by image and teacher hash, resumable),
//!   `teacher_labels.json` and its picture grid, and the teacher-labelled training set.
//! - The losses live with the YOLOv8 loss (`crate::loss::distill`), switched on by what the
//!   batch carries.

pub mod labels;
pub mod prepare;
pub mod teacher;

use std::collections::HashMap;
use std::path::PathBuf;

use kiln_data::batch::{SoftMask, TeacherSignal};
use kiln_data::coco::CocoDataset;
use kiln_data::mask::Rle;
use serde::{Deserialize, Serialize};

use crate::error::TrainError;

/// Loss weights and teacher-label settings; `configs/distill.yaml`, saved in each distilled run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// Weight of teacher-labelled instances in the YOLOv8 loss.
    pub teacher_labels: f32,
    /// Logit distillation at the anchors assigned to teacher labels.
    pub logit: f32,
    pub temperature: f32,
    /// Mask distillation inside each box.
    pub mask: f32,
    pub box_threshold: f32,
    pub text_threshold: f32,
    pub nms_iou: f32,
    pub max_labels: usize,
    pub soft_mask_size: u32,
    pub empty_warning: f64,
}

/// kiln's defaults for distillation (`configs/distill.yaml`, built in).
pub const DEFAULT_DISTILL_CONFIG: &str = include_str!("../../../configs/distill.yaml");

impl Default for DistillConfig {
    fn default() -> Self {
        serde_yaml::from_str(DEFAULT_DISTILL_CONFIG).expect("configs/distill.yaml parses")
    }
}

/// What teachers add to a student run.
pub struct TeacherData {
    /// Teacher-labelled images: their dataset (teacher labels as annotations), its images
    /// directory, and the teacher's signals by annotation id.
    pub unlabelled: Option<(CocoDataset, PathBuf, HashMap<u64, TeacherSignal>)>,
    /// Teacher signals (mask probabilities) on the labelled images' annotations, by id.
    pub labelled_signals: HashMap<u64, TeacherSignal>,
}

/// One object a teacher found (or segmented) in an image, in the image's original pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherInstance {
    /// The most probable class (index into the data's classes).
    pub class: usize,
    /// The teacher's probability per class; its largest is `score`.
    pub class_probs: Vec<f32>,
    pub score: f32,
    /// `x1, y1, x2, y2`.
    pub bbox: [f64; 4],
    /// The binarised mask at the image's size (COCO RLE), for a teacher that makes masks.
    #[serde(default, with = "rle_serde")]
    pub mask: Option<Rle>,
    /// The mask's probabilities around the box.
    #[serde(default)]
    pub soft_mask: Option<SoftMask>,
}

/// A prompted teacher (or a trained student) seen as one thing: image in, objects out.
pub trait Teacher {
    /// In words, for reports and `distillation_config.yaml` (models, adapters, base weights).
    fn describe(&self) -> String;
    /// A hash of everything that decides its labels (weights, adapters, classes, thresholds): the
    /// key of its label cache.
    fn fingerprint(&self) -> String;
    /// The classes it labels, in the data's class-index order.
    fn classes(&self) -> &[String];
    /// Whether it finds objects by itself; a teacher that does not (SAM alone) only segments the
    /// boxes it is given, so it labels nothing on unlabelled images.
    fn finds_objects(&self) -> bool;
    fn makes_masks(&self) -> bool;
    /// Whether it can segment boxes it is given (SAM): then it also gives the labelled images'
    /// ground truth its mask probabilities.
    fn segments_boxes(&self) -> bool;
    /// The objects of one image at its original size. Without `prompts` (an unlabelled image) it
    /// finds them (nothing when it cannot find objects). With `prompts` (a labelled image's
    /// ground-truth `(class, box)`) a teacher that makes masks segments exactly those boxes, one
    /// instance per prompt in their order (class probabilities one-hot, score 1); one that does not
    /// make masks returns nothing, since the ground truth already says more than it could.
    fn label(&self, image: &image::RgbImage, prompts: &[(usize, [f64; 4])])
    -> Result<Vec<TeacherInstance>, TrainError>;
}

/// `Option<Rle>` as COCO's compressed RLE (`{"size": [h, w], "counts": "..."}`).
mod rle_serde {
    use kiln_data::mask::Rle;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Compressed {
        size: [u32; 2],
        counts: String,
    }

    pub fn serialize<S: Serializer>(value: &Option<Rle>, serializer: S) -> Result<S::Ok, S::Error> {
        value
            .as_ref()
            .map(|rle| Compressed { size: [rle.height, rle.width], counts: rle.to_compressed() })
            .serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Rle>, D::Error> {
        let value = Option::<Compressed>::deserialize(deserializer)?;
        value
            .map(|c| Rle::from_compressed(&c.counts, c.size[0], c.size[1]).map_err(serde::de::Error::custom))
            .transpose()
    }
}
