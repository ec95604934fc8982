//! ferry-host: drives a Ferry live migration on Linux.
//!
//! - [`memory`]: guest RAM regions (anonymous or memfd, huge pages, populate).
//! - [`dirty`]: dirty tracking behind one trait: the KVM dirty log and
//!   userfaultfd write-protect.
//! - [`source`] and [`destination`]: the two ends of a migration; [`link`]
//!   holds their connections, handshake and return path; [`ram`] the guest
//!   RAM as the migration sees it.
//! - [`postcopy`]: userfaultfd fault service, page installation, the operator
//!   switch.
//! - [`migration`]: the embedding API — callbacks, settings, events, reports.
//! - [`vmm`] and [`kvm_guest`]: the small demo KVM VM and its migration glue.
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
mod uffd_abi;
pub mod vmm;

/// The README's code examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
