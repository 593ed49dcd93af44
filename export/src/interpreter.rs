//! A small ONNX interpreter for the graphs kiln exports (float32, float16, or with Q/DQ nodes), on
//! the CPU: convolutions and pooling through Burn, the rest element by element. It calibrates INT8
//! (every tensor's values are visible as they are computed) and scores an exported model without
//! leaving Rust. Operators follow the ONNX specification; an operator outside the supported set is
//! an error naming it. A float16 graph is computed in float32 with every tensor rounded to
//! float16 where the graph stores one (its input, each operator's output, `Cast` to float16):
//! the storage a float16 runtime has, with float32 accumulation inside each operator, as GPUs
//! and TensorRT's FP16 kernels accumulate.

use std::collections::HashMap;

use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};
use onnx_ir::{GraphProto, NodeProto, TensorProto};

use crate::ExportError;
use crate::graph::FLOAT16;

/// A dense row-major tensor; integer tensors (shapes, indices, int8 weights) hold their values as
/// floats, exactly (all are far below 2^24).
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Value {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    fn to_burn4(&self, device: &Device) -> Tensor<4> {
        let s = &self.shape;
        Tensor::from_data(TensorData::new(self.data.clone(), [s[0], s[1], s[2], s[3]]), device)
    }

    fn from_burn4(t: Tensor<4>) -> Result<Self, ExportError> {
        let shape = t.dims().to_vec();
        Ok(Self::new(shape, kiln_models::device::read_floats(t)?))
    }
}

fn error(node: &NodeProto, message: impl std::fmt::Display) -> ExportError {
    ExportError::Graph(format!("{} ({}): {message}", node.name, node.op_type))
}

fn decode_initializer(tensor: &TensorProto) -> Result<Value, ExportError> {
    let shape: Vec<usize> =
        tensor.dims.iter().map(|&d| usize::try_from(d)).collect::<Result<_, _>>().map_err(|_| {
            ExportError::Graph(format!("initializer {}: negative dimension in {:?}", tensor.name, tensor.dims))
        })?;
    let raw = &tensor.raw_data;
    let data: Vec<f32> = match tensor.data_type {
        1 => crate::graph::float_values(tensor)?,
        7 if !raw.is_empty() => raw.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
        7 => tensor.int64_data.iter().map(|&v| v as f32).collect(),
        6 if !raw.is_empty() => raw.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
        6 => tensor.int32_data.iter().map(|&v| v as f32).collect(),
        3 if !raw.is_empty() => raw.iter().map(|&b| b as i8 as f32).collect(),
        FLOAT16 if !raw.is_empty() => {
            raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
        // float16 outside raw_data: each value's bits in the low half of an int32.
        FLOAT16 => tensor.int32_data.iter().map(|&v| half::f16::from_bits(v as u16).to_f32()).collect(),
        2 if !raw.is_empty() => raw.iter().map(|&b| b as f32).collect(),
        2 => tensor.int32_data.iter().map(|&v| v as f32).collect(),
        3 => tensor.int32_data.iter().map(|&v| v as f32).collect(),
        other => {
            return Err(ExportError::Graph(format!("initializer {}: data type {other} is not supported", tensor.name)));
        }
    };
    let expected = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if expected != Some(data.len()) {
        return Err(ExportError::Graph(format!(
            "initializer {}: {} values for shape {shape:?}",
            tensor.name,
            data.len()
        )));
    }
    Ok(Value::new(shape, data))
}

fn ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.ints.clone())
}

fn int(node: &NodeProto, name: &str, default: i64) -> i64 {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i).unwrap_or(default)
}

fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// Numpy broadcasting of two operands.
fn broadcast(node: &NodeProto, a: &Value, b: &Value, f: impl Fn(f32, f32) -> f32) -> Result<Value, ExportError> {
    if a.shape == b.shape {
        return Ok(Value::new(a.shape.clone(), a.data.iter().zip(&b.data).map(|(x, y)| f(*x, *y)).collect()));
    }
    let rank = a.shape.len().max(b.shape.len());
    let pad = |s: &[usize]| [vec![1; rank - s.len()], s.to_vec()].concat();
    let (sa, sb) = (pad(&a.shape), pad(&b.shape));
    let mut shape = Vec::with_capacity(rank);
    for (&x, &y) in sa.iter().zip(&sb) {
        if x != y && x != 1 && y != 1 {
            return Err(error(node, format!("cannot broadcast {:?} with {:?}", a.shape, b.shape)));
        }
        shape.push(x.max(y));
    }
    let (ta, tb) = (strides_of(&sa), strides_of(&sb));
    let out_strides = strides_of(&shape);
    let n: usize = shape.iter().product();
    let mut data = Vec::with_capacity(n);
    for i in 0..n {
        let (mut ia, mut ib) = (0, 0);
        for d in 0..rank {
            let coordinate = (i / out_strides[d]) % shape[d];
            if sa[d] != 1 {
                ia += coordinate * ta[d];
            }
            if sb[d] != 1 {
                ib += coordinate * tb[d];
            }
        }
        data.push(f(a.data[ia], b.data[ib]));
    }
    Ok(Value::new(shape, data))
}

/// Per-tensor or per-axis quantisation parameters broadcast over `x`'s `axis`.
fn per_axis(x: &Value, parameter: &Value, axis: usize) -> impl Fn(usize) -> f32 {
    let inner: usize = x.shape[axis + 1..].iter().product();
    let channels = x.shape.get(axis).copied().unwrap_or(1);
    let values = parameter.data.clone();
    move |i| if values.len() == 1 { values[0] } else { values[(i / inner) % channels] }
}

pub struct Interpreter {
    graph: GraphProto,
    initializers: HashMap<String, Value>,
    /// Initializers stored as uint8 (their quantised range is 0..255, not -128..127).
    unsigned: std::collections::HashSet<String>,
    /// The runtime input is float16: every tensor the graph computes is stored as float16.
    half: bool,
    device: Device,
}

/// `values` rounded to the nearest float16 (what storing them as float16 keeps).
fn round_to_half(values: &mut [f32]) {
    for v in values {
        *v = half::f16::from_f32(*v).to_f32();
    }
}

impl Interpreter {
    pub fn new(graph: &GraphProto, device: &Device) -> Result<Self, ExportError> {
        let initializers: HashMap<String, Value> = graph
            .initializer
            .iter()
            .map(|t| Ok::<_, ExportError>((t.name.clone(), decode_initializer(t)?)))
            .collect::<Result<_, _>>()?;
        let unsigned = graph.initializer.iter().filter(|t| t.data_type == 2).map(|t| t.name.clone()).collect();
        let half = graph
            .input
            .iter()
            .filter(|i| !initializers.contains_key(&i.name))
            .filter_map(|i| i.type_.as_ref().filter(|t| t.has_tensor_type()))
            .any(|t| t.tensor_type().elem_type == FLOAT16);
        Ok(Self { graph: graph.clone(), initializers, unsigned, half, device: device.clone() })
    }

    /// Whether the graph computes in float16 (its input is float16).
    pub fn is_half(&self) -> bool {
        self.half
    }

    /// Runs the graph on its single input; `observe` sees every float tensor computed (and the
    /// input) by name. Returns the graph outputs in order.
    pub fn run(&self, mut input: Value, mut observe: impl FnMut(&str, &Value)) -> Result<Vec<Value>, ExportError> {
        if self.half {
            round_to_half(&mut input.data);
        }
        let mut remaining: HashMap<&str, usize> = HashMap::new();
        for name in self.graph.node.iter().flat_map(|n| n.input.iter()) {
            *remaining.entry(name.as_str()).or_insert(0) += 1;
        }
        let outputs: Vec<&str> = self.graph.output.iter().map(|o| o.name.as_str()).collect();
        let input_name = self
            .graph
            .input
            .iter()
            .map(|i| i.name.as_str())
            .find(|n| !self.initializers.contains_key(*n))
            .ok_or_else(|| ExportError::Graph("the graph has no runtime input".into()))?;
        observe(input_name, &input);
        let mut values: HashMap<String, Value> = HashMap::from([(input_name.to_string(), input)]);
        for node in &self.graph.node {
            let produced = {
                let get = |i: usize| -> Result<&Value, ExportError> {
                    let name = node
                        .input
                        .get(i)
                        .filter(|n| !n.is_empty())
                        .ok_or_else(|| error(node, format!("input {i} missing")))?;
                    values
                        .get(name)
                        .or_else(|| self.initializers.get(name))
                        .ok_or_else(|| error(node, format!("{name} not computed")))
                };
                self.execute(node, &get)?
            };
            for (index, (name, mut value)) in node.output.iter().zip(produced).enumerate() {
                // In a float16 graph every float tensor is stored as float16; indices (TopK's
                // second output) stay int64, and a Cast rounds by its own target type.
                let integer = node.op_type == "TopK" && index == 1;
                if self.half && !integer && node.op_type != "Cast" {
                    round_to_half(&mut value.data);
                }
                observe(name, &value);
                values.insert(name.clone(), value);
            }
            for name in &node.input {
                if let Some(count) = remaining.get_mut(name.as_str()) {
                    *count -= 1;
                    if *count == 0 && !outputs.contains(&name.as_str()) {
                        values.remove(name);
                    }
                }
            }
        }
        outputs
            .iter()
            .map(|o| values.remove(*o).ok_or_else(|| ExportError::Graph(format!("output {o} was not computed"))))
            .collect()
    }

    fn execute<'v>(
        &self,
        node: &NodeProto,
        get: &dyn Fn(usize) -> Result<&'v Value, ExportError>,
    ) -> Result<Vec<Value>, ExportError> {
        let unary = |f: fn(f32) -> f32| -> Result<Vec<Value>, ExportError> {
            let x = get(0)?;
            Ok(vec![Value::new(x.shape.clone(), x.data.iter().map(|v| f(*v)).collect())])
        };
        let binary = |f: fn(f32, f32) -> f32| -> Result<Vec<Value>, ExportError> {
            Ok(vec![broadcast(node, get(0)?, get(1)?, f)?])
        };
        match node.op_type.as_str() {
            "Add" => binary(|a, b| a + b),
            "Sub" => binary(|a, b| a - b),
            "Mul" => binary(|a, b| a * b),
            "Div" => binary(|a, b| a / b),
            "Sigmoid" => unary(|v| 1.0 / (1.0 + (-v).exp())),
            "Exp" => unary(f32::exp),
            "Relu" => unary(|v| v.max(0.0)),
            "Conv" => self.conv(node, get),
            "MaxPool" => self.max_pool(node, get(0)?),
            "Concat" => concat(node, get),
            "Slice" => slice(node, get),
            "Reshape" => {
                let (x, shape) = (get(0)?, get(1)?);
                let mut dims: Vec<i64> = shape.data.iter().map(|&v| v as i64).collect();
                for (i, d) in dims.iter_mut().enumerate() {
                    if *d == 0 {
                        *d = x.shape[i] as i64;
                    }
                }
                if let Some(unknown) = dims.iter().position(|&d| d == -1) {
                    let known: i64 = dims.iter().filter(|&&d| d != -1).product();
                    dims[unknown] = x.data.len() as i64 / known;
                }
                Ok(vec![Value::new(dims.iter().map(|&d| d as usize).collect(), x.data.clone())])
            }
            "Resize" => resize_nearest(node, get),
            "ReduceSum" => {
                let (x, axes) = (get(0)?, get(1)?);
                let axis = axes.data[0] as i64;
                let axis = if axis < 0 { axis + x.shape.len() as i64 } else { axis } as usize;
                Ok(vec![reduce(x, axis, int(node, "keepdims", 1) == 1, |acc, v| acc + v, 0.0)])
            }
            "TopK" => {
                let (x, k) = (get(0)?, get(1)?);
                if k.data != [1.0] || int(node, "largest", 1) != 1 {
                    return Err(error(node, "only TopK with k = 1, largest, is supported"));
                }
                let axis = int(node, "axis", -1);
                let axis = if axis < 0 { axis + x.shape.len() as i64 } else { axis } as usize;
                let values = reduce(x, axis, true, f32::max, f32::NEG_INFINITY);
                let indices = argmax(x, axis);
                Ok(vec![values, indices])
            }
            "Cast" => {
                let mut value = get(0)?.clone();
                if int(node, "to", 1) == FLOAT16 as i64 {
                    round_to_half(&mut value.data);
                }
                Ok(vec![value])
            }
            "QuantizeLinear" => {
                let (x, scale) = (get(0)?, get(1)?);
                let zero = get(2).ok().cloned().unwrap_or(Value::new(vec![], vec![0.0]));
                let axis = int(node, "axis", 1) as usize;
                let (s, z) = (per_axis(x, scale, axis), per_axis(x, &zero, axis));
                let unsigned = node.input.get(2).is_some_and(|n| self.unsigned.contains(n));
                let (low, high) = if unsigned { (0.0, 255.0) } else { (-128.0, 127.0) };
                let data = x
                    .data
                    .iter()
                    .enumerate()
                    .map(|(i, v)| ((v / s(i)).round_ties_even() + z(i)).clamp(low, high))
                    .collect();
                Ok(vec![Value::new(x.shape.clone(), data)])
            }
            "DequantizeLinear" => {
                let (x, scale) = (get(0)?, get(1)?);
                let zero = get(2).ok().cloned().unwrap_or(Value::new(vec![], vec![0.0]));
                let axis = int(node, "axis", 1) as usize;
                let (s, z) = (per_axis(x, scale, axis), per_axis(x, &zero, axis));
                let data = x.data.iter().enumerate().map(|(i, v)| (v - z(i)) * s(i)).collect();
                Ok(vec![Value::new(x.shape.clone(), data)])
            }
            other => Err(error(node, format!("operator {other} is not supported by kiln's interpreter"))),
        }
    }

    fn conv<'v>(
        &self,
        node: &NodeProto,
        get: &dyn Fn(usize) -> Result<&'v Value, ExportError>,
    ) -> Result<Vec<Value>, ExportError> {
        let (x, w) = (get(0)?, get(1)?);
        if x.shape.len() != 4 {
            return Err(error(node, "only 2-D convolutions are supported"));
        }
        let pads = ints(node, "pads").unwrap_or(vec![0; 4]);
        if pads.len() != 4 || pads[0] != pads[2] || pads[1] != pads[3] {
            return Err(error(node, format!("asymmetric padding {pads:?} is not supported")));
        }
        let pair = |name: &str| {
            let v = ints(node, name).unwrap_or(vec![1, 1]);
            [v[0] as usize, v[1] as usize]
        };
        let options = ConvOptions::new(
            pair("strides"),
            [pads[0] as usize, pads[1] as usize],
            pair("dilations"),
            int(node, "group", 1) as usize,
        );
        let bias = match node.input.get(2).filter(|n| !n.is_empty()) {
            Some(_) => {
                let b = get(2)?;
                Some(Tensor::<1>::from_data(TensorData::new(b.data.clone(), [b.data.len()]), &self.device))
            }
            None => None,
        };
        let out = conv2d(x.to_burn4(&self.device), w.to_burn4(&self.device), bias, options);
        Ok(vec![Value::from_burn4(out)?])
    }

    fn max_pool(&self, node: &NodeProto, x: &Value) -> Result<Vec<Value>, ExportError> {
        let pair = |name: &str, default: usize| {
            ints(node, name).map(|v| [v[0] as usize, v[1] as usize]).unwrap_or([default, default])
        };
        let pads = ints(node, "pads").unwrap_or(vec![0; 4]);
        if pads.len() != 4 || pads[0] != pads[2] || pads[1] != pads[3] || int(node, "ceil_mode", 0) != 0 {
            return Err(error(node, "only symmetric padding without ceil_mode is supported"));
        }
        let options = MaxPoolOptions::new(pair("kernel_shape", 1))
            .with_stride(pair("strides", 1))
            .with_padding([pads[0] as usize, pads[1] as usize])
            .with_dilation(pair("dilations", 1));
        let out = max_pool2d(x.to_burn4(&self.device), options);
        Ok(vec![Value::from_burn4(out)?])
    }
}

fn reduce(x: &Value, axis: usize, keep: bool, f: fn(f32, f32) -> f32, init: f32) -> Value {
    let outer: usize = x.shape[..axis].iter().product();
    let n = x.shape[axis];
    let inner: usize = x.shape[axis + 1..].iter().product();
    let mut data = vec![init; outer * inner];
    for o in 0..outer {
        for k in 0..n {
            for i in 0..inner {
                let slot = &mut data[o * inner + i];
                *slot = f(*slot, x.data[(o * n + k) * inner + i]);
            }
        }
    }
    let mut shape = x.shape.clone();
    if keep {
        shape[axis] = 1;
    } else {
        shape.remove(axis);
    }
    Value::new(shape, data)
}

fn argmax(x: &Value, axis: usize) -> Value {
    let outer: usize = x.shape[..axis].iter().product();
    let n = x.shape[axis];
    let inner: usize = x.shape[axis + 1..].iter().product();
    let mut data = vec![0f32; outer * inner];
    for o in 0..outer {
        for i in 0..inner {
            let (mut best, mut index) = (f32::NEG_INFINITY, 0);
            for k in 0..n {
                let v = x.data[(o * n + k) * inner + i];
                if v > best {
                    (best, index) = (v, k);
                }
            }
            data[o * inner + i] = index as f32;
        }
    }
    let mut shape = x.shape.clone();
    shape[axis] = 1;
    Value::new(shape, data)
}

fn concat<'v>(
    node: &NodeProto,
    get: &dyn Fn(usize) -> Result<&'v Value, ExportError>,
) -> Result<Vec<Value>, ExportError> {
    let parts: Vec<&Value> = (0..node.input.len()).map(get).collect::<Result<_, _>>()?;
    let rank = parts[0].shape.len() as i64;
    let axis = int(node, "axis", 0);
    let axis = if axis < 0 { axis + rank } else { axis } as usize;
    let outer: usize = parts[0].shape[..axis].iter().product();
    let mut shape = parts[0].shape.clone();
    shape[axis] = parts.iter().map(|p| p.shape[axis]).sum();
    let mut data = Vec::with_capacity(shape.iter().product());
    for o in 0..outer {
        for p in &parts {
            let block: usize = p.shape[axis..].iter().product();
            data.extend_from_slice(&p.data[o * block..(o + 1) * block]);
        }
    }
    Ok(vec![Value::new(shape, data)])
}

fn slice<'v>(
    node: &NodeProto,
    get: &dyn Fn(usize) -> Result<&'v Value, ExportError>,
) -> Result<Vec<Value>, ExportError> {
    let x = get(0)?;
    let (starts, ends) = (get(1)?, get(2)?);
    let rank = x.shape.len();
    let axes: Vec<usize> = match get(3) {
        Ok(a) => a.data.iter().map(|&v| if v < 0.0 { (v as i64 + rank as i64) as usize } else { v as usize }).collect(),
        Err(_) => (0..starts.data.len()).collect(),
    };
    let steps: Vec<i64> = get(4).map(|s| s.data.iter().map(|&v| v as i64).collect()).unwrap_or(vec![1; axes.len()]);
    let mut begin = vec![0usize; rank];
    let mut shape = x.shape.clone();
    let mut step = vec![1usize; rank];
    for (k, &axis) in axes.iter().enumerate() {
        if steps[k] < 1 {
            return Err(error(node, "only positive slice steps are supported"));
        }
        let dim = x.shape[axis] as i64;
        let clamp = |v: f32| {
            let v = v as i64;
            (if v < 0 { v + dim } else { v }).clamp(0, dim)
        };
        let (s, e) = (clamp(starts.data[k]), clamp(ends.data[k]));
        begin[axis] = s as usize;
        step[axis] = steps[k] as usize;
        shape[axis] = if e > s { ((e - s) as usize).div_ceil(steps[k] as usize) } else { 0 };
    }
    let (in_strides, out_strides) = (strides_of(&x.shape), strides_of(&shape));
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|i| {
            let offset: usize =
                (0..rank).map(|d| (begin[d] + ((i / out_strides[d]) % shape[d]) * step[d]) * in_strides[d]).sum();
            x.data[offset]
        })
        .collect();
    Ok(vec![Value::new(shape, data)])
}

fn resize_nearest<'v>(
    node: &NodeProto,
    get: &dyn Fn(usize) -> Result<&'v Value, ExportError>,
) -> Result<Vec<Value>, ExportError> {
    let attribute =
        |name: &str| node.attribute.iter().find(|a| a.name == name).map(|a| String::from_utf8_lossy(&a.s).to_string());
    if attribute("mode").as_deref() != Some("nearest")
        || attribute("coordinate_transformation_mode").as_deref() != Some("asymmetric")
        || attribute("nearest_mode").as_deref().is_some_and(|m| m != "floor")
    {
        return Err(error(node, "only nearest, asymmetric, floor resizing is supported"));
    }
    let x = get(0)?;
    if x.shape.len() != 4 {
        return Err(error(node, "only 4-D resizing is supported"));
    }
    let [b, c, h, w] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let (oh, ow) = match get(3) {
        Ok(sizes) => {
            let s = &sizes.data;
            let n = s.len();
            (s[n - 2] as usize, s[n - 1] as usize)
        }
        Err(_) => {
            let scales = get(2)?;
            let n = scales.data.len();
            ((h as f32 * scales.data[n - 2]) as usize, (w as f32 * scales.data[n - 1]) as usize)
        }
    };
    let mut data = Vec::with_capacity(b * c * oh * ow);
    for plane in 0..b * c {
        for y in 0..oh {
            let sy = ((y as f32 * h as f32 / oh as f32).floor() as usize).min(h - 1);
            for xo in 0..ow {
                let sx = ((xo as f32 * w as f32 / ow as f32).floor() as usize).min(w - 1);
                data.push(x.data[(plane * h + sy) * w + sx]);
            }
        }
    }
    Ok(vec![Value::new(vec![b, c, oh, ow], data)])
}
