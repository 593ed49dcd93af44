//! SAM on flex: the image encoder's forward pass for the tiny config (256²) and for vit_b at its
//! real 1024² input (random weights: speed does not depend on their values), and one training step
//! of the tiny SAM's mask decoder with LoRA vs full fine-tuning, with the peak memory each allocates.
//! Baseline: the same encoder forwards in PyTorch with the official segment-anything code on this
//! machine (`benches/sam_baseline.py`; numbers in the README).
//!
//! `cargo bench -p kiln-benches --features models --bench sam`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::{Device, Tensor, TensorData};
use criterion::{Criterion, criterion_group, criterion_main};
use kiln_models::lora::{self, LoraConfig};
use kiln_models::sam::{Sam, SamConfig};
use kiln_training::teacher::mask_loss::{MaskLossConfig, mask_loss};

/// The global allocator, counting the bytes live now and at most since the last reset.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        unsafe { System.dealloc(pointer, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn pixels(size: usize, device: &Device) -> Tensor<4> {
    Tensor::random([1, 3, size, size], burn::tensor::Distribution::Normal(0.0, 1.0), device)
}

const PROMPTS: usize = 16;

/// One training step of the tiny SAM on one image with 16 box prompts: encoder, prompt encoder,
/// decoder, SAM's loss, backward and an AdamW update.
fn train_step(model: Sam, optimizer: &mut burn::optim::ModuleOptimizer, device: &Device) -> Sam {
    let boxes: Vec<f32> = (0..PROMPTS).flat_map(|i| [4.0 * i as f32, 8.0, 60.0 + 8.0 * i as f32, 200.0]).collect();
    let boxes = Tensor::from_data(TensorData::new(boxes, [PROMPTS, 4]), device);
    let embedding = model.embed(pixels(256, device));
    let prediction = model.predict_boxes(embedding, boxes, false);
    let targets = Tensor::<3>::ones([PROMPTS, 64, 64], device);
    let out = mask_loss(
        &MaskLossConfig::default(),
        prediction.masks.reshape([PROMPTS, 64, 64]),
        prediction.iou_predictions.reshape([PROMPTS]),
        targets,
    )
    .expect("the CPU reads the loss back");
    let grads = burn::optim::GradientsParams::from_grads(out.total.backward(), &model);
    optimizer.step(burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate::from(1e-4), model, grads)
}

/// Peak bytes allocated during `steps` training steps, above what was live before.
fn peak_training_memory(model: Sam, device: &Device) -> usize {
    let mut optimizer = burn::optim::AdamWConfig::new().init();
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let mut model = model;
    for _ in 0..3 {
        model = train_step(model, &mut optimizer, device);
    }
    PEAK.load(Ordering::Relaxed) - before
}

fn lora_config() -> LoraConfig {
    LoraConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: ["qkv", "q_proj", "k_proj", "v_proj", "out_proj"].map(String::from).to_vec(),
    }
}

fn benches(c: &mut Criterion) {
    let device = Device::flex();
    let mut group = c.benchmark_group("sam_image_encoder");
    group.sample_size(10);
    let tiny = SamConfig::tiny().init(&device);
    let input = pixels(256, &device);
    group.bench_function("tiny_256", |b| b.iter(|| tiny.embed(input.clone()).into_data()));
    let vit_b = SamConfig::vit_b().init(&device);
    let input = pixels(1024, &device);
    group.bench_function("vit_b_1024", |b| b.iter(|| vit_b.embed(input.clone()).into_data()));
    drop(vit_b);
    group.finish();

    let autodiff = device.clone().autodiff();
    let full = SamConfig::tiny().init(&autodiff);
    let (adapted, summary) = lora::apply(SamConfig::tiny().init(&autodiff), &lora_config(), "sam/tiny", 1).unwrap();
    let full_peak = peak_training_memory(full.clone(), &autodiff);
    let lora_peak = peak_training_memory(adapted.clone(), &autodiff);
    println!(
        "peak memory of a tiny SAM training step (1 image, {PROMPTS} boxes): full fine-tuning {:.1} MiB, \
         LoRA r 8 on encoder qkv + decoder attention {:.1} MiB ({:.0} % of full; {})",
        full_peak as f64 / 1048576.0,
        lora_peak as f64 / 1048576.0,
        100.0 * lora_peak as f64 / full_peak as f64,
        summary.render()
    );
    let mut group = c.benchmark_group("sam_tiny_train_step");
    group.sample_size(10);
    let mut optimizer = burn::optim::AdamWConfig::new().init();
    let mut model = Some(full);
    group.bench_function("full", |b| {
        b.iter(|| model = Some(train_step(model.take().unwrap(), &mut optimizer, &autodiff)))
    });
    let mut optimizer = burn::optim::AdamWConfig::new().init();
    let mut model = Some(adapted);
    group.bench_function("lora", |b| {
        b.iter(|| model = Some(train_step(model.take().unwrap(), &mut optimizer, &autodiff)))
    });
    group.finish();
}

criterion_group!(sam, benches);
criterion_main!(sam);
