//! The pictures of a run, as PNG: losses and metrics per epoch (`results.png`), the
//! precision-recall curves at IoU 0.5 (`pr_curve.png`), and validation images with the model's
//! predictions drawn (`val_predictions.jpg`), and the first training samples with their labels
//! (`train_batches.jpg`).

use std::path::Path;

use image::{Rgb, RgbImage};
use kiln_data::draw;
use kiln_data::mask::BinaryMask;
use kiln_models::yolo::predict::Detection;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([40, 40, 40]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
pub const BLUE: Rgb<u8> = Rgb([31, 119, 180]);
pub const ORANGE: Rgb<u8> = Rgb([255, 127, 14]);

/// One small chart: series of (x, y) points in a `width x height` panel with axes and labels.
/// Whole-number x values (epochs) get whole-number ticks; an axis whose data is never negative
/// (losses, metrics) starts at 0, and one within 0..1 (metrics) ends at 1 at most; the legend sits
/// in the title row, never over the curves.
pub fn chart(title: &str, series: &[(&str, Rgb<u8>, Vec<(f64, f64)>)], width: u32, height: u32) -> RgbImage {
    let mut image = RgbImage::from_pixel(width, height, WHITE);
    let (left, right, top, bottom) = (52.0, 10.0, 22.0, 22.0);
    let (w, h) = (width as f64 - left - right, height as f64 - top - bottom);
    draw::text(&mut image, left as i64, 6, title, INK, 1);
    // The legend, right-aligned in the title row.
    if series.len() > 1 {
        let mut x = (width as f64 - right) as i64;
        for (name, colour, _) in series.iter().rev() {
            x -= draw::text_width(name, 1) as i64 + 12;
            draw::fill_rectangle(&mut image, [x as f64, 8.0, x as f64 + 8.0, 12.0], *colour);
            draw::text(&mut image, x + 10, 6, name, INK, 1);
            x -= 8;
        }
    }
    let points: Vec<(f64, f64)> = series.iter().flat_map(|s| s.2.iter().copied()).filter(|p| p.1.is_finite()).collect();
    if points.is_empty() {
        return image;
    }
    let (mut x0, mut x1) = points.iter().fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (mut y0, mut y1) = points.iter().fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    let whole_x = points.iter().all(|p| p.0.fract() == 0.0);
    if x1 <= x0 {
        x0 -= if whole_x { 1.0 } else { 0.5 };
        x1 += if whole_x { 1.0 } else { 0.5 };
    }
    if y1 <= y0 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let (non_negative, unit) = (points.iter().all(|p| p.1 >= 0.0), points.iter().all(|p| (0.0..=1.0).contains(&p.1)));
    let margin = (y1 - y0) * 0.05;
    let (mut y0, mut y1) = (y0 - margin, y1 + margin);
    if non_negative {
        y0 = y0.max(0.0);
    }
    if unit {
        y1 = y1.min(1.0);
    }
    let px = |x: f64| left + (x - x0) / (x1 - x0) * w;
    let py = |y: f64| top + (1.0 - (y - y0) / (y1 - y0)) * h;
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        draw::line(&mut image, (left, py(y)), (left + w, py(y)), GRID, 1);
        draw::text(&mut image, 2, py(y) as i64 - 4, &format_tick(y), INK, 1);
    }
    draw::line(&mut image, (left, top), (left, top + h), INK, 1);
    draw::line(&mut image, (left, top + h), (left + w, top + h), INK, 1);
    for x in x_ticks(x0, x1, whole_x) {
        let label = if whole_x { format!("{x:.0}") } else { format_tick(x) };
        let centre = px(x) as i64 - draw::text_width(&label, 1) as i64 / 2;
        let at = centre.clamp(left as i64 - 4, (left + w) as i64 - draw::text_width(&label, 1) as i64);
        draw::line(&mut image, (px(x), top + h), (px(x), top + h + 3.0), INK, 1);
        draw::text(&mut image, at, (top + h) as i64 + 6, &label, INK, 1);
    }
    for (colour, data) in series.iter().map(|(_, colour, data)| (colour, data)) {
        let data: Vec<&(f64, f64)> = data.iter().filter(|p| p.1.is_finite()).collect();
        for pair in data.windows(2) {
            draw::line(&mut image, (px(pair[0].0), py(pair[0].1)), (px(pair[1].0), py(pair[1].1)), *colour, 2);
        }
        if data.len() == 1 {
            draw::fill_rectangle(
                &mut image,
                [px(data[0].0) - 2.0, py(data[0].1) - 2.0, px(data[0].0) + 2.0, py(data[0].1) + 2.0],
                *colour,
            );
        }
    }
    image
}

/// At most six ticks between `x0` and `x1` on a 1-2-5 step (whole steps for whole-number data).
fn x_ticks(x0: f64, x1: f64, whole: bool) -> Vec<f64> {
    let raw = (x1 - x0) / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let mut step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|s| *s >= raw).unwrap_or(raw);
    if whole {
        step = step.max(1.0).round();
    }
    let first = (x0 / step).ceil() * step;
    (0..).map(|i| first + i as f64 * step).take_while(|x| *x <= x1 + 1e-9).collect()
}

fn format_tick(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Horizontal bars, one row per `(label, value)`, the value written after each bar: how the
/// optimize report compares its artifacts at a glance.
pub fn bar_chart(title: &str, rows: &[(String, f64)], colour: Rgb<u8>, width: u32) -> RgbImage {
    let (row_height, top, label_width) = (16u32, 22u32, 230.0);
    let height = top + row_height * rows.len().max(1) as u32 + 8;
    let mut image = RgbImage::from_pixel(width, height, WHITE);
    draw::text(&mut image, 6, 6, title, INK, 1);
    let largest = rows.iter().map(|r| r.1).filter(|v| v.is_finite()).fold(0.0, f64::max);
    let span = width as f64 - label_width - 60.0;
    for (i, (label, value)) in rows.iter().enumerate() {
        let y = (top + row_height * i as u32) as f64;
        draw::text(&mut image, 6, y as i64 + 3, label, INK, 1);
        let length = if largest > 0.0 && value.is_finite() { value / largest * span } else { 0.0 };
        draw::fill_rectangle(&mut image, [label_width, y + 2.0, label_width + length.max(1.0), y + 12.0], colour);
        let text = if value.is_finite() { format_tick(*value) } else { "-".into() };
        draw::text(&mut image, (label_width + length) as i64 + 4, y as i64 + 3, &text, INK, 1);
    }
    image
}

/// Panels side by side, `columns` per row.
pub fn tile(panels: &[RgbImage], columns: usize) -> RgbImage {
    let (w, h) =
        (panels.iter().map(|p| p.width()).max().unwrap_or(1), panels.iter().map(|p| p.height()).max().unwrap_or(1));
    let rows = panels.len().div_ceil(columns.max(1));
    let mut out = RgbImage::from_pixel(w * columns as u32, h * rows.max(1) as u32, WHITE);
    for (i, panel) in panels.iter().enumerate() {
        let (x, y) = ((i % columns) as u32 * w, (i / columns) as u32 * h);
        image::imageops::overlay(&mut out, panel, x as i64, y as i64);
    }
    out
}

/// `pr_curve.png`: precision against recall at IoU 0.5, averaged over classes.
pub fn pr_figure(boxes: &[(f64, f64)], masks: Option<&[(f64, f64)]>) -> RgbImage {
    let mut series = vec![("box", BLUE, boxes.to_vec())];
    if let Some(m) = masks {
        series.push(("mask", ORANGE, m.to_vec()));
    }
    chart("precision vs recall, IoU 0.5", &series, 480, 360)
}

/// An image with detections drawn: masks tinted, boxes outlined, `class score` labels.
pub fn draw_detections(image: &mut RgbImage, detections: &[Detection], class_names: &[String]) {
    let scale = if image.width().max(image.height()) >= 800 { 2 } else { 1 };
    for d in detections {
        if let Some(mask) = &d.mask {
            draw::tint_mask(image, mask, draw::class_colour(d.class_id), 0.45);
        }
    }
    let thickness = (image.width().max(image.height()) / 320).max(1);
    for d in detections {
        let colour = draw::class_colour(d.class_id);
        let bbox = d.bbox.map(|v| v as f64);
        draw::rectangle(image, bbox, colour, thickness);
        let name = class_names.get(d.class_id).map_or_else(|| d.class_id.to_string(), Clone::clone);
        draw::label(image, bbox[0], bbox[1], &format!("{name} {:.2}", d.score), colour, scale);
    }
}

/// A training sample as the network sees it, with its labels drawn: masks (at `1 / mask_downsample`
/// of the image) tinted, boxes outlined with their class names (Ultralytics' `train_batch*.jpg`).
pub fn draw_labels(image: &mut RgbImage, boxes: &[(usize, [f32; 4])], masks: &[BinaryMask], class_names: &[String]) {
    for ((class, _), mask) in boxes.iter().zip(masks) {
        let (w, h) = (image.width(), image.height());
        let (sx, sy) = (mask.width as f64 / w as f64, mask.height as f64 / h as f64);
        let mut full = BinaryMask::zeros(w, h);
        for y in 0..h {
            for x in 0..w {
                let (mx, my) = ((x as f64 * sx) as u32, (y as f64 * sy) as u32);
                full.data[(y * w + x) as usize] = mask.get(mx.min(mask.width - 1), my.min(mask.height - 1)) as u8;
            }
        }
        draw::tint_mask(image, &full, draw::class_colour(*class), 0.45);
    }
    for (class, bbox) in boxes {
        let colour = draw::class_colour(*class);
        let bbox = bbox.map(|v| v as f64);
        draw::rectangle(image, bbox, colour, 1);
        let name = class_names.get(*class).map_or_else(|| class.to_string(), Clone::clone);
        draw::label(image, bbox[0], bbox[1], &name, colour, 1);
    }
}

/// Images side by side at a common height (a grid of `columns`).
pub fn grid(images: &[RgbImage], columns: usize, cell: u32) -> RgbImage {
    let cells: Vec<RgbImage> = images
        .iter()
        .map(|im| {
            let scale = cell as f64 / im.width().max(im.height()) as f64;
            let (w, h) = (
                ((im.width() as f64 * scale).round() as u32).max(1),
                ((im.height() as f64 * scale).round() as u32).max(1),
            );
            let resized = image::imageops::resize(im, w, h, image::imageops::FilterType::Triangle);
            let mut canvas = RgbImage::from_pixel(cell, cell, Rgb([114, 114, 114]));
            image::imageops::overlay(&mut canvas, &resized, ((cell - w) / 2) as i64, ((cell - h) / 2) as i64);
            canvas
        })
        .collect();
    tile(&cells, columns)
}

/// Saves atomically (PNG or JPEG by extension).
pub fn save(image: &RgbImage, path: &Path) -> Result<(), kiln_data::DataError> {
    let format = if path.extension().is_some_and(|e| e == "jpg" || e == "jpeg") {
        image::ImageFormat::Jpeg
    } else {
        image::ImageFormat::Png
    };
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, format)
        .map_err(|e| kiln_data::DataError::invalid(path, format!("cannot encode the image: {e}")))?;
    kiln_data::io::write_atomic(path, bytes.get_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_get_whole_ticks_on_a_round_step() {
        assert_eq!(x_ticks(1.0, 8.0, true), [2.0, 4.0, 6.0, 8.0]);
        assert_eq!(x_ticks(1.0, 60.0, true), [20.0, 40.0, 60.0]);
        assert_eq!(x_ticks(1.0, 3.0, true), [1.0, 2.0, 3.0]);
        assert_eq!(x_ticks(0.0, 1.0, false), [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
    }

    #[test]
    fn a_metric_axis_stays_within_zero_and_one_and_the_legend_leaves_the_curves_alone() {
        // A flat metric at 0: the curve is drawn on the bottom axis, not above a negative range.
        let series = vec![("train", BLUE, vec![(1.0, 0.0), (2.0, 0.0), (3.0, 0.0)]), ("val", ORANGE, vec![(1.0, 0.5)])];
        let image = chart("mAP50", &series, 320, 200);
        let bottom = 200 - 22;
        let blue_rows: Vec<u32> = (0..200).filter(|&y| (60..300).any(|x| *image.get_pixel(x, y) == BLUE)).collect();
        assert!(blue_rows.iter().all(|&y| y < 22 || y + 2 >= bottom), "blue at rows {blue_rows:?}");
        // Nothing but the legend in the title row's right half is coloured... and the legend is there.
        assert!((0..20).any(|y| (160..320).any(|x| *image.get_pixel(x, y) == ORANGE)), "legend in the title row");
    }
}
