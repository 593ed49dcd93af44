//! `kiln synth`: a labelled dataset kiln generates itself, the embedded default for the demo and the
//! tests. Coloured shapes of several classes on varied textured backgrounds, at varied scales and
//! rotations, overlapping: each instance's mask is its *visible* part, polygons for whole shapes and
//! compressed RLE for occluded ones, exactly the pixels painted. Learnable, but not trivial: the
//! colours say nothing about the class, backgrounds are busy and objects occlude each other.

use std::f64::consts::PI;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use rayon::prelude::*;
use serde_json::{Map, json};

use crate::coco::{CocoAnnotation, CocoCategory, CocoDataset, CocoImage, Segmentation};
use crate::error::{DataError, Result};
use crate::mask::{BinaryMask, Rle};
use crate::rng::SeededRng;

/// Shape classes, in the order classes are taken.
pub const SHAPES: [&str; 8] = ["circle", "square", "triangle", "star", "hexagon", "cross", "heart", "arrow"];

/// Which labels the generated annotations carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthLabels {
    /// `bbox` + `area`, no `segmentation`.
    Boxes,
    /// `segmentation` only, no `bbox`/`area` (as many annotation tools export).
    Masks,
    Both,
}

/// The look of the scenes. `Shifted` is another domain with the same classes, for transfer
/// experiments (a base pretrained on `Default` scenes, evaluated on `Shifted` ones): other
/// backgrounds (speckle, radial light, fine multicolour stripes, bright and low-contrast), a
/// saturated object palette without shading, and smaller objects (5–16 % of the short side instead
/// of 6–24 %).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SynthStyle {
    #[default]
    Default,
    Shifted,
}

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub images: usize,
    pub classes: usize,
    /// Longest image side in pixels; the other side varies from 75 % to 100 % of it.
    pub size: u32,
    pub labels: SynthLabels,
    pub seed: u64,
    pub max_objects: usize,
    pub style: SynthStyle,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            images: 200,
            classes: 4,
            size: 320,
            labels: SynthLabels::Both,
            seed: 0,
            max_objects: 6,
            style: SynthStyle::Default,
        }
    }
}

/// Paths of a generated dataset.
pub struct SynthOutput {
    pub annotations: PathBuf,
    pub images_dir: PathBuf,
    pub dataset: CocoDataset,
}

/// Generates the dataset into `output_dir` (`annotations.json` + `images/`). Fails, writing nothing,
/// if either already exists.
pub fn synthesize(options: &SynthOptions, output_dir: &Path, progress: &ProgressBar) -> Result<SynthOutput> {
    if options.classes == 0 || options.classes > SHAPES.len() {
        return Err(DataError::invalid(output_dir, format!("--classes must be 1..={} (one per shape)", SHAPES.len())));
    }
    if options.images == 0 || options.size < 32 || options.max_objects == 0 {
        return Err(DataError::invalid(output_dir, "need at least 1 image, a size of at least 32 px and 1 object"));
    }
    let annotations_path = output_dir.join("annotations.json");
    let images_dir = output_dir.join("images");
    crate::io::refuse_to_overwrite([annotations_path.as_path(), images_dir.as_path()])?;
    // Images are written into a staging directory renamed at the end, so an interrupted run leaves
    // no half dataset behind.
    let staging = output_dir.join(format!(".images.{}.partial", std::process::id()));
    std::fs::create_dir_all(&staging).map_err(|e| DataError::io(&staging, "cannot create the directory", e))?;

    let root = SeededRng::new(options.seed);
    progress.set_length(options.images as u64);
    let generated: Result<Vec<(CocoImage, Vec<CocoAnnotation>)>> = (0..options.images)
        .into_par_iter()
        .map(|index| {
            let mut rng = root.fork(index as u64);
            let scene = Scene::generate(options, &mut rng);
            let file_name = format!("synth_{:05}.jpg", index + 1);
            let path = staging.join(&file_name);
            let image = image::RgbImage::from_raw(scene.width, scene.height, scene.pixels).expect("buffer size");
            let mut buffer = std::io::Cursor::new(Vec::new());
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buffer, 92)
                .encode_image(&image)
                .map_err(|e| DataError::Image { path: path.clone(), message: e.to_string() })?;
            std::fs::write(&path, buffer.into_inner())
                .map_err(|e| DataError::io(&path, "cannot write the image", e))?;
            progress.inc(1);
            let image_id = index as u64 + 1;
            let coco_image =
                CocoImage { id: image_id, file_name, width: scene.width, height: scene.height, extra: Map::new() };
            let annotations = scene.instances.into_iter().map(|i| i.annotation(image_id, options.labels)).collect();
            Ok((coco_image, annotations))
        })
        .collect();
    progress.finish_and_clear();
    let generated = match generated {
        Ok(g) => g,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };

    let mut dataset = CocoDataset {
        categories: SHAPES[..options.classes]
            .iter()
            .enumerate()
            .map(|(i, name)| CocoCategory {
                id: i as u64 + 1,
                name: name.to_string(),
                supercategory: Some("shape".into()),
                extra: Map::new(),
            })
            .collect(),
        ..Default::default()
    };
    dataset.extra.insert(
        "info".into(),
        json!({"description": "kiln synth: shapes on textured backgrounds", "seed": options.seed,
               "version": env!("CARGO_PKG_VERSION")}),
    );
    if options.style == SynthStyle::Shifted {
        dataset.extra["info"]["style"] = json!("shifted");
    }
    for (image, annotations) in generated {
        dataset.images.push(image);
        for mut annotation in annotations {
            annotation.id = dataset.annotations.len() as u64 + 1;
            dataset.annotations.push(annotation);
        }
    }
    std::fs::rename(&staging, &images_dir)
        .map_err(|e| DataError::io(&images_dir, "cannot move the images into place", e))?;
    dataset.save(&annotations_path)?;
    Ok(SynthOutput { annotations: annotations_path, images_dir, dataset })
}

struct Instance {
    class: usize,
    polygon: Vec<f64>,
    full: Rle,
    visible: Rle,
}

impl Instance {
    fn annotation(self, image_id: u64, labels: SynthLabels) -> CocoAnnotation {
        let whole = self.visible == self.full;
        let segmentation = if whole {
            Segmentation::Polygons(vec![self.polygon])
        } else {
            Segmentation::Rle(self.visible.to_json(true))
        };
        let (segmentation, bbox, area) = match labels {
            SynthLabels::Both => (Some(segmentation), Some(self.visible.bbox()), Some(self.visible.area() as f64)),
            SynthLabels::Masks => (Some(segmentation), None, None),
            SynthLabels::Boxes => {
                let bbox = self.visible.bbox();
                (None, Some(bbox), Some(bbox[2] * bbox[3]))
            }
        };
        CocoAnnotation {
            id: 0,
            image_id,
            category_id: self.class as u64 + 1,
            segmentation,
            bbox,
            area,
            iscrowd: 0,
            keypoints: None,
            num_keypoints: None,
            extra: Map::new(),
        }
    }
}

struct Scene {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
    instances: Vec<Instance>,
}

/// Minimum share of a shape that must stay visible once later shapes are drawn over it.
const MIN_VISIBLE: f64 = 0.45;

impl Scene {
    fn generate(options: &SynthOptions, rng: &mut SeededRng) -> Scene {
        let long = options.size;
        let short = ((long as f64) * rng.uniform(0.75, 1.0)).round() as u32;
        let (width, height) = if rng.chance(0.5) { (long, short) } else { (short, long) };
        let shifted = options.style == SynthStyle::Shifted;
        let mut canvas = if shifted { shifted_background(width, height, rng) } else { background(width, height, rng) };
        let (min_radius, max_radius) = if shifted { (0.05, 0.16) } else { (0.06, 0.24) };

        let target = 1 + rng.below(options.max_objects);
        let mut instances: Vec<Instance> = Vec::new();
        let mut attempts = 0;
        while instances.len() < target && attempts < target * 20 {
            attempts += 1;
            let class = rng.below(options.classes);
            let min_side = width.min(height) as f64;
            let radius = min_side * rng.uniform(min_radius, max_radius);
            let cx = rng.uniform(radius * 0.6, width as f64 - radius * 0.6);
            let cy = rng.uniform(radius * 0.6, height as f64 - radius * 0.6);
            let polygon = shape_polygon(class, cx, cy, radius, rng);
            let full = Rle::from_polygon(&polygon, height, width);
            if full.area() < 40 {
                continue;
            }
            let new_mask = full.decode();
            // Reject a placement that would hide too much of a shape already there.
            let hides_too_much = instances.iter().any(|other| {
                let remaining = subtract(&other.visible.decode(), &new_mask);
                (remaining.area() as f64) < MIN_VISIBLE * other.full.area() as f64
            });
            if hides_too_much {
                continue;
            }
            for other in instances.iter_mut() {
                other.visible = Rle::encode(&subtract(&other.visible.decode(), &new_mask));
            }
            if shifted {
                paint_flat_shape(&mut canvas, width, &new_mask, rng);
            } else {
                paint_shape(&mut canvas, width, &new_mask, radius, cx, cy, rng);
            }
            instances.push(Instance { class, polygon, visible: full.clone(), full });
        }

        for value in canvas.iter_mut() {
            *value += rng.normal() as f32 * 5.0;
        }
        let pixels = canvas.iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect();
        Scene { width, height, pixels, instances }
    }
}

fn subtract(mask: &BinaryMask, cover: &BinaryMask) -> BinaryMask {
    BinaryMask {
        width: mask.width,
        height: mask.height,
        data: mask.data.iter().zip(&cover.data).map(|(&m, &c)| m & (1 - c)).collect(),
    }
}

fn random_colour(rng: &mut SeededRng) -> [f32; 3] {
    [rng.uniform(20.0, 235.0) as f32, rng.uniform(20.0, 235.0) as f32, rng.uniform(20.0, 235.0) as f32]
}

/// A busy background: a gradient, stripes, a checkerboard or soft clouds between two colours.
fn background(width: u32, height: u32, rng: &mut SeededRng) -> Vec<f32> {
    let (a, b) = (random_colour(rng), random_colour(rng));
    let kind = rng.below(4);
    let angle = rng.uniform(0.0, PI);
    let (dx, dy) = (angle.cos(), angle.sin());
    let period = rng.uniform(8.0, 40.0);
    let waves: Vec<(f64, f64, f64)> =
        (0..3).map(|_| (rng.uniform(0.005, 0.04), rng.uniform(0.005, 0.04), rng.uniform(0.0, 2.0 * PI))).collect();
    let diagonal = (width as f64).hypot(height as f64);
    let mut canvas = vec![0f32; width as usize * height as usize * 3];
    for y in 0..height as usize {
        for x in 0..width as usize {
            let (xf, yf) = (x as f64, y as f64);
            let t = match kind {
                0 => (xf * dx + yf * dy) / diagonal,
                1 => 0.5 + 0.5 * ((xf * dx + yf * dy) * 2.0 * PI / period).sin(),
                2 => (((xf / period).floor() + (yf / period).floor()) as i64 % 2) as f64 * 0.8 + 0.1,
                _ => 0.5 + waves.iter().map(|(fx, fy, p)| (xf * fx + yf * fy + p).sin()).sum::<f64>() / 6.0,
            }
            .clamp(0.0, 1.0) as f32;
            let pixel = &mut canvas[(y * width as usize + x) * 3..][..3];
            for c in 0..3 {
                pixel[c] = a[c] * (1.0 - t) + b[c] * t;
            }
        }
    }
    canvas
}

/// A saturated colour (HSV with saturation 0.75–1 and value 0.55–1).
fn saturated_colour(rng: &mut SeededRng) -> [f32; 3] {
    let (h, s, v) = (rng.uniform(0.0, 6.0), rng.uniform(0.75, 1.0), rng.uniform(0.55, 1.0));
    let c = v * s;
    let x = c * (1.0 - ((h % 2.0) - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [((r + m) * 255.0) as f32, ((g + m) * 255.0) as f32, ((b + m) * 255.0) as f32]
}

/// The shifted domain's backgrounds, bright and low-contrast: speckle, a radial light, fine
/// multicolour stripes or grain over a pastel colour.
fn shifted_background(width: u32, height: u32, rng: &mut SeededRng) -> Vec<f32> {
    let pastel = |rng: &mut SeededRng| -> [f32; 3] {
        [rng.uniform(140.0, 250.0) as f32, rng.uniform(140.0, 250.0) as f32, rng.uniform(140.0, 250.0) as f32]
    };
    let (a, b) = (pastel(rng), pastel(rng));
    let kind = rng.below(4);
    let (cx, cy) = (rng.uniform(0.0, width as f64), rng.uniform(0.0, height as f64));
    let stripes: Vec<[f32; 3]> = (0..5).map(|_| pastel(rng)).collect();
    let period = rng.uniform(3.0, 7.0);
    let diagonal = (width as f64).hypot(height as f64);
    let mut canvas = vec![0f32; width as usize * height as usize * 3];
    for y in 0..height as usize {
        for x in 0..width as usize {
            let (xf, yf) = (x as f64, y as f64);
            let pixel = &mut canvas[(y * width as usize + x) * 3..][..3];
            let mix = |t: f64, pixel: &mut [f32]| {
                for c in 0..3 {
                    pixel[c] = a[c] * (1.0 - t as f32) + b[c] * t as f32;
                }
            };
            match kind {
                0 => mix(if rng.chance(0.15) { rng.uniform(0.0, 1.0) } else { 0.0 }, pixel),
                1 => mix(((xf - cx).hypot(yf - cy) / diagonal * 1.6).min(1.0), pixel),
                2 => pixel.copy_from_slice(&stripes[((xf + yf) / period) as usize % stripes.len()]),
                _ => mix(0.5 + rng.normal() * 0.2, pixel),
            }
        }
    }
    canvas
}

/// Whether the mask pixel (x, y) touches the outside: the image border or an unmasked 4-neighbour.
fn on_rim(mask: &BinaryMask, x: usize, y: usize) -> bool {
    let (w, h) = (mask.width as i64, mask.height as i64);
    [(-1i64, 0i64), (1, 0), (0, -1), (0, 1)].iter().any(|(ox, oy)| {
        let (nx, ny) = (x as i64 + ox, y as i64 + oy);
        nx < 0 || ny < 0 || nx >= w || ny >= h || mask.data[(ny * w + nx) as usize] == 0
    })
}

/// Fills the mask with one flat saturated colour and a thin light outline (the shifted domain).
fn paint_flat_shape(canvas: &mut [f32], width: u32, mask: &BinaryMask, rng: &mut SeededRng) {
    let colour = saturated_colour(rng);
    let w = width as usize;
    let h = mask.height as usize;
    for y in 0..h {
        for x in 0..w {
            if mask.data[y * w + x] == 0 {
                continue;
            }
            let rim = on_rim(mask, x, y);
            let pixel = &mut canvas[(y * w + x) * 3..][..3];
            for c in 0..3 {
                pixel[c] = if rim { 0.5 * colour[c] + 127.0 } else { colour[c] };
            }
        }
    }
}

/// Fills the mask with a shaded colour and a darker rim, so edges look like objects, not stencils.
fn paint_shape(canvas: &mut [f32], width: u32, mask: &BinaryMask, radius: f64, cx: f64, cy: f64, rng: &mut SeededRng) {
    let colour = random_colour(rng);
    let light = rng.uniform(0.0, 2.0 * PI);
    let (lx, ly) = (light.cos(), light.sin());
    let w = width as usize;
    let h = mask.height as usize;
    for y in 0..h {
        for x in 0..w {
            if mask.data[y * w + x] == 0 {
                continue;
            }
            let rim = on_rim(mask, x, y);
            let shade = 1.0 + 0.25 * (((x as f64 - cx) * lx + (y as f64 - cy) * ly) / radius).clamp(-1.0, 1.0);
            let factor = if rim { 0.55 } else { shade } as f32;
            let pixel = &mut canvas[(y * w + x) * 3..][..3];
            for c in 0..3 {
                pixel[c] = colour[c] * factor;
            }
        }
    }
}

/// The outline of a shape class, rotated, slightly stretched, placed at (cx, cy), coordinates
/// rounded to 0.01 px as an annotation tool would store them.
fn shape_polygon(class: usize, cx: f64, cy: f64, radius: f64, rng: &mut SeededRng) -> Vec<f64> {
    let ring = |n: usize, offset: f64| -> Vec<(f64, f64)> {
        (0..n)
            .map(|i| {
                let a = offset + 2.0 * PI * i as f64 / n as f64;
                (a.cos(), a.sin())
            })
            .collect()
    };
    let unit: Vec<(f64, f64)> = match SHAPES[class] {
        "circle" => ring(48, 0.0),
        "square" => ring(4, PI / 4.0),
        "triangle" => ring(3, -PI / 2.0),
        "star" => (0..10)
            .map(|i| {
                let a = -PI / 2.0 + PI * i as f64 / 5.0;
                let r = if i % 2 == 0 { 1.0 } else { 0.45 };
                (r * a.cos(), r * a.sin())
            })
            .collect(),
        "hexagon" => ring(6, 0.0),
        "cross" => {
            let t = 0.33;
            vec![
                (-t, -1.0),
                (t, -1.0),
                (t, -t),
                (1.0, -t),
                (1.0, t),
                (t, t),
                (t, 1.0),
                (-t, 1.0),
                (-t, t),
                (-1.0, t),
                (-1.0, -t),
                (-t, -t),
            ]
        }
        "heart" => (0..40)
            .map(|i| {
                let t = 2.0 * PI * i as f64 / 40.0;
                let x = 16.0 * t.sin().powi(3);
                let y = 13.0 * t.cos() - 5.0 * (2.0 * t).cos() - 2.0 * (3.0 * t).cos() - (4.0 * t).cos();
                (x / 17.0, -y / 17.0)
            })
            .collect(),
        _ => vec![(-1.0, -0.3), (0.2, -0.3), (0.2, -0.75), (1.0, 0.0), (0.2, 0.75), (0.2, 0.3), (-1.0, 0.3)],
    };
    let rotation = rng.uniform(0.0, 2.0 * PI);
    let (sin, cos) = rotation.sin_cos();
    let (sx, sy) = (rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15));
    unit.iter()
        .flat_map(|&(x, y)| {
            let (x, y) = (x * sx * radius, y * sy * radius);
            let px = cx + x * cos - y * sin;
            let py = cy + x * sin + y * cos;
            [(px * 100.0).round() / 100.0, (py * 100.0).round() / 100.0]
        })
        .collect()
}
