//! Passes over an exported ONNX graph that hold for any model, not one architecture: BatchNorm
//! folded into the convolution before it, dead nodes and initializers dropped, inputs and outputs
//! renamed, metadata written, and a float16 copy for `--half`.

use std::collections::{HashMap, HashSet};

use onnx_ir::{GraphProto, ModelProto, NodeProto, TensorProto};

use crate::ExportError;

/// ONNX `TensorProto.DataType` codes used here.
pub const FLOAT: i32 = 1;
pub const FLOAT16: i32 = 10;

/// The float values of an initializer (raw little-endian bytes or `float_data`).
pub fn float_values(tensor: &TensorProto) -> Result<Vec<f32>, ExportError> {
    if tensor.data_type != FLOAT {
        return Err(ExportError::Graph(format!("initializer {} is not float32", tensor.name)));
    }
    if !tensor.raw_data.is_empty() {
        return Ok(tensor.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect());
    }
    Ok(tensor.float_data.clone())
}

pub fn set_float_values(tensor: &mut TensorProto, values: &[f32]) {
    tensor.data_type = FLOAT;
    tensor.float_data.clear();
    tensor.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
}

pub fn float_initializer(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    let mut tensor = TensorProto::new();
    tensor.name = name.to_string();
    tensor.dims = dims.to_vec();
    set_float_values(&mut tensor, values);
    tensor
}

fn attribute_f(node: &NodeProto, name: &str) -> Option<f32> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.f)
}

/// How many nodes read each tensor, graph outputs counted as readers.
fn readers(graph: &GraphProto) -> HashMap<String, usize> {
    let mut count = HashMap::new();
    for name in graph.node.iter().flat_map(|n| n.input.iter()).chain(graph.output.iter().map(|o| &o.name)) {
        *count.entry(name.clone()).or_insert(0) += 1;
    }
    count
}

/// `Conv → BatchNormalization` (the conv's output read by nothing else, every parameter an
/// initializer) becomes one `Conv` with `W·s` and `(b − mean)·s + β`, `s = γ / √(var + ε)`.
/// Returns how many were folded.
pub fn fold_batch_norms(graph: &mut GraphProto) -> Result<usize, ExportError> {
    let readers = readers(graph);
    let producer: HashMap<String, usize> =
        graph.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i))).collect();
    let initializer: HashMap<String, usize> =
        graph.initializer.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    let mut removed = HashSet::new();
    let mut new_initializers = Vec::new();
    for bn_index in 0..graph.node.len() {
        let bn = &graph.node[bn_index];
        if bn.op_type != "BatchNormalization" || bn.input.len() != 5 || bn.output.len() != 1 {
            continue;
        }
        let Some(&conv_index) = producer.get(&bn.input[0]) else { continue };
        let conv = &graph.node[conv_index];
        if conv.op_type != "Conv" || readers.get(&bn.input[0]) != Some(&1) || conv.input.len() < 2 {
            continue;
        }
        let parameter = |name: &String| initializer.get(name).map(|&i| &graph.initializer[i]);
        let (Some(gamma), Some(beta), Some(mean), Some(var), Some(weight)) = (
            parameter(&bn.input[1]),
            parameter(&bn.input[2]),
            parameter(&bn.input[3]),
            parameter(&bn.input[4]),
            parameter(&conv.input[1]),
        ) else {
            continue;
        };
        let epsilon = attribute_f(bn, "epsilon").unwrap_or(1e-5);
        let (gamma, beta, mean, var) =
            (float_values(gamma)?, float_values(beta)?, float_values(mean)?, float_values(var)?);
        let scale: Vec<f32> = gamma.iter().zip(&var).map(|(g, v)| g / (v + epsilon).sqrt()).collect();
        let channels = scale.len();
        let mut w = float_values(weight)?;
        if channels == 0 || w.len() % channels != 0 {
            return Err(ExportError::Graph(format!("{}: BatchNorm and Conv channels disagree", bn.name)));
        }
        let per_channel = w.len() / channels;
        for (o, chunk) in w.chunks_mut(per_channel).enumerate() {
            chunk.iter_mut().for_each(|v| *v *= scale[o]);
        }
        let bias = match conv.input.get(2).filter(|n| !n.is_empty()) {
            Some(name) => float_values(parameter(name).ok_or_else(|| {
                ExportError::Graph(format!("{}: conv bias {name} is not an initializer", conv.name))
            })?)?,
            None => vec![0.0; channels],
        };
        let folded_bias: Vec<f32> = (0..channels).map(|o| (bias[o] - mean[o]) * scale[o] + beta[o]).collect();
        let weight_name = format!("{}_folded.weight", conv.name);
        let bias_name = format!("{}_folded.bias", conv.name);
        new_initializers.push(float_initializer(&weight_name, &weight.dims, &w));
        new_initializers.push(float_initializer(&bias_name, &[channels as i64], &folded_bias));
        let output = bn.output[0].clone();
        let conv = &mut graph.node[conv_index];
        conv.input.truncate(1);
        conv.input.push(weight_name);
        conv.input.push(bias_name);
        conv.output[0] = output;
        removed.insert(bn_index);
    }
    let folded = removed.len();
    let nodes = std::mem::take(&mut graph.node);
    graph.node = nodes.into_iter().enumerate().filter(|(i, _)| !removed.contains(i)).map(|(_, n)| n).collect();
    graph.initializer.extend(new_initializers);
    Ok(folded)
}

/// Drops nodes none of whose outputs are read (transitively) and initializers nothing reads.
pub fn remove_dead(graph: &mut GraphProto) {
    loop {
        let readers = readers(graph);
        let before = graph.node.len();
        graph.node.retain(|n| n.output.iter().any(|o| readers.contains_key(o)));
        if graph.node.len() == before {
            break;
        }
    }
    let read: HashSet<String> = graph.node.iter().flat_map(|n| n.input.iter().cloned()).collect();
    graph.initializer.retain(|t| read.contains(&t.name));
    let initializers: HashSet<String> = graph.initializer.iter().map(|t| t.name.clone()).collect();
    graph.input.retain(|i| !initializers.contains(&i.name) || read.contains(&i.name));
}

/// Renames tensor `from` to `to` everywhere in the graph.
pub fn rename(graph: &mut GraphProto, from: &str, to: &str) {
    for node in graph.node.iter_mut() {
        for name in node.input.iter_mut().chain(node.output.iter_mut()) {
            if name == from {
                *name = to.to_string();
            }
        }
    }
    for value in graph.input.iter_mut().chain(graph.output.iter_mut()).chain(graph.value_info.iter_mut()) {
        if value.name == from {
            value.name = to.to_string();
        }
    }
    for tensor in graph.initializer.iter_mut() {
        if tensor.name == from {
            tensor.name = to.to_string();
        }
    }
}

/// Names the graph's runtime inputs and outputs in order.
pub fn name_inputs_outputs(graph: &mut GraphProto, inputs: &[&str], outputs: &[&str]) -> Result<(), ExportError> {
    let initializers: HashSet<String> = graph.initializer.iter().map(|t| t.name.clone()).collect();
    let runtime: Vec<String> =
        graph.input.iter().map(|i| i.name.clone()).filter(|n| !initializers.contains(n)).collect();
    let produced: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    if runtime.len() != inputs.len() || produced.len() != outputs.len() {
        return Err(ExportError::Graph(format!(
            "the graph has {} inputs and {} outputs, expected {} and {}",
            runtime.len(),
            produced.len(),
            inputs.len(),
            outputs.len()
        )));
    }
    for (from, to) in runtime.iter().zip(inputs).chain(produced.iter().zip(outputs)) {
        rename(graph, from, to);
    }
    Ok(())
}

/// Sets `key = value` in the model's metadata (ONNX Runtime's `custom_metadata_map`).
pub fn set_metadata(model: &mut ModelProto, key: &str, value: &str) {
    if let Some(entry) = model.metadata_props.iter_mut().find(|e| e.key == key) {
        entry.value = value.to_string();
        return;
    }
    model.metadata_props.push(Default::default());
    let entry = model.metadata_props.last_mut().expect("just pushed");
    entry.key = key.to_string();
    entry.value = value.to_string();
}

/// The tensors that must stay float32 whatever the model's precision: `Resize`'s `roi` and
/// `scales` inputs (the operator's schema fixes their type).
fn fixed_float32_inputs(graph: &GraphProto) -> HashSet<String> {
    graph.node.iter().filter(|n| n.op_type == "Resize").flat_map(|n| n.input.iter().skip(1).take(2).cloned()).collect()
}

/// float32 → float16 throughout: initializers, graph inputs and outputs, `Cast` targets and
/// intermediate type annotations (what `--half` exports, for TensorRT FP16 and GPUs).
pub fn convert_to_float16(graph: &mut GraphProto) -> Result<(), ExportError> {
    let keep = fixed_float32_inputs(graph);
    for tensor in graph.initializer.iter_mut().filter(|t| t.data_type == FLOAT && !keep.contains(&t.name)) {
        let values = float_values(tensor)?;
        tensor.float_data.clear();
        tensor.raw_data = values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        tensor.data_type = FLOAT16;
    }
    for value in graph.input.iter_mut().chain(graph.output.iter_mut()).chain(graph.value_info.iter_mut()) {
        if keep.contains(&value.name) {
            continue;
        }
        if let Some(ty) = value.type_.as_mut()
            && ty.has_tensor_type()
            && ty.tensor_type().elem_type == FLOAT
        {
            ty.mut_tensor_type().elem_type = FLOAT16;
        }
    }
    for node in graph.node.iter_mut().filter(|n| n.op_type == "Cast") {
        for attribute in node.attribute.iter_mut().filter(|a| a.name == "to" && a.i == FLOAT as i64) {
            attribute.i = FLOAT16 as i64;
        }
    }
    Ok(())
}

/// `Resize` with an `axes` attribute and sizes for those axes only → full-rank sizes and no
/// `axes` (`shapes`: the static shapes of the tensors, by name). Same operation; some runtime
/// optimisers (ONNX Runtime's layout transforms around Q/DQ) only handle the full-rank form.
pub fn resize_full_rank(graph: &mut GraphProto, shapes: &HashMap<String, Vec<usize>>) -> Result<(), ExportError> {
    let mut initializers: HashMap<String, usize> =
        graph.initializer.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    let mut added = Vec::new();
    for node in graph.node.iter_mut().filter(|n| n.op_type == "Resize") {
        let Some(axes) = ints(node, "axes") else { continue };
        let (Some(input), Some(sizes_name)) = (shapes.get(&node.input[0]), node.input.get(3).cloned()) else {
            continue;
        };
        let Some(&index) = initializers.get(&sizes_name) else { continue };
        let sizes = &graph.initializer[index];
        let values: Vec<i64> =
            sizes.raw_data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
        if values.len() != axes.len() {
            return Err(ExportError::Graph(format!("{}: sizes and axes disagree", node.name)));
        }
        let mut full: Vec<i64> = input.iter().map(|&d| d as i64).collect();
        for (&axis, &size) in axes.iter().zip(&values) {
            full[axis as usize] = size;
        }
        let name = format!("{sizes_name}_full_rank");
        let mut tensor = TensorProto::new();
        tensor.name = name.clone();
        tensor.data_type = 7;
        tensor.dims = vec![full.len() as i64];
        tensor.raw_data = full.iter().flat_map(|v| v.to_le_bytes()).collect();
        initializers.insert(name.clone(), usize::MAX);
        added.push(tensor);
        node.input[3] = name;
        node.attribute.retain(|a| a.name != "axes");
    }
    graph.initializer.extend(added);
    remove_dead(graph);
    Ok(())
}

fn ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.ints.clone())
}
