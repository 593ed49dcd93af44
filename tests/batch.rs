//! The batcher: letterboxed images and targets as Burn tensors, boxes and masks aligned with the
//! pixels; the same batch on wgpu (Mesa lavapipe in CI) as on flex.

use burn::tensor::Device;
use indicatif::ProgressBar;
use kiln_data::{
    BinaryMask, CocoDetectionDataset, DetectionBatch, DetectionBatcher, Letterbox, Rle, SynthOptions, synthesize,
};
use kiln_tests::Scratch;

fn dataset(scratch: &Scratch) -> CocoDetectionDataset {
    let generated = synthesize(
        &SynthOptions { images: 6, size: 120, seed: 21, ..Default::default() },
        scratch.path(),
        &ProgressBar::hidden(),
    )
    .unwrap();
    CocoDetectionDataset::new(generated.dataset, generated.images_dir)
}

fn batch_on(device: &Device, downsample: u32) -> (DetectionBatch, CocoDetectionDataset, Scratch) {
    let scratch = Scratch::new(&format!("batch-{downsample}-{}", device_name(device)));
    let data = dataset(&scratch);
    let items: Vec<_> = (0..4).map(|i| data.load(i).unwrap()).collect();
    let batcher = DetectionBatcher { image_size: 96, mask_downsample: Some(downsample), overlap_masks: false };
    (batcher.try_batch(&items, device).unwrap(), data, scratch)
}

fn device_name(device: &Device) -> String {
    format!("{device:?}").chars().filter(|c| c.is_ascii_alphanumeric()).take(12).collect()
}

#[test]
fn letterbox_matches_ultralytics_geometry() {
    // 640x480 into 320: scale 0.5, 320x240 content, 40 px of padding above and below.
    let lb = Letterbox::new(640, 480, 320, 320);
    assert_eq!((lb.content_width(), lb.content_height(), lb.pad_left, lb.pad_top), (320, 240, 0, 40));
    let b = lb.forward_box([100.0, 50.0, 300.0, 250.0]);
    assert_eq!(b, [50.0, 65.0, 150.0, 165.0]);
    assert_eq!(lb.inverse_box(b), [100.0, 50.0, 300.0, 250.0]);
    // Odd padding goes like Ultralytics: round(dh - 0.1) on top.
    let lb = Letterbox::new(100, 97, 100, 100);
    assert_eq!((lb.pad_top, lb.content_height()), (1, 97));
}

fn mask_of(batch: &DetectionBatch, b: usize, m: usize) -> BinaryMask {
    let masks = batch.masks.as_ref().unwrap();
    let [_, _, h, w] = masks.dims();
    let data = masks.to_data().try_to_vec::<f32>().unwrap();
    let plane = &data[((b * masks.dims()[1]) + m) * h * w..][..h * w];
    BinaryMask { width: w as u32, height: h as u32, data: plane.iter().map(|&v| v as u8).collect() }
}

#[test]
fn batch_shapes_padding_and_box_mask_alignment() {
    let device = Device::flex();
    let (batch, data, _scratch) = batch_on(&device, 1);
    let [b, c, h, w] = batch.images.dims();
    assert_eq!((b, c, h, w), (4, 3, 96, 96));
    let counts: Vec<usize> = (0..4).map(|i| data.load(i).unwrap().instances.len()).collect();
    let m = *counts.iter().max().unwrap();
    assert_eq!(batch.boxes.dims(), [4, m, 4]);
    assert_eq!(batch.classes.dims(), [4, m]);
    let valid = batch.valid.to_data().try_to_vec::<f32>().unwrap();
    let boxes = batch.boxes.to_data().try_to_vec::<f32>().unwrap();
    let classes = batch.classes.to_data().convert::<i64>().try_to_vec::<i64>().unwrap();
    let pixels = batch.images.to_data().try_to_vec::<f32>().unwrap();
    for (bi, &count) in counts.iter().enumerate() {
        for mi in 0..m {
            let slot = bi * m + mi;
            assert_eq!(valid[slot], if mi < count { 1.0 } else { 0.0 });
            if mi >= count {
                continue;
            }
            assert!((0..4).contains(&classes[slot]));
            // The mask's tight box and the target box agree to within 2 px: the box is the
            // shape's, and a star's 36-degree tip, drawn again at 0.8x, keeps no pixel centre over
            // its last 2 px.
            let rle = Rle::encode(&mask_of(&batch, bi, mi));
            let [x, y, bw, bh] = rle.bbox();
            let target = &boxes[slot * 4..slot * 4 + 4];
            for (got, want) in [x, y, x + bw, y + bh].iter().zip(target) {
                assert!(
                    (*got as f32 - want).abs() <= 2.0,
                    "image {bi} instance {mi}: mask box {:?} vs target {target:?}",
                    [x, y, x + bw, y + bh]
                );
            }
        }
        // Padding is the letterbox grey.
        let lb = batch.letterboxes[bi];
        let (px, py) = if lb.pad_top > 0 {
            (48, 0)
        } else if lb.pad_left > 0 {
            (0, 48)
        } else {
            continue;
        };
        for channel in 0..3 {
            let v = pixels[((bi * 3 + channel) * 96 + py) * 96 + px];
            assert!((v - 114.0 / 255.0).abs() < 1e-6);
        }
    }
}

#[test]
fn downsampled_masks_keep_their_place() {
    let device = Device::flex();
    let (full, _, _s1) = batch_on(&device, 1);
    let (quarter, _, _s2) = batch_on(&device, 4);
    assert_eq!(quarter.masks.as_ref().unwrap().dims()[2..], [24, 24]);
    // Every object of the batch: the quarter-resolution mask against the full one shrunk by area
    // (a cell is on when half its 16 pixels are), summed over the objects (a mask of a few cells
    // alone is mostly its edge), and each object's centre of mass to within 2 px.
    let valid = full.valid.to_data().try_to_vec::<f32>().unwrap();
    let slots = full.valid.dims()[1];
    let (mut intersection, mut union) = (0u64, 0u64);
    for b in 0..4 {
        for m in (0..slots).filter(|&m| valid[b * slots + m] > 0.0) {
            let (big, small) = (mask_of(&full, b, m), mask_of(&quarter, b, m));
            let shrunk: Vec<u8> = (0..24 * 24)
                .map(|cell| {
                    let (cy, cx) = (cell / 24, cell % 24);
                    let on: u32 = (0..16).map(|k| big.data[(cy * 4 + k / 4) * 96 + cx * 4 + k % 4] as u32).sum();
                    (on >= 8) as u8
                })
                .collect();
            intersection += shrunk.iter().zip(&small.data).filter(|(a, b)| **a == 1 && **b == 1).count() as u64;
            union += shrunk.iter().zip(&small.data).filter(|(a, b)| **a == 1 || **b == 1).count() as u64;
            let centre = |data: &[u8], width: usize, scale: f64| {
                let (mut n, mut x, mut y) = (0.0, 0.0, 0.0);
                for (i, &v) in data.iter().enumerate() {
                    if v > 0 {
                        n += 1.0;
                        x += ((i % width) as f64 + 0.5) * scale;
                        y += ((i / width) as f64 + 0.5) * scale;
                    }
                }
                (n, x / n, y / n)
            };
            let (n, sx, sy) = centre(&small.data, 24, 4.0);
            let (_, bx, by) = centre(&big.data, 96, 1.0);
            if n >= 4.0 {
                let distance = ((sx - bx).powi(2) + (sy - by).powi(2)).sqrt();
                assert!(distance <= 2.0, "image {b} object {m}: centres {distance:.2} px apart");
            }
        }
    }
    let iou = intersection as f64 / union as f64;
    assert!(iou > 0.8, "quarter-resolution mask IoU {iou}");
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_batch_equals_flex_batch() {
    let wgpu = kiln_models::device::wgpu().unwrap();
    let (a, _, _s1) = batch_on(&Device::flex(), 4);
    let (b, _, _s2) = batch_on(&wgpu, 4);
    assert_eq!(a.images.to_data().try_to_vec::<f32>().unwrap(), b.images.to_data().try_to_vec::<f32>().unwrap());
    assert_eq!(a.boxes.to_data().try_to_vec::<f32>().unwrap(), b.boxes.to_data().try_to_vec::<f32>().unwrap());
    assert_eq!(
        a.masks.unwrap().to_data().try_to_vec::<f32>().unwrap(),
        b.masks.unwrap().to_data().try_to_vec::<f32>().unwrap()
    );
    // A computation on the device, not only a copy: the mean image intensity, against the exact
    // mean (f32 sums of ~100k values in a backend's own order drift by about 1e-4 relative).
    let pixels = a.images.to_data().try_to_vec::<f32>().unwrap();
    let exact = pixels.iter().map(|&v| v as f64).sum::<f64>() / pixels.len() as f64;
    for (name, images) in [("flex", a.images), ("wgpu", b.images)] {
        let mean: f32 = images.mean().into_scalar();
        assert!((mean as f64 - exact).abs() < 3e-4 * exact, "{name}: mean {mean} vs exact {exact}");
    }
}
