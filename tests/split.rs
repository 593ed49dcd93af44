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
        class_names: None,
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

/// Frames of 12 videos (5 each, 3 classes): every video's frames land in one part, whether the
/// group comes from the images' `video_id` (the default when the data has one) or from a regex on
/// `file_name`; every class is in train and train holds most images. By image (`none`), some video
/// is cut across parts: the leakage grouping prevents.
#[test]
fn a_grouped_split_never_places_a_video_in_two_parts() {
    let mut dataset = multilabel(60, 9);
    for (i, image) in dataset.images.iter_mut().enumerate() {
        image.extra.insert("video_id".into(), serde_json::json!(i / 5));
        image.file_name = format!("video{}/frame{}.jpg", i / 5, i % 5);
    }
    let video_of = |position: usize| position / 5;
    let parts_of_videos = |split: &kiln_data::Split| {
        let mut parts = vec![HashSet::new(); 12];
        for (name, images) in &split.parts {
            for &image in images {
                parts[video_of(image)].insert(name.clone());
            }
        }
        parts
    };
    for group_by in ["auto", "video", "video_id", "^([^/]+)/"] {
        for seed in [1, 2, 3] {
            let options = SplitOptions { seed, group_by: group_by.parse().unwrap(), ..Default::default() };
            let split = split(&dataset, &options);
            let parts = parts_of_videos(&split);
            assert!(parts.iter().all(|p| p.len() == 1), "{group_by}, seed {seed}: {parts:?}");
            let train = split.part("train").unwrap();
            assert!(train.len() >= 30, "{group_by}: train has {} of 60 images", train.len());
            assert_eq!(split.parts.iter().map(|(_, i)| i.len()).sum::<usize>(), 60);
            let counts = images_per_class(&dataset, &split);
            let totals = kiln_data::split::images_per_class(
                &dataset,
                &kiln_data::Split { parts: vec![("all".into(), (0..60).collect())] },
            );
            for (class, &total) in totals["all"].iter().enumerate() {
                assert!(total == 0 || counts["train"][class] > 0, "{group_by}: class {class} missing from train");
            }
        }
    }
    let by_image = split(&dataset, &SplitOptions { group_by: "none".parse().unwrap(), ..Default::default() });
    assert!(parts_of_videos(&by_image).iter().any(|p| p.len() > 1), "a split by image cuts some video");
    assert!("(".parse::<kiln_data::GroupBy>().unwrap_err().contains("not a valid regex"));
}

/// `kiln validate` on video frames: grouped by `video_id` without being asked (the report says so),
/// near-duplicate copies that the split put into two parts reported as leakage, and `report.md`
/// written beside the splits.
#[test]
fn validate_groups_video_frames_reports_leakage_and_writes_markdown() {
    let scratch = Scratch::new("split-video");
    let data = scratch.path().join("data");
    let generated = synthesize(
        &SynthOptions { images: 30, size: 64, seed: 4, ..Default::default() },
        &data,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let mut dataset = CocoDataset::load(&generated.annotations).unwrap();
    // A copy of one frame of each video, as another video: they look the same as their
    // originals, which the split spreads over all parts.
    for i in 0..10 {
        let original = dataset.images[3 * i].clone();
        let copy = format!("copy_{}", original.file_name);
        std::fs::copy(generated.images_dir.join(&original.file_name), generated.images_dir.join(&copy)).unwrap();
        let mut image = original.clone();
        image.id = 1000 + i as u64;
        image.file_name = copy;
        image.extra.insert("video_id".into(), serde_json::json!("copies"));
        dataset.images.push(image);
    }
    for (i, image) in dataset.images.iter_mut().enumerate().take(30) {
        image.extra.insert("video_id".into(), serde_json::json!(format!("v{}", i / 3)));
    }
    let annotations = scratch.path().join("video.json");
    dataset.save(&annotations).unwrap();
    let out = scratch.path().join("out");
    let options = kiln_data::ValidateOptions {
        data: annotations,
        images: Some(generated.images_dir.clone()),
        split: SplitOptions::default(),
        output_dir: Some(out.clone()),
        class_names: None,
    };
    let report = kiln_data::run_validate(&options, &ProgressBar::hidden()).unwrap();
    let text = report.render();
    assert!(report.ok, "{text}");
    let grouping = report.split.as_ref().unwrap().grouping.clone().expect("grouped");
    assert_eq!((grouping.by.as_str(), grouping.groups, grouping.automatic), ("video_id", 11, true));
    assert!(
        text.contains("grouped by video_id (11 groups") && text.contains("frames of a video stay together"),
        "{text}"
    );
    assert_eq!(report.validation.problem("near_duplicate_images").map(|p| p.count), Some(10), "{text}");
    let leaks = report.validation.problem("duplicates_across_splits").expect("the copies sit in another part");
    assert!(leaks.examples[0].contains("copy_"), "{:?}", leaks.examples);
    let markdown = std::fs::read_to_string(out.join("report.md")).unwrap();
    for expected in
        ["# kiln validate", "## Classes", "| index | id | name |", "duplicates_across_splits", "grouped by video_id"]
    {
        assert!(markdown.contains(expected), "missing {expected:?} in report.md:\n{markdown}");
    }
    assert!(report.written.iter().any(|w| w.ends_with("report.md")));
}
