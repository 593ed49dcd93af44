//! kiln's COCO evaluator against pycocotools' COCOeval on the same ground truth and predictions
//! (fixtures from `tests/reference/coco_eval_reference.py`): all 12 summary numbers, per-class AP
//! and the PR curve at IoU 0.5, for boxes and masks.

use kiln_data::CocoDataset;
use kiln_training::eval::{CocoResult, IouType, evaluate};
use serde_json::Value;

const TOLERANCE: f64 = 1e-9;

fn load() -> (CocoDataset, Vec<CocoResult>, Value) {
    let dir = kiln_tests::repo_root().join("tests/fixtures/coco_eval");
    let truth = CocoDataset::load(&dir.join("gt.json")).unwrap();
    let results = serde_json::from_str(&std::fs::read_to_string(dir.join("detections.json")).unwrap()).unwrap();
    let reference = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    (truth, results, reference)
}

fn check(iou_type: IouType, key: &str) {
    let (truth, results, reference) = load();
    let ours = evaluate(&truth, &results, iou_type).unwrap();
    let expected = &reference[key];
    for (i, (got, want)) in ours.stats.iter().zip(expected["stats"].as_array().unwrap()).enumerate() {
        let want = want.as_f64().unwrap();
        assert!((got - want).abs() <= TOLERANCE, "{key} stat {i}: {got} vs pycocotools {want}");
    }
    let per_class = ours.per_class();
    let want_classes = expected["per_class"].as_object().unwrap();
    assert_eq!(per_class.len(), want_classes.len(), "{key}: classes with ground truth");
    for class in per_class {
        let want = &want_classes[&class.category_id.to_string()];
        assert!((class.ap - want["ap"].as_f64().unwrap()).abs() <= TOLERANCE, "{key} class {}", class.category_id);
        assert!((class.ap50 - want["ap50"].as_f64().unwrap()).abs() <= TOLERANCE, "{key} class {}", class.category_id);
    }
    for ((_, got), want) in ours.pr_curve_50().iter().zip(expected["pr50"].as_array().unwrap()) {
        assert!((got - want.as_f64().unwrap()).abs() <= TOLERANCE, "{key}: PR curve");
    }
    // The fixture is not trivial: neither perfect nor empty, and the mask figures differ from the box ones.
    assert!(ours.ap() > 0.3 && ours.ap() < 0.9, "{key}: AP {}", ours.ap());
    assert!(ours.best_f1.precision > 0.0 && ours.best_f1.recall > 0.0 && ours.best_f1.f1 <= 1.0);
}

#[test]
fn box_ap_equals_pycocotools() {
    check(IouType::Bbox, "bbox");
}

#[test]
fn mask_ap_equals_pycocotools() {
    check(IouType::Segm, "segm");
}

#[test]
fn predictions_for_unknown_images_are_refused() {
    let (truth, mut results, _) = load();
    results[0].image_id = 999_999;
    let error = evaluate(&truth, &results, IouType::Bbox).unwrap_err().to_string();
    assert!(error.contains("999999"), "{error}");
}

#[test]
fn perfect_predictions_score_one() {
    let (truth, _, _) = load();
    let results: Vec<CocoResult> = truth
        .annotations
        .iter()
        .filter(|a| a.iscrowd == 0)
        .map(|a| CocoResult {
            image_id: a.image_id,
            category_id: a.category_id,
            bbox: a.bbox.unwrap(),
            score: 0.9,
            segmentation: None,
        })
        .collect();
    let ours = evaluate(&truth, &results, IouType::Bbox).unwrap();
    assert!((ours.ap() - 1.0).abs() < 1e-12 && (ours.ap50() - 1.0).abs() < 1e-12, "{:?}", ours.stats);
}
