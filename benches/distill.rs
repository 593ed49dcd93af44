//! Teacher labelling throughput, per teacher: one image (640x480) labelled and its feature map
//! made, as `kiln train-student --teachers` does for every unlabelled image before training:
//! - a kiln student as the teacher (yolov8n-seg and yolov8s-seg at 640);
//! - the Grounded-SAM chain (GroundingDINO's boxes from the class names prompting SAM) on the tiny
//!   configs, and with `KILN_BENCH_OFFICIAL=1` on GroundingDINO Swin-T OGC + SAM vit_b.
//!
//! Random weights (speed does not depend on their values); the thresholds at 0 so that each image
//! gets the most labels (`max_labels` 20 of them), the worst case for SAM's decoder. What the
//! distilled training step costs over a supervised one: `benches/train_step.rs`.
//!
//! `cargo bench -p kiln-benches --features models --bench distill`

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use criterion::{Criterion, criterion_group, criterion_main};
use kiln_models::grounding_dino::GroundingDinoConfig;
use kiln_models::sam::SamConfig;
use kiln_training::distill::teacher::{TeacherWeights, open_teacher};
use kiln_training::distill::{DistillConfig, ValueOrAuto};
use kiln_training::teacher::TeacherConfig;

const CLASSES: [&str; 3] = ["circle", "square", "triangle"];

fn classes() -> Vec<String> {
    CLASSES.iter().map(|c| c.to_string()).collect()
}

/// A random student saved as a kiln run's weights.
fn student_dir(root: &Path, model: &str) -> PathBuf {
    let dir = root.join(model);
    std::fs::create_dir_all(dir.join("weights")).unwrap();
    let config: kiln_models::YoloConfig = model.parse().unwrap();
    let metadata = [
        ("kiln.model".to_string(), model.to_string()),
        ("kiln.classes".to_string(), serde_json::to_string(&classes()).unwrap()),
        ("kiln.category_ids".to_string(), "[1,2,3]".to_string()),
        ("kiln.imgsz".to_string(), "640".to_string()),
    ];
    config.with_num_classes(3).init(&Device::flex()).save(&dir.join("weights/best.safetensors"), &metadata).unwrap();
    dir
}

/// A `teachers/` directory with fully fine-tuned (here: random) GroundingDINO and SAM.
fn chain_dir(root: &Path, gdino: &str, sam: &str) -> PathBuf {
    let dir = root.join(format!("{gdino}-{sam}/teachers"));
    let device = Device::flex();
    let mut config = TeacherConfig::default();
    let g = config.grounding_dino.as_mut().unwrap();
    g.model = gdino.into();
    let s = config.sam.as_mut().unwrap();
    s.model = sam.into();
    config.classes = classes();
    config.category_ids = vec![1, 2, 3];
    std::fs::create_dir_all(dir.join("grounding_dino_full")).unwrap();
    std::fs::create_dir_all(dir.join("sam_full")).unwrap();
    std::fs::write(dir.join("teacher_config.yaml"), serde_yaml::to_string(&config).unwrap()).unwrap();
    let g = match gdino {
        "tiny" => GroundingDinoConfig::tiny(),
        _ => GroundingDinoConfig::swint_ogc(),
    };
    g.init(&device).save(&dir.join("grounding_dino_full/model.safetensors"), &[], true).unwrap();
    let s = match sam {
        "tiny" => SamConfig::tiny(),
        _ => SamConfig::vit_b(),
    };
    s.init(&device).save(&dir.join("sam_full/model.safetensors"), &[]).unwrap();
    dir
}

fn image() -> image::RgbImage {
    image::RgbImage::from_fn(640, 480, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8]))
}

fn benches(c: &mut Criterion) {
    let root = std::env::temp_dir().join(format!("kiln-bench-distill-{}", std::process::id()));
    let config = DistillConfig {
        box_threshold: ValueOrAuto::Value(0.0),
        text_threshold: 0.0,
        max_labels: 20,
        ..DistillConfig::default()
    };
    let mut teachers: Vec<(String, PathBuf)> = vec![
        ("student_yolov8n_seg_640".into(), student_dir(&root, "yolov8n-seg")),
        ("student_yolov8s_seg_640".into(), student_dir(&root, "yolov8s-seg")),
        ("grounded_sam_tiny".into(), chain_dir(&root, "tiny", "tiny")),
    ];
    if std::env::var_os("KILN_BENCH_OFFICIAL").is_some() {
        teachers.push(("grounded_sam_swint_ogc_vit_b".into(), chain_dir(&root, "swint_ogc", "vit_b")));
    }
    let image = image();
    let mut group = c.benchmark_group("teacher_labelling_per_image");
    group.sample_size(10);
    for (name, dir) in &teachers {
        let teacher = open_teacher(dir, &classes(), &config, &TeacherWeights::default(), &Device::flex()).unwrap();
        group.bench_function(name.as_str(), |b| {
            b.iter(|| {
                let (labels, features) = teacher.label_with_features(&image, &[]).unwrap();
                assert!(features.is_some());
                labels.len()
            })
        });
    }
    group.finish();
    let _ = std::fs::remove_dir_all(root);
}

criterion_group!(distill, benches);
criterion_main!(distill);
