//! Writes the data bench's COCO file, so pycocotools can be timed on exactly the same input:
//! `cargo run --release -p kiln-benches --example write_large_coco -- /tmp/large.json`
//! then `python benches/pycocotools_baseline.py /tmp/large.json`.

fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| "large_coco.json".into());
    let dataset = kiln_benches::large_coco(20_000, 200_000, 1);
    // Compact, as the bench parses it.
    let bytes = serde_json::to_vec(&dataset).expect("serialisable");
    kiln_data::io::write_atomic(std::path::Path::new(&path), &bytes).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1)
    });
    println!("wrote {path}: {} images, {} annotations", dataset.images.len(), dataset.annotations.len());
}
