//! The teachers of a distillation, opened from a directory by [`open_teacher`]: an experiment's
//! adapted GroundingDINO and/or SAM ([`GroundedSam`]: class names → boxes → masks, the Grounded-SAM
//! chain, or either half alone), or a trained kiln student ([`StudentTeacher`]) teaching a smaller one.
//! What runs is decided by the weights present, not by flags.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;
use kiln_data::batch::{FeatureMap, SoftMask};
use kiln_data::mask::{BinaryMask, Rle};
use kiln_models::device::read_floats;
use kiln_models::grounding_dino::postprocess::{PostprocessOptions, grounded_boxes};
use kiln_models::grounding_dino::{GroundingDino, ImageBatch, TextBatch, prepare_pixels};
use kiln_models::lora::{ADAPTER_WEIGHTS, LoraError, file_sha256};
use kiln_models::sam::{MASK_THRESHOLD, Sam, resize_box};
use kiln_models::yolo::predict::PredictOptions;
use kiln_models::{Detector, Task};

use super::labels::class_aware_nms;
use super::{DistillConfig, Teacher, TeacherInstance};
use crate::error::{AtPath, TrainError};
use crate::teacher::grounding_dino::{self, ClassCaption, GroundingDinoTeacherConfig, image_row, load_tokenizer};
use crate::teacher::sam::{self, SamTeacherConfig};
use crate::teacher::{FULL_WEIGHTS, TeacherConfig, merge_adapter};

/// Part of every fingerprint: a change of what a label holds or how it is computed bumps it, so
/// caches of older labels are not read as new ones.
const LABEL_FORMAT: &str = "kiln distill labels v1";

/// The teachers' settings file in a `teachers/` directory.
const TEACHER_CONFIG: &str = "teacher_config.yaml";

/// A trained student's weights in its run directory.
const STUDENT_WEIGHTS: &str = "weights/best.safetensors";

/// Boxes SAM's decoder segments in one pass (and whose masks are held at the original size at
/// once): bounds memory on large images with many boxes.
const BOXES_PER_PASS: usize = 8;

/// The soft mask covers the box enlarged by this fraction of its side on each side.
const SOFT_MASK_MARGIN: f64 = 0.1;

/// Base weights replacing the ones the adapters recorded (`--gdino-weights`, `--sam-weights`).
#[derive(Debug, Clone, Default)]
pub struct TeacherWeights {
    pub grounding_dino: Option<PathBuf>,
    pub sam: Option<PathBuf>,
}

/// Opens the teacher in `dir`: an experiment of `kiln train-teacher` (`dir/teachers/`), a
/// `teachers/` directory itself, or a trained kiln student (its run directory or weights file).
/// The teachers present decide what runs: GroundingDINO alone, SAM alone, or the chain.
pub fn open_teacher(
    dir: &Path,
    classes: &[String],
    config: &DistillConfig,
    weights: &TeacherWeights,
    device: &Device,
) -> Result<Box<dyn Teacher>, TrainError> {
    check_settings(config)?;
    let teachers = [dir.join("teachers"), dir.to_path_buf()].into_iter().find(|d| d.join(TEACHER_CONFIG).is_file());
    if let Some(teachers) = teachers {
        return Ok(Box::new(GroundedSam::open(&teachers, classes, config, weights, device)?));
    }
    let student = if dir.is_file() { Some(dir.to_path_buf()) } else { Some(dir.join(STUDENT_WEIGHTS)) };
    if let Some(student) = student.filter(|p| p.is_file()) {
        if weights.grounding_dino.is_some() || weights.sam.is_some() {
            return Err(TrainError::Config(format!(
                "{} is a trained student: --gdino-weights and --sam-weights apply to an experiment's prompted \
                 teachers only",
                student.display()
            )));
        }
        return Ok(Box::new(StudentTeacher::open(&student, classes, config, device)?));
    }
    if !dir.exists() {
        return Err(TrainError::Config(format!(
            "{}: no such directory or file; --teachers takes an experiment of `kiln train-teacher` (or its \
             teachers/ directory) or a trained kiln student (run directory or .safetensors)",
            dir.display()
        )));
    }
    Err(TrainError::Config(format!(
        "{}: no teachers here: neither teachers/{TEACHER_CONFIG} (run `kiln train-teacher --output {}` first) nor a \
         trained student's {STUDENT_WEIGHTS} (run `kiln train-student`)",
        dir.display(),
        dir.display()
    )))
}

/// The label settings must make sense before hours of labelling.
fn check_settings(config: &DistillConfig) -> Result<(), TrainError> {
    let unit = |v: f32| (0.0..=1.0).contains(&v);
    let box_threshold = config.labelling_box_threshold();
    if !(unit(box_threshold) && unit(config.text_threshold) && config.nms_iou > 0.0 && config.nms_iou <= 1.0) {
        return Err(TrainError::Config(format!(
            "distill.box_threshold ({}), distill.text_threshold ({}) and distill.nms_iou ({}) must lie in [0, 1] \
             (nms_iou above 0)",
            config.box_threshold, config.text_threshold, config.nms_iou
        )));
    }
    if config.max_labels == 0 {
        return Err(TrainError::Config("distill.max_labels must be at least 1".into()));
    }
    Ok(())
}

/// GroundingDINO (class names → boxes) and SAM (boxes → masks), either or both, as `kiln
/// train-teacher` adapted them, merged for inference: the Grounded-SAM chain.
pub struct GroundedSam {
    classes: Vec<String>,
    config: DistillConfig,
    grounding_dino: Option<GroundingPart>,
    sam: Option<Sam>,
    device: Device,
    description: String,
    fingerprint: String,
}

/// GroundingDINO ready to label: the merged model and the caption of the data's class names.
struct GroundingPart {
    model: GroundingDino,
    caption: ClassCaption,
    special_ids: Vec<u32>,
    image_size: usize,
    max_size: usize,
}

/// A teacher model opened from its directory, with what describes it and what keys its labels.
struct Opened<T> {
    model: T,
    description: String,
    key: String,
}

/// A teacher's trained weights in a `teachers/` directory.
enum Trained {
    /// `NAME_lora/`: a LoRA adapter over the base `teacher_config.yaml` records.
    Adapter(PathBuf),
    /// `NAME_full/`: the whole fine-tuned model.
    Full(PathBuf),
}

impl Trained {
    /// The weights `kiln train-teacher` left for teacher `name` (`grounding_dino`, `sam`); an
    /// adapter first when both are there.
    fn find(teachers: &Path, name: &str) -> Option<Self> {
        let lora = teachers.join(format!("{name}_lora"));
        if lora.join(ADAPTER_WEIGHTS).is_file() {
            return Some(Self::Adapter(lora));
        }
        let full = teachers.join(format!("{name}_full"));
        full.join(FULL_WEIGHTS).is_file().then_some(Self::Full(full))
    }

    fn dir(&self) -> &Path {
        match self {
            Self::Adapter(dir) | Self::Full(dir) => dir,
        }
    }
}

impl GroundedSam {
    /// Opens the teachers of a `teachers/` directory (its `teacher_config.yaml` and the adapters or
    /// fully fine-tuned models present), for the data's `classes`.
    pub fn open(
        teachers: &Path,
        classes: &[String],
        config: &DistillConfig,
        weights: &TeacherWeights,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let config_path = teachers.join(TEACHER_CONFIG);
        let text = std::fs::read_to_string(&config_path).at(&config_path)?;
        let recorded: TeacherConfig = serde_yaml::from_str(&text)
            .map_err(|e| TrainError::Config(format!("{}: not a teacher config: {e}", config_path.display())))?;
        if recorded.classes != classes {
            return Err(TrainError::Config(format!(
                "the teachers in {} were trained on classes {:?}, the data has {:?}: distil with teachers trained \
                 on this data's classes",
                teachers.display(),
                recorded.classes,
                classes
            )));
        }
        let grounding_trained = Trained::find(teachers, "grounding_dino");
        let sam_trained = Trained::find(teachers, "sam");
        if grounding_trained.is_none() && sam_trained.is_none() {
            return Err(TrainError::Config(format!(
                "{}: no trained teacher (no grounding_dino_lora/ or sam_lora/ with {ADAPTER_WEIGHTS}, no \
                 grounding_dino_full/ or sam_full/ with {FULL_WEIGHTS}): run `kiln train-teacher` first, or let it \
                 finish its first epoch",
                teachers.display()
            )));
        }
        for (given, present, flag, name) in [
            (weights.grounding_dino.is_some(), grounding_trained.is_some(), "--gdino-weights", "GroundingDINO"),
            (weights.sam.is_some(), sam_trained.is_some(), "--sam-weights", "SAM"),
        ] {
            if given && !present {
                return Err(TrainError::Config(format!(
                    "{flag} was given but {} holds no trained {name} teacher",
                    teachers.display()
                )));
            }
        }
        let missing_section = |section: &str| {
            TrainError::Config(format!(
                "{}: no `{section}` section, yet {}'s weights are beside it",
                config_path.display(),
                section
            ))
        };
        let grounding = match &grounding_trained {
            Some(trained) => {
                let section = recorded.grounding_dino.as_ref().ok_or_else(|| missing_section("grounding_dino"))?;
                Some(open_grounding_dino(trained, section, classes, weights.grounding_dino.as_deref(), device)?)
            }
            None => None,
        };
        let sam = match &sam_trained {
            Some(trained) => {
                let section = recorded.sam.as_ref().ok_or_else(|| missing_section("sam"))?;
                Some(open_sam(trained, section, weights.sam.as_deref(), device)?)
            }
            None => None,
        };
        let description =
            [grounding.as_ref().map(|g| g.description.clone()), sam.as_ref().map(|s| s.description.clone())]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" -> ");
        let fingerprint = fnv1a_hex(
            &[
                LABEL_FORMAT.to_string(),
                "kind grounded_sam".to_string(),
                grounding.as_ref().map_or_else(|| "grounding_dino none".to_string(), |g| g.key.clone()),
                sam.as_ref().map_or_else(|| "sam none".to_string(), |s| s.key.clone()),
                format!("classes {classes:?}"),
                format!(
                    "box_threshold {:?} text_threshold {:?} nms_iou {:?} max_labels {} soft_mask_size {}",
                    config.labelling_box_threshold(),
                    config.labelling_text_threshold(),
                    config.nms_iou,
                    config.max_labels,
                    config.soft_mask_size
                ),
                feature_key(config),
            ]
            .join("\n"),
        );
        Ok(Self {
            classes: classes.to_vec(),
            config: *config,
            grounding_dino: grounding.map(|g| g.model),
            sam: sam.map(|s| s.model),
            device: device.clone(),
            description,
            fingerprint,
        })
    }

    /// GroundingDINO's boxes of one image: per-class probabilities (each phrase's best token),
    /// scored by the best class, clipped to the image, class-aware NMS, best `max_labels`.
    /// And with `features`, the encoder memory's finest level (stride 8 of the resized image) as
    /// the image's feature map.
    fn find(
        &self,
        grounding: &GroundingPart,
        image: &RgbImage,
        features: bool,
    ) -> Result<(Vec<TeacherInstance>, Option<FeatureMap>), TrainError> {
        let (pixels, size) = prepare_pixels(image, grounding.image_size, grounding.max_size);
        let images = ImageBatch::from_planar(&[(pixels, size)], &self.device);
        let text = TextBatch::new(
            &[&grounding.caption.encoded],
            &grounding.special_ids,
            grounding.model.max_text_len,
            &self.device,
        );
        let output = grounding.model.forward(&images, &text);
        let prediction = output.prediction();
        let options = PostprocessOptions {
            box_threshold: self.config.labelling_box_threshold(),
            text_threshold: self.config.labelling_text_threshold(),
        };
        let found = grounded_boxes(
            image_row(&prediction.logits, 0),
            image_row(&prediction.boxes, 0),
            &grounding.caption.class_tokens,
            (image.height() as usize, image.width() as usize),
            &options,
        )?;
        let (w, h) = (image.width() as f64, image.height() as f64);
        let instances = found
            .into_iter()
            .filter_map(|found| {
                let bbox = clip_box(found.bbox.map(|v| v as f64), w, h)?;
                let (class, score) = best_class(&found.class_scores)?;
                Some(TeacherInstance {
                    class,
                    class_probs: found.class_scores,
                    score,
                    bbox,
                    mask: None,
                    soft_mask: None,
                })
            })
            .collect();
        let feature_map = match (features, output.memory_shapes.first()) {
            (true, Some(&(rows, columns))) => {
                let [_, _, d] = output.memory.dims();
                let level = output.memory.clone().narrow(1, 0, rows * columns).reshape([1, rows, columns, d]);
                // The grid's cells are 8 resized pixels; the resized image is the original scaled.
                let (resized_h, resized_w) = size;
                let region = [
                    0.0,
                    0.0,
                    (columns * 8) as f64 * image.width() as f64 / resized_w as f64,
                    (rows * 8) as f64 * image.height() as f64 / resized_h as f64,
                ];
                Some(super::feature_map(level.permute([0, 3, 1, 2]), region, self.config.feature_cells)?)
            }
            _ => None,
        };
        Ok((class_aware_nms(instances, self.config.nms_iou, self.config.max_labels), feature_map))
    }

    /// SAM's mask of each box (original pixels) of one image, the image embedded once: the
    /// binarised mask at the image's size (none when empty) and its probabilities around the box.
    fn segment_embedded(
        &self,
        sam: &Sam,
        embedded: &Embedded,
        boxes: &[[f64; 4]],
    ) -> Result<Vec<(Option<Rle>, Option<SoftMask>)>, TrainError> {
        let (h, w) = embedded.original_size;
        let mut masks = Vec::with_capacity(boxes.len());
        for chunk in boxes.chunks(BOXES_PER_PASS) {
            let resized: Vec<f32> = chunk
                .iter()
                .flat_map(|b| resize_box(b.map(|v| v as f32), embedded.original_size, sam.image_size()))
                .collect();
            let prompt = Tensor::from_data(TensorData::new(resized, [chunk.len(), 4]), &self.device);
            let prediction = sam.predict_boxes(embedded.embedding.clone(), prompt, false);
            let logits =
                read_floats(sam.postprocess_masks(prediction.masks, embedded.input_size, embedded.original_size))?;
            for (plane, bbox) in logits.chunks_exact(h * w).zip(chunk) {
                let binary = BinaryMask {
                    width: w as u32,
                    height: h as u32,
                    data: plane.iter().map(|&v| u8::from(v > MASK_THRESHOLD)).collect(),
                };
                let mask = (binary.area() > 0).then(|| Rle::encode(&binary));
                masks.push((mask, soft_mask(plane, (h, w), *bbox, self.config.soft_mask_size)));
            }
        }
        Ok(masks)
    }

    /// The labels of one image, and SAM's image embedding as its feature map when `features`.
    fn label_image(
        &self,
        image: &RgbImage,
        prompts: &[(usize, [f64; 4])],
        features: bool,
    ) -> Result<(Vec<TeacherInstance>, Option<FeatureMap>), TrainError> {
        if image.width() == 0 || image.height() == 0 {
            return Ok((Vec::new(), None));
        }
        // SAM embeds the image once for its masks and its feature map.
        let embedded = match &self.sam {
            Some(sam) if features || !prompts.is_empty() || self.grounding_dino.is_some() => {
                Some(Embedded::new(sam, image, &self.device))
            }
            _ => None,
        };
        let feature_map = match (&embedded, features) {
            (Some(embedded), true) => {
                // SAM pads the resized image at the bottom and right to a square: the embedding
                // covers the long side's square of the original image.
                let side = image.width().max(image.height()) as f64;
                Some(super::feature_map(embedded.embedding.clone(), [0.0, 0.0, side, side], self.config.feature_cells)?)
            }
            _ => None,
        };
        if !prompts.is_empty() {
            let (Some(sam), Some(embedded)) = (&self.sam, &embedded) else {
                // GroundingDINO alone segments nothing; its encoder memory is the feature map.
                let memory = match &self.grounding_dino {
                    Some(grounding) if features => self.find(grounding, image, true)?.1,
                    _ => None,
                };
                return Ok((Vec::new(), feature_map.or(memory)));
            };
            let boxes: Vec<[f64; 4]> = prompts.iter().map(|&(_, bbox)| bbox).collect();
            let masks = self.segment_embedded(sam, embedded, &boxes)?;
            let instances = prompts
                .iter()
                .zip(masks)
                .map(|(&(class, bbox), (mask, soft_mask))| TeacherInstance {
                    class,
                    class_probs: one_hot(class, self.classes.len()),
                    score: 1.0,
                    bbox,
                    mask,
                    soft_mask,
                })
                .collect();
            return Ok((instances, feature_map));
        }
        let Some(grounding) = &self.grounding_dino else { return Ok((Vec::new(), feature_map)) };
        // Without SAM, GroundingDINO's encoder memory is the feature map.
        let (mut instances, memory) = self.find(grounding, image, features && self.sam.is_none())?;
        let feature_map = feature_map.or(memory);
        if let (Some(sam), Some(embedded)) = (&self.sam, &embedded) {
            let boxes: Vec<[f64; 4]> = instances.iter().map(|i| i.bbox).collect();
            for (instance, (mask, soft_mask)) in instances.iter_mut().zip(self.segment_embedded(sam, embedded, &boxes)?)
            {
                instance.mask = mask;
                instance.soft_mask = soft_mask;
            }
            // A box SAM finds no object in is dropped: a segmentation student would learn an
            // empty mask there.
            instances.retain(|i| i.mask.is_some());
        }
        Ok((instances, feature_map))
    }
}

/// An image prepared for SAM and embedded once.
struct Embedded {
    embedding: Tensor<4>,
    input_size: (usize, usize),
    original_size: (usize, usize),
}

impl Embedded {
    fn new(sam: &Sam, image: &RgbImage, device: &Device) -> Self {
        let input = sam.preprocess(image, device);
        Self { input_size: input.input_size, original_size: input.original_size, embedding: sam.embed(input.pixels) }
    }
}

impl Teacher for GroundedSam {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn finds_objects(&self) -> bool {
        self.grounding_dino.is_some()
    }

    fn makes_masks(&self) -> bool {
        self.sam.is_some()
    }

    fn segments_boxes(&self) -> bool {
        self.sam.is_some()
    }

    fn label(&self, image: &RgbImage, prompts: &[(usize, [f64; 4])]) -> Result<Vec<TeacherInstance>, TrainError> {
        Ok(self.label_image(image, prompts, false)?.0)
    }

    fn makes_features(&self) -> bool {
        self.config.feature > 0.0
    }

    fn label_with_features(
        &self,
        image: &RgbImage,
        prompts: &[(usize, [f64; 4])],
    ) -> Result<(Vec<TeacherInstance>, Option<FeatureMap>), TrainError> {
        self.label_image(image, prompts, self.makes_features())
    }
}

/// GroundingDINO of `teacher_config.yaml`'s `section` with its trained weights merged in.
fn open_grounding_dino(
    trained: &Trained,
    section: &GroundingDinoTeacherConfig,
    classes: &[String],
    base_override: Option<&Path>,
    device: &Device,
) -> Result<Opened<GroundingPart>, TrainError> {
    const FLAG: &str = "--gdino-weights";
    let mut config = section.clone();
    let (weights, adapter) = resolve_weights(trained, config.weights.take(), base_override, FLAG, "GroundingDINO")?;
    config.weights = weights;
    let recorded = "put it back or correct teacher_config.yaml";
    require_file(config.text_encoder.as_deref(), "GroundingDINO text encoder", recorded)?;
    require_file(config.tokenizer.as_deref(), "GroundingDINO tokenizer", recorded)?;
    if config.lacks_weights() {
        return Err(TrainError::Config(format!(
            "GroundingDINO {} in {}: teacher_config.yaml records no base weights: pass {FLAG}",
            config.model,
            trained.dir().display()
        )));
    }
    let base_hash = grounding_dino::base_hash(&config)?;
    let base = grounding_dino::load_base(&config, device, false)?;
    let (model, _) = merge_adapter(base, adapter, &grounding_dino::base_name(&config), || Ok(base_hash.clone()))
        .map_err(|e| in_adapter(e, trained.dir(), FLAG))?;
    let tokenizer = load_tokenizer(&config)?;
    let caption = ClassCaption::new(&tokenizer, classes, model.max_text_len)?;
    let tokenizer_hash = match &config.tokenizer {
        Some(path) => file_sha256(path)?,
        None => "bert-base-uncased (built in)".to_string(),
    };
    let (trained_hash, how) = trained_weights(trained, &base_hash, config.weights.as_deref(), config.seed)?;
    Ok(Opened {
        description: format!("GroundingDINO {} {how}", config.model),
        key: format!(
            "grounding_dino {} base {base_hash} trained {trained_hash} tokenizer {tokenizer_hash} size {} {}",
            config.model, config.image_size, config.max_size
        ),
        model: GroundingPart {
            model,
            caption,
            special_ids: tokenizer.special_ids.clone(),
            image_size: config.image_size,
            max_size: config.max_size,
        },
    })
}

/// SAM of `teacher_config.yaml`'s `section` with its trained weights merged in.
fn open_sam(
    trained: &Trained,
    section: &SamTeacherConfig,
    base_override: Option<&Path>,
    device: &Device,
) -> Result<Opened<Sam>, TrainError> {
    const FLAG: &str = "--sam-weights";
    let mut config = section.clone();
    let (weights, adapter) = resolve_weights(trained, config.weights.take(), base_override, FLAG, "SAM")?;
    config.weights = weights;
    if config.lacks_weights() {
        return Err(TrainError::Config(format!(
            "SAM {} in {}: teacher_config.yaml records no base weights: pass {FLAG}",
            config.model,
            trained.dir().display()
        )));
    }
    let base_hash = sam::base_hash(&config)?;
    let base = sam::load_base(&config, device, false)?;
    let (model, _) = merge_adapter(base, adapter, &sam::base_name(&config), || Ok(base_hash.clone()))
        .map_err(|e| in_adapter(e, trained.dir(), FLAG))?;
    let (trained_hash, how) = trained_weights(trained, &base_hash, config.weights.as_deref(), config.seed)?;
    Ok(Opened {
        description: format!("SAM {} {how}", config.model),
        key: format!("sam {} base {base_hash} trained {trained_hash}", config.model),
        model,
    })
}

/// The hash of a teacher's trained weights (the adapter file's SHA-256, or for a full fine-tuning
/// the base hash, which is then the model's) and how it was trained, in words.
fn trained_weights(
    trained: &Trained,
    base_hash: &str,
    weights: Option<&Path>,
    seed: u64,
) -> Result<(String, String), TrainError> {
    Ok(match trained {
        Trained::Adapter(dir) => {
            let base = match weights {
                Some(path) => path.display().to_string(),
                None => format!("random init, seed {seed}"),
            };
            (file_sha256(&dir.join(ADAPTER_WEIGHTS))?, format!("+ LoRA adapter {} (base {base})", dir.display()))
        }
        Trained::Full(dir) => {
            (base_hash.to_string(), format!("fully fine-tuned ({})", dir.join(FULL_WEIGHTS).display()))
        }
    })
}

/// A full fine-tuning's model file is the teacher: base weights have no part in it.
/// A teacher's weights file and adapter directory: for an adapter, the base it recorded (or
/// `base_override`, the `flag` given) under the adapter; for a full fine-tuning, its own model file,
/// which no flag replaces. The weights file must exist.
fn resolve_weights<'a>(
    trained: &'a Trained,
    recorded: Option<PathBuf>,
    base_override: Option<&Path>,
    flag: &str,
    what: &str,
) -> Result<(Option<PathBuf>, Option<&'a Path>), TrainError> {
    let (weights, adapter) = match trained {
        Trained::Adapter(dir) => (base_override.map(Path::to_path_buf).or(recorded), Some(dir.as_path())),
        Trained::Full(dir) => {
            if base_override.is_some() {
                return Err(TrainError::Config(format!(
                    "{} is a full fine-tuning (its {FULL_WEIGHTS} is the whole model): {flag} does not apply",
                    dir.display()
                )));
            }
            (Some(dir.join(FULL_WEIGHTS)), None)
        }
    };
    require_file(weights.as_deref(), &format!("{what} base weights"), &format!("pass {flag} with the file"))?;
    Ok((weights, adapter))
}

fn require_file(path: Option<&Path>, what: &str, remedy: &str) -> Result<(), TrainError> {
    match path {
        Some(path) if !path.is_file() => {
            Err(TrainError::Config(format!("{}: no such file ({what}); {remedy}", path.display())))
        }
        _ => Ok(()),
    }
}

/// An adapter's error, naming the adapter directory (and, for a wrong base, the flag that gives
/// the right one).
fn in_adapter(error: TrainError, dir: &Path, flag: &str) -> TrainError {
    match error {
        TrainError::Adapter(e @ LoraError::WrongBase { .. }) => {
            TrainError::Config(format!("the adapter in {}: {e} (with {flag})", dir.display()))
        }
        TrainError::Adapter(e) => TrainError::Config(format!("the adapter in {}: {e}", dir.display())),
        other => other,
    }
}

/// A trained kiln student as a teacher (of a smaller student): its detections, their per-class
/// scores, and its masks when it segments. It finds objects; given boxes it has nothing to add.
pub struct StudentTeacher {
    detector: Detector,
    options: PredictOptions,
    features: bool,
    feature_cells: u32,
    segments: bool,
    description: String,
    fingerprint: String,
}

impl StudentTeacher {
    /// Opens a student (run directory or weights file) as a teacher of `classes`: detections above
    /// `box_threshold`, class-aware NMS at `nms_iou`, at most `max_labels`.
    pub fn open(path: &Path, classes: &[String], config: &DistillConfig, device: &Device) -> Result<Self, TrainError> {
        let detector = Detector::load(path, device)?;
        let info = detector.info().clone();
        if info.classes != classes {
            return Err(TrainError::Config(format!(
                "the student {} was trained on classes {:?}, the data has {:?}: distil with a student of this \
                 data's classes",
                info.weights.display(),
                info.classes,
                classes
            )));
        }
        let options = PredictOptions {
            conf: config.labelling_box_threshold(),
            iou: config.nms_iou,
            max_det: config.max_labels,
            ..PredictOptions::default()
        };
        let detector = detector.with_options(options);
        let weights_hash = file_sha256(&info.weights)?;
        let fingerprint = fnv1a_hex(
            &[
                LABEL_FORMAT.to_string(),
                "kind student".to_string(),
                format!("student {} weights {weights_hash} imgsz {}", info.config, detector.imgsz),
                format!("classes {classes:?}"),
                format!(
                    "box_threshold {:?} nms_iou {:?} max_labels {}",
                    config.labelling_box_threshold(),
                    config.nms_iou,
                    config.max_labels
                ),
                feature_key(config),
            ]
            .join("\n"),
        );
        Ok(Self {
            options,
            features: config.feature > 0.0,
            feature_cells: config.feature_cells,
            segments: info.config.task == Task::Segment,
            description: format!("kiln student {} ({})", info.config, info.weights.display()),
            fingerprint,
            detector,
        })
    }
}

impl Teacher for StudentTeacher {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    fn classes(&self) -> &[String] {
        self.detector.classes()
    }

    fn finds_objects(&self) -> bool {
        true
    }

    fn makes_masks(&self) -> bool {
        self.segments
    }

    fn segments_boxes(&self) -> bool {
        false
    }

    fn label(&self, image: &RgbImage, prompts: &[(usize, [f64; 4])]) -> Result<Vec<TeacherInstance>, TrainError> {
        Ok(self.label_image(image, prompts, false)?.0)
    }

    fn makes_features(&self) -> bool {
        self.features
    }

    fn label_with_features(
        &self,
        image: &RgbImage,
        prompts: &[(usize, [f64; 4])],
    ) -> Result<(Vec<TeacherInstance>, Option<FeatureMap>), TrainError> {
        self.label_image(image, prompts, self.features)
    }
}

impl StudentTeacher {
    /// The detections of one image (none for a prompted one: a student cannot segment given
    /// boxes) and, when `features`, its P4 over the letterboxed input, from one forward pass.
    fn label_image(
        &self,
        image: &RgbImage,
        prompts: &[(usize, [f64; 4])],
        features: bool,
    ) -> Result<(Vec<TeacherInstance>, Option<FeatureMap>), TrainError> {
        if (!prompts.is_empty() && !features) || image.width() == 0 || image.height() == 0 {
            return Ok((Vec::new(), None));
        }
        let size = self.detector.imgsz;
        let letterbox = kiln_data::Letterbox::new(image.width(), image.height(), size, size);
        let pixels = kiln_data::planar_pixels(&letterbox.apply_image(image));
        let s = size as usize;
        let input = Tensor::from_data(TensorData::new(pixels, [1, 3, s, s]), self.detector.device());
        let (output, neck) = self.detector.model().forward_with_features(input);
        let feature_map = if features {
            // The input square in original pixels: the letterbox's map inverted at its corners.
            let (sx, sy) = (letterbox.scale_x, letterbox.scale_y);
            let (px, py) = (letterbox.pad_left as f64, letterbox.pad_top as f64);
            let region = [-px / sx, -py / sy, (size as f64 - px) / sx, (size as f64 - py) / sy];
            let [_, p4, _] = neck;
            Some(super::feature_map(p4, region, self.feature_cells)?)
        } else {
            None
        };
        if !prompts.is_empty() {
            return Ok((Vec::new(), feature_map));
        }
        let detections = self.detector.model().postprocess(&output, &[letterbox], &self.options)?.remove(0);
        let (w, h) = (image.width() as f64, image.height() as f64);
        let instances = detections
            .into_iter()
            .filter_map(|d| {
                let bbox = clip_box(d.bbox.map(|v| v as f64), w, h)?;
                // A segmenting teacher's detection without mask pixels would teach an empty mask.
                if self.segments && d.mask.as_ref().is_none_or(|m| m.area() == 0) {
                    return None;
                }
                Some(TeacherInstance {
                    class: d.class_id,
                    class_probs: d.class_scores,
                    score: d.score,
                    bbox,
                    mask: d.mask.map(|m| Rle::encode(&m)),
                    soft_mask: None,
                })
            })
            .collect();
        Ok((instances, feature_map))
    }
}

/// What decides a teacher's feature maps: whether they are made, and their size.
fn feature_key(config: &DistillConfig) -> String {
    if config.feature > 0.0 { format!("features {} cells", config.feature_cells) } else { "features none".into() }
}

/// 64-bit FNV-1a of `text`'s bytes as 16 hex digits: the same key for the same text on every
/// machine and version. Files enter the text as their SHA-256, so 64 bits suffice for a cache key.
pub fn fnv1a_hex(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// `bbox` clipped to a `w x h` image; none when nothing of it is left.
fn clip_box([x1, y1, x2, y2]: [f64; 4], w: f64, h: f64) -> Option<[f64; 4]> {
    let clipped = [x1.clamp(0.0, w), y1.clamp(0.0, h), x2.clamp(0.0, w), y2.clamp(0.0, h)];
    (clipped[2] > clipped[0] && clipped[3] > clipped[1]).then_some(clipped)
}

/// The most probable class and its probability.
fn best_class(probabilities: &[f32]) -> Option<(usize, f32)> {
    probabilities.iter().copied().enumerate().filter(|(_, p)| p.is_finite()).max_by(|a, b| a.1.total_cmp(&b.1))
}

fn one_hot(class: usize, classes: usize) -> Vec<f32> {
    (0..classes).map(|c| if c == class { 1.0 } else { 0.0 }).collect()
}

fn sigmoid(logit: f32) -> f32 {
    1.0 / (1.0 + (-logit).exp())
}

/// Mask probabilities (the sigmoid of SAM's logits `plane`, `h x w` at the original size) on a
/// `cells x cells` grid over `bbox` enlarged by [`SOFT_MASK_MARGIN`] of its side on each side and
/// clipped to the image: each cell the bilinear value at its centre (pixel `(i, j)` holds the
/// value at `(i + 0.5, j + 0.5)`), x 255 rounded. None for an empty grid or region.
fn soft_mask(plane: &[f32], (h, w): (usize, usize), bbox: [f64; 4], cells: u32) -> Option<SoftMask> {
    let [x1, y1, x2, y2] = bbox;
    let (mx, my) = ((x2 - x1) * SOFT_MASK_MARGIN, (y2 - y1) * SOFT_MASK_MARGIN);
    let region = [(x1 - mx).max(0.0), (y1 - my).max(0.0), (x2 + mx).min(w as f64), (y2 + my).min(h as f64)];
    if cells == 0 || w == 0 || h == 0 || !(region[2] > region[0] && region[3] > region[1]) {
        return None;
    }
    let probability = |x: f64, y: f64| -> f32 {
        let gx = (x - 0.5).clamp(0.0, (w - 1) as f64);
        let gy = (y - 0.5).clamp(0.0, (h - 1) as f64);
        let (ix, iy) = (gx.floor() as usize, gy.floor() as usize);
        let (jx, jy) = ((ix + 1).min(w - 1), (iy + 1).min(h - 1));
        let (fx, fy) = ((gx - ix as f64) as f32, (gy - iy as f64) as f32);
        let at = |x: usize, y: usize| sigmoid(plane[y * w + x]);
        let top = at(ix, iy) * (1.0 - fx) + at(jx, iy) * fx;
        let bottom = at(ix, jy) * (1.0 - fx) + at(jx, jy) * fx;
        top * (1.0 - fy) + bottom * fy
    };
    let n = cells as usize;
    let (cell_w, cell_h) = ((region[2] - region[0]) / n as f64, (region[3] - region[1]) / n as f64);
    let data = (0..n)
        .flat_map(|row| (0..n).map(move |col| (row, col)))
        .map(|(row, col)| {
            let x = region[0] + (col as f64 + 0.5) * cell_w;
            let y = region[1] + (row as f64 + 0.5) * cell_h;
            (probability(x, y) * 255.0).round().clamp(0.0, 255.0) as u8
        })
        .collect();
    Some(SoftMask { region, width: cells, height: cells, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(fnv1a_hex(""), "cbf29ce484222325");
        assert_eq!(fnv1a_hex("a"), "af63dc4c8601ec8c");
        assert_ne!(fnv1a_hex("box_threshold 0.25"), fnv1a_hex("box_threshold 0.3"));
    }

    #[test]
    fn soft_mask_samples_the_probabilities_over_the_enlarged_clipped_box() {
        // A 40 x 20 image whose logits are +10 inside x in [10, 30), y in [5, 15) and -10 elsewhere.
        let (h, w) = (20usize, 40usize);
        let plane: Vec<f32> = (0..h * w)
            .map(|i| {
                let (x, y) = (i % w, i / w);
                if (10..30).contains(&x) && (5..15).contains(&y) { 10.0 } else { -10.0 }
            })
            .collect();
        let soft = soft_mask(&plane, (h, w), [10.0, 5.0, 30.0, 15.0], 8).unwrap();
        assert_eq!((soft.width, soft.height, soft.data.len()), (8, 8, 64));
        assert_eq!(soft.region, [8.0, 4.0, 32.0, 16.0]);
        // Inside the box, certain; in the margin, not.
        assert!((soft.probability_at(20.0, 10.0) - 1.0).abs() < 0.01);
        assert!(soft.probability_at(8.5, 4.5) < 0.01);
        assert_eq!(soft.data[0], 0);
        assert_eq!(soft.data[3 * 8 + 4], 255);
        // Clipped to the image at its border.
        let edge = soft_mask(&plane, (h, w), [0.0, 0.0, 40.0, 20.0], 4).unwrap();
        assert_eq!(edge.region, [0.0, 0.0, 40.0, 20.0]);
        assert!(soft_mask(&plane, (h, w), [50.0, 0.0, 60.0, 10.0], 4).is_none());
        assert!(soft_mask(&plane, (h, w), [10.0, 5.0, 30.0, 15.0], 0).is_none());
    }

    #[test]
    fn boxes_are_clipped_and_classes_picked() {
        assert_eq!(clip_box([-5.0, 2.0, 50.0, 8.0], 40.0, 20.0), Some([0.0, 2.0, 40.0, 8.0]));
        assert_eq!(clip_box([45.0, 2.0, 50.0, 8.0], 40.0, 20.0), None);
        assert_eq!(best_class(&[0.1, 0.7, f32::NAN, 0.3]), Some((1, 0.7)));
        assert_eq!(best_class(&[]), None);
        assert_eq!(one_hot(1, 3), vec![0.0, 1.0, 0.0]);
    }
}
