//! Fuzz target `roundtrip`: see `ferry_fuzz::roundtrip` for the input format and the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry_fuzz::roundtrip(data);
});
