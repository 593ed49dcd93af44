//! `kiln segment`: the SAM teacher (a base, optionally with a LoRA adapter merged in) run on images
//! with box prompts. Boxes come as COCO JSON (`images` with `file_name`, `annotations` with `bbox`
//! as `x y w h`), so a dataset, or the `predictions.json` of `kiln infer`, serves as prompts. Writes
//! `masks.json` (COCO results: one mask per box, scored by SAM's predicted IoU) and, with pictures,
//! each image with its masks drawn.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use kiln_data::mask::Rle;
use serde::Deserialize;

use super::sam::{SamTeacherConfig, draw_masks, masks_at_original_size};
use crate::run::TrainError;

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

    let predictions = request.output.join("masks.json");
    let pictures = request.output.join("pictures");
    kiln_data::io::refuse_to_overwrite([predictions.as_path()])?;
    if request.pictures && pictures.exists() {
        return Err(TrainError::Config(format!("{} exists; choose another --output", pictures.display())));
    }
    let (sam, adapter) = super::sam::load_adapted(&request.sam, request.adapter.as_deref(), device)?;
    std::fs::create_dir_all(&request.output)
        .map_err(|e| TrainError::Io { path: request.output.clone(), message: e.to_string() })?;
    let staging = request.output.join(format!(".pictures.{}.tmp", std::process::id()));
    if request.pictures {
        std::fs::create_dir_all(&staging)
            .map_err(|e| TrainError::Io { path: staging.clone(), message: e.to_string() })?;
    }
    progress.set_length(prompts.images.len() as u64);
    let mut results = Vec::new();
    let outcome = (|| -> Result<(), TrainError> {
        for (info, boxes) in prompts.images.iter().zip(&boxes_of) {
            let path = request.images.join(&info.file_name);
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
                if request.pictures {
                    let mut picture = image;
                    let classes: Vec<usize> = boxes.iter().map(|b| class_of(b.category_id)).collect();
                    draw_masks(&mut picture, &masks, &corners, &classes, &names);
                    let stem = Path::new(&info.file_name)
                        .file_stem()
                        .map(|s| s.to_string_lossy().to_string())
                        .unwrap_or_else(|| info.id.to_string());
                    crate::plots::save(&picture, &staging.join(format!("{stem}.jpg")))?;
                }
            }
            progress.inc(1);
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    progress.finish_and_clear();
    let masks = results.len();
    kiln_data::io::write_atomic(&predictions, serde_json::to_string(&results).expect("serialises").as_bytes())?;
    if request.pictures {
        std::fs::rename(&staging, &pictures)
            .map_err(|e| TrainError::Io { path: pictures.clone(), message: e.to_string() })?;
    }
    Ok(SegmentSummary {
        images: prompts.images.len(),
        masks,
        predictions,
        pictures: request.pictures.then_some(pictures),
        adapter: adapter.map(|a| format!("r {} on {}", a.lora.rank, a.lora.target_modules.join(", "))),
    })
}
