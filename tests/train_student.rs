//! Student training end to end on small generated datasets: the run's files, learning, and
//! resumption after an interruption.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use indicatif::ProgressBar;
use kiln_data::{SplitOptions, SynthLabels, SynthOptions, split, synthesize};
use kiln_tests::Scratch;
use kiln_training::Verbosity;
use kiln_training::run::{StudentConfig, TrainOptions, train_student};
use kiln_training::split::load_student_data;

/// Burn's random generator is global to the process: trainings that run at the same time (tests
/// run in parallel threads) would draw each other's numbers, so the tests here train one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A synth dataset split into train.json / val.json; returns their paths.
fn dataset(dir: &Path, images: usize, size: u32) -> (PathBuf, PathBuf) {
    let options = SynthOptions {
        images,
        classes: 3,
        size,
        labels: SynthLabels::Both,
        seed: 5,
        max_objects: 3,
        ..Default::default()
    };
    let out = synthesize(&options, &dir.join("synth"), &ProgressBar::hidden()).unwrap();
    let parts = split(&out.dataset, &SplitOptions::default());
    let (train, val) = (dir.join("synth/train.json"), dir.join("synth/val.json"));
    out.dataset.subset(parts.part("train").unwrap()).save(&train).unwrap();
    out.dataset.subset(parts.part("val").unwrap()).save(&val).unwrap();
    (train, val)
}

fn config(classes: Vec<String>, ids: Vec<u64>, epochs: usize) -> StudentConfig {
    StudentConfig {
        model: "yolov8n-seg".into(),
        epochs,
        batch_size: 4,
        imgsz: 64,
        close_mosaic: 1,
        classes,
        category_ids: ids,
        ..StudentConfig::default()
    }
}

/// A quiet new run of `config` into `output` on `device`.
fn run_options(config: StudentConfig, output: &Path, device: Device) -> TrainOptions {
    TrainOptions {
        config,
        output: output.to_path_buf(),
        device,
        data_parallel: Vec::new(),
        resume: false,
        verbosity: Verbosity::Quiet,
        stop_after_epochs: None,
        dry_run: false,
    }
}

fn run(
    train: &Path,
    val: &Path,
    output: &Path,
    epochs: usize,
    resume: bool,
    stop_after: Option<usize>,
) -> kiln_training::run::TrainSummary {
    let (data, _) = load_student_data(train, val, None).unwrap();
    // Steps of up to 7 batches of 4 (nbs 28), ramped over the warm-up, on the 3 or 4 batches of an
    // epoch: the first epoch ends inside a step that a later one finishes (Ultralytics' rule).
    let config = StudentConfig { nbs: 28, ..config(data.train.class_names(), data.train.class_ids(), epochs) };
    let options = TrainOptions { resume, stop_after_epochs: stop_after, ..run_options(config, output, Device::flex()) };
    train_student(options, data).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_run_writes_its_files_and_resumes_to_the_same_weights() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("train-resume");
    let (train, val) = dataset(scratch.path(), 16, 64);
    let whole = scratch.path().join("whole");
    let summary = run(&train, &val, &whole, 3, false, None);
    assert_eq!(summary.history.len(), 3);
    for file in [
        "student_config.yaml",
        "results.csv",
        "train_batches.jpg",
        "weights/last.safetensors",
        "weights/best.safetensors",
    ] {
        assert!(whole.join(file).is_file(), "{file} is written");
    }
    let csv = std::fs::read_to_string(whole.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(summary.history.iter().all(|r| r.train.sum().is_finite() && r.train.sum() > 0.0));

    let parted = scratch.path().join("parted");
    let first = run(&train, &val, &parted, 3, false, Some(1));
    assert_eq!(first.history.len(), 1);
    // The step the first epoch leaves open goes on in the next epoch (as Ultralytics counts its
    // accumulation), its gradients so far kept with the checkpoint.
    assert!(parted.join("checkpoint/grads-1.bin").is_file(), "the pending gradients are checkpointed");
    let second = run(&train, &val, &parted, 3, true, None);
    assert_eq!(second.history.len(), 3, "the resumed run carries the first epoch's record");
    let a = tensors(&whole.join("weights/last.safetensors"));
    let b = tensors(&parted.join("weights/last.safetensors"));
    assert_eq!(a.len(), b.len());
    assert!(a.len() > 300, "every parameter and BatchNorm statistic is saved");
    for (key, value) in &a {
        assert!(
            b.get(key) == Some(value),
            "{key}: an interrupted and resumed run ends with the uninterrupted run's weights"
        );
    }
}

/// The tensors of a safetensors file by name (raw little-endian bytes).
fn tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = v["data_offsets"].as_array().unwrap();
            let (s, e) = (o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize);
            (k.clone(), bytes[8 + n + s..8 + n + e].to_vec())
        })
        .collect()
}

/// The whole pipeline learns: a from-scratch yolov8n-seg fits a few images (no augmentation,
/// evaluated on the same images). After the warm-up the model must find the shapes and outline
/// them: box and mask mAP50 above 0.5 where an untrained model scores about 0, and the loss falls
/// to less than half of its first epoch's.
#[test]
fn a_student_learns_a_small_dataset() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("train-learns");
    let options = SynthOptions {
        images: 8,
        classes: 3,
        size: 64,
        labels: SynthLabels::Both,
        seed: 11,
        max_objects: 2,
        ..Default::default()
    };
    let out = synthesize(&options, &scratch.path().join("synth"), &ProgressBar::hidden()).unwrap();
    let (data, _) = load_student_data(&out.annotations, &out.annotations, None).unwrap();
    let config = StudentConfig {
        model: "yolov8n-seg".into(),
        epochs: EPOCHS,
        batch_size: 2,
        imgsz: 64,
        optimizer: kiln_training::optim::OptimizerKind::Adamw,
        lr0: 0.004,
        warmup_epochs: 1.0,
        // One optimiser step per batch (4 per epoch): with Ultralytics' nominal batch of 64
        // these 8 images would make a single step per epoch.
        nbs: 2,
        augment: kiln_training::augment::AugmentConfig::none(),
        classes: data.train.class_names(),
        category_ids: data.train.class_ids(),
        ..StudentConfig::default()
    };
    let options = run_options(config, &scratch.path().join("run"), Device::flex());
    let summary = train_student(options, data).unwrap_or_else(|e| panic!("{e}"));
    let (first, last) = (summary.history[0], summary.history[summary.history.len() - 1]);
    assert!(last.train.sum() < 0.5 * first.train.sum(), "loss {} -> {}", first.train.sum(), last.train.sum());
    let best = summary.best;
    eprintln!("best epoch {}: box mAP50 {:.3}, mask mAP50 {:.3}", summary.best_epoch, best.box_map50, best.mask_map50);
    assert!(best.box_map50 > 0.5 && best.mask_map50 > 0.5, "best epoch: {best:?}");
}

const EPOCHS: usize = 60;

/// `--preset` and `--objects` / `--environment` (the augmentation, through the table) choose
/// settings; flags and `--set augment.KEY` still override them; the run saves what the user said
/// and what it became, and trains with it.
#[test]
fn characteristics_and_presets_choose_settings_and_flags_override_them() {
    use kiln_training::characteristics::{Characteristics, Environment, Intensity, ObjectTrait};
    use kiln_training::commands::{StudentOverrides, TrainStudentRequest, run_train_student, student_config};
    let scratch = Scratch::new("characteristics");
    let (train, val) = dataset(scratch.path(), 12, 64);
    let (data, summary) = load_student_data(&train, &val, None).unwrap();
    let plain = student_config(&data, &summary, &StudentOverrides::default(), false).unwrap();
    assert_eq!(plain.augment, kiln_training::augment::AugmentConfig::default());
    assert!(!serde_yaml::to_string(&plain).unwrap().contains("characteristics"), "absent when not given");

    // A preset sits between the defaults and the flags: a flag given wins, the rest is the preset's.
    use kiln_training::presets::Preset;
    let quick = StudentOverrides { preset: Some(Preset::Quick), epochs: Some(2), ..Default::default() };
    let config = student_config(&data, &summary, &quick, false).unwrap();
    assert_eq!((config.epochs, config.imgsz, config.preset), (2, 320, Some(Preset::Quick)));
    assert!(serde_yaml::to_string(&config).unwrap().contains("preset: quick"));
    let teacher_quick = kiln_training::teacher::TeacherOverrides {
        preset: Some(Preset::Quick),
        lora_r: Some(2),
        only: Some("sam".into()),
        sam: Some("tiny".into()),
        ..Default::default()
    };
    let teachers = kiln_training::teacher::teacher_config(
        &summary,
        data.train.class_names(),
        data.train.class_ids(),
        &teacher_quick,
    )
    .unwrap();
    let sam = teachers.sam.as_ref().expect("the data has masks");
    assert_eq!((sam.epochs, sam.lora.rank), (3, 2), "the preset's epochs, the flag's rank");
    assert_eq!(teachers.preset, Some(Preset::Quick));

    let characteristics = Characteristics {
        objects: vec![ObjectTrait::Thin],
        environment: vec![Environment::LowLight, Environment::Motion],
        intensity: Intensity::Medium,
    };
    let overrides = StudentOverrides {
        characteristics: characteristics.clone(),
        set: vec!["augment.noise=0.01".into()],
        epochs: Some(1),
        batch_size: Some(4),
        imgsz: Some(64),
        ..Default::default()
    };
    let chosen = student_config(&data, &summary, &overrides, false).unwrap();
    let a = chosen.augment;
    assert_eq!((a.brightness, a.gamma, a.contrast), (0.6, 0.5, 0.3), "low light: {a:?}");
    assert_eq!((a.motion_blur, a.blur), (0.1, 0.0), "motion, capped for thin objects: {a:?}");
    assert_eq!(a.noise, 0.01, "--set wins over the table");
    assert_eq!(chosen.characteristics, characteristics);

    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let output = scratch.path().join("run");
    let request = TrainStudentRequest {
        train,
        val,
        images: None,
        output: output.clone(),
        resume: false,
        device_name: "cpu".into(),
        overrides,
        distill: None,
        dry_run: false,
    };
    run_train_student(&request, Device::flex(), Verbosity::Quiet).unwrap_or_else(|e| panic!("{e}"));
    let saved: StudentConfig =
        serde_yaml::from_str(&std::fs::read_to_string(output.join("student_config.yaml")).unwrap()).unwrap();
    assert_eq!((saved.augment, saved.characteristics), (chosen.augment, characteristics));
    let text = std::fs::read_to_string(output.join("student_config.yaml")).unwrap();
    assert!(text.contains("- low-light") && text.contains("motion_blur: 0.1"), "{text}");
    assert!(output.join("train_batches.jpg").is_file());
}

/// One epoch (two SGD steps of a yolov8n-seg from the same weights, same batches and
/// augmentation) on LibTorch's CPU (`--device tch-cpu`) gives flex's loss within 1e-3 (relative)
/// and flex's updated weights within 1e-4 (absolute). The start weights are drawn from a fixed
/// seed: drawn afresh, one CI run in many started where the two backends' updates parted by 5e-4
/// in `model.0.conv.weight` with equal losses (presumably a near-tie that rounding decides, such as
/// the assigner's top-k), which 255 seeded starts here did not reproduce (all within 1.5e-6).
#[cfg(feature = "tch")]
#[test]
fn an_epoch_on_libtorch_cpu_equals_flex() {
    use kiln_models::yolo::{YoloConfig, YoloV8};
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("train-libtorch");
    let (train, val) = dataset(scratch.path(), 8, 64);
    let start = scratch.path().join("start.safetensors");
    let host = Device::flex();
    host.seed(0);
    let yolo: YoloV8 = "yolov8n-seg".parse::<YoloConfig>().unwrap().with_num_classes(3).init(&host);
    yolo.save(&start, &[]).unwrap();
    let run_on = |device: Device, name: &str| {
        let (data, _) = load_student_data(&train, &val, None).unwrap();
        let mut config = config(data.train.class_names(), data.train.class_ids(), 1);
        config.weights = Some(start.clone());
        config.optimizer = kiln_training::optim::OptimizerKind::Sgd;
        config.lr0 = 0.01;
        config.batch_size = 4;
        let output = scratch.path().join(name);
        let options = run_options(config, &output, device);
        let summary = train_student(options, data).unwrap_or_else(|e| panic!("{name}: {e}"));
        (summary.history[0].train.sum(), floats(&output.join("weights/last.safetensors")))
    };
    let (flex_loss, flex_weights) = run_on(Device::flex(), "flex");
    let (torch_loss, torch_weights) = run_on(kiln_models::Backend::TchCpu.open().unwrap(), "tch-cpu");
    assert!((flex_loss - torch_loss).abs() <= 1e-3 * flex_loss.abs(), "loss: flex {flex_loss}, LibTorch {torch_loss}");
    assert_eq!(flex_weights.len(), torch_weights.len());
    assert!(flex_weights.len() > 300, "every parameter and statistic is compared ({})", flex_weights.len());
    let mut largest = (0f32, String::new());
    for (key, a) in &flex_weights {
        let b = &torch_weights[key];
        assert_eq!(a.len(), b.len(), "{key}");
        for (x, y) in a.iter().zip(b) {
            if (x - y).abs() > largest.0 {
                largest = ((x - y).abs(), key.clone());
            }
        }
    }
    eprintln!("loss: flex {flex_loss}, LibTorch {torch_loss}; largest weight difference {} ({})", largest.0, largest.1);
    assert!(largest.0 <= 1e-4, "updated weights differ by {} in {}", largest.0, largest.1);
}

/// The F32 tensors of a safetensors file by name.
#[cfg(feature = "tch")]
fn floats(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let raw = tensors(path);
    raw.into_iter()
        .filter_map(|(key, data)| {
            let values: Vec<f32> = match header[&key]["dtype"].as_str()? {
                "F32" => data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
                _ => return None,
            };
            Some((key, values))
        })
        .collect()
}

/// `--device cuda:0,1`'s data parallelism through a whole run, on two flex devices (the combination
/// of the gradients and the slices are checked in `kiln_training::engine`): the loaders sliced
/// per device, the steps, the student's summed gradients and its accumulation over both devices'
/// batches run to the end with finite losses and the run's weights.
#[test]
fn a_run_on_two_devices_splits_each_epoch_between_them() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("train-two-devices");
    let (train, val) = dataset(scratch.path(), 20, 64);
    let (data, _) = load_student_data(&train, &val, None).unwrap();
    let output = scratch.path().join("run");
    let config = config(data.train.class_names(), data.train.class_ids(), 2);
    let options = TrainOptions { data_parallel: vec![Device::flex()], ..run_options(config, &output, Device::flex()) };
    let summary = train_student(options, data).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(summary.history.len(), 2);
    assert!(summary.history.iter().all(|r| r.train.sum().is_finite() && r.train.sum() > 0.0), "{:?}", summary.history);
    assert!(output.join("weights/last.safetensors").is_file() && output.join("weights/best.safetensors").is_file());
}

/// `--precision bf16` and `f16` (mixed precision, f16 with dynamic loss scaling): an epoch from the
/// same weights and batches as in float32 computes its convolutions in the half type (the weights
/// it ends with differ from float32's), its steps run, its loss stays near float32's, and the
/// weights it keeps and saves are float32. The half path's numbers: `yolo::precision_tests`
/// (outputs) and `half_precision_gradients_stay_close_to_float32` (gradients).
#[test]
fn half_precision_epochs_keep_float32_weights_and_float32_s_loss() {
    use kiln_models::yolo::{YoloConfig, YoloV8};
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("train-bf16");
    let (train, val) = dataset(scratch.path(), 8, 64);
    let start = scratch.path().join("start.safetensors");
    let host = Device::flex();
    host.seed(4);
    let yolo: YoloV8 = "yolov8n-seg".parse::<YoloConfig>().unwrap().with_num_classes(3).init(&host);
    yolo.save(&start, &[]).unwrap();
    let run_in = |precision: kiln_training::run::Precision, name: &str| {
        let (data, _) = load_student_data(&train, &val, None).unwrap();
        let mut config = config(data.train.class_names(), data.train.class_ids(), 1);
        config.weights = Some(start.clone());
        config.optimizer = kiln_training::optim::OptimizerKind::Sgd;
        config.lr0 = 0.01;
        config.precision = precision;
        let output = scratch.path().join(name);
        let options = run_options(config, &output, Device::flex());
        let summary = train_student(options, data).unwrap_or_else(|e| panic!("{name}: {e}"));
        let weights = output.join("weights/last.safetensors");
        assert!(kiln_tests::safetensors_dtypes(&weights).iter().all(|d| d == "F32"), "{name}: saved in float32");
        let saved: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(output.join("student_config.yaml")).unwrap()).unwrap();
        (summary.history[0].train.sum(), kiln_tests::safetensors_tensors(&weights), saved["precision"].clone())
    };
    let (f32_loss, f32_weights, f32_saved) = run_in(kiln_training::run::Precision::F32, "f32");
    let start_weights = kiln_tests::safetensors_tensors(&start);
    for (precision, name) in
        [(kiln_training::run::Precision::Bf16, "bf16"), (kiln_training::run::Precision::F16, "f16")]
    {
        let (loss, weights, saved) = run_in(precision, name);
        assert_eq!((f32_saved.as_str(), saved.as_str()), (Some("f32"), Some(name)));
        // The first batch steps the optimiser (the accumulation ramps up from one batch), so the
        // second batch's loss follows the first step's small differences through the assigner's
        // discrete choices: measured 0.2 % to 5 % apart; a broken scale or cast would be far off.
        assert!((f32_loss - loss).abs() <= 0.15 * f32_loss.abs(), "loss: f32 {f32_loss}, {name} {loss}");
        assert!(f32_loss != loss || f32_weights != weights, "{name} computed exactly as float32: not in {name}");
        // The steps ran (f16's loss scaling did not skip them all).
        let moved = start_weights.iter().any(|(key, (_, _, bytes))| weights.get(key).is_some_and(|w| &w.2 != bytes));
        assert!(moved, "{name}: the weights did not move");
        eprintln!("loss: f32 {f32_loss}, {name} {loss}");
    }
}

/// Mixed precision's gradients: through the casts, the float32 weights of a Conv block (bf16 or f16
/// convolution, float32 BatchNorm in training mode and SiLU) get float32 gradients within 2 % of
/// float32's largest (measured 0.4 % in bf16). Through a whole from-scratch model at 64 px the
/// differences grow with depth: BatchNorm's batch statistics over the 2x2 maps of P5 amplify the
/// half type's rounding, so the model-level check is the epoch test's.
#[test]
fn half_precision_gradients_stay_close_to_float32() {
    use burn::tensor::{Distribution, FloatDType, Tensor};
    use kiln_models::yolo::conv::Conv;
    let device = Device::flex().autodiff();
    device.seed(9);
    let block = Conv::new(16, 32, 3, 1, 1, &device);
    let input = Tensor::<4>::random([2, 16, 32, 32], Distribution::Uniform(0.0, 1.0), &device);
    let gradient = |block: &Conv| {
        let grads = block.forward(input.clone()).powi_scalar(2).mean().backward();
        let weight = block.conv.weight.val().grad(&grads).expect("a float32 gradient");
        kiln_models::device::read_floats(weight).unwrap()
    };
    let reference = gradient(&block);
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0);
    for dtype in [FloatDType::BF16, FloatDType::F16] {
        let half = gradient(&Conv { compute: Some(dtype), ..block.clone() });
        let largest = reference.iter().zip(&half).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{dtype:?}: gradient differs by {largest} of up to {scale}");
        assert!(largest > 0.0 && largest <= 0.02 * scale, "{dtype:?}: gradient differs by {largest} of {scale}");
    }
}

/// Mosaic partners come from Ultralytics' buffer of recently loaded images: the buffer after
/// each load, for the same sequence of sample images, equals what Ultralytics 8.4's own
/// `BaseDataset.load_image` leaves (tests/fixtures/ultralytics_mosaic_buffer.json, written by
/// tests/reference/ultralytics_mosaic_buffer.py), for a loader's length (16) and a short one (4).
#[test]
fn the_mosaic_buffer_holds_what_ultralytics_holds() {
    use kiln_training::data::MosaicBuffer;
    let text = std::fs::read_to_string(kiln_tests::fixture("ultralytics_mosaic_buffer.json")).expect("fixture present");
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let images = fixture["images"].as_u64().unwrap() as usize;
    let sequence: Vec<usize> =
        fixture["sequence"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let capacity = case["capacity"].as_u64().unwrap() as usize;
        let mut buffer = MosaicBuffer::new(images, capacity);
        for (step, (&image, expected)) in sequence.iter().zip(case["buffers"].as_array().unwrap()).enumerate() {
            buffer.load(image);
            let expected: Vec<usize> =
                expected.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            assert_eq!(buffer.images(), expected, "capacity {capacity}, step {step} (image {image})");
        }
    }
}

/// A sample's mosaic depends on the buffer, that is on every sample before it; asked out of order
/// (a resumed run starts in the middle), the dataset replays the buffer and draws the same sample.
#[test]
fn samples_with_the_mosaic_buffer_do_not_depend_on_the_order_they_are_asked_in() {
    use kiln_data::batch::CocoDetectionDataset;
    use kiln_training::augment::AugmentConfig;
    use kiln_training::data::{EpochCounter, TrainDataset};
    let scratch = Scratch::new("mosaic-buffer");
    // 40 images: an epoch spans several of the buffer's saved states (every 16 positions).
    let options = SynthOptions { images: 40, classes: 2, size: 64, seed: 3, max_objects: 2, ..Default::default() };
    let generated = synthesize(&options, &scratch.0.join("synth"), &ProgressBar::hidden()).unwrap();
    let source = std::sync::Arc::new(CocoDetectionDataset::new(generated.dataset, generated.images_dir));
    let make = || {
        TrainDataset::new(vec![source.clone()], AugmentConfig::default(), 64, Some(4), 7, 4, 1, EpochCounter::default())
            .with_mosaic_buffer(5)
    };
    let in_order = make();
    let mut samples = Vec::new();
    for epoch in 1..=3 {
        for position in 0..40 {
            samples.push(((epoch, position), in_order.sample(epoch, position).unwrap()));
        }
    }
    let jumping = make();
    for &index in &[100usize, 5, 99, 37, 0, 119, 50, 20, 21, 79, 41] {
        let ((epoch, position), expected) = &samples[index];
        let sample = jumping.sample(*epoch, *position).unwrap();
        assert_eq!(sample.image.as_raw(), expected.image.as_raw(), "epoch {epoch} position {position}");
        assert_eq!(sample.boxes, expected.boxes, "epoch {epoch} position {position}");
    }
    // The buffer changes the draws: the same positions without it give other mosaics.
    let uniform = TrainDataset::new(
        vec![source.clone()],
        AugmentConfig::default(),
        64,
        Some(4),
        7,
        4,
        1,
        EpochCounter::default(),
    );
    let differ =
        samples.iter().filter(|((e, p), s)| uniform.sample(*e, *p).unwrap().image.as_raw() != s.image.as_raw()).count();
    assert!(differ > 0, "the buffer changed no mosaic");
}

/// A student trained from scratch starts from the weights Ultralytics' own model starts from
/// for the same seed: PyTorch's generator, PyTorch's default initialisation, Ultralytics' order
/// of construction and its `bias_init` (tests/fixtures/ultralytics_init.json, written by
/// tests/reference/ultralytics_init.py with Ultralytics 8.4 and PyTorch 2.9). Every state-dict
/// entry of a yolov8n-seg (4 classes) and a yolov8n (3 classes) is compared: its shape, its first
/// four and last values to the bit, its sum and sum of squares to float64 rounding.
#[test]
fn a_student_drawn_as_pytorch_starts_from_ultralytics_own_weights() {
    use kiln_models::YoloConfig;
    use kiln_models::torch_init::TorchGenerator;
    let text = std::fs::read_to_string(kiln_tests::fixture("ultralytics_init.json")).expect("fixture present");
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let floats = |value: &serde_json::Value| -> Vec<f32> {
        value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
    };

    let uniform = &fixture["uniform"];
    let expected = floats(&uniform["values"]);
    let mut generator = TorchGenerator::manual_seed(uniform["seed"].as_u64().unwrap());
    let drawn = generator.uniform(expected.len(), uniform["from"].as_f64().unwrap(), uniform["to"].as_f64().unwrap());
    assert_eq!(drawn, expected, "torch.manual_seed(3); uniform_(-0.25, 0.75)");

    /// Which float parameters train, in the module's order.
    struct Tracked(Vec<bool>);
    impl burn::module::ModuleVisitor for Tracked {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<D>>) {
            self.0.push(param.val().is_require_grad());
        }
    }
    let tracked = |model: &kiln_models::YoloV8| {
        let mut visitor = Tracked(Vec::new());
        burn::module::Module::visit(model, &mut visitor);
        visitor.0
    };

    let scratch = Scratch::new("ultralytics-init");
    // Drawn where training draws it: new values on an autodiff device must still train.
    let device = Device::flex().autodiff();
    for (index, case) in fixture["models"].as_array().unwrap().iter().enumerate() {
        let name = case["config"].as_str().unwrap().trim_end_matches(".yaml");
        let config: YoloConfig =
            name.parse::<YoloConfig>().unwrap().with_num_classes(case["classes"].as_u64().unwrap() as usize);
        let model = config.init_drawn_as_pytorch(case["torch_seed"].as_u64().unwrap(), &device);
        let trains = tracked(&model);
        assert_eq!(trains, tracked(&config.init(&device)), "{name}: the parameters that train");
        assert!(trains.iter().filter(|&&t| t).count() > 100, "{name}: the convolutions train");
        let path = scratch.0.join(format!("init-{index}.safetensors"));
        model.save(&path, &[]).unwrap();
        let tensors = kiln_tests::safetensors_tensors(&path);
        let entries = case["entries"].as_object().unwrap();
        let kiln_keys: Vec<&String> = tensors.keys().collect();
        let ultralytics_keys: Vec<&String> = entries.keys().collect();
        assert_eq!(kiln_keys.len(), ultralytics_keys.len(), "{name}: entries");
        for (key, entry) in entries {
            let (dtype, shape, bytes) = tensors.get(key).unwrap_or_else(|| panic!("{name}: kiln has no {key}"));
            assert_eq!(dtype, "F32", "{name} {key}");
            let values: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            let expected_shape: Vec<u64> =
                entry["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            assert_eq!(shape, &expected_shape, "{name} {key}: shape");
            assert_eq!(values[..4.min(values.len())], floats(&entry["first"])[..], "{name} {key}: first values");
            assert_eq!(*values.last().unwrap(), entry["last"].as_f64().unwrap() as f32, "{name} {key}: last value");
            let sum: f64 = values.iter().map(|&v| v as f64).sum();
            let squares: f64 = values.iter().map(|&v| (v as f64).powi(2)).sum();
            for (what, kiln, reference) in [
                ("sum", sum, entry["sum"].as_f64().unwrap()),
                ("sum of squares", squares, entry["sum_of_squares"].as_f64().unwrap()),
            ] {
                assert!(
                    (kiln - reference).abs() <= 1e-9 * (1.0 + reference.abs()),
                    "{name} {key}: {what} {kiln} vs {reference}"
                );
            }
        }
    }
}
