//! Stream and return-path records: the Ferry wire format.
//!
//! Everything that crosses the wire is a record: a fixed 32-byte little-endian header
//! ([`RecordHeader`], [`HEADER_LEN`]) followed by `payload_len` bytes of payload.
//!
//! | off | size | field         | meaning                                                        |
//! |-----|------|---------------|----------------------------------------------------------------|
//! | 0   | 1    | `kind`        | record type ([`StreamKind`], [`ReturnKind`], [`HELLO_KIND`])   |
//! | 1   | 1    | `flags`       | per-kind flags; unknown bits are an error                      |
//! | 2   | 2    | `id`          | region id (page-like records) or section id (sections)         |
//! | 4   | 4    | `count`       | page count of runs, discards and discard maps; else 0          |
//! | 8   | 8    | `first`       | first page index, or byte offset of a section chunk; else 0    |
//! | 16  | 4    | `payload_len` | bytes of payload that follow the header                        |
//! | 20  | 4    | `payload_crc` | CRC32 of the payload (0 and unchecked without checksums)       |
//! | 24  | 4    | `seq`         | per-channel record sequence number, from 0                     |
//! | 28  | 4    | `header_crc`  | CRC32 of bytes 0..28                                           |
//!
//! Record kinds (the `kind` byte):
//!
//! | byte | record | `id` | `count` | `first` | payload |
//! |------|--------|------|---------|---------|---------|
//! | 0x01 | page run ([`Repr::PageRun`]; flag 0x01 requested, 0x02 read from the paused guest) | region | pages | first page | `count * page_size` bytes |
//! | 0x02 | zero run | region | pages | first page | none |
//! | 0x03 | section data (flag 0x01 last chunk) | section | 0 | byte offset | the chunk |
//! | 0x04 | postcopy-only section chunk (flag 0x01 last) | section | 0 | byte offset | the chunk |
//! | 0x05 | discard | region | pages | first page | none |
//! | 0x06..0x09 | stop-and-copy, postcopy listen, postcopy run, go | 0 | 0 | 0 | none |
//! | 0x0a | end of stream | 0 | 0 | 0 | none |
//! | 0x0b | discard map ([`Repr::DiscardMap`], postcopy RAM) | region | pages | first page, a multiple of 64 | `count.div_ceil(64)` little-endian 64-bit words, bit `i` page `first + i` |
//! | 0x20 | hello (handshake, see [`Hello`]) | 0 | regions | 0 | version, capabilities, layout |
//! | 0x81 | page request (return path) | region | pages | first page | none |
//! | 0x82 | resend request (return path) | region | pages | first page | none |
//! | 0x83 | ready (return path) | 0 | 0 | 0 | none |
//! | 0x84 | error (return path) | [`ErrorCode`] | 0 | detail | none |
//! | 0x85 | hello accepted (return path) | max channels | 0 | max device-state bytes | none |
//! | 0x86 | started (return path: the guest runs after *go*) | 0 | 0 | 0 | none |
//!
//! The module follows smoltcp's `wire` style:
//!
//! - [`Header`] is a view over a byte buffer with one accessor per field. Its accessors
//!   index the buffer directly: they never panic once the view was made by
//!   [`Header::new_checked`]; a view made by [`Header::new_unchecked`] over fewer than
//!   [`HEADER_LEN`] bytes may panic, exactly as smoltcp's packets do.
//! - [`Repr`] (stream) and [`ReturnRepr`] (return path) are the parsed meanings, with
//!   `parse` (validate every field against the [`Negotiated`] session) and `emit`
//!   (write only the header; the payload stays where it is, e.g. in guest memory).
//! - [`StreamDecoder`] and [`ReturnDecoder`] accept bytes in pieces of any size, keep at
//!   most one header in a fixed internal array, and borrow payloads from the input.
//!
//! The session is set up by a [`Hello`] handshake carrying the format version, page size,
//! [`Capabilities`] and the guest RAM [`Layout`]; the destination refuses a layout that
//! differs from its own with [`LayoutMismatch`], naming the first differing region.
//!
//! Nothing in this module panics, allocates, reads out of bounds or loops without bound,
//! on any input; the fuzz targets in `fuzz/` exist to keep it that way.

mod decoder;
mod error;
mod handshake;
mod header;
mod return_path;
mod stream;

pub use decoder::{Dest, Event, Step, StreamDecoder};
pub use error::{Cause, DecodeError, EmitError, Field};
pub use handshake::{
    Capabilities, HandshakeError, Hello, Layout, LayoutError, LayoutMismatch, Negotiated, Region,
    HELLO_FIXED_LEN, HELLO_KIND, MAGIC, MAX_CHANNELS, MAX_HELLO_LEN, MAX_PAGE_SIZE, MAX_REGIONS,
    MIN_PAGE_SIZE, REGION_ENTRY_LEN, VERSION,
};
pub use header::{field, Header, RecordHeader, HEADER_CRC_LEN, HEADER_LEN};
pub use return_path::{ErrorCode, ReturnDecoder, ReturnKind, ReturnRecord, ReturnRepr};
pub use stream::{
    decode_header, discard_map_bytes, flags, Record, Repr, StreamEncoder, StreamKind,
    MAX_DISCARD_MAP_PAGES, MAX_RUN_PAGES, MAX_SECTION_CHUNK,
};

/// CRC32 (IEEE, as computed by crc32fast) of a payload, for the `payload_crc` field.
///
/// Encoders call it over the payload where it lies (guest memory, a device-state
/// buffer) and pass the result to [`StreamEncoder::encode_with_crc`] or [`Repr::emit`].
pub fn payload_crc(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}
