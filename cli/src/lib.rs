//! ferry-cli: the `ferry` command and the small demo KVM VM it migrates.
//!
//! This crate shows Ferry working on a real guest; a hypervisor embeds
//! `ferry-host` instead and never pulls in what lives here (the command line,
//! progress bars, JSON, the demo VMM and its guest workload).
//!
//! - [`vmm`]: a small real KVM VM whose ring-3 guest fills its RAM, dirties
//!   it at a chosen rate and verifies it on request.
//! - [`kvm_guest`]: that VM as a migratable guest: the callbacks a migration
//!   needs and its KVM dirty-log tracker.
//! - [`operator`]: exit codes, and holding a guest until the operator decides.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::panic))]

pub mod kvm_guest;
pub mod operator;
pub mod vmm;
