//! libFuzzer target over the library path of `onnxq dump` and `onnxq quantize` (decode → load →
//! validate → dump → weights-only and static quantization, outputs re-loaded and validated),
//! with the in-suite fuzzer's protobuf-aware mutator mixed with libFuzzer's own.
//! A panic, or a quantized output that does not load, is a crash.

#![no_main]

use libfuzzer_sys::{fuzz_mutator, fuzz_target};
use std::path::Path;

#[path = "../../tests/hostile/fuzz.rs"]
#[allow(dead_code)]
mod harness;

fuzz_target!(|data: &[u8]| {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/corpus"));
    if let harness::Outcome::Invalid(e) = harness::exercise(data, dir) {
        panic!("quantize wrote an invalid model: {e}");
    }
});

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let mut rng = harness::Rng::new(u64::from(seed));
    if rng.below(2) == 0 {
        return libfuzzer_sys::fuzzer_mutate(data, size, max_size);
    }
    let out = harness::mutate(&mut rng, &data[..size]);
    if out.len() > max_size {
        return libfuzzer_sys::fuzzer_mutate(data, size, max_size);
    }
    data[..out.len()].copy_from_slice(&out);
    out.len()
});
