//! YOLOv8 and YOLOv8-seg against Ultralytics: parameter counts of every official scale, official
//! state-dict keys loading as they are, raw head outputs equal within 1e-4 relative, and clear
//! refusals of checkpoints that do not fit. Fixtures: tests/reference/yolov8_reference.py.

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use kiln_models::{Scale, Task, WeightsError, YoloConfig, YoloV8};
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
