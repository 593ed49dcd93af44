//! LoRA through Burn's native support on the tiny SAM: only the targeted Linear layers get
//! adapters, only adapter factors get gradients, training leaves the base bit-identical, the
//! adapter file alone (on the same base) reproduces the trained model exactly, merging equals the
//! adapted model, and an adapter is refused on another base.

use std::path::PathBuf;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use kiln_models::lora::{self, AdapterConfig, LoraConfig, LoraError};
use kiln_models::sam::{Sam, SamConfig};

fn tiny_checkpoint() -> PathBuf {
    kiln_tests::fixture("sam/tiny.pth")
}

fn decoder_attention() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: ["q_proj", "k_proj", "v_proj", "out_proj"].map(String::from).to_vec(),
    }
}

/// Every float parameter's values by path.
fn snapshot<M: Module>(model: &M) -> Vec<(String, TensorData)> {
    struct Values {
        path: Vec<(String, bool)>,
        found: Vec<(String, TensorData)>,
    }
    impl ModuleVisitor for Values {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.push((name.to_string(), container_type.starts_with("Enum:")));
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let path: Vec<&str> = self.path.iter().filter(|(_, e)| !e).map(|(n, _)| n.as_str()).collect();
            self.found.push((path.join("."), param.val().into_data()));
        }
    }
    let mut values = Values { path: Vec::new(), found: Vec::new() };
    model.visit(&mut values);
    values.found
}

fn boxes(device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(vec![20f32, 30.0, 140.0, 180.0, 100.0, 10.0, 240.0, 120.0], [2, 4]), device)
}

fn masks(sam: &Sam, device: &Device) -> Tensor<4> {
    let pixels: Tensor<4> = Tensor::from_data(
        TensorData::new(
            (0..3 * 256 * 256).map(|i| ((i % 97) as f32 / 48.0) - 1.0).collect::<Vec<f32>>(),
            [1, 3, 256, 256],
        ),
        device,
    );
    let embedding = sam.embed(pixels);
    sam.predict_boxes(embedding, boxes(device), true).masks
}

#[test]
fn lora_trains_adapters_only_and_the_adapter_file_reproduces_the_model() {
    let device = Device::flex().autodiff();
    let base = Sam::load(&SamConfig::tiny(), &tiny_checkpoint(), &device).unwrap();
    let base_values = snapshot(&base);
    let (model, summary) = lora::apply(base, &decoder_attention(), "sam/tiny", 1).unwrap();
    // 2 two-way blocks x 3 attentions + the final attention, 4 projections each.
    assert_eq!(summary.adapted.len(), 28, "{:?}", summary.adapted);
    assert!(summary.adapted.iter().all(|p| p.starts_with("mask_decoder.transformer.")));
    assert!(summary.trainable > 0 && summary.trainable * 20 < summary.total, "{}", summary.render());

    // Only adapter factors receive gradients.
    let loss = masks(&model, &device).square().mean();
    let grads = loss.backward();
    struct WithGrad<'a> {
        grads: &'a burn::tensor::Gradients,
        path: Vec<String>,
        with: Vec<String>,
    }
    impl ModuleVisitor for WithGrad<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.val().grad(self.grads).is_some() {
                self.with.push(self.path.join("."));
            }
        }
    }
    let mut visitor = WithGrad { grads: &grads, path: Vec::new(), with: Vec::new() };
    model.visit(&mut visitor);
    assert!(!visitor.with.is_empty());
    assert!(visitor.with.iter().all(|p| p.contains(".lora.")), "non-adapter gradients: {:?}", visitor.with);

    // A few optimiser steps move the adapters and leave every base parameter bit-identical.
    let mut optimizer = AdamWConfig::new().init();
    let mut model = model;
    for _ in 0..3 {
        let loss = masks(&model, &device).square().mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate::from(1e-2), model, grads);
    }
    let trained = snapshot(&model);
    for (path, before) in &base_values {
        let after = &trained.iter().find(|(p, _)| p == path).unwrap_or_else(|| panic!("{path} kept")).1;
        assert_eq!(before, after, "base parameter {path} changed");
    }
    let adapters: Vec<_> = trained.iter().filter(|(p, _)| p.contains(".lora.b")).collect();
    assert!(adapters.iter().any(|(_, v)| v.iter::<f32>().any(|x| x != 0.0)), "adapters trained");

    // The adapter file alone, on the same base, reproduces the trained model exactly.
    let dir = std::env::temp_dir().join(format!("kiln-lora-{}", std::process::id()));
    let hash = lora::file_sha256(&tiny_checkpoint()).unwrap();
    let config = AdapterConfig {
        peft_type: "LORA".into(),
        lora: decoder_attention(),
        base_model_name_or_path: "sam/tiny".into(),
        base_weights_hash: hash.clone(),
        kiln_version: "test".into(),
    };
    lora::save_adapter(&model, &dir, &config).unwrap();
    let mut written: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    written.sort();
    assert_eq!(written, [lora::ADAPTER_CONFIG, lora::ADAPTER_WEIGHTS], "the adapter files and nothing else");
    let adapter_size = std::fs::metadata(dir.join(lora::ADAPTER_WEIGHTS)).unwrap().len();
    let base_size = std::fs::metadata(tiny_checkpoint()).unwrap().len();
    let inference = Device::flex();
    let reloaded_base = Sam::load(&SamConfig::tiny(), &tiny_checkpoint(), &inference).unwrap();
    let reloaded = lora::load_adapter(reloaded_base, &dir, "sam/tiny", &hash);
    let wrong_base = Sam::load(&SamConfig::tiny(), &tiny_checkpoint(), &inference).unwrap();
    let refused = lora::load_adapter(wrong_base, &dir, "sam/tiny", "0000");
    std::fs::remove_dir_all(&dir).ok();
    let (reloaded, read_config) = reloaded.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_config, config);
    assert!(adapter_size * 10 < base_size, "adapter {adapter_size} B vs base {base_size} B");
    let trained_masks = masks(&model.valid(), &inference).into_data();
    let reloaded_masks = masks(&reloaded, &inference);
    assert_eq!(trained_masks, reloaded_masks.clone().into_data());

    // Merged weights compute the same masks (up to float rounding of W + s·AB).
    let merged = lora::merge(reloaded);
    assert!(lora::parameter_paths(&merged).iter().all(|(p, _)| !p.contains(".lora.")));
    let merged_masks = masks(&merged, &inference);
    let difference = (merged_masks - reloaded_masks).abs().max().into_scalar::<f32>();
    assert!(difference < 1e-4, "merged differs by {difference}");

    assert!(matches!(refused, Err(LoraError::WrongBase { .. })), "{:?}", refused.err());
}

#[test]
fn encoder_targets_are_adapted_through_the_encoder_variant() {
    let device = Device::flex();
    let sam = SamConfig::tiny().init(&device);
    let config = LoraConfig { rank: 2, alpha: 4.0, dropout: 0.0, target_modules: vec!["attn.qkv".into()] };
    let (model, summary) = lora::apply(sam, &config, "sam/tiny", 1).unwrap();
    assert_eq!(summary.adapted, ["image_encoder.blocks.0.attn.qkv.weight", "image_encoder.blocks.1.attn.qkv.weight"]);
    let adapters: Vec<String> =
        lora::parameter_paths(&model).into_iter().map(|(p, _)| p).filter(|p| p.contains(".lora.")).collect();
    assert_eq!(adapters.len(), 4, "{adapters:?}");
}

#[test]
fn targets_that_match_nothing_are_refused_with_the_layer_names() {
    let device = Device::flex();
    let sam = SamConfig::tiny().init(&device);
    let config = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, target_modules: vec!["query".into()] };
    let error = lora::apply(sam, &config, "sam/tiny", 1).map(|_| ()).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("query") && message.contains("attn.qkv"), "{message}");
}

#[test]
fn lora_dropout_other_than_zero_is_refused_with_the_reason() {
    let sam = SamConfig::tiny().init(&Device::flex());
    let config = LoraConfig { dropout: 0.1, ..decoder_attention() };
    let message = lora::apply(sam, &config, "sam/tiny", 1).map(|_| ()).unwrap_err().to_string();
    assert!(message.contains("lora_dropout 0.1") && message.contains("set lora_dropout to 0"), "{message}");
}
