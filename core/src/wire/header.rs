//! The 32-byte record header: its zerocopy layout and a checked view over bytes.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Length in bytes of every record header, stream and return path alike.
pub const HEADER_LEN: usize = 32;

/// Number of leading header bytes covered by `header_crc`.
pub const HEADER_CRC_LEN: usize = field::HEADER_CRC;

/// Byte offsets of the header fields.
pub mod field {
    /// `kind`: record type, one byte.
    pub const KIND: usize = 0;
    /// `flags`: per-kind flags, one byte.
    pub const FLAGS: usize = 1;
    /// `id`: region or section id, `u16`.
    pub const ID: usize = 2;
    /// `count`: page count, `u32`.
    pub const COUNT: usize = 4;
    /// `first`: first page index or section byte offset, `u64`.
    pub const FIRST: usize = 8;
    /// `payload_len`: payload bytes after the header, `u32`.
    pub const PAYLOAD_LEN: usize = 16;
    /// `payload_crc`: CRC32 of the payload, `u32`.
    pub const PAYLOAD_CRC: usize = 20;
    /// `seq`: per-channel sequence number, `u32`.
    pub const SEQ: usize = 24;
    /// `header_crc`: CRC32 of bytes `0..HEADER_CRC`, `u32`.
    pub const HEADER_CRC: usize = 28;
}

/// The record header as a plain little-endian `#[repr(C)]` struct.
///
/// Every field type has alignment 1, so the struct has no padding and can be read from
/// or written to any byte buffer with zerocopy (`RecordHeader::ref_from_prefix`,
/// `as_bytes`). It carries no invariant: validate with [`crate::wire::Repr::parse`] or
/// [`crate::wire::decode_header`] before trusting it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct RecordHeader {
    /// Record type.
    pub kind: u8,
    /// Per-kind flags.
    pub flags: u8,
    /// Region id or section id.
    pub id: U16,
    /// Page count.
    pub count: U32,
    /// First page index or section byte offset.
    pub first: U64,
    /// Bytes of payload that follow.
    pub payload_len: U32,
    /// CRC32 of the payload.
    pub payload_crc: U32,
    /// Per-channel sequence number.
    pub seq: U32,
    /// CRC32 of the first 28 bytes.
    pub header_crc: U32,
}

const _: () = {
    use memoffset::offset_of;
    assert!(core::mem::size_of::<RecordHeader>() == HEADER_LEN);
    assert!(core::mem::align_of::<RecordHeader>() == 1);
    assert!(offset_of!(RecordHeader, kind) == field::KIND);
    assert!(offset_of!(RecordHeader, flags) == field::FLAGS);
    assert!(offset_of!(RecordHeader, id) == field::ID);
    assert!(offset_of!(RecordHeader, count) == field::COUNT);
    assert!(offset_of!(RecordHeader, first) == field::FIRST);
    assert!(offset_of!(RecordHeader, payload_len) == field::PAYLOAD_LEN);
    assert!(offset_of!(RecordHeader, payload_crc) == field::PAYLOAD_CRC);
    assert!(offset_of!(RecordHeader, seq) == field::SEQ);
    assert!(offset_of!(RecordHeader, header_crc) == field::HEADER_CRC);
};

impl RecordHeader {
    /// CRC32 of the first [`HEADER_CRC_LEN`] bytes, as it belongs in `header_crc`.
    #[inline]
    pub fn compute_header_crc(&self) -> u32 {
        crc32fast::hash(&self.as_bytes()[..HEADER_CRC_LEN])
    }

    /// Stores the header CRC computed over the other fields.
    pub fn seal(&mut self) {
        self.header_crc = U32::new(self.compute_header_crc());
    }

    /// Whether `header_crc` matches the other fields.
    #[inline]
    pub fn header_crc_ok(&self) -> bool {
        self.header_crc.get() == self.compute_header_crc()
    }
}

/// A read/write view of a record header over a byte buffer, smoltcp style.
///
/// Panic rule: accessors index the buffer at the offsets in [`field`]. A view made by
/// [`Header::new_checked`] holds at least [`HEADER_LEN`] bytes, so its accessors never
/// panic. A view made by [`Header::new_unchecked`] over a shorter buffer may panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

#[inline]
fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

#[inline]
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Wraps a buffer without checking its length (see the panic rule on [`Header`]).
    pub const fn new_unchecked(buffer: T) -> Self {
        Header { buffer }
    }

    /// Wraps a buffer after checking that it holds a whole header.
    ///
    /// Returns `Err(len)` with the buffer's length when it is shorter than [`HEADER_LEN`].
    pub fn new_checked(buffer: T) -> Result<Self, usize> {
        let len = buffer.as_ref().len();
        if len < HEADER_LEN {
            Err(len)
        } else {
            Ok(Header { buffer })
        }
    }

    /// Returns the wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The header bytes (the first [`HEADER_LEN`] of the buffer).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buffer.as_ref()[..HEADER_LEN]
    }

    /// `kind` field.
    #[inline]
    pub fn kind(&self) -> u8 {
        self.buffer.as_ref()[field::KIND]
    }

    /// `flags` field.
    #[inline]
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// `id` field.
    #[inline]
    pub fn id(&self) -> u16 {
        le16(self.buffer.as_ref(), field::ID)
    }

    /// `count` field.
    #[inline]
    pub fn count(&self) -> u32 {
        le32(self.buffer.as_ref(), field::COUNT)
    }

    /// `first` field.
    #[inline]
    pub fn first(&self) -> u64 {
        le64(self.buffer.as_ref(), field::FIRST)
    }

    /// `payload_len` field.
    #[inline]
    pub fn payload_len(&self) -> u32 {
        le32(self.buffer.as_ref(), field::PAYLOAD_LEN)
    }

    /// `payload_crc` field.
    #[inline]
    pub fn payload_crc(&self) -> u32 {
        le32(self.buffer.as_ref(), field::PAYLOAD_CRC)
    }

    /// `seq` field.
    #[inline]
    pub fn seq(&self) -> u32 {
        le32(self.buffer.as_ref(), field::SEQ)
    }

    /// `header_crc` field.
    #[inline]
    pub fn header_crc(&self) -> u32 {
        le32(self.buffer.as_ref(), field::HEADER_CRC)
    }

    /// CRC32 of bytes `0..28`, as it should be in `header_crc`.
    #[inline]
    pub fn compute_header_crc(&self) -> u32 {
        crc32fast::hash(&self.buffer.as_ref()[..HEADER_CRC_LEN])
    }

    /// Whether `header_crc` matches.
    #[inline]
    pub fn header_crc_ok(&self) -> bool {
        self.header_crc() == self.compute_header_crc()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    fn put(&mut self, at: usize, bytes: &[u8]) {
        self.buffer.as_mut()[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Sets `kind`.
    pub fn set_kind(&mut self, v: u8) {
        self.buffer.as_mut()[field::KIND] = v;
    }

    /// Sets `flags`.
    pub fn set_flags(&mut self, v: u8) {
        self.buffer.as_mut()[field::FLAGS] = v;
    }

    /// Sets `id`.
    pub fn set_id(&mut self, v: u16) {
        self.put(field::ID, &v.to_le_bytes());
    }

    /// Sets `count`.
    pub fn set_count(&mut self, v: u32) {
        self.put(field::COUNT, &v.to_le_bytes());
    }

    /// Sets `first`.
    pub fn set_first(&mut self, v: u64) {
        self.put(field::FIRST, &v.to_le_bytes());
    }

    /// Sets `payload_len`.
    pub fn set_payload_len(&mut self, v: u32) {
        self.put(field::PAYLOAD_LEN, &v.to_le_bytes());
    }

    /// Sets `payload_crc`.
    pub fn set_payload_crc(&mut self, v: u32) {
        self.put(field::PAYLOAD_CRC, &v.to_le_bytes());
    }

    /// Sets `seq`.
    pub fn set_seq(&mut self, v: u32) {
        self.put(field::SEQ, &v.to_le_bytes());
    }

    /// Computes and stores `header_crc`; call after every other field is set.
    pub fn fill_header_crc(&mut self) {
        let crc = self.compute_header_crc();
        self.put(field::HEADER_CRC, &crc.to_le_bytes());
    }
}
