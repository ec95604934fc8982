//! Guest RAM: a set of host mappings, each one region of guest physical memory.
//!
//! A [`MappedMemory`] holds one or more [`MappedRegion`]s. Each region is a single `mmap` of
//! either anonymous memory or a memfd (so a second mapping of the same pages can be made, as
//! postcopy with `UFFDIO_CONTINUE` needs), optionally backed by 2 MiB pages (hugetlbfs or
//! transparent huge pages). Whether huge pages were obtained, and why not when they were not,
//! is reported per region instead of failing the allocation.
//!
//! The memory is shared with a running guest and with the kernel (KVM writes to it, the
//! io_uring transport reads from and receives into it), so this module hands out raw base
//! pointers and bounds-checked copies; slices are available through `unsafe` accessors whose
//! contract says when they are sound.

use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::thread::JoinHandle;

/// The base page size, in bytes, as a `usize` for mapping arithmetic
/// (Ferry's one page size is [`crate::ram::PAGE_SIZE`]).
const PAGE_SIZE: usize = crate::ram::PAGE_SIZE as usize;
/// Size of a huge page (2 MiB), in bytes.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// `MADV_POPULATE_WRITE` (Linux 5.14), spelled out in case the libc crate lacks it.
const MADV_POPULATE_WRITE: libc::c_int = 23;
/// `MAP_HUGE_2MB`: log2(2 MiB) in the `MAP_HUGE_SHIFT` bits.
const MAP_HUGE_2MB: libc::c_int = 21 << libc::MAP_HUGE_SHIFT;
/// `MFD_HUGE_2MB`: the same encoding for `memfd_create`.
const MFD_HUGE_2MB: libc::c_uint = 21 << 26;

/// Errors of the guest memory module.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A region has a size of zero or not a multiple of the page size in use.
    #[error("region {id} has size {size:#x}, which is not a non-zero multiple of {align:#x}")]
    BadSize {
        /// Region id.
        id: u32,
        /// Requested size.
        size: u64,
        /// Required alignment.
        align: u64,
    },
    /// A region's guest physical base is not page aligned.
    #[error("region {id} starts at guest address {gpa:#x}, which is not page aligned")]
    BadBase {
        /// Region id.
        id: u32,
        /// Requested base.
        gpa: u64,
    },
    /// Two regions overlap in guest physical address space.
    #[error("regions {a} and {b} overlap in guest physical memory")]
    Overlap {
        /// First region id.
        a: u32,
        /// Second region id.
        b: u32,
    },
    /// No regions were given.
    #[error("guest memory needs at least one region")]
    Empty,
    /// `memfd_create` failed.
    #[error("memfd_create for region {id} failed: {source}")]
    Memfd {
        /// Region id.
        id: u32,
        /// OS error.
        source: std::io::Error,
    },
    /// `ftruncate` of the memfd failed.
    #[error("sizing the memfd of region {id} to {size:#x} bytes failed: {source}")]
    Truncate {
        /// Region id.
        id: u32,
        /// Requested size.
        size: u64,
        /// OS error.
        source: std::io::Error,
    },
    /// `mmap` failed.
    #[error("mapping {size:#x} bytes for region {id} failed: {source}")]
    Mmap {
        /// Region id.
        id: u32,
        /// Requested size.
        size: u64,
        /// OS error.
        source: std::io::Error,
    },
    /// A second mapping was asked of a region that is not memfd-backed.
    #[error("region {id} is anonymous memory and cannot be mapped a second time")]
    NotShareable {
        /// Region id.
        id: u32,
    },
    /// An access falls outside every region or crosses the end of one.
    #[error("guest range {gpa:#x}+{len:#x} is not inside a single guest memory region")]
    OutOfRange {
        /// Guest physical address.
        gpa: u64,
        /// Length of the access.
        len: u64,
    },
    /// Populating (prefaulting) a region failed.
    #[error("populating region {id} at offset {offset:#x} failed: {source}")]
    Populate {
        /// Region id.
        id: u32,
        /// Offset in the region where it failed.
        offset: u64,
        /// OS error.
        source: std::io::Error,
    },
    /// The background populate thread panicked or could not be joined.
    #[error("the background populate thread ended abnormally")]
    PopulateThread,
}

/// What backs a region's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backing {
    /// Private anonymous memory.
    #[default]
    Anonymous,
    /// A memfd mapped shared; a second mapping of it can be made with
    /// [`MappedRegion::map_second`] (postcopy with `UFFDIO_CONTINUE`).
    Memfd,
}

/// Which huge pages to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugePages {
    /// Base 4 KiB pages only.
    #[default]
    None,
    /// Transparent huge pages (`madvise(MADV_HUGEPAGE)` on a 2 MiB-aligned mapping).
    Transparent,
    /// Explicit 2 MiB hugetlb pages (`MAP_HUGETLB` / `MFD_HUGETLB`); falls back to
    /// transparent huge pages when none are reserved.
    Hugetlb,
}

/// What a region actually got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageKind {
    /// Base pages, as asked.
    Base,
    /// Transparent huge pages were enabled on the mapping.
    Transparent,
    /// The mapping is hugetlb-backed with 2 MiB pages.
    Hugetlb,
    /// Huge pages were asked but the region uses what is named in `got`, for `reason`.
    Fallback {
        /// What the region uses instead.
        got: &'static str,
        /// Why the request could not be met.
        reason: String,
    },
}

/// How to allocate guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryOptions {
    /// Anonymous or memfd.
    pub backing: Backing,
    /// Huge page policy.
    pub huge_pages: HugePages,
}

/// One region to allocate: id, guest physical base, size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// Region id (used as the KVM memory slot number by the VMM).
    pub id: u32,
    /// Guest physical base address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A mapping owned by this module: unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory with no thread affinity; all access through it goes
// through raw pointers whose users uphold the module's contracts.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only exposes the address.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping created by `mmap` in this module and not
        // unmapped elsewhere.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A second mapping of a memfd-backed region (shared, read-write). It maps the same pages,
/// so writes through it appear in the guest's mapping without faulting there.
#[derive(Debug)]
pub struct SecondMapping {
    map: Mapping,
}

impl SecondMapping {
    /// Base host address of the second mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Whether the mapping is empty (never, for a valid region).
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// Allocates every page of the memfd through this mapping, as a
    /// destination pre-allocates its guest RAM: received pages then land in
    /// memory that exists, and the guest's own mapping still maps none of
    /// them (its first touch is a minor fault, which postcopy relies on).
    pub fn populate(&self) -> Result<(), MemoryError> {
        self.map.populate(0, false)
    }
}

/// One contiguous region of guest physical memory and its host mapping.
#[derive(Debug)]
pub struct MappedRegion {
    id: u32,
    gpa: u64,
    map: Mapping,
    memfd: Option<OwnedFd>,
    kind: PageKind,
    hugetlb: bool,
}

impl MappedRegion {
    /// Region id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Guest physical base address.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.map.len as u64
    }

    /// Guest physical address one past the end.
    pub fn end(&self) -> u64 {
        self.gpa + self.size()
    }

    /// Base host address of the mapping (for KVM memory slots and io_uring buffer
    /// registration). The pointer is valid for `size()` bytes as long as the owning
    /// [`MappedMemory`] (any clone of it) lives.
    pub fn host_ptr(&self) -> *mut u8 {
        self.map.ptr.as_ptr()
    }

    /// What pages back the region.
    pub fn page_kind(&self) -> &PageKind {
        &self.kind
    }

    /// The memfd behind the region, when memfd-backed.
    pub fn memfd(&self) -> Option<BorrowedFd<'_>> {
        self.memfd.as_ref().map(|f| f.as_fd())
    }

    /// Whether `gpa..gpa+len` lies inside this region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.gpa && gpa.checked_add(len).is_some_and(|e| e <= self.end())
    }

    /// The region's memory as a byte slice.
    ///
    /// # Safety
    ///
    /// Nothing may write to the region while the slice is alive: the guest must be paused or
    /// not yet started, and no transfer may be receiving into it. (A guest writing while a
    /// shared slice exists is a data race in Rust's model even though the hardware tolerates
    /// it; use [`MappedMemory::read`] or raw pointers for live memory.)
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is valid for `len` bytes for the lifetime of `self`; the caller
        // guarantees no concurrent writes.
        unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr(), self.map.len) }
    }

    /// The region's memory as a mutable byte slice.
    ///
    /// # Safety
    ///
    /// Nothing else may access the region while the slice is alive (guest paused or not
    /// started, no other slice or transfer using it).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: valid mapping; exclusivity is the caller's guarantee.
        unsafe { std::slice::from_raw_parts_mut(self.map.ptr.as_ptr(), self.map.len) }
    }

    /// Maps the region's memfd a second time (shared, read-write). Fails for anonymous
    /// regions.
    pub fn map_second(&self) -> Result<SecondMapping, MemoryError> {
        let fd = self
            .memfd
            .as_ref()
            .ok_or(MemoryError::NotShareable { id: self.id })?;
        let mut flags = libc::MAP_SHARED;
        if self.hugetlb {
            flags |= libc::MAP_HUGETLB | MAP_HUGE_2MB;
        }
        let map = mmap_at(self.id, self.map.len, flags, fd.as_raw_fd(), self.hugetlb)?;
        Ok(SecondMapping { map })
    }

    /// Prefaults the region writable, so later writes (the guest's, or a received page's)
    /// do not fault. Uses `MADV_POPULATE_WRITE` in 64 MiB steps; on kernels without it,
    /// touches every page instead.
    pub fn populate(&self) -> Result<(), MemoryError> {
        self.map.populate(self.id, self.hugetlb)
    }
}

impl Mapping {
    /// Prefaults the mapping writable (see [`MappedRegion::populate`]); `id` names the
    /// region in errors.
    fn populate(&self, id: u32, hugetlb: bool) -> Result<(), MemoryError> {
        const STEP: usize = 64 << 20;
        let mut off = 0usize;
        while off < self.len {
            let len = STEP.min(self.len - off);
            // SAFETY: `off + len <= len`, so the range is inside our mapping. POPULATE
            // only faults pages in; it does not change their contents.
            let rc = unsafe {
                libc::madvise(self.ptr.as_ptr().add(off).cast(), len, MADV_POPULATE_WRITE)
            };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINVAL) {
                    self.touch(off, len, hugetlb);
                } else {
                    return Err(MemoryError::Populate {
                        id,
                        offset: off as u64,
                        source: err,
                    });
                }
            }
            off += len;
        }
        Ok(())
    }

    /// Fallback populate: read and write back one byte per page.
    fn touch(&self, off: usize, len: usize, hugetlb: bool) {
        let step = if hugetlb { HUGE_PAGE_SIZE } else { PAGE_SIZE };
        let mut o = off;
        while o < off + len {
            // SAFETY: `o < len`; a volatile read and write-back of the same byte keeps
            // the contents (this runs before the memory is handed to a guest or transfer).
            unsafe {
                let p = self.ptr.as_ptr().add(o);
                std::ptr::write_volatile(p, std::ptr::read_volatile(p));
            }
            o += step;
        }
    }
}

#[derive(Debug)]
struct Inner {
    regions: Vec<MappedRegion>,
}

/// Guest RAM: a set of regions. Cloning is cheap and shares the same mappings; the memory is
/// unmapped when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct MappedMemory {
    inner: Arc<Inner>,
}

impl MappedMemory {
    /// Allocates the given regions.
    pub fn new(specs: &[RegionSpec], options: MemoryOptions) -> Result<Self, MemoryError> {
        if specs.is_empty() {
            return Err(MemoryError::Empty);
        }
        for (i, a) in specs.iter().enumerate() {
            for b in &specs[i + 1..] {
                let disjoint =
                    a.gpa.saturating_add(a.size) <= b.gpa || b.gpa.saturating_add(b.size) <= a.gpa;
                if !disjoint {
                    return Err(MemoryError::Overlap { a: a.id, b: b.id });
                }
            }
        }
        let regions = specs
            .iter()
            .map(|s| alloc_region(*s, options))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            inner: Arc::new(Inner { regions }),
        })
    }

    /// Allocates `total` bytes of guest RAM starting at guest address 0, split into regions of
    /// at most `max_region` bytes (ids 0, 1, …).
    pub fn with_size(
        total: u64,
        max_region: u64,
        options: MemoryOptions,
    ) -> Result<Self, MemoryError> {
        let max = max_region.max(HUGE_PAGE_SIZE as u64) & !(HUGE_PAGE_SIZE as u64 - 1);
        let mut specs = Vec::new();
        let mut gpa = 0u64;
        let mut id = 0u32;
        while gpa < total {
            let size = max.min(total - gpa);
            specs.push(RegionSpec { id, gpa, size });
            gpa += size;
            id += 1;
        }
        Self::new(&specs, options)
    }

    /// The regions, in the order given.
    pub fn regions(&self) -> &[MappedRegion] {
        &self.inner.regions
    }

    /// The region with id `id`.
    pub fn region(&self, id: u32) -> Option<&MappedRegion> {
        self.inner.regions.iter().find(|r| r.id == id)
    }

    /// Total bytes over all regions.
    pub fn total_size(&self) -> u64 {
        self.inner.regions.iter().map(MappedRegion::size).sum()
    }

    /// The region holding all of `gpa..gpa+len`.
    pub fn find(&self, gpa: u64, len: u64) -> Result<&MappedRegion, MemoryError> {
        self.inner
            .regions
            .iter()
            .find(|r| r.contains(gpa, len))
            .ok_or(MemoryError::OutOfRange { gpa, len })
    }

    /// Host address of guest address `gpa`, checking that `len` bytes from it lie in one
    /// region.
    pub fn host_address(&self, gpa: u64, len: u64) -> Result<*mut u8, MemoryError> {
        let r = self.find(gpa, len)?;
        // SAFETY: `contains` checked `gpa - r.gpa + len <= size`, so the offset is in bounds.
        Ok(unsafe { r.host_ptr().add((gpa - r.gpa) as usize) })
    }

    /// Copies guest memory at `gpa` into `buf`. The copy is not atomic with respect to a
    /// running guest: a page the guest writes meanwhile may be read torn.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let src = self.host_address(gpa, buf.len() as u64)?;
        // SAFETY: `src` is valid for `buf.len()` bytes (checked above) and cannot overlap a
        // Rust-owned buffer.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let dst = self.host_address(gpa, data.len() as u64)?;
        // SAFETY: `dst` is valid for `data.len()` bytes (checked above), not overlapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Reads a little-endian `u64` at `gpa` (must be 8-byte aligned) with one volatile load,
    /// so a value the guest updates concurrently is never torn.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        if gpa % 8 != 0 {
            return Err(MemoryError::OutOfRange { gpa, len: 8 });
        }
        let p = self.host_address(gpa, 8)?;
        // SAFETY: in bounds (checked), 8-byte aligned (gpa aligned, mapping page aligned).
        Ok(unsafe { std::ptr::read_volatile(p.cast::<u64>()) })
    }

    /// Writes a `u64` at `gpa` (8-byte aligned) with one volatile store.
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), MemoryError> {
        if gpa % 8 != 0 {
            return Err(MemoryError::OutOfRange { gpa, len: 8 });
        }
        let p = self.host_address(gpa, 8)?;
        // SAFETY: in bounds and aligned, as in `read_u64`.
        unsafe { std::ptr::write_volatile(p.cast::<u64>(), value) };
        Ok(())
    }

    /// Prefaults every region writable on the calling thread.
    pub fn populate(&self) -> Result<(), MemoryError> {
        self.inner
            .regions
            .iter()
            .try_for_each(MappedRegion::populate)
    }

    /// Prefaults every region on a background thread; join the handle for the result.
    pub fn populate_in_background(&self) -> JoinHandle<Result<(), MemoryError>> {
        let mem = self.clone();
        std::thread::spawn(move || mem.populate())
    }
}

/// Allocates one region following `options`, falling back from huge pages when the system
/// cannot provide them.
fn alloc_region(spec: RegionSpec, options: MemoryOptions) -> Result<MappedRegion, MemoryError> {
    let RegionSpec { id, gpa, size } = spec;
    if gpa % PAGE_SIZE as u64 != 0 {
        return Err(MemoryError::BadBase { id, gpa });
    }
    let align = if options.huge_pages == HugePages::None {
        PAGE_SIZE as u64
    } else {
        HUGE_PAGE_SIZE as u64
    };
    if size == 0 || size % align != 0 {
        return Err(MemoryError::BadSize { id, size, align });
    }
    let len = usize::try_from(size).map_err(|_| MemoryError::BadSize { id, size, align })?;

    let mut fallback: Option<String> = None;
    if options.huge_pages == HugePages::Hugetlb {
        match alloc_hugetlb(id, len, options.backing) {
            Ok((map, memfd)) => {
                return Ok(MappedRegion {
                    id,
                    gpa,
                    map,
                    memfd,
                    kind: PageKind::Hugetlb,
                    hugetlb: true,
                })
            }
            Err(e) => {
                fallback = Some(format!(
                    "no hugetlb pages ({e}; /proc/sys/vm/nr_hugepages reserves them)"
                ))
            }
        }
    }

    let memfd = match options.backing {
        Backing::Anonymous => None,
        Backing::Memfd => Some(create_memfd(id, size, 0)?),
    };
    let (flags, fd) = match &memfd {
        None => (
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        ),
        Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
    };
    let map = mmap_at(id, len, flags, fd, options.huge_pages != HugePages::None)?;

    let kind = if options.huge_pages == HugePages::None {
        PageKind::Base
    } else {
        match enable_thp(&map, options.backing) {
            Ok(()) => match fallback {
                None => PageKind::Transparent,
                Some(reason) => PageKind::Fallback {
                    got: "transparent huge pages",
                    reason,
                },
            },
            Err(why) => PageKind::Fallback {
                got: "base pages",
                reason: match fallback {
                    None => why,
                    Some(first) => format!("{first}; {why}"),
                },
            },
        }
    };
    Ok(MappedRegion {
        id,
        gpa,
        map,
        memfd,
        kind,
        hugetlb: false,
    })
}

/// Tries a hugetlb-backed mapping (anonymous or memfd).
fn alloc_hugetlb(
    id: u32,
    len: usize,
    backing: Backing,
) -> Result<(Mapping, Option<OwnedFd>), MemoryError> {
    match backing {
        Backing::Anonymous => {
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | MAP_HUGE_2MB;
            Ok((mmap_at(id, len, flags, -1, false)?, None))
        }
        Backing::Memfd => {
            let fd = create_memfd(id, len as u64, libc::MFD_HUGETLB | MFD_HUGE_2MB)?;
            let flags = libc::MAP_SHARED | libc::MAP_HUGETLB | MAP_HUGE_2MB;
            let map = mmap_at(id, len, flags, fd.as_raw_fd(), false)?;
            // Hugetlb reservations are taken at mmap time, so failure shows up above;
            // populating the first page confirms the pool really backs it.
            Ok((map, Some(fd)))
        }
    }
}

/// Enables THP on a mapping, or says why it cannot.
fn enable_thp(map: &Mapping, backing: Backing) -> Result<(), String> {
    let sysfs = match backing {
        Backing::Anonymous => "/sys/kernel/mm/transparent_hugepage/enabled",
        Backing::Memfd => "/sys/kernel/mm/transparent_hugepage/shmem_enabled",
    };
    if let Ok(s) = std::fs::read_to_string(sysfs) {
        if s.contains("[never]") || s.contains("[deny]") {
            return Err(format!("transparent huge pages are off ({sysfs} is never)"));
        }
    }
    // SAFETY: the range is exactly our mapping; MADV_HUGEPAGE only changes a policy flag.
    let rc = unsafe { libc::madvise(map.ptr.as_ptr().cast(), map.len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        return Err(format!(
            "madvise(MADV_HUGEPAGE) failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Creates a memfd of `size` bytes.
fn create_memfd(id: u32, size: u64, extra: libc::c_uint) -> Result<OwnedFd, MemoryError> {
    let name: &CStr = c"ferry-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid memfd flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | extra) };
    if fd < 0 {
        return Err(MemoryError::Memfd {
            id,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::off_t::try_from(size).map_err(|_| MemoryError::Truncate {
        id,
        size,
        source: std::io::Error::from_raw_os_error(libc::EFBIG),
    })?;
    // SAFETY: valid fd owned by us.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
        return Err(MemoryError::Truncate {
            id,
            size,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(fd)
}

/// Maps `len` bytes with `flags` from `fd` (or anonymous), read-write. With `align_huge`, the
/// mapping is placed on a 2 MiB boundary so transparent huge pages can back it.
fn mmap_at(
    id: u32,
    len: usize,
    flags: libc::c_int,
    fd: libc::c_int,
    align_huge: bool,
) -> Result<Mapping, MemoryError> {
    let mmap_err = |source| MemoryError::Mmap {
        id,
        size: len as u64,
        source,
    };
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let mut hint: *mut libc::c_void = std::ptr::null_mut();
    let mut fixed = 0;
    if align_huge {
        // Reserve an oversized range, then map over its first 2 MiB-aligned part.
        let resv_len = len + HUGE_PAGE_SIZE;
        // SAFETY: a fresh PROT_NONE reservation at an address the kernel picks.
        let resv = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                resv_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if resv == libc::MAP_FAILED {
            return Err(mmap_err(std::io::Error::last_os_error()));
        }
        let start = resv as usize;
        let aligned = (start + HUGE_PAGE_SIZE - 1) & !(HUGE_PAGE_SIZE - 1);
        // SAFETY: unmapping the unaligned head and the tail of our own reservation; the kept
        // part is exactly `aligned..aligned+len`.
        unsafe {
            if aligned > start {
                libc::munmap(resv, aligned - start);
            }
            let tail = start + resv_len - (aligned + len);
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        hint = aligned as *mut libc::c_void;
        fixed = libc::MAP_FIXED;
    }
    // SAFETY: either a fresh mapping at a kernel-chosen address, or MAP_FIXED over the
    // reservation made above, which we own entirely.
    let p = unsafe { libc::mmap(hint, len, prot, flags | fixed, fd, 0) };
    if p == libc::MAP_FAILED {
        let err = std::io::Error::last_os_error();
        if fixed != 0 {
            // SAFETY: release the reservation we still own.
            unsafe { libc::munmap(hint, len) };
        }
        return Err(mmap_err(err));
    }
    let ptr = NonNull::new(p.cast::<u8>())
        .ok_or_else(|| mmap_err(std::io::Error::from_raw_os_error(libc::EFAULT)))?;
    Ok(Mapping { ptr, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_bounds() {
        let mem = MappedMemory::with_size(6 << 20, 4 << 20, MemoryOptions::default()).unwrap();
        assert_eq!(mem.regions().len(), 2);
        assert_eq!(mem.regions()[1].gpa(), 4 << 20);
        assert_eq!(mem.total_size(), 6 << 20);
        mem.write(0x1234, b"hello").unwrap();
        let mut b = [0u8; 5];
        mem.read(0x1234, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        // Crossing a region boundary or the end is refused.
        assert!(mem.read((4 << 20) - 2, &mut b).is_err());
        assert!(mem.read((6 << 20) - 2, &mut b).is_err());
        assert!(mem.write_u64(3, 1).is_err());
    }

    #[test]
    fn overlap_refused() {
        let specs = [
            RegionSpec {
                id: 0,
                gpa: 0,
                size: 8192,
            },
            RegionSpec {
                id: 1,
                gpa: 4096,
                size: 8192,
            },
        ];
        assert!(matches!(
            MappedMemory::new(&specs, MemoryOptions::default()),
            Err(MemoryError::Overlap { .. })
        ));
    }

    #[test]
    fn memfd_second_mapping_shares_pages() {
        let opts = MemoryOptions {
            backing: Backing::Memfd,
            huge_pages: HugePages::None,
        };
        let mem = MappedMemory::with_size(1 << 20, 1 << 30, opts).unwrap();
        let r = &mem.regions()[0];
        let second = r.map_second().unwrap();
        // SAFETY: test-owned mapping, in bounds.
        unsafe { second.as_ptr().add(4096).write_volatile(0xab) };
        assert_eq!(mem.read_u64(4096).unwrap() & 0xff, 0xab);
        let anon = MappedMemory::with_size(1 << 20, 1 << 30, MemoryOptions::default()).unwrap();
        assert!(anon.regions()[0].map_second().is_err());
    }

    #[test]
    fn huge_pages_report_what_they_got() {
        for backing in [Backing::Anonymous, Backing::Memfd] {
            for huge in [HugePages::Transparent, HugePages::Hugetlb] {
                let opts = MemoryOptions {
                    backing,
                    huge_pages: huge,
                };
                let mem = MappedMemory::with_size(4 << 20, 1 << 30, opts).unwrap();
                let r = &mem.regions()[0];
                assert_eq!(r.host_ptr() as usize % HUGE_PAGE_SIZE, 0);
                if let PageKind::Fallback { reason, .. } = r.page_kind() {
                    assert!(!reason.is_empty());
                }
                mem.populate_in_background().join().unwrap().unwrap();
                mem.write_u64(8, 7).unwrap();
                assert_eq!(mem.read_u64(8).unwrap(), 7);
            }
        }
    }
}
