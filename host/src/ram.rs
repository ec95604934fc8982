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

/// Why guest memory cannot be described as [`Ram`] (from `Ram::from_guest_memory`, feature
/// `vm-memory`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RamError {
    /// More regions than the wire's layout carries.
    #[error("guest memory has {regions} regions; a migration carries at most {max}")]
    TooManyRegions {
        /// Regions in the guest memory.
        regions: usize,
        /// The wire's bound, [`MAX_REGIONS`](ferry_core::wire::MAX_REGIONS).
        max: usize,
    },
    /// A region's guest address, host address or size is not a multiple of [`PAGE_SIZE`].
    #[error(
        "region {region} (guest {gpa:#x}, {len:#x} bytes at host {host:#x}) is not \
         page-aligned: its {what} is not a multiple of {PAGE_SIZE}"
    )]
    NotPageAligned {
        /// Index of the region.
        region: usize,
        /// Guest physical base.
        gpa: u64,
        /// Host address.
        host: usize,
        /// Size in bytes.
        len: u64,
        /// Which of the three: "guest address", "host address" or "size".
        what: &'static str,
    },
    /// A region of no bytes.
    #[error("region {region} at guest {gpa:#x} is empty")]
    Empty {
        /// Index of the region.
        region: usize,
        /// Guest physical base.
        gpa: u64,
    },
    /// A region without a host mapping (a null address).
    #[error("region {region} at guest {gpa:#x} has no host mapping")]
    NoHostMapping {
        /// Index of the region.
        region: usize,
        /// Guest physical base.
        gpa: u64,
    },
    /// A region not mapped both readable and writable: the source reads every page and the
    /// destination writes every page.
    #[error("region {region} at guest {gpa:#x} is not mapped readable and writable")]
    NotReadWrite {
        /// Index of the region.
        region: usize,
        /// Guest physical base.
        gpa: u64,
    },
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

    /// Describes the regions of a vm-memory [`GuestMemoryMmap`](vm_memory::GuestMemoryMmap)
    /// (feature `vm-memory`), numbered in order: region `i` is the `i`-th region of
    /// `memory`, at its guest address, its host mapping and its size. `memory` stays
    /// borrowed for as long as the `Ram` is used, so its mappings cannot go away under a
    /// migration.
    ///
    /// Fails when a region is not whole pages at page-aligned guest and host addresses, is
    /// empty, not mapped readable and writable, or when there are more than
    /// [`MAX_REGIONS`](ferry_core::wire::MAX_REGIONS) of them.
    ///
    /// A VMM hands Ferry the memory its guest runs in:
    ///
    /// ```
    /// use ferry_host::ram::Ram;
    /// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    ///
    /// // 2 MiB at 0 and 4 MiB at 4 GiB, as a VMM with a PCI hole lays out its RAM.
    /// let memory: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
    ///     (GuestAddress(0), 2 << 20),
    ///     (GuestAddress(4 << 30), 4 << 20),
    /// ])?;
    /// memory.write_obj(0xfe44_u64, GuestAddress((4 << 30) + 8192))?;
    ///
    /// let ram = Ram::from_guest_memory(&memory)?;
    /// let high = ram.regions()[1];
    /// assert_eq!((high.id, high.gpa, high.pages()), (1, 4 << 30, 1024));
    /// // The wire layout is the guest's memory map.
    /// let layout = ram.layout().expect("a valid layout");
    /// assert_eq!(layout.regions().len(), 2);
    /// assert_eq!((layout.regions()[1].gpa, layout.regions()[1].size), (4 << 30, 4 << 20));
    /// // Ferry reads the bytes the VMM wrote, through the same mapping.
    /// // SAFETY: nothing writes the page while it is read.
    /// let page = unsafe { high.pages_slice(2, 1) }.unwrap();
    /// assert_eq!(page[..8], 0xfe44_u64.to_le_bytes());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// The `Ram` cannot outlive the memory (error E0597):
    ///
    /// ```compile_fail,E0597
    /// use ferry_host::ram::Ram;
    /// use vm_memory::{GuestAddress, GuestMemoryMmap};
    ///
    /// let ram = {
    ///     let memory: GuestMemoryMmap =
    ///         GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    ///     Ram::from_guest_memory(&memory).unwrap()
    /// }; // `memory` is unmapped here.
    /// assert_eq!(ram.total_bytes(), 1 << 20);
    /// ```
    #[cfg(feature = "vm-memory")]
    pub fn from_guest_memory<B: vm_memory::bitmap::Bitmap>(
        memory: &'a vm_memory::GuestMemoryMmap<B>,
    ) -> Result<Ram<'a>, RamError> {
        use ferry_core::wire::MAX_REGIONS;
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

        let count = memory.num_regions();
        if count > MAX_REGIONS {
            return Err(RamError::TooManyRegions {
                regions: count,
                max: MAX_REGIONS,
            });
        }
        let mut regions = Vec::with_capacity(count);
        for (i, r) in memory.iter().enumerate() {
            let gpa = r.start_addr().0;
            let len = r.len();
            let host = r.as_ptr();
            let misaligned = |what| RamError::NotPageAligned {
                region: i,
                gpa,
                host: host as usize,
                len,
                what,
            };
            if len == 0 {
                return Err(RamError::Empty { region: i, gpa });
            }
            if gpa % PAGE_SIZE != 0 {
                return Err(misaligned("guest address"));
            }
            if host as usize as u64 % PAGE_SIZE != 0 {
                return Err(misaligned("host address"));
            }
            if len % PAGE_SIZE != 0 {
                return Err(misaligned("size"));
            }
            let Some(host) = NonNull::new(host) else {
                return Err(RamError::NoHostMapping { region: i, gpa });
            };
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            if r.prot() & rw != rw {
                return Err(RamError::NotReadWrite { region: i, gpa });
            }
            regions.push(RamRegion {
                // At most MAX_REGIONS regions, which fits.
                id: i as u16,
                gpa,
                host,
                len,
                _memory: PhantomData,
            });
        }
        Ok(Ram { regions })
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
                // MappedMemory or of the GuestMemoryMmap, whose regions hold their
                // mappings, or `from_raw`'s contract), and every channel
                // built from these regions lives inside the migration call
                // that borrows this `Ram`.
                unsafe { MemRegion::new(r.host, r.len as usize) }
            })
            .collect()
    }
}

#[cfg(all(test, feature = "vm-memory"))]
mod tests {
    use super::*;
    use ferry_core::wire::MAX_REGIONS;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

    fn guest_memory(ranges: &[(u64, usize)]) -> GuestMemoryMmap {
        let ranges: Vec<_> = ranges.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn guest_memory_regions_become_the_layout() {
        let memory = guest_memory(&[(0, 1 << 20), (1 << 20, 64 << 10), (8 << 30, 2 << 20)]);
        let ram = Ram::from_guest_memory(&memory).unwrap();
        let got: Vec<_> = ram
            .regions()
            .iter()
            .map(|r| (r.id, r.gpa, r.len()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 0, 1 << 20),
                (1, 1 << 20, 64 << 10),
                (2, 8 << 30, 2 << 20)
            ]
        );
        assert_eq!(ram.total_bytes(), (1 << 20) + (64 << 10) + (2 << 20));
        let layout = ram.layout().unwrap();
        let wire: Vec<_> = layout
            .regions()
            .iter()
            .map(|r| (r.id, r.gpa, r.size))
            .collect();
        assert_eq!(wire, got);
        // Each region is the same mapping vm-memory reads and writes.
        for (i, r) in ram.regions().iter().enumerate() {
            let gpa = GuestAddress(r.gpa + r.len() - 8);
            memory.write_obj(0x1000 + i as u64, gpa).unwrap();
            // SAFETY: nothing writes the page while it is read.
            let last = unsafe { r.pages_slice(r.pages() - 1, 1) }.unwrap();
            assert_eq!(last[4088..], (0x1000 + i as u64).to_le_bytes());
        }
        // ... and Ferry's writes are what the VMM reads.
        // SAFETY: no guest runs in this memory and nothing else touches the page.
        assert!(unsafe { ram.regions()[2].write_pages(3, 1, &[0xab; 4096]) });
        let byte: u8 = memory
            .read_obj(GuestAddress((8 << 30) + 3 * 4096 + 17))
            .unwrap();
        assert_eq!(byte, 0xab);
        assert_eq!(ram.mem_regions().len(), 3);
    }

    #[test]
    fn unaligned_regions_are_refused() {
        let memory = guest_memory(&[(0x800, 0x2000)]);
        assert_eq!(
            Ram::from_guest_memory(&memory).unwrap_err(),
            RamError::NotPageAligned {
                region: 0,
                gpa: 0x800,
                host: memory.iter().next().unwrap().as_ptr() as usize,
                len: 0x2000,
                what: "guest address",
            }
        );
        let memory = guest_memory(&[(0, 0x1000), (0x1000, 0x1800)]);
        let err = Ram::from_guest_memory(&memory).unwrap_err();
        assert!(
            matches!(
                err,
                RamError::NotPageAligned {
                    region: 1,
                    what: "size",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("size is not a multiple of 4096"),
            "{err}"
        );

        // (vm-memory itself refuses a mapping at a host address that is not page-aligned;
        // `from_guest_memory` checks it all the same.)
    }

    #[test]
    fn read_only_and_too_many_regions_are_refused() {
        let region = MmapRegionBuilder::<()>::new(0x4000)
            .with_mmap_prot(libc::PROT_READ)
            .build()
            .unwrap();
        let memory = GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(
            region,
            GuestAddress(1 << 20),
        )
        .unwrap()])
        .unwrap();
        assert_eq!(
            Ram::from_guest_memory(&memory).unwrap_err(),
            RamError::NotReadWrite {
                region: 0,
                gpa: 1 << 20
            }
        );

        let ranges: Vec<_> = (0..=MAX_REGIONS as u64)
            .map(|i| (i * 0x2000, 0x1000))
            .collect();
        let memory = guest_memory(&ranges);
        assert_eq!(
            Ram::from_guest_memory(&memory).unwrap_err(),
            RamError::TooManyRegions {
                regions: MAX_REGIONS + 1,
                max: MAX_REGIONS
            }
        );
        let memory = guest_memory(&ranges[..MAX_REGIONS]);
        let ram = Ram::from_guest_memory(&memory).unwrap();
        assert_eq!(ram.regions().len(), MAX_REGIONS);
        assert!(ram.layout().is_ok());
    }
}
