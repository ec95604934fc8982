//! Guest RAM as the migration sees it: regions of whole pages at known host
//! addresses, numbered by their wire id.

use std::marker::PhantomData;
use std::ptr::NonNull;

use ferry_core::wire::{Layout, LayoutError, Region};
use ferry_uring::MemRegion;

use crate::memory::MappedMemory;

/// The page size Ferry migrates in.
pub const PAGE_SIZE: u64 = 4096;

/// One region of guest RAM: `len` bytes at `host`, guest physical `gpa`,
/// borrowed for `'a` from the memory that backs it.
///
/// A region is used while its memory lives:
///
/// ```
/// use ferry_host::memory::{MappedMemory, MemoryOptions};
/// use ferry_host::ram::{Ram, RamRegion};
///
/// let memory = MappedMemory::with_size(2 << 20, 2 << 20, MemoryOptions::default()).unwrap();
/// let region: RamRegion<'_> = Ram::from_memory(&memory).regions()[0];
/// assert_eq!(region.pages(), 512);
/// ```
///
/// and cannot outlive it (error E0597, `memory` does not live long enough):
///
/// ```compile_fail,E0597
/// use ferry_host::memory::{MappedMemory, MemoryOptions};
/// use ferry_host::ram::{Ram, RamRegion};
///
/// let region: RamRegion<'_> = {
///     let memory = MappedMemory::with_size(2 << 20, 2 << 20, MemoryOptions::default()).unwrap();
///     Ram::from_memory(&memory).regions()[0]
/// }; // `memory` is unmapped here, so `region` may not be used below.
/// assert_eq!(region.pages(), 512);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct RamRegion<'a> {
    /// Wire id: the region's index in its [`Ram`].
    pub id: u16,
    /// Guest physical base address.
    pub gpa: u64,
    host: NonNull<u8>,
    len: u64,
    _memory: PhantomData<&'a [u8]>,
}

impl<'a> RamRegion<'a> {
    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host address of the region's first byte.
    pub fn host(&self) -> NonNull<u8> {
        self.host
    }

    /// Pages `first..first + count` as bytes, or `None` when they are not
    /// all inside the region.
    ///
    /// # Safety
    ///
    /// The bytes may change under the returned slice (a running guest
    /// writes them): the caller must only use it for reads whose result it
    /// tolerates being torn, such as a checksum that is checked again later,
    /// and must not hold it across a receive into the same pages.
    pub unsafe fn pages_slice(&self, first: u64, count: u64) -> Option<&[u8]> {
        let (off, len) = self.byte_range(first, count)?;
        // SAFETY: the range lies inside the mapping (checked above), which the
        // owning `Ram` keeps alive; the caller accepts concurrent writes.
        Some(unsafe { std::slice::from_raw_parts(self.host.as_ptr().add(off), len) })
    }

    /// Writes zeros over pages `first..first + count`; false when they are not
    /// all inside the region.
    ///
    /// # Safety
    ///
    /// Nothing else may read or write these pages while the call runs: the
    /// guest that owns them is not running (a destination before *go*) and no
    /// other thread or in-flight I/O targets them. The bounds are checked here.
    pub unsafe fn zero_pages(&self, first: u64, count: u64) -> bool {
        let Some((off, len)) = self.byte_range(first, count) else {
            return false;
        };
        // SAFETY: the range lies inside the mapping, which stays mapped for
        // 'a; the caller guarantees exclusive access to these pages.
        unsafe { std::ptr::write_bytes(self.host.as_ptr().add(off), 0, len) };
        true
    }

    /// Copies `bytes` over pages `first..first + count`; false (nothing
    /// written) when they are not all inside the region or `bytes` is not
    /// exactly that long.
    ///
    /// # Safety
    ///
    /// As for [`zero_pages`](Self::zero_pages): exclusive access to the
    /// pages for the duration of the call. `bytes` must not alias them.
    pub unsafe fn write_pages(&self, first: u64, count: u64, bytes: &[u8]) -> bool {
        let Some((off, len)) = self.byte_range(first, count) else {
            return false;
        };
        if bytes.len() != len {
            return false;
        }
        // SAFETY: the range lies inside the mapping, which stays mapped for
        // 'a; the caller guarantees exclusive access and no aliasing.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.host.as_ptr().add(off), len) };
        true
    }

    /// True when every byte of the page is zero.
    pub fn page_is_zero(&self, page: u64) -> bool {
        // SAFETY: a read that tolerates tearing: a page misjudged because the
        // guest wrote it during the check is dirty and will be sent again.
        match unsafe { self.pages_slice(page, 1) } {
            Some(bytes) => is_zero(bytes),
            None => false,
        }
    }

    fn byte_range(&self, first: u64, count: u64) -> Option<(usize, usize)> {
        let end = first.checked_add(count)?;
        if end > self.pages() {
            return None;
        }
        let off = usize::try_from(first.checked_mul(PAGE_SIZE)?).ok()?;
        let len = usize::try_from(count.checked_mul(PAGE_SIZE)?).ok()?;
        Some((off, len))
    }
}

/// True when all of `bytes` are zero (word at a time; vectorised by LLVM).
pub fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to splits correctly.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0)
        && tail.iter().all(|b| *b == 0)
        && words
            .chunks(8)
            .all(|c| c.iter().fold(0u64, |a, w| a | w) == 0)
}

/// The guest RAM of one side of a migration: its regions, borrowed from the
/// memory that backs them.
#[derive(Clone, Debug)]
pub struct Ram<'a> {
    regions: Vec<RamRegion<'a>>,
}

// SAFETY: a region describes a mapping it borrows for 'a, like a `&'a [u8]`
// would; every access to the bytes goes through raw pointers under the
// contracts of `RamRegion::pages_slice`, `zero_pages` and `write_pages`,
// which are `unsafe` for exactly that reason.
unsafe impl Send for RamRegion<'_> {}
// SAFETY: as above.
unsafe impl Sync for RamRegion<'_> {}

impl<'a> Ram<'a> {
    /// The regions of `memory`, numbered in order.
    pub fn from_memory(memory: &'a MappedMemory) -> Ram<'a> {
        let regions = memory
            .regions()
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                Some(RamRegion {
                    id: u16::try_from(i).ok()?,
                    gpa: r.gpa(),
                    host: NonNull::new(r.host_ptr())?,
                    len: r.size() - r.size() % PAGE_SIZE,
                    _memory: PhantomData,
                })
            })
            .collect();
        Ram { regions }
    }

    /// Describes raw mappings as guest RAM.
    ///
    /// # Safety
    ///
    /// Each `(gpa, host, len)` must be a readable and writable mapping that
    /// stays mapped for `'a`.
    pub unsafe fn from_raw(parts: &[(u64, NonNull<u8>, u64)]) -> Ram<'a> {
        let regions = parts
            .iter()
            .enumerate()
            .map(|(i, &(gpa, host, len))| RamRegion {
                id: i as u16,
                gpa,
                host,
                len: len - len % PAGE_SIZE,
                _memory: PhantomData,
            })
            .collect();
        Ram { regions }
    }

    /// The regions, indexed by wire id.
    pub fn regions(&self) -> &[RamRegion<'a>] {
        &self.regions
    }

    /// The region with wire id `id`.
    pub fn region(&self, id: u16) -> Option<&RamRegion<'a>> {
        self.regions.get(usize::from(id))
    }

    /// Total bytes.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// The wire layout of this RAM.
    pub fn layout(&self) -> Result<Layout, LayoutError> {
        let regions: Vec<Region> = self
            .regions
            .iter()
            .map(|r| Region {
                id: r.id,
                gpa: r.gpa,
                size: r.len,
            })
            .collect();
        Layout::new(PAGE_SIZE as u32, &regions)
    }

    /// The regions as the transport registers them.
    pub fn mem_regions(&self) -> Vec<MemRegion> {
        self.regions
            .iter()
            .map(|r| {
                // SAFETY: the mapping stays mapped for 'a (the borrow of the
                // MappedMemory, or `from_raw`'s contract), and every channel
                // built from these regions lives inside the migration call
                // that borrows this `Ram`.
                unsafe { MemRegion::new(r.host, r.len as usize) }
            })
            .collect()
    }
}
