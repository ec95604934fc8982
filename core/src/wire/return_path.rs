//! Return-path records (destination to source) and their decoder.
//!
//! They use the stream header shape and carry no payload (`payload_len` and
//! `payload_crc` are zero).

use core::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

use super::error::{Cause, DecodeError, Field};
use super::handshake::Negotiated;
use super::header::{Header, RecordHeader, HEADER_LEN};
use super::stream::MAX_RUN_PAGES;

/// Kind byte of a return-path record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReturnKind {
    /// Postcopy: the destination faulted on these pages and needs them now.
    PageRequest = 0x81,
    /// These pages arrived torn (payload checksum mismatch): send them again.
    Resend = 0x82,
    /// Everything arrived and was verified: the source may send *go*.
    Ready = 0x83,
    /// The destination failed, with a reason code.
    Error = 0x84,
    /// The destination accepted the hello, stating its limits.
    Accept = 0x85,
    /// The destination started the guest after *go*.
    Started = 0x86,
}

impl ReturnKind {
    /// The kind with byte `b`, if any.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x81 => ReturnKind::PageRequest,
            0x82 => ReturnKind::Resend,
            0x83 => ReturnKind::Ready,
            0x84 => ReturnKind::Error,
            0x85 => ReturnKind::Accept,
            0x86 => ReturnKind::Started,
            _ => return None,
        })
    }
}

/// Reason code of a return-path error record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The stream broke the protocol (a malformed or unexpected record).
    Protocol = 1,
    /// The handshake failed (version, capabilities or layout); for a layout mismatch
    /// the detail is the index of the first differing region.
    Handshake = 2,
    /// A payload checksum failed after the source stopped.
    Checksum = 3,
    /// A record pointed outside the negotiated layout.
    OutOfRange = 4,
    /// An I/O error on the destination.
    Io = 5,
    /// An internal error on the destination.
    Internal = 6,
    /// The operator cancelled the migration.
    Cancelled = 7,
    /// A protected record failed authentication: it was altered, replayed or reordered on
    /// the way (TLS).
    Authentication = 8,
}

impl ErrorCode {
    /// The code with value `v`, if any.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => ErrorCode::Protocol,
            2 => ErrorCode::Handshake,
            3 => ErrorCode::Checksum,
            4 => ErrorCode::OutOfRange,
            5 => ErrorCode::Io,
            6 => ErrorCode::Internal,
            7 => ErrorCode::Cancelled,
            8 => ErrorCode::Authentication,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorCode::Protocol => "the stream broke the protocol",
            ErrorCode::Handshake => "the handshake failed",
            ErrorCode::Checksum => "a payload checksum failed after the source stopped",
            ErrorCode::OutOfRange => "a record pointed outside guest RAM",
            ErrorCode::Io => "an I/O error occurred on the destination",
            ErrorCode::Internal => "an internal error occurred on the destination",
            ErrorCode::Cancelled => "the migration was cancelled",
            ErrorCode::Authentication => {
                "a record failed authentication: it was altered or replayed on the way"
            }
        })
    }
}

/// The meaning of a return-path record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReturnRepr {
    /// Send these pages now (postcopy fault).
    PageRequest {
        /// Region id.
        region: u16,
        /// First page index.
        first: u64,
        /// Number of pages, `1..=MAX_RUN_PAGES`.
        count: u32,
    },
    /// Send these pages again: they arrived torn.
    Resend {
        /// Region id.
        region: u16,
        /// First page index.
        first: u64,
        /// Number of pages, `1..=MAX_RUN_PAGES`.
        count: u32,
    },
    /// Everything arrived intact; ready for *go*.
    Ready,
    /// The destination failed.
    Error {
        /// Reason code (in the `id` field).
        code: ErrorCode,
        /// Detail, such as a stream offset or region index (in the `first` field).
        detail: u64,
    },
    /// The hello was accepted. The destination states what it takes: at most
    /// `max_channels` channels (in the `id` field) and `max_device_bytes` bytes
    /// of device state, every section together (in the `first` field), and
    /// names the session (in the `count` field) so that a source can resume
    /// an interrupted postcopy of this session, and only of this one.
    Accept {
        /// Channels served, the control channel included.
        max_channels: u16,
        /// Bytes of device state taken, every section together.
        max_device_bytes: u64,
        /// The session's id, 0 when this side offers no resume.
        session: u32,
    },
    /// The guest runs on the destination: the answer to *go*.
    Started,
}

/// A validated return-path record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReturnRecord {
    /// Sequence number on the return path.
    pub seq: u32,
    /// What it says.
    pub repr: ReturnRepr,
}

impl ReturnRepr {
    /// The record kind.
    pub fn kind(&self) -> ReturnKind {
        match self {
            ReturnRepr::PageRequest { .. } => ReturnKind::PageRequest,
            ReturnRepr::Resend { .. } => ReturnKind::Resend,
            ReturnRepr::Ready => ReturnKind::Ready,
            ReturnRepr::Error { .. } => ReturnKind::Error,
            ReturnRepr::Accept { .. } => ReturnKind::Accept,
            ReturnRepr::Started => ReturnKind::Started,
        }
    }

    /// Validates page ranges against the negotiated layout.
    pub fn check(&self, neg: &Negotiated) -> Result<(), Cause> {
        match *self {
            ReturnRepr::PageRequest {
                region,
                first,
                count,
            }
            | ReturnRepr::Resend {
                region,
                first,
                count,
            } => {
                if count == 0 {
                    return Err(Cause::ZeroCount);
                }
                if count > MAX_RUN_PAGES {
                    return Err(Cause::CountTooLarge {
                        count,
                        max: MAX_RUN_PAGES,
                    });
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
            ReturnRepr::Ready
            | ReturnRepr::Error { .. }
            | ReturnRepr::Accept { .. }
            | ReturnRepr::Started => Ok(()),
        }
    }

    /// Parses and validates a return-path header (CRC, then every field).
    pub fn parse<T: AsRef<[u8]>>(
        header: &Header<T>,
        neg: &Negotiated,
    ) -> Result<ReturnRecord, Cause> {
        if !header.header_crc_ok() {
            return Err(Cause::HeaderChecksum {
                received: header.header_crc(),
                computed: header.compute_header_crc(),
            });
        }
        let kind = ReturnKind::from_u8(header.kind()).ok_or(Cause::UnknownKind)?;
        if header.flags() != 0 {
            return Err(Cause::UnknownFlags {
                flags: header.flags(),
            });
        }
        let zero = |v: u64, field| {
            if v == 0 {
                Ok(())
            } else {
                Err(Cause::NonZero { field })
            }
        };
        if header.payload_len() != 0 {
            return Err(Cause::PayloadLength {
                expected: 0,
                received: header.payload_len(),
            });
        }
        zero(header.payload_crc().into(), Field::PayloadCrc)?;
        let (id, count, first) = (header.id(), header.count(), header.first());
        let repr = match kind {
            ReturnKind::PageRequest => ReturnRepr::PageRequest {
                region: id,
                first,
                count,
            },
            ReturnKind::Resend => ReturnRepr::Resend {
                region: id,
                first,
                count,
            },
            ReturnKind::Error => {
                zero(count.into(), Field::Count)?;
                ReturnRepr::Error {
                    code: ErrorCode::from_u16(id).ok_or(Cause::UnknownErrorCode { code: id })?,
                    detail: first,
                }
            }
            ReturnKind::Accept => ReturnRepr::Accept {
                max_channels: id,
                max_device_bytes: first,
                session: count,
            },
            ReturnKind::Ready | ReturnKind::Started => {
                zero(id.into(), Field::Id)?;
                zero(count.into(), Field::Count)?;
                zero(first, Field::First)?;
                if kind == ReturnKind::Ready {
                    ReturnRepr::Ready
                } else {
                    ReturnRepr::Started
                }
            }
        };
        repr.check(neg)?;
        Ok(ReturnRecord {
            seq: header.seq(),
            repr,
        })
    }

    /// Writes this record's header with sequence number `seq`.
    pub fn emit(&self, seq: u32, out: &mut [u8; HEADER_LEN]) {
        let (id, count, first) = match *self {
            ReturnRepr::PageRequest {
                region,
                first,
                count,
            }
            | ReturnRepr::Resend {
                region,
                first,
                count,
            } => (region, count, first),
            ReturnRepr::Error { code, detail } => (code as u16, 0, detail),
            ReturnRepr::Accept {
                max_channels,
                max_device_bytes,
                session,
            } => (max_channels, session, max_device_bytes),
            ReturnRepr::Ready | ReturnRepr::Started => (0, 0, 0),
        };
        let mut h = RecordHeader {
            kind: self.kind() as u8,
            flags: 0,
            id: U16::new(id),
            count: U32::new(count),
            first: U64::new(first),
            payload_len: U32::new(0),
            payload_crc: U32::new(0),
            seq: U32::new(seq),
            header_crc: U32::new(0),
        };
        h.seal();
        out.copy_from_slice(h.as_bytes());
    }
}

/// Decodes the return path from pieces of any size.
///
/// Call [`ReturnDecoder::step`] with the unconsumed input until it consumes nothing;
/// every call with non-empty input consumes at least one byte. Sequence numbers must
/// start at 0 and increase by one. After an error the decoder is poisoned.
#[derive(Debug, Clone)]
pub struct ReturnDecoder {
    neg: Negotiated,
    hdr: [u8; HEADER_LEN],
    fill: usize,
    offset: u64,
    record_offset: u64,
    next_seq: u32,
    failed: Option<(u32, u8)>,
}

impl ReturnDecoder {
    /// A decoder validating against `neg`.
    pub fn new(neg: Negotiated) -> Self {
        ReturnDecoder {
            neg,
            hdr: [0; HEADER_LEN],
            fill: 0,
            offset: 0,
            record_offset: 0,
            next_seq: 0,
            failed: None,
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether a record is partly received.
    pub fn in_record(&self) -> bool {
        self.fill > 0
    }

    /// Consumes bytes from `input`; returns how many, and a record if one completed.
    pub fn step(&mut self, input: &[u8]) -> Result<(usize, Option<ReturnRecord>), DecodeError> {
        if let Some((seq, kind)) = self.failed {
            return Err(DecodeError {
                offset: self.record_offset,
                seq,
                kind,
                cause: Cause::Poisoned,
            });
        }
        let want = HEADER_LEN.saturating_sub(self.fill).min(input.len());
        let (Some(dst), Some(src)) = (
            self.hdr.get_mut(self.fill..self.fill + want),
            input.get(..want),
        ) else {
            return Ok((0, None));
        };
        dst.copy_from_slice(src);
        self.fill += want;
        self.offset = self.offset.saturating_add(want as u64);
        if self.fill < HEADER_LEN {
            return Ok((want, None));
        }
        self.fill = 0;
        let h = Header::new_unchecked(&self.hdr[..]);
        let (seq, kind) = (h.seq(), h.kind());
        let fail = |this: &mut Self, cause| {
            this.failed = Some((seq, kind));
            Err(DecodeError {
                offset: this.record_offset,
                seq,
                kind,
                cause,
            })
        };
        let rec = match ReturnRepr::parse(&h, &self.neg) {
            Ok(r) => r,
            Err(cause) => return fail(self, cause),
        };
        if rec.seq != self.next_seq {
            let expected = self.next_seq;
            return fail(
                self,
                Cause::Sequence {
                    expected,
                    received: rec.seq,
                },
            );
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        self.record_offset = self.offset;
        Ok((want, Some(rec)))
    }
}
