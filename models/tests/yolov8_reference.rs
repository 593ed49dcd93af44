//! YOLOv8 and YOLOv8-seg against Ultralytics: parameter counts of every official scale, official
//! state-dict keys loading as they are, raw head outputs equal within 1e-4 relative, and clear
//! refusals of checkpoints that do not fit. Fixtures: tests/reference/yolov8_reference.py.

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use kiln_models::yolo::predict::Detection;
use kiln_models::{PredictOptions, Scale, Task, WeightsError, YoloConfig, YoloV8};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/yolov8")
}

fn reference() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("reference.json")).expect("fixture")).unwrap()
}

fn read_tensor(entry: &Value) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(fixtures().join(entry["file"].as_str().unwrap())).unwrap();
    let values = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let shape = entry["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    (values, shape)
}

fn assert_close(name: &str, got: Tensor<4>, want: &Value) {
    let (expected, shape) = read_tensor(want);
    assert_eq!(got.dims().to_vec(), shape, "{name}: shape");
    let got = got.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-4 * scale, "{name}: max abs difference {worst} > 1e-4 x max |value| {scale}");
}

#[test]
fn parameter_counts_equal_ultralytics_for_every_scale() {
    let reference = reference();
    let device = Device::flex();
    for (name, count) in reference["parameters"].as_object().unwrap() {
        let config: YoloConfig = name.parse().unwrap();
        let model = config.init(&device);
        assert_eq!(kiln_models::parameter_count(&model) as u64, count.as_u64().unwrap(), "{name}");
    }
}

fn check_model(name: &str) {
    let reference = reference();
    let device = Device::flex();
    let entry = &reference["models"][name];
    let config: YoloConfig = name.parse().unwrap();
    let model = YoloV8::load(&config, &fixtures().join(entry["checkpoint"].as_str().unwrap()), &device)
        .unwrap_or_else(|e| panic!("{e}"));
    let (input, shape) = read_tensor(&reference["input"]);
    let input: Tensor<4> = Tensor::from_data(TensorData::new(input, [shape[0], shape[1], shape[2], shape[3]]), &device);
    let output = model.forward(input);
    let outputs = &entry["outputs"];
    for (i, level) in output.levels.into_iter().enumerate() {
        assert_close(&format!("{name} level {i}"), level, &outputs[format!("level{i}")]);
    }
    if config.task == Task::Segment {
        for (i, c) in output.coefficients.expect("seg head").into_iter().enumerate() {
            assert_close(&format!("{name} coefficients {i}"), c, &outputs[format!("coefficients{i}")]);
        }
        assert_close(&format!("{name} prototypes"), output.prototypes.expect("seg head"), &outputs["prototypes"]);
    } else {
        assert!(output.coefficients.is_none() && output.prototypes.is_none());
    }
}

#[test]
fn yolov8n_raw_outputs_match_ultralytics() {
    check_model("yolov8n");
}

#[test]
fn yolov8n_seg_raw_outputs_match_ultralytics() {
    check_model("yolov8n-seg");
}

fn mismatch(config: YoloConfig, checkpoint: &str) -> String {
    match YoloV8::load(&config, &fixtures().join(checkpoint), &Device::flex()) {
        Err(error @ WeightsError::Mismatch { .. }) => error.to_string(),
        Err(other) => panic!("expected a key report, got {other}"),
        Ok(_) => panic!("{config} accepted {checkpoint}"),
    }
}

#[test]
fn checkpoints_that_do_not_fit_are_refused_with_a_key_report() {
    let wrong_task = mismatch("yolov8n-seg".parse().unwrap(), "yolov8n.pt");
    assert!(
        wrong_task.contains("yolov8n.pt")
            && wrong_task.contains("53 missing")
            && wrong_task.contains("model.22.cv4.0.0.conv.weight"),
        "{wrong_task}"
    );
    let extra = mismatch("yolov8n".parse().unwrap(), "yolov8n-seg.pt");
    assert!(extra.contains("unexpected") && extra.contains("model.22.cv4"), "{extra}");
    let wrong_scale = mismatch(YoloConfig::yolov8(Scale::S, Task::Detect, 80), "yolov8n.pt");
    assert!(wrong_scale.contains("mis-shaped") && wrong_scale.contains("yolov8s"), "{wrong_scale}");
    let wrong_classes = mismatch(YoloConfig::yolov8(Scale::N, Task::Detect, 3), "yolov8n.pt");
    assert!(wrong_classes.contains("model.22.cv3.0.2.weight"), "{wrong_classes}");
    let missing =
        YoloV8::load(&"yolov8n".parse().unwrap(), &fixtures().join("nope.pt"), &Device::flex()).err().unwrap();
    assert!(missing.to_string().contains("nope.pt: cannot read the checkpoint"), "{missing}");
}

#[test]
fn model_names_parse_and_print() {
    for name in ["yolov8n", "yolov8x-seg", "fastsam-s", "fastsam-x"] {
        assert_eq!(name.parse::<YoloConfig>().unwrap().to_string(), name);
    }
    assert_eq!("fastsam-s".parse::<YoloConfig>().unwrap().num_classes, 1);
    assert!("yolov9n".parse::<YoloConfig>().is_err());
    assert!("yolov8q".parse::<YoloConfig>().is_err());
}

fn letterbox_of(entry: &Value, input_shape: &[usize]) -> kiln_data::Letterbox {
    let original: Vec<u32> =
        entry["original_shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    kiln_data::Letterbox::new(original[1], original[0], input_shape[3] as u32, input_shape[2] as u32)
}

fn options_of(entry: &Value) -> PredictOptions {
    PredictOptions {
        conf: entry["conf"].as_f64().unwrap() as f32,
        iou: entry["iou"].as_f64().unwrap() as f32,
        max_det: entry["max_det"].as_u64().unwrap() as usize,
        ..Default::default()
    }
}

/// Detections against Ultralytics': the same set (this random-weight model scores some boxes
/// identically, and the order of equal scores is arbitrary in both), each matched by class, score
/// within 1e-4 and box within `box_tolerance` px; masks with IoU > 0.99.
fn assert_detections(name: &str, got: &[Detection], entry: &Value, box_tolerance: f32) {
    let expected = entry["detections"].as_array().unwrap();
    assert!(expected.len() >= 5, "{name}: the fixture has detections to compare");
    assert_eq!(got.len(), expected.len(), "{name}: number of detections");
    let original: Vec<u32> =
        entry["original_shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let masks = entry.get("masks").map(|m| m.as_array().unwrap().clone());
    let mut used = vec![false; got.len()];
    for (i, e) in expected.iter().enumerate() {
        let e: Vec<f32> = e.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let found = got.iter().enumerate().position(|(j, d)| {
            !used[j]
                && d.class_id == e[5] as usize
                && (d.score - e[4]).abs() < 1e-4
                && (0..4).all(|k| (d.bbox[k] - e[k]).abs() <= box_tolerance)
        });
        let j = found.unwrap_or_else(|| {
            let summary: Vec<_> = got.iter().map(|d| (d.bbox, d.score, d.class_id)).collect();
            panic!("{name}: no detection matches Ultralytics' #{i} {e:?}; got {summary:?}")
        });
        used[j] = true;
        if let Some(masks) = &masks {
            let reference =
                kiln_data::Rle::from_compressed(masks[i].as_str().unwrap(), original[0], original[1]).unwrap().decode();
            let mask = got[j].mask.as_ref().expect("segmentation masks");
            let iou = mask.iou(&reference);
            assert!(iou > 0.99, "{name} #{i}: mask IoU {iou} (areas {} vs {})", mask.area(), reference.area());
        }
    }
}

fn check_postprocess(name: &str) {
    let reference = reference();
    let entry = &reference["models"][name];
    let input_shape: Vec<usize> =
        reference["input_shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let letterbox = letterbox_of(entry, &input_shape);
    let options = options_of(entry);
    let device = Device::flex();
    let config: YoloConfig = name.parse().unwrap();
    let model = YoloV8::load(&config, &fixtures().join(entry["checkpoint"].as_str().unwrap()), &device).unwrap();

    // 1. Decoding on the device equals Ultralytics' eval output.
    let (input, shape) = read_tensor(&reference["input"]);
    let input: Tensor<4> = Tensor::from_data(TensorData::new(input, [shape[0], shape[1], shape[2], shape[3]]), &device);
    let output = model.forward(input);
    let decoded = model.head.decode(&output, input_shape[2]);
    let (expected, decoded_shape) = read_tensor(&entry["decoded"]);
    assert_eq!(decoded.dims().to_vec(), decoded_shape);
    let got = decoded.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-4 * scale, "{name} decoded: max abs difference {worst} vs max {scale}");

    // 2. NMS, masks and the way back to the original image, on Ultralytics' own decoded values:
    //    exact up to float rounding.
    let anchors = decoded_shape[2];
    let candidates = kiln_models::yolo::predict::non_max_suppression(&expected, config.num_classes, anchors, &options);
    let prototypes = (config.task == Task::Segment).then(|| read_tensor(&entry["outputs"]["prototypes"]));
    let detections = kiln_models::yolo::predict::finish(
        candidates,
        prototypes.as_ref().map(|(p, s)| (p.as_slice(), (s[2], s[3]))),
        &letterbox,
    );
    assert_detections(name, &detections, entry, 1e-3);

    // 3. End to end through kiln's own forward pass: boxes within 1e-2 px.
    let end_to_end = model.postprocess(&output, &[letterbox], &options).unwrap().remove(0);
    assert_detections(&format!("{name} end-to-end"), &end_to_end, entry, 1e-2);
}

#[test]
fn yolov8n_detections_match_ultralytics() {
    check_postprocess("yolov8n");
}

#[test]
fn yolov8n_seg_detections_and_masks_match_ultralytics() {
    check_postprocess("yolov8n-seg");
}

#[test]
fn gflops_match_ultralytics_within_one_percent() {
    let reference = reference();
    for (name, gflops) in reference["gflops_640"].as_object().unwrap() {
        let config: YoloConfig = name.parse().unwrap();
        let cost = config.init(&Device::flex()).cost(640, 640);
        let (ours, theirs) = (cost.flops / 1e9, gflops.as_f64().unwrap());
        // Ultralytics counts the fused model's bias additions too; the convolutions are the rest.
        assert!((ours - theirs).abs() <= 0.01 * theirs, "{name}: {ours:.3} GFLOPs vs Ultralytics {theirs:.3}");
    }
}

#[test]
fn safetensors_with_official_keys_load_like_the_pytorch_file() {
    use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
    let device = Device::flex();
    let config: YoloConfig = "yolov8n-seg".parse().unwrap();
    let model = YoloV8::load(&config, &fixtures().join("yolov8n-seg.pt"), &device).unwrap();
    // Write the weights as Ultralytics' state dict would be in safetensors: `model.<i>.` keys,
    // PyTorch's BatchNorm names.
    let path = std::env::temp_dir().join(format!("kiln-yolov8n-seg-{}.safetensors", std::process::id()));
    let mut store = SafetensorsStore::from_file(&path).with_to_adapter(BurnToPyTorchAdapter);
    for (official, ours) in YoloV8::key_prefixes().iter().take(kiln_models::yolo::LAYER_NAMES.len()) {
        store = store.with_key_remapping(format!("^{}", ours.replace('.', r"\.")), official.clone());
    }
    model.save_into(&mut store).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    for key in ["model.0.bn.weight", "model.22.cv2.0.0.conv.weight", "model.22.proto.upsample.weight"] {
        assert!(header.get(key).is_some(), "the file holds the official key {key}");
    }
    let reloaded = YoloV8::load(&config, &path, &device).unwrap_or_else(|e| panic!("{e}"));
    std::fs::remove_file(&path).unwrap();
    let x: Tensor<4> = Tensor::from_data(TensorData::new(vec![0.5f32; 3 * 64 * 64], [1, 3, 64, 64]), &device);
    let (a, b) = (model.forward(x.clone()), reloaded.forward(x));
    for (p, q) in a.levels.into_iter().zip(b.levels) {
        assert_eq!(p.into_data().try_to_vec::<f32>().unwrap(), q.into_data().try_to_vec::<f32>().unwrap());
    }
}

/// The validator's NMS (`multi_label=True`: every class above the threshold at an anchor is a
/// candidate) against Ultralytics' on random anchors of 3 classes: the same detections, and more
/// than the predictor's best-class NMS keeps from the same anchors.
#[test]
fn multi_label_nms_matches_ultralytics_validator() {
    let reference = reference();
    let entry = &reference["multi_label_nms"];
    let rows: Vec<Vec<f32>> = entry["decoded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect())
        .collect();
    let anchors = rows[0].len();
    let decoded: Vec<f32> = rows.concat();
    let classes = entry["classes"].as_u64().unwrap() as usize;
    let options = PredictOptions {
        conf: entry["conf"].as_f64().unwrap() as f32,
        iou: entry["iou"].as_f64().unwrap() as f32,
        multi_label: true,
        ..Default::default()
    };
    let got = kiln_models::yolo::predict::non_max_suppression(&decoded, classes, anchors, &options);
    let expected = entry["detections"].as_array().unwrap();
    assert_eq!(got.len(), expected.len(), "number of detections");
    for row in expected {
        let v: Vec<f32> = row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let found = got.iter().any(|c| {
            c.class_id == v[5] as usize
                && (c.score - v[4]).abs() < 1e-6
                && c.bbox.iter().zip(&v[..4]).all(|(a, b)| (a - b).abs() < 1e-4)
        });
        assert!(found, "Ultralytics' detection {v:?} is kiln's too");
    }
    let best_class_only = kiln_models::yolo::predict::non_max_suppression(
        &decoded,
        classes,
        anchors,
        &PredictOptions { multi_label: false, ..options },
    );
    assert!(best_class_only.len() < got.len(), "{} vs {}", best_class_only.len(), got.len());
    assert_eq!(PredictOptions::validation().max_det, 300);
    assert!(PredictOptions::validation().multi_label && !PredictOptions::default().multi_label);
}
