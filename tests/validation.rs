//! Every validation problem, each on a small broken file of its own, plus the clean case.

use indicatif::ProgressBar;
use kiln_data::{CocoDataset, Severity, ValidateOptions, Validation, run_validate, validate};
use kiln_tests::Scratch;
use serde_json::{Value, json};
use std::path::Path;

/// A valid two-image dataset, with its images written into `dir`.
fn base(dir: &Path) -> Value {
    // Two different pictures (uniform ones would look the same: near-duplicates).
    image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, 30]))
        .save(dir.join("a.png"))
        .unwrap();
    image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([((x * y) % 256) as u8, 200, (255 - y * 7) as u8]))
        .save(dir.join("b.png"))
        .unwrap();
    json!({
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.png", "width": 32, "height": 32}
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 5, "segmentation": [[2, 2, 20, 2, 20, 12, 2, 12]]},
            {"id": 11, "image_id": 2, "category_id": 9, "bbox": [4, 4, 10, 8]},
            {"id": 12, "image_id": 2, "category_id": 5, "segmentation": {"size": [32, 32], "counts": [100, 20, 904]}}
        ],
        "categories": [{"id": 5, "name": "bolt"}, {"id": 9, "name": "nut"}]
    })
}

fn check(name: &str, edit: impl FnOnce(&mut Value, &Path)) -> Validation {
    let scratch = Scratch::new(&format!("validation-{name}"));
    let mut value = base(scratch.path());
    edit(&mut value, scratch.path());
    let dataset: CocoDataset = serde_json::from_value(value).unwrap();
    validate(&dataset, Some(scratch.path()), &ProgressBar::hidden())
}

fn assert_problem(validation: &Validation, code: &str, severity: Severity, count: usize, first: &str) {
    let problem = validation.problem(code).unwrap_or_else(|| panic!("expected {code}, got {:#?}", validation.problems));
    assert_eq!(problem.severity, severity, "{code}");
    assert_eq!(problem.count, count, "{code}");
    assert!(problem.examples[0].contains(first), "{code}: first example {:?} should name {first}", problem.examples);
}

#[test]
fn clean_dataset_has_no_problems() {
    let validation = check("clean", |_, _| {});
    assert!(validation.problems.is_empty(), "{:#?}", validation.problems);
    let images = validation.images.unwrap();
    assert_eq!((images.listed, images.found, images.decoded), (2, 2, 2));
}

#[test]
fn missing_image() {
    let v = check("missing", |_, dir| std::fs::remove_file(dir.join("b.png")).unwrap());
    assert_problem(&v, "missing_image", Severity::Error, 1, "image 2 (b.png)");
    assert_eq!(v.images.unwrap().found, 1);
}

#[test]
fn corrupt_image() {
    let v = check("corrupt", |_, dir| std::fs::write(dir.join("a.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap());
    assert_problem(&v, "corrupt_image", Severity::Error, 1, "image 1 (a.png)");
}

#[test]
fn image_size_differs_from_json() {
    let v = check("size", |value, _| value["images"][0]["width"] = json!(41));
    assert_problem(&v, "image_size_mismatch", Severity::Error, 1, "image 1 (a.png): file is 40x30, JSON says 41x30");
}

#[test]
fn annotation_on_unknown_image_or_category() {
    let v = check("unknown", |value, _| {
        value["annotations"][0]["image_id"] = json!(77);
        value["annotations"][1]["category_id"] = json!(3);
    });
    assert_problem(&v, "unknown_image", Severity::Error, 1, "annotation 10 (image 77)");
    assert_problem(&v, "unknown_category", Severity::Error, 1, "annotation 11 (category 3)");
}

#[test]
fn duplicate_ids() {
    let v = check("duplicates", |value, _| {
        value["images"][1]["id"] = json!(1);
        value["annotations"][2]["id"] = json!(10);
        value["categories"][1]["id"] = json!(5);
    });
    assert_problem(&v, "duplicate_image_id", Severity::Error, 1, "image 1");
    assert_problem(&v, "duplicate_annotation_id", Severity::Error, 1, "annotation 10");
    assert_problem(&v, "duplicate_category_id", Severity::Error, 1, "category 5");
}

#[test]
fn polygons_with_fewer_than_three_points_or_odd_coordinates() {
    let v = check("short", |value, _| {
        value["annotations"][0]["segmentation"] = json!([[2, 2, 20, 2]]);
        value["annotations"][2]["segmentation"] = json!([[1, 1, 5, 1, 5]]);
    });
    assert_problem(&v, "short_polygon", Severity::Error, 1, "annotation 10");
    assert_problem(&v, "odd_polygon", Severity::Error, 1, "annotation 12");
}

#[test]
fn zero_area_masks_and_boxes() {
    let v = check("zero", |value, _| {
        // A sliver between pixel centres covers no pixel.
        value["annotations"][0]["segmentation"] = json!([[2.1, 2.1, 2.3, 2.1, 2.3, 2.3]]);
        value["annotations"][1]["bbox"] = json!([4, 4, 0, 8]);
    });
    assert_problem(&v, "empty_mask", Severity::Warning, 1, "annotation 10");
    assert_problem(&v, "empty_box", Severity::Warning, 1, "annotation 11");
}

#[test]
fn boxes_outside_the_image() {
    let v = check("outside", |value, _| {
        value["annotations"][1]["bbox"] = json!([40, 4, 10, 8]);
        value["annotations"]
            .as_array_mut()
            .unwrap()
            .push(json!({"id": 13, "image_id": 1, "category_id": 9, "bbox": [30, 20, 15, 5]}));
    });
    assert_problem(&v, "box_outside_image", Severity::Error, 1, "annotation 11");
    assert_problem(&v, "box_crosses_image_border", Severity::Warning, 1, "annotation 13");
}

#[test]
fn categories_without_instances() {
    let v = check("unused", |value, _| {
        value["categories"].as_array_mut().unwrap().push(json!({"id": 30, "name": "washer"}));
    });
    assert_problem(&v, "unused_category", Severity::Warning, 1, "category 30 (washer)");
    assert_eq!(v.errors(), 0);
}

#[test]
fn undecodable_rle_and_labelless_annotations() {
    let v = check("rle", |value, _| {
        value["annotations"][2]["segmentation"] = json!({"size": [32, 32], "counts": [100, 20]});
        value["annotations"].as_array_mut().unwrap().push(json!({"id": 14, "image_id": 1, "category_id": 9}));
    });
    assert_problem(&v, "invalid_rle", Severity::Error, 1, "annotation 12");
    assert_problem(&v, "no_label", Severity::Error, 1, "annotation 14");
}

#[test]
fn malformed_json_is_an_error_naming_the_file_and_nothing_is_written() {
    let scratch = Scratch::new("validation-malformed");
    let path = scratch.path().join("broken.json");
    std::fs::write(&path, b"{\"images\": [{\"id\": 1,}]}").unwrap();
    let options = ValidateOptions {
        data: path.clone(),
        images: Some(scratch.path().to_path_buf()),
        split: Default::default(),
        output_dir: Some(scratch.path().join("out")),
        class_names: None,
    };
    let error = run_validate(&options, &ProgressBar::hidden()).unwrap_err().to_string();
    assert!(error.contains("broken.json") && error.contains("line 1"), "{error}");
    assert!(!scratch.path().join("out").exists());
}

#[test]
fn data_errors_write_nothing_and_say_so() {
    let scratch = Scratch::new("validation-errors-write-nothing");
    let mut value = base(scratch.path());
    value["annotations"][0]["category_id"] = json!(99);
    let path = scratch.path().join("annotations.json");
    std::fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
    let out = scratch.path().join("out");
    let options = ValidateOptions {
        data: path,
        images: None,
        split: Default::default(),
        output_dir: Some(out.clone()),
        class_names: None,
    };
    let report = run_validate(&options, &ProgressBar::hidden()).unwrap();
    assert!(!report.ok && report.written.is_empty());
    assert!(!out.exists());
    assert!(report.render().contains("nothing was written"));
}

/// Instances of the most against the least frequent class: over 10:1 is a warning naming the rare
/// classes (12:1 here), 9:1 is not.
#[test]
fn class_imbalance_warns_above_ten_to_one() {
    let boxes = |bolts: usize| {
        move |value: &mut Value, _: &Path| {
            let mut annotations: Vec<Value> = (0..bolts)
                .map(|i| json!({"id": 100 + i, "image_id": 1, "category_id": 5, "bbox": [1, 1, 4 + i % 5, 4]}))
                .collect();
            annotations.push(json!({"id": 99, "image_id": 2, "category_id": 9, "bbox": [4, 4, 10, 8]}));
            value["annotations"] = Value::Array(annotations);
        }
    };
    let v = check("imbalance-12", boxes(12));
    assert_problem(&v, "class_imbalance", Severity::Warning, 1, "nut (1)");
    assert!(v.problem("class_imbalance").unwrap().message.contains("max:min 12.0:1"), "{:#?}", v.problems);
    let v = check("imbalance-9", boxes(9));
    assert!(v.problem("class_imbalance").is_none(), "{:#?}", v.problems);
}

/// A re-encoded, slightly brighter copy of an image is found as its near-duplicate; the two
/// different pictures are not.
#[test]
fn near_duplicate_images_are_found() {
    let v = check("duplicates", |value, dir| {
        let copy = image::open(dir.join("a.png")).unwrap().brighten(6).to_rgb8();
        copy.save(dir.join("c.jpg")).unwrap();
        value["images"].as_array_mut().unwrap().push(json!({"id": 3, "file_name": "c.jpg", "width": 40, "height": 30}));
        value["annotations"]
            .as_array_mut()
            .unwrap()
            .push(json!({"id": 13, "image_id": 3, "category_id": 9, "bbox": [4, 4, 10, 8]}));
    });
    assert_problem(&v, "near_duplicate_images", Severity::Warning, 1, "image 1 (a.png) ~ image 3 (c.jpg)");
    assert_eq!(v.near_duplicates, vec![(0, 2)]);
}
