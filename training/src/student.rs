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
use crate::optim::clip_global_norm;
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
        let grads = out.total.backward();
        let loss = out.total.detach() / images as f32;
        TrainOutput::new(self, grads, StepOutput::new(loss, out.parts, images))
    }

    fn optimize(
        self,
        optim: &mut ModuleOptimizer,
        lr: burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate,
        mut grads: GradientsParams,
    ) -> Self {
        clip_global_norm(&self, &mut grads, self.max_grad_norm);
        optim.step(lr, self, grads)
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
