//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through Burn's native
//! reparameterisation (`Module::apply_lora`), shared by every teacher: adapters on the Linear layers
//! whose module names match the configured targets (like PEFT's `target_modules`), every other
//! parameter frozen, adapter-only files (`adapter_model.safetensors` + `adapter_config.json`) that
//! name the base they belong to, and merging for inference (`materialize`).

use std::path::{Path, PathBuf};

use burn::module::{Lora, Module, ModuleMapper, ModuleVisitor, Param, ParamGroup};
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::{FloatDType, Tensor, TensorData};
use serde::{Deserialize, Serialize};

pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("LoRA targets {targets:?} match no Linear layer of {model}; its Linear layers include: {examples}")]
    NoTarget { targets: Vec<String>, model: String, examples: String },
    #[error("LoRA rank must be at least 1")]
    Rank,
    #[error(
        "lora_dropout {0} is not supported: Burn's native LoRA adds its low-rank update to the weight, so there is no separate adapter input to drop; set lora_dropout to 0"
    )]
    Dropout(f64),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error(
        "{path}: this adapter was trained on {adapter_base} (weights {adapter_hash}), not on the base given ({base} weights {base_hash}); pass the base it names"
    )]
    WrongBase { path: PathBuf, adapter_base: String, adapter_hash: String, base: String, base_hash: String },
}

/// What to adapt and how; saved as `adapter_config.json` (PEFT's field names where they exist).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    #[serde(rename = "r")]
    pub rank: usize,
    #[serde(rename = "lora_alpha")]
    pub alpha: f64,
    /// PEFT's dropout on the adapter's input. Burn's native LoRA adapts the weight itself
    /// (`W + alpha/r * A B`), so the adapter path never sees the input on its own: only 0 is
    /// accepted (the field is kept so PEFT configs read as they are).
    #[serde(rename = "lora_dropout", default)]
    pub dropout: f64,
    /// Module-name patterns: a Linear layer is adapted when its path ends with one of them
    /// (`qkv` matches `image_encoder.blocks.3.attn.qkv`; `attn.qkv` is stricter).
    pub target_modules: Vec<String>,
}

/// The adapter file's header: the LoRA settings and the base they apply to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(flatten)]
    pub lora: LoraConfig,
    /// The base model's name (`sam/tiny`, `sam/vit_b`, ...).
    pub base_model_name_or_path: String,
    /// SHA-256 of the base weights the adapter was trained on (of the file, or "random-init:<seed>").
    pub base_weights_hash: String,
    pub kiln_version: String,
}

/// Parameter counts after LoRA is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraSummary {
    /// Paths of the adapted weights.
    pub adapted: Vec<String>,
    pub trainable: usize,
    pub total: usize,
}

impl LoraSummary {
    pub fn render(&self) -> String {
        format!(
            "LoRA on {} layers: {} trainable of {} parameters ({:.2} %)",
            self.adapted.len(),
            self.trainable,
            self.total,
            100.0 * self.trainable as f64 / self.total.max(1) as f64
        )
    }
}

/// Every float parameter's path and size, adapter factors included (`<weight>.lora.{a,b}`).
pub fn parameter_paths<M: Module>(model: &M) -> Vec<(String, usize)> {
    struct Paths {
        path: Vec<String>,
        found: Vec<(String, usize)>,
    }
    impl ModuleVisitor for Paths {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            // Enum variants are not part of the official names.
            if !container_type.starts_with("Enum:") {
                self.path.push(name.to_string());
            }
        }
        fn exit_module(&mut self, _name: &str, container_type: &str) {
            if !container_type.starts_with("Enum:") {
                self.path.pop();
            }
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.found.push((self.path.join("."), param.lazy_shape().num_elements()));
        }
    }
    let mut paths = Paths { path: Vec::new(), found: Vec::new() };
    model.visit(&mut paths);
    paths.found
}

/// Every `Linear` layer's weight as (official path, Burn path; they differ by enum variant names):
/// the only 2-D weights LoRA adapts here (embeddings and position tables are 2-D too, but are not
/// projections).
pub fn linear_weight_paths<M: Module>(model: &M) -> Vec<(String, String)> {
    struct Linears {
        path: Vec<(String, String)>,
        found: Vec<(String, String)>,
    }
    impl ModuleVisitor for Linears {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.push((name.to_string(), container_type.to_string()));
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<D>>) {
            let n = self.path.len();
            // `enter_module` names a field together with the type that holds it.
            if D == 2 && n >= 1 && self.path[n - 1] == ("weight".to_string(), "Struct:Linear".to_string()) {
                let official: Vec<&str> = self
                    .path
                    .iter()
                    .filter(|(_, kind)| !kind.starts_with("Enum:"))
                    .map(|(name, _)| name.as_str())
                    .collect();
                let burn: Vec<&str> = self.path.iter().map(|(name, _)| name.as_str()).collect();
                self.found.push((official.join("."), burn.join(".")));
            }
        }
    }
    let mut linears = Linears { path: Vec::new(), found: Vec::new() };
    model.visit(&mut linears);
    linears.found
}

fn is_adapter(path: &str) -> bool {
    path.contains(".lora.")
}

/// The (official, Burn) weight paths `targets` select: `<module>.weight` whose module path ends
/// with a target.
fn selected(paths: &[(String, String)], targets: &[String]) -> Vec<(String, String)> {
    paths
        .iter()
        .filter(|(official, _)| {
            let module = official.strip_suffix(".weight").unwrap_or(official);
            targets.iter().any(|t| module == t || module.ends_with(&format!(".{t}")))
        })
        .cloned()
        .collect()
}

/// Attaches LoRA adapters to the Linear weights `config` targets and freezes everything else. The
/// `A` factors are drawn from `seed` on the host (see [`draw_factors`]), the `B` factors are zero.
pub fn apply<M: Module>(
    model: M,
    config: &LoraConfig,
    model_name: &str,
    seed: u64,
) -> Result<(M, LoraSummary), LoraError> {
    if config.rank == 0 {
        return Err(LoraError::Rank);
    }
    if config.dropout != 0.0 {
        return Err(LoraError::Dropout(config.dropout));
    }
    let linear_weights = linear_weight_paths(&model);
    let selection = selected(&linear_weights, &config.target_modules);
    if selection.is_empty() {
        let mut modules: Vec<String> =
            linear_weights.iter().filter_map(|(p, _)| p.strip_suffix(".weight")).map(str::to_string).collect();
        modules.dedup();
        let examples = modules.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
        return Err(LoraError::NoTarget {
            targets: config.target_modules.clone(),
            model: model_name.to_string(),
            examples,
        });
    }
    let burn_paths: Vec<String> = selection.iter().map(|(_, burn)| burn.clone()).collect();
    let adapted: Vec<String> = selection.into_iter().map(|(official, _)| official).collect();
    let model =
        model.apply_lora(Lora::new(config.rank, config.alpha).set_param_group(ParamGroup::from_paths(burn_paths)));
    let model = draw_factors(model, config.rank, seed);
    let paths = parameter_paths(&model);
    let attached = paths.iter().filter(|(p, _)| p.ends_with(".lora.a")).count();
    assert_eq!(attached, adapted.len(), "LoRA attached to {attached} of the {} selected weights", adapted.len());
    let trainable = paths.iter().filter(|(p, _)| is_adapter(p)).map(|(_, n)| n).sum();
    let total = paths.iter().map(|(_, n)| n).sum();
    Ok((model, LoraSummary { adapted, trainable, total }))
}

/// Redraws every adapter's `A` factor from `seed` with kiln's host generator: N(0, 1/rank²) as
/// Burn draws it (`init_std` 1/rank), each factor from its own stream named by its path. Burn's
/// own draw comes from the device's generator, which differs between backends (flex, LibTorch,
/// CubeCL), so the same seed would start a different adapter on each device; drawn here, a run
/// starts from the same adapter whatever the device (and a LibTorch or GPU run can be checked
/// against flex's).
pub fn draw_factors<M: Module>(model: M, rank: usize, seed: u64) -> M {
    struct Draw {
        path: Vec<String>,
        seed: u64,
        std: f64,
    }
    impl ModuleMapper for Draw {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            if !container_type.starts_with("Enum:") {
                self.path.push(name.to_string());
            }
        }
        fn exit_module(&mut self, _name: &str, container_type: &str) {
            if !container_type.starts_with("Enum:") {
                self.path.pop();
            }
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let path = self.path.join(".");
            if !path.ends_with(".lora.a") {
                return param;
            }
            // FNV-1a of the path: the stream of this factor, stable across runs and builds.
            let stream =
                path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
            let mut rng = kiln_data::rng::SeededRng::new(self.seed).fork(stream);
            let std = self.std;
            param.map(|tensor| {
                let (shape, device, trains) = (tensor.shape(), tensor.device(), tensor.is_require_grad());
                let dtype = FloatDType::from(tensor.dtype());
                let values: Vec<f32> = (0..shape.num_elements()).map(|_| (rng.normal() * std) as f32).collect();
                Tensor::<D>::from_data(TensorData::new(values, shape), &device).cast(dtype).set_require_grad(trains)
            })
        }
    }
    model.map(&mut Draw { path: Vec::new(), seed, std: 1.0 / rank as f64 })
}

/// Writes `adapter_model.safetensors` (the adapter factors only) and `adapter_config.json` into
/// `dir`. Both are written beside their destination first and renamed into place only when both
/// are complete, so a failure leaves no half-saved adapter.
pub fn save_adapter<M: Module>(model: &M, dir: &Path, config: &AdapterConfig) -> Result<(), LoraError> {
    let file_error = |path: &Path, message: String| LoraError::File { path: path.to_path_buf(), message };
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, format!("cannot create the directory: {e}")))?;
    let staged = |name: &str| dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let (weights_staging, config_staging) = (staged(ADAPTER_WEIGHTS), staged(ADAPTER_CONFIG));
    let result = (|| {
        let mut store = SafetensorsStore::from_file(&weights_staging)
            .skip_enum_variants(true)
            .with_regex(r"\.lora\.")
            .metadata("kiln.adapter", serde_json::to_string(config).expect("serialisable"));
        model.save_into(&mut store).map_err(|e| file_error(&dir.join(ADAPTER_WEIGHTS), e.to_string()))?;
        drop(store);
        let text = serde_json::to_string_pretty(config).expect("serialisable");
        std::fs::write(&config_staging, text).map_err(|e| file_error(&dir.join(ADAPTER_CONFIG), e.to_string()))?;
        for (staging, name) in [(&weights_staging, ADAPTER_WEIGHTS), (&config_staging, ADAPTER_CONFIG)] {
            kiln_data::io::fault_point(&dir.join(name)).map_err(|e| file_error(&dir.join(name), e.to_string()))?;
            std::fs::rename(staging, dir.join(name)).map_err(|e| file_error(&dir.join(name), e.to_string()))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&weights_staging);
        let _ = std::fs::remove_file(&config_staging);
    }
    result
}

pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig, LoraError> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read(&path)
        .map_err(|e| LoraError::File { path: path.clone(), message: format!("cannot read: {e}") })?;
    serde_json::from_slice(&text).map_err(|e| LoraError::File { path, message: format!("not an adapter config: {e}") })
}

/// Applies the adapter in `dir` to `base` (the base it was trained on, checked by hash): the
/// adapted model, ready to train on or to merge.
pub fn load_adapter<M: Module>(
    base: M,
    dir: &Path,
    base_name: &str,
    base_hash: &str,
) -> Result<(M, AdapterConfig), LoraError> {
    let config = read_adapter_config(dir)?;
    if config.base_weights_hash != base_hash || config.base_model_name_or_path != base_name {
        return Err(LoraError::WrongBase {
            path: dir.join(ADAPTER_CONFIG),
            adapter_base: config.base_model_name_or_path.clone(),
            adapter_hash: config.base_weights_hash.clone(),
            base: base_name.to_string(),
            base_hash: base_hash.to_string(),
        });
    }
    // The factors are about to be overwritten: any seed.
    let (mut model, summary) = apply(base, &config.lora, base_name, 0)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    if !path.is_file() {
        return Err(LoraError::File { path, message: "no such file".into() });
    }
    // Half-precision factors become float32 on the host (devices without shader f16 load them too).
    let mut store = SafetensorsStore::from_file(&path)
        .with_from_adapter(crate::weights::HostFloat32)
        .skip_enum_variants(true)
        .allow_partial(true)
        .validate(false);
    let result =
        model.load_from(&mut store).map_err(|e| LoraError::File { path: path.clone(), message: e.to_string() })?;
    let expected = 2 * summary.adapted.len();
    let missing: Vec<&String> = result.missing.iter().map(|(k, _)| k).filter(|k| is_adapter(k)).collect();
    if result.applied.len() != expected || !missing.is_empty() || !result.errors.is_empty() {
        return Err(LoraError::File {
            path,
            message: format!(
                "holds {} of the {expected} adapter tensors its config names (missing: {missing:?}; errors: {:?})",
                result.applied.len(),
                result.errors
            ),
        });
    }
    Ok((model, config))
}

/// Folds every adapter into its base weight (`W + alpha/r * A B`), for inference or export.
pub fn merge<M: Module>(model: M) -> M {
    model.materialize()
}

/// SHA-256 of a file, hex.
pub fn file_sha256(path: &Path) -> Result<String, LoraError> {
    use sha2::Digest;
    let error = |e: std::io::Error| LoraError::File { path: path.to_path_buf(), message: e.to_string() };
    // Streamed: official checkpoints reach 2.5 GB.
    let mut file = std::fs::File::open(path).map_err(error)?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(error)?;
    Ok(format!("{:x}", hasher.finalize()))
}
