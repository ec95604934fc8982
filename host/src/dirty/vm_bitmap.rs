//! vm-memory's dirty bitmaps as the record of the VMM's own writes (feature `vm-memory`).
//!
//! A VMM whose guest memory is a `GuestMemoryMmap<AtomicBitmap>` has every write it makes
//! through vm-memory's `Bytes` interface (`write_obj`, `write_slice`, `read_volatile_from`,
//! ...) marked in the region's bitmap, after the write, by vm-memory itself. Such memory is a
//! [`VmmWriteLog`] as it is: hand a reference (or an `Arc`) to
//! [`WithVmmWrites`](super::WithVmmWrites) and those writes are migrated without the VMM
//! marking anything.
//!
//! While a migration runs it owns the bitmaps: a sent page's bit is reset just before the
//! page is read, and `start` and `stop` reset them all, so nothing else (a snapshot's
//! dirty-page pass, say) may read or reset them meanwhile. Writes made around vm-memory, with
//! raw pointers from `as_ptr` or `get_host_address`, are not in the bitmaps: mark those in a
//! [`VmmWrites`](super::VmmWrites) instead.
//!
//! The bitmaps must count in pages of [`PAGE_SIZE`] bytes (vm-memory sizes them by the host
//! page size, 4 KiB on x86-64); `WithVmmWrites::new` refuses memory whose bitmaps do not.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use super::{mask_runs, VmmWriteLog, PAGE_SIZE};

fn region(
    memory: &GuestMemoryMmap<AtomicBitmap>,
    index: usize,
) -> Option<&GuestRegionMmap<AtomicBitmap>> {
    memory.iter().nth(index)
}

fn bitmap(region: &GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    // The mapping's own bitmap (`MmapRegion::bitmap`), not the trait's slice of it.
    (**region).bitmap()
}

impl VmmWriteLog for GuestMemoryMmap<AtomicBitmap> {
    fn regions(&self) -> usize {
        self.num_regions()
    }

    fn pages(&self, index: usize) -> Option<u64> {
        let r = region(self, index)?;
        let len = r.len();
        let pages = len / PAGE_SIZE;
        let b = bitmap(r);
        // One bit per PAGE_SIZE page of the whole region, and nothing else.
        (len % PAGE_SIZE == 0 && b.len() as u64 == pages && b.byte_size() as u64 == len)
            .then_some(pages)
    }

    fn collect(&self, index: usize, out: &mut [u64]) -> u64 {
        let Some(r) = region(self, index) else {
            return 0;
        };
        let b = bitmap(r);
        let pages = b.len();
        let mut newly = 0;
        for (w, o) in out.iter_mut().enumerate().take(pages.div_ceil(64)) {
            let base = w * 64;
            let mut bits = 0u64;
            for i in 0..(pages - base).min(64) {
                // An Acquire load: the write the bit stands for is visible after it.
                if b.is_bit_set(base + i) {
                    bits |= 1 << i;
                }
            }
            newly += u64::from((bits & !*o).count_ones());
            *o |= bits;
        }
        newly
    }

    fn reset(&self, index: usize, first_page: u64, count: u64) {
        if let Some(r) = region(self, index) {
            // Atomic read-modify-writes, one per page, bits past the end ignored.
            bitmap(r).reset_addr_range(
                (first_page * PAGE_SIZE) as usize,
                (count * PAGE_SIZE) as usize,
            );
        }
    }

    fn reset_mask(&self, index: usize, first_page: u64, mask: &[u64]) {
        if let Some(r) = region(self, index) {
            let b = bitmap(r);
            for (start, len) in mask_runs(mask, u64::MAX) {
                for page in first_page + start..first_page + start + len {
                    b.reset_bit(page as usize);
                }
            }
        }
    }

    fn reset_all(&self) {
        for r in self.iter() {
            // Read-modify-writes (not stores), so the writes behind the bits taken away are
            // visible to the pass over memory that follows.
            let _ = bitmap(r).get_and_reset();
        }
    }
}
