//! Helpers shared by kiln's cross-crate tests: where the shared real data is, scratch directories.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the repository").to_path_buf()
}

/// `../shared` beside the repository (real data and weights; see its README). Tests that need it
/// fail loudly when it is missing rather than passing without checking anything.
pub fn shared_dir() -> PathBuf {
    let dir = std::env::var_os("KILN_SHARED").map(PathBuf::from).unwrap_or_else(|| repo_root().join("../shared"));
    assert!(
        dir.join("data/coco8-seg/annotations.json").is_file(),
        "this test needs the shared test data at {} (data/coco8-seg); set KILN_SHARED to its location",
        dir.display()
    );
    dir
}

pub fn coco8_dir() -> PathBuf {
    shared_dir().join("data/coco8-seg")
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// A fresh, empty scratch directory under the system temp dir, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kiln-test-{name}-{}-{unique}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
