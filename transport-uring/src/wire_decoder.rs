//! The one [`Decoder`] of Ferry's streams: each header is decoded and checked
//! by `ferry_core::wire` (CRC, every field against the negotiated layout),
//! its sequence number must follow the previous one, and its payload is
//! placed: a page run straight into guest memory, a section chunk into the
//! caller's buffer.

use ferry_core::wire::{decode_header, DecodeError, Negotiated, Record, Repr};

use crate::record::{Decoder, Placement, HEADER_LEN};

/// Places stream records as `ferry_core::wire` decodes them.
///
/// A page run's payload goes into guest memory at `first * page_size` of its
/// region (the region's position in the negotiated layout is its index among
/// the regions the channel was built with), or, for a decoder made with
/// [`WireDecoder::buffered`], into the caller's buffer. Section chunks go into
/// the caller's buffer, which must hold them. The payload CRC is the
/// caller's to check, over the bytes where they landed
/// ([`WireDecoder::last`]).
#[derive(Debug, Clone)]
pub struct WireDecoder {
    neg: Negotiated,
    /// Bytes of stream consumed so far (headers and payloads).
    offset: u64,
    next_seq: u32,
    last: Option<Record>,
    /// Largest payload accepted into the caller's buffer.
    buffer_len: u64,
    /// Page payloads go into the caller's buffer too, not into guest memory.
    pages_to_buffer: bool,
}

/// Why the decoder refused a header.
#[derive(Debug, thiserror::Error)]
pub enum WireDecodeError {
    /// The header did not decode or validate.
    #[error("{0}")]
    Decode(DecodeError),
    /// A record was missing: the sequence numbers jumped.
    #[error("record {got} at stream offset {offset} arrived where record {expected} was expected: records were lost")]
    Sequence {
        /// The sequence number expected.
        expected: u32,
        /// The one that arrived.
        got: u32,
        /// The stream offset of the header.
        offset: u64,
    },
    /// The receiver refused the record's pages.
    #[error("{0}")]
    Refused(String),
    /// A record's payload does not fit the receive buffer.
    #[error("a record carries {len} bytes of payload, more than the {buffer}-byte receive buffer")]
    TooLarge {
        /// The payload length.
        len: u64,
        /// The buffer's length.
        buffer: u64,
    },
}

impl WireDecoder {
    /// A decoder for one channel; `buffer_len` is the size of the buffer
    /// passed to the transport's receive for section payloads.
    pub fn new(neg: Negotiated, buffer_len: usize) -> WireDecoder {
        WireDecoder {
            neg,
            offset: 0,
            next_seq: 0,
            last: None,
            buffer_len: buffer_len as u64,
            pages_to_buffer: false,
        }
    }

    /// A decoder that places page payloads in the caller's buffer as well
    /// (postcopy: the destination installs pages itself, atomically).
    pub fn buffered(neg: Negotiated, buffer_len: usize) -> WireDecoder {
        WireDecoder {
            pages_to_buffer: true,
            ..WireDecoder::new(neg, buffer_len)
        }
    }

    /// The record whose header was decoded last.
    pub fn last(&self) -> Option<Record> {
        self.last
    }

    /// The negotiated session.
    pub fn negotiated(&self) -> &Negotiated {
        &self.neg
    }

    /// Bytes of stream consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn to_buffer(&self, len: u64) -> Result<Placement, WireDecodeError> {
        if len > self.buffer_len {
            return Err(WireDecodeError::TooLarge {
                len,
                buffer: self.buffer_len,
            });
        }
        Ok(Placement::Buffer { len })
    }
}

impl Decoder for WireDecoder {
    type Error = WireDecodeError;

    fn place(&mut self, header: &[u8; HEADER_LEN]) -> Result<Placement, WireDecodeError> {
        let rec = decode_header(header, &self.neg, self.offset).map_err(WireDecodeError::Decode)?;
        if rec.seq != self.next_seq {
            return Err(WireDecodeError::Sequence {
                expected: self.next_seq,
                got: rec.seq,
                offset: self.offset,
            });
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        let len = u64::from(rec.payload_len);
        self.offset = self
            .offset
            .saturating_add(HEADER_LEN as u64)
            .saturating_add(len);
        self.last = Some(rec);
        match rec.repr {
            Repr::PageRun { .. } if self.pages_to_buffer => self.to_buffer(len),
            Repr::PageRun { .. } => {
                let index = rec.ram_dest(&self.neg).and_then(|(region, offset)| {
                    let i = self
                        .neg
                        .layout
                        .regions()
                        .iter()
                        .position(|r| r.id == region)?;
                    Some((u32::try_from(i).ok()?, offset))
                });
                Ok(match index {
                    Some((region, offset)) => Placement::Guest {
                        region,
                        offset,
                        len,
                    },
                    // decode_header validated the range, so this cannot
                    // happen; refuse rather than guess.
                    None => Placement::Discard { len },
                })
            }
            Repr::Section { .. } | Repr::PostcopySection { .. } | Repr::DiscardMap { .. } => {
                self.to_buffer(len)
            }
            _ if len == 0 => Ok(Placement::Empty),
            _ => Ok(Placement::Discard { len }),
        }
    }
}
