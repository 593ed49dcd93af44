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
