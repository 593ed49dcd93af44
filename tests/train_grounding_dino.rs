//! The GroundingDINO teacher's fine-tuning end to end on small generated box datasets: which
//! teachers the data calls for, a LoRA run's files (adapter only, the base file untouched, the
//! adapter small), resumption to the same adapter, `kiln detect` with the adapter, and clear errors.
//! The tiny config with a tiny random BERT needs no shared data; the LoRA-gain experiment on a
//! pretrained base is in README "Fine-tuning the GroundingDINO teacher".

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use indicatif::ProgressBar;
use kiln_data::{SynthLabels, SynthOptions};
use kiln_models::grounding_dino::GroundingDinoConfig;
use kiln_tests::Scratch;
use kiln_training::Verbosity;
use kiln_training::teacher::detect::{DetectRequest, run_detect};
use kiln_training::teacher::{
    TeacherConfig, TeacherOverrides, TrainTeacherRequest, run_train_teacher, run_train_teacher_for,
};

/// Burn's random generator is global to the process: trainings run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn dataset(dir: &Path, images: usize, labels: SynthLabels) -> (PathBuf, PathBuf) {
    kiln_tests::synth_split(
        dir,
        &SynthOptions { images, classes: 3, size: 128, labels, seed: 3, max_objects: 3, ..Default::default() },
    )
}

fn request(train: &Path, val: &Path, output: &Path, overrides: TeacherOverrides) -> TrainTeacherRequest {
    kiln_tests::teacher_request(train, val, output, overrides)
}

fn tiny(epochs: usize, weights: Option<PathBuf>) -> TeacherOverrides {
    TeacherOverrides {
        only: Some("grounding_dino".into()),
        gdino: Some("tiny".into()),
        gdino_weights: weights,
        lora_r: Some(4),
        epochs: Some(epochs),
        batch_size: Some(4),
        image_size: Some(128),
        lr0: Some(0.001),
        ..Default::default()
    }
}

/// A random tiny base written as a weight file, so that "the base stays untouched" means something.
fn base_file(dir: &Path) -> PathBuf {
    let path = dir.join("tiny_base.safetensors");
    let device = Device::flex();
    device.seed(11);
    GroundingDinoConfig::tiny().init(&device).save(&path, &[], true).unwrap();
    path
}

/// A safetensors file's tensors by name (raw bytes).
fn tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = v["data_offsets"].as_array().unwrap();
            let (a, b) = (o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize);
            (k.clone(), data[a..b].to_vec())
        })
        .collect()
}

#[test]
fn lora_run_writes_only_the_adapter_resumes_exactly_and_detect_uses_it() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("gdino-train");
    let (train_json, val_json) = dataset(&scratch.0, 40, SynthLabels::Boxes);
    let base = base_file(&scratch.0);
    let base_bytes = std::fs::read(&base).unwrap();

    let whole = request(&train_json, &val_json, &scratch.0.join("whole"), tiny(2, Some(base.clone())));
    let summary = run_train_teacher(&whole, Device::flex(), Verbosity::Quiet).unwrap();
    assert!(summary.sam.is_none());
    let g = summary.grounding_dino.expect("boxes call for GroundingDINO");
    assert_eq!(g.history.len(), 3, "start + 2 epochs");
    let first = &g.history[1];
    let last = &g.history[2];
    assert!(last.train_loss < first.train_loss, "the loss falls: {:?}", g.history);
    assert!(g.lora.trainable * 20 < g.lora.total, "LoRA trains a small share: {}", g.lora.render());
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes, "the base file is untouched");
    let adapter = scratch.0.join("whole/teachers/grounding_dino_lora");
    let mut files: Vec<String> =
        std::fs::read_dir(&adapter).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    files.sort();
    assert_eq!(files, ["adapter_config.json", "adapter_model.safetensors"]);
    assert!(g.adapter_bytes * 10 < g.base_bytes, "adapter {} bytes vs base {}", g.adapter_bytes, g.base_bytes);
    for file in ["results.csv", "results.png", "val_boxes.jpg"] {
        assert!(scratch.0.join("whole/teachers/grounding_dino_train").join(file).is_file(), "{file}");
    }
    let config: TeacherConfig =
        serde_yaml::from_str(&std::fs::read_to_string(scratch.0.join("whole/teachers/teacher_config.yaml")).unwrap())
            .unwrap();
    assert_eq!(config.classes, ["circle", "square", "triangle"]);

    // Interrupted after one epoch and resumed: the same history and the same adapter bytes.
    let parts = request(&train_json, &val_json, &scratch.0.join("parts"), tiny(2, Some(base.clone())));
    let one = run_train_teacher_for(&parts, Device::flex(), Verbosity::Quiet, Some(1)).unwrap();
    assert_eq!(one.grounding_dino.unwrap().history.len(), 2);
    let resumed =
        run_train_teacher(&TrainTeacherRequest { resume: true, ..parts.clone() }, Device::flex(), Verbosity::Quiet)
            .unwrap()
            .grounding_dino
            .unwrap();
    for (a, b) in g.history.iter().zip(&resumed.history) {
        assert!((a.train_loss - b.train_loss).abs() <= 1e-6 * a.train_loss.abs(), "{a:?} vs {b:?}");
        assert!((a.val_map - b.val_map).abs() < 1e-9, "{a:?} vs {b:?}");
    }
    // The same tensors (the header's key order is not fixed).
    let weights = |dir: &Path| tensors(&dir.join("teachers/grounding_dino_lora/adapter_model.safetensors"));
    assert!(weights(&scratch.0.join("whole")) == weights(&scratch.0.join("parts")), "the resumed adapter differs");
    assert_eq!(g.best_epoch, resumed.best_epoch);

    // `kiln detect` with the adapter: the prompt defaults to nothing here, so name the classes.
    let images = train_json.parent().unwrap().join("images");
    let detect = DetectRequest {
        images: images.clone(),
        prompt: "circle . square . triangle .".into(),
        output: scratch.0.join("detect"),
        config: config.grounding_dino.clone().unwrap(),
        adapter: Some(adapter.clone()),
    };
    let found = run_detect(&detect, &Device::flex(), &ProgressBar::hidden()).unwrap();
    assert_eq!(found.images, 40);
    assert!(found.adapter.is_some());
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&found.detections).unwrap()).unwrap();
    assert_eq!(json["categories"].as_array().unwrap().len(), 3);
    assert_eq!(json["images"].as_array().unwrap().len(), 40);
    assert_eq!(std::fs::read_dir(&found.pictures).unwrap().count(), 40);
    // Never over an existing result.
    let error = run_detect(&detect, &Device::flex(), &ProgressBar::hidden()).unwrap_err().to_string();
    assert!(error.contains("detections.json"), "{error}");
    // An adapter on another base is refused.
    let other = DetectRequest {
        output: scratch.0.join("detect-other"),
        config: kiln_training::teacher::grounding_dino::GroundingDinoTeacherConfig {
            weights: None,
            ..detect.config.clone()
        },
        ..detect
    };
    let error = run_detect(&other, &Device::flex(), &ProgressBar::hidden()).unwrap_err().to_string();
    assert!(error.contains("base"), "{error}");
    assert!(!scratch.0.join("detect-other").exists());
}

#[test]
fn the_data_decides_the_teachers_and_bad_settings_are_refused() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("gdino-errors");
    let (train_json, val_json) = dataset(&scratch.0, 12, SynthLabels::Masks);
    let output = scratch.0.join("out");
    // Masks give boxes: GroundingDINO is called for too, and the official model needs its weights.
    let error = run_train_teacher(
        &request(
            &train_json,
            &val_json,
            &output,
            TeacherOverrides { gdino: Some("swint_ogc".into()), ..tiny(1, None) },
        ),
        Device::flex(),
        Verbosity::Quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("--gdino-weights"), "{error}");
    let error = run_train_teacher(
        &request(&train_json, &val_json, &output, TeacherOverrides { gdino: Some("huge".into()), ..tiny(1, None) }),
        Device::flex(),
        Verbosity::Quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("unknown GroundingDINO"), "{error}");
    let error = run_train_teacher(
        &request(&train_json, &val_json, &output, tiny(1, Some(scratch.0.join("missing.pth")))),
        Device::flex(),
        Verbosity::Quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("missing.pth"), "{error}");
    // A checkpoint of another model: a key report naming the file.
    let wrong = scratch.0.join("wrong.safetensors");
    let device = Device::flex();
    kiln_models::sam::SamConfig::tiny().init(&device).save(&wrong, &[]).unwrap();
    let error = run_train_teacher(
        &request(&train_json, &val_json, &output, tiny(1, Some(wrong.clone()))),
        Device::flex(),
        Verbosity::Quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("wrong.safetensors") && error.contains("missing"), "{error}");
    assert!(!output.join("teachers").exists(), "a failed run leaves nothing behind");
}

/// `--objects` / `--environment` reach GroundingDINO's training images: the vertical flip moves
/// the boxes with the pixels, the light changes alter the pixels only; validation images stay
/// as they are.
#[test]
fn characteristics_reach_the_grounding_dino_training_images() {
    use kiln_training::augment::AugmentConfig;
    use kiln_training::teacher::grounding_dino::GroundingDataset;
    let scratch = Scratch::new("gdino-characteristics");
    let (train, _) = dataset(scratch.path(), 8, SynthLabels::Boxes);
    let loaded = kiln_data::load_dataset(&train, None).unwrap();
    let images = loaded.dataset.images.len();
    let source = std::sync::Arc::new(kiln_data::batch::CocoDetectionDataset::new(loaded.dataset, &loaded.images_dir));
    let with = |augment: AugmentConfig, training: bool| GroundingDataset {
        source: source.clone(),
        image_size: 128,
        max_size: 128,
        hflip: training.then(|| (0.0, 1, kiln_training::data::EpochCounter::default())),
        augment,
    };
    let plain = with(AugmentConfig::none(), true);
    let upside_down = with(AugmentConfig { flipud: 1.0, ..AugmentConfig::none() }, true);
    let dark = with(AugmentConfig { brightness: 0.6, gamma: 0.5, noise: 0.05, ..AugmentConfig::none() }, true);
    let validation = with(AugmentConfig { flipud: 1.0, brightness: 0.6, ..AugmentConfig::none() }, false);
    for index in 0..images {
        let a = plain.load(index).unwrap();
        let b = upside_down.load(index).unwrap();
        assert_eq!(a.boxes.len(), b.boxes.len());
        assert!(!a.boxes.is_empty());
        for (p, q) in a.boxes.iter().zip(&b.boxes) {
            assert!((p[0] - q[0]).abs() < 1e-6 && (p[1] - (1.0 - q[1])).abs() < 1e-6, "{p:?} vs {q:?}");
            assert!((p[2] - q[2]).abs() < 1e-6 && (p[3] - q[3]).abs() < 1e-6);
        }
        // Row r of the flipped input is row h - 1 - r of the plain one (channel 0, inside the image).
        let (h, w) = a.size;
        let (first, last) = (&a.pixels[..w], &b.pixels[(h - 1) * w..h * w]);
        assert!(first.iter().zip(last).all(|(x, y)| (x - y).abs() < 1e-5), "the pixels flip too");
        let c = dark.load(index).unwrap();
        assert_eq!(a.boxes, c.boxes);
        assert_ne!(a.pixels, c.pixels);
        let v = validation.load(index).unwrap();
        assert_eq!((a.boxes.clone(), a.pixels.clone()), (v.boxes, v.pixels), "validation is never augmented");
    }
}

/// The GroundingDINO teacher on LibTorch's CPU (`--device tch-cpu`) against flex, from the same
/// base file and the same adapter (drawn on the host from the seed):
/// - one step's gradients of every adapter factor (tiny config, one 128x128 image, two classes)
///   equal flex's within 1e-3 of the factor's largest gradient (measured: 1.2e-6), and the loss
///   within 1e-5 (relative);
/// - a whole LoRA epoch (two AdamW steps) gives flex's training loss within 1e-3 (relative) and
///   leaves the frozen base bit for bit as it was. The updated factors are not compared value by
///   value: AdamW's first steps move each value by about the learning rate whatever its gradient's
///   size, so a value whose gradient is at float-rounding level (the random base's sampling
///   offsets) moves by the sign of that rounding (measured: 446 of 28,432 values differ by more
///   than 1e-5, by at most 0.003 = 3 steps of lr 0.001). SAM's test compares them (its gradients
///   are clear of the rounding).
#[cfg(feature = "tch")]
#[test]
fn lora_gradients_and_an_epoch_on_libtorch_cpu_equal_flex() {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::optim::GradientsParams;
    use burn::tensor::Tensor;
    use kiln_training::teacher::grounding_dino::{
        ClassCaption, GroundingBatcher, GroundingDinoTeacher, GroundingItem, load_tokenizer,
    };
    use std::collections::BTreeMap;

    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("gdino-libtorch");
    let base = base_file(&scratch.0);
    let torch = kiln_models::Backend::TchCpu.open().unwrap();

    // One step's gradients.
    let gradients = |device: &Device| -> (f32, BTreeMap<String, Vec<f32>>) {
        let autodiff = device.clone().autodiff();
        let teacher_config = TeacherConfig::default().grounding_dino.unwrap();
        let model_config = GroundingDinoConfig::tiny();
        let model = kiln_models::grounding_dino::GroundingDino::load(&model_config, &base, None, &autodiff).unwrap();
        let lora = kiln_models::lora::LoraConfig { rank: 4, alpha: 8.0, ..teacher_config.lora.clone() };
        let (model, _) = kiln_models::lora::apply(model, &lora, "grounding_dino/tiny", 1).unwrap();
        let teacher = GroundingDinoTeacher { model, loss: teacher_config.loss, max_grad_norm: 0.1 };
        let tokenizer = load_tokenizer(&teacher_config).unwrap();
        let classes = ["circle".to_string(), "square".to_string()];
        let batcher = GroundingBatcher {
            caption: std::sync::Arc::new(ClassCaption::new(&tokenizer, &classes, model_config.max_text_len).unwrap()),
            special_ids: tokenizer.special_ids.clone(),
            max_text_len: model_config.max_text_len,
        };
        let (h, w) = (128, 128);
        let item = GroundingItem {
            index: 0,
            image_id: 0,
            pixels: (0..3 * h * w).map(|i| ((i * 7919 % 97) as f32 - 48.0) / 30.0).collect(),
            size: (h, w),
            original_size: (h, w),
            boxes: vec![[0.3, 0.4, 0.2, 0.3], [0.7, 0.5, 0.25, 0.4]],
            classes: vec![0, 1],
        };
        let batch = burn::data::dataloader::batcher::Batcher::batch(&batcher, vec![item], &autodiff);
        let (loss, _, _) = teacher.loss(&batch).unwrap();
        let value: f32 = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &teacher);
        struct Read<'a> {
            path: Vec<String>,
            grads: &'a GradientsParams,
            found: BTreeMap<String, Vec<f32>>,
        }
        impl ModuleVisitor for Read<'_> {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.path.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if let Some(grad) = self.grads.get::<D>(param.id) {
                    let values = kiln_models::device::read_floats(grad).unwrap();
                    self.found.insert(self.path.join("."), values);
                }
            }
        }
        let mut read = Read { path: Vec::new(), grads: &grads, found: BTreeMap::new() };
        teacher.visit(&mut read);
        (value, read.found)
    };
    let (flex_loss, flex_grads) = gradients(&Device::flex());
    let (torch_loss, torch_grads) = gradients(&torch);
    assert!((flex_loss - torch_loss).abs() <= 1e-5 * flex_loss.abs(), "loss: flex {flex_loss}, LibTorch {torch_loss}");
    assert_eq!(flex_grads.keys().collect::<Vec<_>>(), torch_grads.keys().collect::<Vec<_>>());
    assert!(flex_grads.len() >= 20 && flex_grads.keys().all(|k| k.contains("lora")), "{:?}", flex_grads.keys());
    let mut worst = (0f32, String::new());
    for (name, a) in &flex_grads {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let difference = a.iter().zip(&torch_grads[name]).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        let relative = if scale > 0.0 { difference / scale } else { difference };
        if !(relative <= worst.0) {
            worst = (relative, name.clone());
        }
    }
    eprintln!(
        "one step: loss flex {flex_loss}, LibTorch {torch_loss}; worst gradient difference {} of its factor's largest ({})",
        worst.0, worst.1
    );
    assert!(worst.0 <= 1e-3, "the gradient of {} differs by {} of its largest value", worst.1, worst.0);

    // A whole epoch through `kiln train-teacher`.
    let (train_json, val_json) = dataset(&scratch.0, 10, SynthLabels::Boxes);
    let run_on = |device: Device, name: &str| {
        let output = scratch.0.join(name);
        let request = request(&train_json, &val_json, &output, tiny(1, Some(base.clone())));
        let summary = run_train_teacher(&request, device, Verbosity::Quiet).unwrap_or_else(|e| panic!("{name}: {e}"));
        let loss = summary.grounding_dino.expect("boxes call for GroundingDINO").history[1].train_loss;
        let checkpoint = output.join("teachers/grounding_dino_train/checkpoint/model-1.bpk");
        (loss, kiln_tests::checkpoint_floats(&checkpoint))
    };
    let (flex_loss, flex_model) = run_on(Device::flex(), "flex");
    let (torch_loss, torch_model) = run_on(torch, "tch-cpu");
    assert!((flex_loss - torch_loss).abs() <= 1e-3 * flex_loss.abs(), "loss: flex {flex_loss}, LibTorch {torch_loss}");
    let part = |m: &BTreeMap<String, Vec<f32>>, adapters: bool| -> BTreeMap<String, Vec<f32>> {
        m.iter().filter(|(k, _)| k.contains("lora") == adapters).map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    let (base_difference, name) = kiln_tests::largest_difference(&part(&flex_model, false), &part(&torch_model, false));
    assert_eq!(base_difference, 0.0, "the frozen base moved ({name})");
    let (differing, total) = kiln_tests::count_differing(&part(&flex_model, true), &part(&torch_model, true), 1e-5);
    eprintln!(
        "epoch: loss flex {flex_loss}, LibTorch {torch_loss}; adapter values differing by more than 1e-5: {differing} of {total}"
    );
    assert!(total > 10_000 && differing * 20 < total, "{differing} of {total} adapter values differ");
}
