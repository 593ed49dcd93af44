//! kiln's YOLOv8 loss against Ultralytics' `v8SegmentationLoss` on the same head outputs and
//! targets (fixtures from `tests/reference/yolov8_loss_reference.py`): the assigner's choices and
//! soft targets, every loss part, and the gradients with respect to every head output.

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln_models::yolo::head::HeadOutput;
use kiln_training::loss::{LossConfig, Targets, yolo_loss};
use serde_json::Value;

fn dir() -> PathBuf {
    kiln_tests::repo_root().join("tests/fixtures/yolov8_loss")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap()).unwrap()
}

fn read(entry: &Value) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(dir().join(entry["file"].as_str().unwrap())).unwrap();
    let values = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let shape = entry["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    (values, shape)
}

fn tensor4(entry: &Value, device: &Device) -> Tensor<4> {
    let (values, shape) = read(entry);
    Tensor::from_data(TensorData::new(values, [shape[0], shape[1], shape[2], shape[3]]), device)
}

struct Case {
    output: HeadOutput,
    targets: Targets,
    reference: Value,
}

fn case(device: &Device) -> Case {
    let reference = reference();
    let inputs = &reference["inputs"];
    let levels: Vec<Tensor<4>> = (0..3).map(|i| tensor4(&inputs[format!("level{i}")], device).require_grad()).collect();
    let coefficients: Vec<Tensor<4>> =
        (0..3).map(|i| tensor4(&inputs[format!("coefficients{i}")], device).require_grad()).collect();
    let prototypes = tensor4(&inputs["prototypes"], device).require_grad();

    // Pad the instances per image, in their order: image 0 has three, image 1 one.
    let targets: Vec<Vec<f64>> = reference["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect())
        .collect();
    let (masks, mask_shape) = read(&inputs["masks"]);
    let (mh, mw) = (mask_shape[1], mask_shape[2]);
    let (b, m) = (2, 3);
    let mut boxes = vec![0f32; b * m * 4];
    let mut classes = vec![0i64; b * m];
    let mut valid = vec![0f32; b * m];
    let mut padded_masks = vec![0f32; b * m * mh * mw];
    let mut count = [0usize; 2];
    for (k, t) in targets.iter().enumerate() {
        let image = t[0] as usize;
        let slot = image * m + count[image];
        count[image] += 1;
        for c in 0..4 {
            boxes[slot * 4 + c] = t[2 + c] as f32;
        }
        classes[slot] = t[1] as i64;
        valid[slot] = 1.0;
        padded_masks[slot * mh * mw..(slot + 1) * mh * mw].copy_from_slice(&masks[k * mh * mw..(k + 1) * mh * mw]);
    }
    let targets = Targets {
        boxes: Tensor::from_data(TensorData::new(boxes, [b, m, 4]), device),
        classes: Tensor::<2, Int>::from_data(TensorData::new(classes, [b, m]), device),
        valid: Tensor::from_data(TensorData::new(valid, [b, m]), device),
        masks: Some(Tensor::from_data(TensorData::new(padded_masks, [b, m, mh, mw]), device)),
        teacher: None,
    };
    let output = HeadOutput { levels, coefficients: Some(coefficients), prototypes: Some(prototypes) };
    Case { output, targets, reference }
}

fn assert_close(name: &str, got: &[f32], expected: &[f32], relative: f32, absolute: f32) {
    assert_eq!(got.len(), expected.len(), "{name}: length");
    let mut worst = (0.0f32, 0usize);
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let excess = (g - e).abs() - (absolute + relative * e.abs());
        if excess > worst.0 {
            worst = (excess, i);
        }
    }
    let i = worst.1;
    assert!(worst.0 <= 0.0, "{name}: element {i} is {} but Ultralytics gives {}", got[i], expected[i]);
}

#[test]
fn assignment_matches_ultralytics() {
    let device = Device::flex().autodiff();
    let case = case(&device);
    let output = &case.output;
    let [b, _, h0, w0] = output.levels[0].dims();
    let config = LossConfig::default();
    let flat = kiln_training::loss::flatten_levels(&output.levels);
    let a = flat.dims()[1];
    let sizes = [[h0, w0], [h0 / 2, w0 / 2], [h0 / 4, w0 / 4]];
    let (anchors, strides) = kiln_training::loss::anchors(&sizes);
    let boxes = kiln_training::loss::decode_boxes(flat.clone().slice([0..b, 0..a, 0..64]), &anchors, &device);
    let scores = flat.slice([0..b, 0..a, 64..67]);
    let assigned = kiln_training::loss::assign_batch(&config, scores, boxes, &case.targets, anchors, strides).unwrap();

    let (foreground, _) = read(&case.reference["assigned"]["foreground"]);
    let (gt_index, _) = read(&case.reference["assigned"]["target_gt_index"]);
    let (target_scores, _) = read(&case.reference["assigned"]["target_scores"]);
    let ours_fg: Vec<f32> =
        assigned.assignments.iter().flat_map(|x| x.foreground.iter().map(|&f| f as u8 as f32)).collect();
    assert_eq!(ours_fg, foreground, "positive anchors");
    assert!(ours_fg.iter().sum::<f32>() >= 20.0, "the fixture exercises many positives");
    for (i, &f) in foreground.iter().enumerate() {
        if f > 0.5 {
            let (image, anchor) = (i / a, i % a);
            assert_eq!(assigned.assignments[image].target_index[anchor] as f32, gt_index[i], "anchor {i}'s object");
        }
    }
    let ours_scores: Vec<f32> = assigned.assignments.iter().flat_map(|x| x.target_scores.clone()).collect();
    assert_close("target scores", &ours_scores, &target_scores, 1e-4, 1e-6);
}

#[test]
fn loss_parts_and_gradients_match_ultralytics() {
    loss_parts_and_gradients_match_ultralytics_on(Device::flex().autodiff());
}

/// The same loss and gradients on LibTorch's CPU (`--device tch-cpu`), to the same tolerances.
#[cfg(feature = "tch")]
#[test]
fn loss_parts_and_gradients_match_ultralytics_on_libtorch_cpu() {
    loss_parts_and_gradients_match_ultralytics_on(kiln_models::Backend::TchCpu.open().unwrap().autodiff());
}

fn loss_parts_and_gradients_match_ultralytics_on(device: Device) {
    let case = case(&device);
    let out = yolo_loss(&LossConfig::default(), &case.output, &case.targets).unwrap();
    let expected = &case.reference["loss"];
    let parts = [
        ("box", out.parts.box_loss),
        ("seg", out.parts.seg_loss),
        ("cls", out.parts.cls_loss),
        ("dfl", out.parts.dfl_loss),
    ];
    for (name, got) in parts {
        let want = expected[name].as_f64().unwrap() as f32;
        assert!((got - want).abs() <= 1e-4 * want.abs(), "{name} loss: {got} vs Ultralytics {want}");
    }
    // Ultralytics back-propagates the parts' sum times the batch size; the fixture holds the
    // gradients of the sum alone.
    let grads = out.total.backward();
    let batch = 2.0;
    let inputs = case
        .output
        .levels
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("level{i}"), t.clone()))
        .chain(
            case.output
                .coefficients
                .as_ref()
                .unwrap()
                .iter()
                .enumerate()
                .map(|(i, t)| (format!("coefficients{i}"), t.clone())),
        )
        .chain(std::iter::once(("prototypes".to_string(), case.output.prototypes.clone().unwrap())));
    for (name, tensor) in inputs {
        let got: Vec<f32> = tensor
            .grad(&grads)
            .unwrap_or_else(|| panic!("{name} has a gradient"))
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(|g| g / batch)
            .collect();
        let (want, _) = read(&case.reference["gradients"][&name]);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_close(&format!("gradient of {name}"), &got, &want, 1e-3, 1e-5 * scale);
    }
}

#[test]
fn a_batch_without_objects_has_only_a_class_loss() {
    let device = Device::flex().autodiff();
    let mut case = case(&device);
    case.targets.valid = case.targets.valid.zeros_like();
    let out = yolo_loss(&LossConfig::default(), &case.output, &case.targets).unwrap();
    assert_eq!(out.foreground, 0);
    assert_eq!((out.parts.box_loss, out.parts.dfl_loss, out.parts.seg_loss), (0.0, 0.0, 0.0));
    assert!(out.parts.cls_loss > 0.0);
    let grads = out.total.backward();
    assert!(case.output.levels[0].grad(&grads).is_some(), "the class logits still learn");
}
