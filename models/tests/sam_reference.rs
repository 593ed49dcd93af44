//! SAM against the official `segment-anything`: a tiny config loaded from a PyTorch state dict, and
//! vit_b's real widths and windowing cut to 2 blocks (weights recomputed from the formula the
//! reference script used, written as safetensors and loaded); image embedding, dense positional
//! encoding, masks and IoU predictions for box, point, point+box+mask and mask-only prompts, and the
//! post-processed masks, all within 1e-4 relative. Parameter counts of vit_b/l/h. Fixtures:
//! tests/reference/sam_reference.py.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use kiln_models::WeightsError;
use kiln_models::sam::{
    EncoderConfig, ImageEncoderConfig, MaskDecoderConfig, PointPrompts, Sam, SamConfig, TinyVitConfig,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sam")
}

fn reference() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("reference.json")).expect("fixture")).unwrap()
}

fn read_tensor<const D: usize>(entry: &Value, device: &Device) -> Tensor<D> {
    let bytes = std::fs::read(fixtures().join(entry["file"].as_str().unwrap())).unwrap();
    let values: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let shape: Vec<usize> = entry["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn assert_close<const D: usize>(name: &str, got: Tensor<D>, want: &Value) {
    let expected: Tensor<D> = read_tensor(want, &got.device());
    assert_eq!(got.dims(), expected.dims(), "{name}: shape");
    let got = got.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let expected = expected.into_data().try_to_vec::<f32>().unwrap();
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-4 * scale, "{name}: max abs difference {worst} > 1e-4 x max |value| {scale}");
}

fn matrix(value: &Value) -> (Vec<f32>, Vec<usize>) {
    fn walk(v: &Value, out: &mut Vec<f32>, shape: &mut Vec<usize>, depth: usize) {
        match v {
            Value::Array(items) => {
                if shape.len() == depth {
                    shape.push(items.len());
                }
                items.iter().for_each(|item| walk(item, out, shape, depth + 1));
            }
            other => out.push(other.as_f64().unwrap() as f32),
        }
    }
    let (mut out, mut shape) = (Vec::new(), Vec::new());
    walk(value, &mut out, &mut shape, 0);
    (out, shape)
}

fn tensor<const D: usize>(value: &Value, device: &Device) -> Tensor<D> {
    let (values, shape) = matrix(value);
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// The reference script's deterministic weights: `scale * (2u - 1)`, u from splitmix64 over the
/// FNV-1a hash of the official key plus the element index.
fn formula(key: &str, shape: &[usize]) -> Vec<f32> {
    let seed = key.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3));
    let n: usize = shape.iter().product();
    let unit = |i: usize| {
        let mut z = seed.wrapping_add(i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        2.0f32 * ((z >> 40) as f32 / (1u64 << 24) as f32) - 1.0
    };
    let embeddings = [
        "point_embeddings",
        "not_a_point_embed",
        "no_mask_embed",
        "iou_token",
        "mask_tokens",
        "positional_encoding_gaussian_matrix",
    ];
    (0..n)
        .map(|i| {
            let v = unit(i);
            if embeddings.iter().any(|e| key.contains(e)) {
                v
            } else if key.contains("pos_embed") || key.contains("rel_pos") {
                v * 0.5
            } else if shape.len() == 1 && (key.ends_with("weight") || key.ends_with("running_var")) {
                v * 0.5 + 1.0
            } else if shape.len() == 1 {
                v * 0.1
            } else {
                v * ((3.0 / (n / shape[0]) as f64).sqrt() as f32)
            }
        })
        .collect()
}

/// A float32 safetensors file of `tensors`.
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (key, shape, values) in tensors {
        let end = offset + values.len() * 4;
        header.insert(key.clone(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).unwrap();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    for (_, _, values) in tensors {
        values.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
    }
    std::fs::write(path, bytes).unwrap();
}

fn config_of(entry: &Value) -> SamConfig {
    let c = &entry["config"];
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let encoder = if c["tiny_vit"].as_bool() == Some(true) {
        EncoderConfig::TinyVit(TinyVitConfig { image_size: u("image_size"), ..TinyVitConfig::mobile_sam() })
    } else {
        EncoderConfig::Vit(ImageEncoderConfig {
            image_size: u("image_size"),
            patch_size: 16,
            embed_dim: u("embed_dim"),
            depth: u("depth"),
            num_heads: u("heads"),
            mlp_ratio: 4.0,
            out_chans: u("prompt_dim"),
            window_size: u("window"),
            global_attn_indexes: c["global_attn"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect(),
        })
    };
    SamConfig {
        name: "reference".into(),
        encoder,
        prompt_embed_dim: u("prompt_dim"),
        mask_in_chans: 16,
        decoder: MaskDecoderConfig {
            transformer_dim: u("prompt_dim"),
            transformer_depth: 2,
            transformer_heads: u("decoder_heads"),
            transformer_mlp_dim: u("decoder_mlp"),
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: u("iou_hidden"),
        },
    }
}

fn check_outputs(name: &str, sam: &Sam, entry: &Value, device: &Device) {
    let inputs = &entry["inputs"];
    let outputs = &entry["outputs"];
    let embedding = sam.embed(read_tensor(&inputs["pixels"], device));
    assert_close(&format!("{name} embedding"), embedding.clone(), &outputs["embedding"]);
    assert_close(&format!("{name} dense pe"), sam.prompt_encoder.dense_pe(), &outputs["dense_pe"]);

    let boxes: Tensor<2> = tensor(&inputs["boxes"], device);
    let prediction = sam.predict_boxes(embedding.clone(), boxes.clone(), true);
    assert_close(&format!("{name} box masks"), prediction.masks.clone(), &outputs["box_masks"]);
    assert_close(&format!("{name} box iou"), prediction.iou_predictions, &outputs["box_iou"]);
    let pair = |v: &Value| (v[0].as_u64().unwrap() as usize, v[1].as_u64().unwrap() as usize);
    let original = sam.postprocess_masks(prediction.masks, pair(&inputs["input_size"]), pair(&inputs["original_size"]));
    assert_close(&format!("{name} post-processed masks"), original, &outputs["box_masks_original"]);

    let points = PointPrompts {
        coords: tensor(&inputs["point_coords"], device),
        labels: tensor(&inputs["point_labels"], device),
    };
    let prediction = sam.predict(embedding.clone(), Some(&points), None, None, false);
    assert_close(&format!("{name} point masks"), prediction.masks, &outputs["point_masks"]);
    assert_close(&format!("{name} point iou"), prediction.iou_predictions, &outputs["point_iou"]);

    let first_box = boxes.narrow(0, 0, 1);
    let mask_input: Tensor<4> = read_tensor(&inputs["mask_input"], device);
    let prediction = sam.predict(embedding.clone(), Some(&points), Some(first_box), Some(mask_input.clone()), true);
    assert_close(&format!("{name} point+box+mask masks"), prediction.masks, &outputs["all_masks"]);
    assert_close(&format!("{name} point+box+mask iou"), prediction.iou_predictions, &outputs["all_iou"]);

    let prediction = sam.predict(embedding, None, None, Some(mask_input), true);
    assert_close(&format!("{name} mask-only masks"), prediction.masks, &outputs["mask_only_masks"]);
    assert_close(&format!("{name} mask-only iou"), prediction.iou_predictions, &outputs["mask_only_iou"]);
}

#[test]
fn tiny_sam_from_a_pytorch_state_dict_equals_segment_anything() {
    let reference = reference();
    let entry = &reference["models"]["tiny"];
    let device = Device::flex();
    assert_eq!(config_of(entry).encoder, SamConfig::tiny().encoder, "the fixture is SamConfig::tiny()");
    assert_eq!(config_of(entry).decoder, SamConfig::tiny().decoder);
    let sam = Sam::load(&SamConfig::tiny(), &fixtures().join(entry["checkpoint"].as_str().unwrap()), &device)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(kiln_models::parameter_count(&sam) as u64, entry["parameters"].as_u64().unwrap());
    check_outputs("tiny", &sam, entry, &device);
}

/// Builds the fixture's model from the weight formula, through a safetensors file and the loader.
fn formula_model(entry: &Value, device: &Device) -> Sam {
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = entry["keys"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(key, shape)| {
            let shape: Vec<usize> = shape.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            let values = formula(key, &shape);
            (key.clone(), shape, values)
        })
        .collect();
    let dir =
        std::env::temp_dir().join(format!("kiln-sam-formula-{}-{:?}", std::process::id(), std::thread::current().id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("weights.safetensors");
    write_safetensors(&path, &tensors);
    let loaded = Sam::load(&config_of(entry), &path, device);
    std::fs::remove_dir_all(&dir).ok();
    let sam = loaded.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(kiln_models::parameter_count(&sam) as u64, entry["parameters"].as_u64().unwrap());
    sam
}

#[test]
fn the_weight_formula_is_the_scripts() {
    let reference = reference();
    let check = &reference["formula_check"];
    let first: Vec<f32> = check["first"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    assert_eq!(formula(check["key"].as_str().unwrap(), &[8]), first);
}

#[test]
fn vit_b_widths_cut_to_two_blocks_equal_segment_anything() {
    let reference = reference();
    let entry = &reference["models"]["vit_b2"];
    let device = Device::flex();
    let sam = formula_model(entry, &device);
    check_outputs("vit_b2", &sam, entry, &device);
}

#[test]
fn mobile_sam_tiny_vit_equals_the_official_code() {
    let reference = reference();
    let entry = &reference["models"]["mobile256"];
    let device = Device::flex();
    let sam = formula_model(entry, &device);
    check_outputs("mobile256", &sam, entry, &device);
}

#[test]
fn parameter_counts_equal_the_official_sizes() {
    let reference = reference();
    let device = Device::flex();
    for (name, count) in reference["parameters"].as_object().unwrap() {
        let config = SamConfig::from_name(name).unwrap();
        let sam = config.init(&device);
        assert_eq!(kiln_models::parameter_count(&sam) as u64, count.as_u64().unwrap(), "{name}");
    }
}

#[test]
fn a_checkpoint_of_another_size_is_refused_with_its_keys() {
    let device = Device::flex();
    let mut config = SamConfig::tiny();
    let EncoderConfig::Vit(encoder) = &mut config.encoder else { unreachable!() };
    encoder.depth = 3;
    encoder.embed_dim = 96;
    let error = Sam::load(&config, &fixtures().join("tiny.pth"), &device).unwrap_err();
    let WeightsError::Mismatch { report, .. } = &error else { panic!("expected a mismatch, got {error}") };
    assert!(report.missing.iter().any(|k| k.starts_with("image_encoder.blocks.2.")), "{error}");
    assert!(report.mis_shaped.iter().any(|k| k.contains("image_encoder.pos_embed")), "{error}");
    let message = error.to_string();
    assert!(message.contains("tiny.pth") && message.contains("SAM tiny"), "{message}");
}

#[test]
fn saved_weights_load_back_equal() {
    let device = Device::flex();
    let config = SamConfig::tiny();
    let sam = Sam::load(&config, &fixtures().join("tiny.pth"), &device).unwrap();
    let dir = std::env::temp_dir().join(format!("kiln-sam-save-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.safetensors");
    sam.save(&path, &[("kiln.model".into(), "sam".into())]).unwrap();
    let again = Sam::load(&config, &path, &device);
    std::fs::remove_dir_all(&dir).ok();
    let again = again.unwrap_or_else(|e| panic!("{e}"));
    let pixels: Tensor<4> = Tensor::random([1, 3, 256, 256], burn::tensor::Distribution::Default, &device);
    let a = sam.embed(pixels.clone()).into_data();
    let b = again.embed(pixels).into_data();
    assert_eq!(a, b);
}
