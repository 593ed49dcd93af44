//! The student as burn-train sees it: YOLOv8 with its loss as the train and validation steps,
//! global-norm gradient clipping in the optimisation step, an exponential moving average of the
//! weights (Ultralytics' `ModelEMA`), and Ultralytics' learning-rate schedule (linear warm-up,
//! then linear decay to `lr0 * lrf`) and optimiser choice (`auto`).

use burn::lr_scheduler::{LrScheduler, LrSchedulerRecord};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamGroup};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::Tensor;
use burn::train::metric::{Adaptor, LossInput};
use burn::train::{InferenceStep, ItemLazy, TrainOutput, TrainStep};
use kiln_data::batch::DetectionBatch;
use kiln_models::yolo::YoloV8;
use serde::{Deserialize, Serialize};

use crate::loss::{LossConfig, LossError, LossParts, Targets, yolo_loss};

#[derive(Module, Debug)]
pub struct Student {
    pub yolo: YoloV8,
    #[module(skip)]
    pub loss: LossConfig,
    /// Largest global gradient norm (Ultralytics clips at 10).
    #[module(skip)]
    pub max_grad_norm: f32,
}

/// What one step reports: the loss (for burn-train's loss metric) and its parts.
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub loss: Tensor<1>,
    pub parts: LossParts,
    pub images: usize,
    /// The step's failure (a device that failed at a read-back): burn-train's steps cannot
    /// return errors, so it travels here and the epoch loop stops on it.
    pub failure: Option<LossError>,
}

impl Adaptor<LossInput> for StepOutput {
    fn adapt(&self) -> LossInput {
        LossInput::new(self.loss.clone())
    }
}

impl ItemLazy for StepOutput {
    fn sync(self) -> Result<Self, burn::tensor::ExecutionError> {
        Ok(Self { loss: self.loss.without_autodiff(), ..self })
    }
}

impl Student {
    /// Forward and loss of a batch, or the device's failure.
    pub fn loss(&self, batch: &DetectionBatch) -> Result<crate::loss::LossOutput, LossError> {
        let output = self.yolo.forward(batch.images.clone());
        yolo_loss(&self.loss, &output, &Targets::from(batch))
    }
}

fn failed_step(batch: &DetectionBatch, error: LossError) -> StepOutput {
    let images = batch.images.dims()[0];
    let loss = Tensor::zeros([1], &batch.images.device().without_autodiff());
    StepOutput { loss, parts: LossParts::default(), images, failure: Some(error) }
}

impl TrainStep for Student {
    type Input = DetectionBatch;
    type Output = StepOutput;

    fn step(&self, batch: DetectionBatch) -> TrainOutput<StepOutput> {
        let images = batch.images.dims()[0];
        let out = match self.loss(&batch) {
            Ok(out) => out,
            Err(error) => return TrainOutput { grads: GradientsParams::new(), item: failed_step(&batch, error) },
        };
        let grads = out.total.backward();
        let loss = out.total.detach() / images as f32;
        TrainOutput::new(self, grads, StepOutput { loss, parts: out.parts, images, failure: None })
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
    type Output = StepOutput;

    fn step(&self, batch: DetectionBatch) -> StepOutput {
        let images = batch.images.dims()[0];
        match self.loss(&batch) {
            Ok(out) => StepOutput { loss: out.total / images as f32, parts: out.parts, images, failure: None },
            Err(error) => failed_step(&batch, error),
        }
    }
}

/// Scales all gradients together so their global L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`: every gradient times `min(1, max_norm / (norm + 1e-6))`;
/// burn's own clipping works per tensor). Computed on the device, so nothing is read back.
pub(crate) fn clip_global_norm<M: Module>(model: &M, grads: &mut GradientsParams, max_norm: f32) {
    struct SquaredNorm<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SquaredNorm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let squares = g.square().sum();
                self.total = Some(match self.total.take() {
                    Some(total) => total + squares,
                    None => squares,
                });
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: Tensor<1>,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                let factor = self.factor.clone().reshape([1; D]);
                self.grads.register(param.id, g * factor);
            }
        }
    }
    let mut norm = SquaredNorm { grads, total: None };
    model.visit(&mut norm);
    let Some(total) = norm.total else { return };
    let factor = (total.sqrt() + 1e-6).recip().mul_scalar(max_norm).clamp_max(1.0);
    model.visit(&mut Scale { grads, factor });
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

/// Which optimiser (`auto` follows Ultralytics: SGD for long runs, AdamW with a rate scaled to the
/// class count for short ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Auto,
    Sgd,
    Adamw,
}

impl std::str::FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "sgd" => Ok(Self::Sgd),
            "adamw" => Ok(Self::Adamw),
            other => Err(format!("unknown optimiser {other:?}: use auto, sgd or adamw")),
        }
    }
}

/// The optimiser actually used and its base learning rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimizerChoice {
    pub kind: OptimizerKind,
    pub lr0: f64,
    pub momentum: f64,
}

/// Resolves `auto` as Ultralytics' `build_optimizer` does: more than 10 000 iterations → SGD at
/// `lr0`; otherwise AdamW at `0.002 * 5 / (4 + nc)` with beta1 0.9.
pub fn choose_optimizer(kind: OptimizerKind, lr0: f64, momentum: f64, iterations: usize, nc: usize) -> OptimizerChoice {
    match kind {
        OptimizerKind::Auto if iterations > 10_000 => OptimizerChoice { kind: OptimizerKind::Sgd, lr0, momentum },
        OptimizerKind::Auto => OptimizerChoice {
            kind: OptimizerKind::Adamw,
            lr0: (0.002 * 5.0 / (4.0 + nc as f64) * 1e6).round() / 1e6,
            momentum: 0.9,
        },
        kind => OptimizerChoice { kind, lr0, momentum },
    }
}

/// Biases, BatchNorm's shift included: Ultralytics' parameter group 0, which warms up from
/// `warmup_bias_lr` instead of 0.
pub fn bias_group() -> ParamGroup {
    ParamGroup::from_any_regexes(vec![r"\.bias$", r"\.beta$"]).expect("valid regexes")
}

/// The optimiser with weight decay on weights only: BatchNorm's scale and shift and every bias
/// are not decayed (Ultralytics' three parameter groups).
pub fn build_optimizer(choice: &OptimizerChoice, weight_decay: f64) -> ModuleOptimizer {
    let no_decay = ParamGroup::from_any_regexes(vec![r"\.bias$", r"\.gamma$", r"\.beta$"]).expect("valid regexes");
    match choice.kind {
        OptimizerKind::Adamw => AdamWConfig::new()
            .with_beta_1(choice.momentum as f32)
            .with_epsilon(1e-8)
            .with_weight_decay(weight_decay as f32)
            .init()
            .with_group(
                no_decay,
                AdamWConfig::new()
                    .with_beta_1(choice.momentum as f32)
                    .with_epsilon(1e-8)
                    .with_weight_decay(0.0)
                    .build(),
                None,
            ),
        _ => {
            let momentum = MomentumConfig::new().with_momentum(choice.momentum).with_dampening(0.0).with_nesterov(true);
            SgdConfig::new()
                .with_momentum(Some(momentum.clone()))
                .with_weight_decay(Some(WeightDecayConfig::new(weight_decay as f32)))
                .init()
                .with_group(no_decay, SgdConfig::new().with_momentum(Some(momentum)).build(), None)
        }
    }
}

/// Ultralytics' schedule per batch: `lr0 * lf(epoch)` with `lf = (1 - e / epochs) * (1 - lrf) + lrf`,
/// reached linearly over the warm-up batches from `warmup_start` (0 for weights; Ultralytics'
/// `warmup_bias_lr`, 0.1, for biases).
#[derive(Debug, Clone)]
pub struct YoloLrSchedule {
    pub lr0: f64,
    pub lrf: f64,
    pub epochs: usize,
    pub iterations_per_epoch: usize,
    pub warmup_iterations: usize,
    pub warmup_start: f64,
    pub step: usize,
}

impl YoloLrSchedule {
    pub fn rate(&self, step: usize) -> f64 {
        let epoch = step / self.iterations_per_epoch.max(1);
        let lf = (1.0 - epoch as f64 / self.epochs as f64) * (1.0 - self.lrf) + self.lrf;
        let target = self.lr0 * lf;
        if step < self.warmup_iterations {
            let t = (step + 1) as f64 / self.warmup_iterations as f64;
            self.warmup_start + (target - self.warmup_start) * t
        } else {
            target
        }
    }
}

impl LrScheduler for YoloLrSchedule {
    fn step(&mut self) -> f64 {
        let rate = self.rate(self.step);
        self.step += 1;
        rate
    }

    fn to_record(&self) -> LrSchedulerRecord {
        LrSchedulerRecord::new().with_scalar("step", self.step)
    }

    fn load_record(&mut self, record: LrSchedulerRecord) {
        if let Some(step) = record.scalar::<usize>("step") {
            self.step = step;
        }
    }
}
