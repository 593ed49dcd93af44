//! Datasets the Learner's data loaders read: augmented training samples whose order and
//! augmentation are a pure function of (seed, epoch, position), so a resumed run sees exactly the
//! batches an uninterrupted one would; and plain letterboxed validation samples.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, DatasetError};
use burn::tensor::{Device, Tensor, TensorData};
use kiln_data::Letterbox;
use kiln_data::batch::{
    BatchFeatures, CocoDetectionDataset, DetectionBatch, DetectionBatcher, DetectionItem, TeacherTargets,
};
use kiln_data::mask::give_shared_cells_to_the_smallest;
use kiln_data::rng::SeededRng;

use crate::augment::{AugmentConfig, TrainSample, augment};

/// The current epoch (1-based), shared by the trainer and the training dataset.
#[derive(Debug, Clone, Default)]
pub struct EpochCounter(Arc<AtomicUsize>);

impl EpochCounter {
    pub fn set(&self, epoch: usize) {
        self.0.store(epoch, Ordering::SeqCst);
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Training samples: position `i` of epoch `e` is image `order_e[i]`, augmented (with a mosaic
/// of three more images drawn from the recently loaded ones, see [`MosaicBuffer`]) by a generator
/// seeded from (seed, e, i). Mosaic is off for the last `close_mosaic` epochs, as in Ultralytics.
pub struct TrainDataset {
    /// The labelled images, then (distillation) the teacher-labelled ones, as one list.
    sources: Vec<Arc<CocoDetectionDataset>>,
    pub augment: AugmentConfig,
    pub image_size: u32,
    pub mask_downsample: Option<u32>,
    pub seed: u64,
    pub epochs: usize,
    pub close_mosaic: usize,
    epoch: EpochCounter,
    order: Mutex<(usize, Vec<usize>)>,
    /// How many recently loaded images the mosaic draws its partners from (Ultralytics'
    /// `max_buffer_length`); 0 draws them from the whole set.
    mosaic_buffer: usize,
    buffer: Mutex<Option<BufferState>>,
    /// Cells that several masks of a sample cover stay only in the smallest one's target
    /// (`loss.overlap_mask`).
    overlap_masks: bool,
}

/// Ultralytics' mosaic buffer (`BaseDataset.buffer`, a loader without workers): an image read
/// from disk as a sample's own image joins it, the oldest leaves once it holds `capacity`
/// (`max_buffer_length`), and a mosaic's three partners are drawn from it, the sample's own image
/// included. So an image comes back as a partner within the next few batches after it was a
/// sample's own image, and the first samples of a run tile copies of few images.
#[derive(Debug, Clone)]
pub struct MosaicBuffer {
    capacity: usize,
    images: std::collections::VecDeque<usize>,
    held: Vec<bool>,
}

impl MosaicBuffer {
    /// An empty buffer over `images` images.
    pub fn new(images: usize, capacity: usize) -> Self {
        Self { capacity, images: Default::default(), held: vec![false; images] }
    }

    /// A sample's own image is loaded: it joins unless it is held already.
    pub fn load(&mut self, image: usize) {
        if self.held[image] {
            return;
        }
        self.held[image] = true;
        self.images.push_back(image);
        if self.images.len() > 1 && self.images.len() >= self.capacity {
            if let Some(oldest) = self.images.pop_front() {
                self.held[oldest] = false;
            }
        }
    }

    /// The images a mosaic draws from, the oldest first.
    pub fn images(&self) -> Vec<usize> {
        self.images.iter().copied().collect()
    }

    /// A buffer holding `held` (the oldest first), as [`MosaicBuffer::images`] returned them.
    fn holding(images: usize, capacity: usize, held: &[usize]) -> Self {
        let mut buffer = Self::new(images, capacity);
        for &image in held {
            buffer.held[image] = true;
            buffer.images.push_back(image);
        }
        buffer
    }
}

/// Positions apart at which the buffer's state is kept, so that a sample asked for out of order
/// (a resumed run, several devices reading their parts of an epoch) replays at most this many
/// loads.
const BUFFER_SAVED_EVERY: usize = 16;

/// The buffer's state before the sample at `next` (epoch, position) loads its image, the order
/// of the epoch being replayed, and saved states (their images) to go back to: every epoch's
/// start, and every [`BUFFER_SAVED_EVERY`] positions of the last two epochs.
#[derive(Debug)]
struct BufferState {
    next: (usize, usize),
    buffer: MosaicBuffer,
    order: (usize, Vec<usize>),
    saved: std::collections::BTreeMap<(usize, usize), Vec<usize>>,
}

impl TrainDataset {
    pub fn new(
        sources: Vec<Arc<CocoDetectionDataset>>,
        augment: AugmentConfig,
        image_size: u32,
        mask_downsample: Option<u32>,
        seed: u64,
        epochs: usize,
        close_mosaic: usize,
        epoch: EpochCounter,
    ) -> Self {
        Self {
            sources,
            augment,
            image_size,
            mask_downsample,
            seed,
            epochs,
            close_mosaic,
            epoch,
            order: Mutex::new((usize::MAX, Vec::new())),
            mosaic_buffer: 0,
            buffer: Mutex::new(None),
            overlap_masks: false,
        }
    }

    /// Mosaic partners drawn from the last `capacity` images loaded (Ultralytics:
    /// `min(images, batch_size * 8, 1000)`); 0 draws them from the whole set.
    pub fn with_mosaic_buffer(mut self, capacity: usize) -> Self {
        self.mosaic_buffer = capacity;
        self
    }

    /// Samples whose mask targets leave the cells several masks share to the smallest
    /// (`loss.overlap_mask`, [`give_shared_cells_to_the_smallest`]).
    pub fn with_overlap_masks(mut self, overlap: bool) -> Self {
        self.overlap_masks = overlap;
        self
    }

    /// The epochs' order of images, epoch `epoch` (pure: does not touch the cached order).
    fn order_of(&self, epoch: usize) -> Vec<usize> {
        let mut images: Vec<usize> = (0..self.images()).collect();
        SeededRng::new(self.seed).fork(epoch as u64).shuffle(&mut images);
        images
    }

    /// The buffer's images once the sample at (epoch, position) has loaded its own image. The
    /// state is a function of the epochs' orders alone: asked for an earlier position than the
    /// last, it is replayed from the latest saved state before it (a resumed run draws what an
    /// uninterrupted one would).
    fn buffered_images(&self, epoch: usize, position: usize) -> Vec<usize> {
        let (n, capacity) = (self.images(), self.mosaic_buffer);
        let mut guard = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        let state = guard.get_or_insert_with(|| BufferState {
            next: (1, 0),
            buffer: MosaicBuffer::new(n, capacity),
            order: (usize::MAX, Vec::new()),
            saved: Default::default(),
        });
        if state.next > (epoch, position) {
            let (at, held) = state
                .saved
                .range(..=(epoch, position))
                .next_back()
                .map_or(((1, 0), Vec::new()), |(&at, held)| (at, held.clone()));
            state.buffer = MosaicBuffer::holding(n, capacity, &held);
            state.next = at;
        }
        while state.next <= (epoch, position) {
            let (e, p) = state.next;
            if p % BUFFER_SAVED_EVERY == 0 {
                if p == 0 {
                    state.saved.retain(|&(saved_epoch, saved_position), _| saved_position == 0 || saved_epoch + 1 >= e);
                }
                state.saved.insert((e, p), state.buffer.images());
            }
            if state.order.0 != e {
                state.order = (e, self.order_of(e));
            }
            state.buffer.load(state.order.1[p]);
            state.next = if p + 1 < n { (e, p + 1) } else { (e + 1, 0) };
        }
        state.buffer.images()
    }

    fn image_at(&self, epoch: usize, position: usize) -> usize {
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        if order.0 != epoch {
            *order = (epoch, self.order_of(epoch));
        }
        order.1[position]
    }

    fn images(&self) -> usize {
        self.sources.iter().map(|s| s.len()).sum()
    }

    /// Image `index` of the sources taken as one list.
    fn load(&self, mut index: usize) -> kiln_data::Result<DetectionItem> {
        for source in &self.sources {
            if index < source.len() {
                return source.load(index);
            }
            index -= source.len();
        }
        // Past the end: the first source names the images and reports the range.
        self.sources[0].load(index + self.sources[0].len())
    }

    pub fn sample(&self, epoch: usize, position: usize) -> kiln_data::Result<TrainSample> {
        let n = self.images();
        let image = self.image_at(epoch, position);
        let mut rng = SeededRng::new(self.seed).fork(((epoch as u64) << 32) | position as u64 | (1 << 63));
        let mosaic_on = epoch + self.close_mosaic <= self.epochs;
        let mut indexes = vec![image];
        if mosaic_on && rng.chance(self.augment.mosaic) {
            if self.mosaic_buffer > 0 {
                let buffered = self.buffered_images(epoch, position);
                indexes.extend((0..3).map(|_| buffered[rng.below(buffered.len())]));
            } else {
                indexes.extend((0..3).map(|_| rng.below(n)));
            }
        }
        let items: Vec<DetectionItem> = indexes.iter().map(|&i| self.load(i)).collect::<Result<_, _>>()?;
        self.targets(augment(&items, &self.augment, self.image_size, self.mask_downsample, &mut rng)?)
    }

    /// The sample's mask targets under `overlap_masks`.
    fn targets(&self, mut sample: TrainSample) -> kiln_data::Result<TrainSample> {
        if self.overlap_masks {
            give_shared_cells_to_the_smallest(&mut sample.masks);
        }
        Ok(sample)
    }
}

impl TrainDataset {
    /// A sample of `images` (positions in the sources taken as one list): the first alone, or all
    /// four as a mosaic when mosaic is on. The memory estimate's worst case.
    pub fn sample_of(&self, images: &[usize], seed: u64) -> kiln_data::Result<TrainSample> {
        let mut rng = SeededRng::new(self.seed).fork(seed | (1 << 62));
        let chosen = if images.len() == 4 && self.augment.mosaic > 0.0 { images } else { &images[..1] };
        let items: Vec<DetectionItem> = chosen.iter().map(|&i| self.load(i)).collect::<Result<_, _>>()?;
        self.targets(augment(&items, &self.augment, self.image_size, self.mask_downsample, &mut rng)?)
    }
}

/// Positions of `dataset`'s images, the most annotated first (a step's memory grows with the
/// objects in its images: the memory estimate measures the heaviest).
pub fn most_annotated_first(dataset: &kiln_data::coco::CocoDataset) -> Vec<usize> {
    let mut counts: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    for annotation in &dataset.annotations {
        *counts.entry(annotation.image_id).or_default() += 1;
    }
    let mut positions: Vec<usize> = (0..dataset.images.len()).collect();
    positions.sort_by_key(|&i| std::cmp::Reverse(counts.get(&dataset.images[i].id).copied().unwrap_or(0)));
    positions
}

impl Dataset<TrainSample> for TrainDataset {
    fn get(&self, index: usize) -> Result<TrainSample, DatasetError> {
        self.sample(self.epoch.get().max(1), index).map_err(DatasetError::new)
    }

    fn len(&self) -> usize {
        self.images()
    }
}

/// Augmented samples → a [`DetectionBatch`] (boxes padded per image, masks at the prototypes'
/// resolution).
#[derive(Debug, Clone)]
pub struct TrainBatcher {
    pub image_size: u32,
    pub mask_downsample: Option<u32>,
}

impl Batcher<TrainSample, DetectionBatch> for TrainBatcher {
    fn batch(&self, items: Vec<TrainSample>, device: &Device) -> DetectionBatch {
        let b = items.len();
        let s = self.image_size as usize;
        let m = items.iter().map(|i| i.boxes.len()).max().unwrap_or(0).max(1);
        let mut pixels = Vec::with_capacity(b * 3 * s * s);
        let mut boxes = vec![0f32; b * m * 4];
        let mut classes = vec![0i64; b * m];
        let mut valid = vec![0f32; b * m];
        let ms = self.mask_downsample.map(|d| self.image_size.div_ceil(d.max(1)) as usize);
        let mut masks = vec![0f32; ms.map_or(0, |ms| b * m * ms * ms)];
        for (bi, item) in items.iter().enumerate() {
            pixels.extend(kiln_data::planar_pixels(&item.image));
            for (mi, (class, bbox)) in item.boxes.iter().enumerate() {
                let slot = bi * m + mi;
                boxes[slot * 4..slot * 4 + 4].copy_from_slice(bbox);
                classes[slot] = *class as i64;
                valid[slot] = 1.0;
                if let (Some(ms), Some(mask)) = (ms, item.masks.get(mi)) {
                    for (dst, &v) in masks[slot * ms * ms..(slot + 1) * ms * ms].iter_mut().zip(&mask.data) {
                        *dst = v as f32;
                    }
                }
            }
        }
        let features = items.iter().filter_map(|i| i.features.as_ref()).map(|f| (f.channels, f.grid)).max();
        let teacher = (items.iter().any(|i| !i.signals.is_empty()) || features.is_some()).then(|| {
            let mut targets = TeacherTargets {
                class_probs: vec![None; b * m],
                soft_masks: vec![None; b * m],
                features: features.map(|(channels, grid)| BatchFeatures {
                    channels,
                    grid,
                    values: vec![0.0; b * channels * grid * grid],
                    valid: vec![0.0; b * grid * grid],
                }),
            };
            if let Some(batch) = targets.features.as_mut() {
                let (plane, cells) = (batch.channels * batch.grid * batch.grid, batch.grid * batch.grid);
                for (bi, item) in items.iter().enumerate() {
                    if let Some(f) =
                        item.features.as_ref().filter(|f| f.channels == batch.channels && f.grid == batch.grid)
                    {
                        batch.values[bi * plane..(bi + 1) * plane].copy_from_slice(&f.values);
                        batch.valid[bi * cells..(bi + 1) * cells].copy_from_slice(&f.valid);
                    }
                }
            }
            for (bi, item) in items.iter().enumerate() {
                for (mi, signal) in item.signals.iter().enumerate() {
                    if let Some(signal) = signal {
                        targets.class_probs[bi * m + mi] = signal.class_probs.clone();
                        targets.soft_masks[bi * m + mi] = signal.soft_mask.clone();
                    }
                }
            }
            targets
        });
        let size = self.image_size;
        DetectionBatch {
            images: Tensor::from_data(TensorData::new(pixels, [b, 3, s, s]), device),
            boxes: Tensor::from_data(TensorData::new(boxes, [b, m, 4]), device),
            classes: Tensor::from_data(TensorData::new(classes, [b, m]), device),
            valid: Tensor::from_data(TensorData::new(valid, [b, m]), device),
            masks: ms.map(|ms| Tensor::from_data(TensorData::new(masks, [b, m, ms, ms]), device)),
            letterboxes: vec![Letterbox::new(size, size, size, size); b],
            image_ids: vec![0; b],
            teacher,
        }
    }
}

/// Validation images, letterboxed without augmentation.
pub struct ValDataset(pub Arc<CocoDetectionDataset>);

impl Dataset<DetectionItem> for ValDataset {
    fn get(&self, index: usize) -> Result<DetectionItem, DatasetError> {
        self.0.load(index).map_err(DatasetError::new)
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// The validation batcher: [`DetectionBatcher`] at the training size, with the training's mask
/// targets (`overlap_masks`: `loss.overlap_mask`).
pub fn val_batcher(image_size: u32, masks: bool, overlap_masks: bool) -> DetectionBatcher {
    DetectionBatcher { image_size, mask_downsample: masks.then_some(4), overlap_masks }
}
