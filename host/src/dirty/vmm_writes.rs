//! The VMM's own writes to guest RAM, reported beside a dirty tracker.
//!
//! A hardware-assisted dirty log sees what the guest writes. It does not see what the VMM
//! writes itself through its own mapping of guest RAM: device emulation filling a virtio
//! used ring, an emulated DMA engine, a block device reading into guest buffers. A page the
//! VMM writes after the migration sent it would otherwise never be sent again, and the
//! destination would run on stale bytes.
//!
//! The VMM reports those writes the way vm-memory's `Bitmap` does: after each write it marks
//! the bytes it wrote, in a [`VmmWrites`] (one atomic bitmap per region; marking is a few
//! atomic ORs, lock-free, from any thread). [`WithVmmWrites`] wraps any [`DirtyTracker`] and
//! reports the union of what it reports and what the VMM marked. With the `vm-memory`
//! feature, the dirty bitmaps of a `GuestMemoryMmap<AtomicBitmap>` serve as the record
//! instead, so a VMM that writes through vm-memory's `Bytes` needs no marking of its own (see
//! [`VmmWriteLog`]).
//!
//! # Semantics
//!
//! A marked page stays marked until the migration re-arms it with
//! [`clear`](DirtyTracker::clear) (or [`clear_mask`](DirtyTracker::clear_mask)), which it
//! does for exactly the pages it is about to send, just before reading them: every sync in
//! between reports it again, like KVM's dirty log with manual protect. `clear` re-arms exactly
//! the pages given and no other. [`start`](DirtyTracker::start) and
//! [`stop`](DirtyTracker::stop) forget every mark (the first pass after `start` reads every
//! page anyway).
//!
//! # The VMM's part
//!
//! - **Mark after the write**, once the bytes are in guest memory. A mark made before the
//!   write could be taken by a send that then reads the old bytes; a mark made after it is
//!   either seen by the send's `clear` (whose atomic read then also makes the write visible to
//!   the read that follows) or lands after the `clear` and is reported by a later sync.
//! - **Quiesce on pause**: [`GuestControl::pause`](crate::migration::GuestControl::pause)
//!   must stop the VMM's own writers too (device threads, in-flight DMA), and return only
//!   once every write made so far has been marked; the final sync follows the pause.
//!
//! ```
//! use std::sync::Arc;
//! use ferry_host::dirty::{DirtyTracker, VmmWrites, WithVmmWrites};
//! # use ferry_host::dirty::{bitmap_words, DirtyError, Result};
//! # struct Quiet;
//! # impl DirtyTracker for Quiet {
//! #     fn name(&self) -> &str { "quiet" }
//! #     fn regions(&self) -> usize { 1 }
//! #     fn pages(&self, _: usize) -> Result<u64> { Ok(256) }
//! #     fn start(&mut self) -> Result<()> { Ok(()) }
//! #     fn sync(&mut self, _: usize, _: &mut [u64]) -> Result<u64> { Ok(0) }
//! #     fn clear(&mut self, _: usize, _: u64, _: u64) -> Result<()> { Ok(()) }
//! #     fn stop(&mut self) -> Result<()> { Ok(()) }
//! # }
//! # let kvm_tracker = Quiet;
//!
//! // One region of 1 MiB at guest address 0, as the migration's RAM has it.
//! let writes = Arc::new(VmmWrites::new(&[(0, 1 << 20)]));
//! let mut tracker = WithVmmWrites::new(kvm_tracker, Arc::clone(&writes))?;
//! tracker.start()?;
//!
//! // A device thread writes 100 bytes at guest address 0x3ff0, then says so.
//! writes.mark_gpa(0x3ff0, 100)?;
//!
//! let mut dirty = vec![0u64; bitmap_words(256)];
//! assert_eq!(tracker.sync(0, &mut dirty)?, 2); // pages 3 and 4
//! assert_eq!(dirty[0], 0b11000);
//! # Ok::<(), DirtyError>(())
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{bitmap_words, check_range, DirtyError, DirtyTracker, Result, PAGE_SIZE};
use crate::ram::Ram;

/// Where [`WithVmmWrites`] learns which pages the VMM wrote itself.
///
/// Implemented by [`VmmWrites`] (the VMM marks its writes), by references and `Arc`s of a log,
/// and with the `vm-memory` feature by `GuestMemoryMmap<AtomicBitmap>` (vm-memory marks every
/// write made through its `Bytes` interface). Pages are numbered per region in
/// [`PAGE_SIZE`] pages, as in the [`DirtyTracker`] geometry.
pub trait VmmWriteLog: Send {
    /// Number of regions.
    fn regions(&self) -> usize;

    /// Pages in `region`, or `None` when there is no such region or it cannot be described
    /// in [`PAGE_SIZE`] pages.
    fn pages(&self, region: usize) -> Option<u64>;

    /// ORs the pages of `region` marked since they were last reset into `out` (which holds at
    /// least [`bitmap_words`]`(pages)` words) and returns how many bits it set that were clear.
    /// Leaves the marks in place.
    fn collect(&self, region: usize, out: &mut [u64]) -> u64;

    /// Resets the marks of pages `first_page..first_page + count` of `region`, a range inside
    /// it, and of no other page.
    fn reset(&self, region: usize, first_page: u64, count: u64);

    /// Resets the marks of the pages of `region` whose bits are set in `mask`, bit `b` of
    /// `mask[i]` standing for page `first_page + 64 * i + b`; `first_page` is a multiple of
    /// 64 and bits past the end of the region are ignored.
    fn reset_mask(&self, region: usize, first_page: u64, mask: &[u64]);

    /// Resets every mark.
    fn reset_all(&self);
}

/// Marks of the VMM's own writes: one bit per [`PAGE_SIZE`] page of each region of guest RAM,
/// set by [`mark`](Self::mark) from any thread and read by a [`WithVmmWrites`] tracker.
///
/// The regions must be the migration's, in the same order ([`VmmWrites::for_ram`] takes them
/// from a [`Ram`]). Share it as an `Arc<VmmWrites>` between the device threads and the
/// tracker.
#[derive(Debug)]
pub struct VmmWrites {
    regions: Box<[LogRegion]>,
}

#[derive(Debug)]
struct LogRegion {
    gpa: u64,
    pages: u64,
    words: Box<[AtomicU64]>,
}

impl LogRegion {
    /// Sets bits `first..first + count`, all inside the region.
    fn set(&self, first: u64, count: u64) {
        for_each_word(first, count, |w, bits| {
            // Release: whoever reads this bit with Acquire (a sync, or the `clear` before a
            // send) also sees the write the mark stands for.
            self.words[w].fetch_or(bits, Ordering::Release);
        });
    }

    fn reset(&self, first: u64, count: u64) {
        for_each_word(first, count, |w, bits| {
            // Acquire: a mark this reset takes away was made after its write, so the read
            // of the page that follows the reset sees that write.
            self.words[w].fetch_and(!bits, Ordering::AcqRel);
        });
    }
}

/// Calls `f(word, bits)` for each word that bits `first..first + count` touch.
fn for_each_word(first: u64, count: u64, mut f: impl FnMut(usize, u64)) {
    let end = first + count;
    let mut i = first;
    while i < end {
        let b = i % 64;
        let n = (64 - b).min(end - i);
        let bits = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << b
        };
        f((i / 64) as usize, bits);
        i += n;
    }
}

impl VmmWrites {
    /// Marks for regions given as `(guest address, size in bytes)`, region `i` being
    /// `regions[i]`; a size is taken in whole pages (rounded down), as [`Ram`] does.
    pub fn new(regions: &[(u64, u64)]) -> VmmWrites {
        let regions = regions
            .iter()
            .map(|&(gpa, len)| {
                let pages = len / PAGE_SIZE;
                LogRegion {
                    gpa,
                    pages,
                    words: (0..bitmap_words(pages))
                        .map(|_| AtomicU64::new(0))
                        .collect(),
                }
            })
            .collect();
        VmmWrites { regions }
    }

    /// Marks for the regions of `ram`, in its order.
    pub fn for_ram(ram: &Ram<'_>) -> VmmWrites {
        let regions: Vec<(u64, u64)> = ram.regions().iter().map(|r| (r.gpa, r.len())).collect();
        VmmWrites::new(&regions)
    }

    /// Number of regions.
    pub fn regions(&self) -> usize {
        self.regions.len()
    }

    /// Pages in `region`.
    pub fn pages(&self, region: usize) -> Option<u64> {
        self.regions.get(region).map(|r| r.pages)
    }

    fn region(&self, region: usize) -> Result<&LogRegion> {
        self.regions.get(region).ok_or(DirtyError::NoSuchRegion {
            region,
            regions: self.regions.len(),
        })
    }

    /// Marks the `len` bytes at byte `offset` of `region` as written by the VMM. Call it
    /// after the write (see the [module](self) docs). Fails, marking nothing, when the bytes
    /// are not all inside the region. Lock-free: a few atomic ORs.
    pub fn mark(&self, region: usize, offset: u64, len: u64) -> Result<()> {
        let r = self.region(region)?;
        if len == 0 {
            return Ok(());
        }
        let first = offset / PAGE_SIZE;
        let last = offset
            .checked_add(len - 1)
            .map(|end| end / PAGE_SIZE)
            .unwrap_or(u64::MAX);
        let count = last.saturating_sub(first).saturating_add(1);
        check_range(region, first, count, r.pages)?;
        r.set(first, count);
        Ok(())
    }

    /// Marks the `len` bytes at guest physical address `gpa` as written by the VMM, in
    /// whichever regions they fall (a buffer may span two adjacent regions). Fails when some
    /// of the bytes are not guest RAM; the bytes that are stay marked.
    pub fn mark_gpa(&self, gpa: u64, len: u64) -> Result<()> {
        let not_ram = || DirtyError::NotGuestRam { gpa, len };
        let end = gpa.checked_add(len).ok_or_else(not_ram)?;
        let mut at = gpa;
        while at < end {
            let (i, r) = self
                .regions
                .iter()
                .enumerate()
                .find(|(_, r)| at >= r.gpa && at - r.gpa < r.pages * PAGE_SIZE)
                .ok_or_else(not_ram)?;
            let region_end = r.gpa + r.pages * PAGE_SIZE;
            let n = end.min(region_end) - at;
            self.mark(i, at - r.gpa, n)?;
            at += n;
        }
        Ok(())
    }

    /// Whether page `page` of `region` is marked.
    pub fn is_marked(&self, region: usize, page: u64) -> bool {
        self.regions.get(region).is_some_and(|r| {
            page < r.pages
                && r.words[(page / 64) as usize].load(Ordering::Acquire) >> (page % 64) & 1 == 1
        })
    }

    /// Number of pages marked now, every region together.
    pub fn marked_pages(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| r.words.iter())
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

impl VmmWriteLog for VmmWrites {
    fn regions(&self) -> usize {
        self.regions.len()
    }

    fn pages(&self, region: usize) -> Option<u64> {
        VmmWrites::pages(self, region)
    }

    fn collect(&self, region: usize, out: &mut [u64]) -> u64 {
        let Some(r) = self.regions.get(region) else {
            return 0;
        };
        let mut newly = 0;
        for (o, w) in out.iter_mut().zip(r.words.iter()) {
            let bits = w.load(Ordering::Acquire);
            newly += u64::from((bits & !*o).count_ones());
            *o |= bits;
        }
        newly
    }

    fn reset(&self, region: usize, first_page: u64, count: u64) {
        if let Some(r) = self.regions.get(region) {
            let end = first_page.saturating_add(count).min(r.pages);
            if first_page < end {
                r.reset(first_page, end - first_page);
            }
        }
    }

    fn reset_mask(&self, region: usize, first_page: u64, mask: &[u64]) {
        let Some(r) = self.regions.get(region) else {
            return;
        };
        if first_page % 64 != 0 {
            return;
        }
        let first_word = (first_page / 64) as usize;
        for (w, m) in r.words.iter().skip(first_word).zip(mask) {
            if *m != 0 {
                // Bits past the region's end are never set, so clearing them is a no-op.
                w.fetch_and(!*m, Ordering::AcqRel);
            }
        }
    }

    fn reset_all(&self) {
        for w in self.regions.iter().flat_map(|r| r.words.iter()) {
            // A read-modify-write, so the writes behind the marks taken away are visible to
            // the pass over memory that follows.
            w.swap(0, Ordering::AcqRel);
        }
    }
}

impl<L: VmmWriteLog + Sync + ?Sized> VmmWriteLog for &L {
    fn regions(&self) -> usize {
        (**self).regions()
    }
    fn pages(&self, region: usize) -> Option<u64> {
        (**self).pages(region)
    }
    fn collect(&self, region: usize, out: &mut [u64]) -> u64 {
        (**self).collect(region, out)
    }
    fn reset(&self, region: usize, first_page: u64, count: u64) {
        (**self).reset(region, first_page, count)
    }
    fn reset_mask(&self, region: usize, first_page: u64, mask: &[u64]) {
        (**self).reset_mask(region, first_page, mask)
    }
    fn reset_all(&self) {
        (**self).reset_all()
    }
}

impl<L: VmmWriteLog + Sync + ?Sized> VmmWriteLog for Arc<L> {
    fn regions(&self) -> usize {
        (**self).regions()
    }
    fn pages(&self, region: usize) -> Option<u64> {
        (**self).pages(region)
    }
    fn collect(&self, region: usize, out: &mut [u64]) -> u64 {
        (**self).collect(region, out)
    }
    fn reset(&self, region: usize, first_page: u64, count: u64) {
        (**self).reset(region, first_page, count)
    }
    fn reset_mask(&self, region: usize, first_page: u64, mask: &[u64]) {
        (**self).reset_mask(region, first_page, mask)
    }
    fn reset_all(&self) {
        (**self).reset_all()
    }
}

/// A [`DirtyTracker`] that reports what `T` reports and, besides, every page the VMM wrote
/// itself as its [`VmmWriteLog`] `L` records. See the [module](self) docs.
///
/// Region `i` of the log must be region `i` of the tracker, with the same number of pages.
#[derive(Debug)]
pub struct WithVmmWrites<T, L> {
    inner: T,
    log: L,
    name: String,
    vmm_pages: u64,
}

impl<T: DirtyTracker, L: VmmWriteLog> WithVmmWrites<T, L> {
    /// Wraps `inner`, adding the pages `log` records. Fails when the log's regions are not
    /// the tracker's (count or pages).
    pub fn new(inner: T, log: L) -> Result<Self> {
        if log.regions() != inner.regions() {
            return Err(DirtyError::BadRegion {
                region: log.regions().min(inner.regions()),
                reason: "the VMM-writes log and the tracker have different numbers of regions",
            });
        }
        for region in 0..inner.regions() {
            if log.pages(region) != Some(inner.pages(region)?) {
                return Err(DirtyError::BadRegion {
                    region,
                    reason: "the VMM-writes log and the tracker differ in its number of pages",
                });
            }
        }
        let name = format!("{}+vmm-writes", inner.name());
        Ok(WithVmmWrites {
            inner,
            log,
            name,
            vmm_pages: 0,
        })
    }

    /// The wrapped tracker.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// The wrapped tracker, mutably.
    pub fn inner_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// The log of the VMM's writes.
    pub fn log(&self) -> &L {
        &self.log
    }

    /// How many times a sync reported a page only because the VMM marked it: pages the
    /// wrapped tracker did not report (and the caller's bitmap did not hold). A page reported
    /// at several syncs counts each time.
    pub fn vmm_only_reports(&self) -> u64 {
        self.vmm_pages
    }

    /// The wrapped tracker and the log.
    pub fn into_parts(self) -> (T, L) {
        (self.inner, self.log)
    }
}

impl<T: DirtyTracker, L: VmmWriteLog> DirtyTracker for WithVmmWrites<T, L> {
    fn name(&self) -> &str {
        &self.name
    }

    fn regions(&self) -> usize {
        self.inner.regions()
    }

    fn pages(&self, region: usize) -> Result<u64> {
        self.inner.pages(region)
    }

    fn start(&mut self) -> Result<()> {
        self.inner.start()?;
        // Marks made while no migration ran are stale: the first pass reads every page.
        self.log.reset_all();
        Ok(())
    }

    fn sync(&mut self, region: usize, out: &mut [u64]) -> Result<u64> {
        let words = bitmap_words(self.inner.pages(region)?);
        if out.len() < words {
            return Err(DirtyError::BitmapTooSmall {
                region,
                words: out.len(),
                needed: words,
            });
        }
        // The inner tracker checks the state.
        let newly = self.inner.sync(region, out)?;
        let vmm = self.log.collect(region, &mut out[..words]);
        self.vmm_pages += vmm;
        Ok(newly + vmm)
    }

    fn clear(&mut self, region: usize, first_page: u64, count: u64) -> Result<()> {
        // The inner tracker checks the state and the range.
        self.inner.clear(region, first_page, count)?;
        self.log.reset(region, first_page, count);
        Ok(())
    }

    fn clear_mask(&mut self, region: usize, first_page: u64, mask: &[u64]) -> Result<()> {
        self.inner.clear_mask(region, first_page, mask)?;
        self.log.reset_mask(region, first_page, mask);
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        let r = self.inner.stop();
        self.log.reset_all();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::super::{check_mask, mask_runs};
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A tracker whose "guest" writes are set by hand: sticky until `clear`, like KVM with
    /// manual protect.
    #[derive(Debug)]
    struct Manual {
        pages: Vec<u64>,
        dirty: Vec<Vec<u64>>,
        started: bool,
    }

    impl Manual {
        fn new(pages: &[u64]) -> Manual {
            Manual {
                pages: pages.to_vec(),
                dirty: pages.iter().map(|&p| vec![0; bitmap_words(p)]).collect(),
                started: false,
            }
        }

        fn guest_writes(&mut self, region: usize, page: u64) {
            self.dirty[region][(page / 64) as usize] |= 1 << (page % 64);
        }

        fn started(&self, op: &'static str) -> Result<()> {
            if self.started {
                Ok(())
            } else {
                Err(DirtyError::WrongState {
                    op,
                    state: "stopped",
                })
            }
        }
    }

    impl DirtyTracker for Manual {
        fn name(&self) -> &str {
            "manual"
        }
        fn regions(&self) -> usize {
            self.pages.len()
        }
        fn pages(&self, region: usize) -> Result<u64> {
            self.pages
                .get(region)
                .copied()
                .ok_or(DirtyError::NoSuchRegion {
                    region,
                    regions: self.pages.len(),
                })
        }
        fn start(&mut self) -> Result<()> {
            self.started = true;
            Ok(())
        }
        fn sync(&mut self, region: usize, out: &mut [u64]) -> Result<u64> {
            self.started("sync")?;
            let words = bitmap_words(self.pages(region)?);
            if out.len() < words {
                return Err(DirtyError::BitmapTooSmall {
                    region,
                    words: out.len(),
                    needed: words,
                });
            }
            Ok(super::super::or_into(
                &mut out[..words],
                &self.dirty[region],
            ))
        }
        fn clear(&mut self, region: usize, first_page: u64, count: u64) -> Result<()> {
            self.started("clear")?;
            check_range(region, first_page, count, self.pages(region)?)?;
            for p in first_page..first_page + count {
                self.dirty[region][(p / 64) as usize] &= !(1 << (p % 64));
            }
            Ok(())
        }
        fn clear_mask(&mut self, region: usize, first_page: u64, mask: &[u64]) -> Result<()> {
            self.started("clear")?;
            let pages = self.pages(region)?;
            check_mask(region, first_page, mask, pages)?;
            for (s, n) in mask_runs(mask, pages - first_page) {
                self.clear(region, first_page + s, n)?;
            }
            Ok(())
        }
        fn stop(&mut self) -> Result<()> {
            self.started = false;
            Ok(())
        }
    }

    fn set_pages(bits: &[u64]) -> Vec<u64> {
        let mut v = Vec::new();
        for (w, word) in bits.iter().enumerate() {
            for b in 0..64 {
                if word >> b & 1 == 1 {
                    v.push(w as u64 * 64 + b);
                }
            }
        }
        v
    }

    fn sync_pages(t: &mut impl DirtyTracker, region: usize) -> Vec<u64> {
        let mut out = vec![0; bitmap_words(t.pages(region).unwrap())];
        t.sync(region, &mut out).unwrap();
        set_pages(&out)
    }

    fn assert_send_sync<S: Send + Sync>() {}

    #[test]
    fn shareable_and_boxable() {
        assert_send_sync::<VmmWrites>();
        let writes = Arc::new(VmmWrites::new(&[(0, 64 * PAGE_SIZE)]));
        let t: Box<dyn DirtyTracker> =
            Box::new(WithVmmWrites::new(Manual::new(&[64]), Arc::clone(&writes)).unwrap());
        assert_eq!(t.name(), "manual+vmm-writes");
        let by_ref = WithVmmWrites::new(Manual::new(&[64]), &*writes).unwrap();
        assert_eq!(by_ref.regions(), 1);
    }

    #[test]
    fn a_write_marked_between_syncs_is_reported_until_cleared() {
        let writes = Arc::new(VmmWrites::new(&[
            (0, 100 * PAGE_SIZE),
            (1 << 32, 8 * PAGE_SIZE),
        ]));
        let mut t = WithVmmWrites::new(Manual::new(&[100, 8]), Arc::clone(&writes)).unwrap();
        t.start().unwrap();
        assert!(sync_pages(&mut t, 0).is_empty());

        writes.mark(0, 70 * PAGE_SIZE + 5, 1).unwrap();
        // Reported, and again at every sync until the migration clears it.
        assert_eq!(sync_pages(&mut t, 0), vec![70]);
        assert_eq!(sync_pages(&mut t, 0), vec![70]);
        assert!(sync_pages(&mut t, 1).is_empty());
        t.clear(0, 70, 1).unwrap();
        assert!(sync_pages(&mut t, 0).is_empty());
        // A new write after the clear is reported again.
        writes.mark(0, 70 * PAGE_SIZE, 8).unwrap();
        assert_eq!(sync_pages(&mut t, 0), vec![70]);
        assert_eq!(t.vmm_only_reports(), 3);
    }

    #[test]
    fn clear_re_arms_exactly_the_pages_given() {
        let writes = VmmWrites::new(&[(0, 200 * PAGE_SIZE)]);
        let mut t = WithVmmWrites::new(Manual::new(&[200]), &writes).unwrap();
        t.start().unwrap();
        // 3..=5, and a write across a word boundary: 63 and 64.
        writes.mark(0, 3 * PAGE_SIZE, 3 * PAGE_SIZE).unwrap();
        writes.mark(0, 64 * PAGE_SIZE - 1, 2).unwrap();
        writes.mark(0, 199 * PAGE_SIZE, PAGE_SIZE).unwrap();
        assert_eq!(sync_pages(&mut t, 0), vec![3, 4, 5, 63, 64, 199]);
        t.clear(0, 4, 1).unwrap();
        assert_eq!(sync_pages(&mut t, 0), vec![3, 5, 63, 64, 199]);
        t.clear(0, 60, 4).unwrap();
        assert_eq!(sync_pages(&mut t, 0), vec![3, 5, 64, 199]);
        // The mask form: bit 0 of word 1 is page 64; page 199 is word 3 bit 7.
        t.clear_mask(0, 64, &[1, 0, 1 << 7 | 1 << 60]).unwrap();
        assert_eq!(sync_pages(&mut t, 0), vec![3, 5]);
        assert_eq!(writes.marked_pages(), 2);
        assert!(writes.is_marked(0, 3) && !writes.is_marked(0, 4));
        // A range the tracker refuses re-arms nothing.
        assert!(t.clear(0, 5, 1000).is_err());
        assert!(t.clear_mask(0, 3, &[u64::MAX]).is_err());
        assert_eq!(sync_pages(&mut t, 0), vec![3, 5]);
    }

    #[test]
    fn guest_and_vmm_pages_are_one_union_counted_once() {
        let writes = VmmWrites::new(&[(0, 64 * PAGE_SIZE)]);
        let mut t = WithVmmWrites::new(Manual::new(&[64]), &writes).unwrap();
        t.start().unwrap();
        t.inner_mut().guest_writes(0, 1);
        writes.mark(0, PAGE_SIZE, 1).unwrap();
        writes.mark(0, 2 * PAGE_SIZE, 1).unwrap();
        let mut out = vec![0u64; 1];
        assert_eq!(t.sync(0, &mut out).unwrap(), 2);
        assert_eq!(out, vec![0b110]);
        assert_eq!(t.sync(0, &mut out).unwrap(), 0, "nothing new");
        assert_eq!(t.vmm_only_reports(), 1, "page 1 was the guest's too");
        // Clearing re-arms both sources: the guest's page 1 and the VMM's 1 and 2.
        t.clear(0, 1, 2).unwrap();
        assert!(sync_pages(&mut t, 0).is_empty());
    }

    #[test]
    fn marks_are_checked_and_follow_guest_addresses() {
        let writes = VmmWrites::new(&[
            (1 << 20, 4 * PAGE_SIZE),
            ((1 << 20) + 4 * PAGE_SIZE, 4 * PAGE_SIZE),
            (1 << 32, 2 * PAGE_SIZE),
        ]);
        assert!(matches!(
            writes.mark(0, 3 * PAGE_SIZE, PAGE_SIZE + 1),
            Err(DirtyError::PagesOutOfRange {
                region: 0,
                first_page: 3,
                count: 2,
                pages: 4
            })
        ));
        assert!(matches!(
            writes.mark(3, 0, 1),
            Err(DirtyError::NoSuchRegion {
                region: 3,
                regions: 3
            })
        ));
        assert!(writes.mark(0, u64::MAX, 2).is_err());
        assert!(writes.mark(0, 17, 0).is_ok());
        assert_eq!(writes.marked_pages(), 0, "a refused mark marks nothing");
        // A buffer across the two adjacent regions.
        writes
            .mark_gpa((1 << 20) + 3 * PAGE_SIZE + 100, PAGE_SIZE)
            .unwrap();
        assert!(writes.is_marked(0, 3) && writes.is_marked(1, 0));
        assert_eq!(writes.marked_pages(), 2);
        // Past the end of the last region: the part inside is marked, the call fails.
        let err = writes
            .mark_gpa((1 << 32) + PAGE_SIZE, 2 * PAGE_SIZE)
            .unwrap_err();
        assert!(matches!(err, DirtyError::NotGuestRam { .. }), "{err}");
        assert!(writes.is_marked(2, 1));
        assert!(writes.mark_gpa(0x1000, 1).is_err());
        assert!(writes.mark_gpa(u64::MAX, 2).is_err());
    }

    #[test]
    fn start_and_stop_forget_marks_and_geometry_is_checked() {
        let writes = VmmWrites::new(&[(0, 64 * PAGE_SIZE)]);
        writes.mark(0, 0, 1).unwrap();
        let mut t = WithVmmWrites::new(Manual::new(&[64]), &writes).unwrap();
        assert!(t.sync(0, &mut [0]).is_err(), "not started");
        t.start().unwrap();
        assert!(
            sync_pages(&mut t, 0).is_empty(),
            "a mark from before start is stale"
        );
        writes.mark(0, 0, 1).unwrap();
        t.stop().unwrap();
        assert_eq!(writes.marked_pages(), 0);
        assert!(t.sync(0, &mut []).is_err());

        let r = WithVmmWrites::new(Manual::new(&[64, 1]), &writes);
        assert!(matches!(r, Err(DirtyError::BadRegion { .. })));
        let r = WithVmmWrites::new(Manual::new(&[65]), &writes);
        assert!(matches!(r, Err(DirtyError::BadRegion { region: 0, .. })));
    }

    /// The migration's loop against a concurrent VMM writer: sync, clear what is about to be
    /// sent, copy it, and a final sync after the writer stopped. The copy must equal the
    /// memory: no write may be lost, whatever the interleaving.
    #[test]
    fn no_write_is_lost_to_a_racing_send() {
        const PAGES: u64 = 256;
        let memory: Vec<AtomicU64> = (0..PAGES * 512).map(|_| AtomicU64::new(0)).collect();
        let writes = VmmWrites::new(&[(0, PAGES * PAGE_SIZE)]);
        let mut t = WithVmmWrites::new(Manual::new(&[PAGES]), &writes).unwrap();
        let mut copy = vec![0u64; memory.len()];
        let stop = AtomicBool::new(false);
        let written = AtomicU64::new(0);
        t.start().unwrap();
        let send = |t: &mut WithVmmWrites<Manual, &VmmWrites>, copy: &mut [u64], pages: &[u64]| {
            for &p in pages {
                t.clear(0, p, 1).unwrap();
                for i in p * 512..(p + 1) * 512 {
                    copy[i as usize] = memory[i as usize].load(Ordering::Relaxed);
                }
            }
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut n = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    let page = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56; // 0..256
                    for i in 0..512 {
                        memory[(page * 512 + i) as usize].store(n, Ordering::Relaxed);
                    }
                    writes.mark(0, page * PAGE_SIZE, PAGE_SIZE).unwrap();
                    written.store(n, Ordering::Relaxed);
                    n += 1;
                }
            });
            let all: Vec<u64> = (0..PAGES).collect();
            send(&mut t, &mut copy, &all);
            // Rounds until the writer has raced many of them.
            let mut rounds = 0;
            while rounds < 200 || written.load(Ordering::Relaxed) < 20_000 {
                let dirty = sync_pages(&mut t, 0);
                send(&mut t, &mut copy, &dirty);
                rounds += 1;
            }
            stop.store(true, Ordering::Relaxed);
        });
        // The writer stopped (paused): the final sync and send.
        let dirty = sync_pages(&mut t, 0);
        send(&mut t, &mut copy, &dirty);
        let now: Vec<u64> = memory.iter().map(|w| w.load(Ordering::Relaxed)).collect();
        assert!(now == copy, "the copy lost a write");
        assert!(t.vmm_only_reports() > 0);
    }

    #[cfg(feature = "vm-memory")]
    mod vm_memory_bitmaps {
        use super::*;
        use vm_memory::bitmap::AtomicBitmap;
        use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

        type Memory = GuestMemoryMmap<AtomicBitmap>;

        fn memory() -> Memory {
            Memory::from_ranges(&[
                (GuestAddress(0), 1 << 20),
                (GuestAddress(1 << 32), 64 << 10),
            ])
            .unwrap()
        }

        #[test]
        fn writes_through_vm_memory_are_reported_without_marking() {
            let memory = memory();
            let mut t = WithVmmWrites::new(Manual::new(&[256, 16]), &memory).unwrap();
            t.start().unwrap();
            assert!(sync_pages(&mut t, 0).is_empty());
            // Device emulation writes through vm-memory; vm-memory marks the pages.
            memory
                .write_obj(7u32, GuestAddress(200 * PAGE_SIZE + 2))
                .unwrap();
            memory
                .write_slice(&[1; 100], GuestAddress((1 << 32) + 3 * PAGE_SIZE - 50))
                .unwrap();
            assert_eq!(sync_pages(&mut t, 0), vec![200]);
            assert_eq!(sync_pages(&mut t, 1), vec![2, 3]);
            // Reported until cleared, and clear takes exactly the pages given.
            assert_eq!(sync_pages(&mut t, 1), vec![2, 3]);
            t.clear(1, 3, 1).unwrap();
            assert_eq!(sync_pages(&mut t, 1), vec![2]);
            t.clear_mask(0, 192, &[1 << 8]).unwrap();
            assert!(sync_pages(&mut t, 0).is_empty());
            memory
                .write_obj(1u8, GuestAddress(255 * PAGE_SIZE))
                .unwrap();
            assert_eq!(sync_pages(&mut t, 0), vec![255]);
            t.stop().unwrap();
            // stop forgot every bit.
            t.start().unwrap();
            assert!(sync_pages(&mut t, 0).is_empty() && sync_pages(&mut t, 1).is_empty());
        }

        #[test]
        fn memory_of_another_shape_is_refused() {
            let memory = memory();
            assert_eq!(VmmWriteLog::pages(&memory, 1), Some(16));
            assert_eq!(VmmWriteLog::pages(&memory, 2), None);
            let r = WithVmmWrites::new(Manual::new(&[256, 17]), &memory);
            assert!(matches!(r, Err(DirtyError::BadRegion { region: 1, .. })));
            let r = WithVmmWrites::new(Manual::new(&[256]), Arc::new(memory));
            assert!(matches!(r, Err(DirtyError::BadRegion { .. })));
        }
    }
}
