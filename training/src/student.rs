//! The student as burn-train sees it: YOLOv8 with its loss as the train and validation steps,
//! global-norm gradient clipping in the optimisation step, and an exponential moving average of
//! the weights (Ultralytics' `ModelEMA`).

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use kiln_data::batch::DetectionBatch;
use kiln_models::yolo::YoloV8;

use crate::engine::StepOutput;
use crate::loss::distill::feature_distillation;
use crate::loss::{DistillLoss, LossConfig, LossError, LossParts, Targets, yolo_loss_distilled};
use crate::optim::{clip_global_norm, scale_gradients, squared_norm};
use burn::nn::conv::Conv2d;

#[derive(Module, Debug)]
pub struct Student {
    pub yolo: YoloV8,
    /// Feature distillation's 1x1 projection of P4 onto the teacher's feature channels: trained
    /// with the student, never part of the saved student (the EMA of `yolo` is what is saved).
    pub projection: Option<Conv2d>,
    #[module(skip)]
    pub loss: LossConfig,
    /// Distillation weights, when the student learns from teachers.
    #[module(skip)]
    pub distill: Option<DistillLoss>,
    /// Largest global gradient norm (Ultralytics clips at 10).
    #[module(skip)]
    pub max_grad_norm: f32,
    /// `--precision f16`'s dynamic loss scaling; none in float32 and bf16.
    #[module(skip)]
    pub loss_scaler: Option<LossScaler>,
}

/// What one step reports: the loss per image and its parts summed over the batch's images.
pub type StudentStep = StepOutput<LossParts>;

impl Student {
    /// Forward and loss of a batch, or the device's failure.
    pub fn loss(&self, batch: &DetectionBatch) -> Result<crate::loss::LossOutput, LossError> {
        let features = batch.teacher.as_ref().and_then(|t| t.features.as_ref());
        match (&self.projection, features, self.distill) {
            (Some(projection), Some(features), Some(distill)) if distill.feature > 0.0 => {
                let (output, [_, p4, _]) = self.yolo.forward_with_features(batch.images.clone());
                let mut out = yolo_loss_distilled(&self.loss, Some(&distill), &output, &Targets::from(batch))?;
                if let Some(term) = feature_distillation(projection.forward(p4), features)? {
                    let images = batch.images.dims()[0] as f32;
                    out.parts.distill_feature_loss =
                        kiln_models::device::read_floats(term.clone())?[0] * distill.feature;
                    out.total = out.total + term * (distill.feature * images);
                }
                Ok(out)
            }
            _ => {
                let output = self.yolo.forward(batch.images.clone());
                yolo_loss_distilled(&self.loss, self.distill.as_ref(), &output, &Targets::from(batch))
            }
        }
    }
}

impl TrainStep for Student {
    type Input = DetectionBatch;
    type Output = StudentStep;

    fn step(&self, batch: DetectionBatch) -> TrainOutput<StudentStep> {
        let images = batch.images.dims()[0];
        let out = match self.loss(&batch) {
            Ok(out) => out,
            Err(error) => {
                let item = StepOutput::failed(error, &batch.images.device());
                return TrainOutput { grads: GradientsParams::new(), item };
            }
        };
        // f16 gradients underflow below ~6e-8: the loss is scaled up before the backward pass and
        // the gradients down again before the step.
        let grads = match &self.loss_scaler {
            Some(scaler) => out.total.clone().mul_scalar(scaler.scale()).backward(),
            None => out.total.backward(),
        };
        let loss = out.total.detach() / images as f32;
        TrainOutput::new(self, grads, StepOutput::new(loss, out.parts, images))
    }

    fn optimize(
        self,
        optim: &mut ModuleOptimizer,
        lr: burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate,
        mut grads: GradientsParams,
    ) -> Self {
        if let Some(scaler) = self.loss_scaler.clone() {
            grads = scale_gradients(grads, &self, 1.0 / scaler.scale() as f64);
            let finite = squared_norm(&self, &grads)
                .map(|total| kiln_models::device::read_floats(total).is_ok_and(|v| v.iter().all(|x| x.is_finite())))
                .unwrap_or(true);
            if !scaler.record(finite) {
                // Overflowed gradients: this step is skipped, the next one runs at half the scale.
                return self;
            }
        }
        clip_global_norm(&self, &mut grads, self.max_grad_norm);
        optim.step(lr, self, grads)
    }
}

/// Dynamic loss scaling for f16 training, as PyTorch's `GradScaler`: the loss is multiplied by the
/// scale before the backward pass, the gradients divided by it before the step; a step whose
/// gradients overflowed (inf or NaN) is skipped and the scale halved, and after `growth_interval`
/// good steps in a row it doubles. Shared by the model's copies (the optimiser rebuilds the
/// module every step). A resumed run starts again from the initial scale.
#[derive(Debug, Clone)]
pub struct LossScaler {
    state: std::sync::Arc<std::sync::Mutex<(f32, u32)>>,
    growth_interval: u32,
}

impl LossScaler {
    pub fn new(initial_scale: f32, growth_interval: u32) -> Self {
        Self { state: std::sync::Arc::new(std::sync::Mutex::new((initial_scale, 0))), growth_interval }
    }

    /// The current scale.
    pub fn scale(&self) -> f32 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Records a step whose gradients were `finite` or not; returns whether the step runs.
    pub fn record(&self, finite: bool) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (scale, good) = &mut *state;
        if !finite {
            *scale = (*scale / 2.0).max(1.0);
            *good = 0;
            return false;
        }
        *good += 1;
        if *good >= self.growth_interval {
            *scale = (*scale * 2.0).min(f32::MAX / 2.0);
            *good = 0;
        }
        true
    }
}

impl InferenceStep for Student {
    type Input = DetectionBatch;
    type Output = StudentStep;

    fn step(&self, batch: DetectionBatch) -> StudentStep {
        let images = batch.images.dims()[0];
        match self.loss(&batch) {
            Ok(out) => StepOutput::new(out.total / images as f32, out.parts, images),
            Err(error) => StepOutput::failed(error, &batch.images.device()),
        }
    }
}

/// Ultralytics' `ModelEMA`: `ema = d * ema + (1 - d) * model` after every optimiser step, with
/// `d = decay * (1 - exp(-updates / tau))` so early weights are not held back; BatchNorm's running
/// statistics are averaged too.
#[derive(Debug, Clone)]
pub struct ModelEma {
    pub model: YoloV8,
    pub updates: usize,
    pub decay: f64,
    pub tau: f64,
}

impl ModelEma {
    pub fn new(model: YoloV8, updates: usize) -> Self {
        Self { model, updates, decay: 0.9999, tau: 2000.0 }
    }

    pub fn update(&mut self, model: &YoloV8) {
        self.updates += 1;
        let d = self.decay * (1.0 - (-(self.updates as f64) / self.tau).exp());
        struct Grab(Vec<Tensor<1>>);
        impl ModuleVisitor for Grab {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                self.0.push(param.val().reshape([-1]));
            }
        }
        struct Blend {
            source: std::vec::IntoIter<Tensor<1>>,
            d: f32,
        }
        impl ModuleMapper for Blend {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let new = self.source.next().expect("the EMA and the model have the same parameters");
                let d = self.d;
                param.map(|old| {
                    let shape = old.shape();
                    old * d + new.reshape(shape) * (1.0 - d)
                })
            }
        }
        // `valid` also folds BatchNorm's pending running-statistics update into its value (burn
        // keeps the last one aside until then), so the EMA sees the statistics as they are.
        let model = Module::valid(model);
        let mut grab = Grab(Vec::new());
        model.visit(&mut grab);
        // Modules are handles to reference-counted tensors: the clone copies no weights.
        self.model = self.model.clone().map(&mut Blend { source: grab.0.into_iter(), d: d as f32 });
    }
}

#[cfg(test)]
mod loss_scaler_tests {
    use super::LossScaler;

    /// PyTorch's GradScaler rule: an overflow skips the step and halves the scale (never below 1),
    /// `growth_interval` good steps in a row double it, an overflow restarts the count; the copies
    /// the optimiser makes share one scale.
    #[test]
    fn overflow_halves_and_skips_good_steps_double() {
        let scaler = LossScaler::new(1024.0, 3);
        let copy = scaler.clone();
        assert!(!scaler.record(false), "an overflowed step is skipped");
        assert_eq!(copy.scale(), 512.0);
        assert!(scaler.record(true) && scaler.record(true));
        assert_eq!(scaler.scale(), 512.0, "two good steps of three");
        assert!(!scaler.record(false));
        assert_eq!(scaler.scale(), 256.0);
        for _ in 0..3 {
            assert!(scaler.record(true));
        }
        assert_eq!(copy.scale(), 512.0, "three good steps in a row");
        let low = LossScaler::new(1.0, 100);
        low.record(false);
        assert_eq!(low.scale(), 1.0);
    }
}
