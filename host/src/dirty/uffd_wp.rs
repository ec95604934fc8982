//! Dirty tracking of plain process memory through userfaultfd write-protect.
//!
//! The regions are registered with a userfaultfd in write-protect mode. [`start`] protects
//! every page and starts a handler thread. The first write to a protected page blocks the
//! writer and queues a fault; the handler sets the page's bit in a shared atomic bitmap,
//! then removes the protection from that page, which wakes the writer. [`sync`] swaps the
//! atomic words out into the caller's bitmap; [`clear`] protects the given pages again, so
//! their next write is trapped once more; [`stop`] removes all protection and ends the
//! thread.
//!
//! # Why no write is lost
//!
//! The handler sets the bit *before* it unprotects, so every write that got through a trap
//! is preceded by its bit. The one dangerous interleaving is a handler that set a bit, a
//! sync that took it, a `clear` that re-protected the page, and only then the handler's
//! unprotect — leaving the page writable with no bit and no trap. A mutex makes "set bit and
//! unprotect" and "re-protect" mutually exclusive, so after `clear` returns a page is either
//! protected or has its bit set by a handler that ran after the `clear`.
//!
//! # Unpopulated pages
//!
//! Write-protecting a page that is not yet mapped does not trap its first write unless the
//! kernel has `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4). The tracker asks for it; without it,
//! `start` populates the regions first (`MADV_POPULATE_WRITE`, which keeps their contents).
//!
//! # Limits
//!
//! Pages are tracked at 4 KiB. A hugetlbfs-backed region must say its huge page size
//! ([`ProcessRegion::hugetlb`]): its protection unit is the huge page, so a write marks every
//! 4 KiB page of its huge page dirty, and `clear` re-protects the huge pages that hold the
//! pages given (re-protecting more than asked is safe here, unlike with KVM: protection only
//! adds traps and never discards a recorded dirty bit). Shared memory (memfd, shmem) needs
//! `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (Linux 5.19), which the tracker asks for when offered.
//! The handler thread must never write to a tracked region itself. Changes that are not
//! writes through the page tables are not seen: discarding pages (`MADV_DONTNEED`,
//! `munmap`), writes by the kernel through pinned pages (io_uring registered buffers,
//! `O_DIRECT` reads), and writes through another mapping of the same memory that is not
//! registered.
//!
//! [`start`]: DirtyTracker::start
//! [`sync`]: DirtyTracker::sync
//! [`clear`]: DirtyTracker::clear
//! [`stop`]: DirtyTracker::stop

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use libc::c_void;
use userfaultfd::{Event, EventBuffer, FaultKind, FeatureFlags, IoctlFlags, RegisterMode, Uffd};

use super::PAGE_SIZE;
use super::{bitmap_words, check_mask, check_range, mask_runs, DirtyError, DirtyTracker, Result};
use crate::uffd_abi::{io_error, FEATURE_WP_HUGETLBFS_SHMEM, FEATURE_WP_UNPOPULATED};

/// A range of this process's memory to track.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessRegion {
    /// Start address; a multiple of `page_size`.
    pub addr: usize,
    /// Length in bytes; a non-zero multiple of `page_size`.
    pub len: usize,
    /// Size of the mapping's pages, the unit of write protection: [`PAGE_SIZE`] for ordinary
    /// memory (transparent huge pages included), the huge page size for hugetlbfs memory.
    pub page_size: usize,
}

impl ProcessRegion {
    /// A region of ordinary (4 KiB-page or transparent-huge-page) memory.
    pub fn new(addr: usize, len: usize) -> Self {
        ProcessRegion {
            addr,
            len,
            page_size: PAGE_SIZE as usize,
        }
    }

    /// A region of hugetlbfs memory with pages of `page_size` bytes.
    pub fn hugetlb(addr: usize, len: usize, page_size: usize) -> Self {
        ProcessRegion {
            addr,
            len,
            page_size,
        }
    }
}

struct RegionState {
    addr: usize,
    pages: u64,
    /// Protection unit in bytes (a power of two, at least PAGE_SIZE).
    unit: usize,
    bits: Box<[AtomicU64]>,
}

impl RegionState {
    fn len(&self) -> usize {
        (self.pages * PAGE_SIZE) as usize
    }

    /// The byte range of pages `first..first + count`, widened to whole protection units.
    fn unit_range(&self, first: u64, count: u64) -> (usize, usize) {
        let lo = (first * PAGE_SIZE) as usize & !(self.unit - 1);
        let hi = ((first + count) * PAGE_SIZE) as usize;
        let hi = hi.next_multiple_of(self.unit).min(self.len());
        (self.addr + lo, hi - lo)
    }
}

/// State shared with the handler thread.
struct Shared {
    uffd: Uffd,
    regions: Vec<RegionState>,
    /// Serialises "set bit and unprotect" (handler) against "re-protect" (`clear`).
    arm: Mutex<()>,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    faults: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ()> {
        self.arm.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_failed(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            let reason = self
                .failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .unwrap_or_default();
            Err(DirtyError::HandlerFailed { reason })
        } else {
            Ok(())
        }
    }

    /// UFFDIO_WRITEPROTECT of `[addr, addr + len)`: protect if `protect`, else unprotect and
    /// wake any writer blocked on the range.
    fn write_protect(&self, addr: usize, len: usize, protect: bool) -> Result<()> {
        let start = addr as *mut c_void;
        loop {
            let res = if protect {
                self.uffd.write_protect(start, len)
            } else {
                self.uffd.remove_write_protection(start, len, true)
            };
            let Err(e) = res else {
                return Ok(());
            };
            let source = io_error(e);
            // EAGAIN: the address space is changing under us; the kernel asks for a retry.
            if source.raw_os_error() != Some(libc::EAGAIN) {
                return Err(DirtyError::Uffd {
                    op: if protect {
                        "write-protect"
                    } else {
                        "unprotect"
                    },
                    addr,
                    len,
                    source,
                });
            }
        }
    }

    fn unprotect_all(&self) -> Result<()> {
        let mut first = Ok(());
        for r in &self.regions {
            let res = self.write_protect(r.addr, r.len(), false);
            if first.is_ok() {
                first = res;
            }
        }
        first
    }

    /// Records the failure, then unprotects everything so no writer stays blocked. Holds
    /// the arm lock, so no `clear` can protect anything afterwards.
    fn fail(&self, reason: String) {
        let _guard = self.lock();
        *self.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
        self.failed.store(true, Ordering::Release);
        let _ = self.unprotect_all();
    }
}

/// Dirty tracking of this process's memory regions through userfaultfd write-protect.
/// Region `i` of the [`DirtyTracker`] is `regions[i]` as given to [`UffdWpTracker::new`].
pub struct UffdWpTracker {
    shared: Arc<Shared>,
    unpopulated: bool,
    handler: Option<(JoinHandle<()>, OwnedFd)>,
}

impl std::fmt::Debug for UffdWpTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UffdWpTracker")
            .field("regions", &self.shared.regions.len())
            .field("wp_unpopulated", &self.unpopulated)
            .field("started", &self.handler.is_some())
            .finish()
    }
}

/// Opens a userfaultfd (non-blocking, close-on-exec) with `UFFD_FEATURE_PAGEFAULT_FLAG_WP` and
/// those of `UFFD_FEATURE_WP_UNPOPULATED` and `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` the kernel
/// offers; returns it and whether it has `UFFD_FEATURE_WP_UNPOPULATED`.
///
/// The crate's builder does not report the features the kernel offers, so the optional ones
/// are probed: ask for both, then retry without them while the kernel refuses (EINVAL, one
/// new fd per try: the handshake can be done only once per fd).
fn open_uffd() -> Result<(Uffd, bool)> {
    let wp = FeatureFlags::PAGEFAULT_FLAG_WP;
    for optional in [
        FEATURE_WP_UNPOPULATED | FEATURE_WP_HUGETLBFS_SHMEM,
        FEATURE_WP_UNPOPULATED,
        FEATURE_WP_HUGETLBFS_SHMEM,
        FeatureFlags::empty(),
    ] {
        match crate::uffd_abi::open(wp | optional) {
            Ok(uffd) => return Ok((uffd, optional.contains(FEATURE_WP_UNPOPULATED))),
            Err((_, source)) if source.raw_os_error() == Some(libc::EINVAL) => {}
            Err((op, source)) => return Err(DirtyError::Os { op, source }),
        }
    }
    // Refused even with write-protect alone: tell a kernel without it apart from a
    // userfaultfd that cannot be had at all.
    match crate::uffd_abi::open(FeatureFlags::empty()) {
        Ok(_) => Err(DirtyError::UffdFeature {
            feature: "UFFD_FEATURE_PAGEFAULT_FLAG_WP",
        }),
        Err((op, source)) => Err(DirtyError::Os { op, source }),
    }
}

impl UffdWpTracker {
    /// Registers `regions` of this process for write-protect tracking. Tracking is not
    /// started.
    ///
    /// The regions must be mapped private-anonymous, shared (memfd, shmem) or hugetlbfs
    /// memory (described with [`ProcessRegion::hugetlb`]), must not overlap, and must not be
    /// registered with another userfaultfd. While tracking is started, the first write to a
    /// page after it is armed waits for the handler thread (about 10 µs).
    pub fn new(regions: &[ProcessRegion]) -> Result<Self> {
        let page = PAGE_SIZE as usize;
        for (i, r) in regions.iter().enumerate() {
            let reason = if r.len == 0 {
                Some("the region is empty")
            } else if r.page_size < page || !r.page_size.is_power_of_two() {
                Some("the page size is not a power of two of at least 4 KiB")
            } else if r.addr % r.page_size != 0 || r.len % r.page_size != 0 {
                Some("the region is not aligned to its page size")
            } else if r.addr.checked_add(r.len).is_none() {
                Some("the region wraps around the address space")
            } else if regions[..i]
                .iter()
                .any(|o| o.addr < r.addr + r.len && r.addr < o.addr + o.len)
            {
                Some("the region overlaps another")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(DirtyError::BadRegion { region: i, reason });
            }
        }

        let (uffd, unpopulated) = open_uffd()?;

        let mut states = Vec::with_capacity(regions.len());
        for r in regions {
            let ioctls = uffd
                .register_with_mode(r.addr as *mut c_void, r.len, RegisterMode::WRITE_PROTECT)
                .map_err(|e| DirtyError::Uffd {
                    op: "register",
                    addr: r.addr,
                    len: r.len,
                    source: io_error(e),
                })?;
            if !ioctls.contains(IoctlFlags::WRITE_PROTECT) {
                return Err(DirtyError::UffdFeature {
                    feature: "UFFDIO_WRITEPROTECT on this kind of memory",
                });
            }
            let pages = (r.len / page) as u64;
            states.push(RegionState {
                addr: r.addr,
                pages,
                unit: r.page_size,
                bits: (0..bitmap_words(pages))
                    .map(|_| AtomicU64::new(0))
                    .collect(),
            });
        }
        // Closing `uffd` on an early return above unregisters what was registered.
        Ok(UffdWpTracker {
            shared: Arc::new(Shared {
                uffd,
                regions: states,
                arm: Mutex::new(()),
                failed: AtomicBool::new(false),
                failure: Mutex::new(None),
                faults: AtomicU64::new(0),
            }),
            unpopulated,
            handler: None,
        })
    }

    /// Whether the kernel traps the first write to a never-touched page
    /// (`UFFD_FEATURE_WP_UNPOPULATED`); without it `start` populates the regions.
    pub fn wp_unpopulated(&self) -> bool {
        self.unpopulated
    }

    /// Number of write faults handled since the tracker was created.
    pub fn faults(&self) -> u64 {
        self.shared.faults.load(Ordering::Relaxed)
    }

    /// Whether tracking is started.
    pub fn is_started(&self) -> bool {
        self.handler.is_some()
    }

    fn region(&self, region: usize) -> Result<&RegionState> {
        self.shared
            .regions
            .get(region)
            .ok_or(DirtyError::NoSuchRegion {
                region,
                regions: self.shared.regions.len(),
            })
    }

    fn require_started(&self, op: &'static str) -> Result<()> {
        if self.handler.is_some() {
            Ok(())
        } else {
            Err(DirtyError::WrongState {
                op,
                state: "stopped",
            })
        }
    }

    /// Ends the handler thread (after everything is unprotected).
    fn end_handler(&mut self) -> Result<()> {
        let Some((thread, stop)) = self.handler.take() else {
            return Ok(());
        };
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one` to the eventfd we own.
        let ret = unsafe { libc::write(stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        let signalled = if ret == 8 {
            Ok(())
        } else {
            Err(DirtyError::Os {
                op: "write to the handler's stop eventfd",
                source: io::Error::last_os_error(),
            })
        };
        signalled?;
        thread.join().map_err(|_| DirtyError::HandlerFailed {
            reason: "the handler thread panicked".into(),
        })
    }
}

/// The handler thread: serve write faults until `stop` becomes readable.
fn handle_faults(shared: &Shared, stop: RawFd) {
    const BATCH: usize = 64;
    let mut msgs = EventBuffer::new(BATCH);
    let mut pages: Vec<(usize, usize)> = Vec::with_capacity(BATCH);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: shared.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            shared.fail(format!("poll on the userfaultfd failed: {e}"));
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            shared.fail(format!(
                "the userfaultfd reported poll events {:#x}",
                fds[0].revents
            ));
            return;
        }
        // Nothing queued (EAGAIN) is an empty batch, and a read of nothing is treated alike.
        let events = match shared.uffd.read_events(&mut msgs) {
            Ok(events) => events,
            Err(userfaultfd::Error::ReadEof) => continue,
            Err(e) => {
                let e = io_error(e);
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                shared.fail(format!("reading the userfaultfd failed: {e}"));
                return;
            }
        };
        pages.clear();
        // Other events (none is asked for) and unknown ones are skipped.
        for event in events {
            if let Ok(Event::Pagefault {
                kind: FaultKind::WriteProtected,
                addr,
                ..
            }) = event
            {
                let addr = addr as usize;
                match shared
                    .regions
                    .iter()
                    .position(|r| addr >= r.addr && addr < r.addr + r.len())
                {
                    Some(i) => pages.push((addr & !(shared.regions[i].unit - 1), i)),
                    // Not ours (cannot happen: only our ranges are registered); unprotect
                    // the base page so the writer does not hang.
                    None => pages.push((addr & !(PAGE_SIZE as usize - 1), usize::MAX)),
                }
            }
        }
        if pages.is_empty() {
            continue;
        }
        let guard = shared.lock();
        for &(addr, region) in &pages {
            if let Some(r) = shared.regions.get(region) {
                let first = ((addr - r.addr) as u64) / PAGE_SIZE;
                set_bits_atomic(&r.bits, first, r.unit as u64 / PAGE_SIZE);
            }
        }
        for &(addr, region) in &pages {
            let unit = shared
                .regions
                .get(region)
                .map_or(PAGE_SIZE as usize, |r| r.unit);
            if let Err(e) = shared.write_protect(addr, unit, false) {
                drop(guard);
                shared.fail(e.to_string());
                return;
            }
        }
        drop(guard);
        shared
            .faults
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
    }
}

impl DirtyTracker for UffdWpTracker {
    fn name(&self) -> &str {
        "uffd-wp"
    }

    fn regions(&self) -> usize {
        self.shared.regions.len()
    }

    fn pages(&self, region: usize) -> Result<u64> {
        Ok(self.region(region)?.pages)
    }

    fn start(&mut self) -> Result<()> {
        if self.handler.is_some() {
            return Err(DirtyError::WrongState {
                op: "start",
                state: "started",
            });
        }
        let shared = &self.shared;
        if !self.unpopulated {
            for r in &shared.regions {
                let len = r.len();
                // SAFETY: populating maps every page of the registered region as if written,
                // without changing its contents; the caller said the range is mapped memory.
                let ret = unsafe {
                    libc::madvise(r.addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE)
                };
                if ret != 0 {
                    return Err(DirtyError::Uffd {
                        op: "populate (MADV_POPULATE_WRITE)",
                        addr: r.addr,
                        len,
                        source: io::Error::last_os_error(),
                    });
                }
            }
        }
        for r in &shared.regions {
            for w in r.bits.iter() {
                w.store(0, Ordering::Relaxed);
            }
        }
        *shared
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        shared.failed.store(false, Ordering::Release);

        // SAFETY: eventfd takes an initial value and flags and returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(DirtyError::Os {
                op: "eventfd",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `efd` is a new descriptor that nothing else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let raw_stop = stop.as_raw_fd();
        let for_thread = Arc::clone(shared);
        let thread = std::thread::Builder::new()
            .name("ferry-uffd-wp".into())
            .spawn(move || handle_faults(&for_thread, raw_stop))
            .map_err(|source| DirtyError::Os {
                op: "spawning the write-fault handler",
                source,
            })?;
        self.handler = Some((thread, stop));

        let protected = {
            let _guard = self.shared.lock();
            let mut res = Ok(());
            for r in &self.shared.regions {
                res = self.shared.write_protect(r.addr, r.len(), true);
                if res.is_err() {
                    let _ = self.shared.unprotect_all();
                    break;
                }
            }
            res
        };
        if protected.is_err() {
            let _ = self.end_handler();
        }
        protected
    }

    fn sync(&mut self, region: usize, out: &mut [u64]) -> Result<u64> {
        self.require_started("sync")?;
        let r = self.region(region)?;
        let words = r.bits.len();
        if out.len() < words {
            return Err(DirtyError::BitmapTooSmall {
                region,
                words: out.len(),
                needed: words,
            });
        }
        let mut newly = 0u64;
        for (w, o) in r.bits.iter().zip(out.iter_mut()) {
            if w.load(Ordering::Relaxed) != 0 {
                let v = w.swap(0, Ordering::AcqRel);
                newly += u64::from((v & !*o).count_ones());
                *o |= v;
            }
        }
        // A failure means writes may have gone untracked: do not let this sync look complete.
        self.shared.check_failed()?;
        Ok(newly)
    }

    fn clear(&mut self, region: usize, first_page: u64, count: u64) -> Result<()> {
        self.require_started("clear")?;
        let r = self.region(region)?;
        check_range(region, first_page, count, r.pages)?;
        if count == 0 {
            return Ok(());
        }
        let (addr, len) = r.unit_range(first_page, count);
        let _guard = self.shared.lock();
        self.shared.check_failed()?;
        self.shared.write_protect(addr, len, true)
    }

    fn clear_mask(&mut self, region: usize, first_page: u64, mask: &[u64]) -> Result<()> {
        self.require_started("clear")?;
        let r = self.region(region)?;
        check_mask(region, first_page, mask, r.pages)?;
        let _guard = self.shared.lock();
        self.shared.check_failed()?;
        for (start, len) in mask_runs(mask, r.pages - first_page) {
            let (addr, len) = r.unit_range(first_page + start, len);
            self.shared.write_protect(addr, len, true)?;
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        self.require_started("stop")?;
        let unprotected = {
            let _guard = self.shared.lock();
            self.shared.unprotect_all()
        };
        let ended = self.end_handler();
        unprotected?;
        ended?;
        self.shared.check_failed()
    }
}

/// Sets bits `first..first + count` of an atomic bitmap.
fn set_bits_atomic(words: &[AtomicU64], first: u64, count: u64) {
    let mut i = first;
    let end = first + count;
    while i < end {
        let b = i % 64;
        let n = (64 - b).min(end - i);
        let bits = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << b
        };
        if let Some(w) = words.get((i / 64) as usize) {
            w.fetch_or(bits, Ordering::Release);
        }
        i += n;
    }
}

impl Drop for UffdWpTracker {
    fn drop(&mut self) {
        if self.handler.is_some() {
            let _ = self.shared.unprotect_all();
            let _ = self.end_handler();
        }
        for r in &self.shared.regions {
            // Unregistering wakes any blocked writer.
            let _ = self.shared.uffd.unregister(r.addr as *mut c_void, r.len());
        }
    }
}
