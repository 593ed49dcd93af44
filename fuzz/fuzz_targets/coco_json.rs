#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_data::fuzz::coco_json(data));
