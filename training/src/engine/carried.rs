//! Gradients an optimiser step has summed when an epoch ends before the step does. Ultralytics
//! counts its accumulation across epochs (`last_opt_step`), so these are carried into the next
//! epoch; they are kept beside each checkpoint (`grads-N.bin`) so that a run resumed after that
//! epoch takes the same steps as the uninterrupted one.
//!
//! File: `KILNGRAD`, a little-endian u64 header length, a JSON header (per tensor: the
//! parameter's position in the module's visiting order and its shape), then the values as
//! little-endian f32 in header order.

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::TrainError;

const MAGIC: &[u8; 8] = b"KILNGRAD";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Entry {
    /// The parameter's position among the module's float parameters, in visiting order.
    parameter: usize,
    shape: Vec<usize>,
}

/// Pending gradients on the host, by parameter position.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CarriedGradients {
    entries: Vec<Entry>,
    values: Vec<Vec<f32>>,
}

impl CarriedGradients {
    /// A copy of `grads` (the gradients of `model`'s parameters) read back to the host.
    pub fn read<M: Module>(model: &M, grads: &GradientsParams) -> Result<Self, TrainError> {
        struct Read<'a> {
            grads: &'a GradientsParams,
            position: usize,
            out: CarriedGradients,
            failure: Option<TrainError>,
        }
        impl ModuleVisitor for Read<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let position = self.position;
                self.position += 1;
                let Some(grad) = self.grads.get::<D>(param.id) else { return };
                let shape = grad.dims().to_vec();
                match kiln_models::device::read_floats(grad) {
                    Ok(values) => {
                        self.out.entries.push(Entry { parameter: position, shape });
                        self.out.values.push(values);
                    }
                    Err(e) => self.failure = Some(e.into()),
                }
            }
        }
        let mut read = Read { grads, position: 0, out: CarriedGradients::default(), failure: None };
        model.visit(&mut read);
        match read.failure {
            Some(e) => Err(e),
            None => Ok(read.out),
        }
    }

    /// The gradients again, for `model`'s parameters, on `device` (the gradients' device).
    pub fn to_grads<M: Module>(&self, model: &M, device: &Device) -> Result<GradientsParams, TrainError> {
        struct Place<'a> {
            carried: &'a CarriedGradients,
            device: &'a Device,
            position: usize,
            next: usize,
            grads: GradientsParams,
            failure: Option<String>,
        }
        impl ModuleVisitor for Place<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let position = self.position;
                self.position += 1;
                let Some(entry) = self.carried.entries.get(self.next).filter(|e| e.parameter == position) else {
                    return;
                };
                let values = &self.carried.values[self.next];
                self.next += 1;
                let dims = param.val().dims();
                if entry.shape != dims.to_vec() {
                    self.failure.get_or_insert(format!(
                        "parameter {position} has shape {dims:?}, the carried gradient {:?}",
                        entry.shape
                    ));
                    return;
                }
                let grad = Tensor::<D>::from_data(TensorData::new(values.clone(), dims), self.device);
                self.grads.register::<D>(param.id, grad);
            }
        }
        let mut place =
            Place { carried: self, device, position: 0, next: 0, grads: GradientsParams::new(), failure: None };
        model.visit(&mut place);
        if place.failure.is_none() && place.next != self.entries.len() {
            place.failure = Some(format!(
                "{} carried gradients for a model with {} parameters",
                self.entries.len(),
                place.position
            ));
        }
        match place.failure {
            Some(message) => {
                Err(TrainError::Training(format!("the carried gradients do not fit the model: {message}")))
            }
            None => Ok(place.grads),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let header = serde_json::to_vec(&self.entries).expect("entries serialise");
        let floats: usize = self.values.iter().map(Vec::len).sum();
        let mut bytes = Vec::with_capacity(16 + header.len() + 4 * floats);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&header);
        for values in &self.values {
            for v in values {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        kiln_data::io::write_atomic(path, &bytes)?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self, TrainError> {
        let bad = |message: &str| TrainError::Io {
            path: path.to_path_buf(),
            message: format!(
                "{message}; delete the checkpoint folder's files of this epoch to resume from the one before"
            ),
        };
        let bytes = std::fs::read(path).map_err(|e| bad(&format!("cannot read the carried gradients ({e})")))?;
        if bytes.len() < 16 || &bytes[..8] != MAGIC {
            return Err(bad("not a kiln gradients file"));
        }
        let header_len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
        let header = bytes.get(16..16usize.saturating_add(header_len)).ok_or_else(|| bad("truncated header"))?;
        let entries: Vec<Entry> =
            serde_json::from_slice(header).map_err(|e| bad(&format!("unreadable header ({e})")))?;
        let mut offset = 16 + header_len;
        let mut values = Vec::with_capacity(entries.len());
        for entry in &entries {
            let count =
                entry.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| bad("bad shape"))?;
            let end = count.checked_mul(4).and_then(|b| b.checked_add(offset)).ok_or_else(|| bad("bad shape"))?;
            let chunk = bytes.get(offset..end).ok_or_else(|| bad("truncated values"))?;
            values.push(chunk.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect());
            offset = end;
        }
        if offset != bytes.len() {
            return Err(bad("trailing bytes after the values"));
        }
        Ok(Self { entries, values })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;

    #[derive(Module, Debug)]
    struct Two {
        a: burn::nn::Linear,
        b: burn::nn::Linear,
    }

    #[test]
    fn carried_gradients_survive_the_file_and_refuse_another_model() {
        let device = kiln_models::device::cpu();
        let model = Two {
            a: burn::nn::LinearConfig::new(3, 2).init(&device),
            b: burn::nn::LinearConfig::new(2, 4).init(&device),
        };
        let mut grads = GradientsParams::new();
        let weight: Vec<f32> = (0..8).map(|i| i as f32 * 0.5 - 1.0).collect();
        grads.register::<2>(model.b.weight.id, Tensor::from_data(TensorData::new(weight.clone(), [2, 4]), &device));
        let carried = CarriedGradients::read(&model, &grads).unwrap();
        let dir = std::env::temp_dir().join(format!("kiln-carried-{}", std::process::id()));
        let path = dir.join("grads-3.bin");
        carried.save(&path).unwrap();
        let loaded = CarriedGradients::load(&path).unwrap();
        assert_eq!(loaded, carried);
        let back = loaded.to_grads(&model, &device).unwrap();
        assert!(back.get::<2>(model.a.weight.id).is_none());
        assert_eq!(kiln_models::device::read_floats(back.get::<2>(model.b.weight.id).unwrap()).unwrap(), weight);

        let other = Two {
            a: burn::nn::LinearConfig::new(3, 2).init(&device),
            b: burn::nn::LinearConfig::new(2, 5).init(&device),
        };
        let error = loaded.to_grads(&other, &device).unwrap_err().to_string();
        assert!(error.contains("shape"), "{error}");

        std::fs::write(&path, b"KILNGRAD\x05\0\0\0\0\0\0\0[{\"pa").unwrap();
        let error = CarriedGradients::load(&path).unwrap_err().to_string();
        assert!(error.contains("grads-3.bin") && error.contains("header"), "{error}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
