//! One YOLOv8n-seg training step at 320x320, batch 8, on flex: forward, the full loss (assigner,
//! box, cls, dfl, masks), backward and the optimiser update, as `kiln train-student` runs it.
//! Baseline: the same step in PyTorch with Ultralytics' loss on this machine
//! (`benches/train_step_baseline.py`; numbers in the README).
//!
//! The same step distilled (`distilled_*`), as a distilled run's student takes it: every object a
//! teacher label with class and mask probabilities, and a teacher feature map over the input, so the
//! soft targets and the logit, mask and feature distillation all run: its cost over the supervised
//! step is what distillation adds per step.
//!
//! `cargo bench -p kiln-benches --features models --bench train_step`

use burn::module::Module;
use burn::nn::conv::Conv2dConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use criterion::{Criterion, criterion_group, criterion_main};
use kiln_data::batch::{BatchFeatures, DetectionBatch, TeacherTargets};
use kiln_models::YoloConfig;
use kiln_training::loss::{DistillLoss, LossConfig, Targets, yolo_loss};
use kiln_training::optim::{OptimizerChoice, OptimizerKind, build_optimizer};
use kiln_training::student::Student;

const BATCH: usize = 8;
const SIZE: usize = 320;

/// Three objects per image, with elliptical masks at a quarter of the input size.
fn targets(device: &Device) -> (Tensor<4>, Targets) {
    let images = Tensor::<4>::random([BATCH, 3, SIZE, SIZE], burn::tensor::Distribution::Uniform(0.0, 1.0), device);
    let (m, ms) = (3, SIZE / 4);
    let mut boxes = Vec::new();
    let mut masks = vec![0f32; BATCH * m * ms * ms];
    for b in 0..BATCH {
        for k in 0..m {
            let (x1, y1) = (20.0 + 80.0 * k as f32 + b as f32, 30.0 + 60.0 * k as f32);
            let (x2, y2) = (x1 + 70.0, y1 + 90.0);
            boxes.extend([x1, y1, x2, y2]);
            let (cx, cy, rx, ry) = ((x1 + x2) / 8.0, (y1 + y2) / 8.0, (x2 - x1) / 8.0, (y2 - y1) / 8.0);
            for y in 0..ms {
                for x in 0..ms {
                    let (dx, dy) = ((x as f32 + 0.5 - cx) / rx, (y as f32 + 0.5 - cy) / ry);
                    if dx * dx + dy * dy <= 1.0 {
                        masks[((b * m + k) * ms + y) * ms + x] = 1.0;
                    }
                }
            }
        }
    }
    let classes: Vec<i64> = (0..BATCH * m).map(|i| (i % 3) as i64).collect();
    let targets = Targets {
        boxes: Tensor::from_data(TensorData::new(boxes, [BATCH, m, 4]), device),
        classes: Tensor::<2, Int>::from_data(TensorData::new(classes, [BATCH, m]), device),
        valid: Tensor::ones([BATCH, m], device),
        masks: Some(Tensor::from_data(TensorData::new(masks.clone(), [BATCH, m, ms, ms]), device)),
        teacher: None,
    };
    (images, targets)
}

fn benches(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    let config: YoloConfig = "yolov8n-seg".parse().unwrap();
    let mut model = config.clone().with_num_classes(3).init(&device);
    let choice = OptimizerChoice { kind: OptimizerKind::Sgd, lr0: 0.01, momentum: 0.937 };
    let mut optimizer = build_optimizer(&choice, 5e-4);
    let (images, targets) = targets(&device);
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
    let mut group = c.benchmark_group("yolov8n_seg_train_step");
    group.sample_size(10);
    group.bench_function("flex_batch8_320", |b| {
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
