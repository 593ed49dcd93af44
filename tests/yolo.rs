//! Import of the Ultralytics YOLO layout: the real coco8-seg folder against its own COCO export,
//! box labels, and bad label files.

use indicatif::ProgressBar;
use kiln_data::{CocoDataset, Segmentation, ValidateOptions, import_yolo, run_validate};
use kiln_tests::{Scratch, coco8_dir};

#[test]
fn coco8_seg_yolo_layout_equals_its_coco_export() {
    let imported = import_yolo(&coco8_dir().join("coco8-seg.yaml")).unwrap();
    let coco = CocoDataset::load(&coco8_dir().join("annotations.json")).unwrap();
    assert_eq!(imported.images_dir, coco8_dir().join("images"));
    let dataset = imported.dataset;
    assert_eq!(dataset.categories.len(), 80);
    for (a, b) in dataset.categories.iter().zip(&coco.categories) {
        assert_eq!((a.id, &a.name), (b.id, &b.name));
    }
    assert_eq!(dataset.images.len(), 8);
    assert_eq!(dataset.annotations.len(), 30);
    for image in &dataset.images {
        let reference = coco.images.iter().find(|i| i.file_name == image.file_name).expect("same file names");
        assert_eq!((image.width, image.height), (reference.width, reference.height));
        let mine: Vec<_> = dataset.annotations.iter().filter(|a| a.image_id == image.id).collect();
        let theirs: Vec<_> = coco.annotations.iter().filter(|a| a.image_id == reference.id).collect();
        assert_eq!(mine.len(), theirs.len(), "{}", image.file_name);
        for (m, t) in mine.iter().zip(&theirs) {
            assert_eq!(m.category_id, t.category_id);
            let (Some(Segmentation::Polygons(pm)), Some(Segmentation::Polygons(pt))) =
                (&m.segmentation, &t.segmentation)
            else {
                panic!("polygons expected")
            };
            assert_eq!(pm[0].len(), pt[0].len());
            for (x, y) in pm[0].iter().zip(&pt[0]) {
                // The YOLO labels keep 6 decimals of normalised coordinates: < 0.01 px here.
                assert!((x - y).abs() < 0.01, "{}: {x} vs {y}", image.file_name);
            }
        }
    }
}

#[test]
fn validate_accepts_the_yolo_layout_directly() {
    let scratch = Scratch::new("yolo-validate");
    let options = ValidateOptions {
        data: coco8_dir(),
        images: None,
        split: Default::default(),
        output_dir: Some(scratch.path().join("out")),
        class_names: None,
    };
    let report = run_validate(&options, &ProgressBar::hidden()).unwrap();
    assert!(report.ok, "{}", report.render());
    assert_eq!(report.format, "yolo");
    assert_eq!(report.repair.bbox_from_mask, 30);
    assert!(scratch.path().join("out/coco8-seg.coco.json").is_file());
}

fn yolo_box_dataset(dir: &std::path::Path, label: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("images/train")).unwrap();
    std::fs::create_dir_all(dir.join("labels/train")).unwrap();
    image::RgbImage::new(200, 100).save(dir.join("images/train/x.png")).unwrap();
    std::fs::write(dir.join("labels/train/x.txt"), label).unwrap();
    let yaml = dir.join("data.yaml");
    std::fs::write(&yaml, "path: .\ntrain: images/train\nnames:\n  0: cat\n  1: dog\n").unwrap();
    yaml
}

#[test]
fn box_labels_become_coco_boxes_in_pixels() {
    let scratch = Scratch::new("yolo-boxes");
    let yaml = yolo_box_dataset(scratch.path(), "1 0.5 0.5 0.2 0.4\n0 0.1 0.2 0.1 0.2\n");
    let dataset = import_yolo(&yaml).unwrap().dataset;
    assert_eq!(dataset.images[0].file_name, "train/x.png");
    assert_eq!(dataset.annotations.len(), 2);
    let first = &dataset.annotations[0];
    assert_eq!(first.category_id, 1);
    assert!(first.segmentation.is_none());
    let expected = [80.0, 30.0, 40.0, 40.0];
    for (got, want) in first.bbox.unwrap().iter().zip(expected) {
        assert!((got - want).abs() < 1e-9, "{:?}", first.bbox);
    }
    assert_eq!(dataset.class_names(), vec!["cat", "dog"]);
}

#[test]
fn bad_label_lines_are_errors_naming_file_and_line() {
    for (label, expected) in [
        ("0 0.5 0.5 0.2 0.4\n5 0.5 0.5 0.2 0.4\n", "line 2: class 5"),
        ("0 0.5 abc 0.2 0.4\n", "line 1: 'abc' is not a number"),
        ("0 0.5 0.5 0.2\n", "line 1: 3 coordinates"),
    ] {
        let scratch = Scratch::new("yolo-bad");
        let yaml = yolo_box_dataset(scratch.path(), label);
        let error = import_yolo(&yaml).err().expect("an error").to_string();
        assert!(error.contains("x.txt") && error.contains(expected), "{error}");
    }
}

/// The yaml's `path` and splits come from a downloaded file: a split or `path` leading outside the
/// yaml's directory (`..`, absolute, a symlink out) is refused with the yaml and the entry named;
/// Roboflow's `../train/images` beside a yaml in the dataset's root is read, as Ultralytics reads
/// it, from `train/images`; `--allow-outside-paths` (the process switch) lets a user through.
#[test]
fn yaml_entries_stay_inside_the_dataset_and_roboflow_layouts_load() {
    let scratch = Scratch::new("yolo-yaml-paths");
    let dir = scratch.path();
    let dataset = dir.join("dataset");
    let yaml = yolo_box_dataset(&dataset, "0 0.5 0.5 0.2 0.4\n");
    // Another dataset outside this one, which a hostile yaml points at.
    let outside = yolo_box_dataset(&dir.join("outside"), "1 0.5 0.5 0.2 0.4\n");
    let outside_images = outside.parent().unwrap().join("images/train");
    std::os::unix::fs::symlink(&outside_images, dataset.join("images/linked")).unwrap();
    let refused = |text: &str, expected: &str| {
        std::fs::write(&yaml, text).unwrap();
        let error = import_yolo(&yaml).err().unwrap_or_else(|| panic!("{text:?} was followed")).to_string();
        assert!(error.contains("data.yaml") && error.contains(expected), "{text:?}: {error}");
        assert!(error.contains("--allow-outside-paths"), "{error}");
    };
    let names = "names:\n  0: cat\n  1: dog\n";
    refused(&format!("train: ../outside/images/train\n{names}"), "climbs out");
    refused(&format!("train: {}\n{names}", outside_images.display()), "is absolute");
    refused(&format!("train: images/linked\n{names}"), "symlink");
    refused(&format!("path: ../outside\ntrain: images/train\n{names}"), "climbs out");

    // Roboflow: `../train/images` and `../valid/images` mean the dataset's own folders.
    let roboflow = dir.join("roboflow");
    for split in ["train", "valid"] {
        std::fs::create_dir_all(roboflow.join(split).join("images")).unwrap();
        std::fs::create_dir_all(roboflow.join(split).join("labels")).unwrap();
        image::RgbImage::new(20, 10).save(roboflow.join(split).join("images/a.png")).unwrap();
        std::fs::write(roboflow.join(split).join("labels/a.txt"), "0 0.5 0.5 0.2 0.4\n").unwrap();
    }
    let data = roboflow.join("data.yaml");
    std::fs::write(&data, format!("train: ../train/images\nval: ../valid/images\nnc: 2\n{names}")).unwrap();
    let imported = import_yolo(&data).unwrap().dataset;
    assert_eq!(imported.images.len(), 2);
    assert_eq!(imported.annotations.len(), 2);

    // The user's switch lets the outside split through.
    std::fs::write(&yaml, format!("train: ../outside/images/train\n{names}")).unwrap();
    kiln_data::paths::set_allow_outside_paths(true);
    let allowed = import_yolo(&yaml);
    kiln_data::paths::set_allow_outside_paths(false);
    assert_eq!(allowed.unwrap().dataset.annotations[0].category_id, 1);
}
