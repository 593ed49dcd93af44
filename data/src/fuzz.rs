//! Fuzz targets of the parsers that read untrusted bytes: each takes any input and must return,
//! an `Err` being a fine answer, without panicking, hanging or taking memory without bound. They
//! are run coverage-guided by cargo-fuzz (`fuzz/`, nightly) and, on stable, by the corpus replay
//! and mutation test (`tests/fuzz.rs`) that CI runs for a fixed time.

use std::path::Path;

use indicatif::ProgressBar;

use crate::coco::CocoDataset;
use crate::mask::Rle;

/// A COCO annotation file, then what `kiln validate` does with it (without images): check, inspect,
/// repair (boxes and areas from polygons and RLE), split.
pub fn coco_json(data: &[u8]) {
    let path = Path::new("fuzz.json");
    let Ok(mut dataset) = CocoDataset::from_slice(data, path) else { return };
    let _ = crate::validate(&dataset, None, &ProgressBar::hidden());
    let _ = crate::inspect(&dataset);
    let _ = crate::repair(&mut dataset);
    let _ = crate::split(&dataset, &crate::SplitOptions::default());
}

/// A compressed COCO RLE string for an image whose height and width are the first 4 bytes (two
/// little-endian `u16`s, as COCO files hold them after kiln's size check): decoded, measured,
/// encoded again (which must give the same runs) and, when small, rasterised.
pub fn rle(data: &[u8]) {
    let Some((size, text)) = data.split_first_chunk::<4>() else { return };
    let (height, width) =
        (u16::from_le_bytes([size[0], size[1]]) as u32, u16::from_le_bytes([size[2], size[3]]) as u32);
    let text = String::from_utf8_lossy(text);
    let Ok(rle) = Rle::from_compressed(&text, height, width) else { return };
    let (area, _) = (rle.area(), rle.bbox());
    let again = Rle::from_compressed(&rle.to_compressed(), height, width).expect("kiln's own encoding decodes");
    assert_eq!(again.area(), area, "the area survives encoding");
    if height as u64 * width as u64 <= 1 << 16 {
        assert_eq!(Rle::encode(&rle.decode()).area(), area, "the area survives rasterising");
    }
}

/// A COCO polygon segmentation: the first 4 bytes are the image's height and width (`u16`s, kept
/// to 8 bits: the rasteriser's time grows with the image's side, and sides up to kiln's limit are
/// fuzzed through `coco_json`), the rest little-endian `f64` coordinates, any value (NaN,
/// infinities, far outside the image).
pub fn polygon(data: &[u8]) {
    let Some((size, rest)) = data.split_first_chunk::<4>() else { return };
    let side = |bytes: [u8; 2]| (u16::from_le_bytes(bytes) & 0x00FF) as u32;
    let (height, width) = (side([size[0], size[1]]), side([size[2], size[3]]));
    let xy: Vec<f64> = rest.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
    let segmentation = crate::Segmentation::Polygons(vec![xy.clone()]);
    if let Ok(rle) = segmentation.to_rle(height, width) {
        assert!(rle.area() <= height as u64 * width as u64);
        let _ = rle.bbox();
    }
    // The rasteriser itself, below the range check, must also end on anything.
    let _ = Rle::from_polygon(&xy, height, width).area();
}

/// A YOLO label file for a 640x480 image of a dataset with classes 0..=2.
pub fn yolo_labels(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let names: Vec<(u64, String)> = (0..3).map(|i| (i, format!("class{i}"))).collect();
    let mut annotations = Vec::new();
    if crate::yolo::parse_labels(text, Path::new("fuzz.txt"), 1, 640, 480, &names, &mut annotations).is_ok() {
        for annotation in &annotations {
            if let Some(mask) = annotation.mask() {
                let _ = mask.to_rle(480, 640);
            }
        }
    }
}

/// A YOLO data yaml's text: its class names.
pub fn yolo_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = crate::yolo::data_yaml_names(text, Path::new("fuzz.yaml"));
}

/// An image file's bytes, decoded as kiln decodes images (format from the content, the decoder's
/// size and memory limits).
pub fn image(data: &[u8]) {
    let _ = crate::io::decode_rgb_image(data, Path::new("fuzz.img"));
}
