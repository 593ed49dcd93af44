//! YOLOv8n-seg at 640x640, batch 1: the network's forward pass on flex, as trained (BatchNorm a
//! pass of its own) and as inference runs it (`flex_folded`: BatchNorm folded into the
//! convolutions), and on wgpu when built with the `wgpu` feature; decode + NMS + masks. Target: ONNX Runtime's latency on the same
//! machine (`benches/yolov8_baseline.py`; numbers in the README).
//!
//! `cargo bench -p kiln-benches --features models --bench yolov8` (add `wgpu` for the GPU path;
//! `-- conv_silu` for the per-layer convolutions only).

use std::hint::black_box;
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use criterion::{Criterion, criterion_group, criterion_main};
use kiln_data::Letterbox;
use kiln_models::{PredictOptions, YoloConfig, YoloV8};

fn model(device: &Device) -> YoloV8 {
    // The reference fixture's weights: random, but with the official key layout and real statistics.
    let weights = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/yolov8/yolov8n-seg.pt");
    let config: YoloConfig = "yolov8n-seg".parse().unwrap();
    YoloV8::load(&config, &weights, device).expect("fixture weights")
}

fn photo() -> image::RgbImage {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/coco8-seg/images/train/000000000025.jpg");
    image::open(&path).unwrap_or_else(|e| panic!("{}: {e} (the bench needs ../shared)", path.display())).into_rgb8()
}

fn input(device: &Device) -> (Tensor<4>, Letterbox) {
    let image = photo();
    let letterbox = Letterbox::new(image.width(), image.height(), 640, 640);
    let canvas = letterbox.apply_image(&image);
    let mut pixels = Vec::with_capacity(3 * 640 * 640);
    for c in 0..3 {
        pixels.extend(canvas.as_raw().iter().skip(c).step_by(3).map(|&v| v as f32 / 255.0));
    }
    (Tensor::from_data(TensorData::new(pixels, [1, 3, 640, 640]), device), letterbox)
}

fn forward(c: &mut Criterion, name: &str, device: Device, fold: bool) {
    // As inference loads a student (`Detector`, `kiln infer`, `kiln bench`): BatchNorms folded.
    let model = if fold { burn::module::Module::valid(&model(&device)).fold_batch_norms() } else { model(&device) };
    forward_model(c, "yolov8n_seg_640", name, &model, &device);
}

fn forward_model(c: &mut Criterion, group: &str, name: &str, model: &YoloV8, device: &Device) {
    let (x, _) = input(device);
    let mut group = c.benchmark_group(group);
    group.sample_size(10);
    group.bench_function(format!("forward_{name}"), |b| {
        b.iter(|| {
            let out = model.forward(black_box(x.clone()));
            // Wait for the device: read one value of every output back.
            let _: f32 = out.prototypes.unwrap().sum().into_scalar();
            for level in out.levels {
                let _: f32 = level.sum().into_scalar();
            }
        })
    });
    group.finish();
}

/// YOLOv8n-seg's convolution shapes at 640² (c_in, c_out, kernel, stride, input side), each as
/// inference runs it: Burn's conv2d with bias, then SiLU (`burn`), against kiln's convolution with
/// the bias and SiLU in its output loop (`fused`, `kiln_models::nn::conv_act`).
fn conv_layers(c: &mut Criterion) {
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;
    use kiln_models::nn::{Activation, conv2d_activation};
    let device = Device::flex();
    let mut group = c.benchmark_group("conv_silu_640");
    group.sample_size(20);
    for (c_in, c_out, kernel, stride, side) in [
        (3, 16, 3, 2, 640),
        (16, 32, 3, 2, 320),
        (16, 16, 3, 1, 160),
        (32, 32, 3, 1, 80),
        (64, 64, 3, 1, 40),
        (128, 128, 3, 1, 20),
        (48, 32, 1, 1, 160),
        (384, 256, 1, 1, 20),
    ] {
        let conv = Conv2dConfig::new([c_in, c_out], [kernel, kernel])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(kernel / 2, kernel / 2, kernel / 2, kernel / 2))
            .init(&device);
        let x = Tensor::<4>::random([1, c_in, side, side], Distribution::Default, &device);
        let name = format!("{c_in}x{c_out}_k{kernel}s{stride}_{side}");
        group.bench_function(format!("{name}_burn"), |b| {
            b.iter(|| {
                let y = burn::tensor::activation::silu(conv.forward(black_box(x.clone())));
                let _: f32 = y.slice([0..1, 0..1, 0..1, 0..1]).into_scalar();
            })
        });
        group.bench_function(format!("{name}_fused"), |b| {
            b.iter(|| {
                let y = conv2d_activation(&conv, black_box(x.clone()), Activation::Silu);
                let _: f32 = y.slice([0..1, 0..1, 0..1, 0..1]).into_scalar();
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    conv_layers(c);
    forward(c, "flex", Device::flex(), false);
    forward(c, "flex_folded", Device::flex(), true);
    // The same folded model on Burn's conv2d + SiLU (kiln's fused convolution off), in this run.
    kiln_models::nn::set_flex_kernels(false);
    forward(c, "flex_folded_burn_conv", Device::flex(), true);
    kiln_models::nn::set_flex_kernels(true);
    // yolov8s-seg (random weights, folded: latency does not depend on the values), both paths.
    let device = Device::flex();
    let small = YoloV8::new(&"yolov8s-seg".parse::<YoloConfig>().unwrap(), &device);
    let small = burn::module::Module::valid(&small).fold_batch_norms();
    forward_model(c, "yolov8s_seg_640", "flex_folded", &small, &device);
    kiln_models::nn::set_flex_kernels(false);
    forward_model(c, "yolov8s_seg_640", "flex_folded_burn_conv", &small, &device);
    kiln_models::nn::set_flex_kernels(true);
    #[cfg(feature = "wgpu")]
    match kiln_models::device::wgpu() {
        Ok(device) => forward(c, "wgpu", device, true),
        Err(error) => eprintln!("wgpu skipped: {error}"),
    }

    let device = Device::flex();
    let model = model(&device);
    let (x, letterbox) = input(&device);
    let output = model.forward(x);
    let options = PredictOptions::default();
    let detections = model.postprocess(&output, &[letterbox], &options).expect("the CPU reads back");
    eprintln!("postprocess bench: {} detections at conf {}", detections[0].len(), options.conf);
    let mut group = c.benchmark_group("yolov8n_seg_640");
    group.sample_size(10);
    group.bench_function("decode_nms_masks_flex", |b| {
        b.iter(|| black_box(model.postprocess(black_box(&output), &[letterbox], &options)))
    });
    group.finish();
}

criterion_group!(yolo, benches);
criterion_main!(yolo);
