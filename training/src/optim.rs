//! Optimisers and learning-rate schedules shared by every training run: Ultralytics' optimiser
//! choice (`auto`) and parameter groups (no weight decay on biases and norms), a per-batch schedule
//! with a linear warm-up then a linear decay to `lr0 * lrf`, and global-norm gradient clipping.

use burn::lr_scheduler::{LrScheduler, LrSchedulerRecord};
use burn::module::{Module, ModuleVisitor, Param, ParamGroup};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

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

impl OptimizerChoice {
    /// Tensors the optimiser keeps per trainable parameter: AdamW's two moments, SGD's velocity.
    pub fn state_slots(&self) -> usize {
        match self.kind {
            OptimizerKind::Sgd if self.momentum == 0.0 => 0,
            OptimizerKind::Sgd => 1,
            OptimizerKind::Adamw | OptimizerKind::Auto => 2,
        }
    }
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

/// The schedule per batch (Ultralytics'; the teachers use it too): `lr0 * lf(epoch)` with `lf = (1 - e / epochs) * (1 - lrf) + lrf`,
/// reached linearly over the warm-up batches from `warmup_start` (0 for weights; Ultralytics'
/// `warmup_bias_lr`, 0.1, for biases).
#[derive(Debug, Clone)]
pub struct WarmupLinearSchedule {
    pub lr0: f64,
    pub lrf: f64,
    pub epochs: usize,
    pub iterations_per_epoch: usize,
    pub warmup_iterations: usize,
    pub warmup_start: f64,
    /// Batches of warm-up already counted at the first batch: 0 is Ultralytics'
    /// `np.interp(ni, [0, nw], ...)` (the first batch at `warmup_start`), 1 gives the first batch
    /// `1 / warmup_iterations` of the way (the teachers).
    pub lead: usize,
    pub step: usize,
}

impl WarmupLinearSchedule {
    pub fn rate(&self, step: usize) -> f64 {
        let epoch = step / self.iterations_per_epoch.max(1);
        let lf = (1.0 - epoch as f64 / self.epochs as f64) * (1.0 - self.lrf) + self.lrf;
        let target = self.lr0 * lf;
        if step < self.warmup_iterations {
            let t = (step + self.lead) as f64 / self.warmup_iterations as f64;
            self.warmup_start + (target - self.warmup_start) * t
        } else {
            target
        }
    }
}

impl LrScheduler for WarmupLinearSchedule {
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

/// Every gradient of `module`'s parameters times `factor`.
pub fn scale_gradients<M: burn::module::Module>(
    mut grads: GradientsParams,
    module: &M,
    factor: f64,
) -> GradientsParams {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl burn::module::ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<D>>) {
            if let Some(grad) = self.grads.remove::<D>(param.id) {
                self.grads.register::<D>(param.id, grad.mul_scalar(self.factor));
            }
        }
    }
    module.visit(&mut Scale { grads: &mut grads, factor });
    grads
}

/// Scales all gradients together so their global L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`: every gradient times `min(1, max_norm / (norm + 1e-6))`;
/// burn's own clipping works per tensor). Computed on the device, so nothing is read back.
pub fn clip_global_norm<M: Module>(model: &M, grads: &mut GradientsParams, max_norm: f32) {
    let Some(total) = squared_norm(model, grads) else { return };
    let factor = (total.sqrt() + 1e-6).recip().mul_scalar(max_norm).clamp_max(1.0);
    model.visit(&mut ScaleBy { grads, factor });
}

/// The sum of the squares of every gradient of `model` (on the device; none without gradients).
pub fn squared_norm<M: Module>(model: &M, grads: &GradientsParams) -> Option<Tensor<1>> {
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
    let mut norm = SquaredNorm { grads, total: None };
    model.visit(&mut norm);
    norm.total
}

/// Every gradient times a factor computed on the device.
struct ScaleBy<'a> {
    grads: &'a mut GradientsParams,
    factor: Tensor<1>,
}

impl ModuleVisitor for ScaleBy<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            let factor = self.factor.clone().reshape([1; D]);
            self.grads.register(param.id, g * factor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::WarmupLinearSchedule;

    /// Ultralytics 8.4's rates per batch `ni` for 30 epochs of 20 batches, lr0 0.003, lrf 0.01,
    /// a 60-batch warm-up: `np.interp(ni, [0, 60], [start, 0.003 * lf(epoch)])`, then `lf(epoch)`
    /// (the weights start at 0, the biases at `warmup_bias_lr` 0.1).
    #[test]
    fn the_student_schedule_is_ultralytics_per_batch() {
        let schedule = |warmup_start| WarmupLinearSchedule {
            lr0: 0.003,
            lrf: 0.01,
            epochs: 30,
            iterations_per_epoch: 20,
            warmup_iterations: 60,
            warmup_start,
            lead: 0,
            step: 0,
        };
        let lf = |epoch: f64| (1.0 - epoch / 30.0) * 0.99 + 0.01;
        let (weights, biases) = (schedule(0.0), schedule(0.1));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(weights.rate(0), 0.0) && close(biases.rate(0), 0.1));
        assert!(close(weights.rate(19), 0.003 * 19.0 / 60.0), "{}", weights.rate(19));
        assert!(close(weights.rate(45), 0.003 * lf(2.0) * 0.75));
        assert!(close(biases.rate(45), 0.1 + (0.003 * lf(2.0) - 0.1) * 0.75));
        assert!(close(weights.rate(60), 0.003 * lf(3.0)) && close(biases.rate(60), 0.003 * lf(3.0)));
        assert!(close(weights.rate(599), 0.003 * lf(29.0)));
        let none = WarmupLinearSchedule { warmup_iterations: 0, ..schedule(0.1) };
        assert!(close(none.rate(0), 0.003), "no warm-up: the scheduled rate from the first batch");
    }
}
