//! Fuzz harnesses for ferry-core's wire format, shared with the corpus replay test.
//!
//! This file is also compiled into `core/tests/wire_corpus.rs` (with `#[path]`), so the
//! committed seed corpus runs in `cargo test` without a fuzzer. Every harness panics on
//! a broken invariant; that is how the fuzzer, or the test, reports it.

#[path = "harness.rs"]
mod harness;

pub use harness::*;
