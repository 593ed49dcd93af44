//! The fuzz targets on stable, as CI runs them: every input of the committed corpora
//! (`tests/fuzz/corpus/<target>/`: seeds, and each crash a fuzzer found, kept as a regression
//! test) goes through its target, then mutations of them for a fixed time per target
//! (`KILN_FUZZ_SECONDS`, default 3). Coverage-guided runs are cargo-fuzz's (`fuzz/run_all.sh`,
//! nightly). A panic fails the test and writes the input to the temporary directory, named in the
//! failure, to replay or add to the corpus.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TARGETS: [(&str, fn(&[u8])); 9] = [
    ("coco_json", kiln_data::fuzz::coco_json),
    ("rle", kiln_data::fuzz::rle),
    ("polygon", kiln_data::fuzz::polygon),
    ("yolo_labels", kiln_data::fuzz::yolo_labels),
    ("yolo_yaml", kiln_data::fuzz::yolo_yaml),
    ("image", kiln_data::fuzz::image),
    ("pytorch_checkpoint", kiln_models::fuzz::pytorch_checkpoint),
    ("safetensors_checkpoint", kiln_models::fuzz::safetensors_checkpoint),
    ("onnx_model", kiln_export::fuzz::onnx_model),
];

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = kiln_tests::repo_root().join("tests/fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

/// Runs `input` through `target`; a panic saves the input and fails naming it.
fn run_one(name: &str, target: fn(&[u8]), input: &[u8], origin: &str) {
    if std::panic::catch_unwind(|| target(input)).is_err() {
        let saved = std::env::temp_dir().join(format!("kiln-fuzz-crash-{name}-{}", std::process::id()));
        std::fs::write(&saved, input).unwrap();
        panic!("fuzz target {name} panicked on {origin}; the input is in {}", saved.display());
    }
}

/// A small xorshift generator: the mutations need spread, not quality.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// One of libFuzzer's simple mutations of `input` (another corpus input for splices).
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    const INTERESTING: [&[u8]; 10] =
        [b"0", b"-1", b"4294967295", b"1e308", b"NaN", b"\"", b"[", b"{", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00"];
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(6) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.below(256) as u8;
            }
            2 => out.insert(at, rng.below(256) as u8),
            3 if at < out.len() => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at..end);
            }
            4 => {
                let token = INTERESTING[rng.below(INTERESTING.len())];
                out.splice(at..at, token.iter().copied());
            }
            _ if !other.is_empty() => {
                let from = rng.below(other.len());
                let end = (from + 1 + rng.below(64)).min(other.len());
                out.splice(at..at, other[from..end].iter().copied());
            }
            _ => {}
        }
    }
    out
}

#[test]
fn every_fuzz_target_survives_its_corpus_and_mutations_of_it() {
    let seconds: f64 = std::env::var("KILN_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    // Panics are caught and reported with their input; the default hook's message would repeat.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| eprintln!("{info}")));
    let mut report = Vec::new();
    for (name, target) in TARGETS {
        let inputs = corpus(name);
        assert!(!inputs.is_empty(), "{name}: empty corpus");
        for (path, bytes) in &inputs {
            run_one(name, target, bytes, &path.display().to_string());
        }
        let mut rng = Rng(seed ^ name.len() as u64);
        let (started, mut runs) = (Instant::now(), 0u64);
        while started.elapsed() < Duration::from_secs_f64(seconds) {
            let (base, other) = (&inputs[rng.below(inputs.len())].1, &inputs[rng.below(inputs.len())].1);
            let input = mutate(&mut rng, base, other);
            run_one(name, target, &input, &format!("a mutation (seed {seed})"));
            runs += 1;
        }
        report.push(format!("{name}: {} corpus inputs, {runs} mutations", inputs.len()));
    }
    std::panic::set_hook(hook);
    eprintln!("{}", report.join("\n"));
}

#[test]
fn corpus_directories_match_the_targets() {
    let dir = kiln_tests::repo_root().join("tests/fuzz/corpus");
    let mut found: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    found.sort();
    let mut expected: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    expected.sort();
    assert_eq!(found, expected);
    let fuzz_targets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    for name in expected {
        assert!(fuzz_targets.join(format!("{name}.rs")).is_file(), "fuzz/fuzz_targets/{name}.rs");
    }
}

/// The checkpoint seeds are real checkpoints (a 2x2 linear layer as PyTorch zip-pickle and as
/// safetensors), so mutations start from inputs that reach the tensor loading, not only the header.
#[test]
fn the_checkpoint_seeds_load_as_a_linear_layer() {
    let corpus = kiln_tests::repo_root().join("tests/fuzz/corpus");
    for seed in ["pytorch_checkpoint/linear_2x2.pt", "safetensors_checkpoint/linear_2x2.safetensors"] {
        let model = burn::nn::LinearConfig::new(2, 2).init(&kiln_models::device::cpu());
        let loaded = kiln_models::weights::load_checkpoint(model, &corpus.join(seed), &[], "a 2x2 linear layer")
            .unwrap_or_else(|e| panic!("{seed}: {e}"));
        let weight: Vec<f32> = loaded.weight.val().into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        // PyTorch's [out, in] = [[1, 2], [3, 4]] is Burn's [in, out] = [[1, 3], [2, 4]].
        assert_eq!(weight, [1.0, 3.0, 2.0, 4.0], "{seed}");
    }
    let onnx = std::fs::read(corpus.join("onnx_model/conv_1x1.onnx")).unwrap();
    use onnx_ir::Message;
    let model = onnx_ir::ModelProto::parse_from_bytes(&onnx).unwrap();
    kiln_export::interpreter::Interpreter::new(model.graph.as_ref().unwrap(), &kiln_models::device::cpu()).unwrap();
}
