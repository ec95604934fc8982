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
//!
//! Default features are none: the crate needs only what migrating needs.
//! `kvm` adds the KVM dirty-log tracker, `uffd-wp` the userfaultfd
//! write-protect tracker for plain process memory, `serde` serialisation of
//! the reports. The `ferry` command and its demo VM live in `ferry-cli`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::panic))]

pub mod destination;
pub mod dirty;
pub mod link;
pub mod memory;
pub mod migration;
pub mod postcopy;
pub mod ram;
pub mod source;
#[cfg(feature = "tls")]
pub mod tls;
mod uffd_abi;

/// The README's code examples, compiled as doctests so they stay true. They embed Ferry
/// in a KVM hypervisor on vm-memory, so they need the `kvm` and `vm-memory` features
/// (`cargo test --workspace` has them: `ferry-embed-example` turns them on).
#[cfg(all(doctest, feature = "kvm", feature = "vm-memory"))]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
