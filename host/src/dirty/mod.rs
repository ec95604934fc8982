//! Dirty-page tracking over a set of memory regions.
//!
//! A migration source needs to know which pages of guest memory changed since it last
//! looked. [`DirtyTracker`] is the one interface the migration loop uses for that; two back
//! ends implement it:
//!
//! - [`KvmDirtyTracker`]: the KVM dirty log of a VM's memory slots (`KVM_GET_DIRTY_LOG`, and
//!   `KVM_CLEAR_DIRTY_LOG` when the VM has `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled).
//! - [`UffdWpTracker`]: userfaultfd write-protect over plain process memory, so Ferry can move
//!   a memory region of an ordinary process and the host logic is testable without KVM.
//!
//! [`WithVmmWrites`] wraps either (or any tracker) and adds the pages the VMM wrote itself
//! through its own mapping, which it records in a [`VmmWrites`] (or, with the `vm-memory`
//! feature, which vm-memory's dirty bitmaps record): see [`vmm_writes`].
//!
//! # Geometry
//!
//! Every region is tracked in pages of [`PAGE_SIZE`] bytes, numbered from 0 at the start of
//! the region. Bitmaps are plain `u64` words: page `i` is bit `i % 64` of word `i / 64`, the
//! same geometry as `ferry_core::bitmap`, so a caller may pass the words behind its bitmap
//! directly. A region of `n` pages needs [`bitmap_words`]`(n)` words.
//!
//! # Contract
//!
//! A page is *armed* by [`start`](DirtyTracker::start) and by a
//! [`clear`](DirtyTracker::clear) that covers it. The tracker reports at least every page
//! written after it was last armed (no false negatives); it may report pages that were not
//! written (a false positive costs a resend, never correctness). Precisely:
//!
//! 1. [`start`](DirtyTracker::start) arms every page of every region. Writes that finish
//!    before `start` returns may or may not be reported; the caller's first pass over all
//!    memory, which begins after `start` returns, covers them.
//! 2. [`sync`](DirtyTracker::sync) ORs into `out` pages of one region written since they were
//!    last armed, and returns how many bits it set that were clear in `out`. It never clears
//!    a bit of `out`. A write that completed after its page was armed is reported no later
//!    than by the first sync of that region that starts after the write completed.
//! 3. Once reported, a page may or may not be reported again before it is re-armed: KVM with
//!    manual protect keeps reporting it until `clear`; KVM in classic mode re-arms it as it
//!    reads the log; the userfaultfd back end reports it again only after a `clear` and a new
//!    write. The caller therefore sends every page reported, whatever happens to it later.
//! 4. [`clear`](DirtyTracker::clear) re-arms exactly the pages given. The migration calls it
//!    for exactly the pages it is about to send, *before* reading them, so a write racing
//!    the send is either read by the send or reported by a later sync. Never call it for a
//!    page that is dirty and not about to be sent: the KVM back end forgets such a page.
//! 5. [`stop`](DirtyTracker::stop) disarms tracking and discards anything not yet synced;
//!    the final sync of a migration (guest paused) comes before `stop`.
//!
//! Writes made by the kernel on behalf of the process through pinned pages (for example
//! io_uring receiving into registered buffers), and for KVM writes made by the VMM itself
//! through its own mapping, are not seen by the hardware or fault path the back ends rely
//! on; whoever makes such writes must report them, which [`WithVmmWrites`] is for.

#[cfg(feature = "kvm")]
pub mod kvm;
#[cfg(feature = "uffd-wp")]
pub mod uffd_wp;
#[cfg(feature = "vm-memory")]
mod vm_bitmap;
pub mod vmm_writes;

#[cfg(feature = "kvm")]
pub use kvm::{KvmDirtyTracker, KvmSlot, ManualProtect};
#[cfg(feature = "uffd-wp")]
pub use uffd_wp::{ProcessRegion, UffdWpTracker};
pub use vmm_writes::{VmmWriteLog, VmmWrites, WithVmmWrites};

use std::io;

/// Size in bytes of a tracked page: Ferry's one page size.
pub use crate::ram::PAGE_SIZE;

/// Number of `u64` words a bitmap of `pages` pages needs.
pub const fn bitmap_words(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

/// Errors of the dirty trackers.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// A region index was out of range.
    #[error("region {region} does not exist: the tracker has {regions} regions")]
    NoSuchRegion {
        /// The index asked for.
        region: usize,
        /// The number of regions.
        regions: usize,
    },
    /// A caller's bitmap was too short for the region.
    #[error("bitmap for region {region} has {words} words, the region needs {needed}")]
    BitmapTooSmall {
        /// The region.
        region: usize,
        /// Words given.
        words: usize,
        /// Words needed.
        needed: usize,
    },
    /// A page range did not lie inside the region.
    #[error(
        "pages {first_page}..{first_page}+{count} are outside region {region} of {pages} pages"
    )]
    PagesOutOfRange {
        /// The region.
        region: usize,
        /// First page of the range.
        first_page: u64,
        /// Number of pages in the range.
        count: u64,
        /// Pages in the region.
        pages: u64,
    },
    /// A mask given to `clear_mask` did not start on a 64-page boundary.
    #[error("mask for region {region} starts at page {first_page}, which is not a multiple of 64")]
    MaskMisaligned {
        /// The region.
        region: usize,
        /// The first page given.
        first_page: u64,
    },
    /// A region was empty, not page-aligned, or overlapped another.
    #[error("region {region} is invalid: {reason}")]
    BadRegion {
        /// The region.
        region: usize,
        /// Why.
        reason: &'static str,
    },
    /// An operation needed tracking to be started (or stopped) and it was not.
    #[error("dirty tracking is {state}, so {op} is not allowed")]
    WrongState {
        /// The operation attempted.
        op: &'static str,
        /// The state the tracker was in.
        state: &'static str,
    },
    /// A KVM ioctl failed.
    #[error("KVM {op} failed on slot {slot}: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The memory slot.
        slot: u32,
        /// The error the kernel returned.
        source: vmm_sys_util::errno::Error,
    },
    /// Manual dirty-log protection was required and the kernel does not offer it.
    #[error("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is not available: {reason}")]
    ManualProtectUnavailable {
        /// Why.
        reason: String,
    },
    /// A userfaultfd operation failed.
    #[error("userfaultfd {op} failed at {addr:#x}+{len:#x}: {source}")]
    Uffd {
        /// The operation.
        op: &'static str,
        /// Start of the address range.
        addr: usize,
        /// Length of the range.
        len: usize,
        /// The error the kernel returned.
        source: io::Error,
    },
    /// The kernel's userfaultfd lacks a feature the tracker needs.
    #[error("userfaultfd lacks {feature}, which write-protect tracking needs")]
    UffdFeature {
        /// The missing feature.
        feature: &'static str,
    },
    /// Bytes the VMM marked as written are not all guest RAM.
    #[error("{len:#x} bytes at guest address {gpa:#x} are not all guest RAM")]
    NotGuestRam {
        /// Guest physical address of the first byte.
        gpa: u64,
        /// Number of bytes.
        len: u64,
    },
    /// A system call other than the tracking ioctls failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The call.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The fault-handling thread failed; dirty information since then may be lost, so the
    /// migration must not trust this tracker any more.
    #[error("the write-fault handler failed, dirty tracking is no longer reliable: {reason}")]
    HandlerFailed {
        /// What went wrong.
        reason: String,
    },
}

/// Result type of the dirty trackers.
pub type Result<T> = std::result::Result<T, DirtyError>;

/// Dirty-page tracking over a fixed set of memory regions. See the [module](self) docs for
/// the contract every implementation keeps.
pub trait DirtyTracker: Send {
    /// Short name of the back end, for reports ("kvm-dirty-log", "uffd-wp", ...).
    fn name(&self) -> &str;

    /// Number of regions tracked; regions are numbered `0..regions()`.
    fn regions(&self) -> usize;

    /// Number of [`PAGE_SIZE`] pages in `region` (its bitmap needs
    /// [`bitmap_words`]`(pages)` words).
    fn pages(&self, region: usize) -> Result<u64>;

    /// Arms tracking of every page of every region. Fails if already started.
    fn start(&mut self) -> Result<()>;

    /// ORs the pages of `region` written since they were last armed into `out` (at least
    /// [`bitmap_words`]`(pages)` words; words beyond are untouched) and returns the number of
    /// bits set that were clear in `out` before. Needs tracking started.
    fn sync(&mut self, region: usize, out: &mut [u64]) -> Result<u64>;

    /// Re-arms pages `first_page..first_page + count` of `region`: a later write to any of
    /// them is reported by a later `sync`. Call it for exactly the pages about to be sent,
    /// before reading them. Needs tracking started.
    fn clear(&mut self, region: usize, first_page: u64, count: u64) -> Result<()>;

    /// Re-arms the pages of `region` whose bits are set in `mask`, where bit `b` of
    /// `mask[i]` stands for page `first_page + 64 * i + b`; `first_page` must be a multiple
    /// of 64 and bits past the end of the region are ignored. Same rules as
    /// [`clear`](Self::clear); this form lets a back end re-arm many scattered pages with one
    /// call. The default calls `clear` once per run of set bits.
    fn clear_mask(&mut self, region: usize, first_page: u64, mask: &[u64]) -> Result<()> {
        let pages = self.pages(region)?;
        check_mask(region, first_page, mask, pages)?;
        let end = pages.saturating_sub(first_page);
        for (start, len) in mask_runs(mask, end) {
            self.clear(region, first_page + start, len)?;
        }
        Ok(())
    }

    /// Disarms tracking; anything not yet synced is discarded. Fails if not started.
    fn stop(&mut self) -> Result<()>;
}

/// Checks a `clear_mask` argument.
pub(crate) fn check_mask(region: usize, first_page: u64, mask: &[u64], pages: u64) -> Result<()> {
    if first_page % 64 != 0 {
        return Err(DirtyError::MaskMisaligned { region, first_page });
    }
    if first_page > pages || (first_page == pages && !mask.is_empty()) {
        return Err(DirtyError::PagesOutOfRange {
            region,
            first_page,
            count: mask.len() as u64 * 64,
            pages,
        });
    }
    Ok(())
}

/// Checks that `first_page..first_page + count` lies inside a region of `pages` pages.
pub(crate) fn check_range(region: usize, first_page: u64, count: u64, pages: u64) -> Result<()> {
    match first_page.checked_add(count) {
        Some(end) if end <= pages => Ok(()),
        _ => Err(DirtyError::PagesOutOfRange {
            region,
            first_page,
            count,
            pages,
        }),
    }
}

/// Iterates the runs of set bits in `mask` as `(first, len)` pairs relative to bit 0,
/// ignoring bits at or above `limit`.
pub(crate) fn mask_runs(mask: &[u64], limit: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    let bits = (mask.len() as u64 * 64).min(limit);
    let test = move |i: u64| (mask[(i / 64) as usize] >> (i % 64)) & 1 == 1;
    let mut i = 0u64;
    std::iter::from_fn(move || {
        // Skip clear bits a word at a time where possible.
        while i < bits {
            let w = mask[(i / 64) as usize] >> (i % 64);
            if w == 0 {
                i = (i / 64 + 1) * 64;
            } else {
                i += u64::from(w.trailing_zeros());
                break;
            }
        }
        if i >= bits {
            return None;
        }
        let start = i;
        while i < bits && test(i) {
            i += 1;
        }
        Some((start, i - start))
    })
}

/// ORs `src` into `dst` and returns the number of bits newly set in `dst`.
#[cfg(any(feature = "kvm", feature = "vm-memory", test))]
pub(crate) fn or_into(dst: &mut [u64], src: &[u64]) -> u64 {
    let mut newly = 0u64;
    for (d, s) in dst.iter_mut().zip(src) {
        newly += u64::from((*s & !*d).count_ones());
        *d |= *s;
    }
    newly
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both back ends are usable as `Box<dyn DirtyTracker>` and can move to another thread.
    #[cfg(all(feature = "kvm", feature = "uffd-wp"))]
    #[allow(dead_code)]
    fn boxed(u: UffdWpTracker, k: KvmDirtyTracker) -> [Box<dyn DirtyTracker>; 2] {
        [Box::new(u), Box::new(k)]
    }

    #[test]
    fn runs_of_a_mask() {
        let mask = [0b1011_0000u64, u64::MAX, 1 << 63];
        let runs: Vec<_> = mask_runs(&mask, 1000).collect();
        assert_eq!(runs, vec![(4, 2), (7, 1), (64, 64), (191, 1)]);
        let runs: Vec<_> = mask_runs(&mask, 100).collect();
        assert_eq!(runs, vec![(4, 2), (7, 1), (64, 36)]);
        assert_eq!(mask_runs(&[], 100).count(), 0);
        assert_eq!(mask_runs(&[0, 0], 100).count(), 0);
    }

    #[test]
    fn or_counts_only_new_bits() {
        let mut dst = [0b0110u64, 0];
        assert_eq!(or_into(&mut dst, &[0b1100, 1 << 40]), 2);
        assert_eq!(dst, [0b1110, 1 << 40]);
    }

    #[test]
    fn ranges_and_masks_are_checked() {
        assert!(check_range(0, 0, 10, 10).is_ok());
        assert!(check_range(0, 5, 6, 10).is_err());
        assert!(check_range(0, u64::MAX, 2, 10).is_err());
        assert!(check_mask(0, 64, &[1], 100).is_ok());
        assert!(check_mask(0, 3, &[1], 100).is_err());
        assert!(check_mask(0, 128, &[1], 100).is_err());
    }
}
