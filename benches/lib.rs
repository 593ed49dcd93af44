//! Workloads shared by kiln's criterion benches and their reference scripts.

use kiln_data::rng::SeededRng;
use kiln_data::{CocoAnnotation, CocoCategory, CocoDataset, CocoImage, Segmentation};
use serde_json::Map;

/// A COCO file shaped like a real export: `images` images of 480..640 px, `annotations` polygon
/// instances (star-shaped, 8..24 vertices, a tenth of them in two parts) spread over 20 classes,
/// with no `bbox` and no `area`, so loading it means deriving both.
pub fn large_coco(images: usize, annotations: usize, seed: u64) -> CocoDataset {
    let mut rng = SeededRng::new(seed);
    let mut dataset = CocoDataset {
        categories: (0..20)
            .map(|i| CocoCategory { id: i * 3 + 1, name: format!("class_{i}"), supercategory: None, extra: Map::new() })
            .collect(),
        ..Default::default()
    };
    for i in 0..images {
        let (width, height) = (rng.uniform(480.0, 640.0) as u32, rng.uniform(360.0, 480.0) as u32);
        dataset.images.push(CocoImage {
            id: i as u64 + 1,
            file_name: format!("{i:06}.jpg"),
            width,
            height,
            extra: Map::new(),
        });
    }
    for a in 0..annotations {
        let image = &dataset.images[rng.below(images)];
        let (w, h) = (image.width as f64, image.height as f64);
        let parts = if rng.chance(0.1) { 2 } else { 1 };
        let polygons = (0..parts)
            .map(|_| {
                let radius = rng.uniform(4.0, w.min(h) / 4.0);
                let (cx, cy) = (rng.uniform(0.0, w), rng.uniform(0.0, h));
                let k = 8 + rng.below(17);
                (0..k)
                    .flat_map(|j| {
                        let angle = 2.0 * std::f64::consts::PI * j as f64 / k as f64;
                        let r = radius * rng.uniform(0.5, 1.0);
                        [
                            ((cx + r * angle.cos()) * 100.0).round() / 100.0,
                            ((cy + r * angle.sin()) * 100.0).round() / 100.0,
                        ]
                    })
                    .collect()
            })
            .collect();
        dataset.annotations.push(CocoAnnotation {
            id: a as u64 + 1,
            image_id: image.id,
            category_id: dataset.categories[rng.below(20)].id,
            segmentation: Some(Segmentation::Polygons(polygons)),
            bbox: None,
            area: None,
            iscrowd: 0,
            keypoints: None,
            num_keypoints: None,
            extra: Map::new(),
        });
    }
    dataset
}

/// The YOLOv8 student training step's input, shared by `train_step.rs` and `gpu_check.rs`.
#[cfg(feature = "models")]
pub mod student_step {
    use burn::tensor::{Device, Int, Tensor, TensorData};
    use kiln_training::loss::Targets;

    /// Three objects per image, with elliptical masks at a quarter of the input size.
    pub fn batch(batch: usize, size: usize, device: &Device) -> (Tensor<4>, Targets) {
        let images = Tensor::<4>::random([batch, 3, size, size], burn::tensor::Distribution::Uniform(0.0, 1.0), device);
        let (m, ms) = (3, size / 4);
        let scale = size as f32 / 320.0;
        let mut boxes = Vec::new();
        let mut masks = vec![0f32; batch * m * ms * ms];
        for b in 0..batch {
            for k in 0..m {
                let (x1, y1) = ((20.0 + 80.0 * k as f32 + b as f32) * scale, (30.0 + 60.0 * k as f32) * scale);
                let (x2, y2) = (x1 + 70.0 * scale, y1 + 90.0 * scale);
                boxes.extend([x1, y1, x2, y2]);
                let (cx, cy, rx, ry) = ((x1 + x2) / 8.0, (y1 + y2) / 8.0, (x2 - x1) / 8.0, (y2 - y1) / 8.0);
                for y in 0..ms {
                    for x in 0..ms {
                        let (dx, dy) = ((x as f32 + 0.5 - cx) / rx, (y as f32 + 0.5 - cy) / ry);
                        if dx * dx + dy * dy <= 1.0 {
                            masks[((b * m + k) * ms + y) * ms + x] = 1.0;
                        }
                    }
                }
            }
        }
        let classes: Vec<i64> = (0..batch * m).map(|i| (i % 3) as i64).collect();
        let targets = Targets {
            boxes: Tensor::from_data(TensorData::new(boxes, [batch, m, 4]), device),
            classes: Tensor::<2, Int>::from_data(TensorData::new(classes, [batch, m]), device),
            valid: Tensor::ones([batch, m], device),
            masks: Some(Tensor::from_data(TensorData::new(masks.clone(), [batch, m, ms, ms]), device)),
            teacher: None,
        };
        (images, targets)
    }
}
