//! Fuzz target: arbitrary bytes as a safetensors checkpoint held in memory through our header
//! validation (`check_header_from`, what `Weights::open` runs before mapping a file). When it
//! accepts, the safetensors crate must also parse the same bytes without panicking, and every
//! tensor must load through candle as `Weights::get` would (bounded by the input's size).
#![no_main]

use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use moe_models::loader::check_header_from;
use safetensors::SafeTensors;

fuzz_target!(|data: &[u8]| {
    if check_header_from(data, data.len() as u64, Path::new("<fuzz input>")).is_err() {
        return;
    }
    let Ok(st) = SafeTensors::deserialize(data) else {
        return;
    };
    for (_name, view) in st.tensors() {
        if let Ok(t) = view.load(&Device::Cpu) {
            if matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
                let _ = t.to_dtype(DType::F32);
            }
        }
    }
});
