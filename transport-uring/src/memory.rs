//! Guest memory the transport may read from and write into, and its registration pieces.

use core::ptr::NonNull;

/// The largest single buffer the kernel accepts for fixed-buffer registration (1 GiB).
pub const MAX_FIXED_BUFFER: usize = 1 << 30;

/// One contiguous mapping of guest memory that channels may send from and receive into.
///
/// A region is a plain description (base address and length); it owns nothing. The host
/// builds these from its mmap'd guest RAM. Region indices in records are indices into the
/// slice of regions a channel was built with.
#[derive(Clone, Copy, Debug)]
pub struct MemRegion {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a `MemRegion` is an address range whose validity the constructor's caller vouches
// for (see `MemRegion::new`); moving the description to another thread does not touch memory.
unsafe impl Send for MemRegion {}
// SAFETY: as above; sharing the description gives no access beyond what `new` promised.
unsafe impl Sync for MemRegion {}

impl MemRegion {
    /// Describes `len` bytes of memory starting at `base`.
    ///
    /// # Safety
    ///
    /// `base..base + len` must be one mapping, readable and writable by this process, that
    /// stays mapped (neither unmapped nor remapped) for as long as any channel built with
    /// this region exists. No Rust reference (`&[u8]` / `&mut [u8]`) to those bytes may be
    /// alive while a channel receives into them. Concurrent plain accesses by a guest are
    /// allowed: the transport only ever reads and writes the memory through raw pointers.
    pub unsafe fn new(base: NonNull<u8>, len: usize) -> Self {
        Self { base, len }
    }

    /// The first byte of the region.
    pub fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// The region's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A range that lies outside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRange {
    /// The region index the record named.
    pub region: u32,
    /// The byte offset inside that region.
    pub offset: u64,
    /// The number of bytes.
    pub len: u64,
    /// The region's length, or `None` when no region has that index.
    pub region_len: Option<u64>,
}

impl core::fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.region_len {
            Some(l) => write!(
                f,
                "bytes {}..{} of region {} lie outside its {} bytes",
                self.offset,
                self.offset.saturating_add(self.len),
                self.region,
                l
            ),
            None => write!(f, "region {} does not exist", self.region),
        }
    }
}

/// The regions of one channel, with their split into registration pieces of at most 1 GiB.
#[derive(Clone, Debug, Default)]
pub(crate) struct GuestMap {
    regions: Vec<MemRegion>,
    /// For each region, the index (among all pieces) of its first piece.
    first_piece: Vec<usize>,
    /// Every piece as (base, len), in registration order.
    pieces: Vec<(NonNull<u8>, usize)>,
}

impl GuestMap {
    pub(crate) fn new(regions: &[MemRegion]) -> Self {
        let mut first_piece = Vec::with_capacity(regions.len());
        let mut pieces = Vec::new();
        for r in regions {
            first_piece.push(pieces.len());
            let mut off = 0;
            while off < r.len {
                let len = (r.len - off).min(MAX_FIXED_BUFFER);
                // `off < r.len`, so the pointer stays inside the region's mapping.
                let p = r.base.as_ptr().wrapping_add(off);
                if let Some(p) = NonNull::new(p) {
                    pieces.push((p, len));
                }
                off += len;
            }
        }
        Self {
            regions: regions.to_vec(),
            first_piece,
            pieces,
        }
    }

    /// Every registration piece as (base, len).
    pub(crate) fn pieces(&self) -> &[(NonNull<u8>, usize)] {
        &self.pieces
    }

    /// Total bytes over all regions.
    pub(crate) fn total_len(&self) -> usize {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Checks that `region[offset..offset+len]` lies inside guest memory and returns a pointer
    /// to its first byte.
    pub(crate) fn check(&self, region: u32, offset: u64, len: u64) -> Result<*mut u8, OutOfRange> {
        let err = |region_len| OutOfRange {
            region,
            offset,
            len,
            region_len,
        };
        let r = self.regions.get(region as usize).ok_or(err(None))?;
        let end = offset.checked_add(len).ok_or(err(Some(r.len as u64)))?;
        if end > r.len as u64 {
            return Err(err(Some(r.len as u64)));
        }
        // `offset <= r.len`, checked above, so the result stays inside (or one past) the mapping.
        Ok(r.base.as_ptr().wrapping_add(offset as usize))
    }

    /// The piece holding byte `offset` of `region` (already checked) and the bytes left in
    /// that piece from there.
    pub(crate) fn piece_of(&self, region: u32, offset: u64) -> (usize, usize) {
        let idx = self.first_piece.get(region as usize).copied().unwrap_or(0)
            + (offset as usize) / MAX_FIXED_BUFFER;
        let within = (offset as usize) % MAX_FIXED_BUFFER;
        let len = self.pieces.get(idx).map_or(0, |p| p.1);
        (idx, len.saturating_sub(within))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_and_pieces() {
        let mut buf = vec![0u8; 8192];
        let base = NonNull::new(buf.as_mut_ptr()).unwrap();
        // SAFETY: `buf` outlives the map and is not referenced while the map is used.
        let r = unsafe { MemRegion::new(base, 8192) };
        let m = GuestMap::new(&[r]);
        assert_eq!(m.pieces().len(), 1);
        assert!(m.check(0, 4096, 4096).is_ok());
        assert_eq!(m.check(0, 4097, 4096).unwrap_err().region_len, Some(8192));
        assert_eq!(m.check(1, 0, 1).unwrap_err().region_len, None);
        assert!(m.check(0, u64::MAX, 2).is_err());
        assert_eq!(m.piece_of(0, 100), (0, 8092));
        drop(m);
        drop(buf);
    }

    #[test]
    fn large_region_splits_at_one_gib() {
        // A description only: nothing is mapped at these addresses and nothing dereferences them.
        let base = NonNull::new(0x1000_0000_0000usize as *mut u8).unwrap();
        // SAFETY: the map is only asked for arithmetic; the memory is never accessed.
        let r = unsafe { MemRegion::new(base, 5 * MAX_FIXED_BUFFER / 2) };
        let m = GuestMap::new(&[r, r]);
        assert_eq!(m.pieces().len(), 6);
        assert_eq!(m.pieces()[2].1, MAX_FIXED_BUFFER / 2);
        assert_eq!(
            m.piece_of(1, MAX_FIXED_BUFFER as u64 + 5),
            (4, MAX_FIXED_BUFFER - 5)
        );
    }
}
