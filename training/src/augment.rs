//! Training augmentation for detection and segmentation, after Ultralytics' `data/augment.py`
//! defaults for YOLOv8: `Mosaic` (4 images around a random centre), `RandomPerspective` reduced to
//! what its defaults use (scale ±0.5, translate ±0.1; no rotation, shear or perspective, so every
//! map is axis-aligned and boxes stay exact), `RandomHSV` (0.015, 0.7, 0.4) and `RandomFlip`
//! (horizontal, 0.5), then the same box filter (`box_candidates`). Boxes and masks go through the
//! very map the pixels do. Every draw comes from a seeded generator, so a sample is a pure function
//! of (seed, epoch, index).
//!
//! Beyond Ultralytics' recipe, off by default and chosen from what the user says about the objects
//! and their environment (the characteristics table): a vertical flip, photometric changes of the
//! light and the camera (brightness, contrast, gamma, Gaussian and motion blur, sensor noise, JPEG
//! artefacts), occlusion (cutout patches that hide part of the objects: masks lose the hidden
//! part, objects mostly hidden are dropped, as YOLOv5's cutout does) and the rest of
//! `RandomPerspective`: rotation, shear and perspective about the centre, after the axis-aligned
//! placement, each object's box then taken from its warped mask (from its warped corners when it
//! has none, as Ultralytics does). A parameter at 0 draws no random number, so the default
//! recipe's samples stay what they were.

use image::RgbImage;
use kiln_data::batch::{DetectionItem, InstanceLabel};
use kiln_data::coco::Segmentation;
use kiln_data::mask::BinaryMask;
use kiln_data::rng::SeededRng;
use serde::{Deserialize, Serialize};

/// Ultralytics' grey for padding.
const PAD: u8 = 114;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AugmentConfig {
    /// Probability of a 4-image mosaic.
    pub mosaic: f64,
    /// Random scale gain: the image is scaled by `1 ± scale`.
    pub scale: f64,
    /// Random translation as a fraction of the input size.
    pub translate: f64,
    pub hsv_h: f64,
    pub hsv_s: f64,
    pub hsv_v: f64,
    /// Probability of a horizontal flip.
    pub fliplr: f64,
    /// Probability of a vertical flip.
    #[serde(default)]
    pub flipud: f64,
    /// Brightness gain drawn in `1 ± brightness` (all channels).
    #[serde(default)]
    pub brightness: f64,
    /// Contrast factor drawn in `1 ± contrast`, about the image's mean grey.
    #[serde(default)]
    pub contrast: f64,
    /// Gamma drawn log-uniformly in `[1 / (1 + gamma), 1 + gamma]` (above 1 darkens the shadows).
    #[serde(default)]
    pub gamma: f64,
    /// Sensor noise: Gaussian, its standard deviation drawn in `[0, noise]` of the full range.
    #[serde(default)]
    pub noise: f64,
    /// Probability of a Gaussian blur (sigma drawn in 0.5..1.5 input pixels): focus.
    #[serde(default)]
    pub blur: f64,
    /// Probability of a linear motion blur (3 to 3 + 4 % of the input size pixels long, any
    /// direction): a moving camera or object.
    #[serde(default)]
    pub motion_blur: f64,
    /// Probability of re-encoding as JPEG at a quality drawn in 30..90: compression artefacts.
    #[serde(default)]
    pub jpeg: f64,
    /// Probability of 1 to 3 grey patches (sides 10-30 % of the input) hiding what lies under them.
    #[serde(default)]
    pub cutout: f64,
    /// Rotation drawn in `± degrees` about the centre (Ultralytics' `degrees`).
    #[serde(default)]
    pub degrees: f64,
    /// Shear drawn in `± shear` degrees along each axis (Ultralytics' `shear`).
    #[serde(default)]
    pub shear: f64,
    /// Perspective: the homography's last row drawn in `± perspective` per pixel (Ultralytics'
    /// `perspective`, 0 to 0.001).
    #[serde(default)]
    pub perspective: f64,
    /// Share of an image's objects with a mask copied, mirrored, onto the image where they hide
    /// less than 30 % of any object already there (Ultralytics' `copy_paste`, flip mode).
    #[serde(default)]
    pub copy_paste: f64,
    /// Probability of zooming in 1.5-3x on one object drawn at random, centred on it: small
    /// objects seen larger, the crop keeping the chosen one (whole unless it outgrows the view).
    #[serde(default)]
    pub zoom: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            mosaic: 1.0,
            scale: 0.5,
            translate: 0.1,
            hsv_h: 0.015,
            hsv_s: 0.7,
            hsv_v: 0.4,
            fliplr: 0.5,
            ..Self::none()
        }
    }
}

impl AugmentConfig {
    /// Whether it changes nothing (for the teachers' configs, which leave it out then).
    pub fn is_none(&self) -> bool {
        *self == Self::none()
    }

    /// No augmentation at all (plain letterbox), as for validation.
    pub fn none() -> Self {
        Self {
            mosaic: 0.0,
            scale: 0.0,
            translate: 0.0,
            hsv_h: 0.0,
            hsv_s: 0.0,
            hsv_v: 0.0,
            fliplr: 0.0,
            flipud: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            gamma: 0.0,
            noise: 0.0,
            blur: 0.0,
            motion_blur: 0.0,
            jpeg: 0.0,
            cutout: 0.0,
            degrees: 0.0,
            shear: 0.0,
            perspective: 0.0,
            copy_paste: 0.0,
            zoom: 0.0,
        }
    }
}

/// Objects at least this share of whose box a cutout patch hides are dropped (YOLOv5's 0.6).
const CUTOUT_HIDDEN: f64 = 0.6;

/// One augmented training sample at the network's input size.
#[derive(Debug, Clone)]
pub struct TrainSample {
    pub image: RgbImage,
    /// Class index and `x1, y1, x2, y2` in input pixels.
    pub boxes: Vec<(usize, [f32; 4])>,
    /// Per box, its mask at `1 / mask_downsample` of the input (when masks are asked for).
    pub masks: Vec<BinaryMask>,
    /// Per box, what its teacher says, moved as the pixels are (empty when no instance has a
    /// teacher signal).
    pub signals: Vec<Option<PlacedSignal>>,
    /// The teachers' feature maps moved as the pixels are, on the student's feature grid (one
    /// cell per [`FEATURE_STRIDE`] pixels), when any image has one.
    pub features: Option<PlacedFeatures>,
}

/// The student level feature distillation teaches: P4, one cell per 16 input pixels (the neck's
/// middle level: fine enough for small objects, coarse enough to match teacher embeddings such as
/// SAM's, one cell per 16 pixels of its input).
pub const FEATURE_STRIDE: u32 = 16;

/// Teacher features on a `grid x grid` grid: `[channels, grid, grid]` values, and per cell 1 where a
/// teacher feature lies under it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacedFeatures {
    pub channels: usize,
    pub grid: usize,
    pub values: Vec<f32>,
    pub valid: Vec<f32>,
}

/// A teacher signal in a training sample: the class probabilities, and the mask probabilities at
/// the masks' resolution (row-major) when masks are asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacedSignal {
    pub class_probs: Option<Vec<f32>>,
    pub soft_mask: Option<Vec<f32>>,
}

/// `x' = x * s + ox`, `y' = y * s + oy` (one scale: aspect ratios are kept, as Ultralytics does),
/// with `s < 0` in x meaning a horizontal flip.
#[derive(Debug, Clone, Copy)]
struct Placement {
    sx: f64,
    sy: f64,
    ox: f64,
    oy: f64,
    /// The part of the output this image may paint: `x1, y1, x2, y2`.
    visible: [f64; 4],
}

impl Placement {
    fn map_box(&self, [x1, y1, x2, y2]: [f64; 4]) -> [f64; 4] {
        let (a, b) = (x1 * self.sx + self.ox, x2 * self.sx + self.ox);
        let (c, d) = (y1 * self.sy + self.oy, y2 * self.sy + self.oy);
        [a.min(b), c.min(d), a.max(b), c.max(d)]
    }

    fn then(&self, scale: f64, ox: f64, oy: f64) -> Placement {
        let v = self.visible;
        Placement {
            sx: self.sx * scale,
            sy: self.sy * scale,
            ox: self.ox * scale + ox,
            oy: self.oy * scale + oy,
            visible: [v[0] * scale + ox, v[1] * scale + oy, v[2] * scale + ox, v[3] * scale + oy],
        }
    }

    fn flipped(&self, width: f64) -> Placement {
        let v = self.visible;
        Placement { sx: -self.sx, ox: width - self.ox, visible: [width - v[2], v[1], width - v[0], v[3]], ..*self }
    }

    fn flipped_vertically(&self, height: f64) -> Placement {
        let v = self.visible;
        Placement { sy: -self.sy, oy: height - self.oy, visible: [v[0], height - v[3], v[2], height - v[1]], ..*self }
    }
}

/// Builds the sample for `items` (1 image, or 4 for a mosaic: the first is the indexed one).
pub fn augment(
    items: &[DetectionItem],
    config: &AugmentConfig,
    size: u32,
    mask_downsample: Option<u32>,
    rng: &mut SeededRng,
) -> kiln_data::Result<TrainSample> {
    let s = size as f64;
    let pasted: Vec<DetectionItem>;
    let items = if config.copy_paste > 0.0 {
        pasted = items.iter().map(|item| copy_paste(item, config.copy_paste, rng)).collect::<Result<_, _>>()?;
        &pasted[..]
    } else {
        items
    };
    let mut placements: Vec<Placement> = Vec::with_capacity(items.len());
    let (canvas, border) = if items.len() == 4 {
        // Mosaic: each image scaled so its long side is `size`, tiled around a centre drawn in
        // the middle half of a 2s x 2s canvas; `RandomPerspective` then crops the central s x s.
        let xc = rng.uniform(s * 0.5, s * 1.5).floor();
        let yc = rng.uniform(s * 0.5, s * 1.5).floor();
        for (i, item) in items.iter().enumerate() {
            let (w0, h0) = (item.image.width() as f64, item.image.height() as f64);
            let r = s / w0.max(h0);
            let (w, h) = ((w0 * r).round(), (h0 * r).round());
            let (x1, y1) = match i {
                0 => (xc - w, yc - h),
                1 => (xc, yc - h),
                2 => (xc - w, yc),
                _ => (xc, yc),
            };
            let visible = [x1.max(0.0), y1.max(0.0), (x1 + w).min(2.0 * s), (y1 + h).min(2.0 * s)];
            placements.push(Placement { sx: w / w0, sy: h / h0, ox: x1, oy: y1, visible });
        }
        (2.0 * s, -s / 2.0)
    } else {
        let item = &items[0];
        let (w0, h0) = (item.image.width() as f64, item.image.height() as f64);
        let r = (s / w0).min(s / h0);
        let (w, h) = ((w0 * r).round().max(1.0), (h0 * r).round().max(1.0));
        let (x1, y1) = (((s - w) / 2.0 - 0.1).round().max(0.0), ((s - h) / 2.0 - 0.1).round().max(0.0));
        placements.push(Placement { sx: w / w0, sy: h / h0, ox: x1, oy: y1, visible: [x1, y1, x1 + w, y1 + h] });
        (s, 0.0)
    };
    // RandomPerspective: centre the canvas, scale about the centre, translate, onto s x s. With
    // border = -s/2 (mosaic), the 2s canvas is cropped to s.
    let out = canvas + 2.0 * border;
    let scale = rng.uniform(1.0 - config.scale, 1.0 + config.scale);
    let tx = rng.uniform(0.5 - config.translate, 0.5 + config.translate) * out;
    let ty = rng.uniform(0.5 - config.translate, 0.5 + config.translate) * out;
    let flip = rng.chance(config.fliplr);
    let hsv = [
        rng.uniform(-1.0, 1.0) * config.hsv_h + 1.0,
        rng.uniform(-1.0, 1.0) * config.hsv_s + 1.0,
        rng.uniform(-1.0, 1.0) * config.hsv_v + 1.0,
    ];
    let flip_vertically = config.flipud > 0.0 && rng.chance(config.flipud);
    let warp = Warp::draw(config, size, rng);
    let half = canvas / 2.0;
    let mut placements: Vec<Placement> = placements
        .iter()
        .map(|p| {
            let p = p.then(scale, tx - half * scale, ty - half * scale);
            let p = if flip { p.flipped(s) } else { p };
            if flip_vertically { p.flipped_vertically(s) } else { p }
        })
        .collect();
    if config.zoom > 0.0 && rng.chance(config.zoom) {
        // The objects in view, as placed; one of them drawn, the view zoomed in around it.
        let in_view: Vec<[f64; 4]> = items
            .iter()
            .zip(&placements)
            .flat_map(|(item, p)| item.instances.iter().map(move |i| (p.map_box(i.bbox), p.visible)))
            .filter_map(|(b, v)| {
                let b =
                    [b[0].max(v[0]).max(0.0), b[1].max(v[1]).max(0.0), b[2].min(v[2]).min(s), b[3].min(v[3]).min(s)];
                (b[2] - b[0] > 1.0 && b[3] - b[1] > 1.0).then_some(b)
            })
            .collect();
        if !in_view.is_empty() {
            let chosen = in_view[rng.below(in_view.len())];
            let zoom = rng.uniform(1.5, 3.0);
            let (cx, cy) = ((chosen[0] + chosen[2]) / 2.0, (chosen[1] + chosen[3]) / 2.0);
            placements = placements.iter().map(|p| p.then(zoom, s / 2.0 - zoom * cx, s / 2.0 - zoom * cy)).collect();
        }
    }

    let mut image = RgbImage::from_pixel(size, size, image::Rgb([PAD; 3]));
    for (item, placement) in items.iter().zip(&placements) {
        paint(&mut image, &item.image, placement);
    }
    if let Some(warp) = &warp {
        image = warp.image(&image);
    }
    if hsv != [1.0; 3] {
        adjust_hsv(&mut image, hsv);
    }
    photometric(&mut image, config, rng)?;
    let patches = cutout_patches(config, size, rng);
    for patch in &patches {
        fill(&mut image, *patch);
    }

    let features = place_features(items, &placements, size).map(|f| match &warp {
        Some(warp) => warp.features(&f),
        None => f,
    });
    let mut sample = TrainSample { image, boxes: Vec::new(), masks: Vec::new(), signals: Vec::new(), features };
    let any_signal = items.iter().any(|item| item.instances.iter().any(|i| i.teacher.is_some()));
    for (item, placement) in items.iter().zip(&placements) {
        for instance in &item.instances {
            let placed = match &warp {
                None => place_instance(instance, item, placement, size, mask_downsample)?,
                Some(warp) => warp.instance(instance, item, placement, size, mask_downsample)?,
            };
            if let Some((bbox, mask)) = placed {
                if hidden_share(bbox, &patches) >= CUTOUT_HIDDEN {
                    continue;
                }
                sample.boxes.push((instance.class, bbox));
                if let Some(mut mask) = mask {
                    let d = mask_downsample.unwrap_or(1).max(1);
                    for patch in &patches {
                        hide_cells(&mut mask.data, mask.width as usize, d, *patch, 0);
                    }
                    sample.masks.push(mask);
                }
                if any_signal {
                    sample.signals.push(instance.teacher.as_ref().map(|signal| PlacedSignal {
                        class_probs: signal.class_probs.clone(),
                        soft_mask: match (&signal.soft_mask, mask_downsample) {
                            (Some(soft), Some(d)) => {
                                let mut probabilities = place_soft_mask(soft, placement, size, d);
                                if let Some(warp) = &warp {
                                    probabilities = warp.cells(&probabilities, 1, d, size, 0.0);
                                }
                                for patch in &patches {
                                    hide_cells(&mut probabilities, size.div_ceil(d.max(1)) as usize, d, *patch, 0.0);
                                }
                                Some(probabilities)
                            }
                            _ => None,
                        },
                    }));
                }
            }
        }
    }
    Ok(sample)
}

/// Ultralytics' `CopyPaste` (flip mode) on one image: of its objects with a mask, `share` of all
/// its objects (drawn among those whose mirror image hides less than 30 % of every object there)
/// are copied from the image mirrored left to right and pasted with their masks. An image with
/// teacher signals or features is left alone (what the teacher saw would no longer be the image).
fn copy_paste(item: &DetectionItem, share: f64, rng: &mut SeededRng) -> kiln_data::Result<DetectionItem> {
    let mut out = item.clone();
    if item.features.is_some() || item.instances.iter().any(|i| i.teacher.is_some()) {
        return Ok(out);
    }
    let (w, h) = (item.image.width(), item.image.height());
    let width = w as f64;
    let mirrored = |b: [f64; 4]| [width - b[2], b[1], width - b[0], b[3]];
    let area = |b: [f64; 4]| (b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0);
    let mut free: Vec<usize> = (0..item.instances.len())
        .filter(|&j| item.instances[j].segmentation.is_some())
        .filter(|&j| {
            let m = mirrored(item.instances[j].bbox);
            item.instances.iter().all(|other| {
                let o = other.bbox;
                let inter = [m[0].max(o[0]), m[1].max(o[1]), m[2].min(o[2]), m[3].min(o[3])];
                area(inter) < 0.3 * area(o).max(1e-9)
            })
        })
        .collect();
    rng.shuffle(&mut free);
    free.truncate((share * item.instances.len() as f64).round() as usize);
    for j in free {
        let instance = &item.instances[j];
        let Some(segmentation) = &instance.segmentation else { continue };
        let mask = segmentation.rasterize_affine(w, h, [1.0, 1.0, 0.0, 0.0], w, h)?;
        let mut flipped = BinaryMask::zeros(w, h);
        for y in 0..h {
            for x in 0..w {
                if mask.get(x, y) {
                    flipped.data[(y * w + (w - 1 - x)) as usize] = 1;
                    out.image.put_pixel(w - 1 - x, y, *item.image.get_pixel(x, y));
                }
            }
        }
        let segmentation = match segmentation {
            Segmentation::Polygons(polygons) => Segmentation::Polygons(
                polygons.iter().map(|p| p.chunks_exact(2).flat_map(|xy| [width - xy[0], xy[1]]).collect()).collect(),
            ),
            Segmentation::Rle(_) => Segmentation::Rle(kiln_data::mask::Rle::encode(&flipped).to_json(true)),
        };
        out.instances.push(InstanceLabel {
            class: instance.class,
            bbox: mirrored(instance.bbox),
            segmentation: Some(segmentation),
            teacher: None,
        });
    }
    Ok(out)
}

/// The light and camera changes of `config`, each drawn only when its parameter is on, in the
/// order light reaches the file: exposure (brightness, contrast, gamma), optics (blur), motion,
/// sensor noise, compression.
pub fn photometric(image: &mut RgbImage, config: &AugmentConfig, rng: &mut SeededRng) -> kiln_data::Result<()> {
    let gain =
        if config.brightness > 0.0 { rng.uniform(1.0 - config.brightness, 1.0 + config.brightness) } else { 1.0 };
    let contrast = if config.contrast > 0.0 { rng.uniform(1.0 - config.contrast, 1.0 + config.contrast) } else { 1.0 };
    let gamma = if config.gamma > 0.0 {
        let bound = (1.0 + config.gamma).ln();
        rng.uniform(-bound, bound).exp()
    } else {
        1.0
    };
    if (gain, contrast, gamma) != (1.0, 1.0, 1.0) {
        let raw = image.as_raw();
        let mean = raw.iter().map(|&v| v as f64).sum::<f64>() / raw.len().max(1) as f64 * gain;
        let table: Vec<u8> = (0..256)
            .map(|v| {
                let exposed = ((v as f64 * gain - mean) * contrast + mean).clamp(0.0, 255.0);
                (255.0 * (exposed / 255.0).powf(gamma)).round() as u8
            })
            .collect();
        for value in image.iter_mut() {
            *value = table[*value as usize];
        }
    }
    if config.blur > 0.0 && rng.chance(config.blur) {
        let sigma = rng.uniform(0.5, 1.5) as f32;
        *image = image::imageops::blur(image, sigma);
    }
    if config.motion_blur > 0.0 && rng.chance(config.motion_blur) {
        let length = rng.uniform(3.0, 3.0 + 0.04 * image.width() as f64);
        let angle = rng.uniform(0.0, std::f64::consts::PI);
        *image = motion_blurred(image, length, angle);
    }
    if config.noise > 0.0 {
        let sigma = rng.uniform(0.0, config.noise) * 255.0;
        for value in image.iter_mut() {
            *value = (*value as f64 + rng.normal() * sigma).round().clamp(0.0, 255.0) as u8;
        }
    }
    if config.jpeg > 0.0 && rng.chance(config.jpeg) {
        let quality = rng.uniform(30.0, 90.0).round() as u8;
        let mut bytes = Vec::new();
        let jpeg_error = |e: image::ImageError| kiln_data::DataError::Image {
            path: "(augmented sample, re-encoded as JPEG)".into(),
            message: e.to_string(),
        };
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality)
            .encode_image(&*image)
            .map_err(jpeg_error)?;
        *image = image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg).map_err(jpeg_error)?.to_rgb8();
    }
    Ok(())
}

/// `image` averaged along a line of `length` pixels through each pixel at `angle` (radians),
/// the samples at whole-pixel steps, clamped at the border.
fn motion_blurred(image: &RgbImage, length: f64, angle: f64) -> RgbImage {
    let (w, h) = (image.width() as i64, image.height() as i64);
    let taps = length.round().max(1.0) as i64;
    let offsets: Vec<(i64, i64)> = (0..taps)
        .map(|k| {
            let t = k as f64 - (taps - 1) as f64 / 2.0;
            ((t * angle.cos()).round() as i64, (t * angle.sin()).round() as i64)
        })
        .collect();
    let source = image.as_raw();
    let mut out = RgbImage::new(image.width(), image.height());
    for y in 0..h {
        for x in 0..w {
            let mut sum = [0u32; 3];
            for &(dx, dy) in &offsets {
                let (sx, sy) = ((x + dx).clamp(0, w - 1), (y + dy).clamp(0, h - 1));
                let at = ((sy * w + sx) * 3) as usize;
                for c in 0..3 {
                    sum[c] += source[at + c] as u32;
                }
            }
            out.put_pixel(x as u32, y as u32, image::Rgb(sum.map(|v| ((v as f64 / taps as f64).round()) as u8)));
        }
    }
    out
}

/// The cutout patches of a sample (`x1, y1, x2, y2` in input pixels), none unless drawn.
fn cutout_patches(config: &AugmentConfig, size: u32, rng: &mut SeededRng) -> Vec<[f64; 4]> {
    if config.cutout <= 0.0 || !rng.chance(config.cutout) {
        return Vec::new();
    }
    let s = size as f64;
    (0..1 + rng.below(3))
        .map(|_| {
            let (w, h) = (rng.uniform(0.1, 0.3) * s, rng.uniform(0.1, 0.3) * s);
            let (x, y) = (rng.uniform(0.0, s - w).round(), rng.uniform(0.0, s - h).round());
            [x, y, x + w.round(), y + h.round()]
        })
        .collect()
}

/// Paints a cutout patch in Ultralytics' padding grey.
fn fill(image: &mut RgbImage, [x1, y1, x2, y2]: [f64; 4]) {
    for y in y1 as u32..(y2 as u32).min(image.height()) {
        for x in x1 as u32..(x2 as u32).min(image.width()) {
            image.put_pixel(x, y, image::Rgb([PAD; 3]));
        }
    }
}

/// The share of `bbox` the patches hide (overlapping patches counted once, on a 1-pixel grid).
fn hidden_share(bbox: [f32; 4], patches: &[[f64; 4]]) -> f64 {
    if patches.is_empty() {
        return 0.0;
    }
    let [x1, y1, x2, y2] = bbox.map(|c| c as f64);
    let (mut hidden, mut total) = (0usize, 0usize);
    for y in y1.floor() as i64..y2.ceil() as i64 {
        for x in x1.floor() as i64..x2.ceil() as i64 {
            let (cx, cy) = (x as f64 + 0.5, y as f64 + 0.5);
            if cx < x1 || cx > x2 || cy < y1 || cy > y2 {
                continue;
            }
            total += 1;
            hidden += patches.iter().any(|p| cx >= p[0] && cx < p[2] && cy >= p[1] && cy < p[3]) as usize;
        }
    }
    if total == 0 { 0.0 } else { hidden as f64 / total as f64 }
}

/// Sets the cells of a row-major grid (`width` cells per row, one per `d` input pixels) whose
/// centre lies in `patch` to `value`.
fn hide_cells<T: Copy>(cells: &mut [T], width: usize, d: u32, patch: [f64; 4], value: T) {
    let d = d as f64;
    for (i, cell) in cells.iter_mut().enumerate() {
        let (cx, cy) = (((i % width) as f64 + 0.5) * d, ((i / width) as f64 + 0.5) * d);
        if cx >= patch[0] && cx < patch[2] && cy >= patch[1] && cy < patch[3] {
            *cell = value;
        }
    }
}

/// The items' teacher feature maps through their placements, sampled at each grid cell's centre
/// mapped back to the original image (cells of an item's visible part only).
fn place_features(items: &[DetectionItem], placements: &[Placement], size: u32) -> Option<PlacedFeatures> {
    let channels = items.iter().filter_map(|i| i.features.as_ref()).map(|f| f.channels as usize).max()?;
    let grid = size.div_ceil(FEATURE_STRIDE) as usize;
    let stride = FEATURE_STRIDE as f64;
    let mut placed =
        PlacedFeatures { channels, grid, values: vec![0.0; channels * grid * grid], valid: vec![0.0; grid * grid] };
    let mut cell = vec![0f32; channels];
    for (item, placement) in items.iter().zip(placements) {
        let Some(features) = item.features.as_ref().filter(|f| f.channels as usize == channels) else {
            continue;
        };
        let v = placement.visible;
        for gy in 0..grid {
            let cy = (gy as f64 + 0.5) * stride;
            if cy < v[1] || cy > v[3] || cy > size as f64 {
                continue;
            }
            for gx in 0..grid {
                let cx = (gx as f64 + 0.5) * stride;
                if cx < v[0] || cx > v[2] || cx > size as f64 {
                    continue;
                }
                let (x, y) = ((cx - placement.ox) / placement.sx, (cy - placement.oy) / placement.sy);
                if features.sample(x, y, &mut cell) {
                    for (c, &value) in cell.iter().enumerate() {
                        placed.values[(c * grid + gy) * grid + gx] = value;
                    }
                    placed.valid[gy * grid + gx] = 1.0;
                }
            }
        }
    }
    Some(placed)
}

/// The teacher's mask probabilities through the placement's map, at `1 / d` of the output:
/// each cell's centre mapped back to the original image and sampled there; zero outside this
/// image's visible part (a mosaic neighbour's pixels).
fn place_soft_mask(soft: &kiln_data::batch::SoftMask, placement: &Placement, size: u32, d: u32) -> Vec<f32> {
    let d = d.max(1) as f64;
    let out = size.div_ceil(d as u32) as usize;
    let v = placement.visible;
    let mut probabilities = vec![0f32; out * out];
    for y in 0..out {
        let cy = (y as f64 + 0.5) * d;
        if cy < v[1] || cy > v[3] {
            continue;
        }
        let source_y = (cy - placement.oy) / placement.sy;
        for x in 0..out {
            let cx = (x as f64 + 0.5) * d;
            if cx < v[0] || cx > v[2] {
                continue;
            }
            probabilities[y * out + x] = soft.probability_at((cx - placement.ox) / placement.sx, source_y);
        }
    }
    probabilities
}

/// Rotation, shear and perspective about the output's centre (Ultralytics' `RandomPerspective`
/// less the scale and translation, which the axis-aligned placement does): a homography applied
/// after it, to the pixels, the masks, the teachers' mask probabilities and feature maps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Warp {
    forward: [[f64; 3]; 3],
    inverse: [[f64; 3]; 3],
}

impl Warp {
    /// Draws the warp of `config` (none when its rotation, shear and perspective are all 0; each
    /// draws only when on), in Ultralytics' order: perspective, rotation, shear.
    fn draw(config: &AugmentConfig, size: u32, rng: &mut SeededRng) -> Option<Warp> {
        if config.degrees <= 0.0 && config.shear <= 0.0 && config.perspective <= 0.0 {
            return None;
        }
        let mut draw = |bound: f64| if bound > 0.0 { rng.uniform(-bound, bound) } else { 0.0 };
        let (px, py) = (draw(config.perspective), draw(config.perspective));
        let angle = draw(config.degrees);
        let (shear_x, shear_y) = (draw(config.shear), draw(config.shear));
        Some(Warp::new(size, angle, [shear_x, shear_y], [px, py]))
    }

    /// The warp about the centre of a `size` square: rotation by `degrees` (counter-clockwise as
    /// seen), shear by `shear` degrees along x and y, perspective `[px, py]` per pixel.
    pub fn new(size: u32, degrees: f64, shear: [f64; 2], perspective: [f64; 2]) -> Warp {
        let c = size as f64 / 2.0;
        let centre = [[1.0, 0.0, -c], [0.0, 1.0, -c], [0.0, 0.0, 1.0]];
        let back = [[1.0, 0.0, c], [0.0, 1.0, c], [0.0, 0.0, 1.0]];
        let p = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [perspective[0], perspective[1], 1.0]];
        let (sin, cos) = degrees.to_radians().sin_cos();
        let r = [[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]];
        let sh = [[1.0, shear[0].to_radians().tan(), 0.0], [shear[1].to_radians().tan(), 1.0, 0.0], [0.0, 0.0, 1.0]];
        let forward = product(back, product(sh, product(r, product(p, centre))));
        Warp { forward, inverse: inverse(forward) }
    }

    fn map(m: &[[f64; 3]; 3], x: f64, y: f64) -> Option<(f64, f64)> {
        let w = m[2][0] * x + m[2][1] * y + m[2][2];
        (w.abs() > 1e-9).then(|| ((m[0][0] * x + m[0][1] * y + m[0][2]) / w, (m[1][0] * x + m[1][1] * y + m[1][2]) / w))
    }

    /// Where the point `(x, y)` of the placed image goes.
    pub fn apply(&self, x: f64, y: f64) -> Option<(f64, f64)> {
        Warp::map(&self.forward, x, y)
    }

    /// The point of the placed image that lands on `(x, y)`.
    fn source(&self, x: f64, y: f64) -> Option<(f64, f64)> {
        Warp::map(&self.inverse, x, y)
    }

    /// The pixels, bilinear, padded in Ultralytics' grey.
    fn image(&self, placed: &RgbImage) -> RgbImage {
        let (w, h) = (placed.width(), placed.height());
        let mut out = RgbImage::from_pixel(w, h, image::Rgb([PAD; 3]));
        let src = placed.as_raw();
        for y in 0..h {
            for x in 0..w {
                let Some((sx, sy)) = self.source(x as f64 + 0.5, y as f64 + 0.5) else { continue };
                let (fx, fy) = (sx - 0.5, sy - 0.5);
                if fx < -0.5 || fy < -0.5 || fx > w as f64 - 0.5 || fy > h as f64 - 0.5 {
                    continue;
                }
                let (fx, fy) = (fx.clamp(0.0, (w - 1) as f64), fy.clamp(0.0, (h - 1) as f64));
                let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
                let (x1, y1) = ((x0 + 1).min(w as usize - 1), (y0 + 1).min(h as usize - 1));
                let (ax, ay) = (fx - x0 as f64, fy - y0 as f64);
                let at = |x: usize, y: usize, c: usize| src[(y * w as usize + x) * 3 + c] as f64;
                let mut pixel = [0u8; 3];
                for (c, value) in pixel.iter_mut().enumerate() {
                    let top = at(x0, y0, c) * (1.0 - ax) + at(x1, y0, c) * ax;
                    let bottom = at(x0, y1, c) * (1.0 - ax) + at(x1, y1, c) * ax;
                    *value = (top * (1.0 - ay) + bottom * ay).round() as u8;
                }
                out.put_pixel(x, y, image::Rgb(pixel));
            }
        }
        out
    }

    /// A grid of cells `d` input pixels wide (`channels` planes, row-major), warped by nearest
    /// cell; what comes from outside is `fill`.
    fn cells<T: Copy>(&self, grid: &[T], channels: usize, d: u32, size: u32, fill: T) -> Vec<T> {
        let n = size.div_ceil(d.max(1)) as usize;
        let d = d.max(1) as f64;
        let mut out = vec![fill; channels * n * n];
        for y in 0..n {
            for x in 0..n {
                let Some((sx, sy)) = self.source((x as f64 + 0.5) * d, (y as f64 + 0.5) * d) else { continue };
                let (cx, cy) = ((sx / d).floor(), (sy / d).floor());
                if cx < 0.0 || cy < 0.0 || cx >= n as f64 || cy >= n as f64 {
                    continue;
                }
                let (cx, cy) = (cx as usize, cy as usize);
                for c in 0..channels {
                    out[(c * n + y) * n + x] = grid[(c * n + cy) * n + cx];
                }
            }
        }
        out
    }

    fn features(&self, placed: &PlacedFeatures) -> PlacedFeatures {
        let size = placed.grid as u32 * FEATURE_STRIDE;
        PlacedFeatures {
            channels: placed.channels,
            grid: placed.grid,
            values: self.cells(&placed.values, placed.channels, FEATURE_STRIDE, size, 0.0),
            valid: self.cells(&placed.valid, 1, FEATURE_STRIDE, size, 0.0),
        }
    }

    /// The instance after the placement and the warp: its mask rasterised at full resolution,
    /// warped, its box the warped mask's (or, without a mask, the box of its warped corners
    /// clipped to the image), kept as `box_candidates` says against its box before the warp.
    fn instance(
        &self,
        instance: &InstanceLabel,
        item: &DetectionItem,
        placement: &Placement,
        size: u32,
        mask_downsample: Option<u32>,
    ) -> kiln_data::Result<Option<([f32; 4], Option<BinaryMask>)>> {
        let with_mask = instance.segmentation.is_some();
        let Some((before, full)) =
            place_instance(instance, item, placement, size, with_mask.then_some(1).or(mask_downsample))?
        else {
            return Ok(None);
        };
        let s = size as f64;
        let (bbox, warped) = match full.filter(|_| with_mask) {
            Some(full) => {
                let cells = self.cells(&full.data, 1, 1, size, 0);
                let warped = BinaryMask { width: size, height: size, data: cells };
                match mask_box(&warped, [0.0, 0.0, s, s]) {
                    Some(b) => (b, Some(warped)),
                    None => return Ok(None),
                }
            }
            None => {
                let [x1, y1, x2, y2] = before.map(|v| v as f64);
                let corners: Vec<(f64, f64)> =
                    [(x1, y1), (x2, y1), (x2, y2), (x1, y2)].iter().filter_map(|&(x, y)| self.apply(x, y)).collect();
                if corners.len() < 4 {
                    return Ok(None);
                }
                let fold = |f: fn(f64, f64) -> f64, pick: fn(&(f64, f64)) -> f64, start: f64| {
                    corners.iter().map(pick).fold(start, f)
                };
                let b = [
                    fold(f64::min, |p| p.0, f64::INFINITY).clamp(0.0, s),
                    fold(f64::min, |p| p.1, f64::INFINITY).clamp(0.0, s),
                    fold(f64::max, |p| p.0, f64::NEG_INFINITY).clamp(0.0, s),
                    fold(f64::max, |p| p.1, f64::NEG_INFINITY).clamp(0.0, s),
                ];
                (b, None)
            }
        };
        if !box_candidate(before.map(|v| v as f64), bbox, min_area_share(instance)) {
            return Ok(None);
        }
        let mask = match (mask_downsample, warped) {
            (Some(d), Some(full)) => Some(full.downsample_like_opencv(d)),
            (Some(d), None) => Some(BinaryMask::zeros(size.div_ceil(d.max(1)), size.div_ceil(d.max(1)))),
            (None, _) => None,
        };
        Ok(Some((bbox.map(|v| v as f32), mask)))
    }
}

fn product(a: [[f64; 3]; 3], b: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut out = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            out[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    out
}

fn inverse(m: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    let cofactor = |r0: usize, r1: usize, c0: usize, c1: usize| m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0];
    [
        [cofactor(1, 2, 1, 2) / det, -cofactor(0, 2, 1, 2) / det, cofactor(0, 1, 1, 2) / det],
        [-cofactor(1, 2, 0, 2) / det, cofactor(0, 2, 0, 2) / det, -cofactor(0, 1, 0, 2) / det],
        [cofactor(1, 2, 0, 1) / det, -cofactor(0, 2, 0, 1) / det, cofactor(0, 1, 0, 1) / det],
    ]
}

/// Ultralytics' `box_candidates`: an object whose box went from `before` to `after` stays when
/// its sides are over 2 px, it keeps over `min_area_share` of its area and its aspect is under 100.
fn box_candidate(before: [f64; 4], after: [f64; 4], min_area_share: f64) -> bool {
    let (w0, h0) = (before[2] - before[0], before[3] - before[1]);
    let (w, h) = (after[2] - after[0], after[3] - after[1]);
    let aspect = (w / (h + 1e-16)).max(h / (w + 1e-16));
    w > 2.0 && h > 2.0 && w * h / (w0 * h0 + 1e-16) > min_area_share && aspect < 100.0
}

/// The share of its (scaled) box area an object must keep to stay a label: Ultralytics 8.4 keeps
/// an object with a segmentation down to 1 % (its box is that of what is visible of the shape),
/// one with a box only down to 10 % (`RandomPerspective`: `area_thr=0.01 if len(segments) else 0.10`).
/// Dropping a visible sliver would teach the pixels of a real object as background.
fn min_area_share(instance: &InstanceLabel) -> f64 {
    if instance.segmentation.is_some() { 0.01 } else { 0.10 }
}

/// The instance's box (and mask) in the output, or `None` when too little of it survives
/// (Ultralytics' `box_candidates`: sides > 2 px, aspect < 100, and enough of its scaled area:
/// `min_area_share`).
fn place_instance(
    instance: &InstanceLabel,
    item: &DetectionItem,
    placement: &Placement,
    size: u32,
    mask_downsample: Option<u32>,
) -> kiln_data::Result<Option<([f32; 4], Option<BinaryMask>)>> {
    let s = size as f64;
    let mapped = placement.map_box(instance.bbox);
    let v = placement.visible;
    let window = [v[0].clamp(0.0, s), v[1].clamp(0.0, s), v[2].clamp(0.0, s), v[3].clamp(0.0, s)];
    // The box of what stays visible: with a mask, the box of the mask's visible part (as
    // Ultralytics derives boxes from the transformed segments), not the clipped full box, which
    // would frame background where a mosaic seam or the crop cuts a shape.
    // An RLE's raster at full size gives its box, and its mask target below.
    let mut rle_raster = None;
    let visible_box = match &instance.segmentation {
        Some(Segmentation::Polygons(polygons)) => {
            let map = |x: f64, y: f64| (x * placement.sx + placement.ox, y * placement.sy + placement.oy);
            clipped_polygons_box(polygons, map, window)
        }
        Some(rle @ Segmentation::Rle(_)) => {
            let map = [placement.sx, placement.sy, placement.ox, placement.oy];
            let full = rle.rasterize_affine(item.image.width(), item.image.height(), map, size, size)?;
            mask_box(&full, window).inspect(|_| rle_raster = Some(full))
        }
        None => Some([
            mapped[0].max(window[0]),
            mapped[1].max(window[1]),
            mapped[2].min(window[2]),
            mapped[3].min(window[3]),
        ]),
    };
    // (Clamped again: the clipping's intersections may overshoot the window by a rounding error.)
    let Some(clip) = visible_box.map(|b| {
        [
            b[0].clamp(window[0], window[2]),
            b[1].clamp(window[1], window[3]),
            b[2].clamp(window[0], window[2]),
            b[3].clamp(window[1], window[3]),
        ]
    }) else {
        return Ok(None);
    };
    if !box_candidate(mapped, clip, min_area_share(instance)) {
        return Ok(None);
    }
    let mask = match (mask_downsample, &instance.segmentation) {
        (Some(d), Some(segmentation)) => {
            // Ultralytics' target: drawn at full size (a polygon as `cv2.fillPoly` draws it), then
            // shrunk as `cv2.resize` shrinks it (`polygon2mask`); about half a cell fuller than
            // sampling each cell's centre, most on thin shapes.
            let mut full = match segmentation {
                // Ultralytics resamples every segment of the image before the augmentation moves
                // its points.
                Segmentation::Polygons(polygons) => BinaryMask::from_polygons_like_ultralytics(
                    polygons,
                    item.ultralytics_resample_count(),
                    [placement.sx, placement.sy, placement.ox, placement.oy],
                    size,
                    size,
                ),
                Segmentation::Rle(_) => match rle_raster {
                    Some(full) => full,
                    None => return Ok(None),
                },
            };
            // What lies outside this image's visible part belongs to a neighbour in the mosaic (or
            // to the letterbox's padding): pixels whose centre is outside it are cleared.
            full.clear_outside(v);
            Some(full.downsample_like_opencv(d))
        }
        (Some(d), None) => Some(BinaryMask::zeros(size.div_ceil(d.max(1)), size.div_ceil(d.max(1)))),
        (None, _) => None,
    };
    Ok(Some((clip.map(|c| c as f32), mask)))
}

/// The box of `polygons` (mapped by `map`) clipped to the rectangle `window` (Sutherland-Hodgman:
/// exact for any polygon against a convex window); `None` when nothing is inside.
fn clipped_polygons_box(
    polygons: &[Vec<f64>],
    map: impl Fn(f64, f64) -> (f64, f64),
    window: [f64; 4],
) -> Option<[f64; 4]> {
    let mut bounds: Option<[f64; 4]> = None;
    for polygon in polygons {
        let mut points: Vec<(f64, f64)> = polygon.chunks_exact(2).map(|p| map(p[0], p[1])).collect();
        // Each edge of the window keeps the half-plane `inside`, cutting edges that cross it.
        let edges: [(usize, f64, bool); 4] =
            [(0, window[0], true), (0, window[2], false), (1, window[1], true), (1, window[3], false)];
        for (axis, limit, keep_above) in edges {
            let inside = |p: &(f64, f64)| {
                let c = if axis == 0 { p.0 } else { p.1 };
                if keep_above { c >= limit } else { c <= limit }
            };
            let mut clipped = Vec::with_capacity(points.len() + 4);
            for i in 0..points.len() {
                let (a, b) = (points[i], points[(i + 1) % points.len()]);
                let (a_in, b_in) = (inside(&a), inside(&b));
                if a_in {
                    clipped.push(a);
                }
                if a_in != b_in {
                    let (ca, cb) = if axis == 0 { (a.0, b.0) } else { (a.1, b.1) };
                    let t = (limit - ca) / (cb - ca);
                    clipped.push((a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1)));
                }
            }
            points = clipped;
            if points.is_empty() {
                break;
            }
        }
        for (x, y) in points {
            let b = bounds.get_or_insert([x, y, x, y]);
            *b = [b[0].min(x), b[1].min(y), b[2].max(x), b[3].max(y)];
        }
    }
    bounds
}

/// The box of the mask's pixels inside `window` (pixel edges); `None` when there are none.
fn mask_box(mask: &BinaryMask, window: [f64; 4]) -> Option<[f64; 4]> {
    let mut bounds: Option<[u32; 4]> = None;
    let (x0, y0) = (window[0].floor().max(0.0) as u32, window[1].floor().max(0.0) as u32);
    let (x1, y1) = ((window[2].ceil() as u32).min(mask.width), (window[3].ceil() as u32).min(mask.height));
    for y in y0..y1 {
        for x in x0..x1 {
            let (cx, cy) = (x as f64 + 0.5, y as f64 + 0.5);
            if cx < window[0] || cx > window[2] || cy < window[1] || cy > window[3] || !mask.get(x, y) {
                continue;
            }
            let b = bounds.get_or_insert([x, y, x, y]);
            *b = [b[0].min(x), b[1].min(y), b[2].max(x), b[3].max(y)];
        }
    }
    bounds.map(|[a, b, c, d]| [a as f64, b as f64, (c + 1) as f64, (d + 1) as f64])
}

/// Bilinear sampling of `source` through the inverse of `placement`, within its visible part.
fn paint(out: &mut RgbImage, source: &RgbImage, placement: &Placement) {
    let (ow, oh) = (out.width() as f64, out.height() as f64);
    let v = placement.visible;
    let (x_start, x_end) = (v[0].max(0.0).round() as u32, v[2].min(ow).round() as u32);
    let (y_start, y_end) = (v[1].max(0.0).round() as u32, v[3].min(oh).round() as u32);
    if x_start >= x_end || y_start >= y_end {
        return;
    }
    let (sw, sh) = (source.width() as usize, source.height() as usize);
    let src = source.as_raw();
    let sample = |coordinate: f64, size: usize| -> (usize, usize, f32) {
        let c = coordinate.clamp(0.0, (size - 1) as f64);
        let low = c.floor() as usize;
        (low, (low + 1).min(size - 1), (c - low as f64) as f32)
    };
    let columns: Vec<(usize, usize, f32)> =
        (x_start..x_end).map(|x| sample((x as f64 + 0.5 - placement.ox) / placement.sx - 0.5, sw)).collect();
    let width = out.width() as usize;
    let buffer: &mut [u8] = out;
    for y in y_start..y_end {
        let (y0, y1, fy) = sample((y as f64 + 0.5 - placement.oy) / placement.sy - 0.5, sh);
        for (i, &(x0, x1, fx)) in columns.iter().enumerate() {
            let o = (y as usize * width + x_start as usize + i) * 3;
            for c in 0..3 {
                let at = |yy: usize, xx: usize| src[(yy * sw + xx) * 3 + c] as f32;
                let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
                let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
                buffer[o + c] = (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

/// Ultralytics' `RandomHSV`: gains on OpenCV's 8-bit HSV (hue 0..180) through look-up tables.
/// The hue moves by `(gh - 1) * 180` (8.4's `(x + r * 180) % 180`, truncated to 8 bits), so every
/// hue turns, red (hue 0) included, which a multiplicative gain (older releases) leaves alone.
fn adjust_hsv(image: &mut RgbImage, [gh, gs, gv]: [f64; 3]) {
    let shift = (gh - 1.0) * 180.0;
    let hue: Vec<f32> = (0..180).map(|x| (x as f64 + shift).rem_euclid(180.0).floor().min(179.0) as f32).collect();
    let sat: Vec<f32> = (0..256).map(|x| (x as f64 * gs).clamp(0.0, 255.0) as u8 as f32).collect();
    let val: Vec<f32> = (0..256).map(|x| (x as f64 * gv).clamp(0.0, 255.0) as u8 as f32).collect();
    for pixel in image.pixels_mut() {
        let [r, g, b] = pixel.0.map(|c| c as f32);
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let delta = max - min;
        let v = max;
        let s = if max > 0.0 { (255.0 * delta / max).round() } else { 0.0 };
        let h = if delta == 0.0 {
            0.0
        } else if max == r {
            60.0 * (g - b) / delta
        } else if max == g {
            120.0 + 60.0 * (b - r) / delta
        } else {
            240.0 + 60.0 * (r - g) / delta
        };
        let h = ((if h < 0.0 { h + 360.0 } else { h }) / 2.0).round() as usize % 180;
        let (h, s, v) = (hue[h] * 2.0, sat[s as usize] / 255.0, val[v as usize]);
        // HSV → RGB.
        let c = v * s;
        let x = c * (1.0 - ((h / 60.0) % 2.0 - 1.0).abs());
        let m = v - c;
        let (r, g, b) = match (h / 60.0) as u32 {
            0 => (c, x, 0.0),
            1 => (x, c, 0.0),
            2 => (0.0, c, x),
            3 => (0.0, x, c),
            4 => (x, 0.0, c),
            _ => (c, 0.0, x),
        };
        pixel.0 = [r + m, g + m, b + m].map(|c| c.round().clamp(0.0, 255.0) as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_data::mask::resample_like_ultralytics;

    fn item(width: u32, height: u32, boxes: &[[f64; 4]]) -> DetectionItem {
        let mut image = RgbImage::from_pixel(width, height, image::Rgb([10, 200, 30]));
        for (i, b) in boxes.iter().enumerate() {
            for y in b[1] as u32..b[3] as u32 {
                for x in b[0] as u32..b[2] as u32 {
                    image.put_pixel(x, y, image::Rgb([250, 20 * i as u8, 5]));
                }
            }
        }
        DetectionItem {
            image_id: 1,
            features: None,
            image,
            instances: boxes
                .iter()
                .enumerate()
                .map(|(i, b)| InstanceLabel {
                    teacher: None,
                    class: i,
                    bbox: *b,
                    segmentation: Some(Segmentation::Polygons(vec![vec![
                        b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3],
                    ]])),
                })
                .collect(),
        }
    }

    /// Ultralytics 8.4's `box_candidates` thresholds: an object with a segmentation stays down to
    /// 1 % of its scaled box area, one with a box only down to 10 %; sides over 2 px either way.
    #[test]
    fn segmented_slivers_stay_labels_box_only_ones_are_dropped() {
        let mut segmented = item(100, 100, &[[0.0, 0.0, 50.0, 50.0]]).instances.remove(0);
        let before = [0.0, 0.0, 50.0, 50.0];
        let sliver = [0.0, 0.0, 50.0, 2.5]; // 5 % of the area
        assert!(box_candidate(before, sliver, min_area_share(&segmented)));
        assert!(!box_candidate(before, [0.0, 0.0, 50.0, 0.4], min_area_share(&segmented)), "under 1 %");
        assert!(!box_candidate(before, [0.0, 0.0, 1.9, 50.0], min_area_share(&segmented)), "a side under 2 px");
        segmented.segmentation = None;
        assert!(!box_candidate(before, sliver, min_area_share(&segmented)));
        assert!(box_candidate(before, [0.0, 0.0, 50.0, 5.5], min_area_share(&segmented)), "11 %");
    }

    /// 8.4's hue shift `(x + r * 180) % 180`: pure red (hue 0) turns by 1.8 units of OpenCV's hue
    /// (truncated to 1, i.e. 2°) at r = 0.01, and a negative shift wraps to the top of the circle.
    #[test]
    fn the_hue_gain_shifts_every_hue_red_included() {
        let mut red = RgbImage::from_pixel(1, 1, image::Rgb([255, 0, 0]));
        adjust_hsv(&mut red, [1.01, 1.0, 1.0]);
        // h = 2°, s = 1, v = 255: (255, 255 * 2 / 60, 0).
        assert_eq!(red.get_pixel(0, 0).0, [255, 9, 0]);
        let mut red = RgbImage::from_pixel(1, 1, image::Rgb([255, 0, 0]));
        adjust_hsv(&mut red, [0.99, 1.0, 1.0]);
        // 0 - 1.8 wraps to 178.2, truncated to 178: h = 356°, (255, 0, 255 * 4 / 60).
        assert_eq!(red.get_pixel(0, 0).0, [255, 0, 17]);
        let mut unchanged = RgbImage::from_pixel(1, 1, image::Rgb([40, 120, 200]));
        let before = unchanged.clone();
        adjust_hsv(&mut unchanged, [1.0, 1.0, 1.0]);
        let [r, g, b] = unchanged.get_pixel(0, 0).0.map(i32::from);
        let [r0, g0, b0] = before.get_pixel(0, 0).0.map(i32::from);
        assert!(
            (r - r0).abs() <= 2 && (g - g0).abs() <= 2 && (b - b0).abs() <= 2,
            "no gain, no change beyond 8-bit HSV rounding"
        );
    }

    #[test]
    fn without_augmentation_it_is_a_letterbox() {
        let it = item(200, 100, &[[20.0, 10.0, 120.0, 60.0]]);
        let mut rng = SeededRng::new(1);
        let sample = augment(&[it], &AugmentConfig::none(), 64, Some(4), &mut rng).unwrap();
        // 200x100 → 64x32, centred: 16 rows of padding on top.
        let (class, b) = sample.boxes[0];
        assert_eq!(class, 0);
        let expected = [20.0 * 0.32, 10.0 * 0.32 + 16.0, 120.0 * 0.32, 60.0 * 0.32 + 16.0];
        for (g, e) in b.iter().zip(expected) {
            assert!((*g as f64 - e).abs() < 1e-4, "{b:?} vs {expected:?}");
        }
        assert_eq!(sample.image.get_pixel(0, 0).0, [PAD; 3]);
        // 32 x 16 pixels are 8 x 4 cells; Ultralytics' target (`polygon2mask`: fillPoly takes in
        // the edge pixels, the shrink reads the pixels around each cell's centre) has 9 x 4.
        assert_eq!(sample.masks[0].area(), 36);
    }

    /// A polygon's target is drawn from its outline resampled to Ultralytics' 1000 points (its
    /// dataset resamples every segment before the augmentation), not from its vertices: on a star
    /// the two differ by cells along its points.
    #[test]
    fn a_polygon_target_is_drawn_from_its_resampled_outline() {
        let mut it = item(256, 256, &[[60.0, 60.0, 180.0, 180.0]]);
        let star: Vec<f64> = (0..10)
            .flat_map(|k| {
                let (r, a) = (if k % 2 == 0 { 57.0 } else { 21.7 }, 0.3 + k as f64 * std::f64::consts::PI / 5.0);
                [120.3 + r * a.cos(), 119.6 + r * a.sin()]
            })
            .collect();
        it.instances[0].segmentation = Some(Segmentation::Polygons(vec![star.clone()]));
        let sample = augment(&[it], &AugmentConfig::none(), 256, Some(4), &mut SeededRng::new(0)).unwrap();
        let target = |polygon: &[f64]| {
            let mut full = BinaryMask::zeros(256, 256);
            full.fill_polygon_like_opencv(polygon);
            full.downsample_like_opencv(4)
        };
        assert_eq!(sample.masks[0], target(&resample_like_ultralytics(&star, 1000)));
        assert_ne!(sample.masks[0], target(&star), "the vertices alone give another target");
    }

    /// Validation's targets (the batcher's letterbox) are the training's drawn without
    /// augmentation: a polygon from its resampled outline, an RLE by pixel centres, both shrunk as
    /// OpenCV shrinks, and under `loss.overlap_mask` the shared cells left to the smaller object,
    /// as the training dataset leaves them (a thin star over a square, an occluded RLE shape, a
    /// shape cut by the image's edge).
    #[test]
    fn validation_mask_targets_are_the_training_ones_without_augmentation() {
        let boxes =
            [[20.0, 10.0, 120.0, 60.0], [50.0, 5.0, 110.0, 65.0], [130.0, 20.0, 190.0, 90.0], [0.0, 0.0, 15.0, 30.0]];
        let mut it = item(200, 100, &boxes);
        // A shape cut by the image's edge: its polygon reaches past it, into the letterbox's padding.
        it.instances[3].segmentation =
            Some(Segmentation::Polygons(vec![vec![-8.0, -10.0, 15.0, -10.0, 15.0, 30.0, -8.0, 30.0]]));
        let star: Vec<f64> = (0..10)
            .flat_map(|k| {
                let (r, a) = (if k % 2 == 0 { 30.0 } else { 11.0 }, 0.2 + k as f64 * std::f64::consts::PI / 5.0);
                [80.3 + r * a.cos(), 35.1 + r * a.sin()]
            })
            .collect();
        it.instances[1].segmentation = Some(Segmentation::Polygons(vec![star]));
        let mut blob = BinaryMask::zeros(200, 100);
        for y in 20..90 {
            for x in 130..190 {
                let (dx, dy) = (x as i64 - 130, y as i64 - 55);
                blob.data[y * 200 + x] = (dx * dx + dy * dy < 900 && x > 140) as u8;
            }
        }
        it.instances[2].segmentation = Some(Segmentation::Rle(kiln_data::Rle::encode(&blob).to_json(true)));
        let mut whole_square = 0;
        for overlap in [false, true] {
            let mut training =
                augment(&[it.clone()], &AugmentConfig::none(), 64, Some(4), &mut SeededRng::new(0)).unwrap();
            if overlap {
                kiln_data::mask::give_shared_cells_to_the_smallest(&mut training.masks);
            }
            let batcher =
                kiln_data::DetectionBatcher { image_size: 64, mask_downsample: Some(4), overlap_masks: overlap };
            let batch = batcher.try_batch(&[it.clone()], &burn::tensor::Device::flex()).unwrap();
            let validation = batch.masks.unwrap().into_data().try_to_vec::<f32>().unwrap();
            assert_eq!(training.masks.len(), 4);
            for (i, mask) in training.masks.iter().enumerate() {
                let cells: Vec<f32> = mask.data.iter().map(|&v| v as f32).collect();
                assert_eq!(cells, validation[i * 256..(i + 1) * 256], "instance {i}, overlap {overlap}");
                assert!(mask.area() > 0);
            }
            let square = training.masks[0].area();
            if overlap {
                assert!(square + 3 < whole_square, "the star takes cells from the square ({square} of {whole_square})");
            } else {
                whole_square = square;
            }
        }
    }

    #[test]
    fn boxes_masks_and_pixels_move_together() {
        let items: Vec<DetectionItem> =
            (0..4).map(|k| item(160 + 20 * k, 120, &[[30.0, 20.0, 90.0, 100.0], [100.0, 40.0, 150.0, 80.0]])).collect();
        for seed in 0..20 {
            let mut rng = SeededRng::new(seed);
            let sample = augment(
                &items,
                &AugmentConfig { hsv_h: 0.0, hsv_s: 0.0, hsv_v: 0.0, flipud: 0.5, ..Default::default() },
                128,
                Some(4),
                &mut rng,
            )
            .unwrap();
            assert_eq!(sample.boxes.len(), sample.masks.len());
            for ((_, b), mask) in sample.boxes.iter().zip(&sample.masks) {
                // The box's centre pixel shows the object's red, and the mask covers it.
                let (cx, cy) = (((b[0] + b[2]) / 2.0) as u32, ((b[1] + b[3]) / 2.0) as u32);
                assert!(sample.image.get_pixel(cx.min(127), cy.min(127)).0[0] > 200, "seed {seed}: box {b:?}");
                assert!(mask.get((cx / 4).min(31), (cy / 4).min(31)), "seed {seed}: mask at {b:?}");
                assert!(b.iter().all(|&v| (0.0..=128.0).contains(&v)));
            }
        }
    }

    /// Teacher feature maps and mask probabilities go through the map the pixels do: on images
    /// whose red channel rises with x (and green with y), features and probabilities that encode
    /// the same ramps read, after mosaic, scale, translation and flips, what the pixels show there.
    #[test]
    fn teacher_features_and_mask_probabilities_move_with_the_pixels() {
        use kiln_data::batch::{FeatureMap, SoftMask, TeacherSignal};
        let ramp = |w: u32, h: u32| {
            let mut it = item(w, h, &[]);
            for (x, y, pixel) in it.image.enumerate_pixels_mut() {
                *pixel = image::Rgb([(x * 255 / (w - 1)) as u8, (y * 255 / (h - 1)) as u8, 0]);
            }
            // Both maps hold the ramps' values at their cells' centres, over the whole image.
            let (cw, ch) = (w / 4, h / 4);
            let at = |c: u32, cells: u32, side: u32| {
                ((c as f32 + 0.5) * side as f32 / cells as f32 - 0.5) * 255.0 / (side - 1) as f32
            };
            let mut data = Vec::new();
            data.extend((0..ch).flat_map(|_| (0..cw).map(|x| at(x, cw, w))));
            data.extend((0..ch).flat_map(|y| (0..cw).map(move |_| at(y, ch, h))));
            let region = [0.0, 0.0, w as f64, h as f64];
            it.features = Some(std::sync::Arc::new(FeatureMap { channels: 2, width: cw, height: ch, region, data }));
            let soft = SoftMask {
                region,
                width: cw,
                height: ch,
                data: (0..ch).flat_map(|_| (0..cw).map(|x| at(x, cw, w).round().clamp(0.0, 255.0) as u8)).collect(),
            };
            it.instances.push(InstanceLabel {
                class: 0,
                bbox: [1.0, 1.0, w as f64 - 1.0, h as f64 - 1.0],
                segmentation: Some(Segmentation::Polygons(vec![vec![
                    1.0,
                    1.0,
                    w as f64 - 1.0,
                    1.0,
                    w as f64 - 1.0,
                    h as f64 - 1.0,
                    1.0,
                    h as f64 - 1.0,
                ]])),
                teacher: Some(TeacherSignal { class_probs: Some(vec![1.0]), soft_mask: Some(soft) }),
            });
            it
        };
        let items: Vec<DetectionItem> = (0..4).map(|k| ramp(160 + 16 * k, 128)).collect();
        let config = AugmentConfig { hsv_h: 0.0, hsv_s: 0.0, hsv_v: 0.0, flipud: 0.5, ..Default::default() };
        let mut checked = (0, 0);
        for seed in 0..12 {
            let sample = augment(&items, &config, 128, Some(4), &mut SeededRng::new(seed)).unwrap();
            let features = sample.features.as_ref().expect("the items have feature maps");
            assert_eq!((features.channels, features.grid), (2, 8));
            for gy in 0..8 {
                for gx in 0..8 {
                    if features.valid[gy * 8 + gx] == 0.0 {
                        continue;
                    }
                    // The cell's centre is a corner of four pixels: one of them is from the same
                    // image (a mosaic seam may pass through the corner).
                    let (cx, cy) = ((gx * 16 + 8) as u32, (gy * 16 + 8) as u32);
                    let corner: Vec<[u8; 3]> = [(cx - 1, cy - 1), (cx, cy - 1), (cx - 1, cy), (cx, cy)]
                        .iter()
                        .map(|&(x, y)| sample.image.get_pixel(x.min(127), y.min(127)).0)
                        .filter(|p| *p != [PAD; 3])
                        .collect();
                    if corner.is_empty() {
                        // The pixels' edge is rounded to whole pixels, the cells' is not.
                        continue;
                    }
                    let value = |c: usize| features.values[(c * 8 + gy) * 8 + gx];
                    assert!(
                        corner.iter().any(|shown| (0..2).all(|c| (value(c) - shown[c] as f32).abs() < 6.0)),
                        "seed {seed} cell {gx},{gy}: {:?} vs {corner:?}",
                        [value(0), value(1)]
                    );
                    checked.0 += 1;
                }
            }
            assert_eq!(sample.signals.len(), sample.boxes.len());
            for signal in sample.signals.iter().flatten() {
                let soft = signal.soft_mask.as_ref().expect("masks asked for");
                for (i, &p) in soft.iter().enumerate() {
                    // Zero outside the instance's image (mosaic parts do not overlap); inside, the
                    // red ramp the pixels show, at one of the four pixels around the cell's centre.
                    let (cx, cy) = ((i % 32) as u32 * 4 + 2, (i / 32) as u32 * 4 + 2);
                    let corner: Vec<[u8; 3]> = [(cx - 1, cy - 1), (cx, cy - 1), (cx - 1, cy), (cx, cy)]
                        .iter()
                        .map(|&(x, y)| sample.image.get_pixel(x, y).0)
                        .filter(|p| *p != [PAD; 3])
                        .collect();
                    if p > 0.05 && !corner.is_empty() {
                        assert!(
                            corner.iter().any(|shown| (p * 255.0 - shown[0] as f32).abs() < 10.0),
                            "seed {seed} cell {i}: {p} vs {corner:?}"
                        );
                        checked.1 += 1;
                    }
                }
            }
        }
        assert!(checked.0 > 100 && checked.1 > 100, "{checked:?}");
    }

    #[test]
    fn a_cut_shape_gets_the_box_of_its_visible_part() {
        // A right triangle cut by the window's left edge at x = 5: what is left spans x 5..10 and
        // y 0..5, not the clipped full box 5..10 x 0..10.
        let triangle = vec![vec![0.0, 0.0, 10.0, 0.0, 0.0, 10.0]];
        let b = clipped_polygons_box(&triangle, |x, y| (x, y), [5.0, 0.0, 20.0, 20.0]).unwrap();
        assert_eq!(b, [5.0, 0.0, 10.0, 5.0]);
        assert!(clipped_polygons_box(&triangle, |x, y| (x + 30.0, y), [0.0, 0.0, 20.0, 20.0]).is_none());
        let mut mask = BinaryMask::zeros(20, 20);
        for (x, y) in [(2, 3), (7, 9), (15, 15)] {
            mask.data[y * 20 + x] = 1;
        }
        assert_eq!(mask_box(&mask, [0.0, 0.0, 10.0, 10.0]), Some([2.0, 3.0, 8.0, 10.0]));
    }

    #[test]
    fn the_same_seed_gives_the_same_sample() {
        let items: Vec<DetectionItem> = (0..4).map(|_| item(100, 80, &[[10.0, 10.0, 60.0, 50.0]])).collect();
        let a = augment(&items, &AugmentConfig::default(), 64, Some(4), &mut SeededRng::new(3)).unwrap();
        let b = augment(&items, &AugmentConfig::default(), 64, Some(4), &mut SeededRng::new(3)).unwrap();
        assert_eq!(a.image, b.image);
        assert_eq!(a.boxes, b.boxes);
    }

    /// The box of every object's mask equals its box within a pixel, through mosaic, scale,
    /// translation and both flips.
    #[test]
    fn masks_give_the_boxes_through_every_geometric_transform() {
        let items: Vec<DetectionItem> =
            (0..4).map(|k| item(150 + 10 * k, 110, &[[30.0, 20.0, 90.0, 100.0], [95.0, 40.0, 140.0, 80.0]])).collect();
        let config = AugmentConfig { flipud: 0.5, scale: 0.7, translate: 0.2, ..AugmentConfig::default() };
        let mut flipped = 0;
        for seed in 0..24 {
            let sample = augment(&items, &config, 96, Some(1), &mut SeededRng::new(seed)).unwrap();
            for ((_, b), mask) in sample.boxes.iter().zip(&sample.masks) {
                let from_mask = mask_box(mask, [0.0, 0.0, 96.0, 96.0]).expect("a kept object has pixels");
                for (m, b) in from_mask.iter().zip(b) {
                    assert!((m - *b as f64).abs() <= 1.0, "seed {seed}: mask box {from_mask:?} vs box {b:?}");
                }
            }
            // The draws of the default recipe come first, then the vertical flip's.
            let mut rng = SeededRng::new(seed);
            let plain = augment(&items, &AugmentConfig { flipud: 0.0, ..config }, 96, Some(1), &mut rng).unwrap();
            flipped += (plain.boxes != sample.boxes) as usize;
        }
        assert!((4..=20).contains(&flipped), "about half the samples flip vertically: {flipped}");
    }

    /// Light and camera changes alter pixels only: with the same seed the boxes and masks are
    /// those of the recipe without them, and the image differs.
    #[test]
    fn photometric_changes_leave_the_labels_alone() {
        let items: Vec<DetectionItem> = (0..4).map(|_| item(120, 100, &[[20.0, 20.0, 70.0, 80.0]])).collect();
        let geometric = AugmentConfig { hsv_h: 0.0, hsv_s: 0.0, hsv_v: 0.0, ..AugmentConfig::default() };
        let everything = AugmentConfig {
            brightness: 0.6,
            contrast: 0.3,
            gamma: 0.5,
            noise: 0.05,
            blur: 1.0,
            motion_blur: 1.0,
            jpeg: 1.0,
            ..geometric
        };
        for seed in 0..6 {
            let a = augment(&items, &geometric, 64, Some(4), &mut SeededRng::new(seed)).unwrap();
            let b = augment(&items, &everything, 64, Some(4), &mut SeededRng::new(seed)).unwrap();
            assert_eq!(a.boxes, b.boxes);
            assert_eq!(a.masks, b.masks);
            assert_ne!(a.image, b.image);
        }
        // Each transform by itself changes the image.
        for one in [
            AugmentConfig { brightness: 0.6, ..geometric },
            AugmentConfig { contrast: 0.5, ..geometric },
            AugmentConfig { gamma: 0.5, ..geometric },
            AugmentConfig { noise: 0.05, ..geometric },
            AugmentConfig { blur: 1.0, ..geometric },
            AugmentConfig { motion_blur: 1.0, ..geometric },
            AugmentConfig { jpeg: 1.0, ..geometric },
        ] {
            let a = augment(&items, &geometric, 64, Some(4), &mut SeededRng::new(1)).unwrap();
            let b = augment(&items, &one, 64, Some(4), &mut SeededRng::new(1)).unwrap();
            assert_ne!(a.image, b.image, "{one:?}");
        }
    }

    #[test]
    fn motion_blur_smears_along_its_direction() {
        let mut image = RgbImage::from_pixel(21, 21, image::Rgb([0; 3]));
        image.put_pixel(10, 10, image::Rgb([250; 3]));
        let horizontal = motion_blurred(&image, 5.0, 0.0);
        for x in 8..=12 {
            assert_eq!(horizontal.get_pixel(x, 10).0, [50; 3], "x {x}");
        }
        assert_eq!(horizontal.get_pixel(10, 9).0, [0; 3]);
        assert_eq!(horizontal.get_pixel(13, 10).0, [0; 3]);
        let vertical = motion_blurred(&image, 5.0, std::f64::consts::FRAC_PI_2);
        assert_eq!((vertical.get_pixel(10, 12).0, vertical.get_pixel(12, 10).0), ([50; 3], [0; 3]));
    }

    /// Cutout hides pixels, the masks lose what it hides, and an object it mostly hides is dropped.
    #[test]
    fn cutout_hides_pixels_masks_and_mostly_hidden_objects() {
        let items = vec![item(96, 96, &[[10.0, 10.0, 40.0, 40.0], [50.0, 20.0, 90.0, 60.0]])];
        let config = AugmentConfig { cutout: 1.0, ..AugmentConfig::none() };
        let (mut patched, mut dropped) = (0, 0);
        for seed in 0..40 {
            let sample = augment(&items, &config, 96, Some(1), &mut SeededRng::new(seed)).unwrap();
            let grey = sample.image.pixels().filter(|p| p.0 == [PAD; 3]).count();
            patched += (grey > 0) as usize;
            dropped += 2 - sample.boxes.len();
            for ((_, b), mask) in sample.boxes.iter().zip(&sample.masks) {
                let (mut hidden, mut area) = (0, 0);
                for y in b[1] as u32..b[3] as u32 {
                    for x in b[0] as u32..b[2] as u32 {
                        area += 1;
                        let shown = sample.image.get_pixel(x, y).0;
                        hidden += (shown == [PAD; 3]) as usize;
                        // The mask covers exactly the object's pixels still shown.
                        assert_eq!(mask.get(x, y), shown[0] > 200, "seed {seed} at {x},{y}");
                    }
                }
                assert!((hidden as f64) < CUTOUT_HIDDEN * area as f64, "seed {seed}: {hidden} of {area} hidden");
            }
        }
        assert_eq!(patched, 40, "cutout at probability 1 always patches");
        assert!(dropped > 0, "some object is mostly hidden in 40 samples");
    }

    #[test]
    fn the_warp_and_its_inverse_undo_each_other() {
        let warp = Warp::new(96, 30.0, [5.0, -3.0], [0.0005, -0.0003]);
        for (x, y) in [(0.0, 0.0), (48.0, 48.0), (90.0, 10.0), (13.5, 77.25)] {
            let (u, v) = warp.apply(x, y).unwrap();
            let (bx, by) = warp.source(u, v).unwrap();
            assert!((bx - x).abs() < 1e-9 && (by - y).abs() < 1e-9, "({x}, {y}) -> ({u}, {v}) -> ({bx}, {by})");
        }
        // The centre stays put; a quarter turn takes the right of the centre to above it.
        let quarter = Warp::new(96, 90.0, [0.0; 2], [0.0; 2]);
        let (cx, cy) = quarter.apply(48.0, 48.0).unwrap();
        assert!((cx - 48.0).abs() < 1e-9 && (cy - 48.0).abs() < 1e-9);
        let (x, y) = quarter.apply(58.0, 48.0).unwrap();
        assert!((x - 48.0).abs() < 1e-9 && (y - 38.0).abs() < 1e-9, "({x}, {y})");
    }

    /// Rotation, shear and perspective: each object's box is its warped mask's, that mask is the
    /// shape's own warped (its area kept by a rotation, its box the warped corners' within a
    /// pixel), the pixels under it show the shape, and box-only objects get their warped corners'
    /// box.
    #[test]
    fn boxes_and_masks_follow_rotation_shear_and_perspective() {
        let shape = [20.0, 30.0, 60.0, 50.0];
        let it = item(96, 96, &[shape]);
        let plain = AugmentConfig { hsv_h: 0.0, hsv_s: 0.0, hsv_v: 0.0, ..AugmentConfig::none() };
        let warps = [
            Warp::new(96, 30.0, [0.0; 2], [0.0; 2]),
            Warp::new(96, -120.0, [0.0; 2], [0.0; 2]),
            Warp::new(96, 0.0, [8.0, -6.0], [0.0; 2]),
            Warp::new(96, 10.0, [0.0; 2], [0.0008, -0.0006]),
        ];
        for warp in warps {
            let placement = Placement { sx: 1.0, sy: 1.0, ox: 0.0, oy: 0.0, visible: [0.0, 0.0, 96.0, 96.0] };
            let (bbox, mask) = warp.instance(&it.instances[0], &it, &placement, 96, Some(1)).unwrap().unwrap();
            let mask = mask.unwrap();
            let from_mask = mask_box(&mask, [0.0, 0.0, 96.0, 96.0]).unwrap();
            assert_eq!(from_mask.map(|v| v as f32), bbox, "{warp:?}");
            // The corners of the shape, warped: their box is the mask's within a pixel and a half
            // (the mask is drawn as Ultralytics' fillPoly draws it, edge pixels taken in).
            let corners =
                [(20.0, 30.0), (60.0, 30.0), (60.0, 50.0), (20.0, 50.0)].map(|(x, y)| warp.apply(x, y).unwrap());
            let expected = [
                corners.iter().map(|c| c.0).fold(f64::INFINITY, f64::min),
                corners.iter().map(|c| c.1).fold(f64::INFINITY, f64::min),
                corners.iter().map(|c| c.0).fold(f64::NEG_INFINITY, f64::max),
                corners.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max),
            ];
            for (m, e) in from_mask.iter().zip(expected) {
                assert!((m - e).abs() <= 1.5, "{warp:?}: mask box {from_mask:?} vs warped corners {expected:?}");
            }
            if warp.forward[2] == [0.0, 0.0, 1.0] && warp.forward[0][1] == -warp.forward[1][0] {
                // A pure rotation keeps the area (40 x 20 pixels) within the edge pixels.
                let area = mask.area() as f64;
                assert!((area - 800.0).abs() < 0.1 * 800.0, "{warp:?}: area {area}");
            }
            // The warped image shows the shape's red where the mask is.
            let image = warp.image(&it.image);
            let (mut red, mut inside) = (0, 0);
            for y in 0..96 {
                for x in 0..96 {
                    if mask.get(x, y) {
                        inside += 1;
                        red += (image.get_pixel(x, y).0[0] > 200) as usize;
                    }
                }
            }
            // (The fill takes in the edge pixels, half red after the image's bilinear warp.)
            assert!(red as f64 >= 0.85 * inside as f64, "{warp:?}: {red} of {inside} mask pixels are red");
            // Without a mask, the box of the warped corners.
            let mut box_only = it.instances[0].clone();
            box_only.segmentation = None;
            let (b, _) = warp.instance(&box_only, &it, &placement, 96, Some(4)).unwrap().unwrap();
            for (got, e) in b.iter().zip(expected) {
                assert!((*got as f64 - e.clamp(0.0, 96.0)).abs() < 1e-4, "{warp:?}: {b:?} vs {expected:?}");
            }
        }
        // Drawn through `augment` (rotation only): every box is its mask's, at full resolution.
        let config = AugmentConfig { degrees: 45.0, ..plain };
        let mut turned = 0;
        for seed in 0..12 {
            let sample = augment(&[it.clone()], &config, 96, Some(1), &mut SeededRng::new(seed)).unwrap();
            for ((_, b), mask) in sample.boxes.iter().zip(&sample.masks) {
                assert_eq!(mask_box(mask, [0.0, 0.0, 96.0, 96.0]).unwrap().map(|v| v as f32), *b, "seed {seed}");
            }
            let letterbox = augment(&[it.clone()], &plain, 96, Some(1), &mut SeededRng::new(seed)).unwrap();
            turned += (letterbox.boxes != sample.boxes) as usize;
        }
        assert!(turned >= 10, "the rotation moved {turned} of 12 samples");
        // At 0 nothing is drawn: the default recipe's samples are what they were.
        let a = augment(&[it.clone()], &AugmentConfig::default(), 96, Some(4), &mut SeededRng::new(5)).unwrap();
        let b = augment(
            &[it.clone()],
            &AugmentConfig { degrees: 0.0, shear: 0.0, perspective: 0.0, ..AugmentConfig::default() },
            96,
            Some(4),
            &mut SeededRng::new(5),
        )
        .unwrap();
        assert_eq!((a.image, a.boxes), (b.image, b.boxes));
    }

    /// Teachers' mask probabilities and feature maps turn with the pixels: a quarter turn moves
    /// what was right of the centre to above it.
    #[test]
    fn teacher_cells_turn_with_the_pixels() {
        let quarter = Warp::new(64, 90.0, [0.0; 2], [0.0; 2]);
        // 4-pixel cells on a 64 grid: 16 x 16; one cell right of the centre lit.
        let mut grid = vec![0f32; 16 * 16];
        grid[8 * 16 + 10] = 1.0;
        let turned = quarter.cells(&grid, 1, 4, 64, 0.0);
        let lit: Vec<usize> = (0..256).filter(|&i| turned[i] > 0.0).collect();
        assert_eq!(lit, vec![(8 - 3) * 16 + 8], "cell (10, 8) -> (8, 5)");
    }

    /// Copy-paste mirrors objects onto free parts of their image: pixels, boxes and masks of the
    /// copies are the originals' mirrored, an object whose mirror would cover another is not
    /// copied, and at 0 nothing is drawn.
    #[test]
    fn copy_paste_mirrors_objects_where_they_hide_nothing() {
        // A large and a small shape on the left; a third, small, on the right where the large one's
        // mirror would fall (and whose own mirror covers little of the large one).
        let it = item(100, 60, &[[5.0, 5.0, 40.0, 40.0], [10.0, 45.0, 25.0, 58.0], [70.0, 15.0, 80.0, 25.0]]);
        let pasted = copy_paste(&it, 1.0, &mut SeededRng::new(1)).unwrap();
        let added: Vec<&InstanceLabel> = pasted.instances[3..].iter().collect();
        // The first's mirror (60..95) covers all of the third: only the second and the third are
        // copied (the third's mirror covers 8 % of the first).
        let mut boxes: Vec<[f64; 4]> = added.iter().map(|i| i.bbox).collect();
        boxes.sort_by(|a, b| a[0].total_cmp(&b[0]));
        assert_eq!(boxes, vec![[20.0, 15.0, 30.0, 25.0], [75.0, 45.0, 90.0, 58.0]]);
        for copy in &added {
            let [x1, y1, x2, y2] = copy.bbox;
            // Its pixels are the original's, mirrored: the shape's red fills the copy's box.
            let (cx, cy) = (((x1 + x2) / 2.0) as u32, ((y1 + y2) / 2.0) as u32);
            assert!(pasted.image.get_pixel(cx, cy).0[0] > 200, "copy at {:?}", copy.bbox);
            let mask = copy.segmentation.as_ref().unwrap().rasterize_affine(100, 60, [1.0, 1.0, 0.0, 0.0], 100, 60);
            let from_mask = mask_box(&mask.unwrap(), [0.0, 0.0, 100.0, 60.0]).unwrap();
            assert_eq!(from_mask, copy.bbox, "its mask is its box's");
        }
        // Through the whole pipeline, each box is its mask's.
        let config = AugmentConfig { copy_paste: 1.0, ..AugmentConfig::none() };
        let sample = augment(&[it.clone()], &config, 96, Some(1), &mut SeededRng::new(2)).unwrap();
        assert_eq!(sample.boxes.len(), 5);
        for ((_, b), mask) in sample.boxes.iter().zip(&sample.masks) {
            let from_mask = mask_box(mask, [0.0, 0.0, 96.0, 96.0]).unwrap();
            assert!(from_mask.iter().zip(b).all(|(m, b)| (m - *b as f64).abs() <= 1.0), "{from_mask:?} vs {b:?}");
        }
        let none = copy_paste(&it, 0.0, &mut SeededRng::new(1)).unwrap();
        assert_eq!(none.instances.len(), 3);
        assert_eq!(none.image, it.image);
    }

    /// Zoom keeps one object in view, centred and 1.5-3x larger; its box is its mask's.
    #[test]
    fn zoom_centres_one_object_larger() {
        let it = item(128, 128, &[[56.0, 56.0, 64.0, 64.0]]);
        let plain = AugmentConfig::none();
        let config = AugmentConfig { zoom: 1.0, ..plain };
        for seed in 0..8 {
            let sample = augment(&[it.clone()], &config, 64, Some(1), &mut SeededRng::new(seed)).unwrap();
            let (_, b) = sample.boxes[0];
            let side = (b[2] - b[0]) as f64;
            // 8 px at 0.5 scale: 4 px letterboxed, 6 to 12 zoomed.
            assert!((6.0..=12.5).contains(&side), "seed {seed}: {b:?}");
            let (cx, cy) = ((b[0] + b[2]) as f64 / 2.0, (b[1] + b[3]) as f64 / 2.0);
            assert!((cx - 32.0).abs() <= 1.0 && (cy - 32.0).abs() <= 1.0, "seed {seed}: centred at ({cx}, {cy})");
            let from_mask = mask_box(&sample.masks[0], [0.0, 0.0, 64.0, 64.0]).unwrap();
            assert!(from_mask.iter().zip(b).all(|(m, b)| (m - b as f64).abs() <= 1.0), "{from_mask:?} vs {b:?}");
        }
    }
}
