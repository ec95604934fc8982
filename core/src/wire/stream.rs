//! Stream records (source to destination): kinds, parsed representation, encoding.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

use super::error::{Cause, DecodeError, EmitError, Field};
use super::handshake::Negotiated;
use super::header::{Header, RecordHeader, HEADER_LEN};

/// Most pages in one page run (the payload of a run is `count * page_size` bytes).
pub const MAX_RUN_PAGES: u32 = 1024;

/// Most pages one discard-map chunk covers: a bitmap of at most
/// [`MAX_SECTION_CHUNK`] bytes.
pub const MAX_DISCARD_MAP_PAGES: u32 = MAX_SECTION_CHUNK * 8;

/// Longest section chunk payload in bytes.
pub const MAX_SECTION_CHUNK: u32 = 1 << 20;

/// Per-kind flag bits.
pub mod flags {
    /// Page run: sent in answer to a page request (postcopy), not by the bulk scan.
    pub const REQUESTED: u8 = 0x01;
    /// Page run: read from a paused guest, so it cannot be torn; a bad
    /// payload checksum is corruption, which fails the migration.
    pub const PAUSED: u8 = 0x02;
    /// Section data / postcopy-only chunk: the last chunk of this section.
    pub const LAST: u8 = 0x01;
}

/// Kind byte of a stream record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StreamKind {
    /// A run of pages with their contents.
    PageRun = 0x01,
    /// A run of pages that are all zero (no payload).
    ZeroRun = 0x02,
    /// A chunk of a section's data (device state and the like).
    Section = 0x03,
    /// A chunk of a postcopy-only section, sent after switchover.
    PostcopySection = 0x04,
    /// Pages the destination must drop (they will be sent again or requested).
    Discard = 0x05,
    /// The source stopped the guest: stop-and-copy begins.
    StopAndCopy = 0x06,
    /// The destination should start listening for postcopy faults.
    PostcopyListen = 0x07,
    /// Switchover to postcopy: everything precopy-only has been sent.
    PostcopyRun = 0x08,
    /// The source will never resume: the destination may start the guest.
    Go = 0x09,
    /// Nothing follows on this channel.
    End = 0x0a,
    /// A bitmap of pages the destination must drop at switchover (postcopy RAM).
    DiscardMap = 0x0b,
}

impl StreamKind {
    /// The kind with byte `b`, if any.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => StreamKind::PageRun,
            0x02 => StreamKind::ZeroRun,
            0x03 => StreamKind::Section,
            0x04 => StreamKind::PostcopySection,
            0x05 => StreamKind::Discard,
            0x06 => StreamKind::StopAndCopy,
            0x07 => StreamKind::PostcopyListen,
            0x08 => StreamKind::PostcopyRun,
            0x09 => StreamKind::Go,
            0x0a => StreamKind::End,
            0x0b => StreamKind::DiscardMap,
            _ => return None,
        })
    }

    fn allowed_flags(self) -> u8 {
        match self {
            StreamKind::PageRun => flags::REQUESTED | flags::PAUSED,
            StreamKind::Section | StreamKind::PostcopySection => flags::LAST,
            _ => 0,
        }
    }
}

/// The meaning of a stream record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Repr {
    /// `count` pages of region `region` from page `first`; payload `count * page_size`.
    PageRun {
        /// Region id.
        region: u16,
        /// First page index within the region.
        first: u64,
        /// Number of pages, `1..=MAX_RUN_PAGES`.
        count: u32,
        /// Sent in answer to a page request.
        requested: bool,
        /// Read from the paused guest: cannot be torn.
        paused: bool,
    },
    /// `count` zero pages; no payload.
    ZeroRun {
        /// Region id.
        region: u16,
        /// First page index.
        first: u64,
        /// Number of pages, at least 1.
        count: u32,
    },
    /// `len` bytes of section `section` at byte `offset` of its data.
    Section {
        /// Section id.
        section: u16,
        /// Byte offset of this chunk within the section's data.
        offset: u64,
        /// Chunk length, at most [`MAX_SECTION_CHUNK`].
        len: u32,
        /// Last chunk of the section.
        last: bool,
    },
    /// Like [`Repr::Section`], for a postcopy-only section.
    PostcopySection {
        /// Section id.
        section: u16,
        /// Byte offset of this chunk.
        offset: u64,
        /// Chunk length.
        len: u32,
        /// Last chunk of the section.
        last: bool,
    },
    /// Pages to drop at switchover; no payload.
    Discard {
        /// Region id.
        region: u16,
        /// First page index.
        first: u64,
        /// Number of pages, at least 1.
        count: u32,
    },
    /// Pages to drop at switchover, as a bitmap: bit `i` of the payload
    /// (little-endian 64-bit words) is page `first + i`. The payload is
    /// `count.div_ceil(64)` words; bits past `count` must be clear.
    DiscardMap {
        /// Region id.
        region: u16,
        /// First page the bitmap covers, a multiple of 64.
        first: u64,
        /// Pages covered, `1..=MAX_DISCARD_MAP_PAGES`.
        count: u32,
    },
    /// Stop-and-copy begins.
    StopAndCopy,
    /// Postcopy listen.
    PostcopyListen,
    /// Postcopy run.
    PostcopyRun,
    /// Go: the destination may start the guest.
    Go,
    /// End of stream.
    End,
}

/// Raw header field values of a [`Repr`].
struct Fields {
    kind: u8,
    flags: u8,
    id: u16,
    count: u32,
    first: u64,
    payload_len: u64,
}

fn page_range(neg: &Negotiated, region: u16, first: u64, count: u32) -> Result<(), Cause> {
    if count == 0 {
        return Err(Cause::ZeroCount);
    }
    let region_pages = neg
        .layout
        .region_pages(region)
        .ok_or(Cause::UnknownRegion { region })?;
    match first.checked_add(u64::from(count)) {
        Some(end) if end <= region_pages => Ok(()),
        _ => Err(Cause::OutOfRegion {
            first,
            count,
            region_pages,
        }),
    }
}

/// Payload bytes of a discard map over `count` pages: whole 64-bit words.
pub fn discard_map_bytes(count: u32) -> u64 {
    u64::from(count).div_ceil(64) * 8
}

fn section_chunk(offset: u64, len: u32) -> Result<(), Cause> {
    if len > MAX_SECTION_CHUNK {
        return Err(Cause::PayloadTooLarge {
            len,
            max: MAX_SECTION_CHUNK,
        });
    }
    if offset.checked_add(u64::from(len)).is_none() {
        return Err(Cause::SectionOffsetOverflow { offset, len });
    }
    Ok(())
}

impl Repr {
    /// The record kind.
    pub fn kind(&self) -> StreamKind {
        match self {
            Repr::PageRun { .. } => StreamKind::PageRun,
            Repr::ZeroRun { .. } => StreamKind::ZeroRun,
            Repr::Section { .. } => StreamKind::Section,
            Repr::PostcopySection { .. } => StreamKind::PostcopySection,
            Repr::Discard { .. } => StreamKind::Discard,
            Repr::DiscardMap { .. } => StreamKind::DiscardMap,
            Repr::StopAndCopy => StreamKind::StopAndCopy,
            Repr::PostcopyListen => StreamKind::PostcopyListen,
            Repr::PostcopyRun => StreamKind::PostcopyRun,
            Repr::Go => StreamKind::Go,
            Repr::End => StreamKind::End,
        }
    }

    /// Payload length in bytes for page size `page_size` (may exceed `u32`, which
    /// [`Repr::emit`] refuses).
    pub fn payload_len(&self, page_size: u32) -> u64 {
        match *self {
            Repr::PageRun { count, .. } => u64::from(count) * u64::from(page_size),
            Repr::Section { len, .. } | Repr::PostcopySection { len, .. } => u64::from(len),
            Repr::DiscardMap { count, .. } => discard_map_bytes(count),
            _ => 0,
        }
    }

    fn fields(&self, page_size: u32) -> Fields {
        let kind = self.kind() as u8;
        let payload_len = self.payload_len(page_size);
        let (flags, id, count, first) = match *self {
            Repr::PageRun {
                region,
                first,
                count,
                requested,
                paused,
            } => (
                (if requested { flags::REQUESTED } else { 0 })
                    | (if paused { flags::PAUSED } else { 0 }),
                region,
                count,
                first,
            ),
            Repr::ZeroRun {
                region,
                first,
                count,
            }
            | Repr::Discard {
                region,
                first,
                count,
            }
            | Repr::DiscardMap {
                region,
                first,
                count,
            } => (0, region, count, first),
            Repr::Section {
                section,
                offset,
                last,
                ..
            }
            | Repr::PostcopySection {
                section,
                offset,
                last,
                ..
            } => (if last { flags::LAST } else { 0 }, section, 0, offset),
            _ => (0, 0, 0, 0),
        };
        Fields {
            kind,
            flags,
            id,
            count,
            first,
            payload_len,
        }
    }

    /// Validates the record against the negotiated session: capability negotiated,
    /// region exists, page range inside it (overflow-checked), count within bounds,
    /// section chunk within bounds.
    pub fn check(&self, neg: &Negotiated) -> Result<(), Cause> {
        match *self {
            Repr::PageRun {
                region,
                first,
                count,
                ..
            } => {
                if count > MAX_RUN_PAGES {
                    return Err(Cause::CountTooLarge {
                        count,
                        max: MAX_RUN_PAGES,
                    });
                }
                page_range(neg, region, first, count)
            }
            Repr::ZeroRun {
                region,
                first,
                count,
            }
            | Repr::Discard {
                region,
                first,
                count,
            } => page_range(neg, region, first, count),
            Repr::DiscardMap {
                region,
                first,
                count,
            } => {
                if !neg.caps.postcopy_ram {
                    return Err(Cause::NotNegotiated);
                }
                if first % 64 != 0 {
                    return Err(Cause::Misaligned { first });
                }
                if count > MAX_DISCARD_MAP_PAGES {
                    return Err(Cause::CountTooLarge {
                        count,
                        max: MAX_DISCARD_MAP_PAGES,
                    });
                }
                page_range(neg, region, first, count)
            }
            Repr::Section { offset, len, .. } => section_chunk(offset, len),
            Repr::PostcopySection { offset, len, .. } => {
                if !neg.caps.postcopy_only_sections {
                    return Err(Cause::NotNegotiated);
                }
                section_chunk(offset, len)
            }
            Repr::PostcopyListen | Repr::PostcopyRun => {
                if neg.caps.postcopy_ram || neg.caps.postcopy_only_sections {
                    Ok(())
                } else {
                    Err(Cause::NotNegotiated)
                }
            }
            Repr::StopAndCopy | Repr::Go | Repr::End => Ok(()),
        }
    }

    /// Parses and validates a header (its CRC first, then every field) against the
    /// negotiated session. The sequence number is returned, not checked: channels
    /// check it (see [`crate::wire::StreamDecoder`]).
    pub fn parse<T: AsRef<[u8]>>(header: &Header<T>, neg: &Negotiated) -> Result<Record, Cause> {
        if !header.header_crc_ok() {
            return Err(Cause::HeaderChecksum {
                received: header.header_crc(),
                computed: header.compute_header_crc(),
            });
        }
        let kind = StreamKind::from_u8(header.kind()).ok_or(Cause::UnknownKind)?;
        let fl = header.flags();
        if fl & !kind.allowed_flags() != 0 {
            return Err(Cause::UnknownFlags { flags: fl });
        }
        let id = header.id();
        let count = header.count();
        let first = header.first();
        let payload_len = header.payload_len();
        let zero = |v: u64, field| {
            if v == 0 {
                Ok(())
            } else {
                Err(Cause::NonZero { field })
            }
        };
        let repr = match kind {
            StreamKind::PageRun => Repr::PageRun {
                region: id,
                first,
                count,
                requested: fl & flags::REQUESTED != 0,
                paused: fl & flags::PAUSED != 0,
            },
            StreamKind::ZeroRun => Repr::ZeroRun {
                region: id,
                first,
                count,
            },
            StreamKind::Discard => Repr::Discard {
                region: id,
                first,
                count,
            },
            StreamKind::DiscardMap => Repr::DiscardMap {
                region: id,
                first,
                count,
            },
            StreamKind::Section | StreamKind::PostcopySection => {
                zero(count.into(), Field::Count)?;
                let (section, offset, len, last) = (id, first, payload_len, fl & flags::LAST != 0);
                if kind == StreamKind::Section {
                    Repr::Section {
                        section,
                        offset,
                        len,
                        last,
                    }
                } else {
                    Repr::PostcopySection {
                        section,
                        offset,
                        len,
                        last,
                    }
                }
            }
            StreamKind::StopAndCopy
            | StreamKind::PostcopyListen
            | StreamKind::PostcopyRun
            | StreamKind::Go
            | StreamKind::End => {
                zero(id.into(), Field::Id)?;
                zero(count.into(), Field::Count)?;
                zero(first, Field::First)?;
                match kind {
                    StreamKind::StopAndCopy => Repr::StopAndCopy,
                    StreamKind::PostcopyListen => Repr::PostcopyListen,
                    StreamKind::PostcopyRun => Repr::PostcopyRun,
                    StreamKind::Go => Repr::Go,
                    _ => Repr::End,
                }
            }
        };
        repr.check(neg)?;
        let expected = repr.payload_len(neg.layout.page_size());
        if expected != u64::from(payload_len) {
            return Err(Cause::PayloadLength {
                expected,
                received: payload_len,
            });
        }
        let payload_crc = header.payload_crc();
        if neg.caps.payload_checksums && payload_len == 0 {
            zero(payload_crc.into(), Field::PayloadCrc)?;
        }
        Ok(Record {
            seq: header.seq(),
            repr,
            payload_len,
            payload_crc: if neg.caps.payload_checksums {
                payload_crc
            } else {
                0
            },
        })
    }

    /// Writes this record's header: `seq`, and `payload_crc` (pass 0 when checksums
    /// were not negotiated; see [`crate::wire::payload_crc`]). The payload is not
    /// touched: send it from wherever it lies.
    ///
    /// Only the arithmetic is checked here (the payload length must fit 32 bits); call
    /// [`Repr::check`] to validate against a session, as the decoder will.
    pub fn emit(
        &self,
        page_size: u32,
        seq: u32,
        payload_crc: u32,
        out: &mut [u8; HEADER_LEN],
    ) -> Result<(), EmitError> {
        let f = self.fields(page_size);
        let payload_len = u32::try_from(f.payload_len)
            .map_err(|_| EmitError::PayloadTooLong { len: f.payload_len })?;
        let mut h = RecordHeader {
            kind: f.kind,
            flags: f.flags,
            id: U16::new(f.id),
            count: U32::new(f.count),
            first: U64::new(f.first),
            payload_len: U32::new(payload_len),
            payload_crc: U32::new(payload_crc),
            seq: U32::new(seq),
            header_crc: U32::new(0),
        };
        h.seal();
        out.copy_from_slice(h.as_bytes());
        Ok(())
    }
}

/// A validated stream record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Record {
    /// Sequence number on its channel.
    pub seq: u32,
    /// What the record says.
    pub repr: Repr,
    /// Bytes of payload that follow the header.
    pub payload_len: u32,
    /// CRC32 the payload must have (0 when checksums were not negotiated).
    pub payload_crc: u32,
}

impl Record {
    /// `(region, first page, count)` of a page run.
    pub fn page_run(&self) -> Option<(u16, u64, u32)> {
        match self.repr {
            Repr::PageRun {
                region,
                first,
                count,
                ..
            } => Some((region, first, count)),
            _ => None,
        }
    }

    /// For a page run: the region and the byte offset within it where the payload
    /// belongs (`first * page_size`), so a transport can receive it straight into place.
    /// The range `offset..offset + payload_len` lies inside the region.
    pub fn ram_dest(&self, neg: &Negotiated) -> Option<(u16, u64)> {
        let (region, first, _) = self.page_run()?;
        let offset = first.checked_mul(u64::from(neg.layout.page_size()))?;
        Some((region, offset))
    }
}

/// Checked decode of one header at stream byte `offset`: header CRC, then every field
/// against the negotiated layout. The sequence number is not checked.
pub fn decode_header(
    bytes: &[u8; HEADER_LEN],
    neg: &Negotiated,
    offset: u64,
) -> Result<Record, DecodeError> {
    let h = Header::new_unchecked(&bytes[..]);
    Repr::parse(&h, neg).map_err(|cause| DecodeError {
        offset,
        seq: h.seq(),
        kind: h.kind(),
        cause,
    })
}

/// Encoder state of one channel: numbers records and computes payload CRCs when they
/// were negotiated.
#[derive(Debug, Clone)]
pub struct StreamEncoder {
    page_size: u32,
    checksums: bool,
    next_seq: u32,
}

impl StreamEncoder {
    /// A new channel encoder; the first record gets sequence number 0.
    pub fn new(neg: &Negotiated) -> Self {
        StreamEncoder {
            page_size: neg.layout.page_size(),
            checksums: neg.caps.payload_checksums,
            next_seq: 0,
        }
    }

    /// Sequence number the next record will carry.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// Writes the header of `repr` whose payload is `payload` (checked for length, and
    /// summed when checksums are on); returns the sequence number used.
    pub fn encode(
        &mut self,
        repr: &Repr,
        payload: &[u8],
        out: &mut [u8; HEADER_LEN],
    ) -> Result<u32, EmitError> {
        let expected = repr.payload_len(self.page_size);
        if expected != payload.len() as u64 {
            return Err(EmitError::PayloadLength {
                expected,
                given: payload.len(),
            });
        }
        let crc = if self.checksums {
            crc32fast::hash(payload)
        } else {
            0
        };
        self.encode_with_crc(repr, crc, out)
    }

    /// Writes the header of `repr` with a payload CRC the caller computed (ignored, and
    /// 0 written, when checksums are off); returns the sequence number used.
    pub fn encode_with_crc(
        &mut self,
        repr: &Repr,
        payload_crc: u32,
        out: &mut [u8; HEADER_LEN],
    ) -> Result<u32, EmitError> {
        let seq = self.next_seq;
        let crc = if self.checksums { payload_crc } else { 0 };
        repr.emit(self.page_size, seq, crc, out)?;
        self.next_seq = seq.wrapping_add(1);
        Ok(seq)
    }
}
