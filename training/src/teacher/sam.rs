//! LoRA fine-tuning of SAM / MobileSAM on a COCO dataset with masks (the recipe of Kirillov et al.
//! 2023, §3 and appendix A, for box prompts): every ground-truth box, jittered, prompts one mask;
//! focal + dice on the mask and MSE on the predicted IoU; the image encoder frozen unless LoRA
//! targets it, in which case its embeddings are computed once per image and cached on disk.
//!
//! A run directory (`teachers/sam_train/`) holds `results.csv`, `results.png`, `val_masks.jpg`,
//! `embeddings/` (the cache) and `checkpoint/` (burn-train's model, optimiser and scheduler records
//! plus kiln's `state-N.json`); the best adapter by validation mask IoU goes to
//! `teachers/sam_lora/{adapter_model.safetensors, adapter_config.json}`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::{Dataset, DatasetError};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use burn::train::{InferenceStep, Learner, TrainOutput, TrainStep};
use kiln_data::batch::CocoDetectionDataset;
use kiln_data::coco::Segmentation;
use kiln_data::mask::BinaryMask;
use kiln_data::rng::SeededRng;
use kiln_models::device::{DeviceError, read_floats};
use kiln_models::lora::{self, AdapterConfig, LoraConfig, LoraSummary};

use super::{TeacherOutput, teacher_schedule};
use kiln_models::sam::{MASK_THRESHOLD, Sam, SamConfig, prepare_pixels, resize_box, resized_shape};
use serde::{Deserialize, Serialize};

use crate::augment::AugmentConfig;
use crate::data::EpochCounter;
use crate::engine::memory::{MemoryEstimate, MemoryPlan};
use crate::engine::{FitSettings, NoTaskState, StepOutput, TrainTask, Validation, Verbosity};
use crate::error::{AtPath, TrainError};
use crate::optim::{OptimizerChoice, OptimizerKind, build_optimizer, clip_global_norm};
use crate::teacher::mask_loss::{MaskLossConfig, MaskLossParts, mask_loss};

/// The SAM teacher's settings (the `sam:` section of `teacher_config.yaml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamTeacherConfig {
    /// `vit_b`, `vit_l`, `vit_h`, `mobile` or `tiny`.
    pub model: String,
    /// The pretrained base (`sam_vit_b_01ec64.pth`, `mobile_sam.pt`, kiln safetensors); none: a
    /// random initialisation from `seed` (only meaningful for tests and the tiny demo).
    pub weights: Option<PathBuf>,
    pub epochs: usize,
    /// Images per optimiser step.
    pub batch_size: usize,
    /// At most this many boxes of an image prompt masks in one step (drawn at random).
    pub max_prompts_per_image: usize,
    pub lr0: f64,
    /// Final rate = `lr0 * lrf` (linear decay after the warm-up).
    pub lrf: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    pub max_grad_norm: f32,
    /// Epochs without a better validation IoU before stopping; 0: never.
    pub patience: usize,
    pub seed: u64,
    /// Standard deviation of the box-corner noise, as a fraction of the box's side.
    pub box_jitter: f64,
    /// Largest corner shift in pixels of a 1024-pixel input (scaled to the model's input size).
    pub box_jitter_max: f64,
    /// Light and camera changes chosen by `--objects` / `--environment` (`crate::characteristics`),
    /// on the images when the image encoder trains (its embeddings are not cached then); geometric
    /// ones do not apply to SAM. None by default.
    #[serde(default = "AugmentConfig::none", skip_serializing_if = "AugmentConfig::is_none")]
    pub augment: AugmentConfig,
    pub loss: MaskLossConfig,
    pub lora: LoraConfig,
    /// Train every parameter instead of LoRA adapters (saves the whole model to
    /// `teachers/sam_full/model.safetensors`): to pretrain a base, or to compare with LoRA.
    #[serde(default)]
    pub full_finetune: bool,
    /// Recompute memory-bound activations (norms, activations, reshapes) in the backward pass
    /// instead of keeping them: Burn's autodiff checkpointing (`Balanced`), applied to the whole
    /// model; less memory for some extra compute. Off by default.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

impl SamTeacherConfig {
    /// Whether the model has no weights to start from and is no tiny preset: only `tiny` (tests
    /// and the demo) trains or runs from a random initialisation.
    pub fn lacks_weights(&self) -> bool {
        self.weights.is_none() && self.model != "tiny"
    }
}

/// The base model's name in adapter files (`sam/vit_b`, ...).
pub fn base_name(config: &SamTeacherConfig) -> String {
    format!("sam/{}", config.model)
}

/// What the adapter records as its base: the weight file's SHA-256, or the seed of a random init.
pub fn base_hash(config: &SamTeacherConfig) -> Result<String, TrainError> {
    match &config.weights {
        Some(path) => Ok(lora::file_sha256(path)?),
        None => Ok(format!("random-init:{}", config.seed)),
    }
}

/// The base SAM for the (non-autodiff) `device`, ready for training when `trainable`: the weights
/// given, or the seeded random initialisation (always drawn on an autodiff device, the same on
/// every device, so that training and inference build the very same weights).
pub fn load_base(config: &SamTeacherConfig, device: &Device, trainable: bool) -> Result<Sam, TrainError> {
    let sam_config = sam_config(&config.model)?;
    let autodiff = crate::engine::autodiff_device(device, config.gradient_checkpointing);
    match &config.weights {
        Some(path) => Ok(Sam::load(&sam_config, path, if trainable { &autodiff } else { device })?),
        None => {
            let sam = crate::engine::init_seeded(config.seed, &autodiff, |on| sam_config.init(on));
            Ok(if trainable { sam } else { sam.valid() })
        }
    }
}

pub fn sam_config(name: &str) -> Result<SamConfig, TrainError> {
    SamConfig::from_name(name)
        .ok_or_else(|| TrainError::Config(format!("unknown SAM {name:?}: use vit_b, vit_l, vit_h, mobile or tiny")))
}

/// One image as the teacher trains on it: its boxes in the model's input frame and the target
/// masks at the decoder's output resolution (`S/4`, covering the padded input).
#[derive(Debug, Clone)]
pub struct SamSample {
    /// Position of the image in its dataset.
    pub image_index: usize,
    pub image_id: u64,
    pub original_size: (usize, usize),
    pub input_size: (usize, usize),
    pub boxes: Vec<[f32; 4]>,
    /// Boxes in original pixels, `x1 y1 x2 y2`.
    pub original_boxes: Vec<[f32; 4]>,
    pub classes: Vec<usize>,
    /// `(S/4)^2` bytes per instance, 0 or 1.
    pub targets: Vec<Vec<u8>>,
    pub segmentations: Vec<Segmentation>,
}

/// Reads every image with masked instances and derives its prompts and targets; images without
/// any masked instance are left out (there is nothing to learn from them).
pub fn prepare_samples(source: &CocoDetectionDataset, input: usize) -> Result<Vec<SamSample>, TrainError> {
    let low = input / 4;
    let mut samples = Vec::new();
    for index in 0..source.len() {
        let item = source.load(index)?;
        let (w, h) = (item.image.width(), item.image.height());
        let original_size = (h as usize, w as usize);
        let input_size = resized_shape(original_size, input);
        let mut sample = SamSample {
            image_index: index,
            image_id: item.image_id,
            original_size,
            input_size,
            boxes: Vec::new(),
            original_boxes: Vec::new(),
            classes: Vec::new(),
            targets: Vec::new(),
            segmentations: Vec::new(),
        };
        for instance in &item.instances {
            let Some(segmentation) = &instance.segmentation else { continue };
            let mask = segmentation
                .rasterize(w, h, input_size.1 as u32, input_size.0 as u32)
                .map_err(|e| TrainError::Config(format!("image {}: {e}", item.image_id)))?;
            if mask.area() == 0 {
                continue;
            }
            let bbox = instance.bbox.map(|v| v as f32);
            sample.boxes.push(resize_box(bbox, original_size, input));
            sample.original_boxes.push(bbox);
            sample.classes.push(instance.class);
            sample.targets.push(downsample_by_4(&mask, low));
            sample.segmentations.push(segmentation.clone());
        }
        if !sample.boxes.is_empty() {
            samples.push(sample);
        }
    }
    Ok(samples)
}

/// A mask of the resized image, padded to the input square and reduced 4x4 → 1 by majority.
fn downsample_by_4(mask: &BinaryMask, low: usize) -> Vec<u8> {
    let mut counts = vec![0u8; low * low];
    for y in 0..mask.height as usize {
        let row = &mask.data[y * mask.width as usize..(y + 1) * mask.width as usize];
        let cy = y / 4;
        if cy >= low {
            break;
        }
        for (x, &v) in row.iter().enumerate().take(low * 4) {
            counts[cy * low + x / 4] += v;
        }
    }
    counts.into_iter().map(|c| u8::from(c >= 8)).collect()
}

/// Where the image embeddings of a frozen encoder are kept: one little-endian f32 file per image.
#[derive(Debug, Clone)]
pub struct EmbeddingCache {
    pub dir: PathBuf,
    /// `[C, g, g]` of one embedding.
    pub shape: [usize; 3],
}

impl EmbeddingCache {
    fn path(&self, split: &str, image_id: u64) -> PathBuf {
        self.dir.join(format!("{split}-{image_id}.f32"))
    }

    fn read(&self, split: &str, image_id: u64) -> Option<Vec<f32>> {
        let bytes = std::fs::read(self.path(split, image_id)).ok()?;
        let n = self.shape.iter().product::<usize>();
        (bytes.len() == 4 * n)
            .then(|| bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// Computes (once) and stores the embeddings of `samples` not yet cached.
    pub fn fill(
        &self,
        sam: &Sam,
        split: &str,
        source: &CocoDetectionDataset,
        samples: &[SamSample],
        device: &Device,
        bar: &indicatif::ProgressBar,
    ) -> Result<(), TrainError> {
        std::fs::create_dir_all(&self.dir).at(&self.dir)?;
        let size = sam.image_size();
        bar.set_length(samples.len() as u64);
        for sample in samples {
            if self.read(split, sample.image_id).is_none() {
                let image = source.load(sample.image_index)?.image;
                let (pixels, _) = prepare_pixels(&image, size);
                let embedding = sam.embed(Tensor::from_data(TensorData::new(pixels, [1, 3, size, size]), device));
                let values = read_floats(embedding)?;
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                kiln_data::io::write_atomic(&self.path(split, sample.image_id), &bytes)?;
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(())
    }
}

/// What the encoder sees of an image: its cached embedding, or its pixels when LoRA adapts the
/// encoder (then the embedding is computed in the step, with gradients).
#[derive(Debug, Clone)]
pub enum SamInputData {
    Embedding(Vec<f32>),
    Pixels(Vec<f32>),
}

#[derive(Debug, Clone)]
pub struct SamItem {
    pub sample: usize,
    pub input: SamInputData,
    pub boxes: Vec<[f32; 4]>,
    /// The targets of the chosen instances, `(S/4)^2` each.
    pub targets: Vec<u8>,
}

/// The prompts of one split. Training: epoch-seeded order, at most `max_prompts` instances per
/// image and jittered boxes, all a pure function of (seed, epoch, position) so a resumed run sees
/// what an uninterrupted one would. Validation: every instance, exact boxes.
pub struct SamPromptDataset {
    pub samples: Arc<Vec<SamSample>>,
    pub source: Arc<CocoDetectionDataset>,
    pub split: &'static str,
    pub cache: Option<EmbeddingCache>,
    pub image_size: usize,
    pub training: Option<TrainingDraws>,
}

/// The random parts of a training epoch.
pub struct TrainingDraws {
    pub seed: u64,
    pub epoch: EpochCounter,
    pub max_prompts: usize,
    pub jitter: f64,
    pub jitter_max: f64,
    pub augment: AugmentConfig,
    order: Mutex<(usize, Vec<usize>)>,
}

impl TrainingDraws {
    pub fn new(config: &SamTeacherConfig, epoch: EpochCounter) -> Self {
        Self {
            seed: config.seed,
            epoch,
            max_prompts: config.max_prompts_per_image.max(1),
            jitter: config.box_jitter,
            jitter_max: config.box_jitter_max,
            augment: config.augment,
            order: Mutex::new((usize::MAX, Vec::new())),
        }
    }
}

impl SamPromptDataset {
    fn item(&self, position: usize) -> Result<SamItem, TrainError> {
        let index = match &self.training {
            None => position,
            Some(draws) => {
                let epoch = draws.epoch.get().max(1);
                let mut order = draws.order.lock().unwrap_or_else(|e| e.into_inner());
                if order.0 != epoch {
                    let mut indexes: Vec<usize> = (0..self.samples.len()).collect();
                    SeededRng::new(draws.seed).fork(epoch as u64).shuffle(&mut indexes);
                    *order = (epoch, indexes);
                }
                order.1[position]
            }
        };
        self.item_of(index, position)
    }

    /// Sample `index` drawn as the batch position `position` of the epoch draws it.
    fn item_of(&self, index: usize, position: usize) -> Result<SamItem, TrainError> {
        let (chosen, boxes) = match &self.training {
            None => {
                let sample = &self.samples[index];
                ((0..sample.boxes.len()).collect::<Vec<_>>(), sample.boxes.clone())
            }
            Some(draws) => {
                let epoch = draws.epoch.get().max(1);
                let sample = &self.samples[index];
                let mut rng = SeededRng::new(draws.seed).fork(((epoch as u64) << 32) | position as u64 | (1 << 62));
                let mut chosen: Vec<usize> = (0..sample.boxes.len()).collect();
                rng.shuffle(&mut chosen);
                chosen.truncate(draws.max_prompts);
                chosen.sort_unstable();
                let limit = draws.jitter_max * self.image_size as f64 / 1024.0;
                let (h, w) = (sample.input_size.0 as f64, sample.input_size.1 as f64);
                let boxes =
                    chosen.iter().map(|&i| jitter(sample.boxes[i], draws.jitter, limit, (w, h), &mut rng)).collect();
                (chosen, boxes)
            }
        };
        let sample = &self.samples[index];
        let input = match &self.cache {
            Some(cache) => SamInputData::Embedding(cache.read(self.split, sample.image_id).ok_or_else(|| {
                TrainError::Training(format!("image {}: its cached embedding is missing", sample.image_id))
            })?),
            None => {
                let mut image = self.source.load(sample.image_index)?.image;
                if let Some(draws) = &self.training {
                    let epoch = draws.epoch.get().max(1) as u64;
                    let mut rng = SeededRng::new(draws.seed).fork((epoch << 32) | position as u64 | (1 << 61));
                    crate::augment::photometric(&mut image, &draws.augment, &mut rng)?;
                }
                SamInputData::Pixels(prepare_pixels(&image, self.image_size).0)
            }
        };
        let targets = chosen.iter().flat_map(|&i| sample.targets[i].iter().copied()).collect();
        Ok(SamItem { sample: index, input, boxes, targets })
    }
}

/// Each corner moved by Gaussian noise of `fraction` of the box's side, at most `limit` pixels
/// (SAM: 10 % of the side, at most 20 pixels), kept inside the image and non-degenerate.
fn jitter(bbox: [f32; 4], fraction: f64, limit: f64, (w, h): (f64, f64), rng: &mut SeededRng) -> [f32; 4] {
    let [x1, y1, x2, y2] = bbox.map(|v| v as f64);
    let (bw, bh) = (x2 - x1, y2 - y1);
    let mut noise = |side: f64| (gaussian(rng) * fraction * side).clamp(-limit, limit);
    let nx1 = (x1 + noise(bw)).clamp(0.0, w);
    let ny1 = (y1 + noise(bh)).clamp(0.0, h);
    let nx2 = (x2 + noise(bw)).clamp(0.0, w);
    let ny2 = (y2 + noise(bh)).clamp(0.0, h);
    if nx2 - nx1 < 1.0 || ny2 - ny1 < 1.0 {
        return bbox;
    }
    [nx1, ny1, nx2, ny2].map(|v| v as f32)
}

/// A standard normal draw (Box-Muller).
fn gaussian(rng: &mut SeededRng) -> f64 {
    let u1 = rng.unit().max(1e-12);
    let u2 = rng.unit();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

impl Dataset<SamItem> for SamPromptDataset {
    fn get(&self, index: usize) -> Result<SamItem, DatasetError> {
        self.item(index).map_err(DatasetError::new)
    }

    fn len(&self) -> usize {
        self.samples.len()
    }
}

/// One image of a batch: the encoder input, the box prompts `[N, 4]` and targets `[N, S/4, S/4]`.
#[derive(Debug, Clone)]
pub struct SamBatchImage {
    pub sample: usize,
    pub input: Tensor<4>,
    pub embedded: bool,
    pub boxes: Tensor<2>,
    pub targets: Tensor<3>,
}

#[derive(Debug, Clone)]
pub struct SamBatch {
    pub images: Vec<SamBatchImage>,
}

impl SamBatch {
    /// The device the batch lives on.
    pub fn device(&self) -> Device {
        self.images.first().map(|i| i.input.device()).unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
pub struct SamBatcher {
    pub image_size: usize,
    /// `[C, g, g]` of an embedding.
    pub embedding_shape: [usize; 3],
}

impl Batcher<SamItem, SamBatch> for SamBatcher {
    fn batch(&self, items: Vec<SamItem>, device: &Device) -> SamBatch {
        let low = self.image_size / 4;
        let s = self.image_size;
        let images = items
            .into_iter()
            .map(|item| {
                let n = item.boxes.len();
                let (input, embedded) = match item.input {
                    SamInputData::Embedding(values) => {
                        let [c, g, _] = self.embedding_shape;
                        (Tensor::from_data(TensorData::new(values, [1, c, g, g]), device), true)
                    }
                    SamInputData::Pixels(values) => {
                        (Tensor::from_data(TensorData::new(values, [1, 3, s, s]), device), false)
                    }
                };
                let boxes: Vec<f32> = item.boxes.iter().flatten().copied().collect();
                let targets: Vec<f32> = item.targets.iter().map(|&v| v as f32).collect();
                SamBatchImage {
                    sample: item.sample,
                    input,
                    embedded,
                    boxes: Tensor::from_data(TensorData::new(boxes, [n, 4]), device),
                    targets: Tensor::from_data(TensorData::new(targets, [n, low, low]), device),
                }
            })
            .collect();
        SamBatch { images }
    }
}

/// SAM as burn-train sees it: the (LoRA-adapted) model with its loss as train and validation steps.
#[derive(Module, Debug)]
pub struct SamTeacher {
    pub sam: Sam,
    #[module(skip)]
    pub loss: MaskLossConfig,
    #[module(skip)]
    pub max_grad_norm: f32,
}

/// One step's loss (mean per mask) and its parts (sums over the step's masks).
pub type SamStepOutput = StepOutput<MaskLossParts>;

impl SamTeacher {
    /// The loss summed over every mask of the batch, with its parts and the number of masks.
    pub fn loss(&self, batch: &SamBatch) -> Result<(Tensor<1>, MaskLossParts, usize), DeviceError> {
        let (total, parts, count, _) = self.loss_and_logits(batch)?;
        Ok((total, parts, count))
    }

    /// [`Self::loss`] and each image's low-resolution mask logits `[N, 1, S/4, S/4]`.
    pub fn loss_and_logits(
        &self,
        batch: &SamBatch,
    ) -> Result<(Tensor<1>, MaskLossParts, usize, Vec<Tensor<4>>), DeviceError> {
        let mut total: Option<Tensor<1>> = None;
        let mut parts = MaskLossParts::default();
        let mut count = 0;
        let mut logits = Vec::with_capacity(batch.images.len());
        for image in &batch.images {
            let embedding = if image.embedded { image.input.clone() } else { self.sam.embed(image.input.clone()) };
            let prediction = self.sam.predict_boxes(embedding, image.boxes.clone(), false);
            logits.push(prediction.masks.clone());
            let [n, _, h, w] = prediction.masks.dims();
            let out = mask_loss(
                &self.loss,
                prediction.masks.reshape([n, h, w]),
                prediction.iou_predictions.reshape([n]),
                image.targets.clone(),
            )?;
            total = Some(match total {
                Some(t) => t + out.total,
                None => out.total,
            });
            parts = parts.add(out.parts, 1.0);
            count += n;
        }
        Ok((total.expect("a batch has at least one image"), parts, count, logits))
    }
}

impl TrainStep for SamTeacher {
    type Input = SamBatch;
    type Output = SamStepOutput;

    fn step(&self, batch: SamBatch) -> TrainOutput<SamStepOutput> {
        let (total, parts, masks) = match self.loss(&batch) {
            Ok(loss) => loss,
            Err(error) => {
                return TrainOutput { grads: GradientsParams::new(), item: StepOutput::failed(error, &batch.device()) };
            }
        };
        let loss = total / masks.max(1) as f32;
        let grads = loss.backward();
        TrainOutput::new(self, grads, StepOutput::new(loss.detach(), parts, masks))
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

impl InferenceStep for SamTeacher {
    type Input = SamBatch;
    type Output = SamStepOutput;

    fn step(&self, batch: SamBatch) -> SamStepOutput {
        match self.loss(&batch) {
            Ok((total, parts, masks)) => StepOutput::new(total / masks.max(1) as f32, parts, masks),
            Err(error) => StepOutput::failed(error, &batch.device()),
        }
    }
}

/// One epoch's figures (epoch 0: the starting point, before any training).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SamEpochRecord {
    pub epoch: usize,
    /// Per-mask means.
    pub train: MaskLossParts,
    pub val: MaskLossParts,
    /// Mean IoU of the thresholded masks with the ground truth, at the original image size.
    pub val_mask_iou: f64,
    pub lr: f64,
    pub seconds: f64,
}

impl crate::engine::EpochRecord for SamEpochRecord {
    const CSV_HEADER: &'static str =
        "epoch,train/focal,train/dice,train/iou_mse,val/focal,val/dice,val/iou_mse,val/mask_iou,lr,seconds";

    fn csv_row(&self) -> String {
        let (t, v) = (&self.train, &self.val);
        format!(
            "{},{:.6},{:.5},{:.5},{:.6},{:.5},{:.5},{:.5},{:.6},{:.1}",
            self.epoch, t.focal, t.dice, t.iou, v.focal, v.dice, v.iou, self.val_mask_iou, self.lr, self.seconds
        )
    }
}

/// How a SAM run ended.
#[derive(Debug, Clone)]
pub struct SamTrainSummary {
    pub history: Vec<SamEpochRecord>,
    pub start_iou: f64,
    pub best_iou: f64,
    pub best_epoch: usize,
    pub lora: LoraSummary,
    pub adapter_dir: PathBuf,
    pub adapter_bytes: u64,
    /// The base's size: its weight file, or 4 bytes per parameter for a random init.
    pub base_bytes: u64,
    pub cached_embeddings: bool,
    pub stopped_early: bool,
    pub seconds: f64,
    /// The memory estimate made when the run started (none when resumed).
    pub memory: Option<MemoryEstimate>,
    /// The run stopped after its memory estimate (`--dry-run`): nothing trained.
    pub dry_run: bool,
}

impl SamTrainSummary {
    fn dry_run(
        memory: Option<MemoryEstimate>,
        lora: LoraSummary,
        adapter_dir: PathBuf,
        cached_embeddings: bool,
    ) -> Self {
        Self {
            history: Vec::new(),
            start_iou: 0.0,
            best_iou: 0.0,
            best_epoch: 0,
            lora,
            adapter_dir,
            adapter_bytes: 0,
            base_bytes: 0,
            cached_embeddings,
            stopped_early: false,
            seconds: 0.0,
            memory,
            dry_run: true,
        }
    }
}

pub struct SamRunOptions {
    pub config: SamTeacherConfig,
    /// `teachers/sam_train`.
    pub run_dir: PathBuf,
    /// `teachers/sam_lora`.
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

pub struct SamData {
    pub train: Arc<CocoDetectionDataset>,
    pub val: Arc<CocoDetectionDataset>,
    pub classes: Vec<String>,
}

const SHOWN_IMAGES: usize = 8;

/// Fine-tunes SAM with LoRA on `data`.
pub fn train_sam(options: SamRunOptions, data: SamData) -> Result<SamTrainSummary, TrainError> {
    let SamRunOptions {
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
    let checkpoint_dir = run_dir.join("checkpoint");
    let resume_from =
        if resume { crate::engine::resume_point(&checkpoint_dir, SamTask::CHECKPOINT_FILES) } else { None };
    std::fs::create_dir_all(&run_dir).at(&run_dir)?;

    let autodiff = crate::engine::autodiff_device(&device, config.gradient_checkpointing);
    let base = load_base(&config, &device, true)?;
    let base_hash = base_hash(&config)?;
    let base_bytes = match &config.weights {
        Some(path) => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        None => 4 * kiln_models::parameter_count(&base) as u64,
    };
    let image_size = base.image_size();
    let sam_config = sam_config(&config.model)?;
    let grid = sam_config.encoder.grid();
    let embedding_shape = [sam_config.prompt_embed_dim, grid, grid];

    let status = |message: &str| {
        if verbosity == Verbosity::Progress {
            eprintln!("{message}");
        }
    };
    let train_samples = Arc::new(prepare_samples(&data.train, image_size)?);
    let val_samples = Arc::new(prepare_samples(&data.val, image_size)?);
    if train_samples.is_empty() || val_samples.is_empty() {
        return Err(TrainError::Config(
            "the training and validation sets both need images with masks: SAM learns masks from box prompts".into(),
        ));
    }
    let (model, lora_summary) = if config.full_finetune {
        let total = kiln_models::parameter_count(&base);
        // PyTorch's buffers stay fixed in full fine-tuning too.
        let buffers = burn::module::ParamGroup::from_regex("positional_encoding_gaussian_matrix").expect("valid regex");
        (base.freeze_group(buffers), LoraSummary { adapted: Vec::new(), trainable: total, total })
    } else {
        // The adapters' initialisation follows the seed, whatever the base and the device.
        let (model, summary) = lora::apply(base, &config.lora, &base_name(&config), config.seed.wrapping_add(1))?;
        status(&format!("SAM {}: {}", config.model, summary.render()));
        (model, summary)
    };
    let encoder_trains = config.full_finetune || lora_summary.adapted.iter().any(|p| p.starts_with("image_encoder."));
    let cache = (!encoder_trains).then(|| EmbeddingCache { dir: run_dir.join("embeddings"), shape: embedding_shape });
    if cache.is_some() && !config.augment.is_none() {
        status(
            "warning: SAM's image encoder is frozen (its embeddings are computed once), so the light and camera \
             augmentation of --objects/--environment does not reach SAM; adapt the encoder too (--lora-targets \
             q_proj,k_proj,v_proj,out_proj,qkv) for it to",
        );
    }
    if let Some(cache) = &cache {
        let encoder = model.valid();
        let inner = device.clone();
        for (split, source, samples) in [("train", &data.train, &train_samples), ("val", &data.val, &val_samples)] {
            let bar = crate::engine::epoch_bar(verbosity, samples.len() as u64, &format!("embed {split}"));
            cache.fill(&encoder, split, source, samples, &inner, &bar)?;
        }
    }

    let epoch_counter = EpochCounter::default();
    let train_dataset = Arc::new(SamPromptDataset {
        samples: train_samples.clone(),
        source: data.train.clone(),
        split: "train",
        cache: cache.clone(),
        image_size,
        training: Some(TrainingDraws::new(&config, epoch_counter.clone())),
    });
    let val_dataset = SamPromptDataset {
        samples: val_samples.clone(),
        source: data.val.clone(),
        split: "val",
        cache: cache.clone(),
        image_size,
        training: None,
    };
    let batcher = SamBatcher { image_size, embedding_shape };
    let batcher_for_probe = batcher.clone();
    let iterations_per_epoch =
        crate::engine::iterations_per_epoch(train_samples.len(), config.batch_size, 1 + data_parallel.len());
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

    let teacher = SamTeacher { sam: model, loss: config.loss, max_grad_norm: config.max_grad_norm };
    let choice = OptimizerChoice { kind: OptimizerKind::Adamw, lr0: config.lr0, momentum: 0.9 };
    // A step's memory grows with the prompts: the images with the most boxes are measured.
    let mut heaviest: Vec<usize> = (0..train_samples.len()).collect();
    heaviest.sort_by_key(|&i| std::cmp::Reverse(train_samples[i].boxes.len()));
    let batch_of = |images: usize| -> Result<SamBatch, TrainError> {
        let items = (0..images)
            .map(|i| train_dataset.item_of(heaviest[i % heaviest.len()], i))
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
        (!dry_run).then_some(train_samples.len()),
        &autodiff,
        resume_from.is_some(),
        verbosity,
    )?;
    if dry_run {
        return Ok(SamTrainSummary::dry_run(memory, lora_summary, adapter_dir, cache.is_some()));
    }
    let optimizer = build_optimizer(&choice, config.weight_decay);
    let schedule = teacher_schedule(config.lr0, config.lrf, config.epochs, iterations_per_epoch, config.warmup_epochs);
    let output =
        TeacherOutput::new(adapter_dir.clone(), &config.lora, base_name(&config), base_hash, config.full_finetune);
    let task = SamTask {
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
        classes: data.classes.clone(),
        val_samples: val_samples.clone(),
        val_source: data.val.clone(),
        epoch_counter,
    };
    let learner = Learner::new(teacher, optimizer, schedule);
    let outcome = crate::engine::launch(task, learner, train_loader, val_loader, resume_from)?;
    let state = outcome.state;
    let adapter_bytes = TeacherOutput::saved_bytes(&adapter_dir, config.full_finetune);
    Ok(SamTrainSummary {
        start_iou: state.history.first().map_or(0.0, |r| r.val_mask_iou),
        best_iou: state.best_fitness,
        best_epoch: state.best_epoch,
        history: state.history,
        lora: lora_summary,
        adapter_dir,
        adapter_bytes,
        base_bytes,
        cached_embeddings: cache.is_some(),
        stopped_early: outcome.stopped_early,
        seconds: outcome.seconds,
        memory,
        dry_run: false,
    })
}

/// SAM's fine-tuning on the engine: validated before any step (the base is the first best), the
/// best adapter (by mean mask IoU on the validation set) saved.
struct SamTask {
    settings: FitSettings,
    output: TeacherOutput,
    config: SamTeacherConfig,
    classes: Vec<String>,
    val_samples: Arc<Vec<SamSample>>,
    val_source: Arc<CocoDetectionDataset>,
    epoch_counter: EpochCounter,
}

/// The epoch's running sums: loss parts over masks.
#[derive(Default)]
struct SamLive {
    sums: MaskLossParts,
    masks: usize,
}

/// Validation masks of the first images, to draw: (sample index, masks).
type ShownMasks = Vec<(usize, Vec<BinaryMask>)>;

impl TrainTask for SamTask {
    type Model = SamTeacher;
    type Parts = MaskLossParts;
    type Record = SamEpochRecord;
    type State = NoTaskState;
    type Live = SamLive;
    /// Validation loss parts (per-mask means) and the mean mask IoU.
    type Figures = (MaskLossParts, f64);
    type Shown = ShownMasks;
    const BASELINE: bool = true;

    fn settings(&self) -> &FitSettings {
        &self.settings
    }

    fn start(&self, _starting_epoch: usize, _state: &NoTaskState) -> Result<SamLive, TrainError> {
        Ok(SamLive::default())
    }

    fn start_epoch(&self, live: &mut SamLive, epoch: usize) {
        self.epoch_counter.set(epoch);
        *live = SamLive::default();
    }

    fn accumulate(&self, live: &mut SamLive, item: SamStepOutput) -> Result<String, TrainError> {
        live.sums = live.sums.add(item.parts, 1.0);
        live.masks += item.count;
        let n = live.masks as f32;
        Ok(format!("focal {:.4} dice {:.3} iou {:.3}", live.sums.focal / n, live.sums.dice / n, live.sums.iou / n))
    }

    fn validate(
        &self,
        _live: &SamLive,
        learner: &Learner<SamTeacher>,
        loader: &dyn DataLoader<SamBatch>,
    ) -> Result<Validation<(MaskLossParts, f64), ShownMasks>, TrainError> {
        let (val, iou, shown) = self.validate_model(&learner.model().valid(), loader)?;
        Ok(Validation { figures: (val, iou), fitness: iou, shown })
    }

    fn record(
        &self,
        live: &SamLive,
        epoch: usize,
        figures: (MaskLossParts, f64),
        lr: f64,
        seconds: f64,
    ) -> SamEpochRecord {
        SamEpochRecord {
            epoch,
            train: MaskLossParts::default().add(live.sums, 1.0 / live.masks.max(1) as f32),
            val: figures.0,
            val_mask_iou: figures.1,
            lr,
            seconds,
        }
    }

    fn save_weights(&self, _live: &SamLive, learner: &Learner<SamTeacher>, best: bool) -> Result<(), TrainError> {
        if !best {
            return Ok(());
        }
        let sam = learner.model().sam;
        self.output.save(&sam, |path, metadata| sam.valid().save(path, metadata))
    }

    fn write_figures(&self, history: &[SamEpochRecord], shown: &ShownMasks) -> Result<(), TrainError> {
        crate::plots::save(&results_figure(history), &self.settings.run_dir.join("results.png"))?;
        let mut pictures = Vec::new();
        for (sample, masks) in shown {
            let sample = &self.val_samples[*sample];
            let mut image = self.val_source.load(sample.image_index)?.image;
            draw_masks(&mut image, masks, &sample.original_boxes, &sample.classes, &self.classes);
            pictures.push(image);
        }
        if !pictures.is_empty() {
            crate::plots::save(&crate::plots::grid(&pictures, 4, 320), &self.settings.run_dir.join("val_masks.jpg"))?;
        }
        Ok(())
    }

    fn report(&self, r: &SamEpochRecord) -> String {
        let what =
            if r.epoch == 0 { "start".to_string() } else { format!("epoch {:>3}/{}", r.epoch, self.config.epochs) };
        format!(
            "{what}  train focal {:.4} dice {:.3} iou-mse {:.3}  val focal {:.4} dice {:.3}  val mask IoU {:.4}  ({:.0}s)",
            r.train.focal, r.train.dice, r.train.iou, r.val.focal, r.val.dice, r.val_mask_iou, r.seconds
        )
    }

    fn checkpoint(&self, _live: &SamLive, _epoch: usize) -> Result<NoTaskState, TrainError> {
        Ok(NoTaskState {})
    }
}

impl SamTask {
    /// Validation loss (per-mask means) and the mean IoU of every validation mask at the original
    /// image size, prompted by the exact ground-truth boxes; plus the masks of the first images, to draw.
    fn validate_model(
        &self,
        teacher: &SamTeacher,
        loader: &dyn DataLoader<SamBatch>,
    ) -> Result<(MaskLossParts, f64, ShownMasks), TrainError> {
        let bar = crate::engine::epoch_bar(self.settings.verbosity, loader.num_items() as u64, "validating");
        let mut sums = MaskLossParts::default();
        let (mut masks, mut iou_sum) = (0usize, 0f64);
        let mut shown = Vec::new();
        let mut iterator = loader.iter();
        while let Some(batch) = iterator.next() {
            let batch = batch?;
            let (_, parts, count, logits) = teacher.loss_and_logits(&batch)?;
            sums = sums.add(parts, 1.0);
            masks += count;
            for (image, logits) in batch.images.iter().zip(logits) {
                let sample = &self.val_samples[image.sample];
                let predicted = masks_at_original_size(&teacher.sam, logits, sample.input_size, sample.original_size)?;
                let (h, w) = sample.original_size;
                for (mask, segmentation) in predicted.iter().zip(&sample.segmentations) {
                    let truth = segmentation
                        .rasterize(w as u32, h as u32, w as u32, h as u32)
                        .map_err(|e| TrainError::Config(format!("image {}: {e}", sample.image_id)))?;
                    iou_sum += mask.iou(&truth);
                }
                if shown.len() < SHOWN_IMAGES {
                    shown.push((image.sample, predicted));
                }
            }
            bar.inc(batch.images.len() as u64);
        }
        bar.finish_and_clear();
        let n = masks.max(1) as f32;
        Ok((MaskLossParts::default().add(sums, 1.0 / n), iou_sum / masks.max(1) as f64, shown))
    }
}

/// Low-resolution logits `[N, 1, S/4, S/4]` → binary masks of the original image.
pub fn masks_at_original_size(
    sam: &Sam,
    logits: Tensor<4>,
    input_size: (usize, usize),
    original_size: (usize, usize),
) -> Result<Vec<BinaryMask>, TrainError> {
    let n = logits.dims()[0];
    let (h, w) = original_size;
    let full = sam.postprocess_masks(logits, input_size, original_size);
    let values = read_floats(full)?;
    Ok((0..n)
        .map(|i| BinaryMask {
            width: w as u32,
            height: h as u32,
            data: values[i * h * w..(i + 1) * h * w].iter().map(|&v| u8::from(v > MASK_THRESHOLD)).collect(),
        })
        .collect())
}

/// Masks tinted in their class colour, with the prompting boxes and class names.
pub fn draw_masks(
    image: &mut image::RgbImage,
    masks: &[BinaryMask],
    boxes: &[[f32; 4]],
    classes: &[usize],
    names: &[String],
) {
    use kiln_data::draw;
    for (mask, &class) in masks.iter().zip(classes) {
        draw::tint_mask(image, mask, draw::class_colour(class), 0.5);
    }
    let thickness = (image.width().max(image.height()) / 320).max(1);
    let scale = if image.width().max(image.height()) >= 800 { 2 } else { 1 };
    for (bbox, &class) in boxes.iter().zip(classes) {
        let colour = draw::class_colour(class);
        let bbox = bbox.map(|v| v as f64);
        draw::rectangle(image, bbox, colour, thickness);
        if let Some(name) = names.get(class) {
            draw::label(image, bbox[0], bbox[1], name, colour, scale);
        }
    }
}

fn results_figure(history: &[SamEpochRecord]) -> image::RgbImage {
    use crate::plots::{BLUE, ORANGE, chart, tile};
    let series = |f: &dyn Fn(&SamEpochRecord) -> f64, skip_start: bool| {
        history.iter().filter(|r| !skip_start || r.epoch > 0).map(|r| (r.epoch as f64, f(r))).collect::<Vec<_>>()
    };
    let both = |title: &str, t: &dyn Fn(&SamEpochRecord) -> f64, v: &dyn Fn(&SamEpochRecord) -> f64| {
        chart(title, &[("train", BLUE, series(t, true)), ("val", ORANGE, series(v, false))], 320, 200)
    };
    tile(
        &[
            both("focal loss", &|r| r.train.focal as f64, &|r| r.val.focal as f64),
            both("dice loss", &|r| r.train.dice as f64, &|r| r.val.dice as f64),
            both("IoU MSE", &|r| r.train.iou as f64, &|r| r.val.iou as f64),
            chart("val mask IoU", &[("", BLUE, series(&|r| r.val_mask_iou, false))], 320, 200),
        ],
        4,
    )
}

/// Reads a base SAM plus an adapter directory for inference, merged.
pub fn load_adapted(
    config: &SamTeacherConfig,
    adapter: Option<&Path>,
    device: &Device,
) -> Result<(Sam, Option<AdapterConfig>), TrainError> {
    let base = load_base(config, device, false)?;
    super::merge_adapter(base, adapter, &base_name(config), || base_hash(config))
}
