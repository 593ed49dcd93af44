//! The video importers (`kiln_data::video`) on the small samples `tests/reference/video_samples.py`
//! writes: the DAVIS / SAM 2 layout and SA-V become COCO whose masks equal the source masks, frames
//! carry their video (so a split never puts a video in two parts), and bad input is a clear error
//! that writes nothing.

use std::collections::HashMap;
use std::path::Path;

use kiln_data::{SplitOptions, ValidateOptions, load_dataset, run_validate};
use kiln_tests::{Scratch, fixture};

/// Per frame file, per object id: the source mask's rows as `0`/`1` strings.
fn expected(layout: &str) -> HashMap<String, HashMap<String, Vec<String>>> {
    let text = std::fs::read_to_string(fixture("video/expected.json")).unwrap();
    let all: HashMap<String, HashMap<String, HashMap<String, Vec<String>>>> = serde_json::from_str(&text).unwrap();
    all[layout].clone()
}

/// Every annotation's mask, decoded, equals the source mask of its frame and object; its box and
/// area are the mask's; every source mask became one annotation.
fn assert_masks_equal_sources(
    dataset: &kiln_data::CocoDataset,
    expected: &HashMap<String, HashMap<String, Vec<String>>>,
) {
    let images: HashMap<u64, &kiln_data::CocoImage> = dataset.images.iter().map(|i| (i.id, i)).collect();
    let mut seen = 0;
    for annotation in &dataset.annotations {
        let image = images[&annotation.image_id];
        let track = annotation.extra["track_id"].as_u64().unwrap().to_string();
        let source = &expected[&image.file_name][&track];
        let rle = annotation.segmentation.as_ref().unwrap().to_rle(image.height, image.width).unwrap();
        let mask = rle.decode();
        let rows: Vec<String> = (0..image.height)
            .map(|y| (0..image.width).map(|x| if mask.get(x, y) { '1' } else { '0' }).collect())
            .collect();
        assert_eq!(&rows, source, "{} object {track}", image.file_name);
        assert_eq!(annotation.bbox, Some(rle.bbox()));
        assert_eq!(annotation.area, Some(rle.area() as f64));
        seen += 1;
    }
    assert_eq!(seen, expected.values().map(|objects| objects.len()).sum::<usize>(), "every source mask imported");
}

#[test]
fn davis_layout_imports_to_the_source_masks_with_classes_and_videos() {
    let loaded = load_dataset(&fixture("video/davis"), None).unwrap();
    assert_eq!(loaded.format, "davis");
    assert!(loaded.images_dir.ends_with("JPEGImages/480p"), "{}", loaded.images_dir.display());
    let dataset = &loaded.dataset;
    // bear: frames 0 and 2 (frame 1 has no mask PNG), dogs: 0, 1, 2.
    let files: Vec<&str> = dataset.images.iter().map(|i| i.file_name.as_str()).collect();
    assert_eq!(files, ["bear/00000.jpg", "bear/00002.jpg", "dogs/00000.jpg", "dogs/00001.jpg", "dogs/00002.jpg"]);
    for image in &dataset.images {
        let video = image.file_name.split('/').next().unwrap();
        assert_eq!(image.extra["video_id"].as_str(), Some(video));
        assert!(loaded.images_dir.join(&image.file_name).is_file());
        assert_eq!((image.width, image.height), (24, 16));
    }
    assert_eq!(dataset.class_names(), ["bear", "dog"], "from classes.yaml");
    assert_masks_equal_sources(dataset, &expected("davis"));
}

#[test]
fn sav_imports_masklets_at_every_fourth_frame() {
    let loaded = load_dataset(&fixture("video/sav"), None).unwrap();
    assert_eq!(loaded.format, "sa-v");
    let dataset = &loaded.dataset;
    let files: Vec<&str> = dataset.images.iter().map(|i| i.file_name.as_str()).collect();
    assert_eq!(files, ["sav_000001/00000.jpg", "sav_000001/00004.jpg", "sav_000001/00008.jpg"]);
    let frames: Vec<u64> = dataset.images.iter().map(|i| i.extra["frame_index"].as_u64().unwrap()).collect();
    assert_eq!(frames, [0, 4, 8]);
    assert_eq!(dataset.class_names(), ["object"], "SA-V is class-agnostic");
    assert_eq!(dataset.annotations.len(), 5, "object 1 is absent from the first frame (an empty RLE)");
    assert_masks_equal_sources(dataset, &expected("sav"));
}

#[test]
fn validate_reads_video_datasets_and_keeps_each_video_in_one_split() {
    let scratch = Scratch::new("video-validate");
    for seed in 0..6 {
        let out = scratch.path().join(format!("splits{seed}"));
        let options = ValidateOptions {
            data: fixture("video/davis"),
            images: None,
            split: SplitOptions { spec: "train:0.5,val:0.5".parse().unwrap(), seed, ..Default::default() },
            output_dir: Some(out.clone()),
            class_names: Some(vec!["animal".into(), "other".into()]),
        };
        let report = run_validate(&options, &indicatif::ProgressBar::hidden()).unwrap();
        assert!(report.ok, "{}", report.render());
        assert!(report.render().contains("DAVIS"), "{}", report.render());
        let mut video_part: HashMap<String, String> = HashMap::new();
        for part in ["train", "val"] {
            let dataset = kiln_data::CocoDataset::load(&out.join(format!("{part}.json"))).unwrap();
            assert_eq!(dataset.class_names(), ["animal", "other"], "--class-names: id k is the k-th name");
            for image in &dataset.images {
                let video = image.extra["video_id"].as_str().unwrap().to_string();
                let before = video_part.insert(video.clone(), part.to_string());
                assert!(before.is_none_or(|p| p == part), "seed {seed}: video {video} in two parts");
            }
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() { copy_dir(&path, &target) } else { std::fs::copy(&path, &target).map(|_| ()).unwrap() }
    }
}

/// Validates `data` into a fresh output directory; the error, and that nothing was written.
fn refused(data: &Path, class_names: Option<Vec<String>>, out: &Path) -> String {
    let options = ValidateOptions {
        data: data.to_path_buf(),
        images: None,
        split: Default::default(),
        output_dir: Some(out.to_path_buf()),
        class_names,
    };
    let error = run_validate(&options, &indicatif::ProgressBar::hidden()).err().expect("refused").to_string();
    assert!(!out.exists(), "nothing written for: {error}");
    error
}

#[test]
fn bad_video_datasets_are_clear_errors_that_write_nothing() {
    let scratch = Scratch::new("video-bad");
    let dir = scratch.path();

    // Frames without masks.
    copy_dir(&fixture("video/davis/JPEGImages"), &dir.join("frames_only/JPEGImages"));
    let error = refused(&dir.join("frames_only"), None, &dir.join("out1"));
    assert!(error.contains("frames_only") && error.contains("Annotations"), "{error}");

    // A mask id the mapping does not name: the mask file and the id are named.
    copy_dir(&fixture("video/davis"), &dir.join("unmapped"));
    std::fs::write(dir.join("unmapped/classes.yaml"), "dogs: {1: dog}\nbear: {1: bear}\n").unwrap();
    let error = refused(&dir.join("unmapped"), None, &dir.join("out2"));
    assert!(error.contains("dogs/00000.png") && error.contains("object id 2"), "{error}");
    // ... and one beyond --class-names.
    let error = refused(&fixture("video/davis"), Some(vec!["animal".into()]), &dir.join("out3"));
    assert!(error.contains("object id 2") && error.contains("--class-names"), "{error}");

    // A truncated SA-V file: named, with where it ends.
    copy_dir(&fixture("video/sav"), &dir.join("truncated"));
    let json = dir.join("truncated/sav_000001_manual.json");
    let text = std::fs::read(&json).unwrap();
    std::fs::write(&json, &text[..text.len() / 2]).unwrap();
    let error = refused(&dir.join("truncated"), None, &dir.join("out4"));
    assert!(error.contains("sav_000001_manual.json") && error.contains("SA-V"), "{error}");

    // SA-V annotations whose frames were not extracted.
    std::fs::create_dir_all(dir.join("no_frames")).unwrap();
    std::fs::copy(fixture("video/sav/sav_000001_manual.json"), dir.join("no_frames/sav_000001_manual.json")).unwrap();
    let error = refused(&dir.join("no_frames"), None, &dir.join("out5"));
    assert!(error.contains("no frames of sav_000001") && error.contains("00004.jpg"), "{error}");

    // --class-names on data that is not a video dataset.
    let error = refused(&fixture("pycocotools_masks.json"), Some(vec!["a".into()]), &dir.join("out6"));
    assert!(error.contains("--class-names"), "{error}");
}
