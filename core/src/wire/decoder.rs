//! The incremental stream decoder.

use super::error::{Cause, DecodeError};
use super::handshake::Negotiated;
use super::header::{Header, HEADER_LEN};
use super::stream::{Record, Repr};

/// Where payload bytes belong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dest {
    /// Guest RAM: byte `offset` of region `region`. The bytes lie inside the region.
    Ram {
        /// Region id.
        region: u16,
        /// Byte offset within the region of the first byte.
        offset: u64,
    },
    /// Section data: byte `offset` of section `section`'s data.
    Section {
        /// Section id.
        section: u16,
        /// Byte offset within the section's data of the first byte.
        offset: u64,
        /// The section is postcopy-only.
        postcopy_only: bool,
    },
    /// A discard map: byte `offset` of region `region`'s page bitmap (one bit
    /// per page, page 0 at bit 0 of byte 0).
    DiscardMap {
        /// Region id.
        region: u16,
        /// Byte offset within the region's bitmap of the first byte.
        offset: u64,
    },
}

/// What the decoder found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A header arrived and was validated; its payload (if any) follows.
    Header(Record),
    /// A piece of the current record's payload, borrowed from the input, and where it
    /// belongs. A payload may arrive in several pieces.
    Payload {
        /// Sequence number of the record.
        seq: u32,
        /// Where `bytes` belong.
        dest: Dest,
        /// The bytes.
        bytes: &'a [u8],
    },
    /// The record is complete, and its payload checksum (when negotiated) matched.
    Complete(Record),
    /// The record is complete but its payload checksum did not match: a torn page (the
    /// guest wrote it while it was sent) or a corrupted payload. The stream stays in sync
    /// and the decoder goes on; whether this is fatal is the caller's decision (ask for a
    /// resend while the source runs; fail once it has stopped).
    Torn {
        /// The record.
        record: Record,
        /// CRC computed over the payload received.
        computed: u32,
    },
}

/// Result of one [`StreamDecoder::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step<'a> {
    /// Input bytes consumed.
    pub consumed: usize,
    /// The event found, if any. `None` with `consumed == 0` means: more input needed.
    pub event: Option<Event<'a>>,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Header,
    Payload {
        record: Record,
        base: u64,
        done: u32,
    },
    Verify(Record),
    Ended,
    Failed {
        seq: u32,
        kind: u8,
    },
}

/// Decodes one channel's stream from pieces of any size (down to one byte).
///
/// Call [`StreamDecoder::step`] with the unconsumed input until it returns
/// `consumed == 0` and no event; then wait for more input. Each step consumes input or
/// produces an event; at most one step per record produces an event without consuming
/// input, so the loop always ends. The decoder holds at most one header, in a fixed
/// array; payloads are borrowed from the input. After an error it is poisoned.
///
/// Sequence numbers must start at 0 and increase by one per record.
///
/// ```
/// use ferry_core::wire::{
///     Capabilities, Dest, Event, Layout, Negotiated, Region, Repr, StreamDecoder,
///     StreamEncoder, HEADER_LEN,
/// };
///
/// let layout = Layout::new(4096, &[Region { id: 0, gpa: 0, size: 16 * 4096 }]).unwrap();
/// let caps = Capabilities { payload_checksums: true, channels: 1, ..Default::default() };
/// let neg = Negotiated::new(layout, caps);
///
/// // Source: one page run (header written, payload sent from where it lies), then end.
/// let page = [0x5a; 4096];
/// let mut enc = StreamEncoder::new(&neg);
/// let mut wire = vec![0; HEADER_LEN];
/// let run = Repr::PageRun { region: 0, first: 2, count: 1, requested: false, paused: false };
/// enc.encode(&run, &page, (&mut wire[..]).try_into().unwrap()).unwrap();
/// wire.extend_from_slice(&page);
/// let mut end = [0; HEADER_LEN];
/// enc.encode(&Repr::End, &[], &mut end).unwrap();
/// wire.extend_from_slice(&end);
///
/// // Destination: bytes arrive in pieces of any size.
/// let mut ram = vec![0u8; 16 * 4096];
/// let mut dec = StreamDecoder::new(neg);
/// for piece in wire.chunks(1000) {
///     let mut input = piece;
///     loop {
///         let step = dec.step(input).unwrap();
///         input = &input[step.consumed..];
///         match step.event {
///             Some(Event::Payload { dest: Dest::Ram { offset, .. }, bytes, .. }) => {
///                 let at = offset as usize; // inside the region: checked by the decoder
///                 ram[at..at + bytes.len()].copy_from_slice(bytes);
///             }
///             Some(Event::Torn { record, .. }) => panic!("ask for {record:?} again"),
///             Some(_) => {}
///             None if step.consumed == 0 => break, // need more input
///             None => {}
///         }
///     }
/// }
/// dec.finish().unwrap();
/// assert_eq!(&ram[2 * 4096..3 * 4096], &page[..]);
/// ```
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    neg: Negotiated,
    hdr: [u8; HEADER_LEN],
    fill: usize,
    state: State,
    offset: u64,
    record_offset: u64,
    next_seq: u32,
    crc: crc32fast::Hasher,
    fresh: crc32fast::Hasher,
}

impl StreamDecoder {
    /// A decoder validating against `neg`; stream offsets count from 0.
    pub fn new(neg: Negotiated) -> Self {
        Self::starting_at(neg, 0)
    }

    /// A decoder whose stream offsets count from `offset` (for instance the length of
    /// the hello that preceded the first record on the main channel), so that errors
    /// name the byte offset on the connection.
    pub fn starting_at(neg: Negotiated, offset: u64) -> Self {
        StreamDecoder {
            neg,
            hdr: [0; HEADER_LEN],
            fill: 0,
            state: State::Header,
            offset,
            record_offset: offset,
            next_seq: 0,
            crc: crc32fast::Hasher::new(),
            fresh: crc32fast::Hasher::new(),
        }
    }

    /// The session this decoder validates against.
    pub fn negotiated(&self) -> &Negotiated {
        &self.neg
    }

    /// Stream bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Stream byte offset of the current (or next) record's header.
    pub fn record_offset(&self) -> u64 {
        self.record_offset
    }

    /// Whether the end-of-stream record was decoded.
    pub fn is_ended(&self) -> bool {
        matches!(self.state, State::Ended)
    }

    /// Bytes of the current record's payload still to come (0 outside a payload).
    pub fn payload_remaining(&self) -> u32 {
        match self.state {
            State::Payload { record, done, .. } => record.payload_len.saturating_sub(done),
            _ => 0,
        }
    }

    fn fail(&mut self, seq: u32, kind: u8, cause: Cause) -> DecodeError {
        self.state = State::Failed { seq, kind };
        DecodeError {
            offset: self.record_offset,
            seq,
            kind,
            cause,
        }
    }

    /// Decodes from `input`: consumes some of it and/or yields one event.
    pub fn step<'a>(&mut self, input: &'a [u8]) -> Result<Step<'a>, DecodeError> {
        match self.state {
            State::Failed { seq, kind } => Err(DecodeError {
                offset: self.record_offset,
                seq,
                kind,
                cause: Cause::Poisoned,
            }),
            State::Ended => {
                if input.is_empty() {
                    Ok(Step {
                        consumed: 0,
                        event: None,
                    })
                } else {
                    self.record_offset = self.offset;
                    let kind = input.first().copied().unwrap_or(0);
                    Err(self.fail(self.next_seq, kind, Cause::AfterEnd))
                }
            }
            State::Header => self.step_header(input),
            State::Payload { record, base, done } => {
                let remaining = record.payload_len.saturating_sub(done) as usize;
                let n = remaining.min(input.len());
                let Some(bytes) = input.get(..n) else {
                    return Ok(Step {
                        consumed: 0,
                        event: None,
                    });
                };
                if n == 0 {
                    return Ok(Step {
                        consumed: 0,
                        event: None,
                    });
                }
                let dest = self.dest(&record, base, done);
                self.absorb(bytes);
                Ok(Step {
                    consumed: n,
                    event: Some(Event::Payload {
                        seq: record.seq,
                        dest,
                        bytes,
                    }),
                })
            }
            State::Verify(record) => Ok(Step {
                consumed: 0,
                event: Some(self.verify(record)),
            }),
        }
    }

    /// Tells the decoder that `bytes` of the current payload were received directly into
    /// place (for instance into guest RAM at the [`Dest`] of the header) instead of being
    /// passed to [`StreamDecoder::step`]. The bytes are summed and counted as consumed.
    /// Returns how many were taken: at most [`StreamDecoder::payload_remaining`], and 0
    /// outside a payload. The next `step` yields the record's completion when done.
    pub fn accept_in_place(&mut self, bytes: &[u8]) -> usize {
        if !matches!(self.state, State::Payload { .. }) {
            return 0;
        }
        let n = (self.payload_remaining() as usize).min(bytes.len());
        match bytes.get(..n) {
            Some(b) => {
                self.absorb(b);
                n
            }
            None => 0,
        }
    }

    /// Checks, once the input is exhausted, that the stream ended with its end-of-stream
    /// record and not in the middle of anything.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.state {
            State::Ended => Ok(()),
            State::Failed { seq, kind } => Err(DecodeError {
                offset: self.record_offset,
                seq,
                kind,
                cause: Cause::Poisoned,
            }),
            _ => {
                let h = Header::new_unchecked(&self.hdr[..]);
                Err(DecodeError {
                    offset: self.record_offset,
                    seq: if self.fill == HEADER_LEN {
                        h.seq()
                    } else {
                        self.next_seq
                    },
                    kind: if self.fill > 0 { h.kind() } else { 0 },
                    cause: Cause::Truncated,
                })
            }
        }
    }

    fn dest(&self, record: &Record, base: u64, done: u32) -> Dest {
        let offset = base.saturating_add(u64::from(done));
        match record.repr {
            Repr::PostcopySection { section, .. } => Dest::Section {
                section,
                offset,
                postcopy_only: true,
            },
            Repr::Section { section, .. } => Dest::Section {
                section,
                offset,
                postcopy_only: false,
            },
            Repr::PageRun { region, .. } => Dest::Ram { region, offset },
            Repr::DiscardMap { region, .. } => Dest::DiscardMap { region, offset },
            // Only page runs, sections and discard maps have payloads.
            _ => Dest::Ram { region: 0, offset },
        }
    }

    fn absorb(&mut self, bytes: &[u8]) {
        if let State::Payload { record, base, done } = self.state {
            if self.neg.caps.payload_checksums {
                self.crc.update(bytes);
            }
            let n = bytes.len() as u32;
            self.offset = self.offset.saturating_add(u64::from(n));
            let done = done.saturating_add(n);
            self.state = if done >= record.payload_len {
                State::Verify(record)
            } else {
                State::Payload { record, base, done }
            };
        }
    }

    fn verify(&mut self, record: Record) -> Event<'static> {
        self.next_record(&record);
        if self.neg.caps.payload_checksums && record.payload_len > 0 {
            // A clone of the fresh hasher kept aside skips CPU feature detection.
            let crc = core::mem::replace(&mut self.crc, self.fresh.clone());
            let computed = crc.finalize();
            if computed != record.payload_crc {
                return Event::Torn { record, computed };
            }
        }
        Event::Complete(record)
    }

    fn next_record(&mut self, record: &Record) {
        self.fill = 0;
        self.record_offset = self.offset;
        self.state = if record.repr == Repr::End {
            State::Ended
        } else {
            State::Header
        };
    }

    fn step_header<'a>(&mut self, input: &'a [u8]) -> Result<Step<'a>, DecodeError> {
        if self.fill == 0 {
            if let Some(whole) = input.first_chunk::<HEADER_LEN>() {
                // Fast path: the whole header is in the input; a fixed-size copy.
                self.hdr = *whole;
                self.fill = HEADER_LEN;
                self.offset = self.offset.saturating_add(HEADER_LEN as u64);
                return self.header_complete(HEADER_LEN);
            }
        }
        let want = HEADER_LEN.saturating_sub(self.fill).min(input.len());
        let (Some(dst), Some(src)) = (
            self.hdr.get_mut(self.fill..self.fill + want),
            input.get(..want),
        ) else {
            return Ok(Step {
                consumed: 0,
                event: None,
            });
        };
        dst.copy_from_slice(src);
        self.fill += want;
        self.offset = self.offset.saturating_add(want as u64);
        if self.fill < HEADER_LEN {
            return Ok(Step {
                consumed: want,
                event: None,
            });
        }
        self.header_complete(want)
    }

    /// The header array is full: validate it and start the record.
    fn header_complete<'a>(&mut self, want: usize) -> Result<Step<'a>, DecodeError> {
        let h = Header::new_unchecked(&self.hdr[..]);
        let (seq, kind) = (h.seq(), h.kind());
        let record = match Repr::parse(&h, &self.neg) {
            Ok(r) => r,
            Err(cause) => return Err(self.fail(seq, kind, cause)),
        };
        if record.seq != self.next_seq {
            let expected = self.next_seq;
            return Err(self.fail(
                seq,
                kind,
                Cause::Sequence {
                    expected,
                    received: record.seq,
                },
            ));
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        let base = match record.repr {
            Repr::PageRun { first, .. } => {
                match first.checked_mul(u64::from(self.neg.layout.page_size())) {
                    Some(b) => b,
                    None => {
                        // Unreachable after Repr::parse checked the range; refuse anyway.
                        let region_pages = 0;
                        return Err(self.fail(
                            seq,
                            kind,
                            Cause::OutOfRegion {
                                first,
                                count: 0,
                                region_pages,
                            },
                        ));
                    }
                }
            }
            Repr::Section { offset, .. } | Repr::PostcopySection { offset, .. } => offset,
            // `first` is a multiple of 64 (checked), so whole bytes.
            Repr::DiscardMap { first, .. } => first / 8,
            _ => 0,
        };
        self.state = if record.payload_len == 0 {
            State::Verify(record)
        } else {
            State::Payload {
                record,
                base,
                done: 0,
            }
        };
        Ok(Step {
            consumed: want,
            event: Some(Event::Header(record)),
        })
    }
}
