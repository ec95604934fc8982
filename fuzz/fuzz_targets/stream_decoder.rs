//! Fuzz target `stream_decoder`: see `ferry_fuzz::stream_decoder` for the input format and the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry_fuzz::stream_decoder(data);
});
