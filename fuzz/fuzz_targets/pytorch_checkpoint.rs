#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_models::fuzz::pytorch_checkpoint(data));
