//! `kiln segment`: the SAM teacher (a base, optionally with a LoRA adapter merged in) run on images
//! with box prompts. Boxes come as COCO JSON (`images` with `file_name`, `annotations` with `bbox`
//! as `x y w h`), so a dataset, or the `predictions.json` of `kiln infer`, serves as prompts. Writes
//! `masks.json` (COCO results: one mask per box, scored by SAM's predicted IoU) and, with pictures,
//! each image with its masks drawn.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use kiln_data::io::StagedOutput;
use kiln_data::mask::Rle;
use serde::Deserialize;

use super::sam::{SamTeacherConfig, draw_masks, masks_at_original_size};
use super::{TeacherConfig, sam_config_beside};
use crate::TrainError;

/// Box prompts read from COCO JSON.
#[derive(Debug, Deserialize)]
struct PromptFile {
    images: Vec<PromptImage>,
    annotations: Vec<PromptBox>,
    #[serde(default)]
    categories: Vec<PromptCategory>,
}

#[derive(Debug, Deserialize)]
struct PromptImage {
    id: u64,
    file_name: String,
}

#[derive(Debug, Deserialize)]
struct PromptBox {
    image_id: u64,
    bbox: [f64; 4],
    #[serde(default)]
    category_id: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct PromptCategory {
    id: u64,
    name: String,
}

pub struct SegmentRequest {
    pub images: PathBuf,
    pub boxes: PathBuf,
    pub output: PathBuf,
    pub sam: SamTeacherConfig,
    pub adapter: Option<PathBuf>,
    pub pictures: bool,
}

/// What the user may override on the command line; everything else comes from the adapter's
/// experiment (its `teacher_config.yaml`) or, without an adapter, kiln's defaults.
#[derive(Debug, Clone, Default)]
pub struct SegmentOverrides {
    pub sam: Option<String>,
    pub sam_weights: Option<PathBuf>,
}

impl SegmentRequest {
    /// The request `kiln segment` runs, with the settings of [`segment_config`]; checked here,
    /// before any model is loaded, so a bad setting costs nothing.
    pub fn resolve(
        images: PathBuf,
        boxes: PathBuf,
        output: PathBuf,
        adapter: Option<PathBuf>,
        pictures: bool,
        overrides: &SegmentOverrides,
    ) -> Result<Self, TrainError> {
        let sam = segment_config(adapter.as_deref(), overrides)?;
        Ok(Self { images, boxes, output, sam, adapter, pictures })
    }
}

/// SAM's settings for `kiln segment`: those the adapter was trained with (read from
/// `teacher_config.yaml` beside it, so an adapter runs on the base it was trained on) or kiln's
/// defaults, then the overrides, as [`super::teacher_config`] does for training.
pub fn segment_config(adapter: Option<&Path>, o: &SegmentOverrides) -> Result<SamTeacherConfig, TrainError> {
    let mut sam = match adapter {
        Some(dir) => sam_config_beside(dir).ok_or_else(|| {
            TrainError::Config(format!(
                "{}: no teacher_config.yaml beside this adapter (an adapter directory of `kiln train-teacher` is \
                 EXPERIMENT/teachers/sam_lora)",
                dir.display()
            ))
        })?,
        None => TeacherConfig::default().sam.expect("configs/teacher.yaml has a sam section"),
    };
    sam.model = o.sam.clone().unwrap_or(sam.model);
    sam.weights = o.sam_weights.clone().or(sam.weights);
    if adapter.is_none() {
        sam.weights = super::shipped_base_unless_given("sam", &sam.model, sam.weights, false)?;
    }
    if sam.lacks_weights() {
        return Err(TrainError::Config(format!(
            "SAM {} needs --sam-weights (e.g. sam_vit_b_01ec64.pth); only tiny has a base shipped with kiln",
            sam.model
        )));
    }
    Ok(sam)
}

#[derive(Debug)]
pub struct SegmentSummary {
    pub images: usize,
    pub masks: usize,
    pub predictions: PathBuf,
    pub pictures: Option<PathBuf>,
    pub adapter: Option<String>,
}

pub fn run_segment(
    request: &SegmentRequest,
    device: &Device,
    progress: &indicatif::ProgressBar,
) -> Result<SegmentSummary, TrainError> {
    let text = std::fs::read(&request.boxes)
        .map_err(|e| TrainError::Io { path: request.boxes.clone(), message: format!("cannot read: {e}") })?;
    let prompts: PromptFile = serde_json::from_slice(&text).map_err(|e| TrainError::Io {
        path: request.boxes.clone(),
        message: format!("not COCO JSON with `images` and `annotations` (bbox as x, y, w, h): {e}"),
    })?;
    let known: HashMap<u64, usize> = prompts.images.iter().enumerate().map(|(i, im)| (im.id, i)).collect();
    let mut boxes_of: Vec<Vec<&PromptBox>> = vec![Vec::new(); prompts.images.len()];
    for b in &prompts.annotations {
        let Some(&i) = known.get(&b.image_id) else {
            return Err(TrainError::Io {
                path: request.boxes.clone(),
                message: format!("a box refers to image id {}, which `images` does not list", b.image_id),
            });
        };
        if !(b.bbox.iter().all(|v| v.is_finite()) && b.bbox[2] > 0.0 && b.bbox[3] > 0.0) {
            return Err(TrainError::Io {
                path: request.boxes.clone(),
                message: format!("image id {}: box {:?} has no area", b.image_id, b.bbox),
            });
        }
        boxes_of[i].push(b);
    }
    let category_ids: Vec<u64> = prompts.categories.iter().map(|c| c.id).collect();
    let names: Vec<String> = prompts.categories.iter().map(|c| c.name.clone()).collect();
    let class_of = |id: Option<u64>| id.and_then(|id| category_ids.iter().position(|&c| c == id)).unwrap_or(0);

    let staged = StagedOutput::begin(&request.output, "masks.json", request.pictures)?;
    let (sam, adapter) = super::sam::load_adapted(&request.sam, request.adapter.as_deref(), device)?;
    progress.set_length(prompts.images.len() as u64);
    let mut results = Vec::new();
    for (info, boxes) in prompts.images.iter().zip(&boxes_of) {
        let path = kiln_data::paths::inside(&request.images, &info.file_name, &format!("image {}", info.id))?;
        let image = kiln_data::io::read_rgb_image(&path)?;
        if !boxes.is_empty() {
            let input = sam.preprocess(&image, device);
            let embedding = sam.embed(input.pixels.clone());
            let corners: Vec<[f32; 4]> = boxes
                .iter()
                .map(|b| [b.bbox[0], b.bbox[1], b.bbox[0] + b.bbox[2], b.bbox[1] + b.bbox[3]].map(|v| v as f32))
                .collect();
            let resized: Vec<f32> = corners
                .iter()
                .flat_map(|&c| kiln_models::sam::resize_box(c, input.original_size, sam.image_size()))
                .collect();
            let prompt = Tensor::from_data(TensorData::new(resized, [boxes.len(), 4]), device);
            let prediction = sam.predict_boxes(embedding, prompt, false);
            let scores = kiln_models::device::read_floats(prediction.iou_predictions)?;
            let masks = masks_at_original_size(&sam, prediction.masks, input.input_size, input.original_size)?;
            for ((b, mask), score) in boxes.iter().zip(&masks).zip(&scores) {
                results.push(serde_json::json!({
                    "image_id": info.id,
                    "category_id": b.category_id.unwrap_or(1),
                    "bbox": b.bbox,
                    "score": score,
                    "segmentation": Rle::encode(mask).to_json(true),
                }));
            }
            if let Some(picture_path) =
                staged.picture(&kiln_data::io::picture_stem(Path::new(&info.file_name), info.id))
            {
                let mut picture = image;
                let classes: Vec<usize> = boxes.iter().map(|b| class_of(b.category_id)).collect();
                draw_masks(&mut picture, &masks, &corners, &classes, &names);
                crate::plots::save(&picture, &picture_path)?;
            }
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    let masks = results.len();
    // COCO's results format: the bare list of results (image ids are the prompt file's).
    let (predictions, pictures) = staged.finish(&results)?;
    Ok(SegmentSummary {
        images: prompts.images.len(),
        masks,
        predictions,
        pictures,
        adapter: adapter.map(|a| format!("r {} on {}", a.lora.rank, a.lora.target_modules.join(", "))),
    })
}
