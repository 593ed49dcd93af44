//! The measurements of `benches/gpu_check.sh`, one per process (so that the GPU memory the script
//! samples beside it with `nvidia-smi` is this measurement's alone):
//!
//! ```text
//! gpu_check DEVICE WHAT [--quick]
//! ```
//!
//! - DEVICE: `cuda`, `cuda:N`, `tch`, `tch-cpu`, `cpu`, `wgpu` (as `--device` takes them).
//! - WHAT:
//!   - `student-train`: one yolov8n-seg training step, batch 16, 640x640 (forward, YOLOv8 loss with
//!     masks, backward, SGD update), as `kiln train-student` takes it;
//!   - `student-train-bf16`: the same with `--precision bf16` (bf16 convolutions, float32 weights);
//!   - `student-infer`: yolov8n-seg forward, batch 1, 640x640 (the seeds' 8 ms on a GPU);
//!   - `sam-lora`, `sam-full`, `sam-lora-checkpointed`: one SAM vit_b step on one 1024x1024 image with
//!     16 box prompts (image encoder, prompt encoder, decoder, SAM's focal + dice + IoU loss,
//!     backward, AdamW), with kiln's default LoRA targets, every parameter, or LoRA with Burn's
//!     gradient checkpointing;
//!   - `gdino-lora`, `gdino-full`: one GroundingDINO Swin-T OGC step on one 800x1333 image with a
//!     two-class caption (the set loss over every decoder layer and the encoder, backward, AdamW).
//! - `--quick`: the tiny configs at small sizes: a check of this program on the CPU.
//!
//! Prints one line: `WHAT DEVICE median_ms per_second pool_bytes` (the device's memory pools after
//! the steps where Burn reports them, CubeCL; `-` otherwise) after 2 untimed and 5 timed steps.
//!
//! `cargo run --release -p kiln-benches --features tch,cuda --example gpu_check -- cuda sam-lora`

use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use kiln_models::grounding_dino::{CaptionTokenizer, GroundingDinoConfig};
use kiln_models::sam::SamConfig;
use kiln_models::{Backend, YoloConfig};
use kiln_training::loss::{LossConfig, yolo_loss};
use kiln_training::optim::{OptimizerChoice, OptimizerKind, build_optimizer};
use kiln_training::teacher::TeacherConfig;
use kiln_training::teacher::grounding_dino::{ClassCaption, GroundingBatcher, GroundingDinoTeacher, GroundingItem};
use kiln_training::teacher::mask_loss::{MaskLossConfig, mask_loss};

type Rate = burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;

fn usage() -> ! {
    eprintln!(
        "usage: gpu_check DEVICE WHAT [--quick]\n  WHAT: student-train | student-train-bf16 | student-infer | sam-lora | sam-full | \
         sam-lora-checkpointed | gdino-lora | gdino-full"
    );
    std::process::exit(2)
}

/// Median milliseconds of `runs` calls after `warmup` untimed ones.
fn time(warmup: usize, runs: usize, mut step: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        step();
    }
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            step();
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn random_images(batch: usize, h: usize, w: usize, device: &Device) -> Tensor<4> {
    Tensor::random([batch, 3, h, w], burn::tensor::Distribution::Uniform(0.0, 1.0), device)
}

fn student_train(device: &Device, quick: bool, bf16: bool) -> f64 {
    let (batch, size) = if quick { (2, 128) } else { (16, 640) };
    let device = device.clone().autodiff();
    let model = "yolov8n-seg".parse::<YoloConfig>().unwrap().with_num_classes(3).init(&device);
    let mut model = model.with_compute(bf16.then_some(burn::tensor::FloatDType::BF16));
    let choice = OptimizerChoice { kind: OptimizerKind::Sgd, lr0: 0.01, momentum: 0.937 };
    let mut optimizer = build_optimizer(&choice, 5e-4);
    let (images, targets) = kiln_benches::student_step::batch(batch, size, &device);
    let config = LossConfig::default();
    time(2, 5, || {
        let loss = yolo_loss(&config, &model.forward(images.clone()), &targets).expect("the loss reads back");
        let grads = GradientsParams::from_grads(loss.total.backward(), &model);
        model = optimizer.step(Rate::from(0.01), model.clone(), grads);
        let _: f32 = Module::valid(&model).stem.conv.weight.val().sum().into_scalar();
    })
}

fn student_infer(device: &Device, quick: bool) -> f64 {
    let size = if quick { 128 } else { 640 };
    let model = "yolov8n-seg".parse::<YoloConfig>().unwrap().init(device);
    let images = random_images(1, size, size, device);
    time(2, 5, || {
        let out = model.forward(images.clone());
        let _: f32 = out.prototypes.unwrap().sum().into_scalar();
        for level in out.levels {
            let _: f32 = level.sum().into_scalar();
        }
    })
}

fn sam_step(device: &Device, quick: bool, lora: bool, checkpointed: bool) -> f64 {
    let config = if quick { SamConfig::tiny() } else { SamConfig::vit_b() };
    let autodiff = kiln_training::engine::autodiff_device(device, checkpointed);
    let model = config.init(&autodiff);
    let mut model = if lora {
        let lora_config = TeacherConfig::default().sam.expect("SAM defaults").lora;
        kiln_models::lora::apply(model, &lora_config, "sam", 1).expect("the default targets exist").0
    } else {
        model
    };
    let size = model.image_size();
    let side = size / 4;
    let prompts = 16;
    let boxes: Vec<f32> = (0..prompts)
        .flat_map(|i| {
            let s = size as f32 / 256.0;
            [4.0 * i as f32 * s, 8.0 * s, (60.0 + 8.0 * i as f32) * s, 200.0 * s]
        })
        .collect();
    let boxes = Tensor::<2>::from_data(TensorData::new(boxes, [prompts, 4]), &autodiff);
    let pixels = Tensor::random([1, 3, size, size], burn::tensor::Distribution::Normal(0.0, 1.0), &autodiff);
    let targets = Tensor::<3>::ones([prompts, side, side], &autodiff);
    let mut optimizer: ModuleOptimizer = burn::optim::AdamWConfig::new().init();
    time(2, 5, || {
        let prediction = model.predict_boxes(model.embed(pixels.clone()), boxes.clone(), false);
        let loss = mask_loss(
            &MaskLossConfig::default(),
            prediction.masks.reshape([prompts, side, side]),
            prediction.iou_predictions.reshape([prompts]),
            targets.clone(),
        )
        .expect("the loss reads back");
        let grads = GradientsParams::from_grads(loss.total.backward(), &model);
        model = optimizer.step(Rate::from(1e-4), model.clone(), grads);
    })
}

fn gdino_step(device: &Device, quick: bool, lora: bool) -> f64 {
    let (config, (h, w)) =
        if quick { (GroundingDinoConfig::tiny(), (128, 128)) } else { (GroundingDinoConfig::swint_ogc(), (800, 1333)) };
    let autodiff = device.clone().autodiff();
    let tokenizer = CaptionTokenizer::bert_base_uncased().expect("built-in tokenizer");
    let classes = ["cat".to_string(), "dog".to_string()];
    let caption = ClassCaption::new(&tokenizer, &classes, config.max_text_len).expect("a short caption");
    let batcher = GroundingBatcher {
        caption: Arc::new(caption),
        special_ids: tokenizer.special_ids.clone(),
        max_text_len: config.max_text_len,
    };
    let model = config.init(&autodiff);
    let teacher_config = TeacherConfig::default().grounding_dino.expect("GroundingDINO defaults");
    let model = if lora {
        kiln_models::lora::apply(model, &teacher_config.lora, "grounding_dino", 1).expect("the default targets exist").0
    } else {
        model
    };
    let mut teacher =
        GroundingDinoTeacher { model, loss: teacher_config.loss, max_grad_norm: teacher_config.max_grad_norm };
    let item = GroundingItem {
        index: 0,
        image_id: 0,
        pixels: (0..3 * h * w).map(|i| ((i % 97) as f32 - 48.0) / 30.0).collect(),
        size: (h, w),
        original_size: (h, w),
        boxes: vec![[0.3, 0.4, 0.2, 0.3], [0.7, 0.5, 0.25, 0.4]],
        classes: vec![0, 1],
    };
    let batch = burn::data::dataloader::batcher::Batcher::batch(&batcher, vec![item], &autodiff);
    let mut optimizer: ModuleOptimizer = burn::optim::AdamWConfig::new().init();
    time(2, 5, || {
        let (loss, _, _) = teacher.loss(&batch).expect("the loss reads back");
        let grads = GradientsParams::from_grads(loss.backward(), &teacher);
        teacher = optimizer.step(Rate::from(1e-4), teacher.clone(), grads);
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let positional: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let [device_name, what] = positional[..] else { usage() };
    let backend: Backend = device_name.parse().unwrap_or_else(|e| {
        eprintln!("{e}");
        usage()
    });
    let device = backend.open().unwrap_or_else(|e| {
        eprintln!("{backend}: {e}");
        std::process::exit(1)
    });
    let median_ms = match what.as_str() {
        "student-train" => student_train(&device, quick, false),
        "student-train-bf16" => student_train(&device, quick, true),
        "student-infer" => student_infer(&device, quick),
        "sam-lora" => sam_step(&device, quick, true, false),
        "sam-full" => sam_step(&device, quick, false, false),
        "sam-lora-checkpointed" => sam_step(&device, quick, true, true),
        "gdino-lora" => gdino_step(&device, quick, true),
        "gdino-full" => gdino_step(&device, quick, false),
        _ => usage(),
    };
    let pool = device.memory_pool_usage().map(|u| u.bytes_reserved).filter(|&b| b > 0);
    println!(
        "{what} {backend} {median_ms:.2} {:.2} {}",
        1e3 / median_ms,
        pool.map_or("-".to_string(), |b| b.to_string())
    );
}
