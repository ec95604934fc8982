//! Dirty tracking through the KVM dirty log.
//!
//! [`KvmDirtyTracker::start`] re-registers each memory slot with `KVM_MEM_LOG_DIRTY_PAGES`;
//! [`sync`](DirtyTracker::sync) reads the slot's log with `KVM_GET_DIRTY_LOG`.
//!
//! Two kernel modes exist, and the tracker follows the one the VM is in:
//!
//! - **Manual protect** (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled on the VM): reading the
//!   log does not re-protect anything; a page stays dirty in the log, and writable for the
//!   guest, until `KVM_CLEAR_DIRTY_LOG` clears its bit and write-protects it again.
//!   [`clear`](DirtyTracker::clear) issues exactly that, so only pages about to be sent are
//!   re-armed, just before they are read.
//! - **Classic**: `KVM_GET_DIRTY_LOG` clears the log and re-protects every reported page as it
//!   reads. `clear` has nothing left to do and only checks its arguments. Correct, but a page
//!   written between the sync and its send is sent twice.
//!
//! # Alignment of `KVM_CLEAR_DIRTY_LOG`
//!
//! The kernel wants `first_page` a multiple of 64 and `num_pages` a multiple of 64 unless the
//! range ends at the end of the slot. It then clears only the pages whose bits are set in the
//! bitmap passed with the call. The tracker therefore widens the *window* outward to the
//! 64-page boundaries (clamped to the slot's end) but sets bits for exactly the pages asked
//! for: no page outside the caller's range is ever cleared, whatever state it is in. Widening
//! the cleared set itself would be wrong: a dirty page next to a sent run, not yet sent, would
//! lose its dirty bit and its write would never reach the destination.
//!
//! With `KVM_DIRTY_LOG_INITIALLY_SET` (manual protect only) the kernel marks every page dirty
//! when logging starts instead of write-protecting them all; the first sync then reports the
//! whole slot, which the first pass sends and clears chunk by chunk.

use std::borrow::Borrow;
use std::os::raw::{c_ulong, c_void};
use std::sync::Arc;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, kvm_userspace_memory_region,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::{ioctl_with_ref, ioctl_with_val};

use super::{
    bitmap_words, check_mask, check_range, or_into, DirtyError, DirtyTracker, Result, PAGE_SIZE,
};

/// The KVM ioctl type byte.
const KVMIO: u32 = 0xAE;

mod ioctls {
    use super::{kvm_clear_dirty_log, kvm_dirty_log, KVMIO};
    vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    vmm_sys_util::ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
}

/// Largest number of pages passed to one `KVM_CLEAR_DIRTY_LOG` (its count is 32 bits; a
/// multiple of 64 keeps every chunk but the last aligned).
const CLEAR_CHUNK_PAGES: u64 = 1 << 30;

/// One KVM memory slot, exactly as the VM's owner registered it with
/// `KVM_SET_USER_MEMORY_REGION`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmSlot {
    /// Slot id (including the address-space id in bits 16..).
    pub slot: u32,
    /// Guest physical address of the slot's first byte.
    pub guest_phys_addr: u64,
    /// Size in bytes; a multiple of [`PAGE_SIZE`].
    pub memory_size: u64,
    /// Address of the slot's memory in this process.
    pub userspace_addr: u64,
    /// The slot's flags without `KVM_MEM_LOG_DIRTY_PAGES` (e.g. `KVM_MEM_READONLY`).
    pub flags: u32,
}

/// Which dirty-log mode to use: manual protect (`KVM_CLEAR_DIRTY_LOG`) or classic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManualProtect {
    /// Classic mode: `KVM_GET_DIRTY_LOG` clears as it reads. Choose this only if the VM has
    /// not enabled manual protect (the kernel offers no way to ask).
    Off,
    /// The VM's creator already enabled `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with
    /// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`, and `KVM_DIRTY_LOG_INITIALLY_SET` if
    /// `initially_set`.
    AlreadyEnabled {
        /// Whether `KVM_DIRTY_LOG_INITIALLY_SET` was enabled too.
        initially_set: bool,
    },
    /// Enable manual protect (without `INITIALLY_SET`) if the kernel offers it, otherwise
    /// use classic mode.
    EnableIfSupported,
    /// Enable manual protect (without `INITIALLY_SET`); fail if the kernel does not offer it.
    Require,
}

/// Dirty tracking of a KVM VM's memory slots through the KVM dirty log. Region `i` of the
/// [`DirtyTracker`] is `slots[i]`.
///
/// `V` is how the tracker holds the VM: `Arc<VmFd>` (the default) or `&VmFd`.
pub struct KvmDirtyTracker<V: Borrow<VmFd> = Arc<VmFd>> {
    vm: V,
    slots: Vec<KvmSlot>,
    manual: bool,
    initially_set: bool,
    started: bool,
    /// Scratch bitmap as large as the largest slot's log.
    scratch: Vec<u64>,
}

impl<V: Borrow<VmFd>> std::fmt::Debug for KvmDirtyTracker<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmDirtyTracker")
            .field("slots", &self.slots)
            .field("manual", &self.manual)
            .field("initially_set", &self.initially_set)
            .field("started", &self.started)
            .finish()
    }
}

/// Returns the manual-protect flags the kernel offers for `vm` (0 if none).
pub(crate) fn manual_protect_caps(vm: &VmFd) -> u64 {
    // SAFETY: KVM_CHECK_EXTENSION takes an integer argument and only returns a value; `vm`
    // is a valid VM file descriptor.
    let ret = unsafe {
        ioctl_with_val(
            vm,
            ioctls::KVM_CHECK_EXTENSION(),
            c_ulong::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
        )
    };
    u64::try_from(ret).unwrap_or(0)
}

impl<V: Borrow<VmFd>> KvmDirtyTracker<V> {
    /// Creates a tracker for `slots` of `vm`, setting up manual protect as `protect` says.
    /// Tracking is not started.
    ///
    /// # Safety
    ///
    /// Each slot must describe exactly a memory slot registered on `vm` (same id, guest
    /// address, size, user address and flags): `start` and `stop` re-register the slots with
    /// these values and only the dirty-log flag changed, and a wrong value would move or
    /// resize the slot, or point it at memory that is not the guest's. The memory must stay
    /// mapped, and the slots unchanged by anyone else, for as long as the tracker exists.
    pub unsafe fn new(vm: V, slots: Vec<KvmSlot>, protect: ManualProtect) -> Result<Self> {
        for (i, s) in slots.iter().enumerate() {
            let reason = if s.memory_size == 0 {
                Some("the slot is empty")
            } else if s.memory_size % PAGE_SIZE != 0 || s.guest_phys_addr % PAGE_SIZE != 0 {
                Some("the slot is not page-aligned")
            } else if s.flags & KVM_MEM_LOG_DIRTY_PAGES != 0 {
                Some("the slot flags already include KVM_MEM_LOG_DIRTY_PAGES")
            } else if slots[..i].iter().any(|o| o.slot == s.slot) {
                Some("the slot id appears twice")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(DirtyError::BadRegion { region: i, reason });
            }
        }
        let (manual, initially_set) = match protect {
            ManualProtect::Off => (false, false),
            ManualProtect::AlreadyEnabled { initially_set } => (true, initially_set),
            ManualProtect::EnableIfSupported | ManualProtect::Require => {
                let caps = manual_protect_caps(vm.borrow());
                let offered = caps & u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) != 0;
                if offered {
                    let mut cap = kvm_enable_cap {
                        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                        ..Default::default()
                    };
                    cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
                    match vm.borrow().enable_cap(&cap) {
                        Ok(()) => (true, false),
                        Err(e) if protect == ManualProtect::Require => {
                            return Err(DirtyError::ManualProtectUnavailable {
                                reason: format!("enabling it failed: {e}"),
                            })
                        }
                        Err(_) => (false, false),
                    }
                } else if protect == ManualProtect::Require {
                    return Err(DirtyError::ManualProtectUnavailable {
                        reason: format!("the kernel offers flags {caps:#x}"),
                    });
                } else {
                    (false, false)
                }
            }
        };
        let words = slots
            .iter()
            .map(|s| bitmap_words(s.memory_size / PAGE_SIZE))
            .max()
            .unwrap_or(0);
        Ok(KvmDirtyTracker {
            vm,
            slots,
            manual,
            initially_set: initially_set && manual,
            started: false,
            scratch: vec![0; words],
        })
    }

    /// Whether the tracker uses manual protect (`KVM_CLEAR_DIRTY_LOG`).
    pub fn manual_protect(&self) -> bool {
        self.manual
    }

    /// Whether the kernel marks every page dirty when logging starts
    /// (`KVM_DIRTY_LOG_INITIALLY_SET`).
    pub fn initially_set(&self) -> bool {
        self.initially_set
    }

    /// The slots tracked, region `i` being `slots()[i]`.
    pub fn slots(&self) -> &[KvmSlot] {
        &self.slots
    }

    /// Whether tracking is started.
    pub fn is_started(&self) -> bool {
        self.started
    }

    fn slot(&self, region: usize) -> Result<KvmSlot> {
        self.slots
            .get(region)
            .copied()
            .ok_or(DirtyError::NoSuchRegion {
                region,
                regions: self.slots.len(),
            })
    }

    fn require_started(&self, op: &'static str) -> Result<()> {
        if self.started {
            Ok(())
        } else {
            Err(DirtyError::WrongState {
                op,
                state: "stopped",
            })
        }
    }

    /// Re-registers `slot` with `flags`.
    fn set_flags(&self, slot: &KvmSlot, flags: u32) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot: slot.slot,
            flags,
            guest_phys_addr: slot.guest_phys_addr,
            memory_size: slot.memory_size,
            userspace_addr: slot.userspace_addr,
        };
        // SAFETY: `new`'s contract says this slot is registered with exactly these addresses
        // and size and that the memory stays mapped; only the dirty-log flag differs, which
        // changes how KVM tracks the slot, not what memory it maps.
        unsafe { self.vm.borrow().set_user_memory_region(region) }.map_err(|source| {
            DirtyError::Kvm {
                op: "KVM_SET_USER_MEMORY_REGION",
                slot: slot.slot,
                source,
            }
        })
    }

    /// `KVM_CLEAR_DIRTY_LOG` of `num_pages` pages from `first_page` (a multiple of 64), with
    /// `mask` (at least `bitmap_words(num_pages)` words) saying which ones.
    fn clear_log(&self, slot: u32, first_page: u64, num_pages: u64, mask: &[u64]) -> Result<()> {
        let mut done = 0u64;
        while done < num_pages {
            let n = (num_pages - done).min(CLEAR_CHUNK_PAGES);
            let words = &mask[(done / 64) as usize..][..bitmap_words(n)];
            if words.iter().any(|&w| w != 0) {
                let log = kvm_clear_dirty_log {
                    slot,
                    // `n` is at most CLEAR_CHUNK_PAGES, which fits.
                    num_pages: n as u32,
                    first_page: first_page + done,
                    __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                        dirty_bitmap: words.as_ptr() as *mut c_void,
                    },
                };
                // SAFETY: `log` points at `words`, which holds at least one bit per page of
                // the range; KVM_CLEAR_DIRTY_LOG only reads that bitmap (it is declared
                // mutable in the ABI only). `self.vm` is a valid VM fd.
                let ret = unsafe {
                    ioctl_with_ref(self.vm.borrow(), ioctls::KVM_CLEAR_DIRTY_LOG(), &log)
                };
                if ret != 0 {
                    return Err(DirtyError::Kvm {
                        op: "KVM_CLEAR_DIRTY_LOG",
                        slot,
                        source: kvm_ioctls::Error::last(),
                    });
                }
            }
            done += n;
        }
        Ok(())
    }
}

impl<V: Borrow<VmFd> + Send> DirtyTracker for KvmDirtyTracker<V> {
    fn name(&self) -> &str {
        if self.manual {
            "kvm-dirty-log-manual-protect"
        } else {
            "kvm-dirty-log"
        }
    }

    fn regions(&self) -> usize {
        self.slots.len()
    }

    fn pages(&self, region: usize) -> Result<u64> {
        Ok(self.slot(region)?.memory_size / PAGE_SIZE)
    }

    fn start(&mut self) -> Result<()> {
        if self.started {
            return Err(DirtyError::WrongState {
                op: "start",
                state: "started",
            });
        }
        for i in 0..self.slots.len() {
            let s = self.slots[i];
            if let Err(e) = self.set_flags(&s, s.flags | KVM_MEM_LOG_DIRTY_PAGES) {
                // Undo the slots already switched; the first error is the one to report.
                for done in &self.slots[..i] {
                    let _ = self.set_flags(done, done.flags);
                }
                return Err(e);
            }
        }
        self.started = true;
        Ok(())
    }

    fn sync(&mut self, region: usize, out: &mut [u64]) -> Result<u64> {
        self.require_started("sync")?;
        let s = self.slot(region)?;
        let words = bitmap_words(s.memory_size / PAGE_SIZE);
        if out.len() < words {
            return Err(DirtyError::BitmapTooSmall {
                region,
                words: out.len(),
                needed: words,
            });
        }
        let buf = &mut self.scratch[..words];
        let log = kvm_dirty_log {
            slot: s.slot,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: buf.as_mut_ptr() as *mut c_void,
            },
        };
        // SAFETY: KVM writes one bit per page of the slot, rounded up to whole u64 words,
        // which is exactly `words` words; `buf` is that long and exclusively borrowed.
        let ret = unsafe { ioctl_with_ref(self.vm.borrow(), ioctls::KVM_GET_DIRTY_LOG(), &log) };
        if ret != 0 {
            return Err(DirtyError::Kvm {
                op: "KVM_GET_DIRTY_LOG",
                slot: s.slot,
                source: kvm_ioctls::Error::last(),
            });
        }
        Ok(or_into(&mut out[..words], &self.scratch[..words]))
    }

    fn clear(&mut self, region: usize, first_page: u64, count: u64) -> Result<()> {
        self.require_started("clear")?;
        let s = self.slot(region)?;
        let pages = s.memory_size / PAGE_SIZE;
        check_range(region, first_page, count, pages)?;
        if !self.manual || count == 0 {
            return Ok(());
        }
        // Window widened to 64-page boundaries, clamped to the slot; bits only for the pages
        // asked for.
        let lo = first_page & !63;
        let end = first_page + count;
        let hi = end.next_multiple_of(64).min(pages);
        let words = bitmap_words(hi - lo);
        let mut mask = std::mem::take(&mut self.scratch);
        mask[..words].fill(0);
        set_bits(&mut mask[..words], first_page - lo, count);
        let result = self.clear_log(s.slot, lo, hi - lo, &mask[..words]);
        self.scratch = mask;
        result
    }

    fn clear_mask(&mut self, region: usize, first_page: u64, mask: &[u64]) -> Result<()> {
        self.require_started("clear")?;
        let s = self.slot(region)?;
        let pages = s.memory_size / PAGE_SIZE;
        check_mask(region, first_page, mask, pages)?;
        if !self.manual {
            return Ok(());
        }
        let n = (mask.len() as u64 * 64).min(pages - first_page);
        let words = bitmap_words(n);
        let mut buf = std::mem::take(&mut self.scratch);
        buf[..words].copy_from_slice(&mask[..words]);
        if n % 64 != 0 {
            buf[words - 1] &= (1u64 << (n % 64)) - 1;
        }
        let result = self.clear_log(s.slot, first_page, n, &buf[..words]);
        self.scratch = buf;
        result
    }

    fn stop(&mut self) -> Result<()> {
        self.require_started("stop")?;
        let mut first_err = None;
        for s in &self.slots {
            if let Err(e) = self.set_flags(s, s.flags) {
                first_err.get_or_insert(e);
            }
        }
        self.started = false;
        first_err.map_or(Ok(()), Err)
    }
}

impl<V: Borrow<VmFd>> Drop for KvmDirtyTracker<V> {
    fn drop(&mut self) {
        if self.started {
            // Leaving logging on would only slow the guest; nothing to report it to here.
            for s in &self.slots {
                let _ = self.set_flags(s, s.flags);
            }
        }
    }
}

/// Sets bits `first..first + count` of `words`.
fn set_bits(words: &mut [u64], first: u64, count: u64) {
    let mut i = first;
    let end = first + count;
    while i < end {
        let w = (i / 64) as usize;
        let b = i % 64;
        let n = (64 - b).min(end - i);
        let bits = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << b
        };
        words[w] |= bits;
        i += n;
    }
}

#[cfg(test)]
mod tests {
    use super::set_bits;

    #[test]
    fn set_bits_covers_exactly_the_range() {
        for first in [0u64, 1, 63, 64, 65, 100] {
            for count in [0u64, 1, 2, 63, 64, 65, 130] {
                let mut w = [0u64; 6];
                set_bits(&mut w, first, count);
                for i in 0..384u64 {
                    let set = (w[(i / 64) as usize] >> (i % 64)) & 1 == 1;
                    assert_eq!(set, i >= first && i < first + count, "{first} {count} {i}");
                }
            }
        }
    }
}
