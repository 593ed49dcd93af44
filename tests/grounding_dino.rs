//! GroundingDINO against the official IDEA-Research code (`tests/reference/grounding_dino_reference.py`,
//! random weights in the official checkpoint layout, MiniLM as text encoder): the text masks of
//! several captions exactly, then the tiny model loaded from its `.pth` — BERT output, Swin features,
//! input projections, position encodings, encoder memory, the selected queries, every decoder layer's
//! logits and boxes — within 1e-4 relative. The full Swin-T OGC model's parameter names and shapes
//! equal the official inventory. MiniLM's sentence embeddings match sentence-transformers
//! (`tests/reference/minilm_reference.py`). Needs `../shared` (MiniLM weights and tokenizer).

use std::path::PathBuf;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use kiln_models::grounding_dino::position_encoding::image_position_embedding;
use kiln_models::grounding_dino::text::sub_sentences;
use kiln_models::grounding_dino::{
    BertConfig, BertModel, Caption, CaptionTokenizer, GroundingDino, GroundingDinoConfig, ImageBatch, TextBatch,
};
use kiln_tests::{fixture, shared_dir};
use serde_json::Value;

/// The reference fixture's `tiny_minilm` weights with the real MiniLM, and MiniLM's tokenizer.
fn reference_model(config: &GroundingDinoConfig, device: &Device) -> (GroundingDino, CaptionTokenizer) {
    let model = GroundingDino::load(
        config,
        &fixture("grounding_dino").join("tiny_minilm.pth"),
        Some(&minilm_dir().join("model.safetensors")),
        device,
    )
    .unwrap();
    (model, CaptionTokenizer::from_file(&minilm_dir().join("tokenizer.json")).unwrap())
}

fn minilm_dir() -> PathBuf {
    shared_dir().join("weights/all-minilm-l6-v2")
}

fn reference(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixture(name).join("reference.json")).expect("fixture")).unwrap()
}

fn read_tensor<const D: usize>(entry: &Value, device: &Device) -> Tensor<D> {
    let bytes = std::fs::read(fixture("grounding_dino").join(entry["file"].as_str().unwrap())).unwrap();
    let values: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let shape: Vec<usize> = entry["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Max |got - want| <= 1e-4 x max |want| (finite entries; -inf must match -inf).
fn assert_close<const D: usize>(name: &str, got: Tensor<D>, want: Tensor<D>) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let got = got.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let want = want.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let scale = want.iter().filter(|v| v.is_finite()).fold(0f32, |m, v| m.max(v.abs()));
    let mut worst = 0f32;
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        if b.is_finite() {
            worst = worst.max((a - b).abs());
        } else {
            assert_eq!(a, b, "{name}[{i}]: expected {b}, got {a}");
        }
    }
    assert!(worst <= 1e-4 * scale, "{name}: max abs difference {worst} > 1e-4 x max |value| {scale}");
}

fn flags(mask: Tensor<1, Bool>) -> Vec<bool> {
    mask.int().into_data().convert::<i64>().try_to_vec::<i64>().unwrap().into_iter().map(|v| v != 0).collect()
}

fn ints(value: &Value) -> Vec<i64> {
    value.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
}

#[test]
fn text_masks_match_the_official_ones() {
    let reference = reference("grounding_dino");
    let tokenizer = CaptionTokenizer::from_file(&minilm_dir().join("tokenizer.json")).unwrap();
    assert_eq!(tokenizer.special_ids, vec![101, 102, 1012, 1029]);
    let cases = reference["text_masks"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let caption = case["caption"].as_str().unwrap();
        let encoded = tokenizer.encode(caption).unwrap();
        let ids: Vec<i64> = encoded.ids.iter().map(|&i| i as i64).collect();
        assert_eq!(ids, ints(&case["input_ids"]), "{caption:?}: token ids");
        let masks = sub_sentences(&encoded.ids, &tokenizer.special_ids);
        let expected: Vec<bool> = case["text_self_attention_mask"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| ints(row).into_iter().map(|v| v == 1))
            .collect();
        assert_eq!(masks.attention, expected, "{caption:?}: attention mask");
        assert_eq!(masks.position_ids, ints(&case["position_ids"]), "{caption:?}: position ids");
        let phrases: Vec<Vec<i64>> =
            masks.phrase_tokens.iter().map(|p| p.iter().map(|&t| t as i64).collect()).collect();
        let expected: Vec<Vec<i64>> = case["cate_to_token_mask"].as_array().unwrap().iter().map(ints).collect();
        assert_eq!(phrases, expected, "{caption:?}: phrase tokens");
    }
    // A padded batch: masks are built on the padded rows, as the official code does.
    let batched = reference["text_masks_batched"].as_array().unwrap();
    let encoded: Vec<_> = batched.iter().map(|c| tokenizer.encode(c["caption"].as_str().unwrap()).unwrap()).collect();
    let device = kiln_models::device::cpu();
    let batch = TextBatch::new(&encoded.iter().collect::<Vec<_>>(), &tokenizer.special_ids, 256, &device);
    for (row, case) in batched.iter().enumerate() {
        assert_eq!(batch.position_ids[row], ints(&case["position_ids"]), "batched row {row}: position ids");
        let n = batch.lengths.iter().max().copied().unwrap();
        let attention: Vec<bool> = flags(batch.self_attention.clone().narrow(0, row, 1).reshape([n * n]));
        let expected: Vec<bool> = case["text_self_attention_mask"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| ints(r).into_iter().map(|v| v == 1))
            .collect();
        assert_eq!(attention, expected, "batched row {row}: attention mask");
        let mask: Vec<bool> = flags(batch.token_mask.clone().narrow(0, row, 1).reshape([n]));
        let expected: Vec<bool> = ints(&case["attention_mask"]).into_iter().map(|v| v == 1).collect();
        assert_eq!(mask, expected, "batched row {row}: token mask");
    }
    // Class names become the official caption form; each phrase maps to its tokens.
    let caption = Caption::from_names(&["Cat", "dog", " traffic light "]).unwrap();
    assert_eq!(caption.text, "cat . dog . traffic light .");
    let encoded = tokenizer.encode(&caption.text).unwrap();
    assert_eq!(tokenizer.phrase_tokens(&caption, &encoded), vec![vec![1], vec![3], vec![5, 6]]);
    assert_eq!(Caption::from_prompt("cat. dog").unwrap().text, "cat . dog .");
}

/// Why kiln's MiniLM presets let each phrase see `[CLS]`: read with the official sub-sentence
/// masks, a phrase's first word sits at position 0 with `[CLS]` out of view, and the frozen
/// all-MiniLM-L6-v2 gives it nearly the same vector whatever the word, so class names cannot be
/// told apart (a GroundingDINO base pretrained that way named almost every shape "heart").
#[test]
fn frozen_minilm_tells_class_names_apart_only_with_cls_in_view() {
    let device = kiln_models::device::cpu();
    let config = GroundingDinoConfig::tiny_minilm();
    assert!(config.phrases_see_cls && !GroundingDinoConfig::swint_ogc().phrases_see_cls);
    let (model, tokenizer) = reference_model(&config, &device);
    let caption = Caption::from_names(&["circle", "square", "triangle", "star", "heart"].map(String::from)).unwrap();
    let encoded = tokenizer.encode(&caption.text).unwrap();
    let words: Vec<usize> = tokenizer.phrase_tokens(&caption, &encoded).iter().map(|t| t[0]).collect();
    let text = TextBatch::new(&[&encoded], &tokenizer.special_ids, config.max_text_len, &device);
    // Each phrase's tokens see [CLS] too, and count their positions from 1 behind it.
    let masks = sub_sentences(&encoded.ids, &tokenizer.special_ids);
    let n = encoded.ids.len();
    for &w in &words {
        assert!(!masks.attention[w * n] && masks.attention_with_cls[w * n]);
        assert_eq!((masks.position_ids[w], masks.position_ids_with_cls[w]), (0, 1));
    }
    let spread = |hidden: Tensor<3>| {
        let [_, _, d] = hidden.dims();
        let values: Vec<f32> = hidden.into_data().try_to_vec::<f32>().unwrap();
        let vector = |t: usize| &values[t * d..(t + 1) * d];
        let mut distances = Vec::new();
        for (a, &i) in words.iter().enumerate() {
            for &j in &words[a + 1..] {
                let (u, v) = (vector(i), vector(j));
                let dot: f32 = u.iter().zip(v).map(|(x, y)| x * y).sum();
                let norm = |w: &[f32]| w.iter().map(|x| x * x).sum::<f32>().sqrt();
                distances.push(1.0 - dot / (norm(u) * norm(v)));
            }
        }
        distances.iter().sum::<f32>() / distances.len() as f32
    };
    let official = spread(model.bert.forward(
        text.input_ids.clone(),
        Some(text.position_ids_tensor(&device)),
        text.self_attention.clone(),
    ));
    let with_cls = spread(model.bert.forward(
        text.input_ids.clone(),
        Some(text.position_ids_with_cls_tensor(&device)),
        text.self_attention_with_cls.clone(),
    ));
    eprintln!(
        "mean cosine distance between class names' first tokens: official masks {official:.5}, with [CLS] {with_cls:.3}"
    );
    assert!(official < 0.01, "{official}");
    assert!(with_cls > 0.3, "{with_cls}");
}

#[test]
fn tiny_model_matches_the_official_forward_pass() {
    let reference = reference("grounding_dino");
    let tensors = &reference["tensors"];
    let device = kiln_models::device::cpu();
    // The reference runs the official text masks; kiln's MiniLM presets let phrases see [CLS]
    // (see `frozen_minilm_tells_class_names_apart_only_with_cls_in_view`).
    let config = GroundingDinoConfig { phrases_see_cls: false, ..GroundingDinoConfig::tiny_minilm() };
    let (model, tokenizer) = reference_model(&config, &device);
    let caption = reference["caption"].as_str().unwrap();
    let encoded = tokenizer.encode(caption).unwrap();
    let text = TextBatch::new(&[&encoded], &tokenizer.special_ids, config.max_text_len, &device);

    let hidden = model.bert.forward(
        text.input_ids.clone(),
        Some(text.position_ids_tensor(&device)),
        text.self_attention.clone(),
    );
    assert_close("bert_hidden", hidden, read_tensor(&tensors["bert_hidden"], &device));
    assert_close("encoded_text", model.encode_text(&text), read_tensor(&tensors["encoded_text"], &device));

    let pixels: Tensor<4> = read_tensor(&tensors["image"], &device);
    let [_, _, h, w] = pixels.dims();
    let features = model.backbone.forward(pixels.clone());
    for (level, feature) in features.iter().enumerate() {
        assert_close(
            &format!("backbone_{level}"),
            feature.clone(),
            read_tensor(&tensors[format!("backbone_{level}")], &device),
        );
    }
    for (level, (conv, norm)) in model.input_proj.iter().enumerate() {
        let source = norm.forward(conv.forward(features[level.min(2)].clone()));
        let [_, _, lh, lw] = source.dims();
        assert_close(&format!("srcs_{level}"), source, read_tensor(&tensors[format!("srcs_{level}")], &device));
        let position = image_position_embedding(&[vec![false; lh * lw]], lh, lw, config.hidden_dim / 2, 20.0, &device);
        assert_close(&format!("pos_{level}"), position, read_tensor(&tensors[format!("pos_{level}")], &device));
    }

    let out = model.forward(&ImageBatch { pixels, sizes: vec![(h, w)] }, &text);
    assert_close("memory", out.memory.clone(), read_tensor(&tensors["memory"], &device));
    assert_close("memory_text", out.memory_text.clone(), read_tensor(&tensors["memory_text"], &device));
    let selected = out.selected.clone().into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
    assert_eq!(selected, ints(&reference["topk_indices"]), "selected queries (top-k order)");
    assert_close("interm_logits", out.encoder.logits.clone(), read_tensor(&tensors["interm_logits"], &device));
    assert_close("interm_boxes", out.encoder.boxes.clone(), read_tensor(&tensors["interm_boxes"], &device));
    assert_eq!(out.layers.len(), 2);
    for (l, layer) in out.layers.iter().enumerate() {
        assert_close(
            &format!("logits_{l}"),
            layer.logits.clone(),
            read_tensor(&tensors[format!("logits_{l}")], &device),
        );
        assert_close(&format!("boxes_{l}"), layer.boxes.clone(), read_tensor(&tensors[format!("boxes_{l}")], &device));
    }
    assert_close("pred_logits", out.prediction().logits.clone(), read_tensor(&tensors["pred_logits"], &device));
    assert_close("pred_boxes", out.prediction().boxes.clone(), read_tensor(&tensors["pred_boxes"], &device));
}

#[test]
fn swint_ogc_parameters_are_the_official_checkpoint_keys() {
    let inventory: Value =
        serde_json::from_slice(&std::fs::read(fixture("grounding_dino").join("swint_ogc_keys.json")).unwrap()).unwrap();
    let entries = inventory["keys"].as_array().expect("key list");
    let layout = GroundingDino::checkpoint_layout();
    let mut expected: Vec<(String, Vec<usize>)> = entries
        .iter()
        .filter(|e| e[2].as_str() == Some("float32"))
        .map(|e| {
            let shape = e[1].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (e[0].as_str().unwrap().to_string(), shape)
        })
        // The one shared box head is stored once per decoder layer and again under the decoder;
        // kiln's single `bbox_embed` maps onto `bbox_embed.0`.
        .filter(|(key, _)| {
            let copy = key.starts_with("module.transformer.decoder.bbox_embed.")
                || (key.starts_with("module.bbox_embed.") && !key.starts_with("module.bbox_embed.0."));
            !copy
        })
        .collect();
    let device = kiln_models::device::cpu();
    let model = GroundingDinoConfig::swint_ogc().init(&device);
    let mut ours = layout.official_inventory(&model);
    expected.sort();
    ours.sort();
    let missing: Vec<_> = expected.iter().filter(|e| !ours.contains(e)).take(10).collect();
    let extra: Vec<_> = ours.iter().filter(|o| !expected.contains(o)).take(10).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "official keys kiln lacks: {missing:?}; kiln keys not official: {extra:?}"
    );
    assert_eq!(ours.len(), expected.len());
    assert_eq!(kiln_models::parameter_count(&model), inventory["float_parameters_unique"].as_u64().unwrap() as usize);
}

#[test]
fn minilm_sentence_embeddings_match_sentence_transformers() {
    let reference = reference("minilm");
    let device = kiln_models::device::cpu();
    let dir = minilm_dir();
    let config = BertConfig::from_hf_json(&dir.join("config.json")).unwrap();
    assert_eq!(config, BertConfig::all_minilm_l6_v2());
    let bert = BertModel::load(&config, &dir.join("model.safetensors"), &device).unwrap();
    let tokenizer = CaptionTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let sentences = reference["sentences"].as_array().unwrap();
    assert!(sentences.len() >= 12);
    for case in sentences {
        let sentence = case["sentence"].as_str().unwrap();
        let encoded = tokenizer.encode(sentence).unwrap();
        let ids: Vec<i64> = encoded.ids.iter().map(|&i| i as i64).collect();
        assert_eq!(ids, ints(&case["input_ids"]), "{sentence:?}: token ids");
        let n = ids.len();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(vec![true; n], [1, n]), &device);
        let got = bert.sentence_embedding(input, mask).into_data().try_to_vec::<f32>().unwrap();
        let want: Vec<f32> = case["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4, "{sentence:?}: embedding differs by {worst}");
    }
}

/// The assignment of least total cost by trying every injective map (small sizes only).
fn brute_force(cost: &[f64], rows: usize, cols: usize) -> f64 {
    fn go(row: usize, rows: usize, cols: usize, used: &mut Vec<bool>, cost: &[f64]) -> f64 {
        if row == rows {
            return 0.0;
        }
        let mut best = f64::INFINITY;
        for c in 0..cols {
            if !used[c] {
                used[c] = true;
                best = best.min(cost[row * cols + c] + go(row + 1, rows, cols, used, cost));
                used[c] = false;
            }
        }
        best
    }
    go(0, rows, cols, &mut vec![false; cols], cost)
}

#[test]
fn hungarian_matching_is_optimal() {
    use kiln_training::teacher::grounding_loss::hungarian;
    let mut state = 12345u64;
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as f64 / (1u64 << 31) as f64
    };
    for (rows, cols) in [(1, 1), (1, 5), (3, 3), (3, 7), (5, 8), (6, 6), (4, 9)] {
        for _ in 0..20 {
            let cost: Vec<f64> = (0..rows * cols).map(|_| next() * 10.0 - 3.0).collect();
            let assignment = hungarian(&cost, rows, cols);
            let mut seen = assignment.clone();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), rows, "columns are distinct");
            let total: f64 = assignment.iter().enumerate().map(|(r, &c)| cost[r * cols + c]).sum();
            let best = brute_force(&cost, rows, cols);
            assert!((total - best).abs() < 1e-9, "{rows}x{cols}: {total} vs optimum {best}");
        }
    }
}

#[test]
fn set_loss_matches_its_formula() {
    use kiln_training::teacher::grounding_loss::{GroundingLossConfig, GroundingTarget, giou, head_loss};
    let device = kiln_models::device::cpu();
    let config = GroundingLossConfig::default();
    // 3 queries, 4 tokens (the last is padding); two ground truths on tokens {1} and {2}.
    let logits = vec![
        0.5f32,
        2.0,
        -1.0,
        f32::NEG_INFINITY,
        -0.3,
        -2.0,
        1.5,
        f32::NEG_INFINITY,
        0.1,
        0.2,
        0.3,
        f32::NEG_INFINITY,
    ];
    let boxes = vec![0.30f32, 0.30, 0.20, 0.20, 0.70, 0.60, 0.30, 0.20, 0.5, 0.5, 0.9, 0.9];
    let target = GroundingTarget {
        boxes: vec![[0.32, 0.28, 0.22, 0.18], [0.68, 0.62, 0.28, 0.24]],
        tokens: vec![vec![1], vec![2]],
    };
    let mask = Tensor::<2, Bool>::from_data(TensorData::new(vec![true, true, true, false], [1, 4]), &device);
    let (total, parts) = head_loss(
        &config,
        Tensor::from_data(TensorData::new(logits.clone(), [1, 3, 4]), &device),
        Tensor::from_data(TensorData::new(boxes.clone(), [1, 3, 4]), &device),
        mask,
        std::slice::from_ref(&target),
    )
    .unwrap();
    // Query 0 fits ground truth 0 and query 1 ground truth 1 on every term: the matching is (0, 1).
    let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
    let focal = |x: f32, t: f32| {
        let p = sigmoid(x);
        let ce = -(t * p.ln() + (1.0 - t) * (1.0 - p).ln());
        let p_t = p * t + (1.0 - p) * (1.0 - t);
        let a = 0.25 * t + 0.75 * (1.0 - t);
        a * ce * (1.0 - p_t).powi(2)
    };
    let mut class = 0.0;
    for q in 0..3 {
        for k in 0..3 {
            let t = match (q, k) {
                (0, 1) | (1, 2) => 1.0,
                _ => 0.0,
            };
            class += focal(logits[q * 4 + k], t);
        }
    }
    let class = 2.0 * class / 2.0;
    let l1: f32 =
        (0..4).map(|k| (boxes[k] - target.boxes[0][k]).abs() + (boxes[4 + k] - target.boxes[1][k]).abs()).sum();
    let corners = |b: &[f32]| [b[0] - b[2] / 2.0, b[1] - b[3] / 2.0, b[0] + b[2] / 2.0, b[1] + b[3] / 2.0];
    let g = (1.0 - giou(corners(&boxes[0..4]), corners(&target.boxes[0])))
        + (1.0 - giou(corners(&boxes[4..8]), corners(&target.boxes[1])));
    let expected = [class, 5.0 * l1 / 2.0, 2.0 * g / 2.0];
    for (name, got, want) in
        [("class", parts.class, expected[0]), ("l1", parts.bbox, expected[1]), ("giou", parts.giou, expected[2])]
    {
        assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{name}: {got} vs {want}");
    }
    let total = total.into_scalar::<f32>();
    assert!((total - expected.iter().sum::<f32>()).abs() < 1e-4, "total {total}");
}
