//! Loading official checkpoints into kiln's modules through burn-store, shared by every model:
//! key remapping from the official names, float32 on load (converted on the host, so half-precision
//! files load on devices without shader f16), and a refusal, with the full list of
//! missing, unexpected and mis-shaped keys, for any checkpoint that does not fit exactly.

use std::fmt;
use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
use burn::store::{
    ApplyError, ModuleAdapter, ModuleContext, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, PytorchStore,
    SafetensorsStore,
};
use burn::tensor::TensorData;
use burn::tensor::{DType, Tensor};

/// Keys of the checkpoint that no module parameter stands for by design (BatchNorm's counter).
const IGNORED_SUFFIXES: &[&str] = &["num_batches_tracked"];

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: cannot read the checkpoint: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: {report}")]
    Mismatch { path: PathBuf, report: MismatchReport },
    #[error("{path}: cannot write the weights: {message}")]
    Write { path: PathBuf, message: String },
}

/// What did not fit, key by key.
#[derive(Debug, Default)]
pub struct MismatchReport {
    pub expected_model: String,
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    pub mis_shaped: Vec<String>,
}

impl fmt::Display for MismatchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "this checkpoint does not fit {} (wrong scale, task or class count?): {} missing, {} unexpected, {} mis-shaped keys",
            self.expected_model,
            self.missing.len(),
            self.unexpected.len(),
            self.mis_shaped.len()
        )?;
        for (title, keys) in
            [("missing", &self.missing), ("unexpected", &self.unexpected), ("mis-shaped", &self.mis_shaped)]
        {
            if !keys.is_empty() {
                let shown: Vec<&str> = keys.iter().take(12).map(String::as_str).collect();
                let more = if keys.len() > shown.len() {
                    format!(" (+{} more)", keys.len() - shown.len())
                } else {
                    String::new()
                };
                writeln!(f, "  {title}: {}{more}", shown.join(", "))?;
            }
        }
        Ok(())
    }
}

/// How a checkpoint's keys relate to kiln's parameter paths beyond identical names.
#[derive(Debug, Clone, Default)]
pub struct CheckpointLayout {
    /// (official fragment, kiln fragment) pairs, applied in order; a fragment written with a leading
    /// `^` is a prefix (`("^module.", "")`, `("^backbone.0.", "backbone.")`), any other is replaced
    /// wherever it occurs (`(".attention.self.", ".attention.self_attn.")`).
    pub renames: Vec<(String, String)>,
    /// The state dict sits under this top-level key of a `.pth` (`{"model": …}`).
    pub top_level_key: Option<String>,
    /// Regexes over the renamed keys of checkpoint entries that kiln deliberately does not load
    /// (recomputed buffers, shared copies of one module, leftovers of training).
    pub ignored: Vec<String>,
    /// Module paths that may be absent from the file because another file provides them.
    pub provided_elsewhere: Vec<String>,
    /// Names of tensors the official module keeps as buffers, not parameters, beyond BatchNorm's
    /// running statistics (SAM's `positional_encoding_gaussian_matrix`): not counted as parameters.
    pub buffers: Vec<String>,
}

/// A model whose parameters map onto an official checkpoint by its [`CheckpointLayout`].
pub trait OfficialCheckpoint {
    fn checkpoint_layout() -> CheckpointLayout;
}

impl CheckpointLayout {
    /// Official prefix → module prefix pairs, e.g. `("model.22.", "head.")`.
    pub fn prefixes(prefixes: &[(String, String)]) -> Self {
        Self { renames: prefixes.iter().map(|(o, k)| (format!("^{o}"), k.clone())).collect(), ..Default::default() }
    }

    /// A module path as the checkpoint names it (the renames undone; Burn's norms call
    /// `weight`/`bias` `gamma`/`beta`).
    pub fn official_name(&self, key: &str) -> String {
        let mut key = key.to_string();
        for (_, _, ours, official) in self.rules().iter().rev() {
            if ours == "^" {
                key = format!("{official}{key}");
            } else if let Ok(re) = regex::Regex::new(ours) {
                key = re.replace_all(&key, regex::NoExpand(official)).into_owned();
            }
        }
        match (key.strip_suffix(".gamma"), key.strip_suffix(".beta")) {
            (Some(stem), _) => format!("{stem}.weight"),
            (_, Some(stem)) => format!("{stem}.bias"),
            _ => key,
        }
    }

    /// Every parameter of `model` as `(official key, PyTorch shape)`.
    pub fn official_inventory<M: Module>(&self, model: &M) -> Vec<(String, Vec<usize>)> {
        model
            .collect(None, Some(Box::new(burn::store::BurnToPyTorchAdapter)), true)
            .into_iter()
            .map(|t| (self.official_name(&t.name), t.shape.iter().map(|&d| d as usize).collect()))
            .collect()
    }

    fn rules(&self) -> Vec<(String, String, String, String)> {
        // (official regex, kiln replacement, kiln regex, official replacement)
        self.renames
            .iter()
            .map(|(official, ours)| {
                let (anchor, official) = match official.strip_prefix('^') {
                    Some(rest) => ("^", rest),
                    None => ("", official.as_str()),
                };
                (
                    format!("{anchor}{}", regex_escape(official)),
                    ours.clone(),
                    format!("{anchor}{}", regex_escape(ours)),
                    official.to_string(),
                )
            })
            .collect()
    }
}

/// Loads `path` (`.pt`/`.pth` state dict, or `.safetensors`) into `model`. `prefixes` lists
/// (official key prefix, module path prefix) pairs, e.g. `("model.22.", "head.")`; the load is all
/// or nothing: any missing, unexpected or mis-shaped key is an error (named as in the checkpoint)
/// and `model` is not returned.
pub fn load_checkpoint<M: Module>(
    model: M,
    path: &Path,
    prefixes: &[(String, String)],
    expected_model: &str,
) -> Result<M, WeightsError> {
    load_checkpoint_with(model, path, &CheckpointLayout::prefixes(prefixes), expected_model)
}

/// [`load_checkpoint`] for a checkpoint described by a [`CheckpointLayout`].
pub fn load_checkpoint_with<M: Module>(
    model: M,
    path: &Path,
    layout: &CheckpointLayout,
    expected_model: &str,
) -> Result<M, WeightsError> {
    let mut model = model;
    let rules = layout.rules();
    let ignored: Vec<regex::Regex> = layout
        .ignored
        .iter()
        .map(|r| regex::Regex::new(r).expect("kiln's ignore patterns are valid regexes"))
        .collect();
    let official_name = |key: &str| layout.official_name(key);
    let read_error = |message: String| WeightsError::Read { path: path.to_path_buf(), message };
    if !path.is_file() {
        return Err(read_error("no such file".into()));
    }
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    // Every float tensor becomes float32 on the host, as it is read: a half-precision checkpoint
    // then loads on any device, including GPUs without shader f16 (OpenGL, WebGPU without the
    // feature, older mobile parts), where a cast on the device would fail.
    let to_burn = || PyTorchToBurnAdapter.chain(HostFloat32);
    let result = if is_safetensors {
        // Enum variants are not part of the official names (PytorchStore skips them by default).
        let mut store = SafetensorsStore::from_file(path)
            .with_from_adapter(to_burn())
            .skip_enum_variants(true)
            .allow_partial(true)
            .validate(false);
        for (from, to, _, _) in &rules {
            store = store.with_key_remapping(from, to.clone());
        }
        model.load_from(&mut store).map_err(|e| read_error(e.to_string()))?
    } else {
        let mut store = PytorchStore::from_file(path).allow_partial(true).validate(false).map_indices_contiguous(false);
        if let Some(key) = &layout.top_level_key {
            store = store.with_top_level_key(key.clone());
        }
        for (from, to, _, _) in &rules {
            store = store.with_key_remapping(from, to.clone());
        }
        // PytorchStore's own `load_from` always converts with PyTorchToBurnAdapter alone; kiln
        // applies its tensors with the float32 conversion added.
        let tensors = store.get_all_tensors().map_err(|e| read_error(e.to_string()))?.values().cloned().collect();
        model.apply(tensors, None, Some(Box::new(to_burn())), true)
    };

    let mut report = MismatchReport { expected_model: expected_model.to_string(), ..Default::default() };
    report.missing = result
        .missing
        .iter()
        .filter(|(key, _)| !layout.provided_elsewhere.iter().any(|p| key.starts_with(p.as_str())))
        .map(|(key, _)| official_name(key))
        .collect();
    report.unexpected = result
        .unused
        .iter()
        .filter(|key| !IGNORED_SUFFIXES.iter().any(|s| key.ends_with(s)))
        .filter(|key| !ignored.iter().any(|re| re.is_match(key)))
        .map(|key| official_name(key))
        .collect();
    for error in &result.errors {
        match error {
            ApplyError::ShapeMismatch { path, expected, found } => report.mis_shaped.push(format!(
                "{} (model {:?}, file {:?})",
                official_name(path),
                expected.as_slice(),
                found.as_slice()
            )),
            other => report.mis_shaped.push(format!("{other:?}")),
        }
    }
    if !(report.missing.is_empty() && report.unexpected.is_empty() && report.mis_shaped.is_empty()) {
        return Err(WeightsError::Mismatch { path: path.to_path_buf(), report });
    }
    Ok(model)
}

fn regex_escape(text: &str) -> String {
    text.chars().flat_map(|c| if c.is_ascii_alphanumeric() || c == '_' { vec![c] } else { vec!['\\', c] }).collect()
}

/// Converts every float tensor of a checkpoint to float32 as it is read, on the host: half-precision
/// files then load on devices without shader f16. Half and bfloat16 go through `half`'s bulk
/// conversion (F16C where the CPU has it): 5 ms for YOLOv8n-seg's 3.4 M values, and the whole
/// load takes as long as with the cast on the device it replaces (112 vs 114 ms, release, flex).
#[derive(Debug, Clone, Copy)]
pub struct HostFloat32;

impl ModuleAdapter for HostFloat32 {
    fn adapt(&self, tensor: burn::store::burn_pack::Tensor, _ctx: ModuleContext<'_>) -> burn::store::burn_pack::Tensor {
        if !tensor.dtype.is_float() || tensor.dtype == DType::F32 {
            return tensor;
        }
        let (name, shape) = (tensor.name.clone(), tensor.shape.clone());
        burn::store::bridge::map_data(tensor, name, DType::F32, shape, to_float32)
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(*self)
    }
}

fn to_float32(data: TensorData) -> TensorData {
    use half::slice::HalfFloatSliceExt;
    let shape = data.shape().clone();
    match data.dtype() {
        DType::F16 => {
            if let Ok(values) = data.as_slice::<half::f16>() {
                let mut out = vec![0f32; values.len()];
                values.convert_to_f32_slice(&mut out);
                return TensorData::new(out, shape);
            }
        }
        DType::BF16 => {
            if let Ok(values) = data.as_slice::<half::bf16>() {
                let mut out = vec![0f32; values.len()];
                values.convert_to_f32_slice(&mut out);
                return TensorData::new(out, shape);
            }
        }
        _ => {}
    }
    data.convert_dtype(DType::F32)
}

/// BatchNorm's running statistics: buffers in every PyTorch model that has BatchNorm.
const BATCH_NORM_BUFFERS: &[&str] = &["running_mean", "running_var"];

/// Learnable parameters as PyTorch counts them (`sum(p.numel() for p in model.parameters())`):
/// Burn's `num_params` also counts the tensors PyTorch keeps as buffers (BatchNorm's running
/// statistics, and those the model's layout names).
pub fn parameter_count<M: Module + OfficialCheckpoint>(model: &M) -> usize {
    struct Counter {
        path: Vec<String>,
        count: usize,
        buffers: Vec<String>,
    }
    impl burn::module::ModuleVisitor for Counter {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let buffer = self
                .path
                .last()
                .is_some_and(|n| BATCH_NORM_BUFFERS.contains(&n.as_str()) || self.buffers.iter().any(|b| b == n));
            if !buffer {
                self.count += param.lazy_shape().num_elements();
            }
        }
    }
    let mut counter = Counter { path: Vec::new(), count: 0, buffers: M::checkpoint_layout().buffers };
    model.visit(&mut counter);
    counter.count
}

/// Saves `model` as safetensors under the official key names (the inverse of `prefixes`, PyTorch's
/// BatchNorm names), with `metadata` in the header. The file appears whole or not at all: it is
/// written beside its destination and renamed into place.
pub fn save_safetensors<M: Module>(
    model: &M,
    path: &Path,
    prefixes: &[(String, String)],
    metadata: &[(String, String)],
) -> Result<(), WeightsError> {
    save_safetensors_with(model, path, &CheckpointLayout::prefixes(prefixes), metadata, None)
}

/// [`save_safetensors`] for a checkpoint described by a [`CheckpointLayout`] (prefixes that only
/// strip, like `module.`, are not written back); `keep` selects the module paths written.
pub fn save_safetensors_with<M: Module>(
    model: &M,
    path: &Path,
    layout: &CheckpointLayout,
    metadata: &[(String, String)],
    keep: Option<fn(&str, &str) -> bool>,
) -> Result<(), WeightsError> {
    let write_error = |message: String| WeightsError::Write { path: path.to_path_buf(), message };
    let file_name = path.file_name().ok_or_else(|| write_error("not a file path".into()))?;
    let staging = path.with_file_name(format!(".{}.{}.tmp", file_name.to_string_lossy(), std::process::id()));
    let mut store = SafetensorsStore::from_file(&staging)
        .with_to_adapter(burn::store::BurnToPyTorchAdapter)
        .skip_enum_variants(true);
    if let Some(keep) = keep {
        store = store.with_predicate(keep);
    }
    for (_, ours, ours_regex, official) in layout.rules() {
        if !ours.is_empty() {
            store = store.with_key_remapping(ours_regex, official);
        }
    }
    for (key, value) in metadata {
        store = store.metadata(key.clone(), value.clone());
    }
    let result = model.save_into(&mut store).map_err(|e| write_error(e.to_string()));
    drop(store);
    let result = result.and_then(|_| kiln_data::io::fault_point(path).map_err(|e| write_error(e.to_string())));
    match result.and_then(|_| std::fs::rename(&staging, path).map_err(|e| write_error(e.to_string()))) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&staging);
            Err(e)
        }
    }
}

/// The `__metadata__` of a safetensors file's header (empty when it has none).
pub fn read_safetensors_metadata(path: &Path) -> Result<std::collections::HashMap<String, String>, WeightsError> {
    use std::io::Read;
    let read_error = |message: String| WeightsError::Read { path: path.to_path_buf(), message };
    let mut file = std::fs::File::open(path).map_err(|e| read_error(e.to_string()))?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(|_| read_error("too short for a safetensors file".into()))?;
    let length = u64::from_le_bytes(length);
    if length > 100 << 20 {
        return Err(read_error("not a safetensors file (implausible header length)".into()));
    }
    let mut header = vec![0u8; length as usize];
    file.read_exact(&mut header).map_err(|_| read_error("truncated safetensors header".into()))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| read_error(format!("safetensors header is not JSON: {e}")))?;
    Ok(header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| m.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string()))).collect())
        .unwrap_or_default())
}
