//! ferry-benches: shared helpers for the benchmark programs.
