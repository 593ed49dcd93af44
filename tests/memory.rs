//! The memory estimate's probe (`kiln_training::engine::memory`): one training step measured at
//! batch 1 and 2 through the counting allocator, extrapolated; the run's model left as it was.
//! (End to end, against the measured peak of real runs: `cli/tests/cli.rs`.)
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig};
use burn::tensor::{Distribution, Tensor};
use burn::train::{TrainOutput, TrainStep};

use std::sync::Mutex;

use burn::tensor::Device;
use kiln_training::TrainError;
use kiln_training::engine::memory::{CountingAllocator, MemoryPlan, estimate, parameter_counts};

// This test binary counts its heap as the `kiln` binary does; its tests run one at a time, as the
// counts are the process's.
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[derive(Module, Debug)]
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
}

impl TrainStep for ConvBn {
    type Input = Tensor<4>;
    type Output = ();
    fn step(&self, images: Tensor<4>) -> TrainOutput<()> {
        let loss = self.bn.forward(self.conv.forward(images)).powf_scalar(2.0).mean();
        TrainOutput::new(self, loss.backward(), ())
    }
}

fn conv_bn(device: &Device) -> ConvBn {
    ConvBn { conv: Conv2dConfig::new([3, 16], [3, 3]).init(device), bn: BatchNormConfig::new(16).init(device) }
}

#[test]
fn the_step_is_measured_per_image_and_the_model_is_left_as_it_was() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    let model = conv_bn(&device);
    let before = model.bn.running_mean.value().into_data();
    let batch_of = |n: usize| -> Result<Tensor<4>, TrainError> {
        Ok(Tensor::random([n, 3, 64, 64], Distribution::Normal(1.0, 1.0), &device))
    };
    let plan = MemoryPlan { batch_size: 8, optimizer_slots: 2, accumulates: true, ema: true };
    let estimate = estimate(&model, batch_of, plan, &device).unwrap();
    // The BatchNorm statistics the probe's steps moved were a copy's.
    model.bn.running_mean.value().into_data().assert_eq(&before, true);

    let step = estimate.step.expect("the counting allocator is installed");
    // Per image, the step keeps at least the convolution's output (16 x 62 x 62 floats) and
    // not absurdly more (BatchNorm, the square and their gradients: a few copies).
    let output = 16 * 62 * 62 * 4;
    assert!(
        step.per_image_bytes >= output && step.per_image_bytes <= 40 * output,
        "{} bytes per image for a {output}-byte feature map",
        step.per_image_bytes
    );
    let (parameters, trainable) = parameter_counts(&model);
    assert_eq!((estimate.parameters, estimate.trainable_parameters), (parameters, trainable));
    assert_eq!(parameters, 16 * 3 * 9 + 16 + 4 * 16);
    assert_eq!(estimate.optimizer_bytes, 2 * 4 * trainable as u64);
    assert_eq!(estimate.ema_bytes, 4 * parameters as u64);
    assert_eq!(estimate.accumulation_bytes, 4 * trainable as u64);
    assert_eq!(
        estimate.total_bytes,
        estimate.program_and_data_bytes
            + estimate.optimizer_bytes
            + estimate.ema_bytes
            + estimate.accumulation_bytes
            + step.fixed_bytes
            + 8 * step.per_image_bytes
    );
    let parts = estimate.render_parts();
    assert!(parts.contains("one step, batch 8") && parts.contains("EMA of the weights"), "{parts}");
    assert!(estimate.render().starts_with("memory estimate: "), "{}", estimate.render());
}

#[test]
fn frozen_parameters_need_no_optimiser_state() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    let model = conv_bn(&device);
    let frozen = ConvBn { conv: model.conv.clone().no_grad(), bn: model.bn.clone() };
    let (total, trainable) = parameter_counts(&frozen);
    // The convolution's weight and bias, and BatchNorm's running statistics.
    assert_eq!(total - trainable, 16 * 3 * 9 + 16 + 2 * 16);
    // The probe's copy trains what the model trains.
    assert_eq!(parameter_counts(&frozen.valid().train()), (total, trainable));
    let batch_of = |n: usize| -> Result<Tensor<4>, TrainError> {
        Ok(Tensor::random([n, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device))
    };
    let plan = MemoryPlan { batch_size: 1, optimizer_slots: 1, accumulates: false, ema: false };
    let estimate = estimate(&frozen, batch_of, plan, &device).unwrap();
    assert_eq!(estimate.optimizer_bytes, 4 * trainable as u64);
    // At batch 1 the step itself is measured: nothing extrapolated.
    assert_eq!(estimate.step.unwrap().fixed_bytes, 0);
}
