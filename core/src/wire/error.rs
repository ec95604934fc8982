//! Decode and encode errors.

use core::fmt;

/// A header field, named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// `flags`.
    Flags,
    /// `id`.
    Id,
    /// `count`.
    Count,
    /// `first`.
    First,
    /// `payload_len`.
    PayloadLen,
    /// `payload_crc`.
    PayloadCrc,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Flags => "flags",
            Field::Id => "id",
            Field::Count => "count",
            Field::First => "first",
            Field::PayloadLen => "payload_len",
            Field::PayloadCrc => "payload_crc",
        })
    }
}

/// Why a record was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The header CRC does not match its bytes; no other field can be trusted.
    HeaderChecksum {
        /// `header_crc` as received.
        received: u32,
        /// CRC computed over bytes 0..28.
        computed: u32,
    },
    /// The `kind` byte is not a record type of this stream.
    UnknownKind,
    /// The `flags` byte has bits this kind does not define.
    UnknownFlags {
        /// The flags as received.
        flags: u8,
    },
    /// The record needs a capability the session did not negotiate.
    NotNegotiated,
    /// A field this kind does not use is not zero.
    NonZero {
        /// The field.
        field: Field,
    },
    /// The region id is not in the negotiated layout.
    UnknownRegion {
        /// The region id.
        region: u16,
    },
    /// A page count of zero.
    ZeroCount,
    /// A discard map whose first page is not a multiple of 64.
    Misaligned {
        /// The first page as received.
        first: u64,
    },
    /// A page count above the bound for this kind.
    CountTooLarge {
        /// The count as received.
        count: u32,
        /// The largest count allowed.
        max: u32,
    },
    /// The page range does not lie inside its region.
    OutOfRegion {
        /// First page index.
        first: u64,
        /// Page count.
        count: u32,
        /// Pages in the region.
        region_pages: u64,
    },
    /// `payload_len` is not what the record's fields require.
    PayloadLength {
        /// Length the fields require.
        expected: u64,
        /// `payload_len` as received.
        received: u32,
    },
    /// A section chunk longer than [`crate::wire::MAX_SECTION_CHUNK`].
    PayloadTooLarge {
        /// `payload_len` as received.
        len: u32,
        /// The bound.
        max: u32,
    },
    /// A section chunk whose end offset overflows 64 bits.
    SectionOffsetOverflow {
        /// Byte offset of the chunk.
        offset: u64,
        /// Chunk length.
        len: u32,
    },
    /// An error record carries a reason code this version does not define.
    UnknownErrorCode {
        /// The code as received.
        code: u16,
    },
    /// The sequence number is not the next one on this channel.
    Sequence {
        /// The sequence number expected.
        expected: u32,
        /// The sequence number received.
        received: u32,
    },
    /// The stream continues after its end-of-stream record.
    AfterEnd,
    /// The stream stopped in the middle of a record, or before its end-of-stream record.
    Truncated,
    /// The decoder already failed; it accepts nothing more.
    Poisoned,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Cause::HeaderChecksum { received, computed } => write!(
                f,
                "the header checksum is {received:#010x} but the header's bytes sum to {computed:#010x}"
            ),
            Cause::UnknownKind => f.write_str("the record kind is unknown"),
            Cause::UnknownFlags { flags } => {
                write!(f, "the flags {flags:#04x} include bits this kind does not define")
            }
            Cause::NotNegotiated => {
                f.write_str("the record needs a capability that was not negotiated")
            }
            Cause::NonZero { field } => {
                write!(f, "the field {field} must be zero for this kind")
            }
            Cause::UnknownRegion { region } => {
                write!(f, "region {region} is not in the negotiated layout")
            }
            Cause::ZeroCount => f.write_str("the page count is zero"),
            Cause::Misaligned { first } => write!(
                f,
                "a discard map starts at page {first}, which is not a multiple of 64"
            ),
            Cause::CountTooLarge { count, max } => {
                write!(f, "the page count {count} exceeds the bound {max}")
            }
            Cause::OutOfRegion {
                first,
                count,
                region_pages,
            } => write!(
                f,
                "pages {first}+{count} do not lie inside a region of {region_pages} pages"
            ),
            Cause::PayloadLength { expected, received } => write!(
                f,
                "the payload length is {received} bytes but the record needs {expected}"
            ),
            Cause::PayloadTooLarge { len, max } => {
                write!(f, "the payload of {len} bytes exceeds the bound of {max}")
            }
            Cause::SectionOffsetOverflow { offset, len } => write!(
                f,
                "a section chunk of {len} bytes at offset {offset} ends past 2^64"
            ),
            Cause::UnknownErrorCode { code } => write!(f, "the error reason code {code} is unknown"),
            Cause::Sequence { expected, received } => write!(
                f,
                "the sequence number is {received} but {expected} was expected"
            ),
            Cause::AfterEnd => f.write_str("bytes follow the end-of-stream record"),
            Cause::Truncated => f.write_str("the stream stopped before its end-of-stream record"),
            Cause::Poisoned => f.write_str("the decoder already failed and accepts no more bytes"),
        }
    }
}

impl core::error::Error for Cause {}

/// A refused record: what was wrong, and where.
///
/// `seq` and `kind` are the values from the header as received; when the cause is
/// [`Cause::HeaderChecksum`] they are unverified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError {
    /// Stream byte offset of the refused record's header.
    pub offset: u64,
    /// Sequence number of the record, as received.
    pub seq: u32,
    /// Kind byte of the record, as received.
    pub kind: u8,
    /// What was wrong.
    pub cause: Cause,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "record seq {} kind {:#04x} at stream offset {} refused: {}",
            self.seq, self.kind, self.offset, self.cause
        )
    }
}

impl core::error::Error for DecodeError {}

/// Why a header could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmitError {
    /// The payload length would not fit the 32-bit `payload_len` field.
    PayloadTooLong {
        /// The length in bytes.
        len: u64,
    },
    /// The payload given is not as long as the record says.
    PayloadLength {
        /// Length the record needs.
        expected: u64,
        /// Length of the payload given.
        given: usize,
    },
    /// The output buffer is too short.
    BufferTooShort {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
}

impl fmt::Display for EmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EmitError::PayloadTooLong { len } => {
                write!(f, "a payload of {len} bytes does not fit in a record")
            }
            EmitError::PayloadLength { expected, given } => write!(
                f,
                "the record needs a payload of {expected} bytes but {given} were given"
            ),
            EmitError::BufferTooShort { needed, available } => write!(
                f,
                "the output needs {needed} bytes but the buffer holds {available}"
            ),
        }
    }
}

impl core::error::Error for EmitError {}
