//! Masks against pycocotools: polygon rasterisation, RLE in both forms, area and bbox.
//! Reference values: tests/fixtures/pycocotools_masks.json, written by
//! tests/reference/pycocotools_masks.py. Every comparison is exact (integers, or integer-valued
//! floats), except where the issue states a tolerance (coco8-seg: bbox 0.5 px, area 1 %).

use indicatif::ProgressBar;
use kiln_data::mask::{give_shared_cells_to_the_smallest, resample_like_ultralytics};
use kiln_data::{BinaryMask, CocoDataset, Rle, SynthLabels, SynthOptions, repair, synthesize};
use kiln_tests::{Scratch, coco8_dir, fixture};
use serde_json::Value;

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture("pycocotools_masks.json")).expect("fixture present");
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn counts(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn polygons_rasterise_exactly_like_pycocotools() {
    let reference = reference();
    let cases = reference["polygons"].as_array().unwrap();
    assert!(cases.len() >= 40);
    for (i, case) in cases.iter().enumerate() {
        let (h, w) = (case["height"].as_u64().unwrap() as u32, case["width"].as_u64().unwrap() as u32);
        let rle = Rle::from_polygon(&floats(&case["polygon"]), h, w);
        assert_eq!(rle.counts, counts(&case["counts"]), "case {i}: counts");
        assert_eq!(rle.to_compressed(), case["compressed"].as_str().unwrap(), "case {i}: compressed string");
        assert_eq!(rle.area(), case["area"].as_u64().unwrap(), "case {i}: area");
        assert_eq!(rle.bbox().to_vec(), floats(&case["bbox"]), "case {i}: bbox");
    }
}

#[test]
fn dense_masks_encode_and_decode_like_pycocotools() {
    let reference = reference();
    for (i, case) in reference["dense"].as_array().unwrap().iter().enumerate() {
        let (h, w) = (case["height"].as_u64().unwrap() as u32, case["width"].as_u64().unwrap() as u32);
        let data: Vec<u8> = case["rows"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8))
            .collect();
        let mask = BinaryMask { width: w, height: h, data };
        let rle = Rle::encode(&mask);
        let compressed = case["compressed"].as_str().unwrap();
        assert_eq!(rle.counts, counts(&case["counts"]), "case {i}: uncompressed counts");
        assert_eq!(rle.to_compressed(), compressed, "case {i}: compressed string");
        let decoded = Rle::from_compressed(compressed, h, w).unwrap();
        assert_eq!(decoded, rle, "case {i}: decode of the compressed string");
        assert_eq!(decoded.decode(), mask, "case {i}: dense decode");
        let from_counts = Rle::from_counts(counts(&case["counts"]), h, w).unwrap();
        assert_eq!(from_counts.decode(), mask, "case {i}: uncompressed decode");
        assert_eq!(rle.area(), case["area"].as_u64().unwrap(), "case {i}: area");
        assert_eq!(rle.bbox().to_vec(), floats(&case["bbox"]), "case {i}: bbox");
    }
}

#[test]
fn coco8_seg_boxes_and_areas_derived_like_pycocotools() {
    let reference = reference();
    let mut dataset = CocoDataset::load(&coco8_dir().join("annotations.json")).unwrap();
    assert!(
        dataset.annotations.iter().all(|a| a.bbox.is_none() && a.area.is_none()),
        "coco8-seg ships without bbox/area"
    );
    let summary = repair(&mut dataset);
    assert_eq!((summary.bbox_from_mask, summary.area_from_mask), (30, 30));
    let expected = reference["coco8"].as_array().unwrap();
    assert_eq!(expected.len(), 30);
    for case in expected {
        let id = case["id"].as_u64().unwrap();
        let annotation = dataset.annotations.iter().find(|a| a.id == id).unwrap();
        let bbox = annotation.bbox.unwrap();
        for (got, want) in bbox.iter().zip(floats(&case["bbox"])) {
            assert!((got - want).abs() <= 0.5, "annotation {id}: bbox {bbox:?} vs pycocotools {:?}", case["bbox"]);
        }
        let (area, want) = (annotation.area.unwrap(), case["area"].as_f64().unwrap());
        assert!((area - want).abs() <= 0.01 * want, "annotation {id}: area {area} vs pycocotools {want}");
    }
}

#[test]
fn synth_masks_match_pycocotools_for_polygons_and_compressed_rle() {
    let reference = reference();
    let synth = &reference["synth"];
    let scratch = Scratch::new("masks-synth");
    let options = SynthOptions {
        images: synth["images"].as_u64().unwrap() as usize,
        size: synth["size"].as_u64().unwrap() as u32,
        seed: synth["seed"].as_u64().unwrap(),
        labels: SynthLabels::Both,
        ..Default::default()
    };
    let generated = synthesize(&options, scratch.path(), &ProgressBar::hidden()).unwrap();
    let dataset = generated.dataset;
    let expected = synth["annotations"].as_array().unwrap();
    assert_eq!(dataset.annotations.len(), expected.len(), "synth is reproducible from its seed");
    let (mut polygons, mut rles) = (0, 0);
    for (annotation, case) in dataset.annotations.iter().zip(expected) {
        let image = dataset.images.iter().find(|i| i.id == annotation.image_id).unwrap();
        let rle = annotation.mask().unwrap().to_rle(image.height, image.width).unwrap();
        match annotation.mask().unwrap() {
            kiln_data::Segmentation::Polygons(_) => polygons += 1,
            kiln_data::Segmentation::Rle(_) => rles += 1,
        }
        assert_eq!(rle.to_compressed(), case["compressed"].as_str().unwrap(), "annotation {}", annotation.id);
        assert_eq!(annotation.area.unwrap(), case["area"].as_f64().unwrap(), "annotation {}", annotation.id);
        assert_eq!(annotation.bbox.unwrap().to_vec(), floats(&case["bbox"]), "annotation {}", annotation.id);
    }
    assert!(polygons > 0 && rles > 0, "the fixture covers both mask forms ({polygons} polygons, {rles} RLE)");
}

fn from_runs(runs: &[u32], width: u32, height: u32) -> BinaryMask {
    let mut mask = BinaryMask::zeros(width, height);
    let (mut at, mut value) = (0usize, 0u8);
    for &run in runs {
        mask.data[at..at + run as usize].fill(value);
        at += run as usize;
        value ^= 1;
    }
    assert_eq!(at, mask.data.len(), "runs cover the mask");
    mask
}

/// Kiln's training mask targets are Ultralytics 8.4's (`polygon2mask`: `cv2.fillPoly` on the
/// truncated vertices, then `cv2.resize` to a quarter): tests/fixtures/ultralytics_mask_targets.json,
/// written by tests/reference/ultralytics_mask_targets.py (convex, star-shaped and edge-crossing
/// polygons). Tolerance: the fill differs from OpenCV 5.1's in at most 0.2 % of the filled pixels
/// (OpenCV's edge bookkeeping is followed, not copied), the quarter-size target in at most 0.5 %
/// of its cells, and no polygon's target by more than 3 cells (measured: at most 1, and 3 where
/// a polygon is cut by the sample's edge, which OpenCV clips its own way).
#[test]
fn polygon_mask_targets_are_ultralytics_fillpoly_then_resize() {
    let text = std::fs::read_to_string(fixture("ultralytics_mask_targets.json")).expect("fixture present");
    let reference: Value = serde_json::from_str(&text).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 50);
    let (mut pixels_off, mut pixels_set, mut cells_off, mut cells_set) = (0u64, 0u64, 0u64, 0u64);
    for (i, case) in cases.iter().enumerate() {
        let size = case["size"].as_u64().unwrap() as u32;
        let d = case["downsample"].as_u64().unwrap() as u32;
        let mut full = BinaryMask::zeros(size, size);
        full.fill_polygon_like_opencv(&floats(&case["polygon"]));
        let expected_full = from_runs(&counts(&case["full_runs"]), size, size);
        let target = full.downsample_like_opencv(d);
        let expected = from_runs(&counts(&case["target_runs"]), size / d, size / d);
        let differ = |a: &BinaryMask, b: &BinaryMask| a.data.iter().zip(&b.data).filter(|(x, y)| x != y).count() as u64;
        let off = differ(&target, &expected);
        assert!(off <= 3, "case {i}: {off} of the target's cells differ from Ultralytics'");
        pixels_off += differ(&full, &expected_full);
        pixels_set += expected_full.area();
        cells_off += off;
        cells_set += expected.area();
    }
    assert!(pixels_set > 50_000 && cells_set > 3_000);
    assert!(pixels_off as f64 <= 0.002 * pixels_set as f64, "{pixels_off} of {pixels_set} pixels differ");
    assert!(cells_off as f64 <= 0.005 * cells_set as f64, "{cells_off} of {cells_set} cells differ");
}

/// Kiln's training mask target of a polygon is the one Ultralytics' pipeline draws: the polygon
/// resampled to 1000 points first (`resample_segments`, on the labels' normalised float32
/// coordinates), then `polygon2mask`. tests/fixtures/ultralytics_resampled_targets.json, written by
/// tests/reference/ultralytics_resampled_targets.py (convex and star-shaped polygons). Tolerance:
/// at most 0.5 % of the targets' cells and 2 cells of any one polygon (float32 against float64
/// points: a point near a whole pixel may truncate the other way). Drawn from the vertices alone,
/// the targets differ from Ultralytics' in over 2 % of their cells, most of them cells Ultralytics
/// sets (measured: 164 missing, 51 extra of 6109).
#[test]
fn polygon_mask_targets_are_drawn_from_the_resampled_outline_as_ultralytics_draws_them() {
    let text = std::fs::read_to_string(fixture("ultralytics_resampled_targets.json")).expect("fixture present");
    let reference: Value = serde_json::from_str(&text).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 50);
    let (mut cells_off, mut cells_set, mut vertices_missing, mut vertices_extra) = (0u64, 0u64, 0u64, 0u64);
    for (i, case) in cases.iter().enumerate() {
        let size = case["size"].as_u64().unwrap() as u32;
        let d = case["downsample"].as_u64().unwrap() as u32;
        let n = case["resample"].as_u64().unwrap() as usize;
        let polygon = floats(&case["polygon"]);
        let expected = from_runs(&counts(&case["target_runs"]), size / d, size / d);
        let mut full = BinaryMask::zeros(size, size);
        full.fill_polygon_like_opencv(&resample_like_ultralytics(&polygon, n));
        let target = full.downsample_like_opencv(d);
        let off = target.data.iter().zip(&expected.data).filter(|(a, b)| a != b).count() as u64;
        assert!(off <= 2, "case {i}: {off} of the target's cells differ from Ultralytics'");
        cells_off += off;
        cells_set += expected.area();
        let mut from_vertices = BinaryMask::zeros(size, size);
        from_vertices.fill_polygon_like_opencv(&polygon);
        for (a, b) in from_vertices.downsample_like_opencv(d).data.iter().zip(&expected.data) {
            vertices_missing += (*a == 0 && *b == 1) as u64;
            vertices_extra += (*a == 1 && *b == 0) as u64;
        }
    }
    assert!(cells_set > 3_000);
    assert!(cells_off as f64 <= 0.005 * cells_set as f64, "{cells_off} of {cells_set} cells differ");
    assert!(
        (vertices_missing + vertices_extra) as f64 > 0.02 * cells_set as f64 && vertices_missing > 2 * vertices_extra,
        "the vertices alone miss {vertices_missing} and add {vertices_extra} of {cells_set} cells"
    );
}

/// Where objects overlap, each instance's target keeps only the cells no smaller instance covers,
/// as Ultralytics' default `overlap_mask=True` makes them (fixture from
/// tests/reference/ultralytics_overlap_targets.py: 40 scenes of 2-20 overlapping polygons, each
/// instance's own quarter-size mask and its target from `polygons2masks_overlap`): equal cell for
/// cell, and the rule gives up cells (the masks alone are not the targets).
#[test]
fn overlapping_masks_leave_shared_cells_to_the_smallest_as_ultralytics_overlap_mask() {
    let text = std::fs::read_to_string(fixture("ultralytics_overlap_targets.json")).expect("fixture present");
    let reference: Value = serde_json::from_str(&text).unwrap();
    let scenes = reference["scenes"].as_array().unwrap();
    assert!(scenes.len() >= 30);
    let mut given_up = 0u64;
    for (i, scene) in scenes.iter().enumerate() {
        let size = scene["size"].as_u64().unwrap() as u32;
        let runs_of = |key: &str| -> Vec<BinaryMask> {
            scene[key].as_array().unwrap().iter().map(|r| from_runs(&counts(r), size, size)).collect()
        };
        let (mut masks, targets) = (runs_of("masks"), runs_of("targets"));
        let before: u64 = masks.iter().map(BinaryMask::area).sum();
        give_shared_cells_to_the_smallest(&mut masks);
        for (j, (mask, target)) in masks.iter().zip(&targets).enumerate() {
            assert_eq!(mask, target, "scene {i}, instance {j}: the target differs from Ultralytics'");
        }
        given_up += before - masks.iter().map(BinaryMask::area).sum::<u64>();
    }
    assert!(given_up > 1000, "only {given_up} shared cells: the scenes do not test the rule");
}

/// The shrink is OpenCV's bilinear one on a 0/1 mask: by 4, a cell is set when at least two of the
/// four pixels around its centre are; by an odd factor it is the pixel at its centre.
#[test]
fn the_mask_shrink_reads_the_pixels_around_each_cell_centre() {
    let mut full = BinaryMask::zeros(8, 4);
    // Cell (0, 0) reads pixels (1..=2, 1..=2): two of them set.
    full.data[8 + 1] = 1;
    full.data[2 * 8 + 2] = 1;
    // Cell (1, 0): one of its four centre pixels set, and every pixel off its centre.
    full.data[8 + 5] = 1;
    for (x, y) in [(4, 0), (7, 0), (4, 3), (7, 3), (4, 1), (7, 2)] {
        full.data[y * 8 + x] = 1;
    }
    assert_eq!(full.downsample_like_opencv(4).data, vec![1, 0]);
    let mut odd = BinaryMask::zeros(3, 3);
    odd.data[4] = 1;
    assert_eq!(odd.downsample_like_opencv(3).data, vec![1]);
    odd.data[4] = 0;
    odd.data[0] = 1;
    assert_eq!(odd.downsample_like_opencv(3).data, vec![0]);
}

/// A polygon with coordinates far outside the sample or not numbers at all (a broken annotation)
/// fills what it covers and returns: no overflow, no endless line.
#[test]
fn a_polygon_far_outside_or_not_a_number_is_filled_without_fault() {
    let mut mask = BinaryMask::zeros(16, 16);
    mask.fill_polygon_like_opencv(&[-1e300, -1e300, 1e300, -1e300, 1e300, 1e300, -1e300, 1e300]);
    assert_eq!(mask.area(), 256, "a square around the whole mask covers it");
    let mut mask = BinaryMask::zeros(16, 16);
    mask.fill_polygon_like_opencv(&[f64::NAN, 2.0, 8.0, f64::INFINITY, 8.0, 8.0]);
    assert!(mask.area() <= 256);
    let mut mask = BinaryMask::zeros(16, 16);
    mask.fill_polygon_like_opencv(&[2.0, 2.0, 9.0, 2.0, 9.0, 9.0, 2.0, 9.0]);
    assert_eq!(mask.area(), 64, "8 x 8 pixels: fillPoly takes in both edges");
}
