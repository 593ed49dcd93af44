#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_export::fuzz::onnx_model(data));
