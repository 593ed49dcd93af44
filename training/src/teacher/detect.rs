//! `kiln detect`: the GroundingDINO teacher (a base, optionally with a LoRA adapter merged in) run on
//! a directory of images with a text prompt of class names. Writes `detections.json` (COCO results:
//! `images`, `categories` = the prompt's phrases, `annotations` with `bbox` x y w h and `score`) and
//! `pictures/` with the boxes and names drawn. Nothing existing is replaced; a failure leaves no
//! pictures directory behind.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use kiln_models::grounding_dino::Caption;

use super::grounding_dino::{GroundingDinoTeacherConfig, detect_image, draw_grounded, load_adapted, load_tokenizer};
use crate::run::TrainError;

pub struct DetectRequest {
    pub images: PathBuf,
    pub prompt: String,
    pub output: PathBuf,
    pub config: GroundingDinoTeacherConfig,
    pub adapter: Option<PathBuf>,
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
    let files = crate::commands::list_images(&request.images)?;
    let detections = request.output.join("detections.json");
    let pictures = request.output.join("pictures");
    kiln_data::io::refuse_to_overwrite([detections.as_path()])?;
    if pictures.exists() {
        return Err(TrainError::Config(format!("{} exists; choose another --output", pictures.display())));
    }
    let tokenizer = load_tokenizer(&request.config)?;
    let (model, adapter) = load_adapted(&request.config, request.adapter.as_deref(), device)?;
    let names: Vec<String> = caption.phrase_names().iter().map(|s| s.to_string()).collect();
    let created_output = !request.output.exists();
    std::fs::create_dir_all(&request.output)
        .map_err(|e| TrainError::Io { path: request.output.clone(), message: e.to_string() })?;
    let staging = request.output.join(format!(".pictures.{}.tmp", std::process::id()));
    std::fs::create_dir_all(&staging).map_err(|e| TrainError::Io { path: staging.clone(), message: e.to_string() })?;
    progress.set_length(files.len() as u64);
    let mut images = Vec::new();
    let mut annotations = Vec::new();
    let outcome = (|| -> Result<(), TrainError> {
        for (id, path) in files.iter().enumerate() {
            let mut image = kiln_data::io::read_rgb_image(path)?;
            let found = detect_image(&model, &tokenizer, &caption, &image, &request.config, device)?;
            let file_name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            images.push(
                serde_json::json!({"id": id, "file_name": file_name, "width": image.width(), "height": image.height()}),
            );
            for d in &found {
                annotations.push(serde_json::json!({
                    "id": annotations.len() + 1,
                    "image_id": id,
                    "category_id": d.phrase + 1,
                    "bbox": [d.bbox[0], d.bbox[1], d.bbox[2] - d.bbox[0], d.bbox[3] - d.bbox[1]],
                    "score": d.score,
                }));
            }
            draw_grounded(&mut image, &found, &names);
            let stem =
                Path::new(&file_name).file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or(id.to_string());
            crate::plots::save(&image, &staging.join(format!("{stem}.jpg")))?;
            progress.inc(1);
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        let _ = std::fs::remove_dir_all(&staging);
        if created_output {
            let _ = std::fs::remove_dir(&request.output);
        }
        return Err(e);
    }
    progress.finish_and_clear();
    let categories: Vec<_> =
        names.iter().enumerate().map(|(i, n)| serde_json::json!({"id": i + 1, "name": n})).collect();
    let boxes = annotations.len();
    let file = serde_json::json!({"images": images, "categories": categories, "annotations": annotations});
    kiln_data::io::write_atomic(&detections, serde_json::to_string(&file).expect("serialises").as_bytes())?;
    std::fs::rename(&staging, &pictures)
        .map_err(|e| TrainError::Io { path: pictures.clone(), message: e.to_string() })?;
    Ok(DetectSummary {
        images: files.len(),
        boxes,
        caption: caption.text,
        detections,
        pictures,
        adapter: adapter.map(|a| format!("r {} on {} modules", a.lora.rank, a.lora.target_modules.len())),
    })
}
