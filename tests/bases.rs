//! The pretrained bases kiln ships for its tiny teachers (`models/bases/`): `kiln train-teacher
//! --sam tiny --gdino tiny_minilm` without weights starts from them (recorded in the run's config),
//! `--from-scratch` does not, and each base is strong on *fresh* images of the source domain it was
//! pretrained on (another generator seed than its training and validation images), far above a
//! random initialisation: epoch 0 of the run is the base itself, measured before any training.
//! Needs `../shared` (the MiniLM text encoder of `tiny_minilm`).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use kiln_data::{SynthLabels, SynthOptions};
use kiln_tests::{Scratch, shared_dir};
use kiln_training::Verbosity;
use kiln_training::teacher::{TeacherOverrides, TeacherSummary, run_train_teacher};

/// Burn's random generator is global to the process: trainings run one at a time.
const SAM_BASE_MIN_IOU: f64 = 0.75;
/// The 25-epoch GroundingDINO base measures 0.252 here; the 13-epoch one it replaced, 0.184.
const GDINO_BASE_MIN_MAP50: f64 = 0.2;

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Fresh images of the bases' source domain: the 7 shapes they were pretrained on, default style,
/// a seed none of their images came from (models/bases/README.md: seed 100). 8 images to train on
/// (one epoch at a negligible rate: only epoch 0, the base itself, is measured), 40 to validate on.
fn source_domain(dir: &Path, size: u32) -> (PathBuf, PathBuf) {
    let options = SynthOptions {
        images: 48,
        classes: 7,
        size,
        labels: SynthLabels::Both,
        seed: 901,
        max_objects: 4,
        ..Default::default()
    };
    let synth = kiln_data::synthesize(&options, &dir.join("synth"), &indicatif::ProgressBar::hidden()).unwrap();
    let (train, val) = (dir.join("synth/train.json"), dir.join("synth/val.json"));
    let indices: Vec<usize> = (0..options.images).collect();
    synth.dataset.subset(&indices[..8]).save(&train).unwrap();
    synth.dataset.subset(&indices[8..]).save(&val).unwrap();
    (train, val)
}

fn one_epoch(dir: &Path, size: u32, overrides: TeacherOverrides) -> TeacherSummary {
    let (train, val) = source_domain(dir, size);
    let overrides = TeacherOverrides { epochs: Some(1), batch_size: Some(4), lr0: Some(1e-5), ..overrides };
    let request = kiln_tests::teacher_request(&train, &val, &dir.join("experiment"), overrides);
    run_train_teacher(&request, Device::flex(), Verbosity::Quiet).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn tiny_sam_starts_from_the_shipped_base_which_segments_its_source_domain() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let tiny = || TeacherOverrides { only: Some("sam".into()), sam: Some("tiny".into()), ..Default::default() };

    let shipped = Scratch::new("bases-sam");
    let summary = one_epoch(shipped.path(), 256, tiny());
    let weights = summary.config.sam.as_ref().unwrap().weights.clone();
    assert_eq!(weights, kiln_models::bases::shipped("sam", "tiny"), "the shipped base, recorded in the config");
    let start = summary.sam.as_ref().unwrap().start_iou;
    assert!(start >= SAM_BASE_MIN_IOU, "the shipped SAM base segments fresh source images: mask IoU {start}");

    let scratch = Scratch::new("bases-sam-scratch");
    let summary = one_epoch(scratch.path(), 256, TeacherOverrides { from_scratch: true, ..tiny() });
    assert_eq!(summary.config.sam.as_ref().unwrap().weights, None);
    let random = summary.sam.as_ref().unwrap().start_iou;
    eprintln!("fresh source-domain images, mask IoU: shipped SAM base {start:.4}, random init {random:.4}");
    assert!(random < start - 0.3, "a random initialisation is far worse: {random} vs the base's {start}");
}

#[test]
fn tiny_minilm_grounding_dino_starts_from_the_shipped_base_which_detects_its_source_domain() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let minilm = shared_dir().join("weights/all-minilm-l6-v2/model.safetensors");
    let tiny = || TeacherOverrides {
        only: Some("grounding_dino".into()),
        gdino: Some("tiny_minilm".into()),
        text_encoder: Some(minilm.clone()),
        image_size: Some(128),
        ..Default::default()
    };

    let shipped = Scratch::new("bases-gdino");
    let summary = one_epoch(shipped.path(), 256, tiny());
    let weights = summary.config.grounding_dino.as_ref().unwrap().weights.clone();
    assert_eq!(weights, kiln_models::bases::shipped("grounding_dino", "tiny_minilm"));
    let start = summary.grounding_dino.as_ref().unwrap().start_map50;
    assert!(
        start >= GDINO_BASE_MIN_MAP50,
        "the shipped GroundingDINO base finds fresh source objects: box mAP50 {start}"
    );

    let scratch = Scratch::new("bases-gdino-scratch");
    let summary = one_epoch(scratch.path(), 256, TeacherOverrides { from_scratch: true, ..tiny() });
    assert_eq!(summary.config.grounding_dino.as_ref().unwrap().weights, None);
    let random = summary.grounding_dino.as_ref().unwrap().start_map50;
    eprintln!("fresh source-domain images, box mAP50: shipped GroundingDINO base {start:.4}, random init {random:.4}");
    assert!(random < start / 4.0, "a random initialisation is far worse: {random} vs the base's {start}");

    // The shipped base leaves its frozen text encoder out: without one the run is refused.
    let refused = Scratch::new("bases-gdino-no-text");
    let (train, val) = source_domain(refused.path(), 128);
    let overrides = TeacherOverrides { text_encoder: None, epochs: Some(1), ..tiny() };
    let request = kiln_tests::teacher_request(&train, &val, &refused.path().join("experiment"), overrides);
    let error = run_train_teacher(&request, Device::flex(), Verbosity::Quiet).err().unwrap().to_string();
    assert!(error.contains("--text-encoder"), "{error}");
    assert!(!refused.path().join("experiment/teachers").exists(), "nothing written");
}
