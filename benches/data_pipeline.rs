//! Load + inspect + repair + split of a COCO file with 20k images and 200k polygon annotations
//! (no bbox/area). Goal: faster than pycocotools doing load + area/bbox on the same file
//! (`benches/pycocotools_baseline.py`; numbers in the README).

use criterion::{Criterion, criterion_group, criterion_main};
use kiln_data::{CocoDataset, SplitOptions, inspect, repair, split};
use std::hint::black_box;
use std::path::Path;

fn pipeline(c: &mut Criterion) {
    let bytes = serde_json::to_vec(&kiln_benches::large_coco(20_000, 200_000, 1)).unwrap();
    let mut group = c.benchmark_group("data");
    group.sample_size(10);
    group.bench_function("load_inspect_repair_split_20k_images_200k_polygons", |b| {
        b.iter(|| {
            let mut dataset = CocoDataset::from_slice(black_box(&bytes), Path::new("bench.json")).unwrap();
            let summary = inspect(&dataset);
            let repaired = repair(&mut dataset);
            let parts = split(&dataset, &SplitOptions::default());
            black_box((summary, repaired, parts))
        })
    });
    let dataset = CocoDataset::from_slice(&bytes, Path::new("bench.json")).unwrap();
    group.bench_function("load_only", |b| {
        b.iter(|| black_box(CocoDataset::from_slice(black_box(&bytes), Path::new("bench.json")).unwrap()))
    });
    group.bench_function("repair_only", |b| {
        b.iter_batched(|| dataset.clone(), |mut d| black_box(repair(&mut d)), criterion::BatchSize::LargeInput)
    });
    group.bench_function("split_only", |b| b.iter(|| black_box(split(&dataset, &SplitOptions::default()))));
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
