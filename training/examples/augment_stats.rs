//! Prints what kiln's training augmentation makes of a COCO set, one line per sample and per
//! object, for `benches/augment_compare.py` to set beside Ultralytics' samples of the same images:
//! `S index objects mean std grey_share` and `O class width height mask_cells visible_cells`
//! (mask cells of the object's own mask, and those left once smaller objects are laid on top, as
//! Ultralytics' overlapping mask targets are).
//!
//! `cargo run --release -p kiln-training --example augment_stats -- ANNOTATIONS IMAGES IMGSZ SAMPLES [SEED]`
//!
//! With `KILN_DUMP=DIR` it also writes the samples as a COCO set (`DIR/images/*.png`,
//! `DIR/annotations.json`, masks as RLE at full size), in the order a run of
//! `SAMPLES / images` epochs with the last 10 without mosaic would see them: another tool can then
//! train on exactly these samples, augmentation off.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_data::batch::CocoDetectionDataset;
use kiln_data::coco::CocoDataset;
use kiln_training::augment::AugmentConfig;
use kiln_training::data::{EpochCounter, TrainDataset};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [annotations, images, imgsz, samples, rest @ ..] = &args[..] else {
        return Err("usage: augment_stats ANNOTATIONS IMAGES IMGSZ SAMPLES [SEED]".into());
    };
    let (imgsz, samples): (u32, usize) = (imgsz.parse()?, samples.parse()?);
    let seed: u64 = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(0);
    let coco = CocoDataset::load(&PathBuf::from(annotations))?;
    let source = Arc::new(CocoDetectionDataset::new(coco, images));
    let n = source.coco().images.len();
    let dump = std::env::var_os("KILN_DUMP").map(PathBuf::from);
    let epochs = if dump.is_some() { samples.div_ceil(n) } else { samples.div_ceil(n) + 100 };
    let class_ids = source.coco().class_ids();
    let class_names = source.coco().class_names();
    // `KILN_NO_HSV=1`: without the colour changes, so the padding grey can be counted.
    let mut augment = AugmentConfig::default();
    if std::env::var_os("KILN_NO_HSV").is_some() {
        (augment.hsv_h, augment.hsv_s, augment.hsv_v) = (0.0, 0.0, 0.0);
    }
    // `KILN_NO_MOSAIC=1`: the samples of the last epochs, after mosaic closes.
    if std::env::var_os("KILN_NO_MOSAIC").is_some() {
        augment.mosaic = 0.0;
    }
    // `KILN_SET="scale=0 translate=0"`: any augmentation setting, as `--set augment.KEY=VALUE`.
    if let Some(settings) = std::env::var_os("KILN_SET") {
        let settings: Vec<String> = settings.to_string_lossy().split_whitespace().map(str::to_owned).collect();
        augment = kiln_training::commands::apply_settings(augment, &settings)?;
    }
    // Ultralytics' mosaic buffer at batch 8: min(images, 8 * 8, 1000).
    let buffer = n.min(64).min(1000);
    let dataset = TrainDataset::new(vec![source], augment, imgsz, Some(4), seed, epochs, 10, EpochCounter::default())
        .with_mosaic_buffer(buffer);
    let full = TrainDataset::new(
        vec![Arc::new(CocoDetectionDataset::new(CocoDataset::load(&PathBuf::from(annotations))?, images))],
        augment,
        imgsz,
        Some(1),
        seed,
        epochs,
        10,
        EpochCounter::default(),
    )
    .with_mosaic_buffer(buffer);
    let (mut coco_images, mut coco_annotations) = (Vec::new(), Vec::new());
    for k in 0..samples {
        let sample = dataset.sample(1 + k / n, k % n)?;
        if let Some(dir) = &dump {
            // The same draws at full mask resolution (the generator is seeded by epoch and position).
            let at_full = full.sample(1 + k / n, k % n)?;
            std::fs::create_dir_all(dir.join("images"))?;
            let name = format!("s{k:05}.png");
            at_full.image.save(dir.join("images").join(&name))?;
            coco_images.push(serde_json::json!({"id": k + 1, "file_name": name, "width": imgsz, "height": imgsz}));
            for ((class, b), mask) in at_full.boxes.iter().zip(&at_full.masks) {
                let rle = kiln_data::mask::Rle::encode(mask);
                coco_annotations.push(serde_json::json!({
                    "id": coco_annotations.len() + 1, "image_id": k + 1, "category_id": class_ids[*class],
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": rle.area(), "iscrowd": 0,
                    "segmentation": rle.to_json(true),
                }));
            }
        }
        let pixels = sample.image.as_raw();
        let mean = pixels.iter().map(|&v| v as f64).sum::<f64>() / pixels.len() as f64;
        let var = pixels.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / pixels.len() as f64;
        let grey =
            sample.image.pixels().filter(|p| p.0 == [114, 114, 114]).count() as f64 / (imgsz as f64 * imgsz as f64);
        println!("S {k} {} {mean:.2} {:.2} {grey:.4}", sample.boxes.len(), var.sqrt());
        // Ultralytics draws the largest first, so the smaller objects own the cells they share.
        let mut order: Vec<usize> = (0..sample.boxes.len()).collect();
        let area = |i: usize| sample.masks.get(i).map_or(0, |m| m.data.iter().filter(|&&v| v > 0).count());
        order.sort_by_key(|&i| std::cmp::Reverse(area(i)));
        let cells = sample.masks.first().map_or(0, |m| m.data.len());
        let mut owner = vec![usize::MAX; cells];
        for &i in &order {
            for (c, &v) in sample.masks[i].data.iter().enumerate() {
                if v > 0 {
                    owner[c] = i;
                }
            }
        }
        for (i, (class, b)) in sample.boxes.iter().enumerate() {
            let visible = owner.iter().filter(|&&o| o == i).count();
            println!("O {class} {:.2} {:.2} {} {visible}", b[2] - b[0], b[3] - b[1], area(i));
        }
    }
    if let Some(dir) = &dump {
        let categories: Vec<_> =
            class_ids.iter().zip(&class_names).map(|(id, name)| serde_json::json!({"id": id, "name": name})).collect();
        let coco =
            serde_json::json!({"images": coco_images, "annotations": coco_annotations, "categories": categories});
        std::fs::write(dir.join("annotations.json"), serde_json::to_vec(&coco)?)?;
    }
    Ok(())
}
