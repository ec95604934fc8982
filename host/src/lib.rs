//! ferry-host: drives a Ferry live migration on Linux.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::panic))]

pub mod dirty;
pub mod memory;
pub mod vmm;
pub mod destination;
pub mod kvm_guest;
pub mod link;
pub mod migration;
pub mod ram;
pub mod source;
