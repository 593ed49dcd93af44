//! Ultralytics' `LetterBox` (scale to fit, centre, pad with grey 114) as a transform that maps
//! images, boxes and masks into the model input and predictions back to the original image.

use image::RgbImage;

use crate::coco::Segmentation;
use crate::error::Result;
use crate::mask::BinaryMask;

/// Grey used for padding (Ultralytics' `LetterBox` default).
pub const PAD_VALUE: u8 = 114;

/// The transform from original image pixels to the letterboxed input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Letterbox {
    pub scale_x: f64,
    pub scale_y: f64,
    pub pad_left: u32,
    pub pad_top: u32,
    pub width: u32,
    pub height: u32,
    pub original_width: u32,
    pub original_height: u32,
}

impl Letterbox {
    /// Ultralytics' `LetterBox(new_shape, auto=False, center=True)`.
    pub fn new(original_width: u32, original_height: u32, width: u32, height: u32) -> Self {
        let ratio = (width as f64 / original_width as f64).min(height as f64 / original_height as f64);
        let unpadded_w = ((original_width as f64 * ratio).round() as u32).clamp(1, width);
        let unpadded_h = ((original_height as f64 * ratio).round() as u32).clamp(1, height);
        let dw = (width - unpadded_w) as f64 / 2.0;
        let dh = (height - unpadded_h) as f64 / 2.0;
        Self {
            scale_x: unpadded_w as f64 / original_width as f64,
            scale_y: unpadded_h as f64 / original_height as f64,
            pad_left: (dw - 0.1).round().max(0.0) as u32,
            pad_top: (dh - 0.1).round().max(0.0) as u32,
            width,
            height,
            original_width,
            original_height,
        }
    }

    pub fn content_width(&self) -> u32 {
        (self.original_width as f64 * self.scale_x).round() as u32
    }

    pub fn content_height(&self) -> u32 {
        (self.original_height as f64 * self.scale_y).round() as u32
    }

    /// `[x1, y1, x2, y2]` in original pixels → letterboxed pixels.
    pub fn forward_box(&self, [x1, y1, x2, y2]: [f64; 4]) -> [f64; 4] {
        let (sx, sy, px, py) = (self.scale_x, self.scale_y, self.pad_left as f64, self.pad_top as f64);
        [x1 * sx + px, y1 * sy + py, x2 * sx + px, y2 * sy + py]
    }

    /// `[x1, y1, x2, y2]` in letterboxed pixels → original pixels (for predictions).
    pub fn inverse_box(&self, [x1, y1, x2, y2]: [f64; 4]) -> [f64; 4] {
        let (sx, sy, px, py) = (self.scale_x, self.scale_y, self.pad_left as f64, self.pad_top as f64);
        [(x1 - px) / sx, (y1 - py) / sy, (x2 - px) / sx, (y2 - py) / sy]
    }

    /// Resizes (bilinear, half-pixel centres, like OpenCV's `INTER_LINEAR`) and pads the image.
    pub fn apply_image(&self, image: &RgbImage) -> RgbImage {
        let (cw, ch) = (self.content_width(), self.content_height());
        let mut out = RgbImage::from_pixel(self.width, self.height, image::Rgb([PAD_VALUE; 3]));
        let (src_w, src_h) = (image.width() as usize, image.height() as usize);
        let src = image.as_raw();
        let sx = src_w as f64 / cw as f64;
        let sy = src_h as f64 / ch as f64;
        let sample = |coordinate: f64, size: usize| -> (usize, usize, f32) {
            let c = coordinate.clamp(0.0, (size - 1) as f64);
            let low = c.floor() as usize;
            (low, (low + 1).min(size - 1), (c - low as f64) as f32)
        };
        let columns: Vec<(usize, usize, f32)> = (0..cw).map(|x| sample((x as f64 + 0.5) * sx - 0.5, src_w)).collect();
        for y in 0..ch {
            let (y0, y1, fy) = sample((y as f64 + 0.5) * sy - 0.5, src_h);
            for (x, &(x0, x1, fx)) in columns.iter().enumerate() {
                let pixel = out.get_pixel_mut(x as u32 + self.pad_left, y + self.pad_top);
                for c in 0..3 {
                    let at = |yy: usize, xx: usize| src[(yy * src_w + xx) * 3 + c] as f32;
                    let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
                    let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
                    pixel.0[c] = (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8;
                }
            }
        }
        out
    }

    /// The instance mask in the letterboxed frame, at `1 / downsample` of its resolution, drawn as
    /// the training targets are (and Ultralytics' `polygon2mask`): at full size, a polygon
    /// resampled to `resample` points ([`DetectionItem::ultralytics_resample_count`]) and filled as
    /// `cv2.fillPoly` fills, an RLE by the cell under each pixel centre; then shrunk as
    /// `cv2.resize` shrinks.
    ///
    /// [`DetectionItem::ultralytics_resample_count`]: crate::DetectionItem::ultralytics_resample_count
    pub fn apply_mask(&self, segmentation: &Segmentation, downsample: u32, resample: usize) -> Result<BinaryMask> {
        let map = [self.scale_x, self.scale_y, self.pad_left as f64, self.pad_top as f64];
        let mut full = match segmentation {
            Segmentation::Polygons(polygons) => {
                BinaryMask::from_polygons_like_ultralytics(polygons, resample, map, self.width, self.height)
            }
            Segmentation::Rle(_) => segmentation.rasterize_affine(
                self.original_width,
                self.original_height,
                map,
                self.width,
                self.height,
            )?,
        };
        // A polygon reaching past the image would paint the padding: only the content's pixels
        // are kept, as the training keeps them.
        let (left, top) = (self.pad_left as f64, self.pad_top as f64);
        full.clear_outside([left, top, left + self.content_width() as f64, top + self.content_height() as f64]);
        Ok(full.downsample_like_opencv(downsample))
    }
}

/// An RGB image as the networks take it: planar (R, then G, then B), row-major, values 0..1.
pub fn planar_pixels(image: &RgbImage) -> Vec<f32> {
    let raw = image.as_raw();
    let mut pixels = Vec::with_capacity(raw.len());
    for c in 0..3 {
        pixels.extend(raw.iter().skip(c).step_by(3).map(|&v| v as f32 / 255.0));
    }
    pixels
}
