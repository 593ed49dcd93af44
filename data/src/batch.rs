//! From a COCO dataset to Burn tensors: samples loaded from disk, letterboxed to a square input as
//! Ultralytics' `LetterBox` does (scale to fit, centre, pad with grey 114), boxes and masks moved
//! by the same transform so they stay aligned with the pixels, then batched with per-image instance
//! padding (the layout YOLOv8's task-aligned assigner consumes).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::tensor::{Device, Int, Tensor, TensorData};
use image::RgbImage;

use crate::coco::{CocoDataset, Segmentation};
use crate::error::{DataError, Result};
use crate::letterbox::Letterbox;
use crate::mask::{Rle, give_shared_cells_to_the_smallest, ultralytics_resample_count};

/// One labelled instance as training uses it.
#[derive(Debug, Clone)]
pub struct InstanceLabel {
    /// Contiguous class index (see [`CocoDataset::class_index`]).
    pub class: usize,
    /// `[x1, y1, x2, y2]` in original pixels, clipped to the image.
    pub bbox: [f64; 4],
    pub segmentation: Option<Segmentation>,
    /// What a teacher says about the instance beyond its box, class and mask (distillation).
    pub teacher: Option<TeacherSignal>,
}

/// A teacher's knowledge of one instance that hard labels cannot carry.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TeacherSignal {
    /// The teacher's probability per class (class-index order). Present when the instance is the
    /// teacher's own (a teacher label); absent for ground truth that a teacher only segmented.
    pub class_probs: Option<Vec<f32>>,
    /// The teacher's mask probabilities over a region of the original image.
    pub soft_mask: Option<SoftMask>,
}

/// Mask probabilities on a grid covering `region` (`x1, y1, x2, y2`, original pixels) of an image:
/// `width x height` cells, row-major, probability x 255.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SoftMask {
    pub region: [f64; 4],
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl SoftMask {
    /// The probability at original-image point `(x, y)` (bilinear between cell centres); zero
    /// outside the region.
    pub fn probability_at(&self, x: f64, y: f64) -> f32 {
        let [x1, y1, x2, y2] = self.region;
        if self.width == 0 || self.height == 0 || x < x1 || x >= x2 || y < y1 || y >= y2 {
            return 0.0;
        }
        let gx = ((x - x1) / (x2 - x1) * self.width as f64 - 0.5).clamp(0.0, (self.width - 1) as f64);
        let gy = ((y - y1) / (y2 - y1) * self.height as f64 - 0.5).clamp(0.0, (self.height - 1) as f64);
        let (ix, iy) = (gx.floor() as usize, gy.floor() as usize);
        let (jx, jy) = ((ix + 1).min(self.width as usize - 1), (iy + 1).min(self.height as usize - 1));
        let (fx, fy) = ((gx - ix as f64) as f32, (gy - iy as f64) as f32);
        let w = self.width as usize;
        let at = |x: usize, y: usize| self.data[y * w + x] as f32 / 255.0;
        let top = at(ix, iy) * (1.0 - fx) + at(jx, iy) * fx;
        let bottom = at(ix, jy) * (1.0 - fx) + at(jx, jy) * fx;
        top * (1.0 - fy) + bottom * fy
    }
}

/// An image with its instances, read from disk.
#[derive(Debug, Clone)]
pub struct DetectionItem {
    pub image_id: u64,
    pub image: RgbImage,
    pub instances: Vec<InstanceLabel>,
    /// A teacher's feature map of the image (feature distillation).
    pub features: Option<Arc<FeatureMap>>,
}

impl DetectionItem {
    /// How many points Ultralytics resamples each polygon of this image to before drawing its
    /// mask target ([`ultralytics_resample_count`] of the most points any polygon has).
    pub fn ultralytics_resample_count(&self) -> usize {
        let most = self
            .instances
            .iter()
            .filter_map(|i| match &i.segmentation {
                Some(Segmentation::Polygons(polygons)) => polygons.iter().map(|p| p.len() / 2).max(),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        ultralytics_resample_count(most)
    }
}

/// A teacher's feature map of an image: `channels x height x width` (row-major per channel) on a
/// grid covering `region` (`x1, y1, x2, y2`, original pixels; it may reach past the image where the
/// teacher pads it).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureMap {
    pub channels: u32,
    pub width: u32,
    pub height: u32,
    pub region: [f64; 4],
    pub data: Vec<f32>,
}

/// The file format of a [`FeatureMap`]: this tag, then channels, width, height (u32), the region
/// (4 x f64), the values (f32), all little-endian.
const FEATURE_MAP_TAG: &[u8; 8] = b"kilnfm01";

impl FeatureMap {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(8 + 12 + 32 + 4 * self.data.len());
        bytes.extend_from_slice(FEATURE_MAP_TAG);
        for v in [self.channels, self.width, self.height] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        for v in self.region {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        for v in &self.data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes
    }

    /// Reads [`FeatureMap::to_bytes`]'s format; anything else is an error naming `path`.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |what: &str| DataError::invalid(path, format!("not a kiln feature map: {what}"));
        if bytes.len() < 52 || &bytes[..8] != FEATURE_MAP_TAG {
            return Err(bad("wrong header"));
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let f64_at = |i: usize| f64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let (channels, width, height) = (u32_at(8), u32_at(12), u32_at(16));
        let region = [f64_at(20), f64_at(28), f64_at(36), f64_at(44)];
        let values = channels as usize * width as usize * height as usize;
        if bytes.len() != 52 + 4 * values {
            return Err(bad(&format!("{} bytes for {channels} x {height} x {width} values", bytes.len())));
        }
        let data = bytes[52..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        Ok(Self { channels, width, height, region, data })
    }

    /// All channels at original-image point `(x, y)` (bilinear between cell centres), or `None`
    /// outside the region.
    pub fn sample(&self, x: f64, y: f64, out: &mut [f32]) -> bool {
        let [x1, y1, x2, y2] = self.region;
        if self.width == 0 || self.height == 0 || x < x1 || x >= x2 || y < y1 || y >= y2 {
            return false;
        }
        let (w, h) = (self.width as usize, self.height as usize);
        let gx = ((x - x1) / (x2 - x1) * w as f64 - 0.5).clamp(0.0, (w - 1) as f64);
        let gy = ((y - y1) / (y2 - y1) * h as f64 - 0.5).clamp(0.0, (h - 1) as f64);
        let (ix, iy) = (gx.floor() as usize, gy.floor() as usize);
        let (jx, jy) = ((ix + 1).min(w - 1), (iy + 1).min(h - 1));
        let (fx, fy) = ((gx - ix as f64) as f32, (gy - iy as f64) as f32);
        let weights = [(1.0 - fx) * (1.0 - fy), fx * (1.0 - fy), (1.0 - fx) * fy, fx * fy];
        let cells = [iy * w + ix, iy * w + jx, jy * w + ix, jy * w + jx];
        for (c, value) in out.iter_mut().enumerate().take(self.channels as usize) {
            let plane = &self.data[c * w * h..(c + 1) * w * h];
            *value = cells.iter().zip(&weights).map(|(&cell, &weight)| plane[cell] * weight).sum();
        }
        true
    }
}

/// A COCO dataset whose images are read from `images_dir` on demand. Crowd regions and instances
/// with an empty box are left out of the targets (COCO's own training convention).
pub struct CocoDetectionDataset {
    dataset: Arc<CocoDataset>,
    images_dir: PathBuf,
    annotations_by_image: Vec<Vec<usize>>,
    class_index: HashMap<u64, usize>,
    /// Teacher signals by annotation id.
    signals: HashMap<u64, TeacherSignal>,
    /// Teacher feature map files by image id, read with the image.
    features: HashMap<u64, PathBuf>,
}

impl CocoDetectionDataset {
    pub fn new(dataset: CocoDataset, images_dir: impl AsRef<Path>) -> Self {
        let annotations_by_image = dataset.annotations_by_image();
        let class_index = dataset.class_index();
        Self {
            dataset: Arc::new(dataset),
            images_dir: images_dir.as_ref().to_path_buf(),
            annotations_by_image,
            class_index,
            signals: HashMap::new(),
            features: HashMap::new(),
        }
    }

    /// The same dataset with a teacher's feature map files (by image id), read with each image.
    pub fn with_features(mut self, features: HashMap<u64, PathBuf>) -> Self {
        self.features = features;
        self
    }

    /// The same dataset with a teacher's signals attached to its annotations (by annotation id).
    pub fn with_signals(mut self, signals: HashMap<u64, TeacherSignal>) -> Self {
        self.signals = signals;
        self
    }

    /// The directory its images are read from.
    pub fn images_dir(&self) -> &Path {
        &self.images_dir
    }

    pub fn coco(&self) -> &CocoDataset {
        &self.dataset
    }

    pub fn class_names(&self) -> Vec<String> {
        self.dataset.class_names()
    }

    pub fn load(&self, index: usize) -> Result<DetectionItem> {
        let info = self.dataset.images.get(index).ok_or_else(|| {
            DataError::invalid(
                &self.images_dir,
                format!("image index {index} is out of range ({} images)", self.dataset.images.len()),
            )
        })?;
        let path = crate::paths::inside(&self.images_dir, &info.file_name, &format!("image {}", info.id))?;
        let image = crate::io::read_rgb_image(&path)?;
        if image.dimensions() != (info.width, info.height) {
            return Err(DataError::Image {
                path,
                message: format!(
                    "it is {}x{} but the annotations say {}x{}",
                    image.width(),
                    image.height(),
                    info.width,
                    info.height
                ),
            });
        }
        let (w, h) = (info.width as f64, info.height as f64);
        let mut instances = Vec::new();
        for &a in &self.annotations_by_image[index] {
            let annotation = &self.dataset.annotations[a];
            let Some(&class) = self.class_index.get(&annotation.category_id) else {
                continue;
            };
            if annotation.iscrowd != 0 {
                continue;
            }
            let bbox = match (annotation.bbox, annotation.mask()) {
                (Some(b), _) => b,
                (None, Some(_)) => rle_of_mask(annotation, info, &path)?.bbox(),
                (None, None) => continue,
            };
            if annotation.bbox.is_some() && annotation.mask().is_some() {
                // Decoding now makes a broken mask an error here rather than a failure in the batcher.
                rle_of_mask(annotation, info, &path)?;
            }
            let [x, y, bw, bh] = bbox;
            let clipped = [x.clamp(0.0, w), y.clamp(0.0, h), (x + bw).clamp(0.0, w), (y + bh).clamp(0.0, h)];
            if clipped[2] - clipped[0] <= 0.0 || clipped[3] - clipped[1] <= 0.0 {
                continue;
            }
            instances.push(InstanceLabel {
                class,
                bbox: clipped,
                segmentation: annotation.mask().cloned(),
                teacher: self.signals.get(&annotation.id).cloned(),
            });
        }
        let features = match self.features.get(&info.id) {
            Some(file) => {
                let bytes = std::fs::read(file).map_err(|e| DataError::invalid(file, format!("cannot read: {e}")))?;
                Some(Arc::new(FeatureMap::from_bytes(&bytes, file)?))
            }
            None => None,
        };
        Ok(DetectionItem { image_id: info.id, image, instances, features })
    }
}

fn rle_of_mask(annotation: &crate::coco::CocoAnnotation, image: &crate::coco::CocoImage, path: &Path) -> Result<Rle> {
    let mask = annotation.mask().expect("called for annotations with a mask");
    mask.to_rle(image.height, image.width)
        .map_err(|e| DataError::invalid(path, format!("annotation {}: {e}", annotation.id)))
}

impl Dataset<DetectionItem, DataError> for CocoDetectionDataset {
    fn get(&self, index: usize) -> Result<DetectionItem> {
        self.load(index)
    }

    fn len(&self) -> usize {
        self.dataset.images.len()
    }
}

/// A batch of letterboxed images and their padded targets.
#[derive(Debug, Clone)]
pub struct DetectionBatch {
    /// `[B, 3, S, S]`, RGB in 0..1.
    pub images: Tensor<4>,
    /// `[B, M, 4]` `x1, y1, x2, y2` in letterboxed pixels; zeros where padded.
    pub boxes: Tensor<3>,
    /// `[B, M]` class indexes; 0 where padded.
    pub classes: Tensor<2, Int>,
    /// `[B, M]` 1 for a real instance, 0 for padding.
    pub valid: Tensor<2>,
    /// `[B, M, S/d, S/d]` instance masks, when the batcher makes masks.
    pub masks: Option<Tensor<4>>,
    pub letterboxes: Vec<Letterbox>,
    pub image_ids: Vec<u64>,
    /// What teachers say about the instances, when any instance of the batch has a teacher signal.
    pub teacher: Option<TeacherTargets>,
}

/// Teacher signals of a batch, per padded instance slot (`b * M + m`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TeacherTargets {
    /// The teacher's class probabilities, for the teacher's own labels.
    pub class_probs: Vec<Option<Vec<f32>>>,
    /// The teacher's mask probabilities at the masks' resolution (`S/d x S/d`, row-major).
    pub soft_masks: Vec<Option<Vec<f32>>>,
    /// The teacher's feature maps on the student's feature grid, when its images have them.
    pub features: Option<BatchFeatures>,
}

/// Teacher features of a batch on a `grid x grid` cell grid of the input (one cell per `stride`
/// pixels): `[B, channels, grid, grid]` values and `[B, grid, grid]` 1 where a teacher feature
/// lies under the cell, 0 elsewhere (padding, images without features).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchFeatures {
    pub channels: usize,
    pub grid: usize,
    pub values: Vec<f32>,
    pub valid: Vec<f32>,
}

/// Turns [`DetectionItem`]s into a [`DetectionBatch`] at a square input size. `M` is the largest
/// instance count in the batch (at least 1, so no tensor is empty).
#[derive(Debug, Clone)]
pub struct DetectionBatcher {
    pub image_size: u32,
    /// `Some(d)`: masks at `image_size / d` (YOLOv8-seg trains on `d = 4`); `None`: no masks.
    pub mask_downsample: Option<u32>,
    /// Cells that several masks of an image cover stay only in the smallest one's
    /// ([`give_shared_cells_to_the_smallest`]: the targets of a student trained with
    /// `loss.overlap_mask`).
    pub overlap_masks: bool,
}

impl DetectionBatcher {
    pub fn try_batch(&self, items: &[DetectionItem], device: &Device) -> Result<DetectionBatch> {
        let b = items.len();
        let s = self.image_size;
        let m = items.iter().map(|i| i.instances.len()).max().unwrap_or(0).max(1);
        let mut pixels = Vec::with_capacity(b * 3 * (s * s) as usize);
        let mut boxes = vec![0f32; b * m * 4];
        let mut classes = vec![0i64; b * m];
        let mut valid = vec![0f32; b * m];
        let mask_size = self.mask_downsample.map(|d| s.div_ceil(d.max(1)));
        let mut masks = vec![0f32; mask_size.map_or(0, |ms| b * m * (ms * ms) as usize)];
        let mut letterboxes = Vec::with_capacity(b);
        for (bi, item) in items.iter().enumerate() {
            let letterbox = Letterbox::new(item.image.width(), item.image.height(), s, s);
            let canvas = letterbox.apply_image(&item.image);
            for c in 0..3 {
                pixels.extend(canvas.as_raw().iter().skip(c).step_by(3).map(|&v| v as f32 / 255.0));
            }
            let resample = item.ultralytics_resample_count();
            let (mut mask_slots, mut item_masks) = (Vec::new(), Vec::new());
            for (mi, instance) in item.instances.iter().enumerate() {
                let slot = bi * m + mi;
                let mapped = letterbox.forward_box(instance.bbox);
                boxes[slot * 4..slot * 4 + 4].copy_from_slice(&mapped.map(|v| v as f32));
                classes[slot] = instance.class as i64;
                valid[slot] = 1.0;
                if let (Some(d), Some(segmentation)) = (self.mask_downsample, &instance.segmentation) {
                    mask_slots.push(slot);
                    item_masks.push(letterbox.apply_mask(segmentation, d, resample)?);
                }
            }
            if self.overlap_masks {
                give_shared_cells_to_the_smallest(&mut item_masks);
            }
            if let Some(ms) = mask_size {
                let plane = (ms * ms) as usize;
                for (slot, mask) in mask_slots.iter().zip(&item_masks) {
                    for (dst, &v) in masks[slot * plane..(slot + 1) * plane].iter_mut().zip(&mask.data) {
                        *dst = v as f32;
                    }
                }
            }
            letterboxes.push(letterbox);
        }
        let (s, m) = (s as usize, m);
        Ok(DetectionBatch {
            images: Tensor::from_data(TensorData::new(pixels, [b, 3, s, s]), device),
            boxes: Tensor::from_data(TensorData::new(boxes, [b, m, 4]), device),
            classes: Tensor::from_data(TensorData::new(classes, [b, m]), device),
            valid: Tensor::from_data(TensorData::new(valid, [b, m]), device),
            masks: mask_size
                .map(|ms| Tensor::from_data(TensorData::new(masks, [b, m, ms as usize, ms as usize]), device)),
            letterboxes,
            image_ids: items.iter().map(|i| i.image_id).collect(),
            teacher: None,
        })
    }
}

impl Batcher<DetectionItem, DetectionBatch> for DetectionBatcher {
    /// Items from [`CocoDetectionDataset`] have had every mask decoded once already, so this cannot
    /// fail for them; [`DetectionBatcher::try_batch`] returns the error for items built elsewhere.
    fn batch(&self, items: Vec<DetectionItem>, device: &Device) -> DetectionBatch {
        self.try_batch(&items, device).unwrap_or_else(|e| panic!("cannot batch: {e}"))
    }
}
