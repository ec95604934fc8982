//! ferry-host: drives a Ferry live migration on Linux.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::panic))]
