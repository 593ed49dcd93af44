//! Fuzz targets of the checkpoint readers (untrusted downloads): a PyTorch `.pt`/`.pth` (zip +
//! pickle, read without executing anything) or a safetensors file, loaded as kiln loads weights
//! into a 2x2 linear layer. Any input must end in `Ok` or `Err`, without a panic or unbounded
//! memory. Run by cargo-fuzz (`fuzz/`) and on stable by `tests/fuzz.rs`.

use std::path::PathBuf;

/// A `.pt` checkpoint's bytes.
pub fn pytorch_checkpoint(data: &[u8]) {
    load(data, "pt");
}

/// A `.safetensors` checkpoint's bytes.
pub fn safetensors_checkpoint(data: &[u8]) {
    load(data, "safetensors");
}

fn load(data: &[u8], extension: &str) {
    // The readers take a path: one scratch file per thread.
    let path: PathBuf = std::env::temp_dir().join(format!(
        "kiln-fuzz-{}-{:?}.{extension}",
        std::process::id(),
        std::thread::current().id()
    ));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let device = crate::device::cpu();
    let model = burn::nn::LinearConfig::new(2, 2).init(&device);
    let _ = crate::weights::load_checkpoint(model, &path, &[], "a 2x2 linear layer");
    let _ = crate::weights::read_safetensors_metadata(&path);
    let _ = std::fs::remove_file(&path);
}
