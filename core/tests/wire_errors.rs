//! One test per refusal: every `Cause`, `HandshakeError`, `LayoutError`,
//! `LayoutMismatch` and `EmitError` path, each checked for the record and stream offset
//! it names.
#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use ferry_core::wire::{
    Capabilities, Cause, DecodeError, EmitError, Field, HandshakeError, Header, Hello, Layout,
    LayoutError, LayoutMismatch, Negotiated, Region, Repr, ReturnDecoder, ReturnRepr,
    StreamDecoder, StreamEncoder, HEADER_LEN, MAX_DISCARD_MAP_PAGES, MAX_HELLO_LEN, MAX_REGIONS,
    MAX_RUN_PAGES, MAX_SECTION_CHUNK,
};

const PAGE: u32 = 4096;
/// Pages in region 1.
const R1_PAGES: u64 = 16;

fn layout() -> Layout {
    Layout::new(
        PAGE,
        &[
            Region {
                id: 0,
                gpa: 0,
                size: 256 * 4096,
            },
            Region {
                id: 1,
                gpa: 1 << 32,
                size: R1_PAGES * 4096,
            },
        ],
    )
    .unwrap()
}

fn caps(checksums: bool, postcopy: bool) -> Capabilities {
    Capabilities {
        postcopy_ram: postcopy,
        postcopy_only_sections: postcopy,
        payload_checksums: checksums,
        channels: 1,
    }
}

fn neg() -> Negotiated {
    Negotiated::new(layout(), caps(true, true))
}

/// A header with a correct header CRC and arbitrary fields.
#[allow(clippy::too_many_arguments)]
fn raw(
    kind: u8,
    flags: u8,
    id: u16,
    count: u32,
    first: u64,
    payload_len: u32,
    payload_crc: u32,
    seq: u32,
) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    let mut h = Header::new_checked(&mut b[..]).unwrap();
    h.set_kind(kind);
    h.set_flags(flags);
    h.set_id(id);
    h.set_count(count);
    h.set_first(first);
    h.set_payload_len(payload_len);
    h.set_payload_crc(payload_crc);
    h.set_seq(seq);
    h.fill_header_crc();
    b
}

/// Feeds a valid stop-and-copy record (seq 0) then `bad` one byte at a time; returns
/// the error, which must name offset 32.
fn refused_with(neg: Negotiated, bad: &[u8]) -> DecodeError {
    let mut stream = raw(0x06, 0, 0, 0, 0, 0, 0, 0).to_vec();
    stream.extend_from_slice(bad);
    let mut dec = StreamDecoder::new(neg);
    for i in 0..stream.len() {
        let mut input = &stream[i..i + 1];
        loop {
            match dec.step(input) {
                Ok(s) => {
                    input = &input[s.consumed..];
                    if s.consumed == 0 && s.event.is_none() {
                        break;
                    }
                }
                Err(e) => {
                    assert_eq!(e.offset, 32, "the error names the record's offset");
                    assert_eq!(dec.step(&[0]).unwrap_err().cause, Cause::Poisoned);
                    return e;
                }
            }
        }
    }
    panic!("the record was accepted");
}

fn refused(bad: &[u8]) -> DecodeError {
    refused_with(neg(), bad)
}

fn cause(bad: &[u8]) -> Cause {
    refused(bad).cause
}

#[test]
fn header_checksum() {
    let mut b = raw(0x09, 0, 0, 0, 0, 0, 0, 1);
    b[27] ^= 0x80; // seq corrupted in flight
    let e = refused(&b);
    assert!(matches!(e.cause, Cause::HeaderChecksum { .. }));
    assert_eq!(e.kind, 0x09);
}

#[test]
fn header_checksum_of_crc_field() {
    let mut b = raw(0x09, 0, 0, 0, 0, 0, 0, 1);
    b[31] ^= 1;
    assert!(matches!(cause(&b), Cause::HeaderChecksum { .. }));
}

#[test]
fn unknown_kind() {
    for kind in [0x00, 0x0c, 0x20, 0x81, 0xff] {
        let e = refused(&raw(kind, 0, 0, 0, 0, 0, 0, 1));
        assert_eq!((e.cause, e.kind, e.seq), (Cause::UnknownKind, kind, 1));
    }
}

#[test]
fn unknown_flags() {
    assert_eq!(
        cause(&raw(0x01, 0x04, 0, 1, 0, 4096, 0, 1)),
        Cause::UnknownFlags { flags: 0x04 }
    );
    assert_eq!(
        cause(&raw(0x09, 0x01, 0, 0, 0, 0, 0, 1)),
        Cause::UnknownFlags { flags: 0x01 }
    );
    assert_eq!(
        cause(&raw(0x02, 0x80, 0, 1, 0, 0, 0, 1)),
        Cause::UnknownFlags { flags: 0x80 }
    );
}

#[test]
fn not_negotiated() {
    let plain = Negotiated::new(layout(), caps(true, false));
    for kind in [0x04, 0x07, 0x08, 0x0b] {
        let e = refused_with(plain, &raw(kind, 0, 0, 0, 0, 0, 0, 1));
        assert_eq!(e.cause, Cause::NotNegotiated, "kind {kind:#x}");
    }
}

#[test]
fn nonzero_unused_fields() {
    assert_eq!(
        cause(&raw(0x0a, 0, 1, 0, 0, 0, 0, 1)),
        Cause::NonZero { field: Field::Id }
    );
    assert_eq!(
        cause(&raw(0x06, 0, 0, 1, 0, 0, 0, 1)),
        Cause::NonZero {
            field: Field::Count
        }
    );
    assert_eq!(
        cause(&raw(0x09, 0, 0, 0, 1, 0, 0, 1)),
        Cause::NonZero {
            field: Field::First
        }
    );
    assert_eq!(
        cause(&raw(0x03, 0, 0, 1, 0, 0, 0, 1)),
        Cause::NonZero {
            field: Field::Count
        }
    );
    assert_eq!(
        cause(&raw(0x02, 0, 0, 1, 0, 0, 0xdead, 1)),
        Cause::NonZero {
            field: Field::PayloadCrc
        }
    );
}

#[test]
fn unknown_region() {
    assert_eq!(
        cause(&raw(0x01, 0, 2, 1, 0, 4096, 0, 1)),
        Cause::UnknownRegion { region: 2 }
    );
    assert_eq!(
        cause(&raw(0x05, 0, 0xffff, 1, 0, 0, 0, 1)),
        Cause::UnknownRegion { region: 0xffff }
    );
}

#[test]
fn zero_count() {
    assert_eq!(cause(&raw(0x01, 0, 0, 0, 0, 0, 0, 1)), Cause::ZeroCount);
    assert_eq!(cause(&raw(0x02, 0, 0, 0, 0, 0, 0, 1)), Cause::ZeroCount);
    assert_eq!(cause(&raw(0x05, 0, 0, 0, 0, 0, 0, 1)), Cause::ZeroCount);
    assert_eq!(cause(&raw(0x0b, 0, 0, 0, 0, 0, 0, 1)), Cause::ZeroCount);
}

#[test]
fn misaligned_discard_map() {
    let e = refused(&raw(0x0b, 0, 0, 64, 32, 8, 0, 1));
    assert_eq!((e.cause, e.kind), (Cause::Misaligned { first: 32 }, 0x0b));
    let msg = e.to_string();
    assert!(msg.contains("not a multiple of 64"), "{msg}");
}

#[test]
fn count_too_large() {
    let n = MAX_RUN_PAGES + 1;
    assert_eq!(
        cause(&raw(0x01, 0, 0, n, 0, n * PAGE, 0, 1)),
        Cause::CountTooLarge {
            count: n,
            max: MAX_RUN_PAGES
        }
    );
    let n = MAX_DISCARD_MAP_PAGES + 1;
    assert_eq!(
        cause(&raw(0x0b, 0, 0, n, 0, 0, 0, 1)),
        Cause::CountTooLarge {
            count: n,
            max: MAX_DISCARD_MAP_PAGES
        }
    );
}

#[test]
fn out_of_region() {
    // One page past the end.
    assert_eq!(
        cause(&raw(0x01, 0, 1, 2, R1_PAGES - 1, 2 * PAGE, 0, 1)),
        Cause::OutOfRegion {
            first: R1_PAGES - 1,
            count: 2,
            region_pages: R1_PAGES
        }
    );
    // first + count overflows u64.
    assert_eq!(
        cause(&raw(0x02, 0, 1, 2, u64::MAX, 0, 0, 1)),
        Cause::OutOfRegion {
            first: u64::MAX,
            count: 2,
            region_pages: R1_PAGES
        }
    );
    // A discard starting at the end.
    assert!(matches!(
        cause(&raw(0x05, 0, 1, 1, R1_PAGES, 0, 0, 1)),
        Cause::OutOfRegion { .. }
    ));
}

#[test]
fn payload_length() {
    assert_eq!(
        cause(&raw(0x01, 0, 0, 2, 0, 4096, 0, 1)),
        Cause::PayloadLength {
            expected: 8192,
            received: 4096
        }
    );
    assert_eq!(
        cause(&raw(0x02, 0, 0, 2, 0, 1, 0, 1)),
        Cause::PayloadLength {
            expected: 0,
            received: 1
        }
    );
    assert_eq!(
        cause(&raw(0x0a, 0, 0, 0, 0, 32, 0, 1)),
        Cause::PayloadLength {
            expected: 0,
            received: 32
        }
    );
}

#[test]
fn payload_too_large() {
    let len = MAX_SECTION_CHUNK + 1;
    assert_eq!(
        cause(&raw(0x03, 0, 0, 0, 0, len, 0, 1)),
        Cause::PayloadTooLarge {
            len,
            max: MAX_SECTION_CHUNK
        }
    );
}

#[test]
fn section_offset_overflow() {
    assert_eq!(
        cause(&raw(0x04, 0, 0, 0, u64::MAX - 2, 4, 0, 1)),
        Cause::SectionOffsetOverflow {
            offset: u64::MAX - 2,
            len: 4
        }
    );
}

#[test]
fn sequence_gap_and_replay() {
    assert_eq!(
        cause(&raw(0x09, 0, 0, 0, 0, 0, 0, 2)),
        Cause::Sequence {
            expected: 1,
            received: 2
        }
    );
    assert_eq!(
        cause(&raw(0x09, 0, 0, 0, 0, 0, 0, 0)),
        Cause::Sequence {
            expected: 1,
            received: 0
        }
    );
}

#[test]
fn bytes_after_end() {
    let mut bad = raw(0x0a, 0, 0, 0, 0, 0, 0, 1).to_vec();
    bad.push(0x01);
    let mut stream = raw(0x06, 0, 0, 0, 0, 0, 0, 0).to_vec();
    stream.extend_from_slice(&bad);
    let mut dec = StreamDecoder::new(neg());
    let mut input = &stream[..];
    let err = loop {
        match dec.step(input) {
            Ok(s) => input = &input[s.consumed..],
            Err(e) => break e,
        }
    };
    assert_eq!(err.cause, Cause::AfterEnd);
    assert_eq!(err.offset, 64);
    assert_eq!(err.kind, 0x01);
    assert_eq!(
        err.seq, 2,
        "the record that should not be there would be seq 2"
    );
}

fn feed_all(dec: &mut StreamDecoder, mut input: &[u8]) {
    loop {
        let s = dec.step(input).unwrap();
        input = &input[s.consumed..];
        if s.consumed == 0 && s.event.is_none() {
            return;
        }
    }
}

#[test]
fn truncated_mid_header_mid_payload_and_before_end() {
    let neg = neg();
    let mut enc = StreamEncoder::new(&neg);
    let run = Repr::PageRun {
        region: 0,
        first: 0,
        count: 1,
        requested: false,
        paused: false,
    };
    let mut head = [0u8; HEADER_LEN];
    enc.encode(&run, &[7; 4096], &mut head).unwrap();
    let mut stream = head.to_vec();
    stream.extend_from_slice(&[7; 4096]);

    for (cut, offset) in [(10, 0), (HEADER_LEN + 100, 0), (stream.len(), 4128)] {
        let mut dec = StreamDecoder::new(neg);
        feed_all(&mut dec, &stream[..cut]);
        let e = dec.finish().unwrap_err();
        assert_eq!(
            (e.cause, e.offset),
            (Cause::Truncated, offset as u64),
            "cut {cut}"
        );
    }
    let mut dec = StreamDecoder::new(neg);
    feed_all(&mut dec, &stream);
    enc.encode(&Repr::End, &[], &mut head).unwrap();
    feed_all(&mut dec, &head);
    dec.finish().unwrap();
}

#[test]
fn poisoned_after_error() {
    let mut dec = StreamDecoder::new(neg());
    let bad = raw(0x42, 0, 0, 0, 0, 0, 0, 0);
    assert_eq!(dec.step(&bad).unwrap_err().cause, Cause::UnknownKind);
    let again = dec.step(&raw(0x09, 0, 0, 0, 0, 0, 0, 0)).unwrap_err();
    assert_eq!(
        (again.cause, again.offset, again.kind),
        (Cause::Poisoned, 0, 0x42)
    );
    assert_eq!(dec.finish().unwrap_err().cause, Cause::Poisoned);
}

#[test]
fn error_messages_are_sentences() {
    let e = refused(&raw(0x01, 0, 1, 2, R1_PAGES - 1, 2 * PAGE, 0, 1));
    let msg = e.to_string();
    assert!(msg.contains("seq 1"), "{msg}");
    assert!(msg.contains("offset 32"), "{msg}");
    assert!(
        msg.contains("do not lie inside a region of 16 pages"),
        "{msg}"
    );
}

// ---- Return path ----

fn return_refused(bad: &[u8]) -> DecodeError {
    let mut stream = [0u8; HEADER_LEN];
    ReturnRepr::Accept {
        max_channels: 4,
        max_device_bytes: 0,
        session: 0,
    }
    .emit(0, &mut stream);
    let mut all = stream.to_vec();
    all.extend_from_slice(bad);
    let mut dec = ReturnDecoder::new(neg());
    for b in all.chunks(1) {
        if let Err(e) = dec.step(b) {
            assert_eq!(e.offset, 32);
            assert_eq!(dec.step(&[0]).unwrap_err().cause, Cause::Poisoned);
            return e;
        }
    }
    panic!("the record was accepted");
}

#[test]
fn return_header_checksum() {
    let mut b = raw(0x83, 0, 0, 0, 0, 0, 0, 1);
    b[0] = 0x85;
    assert!(matches!(
        return_refused(&b).cause,
        Cause::HeaderChecksum { .. }
    ));
}

#[test]
fn return_unknown_kind_and_flags() {
    assert_eq!(
        return_refused(&raw(0x09, 0, 0, 0, 0, 0, 0, 1)).cause,
        Cause::UnknownKind
    );
    assert_eq!(
        return_refused(&raw(0x83, 4, 0, 0, 0, 0, 0, 1)).cause,
        Cause::UnknownFlags { flags: 4 }
    );
}

#[test]
fn return_payload_not_allowed() {
    assert_eq!(
        return_refused(&raw(0x83, 0, 0, 0, 0, 8, 0, 1)).cause,
        Cause::PayloadLength {
            expected: 0,
            received: 8
        }
    );
    assert_eq!(
        return_refused(&raw(0x83, 0, 0, 0, 0, 0, 9, 1)).cause,
        Cause::NonZero {
            field: Field::PayloadCrc
        }
    );
}

#[test]
fn return_nonzero_fields() {
    assert_eq!(
        return_refused(&raw(0x83, 0, 1, 0, 0, 0, 0, 1)).cause,
        Cause::NonZero { field: Field::Id }
    );
    assert_eq!(
        return_refused(&raw(0x86, 0, 0, 0, 1, 0, 0, 1)).cause,
        Cause::NonZero {
            field: Field::First
        }
    );
    // Accept carries its limits in id and first, and its session in count.
    let mut dec = ReturnDecoder::new(neg());
    let bytes = raw(0x85, 0, 4, 0x0102_0304, 8, 0, 0, 0);
    let rec = bytes
        .chunks(1)
        .find_map(|b| dec.step(b).unwrap().1)
        .expect("an accept decodes");
    assert_eq!(
        rec.repr,
        ReturnRepr::Accept {
            max_channels: 4,
            max_device_bytes: 8,
            session: 0x0102_0304
        }
    );
    assert_eq!(
        return_refused(&raw(0x84, 0, 1, 1, 0, 0, 0, 1)).cause,
        Cause::NonZero {
            field: Field::Count
        }
    );
}

#[test]
fn return_unknown_error_code() {
    assert_eq!(
        return_refused(&raw(0x84, 0, 99, 0, 0, 0, 0, 1)).cause,
        Cause::UnknownErrorCode { code: 99 }
    );
    assert_eq!(
        return_refused(&raw(0x84, 0, 0, 0, 0, 0, 0, 1)).cause,
        Cause::UnknownErrorCode { code: 0 }
    );
}

#[test]
fn return_page_ranges_checked() {
    assert_eq!(
        return_refused(&raw(0x81, 0, 5, 1, 0, 0, 0, 1)).cause,
        Cause::UnknownRegion { region: 5 }
    );
    assert_eq!(
        return_refused(&raw(0x81, 0, 1, 0, 0, 0, 0, 1)).cause,
        Cause::ZeroCount
    );
    assert_eq!(
        return_refused(&raw(0x82, 0, 1, 1, R1_PAGES, 0, 0, 1)).cause,
        Cause::OutOfRegion {
            first: R1_PAGES,
            count: 1,
            region_pages: R1_PAGES
        }
    );
    assert_eq!(
        return_refused(&raw(0x82, 0, 0, MAX_RUN_PAGES + 1, 0, 0, 0, 1)).cause,
        Cause::CountTooLarge {
            count: MAX_RUN_PAGES + 1,
            max: MAX_RUN_PAGES
        }
    );
}

#[test]
fn return_sequence() {
    assert_eq!(
        return_refused(&raw(0x83, 0, 0, 0, 0, 0, 0, 5)).cause,
        Cause::Sequence {
            expected: 1,
            received: 5
        }
    );
}

// ---- Handshake ----

fn hello_bytes(h: &Hello) -> Vec<u8> {
    let mut buf = [0u8; MAX_HELLO_LEN];
    let n = h.emit(&mut buf).unwrap();
    buf[..n].to_vec()
}

/// Re-seals a hello after its payload was edited: payload CRC, then header CRC.
fn reseal(bytes: &mut [u8]) {
    let crc = ferry_core::wire::payload_crc(&bytes[HEADER_LEN..]);
    let mut h = Header::new_checked(&mut bytes[..HEADER_LEN]).unwrap();
    h.set_payload_crc(crc);
    h.fill_header_crc();
}

fn ours() -> Hello {
    Hello::new(caps(true, true), layout())
}

#[test]
fn hello_header_refused() {
    let mut b = hello_bytes(&ours());
    b[5] ^= 1;
    assert!(matches!(
        Hello::parse(&b),
        Err(HandshakeError::Header(Cause::HeaderChecksum { .. }))
    ));
    let stream_rec = raw(0x09, 0, 0, 0, 0, 0, 0, 0);
    assert_eq!(
        Hello::parse(&stream_rec),
        Err(HandshakeError::Header(Cause::UnknownKind))
    );
    let too_many = raw(0x20, 0, 0, 33, 0, 32 + 33 * 24, 0, 0);
    assert!(matches!(
        Hello::payload_len(&too_many),
        Err(HandshakeError::Header(Cause::CountTooLarge { .. }))
    ));
    let bad_len = raw(0x20, 0, 0, 1, 0, 32, 0, 0);
    assert!(matches!(
        Hello::payload_len(&bad_len),
        Err(HandshakeError::Header(Cause::PayloadLength { .. }))
    ));
}

#[test]
fn hello_truncated() {
    let b = hello_bytes(&ours());
    assert_eq!(
        Hello::parse(&b[..20]),
        Err(HandshakeError::Truncated {
            needed: 32,
            available: 20
        })
    );
    assert_eq!(
        Hello::parse(&b[..b.len() - 1]),
        Err(HandshakeError::Truncated {
            needed: b.len(),
            available: b.len() - 1
        })
    );
}

#[test]
fn hello_payload_checksum() {
    let mut b = hello_bytes(&ours());
    b[60] ^= 1;
    assert!(matches!(
        Hello::parse(&b),
        Err(HandshakeError::PayloadChecksum { .. })
    ));
}

#[test]
fn hello_magic_version_caps_reserved() {
    let good = hello_bytes(&ours());
    let mut b = good.clone();
    b[32] = b'X';
    reseal(&mut b);
    assert_eq!(Hello::parse(&b), Err(HandshakeError::Magic));

    let mut b = good.clone();
    b[40] = 2;
    reseal(&mut b);
    assert_eq!(
        Hello::parse(&b),
        Err(HandshakeError::Version { ours: 1, theirs: 2 })
    );

    let mut b = good.clone();
    b[42] = 0x08;
    reseal(&mut b);
    assert_eq!(
        Hello::parse(&b),
        Err(HandshakeError::Capabilities {
            bits: 8,
            channels: 1
        })
    );

    let mut b = good.clone();
    b[44] = 0;
    reseal(&mut b);
    assert_eq!(
        Hello::parse(&b),
        Err(HandshakeError::Capabilities {
            bits: 7,
            channels: 0
        })
    );

    // Bytes 20..24 of the fixed part name a session to resume; 24..32 are
    // reserved.
    let mut b = good.clone();
    b[55] = 1;
    reseal(&mut b);
    assert_eq!(Hello::parse(&b).map(|h| h.resume), Ok(1 << 24));

    let mut b = good.clone();
    b[56] = 1;
    reseal(&mut b);
    assert_eq!(Hello::parse(&b), Err(HandshakeError::Reserved));

    let mut b = good;
    b[66] = 1; // reserved bytes of region entry 0
    reseal(&mut b);
    assert_eq!(Hello::parse(&b), Err(HandshakeError::Reserved));
}

#[test]
fn hello_region_count_disagrees_with_header() {
    let mut b = hello_bytes(&ours());
    b[46] = 1; // region count says 1, header count and length say 2
    reseal(&mut b);
    assert!(matches!(
        Hello::parse(&b),
        Err(HandshakeError::Header(Cause::PayloadLength { .. }))
    ));
}

#[test]
fn hello_invalid_layout() {
    let mut b = hello_bytes(&ours());
    b[48..52].copy_from_slice(&3000u32.to_le_bytes());
    reseal(&mut b);
    assert_eq!(
        Hello::parse(&b),
        Err(HandshakeError::Layout(LayoutError::PageSize(3000)))
    );
}

#[test]
fn hello_emit_buffer_too_short() {
    let mut buf = [0u8; 40];
    assert_eq!(
        ours().emit(&mut buf),
        Err(EmitError::BufferTooShort {
            needed: 32 + 32 + 48,
            available: 40
        })
    );
}

#[test]
fn negotiate_refusals() {
    let ours = ours();
    let mut v = ours;
    v.version = 9;
    assert_eq!(
        v.negotiate(&ours),
        Err(HandshakeError::Version { ours: 1, theirs: 9 })
    );

    let bigger = Layout::new(
        PAGE,
        &[
            Region {
                id: 0,
                gpa: 0,
                size: 256 * 4096,
            },
            Region {
                id: 1,
                gpa: 1 << 32,
                size: (R1_PAGES + 1) * 4096,
            },
        ],
    )
    .unwrap();
    let theirs = Hello::new(ours.caps, bigger);
    match theirs.negotiate(&ours) {
        Err(HandshakeError::Mismatch(LayoutMismatch::Region {
            index: 1,
            ours: Some(o),
            theirs: Some(t),
        })) => {
            assert_eq!(o.size, R1_PAGES * 4096);
            assert_eq!(t.size, (R1_PAGES + 1) * 4096);
        }
        other => panic!("{other:?}"),
    }
    let msg = theirs.negotiate(&ours).unwrap_err().to_string();
    assert!(msg.contains("region #1 differs"), "{msg}");

    let mut more = Hello::new(caps(true, true), layout());
    more.caps.channels = 4;
    assert!(matches!(
        more.negotiate(&ours),
        Err(HandshakeError::Unsupported { .. })
    ));
    let plain = Hello::new(caps(false, false), layout());
    assert!(matches!(
        ours.negotiate(&plain),
        Err(HandshakeError::Unsupported { .. })
    ));
}

#[test]
fn layout_mismatch_names_first_difference() {
    let a = layout();
    let one = Layout::new(
        PAGE,
        &[Region {
            id: 0,
            gpa: 0,
            size: 256 * 4096,
        }],
    )
    .unwrap();
    assert_eq!(a.check_matches(&a), Ok(()));
    assert_eq!(
        one.check_matches(&a),
        Err(LayoutMismatch::Region {
            index: 1,
            ours: Some(a.regions()[1]),
            theirs: None
        })
    );
    assert_eq!(
        a.check_matches(&one),
        Err(LayoutMismatch::Region {
            index: 1,
            ours: None,
            theirs: Some(a.regions()[1])
        })
    );
    let moved = Layout::new(
        PAGE,
        &[
            Region {
                id: 0,
                gpa: 1 << 20,
                size: 256 * 4096,
            },
            Region {
                id: 7,
                gpa: 1 << 32,
                size: R1_PAGES * 4096,
            },
        ],
    )
    .unwrap();
    assert!(matches!(
        moved.check_matches(&a),
        Err(LayoutMismatch::Region { index: 0, .. })
    ));
    let big = Layout::new(2 << 20, &[]).unwrap();
    assert_eq!(
        big.check_matches(&a),
        Err(LayoutMismatch::PageSize {
            ours: 4096,
            theirs: 2 << 20
        })
    );
}

#[test]
fn layout_errors() {
    let r = |id, gpa, size| Region { id, gpa, size };
    assert_eq!(Layout::new(0, &[]), Err(LayoutError::PageSize(0)));
    assert_eq!(Layout::new(256, &[]), Err(LayoutError::PageSize(256)));
    assert_eq!(Layout::new(6000, &[]), Err(LayoutError::PageSize(6000)));
    assert_eq!(
        Layout::new(1 << 31, &[]),
        Err(LayoutError::PageSize(1 << 31))
    );
    let many = [r(0, 0, 4096); MAX_REGIONS + 1];
    assert_eq!(
        Layout::new(PAGE, &many),
        Err(LayoutError::TooManyRegions(MAX_REGIONS + 1))
    );
    assert_eq!(
        Layout::new(PAGE, &[r(0, 0, 0)]),
        Err(LayoutError::Empty(r(0, 0, 0)))
    );
    assert_eq!(
        Layout::new(PAGE, &[r(0, 100, 4096)]),
        Err(LayoutError::Unaligned(r(0, 100, 4096)))
    );
    assert_eq!(
        Layout::new(PAGE, &[r(0, 0, 4097)]),
        Err(LayoutError::Unaligned(r(0, 0, 4097)))
    );
    let top = r(0, u64::MAX - 4095, 8192);
    assert_eq!(Layout::new(PAGE, &[top]), Err(LayoutError::Overflow(top)));
    assert_eq!(
        Layout::new(PAGE, &[r(3, 0, 4096), r(3, 8192, 4096)]),
        Err(LayoutError::DuplicateId(3))
    );
    assert_eq!(
        Layout::new(PAGE, &[r(1, 0, 8192), r(2, 4096, 4096)]),
        Err(LayoutError::Overlap(r(1, 0, 8192), r(2, 4096, 4096)))
    );
    // The largest region possible is fine.
    let last = r(0, u64::MAX - 4095 - 4096 * 3, 4096 * 3);
    assert!(Layout::new(PAGE, &[last]).is_ok());
}
