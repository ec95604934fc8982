//! The [`Decoder`] backed by `ferry_core::wire`.

use ferry_core::wire::{decode_header, DecodeError, Negotiated, Record};

use crate::record::{Decoder, Placement, HEADER_LEN};

/// Places stream records as `ferry_core::wire` decodes them: a page run's payload goes into
/// guest memory at `first * page_size` of its region, any other payload into the caller's
/// buffer.
///
/// A region id on the wire is looked up in the negotiated layout; its position there is the
/// index into the regions the channel was built with, so the host must build a channel's
/// regions in the layout's order. The decoder checks
/// each header (CRC, every field against the negotiated layout) and, for the record kinds
/// that carry it, the sequence number; the payload CRC is the caller's to check, over the
/// bytes where they landed (see [`WireDecoder::last`]).
#[derive(Debug, Clone)]
pub struct WireDecoder {
    neg: Negotiated,
    offset: u64,
    last: Option<Record>,
}

impl WireDecoder {
    /// A decoder for one channel of the negotiated session.
    pub fn new(neg: Negotiated) -> Self {
        Self {
            neg,
            offset: 0,
            last: None,
        }
    }

    /// The record most recently placed.
    pub fn last(&self) -> Option<&Record> {
        self.last.as_ref()
    }

    /// Stream offset of the next header.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl Decoder for WireDecoder {
    type Error = DecodeError;

    fn place(&mut self, header: &[u8; HEADER_LEN]) -> Result<Placement, DecodeError> {
        let rec = decode_header(header, &self.neg, self.offset)?;
        let len = u64::from(rec.payload_len);
        self.offset += HEADER_LEN as u64 + len;
        let placement = match rec.ram_dest(&self.neg) {
            Some((region, offset)) => {
                // The channel's regions are in layout order; `decode_header` checked the id.
                let index = self
                    .neg
                    .layout
                    .regions()
                    .iter()
                    .position(|r| r.id == region)
                    .unwrap_or(usize::MAX);
                Placement::Guest {
                    region: index as u32,
                    offset,
                    len,
                }
            }
            None if len == 0 => Placement::Empty,
            None => Placement::Buffer { len },
        };
        self.last = Some(rec);
        Ok(placement)
    }
}
