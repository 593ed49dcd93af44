//! One yolov8n-seg training step on flex (batch 8, 320x320, SGD: `benches/train_step.rs`'s
//! supervised step) split into its phases, and with `KILN_PROFILE=1` the time of each kiln kernel
//! and of each convolution shape (forward, input gradient, weight gradient) per step:
//!
//!     cargo run --release -p kiln-benches --features models --example step_breakdown
//!     KILN_PROFILE=1 target/release/examples/step_breakdown
//!
//! Means over 10 steps after 2 warm-up steps. What the profile leaves out of a phase is Burn's:
//! autodiff bookkeeping, concatenations and slices, upsampling, the loss's tensor operations.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Device;
use kiln_models::YoloConfig;
use kiln_training::loss::{LossConfig, yolo_loss};
use kiln_training::optim::{OptimizerChoice, OptimizerKind, build_optimizer};
use std::time::Instant;

const WARM_UP: usize = 2;
const STEPS: usize = 10;

fn main() {
    let device = Device::flex().autodiff();
    let config: YoloConfig = "yolov8n-seg".parse().expect("a known model");
    let mut model = config.with_num_classes(3).init(&device);
    let choice = OptimizerChoice { kind: OptimizerKind::Sgd, lr0: 0.01, momentum: 0.937 };
    let mut optimizer = build_optimizer(&choice, 5e-4);
    let (images, targets) = kiln_benches::student_step::batch(8, 320, &device);
    let loss_config = LossConfig::default();
    // forward, loss, backward, optimizer, the whole step: milliseconds summed over STEPS.
    let mut sums = [0f64; 5];
    for step in 0..WARM_UP + STEPS {
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
    }
    let [forward, loss, backward, optimizer, step] = sums.map(|s| s / STEPS as f64);
    println!(
        "yolov8n-seg training step, batch 8, 320x320, flex: forward {forward:.0} ms, loss {loss:.0} ms, \
         backward {backward:.0} ms, optimizer {optimizer:.0} ms, step {step:.0} ms"
    );
    if kiln_models::nn::profile::enabled() {
        println!("\n{}", kiln_models::nn::profile::report(STEPS));
    }
}
