//! Fuzz target `return_path`: see `ferry_fuzz::return_path` for the input format and the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry_fuzz::return_path(data);
});
