//! ferry-core: the sans-IO heart of the Ferry live-migration engine.
//!
//! `#![no_std]` and without `alloc`: every buffer is owned by the caller. Callers
//! hand it bytes, bitmaps and clock readings; it hands back records, decisions and
//! byte counts. Nothing here knows of Linux, sockets or threads.
//!
//! - [`bitmap`]: the dirty bitmap of one memory region and its fast scan.
//! - [`pending`]: pending bytes in three classes, per section and summed.
//! - [`policy`]: the iterate / complete / switch-over decision.
//! - [`state`]: the migration state machine.
//! - [`session`]: the protocol as sans-IO source and destination sessions.
//! - [`rate`]: bandwidth and dirty-rate estimators, the switchover threshold.
//! - [`wire`]: stream and return-path records.
#![no_std]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::panic))]

pub mod bitmap;
pub mod pending;
pub mod policy;
pub mod rate;
pub mod session;
pub mod state;
pub mod wire;
