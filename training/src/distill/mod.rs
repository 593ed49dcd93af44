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

use kiln_data::batch::{FeatureMap, SoftMask, TeacherSignal};
use kiln_data::coco::CocoDataset;
use kiln_data::mask::Rle;
use serde::{Deserialize, Serialize};

use crate::error::TrainError;

/// Loss weights and teacher-label settings; `configs/distill.yaml`, saved in each distilled run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// Weight of teacher-labelled instances in the YOLOv8 loss.
    pub teacher_labels: f32,
    /// Logit distillation at the anchors assigned to teacher labels, or `auto`: weighted by how much
    /// better than chance the teacher names the objects it finds on the labelled images.
    pub logit: ValueOrAuto,
    pub temperature: f32,
    /// Mask distillation inside each box.
    pub mask: f32,
    /// Feature distillation: a 1x1 projection of the student's P4 onto the teacher's features.
    pub feature: f32,
    /// Cells per side kept of a teacher's feature map (average-pooled down to it).
    pub feature_cells: u32,
    /// Least teacher score a label needs, or `auto`: the best F1 of the teacher on the labelled images.
    pub box_threshold: ValueOrAuto,
    /// GroundingDINO: least score of the phrase a box is named by (with `auto`, the chosen threshold).
    pub text_threshold: f32,
    pub nms_iou: f32,
    pub max_labels: usize,
    pub soft_mask_size: u32,
    pub empty_warning: f64,
}

/// A setting given as a number, or `auto` (YAML `auto`): chosen per run from how the teacher does
/// on the labelled images, since the right value differs by orders of magnitude between a strong
/// official checkpoint and a tiny base tuned on 32 images. The box threshold's `auto` is the score
/// of the teacher's best F1 there; the logit weight's is its naming accuracy above chance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueOrAuto {
    Auto,
    Value(f32),
}

/// The least score `auto` considers: labelling keeps everything above it, the choice filters after.
pub const AUTO_THRESHOLD_FLOOR: f32 = 0.05;

impl Serialize for ValueOrAuto {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ValueOrAuto::Auto => serializer.serialize_str("auto"),
            ValueOrAuto::Value(v) => serializer.serialize_f32(*v),
        }
    }
}

impl<'de> Deserialize<'de> for ValueOrAuto {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Value(f32),
            Word(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Value(v) => Ok(ValueOrAuto::Value(v)),
            Written::Word(w) if w.trim().eq_ignore_ascii_case("auto") => Ok(ValueOrAuto::Auto),
            Written::Word(w) => Err(serde::de::Error::custom(format!("{w:?} is neither a number nor auto"))),
        }
    }
}

impl std::fmt::Display for ValueOrAuto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ValueOrAuto::Auto => write!(f, "auto"),
            ValueOrAuto::Value(v) => write!(f, "{v}"),
        }
    }
}

impl DistillConfig {
    /// The box threshold the teacher labels at: the value, or for `auto` the floor it is chosen above.
    pub fn labelling_box_threshold(&self) -> f32 {
        match self.box_threshold {
            ValueOrAuto::Auto => AUTO_THRESHOLD_FLOOR,
            ValueOrAuto::Value(v) => v,
        }
    }

    /// The phrase threshold the teacher labels at (`auto` chooses one threshold for both scores).
    pub fn labelling_text_threshold(&self) -> f32 {
        match self.box_threshold {
            ValueOrAuto::Auto => AUTO_THRESHOLD_FLOOR,
            ValueOrAuto::Value(_) => self.text_threshold,
        }
    }

    /// These settings with the box threshold fixed at `threshold` (and, when it was `auto`, the
    /// phrase threshold too): what a run chose, for its messages.
    pub fn with_threshold(&self, threshold: f32) -> DistillConfig {
        let text_threshold = match self.box_threshold {
            ValueOrAuto::Auto => threshold,
            ValueOrAuto::Value(_) => self.text_threshold,
        };
        DistillConfig { box_threshold: ValueOrAuto::Value(threshold), text_threshold, ..*self }
    }

    /// The logit distillation's weight; `auto` must have been chosen first (`prepare_distillation`
    /// does, from the teacher's labels on the labelled images).
    pub fn logit_weight(&self) -> Result<f32, TrainError> {
        match self.logit {
            ValueOrAuto::Value(weight) => Ok(weight),
            ValueOrAuto::Auto => Err(TrainError::Config(
                "distill.logit auto is chosen from the teacher's labels when the teachers are prepared \
                 (prepare_distillation): give a number to train without them"
                    .into(),
            )),
        }
    }
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
    /// The teacher-labelled images.
    pub unlabelled: Option<TeacherLabelled>,
    /// Teacher signals (mask probabilities) on the labelled images' annotations, by id.
    pub labelled_signals: HashMap<u64, TeacherSignal>,
    /// The labelled images' teacher feature map files, by image id.
    pub labelled_features: HashMap<u64, PathBuf>,
    /// The teacher's feature channels, when it gives feature maps (feature distillation).
    pub feature_channels: Option<usize>,
    /// The logit distillation's weight as the run chose it (`logit: auto`); `None`: the config's.
    pub logit_weight: Option<f32>,
}

/// Images a teacher labelled: its labels as a COCO dataset, the directory of the images, and by
/// annotation id its signals, by image id its feature map files.
pub struct TeacherLabelled {
    pub dataset: CocoDataset,
    pub images_dir: PathBuf,
    pub signals: HashMap<u64, TeacherSignal>,
    pub features: HashMap<u64, PathBuf>,
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
    /// Whether [`Teacher::label_with_features`] gives a feature map of the image (SAM's image
    /// embedding, a student teacher's P4), when feature distillation is on.
    fn makes_features(&self) -> bool {
        false
    }
    /// [`Teacher::label`] and, for a teacher that makes features, its feature map of the image
    /// (each cell normalised over its channels), computed in the same pass.
    fn label_with_features(
        &self,
        image: &image::RgbImage,
        prompts: &[(usize, [f64; 4])],
    ) -> Result<(Vec<TeacherInstance>, Option<FeatureMap>), TrainError> {
        Ok((self.label(image, prompts)?, None))
    }
}

/// A teacher's `[1, C, H, W]` features covering `region` of the original image as a
/// [`FeatureMap`]: average-pooled to at most `max_cells` per side, then each cell normalised over
/// its channels (zero mean, unit variance: teachers' feature scales differ by orders of magnitude,
/// and the student's projection learns directions, not scales).
pub fn feature_map(
    features: burn::tensor::Tensor<4>,
    region: [f64; 4],
    max_cells: u32,
) -> Result<FeatureMap, TrainError> {
    let [_, channels, height, width] = features.dims();
    let values = kiln_models::device::read_floats(features)?;
    let cells = max_cells.max(1) as usize;
    let pool = height.div_ceil(cells).max(width.div_ceil(cells)).max(1);
    let (h, w) = (height.div_ceil(pool), width.div_ceil(pool));
    let mut data = vec![0f32; channels * h * w];
    for c in 0..channels {
        for y in 0..h {
            for x in 0..w {
                let (rows, cols) = (y * pool..((y + 1) * pool).min(height), x * pool..((x + 1) * pool).min(width));
                let count = (rows.len() * cols.len()) as f32;
                let sum: f32 = rows
                    .flat_map(|r| cols.clone().map(move |q| (r, q)))
                    .map(|(r, q)| values[(c * height + r) * width + q])
                    .sum();
                data[(c * h + y) * w + x] = sum / count;
            }
        }
    }
    // A partial last pooled cell stands for its whole share of the region.
    let region = [
        region[0],
        region[1],
        region[0] + (region[2] - region[0]) * (w * pool) as f64 / width as f64,
        region[1] + (region[3] - region[1]) * (h * pool) as f64 / height as f64,
    ];
    for cell in 0..h * w {
        let mean = (0..channels).map(|c| data[c * h * w + cell]).sum::<f32>() / channels as f32;
        let variance = (0..channels).map(|c| (data[c * h * w + cell] - mean).powi(2)).sum::<f32>() / channels as f32;
        let scale = 1.0 / (variance + 1e-5).sqrt();
        for c in 0..channels {
            let v = &mut data[c * h * w + cell];
            *v = (*v - mean) * scale;
        }
    }
    Ok(FeatureMap { channels: channels as u32, width: w as u32, height: h as u32, region, data })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_threshold_is_a_score_or_auto() {
        let default = DistillConfig::default();
        // What `--set distill.box_threshold=VALUE` does (commands::apply_settings): the YAML value in.
        let with = |value: &str| -> Result<DistillConfig, String> {
            let mut tree = serde_yaml::to_value(default).unwrap();
            tree["box_threshold"] = serde_yaml::from_str(value).unwrap();
            serde_yaml::from_value(tree).map_err(|e| e.to_string())
        };
        assert_eq!(default.box_threshold, ValueOrAuto::Value(0.25));
        assert_eq!((default.labelling_box_threshold(), default.labelling_text_threshold()), (0.25, 0.25));
        let auto = with("auto").unwrap();
        assert_eq!(auto.box_threshold, ValueOrAuto::Auto);
        assert_eq!(auto.labelling_box_threshold(), AUTO_THRESHOLD_FLOOR);
        assert_eq!(auto.labelling_text_threshold(), AUTO_THRESHOLD_FLOOR);
        let chosen = auto.with_threshold(0.4);
        assert_eq!((chosen.box_threshold, chosen.text_threshold), (ValueOrAuto::Value(0.4), 0.4));
        assert_eq!(default.with_threshold(0.4).text_threshold, 0.25, "a given phrase threshold stays");
        let yaml = serde_yaml::to_string(&auto).unwrap();
        assert!(yaml.contains("box_threshold: auto"), "{yaml}");
        assert_eq!(serde_yaml::from_str::<DistillConfig>(&yaml).unwrap(), auto);
        let set = with("0.1").unwrap();
        assert_eq!(set.box_threshold, ValueOrAuto::Value(0.1));
        let logit = |value: &str| -> DistillConfig {
            let mut tree = serde_yaml::to_value(default).unwrap();
            tree["logit"] = serde_yaml::from_str(value).unwrap();
            serde_yaml::from_value(tree).unwrap()
        };
        assert_eq!(default.logit, ValueOrAuto::Auto);
        assert!(default.logit_weight().unwrap_err().to_string().contains("auto"));
        assert_eq!(logit("0").logit_weight().unwrap(), 0.0);
        assert_eq!(logit("0.5").logit_weight().unwrap(), 0.5);
        let error = with("often").unwrap_err();
        assert!(error.contains("often") && error.contains("auto"), "{error}");
    }
}
