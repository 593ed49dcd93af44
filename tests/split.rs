//! Split: ratios, stratification, reproducibility, no leakage, every class in train; the files
//! written with identical categories and preserved ids.

use std::collections::HashSet;

use indicatif::ProgressBar;
use kiln_data::rng::SeededRng;
use kiln_data::split::images_per_class;
use kiln_data::{CocoAnnotation, CocoCategory, CocoDataset, CocoImage, SplitOptions, SynthOptions, split, synthesize};
use kiln_tests::Scratch;
use serde_json::Map;

/// Multi-label images with skewed class frequencies (class k appears with probability ~ 1/(k+1)),
/// two rare classes with only 2 and 3 images, and some images without annotations.
fn multilabel(images: usize, seed: u64) -> CocoDataset {
    let mut rng = SeededRng::new(seed);
    let classes = 8u64;
    let mut dataset = CocoDataset {
        categories: (0..classes + 2)
            .map(|k| CocoCategory { id: 100 + 7 * k, name: format!("c{k}"), supercategory: None, extra: Map::new() })
            .collect(),
        ..Default::default()
    };
    let push = |dataset: &mut CocoDataset, image_id: u64, category_id: u64| {
        let id = dataset.annotations.len() as u64 + 1;
        dataset.annotations.push(CocoAnnotation {
            id,
            image_id,
            category_id,
            segmentation: None,
            bbox: Some([1.0, 1.0, 5.0, 5.0]),
            area: Some(25.0),
            iscrowd: 0,
            keypoints: None,
            num_keypoints: None,
            extra: Map::new(),
        });
    };
    for i in 0..images {
        let image_id = 1000 + i as u64 * 3;
        dataset.images.push(CocoImage {
            id: image_id,
            file_name: format!("{i}.jpg"),
            width: 64,
            height: 64,
            extra: Map::new(),
        });
        for k in 0..classes {
            if rng.chance(0.9 / (k + 1) as f64) {
                for _ in 0..1 + rng.below(3) {
                    push(&mut dataset, image_id, 100 + 7 * k);
                }
            }
        }
        if i < 2 {
            push(&mut dataset, image_id, 100 + 7 * classes);
        }
        if (10..13).contains(&i) {
            push(&mut dataset, image_id, 100 + 7 * (classes + 1));
        }
    }
    dataset
}

#[test]
fn ratios_hold_and_no_image_is_in_two_parts() {
    let dataset = multilabel(400, 3);
    let parts = split(&dataset, &SplitOptions::default());
    let sizes: Vec<usize> = parts.parts.iter().map(|(_, images)| images.len()).collect();
    assert_eq!(sizes, vec![280, 60, 60]);
    let mut seen = HashSet::new();
    for (_, images) in &parts.parts {
        for &image in images {
            assert!(seen.insert(image), "image {image} is in two parts");
        }
    }
    assert_eq!(seen.len(), 400, "every image is in a part");
}

#[test]
fn same_seed_same_split_other_seed_other_split() {
    let dataset = multilabel(300, 5);
    let a = split(&dataset, &SplitOptions { seed: 1, ..Default::default() });
    let b = split(&dataset, &SplitOptions { seed: 1, ..Default::default() });
    let c = split(&dataset, &SplitOptions { seed: 2, ..Default::default() });
    assert_eq!(a, b);
    assert_ne!(a, c);
}

/// Largest gap, over classes with at least 20 images, between a class's share of a part's images
/// and its share of all images.
fn worst_share_gap(dataset: &CocoDataset, parts: &kiln_data::Split) -> f64 {
    let per_part = images_per_class(dataset, parts);
    let total: Vec<usize> = (0..dataset.categories.len()).map(|c| per_part.values().map(|v| v[c]).sum()).collect();
    let n = dataset.images.len() as f64;
    let mut worst: f64 = 0.0;
    for (name, images) in &parts.parts {
        for (c, &count) in per_part[name].iter().enumerate() {
            if total[c] >= 20 {
                let gap = (count as f64 / images.len() as f64 - total[c] as f64 / n).abs();
                worst = worst.max(gap);
            }
        }
    }
    worst
}

#[test]
fn stratification_keeps_class_shares_close_and_beats_random() {
    let dataset = multilabel(400, 11);
    let stratified = worst_share_gap(&dataset, &split(&dataset, &SplitOptions::default()));
    // Random splits over a few seeds, to show stratification earns its keep.
    let random: f64 = (0..5)
        .map(|seed| {
            worst_share_gap(&dataset, &split(&dataset, &SplitOptions { seed, stratify: false, ..Default::default() }))
        })
        .sum::<f64>()
        / 5.0;
    eprintln!("stratified {stratified:.4} random {random:.4}");
    assert!(stratified < 0.025, "stratified worst share gap {stratified:.3}");
    assert!(stratified < random / 2.0, "stratified {stratified:.3} vs random {random:.3}");
}

#[test]
fn every_class_with_images_is_in_train() {
    let dataset = multilabel(60, 2);
    for seed in 0..20 {
        for stratify in [true, false] {
            let parts = split(&dataset, &SplitOptions { seed, stratify, ..Default::default() });
            let in_train = &images_per_class(&dataset, &parts)["train"];
            for (class, &count) in in_train.iter().enumerate() {
                assert!(count > 0, "seed {seed}, stratify {stratify}: class {class} missing from train");
            }
        }
    }
}

#[test]
fn validate_writes_splits_with_identical_categories_and_preserved_ids() {
    let scratch = Scratch::new("split-files");
    let data = scratch.path().join("data");
    let generated = synthesize(
        &SynthOptions { images: 40, size: 64, seed: 3, ..Default::default() },
        &data,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let out = scratch.path().join("out");
    let options = kiln_data::ValidateOptions {
        data: generated.annotations.clone(),
        images: None,
        split: SplitOptions::default(),
        output_dir: Some(out.clone()),
    };
    let report = kiln_data::run_validate(&options, &ProgressBar::hidden()).unwrap();
    assert!(report.ok, "{}", report.render());
    let original = CocoDataset::load(&generated.annotations).unwrap();
    let mut image_ids = HashSet::new();
    let mut annotation_ids = HashSet::new();
    for name in ["train", "val", "test"] {
        let part = CocoDataset::load(&out.join(format!("{name}.json"))).unwrap();
        assert_eq!(part.categories, original.categories, "{name}: categories");
        assert_eq!(part.extra, original.extra, "{name}: top-level fields");
        let ids: HashSet<u64> = part.images.iter().map(|i| i.id).collect();
        for annotation in &part.annotations {
            assert!(ids.contains(&annotation.image_id), "{name}: annotation on an image of another part");
            let source = original.annotations.iter().find(|a| a.id == annotation.id).expect("ids preserved");
            assert_eq!(source.image_id, annotation.image_id);
            assert!(annotation_ids.insert(annotation.id));
        }
        for image in &part.images {
            assert!(image_ids.insert(image.id), "image {} in two parts", image.id);
            assert_eq!(original.images.iter().find(|i| i.id == image.id), Some(image));
        }
    }
    assert_eq!(image_ids.len(), original.images.len());
    assert_eq!(annotation_ids.len(), original.annotations.len());
    assert!(out.join("annotations.repaired.json").is_file());
}
