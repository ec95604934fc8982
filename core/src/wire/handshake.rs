//! The handshake: format version, page size, capabilities and the guest RAM layout.
//!
//! The source sends one [`Hello`] record before anything else on the main channel. It is
//! a 32-byte header of kind [`HELLO_KIND`] (`count` = number of regions, payload CRC
//! always present) followed by a payload of [`HELLO_FIXED_LEN`] bytes:
//!
//! | off | size | field          |
//! |-----|------|----------------|
//! | 0   | 8    | magic ([`MAGIC`]) |
//! | 8   | 2    | format version ([`VERSION`]) |
//! | 10  | 2    | capability bits (1 postcopy-ram, 2 postcopy-only sections, 4 payload checksums) |
//! | 12  | 2    | channel count |
//! | 14  | 2    | region count |
//! | 16  | 4    | page size |
//! | 20  | 4    | resume: 0 for a new migration, else the session id of the interrupted postcopy to resume |
//! | 24  | 8    | reserved, zero |
//!
//! and one [`REGION_ENTRY_LEN`]-byte entry per region: id (u16), 6 reserved zero bytes,
//! guest physical base (u64), size in bytes (u64).

use core::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::error::{Cause, EmitError, Field};
use super::header::{Header, RecordHeader, HEADER_LEN};

/// Magic bytes at the start of the hello payload.
pub const MAGIC: [u8; 8] = *b"FERRYMIG";
/// Wire format version.
pub const VERSION: u16 = 1;
/// Record kind of the hello record.
pub const HELLO_KIND: u8 = 0x20;
/// Most regions a layout may hold.
pub const MAX_REGIONS: usize = 32;
/// Smallest page size (bytes).
pub const MIN_PAGE_SIZE: u32 = 512;
/// Largest page size (bytes).
pub const MAX_PAGE_SIZE: u32 = 1 << 30;
/// Most channels a session may use.
pub const MAX_CHANNELS: u16 = 64;
/// Length of the fixed part of the hello payload.
pub const HELLO_FIXED_LEN: usize = 32;
/// Length of one region entry in the hello payload.
pub const REGION_ENTRY_LEN: usize = 24;
/// Longest hello record, header included.
pub const MAX_HELLO_LEN: usize = HEADER_LEN + HELLO_FIXED_LEN + MAX_REGIONS * REGION_ENTRY_LEN;

const CAP_POSTCOPY_RAM: u16 = 1;
const CAP_POSTCOPY_ONLY_SECTIONS: u16 = 2;
const CAP_PAYLOAD_CHECKSUMS: u16 = 4;
const CAP_ALL: u16 = CAP_POSTCOPY_RAM | CAP_POSTCOPY_ONLY_SECTIONS | CAP_PAYLOAD_CHECKSUMS;

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct HelloFixed {
    magic: [u8; 8],
    version: U16,
    caps: U16,
    channels: U16,
    region_count: U16,
    page_size: U32,
    resume: U32,
    reserved: [u8; 8],
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RegionEntry {
    id: U16,
    reserved: [u8; 6],
    gpa: U64,
    size: U64,
}

const _: () = {
    use memoffset::offset_of;
    assert!(core::mem::size_of::<HelloFixed>() == HELLO_FIXED_LEN);
    assert!(offset_of!(HelloFixed, version) == 8);
    assert!(offset_of!(HelloFixed, caps) == 10);
    assert!(offset_of!(HelloFixed, channels) == 12);
    assert!(offset_of!(HelloFixed, region_count) == 14);
    assert!(offset_of!(HelloFixed, page_size) == 16);
    assert!(offset_of!(HelloFixed, resume) == 20);
    assert!(offset_of!(HelloFixed, reserved) == 24);
    assert!(core::mem::size_of::<RegionEntry>() == REGION_ENTRY_LEN);
    assert!(offset_of!(RegionEntry, gpa) == 8);
    assert!(offset_of!(RegionEntry, size) == 16);
};

/// Features a session may use, agreed in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// RAM may move after switchover (postcopy listen / run markers allowed).
    pub postcopy_ram: bool,
    /// Postcopy-only sections may stream after switchover.
    pub postcopy_only_sections: bool,
    /// Every payload carries a CRC32 that the destination verifies.
    pub payload_checksums: bool,
    /// Number of channels (main channel included), at least 1.
    pub channels: u16,
}

impl Capabilities {
    fn bits(&self) -> u16 {
        let mut b = 0;
        if self.postcopy_ram {
            b |= CAP_POSTCOPY_RAM;
        }
        if self.postcopy_only_sections {
            b |= CAP_POSTCOPY_ONLY_SECTIONS;
        }
        if self.payload_checksums {
            b |= CAP_PAYLOAD_CHECKSUMS;
        }
        b
    }

    fn from_bits(bits: u16, channels: u16) -> Self {
        Capabilities {
            postcopy_ram: bits & CAP_POSTCOPY_RAM != 0,
            postcopy_only_sections: bits & CAP_POSTCOPY_ONLY_SECTIONS != 0,
            payload_checksums: bits & CAP_PAYLOAD_CHECKSUMS != 0,
            channels,
        }
    }
}

/// One guest RAM region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Region {
    /// Region id, as carried in the `id` field of page records.
    pub id: u16,
    /// Guest physical base address.
    pub gpa: u64,
    /// Size in bytes, a multiple of the page size.
    pub size: u64,
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "region id {} at {:#x} of {:#x} bytes",
            self.id, self.gpa, self.size
        )
    }
}

/// Why a layout is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutError {
    /// The page size is not a power of two in `MIN_PAGE_SIZE..=MAX_PAGE_SIZE`.
    PageSize(u32),
    /// More than [`MAX_REGIONS`] regions.
    TooManyRegions(usize),
    /// A region of size zero.
    Empty(Region),
    /// A region whose base or size is not a multiple of the page size.
    Unaligned(Region),
    /// A region whose end overflows 64 bits.
    Overflow(Region),
    /// Two regions share an id.
    DuplicateId(u16),
    /// Two regions overlap in guest physical memory.
    Overlap(Region, Region),
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutError::PageSize(p) => write!(
                f,
                "the page size {p} is not a power of two between {MIN_PAGE_SIZE} and {MAX_PAGE_SIZE}"
            ),
            LayoutError::TooManyRegions(n) => {
                write!(f, "{n} regions exceed the bound of {MAX_REGIONS}")
            }
            LayoutError::Empty(r) => write!(f, "{r} is empty"),
            LayoutError::Unaligned(r) => write!(f, "{r} is not page-aligned"),
            LayoutError::Overflow(r) => write!(f, "{r} ends past the 64-bit address space"),
            LayoutError::DuplicateId(id) => write!(f, "region id {id} appears twice"),
            LayoutError::Overlap(a, b) => write!(f, "{a} overlaps {b}"),
        }
    }
}

impl core::error::Error for LayoutError {}

/// How two layouts differ: the first difference found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutMismatch {
    /// The page sizes differ.
    PageSize {
        /// Our page size.
        ours: u32,
        /// The peer's page size.
        theirs: u32,
    },
    /// The region at `index` differs (`None`: that side has no region at `index`).
    Region {
        /// Position of the region in the layout.
        index: usize,
        /// Our region there.
        ours: Option<Region>,
        /// The peer's region there.
        theirs: Option<Region>,
    },
}

impl fmt::Display for LayoutMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutMismatch::PageSize { ours, theirs } => write!(
                f,
                "the peer's page size is {theirs} bytes but ours is {ours}"
            ),
            LayoutMismatch::Region {
                index,
                ours,
                theirs,
            } => {
                write!(f, "region #{index} differs: ours is ")?;
                match ours {
                    Some(r) => write!(f, "{r}")?,
                    None => f.write_str("absent")?,
                }
                f.write_str(", the peer's is ")?;
                match theirs {
                    Some(r) => write!(f, "{r}"),
                    None => f.write_str("absent"),
                }
            }
        }
    }
}

impl core::error::Error for LayoutMismatch {}

/// A validated guest RAM layout: page size and up to [`MAX_REGIONS`] regions.
///
/// Invariants (checked by [`Layout::new`]): the page size is a power of two in
/// `MIN_PAGE_SIZE..=MAX_PAGE_SIZE`; every region is non-empty, page-aligned, ends
/// below 2^64, has a unique id and overlaps no other region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    page_size: u32,
    page_shift: u32,
    len: usize,
    regions: [Region; MAX_REGIONS],
}

impl Layout {
    /// Validates and builds a layout.
    pub fn new(page_size: u32, regions: &[Region]) -> Result<Self, LayoutError> {
        if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(LayoutError::PageSize(page_size));
        }
        if regions.len() > MAX_REGIONS {
            return Err(LayoutError::TooManyRegions(regions.len()));
        }
        let ps = u64::from(page_size);
        for (i, r) in regions.iter().enumerate() {
            if r.size == 0 {
                return Err(LayoutError::Empty(*r));
            }
            if r.gpa % ps != 0 || r.size % ps != 0 {
                return Err(LayoutError::Unaligned(*r));
            }
            let end = r.gpa.checked_add(r.size).ok_or(LayoutError::Overflow(*r))?;
            for o in regions.iter().take(i) {
                if o.id == r.id {
                    return Err(LayoutError::DuplicateId(r.id));
                }
                // Both ends are known not to overflow for earlier regions.
                let o_end = o.gpa.saturating_add(o.size);
                if r.gpa < o_end && o.gpa < end {
                    return Err(LayoutError::Overlap(*o, *r));
                }
            }
        }
        let mut out = [Region::default(); MAX_REGIONS];
        out[..regions.len()].copy_from_slice(regions);
        Ok(Layout {
            page_size,
            page_shift: page_size.trailing_zeros(),
            len: regions.len(),
            regions: out,
        })
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// log2 of the page size.
    pub fn page_shift(&self) -> u32 {
        self.page_shift
    }

    /// The regions, in handshake order.
    pub fn regions(&self) -> &[Region] {
        self.regions.get(..self.len).unwrap_or(&[])
    }

    /// The region with id `id`.
    pub fn region(&self, id: u16) -> Option<&Region> {
        self.regions().iter().find(|r| r.id == id)
    }

    /// Number of pages in region `id`.
    pub fn region_pages(&self, id: u16) -> Option<u64> {
        self.region(id).map(|r| r.size >> self.page_shift)
    }

    /// Checks that this layout (the peer's) is identical to `ours`; on a difference,
    /// names the first differing region (or the page size).
    pub fn check_matches(&self, ours: &Layout) -> Result<(), LayoutMismatch> {
        if self.page_size != ours.page_size {
            return Err(LayoutMismatch::PageSize {
                ours: ours.page_size,
                theirs: self.page_size,
            });
        }
        let n = self.len.max(ours.len);
        for index in 0..n {
            let theirs = self.regions().get(index).copied();
            let mine = ours.regions().get(index).copied();
            if theirs != mine {
                return Err(LayoutMismatch::Region {
                    index,
                    ours: mine,
                    theirs,
                });
            }
        }
        Ok(())
    }
}

/// What both ends agreed: the layout every record is validated against, and the
/// capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Guest RAM layout.
    pub layout: Layout,
    /// Capabilities in force.
    pub caps: Capabilities,
}

impl Negotiated {
    /// Bundles a layout and capabilities.
    pub fn new(layout: Layout, caps: Capabilities) -> Self {
        Negotiated { layout, caps }
    }
}

/// Why a handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    /// The hello record's header is malformed.
    Header(Cause),
    /// Fewer bytes than the hello record needs.
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        available: usize,
    },
    /// The payload checksum does not match.
    PayloadChecksum {
        /// CRC as received.
        received: u32,
        /// CRC computed over the payload.
        computed: u32,
    },
    /// The magic bytes are wrong: the peer does not speak Ferry.
    Magic,
    /// The peer speaks another format version.
    Version {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// Unknown capability bits, or a channel count of zero or above the bound.
    Capabilities {
        /// The capability bits as received.
        bits: u16,
        /// The channel count as received.
        channels: u16,
    },
    /// A reserved byte is not zero.
    Reserved,
    /// The peer's layout is not valid.
    Layout(LayoutError),
    /// The peer's layout differs from ours.
    Mismatch(LayoutMismatch),
    /// The peer asks for a capability we do not offer, or another channel count.
    Unsupported {
        /// What we offer.
        ours: Capabilities,
        /// What the peer asked for.
        theirs: Capabilities,
    },
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Header(c) => write!(f, "the hello header is refused: {c}"),
            HandshakeError::Truncated { needed, available } => write!(
                f,
                "the hello needs {needed} bytes but only {available} were given"
            ),
            HandshakeError::PayloadChecksum { received, computed } => write!(
                f,
                "the hello payload checksum is {received:#010x} but its bytes sum to {computed:#010x}"
            ),
            HandshakeError::Magic => f.write_str("the peer does not speak the Ferry protocol"),
            HandshakeError::Version { ours, theirs } => write!(
                f,
                "the peer speaks format version {theirs} but we speak {ours}"
            ),
            HandshakeError::Capabilities { bits, channels } => write!(
                f,
                "capability bits {bits:#06x} with {channels} channels are not valid"
            ),
            HandshakeError::Reserved => f.write_str("a reserved hello byte is not zero"),
            HandshakeError::Layout(e) => write!(f, "the peer's layout is not valid: {e}"),
            HandshakeError::Mismatch(m) => write!(f, "the peer's layout differs from ours: {m}"),
            HandshakeError::Unsupported { ours, theirs } => write!(
                f,
                "the peer asks for capabilities {theirs:?} but we offer {ours:?}"
            ),
        }
    }
}

impl core::error::Error for HandshakeError {}

/// The hello record: what the source proposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Format version.
    pub version: u16,
    /// Capabilities proposed (source) or offered (destination).
    pub caps: Capabilities,
    /// Guest RAM layout.
    pub layout: Layout,
    /// 0 for a new migration; otherwise the session id (from the
    /// destination's *accept*) of the interrupted postcopy this connection
    /// resumes.
    pub resume: u32,
}

impl Hello {
    /// A hello of the current [`VERSION`] for a new migration.
    pub fn new(caps: Capabilities, layout: Layout) -> Self {
        Hello {
            version: VERSION,
            caps,
            layout,
            resume: 0,
        }
    }

    /// A hello that resumes the interrupted postcopy of session `session`.
    pub fn resuming(caps: Capabilities, layout: Layout, session: u32) -> Self {
        Hello {
            resume: session,
            ..Hello::new(caps, layout)
        }
    }

    /// Length of this hello on the wire, header included.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + HELLO_FIXED_LEN + self.layout.regions().len() * REGION_ENTRY_LEN
    }

    /// Writes the whole hello record (header and payload) to `out`; returns its length.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, EmitError> {
        let len = self.wire_len();
        let available = out.len();
        let out = out.get_mut(..len).ok_or(EmitError::BufferTooShort {
            needed: len,
            available,
        })?;
        let (head, payload) = out.split_at_mut(HEADER_LEN);
        let (fixed, entries) = payload.split_at_mut(HELLO_FIXED_LEN);
        let regions = self.layout.regions();
        let h = HelloFixed {
            magic: MAGIC,
            version: U16::new(self.version),
            caps: U16::new(self.caps.bits()),
            channels: U16::new(self.caps.channels),
            region_count: U16::new(regions.len() as u16),
            page_size: U32::new(self.layout.page_size()),
            resume: U32::new(self.resume),
            reserved: [0; 8],
        };
        fixed.copy_from_slice(h.as_bytes());
        for (r, slot) in regions
            .iter()
            .zip(entries.chunks_exact_mut(REGION_ENTRY_LEN))
        {
            let e = RegionEntry {
                id: U16::new(r.id),
                reserved: [0; 6],
                gpa: U64::new(r.gpa),
                size: U64::new(r.size),
            };
            slot.copy_from_slice(e.as_bytes());
        }
        let mut hdr = RecordHeader {
            kind: HELLO_KIND,
            count: U32::new(regions.len() as u32),
            payload_len: U32::new((len - HEADER_LEN) as u32),
            payload_crc: U32::new(crc32fast::hash(payload)),
            ..RecordHeader::default()
        };
        hdr.seal();
        head.copy_from_slice(hdr.as_bytes());
        Ok(len)
    }

    /// Checks a hello header and returns the length of the payload that follows it, so a
    /// caller reading from a socket knows how much more to read.
    pub fn payload_len(header: &[u8; HEADER_LEN]) -> Result<usize, HandshakeError> {
        let h = Header::new_unchecked(&header[..]);
        let bad = |c| Err(HandshakeError::Header(c));
        if !h.header_crc_ok() {
            return bad(Cause::HeaderChecksum {
                received: h.header_crc(),
                computed: h.compute_header_crc(),
            });
        }
        if h.kind() != HELLO_KIND {
            return bad(Cause::UnknownKind);
        }
        if h.flags() != 0 {
            return bad(Cause::UnknownFlags { flags: h.flags() });
        }
        if h.id() != 0 {
            return bad(Cause::NonZero { field: Field::Id });
        }
        if h.first() != 0 {
            return bad(Cause::NonZero {
                field: Field::First,
            });
        }
        if h.count() as usize > MAX_REGIONS {
            return bad(Cause::CountTooLarge {
                count: h.count(),
                max: MAX_REGIONS as u32,
            });
        }
        let expected = HELLO_FIXED_LEN + h.count() as usize * REGION_ENTRY_LEN;
        if h.payload_len() as usize != expected {
            return bad(Cause::PayloadLength {
                expected: expected as u64,
                received: h.payload_len(),
            });
        }
        if h.seq() != 0 {
            return bad(Cause::Sequence {
                expected: 0,
                received: h.seq(),
            });
        }
        Ok(expected)
    }

    /// Parses a whole hello record (header then payload, nothing after).
    pub fn parse(bytes: &[u8]) -> Result<Hello, HandshakeError> {
        let Some((head, payload)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(HandshakeError::Truncated {
                needed: HEADER_LEN,
                available: bytes.len(),
            });
        };
        let plen = Self::payload_len(head)?;
        if payload.len() != plen {
            return Err(HandshakeError::Truncated {
                needed: HEADER_LEN + plen,
                available: bytes.len(),
            });
        }
        let received = Header::new_unchecked(&head[..]).payload_crc();
        let computed = crc32fast::hash(payload);
        if received != computed {
            return Err(HandshakeError::PayloadChecksum { received, computed });
        }
        let (fixed, entries) =
            HelloFixed::read_from_prefix(payload).map_err(|_| HandshakeError::Truncated {
                needed: HEADER_LEN + HELLO_FIXED_LEN,
                available: bytes.len(),
            })?;
        if fixed.magic != MAGIC {
            return Err(HandshakeError::Magic);
        }
        if fixed.version.get() != VERSION {
            return Err(HandshakeError::Version {
                ours: VERSION,
                theirs: fixed.version.get(),
            });
        }
        let bits = fixed.caps.get();
        let channels = fixed.channels.get();
        if bits & !CAP_ALL != 0 || channels == 0 || channels > MAX_CHANNELS {
            return Err(HandshakeError::Capabilities { bits, channels });
        }
        if fixed.reserved != [0; 8] {
            return Err(HandshakeError::Reserved);
        }
        let n = usize::from(fixed.region_count.get());
        if n * REGION_ENTRY_LEN != entries.len() {
            return Err(HandshakeError::Header(Cause::PayloadLength {
                expected: (HELLO_FIXED_LEN + n * REGION_ENTRY_LEN) as u64,
                received: plen as u32,
            }));
        }
        let mut regions = [Region::default(); MAX_REGIONS];
        for (slot, chunk) in regions
            .iter_mut()
            .zip(entries.chunks_exact(REGION_ENTRY_LEN))
        {
            let e = RegionEntry::read_from_bytes(chunk).map_err(|_| HandshakeError::Reserved)?;
            if e.reserved != [0; 6] {
                return Err(HandshakeError::Reserved);
            }
            *slot = Region {
                id: e.id.get(),
                gpa: e.gpa.get(),
                size: e.size.get(),
            };
        }
        let layout = Layout::new(fixed.page_size.get(), regions.get(..n).unwrap_or(&[]))
            .map_err(HandshakeError::Layout)?;
        Ok(Hello {
            version: fixed.version.get(),
            caps: Capabilities::from_bits(bits, channels),
            layout,
            resume: fixed.resume.get(),
        })
    }

    /// Destination side: checks the peer's hello (`self`) against ours and returns what
    /// the session will use (the peer's proposal).
    ///
    /// Refuses another version, a layout that differs from ours (naming the first
    /// differing region), a capability we do not offer, or another channel count.
    pub fn negotiate(&self, ours: &Hello) -> Result<Negotiated, HandshakeError> {
        if self.version != ours.version {
            return Err(HandshakeError::Version {
                ours: ours.version,
                theirs: self.version,
            });
        }
        self.layout
            .check_matches(&ours.layout)
            .map_err(HandshakeError::Mismatch)?;
        let asked = self.caps.bits();
        if asked & !ours.caps.bits() != 0 || self.caps.channels != ours.caps.channels {
            return Err(HandshakeError::Unsupported {
                ours: ours.caps,
                theirs: self.caps,
            });
        }
        Ok(Negotiated::new(self.layout, self.caps))
    }
}
