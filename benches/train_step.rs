//! One YOLOv8n-seg training step at 320x320, batch 8: forward, the full loss (assigner, box, cls,
//! dfl, masks), backward and the optimiser update, as `kiln train-student` runs it, on flex and, in a
//! build with `tch`, on LibTorch's CPU (`tch_cpu_*`). Baseline: the same step in PyTorch with
//! Ultralytics' loss on this machine (`benches/train_step_baseline.py`; numbers in the README).
//!
//! The same step distilled (`distilled_*`, flex), as a distilled run's student takes it: every
//! object a teacher label with class and mask probabilities, and a teacher feature map over the
//! input, so the soft targets and the logit, mask and feature distillation all run: its cost over
//! the supervised step is what distillation adds per step.
//!
//! `cargo bench -p kiln-benches --features models --bench train_step` (`--features tch` after
//! `eval "$(scripts/libtorch.sh)"` adds LibTorch). On a GPU machine (`benches/gpu_check.sh`):
//! `KILN_BENCH_DEVICES=tch,cuda KILN_BENCH_BATCH=16 KILN_BENCH_SIZE=640` picks the devices and the
//! step's size (the distilled step then stays off).

use burn::module::Module;
use burn::nn::conv::Conv2dConfig;
use burn::optim::GradientsParams;
use burn::tensor::Device;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main, measurement::WallTime};
use kiln_data::batch::{BatchFeatures, DetectionBatch, TeacherTargets};
use kiln_models::{Backend, YoloConfig};
use kiln_training::loss::{DistillLoss, LossConfig, yolo_loss};
use kiln_training::optim::{OptimizerChoice, OptimizerKind, build_optimizer};
use kiln_training::student::Student;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The devices to time: `KILN_BENCH_DEVICES` (`cpu,tch-cpu,tch,cuda:0`, ...), or flex and, in a
/// build with `tch`, LibTorch's CPU.
fn devices() -> Vec<(String, Device)> {
    let names = match std::env::var("KILN_BENCH_DEVICES") {
        Ok(list) => list.split(',').map(str::to_string).collect(),
        Err(_) => {
            let mut names = vec!["cpu".to_string()];
            if cfg!(feature = "tch") {
                names.push("tch-cpu".into());
            }
            names
        }
    };
    names
        .iter()
        .map(|name| {
            let backend: Backend = name.parse().unwrap_or_else(|e| panic!("KILN_BENCH_DEVICES: {e}"));
            let device = backend.open().unwrap_or_else(|e| panic!("{backend}: {e}"));
            let label = match backend {
                Backend::Cpu => "flex".to_string(),
                other => other.to_string().replace([':', '-'], "_"),
            };
            (label, device)
        })
        .collect()
}

/// The supervised step on `device` (an autodiff one is made of it).
fn supervised_step(group: &mut BenchmarkGroup<WallTime>, label: &str, device: &Device, batch: usize, size: usize) {
    // As the `kiln` binary runs.
    kiln_models::device::keep_freed_memory();
    let device = device.clone().autodiff();
    let config: YoloConfig = "yolov8n-seg".parse().unwrap();
    let mut model = config.with_num_classes(3).init(&device);
    let choice = OptimizerChoice { kind: OptimizerKind::Sgd, lr0: 0.01, momentum: 0.937 };
    let mut optimizer = build_optimizer(&choice, 5e-4);
    let (images, targets) = kiln_benches::student_step::batch(batch, size, &device);
    let loss_config = LossConfig::default();
    group.bench_function(format!("{label}_batch{batch}_{size}"), |b| {
        b.iter(|| {
            let output = model.forward(images.clone());
            let loss = yolo_loss(&loss_config, &output, &targets).unwrap();
            let grads = GradientsParams::from_grads(loss.total.backward(), &model);
            model = optimizer.step(
                burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate::from(0.01),
                model.clone(),
                grads,
            );
            // Wait for the update: read one weight back.
            let _: f32 = Module::valid(&model).stem.conv.weight.val().sum().into_scalar();
        })
    });
}

fn benches(c: &mut Criterion) {
    let (batch, size) = (setting("KILN_BENCH_BATCH", 8), setting("KILN_BENCH_SIZE", 320));
    let mut group = c.benchmark_group("yolov8n_seg_train_step");
    group.sample_size(10);
    for (label, device) in devices() {
        supervised_step(&mut group, &label, &device, batch, size);
    }
    if std::env::var_os("KILN_BENCH_DEVICES").is_some() {
        group.finish();
        return;
    }
    const BATCH: usize = 8;
    const SIZE: usize = 320;
    let device = Device::flex().autodiff();
    let config: YoloConfig = "yolov8n-seg".parse().unwrap();
    let choice = OptimizerChoice { kind: OptimizerKind::Sgd, lr0: 0.01, momentum: 0.937 };
    let (images, targets) = kiln_benches::student_step::batch(BATCH, SIZE, &device);
    let loss_config = LossConfig::default();
    // Every object as a teacher's: soft class probabilities and its mask as probabilities.
    let (m, ms) = (3, SIZE / 4);
    let masks = kiln_models::device::read_floats(targets.masks.clone().unwrap()).unwrap();
    let teacher = TeacherTargets {
        class_probs: (0..BATCH * m)
            .map(|i| Some((0..3).map(|c| if c == i % 3 { 0.8 } else { 0.1 }).collect()))
            .collect(),
        soft_masks: (0..BATCH * m)
            .map(|i| Some(masks[i * ms * ms..(i + 1) * ms * ms].iter().map(|&v| 0.1 + 0.8 * v).collect()))
            .collect(),
        features: None,
    };

    // The student as a distilled run trains it: with the 1x1 projection of P4 onto a SAM-like
    // embedding of 256 channels over the whole input.
    let grid = SIZE / 16;
    let channels = 256;
    let teacher = TeacherTargets {
        features: Some(BatchFeatures {
            channels,
            grid,
            values: (0..BATCH * channels * grid * grid).map(|i| ((i % 7) as f32 - 3.0) / 2.0).collect(),
            valid: vec![1.0; BATCH * grid * grid],
        }),
        ..teacher
    };
    let batch = DetectionBatch {
        images: images.clone(),
        boxes: targets.boxes.clone(),
        classes: targets.classes.clone(),
        valid: targets.valid.clone(),
        masks: targets.masks.clone(),
        letterboxes: vec![kiln_data::Letterbox::new(SIZE as u32, SIZE as u32, SIZE as u32, SIZE as u32); BATCH],
        image_ids: vec![0; BATCH],
        teacher: Some(teacher),
    };
    let mut student = Student {
        yolo: config.clone().with_num_classes(3).init(&device),
        projection: Some(Conv2dConfig::new([config.channels(512), channels], [1, 1]).init(&device)),
        loss: loss_config,
        distill: Some(DistillLoss { teacher_labels: 1.0, logit: 1.0, temperature: 2.0, mask: 1.0, feature: 1.0 }),
        max_grad_norm: 10.0,
        loss_scaler: None,
    };
    let mut optimizer = build_optimizer(&choice, 5e-4);
    group.bench_function("distilled_flex_batch8_320", |b| {
        b.iter(|| {
            let loss = student.loss(&batch).unwrap();
            assert!(loss.parts.distill_feature_loss > 0.0 && loss.parts.distill_mask_loss > 0.0);
            let grads = GradientsParams::from_grads(loss.total.backward(), &student);
            student = optimizer.step(
                burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate::from(0.01),
                student.clone(),
                grads,
            );
            let _: f32 = Module::valid(&student.yolo).stem.conv.weight.val().sum().into_scalar();
        })
    });
    group.finish();
}

criterion_group!(train_step, benches);
criterion_main!(train_step);
