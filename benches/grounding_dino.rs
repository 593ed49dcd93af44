//! GroundingDINO on flex: the full forward pass of the official Swin-T OGC configuration (Swin-T,
//! BERT-base, 900 queries) at the official 800 x 1333 input with the caption "cat . dog ." (random
//! weights: speed does not depend on their values), and of the tiny config at 256 x 256. Baseline:
//! the same forward in PyTorch with the official code on this machine
//! (`benches/grounding_dino_baseline.py`; numbers in the README).
//!
//! `cargo bench -p kiln-benches --features models --bench grounding_dino`

use burn::tensor::{Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use kiln_models::grounding_dino::{CaptionTokenizer, GroundingDinoConfig, ImageBatch, TextBatch};

fn benches(c: &mut Criterion) {
    let device = Device::flex();
    let tokenizer = CaptionTokenizer::bert_base_uncased().expect("built-in tokenizer");
    let encoded = tokenizer.encode("cat . dog .").expect("tokenises");
    let text = TextBatch::new(&[&encoded], &tokenizer.special_ids, 256, &device);
    let mut group = c.benchmark_group("grounding_dino_forward");
    group.sample_size(10);
    for (name, config, (h, w)) in [
        ("tiny_256", GroundingDinoConfig::tiny(), (256, 256)),
        ("swint_ogc_800x1333", GroundingDinoConfig::swint_ogc(), (800, 1333)),
    ] {
        let model = config.init(&device);
        let images = ImageBatch {
            pixels: Tensor::random([1, 3, h, w], burn::tensor::Distribution::Normal(0.0, 1.0), &device),
            sizes: vec![(h, w)],
        };
        group.bench_function(name, |b| b.iter(|| model.forward(&images, &text).prediction().boxes.clone().into_data()));
    }
    group.finish();
}

criterion_group!(grounding_dino, benches);
criterion_main!(grounding_dino);
