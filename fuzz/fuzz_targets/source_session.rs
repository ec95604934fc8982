//! Fuzz target `source_session`: see `ferry_fuzz::source_session` for the input format and the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry_fuzz::source_session(data);
});
