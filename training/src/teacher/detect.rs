//! `kiln detect`: the GroundingDINO teacher (a base, optionally with a LoRA adapter merged in) run on
//! a directory of images with a text prompt of class names. Writes `detections.json` (COCO results:
//! `images` numbered from 1 in name order as `kiln infer` does, `categories` = the prompt's phrases,
//! `annotations` with `bbox` x y w h and `score`) and
//! `pictures/` with the boxes and names drawn. Nothing existing is replaced; a failure leaves no
//! pictures directory behind.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use kiln_data::io::{ResultCategory, ResultImage, ResultsDocument, StagedOutput};
use kiln_models::grounding_dino::Caption;

use super::grounding_dino::{GroundingDinoTeacherConfig, detect_image, draw_grounded, load_adapted, load_tokenizer};
use super::{TeacherConfig, classes_beside, grounding_dino_config_beside};
use crate::TrainError;

pub struct DetectRequest {
    pub images: PathBuf,
    pub prompt: String,
    pub output: PathBuf,
    pub config: GroundingDinoTeacherConfig,
    pub adapter: Option<PathBuf>,
}

/// What the user may override on the command line; everything else comes from the adapter's
/// experiment (its `teacher_config.yaml`) or, without an adapter, kiln's defaults.
#[derive(Debug, Clone, Default)]
pub struct DetectOverrides {
    pub gdino: Option<String>,
    pub weights: Option<PathBuf>,
    pub text_encoder: Option<PathBuf>,
    pub box_threshold: Option<f32>,
    pub text_threshold: Option<f32>,
    pub image_size: Option<usize>,
}

impl DetectRequest {
    /// The request `kiln detect` runs, from what the user gave: the settings of [`detect_config`],
    /// and the prompt, which defaults to the classes the adapter was trained on. Everything is
    /// checked here, before any model is loaded, so a bad setting costs nothing.
    pub fn resolve(
        images: PathBuf,
        prompt: Option<String>,
        output: PathBuf,
        adapter: Option<PathBuf>,
        overrides: &DetectOverrides,
    ) -> Result<Self, TrainError> {
        let config = detect_config(adapter.as_deref(), overrides)?;
        let prompt = match (prompt, &adapter) {
            (Some(prompt), _) => prompt,
            (None, Some(dir)) => {
                let classes = classes_beside(dir).unwrap_or_default();
                if classes.is_empty() {
                    return Err(TrainError::Config(format!(
                        "{}: no classes in its teacher_config.yaml: pass --prompt",
                        dir.display()
                    )));
                }
                classes.join(" . ")
            }
            (None, None) => {
                let needed = "--prompt is needed: the class names to find, e.g. \"cat . dog .\"";
                return Err(TrainError::Config(needed.into()));
            }
        };
        Ok(Self { images, prompt, output, config, adapter })
    }
}

/// GroundingDINO's settings for `kiln detect`: those the adapter was trained with (read from
/// `teacher_config.yaml` beside it, so an adapter runs on the base it was trained on) or kiln's
/// defaults, then the overrides, as [`super::teacher_config`] does for training.
pub fn detect_config(adapter: Option<&Path>, o: &DetectOverrides) -> Result<GroundingDinoTeacherConfig, TrainError> {
    let mut g = match adapter {
        Some(dir) => grounding_dino_config_beside(dir).ok_or_else(|| {
            TrainError::Config(format!(
                "{}: no teacher_config.yaml beside this adapter (an adapter directory of `kiln train-teacher` is \
                 EXPERIMENT/teachers/grounding_dino_lora)",
                dir.display()
            ))
        })?,
        None => TeacherConfig::default().grounding_dino.expect("configs/teacher.yaml has a grounding_dino section"),
    };
    g.model = o.gdino.clone().unwrap_or(g.model);
    g.weights = o.weights.clone().or(g.weights);
    if adapter.is_none() {
        g.weights = super::shipped_base_unless_given("grounding_dino", &g.model, g.weights, false)?;
    }
    g.text_encoder = o.text_encoder.clone().or(g.text_encoder);
    g.box_threshold = o.box_threshold.unwrap_or(g.box_threshold);
    g.text_threshold = o.text_threshold.unwrap_or(g.text_threshold);
    if let Some(size) = o.image_size {
        if size < 32 {
            return Err(TrainError::Config(format!("--imgsz {size} is too small (at least 32)")));
        }
        g.image_size = size;
        g.max_size = g.max_size.max(size);
    }
    if g.lacks_weights() {
        return Err(TrainError::Config(format!(
            "GroundingDINO {} needs --weights (groundingdino_swint_ogc.pth); only tiny_minilm has a base shipped with \
             kiln, and tiny runs from a random initialisation",
            g.model
        )));
    }
    Ok(g)
}

#[derive(Debug)]
pub struct DetectSummary {
    pub images: usize,
    pub boxes: usize,
    pub caption: String,
    pub detections: PathBuf,
    pub pictures: PathBuf,
    pub adapter: Option<String>,
}

pub fn run_detect(
    request: &DetectRequest,
    device: &Device,
    progress: &indicatif::ProgressBar,
) -> Result<DetectSummary, TrainError> {
    let caption = Caption::from_prompt(&request.prompt).map_err(|e| TrainError::Config(format!("--prompt: {e}")))?;
    let files = kiln_data::io::list_images(&request.images)?;
    let staged = StagedOutput::begin(&request.output, "detections.json", true)?;
    let tokenizer = load_tokenizer(&request.config)?;
    let (model, adapter) = load_adapted(&request.config, request.adapter.as_deref(), device)?;
    let names: Vec<String> = caption.phrase_names().iter().map(|s| s.to_string()).collect();
    progress.set_length(files.len() as u64);
    let mut images = Vec::new();
    let mut annotations = Vec::new();
    for (position, path) in files.iter().enumerate() {
        let mut image = kiln_data::io::read_rgb_image(path)?;
        let found = detect_image(&model, &tokenizer, &caption, &image, &request.config, device)?;
        let entry = ResultImage::listed(position, path, &image);
        for d in &found {
            annotations.push(serde_json::json!({
                "id": annotations.len() + 1,
                "image_id": entry.id,
                "category_id": d.phrase + 1,
                "bbox": [d.bbox[0], d.bbox[1], d.bbox[2] - d.bbox[0], d.bbox[3] - d.bbox[1]],
                "score": d.score,
            }));
        }
        draw_grounded(&mut image, &found, &names);
        if let Some(picture) = staged.picture(&kiln_data::io::picture_stem(path, entry.id)) {
            crate::plots::save(&image, &picture)?;
        }
        images.push(entry);
        progress.inc(1);
    }
    progress.finish_and_clear();
    let categories =
        names.iter().enumerate().map(|(i, n)| ResultCategory { id: i as u64 + 1, name: n.clone() }).collect();
    let boxes = annotations.len();
    let (detections, pictures) = staged.finish(&ResultsDocument { images, categories, annotations })?;
    let pictures = pictures.expect("detect always draws its pictures");
    Ok(DetectSummary {
        images: files.len(),
        boxes,
        caption: caption.text,
        detections,
        pictures,
        adapter: adapter.map(|a| format!("r {} on {} modules", a.lora.rank, a.lora.target_modules.len())),
    })
}
