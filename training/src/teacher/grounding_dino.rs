//! Fine-tuning GroundingDINO on a COCO dataset with boxes (the official training code is not
//! released; the recipe follows Open-GroundingDino and mmdetection): the caption is every class name
//! of the dataset ("name1 . name2 . … ."), each ground-truth box is positive on its class's tokens,
//! Hungarian matching and the set loss of [`super::grounding_loss`] on every decoder layer and the
//! encoder proposals, AdamW with a lower rate for the backbone and BERT, global-norm clipping, a
//! horizontal flip. LoRA adapts the Linear layers named in the config (the base stays frozen and
//! untouched); `full_finetune` trains everything instead.
//!
//! A run directory (`teachers/grounding_dino_train/`) holds `results.csv`, `results.png`,
//! `val_boxes.jpg` and `checkpoint/`; the best adapter by validation box mAP50-95 goes to
//! `teachers/grounding_dino_lora/{adapter_model.safetensors, adapter_config.json}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::{Dataset, DatasetError};
use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::module::{Module, ParamGroup};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use burn::train::{InferenceStep, Learner, TrainOutput, TrainStep};
use kiln_data::batch::CocoDetectionDataset;
use kiln_data::rng::SeededRng;
use kiln_models::device::DeviceError;
use kiln_models::grounding_dino::postprocess::{GroundedBox, PostprocessOptions, grounded_boxes};
use kiln_models::grounding_dino::{
    Caption, CaptionTokenizer, Encoded, GroundingDino, GroundingDinoConfig, ImageBatch, TextBatch, prepare_pixels,
};
use kiln_models::lora::{self, AdapterConfig, LoraConfig, LoraSummary};

use super::{TeacherOutput, teacher_schedule};
use serde::{Deserialize, Serialize};

use crate::augment::AugmentConfig;
use crate::data::EpochCounter;
use crate::engine::memory::{MemoryEstimate, MemoryPlan};
use crate::engine::{FitSettings, NoTaskState, StepOutput, TrainTask, Validation, Verbosity};
use crate::error::{AtPath, TrainError};
use crate::eval::{CocoResult, IouType, evaluate};
use crate::optim::{OptimizerChoice, OptimizerKind, build_optimizer, clip_global_norm};
use crate::teacher::grounding_loss::{GroundingLossConfig, GroundingLossParts, GroundingTarget, head_loss};

/// The GroundingDINO teacher's settings (the `grounding_dino:` section of `teacher_config.yaml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroundingDinoTeacherConfig {
    /// `swint_ogc`, `swint_minilm`, `tiny_minilm` or `tiny`.
    pub model: String,
    /// The pretrained model (`groundingdino_swint_ogc.pth` or a kiln safetensors); none: a random
    /// initialisation from `seed` (only meaningful for tests and the demo).
    pub weights: Option<PathBuf>,
    /// A Hugging Face BERT (`model.safetensors`) to use as the text encoder instead of the one in
    /// `weights`, e.g. all-MiniLM-L6-v2 for the `*_minilm` models.
    pub text_encoder: Option<PathBuf>,
    /// The WordPiece `tokenizer.json`; none: kiln's built-in bert-base-uncased vocabulary.
    pub tokenizer: Option<PathBuf>,
    /// Short side of the network input (800 in the official recipe) and the long side's limit.
    pub image_size: usize,
    pub max_size: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr0: f64,
    /// The rate of the backbone and BERT relative to `lr0` (the official recipe's 1e-5 vs 1e-4).
    pub backbone_lr_scale: f64,
    pub lrf: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    pub max_grad_norm: f32,
    pub patience: usize,
    pub seed: u64,
    /// Probability of a horizontal flip.
    pub hflip: f64,
    /// Light and camera changes and the vertical flip chosen by `--objects` / `--environment`
    /// (`crate::characteristics`; the other parameters do not apply to the teachers): none by default.
    #[serde(default = "AugmentConfig::none", skip_serializing_if = "AugmentConfig::is_none")]
    pub augment: AugmentConfig,
    pub box_threshold: f32,
    pub text_threshold: f32,
    pub loss: GroundingLossConfig,
    pub lora: LoraConfig,
    #[serde(default)]
    pub full_finetune: bool,
    /// Keep BERT frozen in a full fine-tuning too (Open-GroundingDino's `freeze_keywords=['bert']`).
    #[serde(default = "yes")]
    pub freeze_text_encoder: bool,
    /// Recompute memory-bound activations (norms, activations, reshapes) in the backward pass
    /// instead of keeping them: Burn's autodiff checkpointing (`Balanced`), applied to the whole
    /// model; less memory for some extra compute. Off by default.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

fn yes() -> bool {
    true
}

impl GroundingDinoTeacherConfig {
    /// Whether the model has no weights to start from and is no tiny preset: only the tiny ones
    /// (tests and the demo) train or run from a random initialisation.
    pub fn lacks_weights(&self) -> bool {
        self.weights.is_none() && !self.model.starts_with("tiny")
    }

    pub fn postprocess(&self) -> PostprocessOptions {
        PostprocessOptions { box_threshold: self.box_threshold, text_threshold: self.text_threshold }
    }
}

pub fn gdino_config(name: &str) -> Result<GroundingDinoConfig, TrainError> {
    GroundingDinoConfig::from_name(name).ok_or_else(|| {
        TrainError::Config(format!("unknown GroundingDINO {name:?}: use swint_ogc, swint_minilm, tiny_minilm or tiny"))
    })
}

/// The base model's name in adapter files (`grounding_dino/swint_ogc`, ...).
pub fn base_name(config: &GroundingDinoTeacherConfig) -> String {
    format!("grounding_dino/{}", config.model)
}

/// The adapter's record of its base: the weight files' SHA-256 (and the text encoder's), or the
/// seed of a random init.
pub fn base_hash(config: &GroundingDinoTeacherConfig) -> Result<String, TrainError> {
    let hash = |p: &Path| Ok::<_, TrainError>(lora::file_sha256(p)?);
    let main = match &config.weights {
        Some(path) => hash(path)?,
        None => format!("random-init:{}", config.seed),
    };
    Ok(match &config.text_encoder {
        Some(path) => format!("{main}+{}", hash(path)?),
        None => main,
    })
}

/// The base for the (non-autodiff) `device`, on the autodiff device when `trainable`.
pub fn load_base(
    config: &GroundingDinoTeacherConfig,
    device: &Device,
    trainable: bool,
) -> Result<GroundingDino, TrainError> {
    let model_config = gdino_config(&config.model)?;
    let autodiff = crate::engine::autodiff_device(device, config.gradient_checkpointing);
    let target = if trainable { &autodiff } else { device };
    let model = match &config.weights {
        Some(path) => GroundingDino::load(&model_config, path, config.text_encoder.as_deref(), target)?,
        None => {
            let model = crate::engine::init_seeded(config.seed, &autodiff, |on| model_config.init(on));
            let model = match &config.text_encoder {
                Some(path) => GroundingDino {
                    bert: kiln_models::grounding_dino::BertModel::load(&model_config.bert, path, &autodiff)?,
                    ..model
                },
                None => model,
            };
            if trainable { model } else { model.valid() }
        }
    };
    Ok(model)
}

/// The tokenizer of `config`: its file, or the built-in bert-base-uncased one.
pub fn load_tokenizer(config: &GroundingDinoTeacherConfig) -> Result<CaptionTokenizer, TrainError> {
    let result = match &config.tokenizer {
        Some(path) => CaptionTokenizer::from_file(path),
        None => CaptionTokenizer::bert_base_uncased(),
    };
    result.map_err(|e| TrainError::Config(e.to_string()))
}

/// The caption of a dataset's classes, tokenised, with each class's tokens.
#[derive(Debug, Clone)]
pub struct ClassCaption {
    pub caption: Caption,
    pub encoded: Encoded,
    pub class_tokens: Vec<Vec<usize>>,
}

impl ClassCaption {
    pub fn new(tokenizer: &CaptionTokenizer, classes: &[String], max_text_len: usize) -> Result<Self, TrainError> {
        let caption = Caption::from_names(classes).map_err(|e| TrainError::Config(e.to_string()))?;
        if caption.phrases.len() != classes.len() {
            return Err(TrainError::Config("every class needs a non-empty name: GroundingDINO reads the names".into()));
        }
        let encoded = tokenizer.encode(&caption.text).map_err(|e| TrainError::Config(e.to_string()))?;
        if encoded.ids.len() > max_text_len {
            return Err(TrainError::Config(format!(
                "the caption of the {} class names is {} tokens, more than GroundingDINO's {max_text_len}: \
                 shorten the names or train on fewer classes",
                classes.len(),
                encoded.ids.len()
            )));
        }
        let class_tokens = tokenizer.phrase_tokens(&caption, &encoded);
        if let Some(i) = class_tokens.iter().position(Vec::is_empty) {
            return Err(TrainError::Config(format!("class {:?} has no tokens in the caption", classes[i])));
        }
        Ok(Self { caption, encoded, class_tokens })
    }
}

/// One image as the teacher sees it.
#[derive(Debug, Clone)]
pub struct GroundingItem {
    pub index: usize,
    pub image_id: u64,
    pub pixels: Vec<f32>,
    /// `(h, w)` of the network input.
    pub size: (usize, usize),
    pub original_size: (usize, usize),
    /// Normalised cx cy w h.
    pub boxes: Vec<[f32; 4]>,
    pub classes: Vec<usize>,
}

/// Images of a split, resized (and flipped at random when training).
pub struct GroundingDataset {
    pub source: Arc<CocoDetectionDataset>,
    pub image_size: usize,
    pub max_size: usize,
    pub hflip: Option<(f64, u64, EpochCounter)>,
    /// Training only: the photometric changes and vertical flip of `crate::augment`.
    pub augment: AugmentConfig,
}

impl Dataset<GroundingItem> for GroundingDataset {
    fn get(&self, index: usize) -> Result<GroundingItem, DatasetError> {
        let index = match &self.hflip {
            // A new order every epoch, reproducible from (seed, epoch), so a resumed run sees the same.
            Some((_, seed, epoch)) => {
                let mut order: Vec<usize> = (0..self.source.len()).collect();
                SeededRng::new(*seed).fork(epoch.get() as u64).shuffle(&mut order);
                order[index]
            }
            None => index,
        };
        self.load(index).map_err(DatasetError::new)
    }

    fn len(&self) -> usize {
        self.source.len()
    }
}

impl GroundingDataset {
    pub fn load(&self, index: usize) -> Result<GroundingItem, TrainError> {
        let item = self.source.load(index)?;
        let (w, h) = (item.image.width() as f32, item.image.height() as f32);
        let flip = match &self.hflip {
            Some((p, seed, epoch)) => {
                SeededRng::new(*seed).fork((epoch.get() as u64) << 32 | index as u64).fork(1).chance(*p)
            }
            None => false,
        };
        let mut image = if flip { image::imageops::flip_horizontal(&item.image) } else { item.image };
        let mut flip_vertically = false;
        if let Some((_, seed, epoch)) = &self.hflip {
            let mut rng = SeededRng::new(*seed).fork((epoch.get() as u64) << 32 | index as u64).fork(2);
            flip_vertically = self.augment.flipud > 0.0 && rng.chance(self.augment.flipud);
            if flip_vertically {
                image = image::imageops::flip_vertical(&image);
            }
            crate::augment::photometric(&mut image, &self.augment, &mut rng)?;
        }
        let (pixels, size) = prepare_pixels(&image, self.image_size, self.max_size);
        let boxes = item
            .instances
            .iter()
            .map(|i| {
                let [x1, y1, x2, y2] = i.bbox.map(|v| v as f32);
                let (x1, x2) = if flip { (w - x2, w - x1) } else { (x1, x2) };
                let (y1, y2) = if flip_vertically { (h - y2, h - y1) } else { (y1, y2) };
                [(x1 + x2) / 2.0 / w, (y1 + y2) / 2.0 / h, (x2 - x1) / w, (y2 - y1) / h]
            })
            .collect();
        Ok(GroundingItem {
            index,
            image_id: item.image_id,
            pixels,
            size,
            original_size: (h as usize, w as usize),
            boxes,
            classes: item.instances.iter().map(|i| i.class).collect(),
        })
    }
}

/// A batch: the images, the caption repeated, and the targets.
#[derive(Clone, Debug)]
pub struct GroundingBatch {
    pub images: Arc<ImageBatch>,
    pub text: Arc<TextBatch>,
    pub targets: Vec<GroundingTarget>,
    pub items: Vec<(usize, u64, (usize, usize))>,
}

#[derive(Clone)]
pub struct GroundingBatcher {
    pub caption: Arc<ClassCaption>,
    pub special_ids: Vec<u32>,
    pub max_text_len: usize,
}

impl Batcher<GroundingItem, GroundingBatch> for GroundingBatcher {
    fn batch(&self, items: Vec<GroundingItem>, device: &Device) -> GroundingBatch {
        let planar: Vec<(Vec<f32>, (usize, usize))> = items.iter().map(|i| (i.pixels.clone(), i.size)).collect();
        let encoded: Vec<&Encoded> = items.iter().map(|_| &self.caption.encoded).collect();
        GroundingBatch {
            images: Arc::new(ImageBatch::from_planar(&planar, device)),
            text: Arc::new(TextBatch::new(&encoded, &self.special_ids, self.max_text_len, device)),
            targets: items
                .iter()
                .map(|i| GroundingTarget {
                    boxes: i.boxes.clone(),
                    tokens: i.classes.iter().map(|&c| self.caption.class_tokens[c].clone()).collect(),
                })
                .collect(),
            items: items.iter().map(|i| (i.index, i.image_id, i.original_size)).collect(),
        }
    }
}

/// GroundingDINO as burn-train sees it.
#[derive(Module, Debug)]
pub struct GroundingDinoTeacher {
    pub model: GroundingDino,
    #[module(skip)]
    pub loss: GroundingLossConfig,
    #[module(skip)]
    pub max_grad_norm: f32,
}

/// One step's loss (per batch) and its parts.
pub type GroundingStepOutput = StepOutput<GroundingLossParts>;

impl GroundingDinoTeacher {
    /// The set loss over every decoder layer plus the encoder proposals (weighted), its parts
    /// (of the last layer, for reporting), and the forward pass's output.
    pub fn loss(
        &self,
        batch: &GroundingBatch,
    ) -> Result<(Tensor<1>, GroundingLossParts, kiln_models::grounding_dino::GroundingDinoOutput), DeviceError> {
        let out = self.model.forward(&batch.images, &batch.text);
        let mask = batch.text.token_mask.clone();
        let mut total: Option<Tensor<1>> = None;
        let mut last = GroundingLossParts::default();
        for layer in &out.layers {
            let (loss, parts) =
                head_loss(&self.loss, layer.logits.clone(), layer.boxes.clone(), mask.clone(), &batch.targets)?;
            total = Some(total.map_or(loss.clone(), |t| t + loss));
            last = parts;
        }
        let (encoder_loss, _) =
            head_loss(&self.loss, out.encoder.logits.clone(), out.encoder.boxes.clone(), mask, &batch.targets)?;
        let total = total.expect("at least one decoder layer") + encoder_loss * self.loss.encoder_weight;
        Ok((total, last, out))
    }
}

impl TrainStep for GroundingDinoTeacher {
    type Input = GroundingBatch;
    type Output = GroundingStepOutput;

    fn step(&self, batch: GroundingBatch) -> TrainOutput<GroundingStepOutput> {
        let (loss, parts, _) = match self.loss(&batch) {
            Ok(loss) => loss,
            Err(error) => {
                let item = StepOutput::failed(error, &batch.images.pixels.device());
                return TrainOutput { grads: GradientsParams::new(), item };
            }
        };
        let grads = loss.backward();
        TrainOutput::new(self, grads, StepOutput::new(loss.detach(), parts, batch.items.len()))
    }

    fn optimize(
        self,
        optim: &mut burn::optim::ModuleOptimizer,
        lr: burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate,
        mut grads: GradientsParams,
    ) -> Self {
        clip_global_norm(&self, &mut grads, self.max_grad_norm);
        optim.step(lr, self, grads)
    }
}

impl InferenceStep for GroundingDinoTeacher {
    type Input = GroundingBatch;
    type Output = GroundingStepOutput;

    fn step(&self, batch: GroundingBatch) -> GroundingStepOutput {
        match self.loss(&batch) {
            Ok((loss, parts, _)) => StepOutput::new(loss, parts, batch.items.len()),
            Err(error) => StepOutput::failed(error, &batch.images.pixels.device()),
        }
    }
}

/// One epoch's figures (epoch 0: the starting point).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GroundingEpochRecord {
    pub epoch: usize,
    pub train_loss: f32,
    pub train: GroundingLossParts,
    pub val_loss: f32,
    pub val_map50: f64,
    pub val_map: f64,
    pub lr: f64,
    pub seconds: f64,
}

impl crate::engine::EpochRecord for GroundingEpochRecord {
    const CSV_HEADER: &'static str =
        "epoch,train/loss,train/class,train/l1,train/giou,val/loss,val/box_mAP50,val/box_mAP50-95,lr,seconds";

    fn csv_row(&self) -> String {
        format!(
            "{},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{:.7},{:.1}",
            self.epoch,
            self.train_loss,
            self.train.class,
            self.train.bbox,
            self.train.giou,
            self.val_loss,
            self.val_map50,
            self.val_map,
            self.lr,
            self.seconds
        )
    }
}

#[derive(Debug, Clone)]
pub struct GroundingTrainSummary {
    pub history: Vec<GroundingEpochRecord>,
    pub start_map50: f64,
    pub best_map50: f64,
    pub best_map: f64,
    pub best_epoch: usize,
    pub lora: LoraSummary,
    pub adapter_dir: PathBuf,
    pub adapter_bytes: u64,
    pub base_bytes: u64,
    pub stopped_early: bool,
    pub seconds: f64,
    /// The memory estimate made when the run started (none when resumed).
    pub memory: Option<MemoryEstimate>,
    /// The run stopped after its memory estimate (`--dry-run`): nothing trained.
    pub dry_run: bool,
}

impl GroundingTrainSummary {
    fn dry_run(memory: Option<MemoryEstimate>, lora: LoraSummary, adapter_dir: PathBuf) -> Self {
        Self {
            history: Vec::new(),
            start_map50: 0.0,
            best_map50: 0.0,
            best_map: 0.0,
            best_epoch: 0,
            lora,
            adapter_dir,
            adapter_bytes: 0,
            base_bytes: 0,
            stopped_early: false,
            seconds: 0.0,
            memory,
            dry_run: true,
        }
    }
}

pub struct GroundingRunOptions {
    pub config: GroundingDinoTeacherConfig,
    pub run_dir: PathBuf,
    pub adapter_dir: PathBuf,
    pub device: Device,
    /// Devices beside `device` that take a share of every step (data parallelism).
    pub data_parallel: Vec<Device>,
    pub resume: bool,
    pub verbosity: Verbosity,
    pub stop_after_epochs: Option<usize>,
    /// Stop after the memory estimate, before the first step.
    pub dry_run: bool,
}

pub struct GroundingData {
    pub train: Arc<CocoDetectionDataset>,
    pub val: Arc<CocoDetectionDataset>,
    pub classes: Vec<String>,
    pub category_ids: Vec<u64>,
}

const SHOWN_IMAGES: usize = 8;

/// Fine-tunes GroundingDINO (LoRA or fully) on `data`.
pub fn train_grounding_dino(
    options: GroundingRunOptions,
    data: GroundingData,
) -> Result<GroundingTrainSummary, TrainError> {
    let GroundingRunOptions {
        config,
        run_dir,
        adapter_dir,
        device,
        data_parallel,
        resume,
        verbosity,
        stop_after_epochs,
        dry_run,
    } = options;
    if config.epochs == 0 || config.batch_size == 0 {
        return Err(TrainError::Config("--epochs and --batch-size must be at least 1".into()));
    }
    if data.train.len() == 0 || data.val.len() == 0 {
        return Err(TrainError::Config("the training and validation sets both need images".into()));
    }
    let checkpoint_dir = run_dir.join("checkpoint");
    let resume_from =
        if resume { crate::engine::resume_point(&checkpoint_dir, GroundingTask::CHECKPOINT_FILES) } else { None };
    std::fs::create_dir_all(&run_dir).at(&run_dir)?;
    let model_config = gdino_config(&config.model)?;
    let tokenizer = load_tokenizer(&config)?;
    let caption = Arc::new(ClassCaption::new(&tokenizer, &data.classes, model_config.max_text_len)?);

    let autodiff = crate::engine::autodiff_device(&device, config.gradient_checkpointing);
    let base = load_base(&config, &device, true)?;
    let base_hash = base_hash(&config)?;
    let base_bytes = match &config.weights {
        Some(path) => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        None => 4 * kiln_models::parameter_count(&base) as u64,
    };
    let status = |message: &str| {
        if verbosity == Verbosity::Progress {
            eprintln!("{message}");
        }
    };
    let (model, lora_summary) = if config.full_finetune {
        let total = kiln_models::parameter_count(&base);
        let text = kiln_models::parameter_count(&base.bert);
        if config.freeze_text_encoder {
            let bert = ParamGroup::from_regex(r"^bert\.").expect("valid regex");
            (base.freeze_group(bert), LoraSummary { adapted: Vec::new(), trainable: total - text, total })
        } else {
            (base, LoraSummary { adapted: Vec::new(), trainable: total, total })
        }
    } else {
        let (model, summary) = lora::apply(base, &config.lora, &base_name(&config), config.seed.wrapping_add(1))?;
        status(&format!("GroundingDINO {}: {}", config.model, summary.render()));
        (model, summary)
    };

    let epoch_counter = EpochCounter::default();
    let train_dataset = Arc::new(GroundingDataset {
        source: data.train.clone(),
        image_size: config.image_size,
        max_size: config.max_size,
        hflip: Some((config.hflip, config.seed, epoch_counter.clone())),
        augment: config.augment,
    });
    let val_dataset = GroundingDataset {
        source: data.val.clone(),
        image_size: config.image_size,
        max_size: config.max_size,
        hflip: None,
        augment: AugmentConfig::none(),
    };
    let batcher = GroundingBatcher {
        caption: caption.clone(),
        special_ids: tokenizer.special_ids.clone(),
        max_text_len: model_config.max_text_len,
    };
    let iterations_per_epoch =
        crate::engine::iterations_per_epoch(train_dataset.len(), config.batch_size, 1 + data_parallel.len());
    let batcher_for_probe = batcher.clone();
    let train_loader = DataLoaderBuilder::new(batcher.clone())
        .batch_size(config.batch_size)
        .num_workers(0)
        .set_device(autodiff.clone())
        .build(train_dataset.clone());
    let val_loader = DataLoaderBuilder::new(batcher)
        .batch_size(config.batch_size)
        .num_workers(0)
        .set_device(device.clone())
        .build(val_dataset);

    let teacher = GroundingDinoTeacher { model, loss: config.loss, max_grad_norm: config.max_grad_norm };
    let choice = OptimizerChoice { kind: OptimizerKind::Adamw, lr0: config.lr0, momentum: 0.9 };
    // A step's memory grows with the image's resized area and its boxes: the largest and most
    // annotated are measured.
    let coco = data.train.coco();
    let mut heaviest = crate::data::most_annotated_first(coco);
    heaviest.sort_by_key(|&i| {
        let (w, h) = (coco.images[i].width.max(1) as f64, coco.images[i].height.max(1) as f64);
        let scale = (config.image_size as f64 / w.min(h)).min(config.max_size as f64 / w.max(h));
        std::cmp::Reverse((w * h * scale * scale) as u64)
    });
    let batch_of = |images: usize| -> Result<GroundingBatch, TrainError> {
        let items = (0..images)
            .map(|i| train_dataset.load(heaviest[i % heaviest.len()]))
            .collect::<Result<Vec<_>, TrainError>>()?;
        Ok(batcher_for_probe.batch(items, &autodiff))
    };
    let plan = MemoryPlan {
        batch_size: config.batch_size,
        optimizer_slots: choice.state_slots(),
        accumulates: false,
        ema: false,
    };
    let memory = crate::engine::memory::estimate_at_start(
        &teacher,
        batch_of,
        plan,
        (!dry_run).then_some(train_dataset.len()),
        &autodiff,
        resume_from.is_some(),
        verbosity,
    )?;
    if dry_run {
        return Ok(GroundingTrainSummary::dry_run(memory, lora_summary, adapter_dir));
    }
    let optimizer = build_optimizer(&choice, config.weight_decay);
    let schedule = |scale: f64| {
        teacher_schedule(config.lr0 * scale, config.lrf, config.epochs, iterations_per_epoch, config.warmup_epochs)
    };
    let backbone = ParamGroup::from_regex(r"^(backbone|bert)\.").expect("valid regex");
    let scheduler = ModuleLrScheduler::new(schedule(1.0)).with_group(backbone, schedule(config.backbone_lr_scale));
    let output =
        TeacherOutput::new(adapter_dir.clone(), &config.lora, base_name(&config), base_hash, config.full_finetune);
    let task = GroundingTask {
        settings: FitSettings::new(
            run_dir.clone(),
            autodiff.clone(),
            config.epochs,
            config.patience,
            iterations_per_epoch,
            verbosity,
            resume_from,
            stop_after_epochs,
        )
        .with_memory(memory.clone())
        .with_data_parallel(
            data_parallel.iter().map(|d| crate::engine::autodiff_device(d, config.gradient_checkpointing)).collect(),
        ),
        output,
        config: config.clone(),
        caption,
        classes: data.classes.clone(),
        category_ids: data.category_ids.clone(),
        val_source: data.val.clone(),
        epoch_counter,
    };
    let learner = Learner::new(teacher, optimizer, scheduler);
    let outcome = crate::engine::launch(task, learner, train_loader, val_loader, resume_from)?;
    let state = outcome.state;
    let adapter_bytes = TeacherOutput::saved_bytes(&adapter_dir, config.full_finetune);
    let best = state.history.iter().find(|r| r.epoch == state.best_epoch).copied().unwrap_or_default();
    Ok(GroundingTrainSummary {
        start_map50: state.history.first().map_or(0.0, |r| r.val_map50),
        best_map50: best.val_map50,
        best_map: state.best_fitness,
        best_epoch: state.best_epoch,
        history: state.history,
        lora: lora_summary,
        adapter_dir,
        adapter_bytes,
        base_bytes,
        stopped_early: outcome.stopped_early,
        seconds: outcome.seconds,
        memory,
        dry_run: false,
    })
}

/// GroundingDINO's fine-tuning on the engine: validated before any step (the base is the first
/// best), the best adapter (by validation box mAP50-95) saved.
struct GroundingTask {
    settings: FitSettings,
    output: TeacherOutput,
    config: GroundingDinoTeacherConfig,
    caption: Arc<ClassCaption>,
    classes: Vec<String>,
    category_ids: Vec<u64>,
    val_source: Arc<CocoDetectionDataset>,
    epoch_counter: EpochCounter,
}

/// The epoch's running sums, per step.
#[derive(Default)]
struct GroundingLive {
    loss: f32,
    parts: GroundingLossParts,
    steps: usize,
}

/// Validation loss (per batch), box mAP50 and mAP50-95.
struct GroundingFigures {
    loss: f32,
    map50: f64,
    map: f64,
}

/// Detections of the first validation images, to draw: (image index, boxes).
type ShownBoxes = Vec<(usize, Vec<GroundedBox>)>;

impl TrainTask for GroundingTask {
    type Model = GroundingDinoTeacher;
    type Parts = GroundingLossParts;
    type Record = GroundingEpochRecord;
    type State = NoTaskState;
    type Live = GroundingLive;
    type Figures = GroundingFigures;
    type Shown = ShownBoxes;
    const BASELINE: bool = true;

    fn settings(&self) -> &FitSettings {
        &self.settings
    }

    fn start(&self, _starting_epoch: usize, _state: &NoTaskState) -> Result<GroundingLive, TrainError> {
        Ok(GroundingLive::default())
    }

    fn start_epoch(&self, live: &mut GroundingLive, epoch: usize) {
        self.epoch_counter.set(epoch);
        *live = GroundingLive::default();
    }

    fn accumulate(&self, live: &mut GroundingLive, item: GroundingStepOutput) -> Result<String, TrainError> {
        live.loss += kiln_models::device::read_floats(item.loss)?[0];
        live.parts = add_parts(live.parts, item.parts);
        live.steps += 1;
        Ok(format!("loss {:.4}", live.loss / live.steps as f32))
    }

    fn validate(
        &self,
        _live: &GroundingLive,
        learner: &Learner<GroundingDinoTeacher>,
        loader: &dyn DataLoader<GroundingBatch>,
    ) -> Result<Validation<GroundingFigures, ShownBoxes>, TrainError> {
        let (loss, map50, map, shown) = self.validate_model(&learner.model().valid(), loader)?;
        Ok(Validation { figures: GroundingFigures { loss, map50, map }, fitness: map, shown })
    }

    fn record(
        &self,
        live: &GroundingLive,
        epoch: usize,
        figures: GroundingFigures,
        lr: f64,
        seconds: f64,
    ) -> GroundingEpochRecord {
        let n = live.steps.max(1) as f32;
        GroundingEpochRecord {
            epoch,
            train_loss: live.loss / n,
            train: GroundingLossParts {
                class: live.parts.class / n,
                bbox: live.parts.bbox / n,
                giou: live.parts.giou / n,
            },
            val_loss: figures.loss,
            val_map50: figures.map50,
            val_map: figures.map,
            lr,
            seconds,
        }
    }

    fn save_weights(
        &self,
        _live: &GroundingLive,
        learner: &Learner<GroundingDinoTeacher>,
        best: bool,
    ) -> Result<(), TrainError> {
        if !best {
            return Ok(());
        }
        let model = learner.model().model;
        // A text encoder of its own file stays there (frozen, it is that file's weights).
        let with_text_encoder = self.config.text_encoder.is_none() || !self.config.freeze_text_encoder;
        self.output.save(&model, |path, metadata| model.valid().save(path, metadata, with_text_encoder))
    }

    fn write_figures(&self, history: &[GroundingEpochRecord], shown: &ShownBoxes) -> Result<(), TrainError> {
        crate::plots::save(&results_figure(history), &self.settings.run_dir.join("results.png"))?;
        let mut pictures = Vec::new();
        for (index, found) in shown {
            let mut image = self.val_source.load(*index)?.image;
            draw_grounded(&mut image, found, &self.classes);
            pictures.push(image);
        }
        if !pictures.is_empty() {
            crate::plots::save(&crate::plots::grid(&pictures, 4, 320), &self.settings.run_dir.join("val_boxes.jpg"))?;
        }
        Ok(())
    }

    fn report(&self, r: &GroundingEpochRecord) -> String {
        let what =
            if r.epoch == 0 { "start".to_string() } else { format!("epoch {:>3}/{}", r.epoch, self.config.epochs) };
        format!(
            "{what}  train loss {:.4} (cls {:.4} L1 {:.4} GIoU {:.4})  val loss {:.4}  val box mAP50 {:.4} mAP50-95 {:.4}  ({:.0}s)",
            r.train_loss, r.train.class, r.train.bbox, r.train.giou, r.val_loss, r.val_map50, r.val_map, r.seconds
        )
    }

    fn checkpoint(&self, _live: &GroundingLive, _epoch: usize) -> Result<NoTaskState, TrainError> {
        Ok(NoTaskState {})
    }
}

impl GroundingTask {
    /// Validation loss (per batch), box mAP50 and mAP50-95 (COCO protocol) of the post-processed
    /// detections, and the detections of the first images, to draw.
    fn validate_model(
        &self,
        teacher: &GroundingDinoTeacher,
        loader: &dyn DataLoader<GroundingBatch>,
    ) -> Result<(f32, f64, f64, ShownBoxes), TrainError> {
        let bar = crate::engine::epoch_bar(self.settings.verbosity, loader.num_items() as u64, "validating");
        let (mut loss_sum, mut batches) = (0f32, 0usize);
        let mut results = Vec::new();
        let mut shown = Vec::new();
        let mut iterator = loader.iter();
        // Scored like any detector: every query above a low threshold, as COCO mAP expects.
        let options = PostprocessOptions { box_threshold: 0.001, text_threshold: 0.0 };
        while let Some(batch) = iterator.next() {
            let batch = batch?;
            let (loss, _, out) = teacher.loss(&batch)?;
            loss_sum += kiln_models::device::read_floats(loss)?[0];
            batches += 1;
            let prediction = out.prediction();
            for (b, &(index, image_id, size)) in batch.items.iter().enumerate() {
                let logits = image_row(&prediction.logits, b);
                let boxes = image_row(&prediction.boxes, b);
                let mut found = grounded_boxes(logits, boxes, &self.caption.class_tokens, size, &options)?;
                found.truncate(100);
                for d in &found {
                    results.push(CocoResult {
                        image_id,
                        category_id: self.category_ids[d.phrase],
                        bbox: [
                            d.bbox[0] as f64,
                            d.bbox[1] as f64,
                            (d.bbox[2] - d.bbox[0]) as f64,
                            (d.bbox[3] - d.bbox[1]) as f64,
                        ],
                        score: d.score as f64,
                        segmentation: None,
                    });
                }
                if shown.len() < SHOWN_IMAGES {
                    let post = self.config.postprocess();
                    shown.push((index, found.into_iter().filter(|d| d.score > post.box_threshold).collect()));
                }
            }
            bar.inc(batch.items.len() as u64);
        }
        bar.finish_and_clear();
        let evaluation = evaluate(self.val_source.coco(), &results, IouType::Bbox)?;
        Ok((loss_sum / batches.max(1) as f32, evaluation.ap50().max(0.0), evaluation.ap().max(0.0), shown))
    }
}

fn add_parts(a: GroundingLossParts, b: GroundingLossParts) -> GroundingLossParts {
    GroundingLossParts { class: a.class + b.class, bbox: a.bbox + b.bbox, giou: a.giou + b.giou }
}

/// Row `b` of a `[B, Q, X]` output as `[Q, X]`.
pub fn image_row(x: &Tensor<3>, b: usize) -> Tensor<2> {
    let [_, q, k] = x.dims();
    x.clone().narrow(0, b, 1).reshape([q, k])
}

/// Boxes with their class names and scores.
pub fn draw_grounded(image: &mut image::RgbImage, found: &[GroundedBox], names: &[String]) {
    use kiln_data::draw;
    let thickness = (image.width().max(image.height()) / 320).max(1);
    let scale = if image.width().max(image.height()) >= 800 { 2 } else { 1 };
    for d in found.iter().rev() {
        let colour = draw::class_colour(d.phrase);
        let bbox = d.bbox.map(|v| v as f64);
        draw::rectangle(image, bbox, colour, thickness);
        let name = names.get(d.phrase).map_or("?", String::as_str);
        draw::label(image, bbox[0], bbox[1], &format!("{name} {:.2}", d.score), colour, scale);
    }
}

fn results_figure(history: &[GroundingEpochRecord]) -> image::RgbImage {
    use crate::plots::{BLUE, ORANGE, chart, tile};
    let series = |f: &dyn Fn(&GroundingEpochRecord) -> f64, skip_start: bool| {
        history.iter().filter(|r| !skip_start || r.epoch > 0).map(|r| (r.epoch as f64, f(r))).collect::<Vec<_>>()
    };
    tile(
        &[
            chart(
                "loss",
                &[
                    ("train", BLUE, series(&|r| r.train_loss as f64, true)),
                    ("val", ORANGE, series(&|r| r.val_loss as f64, false)),
                ],
                320,
                200,
            ),
            chart(
                "train class / L1",
                &[
                    ("class", BLUE, series(&|r| r.train.class as f64, true)),
                    ("L1", ORANGE, series(&|r| r.train.bbox as f64, true)),
                ],
                320,
                200,
            ),
            chart("val box mAP50", &[("", BLUE, series(&|r| r.val_map50, false))], 320, 200),
            chart("val box mAP50-95", &[("", BLUE, series(&|r| r.val_map, false))], 320, 200),
        ],
        4,
    )
}

/// The base plus an adapter directory (merged), or a fully fine-tuned model, for inference.
pub fn load_adapted(
    config: &GroundingDinoTeacherConfig,
    adapter: Option<&Path>,
    device: &Device,
) -> Result<(GroundingDino, Option<AdapterConfig>), TrainError> {
    let base = load_base(config, device, false)?;
    super::merge_adapter(base, adapter, &base_name(config), || base_hash(config))
}

/// Detections of one image by a (merged) model: the caption's phrases as class names.
pub fn detect_image(
    model: &GroundingDino,
    tokenizer: &CaptionTokenizer,
    caption: &Caption,
    image: &image::RgbImage,
    config: &GroundingDinoTeacherConfig,
    device: &Device,
) -> Result<Vec<GroundedBox>, TrainError> {
    let encoded = tokenizer.encode(&caption.text).map_err(|e| TrainError::Config(e.to_string()))?;
    let phrase_tokens = tokenizer.phrase_tokens(caption, &encoded);
    let (pixels, size) = prepare_pixels(image, config.image_size, config.max_size);
    let images = ImageBatch::from_planar(&[(pixels, size)], device);
    let text = TextBatch::new(&[&encoded], &tokenizer.special_ids, model.max_text_len, device);
    let out = model.forward(&images, &text);
    let prediction = out.prediction();
    let original = (image.height() as usize, image.width() as usize);
    Ok(grounded_boxes(
        image_row(&prediction.logits, 0),
        image_row(&prediction.boxes, 0),
        &phrase_tokens,
        original,
        &config.postprocess(),
    )?)
}
