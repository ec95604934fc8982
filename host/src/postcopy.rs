//! Postcopy: the operator's switch, the destination's userfaultfd fault
//! service, and atomic page installation.
//!
//! On the destination, guest RAM that has not arrived intact at switchover is
//! left *missing* (never populated, or zapped with `MADV_DONTNEED`) inside a
//! userfaultfd registration in MISSING mode. [`FaultService`] reads the
//! faults, turns each into a page request on the urgent channel and times it;
//! [`PageInstaller`] installs every page exactly once, whichever path brings
//! it first (urgent reply or background stream): with `UFFDIO_COPY`, which
//! places the page and wakes its waiters atomically. `EEXIST` (the other path
//! won the race) counts as installed, and the range is woken anyway, so a
//! fault is never left waiting.
//!
//! Before switchover (the guest does not run on the destination yet) pages
//! are plain copies into guest memory; a [`Discard`](ferry_core::wire::Repr)
//! clears a page's *received* bit, and arming zaps every page whose bit is
//! clear.
//!
//! On memfd-backed RAM ([`PageInstaller::new_in_place`]) the transport
//! receives pages straight into a second mapping of the memfds (registering
//! it with io_uring is safe: the page-cache pages do not move when the
//! guest's mapping is zapped), the guest's mapping is registered for MISSING
//! and MINOR faults, and a page that arrived intact is mapped with
//! `UFFDIO_CONTINUE`: never copied in user space. A per-page claim makes sure
//! one receiver only writes a page after switchover, so a late copy never
//! overwrites what the guest wrote since.

use std::collections::HashMap;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use libc::c_void;
use userfaultfd::{Event, EventBuffer, FeatureFlags, RegisterMode};

use crate::ram::{Ram, PAGE_SIZE};
use crate::uffd_abi::{io_error, FEATURE_MINOR_SHMEM};

/// Errors of the postcopy machinery.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// A userfaultfd system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The call.
        op: &'static str,
        /// The system's error.
        source: io::Error,
    },
    /// A page lies outside guest RAM.
    #[error("pages {first}+{count} of region {region} lie outside guest RAM")]
    OutOfRange {
        /// Region id.
        region: u16,
        /// First page.
        first: u64,
        /// Page count.
        count: u64,
    },
    /// The migration was abandoned while a thread waited for the switchover.
    #[error("the migration was abandoned before postcopy started")]
    Aborted,
}

fn os(op: &'static str) -> impl FnOnce(io::Error) -> PostcopyError {
    move |source| PostcopyError::Os { op, source }
}

/// A crate error of `op`, as [`PostcopyError::Os`] with its errno.
fn uffd_os(op: &'static str) -> impl FnOnce(userfaultfd::Error) -> PostcopyError {
    move |e| PostcopyError::Os {
        op,
        source: io_error(e),
    }
}

/// The operator's switch: ask a running migration to move RAM to postcopy.
///
/// Cloning shares the switch. Asking when the destination did not negotiate
/// the postcopy-ram capability makes the migration fail with
/// [`crate::source::SourceError::Policy`] at its next decision (the guest
/// keeps running on the source).
#[derive(Clone, Debug, Default)]
pub struct PostcopyHandle(Arc<AtomicBool>);

impl PostcopyHandle {
    /// A switch not yet thrown.
    pub fn new() -> PostcopyHandle {
        PostcopyHandle::default()
    }

    /// Asks for the switch to postcopy at the next decision.
    pub fn start_postcopy(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether the switch was asked for.
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A userfaultfd, in MISSING (or MINOR) mode.
#[derive(Debug)]
pub struct Uffd {
    uffd: userfaultfd::Uffd,
}

/// Messages read from the userfaultfd per `read`.
const READ_BATCH: usize = 32;

impl Uffd {
    /// Opens a userfaultfd that also sees faults taken by the kernel on the
    /// process's behalf (KVM's guest page faults), non-blocking.
    pub fn new() -> Result<Uffd, PostcopyError> {
        Self::with_features(FeatureFlags::empty())
    }

    /// As [`Uffd::new`], asking for `features`.
    fn with_features(features: FeatureFlags) -> Result<Uffd, PostcopyError> {
        crate::uffd_abi::open(features)
            .map(|uffd| Uffd { uffd })
            .map_err(|(op, source)| PostcopyError::Os { op, source })
    }

    /// Opens a userfaultfd able to serve shared memory (memfd) in MINOR mode.
    pub fn new_minor() -> Result<Uffd, PostcopyError> {
        Self::with_features(FEATURE_MINOR_SHMEM | FeatureFlags::MISSING_SHMEM)
    }

    /// The descriptor, for `poll`.
    pub fn raw_fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }

    fn register(&self, addr: usize, len: usize, mode: RegisterMode) -> Result<(), PostcopyError> {
        self.uffd
            .register_with_mode(addr as *mut c_void, len, mode)
            .map(|_| ())
            .map_err(uffd_os("UFFDIO_REGISTER"))
    }

    /// Registers `addr..addr + len` (page-aligned) for MISSING faults.
    pub fn register_missing(&self, addr: usize, len: usize) -> Result<(), PostcopyError> {
        self.register(addr, len, RegisterMode::MISSING)
    }

    /// Registers `addr..addr + len` of shared memory for MINOR faults.
    pub fn register_minor(&self, addr: usize, len: usize) -> Result<(), PostcopyError> {
        self.register(addr, len, RegisterMode::MINOR)
    }

    /// Wakes the threads waiting on `addr..addr + len`.
    pub fn wake(&self, addr: usize, len: usize) -> Result<(), PostcopyError> {
        self.uffd
            .wake(addr as *mut c_void, len)
            .map_err(uffd_os("UFFDIO_WAKE"))
    }

    /// Drives one of the filling ioctls (COPY, ZEROPAGE, CONTINUE) over
    /// `dst..dst + len`: `call(offset)` issues it for the rest of the range
    /// from `offset` and returns the ioctl's result and the bytes it reports
    /// done. A page that is already there (EEXIST) is skipped and its waiters
    /// woken; EAGAIN (the mapping changed under the call) is retried.
    /// Returns how many pages were skipped.
    fn fill_range(
        &self,
        op: &'static str,
        dst: usize,
        len: usize,
        mut call: impl FnMut(usize) -> (io::Result<()>, i64),
    ) -> Result<u64, PostcopyError> {
        let page = PAGE_SIZE as usize;
        let mut done = 0usize;
        let mut skipped = 0u64;
        while done < len {
            let (res, progressed) = call(done);
            if progressed > 0 {
                done += progressed as usize;
            }
            let e = match res {
                Ok(()) => {
                    if progressed <= 0 {
                        done = len;
                    }
                    continue;
                }
                Err(e) => e,
            };
            match e.raw_os_error() {
                Some(libc::EEXIST) => {
                    // The page at `done` is there already: wake its waiters
                    // and go on with the next one.
                    self.wake(dst + done, page)?;
                    done += page;
                    skipped += 1;
                }
                Some(libc::EAGAIN) => {}
                _ => return Err(PostcopyError::Os { op, source: e }),
            }
        }
        Ok(skipped)
    }

    /// Places `src` at `dst` (both page-aligned, whole pages) and wakes the
    /// waiters. Pages already present are skipped and their waiters woken;
    /// returns how many were.
    ///
    /// # Safety
    ///
    /// `dst..dst + src.len()` must lie in a range registered with this
    /// userfaultfd in MISSING mode.
    pub unsafe fn copy(&self, dst: usize, src: &[u8]) -> Result<u64, PostcopyError> {
        self.fill_range("UFFDIO_COPY", dst, src.len(), |done| {
            let rest = &src[done..];
            // SAFETY: UFFDIO_COPY reads `rest` (a live slice) and writes the
            // registered destination range only (the caller's contract),
            // inside the kernel.
            let res = unsafe {
                self.uffd.copy(
                    rest.as_ptr().cast(),
                    (dst + done) as *mut c_void,
                    rest.len(),
                    true,
                )
            };
            match res {
                Ok(n) => (Ok(()), n as i64),
                // EAGAIN, with the kernel's `copy` field: the bytes copied, or
                // a negative errno (the crate casts it to usize; undone here).
                Err(userfaultfd::Error::PartiallyCopied(n)) => {
                    (Err(io::Error::from_raw_os_error(libc::EAGAIN)), n as i64)
                }
                Err(e) => (Err(io_error(e)), 0),
            }
        })
    }

    /// Maps zero pages over `dst..dst + len` and wakes the waiters (pages
    /// already present are left alone and woken).
    pub fn zeropage(&self, dst: usize, len: usize) -> Result<(), PostcopyError> {
        self.fill_range("UFFDIO_ZEROPAGE", dst, len, |done| {
            // SAFETY: UFFDIO_ZEROPAGE only fills pages that are missing in a
            // range registered with this userfaultfd (the kernel refuses any
            // other range), so no memory that is in use changes.
            let res = unsafe {
                self.uffd
                    .zeropage((dst + done) as *mut c_void, len - done, true)
            };
            match res {
                Ok(n) => (Ok(()), n as i64),
                // The crate does not report the bytes zeroed before an EAGAIN:
                // the retry starts at the same offset, and the pages that did
                // go in come back as EEXIST (woken again, which is harmless).
                Err(e) => (Err(io_error(e)), 0),
            }
        })
        .map(|_| ())
    }

    /// Maps the page-cache pages behind `dst..dst + len` (filled through a
    /// second mapping of the memfd) and wakes the waiters: no user-space copy.
    /// Pages already mapped are left alone and their waiters woken.
    pub fn continue_range(&self, dst: usize, len: usize) -> Result<(), PostcopyError> {
        self.fill_range("UFFDIO_CONTINUE", dst, len, |done| {
            match self
                .uffd
                .r#continue((dst + done) as *mut c_void, len - done, true)
            {
                // Also an EAGAIN after partial progress: the crate returns the
                // bytes mapped as a success, and the rest is issued again.
                Ok(n) => (Ok(()), n as i64),
                Err(e) => (Err(io_error(e)), 0),
            }
        })
        .map(|_| ())
    }

    /// Registers `addr..addr + len` of shared memory for both MISSING and
    /// MINOR faults (a hole in the memfd, or a page cached but not mapped).
    pub fn register_missing_minor(&self, addr: usize, len: usize) -> Result<(), PostcopyError> {
        self.register(addr, len, RegisterMode::MISSING | RegisterMode::MINOR)
    }

    /// Reads the pending page faults (their addresses) into `out`; returns
    /// at once when none is queued.
    pub fn read_faults(&self, out: &mut Vec<u64>) -> Result<(), PostcopyError> {
        let mut buf = EventBuffer::new(READ_BATCH);
        loop {
            let events = match self.uffd.read_events(&mut buf) {
                // Nothing queued (EAGAIN) is an empty batch.
                Ok(events) => events,
                // A read of nothing: as before, there is nothing to take.
                Err(userfaultfd::Error::ReadEof) => return Ok(()),
                Err(e) => {
                    let e = io_error(e);
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(PostcopyError::Os {
                        op: "read(userfaultfd)",
                        source: e,
                    });
                }
            };
            let mut got = 0;
            for event in events {
                got += 1;
                // Other events (none is asked for) and unknown ones are skipped.
                if let Ok(Event::Pagefault { addr, .. }) = event {
                    out.push(addr as u64);
                }
            }
            if got < READ_BATCH {
                return Ok(());
            }
        }
    }

    /// Waits up to `timeout` for a fault to be queued; true when one is.
    pub fn wait(&self, timeout: Duration) -> bool {
        // The crate has no poll: plain poll(2) on its descriptor.
        let mut p = libc::pollfd {
            fd: self.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: polls one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        n > 0 && p.revents & libc::POLLIN != 0
    }

    /// Gives up the descriptor without closing it: the faulting threads stay
    /// blocked (nothing is written wrongly) until whoever holds the raw fd
    /// resolves or closes it. Used when postcopy loses its connection.
    pub fn into_raw(self) -> RawFd {
        // Not the crate's `IntoRawFd`: in 0.9 it lets `Drop` close the fd it
        // returns (userfaultfd-rs issue #88), which would wake the faulting
        // threads onto zero pages.
        ManuallyDrop::new(self.uffd).as_raw_fd()
    }
}

/// Fault-latency figures, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Largest.
    pub max_ns: u64,
}

impl LatencySummary {
    /// Summarises a histogram of nanoseconds.
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            p50_ns: h.value_at_quantile(0.5),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
        }
    }
}

/// Fault latencies in power-of-two microsecond buckets, as QEMU's
/// `postcopy-latency-dist`: entry `k` counts faults that waited at least
/// 2^k µs and less than 2^(k+1) µs (entry 0 also those under 1 µs);
/// trailing empty buckets are left out.
pub fn latency_buckets_us(h: &Histogram<u64>) -> Vec<u64> {
    let mut out = vec![0u64; 40];
    for v in h.iter_recorded() {
        let us = v.value_iterated_to() / 1000;
        let k = if us <= 1 {
            0
        } else {
            (63 - us.leading_zeros()) as usize
        };
        if let Some(b) = out.get_mut(k) {
            *b += v.count_at_value();
        }
    }
    while out.last() == Some(&0) {
        out.pop();
    }
    out
}

/// Which postcopy followed the switchover.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum PostcopyMode {
    /// RAM in postcopy: the guest ran on the destination while pages were
    /// still missing there, fetched on fault and streamed in the background.
    #[default]
    Ram,
    /// Postcopy-only sections: RAM and device state completed in the
    /// downtime, and only postcopy-only sections followed.
    Sections,
}

impl std::fmt::Display for PostcopyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PostcopyMode::Ram => "ram",
            PostcopyMode::Sections => "sections",
        })
    }
}

/// What postcopy did on the destination.
#[derive(Clone, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DestinationPostcopyReport {
    /// Which postcopy it was.
    pub mode: PostcopyMode,
    /// Distinct page faults that needed a request to the source.
    pub faults: u64,
    /// Time from a fault being read to its page being installed.
    pub fault_latency: LatencySummary,
    /// The same latencies in power-of-two microsecond buckets
    /// ([`latency_buckets_us`]).
    #[cfg_attr(feature = "serde", serde(default))]
    pub fault_latency_buckets_us: Vec<u64>,
    /// Time the guest's vCPUs spent blocked on faults, all faults together
    /// (each fault blocks the vCPU that touched the page), nanoseconds.
    #[cfg_attr(feature = "serde", serde(default))]
    pub blocked_ns: u64,
    /// In place (memfd): faults on pages that were here but not mapped
    /// yet, each served by mapping its block (no request to the source).
    #[cfg_attr(feature = "serde", serde(default))]
    pub minor_faults: u64,
    /// From *go* to the last page (and section) arriving, nanoseconds.
    pub postcopy_ns: u64,
    /// Pages installed from urgent replies (fetched on demand).
    pub pages_on_demand: u64,
    /// Pages installed from the background stream after switchover.
    pub pages_streamed: u64,
    /// Pages missing at switchover.
    pub pages_missing_at_switchover: u64,
    /// Bytes of postcopy-only sections received after the guest started.
    pub section_bytes: u64,
    /// In the downtime: arming postcopy (registering guest RAM with
    /// userfaultfd, dropping the pages not received, mapping the received
    /// ones in place), nanoseconds.
    #[cfg_attr(feature = "serde", serde(default))]
    pub arm_ns: u64,
    /// Of [`Self::arm_ns`]: dropping the pages not received (`MADV_DONTNEED`).
    #[cfg_attr(feature = "serde", serde(default))]
    pub zap_ns: u64,
    /// Ranges dropped at arming.
    #[cfg_attr(feature = "serde", serde(default))]
    pub zapped_ranges: u64,
    /// In the downtime: from the end of the stream on the control channel
    /// until every bulk channel reached its switchover marker, nanoseconds.
    #[cfg_attr(feature = "serde", serde(default))]
    pub markers_wait_ns: u64,
}

/// The outcome of [`PageInstaller::claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Every page of the run is the caller's to write in place.
    All,
    /// Only these pages are (another receiver claimed the rest first).
    Some(Vec<u64>),
}

/// Which path brought a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Precopy, the stop-and-copy, or the background stream.
    Stream,
    /// An urgent reply to a page request.
    Request,
}

/// Whether `page` of `region` is set in per-region page bitmaps.
fn bit_set(bitmaps: &[Vec<AtomicU64>], region: u16, page: u64) -> bool {
    bitmaps
        .get(usize::from(region))
        .and_then(|w| w.get((page / 64) as usize))
        .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Arm {
    Waiting,
    Armed,
    Aborted,
}

/// The destination's guest RAM during a postcopy-capable migration: which
/// pages arrived, and how to install one. Shared by the receiver threads,
/// the urgent receiver and the fault service.
#[derive(Debug)]
pub struct PageInstaller {
    /// (host address, pages) per region.
    regions: Vec<(usize, u64)>,
    /// memfd-backed RAM: the second mapping's address per region, through
    /// which pages are received in place (installed with `UFFDIO_CONTINUE`).
    second: Option<Vec<usize>>,
    received: Vec<Vec<AtomicU64>>,
    /// In-place receive after switchover: a page is written through the
    /// second mapping by the one receiver that claimed it first, so a late
    /// copy never overwrites what the guest wrote since.
    claimed: Vec<Vec<AtomicU64>>,
    /// The source's discard map: pages that changed after they were sent,
    /// whatever copy arrived before arming is stale.
    stale: Vec<Vec<AtomicU64>>,
    missing: AtomicU64,
    total: u64,
    uffd: Mutex<Option<Arc<Uffd>>>,
    armed_uffd: std::sync::OnceLock<Arc<Uffd>>,
    arm: Mutex<Arm>,
    arm_cv: Condvar,
    done_cv: Condvar,
    done_lock: Mutex<()>,
    /// Pages requested and not yet installed, with when they faulted.
    pending: Mutex<HashMap<(u16, u64), Instant>>,
    latency: Mutex<Option<Histogram<u64>>>,
    faults: AtomicU64,
    /// Sum of the fault latencies: the time vCPUs spent blocked.
    blocked_ns: AtomicU64,
    /// In place: faults on pages that were here, only not mapped yet.
    minor_faults: AtomicU64,
    on_demand: AtomicU64,
    streamed: AtomicU64,
    missing_at_arm: AtomicU64,
    arm_ns: AtomicU64,
    zap_ns: AtomicU64,
    zapped_ranges: AtomicU64,
}

impl PageInstaller {
    /// An installer over `ram`, with no page received yet.
    pub fn new(ram: &Ram<'_>) -> PageInstaller {
        let regions: Vec<(usize, u64)> = ram
            .regions()
            .iter()
            .map(|r| (r.host().as_ptr() as usize, r.pages()))
            .collect();
        let received = regions
            .iter()
            .map(|&(_, p)| (0..p.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
            .collect();
        let words = || -> Vec<Vec<AtomicU64>> {
            regions
                .iter()
                .map(|&(_, p)| (0..p.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
                .collect()
        };
        let claimed = words();
        let stale = words();
        let total: u64 = regions.iter().map(|r| r.1).sum();
        let latency = Histogram::new_with_bounds(1, 600_000_000_000, 3).ok();
        PageInstaller {
            regions,
            second: None,
            received,
            claimed,
            stale,
            missing: AtomicU64::new(total),
            total,
            uffd: Mutex::new(None),
            armed_uffd: std::sync::OnceLock::new(),
            arm: Mutex::new(Arm::Waiting),
            arm_cv: Condvar::new(),
            done_cv: Condvar::new(),
            done_lock: Mutex::new(()),
            pending: Mutex::new(HashMap::new()),
            latency: Mutex::new(latency),
            faults: AtomicU64::new(0),
            blocked_ns: AtomicU64::new(0),
            minor_faults: AtomicU64::new(0),
            on_demand: AtomicU64::new(0),
            streamed: AtomicU64::new(0),
            missing_at_arm: AtomicU64::new(0),
            arm_ns: AtomicU64::new(0),
            zap_ns: AtomicU64::new(0),
            zapped_ranges: AtomicU64::new(0),
        }
    }

    /// An installer over memfd-backed `ram` whose pages are received in
    /// place through `second`, a second mapping of the same memfds (same
    /// regions, same sizes). After switchover pages are mapped into the
    /// guest with `UFFDIO_CONTINUE`: never copied in user space.
    pub fn new_in_place(ram: &Ram<'_>, second: &Ram<'_>) -> PageInstaller {
        let mut inst = PageInstaller::new(ram);
        inst.second = Some(
            second
                .regions()
                .iter()
                .map(|r| r.host().as_ptr() as usize)
                .collect(),
        );
        inst
    }

    /// Claims the pages of a run for an in-place receive. Before switchover
    /// every page is the caller's ([`Claim::All`]); after, only those no
    /// other receiver claimed first.
    pub fn claim(&self, region: u16, first: u64, count: u64) -> Result<Claim, PostcopyError> {
        self.host(region, first, count)?;
        if !self.is_armed() {
            return Ok(Claim::All);
        }
        let Some(words) = self.claimed.get(usize::from(region)) else {
            return Err(PostcopyError::OutOfRange {
                region,
                first,
                count,
            });
        };
        let mut ours = Vec::new();
        for p in first..first + count {
            let Some(w) = words.get((p / 64) as usize) else {
                break;
            };
            let bit = 1u64 << (p % 64);
            if w.fetch_or(bit, Ordering::AcqRel) & bit == 0 {
                ours.push(p);
            }
        }
        Ok(if ours.len() as u64 == count {
            Claim::All
        } else {
            Claim::Some(ours)
        })
    }

    /// Adds the source's discard map for `count` pages of `region` from
    /// `first` (a multiple of 64): little-endian 64-bit words, one bit per
    /// page. Only before switchover: [`Self::arm`] drops the pages it names,
    /// whichever copy of them arrived. Returns the pages newly named.
    pub fn add_discard_map(
        &self,
        region: u16,
        first: u64,
        count: u64,
        map: &[u8],
    ) -> Result<u64, PostcopyError> {
        let out_of_range = PostcopyError::OutOfRange {
            region,
            first,
            count,
        };
        self.host(region, first, count)?;
        let Some(words) = self.stale.get(usize::from(region)) else {
            return Err(out_of_range);
        };
        if first % 64 != 0 || map.len() as u64 != count.div_ceil(64) * 8 || self.is_armed() {
            return Err(out_of_range);
        }
        let mut pages = 0;
        for (i, b) in map.chunks_exact(8).enumerate() {
            let mut le = [0u8; 8];
            le.copy_from_slice(b);
            let w = u64::from_le_bytes(le);
            // Bits past `count` would name pages the record does not cover.
            let left = count - i as u64 * 64;
            if left < 64 && w >> left != 0 {
                return Err(out_of_range);
            }
            let Some(s) = words.get((first / 64) as usize + i) else {
                return Err(out_of_range);
            };
            pages += u64::from((w & !s.fetch_or(w, Ordering::AcqRel)).count_ones());
        }
        Ok(pages)
    }

    /// Whether `page` of `region` is in the discard map (tests).
    #[cfg(test)]
    fn is_stale_for_test(&self, region: u16, page: u64) -> bool {
        bit_set(&self.stale, region, page)
    }

    /// The second mapping's bytes of a run (in-place mode), for a receive
    /// or a checksum.
    ///
    /// # Safety
    ///
    /// The caller must hold the claim on the pages it writes through the
    /// returned pointer, and tolerate concurrent writes of identical bytes.
    pub unsafe fn in_place_ptr(
        &self,
        region: u16,
        first: u64,
        count: u64,
    ) -> Result<*mut u8, PostcopyError> {
        self.host(region, first, count)?;
        match self
            .second
            .as_ref()
            .and_then(|s| s.get(usize::from(region)))
        {
            Some(&base) => Ok((base + (first * PAGE_SIZE) as usize) as *mut u8),
            None => Err(PostcopyError::OutOfRange {
                region,
                first,
                count,
            }),
        }
    }

    /// Whether pages are received in place (memfd, `UFFDIO_CONTINUE`).
    pub fn in_place(&self) -> bool {
        self.second.is_some()
    }

    /// Records pages received in place (through the second mapping; their
    /// bytes were checked): before switchover they are simply there; after,
    /// `UFFDIO_CONTINUE` maps them into the guest and wakes its waiters.
    pub fn install_in_place(
        &self,
        region: u16,
        first: u64,
        count: u64,
        via: Via,
    ) -> Result<(), PostcopyError> {
        let dst = self.host(region, first, count)?;
        match self.armed_uffd.get() {
            None => {
                self.mark(region, first, count, true);
            }
            Some(uffd) => {
                uffd.continue_range(dst, (count * PAGE_SIZE) as usize)?;
                self.installed(region, first, count, via);
            }
        }
        Ok(())
    }

    fn host(&self, region: u16, first: u64, count: u64) -> Result<usize, PostcopyError> {
        match self.regions.get(usize::from(region)) {
            Some(&(base, pages)) if first.checked_add(count).is_some_and(|e| e <= pages) => {
                Ok(base + (first * PAGE_SIZE) as usize)
            }
            _ => Err(PostcopyError::OutOfRange {
                region,
                first,
                count,
            }),
        }
    }

    /// The page at host address `addr`, if inside guest RAM.
    pub fn page_of(&self, addr: u64) -> Option<(u16, u64)> {
        let addr = addr as usize;
        self.regions
            .iter()
            .enumerate()
            .find_map(|(i, &(base, pages))| {
                let end = base + (pages * PAGE_SIZE) as usize;
                (addr >= base && addr < end).then(|| (i as u16, ((addr - base) as u64) / PAGE_SIZE))
            })
    }

    /// Whether `page` of `region` arrived.
    pub fn has(&self, region: u16, page: u64) -> bool {
        bit_set(&self.received, region, page)
    }

    /// Sets the received bits of a run; returns how many were newly set.
    fn mark(&self, region: u16, first: u64, count: u64, on: bool) -> u64 {
        let Some(words) = self.received.get(usize::from(region)) else {
            return 0;
        };
        let mut changed = 0;
        for p in first..first + count {
            let Some(w) = words.get((p / 64) as usize) else {
                break;
            };
            let bit = 1u64 << (p % 64);
            let old = if on {
                w.fetch_or(bit, Ordering::AcqRel)
            } else {
                w.fetch_and(!bit, Ordering::AcqRel)
            };
            if (old & bit != 0) != on {
                changed += 1;
            }
        }
        if on {
            self.missing.fetch_sub(changed, Ordering::AcqRel);
        } else {
            self.missing.fetch_add(changed, Ordering::AcqRel);
        }
        changed
    }

    /// Pages not yet received.
    pub fn missing(&self) -> u64 {
        self.missing.load(Ordering::Acquire)
    }

    /// Every page in guest RAM.
    pub fn total_pages(&self) -> u64 {
        self.total
    }

    /// Whether postcopy started on this side (pages go in with `UFFDIO_COPY`).
    pub fn is_armed(&self) -> bool {
        self.armed_uffd.get().is_some()
    }

    /// Installs a run of pages (`bytes`: `count` pages) that arrived intact.
    /// Before switchover a plain copy; after, `UFFDIO_COPY` — a page already
    /// there (the other path won) is left alone and its waiters are woken.
    pub fn install(
        &self,
        region: u16,
        first: u64,
        bytes: &[u8],
        via: Via,
    ) -> Result<(), PostcopyError> {
        let count = bytes.len() as u64 / PAGE_SIZE;
        let dst = self.host(region, first, count)?;
        match self.armed_uffd.get() {
            None => {
                // SAFETY: the range lies inside guest RAM (checked above); the
                // guest does not run on this side before switchover, and a
                // page is written by one receiver only (pages are striped).
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst as *mut u8, bytes.len())
                };
                self.mark(region, first, count, true);
            }
            Some(uffd) => {
                // SAFETY: guest RAM was registered in MISSING mode at arming.
                unsafe { uffd.copy(dst, bytes) }?;
                self.installed(region, first, count, via);
            }
        }
        Ok(())
    }

    /// Installs a run of zero pages.
    pub fn install_zero(&self, region: u16, first: u64, count: u64) -> Result<(), PostcopyError> {
        let dst = self.host(region, first, count)?;
        if let Some(second) = self.second.as_ref() {
            if self.is_armed() {
                // After switchover: only the pages nobody claimed yet.
                if let Claim::Some(pages) = self.claim(region, first, count)? {
                    for p in pages {
                        // SAFETY: this call holds the claim on page `p`.
                        let at = unsafe { self.in_place_ptr(region, p, 1) }?;
                        // SAFETY: one page inside the second mapping.
                        unsafe { std::ptr::write_bytes(at, 0, PAGE_SIZE as usize) };
                        self.install_in_place(region, p, 1, Via::Stream)?;
                    }
                    return Ok(());
                }
            }
            let base = second.get(usize::from(region)).copied().unwrap_or(0);
            // SAFETY: the same offsets in the second mapping, which has the
            // region's size; the guest does not see these pages until they
            // are mapped (after switchover) or it starts (before).
            unsafe {
                std::ptr::write_bytes(
                    (base + (first * PAGE_SIZE) as usize) as *mut u8,
                    0,
                    (count * PAGE_SIZE) as usize,
                )
            };
            return self.install_in_place(region, first, count, Via::Stream);
        }
        match self.armed_uffd.get() {
            None => {
                // SAFETY: as in `install`.
                unsafe { std::ptr::write_bytes(dst as *mut u8, 0, (count * PAGE_SIZE) as usize) };
                self.mark(region, first, count, true);
            }
            Some(uffd) => {
                uffd.zeropage(dst, (count * PAGE_SIZE) as usize)?;
                self.installed(region, first, count, Via::Stream);
            }
        }
        Ok(())
    }

    fn installed(&self, region: u16, first: u64, count: u64, via: Via) {
        let newly = self.mark(region, first, count, true);
        match via {
            Via::Request => self.on_demand.fetch_add(newly, Ordering::Relaxed),
            Via::Stream => self.streamed.fetch_add(newly, Ordering::Relaxed),
        };
        let now = Instant::now();
        if let Ok(mut pending) = self.pending.lock() {
            if !pending.is_empty() {
                let mut lat = self.latency.lock().unwrap_or_else(PoisonError::into_inner);
                for p in first..first + count {
                    if let Some(t) = pending.remove(&(region, p)) {
                        let ns = now.duration_since(t).as_nanos().min(u128::from(u64::MAX)) as u64;
                        self.blocked_ns.fetch_add(ns, Ordering::Relaxed);
                        if let Some(h) = lat.as_mut() {
                            let _ = h.record(ns.max(1));
                        }
                    }
                }
            }
        }
        if self.missing() == 0 {
            let _g = self
                .done_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.done_cv.notify_all();
        }
    }

    /// Forgets that a run arrived (the source discarded it at switchover:
    /// it changed after it was sent). Only before switchover.
    pub fn discard(&self, region: u16, first: u64, count: u64) -> Result<(), PostcopyError> {
        self.host(region, first, count)?;
        self.mark(region, first, count, false);
        Ok(())
    }

    /// Switchover on the destination: registers guest RAM with `uffd` in
    /// MISSING mode, zaps every page not received, and from now on installs
    /// with `UFFDIO_COPY`. Wakes the receivers waiting in [`Self::wait_armed`].
    pub fn arm(&self, uffd: Uffd) -> Result<(), PostcopyError> {
        let t = Instant::now();
        // Pages in the discard map changed after they were sent: whatever
        // copy arrived is stale. (Every bulk channel is past its marker, so
        // no copy from before the switchover is still to come.)
        for (received, stale) in self.received.iter().zip(&self.stale) {
            for (w, s) in received.iter().zip(stale) {
                let s = s.swap(0, Ordering::AcqRel);
                if s != 0 {
                    let dropped = w.fetch_and(!s, Ordering::AcqRel) & s;
                    self.missing
                        .fetch_add(u64::from(dropped.count_ones()), Ordering::AcqRel);
                }
            }
        }
        let uffd = Arc::new(uffd);
        for &(base, pages) in &self.regions {
            if self.second.is_some() {
                uffd.register_missing_minor(base, (pages * PAGE_SIZE) as usize)?;
            } else {
                uffd.register_missing(base, (pages * PAGE_SIZE) as usize)?;
            }
        }
        // The zap is in the downtime and the pages to drop are scattered
        // (those the guest dirtied since they were sent): give them to the
        // kernel in batches, which also batches the TLB flushes.
        let mut zapped = 0;
        let mut ranges = 0;
        let tz = Instant::now();
        let mut zap = Zapper::new();
        // In place (memfd): pages arrived through the second mapping, so the
        // guest's own mapping maps none of them, and a page that must not be
        // seen (received, then discarded) is caught by its fault: it is not
        // in the received bitmap. One call per region drops whatever the
        // guest mapping might map; nothing is dropped page by page, and the
        // received pages are mapped on fault or by `map_received` after the
        // guest started. The downtime no longer grows with the guest.
        let lazy = self.second.is_some();
        if lazy {
            for &(base, pages) in &self.regions {
                // SAFETY: the region is guest RAM, which no vCPU runs on
                // yet; MADV_DONTNEED on a shared mapping only drops page
                // table entries (the page cache keeps the data).
                let rc = unsafe {
                    libc::madvise(
                        base as *mut libc::c_void,
                        (pages * PAGE_SIZE) as usize,
                        libc::MADV_DONTNEED,
                    )
                };
                if rc != 0 {
                    return Err(PostcopyError::Os {
                        op: "madvise(MADV_DONTNEED)",
                        source: io::Error::last_os_error(),
                    });
                }
                ranges += 1;
            }
            zapped = self.missing();
        }
        for (r, &(base, pages)) in self.regions.iter().enumerate().filter(|_| !lazy) {
            let mut p = 0;
            while p < pages {
                if self.has(r as u16, p) {
                    p += 1;
                    continue;
                }
                let start = p;
                while p < pages && !self.has(r as u16, p) {
                    p += 1;
                }
                let addr = base + (start * PAGE_SIZE) as usize;
                let len = ((p - start) * PAGE_SIZE) as usize;
                zap.push(addr, len)?;
                zapped += p - start;
                ranges += 1;
            }
        }
        zap.flush()?;
        self.zap_ns
            .store(tz.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.zapped_ranges.store(ranges, Ordering::Relaxed);
        self.missing_at_arm.store(zapped, Ordering::Relaxed);
        for (c, r) in self.claimed.iter().zip(&self.received) {
            for (a, b) in c.iter().zip(r) {
                a.store(b.load(Ordering::Acquire), Ordering::Release);
            }
        }
        *self.uffd.lock().unwrap_or_else(PoisonError::into_inner) = Some(uffd.clone());
        let _ = self.armed_uffd.set(uffd);
        self.arm_ns
            .store(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let mut a = self.arm.lock().unwrap_or_else(PoisonError::into_inner);
        *a = Arm::Armed;
        self.arm_cv.notify_all();
        Ok(())
    }

    /// In place (memfd), after arming: maps every page received so far
    /// into the guest's mapping, in runs (a page a fault mapped first is
    /// left alone), so that the guest soon stops taking a minor fault on
    /// each first touch. Meant for a thread of its own while the guest
    /// runs; returns the received pages it went over (those a fault mapped
    /// first are left as they are). Anonymous RAM needs none of it.
    pub fn map_received(&self) -> Result<u64, PostcopyError> {
        let (Some(_), Some(uffd)) = (self.second.as_ref(), self.armed_uffd.get()) else {
            return Ok(0);
        };
        let mut mapped = 0;
        for (r, &(base, pages)) in self.regions.iter().enumerate() {
            let mut p = 0;
            while p < pages {
                if !self.has(r as u16, p) {
                    p += 1;
                    continue;
                }
                let start = p;
                // At most 2 MiB at a time: faults interleave with the calls.
                while p < pages && p - start < 512 && self.has(r as u16, p) {
                    p += 1;
                }
                uffd.continue_range(
                    base + (start * PAGE_SIZE) as usize,
                    ((p - start) * PAGE_SIZE) as usize,
                )?;
                mapped += p - start;
            }
        }
        Ok(mapped)
    }

    /// Before a resume: forgets the claims of receivers that ended with the
    /// broken connection, so that a page one of them claimed and never
    /// completed can be written by the next (only a received page stays
    /// claimed). No receiver may run meanwhile.
    pub fn reset_claims(&self) {
        for (c, r) in self.claimed.iter().zip(&self.received) {
            for (a, b) in c.iter().zip(r) {
                a.store(b.load(Ordering::Acquire), Ordering::Release);
            }
        }
    }

    /// Lets receivers waiting for the switchover give up.
    pub fn abort(&self) {
        let mut a = self.arm.lock().unwrap_or_else(PoisonError::into_inner);
        if *a == Arm::Waiting {
            *a = Arm::Aborted;
        }
        self.arm_cv.notify_all();
        let _g = self
            .done_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.done_cv.notify_all();
    }

    /// Blocks a receiver that reached the switchover marker of its stream
    /// until postcopy is armed.
    pub fn wait_armed(&self) -> Result<(), PostcopyError> {
        let mut a = self.arm.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match *a {
                Arm::Armed => return Ok(()),
                Arm::Aborted => return Err(PostcopyError::Aborted),
                Arm::Waiting => {
                    a = self.arm_cv.wait(a).unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }

    /// Waits until every page arrived, up to `timeout`; true when they did.
    pub fn wait_complete(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self
            .done_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while self.missing() != 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .done_cv
                .wait_timeout(g, left.min(Duration::from_millis(50)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// The pages not yet received, as runs of at most `max` pages.
    pub fn missing_runs(&self, max: u32) -> Vec<(u16, u64, u32)> {
        let mut runs: Vec<(u16, u64, u32)> = Vec::new();
        for (r, &(_, pages)) in self.regions.iter().enumerate() {
            for p in 0..pages {
                if self.has(r as u16, p) {
                    continue;
                }
                match runs.last_mut() {
                    Some((lr, lf, lc))
                        if usize::from(*lr) == r && *lf + u64::from(*lc) == p && *lc < max =>
                    {
                        *lc += 1
                    }
                    _ => runs.push((r as u16, p, 1)),
                }
            }
        }
        runs
    }

    /// The fault service's part: a fault at host address `addr`. Returns the
    /// page to request, or `None` when it is already there (its waiters are
    /// woken) or already requested.
    pub fn on_fault(&self, addr: u64) -> Result<Option<(u16, u64)>, PostcopyError> {
        let Some((region, page)) = self.page_of(addr) else {
            return Ok(None);
        };
        let now = Instant::now();
        {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if pending.contains_key(&(region, page)) {
                return Ok(None);
            }
            if !self.has(region, page) {
                pending.insert((region, page), now);
                self.faults.fetch_add(1, Ordering::Relaxed);
                // Re-check: an install between the test and the insert would
                // have missed the entry.
                if !self.has(region, page) {
                    return Ok(Some((region, page)));
                }
                pending.remove(&(region, page));
            }
        }
        // Installed while the fault was queued: make sure it is awake (and,
        // in place, mapped: a page in the cache but not mapped faults too).
        if let Some(uffd) = self.armed_uffd.get() {
            if self.second.is_some() {
                self.minor_faults.fetch_add(1, Ordering::Relaxed);
                self.map_block_around(uffd, region, page)?;
            } else {
                uffd.wake(self.host(region, page, 1)?, PAGE_SIZE as usize)?;
            }
        }
        Ok(None)
    }

    /// In place: a minor fault on a received page maps every received page
    /// of its aligned block of [`FAULT_AROUND_PAGES`] with it, so that a
    /// guest touching its memory at random soon stops faulting (one fault
    /// per block instead of one per page) while `map_received` catches up.
    fn map_block_around(&self, uffd: &Uffd, region: u16, page: u64) -> Result<(), PostcopyError> {
        let pages = self.regions.get(usize::from(region)).map_or(0, |&(_, n)| n);
        let start = page - page % FAULT_AROUND_PAGES;
        let end = (start + FAULT_AROUND_PAGES).min(pages);
        let mut p = start;
        while p < end {
            if !self.has(region, p) {
                p += 1;
                continue;
            }
            let first = p;
            while p < end && self.has(region, p) {
                p += 1;
            }
            uffd.continue_range(
                self.host(region, first, p - first)?,
                ((p - first) * PAGE_SIZE) as usize,
            )?;
        }
        Ok(())
    }

    /// The armed userfaultfd, if postcopy started.
    pub fn uffd(&self) -> Option<Arc<Uffd>> {
        self.armed_uffd.get().cloned()
    }

    /// Takes the userfaultfd out, so that dropping the installer does not
    /// close it (used when postcopy fails: the guest's faults stay pending).
    pub fn take_uffd(&self) -> Option<Arc<Uffd>> {
        self.uffd
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// The report so far.
    pub fn report(&self) -> DestinationPostcopyReport {
        let lat = self.latency.lock().unwrap_or_else(PoisonError::into_inner);
        DestinationPostcopyReport {
            mode: PostcopyMode::Ram,
            faults: self.faults.load(Ordering::Relaxed),
            fault_latency: lat.as_ref().map(LatencySummary::of).unwrap_or_default(),
            fault_latency_buckets_us: lat.as_ref().map(latency_buckets_us).unwrap_or_default(),
            blocked_ns: self.blocked_ns.load(Ordering::Relaxed),
            minor_faults: self.minor_faults.load(Ordering::Relaxed),
            postcopy_ns: 0,
            pages_on_demand: self.on_demand.load(Ordering::Relaxed),
            pages_streamed: self.streamed.load(Ordering::Relaxed),
            pages_missing_at_switchover: self.missing_at_arm.load(Ordering::Relaxed),
            arm_ns: self.arm_ns.load(Ordering::Relaxed),
            zap_ns: self.zap_ns.load(Ordering::Relaxed),
            zapped_ranges: self.zapped_ranges.load(Ordering::Relaxed),
            markers_wait_ns: 0,
            section_bytes: 0,
        }
    }
}

/// In place, the pages a minor fault on a received page maps with it: its
/// aligned block (256 KiB).
pub const FAULT_AROUND_PAGES: u64 = 64;

/// Nice value of the threads on a fault's path (fault service, urgent
/// receiver, the source's request server): ahead of the bulk stream on a
/// busy host.
pub const URGENT_NICE: i32 = -10;

/// The time slice the threads on a fault's path ask the scheduler for. On
/// Linux 6.12 and later a short slice gives a waking thread an early
/// deadline, so it runs soon after a page request or reply arrives instead
/// of after the bulk stream's slice; older kernels ignore it.
pub const URGENT_SLICE: Duration = Duration::from_micros(100);

/// `struct sched_attr` as `sched_setattr(2)` takes it (its first version,
/// 48 bytes).
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Gives the calling thread [`URGENT_NICE`] and [`URGENT_SLICE`]; true when
/// the system allowed it (it needs `CAP_SYS_NICE`; without, the thread keeps
/// its priority). Where `sched_setattr` is refused, the nice value alone.
pub fn prioritise_urgent_thread() -> bool {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice: URGENT_NICE,
        priority: 0,
        runtime: URGENT_SLICE.as_nanos() as u64,
        deadline: 0,
        period: 0,
    };
    // SAFETY: sched_setattr reads `size` bytes of a live, initialised
    // sched_attr and changes only this thread's scheduling parameters.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            tid,
            &attr as *const SchedAttr,
            0u32,
        )
    };
    if rc == 0 {
        return true;
    }
    // SAFETY: setpriority on this thread's id only changes its nice value.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, URGENT_NICE) == 0 }
}

/// Something that forwards page requests to the source.
pub trait RequestSink: Send {
    /// Asks for `count` pages from `first` of `region`.
    fn request(&mut self, region: u16, first: u64, count: u32) -> io::Result<()>;
}

/// Why the destination's fault service stopped serving faults.
#[derive(Debug, thiserror::Error)]
pub enum FaultServiceError {
    /// Reading a fault from the userfaultfd, or resolving one to its page,
    /// failed.
    #[error("a fault could not be served: {0}")]
    Fault(#[source] PostcopyError),
    /// A page request could not be sent to the source.
    #[error("the request for page {page} of region {region} could not be sent: {source}")]
    Request {
        /// The region id.
        region: u16,
        /// The page.
        page: u64,
        /// What the request sink said.
        source: io::Error,
    },
    /// The fault service's thread panicked.
    #[error("the fault service panicked")]
    Panicked,
}

/// The destination's fault service: a thread reading userfaultfd faults and
/// turning each missing page into a request.
#[derive(Debug)]
pub struct FaultService {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Result<(), FaultServiceError>>>,
}

impl FaultService {
    /// Starts serving the faults of `installer`'s armed userfaultfd.
    pub fn start<S: RequestSink + 'static>(
        installer: Arc<PageInstaller>,
        mut sink: S,
    ) -> Result<FaultService, PostcopyError> {
        let Some(uffd) = installer.uffd() else {
            return Err(PostcopyError::Aborted);
        };
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name("ferry-faults".into())
            .spawn(move || -> Result<(), FaultServiceError> {
                prioritise_urgent_thread();
                let mut addrs = Vec::with_capacity(64);
                while !s.load(Ordering::Acquire) {
                    if !uffd.wait(Duration::from_millis(20)) {
                        continue;
                    }
                    addrs.clear();
                    uffd.read_faults(&mut addrs)
                        .map_err(FaultServiceError::Fault)?;
                    for &a in &addrs {
                        if let Some((region, page)) =
                            installer.on_fault(a).map_err(FaultServiceError::Fault)?
                        {
                            sink.request(region, page, 1).map_err(|source| {
                                FaultServiceError::Request {
                                    region,
                                    page,
                                    source,
                                }
                            })?;
                        }
                    }
                }
                Ok(())
            })
            .map_err(os("spawning the fault service"))?;
        Ok(FaultService {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the thread; returns its error, if it failed.
    pub fn stop(&mut self) -> Result<(), FaultServiceError> {
        self.stop.store(true, Ordering::Release);
        match self.handle.take() {
            Some(h) => h.join().unwrap_or(Err(FaultServiceError::Panicked)),
            None => Ok(()),
        }
    }
}

impl Drop for FaultService {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Drops page ranges of this process (`MADV_DONTNEED`), many per system call
/// through `process_madvise` where the kernel takes `MADV_DONTNEED` there,
/// one `madvise` per range otherwise.
///
/// The ranges must lie in guest RAM that no vCPU runs on yet.
struct Zapper {
    pidfd: Option<std::os::fd::OwnedFd>,
    batch: Vec<libc::iovec>,
}

impl Zapper {
    /// At most this many ranges per `process_madvise` (the kernel's UIO_MAXIOV).
    const BATCH: usize = 1024;

    fn new() -> Zapper {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        let pidfd = if fd >= 0 {
            // SAFETY: the descriptor was just returned to us and is owned by nobody else.
            Some(unsafe {
                <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32)
            })
        } else {
            None
        };
        Zapper {
            pidfd,
            batch: Vec::with_capacity(Self::BATCH),
        }
    }

    fn push(&mut self, addr: usize, len: usize) -> Result<(), PostcopyError> {
        self.batch.push(libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        });
        if self.batch.len() == Self::BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), PostcopyError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let want: usize = self.batch.iter().map(|v| v.iov_len).sum();
        if let Some(fd) = &self.pidfd {
            // SAFETY: the iovecs describe ranges of this process's guest RAM
            // (see the type's contract); the kernel only reads the array.
            let done = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    std::os::fd::AsRawFd::as_raw_fd(fd),
                    self.batch.as_ptr(),
                    self.batch.len(),
                    libc::MADV_DONTNEED,
                    0u32,
                )
            };
            if done >= 0 && done as usize == want {
                self.batch.clear();
                return Ok(());
            }
            // Older kernels refuse MADV_DONTNEED here (EINVAL); a short
            // count leaves the rest. Either way: one range at a time below
            // (dropping a range twice is harmless).
            if done < 0 {
                self.pidfd = None;
            }
        }
        for v in self.batch.drain(..) {
            // SAFETY: as above: a range of guest RAM the guest does not use
            // yet; its contents are stale or never written. On memfd RAM this
            // only drops the guest mapping's page-table entries.
            let rc = unsafe { libc::madvise(v.iov_base, v.iov_len, libc::MADV_DONTNEED) };
            if rc != 0 {
                return Err(PostcopyError::Os {
                    op: "madvise(MADV_DONTNEED)",
                    source: io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_discard_map_is_checked_before_it_is_kept() {
        // 200 pages of one region; nothing is written through the installer here.
        let mut backing = vec![0u8; 200 * PAGE_SIZE as usize];
        let host = std::ptr::NonNull::new(backing.as_mut_ptr()).expect("a buffer");
        // SAFETY: the buffer is readable and writable and outlives `ram`.
        let ram = unsafe { Ram::from_raw(&[(0, host, backing.len() as u64)]) };
        let inst = PageInstaller::new(&ram);
        let words = |w: &[u64]| -> Vec<u8> { w.iter().flat_map(|x| x.to_le_bytes()).collect() };
        // Pages 64..=127 and 130, 131: 66 pages.
        let named = inst.add_discard_map(0, 64, 136, &words(&[u64::MAX, 0b1100, 0]));
        assert_eq!(named.expect("a good map"), 66);
        assert!(inst.is_stale_for_test(0, 64) && inst.is_stale_for_test(0, 131));
        assert!(!inst.is_stale_for_test(0, 63) && !inst.is_stale_for_test(0, 132));
        // The same pages again name nothing new.
        let again = inst.add_discard_map(0, 128, 8, &words(&[0b1100]));
        assert_eq!(again.expect("a good map"), 0);
        let refused = |region, first, count, map: &[u8]| {
            matches!(
                inst.add_discard_map(region, first, count, map),
                Err(PostcopyError::OutOfRange { .. })
            )
        };
        // A bit past `count` (page 70 of a 70-page map).
        assert!(refused(0, 0, 70, &words(&[0, 1 << 6])));
        // Not a multiple of 64.
        assert!(refused(0, 1, 8, &words(&[1])));
        // A payload of the wrong length.
        assert!(refused(0, 0, 64, &words(&[1, 0])));
        // Past the region, and another region.
        assert!(refused(0, 192, 64, &words(&[1])));
        assert!(refused(1, 0, 64, &words(&[1])));
        // None of the refused maps left a mark.
        assert!(!inst.is_stale_for_test(0, 0) && !inst.is_stale_for_test(0, 192));
    }

    #[test]
    fn fault_path_threads_get_their_nice_value_and_slice() {
        std::thread::spawn(|| {
            if !prioritise_urgent_thread() {
                // Without CAP_SYS_NICE nothing changes; nothing to check.
                return;
            }
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) };
            // SAFETY: getpriority on this thread's id only reads.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
            assert_eq!(nice, URGENT_NICE);
            let mut attr = SchedAttr {
                size: 0,
                policy: 0,
                flags: 0,
                nice: 0,
                priority: 0,
                runtime: 0,
                deadline: 0,
                period: 0,
            };
            // SAFETY: sched_getattr writes at most `size` bytes into `attr`.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_sched_getattr,
                    tid,
                    &mut attr as *mut SchedAttr,
                    std::mem::size_of::<SchedAttr>() as u32,
                    0u32,
                )
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            assert_eq!(attr.nice, URGENT_NICE);
            // Kernels before 6.12 have no slice for fair threads and report 0.
            assert!(
                attr.runtime == 0 || attr.runtime == URGENT_SLICE.as_nanos() as u64,
                "slice {} ns",
                attr.runtime
            );
        })
        .join()
        .expect("the thread's checks");
    }

    #[test]
    fn latencies_fall_in_power_of_two_microsecond_buckets() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).unwrap();
        // ns: 0.5 µs and 1.9 µs (bucket 0), 2 µs and 3.9 µs (bucket 1),
        // 100 µs (64..128: bucket 6), 1.5 ms (1024..2048: bucket 10).
        for ns in [500, 1_900, 2_000, 3_900, 100_000, 100_000, 1_500_000] {
            h.record(ns).unwrap();
        }
        let b = latency_buckets_us(&h);
        assert_eq!(b.len(), 11, "{b:?}");
        assert_eq!(b[0], 2);
        assert_eq!(b[1], 2);
        assert_eq!(b[6], 2);
        assert_eq!(b[10], 1);
        assert_eq!(b.iter().sum::<u64>(), 7);
        assert!(latency_buckets_us(&Histogram::<u64>::new(3).unwrap()).is_empty());
    }
}
