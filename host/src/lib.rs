//! ferry-host: drives a Ferry live migration on Linux.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::panic))]

pub mod destination;
pub mod dirty;
pub mod kvm_guest;
pub mod link;
pub mod memory;
pub mod migration;
pub mod postcopy;
pub mod ram;
pub mod source;
pub mod vmm;
