//! ONNX export of the students against ONNX Runtime: yolov8n (detect) and yolov8n-seg with
//! non-trivial BatchNorm statistics (two training-mode passes), exported by kiln and run by ONNX
//! Runtime (Python, see `support::onnxruntime_python`), must give Burn's outputs within 1e-4
//! relative (per element, `|a - b| ≤ 1e-4 · max(|b|, 1)`: boxes are in pixels, scores near 0);
//! names, metadata and the folded BatchNorm are checked on the file itself.

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use kiln_export::{ExportOptions, onnx_bytes};
use kiln_models::{StudentInfo, YoloConfig, YoloV8};
use kiln_tests::{Scratch, run_onnxruntime};
use onnx_ir::Message;

const SIZE: usize = 160;

fn input(seed: u64, shape: [usize; 4], device: &Device) -> (Tensor<4>, Vec<f32>) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let values: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    (Tensor::from_data(TensorData::new(values.clone(), shape), device), values)
}

/// A student with trained-looking BatchNorm statistics.
fn student(name: &str, classes: usize) -> (YoloV8, StudentInfo) {
    let device = Device::flex();
    let config = name.parse::<YoloConfig>().unwrap().with_num_classes(classes);
    let training = device.clone().autodiff();
    let model = config.init(&training);
    for seed in 0..2 {
        let _ = model.forward(input(seed, [2, 3, 64, 64], &training).0);
    }
    let info = StudentInfo {
        config,
        classes: (0..classes).map(|i| format!("class '{i}'")).collect(),
        category_ids: (1..=classes as u64).collect(),
        imgsz: SIZE as u32,
        weights: Default::default(),
    };
    (model.valid(), info)
}

fn values(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

fn assert_close(name: &str, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{name}: lengths");
    let worst = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0f32, f32::max);
    assert!(worst <= 1e-4, "{name}: worst relative difference {worst:e}");
}

fn check(name: &str, classes: usize) {
    let scratch = Scratch::new(&format!("export-{name}"));
    let device = Device::flex();
    let (model, info) = student(name, classes);
    let options = ExportOptions { imgsz: SIZE as u32, batch: 1, half: false };
    let (onnx, folded) = onnx_bytes(&model, &info, &options, &device).unwrap();
    let path = scratch.path().join("model.onnx");
    std::fs::write(&path, onnx.write_to_bytes().unwrap()).unwrap();

    let graph = onnx.graph.as_ref().unwrap();
    let ops: std::collections::BTreeSet<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
    assert!(folded > 50, "{name}: only {folded} BatchNorms folded");
    assert!(!ops.contains("BatchNormalization"), "{name}: BatchNorm left in the graph: {ops:?}");
    assert!(!ops.contains("ConvTranspose"), "{name}: {ops:?}");
    let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    assert!(!initializers.iter().any(|n| n.contains("running_")), "{name}: BatchNorm statistics left as weights");

    // The exported model still runs: export worked on a copy.
    let (x, raw) = input(7, [1, 3, SIZE, SIZE], &device);
    let output = model.forward(x);
    let decoded = values(model.head.decode(&output, SIZE));
    let run = run_onnxruntime(&path, &[1, 3, SIZE, SIZE], &raw, scratch.path());
    assert_eq!(run.input_names, ["images"]);
    assert_eq!(run.outputs[0].0, "output0");
    let nc = classes;
    let channels = 4 + nc + if info.config.task == kiln_models::Task::Segment { 32 } else { 0 };
    let anchors = (SIZE / 8).pow(2) + (SIZE / 16).pow(2) + (SIZE / 32).pow(2);
    assert_eq!(run.outputs[0].1, [1, channels, anchors]);
    assert_close(&format!("{name} output0"), &decoded, &run.outputs[0].2);
    if let Some(prototypes) = output.prototypes {
        assert_eq!(run.outputs.len(), 2);
        assert_eq!(run.outputs[1].0, "output1");
        assert_eq!(run.outputs[1].1, [1, 32, SIZE / 4, SIZE / 4]);
        let theirs = prototypes.into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
        assert_close(&format!("{name} output1"), &theirs, &run.outputs[1].2);
    } else {
        assert_eq!(run.outputs.len(), 1);
    }
    let names = (0..nc).map(|i| format!("{i}: 'class \\'{i}\\''")).collect::<Vec<_>>().join(", ");
    assert_eq!(run.metadata["names"], format!("{{{names}}}"));
    assert_eq!(run.metadata["imgsz"], format!("[{SIZE}, {SIZE}]"));
    assert_eq!(run.metadata["stride"], "32");
    let task = if nc > 0 && info.config.task == kiln_models::Task::Segment { "segment" } else { "detect" };
    assert_eq!(run.metadata["task"], task);
    assert_eq!(run.metadata["kiln.category_ids"], serde_json::to_string(&info.category_ids).unwrap());
}

#[test]
fn yolov8n_detect_onnx_matches_onnxruntime() {
    check("yolov8n", 3);
}

#[test]
fn yolov8n_seg_onnx_matches_onnxruntime() {
    check("yolov8n-seg", 5);
}
