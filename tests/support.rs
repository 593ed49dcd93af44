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

/// A Python that imports `onnxruntime` and `numpy`, for the tests that run kiln's ONNX files in
/// ONNX Runtime: `KILN_PYTHON` if set, else a virtual environment kiln keeps under
/// `$HOME/.cache/kiln/onnxruntime-venv`, created on first use (`python3 -m venv`, then
/// `pip install onnxruntime numpy` from PyPI). Fails loudly, saying what to install, when neither works.
pub fn onnxruntime_python() -> PathBuf {
    static PYTHON: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let found = PYTHON.get_or_init(|| {
        let imports = |python: &Path| {
            std::process::Command::new(python)
                .args(["-c", "import onnxruntime, numpy"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if let Some(python) = std::env::var_os("KILN_PYTHON").map(PathBuf::from) {
            return if imports(&python) {
                Ok(python)
            } else {
                Err(format!("KILN_PYTHON={} cannot import onnxruntime and numpy", python.display()))
            };
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let venv = home.join(".cache/kiln/onnxruntime-venv");
        let python = venv.join("bin/python");
        if imports(&python) {
            return Ok(python);
        }
        let run = |program: &Path, args: &[&str]| -> Result<(), String> {
            let output = std::process::Command::new(program)
                .args(args)
                .output()
                .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(format!("{} {args:?} failed: {}", program.display(), String::from_utf8_lossy(&output.stderr)))
            }
        };
        run(Path::new("python3"), &["-m", "venv", &venv.to_string_lossy()])?;
        run(&python, &["-m", "pip", "install", "--quiet", "onnxruntime", "numpy"])?;
        if imports(&python) { Ok(python) } else { Err("onnxruntime still not importable after install".into()) }
    });
    match found {
        Ok(python) => python.clone(),
        Err(why) => panic!(
            "this test runs ONNX Runtime through Python and found none: {why}. Install it \
             (`python3 -m venv DIR && DIR/bin/pip install onnxruntime numpy`) and set KILN_PYTHON=DIR/bin/python"
        ),
    }
}

/// Outputs of one ONNX Runtime session run, by output name: shape and values.
pub struct OnnxRun {
    pub outputs: Vec<(String, Vec<usize>, Vec<f32>)>,
    pub metadata: std::collections::BTreeMap<String, String>,
    pub input_names: Vec<String>,
}

/// Runs `model` in ONNX Runtime (CPU) on one float32 input (`shape`, row-major values) with the
/// kept script `tests/reference/onnx_runtime_run.py`.
pub fn run_onnxruntime(model: &Path, shape: &[usize], input: &[f32], scratch: &Path) -> OnnxRun {
    let input_file = scratch.join("ort_input.bin");
    let bytes: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&input_file, bytes).expect("write input");
    let out_dir = scratch.join("ort_out");
    let _ = std::fs::remove_dir_all(&out_dir);
    let shape_arg = shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
    let output = std::process::Command::new(onnxruntime_python())
        .arg(repo_root().join("tests/reference/onnx_runtime_run.py"))
        .args([model, &input_file, &out_dir])
        .arg(shape_arg)
        .output()
        .expect("run python");
    assert!(output.status.success(), "onnxruntime failed: {}", String::from_utf8_lossy(&output.stderr));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("outputs.json")).expect("outputs.json")).unwrap();
    let outputs = summary["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let name = o["name"].as_str().unwrap().to_string();
            let shape: Vec<usize> =
                o["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            let raw = std::fs::read(out_dir.join(o["file"].as_str().unwrap())).unwrap();
            let values = raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (name, shape, values)
        })
        .collect();
    let metadata = summary["metadata"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    let input_names = summary["inputs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    OnnxRun { outputs, metadata, input_names }
}

/// A `kiln synth` dataset in `dir/synth`, split as `kiln validate` does into `train.json` and
/// `val.json` (images in `dir/synth/images`).
pub fn synth_split(dir: &Path, options: &kiln_data::SynthOptions) -> (PathBuf, PathBuf) {
    let out = kiln_data::synthesize(options, &dir.join("synth"), &indicatif::ProgressBar::hidden()).unwrap();
    let parts = kiln_data::split(&out.dataset, &kiln_data::SplitOptions::default());
    let (train, val) = (dir.join("synth/train.json"), dir.join("synth/val.json"));
    out.dataset.subset(parts.part("train").unwrap()).save(&train).unwrap();
    out.dataset.subset(parts.part("val").unwrap()).save(&val).unwrap();
    (train, val)
}

/// A `kiln train-teacher` request on the CPU for a split written by [`synth_split`].
pub fn teacher_request(
    train: &Path,
    val: &Path,
    output: &Path,
    overrides: kiln_training::teacher::TeacherOverrides,
) -> kiln_training::teacher::TrainTeacherRequest {
    kiln_training::teacher::TrainTeacherRequest {
        train: train.to_path_buf(),
        val: val.to_path_buf(),
        images: Some(train.parent().unwrap().join("images")),
        output: output.to_path_buf(),
        resume: false,
        device_name: "cpu".into(),
        overrides,
        dry_run: false,
    }
}

/// Environment variables under which a process finds no GPU driver at all: the Vulkan loader
/// is pointed at a driver list that does not exist, and so is glvnd's EGL (OpenGL's route on
/// Linux). For tests of what a machine without drivers gets: an error, never a panic.
pub fn no_gpu_driver_environment() -> Vec<(&'static str, &'static str)> {
    let nowhere = "/nonexistent/kiln-test-no-driver.json";
    vec![("VK_ICD_FILENAMES", nowhere), ("VK_DRIVER_FILES", nowhere), ("__EGL_VENDOR_LIBRARY_FILENAMES", nowhere)]
}

/// Runs the test `name` of the current test binary again in a child process with `env`, for
/// tests of a process-wide state (the GPU driver seen, a device left failed). The child sees
/// `KILN_TEST_CHILD` set; the parent gets whether it passed, with its output.
pub fn run_test_in_child(name: &str, env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env("KILN_TEST_CHILD", "1")
        .envs(env.iter().copied())
        .output()
        .expect("run the test binary again")
}

/// Whether this process is the child of [`run_test_in_child`].
pub fn in_child_test() -> bool {
    std::env::var_os("KILN_TEST_CHILD").is_some()
}

/// The `dtype` of every tensor in a safetensors file's header.
pub fn safetensors_dtypes(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let length = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + length]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(key, _)| *key != "__metadata__")
        .map(|(_, tensor)| tensor["dtype"].as_str().unwrap().to_string())
        .collect()
}

/// Every tensor of a safetensors file by name: its dtype, shape and raw bytes (the header's order
/// and metadata left out, so two files holding the same tensors compare equal).
pub fn safetensors_tensors(path: &Path) -> std::collections::BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let length = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + length]).unwrap();
    let data = &bytes[8 + length..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(key, _)| *key != "__metadata__")
        .map(|(name, tensor)| {
            let offsets = &tensor["data_offsets"];
            let (start, end) = (offsets[0].as_u64().unwrap() as usize, offsets[1].as_u64().unwrap() as usize);
            let shape = tensor["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
            (name.clone(), (tensor["dtype"].as_str().unwrap().to_string(), shape, data[start..end].to_vec()))
        })
        .collect()
}

/// The float32 tensors of a training checkpoint (`checkpoint/model-N.bpk`, burn-train's burnpack
/// record of the whole model, adapters and frozen base alike) by name.
pub fn checkpoint_floats(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    use burn::store::ModuleStore;
    let mut store = burn::store::BurnpackStore::from_file(path);
    let tensors = store.get_all_tensors().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    tensors
        .iter()
        .filter(|(_, tensor)| tensor.dtype == burn::tensor::DType::F32)
        .map(|(name, tensor)| {
            let bytes = tensor.to_bytes().unwrap();
            let values = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (name.clone(), values)
        })
        .collect()
}

/// The largest absolute difference between two sets of named tensors holding the same names and
/// shapes, and the name where it is.
pub fn largest_difference(
    a: &std::collections::BTreeMap<String, Vec<f32>>,
    b: &std::collections::BTreeMap<String, Vec<f32>>,
) -> (f32, String) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "the same tensors");
    let mut largest = (0f32, String::new());
    for (name, x) in a {
        let y = &b[name];
        assert_eq!(x.len(), y.len(), "{name}");
        for (p, q) in x.iter().zip(y) {
            let difference = (p - q).abs();
            if difference.is_nan() || difference > largest.0 {
                largest = (if difference.is_nan() { f32::INFINITY } else { difference }, name.clone());
            }
        }
    }
    largest
}

/// How many values of two sets of named tensors (the same names and shapes) differ by more than
/// `tolerance`, out of how many.
pub fn count_differing(
    a: &std::collections::BTreeMap<String, Vec<f32>>,
    b: &std::collections::BTreeMap<String, Vec<f32>>,
    tolerance: f32,
) -> (usize, usize) {
    let mut differing = 0;
    let mut total = 0;
    for (name, x) in a {
        for (p, q) in x.iter().zip(&b[name]) {
            total += 1;
            if !((p - q).abs() <= tolerance) {
                differing += 1;
            }
        }
    }
    (differing, total)
}
