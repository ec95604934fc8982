//! A `#![no_std]` static library that links ferry-core and provides its own
//! panic handler and no global allocator.
//!
//! If ferry-core (or anything it depends on) pulls in `std`, the build fails
//! with a duplicate `panic_impl` lang item; if it pulls in `alloc`, it fails for
//! want of a global allocator. `make test` builds it, so CI keeps core honest.
//! The exported functions make sure the core code paths are really linked.
#![no_std]

use core::panic::PanicInfo;

use ferry_core::bitmap::DirtyBitmap;
use ferry_core::pending::Pending;
use ferry_core::policy::{decide, Capabilities, Decision, Inputs};
use ferry_core::rate::{threshold, RateEstimator, DEFAULT_WINDOW_NS};

/// Decides on a remainder of `compatible` bytes after `elapsed_ns` of sending
/// `sent` bytes with a `limit_ns` downtime limit: 0 iterate, 1 complete,
/// 2 switch over, 3 error.
#[no_mangle]
pub extern "C" fn ferry_proof_decide(compatible: u64, sent: u64, elapsed_ns: u64, limit_ns: u64) -> u32 {
    let mut bw = RateEstimator::<16>::new(DEFAULT_WINDOW_NS);
    if bw.record(sent, 0, elapsed_ns).is_err() {
        return 3;
    }
    let inputs = Inputs {
        pending: Pending::new(0, compatible, 0),
        previous: None,
        threshold: threshold(bw.bytes_per_sec(), limit_ns),
        floor: 4096,
        caps: Capabilities::default(),
        start_postcopy: false,
        in_postcopy: false,
        can_switchover: true,
    };
    match decide(&inputs) {
        Ok(Decision::Iterate) => 0,
        Ok(Decision::Complete) => 1,
        Ok(Decision::Switchover { .. }) => 2,
        Err(_) => 3,
    }
}

/// Sets every page of a `pages`-page bitmap over `words` (caller-owned) and
/// counts the runs of at most `max_run` pages taken back out of it; returns
/// `u64::MAX` when the words are too few.
///
/// # Safety
///
/// `words` must point to `len` writable `u64`s.
#[no_mangle]
pub unsafe extern "C" fn ferry_proof_runs(words: *mut u64, len: usize, pages: usize, max_run: usize) -> u64 {
    if words.is_null() {
        return u64::MAX;
    }
    // SAFETY: the caller promises `len` writable words at `words`.
    let words = unsafe { core::slice::from_raw_parts_mut(words, len) };
    let Ok(mut bm) = DirtyBitmap::new(words, pages) else {
        return u64::MAX;
    };
    bm.set_all();
    bm.drain_runs(max_run).count() as u64
}

#[panic_handler]
fn panic(_info: &PanicInfo<'_>) -> ! {
    loop {}
}
