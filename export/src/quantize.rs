//! Post-training INT8 quantisation of an exported graph, in the explicit Q/DQ form ONNX Runtime
//! and TensorRT both read: every convolution's input and output activations are calibrated on real
//! images (MinMax, or a percentile of the absolute values that ignores rare outliers) and
//! quantised per tensor, symmetric (zero point 0, as TensorRT requires); weights per output
//! channel, symmetric; biases as int32 at the input scale × the weight scale (ONNX Runtime's
//! convention, which lets it fuse `DQ → Conv → Q` into an integer convolution).

use std::collections::{HashMap, HashSet};

use onnx_ir::{GraphProto, NodeProto, TensorProto};

use crate::ExportError;
use crate::graph::{float_initializer, float_values};
use crate::interpreter::{Interpreter, Value};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Calibration {
    /// The largest absolute value seen.
    MinMax,
    /// The given percentile (e.g. 99.99) of the absolute values seen.
    Percentile(f64),
}

impl std::str::FromStr for Calibration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        if lower == "minmax" {
            return Ok(Self::MinMax);
        }
        if let Some(p) = lower.strip_prefix("percentile") {
            let p = p.trim_start_matches([':', '=']);
            let value = if p.is_empty() { 99.99 } else { p.parse().map_err(|_| format!("bad percentile '{p}'"))? };
            if !(50.0..=100.0).contains(&value) {
                return Err(format!("percentile {value} is outside 50..100"));
            }
            return Ok(Self::Percentile(value));
        }
        Err(format!("unknown calibration '{s}': minmax or percentile[:99.99]"))
    }
}

impl std::fmt::Display for Calibration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MinMax => write!(f, "minmax"),
            Self::Percentile(p) => write!(f, "percentile {p}"),
        }
    }
}

/// How activations are stored between layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationType {
    /// Signed, zero point 0: what TensorRT's explicit quantisation requires (the default).
    Int8,
    /// Unsigned with zero point 128 (the same symmetric range): what ONNX Runtime's CPU provider
    /// fuses into integer convolutions.
    Uint8,
}

impl std::str::FromStr for ActivationType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "int8" => Ok(Self::Int8),
            "uint8" => Ok(Self::Uint8),
            _ => Err(format!("unknown activation type '{s}': int8 (TensorRT) or uint8 (ONNX Runtime CPU)")),
        }
    }
}

/// The activations to quantise: the inputs and outputs of every convolution.
pub fn quantised_activations(graph: &GraphProto) -> Vec<String> {
    let mut seen = HashSet::new();
    graph
        .node
        .iter()
        .filter(|n| n.op_type == "Conv")
        .flat_map(|n| [n.input[0].clone(), n.output[0].clone()])
        .filter(|name| seen.insert(name.clone()))
        .collect()
}

const BINS: usize = 2048;

/// The clipping range (largest absolute value kept) of every quantised activation over `images`.
pub fn calibrate(
    interpreter: &Interpreter,
    graph: &GraphProto,
    images: &[Value],
    method: Calibration,
    mut progress: impl FnMut(),
) -> Result<HashMap<String, f32>, ExportError> {
    if images.is_empty() {
        return Err(ExportError::Options("calibration needs at least one image".into()));
    }
    let wanted: HashSet<String> = quantised_activations(graph).into_iter().collect();
    let mut amax: HashMap<String, f32> = HashMap::new();
    for image in images {
        interpreter.run(image.clone(), |name, value| {
            if wanted.contains(name) {
                let m = value.data.iter().fold(0f32, |m, v| m.max(v.abs()));
                let slot = amax.entry(name.to_string()).or_insert(0.0);
                *slot = slot.max(m);
            }
        })?;
        progress();
    }
    let Calibration::Percentile(percentile) = method else { return Ok(amax) };
    let mut histograms: HashMap<String, Vec<u64>> = HashMap::new();
    for image in images {
        interpreter.run(image.clone(), |name, value| {
            let Some(&top) = amax.get(name) else { return };
            if top <= 0.0 {
                return;
            }
            let histogram = histograms.entry(name.to_string()).or_insert_with(|| vec![0; BINS]);
            for v in &value.data {
                let bin = ((v.abs() / top) * BINS as f32) as usize;
                histogram[bin.min(BINS - 1)] += 1;
            }
        })?;
        progress();
    }
    for (name, histogram) in histograms {
        let total: u64 = histogram.iter().sum();
        let target = (total as f64 * percentile / 100.0).ceil() as u64;
        let mut cumulative = 0;
        let bin = histogram.iter().position(|&c| {
            cumulative += c;
            cumulative >= target
        });
        let top = amax[&name];
        amax.insert(name, top * (bin.unwrap_or(BINS - 1) + 1) as f32 / BINS as f32);
    }
    Ok(amax)
}

fn scalar_initializer(name: &str, data_type: i32, raw: Vec<u8>, dims: &[i64]) -> TensorProto {
    let mut tensor = TensorProto::new();
    tensor.name = name.into();
    tensor.data_type = data_type;
    tensor.dims = dims.to_vec();
    tensor.raw_data = raw.into();
    tensor
}

fn node(name: &str, op: &str, inputs: &[&str], output: &str, axis: Option<i64>) -> NodeProto {
    let mut n = NodeProto::new();
    n.name = name.into();
    n.op_type = op.into();
    n.input = inputs.iter().map(|s| s.to_string()).collect();
    n.output = vec![output.into()];
    if let Some(axis) = axis {
        n.attribute.push(Default::default());
        let a = n.attribute.last_mut().expect("pushed");
        a.name = "axis".into();
        a.i = axis;
        a.type_ = onnx_ir::AttributeType::INT.into();
    }
    n
}

const UINT8: i32 = 2;
const INT8: i32 = 3;
const INT32: i32 = 6;

/// Inserts Q/DQ pairs for every activation in `amax` and quantises the weights and biases of the
/// convolutions whose input is quantised.
pub fn insert_qdq(
    graph: &mut GraphProto,
    amax: &HashMap<String, f32>,
    activations: ActivationType,
) -> Result<usize, ExportError> {
    let (zero_type, zero_value) = match activations {
        ActivationType::Int8 => (INT8, 0u8),
        ActivationType::Uint8 => (UINT8, 128u8),
    };
    let scale_of = |name: &str| amax.get(name).map(|&a| (a / 127.0).max(1e-8));
    let initializers: HashMap<String, TensorProto> =
        graph.initializer.iter().map(|t| (t.name.clone(), t.clone())).collect();
    let mut new_initializers = Vec::new();
    let qdq_pair = |tensor: &str, scale: f32, new_initializers: &mut Vec<TensorProto>| -> [NodeProto; 2] {
        let (s, z, q, dq) = (
            format!("{tensor}_scale"),
            format!("{tensor}_zero_point"),
            format!("{tensor}_quantized"),
            format!("{tensor}_dequantized"),
        );
        new_initializers.push(float_initializer(&s, &[], &[scale]));
        new_initializers.push(scalar_initializer(&z, zero_type, vec![zero_value], &[]));
        [
            node(&format!("{tensor}_QuantizeLinear"), "QuantizeLinear", &[tensor, &s, &z], &q, None),
            node(&format!("{tensor}_DequantizeLinear"), "DequantizeLinear", &[&q, &s, &z], &dq, None),
        ]
    };
    let mut nodes = Vec::new();
    let graph_inputs: Vec<String> = graph.input.iter().map(|i| i.name.clone()).collect();
    for input in &graph_inputs {
        if let Some(scale) = scale_of(input) {
            nodes.extend(qdq_pair(input, scale, &mut new_initializers));
        }
    }
    let mut quantised_convs = 0;
    for original in std::mem::take(&mut graph.node) {
        let mut current = original.clone();
        if current.op_type == "Conv"
            && let (Some(input_scale), Some(weight)) =
                (scale_of(&current.input[0]), initializers.get(&current.input[1]))
        {
            let w = float_values(weight)?;
            let channels = weight.dims[0] as usize;
            let per = w.len() / channels;
            let scales: Vec<f32> =
                w.chunks(per).map(|c| (c.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0).max(1e-8)).collect();
            let quantised: Vec<u8> = w
                .iter()
                .enumerate()
                .map(|(i, v)| ((v / scales[i / per]).round_ties_even().clamp(-127.0, 127.0) as i8) as u8)
                .collect();
            let base = current.input[1].clone();
            let (wq, ws, wz, wdq) = (
                format!("{base}_int8"),
                format!("{base}_scale"),
                format!("{base}_zero_point"),
                format!("{base}_dequantized"),
            );
            new_initializers.push(scalar_initializer(&wq, INT8, quantised, &weight.dims));
            new_initializers.push(float_initializer(&ws, &[channels as i64], &scales));
            new_initializers.push(scalar_initializer(&wz, INT8, vec![0; channels], &[channels as i64]));
            nodes.push(node(&format!("{base}_DequantizeLinear"), "DequantizeLinear", &[&wq, &ws, &wz], &wdq, Some(0)));
            current.input[1] = wdq;
            if let Some(bias) = current.input.get(2).filter(|b| !b.is_empty()).and_then(|b| initializers.get(b)) {
                let b = float_values(bias)?;
                let bias_scales: Vec<f32> = scales.iter().map(|s| s * input_scale).collect();
                let quantised: Vec<u8> = b
                    .iter()
                    .zip(&bias_scales)
                    .flat_map(|(v, s)| {
                        ((v / s).round_ties_even().clamp(i32::MIN as f32, i32::MAX as f32) as i32).to_le_bytes()
                    })
                    .collect();
                let base = current.input[2].clone();
                let (bq, bs, bz, bdq) = (
                    format!("{base}_int32"),
                    format!("{base}_scale"),
                    format!("{base}_zero_point"),
                    format!("{base}_dequantized"),
                );
                new_initializers.push(scalar_initializer(&bq, INT32, quantised, &[channels as i64]));
                new_initializers.push(float_initializer(&bs, &[channels as i64], &bias_scales));
                new_initializers.push(scalar_initializer(&bz, INT32, vec![0; 4 * channels], &[channels as i64]));
                nodes.push(node(
                    &format!("{base}_DequantizeLinear"),
                    "DequantizeLinear",
                    &[&bq, &bs, &bz],
                    &bdq,
                    Some(0),
                ));
                current.input[2] = bdq;
            }
            quantised_convs += 1;
        }
        let outputs = current.output.clone();
        nodes.push(current);
        for output in outputs {
            if let Some(scale) = scale_of(&output) {
                nodes.extend(qdq_pair(&output, scale, &mut new_initializers));
            }
        }
    }
    // Every reader of a quantised activation (other than its QuantizeLinear) reads the dequantised copy.
    for n in nodes.iter_mut().filter(|n| n.op_type != "QuantizeLinear" || !n.name.ends_with("_QuantizeLinear")) {
        for input in n.input.iter_mut() {
            if amax.contains_key(input.as_str()) {
                *input = format!("{input}_dequantized");
            }
        }
    }
    graph.node = nodes;
    graph.initializer.extend(new_initializers);
    crate::graph::remove_dead(graph);
    Ok(quantised_convs)
}
