//! Fuzz target of kiln's ONNX reader: any bytes parsed as an ONNX model and its initializers
//! decoded by kiln's interpreter must end in `Ok` or `Err`, without a panic or unbounded memory.
//! Run by cargo-fuzz (`fuzz/`) and on stable by `tests/fuzz.rs`.

use onnx_ir::Message;

pub fn onnx_model(data: &[u8]) {
    let Ok(model) = onnx_ir::ModelProto::parse_from_bytes(data) else { return };
    let Some(graph) = model.graph.as_ref() else { return };
    let _ = crate::interpreter::Interpreter::new(graph, &kiln_models::device::cpu());
}
