//! Harness functions: input format, session, and the invariants checked on every input.
//!
//! Inputs start with a configuration byte (bit 0 postcopy-ram, bit 1 postcopy-only
//! sections, bit 2 payload checksums) and, for the decoders, a chunking seed byte
//! (bit 7: receive page payloads "in place" through `accept_in_place`). The session
//! layout is fixed: page size [`PAGE`], regions 0 (64 pages), 3 (8 pages) and
//! 65535 (1 page).
//!
//! The session targets (`destination_session`, `source_session`) take a different input:
//! a short header, then one operation per op byte (see [`DstOp`] and [`SrcOp`]).
#![allow(clippy::panic, clippy::unwrap_used)]

use ferry_core::session::{
    Completeness, Custody, DestinationControl, DestinationEvent, DestinationSession, Failure,
    Limits, Mode, Nanos, SessionError, SourceAction, SourceControl, SourceEvent, SourceSession,
    Switchover, Timeouts, SEC,
};
use ferry_core::wire::{
    Capabilities, DecodeError, Dest, ErrorCode, Event, Hello, Layout, Negotiated, Record, Region,
    Repr, ReturnDecoder, ReturnRecord, ReturnRepr, Step, StreamDecoder, StreamEncoder, HEADER_LEN,
    MAX_DISCARD_MAP_PAGES, MAX_RUN_PAGES, MAX_SECTION_CHUNK,
};

/// Page size of the fuzz session (small, so page runs fit in small inputs).
pub const PAGE: u32 = 512;

/// The fuzz session for configuration byte `cfg`.
pub fn session(cfg: u8) -> Negotiated {
    let p = u64::from(PAGE);
    let regions = [
        Region {
            id: 0,
            gpa: 0,
            size: 64 * p,
        },
        Region {
            id: 3,
            gpa: 1 << 20,
            size: 8 * p,
        },
        Region {
            id: 65535,
            gpa: 1 << 32,
            size: p,
        },
    ];
    let layout = Layout::new(PAGE, &regions).expect("the fuzz layout is valid");
    Negotiated::new(
        layout,
        Capabilities {
            postcopy_ram: cfg & 1 != 0,
            postcopy_only_sections: cfg & 2 != 0,
            payload_checksums: cfg & 4 != 0,
            channels: 1,
        },
    )
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn chunker(seed: u8) -> impl FnMut() -> usize {
    let max = [1u64, 3, 31, 33, 4096][usize::from(seed & 0x7f) % 5];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(seed));
    move || (1 + rng.next() % max) as usize
}

/// Piece sizes for a generated stream whose record boundaries (header starts, payload
/// starts, the end) are `edges`, ascending from 0: the sizes [`chunker`] gives for
/// `seed` within [`EDGE`] bytes of every boundary, and inside a long payload pieces of
/// up to 4 KiB that stop [`EDGE`] bytes short of its end. Every boundary is still
/// crossed in the seed's small pieces, but a 512 KiB page run takes a few hundred steps,
/// not hundreds of thousands (the middle of a payload is all alike to the decoder).
fn edge_chunker(seed: u8, edges: Vec<usize>) -> impl FnMut() -> usize {
    let mut small = chunker(seed);
    let mut pos = 0usize;
    let mut next = 0usize;
    move || {
        let piece = small();
        while edges.get(next).is_some_and(|&e| e <= pos) {
            next += 1;
        }
        let prev = next.checked_sub(1).map_or(0, |i| edges[i]);
        let piece = match edges.get(next) {
            Some(&e) if pos - prev >= EDGE && e - pos > EDGE => {
                piece.max((e - EDGE - pos).min(4096))
            }
            _ => piece,
        };
        pos += piece;
        piece
    }
}

/// Bytes either side of a record boundary that [`edge_chunker`] splits like [`chunker`].
const EDGE: usize = 64;

/// One observable outcome of decoding, independent of how the input was split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trace {
    /// A header was accepted.
    Header(Record),
    /// A record completed: `torn` holds the computed CRC of a torn payload.
    Done {
        /// The record.
        record: Record,
        /// `Some(computed crc)` when the decoder reported the payload torn.
        torn: Option<u32>,
        /// Payload bytes seen.
        len: u64,
        /// CRC32 of the payload bytes seen.
        crc: u32,
    },
    /// The decoder refused the stream.
    Error(DecodeError),
    /// The result of `finish` once the input ran out.
    Finish(Result<(), DecodeError>),
}

/// What decoding one stream produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Everything observed, in order.
    pub trace: Vec<Trace>,
}

impl Outcome {
    /// Whether the stream was decoded to its end-of-stream record without error.
    pub fn ended_cleanly(&self) -> bool {
        matches!(self.trace.last(), Some(Trace::Finish(Ok(()))))
    }

    /// Number of torn records.
    pub fn torn(&self) -> usize {
        self.trace
            .iter()
            .filter(|t| matches!(t, Trace::Done { torn: Some(_), .. }))
            .count()
    }

    /// Number of completed records (intact or torn).
    pub fn records(&self) -> usize {
        self.trace
            .iter()
            .filter(|t| matches!(t, Trace::Done { .. }))
            .count()
    }

    /// The error, if decoding failed.
    pub fn error(&self) -> Option<DecodeError> {
        self.trace.iter().find_map(|t| match t {
            Trace::Error(e) => Some(*e),
            _ => None,
        })
    }
}

struct Current {
    record: Record,
    next: u64,
    len: u64,
    crc: crc32fast_lite::Crc,
}

/// A table-driven CRC32 (slicing-by-16) of the harness's own, so the harness does not
/// share code with the decoder it checks. Sixteen bytes per loop iteration rather than
/// one: the fuzz build instruments every loop compare, and payload bytes dominate.
mod crc32fast_lite {
    #[derive(Clone, Copy)]
    pub struct Crc(u32);

    /// `TABLES[0]` is the classic byte table; `TABLES[k][b]` is the CRC of byte `b`
    /// followed by `k` zero bytes.
    static TABLES: [[u32; 256]; 16] = {
        let mut t = [[0u32; 256]; 16];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[0][i] = c;
            i += 1;
        }
        let mut k = 1;
        while k < 16 {
            let mut i = 0;
            while i < 256 {
                let prev = t[k - 1][i];
                t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
                i += 1;
            }
            k += 1;
        }
        t
    };

    impl Crc {
        pub fn new() -> Self {
            Crc(!0)
        }

        pub fn update(&mut self, bytes: &[u8]) {
            let t = &TABLES;
            let mut c = self.0;
            let mut blocks = bytes.chunks_exact(16);
            for b in &mut blocks {
                let w = c ^ u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                c = t[15][(w & 0xff) as usize]
                    ^ t[14][((w >> 8) & 0xff) as usize]
                    ^ t[13][((w >> 16) & 0xff) as usize]
                    ^ t[12][(w >> 24) as usize]
                    ^ t[11][usize::from(b[4])]
                    ^ t[10][usize::from(b[5])]
                    ^ t[9][usize::from(b[6])]
                    ^ t[8][usize::from(b[7])]
                    ^ t[7][usize::from(b[8])]
                    ^ t[6][usize::from(b[9])]
                    ^ t[5][usize::from(b[10])]
                    ^ t[4][usize::from(b[11])]
                    ^ t[3][usize::from(b[12])]
                    ^ t[2][usize::from(b[13])]
                    ^ t[1][usize::from(b[14])]
                    ^ t[0][usize::from(b[15])];
            }
            for &b in blocks.remainder() {
                c = (c >> 8) ^ t[0][((c ^ u32::from(b)) & 0xff) as usize];
            }
            self.0 = c;
        }

        pub fn finish(self) -> u32 {
            !self.0
        }
    }

    #[test]
    fn known_answers() {
        // CRC-32/ISO-HDLC check value, and the same bytes fed in uneven pieces.
        let mut c = Crc::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xCBF4_3926);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + i / 3) as u8).collect();
        let mut whole = Crc::new();
        whole.update(&data);
        let mut bytewise = Crc(!0);
        for &b in &data {
            bytewise.0 =
                (bytewise.0 >> 8) ^ TABLES[0][((bytewise.0 ^ u32::from(b)) & 0xff) as usize];
        }
        let mut pieces = Crc::new();
        for piece in data.chunks(37) {
            pieces.update(piece);
        }
        assert_eq!(whole.finish(), bytewise.finish());
        assert_eq!(whole.finish(), pieces.finish());
    }
}

fn payload_bytes(neg: &Negotiated, cur: &mut Current, dest: Dest, bytes: &[u8]) {
    let (offset, ok_dest) = match (dest, cur.record.repr) {
        (Dest::Ram { region, offset }, Repr::PageRun { region: r, .. }) => {
            let size = neg
                .layout
                .region(region)
                .expect("a payload goes to a region of the layout")
                .size;
            let end = offset.checked_add(bytes.len() as u64).expect("no overflow");
            assert!(end <= size, "payload written outside its region");
            (offset, region == r)
        }
        (
            Dest::Section {
                section,
                offset,
                postcopy_only,
            },
            Repr::Section { section: s, .. },
        ) => (offset, section == s && !postcopy_only),
        (
            Dest::Section {
                section,
                offset,
                postcopy_only,
            },
            Repr::PostcopySection { section: s, .. },
        ) => (offset, section == s && postcopy_only),
        (Dest::DiscardMap { region, offset }, Repr::DiscardMap { region: r, .. }) => {
            let pages = neg
                .layout
                .region_pages(region)
                .expect("a discard map covers a region of the layout");
            // One bit per page, in whole 64-bit words.
            let map = pages.div_ceil(64) * 8;
            let end = offset.checked_add(bytes.len() as u64).expect("no overflow");
            assert!(
                end <= map,
                "discard map written outside its region's bitmap"
            );
            (offset, region == r)
        }
        _ => panic!("payload destination {dest:?} for {:?}", cur.record.repr),
    };
    assert!(ok_dest, "payload destination does not match its record");
    assert_eq!(offset, cur.next, "payload pieces are not contiguous");
    cur.next += bytes.len() as u64;
    cur.len += bytes.len() as u64;
    assert!(
        cur.len <= u64::from(cur.record.payload_len),
        "payload overrun"
    );
    cur.crc.update(bytes);
}

/// Decodes `stream`, split into pieces of the sizes `chunks` returns, checking every
/// invariant of the decoder's contract; returns what it observed.
pub fn decode_stream(
    neg: &Negotiated,
    stream: &[u8],
    chunks: &mut impl FnMut() -> usize,
    in_place: bool,
) -> Outcome {
    let mut dec = StreamDecoder::new(*neg);
    let mut trace = Vec::new();
    let mut cur: Option<Current> = None;
    let mut pos = 0usize;
    let mut steps = 0usize;
    // Every step consumes input, or is the one zero-input completion of a record (and
    // a record takes at least 32 bytes), or is the final "need more" of a chunk.
    let limit = 2 * stream.len() + 2 * (stream.len() + 1) + 8;
    loop {
        let end = pos.saturating_add(chunks().max(1)).min(stream.len());
        let chunk = &stream[pos..end];
        let mut off = 0usize;
        loop {
            steps += 1;
            assert!(steps <= limit, "the decoder does not make progress");
            let input = &chunk[off..];
            if in_place && dec.payload_remaining() > 0 {
                if let Some(c) = cur.as_mut().filter(|c| c.record.page_run().is_some()) {
                    let k = dec.accept_in_place(input);
                    assert!(k <= input.len());
                    assert!(k > 0 || input.is_empty(), "accept_in_place took nothing");
                    if k == 0 {
                        break;
                    }
                    let (region, _) = c.record.ram_dest(neg).expect("a page run");
                    payload_bytes(
                        neg,
                        c,
                        Dest::Ram {
                            region,
                            offset: c.next,
                        },
                        &input[..k],
                    );
                    off += k;
                    continue;
                }
            }
            let record_offset = dec.record_offset();
            let step = dec.step(input);
            let Step { consumed, event } = match step {
                Ok(s) => s,
                Err(e) => {
                    assert_eq!(
                        e.offset, record_offset,
                        "the error names the record's offset"
                    );
                    trace.push(Trace::Error(e));
                    let again = dec.step(b"x").expect_err("a failed decoder stays failed");
                    assert_eq!(again.cause, ferry_core::wire::Cause::Poisoned);
                    return Outcome { trace };
                }
            };
            assert!(consumed <= input.len());
            match event {
                None => {
                    if consumed == 0 {
                        assert!(input.is_empty(), "the decoder stalls on input");
                        break;
                    }
                }
                Some(Event::Header(r)) => {
                    assert!(cur.is_none(), "a header inside a record");
                    assert!(consumed > 0 && consumed <= HEADER_LEN);
                    let start = record_offset as usize;
                    let orig = &stream[start..start + HEADER_LEN];
                    let mut out = [0u8; HEADER_LEN];
                    r.repr
                        .emit(PAGE, r.seq, r.payload_crc, &mut out)
                        .expect("an accepted record re-encodes");
                    if neg.caps.payload_checksums {
                        assert_eq!(&out[..], orig, "re-encoding differs");
                    } else {
                        assert_eq!(&out[..20], &orig[..20], "re-encoding differs");
                        assert_eq!(&out[24..28], &orig[24..28], "re-encoding differs");
                    }
                    let next = match r.repr {
                        Repr::PageRun { first, .. } => first * u64::from(PAGE),
                        Repr::Section { offset, .. } | Repr::PostcopySection { offset, .. } => {
                            offset
                        }
                        // Byte `first / 8` of the region's bitmap (`first` is a multiple of 64).
                        Repr::DiscardMap { first, .. } => first / 8,
                        _ => 0,
                    };
                    cur = Some(Current {
                        record: r,
                        next,
                        len: 0,
                        crc: crc32fast_lite::Crc::new(),
                    });
                    trace.push(Trace::Header(r));
                }
                Some(Event::Payload { seq, dest, bytes }) => {
                    assert!(consumed > 0 && bytes.len() == consumed);
                    assert_eq!(bytes.as_ptr(), input.as_ptr(), "payload is not borrowed");
                    let c = cur.as_mut().expect("payload outside a record");
                    assert_eq!(seq, c.record.seq);
                    payload_bytes(neg, c, dest, bytes);
                }
                Some(Event::Complete(r)) | Some(Event::Torn { record: r, .. }) => {
                    assert_eq!(consumed, 0);
                    let c = cur.take().expect("completion outside a record");
                    assert_eq!(c.record, r);
                    assert_eq!(c.len, u64::from(r.payload_len), "record completed early");
                    let crc = c.crc.finish();
                    let torn = match event {
                        Some(Event::Torn { computed, .. }) => {
                            assert!(neg.caps.payload_checksums);
                            assert_eq!(computed, crc);
                            assert_ne!(computed, r.payload_crc);
                            Some(computed)
                        }
                        _ => {
                            if neg.caps.payload_checksums {
                                assert_eq!(crc, r.payload_crc, "a bad payload passed");
                            }
                            None
                        }
                    };
                    trace.push(Trace::Done {
                        record: r,
                        torn,
                        len: c.len,
                        crc,
                    });
                }
            }
            off += consumed;
        }
        pos = end;
        if pos >= stream.len() {
            break;
        }
    }
    let fin = dec.finish();
    assert_eq!(fin.is_ok(), dec.is_ended());
    trace.push(Trace::Finish(fin));
    Outcome { trace }
}

/// Fuzz target `stream_decoder`: `[cfg, seed, stream...]`. Decodes the stream whole and
/// in pieces chosen by `seed`; both must satisfy every invariant and agree.
pub fn stream_decoder(data: &[u8]) -> Option<Outcome> {
    let [cfg, seed, stream @ ..] = data else {
        return None;
    };
    let neg = session(*cfg);
    let whole = decode_stream(&neg, stream, &mut || usize::MAX, false);
    let mut pieces = chunker(*seed);
    let split = decode_stream(&neg, stream, &mut pieces, seed & 0x80 != 0);
    assert_eq!(whole, split, "decoding depends on how the input is split");
    Some(whole)
}

fn decode_return(
    neg: &Negotiated,
    bytes: &[u8],
    chunks: &mut impl FnMut() -> usize,
) -> Vec<Result<ReturnRecord, DecodeError>> {
    let mut dec = ReturnDecoder::new(*neg);
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        let end = pos.saturating_add(chunks().max(1)).min(bytes.len());
        let mut chunk = &bytes[pos..end];
        while !chunk.is_empty() {
            match dec.step(chunk) {
                Ok((n, rec)) => {
                    assert!(n > 0 && n <= chunk.len(), "the return decoder stalls");
                    chunk = &chunk[n..];
                    if let Some(r) = rec {
                        let at = dec.offset() as usize - HEADER_LEN;
                        let mut again = [0u8; HEADER_LEN];
                        r.repr.emit(r.seq, &mut again);
                        assert_eq!(
                            &again[..],
                            &bytes[at..at + HEADER_LEN],
                            "re-encoding differs"
                        );
                        out.push(Ok(r));
                    }
                }
                Err(e) => {
                    out.push(Err(e));
                    assert!(dec.step(b"x").is_err(), "a failed decoder stays failed");
                    return out;
                }
            }
        }
        pos = end;
    }
    out
}

/// Fuzz target `return_path`: `[cfg, seed, bytes...]`, decoded whole and in pieces.
/// The bytes are also parsed as a hello record (the other input a peer controls before
/// any session exists): a hello that parses must re-encode to the same bytes.
pub fn return_path(data: &[u8]) -> Option<Vec<Result<ReturnRecord, DecodeError>>> {
    let [cfg, seed, bytes @ ..] = data else {
        return None;
    };
    if let Ok(hello) = Hello::parse(bytes) {
        let mut out = vec![0u8; bytes.len()];
        assert_eq!(hello.emit(&mut out), Ok(bytes.len()));
        assert_eq!(&out[..], bytes, "a parsed hello re-encodes differently");
        let head: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().expect("a header");
        assert_eq!(Hello::payload_len(&head), Ok(bytes.len() - HEADER_LEN));
    }
    let neg = session(*cfg);
    let whole = decode_return(&neg, bytes, &mut || usize::MAX);
    let mut pieces = chunker(*seed);
    let split = decode_return(&neg, bytes, &mut pieces);
    assert_eq!(whole, split, "decoding depends on how the input is split");
    Some(whole)
}

struct Gen<'a>(&'a [u8]);

impl Gen<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let n = N.min(self.0.len());
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        b
    }

    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }

    fn region(&mut self) -> u16 {
        match self.u8() % 5 {
            0 | 1 => 0,
            2 => 3,
            3 => 65535,
            _ => u16::from_le_bytes(self.bytes()),
        }
    }

    fn first(&mut self) -> u64 {
        match self.u8() % 4 {
            0 | 1 => u64::from(self.u8() % 70),
            2 => u64::MAX - u64::from(self.u8() % 4),
            _ => self.u64(),
        }
    }

    fn count(&mut self) -> u32 {
        // Counts at the bound cost a large payload: keep them rare.
        match self.u8() % 16 {
            0 => MAX_RUN_PAGES - 1 + u32::from(self.u8() % 3),
            1 | 2 => self.u32(),
            _ => u32::from(self.u8() % 6),
        }
    }

    fn len(&mut self) -> u32 {
        // A chunk of exactly the bound (1 MiB) is rare: it is slow to build and check.
        match self.u8() {
            0..=15 => MAX_SECTION_CHUNK + 1 + u32::from(self.u8()),
            16 if self.u8() == 0 => MAX_SECTION_CHUNK,
            _ => u32::from(self.u8()),
        }
    }

    /// The first page of a discard map: mostly 0 or 64 (the aligned starts near the
    /// fuzz regions), else a small page or any value (mostly misaligned).
    fn map_first(&mut self) -> u64 {
        match self.u8() % 4 {
            0 | 1 => 64 * u64::from(self.u8() % 2),
            2 => u64::from(self.u8()),
            _ => self.u64(),
        }
    }

    /// The page count of a discard map. A count over the bound costs nothing: the
    /// record is refused before its payload is built.
    fn map_count(&mut self) -> u32 {
        match self.u8() % 8 {
            0 => MAX_DISCARD_MAP_PAGES + u32::from(self.u8() % 2),
            1 => self.u32(),
            _ => u32::from(self.u8() % 70),
        }
    }

    fn repr(&mut self) -> Repr {
        match self.u8() % 11 {
            0 => Repr::PageRun {
                region: self.region(),
                first: self.first(),
                count: self.count(),
                requested: self.u8() & 1 != 0,
                paused: false,
            },
            1 => Repr::ZeroRun {
                region: self.region(),
                first: self.first(),
                count: self.count(),
            },
            2 => Repr::Section {
                section: u16::from_le_bytes(self.bytes()),
                offset: self.first(),
                len: self.len(),
                last: self.u8() & 1 != 0,
            },
            3 => Repr::PostcopySection {
                section: u16::from_le_bytes(self.bytes()),
                offset: self.first(),
                len: self.len(),
                last: self.u8() & 1 != 0,
            },
            4 => Repr::Discard {
                region: self.region(),
                first: self.first(),
                count: self.count(),
            },
            5 => Repr::StopAndCopy,
            6 => Repr::PostcopyListen,
            7 => Repr::PostcopyRun,
            8 => Repr::Go,
            9 => Repr::End,
            _ => Repr::DiscardMap {
                region: self.region(),
                first: self.map_first(),
                count: self.map_count(),
            },
        }
    }

    fn return_repr(&mut self) -> ReturnRepr {
        match self.u8() % 6 {
            0 => ReturnRepr::PageRequest {
                region: self.region(),
                first: self.first(),
                count: self.count(),
            },
            1 => ReturnRepr::Resend {
                region: self.region(),
                first: self.first(),
                count: self.count(),
            },
            2 => ReturnRepr::Ready,
            3 => ReturnRepr::Error {
                code: ErrorCode::from_u16(u16::from(self.u8() % 8) + 1).expect("a known code"),
                detail: self.u64(),
            },
            4 => ReturnRepr::Started,
            _ => ReturnRepr::Accept {
                max_channels: u16::from(self.u8()),
                max_device_bytes: self.u64(),
                session: u32::from(self.u8()) << 8,
            },
        }
    }
}

/// Appends the `len` payload bytes of record `seq`: byte `i` is
/// `31 i ^ seq ^ (i >> 8)` (mod 256), built 256 bytes at a time (payloads reach 1 MiB).
fn extend_pattern(out: &mut Vec<u8>, seq: u32, len: usize) {
    const BASE: [u8; 256] = {
        let mut b = [0u8; 256];
        let mut i = 0;
        while i < 256 {
            b[i] = (i as u8).wrapping_mul(31);
            i += 1;
        }
        b
    };
    out.reserve(len);
    let mut block = 0usize;
    while block * 256 < len {
        let k = (seq as u8) ^ (block as u8);
        let n = (len - block * 256).min(256);
        out.extend(BASE[..n].iter().map(|&x| x ^ k));
        block += 1;
    }
}

fn pattern(seq: u32, len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    extend_pattern(&mut out, seq, len);
    out
}

/// Fuzz target `roundtrip`: `[cfg, seed, generator bytes...]`. Builds records from the
/// bytes, encodes them, decodes the stream in pieces, and checks that every valid record
/// comes back identical (torn exactly when a payload byte was flipped), and that an
/// invalid record is refused with the cause `Repr::check` gives, at its offset.
/// Return-path records are checked the same way.
pub fn roundtrip(data: &[u8]) -> Option<()> {
    thread_local! {
        /// The stream buffer, kept from one input to the next: fresh buffers of a few
        /// MiB (1 MiB section chunks) cost more in page faults than the rest of a run.
        static STREAM: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let mut stream = STREAM.take();
    stream.clear();
    let out = roundtrip_in(data, &mut stream);
    STREAM.set(stream);
    out
}

fn roundtrip_in(data: &[u8], stream: &mut Vec<u8>) -> Option<()> {
    let [cfg, seed, rest @ ..] = data else {
        return None;
    };
    let neg = session(*cfg);
    let mut g = Gen(rest);
    let mut enc = StreamEncoder::new(&neg);
    // Record boundaries in `stream`: each header's start and end.
    let mut edges = Vec::new();
    let mut expect = Vec::new();
    let mut ended = false;
    let mut refused = None;
    for _ in 0..16 {
        if g.is_empty() {
            break;
        }
        let repr = g.repr();
        let mut head = [0u8; HEADER_LEN];
        match repr.check(&neg) {
            Ok(()) => {
                let seq = enc.next_seq();
                let len = usize::try_from(repr.payload_len(PAGE)).expect("a bounded payload");
                // The payload goes straight into the stream, after room for its header.
                let start = stream.len();
                edges.push(start);
                stream.resize(start + HEADER_LEN, 0);
                edges.push(stream.len());
                extend_pattern(stream, seq, len);
                let payload = &mut stream[start + HEADER_LEN..];
                let s = enc
                    .encode(&repr, payload, &mut head)
                    .expect("a valid record encodes");
                assert_eq!(s, seq);
                let flip = neg.caps.payload_checksums && len > 0 && g.u8() % 4 == 0;
                if flip {
                    let i = usize::from(g.u8()) % len;
                    payload[i] ^= 1 << (g.u8() % 8);
                }
                stream[start..start + HEADER_LEN].copy_from_slice(&head);
                expect.push((repr, seq, flip));
                if repr == Repr::End {
                    ended = true;
                    break;
                }
            }
            Err(cause) => {
                let seq = enc.next_seq();
                if repr.emit(PAGE, seq, 0, &mut head).is_err() {
                    continue;
                }
                refused = Some((stream.len() as u64, seq, repr.kind() as u8, cause));
                edges.push(stream.len());
                stream.extend_from_slice(&head);
                edges.push(stream.len());
                break;
            }
        }
    }
    if !ended && refused.is_none() {
        let mut head = [0u8; HEADER_LEN];
        let seq = enc.encode(&Repr::End, &[], &mut head).expect("end encodes");
        edges.push(stream.len());
        stream.extend_from_slice(&head);
        edges.push(stream.len());
        expect.push((Repr::End, seq, false));
    }
    // Large payloads (a 1 MiB section chunk) one byte at a time would starve the fuzzer:
    // the middle of a long payload goes in pieces of up to 4 KiB.
    let seed = *seed;
    let mut pieces = edge_chunker(seed, edges);
    let out = decode_stream(&neg, stream, &mut pieces, seed & 0x80 != 0);
    let done: Vec<_> = out
        .trace
        .iter()
        .filter_map(|t| match t {
            Trace::Done { record, torn, .. } => Some((record.repr, record.seq, torn.is_some())),
            _ => None,
        })
        .collect();
    assert_eq!(done, expect, "records did not survive the round trip");
    match refused {
        Some((offset, seq, kind, cause)) => {
            let e = out.error().expect("an invalid record is refused");
            assert_eq!(
                (e.offset, e.seq, e.kind, e.cause),
                (offset, seq, kind, cause)
            );
        }
        None => assert!(out.ended_cleanly(), "a valid stream fails: {:?}", out.trace),
    }

    // Return path.
    let mut bytes = Vec::new();
    let mut want = Vec::new();
    for seq in 0..8u32 {
        if g.is_empty() {
            break;
        }
        let repr = g.return_repr();
        let mut head = [0u8; HEADER_LEN];
        repr.emit(seq, &mut head);
        bytes.extend_from_slice(&head);
        match repr.check(&neg) {
            Ok(()) => want.push(Ok(ReturnRecord { seq, repr })),
            Err(cause) => {
                want.push(Err((seq, cause)));
                break;
            }
        }
    }
    let got: Vec<_> = decode_return(&neg, &bytes, &mut chunker(seed))
        .into_iter()
        .map(|r| r.map_err(|e| (e.seq, e.cause)))
        .collect();
    assert_eq!(
        got, want,
        "return-path records did not survive the round trip"
    );
    Some(())
}

/// Valid stream records of every kind, for seeds and tests (all need cfg with both
/// postcopy capabilities).
pub fn sample_records() -> Vec<Repr> {
    vec![
        Repr::PageRun {
            region: 0,
            first: 5,
            count: 2,
            requested: false,
            paused: false,
        },
        Repr::PageRun {
            region: 3,
            first: 7,
            count: 1,
            requested: true,
            paused: false,
        },
        Repr::ZeroRun {
            region: 0,
            first: 10,
            count: 20,
        },
        Repr::Section {
            section: 1,
            offset: 0,
            len: 100,
            last: false,
        },
        Repr::Section {
            section: 1,
            offset: 100,
            len: 0,
            last: true,
        },
        Repr::Discard {
            region: 65535,
            first: 0,
            count: 1,
        },
        Repr::StopAndCopy,
        Repr::PostcopyListen,
        Repr::PostcopyRun,
        Repr::PostcopySection {
            section: 9,
            offset: 0,
            len: 64,
            last: true,
        },
        Repr::Go,
        Repr::DiscardMap {
            region: 0,
            first: 0,
            count: 40,
        },
    ]
}

/// Encodes `records` then an end-of-stream record; flips one payload bit of the record
/// at index `tear` (if any) after its CRC was computed.
pub fn encode_stream(neg: &Negotiated, records: &[Repr], tear: Option<usize>) -> Vec<u8> {
    let mut enc = StreamEncoder::new(neg);
    let mut out = Vec::new();
    for (i, repr) in records
        .iter()
        .chain(std::iter::once(&Repr::End))
        .enumerate()
    {
        let len = usize::try_from(repr.payload_len(neg.layout.page_size())).expect("small");
        let mut payload = pattern(enc.next_seq(), len);
        let mut head = [0u8; HEADER_LEN];
        enc.encode(repr, &payload, &mut head).expect("encodes");
        if tear == Some(i) {
            if let Some(b) = payload.first_mut() {
                *b ^= 0x10;
            }
        }
        out.extend_from_slice(&head);
        out.extend_from_slice(&payload);
    }
    out
}

fn kind_name(r: &Repr) -> String {
    format!("{:?}", r.kind()).to_lowercase()
}

/// The seed corpus: `(target, file name, bytes)`.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let all = sample_records();
    for cfg in [7u8, 3] {
        let neg = session(cfg);
        for (i, r) in all.iter().enumerate() {
            let mut data = vec![cfg, (i as u8) | if i % 2 == 0 { 0x80 } else { 0 }];
            data.extend(encode_stream(&neg, std::slice::from_ref(r), None));
            out.push((
                "stream_decoder",
                format!("valid_{}_{i}_cfg{cfg}", kind_name(r)),
                data,
            ));
        }
        let mut data = vec![cfg, 0x02];
        data.extend(encode_stream(&neg, &all, None));
        out.push(("stream_decoder", format!("valid_all_cfg{cfg}"), data));
    }
    let neg = session(4);
    let plain: Vec<Repr> = all
        .iter()
        .copied()
        .filter(|r| r.check(&neg).is_ok())
        .collect();
    let mut data = vec![4, 0x81];
    data.extend(encode_stream(&neg, &plain, None));
    out.push(("stream_decoder", "valid_precopy_cfg4".to_string(), data));
    let neg = session(7);
    let mut data = vec![7, 0x83];
    data.extend(encode_stream(&neg, &all, Some(0)));
    out.push(("stream_decoder", "torn_page_cfg7".to_string(), data));

    let returns = [
        ReturnRepr::Accept {
            max_channels: 4,
            max_device_bytes: 1 << 20,
            session: 0,
        },
        ReturnRepr::PageRequest {
            region: 0,
            first: 63,
            count: 1,
        },
        ReturnRepr::Resend {
            region: 3,
            first: 0,
            count: 8,
        },
        ReturnRepr::Ready,
        ReturnRepr::Error {
            code: ErrorCode::OutOfRange,
            detail: 4096,
        },
    ];
    let mut all_ret = vec![7u8, 0x01];
    for (i, r) in returns.iter().enumerate() {
        let mut head = [0u8; HEADER_LEN];
        r.emit(0, &mut head);
        let mut data = vec![7u8, i as u8];
        data.extend_from_slice(&head);
        out.push((
            "return_path",
            format!("valid_{}", format!("{:?}", r.kind()).to_lowercase()),
            data,
        ));
        r.emit(i as u32, &mut head);
        all_ret.extend_from_slice(&head);
    }
    out.push(("return_path", "valid_all".to_string(), all_ret));
    for cfg in [7u8, 0] {
        let neg = session(cfg);
        let hello = Hello::new(neg.caps, neg.layout);
        let mut buf = vec![0u8; hello.wire_len()];
        hello.emit(&mut buf).expect("the hello fits");
        let mut data = vec![cfg, 0];
        data.extend(buf);
        out.push(("return_path", format!("hello_cfg{cfg}"), data));
    }

    // Round trip: generator bytes selecting each record kind with small fields.
    for k in 0u8..10 {
        let data = vec![7, k | 0x80, k, 0, 1, 2, 1, 0, 3, 1, 0, 0, 0, 2, 0, 1, 3];
        out.push(("roundtrip", format!("kind_{k}"), data));
    }
    // Kind 10, a discard map: region 0, first page 0, 40 pages, payload not flipped;
    // then the end.
    out.push((
        "roundtrip",
        "kind_10".to_string(),
        vec![7, 0x8a, 10, 0, 0, 0, 2, 40, 1, 9],
    ));
    out.push((
        "roundtrip",
        "mixed".to_string(),
        vec![
            7, 0x04, 0, 0, 0, 4, 0, 2, 0, 2, 1, 0, 0, 0, 1, 0, 5, 6, 7, 3, 1, 0, 2, 9, 0, 0, 8, 0,
            0, 1, 0, 3, 0, 1, 9, 2, 3, 1, 4,
        ],
    ));
    out.extend(session_seeds());
    out
}

/// Hand-made session runs: `complete_*` end in success, `fail_*` in a failure.
fn session_seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    use DstOp as D;
    use SrcOp as S;
    use Tick::{Deadline, Milli, TenSeconds, ThirtySeconds};
    let limits = Limits {
        max_channels: 4,
        max_device_bytes: 1 << 20,
    };
    let section = |section, len| {
        D::Record(Repr::Section {
            section,
            offset: 0,
            len,
            last: true,
        })
    };
    let hello = |channels, postcopy_ram| D::AcceptHello {
        channels,
        postcopy_ram,
    };
    let pages = |first, count| {
        D::Record(Repr::PageRun {
            region: 0,
            first,
            count,
            requested: false,
            paused: false,
        })
    };
    let precopy_head = vec![
        hello(3, false),
        D::NoteActivity,
        pages(0, 4),
        D::Record(Repr::StopAndCopy),
        D::Record(Repr::ZeroRun {
            region: 0,
            first: 4,
            count: 60,
        }),
        section(1, 4096),
        D::Record(Repr::End),
    ];
    let postcopy_ram_head = vec![
        hello(3, true),
        pages(0, 4),
        D::Record(Repr::PostcopyListen),
        D::Record(Repr::DiscardMap {
            region: 0,
            first: 0,
            count: 64,
        }),
        D::Record(Repr::End),
        D::Completeness(Completeness {
            missing_pages: 60,
            ..Completeness::default()
        }),
        D::Record(Repr::Go),
        D::GuestStarted,
    ];
    let with = |head: &[DstOp], tail: &[DstOp]| -> Vec<DstStep> {
        head.iter().chain(tail).map(|op| (Milli, *op)).collect()
    };
    let mut dst: Vec<(&str, Limits, Vec<DstStep>)> = vec![
        (
            "complete_precopy",
            limits,
            with(
                &precopy_head,
                &[
                    D::Completeness(Completeness::default()),
                    D::Record(Repr::Go),
                    D::GuestStarted,
                ],
            ),
        ),
        (
            "complete_precopy_torn_resend",
            limits,
            with(
                &precopy_head,
                &[
                    D::Completeness(Completeness {
                        torn_pages: 1,
                        ..Completeness::default()
                    }),
                    pages(2, 1),
                    D::Completeness(Completeness::default()),
                    D::Record(Repr::Go),
                    D::GuestStarted,
                ],
            ),
        ),
        (
            "complete_postcopy_ram",
            limits,
            with(
                &postcopy_ram_head,
                &[
                    D::Record(Repr::PostcopyRun),
                    D::NoteActivity,
                    D::Record(Repr::End),
                    D::PostcopyComplete,
                ],
            ),
        ),
        (
            "complete_postcopy_sections",
            limits,
            with(
                &[
                    hello(2, false),
                    D::Record(Repr::StopAndCopy),
                    section(1, 100),
                    D::Record(Repr::PostcopyListen),
                    D::Record(Repr::End),
                    D::Completeness(Completeness::default()),
                    D::Record(Repr::Go),
                    D::GuestStarted,
                    D::Record(Repr::PostcopySection {
                        section: 9,
                        offset: 0,
                        len: 64,
                        last: true,
                    }),
                    D::Record(Repr::End),
                ],
                &[D::PostcopyComplete],
            ),
        ),
        (
            "fail_postcopy_link_lost",
            limits,
            with(&postcopy_ram_head, &[D::LinkFailed]),
        ),
        (
            "fail_over_limit",
            Limits {
                max_channels: 2,
                max_device_bytes: 1000,
            },
            with(&[hello(2, false), section(1, 600), section(2, 600)], &[]),
        ),
        (
            "fail_too_many_channels",
            limits,
            with(&[hello(5, false)], &[]),
        ),
        (
            "fail_go_before_ready",
            limits,
            with(&precopy_head, &[D::Record(Repr::Go)]),
        ),
        (
            "fail_incomplete",
            limits,
            with(
                &precopy_head,
                &[D::Completeness(Completeness {
                    incomplete_sections: 1,
                    ..Completeness::default()
                })],
            ),
        ),
        (
            "fail_local",
            limits,
            with(&precopy_head, &[D::LocalFailure(ErrorCode::Io)]),
        ),
        ("fail_refused_hello", limits, with(&[D::RefuseHello], &[])),
    ];
    let mut timed = |name, head: &[DstOp], tick| {
        let mut ops = with(head, &[]);
        ops.push((tick, D::Timeout));
        dst.push((name, limits, ops));
    };
    timed("fail_handshake_timeout", &[], Deadline);
    timed("fail_idle_timeout", &[hello(3, false)], ThirtySeconds);
    timed("fail_resend_timeout", &precopy_head, TenSeconds);
    let mut go_head = precopy_head.clone();
    go_head.push(D::Completeness(Completeness::default()));
    timed("fail_go_timeout", &go_head, Deadline);

    let accept = S::Return(ReturnRepr::Accept {
        max_channels: 4,
        max_device_bytes: 1 << 20,
        session: 0,
    });
    let ready = S::Return(ReturnRepr::Ready);
    let started = S::Return(ReturnRepr::Started);
    let drained =
        |ops: &[SrcOp]| -> Vec<SrcStep> { ops.iter().map(|op| (Milli, true, *op)).collect() };
    let precopy = [
        accept,
        S::Pause(Switchover::StopAndCopy),
        S::CheckDeviceBytes(4096),
        S::FinishStream,
        S::Return(ReturnRepr::Resend {
            region: 0,
            first: 2,
            count: 1,
        }),
        ready,
        started,
    ];
    let to_go = [
        accept,
        S::Pause(Switchover::PostcopyRam),
        S::FinishStream,
        ready,
    ];
    let mut src: Vec<(&str, Vec<SrcStep>)> = vec![
        ("complete_precopy", drained(&precopy)),
        (
            "complete_postcopy_ram",
            drained(&[
                accept,
                S::Pause(Switchover::PostcopyRam),
                S::FinishStream,
                ready,
                S::Return(ReturnRepr::PageRequest {
                    region: 0,
                    first: 5,
                    count: 1,
                }),
                started,
                S::Return(ReturnRepr::PageRequest {
                    region: 3,
                    first: 0,
                    count: 2,
                }),
                S::FinishPostcopy,
                ready,
            ]),
        ),
        (
            "complete_postcopy_sections",
            drained(&[
                accept,
                S::Pause(Switchover::PostcopySections),
                S::CheckDeviceBytes(100),
                S::FinishStream,
                ready,
                started,
                S::FinishPostcopy,
                ready,
            ]),
        ),
        (
            "complete_precopy_polled",
            [
                accept,
                S::Pause(Switchover::StopAndCopy),
                S::PollTransmit,
                S::FinishStream,
                S::PollTransmit,
                S::PollTransmit,
                ready,
                S::DrainTransmits,
                started,
            ]
            .iter()
            .map(|op| (Milli, false, *op))
            .collect(),
        ),
        ("fail_cancel", drained(&[accept, S::Cancel])),
        (
            "fail_peer_error",
            drained(&[
                accept,
                S::Return(ReturnRepr::Error {
                    code: ErrorCode::Checksum,
                    detail: 7,
                }),
            ]),
        ),
        (
            "fail_over_limit",
            drained(&[
                S::Return(ReturnRepr::Accept {
                    max_channels: 4,
                    max_device_bytes: 10,
                    session: 0,
                }),
                S::Pause(Switchover::StopAndCopy),
                S::CheckDeviceBytes(11),
            ]),
        ),
        (
            "fail_link_after_go",
            drained(&[to_go.as_slice(), &[S::LinkFailed]].concat()),
        ),
        (
            "fail_local_before_go",
            drained(&[accept, S::Pause(Switchover::StopAndCopy), S::LocalFailure]),
        ),
    ];
    let mut timed = |name, head: &[SrcOp], tick| {
        let mut ops = drained(head);
        ops.push((tick, false, S::Timeout));
        src.push((name, ops));
    };
    timed("fail_handshake_timeout", &[], ThirtySeconds);
    timed("fail_ready_timeout", &precopy[..4], TenSeconds);
    timed("fail_started_timeout", &to_go, Deadline);

    // The same clean runs on a clock about to wrap: every deadline saturates.
    let late = u64::MAX - SEC;
    let dst_late = dst
        .iter()
        .filter(|(name, _, _)| *name == "complete_precopy")
        .map(|(_, limits, ops)| ("complete_precopy_late_clock", *limits, ops.clone(), late));
    let src_late = src
        .iter()
        .filter(|(name, _)| *name == "complete_postcopy_ram")
        .map(|(_, ops)| ("complete_postcopy_ram_late_clock", ops.clone(), late));
    let src_late: Vec<_> = src_late.collect();
    let dst: Vec<_> = dst
        .iter()
        .map(|(name, limits, ops)| (*name, *limits, ops.clone(), 0))
        .chain(dst_late)
        .collect();
    let src = src
        .iter()
        .map(|(name, ops)| (*name, ops.clone(), 0))
        .chain(src_late);

    let mut out = Vec::new();
    for (name, limits, ops, start) in dst {
        let input = DstInput { limits, start, ops };
        let bytes = input.encode();
        assert_eq!(
            DstInput::parse(&bytes),
            input,
            "{name} does not decode back"
        );
        out.push(("destination_session", name.to_string(), bytes));
    }
    for (name, ops, start) in src {
        let input = SrcInput {
            channels: 3,
            start,
            ops,
        };
        let bytes = input.encode();
        assert_eq!(
            SrcInput::parse(&bytes),
            input,
            "{name} does not decode back"
        );
        out.push(("source_session", name.to_string(), bytes));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Protocol sessions: the `destination_session` and `source_session` targets.
//
// An input is a short header, then operations. Each operation is an op byte and its
// operands: bits 0..=3 of the op byte pick the operation, bits 4..=6 how the clock moves
// before it ([`Tick`]), and bit 7 (source only) hands out every queued transmit after it.
// Every operand has a raw encoding (what the seed encoder writes) beside shorter, biased
// ones; an input that runs out mid-operation reads zeros.

/// One millisecond in nanoseconds.
const MS: Nanos = 1_000_000;

/// How the clock moves before an operation (bits 4..=6 of its op byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tick {
    /// It stays.
    Same = 0,
    /// 1 ms on.
    Milli = 1,
    /// 1 s on.
    Second = 2,
    /// 10 s on (the ready, go, started and resend bounds).
    TenSeconds = 3,
    /// 30 s on (the handshake and idle bounds).
    ThirtySeconds = 4,
    /// 2 s back: a host may read its clock out of order.
    Back = 5,
    /// To the session's `poll_timeout`, if it has one.
    Deadline = 6,
    /// To 1 ns before the session's `poll_timeout`; without one, 2^62 ns on.
    BeforeDeadline = 7,
}

impl Tick {
    fn from_op(b: u8) -> Tick {
        match (b >> 4) & 7 {
            0 => Tick::Same,
            1 => Tick::Milli,
            2 => Tick::Second,
            3 => Tick::TenSeconds,
            4 => Tick::ThirtySeconds,
            5 => Tick::Back,
            6 => Tick::Deadline,
            _ => Tick::BeforeDeadline,
        }
    }

    fn bits(self) -> u8 {
        (self as u8) << 4
    }

    fn apply(self, now: Nanos, deadline: Option<Nanos>) -> Nanos {
        match self {
            Tick::Same => now,
            Tick::Milli => now.saturating_add(MS),
            Tick::Second => now.saturating_add(SEC),
            Tick::TenSeconds => now.saturating_add(10 * SEC),
            Tick::ThirtySeconds => now.saturating_add(30 * SEC),
            Tick::Back => now.saturating_sub(2 * SEC),
            Tick::Deadline => deadline.unwrap_or(now),
            Tick::BeforeDeadline => {
                deadline.map_or(now.saturating_add(1 << 62), |d| d.saturating_sub(1))
            }
        }
    }
}

/// The control records kind 14 of [`DstOp`] picks by one byte.
const CONTROL: [Repr; 5] = [
    Repr::StopAndCopy,
    Repr::PostcopyListen,
    Repr::PostcopyRun,
    Repr::Go,
    Repr::End,
];

/// The switchovers [`SrcOp::Pause`] picks by one byte.
const SWITCHOVERS: [Switchover; 3] = [
    Switchover::StopAndCopy,
    Switchover::PostcopyRam,
    Switchover::PostcopySections,
];

impl Gen<'_> {
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }

    fn flag(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    /// A channel count: one byte, or 0xff then a raw `u16`.
    fn channels(&mut self) -> u16 {
        match self.u8() {
            0xff => self.u16(),
            b => u16::from(b),
        }
    }

    /// A byte count or a time: `[0, u16]` small, `[1, u64]` raw, 2 the maximum, 3 zero.
    fn amount(&mut self) -> u64 {
        match self.u8() % 4 {
            0 => u64::from(self.u16()),
            1 => self.u64(),
            2 => u64::MAX,
            _ => 0,
        }
    }

    /// A section chunk length: `[0, u8]`, `[1, u32]` raw, 2 the maximum, 3 the chunk bound.
    fn wide_len(&mut self) -> u32 {
        match self.u8() % 4 {
            0 => u32::from(self.u8()),
            1 => self.u32(),
            2 => u32::MAX,
            _ => MAX_SECTION_CHUNK,
        }
    }

    fn code(&mut self) -> ErrorCode {
        ErrorCode::from_u16(u16::from(self.u8() % 8) + 1).expect("a known code")
    }

    /// Any stream record, valid or not for any layout: every variant, every field.
    fn any_repr(&mut self) -> Repr {
        let kind = self.u8() % 11;
        match kind {
            0 | 1 | 4 | 10 => {
                let region = self.region();
                let first = self.first();
                let count = self.count();
                match kind {
                    0 => {
                        let f = self.u8();
                        Repr::PageRun {
                            region,
                            first,
                            count,
                            requested: f & 1 != 0,
                            paused: f & 2 != 0,
                        }
                    }
                    1 => Repr::ZeroRun {
                        region,
                        first,
                        count,
                    },
                    4 => Repr::Discard {
                        region,
                        first,
                        count,
                    },
                    _ => Repr::DiscardMap {
                        region,
                        first,
                        count,
                    },
                }
            }
            2 | 3 => {
                let section = self.u16();
                let offset = self.first();
                let len = self.wide_len();
                let last = self.flag();
                if kind == 2 {
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
            5 => Repr::StopAndCopy,
            6 => Repr::PostcopyListen,
            7 => Repr::PostcopyRun,
            8 => Repr::Go,
            _ => Repr::End,
        }
    }

    /// Any return-path record: every variant, every field.
    fn any_return(&mut self) -> ReturnRepr {
        let kind = self.u8() % 6;
        match kind {
            0 | 1 => {
                let region = self.region();
                let first = self.first();
                let count = self.count();
                if kind == 0 {
                    ReturnRepr::PageRequest {
                        region,
                        first,
                        count,
                    }
                } else {
                    ReturnRepr::Resend {
                        region,
                        first,
                        count,
                    }
                }
            }
            2 => ReturnRepr::Ready,
            3 => {
                let code = self.code();
                ReturnRepr::Error {
                    code,
                    detail: self.u64(),
                }
            }
            4 => ReturnRepr::Started,
            _ => {
                let max_channels = self.channels();
                ReturnRepr::Accept {
                    max_channels,
                    max_device_bytes: self.amount(),
                    session: 0,
                }
            }
        }
    }

    fn completeness(&mut self) -> Completeness {
        let missing_pages = self.amount();
        let torn_pages = self.amount();
        let incomplete_sections = match self.u8() % 4 {
            0 | 1 => 0,
            2 => u32::from(self.u8()),
            _ => self.u32(),
        };
        Completeness {
            missing_pages,
            torn_pages,
            incomplete_sections,
        }
    }
}

/// Writes operands the way the `Gen` readers read them back (always the raw encodings).
#[derive(Default)]
struct Put(Vec<u8>);

impl Put {
    fn u8(&mut self, b: u8) {
        self.0.push(b);
    }

    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn channels(&mut self, c: u16) {
        match u8::try_from(c) {
            Ok(b) if b != 0xff => self.u8(b),
            _ => {
                self.u8(0xff);
                self.u16(c);
            }
        }
    }

    fn amount(&mut self, v: u64) {
        self.u8(1);
        self.u64(v);
    }

    fn run(&mut self, region: u16, first: u64, count: u32) {
        self.u8(4);
        self.u16(region);
        self.u8(3);
        self.u64(first);
        self.u8(1);
        self.u32(count);
    }

    fn code(&mut self, code: ErrorCode) {
        self.u8(code as u8 - 1);
    }

    fn repr(&mut self, r: &Repr) {
        match *r {
            Repr::PageRun {
                region,
                first,
                count,
                requested,
                paused,
            } => {
                self.u8(0);
                self.run(region, first, count);
                self.u8(u8::from(requested) | (u8::from(paused) << 1));
            }
            Repr::ZeroRun {
                region,
                first,
                count,
            } => {
                self.u8(1);
                self.run(region, first, count);
            }
            Repr::Discard {
                region,
                first,
                count,
            } => {
                self.u8(4);
                self.run(region, first, count);
            }
            Repr::DiscardMap {
                region,
                first,
                count,
            } => {
                self.u8(10);
                self.run(region, first, count);
            }
            Repr::Section {
                section,
                offset,
                len,
                last,
            }
            | Repr::PostcopySection {
                section,
                offset,
                len,
                last,
            } => {
                self.u8(if matches!(r, Repr::Section { .. }) {
                    2
                } else {
                    3
                });
                self.u16(section);
                self.u8(3);
                self.u64(offset);
                self.u8(1);
                self.u32(len);
                self.u8(u8::from(last));
            }
            Repr::StopAndCopy => self.u8(5),
            Repr::PostcopyListen => self.u8(6),
            Repr::PostcopyRun => self.u8(7),
            Repr::Go => self.u8(8),
            Repr::End => self.u8(9),
        }
    }

    fn ret(&mut self, r: &ReturnRepr) {
        match *r {
            ReturnRepr::PageRequest {
                region,
                first,
                count,
            } => {
                self.u8(0);
                self.run(region, first, count);
            }
            ReturnRepr::Resend {
                region,
                first,
                count,
            } => {
                self.u8(1);
                self.run(region, first, count);
            }
            ReturnRepr::Ready => self.u8(2),
            ReturnRepr::Error { code, detail } => {
                self.u8(3);
                self.code(code);
                self.u64(detail);
            }
            ReturnRepr::Started => self.u8(4),
            ReturnRepr::Accept {
                max_channels,
                max_device_bytes,
                ..
            } => {
                self.u8(5);
                self.channels(max_channels);
                self.amount(max_device_bytes);
            }
        }
    }

    fn completeness(&mut self, c: &Completeness) {
        self.amount(c.missing_pages);
        self.amount(c.torn_pages);
        self.u8(3);
        self.u32(c.incomplete_sections);
    }
}

/// One operation of the `destination_session` target. The kind is bits 0..=3 of its op
/// byte; the operands follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DstOp {
    /// Kind 0: `accept_hello`; operands: channels, a postcopy-ram flag byte.
    AcceptHello {
        /// Channels the hello asks for.
        channels: u16,
        /// Whether the hello asks for postcopy of RAM.
        postcopy_ram: bool,
    },
    /// Kind 1: `refuse_hello`.
    RefuseHello,
    /// Kinds 2..=6: `handle_record` with any record; kind 14: with a control record
    /// picked by one byte.
    Record(Repr),
    /// Kind 7: `note_activity`.
    NoteActivity,
    /// Kind 8: `handle_timeout`.
    Timeout,
    /// Kind 9: `handle_completeness` with any counts; kind 15: with nothing missing.
    Completeness(Completeness),
    /// Kind 10: `guest_started`.
    GuestStarted,
    /// Kind 11: `postcopy_complete`.
    PostcopyComplete,
    /// Kind 12: `link_failed`.
    LinkFailed,
    /// Kind 13: `local_failure`; operand: the code.
    LocalFailure(ErrorCode),
}

/// One `destination_session` operation with how the clock moves before it.
pub type DstStep = (Tick, DstOp);

/// A `destination_session` input: header `[max channels, max device bytes, start time]`,
/// then `(tick, operation)` pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DstInput {
    /// The limits the destination offers.
    pub limits: Limits,
    /// The clock when the session starts.
    pub start: Nanos,
    /// The operations, in order.
    pub ops: Vec<DstStep>,
}

impl DstInput {
    /// Decodes fuzz bytes (any bytes decode).
    pub fn parse(data: &[u8]) -> DstInput {
        let mut g = Gen(data);
        let max_channels = g.channels();
        let max_device_bytes = g.amount();
        let start = g.amount();
        let mut ops = Vec::new();
        while !g.is_empty() {
            let b = g.u8();
            let op = match b & 0x0f {
                0 => {
                    let channels = g.channels();
                    DstOp::AcceptHello {
                        channels,
                        postcopy_ram: g.flag(),
                    }
                }
                1 => DstOp::RefuseHello,
                2..=6 => DstOp::Record(g.any_repr()),
                7 => DstOp::NoteActivity,
                8 => DstOp::Timeout,
                9 => DstOp::Completeness(g.completeness()),
                10 => DstOp::GuestStarted,
                11 => DstOp::PostcopyComplete,
                12 => DstOp::LinkFailed,
                13 => DstOp::LocalFailure(g.code()),
                14 => DstOp::Record(CONTROL[usize::from(g.u8()) % CONTROL.len()]),
                _ => DstOp::Completeness(Completeness::default()),
            };
            ops.push((Tick::from_op(b), op));
        }
        DstInput {
            limits: Limits {
                max_channels,
                max_device_bytes,
            },
            start,
            ops,
        }
    }

    /// Encodes the input so that [`Self::parse`] gives it back.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Put::default();
        p.channels(self.limits.max_channels);
        p.amount(self.limits.max_device_bytes);
        p.amount(self.start);
        for (tick, op) in &self.ops {
            let t = tick.bits();
            match op {
                DstOp::AcceptHello {
                    channels,
                    postcopy_ram,
                } => {
                    p.u8(t);
                    p.channels(*channels);
                    p.u8(u8::from(*postcopy_ram));
                }
                DstOp::RefuseHello => p.u8(t | 1),
                DstOp::Record(r) => match CONTROL.iter().position(|c| c == r) {
                    Some(i) => {
                        p.u8(t | 14);
                        p.u8(i as u8);
                    }
                    None => {
                        p.u8(t | 2);
                        p.repr(r);
                    }
                },
                DstOp::NoteActivity => p.u8(t | 7),
                DstOp::Timeout => p.u8(t | 8),
                DstOp::Completeness(c) if *c == Completeness::default() => p.u8(t | 15),
                DstOp::Completeness(c) => {
                    p.u8(t | 9);
                    p.completeness(c);
                }
                DstOp::GuestStarted => p.u8(t | 10),
                DstOp::PostcopyComplete => p.u8(t | 11),
                DstOp::LinkFailed => p.u8(t | 12),
                DstOp::LocalFailure(code) => {
                    p.u8(t | 13);
                    p.code(*code);
                }
            }
        }
        p.0
    }
}

/// One operation of the `source_session` target. The kind is bits 0..=3 of its op byte;
/// the operands follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SrcOp {
    /// Kinds 0..=3: `handle_return` with any record; kind 4: with *ready*; kind 5: with
    /// *started*.
    Return(ReturnRepr),
    /// Kind 6: `pause`; operand: a byte picking the switchover.
    Pause(Switchover),
    /// Kind 7: `check_device_bytes`; operand: the bytes.
    CheckDeviceBytes(u64),
    /// Kind 8: `finish_stream`.
    FinishStream,
    /// Kind 9: `finish_postcopy`.
    FinishPostcopy,
    /// Kind 10: `cancel`.
    Cancel,
    /// Kind 11: `handle_timeout`.
    Timeout,
    /// Kind 12: `link_failed`.
    LinkFailed,
    /// Kind 13: `local_failure`.
    LocalFailure,
    /// Kind 14: one `poll_transmit`.
    PollTransmit,
    /// Kind 15: `poll_transmit` until it has nothing.
    DrainTransmits,
}

/// One `source_session` operation: how the clock moves before it, whether every queued
/// transmit is handed out after it, and the operation.
pub type SrcStep = (Tick, bool, SrcOp);

/// A `source_session` input: header `[channels, start time]`, then
/// `(tick, drain transmits afterwards, operation)` triples.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrcInput {
    /// Channels the source asks for.
    pub channels: u16,
    /// The clock when the session starts.
    pub start: Nanos,
    /// The operations, in order.
    pub ops: Vec<SrcStep>,
}

impl SrcInput {
    /// Decodes fuzz bytes (any bytes decode).
    pub fn parse(data: &[u8]) -> SrcInput {
        let mut g = Gen(data);
        let channels = g.channels();
        let start = g.amount();
        let mut ops = Vec::new();
        while !g.is_empty() {
            let b = g.u8();
            let op = match b & 0x0f {
                0..=3 => SrcOp::Return(g.any_return()),
                4 => SrcOp::Return(ReturnRepr::Ready),
                5 => SrcOp::Return(ReturnRepr::Started),
                6 => SrcOp::Pause(SWITCHOVERS[usize::from(g.u8()) % SWITCHOVERS.len()]),
                7 => SrcOp::CheckDeviceBytes(g.amount()),
                8 => SrcOp::FinishStream,
                9 => SrcOp::FinishPostcopy,
                10 => SrcOp::Cancel,
                11 => SrcOp::Timeout,
                12 => SrcOp::LinkFailed,
                13 => SrcOp::LocalFailure,
                14 => SrcOp::PollTransmit,
                _ => SrcOp::DrainTransmits,
            };
            ops.push((Tick::from_op(b), b & 0x80 != 0, op));
        }
        SrcInput {
            channels,
            start,
            ops,
        }
    }

    /// Encodes the input so that [`Self::parse`] gives it back.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Put::default();
        p.channels(self.channels);
        p.amount(self.start);
        for (tick, drain, op) in &self.ops {
            let t = tick.bits() | if *drain { 0x80 } else { 0 };
            match op {
                SrcOp::Return(ReturnRepr::Ready) => p.u8(t | 4),
                SrcOp::Return(ReturnRepr::Started) => p.u8(t | 5),
                SrcOp::Return(r) => {
                    p.u8(t);
                    p.ret(r);
                }
                SrcOp::Pause(how) => {
                    p.u8(t | 6);
                    let i = SWITCHOVERS.iter().position(|s| s == how).expect("listed");
                    p.u8(i as u8);
                }
                SrcOp::CheckDeviceBytes(bytes) => {
                    p.u8(t | 7);
                    p.amount(*bytes);
                }
                SrcOp::FinishStream => p.u8(t | 8),
                SrcOp::FinishPostcopy => p.u8(t | 9),
                SrcOp::Cancel => p.u8(t | 10),
                SrcOp::Timeout => p.u8(t | 11),
                SrcOp::LinkFailed => p.u8(t | 12),
                SrcOp::LocalFailure => p.u8(t | 13),
                SrcOp::PollTransmit => p.u8(t | 14),
                SrcOp::DrainTransmits => p.u8(t | 15),
            }
        }
        p.0
    }
}

/// What one run of a session target came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionRun {
    /// Operations run.
    pub ops: usize,
    /// Whether the session reported `Completed`.
    pub completed: bool,
    /// How the session failed, if it did.
    pub failure: Option<SessionError>,
    /// Where the guest belongs at the end.
    pub custody: Custody,
}

/// Where an invariant broke: the operation's index and the operation.
struct At<'a, O> {
    i: usize,
    op: &'a O,
    now: Nanos,
}

impl<O: std::fmt::Debug> std::fmt::Display for At<'_, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "op #{} {:?} at t={}", self.i, self.op, self.now)
    }
}

/// Panics with the operation and the session's state when `cond` does not hold.
macro_rules! ensure {
    ($at:expr, $s:expr, $cond:expr, $($msg:tt)+) => {
        if !$cond {
            panic!(
                "session invariant broken at {}: {}\nsession: {:?}",
                $at,
                format_args!($($msg)+),
                $s
            );
        }
    };
}

/// What the destination's host has seen so far.
#[derive(Default)]
struct DstSeen {
    hello_ok: bool,
    /// The accepted hello asked for postcopy of RAM.
    postcopy_ram: bool,
    /// Stop-and-copy and postcopy-listen markers accepted.
    stop_and_copy: bool,
    listen: bool,
    accept_sent: bool,
    end_accepted: bool,
    ready_sent: bool,
    go_accepted: bool,
    started_ok: bool,
    started_sent: bool,
    precopy_started: bool,
    error_sent: bool,
    completed: bool,
    failed: bool,
    section_bytes: u64,
}

/// Fuzz target `destination_session`: runs a [`DstInput`] against a
/// [`DestinationSession`] (default timeouts), handing out every transmit and event after
/// each operation the way a host does, and checks the protocol's promises on every step.
pub fn destination_session(data: &[u8]) -> SessionRun {
    run_destination(&DstInput::parse(data))
}

/// Runs a decoded `destination_session` input; see [`destination_session`].
pub fn run_destination(input: &DstInput) -> SessionRun {
    let limits = input.limits;
    let mut now = input.start;
    let mut s = DestinationSession::new(now, Timeouts::DEFAULT, limits);
    assert_eq!(s.custody(), Custody::Released);
    assert_eq!(
        s.poll_timeout(),
        Some(now.saturating_add(Timeouts::DEFAULT.handshake))
    );
    let mut seen = DstSeen::default();
    for (i, (tick, op)) in input.ops.iter().enumerate() {
        now = tick.apply(now, s.poll_timeout());
        let at = At { i, op, now };
        let ended_before = s.is_ended();
        let phase_before = s.phase_name();
        let deadline = s.poll_timeout();
        let result = match *op {
            DstOp::AcceptHello {
                channels,
                postcopy_ram,
            } => {
                let r = s.accept_hello(now, channels, postcopy_ram);
                if r.is_ok() {
                    ensure!(
                        at,
                        s,
                        phase_before == "awaiting hello",
                        "a hello accepted in {phase_before}"
                    );
                    ensure!(
                        at,
                        s,
                        (1..=limits.max_channels).contains(&channels),
                        "a hello for {channels} channels accepted"
                    );
                    seen.hello_ok = true;
                    seen.postcopy_ram = postcopy_ram;
                }
                r
            }
            DstOp::RefuseHello => {
                let e = s.refuse_hello(now);
                Err(e)
            }
            DstOp::Record(r) => {
                let res = s.handle_record(now, &r);
                if res.is_ok() {
                    ensure!(at, s, !ended_before, "an ended session accepted {r:?}");
                    match r {
                        Repr::Section { len, .. } | Repr::PostcopySection { len, .. } => {
                            seen.section_bytes = seen.section_bytes.saturating_add(u64::from(len));
                        }
                        Repr::StopAndCopy => seen.stop_and_copy = true,
                        Repr::PostcopyListen => seen.listen = true,
                        Repr::DiscardMap { .. } => ensure!(
                            at,
                            s,
                            seen.postcopy_ram
                                && seen.listen
                                && !seen.stop_and_copy
                                && !seen.end_accepted,
                            "a discard map accepted outside a postcopy-RAM switchover"
                        ),
                        Repr::End => seen.end_accepted = true,
                        Repr::Go => {
                            ensure!(at, s, seen.ready_sent, "go accepted before ready was sent");
                            ensure!(at, s, !seen.go_accepted, "go accepted twice");
                            seen.go_accepted = true;
                        }
                        _ => {}
                    }
                }
                res
            }
            DstOp::NoteActivity => {
                s.note_activity(now);
                ensure!(
                    at,
                    s,
                    s.phase_name() == phase_before,
                    "activity moved the session"
                );
                Ok(())
            }
            DstOp::Timeout => {
                s.handle_timeout(now);
                match deadline {
                    Some(d) if now >= d => {
                        ensure!(
                            at,
                            s,
                            matches!(
                                s.failure(),
                                Some(SessionError {
                                    failure: Failure::Timeout { .. },
                                    ..
                                })
                            ),
                            "the deadline {d} passed but the session did not time out"
                        );
                    }
                    _ => ensure!(
                        at,
                        s,
                        s.phase_name() == phase_before,
                        "a timeout before the deadline {deadline:?} moved the session"
                    ),
                }
                Ok(())
            }
            DstOp::Completeness(c) => {
                let r = s.handle_completeness(now, c);
                if r.is_ok() {
                    ensure!(
                        at,
                        s,
                        phase_before == "verifying",
                        "completeness taken in {phase_before}"
                    );
                    ensure!(
                        at,
                        s,
                        c.incomplete_sections == 0,
                        "incomplete sections passed"
                    );
                    if s.mode() != Mode::Ram {
                        ensure!(at, s, c.missing_pages == 0, "missing pages passed");
                        if c.torn_pages > 0 {
                            ensure!(at, s, s.phase_name() == "verifying", "torn pages passed");
                        }
                    }
                }
                r
            }
            DstOp::GuestStarted => {
                let r = s.guest_started(now);
                if r.is_ok() {
                    ensure!(
                        at,
                        s,
                        phase_before == "starting" && seen.go_accepted && seen.ready_sent,
                        "the guest started without go"
                    );
                    seen.started_ok = true;
                    if s.mode() == Mode::Precopy {
                        seen.precopy_started = true;
                    }
                }
                r
            }
            DstOp::PostcopyComplete => {
                let r = s.postcopy_complete(now);
                if r.is_ok() {
                    ensure!(
                        at,
                        s,
                        seen.started_ok && s.mode() != Mode::Precopy,
                        "postcopy completed without a postcopy"
                    );
                }
                r
            }
            DstOp::LinkFailed => {
                s.link_failed(now);
                if !ended_before {
                    ensure!(
                        at,
                        s,
                        s.failure().map(|e| e.failure) == Some(Failure::LinkLost),
                        "a lost link did not fail the session"
                    );
                }
                Ok(())
            }
            DstOp::LocalFailure(code) => {
                s.local_failure(now, code);
                if !ended_before {
                    ensure!(
                        at,
                        s,
                        s.failure().map(|e| e.failure) == Some(Failure::Local),
                        "a local failure did not fail the session"
                    );
                }
                Ok(())
            }
        };
        if let Err(e) = result {
            // A completed session refuses stray inputs without failing.
            let refused_when_done =
                ended_before && s.failure().is_none() && e.custody == Custody::Runs;
            ensure!(
                at,
                s,
                s.failure() == Some(e) || refused_when_done,
                "returned {e:?}, but the session's failure is {:?}",
                s.failure()
            );
        }
        while let Some(t) = s.poll_transmit() {
            ensure!(at, s, !seen.error_sent, "{t:?} sent after the error");
            match t {
                DestinationControl::Accept(l, _) => {
                    ensure!(at, s, seen.hello_ok && !seen.accept_sent, "accept unasked");
                    ensure!(at, s, l == limits, "accept states {l:?}, not {limits:?}");
                    seen.accept_sent = true;
                }
                DestinationControl::Ready => {
                    ensure!(at, s, seen.end_accepted, "ready before an end was accepted");
                    ensure!(
                        at,
                        s,
                        !seen.go_accepted || seen.started_ok,
                        "ready between go and started"
                    );
                    seen.ready_sent = true;
                }
                DestinationControl::Started => {
                    ensure!(
                        at,
                        s,
                        seen.go_accepted && seen.started_ok,
                        "started sent before go was accepted and the guest started"
                    );
                    ensure!(at, s, !seen.started_sent, "started sent twice");
                    seen.started_sent = true;
                }
                DestinationControl::Error(_) => {
                    ensure!(at, s, s.failure().is_some(), "an error sent unfailed");
                    seen.error_sent = true;
                }
            }
        }
        while let Some(e) = s.poll_event() {
            match e {
                DestinationEvent::StartGuest => ensure!(
                    at,
                    s,
                    seen.ready_sent && seen.go_accepted,
                    "start guest before ready was sent"
                ),
                DestinationEvent::CheckComplete => {
                    ensure!(at, s, seen.end_accepted, "check complete before the end");
                }
                DestinationEvent::FinishPostcopy => {
                    ensure!(at, s, seen.started_ok, "finish postcopy before the start");
                }
                DestinationEvent::Completed => {
                    ensure!(at, s, seen.started_ok, "completed, but no guest started");
                    ensure!(at, s, !seen.completed, "completed twice");
                    seen.completed = true;
                }
                DestinationEvent::Failed(err) => {
                    ensure!(at, s, !seen.failed, "failed twice");
                    ensure!(at, s, s.failure() == Some(err), "failed with {err:?}");
                    seen.failed = true;
                }
            }
        }
        // Once ended, always ended.
        if ended_before {
            ensure!(at, s, s.is_ended(), "an ended session came back");
        }
        ensure!(
            at,
            s,
            s.go_received() == seen.go_accepted,
            "go_received() is {} though go was{} accepted",
            s.go_received(),
            if seen.go_accepted { "" } else { " not" }
        );
        if s.go_received() {
            ensure!(at, s, seen.ready_sent, "go received before ready was sent");
        }
        if seen.precopy_started {
            ensure!(
                at,
                s,
                s.custody() == Custody::Runs,
                "the guest started in precopy, now {:?}",
                s.custody()
            );
        }
        if !seen.go_accepted {
            ensure!(
                at,
                s,
                s.custody() == Custody::Released,
                "the destination claims a guest it never got go for"
            );
        }
        ensure!(
            at,
            s,
            seen.section_bytes <= limits.max_device_bytes,
            "{} section bytes accepted over the limit {}",
            seen.section_bytes,
            limits.max_device_bytes
        );
        if !s.is_ended() && s.phase_name() != "starting" {
            ensure!(at, s, s.poll_timeout().is_some(), "a wait without a bound");
        }
        if s.is_ended() {
            ensure!(at, s, s.poll_timeout().is_none(), "an ended session waits");
        }
        ensure!(
            at,
            s,
            seen.failed == s.failure().is_some(),
            "the failed event and failure() disagree"
        );
    }
    SessionRun {
        ops: input.ops.len(),
        completed: seen.completed,
        failure: s.failure(),
        custody: s.custody(),
    }
}

/// What the source's host has seen so far.
#[derive(Default)]
struct SrcSeen {
    accepted: bool,
    end_out: bool,
    ready_after_end: bool,
    go_out: bool,
    started_after_go: bool,
    completed: bool,
    failed: bool,
    /// Control records handed out so far.
    sent: usize,
}

/// Every control record the source hands out in a whole migration, in order.
fn control_sequence(how: Switchover) -> &'static [SourceControl] {
    use SourceControl::{End, Go, PostcopyListen, StopAndCopy};
    match how {
        Switchover::StopAndCopy => &[StopAndCopy, End, Go],
        Switchover::PostcopyRam => &[PostcopyListen, End, Go, End],
        Switchover::PostcopySections => &[StopAndCopy, PostcopyListen, End, Go, End],
    }
}

/// Hands out one transmit, checking it; false when there was none.
fn source_transmit(
    s: &mut SourceSession,
    seen: &mut SrcSeen,
    at: &At<'_, SrcOp>,
    now: Nanos,
) -> bool {
    let ended = s.is_ended();
    let phase = s.phase_name();
    let Some(c) = s.poll_transmit(now) else {
        return false;
    };
    ensure!(
        at,
        s,
        !ended,
        "{c:?} handed out after the session ended ({phase})"
    );
    let order = control_sequence(s.switchover());
    ensure!(
        at,
        s,
        order.get(seen.sent) == Some(&c),
        "{c:?} handed out after {:?}",
        &order[..seen.sent.min(order.len())]
    );
    seen.sent += 1;
    match c {
        SourceControl::Go => {
            ensure!(
                at,
                s,
                seen.ready_after_end,
                "go handed out before ready was accepted after an end"
            );
            ensure!(at, s, !seen.go_out, "go handed out twice");
            seen.go_out = true;
        }
        SourceControl::End => seen.end_out = true,
        SourceControl::StopAndCopy | SourceControl::PostcopyListen => {}
    }
    true
}

/// Fuzz target `source_session`: runs a [`SrcInput`] against a [`SourceSession`]
/// (default timeouts), handing out every event after each operation and transmits when
/// the input says, and checks the protocol's promises on every step.
pub fn source_session(data: &[u8]) -> SessionRun {
    run_source(&SrcInput::parse(data))
}

/// Runs a decoded `source_session` input; see [`source_session`].
pub fn run_source(input: &SrcInput) -> SessionRun {
    let mut now = input.start;
    let mut s = SourceSession::new(now, Timeouts::DEFAULT, input.channels);
    assert_eq!(s.custody(), Custody::Runs);
    assert_eq!(
        s.poll_timeout(),
        Some(now.saturating_add(Timeouts::DEFAULT.handshake))
    );
    let mut seen = SrcSeen::default();
    for (i, (tick, drain, op)) in input.ops.iter().enumerate() {
        now = tick.apply(now, s.poll_timeout());
        let at = At { i, op, now };
        let ended_before = s.is_ended();
        let phase_before = s.phase_name();
        let deadline = s.poll_timeout();
        let result: Result<(), SessionError> = match *op {
            SrcOp::Return(r) => match s.handle_return(now, &r) {
                Ok(action) => {
                    ensure!(at, s, !ended_before, "an ended session accepted {r:?}");
                    let want = match r {
                        ReturnRepr::Accept { max_channels, .. } => {
                            ensure!(
                                at,
                                s,
                                phase_before == "handshake" && input.channels <= max_channels,
                                "accept taken"
                            );
                            seen.accepted = true;
                            SourceAction::None
                        }
                        ReturnRepr::Ready => {
                            ensure!(at, s, seen.end_out, "ready accepted before an end");
                            seen.ready_after_end = true;
                            SourceAction::None
                        }
                        ReturnRepr::Started => {
                            ensure!(at, s, seen.go_out, "started accepted before go");
                            seen.started_after_go = true;
                            SourceAction::None
                        }
                        ReturnRepr::Resend {
                            region,
                            first,
                            count,
                        } => SourceAction::Resend {
                            region,
                            first,
                            count,
                        },
                        ReturnRepr::PageRequest {
                            region,
                            first,
                            count,
                        } => {
                            ensure!(
                                at,
                                s,
                                s.switchover() == Switchover::PostcopyRam && seen.go_out,
                                "a page request served outside postcopy"
                            );
                            SourceAction::PageRequest {
                                region,
                                first,
                                count,
                            }
                        }
                        ReturnRepr::Error { .. } => {
                            ensure!(at, s, false, "a peer error accepted");
                            SourceAction::None
                        }
                    };
                    ensure!(at, s, action == want, "{action:?} for {r:?}");
                    Ok(())
                }
                Err(e) => Err(e),
            },
            SrcOp::Pause(how) => {
                let r = s.pause(now, how);
                if r.is_ok() {
                    ensure!(at, s, phase_before == "precopy", "paused in {phase_before}");
                    ensure!(at, s, s.switchover() == how, "switchover not recorded");
                }
                r
            }
            SrcOp::CheckDeviceBytes(bytes) => {
                let r = s.check_device_bytes(bytes);
                if r.is_ok() {
                    ensure!(
                        at,
                        s,
                        bytes <= s.limits().max_device_bytes,
                        "{bytes} device bytes passed"
                    );
                }
                r
            }
            SrcOp::FinishStream => {
                let r = s.finish_stream(now);
                if r.is_ok() {
                    ensure!(
                        at,
                        s,
                        phase_before == "stop-and-copy",
                        "stream finished in {phase_before}"
                    );
                }
                r
            }
            SrcOp::FinishPostcopy => {
                let r = s.finish_postcopy(now);
                if r.is_ok() {
                    ensure!(
                        at,
                        s,
                        phase_before == "postcopy",
                        "postcopy finished in {phase_before}"
                    );
                }
                r
            }
            SrcOp::Cancel => {
                let r = s.cancel(now);
                match r {
                    Ok(()) => {
                        ensure!(
                            at,
                            s,
                            !ended_before && !seen.go_out,
                            "cancelled after go or the end"
                        );
                        ensure!(
                            at,
                            s,
                            s.failure().map(|e| e.failure) == Some(Failure::Cancelled),
                            "cancel did not end the session"
                        );
                    }
                    Err(e) => {
                        ensure!(
                            at,
                            s,
                            ended_before || seen.go_out,
                            "cancel refused before go"
                        );
                        ensure!(
                            at,
                            s,
                            s.phase_name() == phase_before,
                            "a refused cancel moved the session"
                        );
                        ensure!(at, s, e.custody == s.custody(), "cancel misreports custody");
                    }
                }
                Ok(())
            }
            SrcOp::Timeout => {
                s.handle_timeout(now);
                match deadline {
                    Some(d) if now >= d => ensure!(
                        at,
                        s,
                        matches!(
                            s.failure(),
                            Some(SessionError {
                                failure: Failure::Timeout { .. },
                                ..
                            })
                        ),
                        "the deadline {d} passed but the session did not time out"
                    ),
                    _ => ensure!(
                        at,
                        s,
                        s.phase_name() == phase_before,
                        "a timeout before the deadline {deadline:?} moved the session"
                    ),
                }
                Ok(())
            }
            SrcOp::LinkFailed => {
                s.link_failed(now);
                if !ended_before {
                    ensure!(
                        at,
                        s,
                        s.failure().map(|e| e.failure) == Some(Failure::LinkLost),
                        "a lost link did not fail the session"
                    );
                }
                Ok(())
            }
            SrcOp::LocalFailure => {
                s.local_failure(now);
                if !ended_before {
                    ensure!(
                        at,
                        s,
                        s.failure().map(|e| e.failure) == Some(Failure::Local),
                        "a local failure did not fail the session"
                    );
                }
                Ok(())
            }
            SrcOp::PollTransmit => {
                source_transmit(&mut s, &mut seen, &at, now);
                Ok(())
            }
            SrcOp::DrainTransmits => {
                while source_transmit(&mut s, &mut seen, &at, now) {}
                Ok(())
            }
        };
        if let Err(e) = result {
            ensure!(
                at,
                s,
                s.is_ended(),
                "{e:?} returned, but the session goes on"
            );
            ensure!(
                at,
                s,
                e.custody == s.custody(),
                "{e:?} returned, but custody is {:?}",
                s.custody()
            );
        }
        if *drain {
            while source_transmit(&mut s, &mut seen, &at, now) {}
        }
        while let Some(e) = s.poll_event() {
            match e {
                SourceEvent::Accepted(l) => {
                    ensure!(at, s, seen.accepted && l == s.limits(), "accepted {l:?}");
                }
                SourceEvent::Ready => ensure!(at, s, seen.end_out, "ready before the end"),
                SourceEvent::Started => ensure!(at, s, seen.go_out, "started before go"),
                SourceEvent::Completed => {
                    ensure!(
                        at,
                        s,
                        seen.started_after_go,
                        "completed without started accepted after go"
                    );
                    ensure!(at, s, !seen.completed, "completed twice");
                    seen.completed = true;
                }
                SourceEvent::Failed(err) => {
                    ensure!(at, s, !seen.failed, "failed twice");
                    ensure!(at, s, s.failure() == Some(err), "failed with {err:?}");
                    seen.failed = true;
                }
            }
        }
        if ended_before {
            ensure!(at, s, s.is_ended(), "an ended session came back");
        }
        ensure!(
            at,
            s,
            s.go_sent() == seen.go_out,
            "go_sent() is {} though go was{} handed out",
            s.go_sent(),
            if seen.go_out { "" } else { " not" }
        );
        if seen.go_out {
            // The source never resumes on its own once go may have left.
            ensure!(
                at,
                s,
                s.custody() != Custody::Runs,
                "the source runs the guest after go"
            );
        }
        if s.custody() == Custody::Released {
            ensure!(
                at,
                s,
                seen.completed,
                "the source released a guest it did not hand over"
            );
        }
        if let Some(e) = s.failure() {
            let want = if seen.go_out {
                Custody::Holds
            } else {
                Custody::Runs
            };
            ensure!(
                at,
                s,
                e.custody == want && s.custody() == want,
                "failed {} go with custody {:?}",
                if seen.go_out { "after" } else { "before" },
                e.custody
            );
        }
        if matches!(
            s.phase_name(),
            "handshake" | "awaiting ready" | "awaiting started"
        ) {
            ensure!(at, s, s.poll_timeout().is_some(), "a wait without a bound");
        }
        if s.is_ended() {
            ensure!(at, s, s.poll_timeout().is_none(), "an ended session waits");
        }
        ensure!(
            at,
            s,
            seen.failed == s.failure().is_some(),
            "the failed event and failure() disagree"
        );
    }
    // The host hands out what is left.
    let at = At {
        i: input.ops.len(),
        op: &SrcOp::DrainTransmits,
        now,
    };
    while source_transmit(&mut s, &mut seen, &at, now) {}
    SessionRun {
        ops: input.ops.len(),
        completed: seen.completed,
        failure: s.failure(),
        custody: s.custody(),
    }
}
