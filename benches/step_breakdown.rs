//! One yolov8n-seg training step on flex (batch 8, 320x320, SGD: `benches/train_step.rs`'s
//! supervised step) split into its phases, and with `KILN_PROFILE=1` the time of each kiln kernel
//! and of each convolution shape (forward, input gradient, weight gradient) per step:
//!
//!     cargo run --release -p kiln-benches --features models --example step_breakdown
//!     KILN_PROFILE=1 target/release/examples/step_breakdown
//!
//! Means over 20 steps after 2 warm-up steps. What the profile leaves out of a phase is Burn's:
//! autodiff bookkeeping, concatenations and slices, upsampling, the loss's tensor operations.
//! Each step runs on this thread as `Student::step` runs it; `KILN_STEP_ON=worker` runs them on a
//! pool worker (`kiln_models::nn::on_flex_workers_training`), `KILN_STEP_ON=alternate` one each
//! way in turn and prints both means.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Device;
use kiln_models::YoloConfig;
use kiln_training::loss::{LossConfig, yolo_loss};
use kiln_training::optim::{OptimizerChoice, OptimizerKind, build_optimizer};
use std::time::Instant;

const WARM_UP: usize = 2;
const STEPS: usize = 20;

fn main() {
    kiln_models::device::keep_freed_memory();
    let device = Device::flex().autodiff();
    let config: YoloConfig = "yolov8n-seg".parse().expect("a known model");
    let mut model = config.with_num_classes(3).init(&device);
    let choice = OptimizerChoice { kind: OptimizerKind::Sgd, lr0: 0.01, momentum: 0.937 };
    let mut optimizer = build_optimizer(&choice, 5e-4);
    let (images, targets) = kiln_benches::student_step::batch(8, 320, &device);
    let loss_config = LossConfig::default();
    // forward, loss, backward, optimizer, the whole step: milliseconds summed over STEPS.
    let mut sums = [0f64; 5];
    let mode = std::env::var("KILN_STEP_ON").unwrap_or_default();
    let mut by_thread = [0f64; 2];
    for step in 0..WARM_UP + STEPS {
        let mut body = || {
            if step == WARM_UP {
                kiln_models::nn::profile::reset();
            }
            let start = Instant::now();
            let output = model.forward(images.clone());
            let forward = Instant::now();
            let loss = yolo_loss(&loss_config, &output, &targets).expect("the loss of a valid batch");
            let _: f32 = loss.total.clone().into_scalar();
            let loss_end = Instant::now();
            let grads = loss.total.backward();
            let backward = Instant::now();
            let grads = GradientsParams::from_grads(grads, &model);
            let rate = burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate::from(0.01);
            model = optimizer.step(rate, model.clone(), grads);
            let _: f32 = Module::valid(&model).stem.conv.weight.val().sum().into_scalar();
            let end = Instant::now();
            if step >= WARM_UP {
                let phases = [forward - start, loss_end - forward, backward - loss_end, end - backward, end - start];
                for (sum, phase) in sums.iter_mut().zip(phases) {
                    *sum += phase.as_secs_f64() * 1000.0;
                }
            }
        };
        let t = Instant::now();
        // As `Student::step` runs it: on this thread; `KILN_STEP_ON=worker` on a pool worker,
        // `alternate` both, step by step (even steps on this thread), to compare the two.
        let on_worker = match mode.as_str() {
            "worker" => true,
            "alternate" => step % 2 == 1,
            _ => false,
        };
        if on_worker {
            kiln_models::nn::on_flex_workers_training(&device, body)
        } else {
            body()
        }
        if step >= WARM_UP {
            by_thread[step % 2] += t.elapsed().as_secs_f64() * 1000.0;
        }
    }
    let [forward, loss, backward, optimizer, step] = sums.map(|s| s / STEPS as f64);
    println!(
        "yolov8n-seg training step, batch 8, 320x320, flex: forward {forward:.0} ms, loss {loss:.0} ms, \
         backward {backward:.0} ms, optimizer {optimizer:.0} ms, step {step:.0} ms"
    );
    if mode == "alternate" {
        let [caller, worker] = by_thread.map(|sum| sum / (STEPS / 2) as f64);
        println!("steps on this thread {caller:.0} ms, on a pool worker {worker:.0} ms");
    }
    if kiln_models::nn::profile::enabled() {
        println!("\n{}", kiln_models::nn::profile::report(STEPS));
    }
}
