//! Harness functions: input format, session, and the invariants checked on every input.
//!
//! Inputs start with a configuration byte (bit 0 postcopy-ram, bit 1 postcopy-only
//! sections, bit 2 payload checksums) and, for the decoders, a chunking seed byte
//! (bit 7: receive page payloads "in place" through `accept_in_place`). The session
//! layout is fixed: page size [`PAGE`], regions 0 (64 pages), 3 (8 pages) and
//! 65535 (1 page).
#![allow(clippy::panic, clippy::unwrap_used)]

use ferry_core::wire::{
    Capabilities, DecodeError, Dest, ErrorCode, Event, Hello, Layout, Negotiated, Record, Region,
    Repr, ReturnDecoder, ReturnRecord, ReturnRepr, Step, StreamDecoder, StreamEncoder, HEADER_LEN,
    MAX_RUN_PAGES, MAX_SECTION_CHUNK,
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

/// A tiny table-driven CRC32 so the harness does not share code with the decoder it checks.
mod crc32fast_lite {
    #[derive(Clone, Copy)]
    pub struct Crc(u32);

    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
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
            t[i] = c;
            i += 1;
        }
        t
    };

    impl Crc {
        pub fn new() -> Self {
            Crc(!0)
        }

        pub fn update(&mut self, bytes: &[u8]) {
            for &b in bytes {
                self.0 = (self.0 >> 8) ^ TABLE[((self.0 ^ u32::from(b)) & 0xff) as usize];
            }
        }

        pub fn finish(self) -> u32 {
            !self.0
        }
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
    chunks: &mut dyn FnMut() -> usize,
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
    chunks: &mut dyn FnMut() -> usize,
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

    fn repr(&mut self) -> Repr {
        match self.u8() % 10 {
            0 => Repr::PageRun {
                region: self.region(),
                first: self.first(),
                count: self.count(),
                requested: self.u8() & 1 != 0,
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
            _ => Repr::End,
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
                code: ErrorCode::from_u16(u16::from(self.u8() % 7) + 1).expect("a known code"),
                detail: self.u64(),
            },
            4 => ReturnRepr::Started,
            _ => ReturnRepr::Accept {
                max_channels: u16::from(self.u8()),
                max_device_bytes: self.u64(),
            },
        }
    }
}

fn pattern(seq: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (seq as u8) ^ ((i >> 8) as u8))
        .collect()
}

/// Fuzz target `roundtrip`: `[cfg, seed, generator bytes...]`. Builds records from the
/// bytes, encodes them, decodes the stream in pieces, and checks that every valid record
/// comes back identical (torn exactly when a payload byte was flipped), and that an
/// invalid record is refused with the cause `Repr::check` gives, at its offset.
/// Return-path records are checked the same way.
pub fn roundtrip(data: &[u8]) -> Option<()> {
    let [cfg, seed, rest @ ..] = data else {
        return None;
    };
    let neg = session(*cfg);
    let mut g = Gen(rest);
    let mut enc = StreamEncoder::new(&neg);
    let mut stream = Vec::new();
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
                let mut payload = pattern(seq, len);
                let s = enc
                    .encode(&repr, &payload, &mut head)
                    .expect("a valid record encodes");
                assert_eq!(s, seq);
                let flip = neg.caps.payload_checksums && len > 0 && g.u8() % 4 == 0;
                if flip {
                    let i = usize::from(g.u8()) % len;
                    payload[i] ^= 1 << (g.u8() % 8);
                }
                stream.extend_from_slice(&head);
                stream.extend_from_slice(&payload);
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
                stream.extend_from_slice(&head);
                break;
            }
        }
    }
    if !ended && refused.is_none() {
        let mut head = [0u8; HEADER_LEN];
        let seq = enc.encode(&Repr::End, &[], &mut head).expect("end encodes");
        stream.extend_from_slice(&head);
        expect.push((Repr::End, seq, false));
    }
    // Large payloads (a 1 MiB section chunk) one byte at a time would starve the fuzzer:
    // split those in pieces of up to 4 KiB.
    let seed = if stream.len() > 1 << 16 {
        (seed & 0x80) | 4
    } else {
        *seed
    };
    let mut pieces = chunker(seed);
    let out = decode_stream(&neg, &stream, &mut pieces, seed & 0x80 != 0);
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
        },
        Repr::PageRun {
            region: 3,
            first: 7,
            count: 1,
            requested: true,
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
    out.push((
        "roundtrip",
        "mixed".to_string(),
        vec![
            7, 0x04, 0, 0, 0, 4, 0, 2, 0, 2, 1, 0, 0, 0, 1, 0, 5, 6, 7, 3, 1, 0, 2, 9, 0, 0, 8, 0,
            0, 1, 0, 3, 0, 1, 9, 2, 3, 1, 4,
        ],
    ));
    out
}
