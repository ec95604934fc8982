//! Literal byte arrays for every stream and return-path record type, decoded field by
//! field and re-encoded byte for byte (smoltcp style), plus the handshake.
#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use ferry_core::wire::{
    decode_header, discard_map_bytes, payload_crc, Capabilities, Cause, ErrorCode, Header, Hello,
    Layout, Negotiated, RecordHeader, Region, Repr, ReturnRepr, StreamEncoder, StreamKind,
    HEADER_LEN, MAX_DISCARD_MAP_PAGES,
};
use zerocopy::FromBytes;

const PAGE: u32 = 4096;

fn layout() -> Layout {
    Layout::new(
        PAGE,
        &[
            Region {
                id: 0,
                gpa: 0,
                size: 1 << 30,
            },
            Region {
                id: 1,
                gpa: 4 << 30,
                size: 64 << 20,
            },
        ],
    )
    .unwrap()
}

fn caps() -> Capabilities {
    Capabilities {
        postcopy_ram: true,
        postcopy_only_sections: true,
        payload_checksums: true,
        channels: 2,
    }
}

fn neg() -> Negotiated {
    Negotiated::new(layout(), caps())
}

/// Page run: region 1, pages 0x10..0x12, 8 KiB of 0xab, seq 0.
const PAGE_RUN: [u8; HEADER_LEN] = [
    0x01, // kind
    0x00, // flags
    0x01, 0x00, // id
    0x02, 0x00, 0x00, 0x00, // count
    0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x00, 0x20, 0x00, 0x00, // payload_len
    0xc0, 0x48, 0x27, 0x04, // payload_crc
    0x00, 0x00, 0x00, 0x00, // seq
    0xf9, 0x2b, 0xd2, 0x3b, // header_crc
];

/// Requested page run: region 0, last page 0x3ffff, one page of 0xab, seq 1.
const PAGE_RUN_REQUESTED: [u8; HEADER_LEN] = [
    0x01, // kind
    0x01, // flags
    0x00, 0x00, // id
    0x01, 0x00, 0x00, 0x00, // count
    0xff, 0xff, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x00, 0x10, 0x00, 0x00, // payload_len
    0x0b, 0x5c, 0x79, 0xa8, // payload_crc
    0x01, 0x00, 0x00, 0x00, // seq
    0x08, 0x19, 0x29, 0x3e, // header_crc
];

/// Zero run: region 0, pages 0x1000..0x1200, seq 2.
const ZERO_RUN: [u8; HEADER_LEN] = [
    0x02, // kind
    0x00, // flags
    0x00, 0x00, // id
    0x00, 0x02, 0x00, 0x00, // count
    0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x00, 0x00, 0x00, 0x00, // payload_len
    0x00, 0x00, 0x00, 0x00, // payload_crc
    0x02, 0x00, 0x00, 0x00, // seq
    0xbb, 0xad, 0xc6, 0xd7, // header_crc
];

/// Section 7, last chunk at offset 0x40: "hello", seq 3.
const SECTION: [u8; HEADER_LEN] = [
    0x03, // kind
    0x01, // flags
    0x07, 0x00, // id
    0x00, 0x00, 0x00, 0x00, // count
    0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x05, 0x00, 0x00, 0x00, // payload_len
    0x86, 0xa6, 0x10, 0x36, // payload_crc
    0x03, 0x00, 0x00, 0x00, // seq
    0xf5, 0x4d, 0x97, 0x17, // header_crc
];

/// Postcopy-only section 2 at offset 0: [1, 2, 3], seq 4.
const POSTCOPY_SECTION: [u8; HEADER_LEN] = [
    0x04, // kind
    0x00, // flags
    0x02, 0x00, // id
    0x00, 0x00, 0x00, 0x00, // count
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x03, 0x00, 0x00, 0x00, // payload_len
    0x1d, 0x80, 0xbc, 0x55, // payload_crc
    0x04, 0x00, 0x00, 0x00, // seq
    0xe8, 0xd0, 0x42, 0x99, // header_crc
];

/// Discard: region 1, pages 5..8, seq 5.
const DISCARD: [u8; HEADER_LEN] = [
    0x05, // kind
    0x00, // flags
    0x01, 0x00, // id
    0x03, 0x00, 0x00, 0x00, // count
    0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x00, 0x00, 0x00, 0x00, // payload_len
    0x00, 0x00, 0x00, 0x00, // payload_crc
    0x05, 0x00, 0x00, 0x00, // seq
    0x12, 0x51, 0x45, 0x24, // header_crc
];

/// Stop-and-copy begins, seq 6.
const STOP_AND_COPY: [u8; HEADER_LEN] = [
    0x06, // kind
    0x00, // flags
    0x00, 0x00, // id
    0x00, 0x00, 0x00, 0x00, // count
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x00, 0x00, 0x00, 0x00, // payload_len
    0x00, 0x00, 0x00, 0x00, // payload_crc
    0x06, 0x00, 0x00, 0x00, // seq
    0x7b, 0x26, 0xa7, 0xa0, // header_crc
];

/// Postcopy listen, seq 7.
const POSTCOPY_LISTEN: [u8; HEADER_LEN] = [
    0x07, // kind
    0x00, // flags
    0x00, 0x00, // id
    0x00, 0x00, 0x00, 0x00, // count
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x00, 0x00, 0x00, 0x00, // payload_len
    0x00, 0x00, 0x00, 0x00, // payload_crc
    0x07, 0x00, 0x00, 0x00, // seq
    0x03, 0xbc, 0xae, 0x19, // header_crc
];

/// Postcopy run, seq 8.
const POSTCOPY_RUN: [u8; HEADER_LEN] = [
    0x08, // kind
    0x00, // flags
    0x00, 0x00, // id
    0x00, 0x00, 0x00, 0x00, // count
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x00, 0x00, 0x00, 0x00, // payload_len
    0x00, 0x00, 0x00, 0x00, // payload_crc
    0x08, 0x00, 0x00, 0x00, // seq
    0xee, 0xb7, 0x6b, 0x48, // header_crc
];

/// Go, seq 9.
const GO: [u8; HEADER_LEN] = [
    0x09, // kind
    0x00, // flags
    0x00, 0x00, // id
    0x00, 0x00, 0x00, 0x00, // count
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x00, 0x00, 0x00, 0x00, // payload_len
    0x00, 0x00, 0x00, 0x00, // payload_crc
    0x09, 0x00, 0x00, 0x00, // seq
    0x96, 0x2d, 0x62, 0xf1, // header_crc
];

/// End of stream, seq 10.
const END: [u8; HEADER_LEN] = [
    0x0a, // kind
    0x00, // flags
    0x00, 0x00, // id
    0x00, 0x00, 0x00, 0x00, // count
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x00, 0x00, 0x00, 0x00, // payload_len
    0x00, 0x00, 0x00, 0x00, // payload_crc
    0x0a, 0x00, 0x00, 0x00, // seq
    0x5f, 0x85, 0x09, 0xe1, // header_crc
];

/// Discard map: region 1, pages 0x40..0xa4 (two words: pages 0x40, 0x7f and
/// 0x80..0x84 to drop), seq 11.
const DISCARD_MAP: [u8; HEADER_LEN] = [
    0x0b, // kind
    0x00, // flags
    0x01, 0x00, // id
    0x64, 0x00, 0x00, 0x00, // count
    0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x10, 0x00, 0x00, 0x00, // payload_len
    0x27, 0xc8, 0xa6, 0xfd, // payload_crc
    0x0b, 0x00, 0x00, 0x00, // seq
    0x76, 0xb2, 0x51, 0x44, // header_crc
];

/// The payload of [`DISCARD_MAP`]: little-endian words, bit `i` is page `0x40 + i`.
const DISCARD_MAP_PAYLOAD: [u8; 16] = [
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, // pages 0x40 and 0x7f
    0x0f, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // pages 0x80..0x84
];

/// Return path: page request, region 0 page 0x1234, seq 0.
const RET_PAGE_REQUEST: [u8; HEADER_LEN] = [
    0x81, // kind
    0x00, // flags
    0x00, 0x00, // id
    0x01, 0x00, 0x00, 0x00, // count
    0x34, 0x12, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x00, 0x00, 0x00, 0x00, // payload_len
    0x00, 0x00, 0x00, 0x00, // payload_crc
    0x00, 0x00, 0x00, 0x00, // seq
    0xdf, 0x4c, 0x3f, 0x09, // header_crc
];

/// Return path: resend region 1 pages 2..6, seq 1.
const RET_RESEND: [u8; HEADER_LEN] = [
    0x82, // kind
    0x00, // flags
    0x01, 0x00, // id
    0x04, 0x00, 0x00, 0x00, // count
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x00, 0x00, 0x00, 0x00, // payload_len
    0x00, 0x00, 0x00, 0x00, // payload_crc
    0x01, 0x00, 0x00, 0x00, // seq
    0x72, 0x2a, 0x8c, 0xa5, // header_crc
];

/// Return path: ready, seq 2.
const RET_READY: [u8; HEADER_LEN] = [
    0x83, // kind
    0x00, // flags
    0x00, 0x00, // id
    0x00, 0x00, 0x00, 0x00, // count
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x00, 0x00, 0x00, 0x00, // payload_len
    0x00, 0x00, 0x00, 0x00, // payload_crc
    0x02, 0x00, 0x00, 0x00, // seq
    0xc5, 0x36, 0x59, 0xf2, // header_crc
];

/// Return path: error out-of-range, detail 0x2000, seq 3.
const RET_ERROR: [u8; HEADER_LEN] = [
    0x84, // kind
    0x00, // flags
    0x04, 0x00, // id
    0x00, 0x00, 0x00, 0x00, // count
    0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x00, 0x00, 0x00, 0x00, // payload_len
    0x00, 0x00, 0x00, 0x00, // payload_crc
    0x03, 0x00, 0x00, 0x00, // seq
    0x39, 0x42, 0xfc, 0x42, // header_crc
];

/// Return path: accept, seq 4.
const RET_ACCEPT: [u8; HEADER_LEN] = [
    0x85, // kind
    0x00, // flags
    0x00, 0x00, // id
    0x00, 0x00, 0x00, 0x00, // count
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x00, 0x00, 0x00, 0x00, // payload_len
    0x00, 0x00, 0x00, 0x00, // payload_crc
    0x04, 0x00, 0x00, 0x00, // seq
    0x57, 0x67, 0x8e, 0xd2, // header_crc
];

/// Return path: started (the answer to go), seq 5.
const RET_STARTED: [u8; HEADER_LEN] = [
    0x86, // kind
    0x00, // flags
    0x00, 0x00, // id
    0x00, 0x00, 0x00, 0x00, // count
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first
    0x00, 0x00, 0x00, 0x00, // payload_len
    0x00, 0x00, 0x00, 0x00, // payload_crc
    0x05, 0x00, 0x00, 0x00, // seq
    0x15, 0x07, 0xec, 0x68, // header_crc
];

/// Return path: accept stating 9 channels and 1 MiB of device state, seq 6.
const RET_ACCEPT_LIMITS: [u8; HEADER_LEN] = [
    0x85, // kind
    0x00, // flags
    0x09, 0x00, // id: max channels
    0x00, 0x00, 0x00, 0x00, // count
    0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, // first: max device bytes
    0x00, 0x00, 0x00, 0x00, // payload_len
    0x00, 0x00, 0x00, 0x00, // payload_crc
    0x06, 0x00, 0x00, 0x00, // seq
    0xef, 0x78, 0x10, 0xe4, // header_crc
];

fn stream_cases() -> Vec<([u8; HEADER_LEN], Repr, Vec<u8>)> {
    vec![
        (
            PAGE_RUN,
            Repr::PageRun {
                region: 1,
                first: 0x10,
                count: 2,
                requested: false,
                paused: false,
            },
            vec![0xab; 8192],
        ),
        (
            PAGE_RUN_REQUESTED,
            Repr::PageRun {
                region: 0,
                first: 0x3ffff,
                count: 1,
                requested: true,
                paused: false,
            },
            vec![0xab; 4096],
        ),
        (
            ZERO_RUN,
            Repr::ZeroRun {
                region: 0,
                first: 0x1000,
                count: 0x200,
            },
            vec![],
        ),
        (
            SECTION,
            Repr::Section {
                section: 7,
                offset: 0x40,
                len: 5,
                last: true,
            },
            b"hello".to_vec(),
        ),
        (
            POSTCOPY_SECTION,
            Repr::PostcopySection {
                section: 2,
                offset: 0,
                len: 3,
                last: false,
            },
            vec![1, 2, 3],
        ),
        (
            DISCARD,
            Repr::Discard {
                region: 1,
                first: 5,
                count: 3,
            },
            vec![],
        ),
        (STOP_AND_COPY, Repr::StopAndCopy, vec![]),
        (POSTCOPY_LISTEN, Repr::PostcopyListen, vec![]),
        (POSTCOPY_RUN, Repr::PostcopyRun, vec![]),
        (GO, Repr::Go, vec![]),
        (END, Repr::End, vec![]),
        (
            DISCARD_MAP,
            Repr::DiscardMap {
                region: 1,
                first: 0x40,
                count: 100,
            },
            DISCARD_MAP_PAYLOAD.to_vec(),
        ),
    ]
}

#[test]
fn stream_records_parse_from_literal_bytes() {
    let neg = neg();
    for (seq, (bytes, repr, payload)) in stream_cases().into_iter().enumerate() {
        let rec = decode_header(&bytes, &neg, 0).unwrap();
        assert_eq!(rec.repr, repr);
        assert_eq!(rec.seq, seq as u32);
        assert_eq!(rec.payload_len as usize, payload.len());
        assert_eq!(rec.payload_crc, payload_crc(&payload));
        assert_eq!(rec.repr.kind() as u8, bytes[0]);
    }
}

#[test]
fn stream_records_emit_literal_bytes() {
    let neg = neg();
    let mut enc = StreamEncoder::new(&neg);
    for (bytes, repr, payload) in stream_cases() {
        let mut out = [0u8; HEADER_LEN];
        enc.encode(&repr, &payload, &mut out).unwrap();
        assert_eq!(out, bytes, "{repr:?}");
        let seq = u32::from_le_bytes(bytes[24..28].try_into().unwrap());
        let mut again = [0u8; HEADER_LEN];
        repr.emit(PAGE, seq, payload_crc(&payload), &mut again)
            .unwrap();
        assert_eq!(again, bytes);
    }
}

#[test]
fn header_view_reads_every_field() {
    let h = Header::new_checked(&PAGE_RUN[..]).unwrap();
    assert_eq!(h.kind(), StreamKind::PageRun as u8);
    assert_eq!(h.flags(), 0);
    assert_eq!(h.id(), 1);
    assert_eq!(h.count(), 2);
    assert_eq!(h.first(), 0x10);
    assert_eq!(h.payload_len(), 8192);
    assert_eq!(h.payload_crc(), payload_crc(&[0xab; 8192]));
    assert_eq!(h.seq(), 0);
    assert!(h.header_crc_ok());
    assert_eq!(h.header_crc(), 0x3bd2_2bf9);

    let z = RecordHeader::ref_from_bytes(&PAGE_RUN[..]).unwrap();
    assert_eq!(z.kind, 1);
    assert_eq!(z.id.get(), 1);
    assert_eq!(z.count.get(), 2);
    assert_eq!(z.first.get(), 0x10);
    assert_eq!(z.payload_len.get(), 8192);
    assert_eq!(z.seq.get(), 0);
    assert!(z.header_crc_ok());
}

#[test]
fn header_view_writes_every_field() {
    let mut buf = [0u8; 40];
    let mut h = Header::new_checked(&mut buf[..]).unwrap();
    h.set_kind(0x05);
    h.set_flags(0);
    h.set_id(1);
    h.set_count(3);
    h.set_first(5);
    h.set_payload_len(0);
    h.set_payload_crc(0);
    h.set_seq(5);
    h.fill_header_crc();
    assert_eq!(&buf[..HEADER_LEN], &DISCARD[..]);
    assert_eq!(
        &buf[HEADER_LEN..],
        &[0u8; 8],
        "the view wrote past the header"
    );
}

#[test]
fn header_view_refuses_short_buffer() {
    assert_eq!(Header::new_checked(&PAGE_RUN[..31]).unwrap_err(), 31);
    assert_eq!(Header::new_checked(&[][..]).unwrap_err(), 0);
}

#[test]
fn discard_map_header_reads_from_literal_bytes() {
    let h = Header::new_checked(&DISCARD_MAP[..]).unwrap();
    assert_eq!(h.kind(), StreamKind::DiscardMap as u8);
    assert_eq!(StreamKind::from_u8(0x0b), Some(StreamKind::DiscardMap));
    assert_eq!(h.flags(), 0);
    assert_eq!(h.id(), 1);
    assert_eq!(h.count(), 100);
    assert_eq!(h.first(), 0x40);
    assert_eq!(h.payload_len(), 16);
    assert_eq!(h.payload_crc(), payload_crc(&DISCARD_MAP_PAYLOAD));
    assert_eq!(h.seq(), 11);
    assert!(h.header_crc_ok());
    let rec = decode_header(&DISCARD_MAP, &neg(), 0).unwrap();
    assert_eq!(
        rec.repr,
        Repr::DiscardMap {
            region: 1,
            first: 0x40,
            count: 100
        }
    );
    // A discard map is not a page run: its payload is no guest RAM.
    assert_eq!(rec.page_run(), None);
    assert_eq!(rec.ram_dest(&neg()), None);
}

/// A layout with a region large enough for the longest discard map.
fn large_neg() -> Negotiated {
    let pages = u64::from(MAX_DISCARD_MAP_PAGES) + 64;
    let layout = Layout::new(
        PAGE,
        &[Region {
            id: 0,
            gpa: 0,
            size: pages * u64::from(PAGE),
        }],
    )
    .unwrap();
    Negotiated::new(layout, caps())
}

#[test]
fn discard_map_round_trips() {
    let big = u64::from(MAX_DISCARD_MAP_PAGES) / 8;
    for (neg, region, first, count, words) in [
        (neg(), 0, 0, 1, 1),
        (neg(), 0, 64, 64, 1),
        (neg(), 1, 128, 65, 2),
        (neg(), 1, 0x3fc0, 64, 1),
        (neg(), 1, 0, 16384, 256),
        (large_neg(), 0, 0, MAX_DISCARD_MAP_PAGES, big / 8),
        (large_neg(), 0, 64, MAX_DISCARD_MAP_PAGES, big / 8),
    ] {
        let repr = Repr::DiscardMap {
            region,
            first,
            count,
        };
        assert_eq!(repr.check(&neg), Ok(()), "{repr:?}");
        assert_eq!(repr.payload_len(PAGE), words * 8, "{repr:?}");
        assert_eq!(discard_map_bytes(count), words * 8);
        let mut out = [0u8; HEADER_LEN];
        repr.emit(PAGE, 3, 0x1234_5678, &mut out).unwrap();
        assert_eq!(out[0], 0x0b);
        assert_eq!(&out[16..20], &((words * 8) as u32).to_le_bytes());
        let rec = decode_header(&out, &neg, 0).unwrap();
        assert_eq!(rec.repr, repr);
        assert_eq!(rec.seq, 3);
        assert_eq!(u64::from(rec.payload_len), words * 8);
        assert_eq!(rec.payload_crc, 0x1234_5678);
    }
}

/// The header of a discard map, emitted without validation.
fn discard_map(region: u16, first: u64, count: u32) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    Repr::DiscardMap {
        region,
        first,
        count,
    }
    .emit(PAGE, 0, 1, &mut out)
    .unwrap();
    out
}

fn refusal(bytes: &[u8; HEADER_LEN], neg: &Negotiated) -> Cause {
    let e = decode_header(bytes, neg, 64).unwrap_err();
    assert_eq!((e.offset, e.kind), (64, 0x0b));
    e.cause
}

#[test]
fn discard_map_refusals() {
    let neg = neg();
    // Region 1 has 16384 pages.
    for (bytes, cause) in [
        (discard_map(1, 1, 64), Cause::Misaligned { first: 1 }),
        (discard_map(1, 32, 1), Cause::Misaligned { first: 32 }),
        (
            // Alignment is checked before the count.
            discard_map(1, 65, MAX_DISCARD_MAP_PAGES + 1),
            Cause::Misaligned { first: 65 },
        ),
        (
            discard_map(1, u64::MAX, 1),
            Cause::Misaligned { first: u64::MAX },
        ),
        (discard_map(1, 0, 0), Cause::ZeroCount),
        (discard_map(1, 64, 0), Cause::ZeroCount),
        (
            discard_map(0, 0, MAX_DISCARD_MAP_PAGES + 1),
            Cause::CountTooLarge {
                count: MAX_DISCARD_MAP_PAGES + 1,
                max: MAX_DISCARD_MAP_PAGES,
            },
        ),
        (
            discard_map(0, 0, u32::MAX),
            Cause::CountTooLarge {
                count: u32::MAX,
                max: MAX_DISCARD_MAP_PAGES,
            },
        ),
        (
            discard_map(1, 16384 - 64, 65),
            Cause::OutOfRegion {
                first: 16384 - 64,
                count: 65,
                region_pages: 16384,
            },
        ),
        (
            discard_map(1, 16384, 1),
            Cause::OutOfRegion {
                first: 16384,
                count: 1,
                region_pages: 16384,
            },
        ),
        (
            // first + count overflows.
            discard_map(1, u64::MAX - 63, 64),
            Cause::OutOfRegion {
                first: u64::MAX - 63,
                count: 64,
                region_pages: 16384,
            },
        ),
        (discard_map(2, 0, 1), Cause::UnknownRegion { region: 2 }),
    ] {
        assert_eq!(refusal(&bytes, &neg), cause, "{:02x?}", &bytes[..16]);
    }
}

#[test]
fn discard_map_needs_postcopy_ram() {
    let mut c = caps();
    c.postcopy_ram = false;
    let plain = Negotiated::new(layout(), c);
    assert_eq!(refusal(&DISCARD_MAP, &plain), Cause::NotNegotiated);
    // Checked before anything else in the record.
    assert_eq!(refusal(&discard_map(1, 1, 0), &plain), Cause::NotNegotiated);
    let repr = Repr::DiscardMap {
        region: 1,
        first: 0x40,
        count: 100,
    };
    assert_eq!(repr.check(&plain), Err(Cause::NotNegotiated));
    assert_eq!(repr.check(&neg()), Ok(()));
}

/// [`DISCARD_MAP`] with one field changed, and its header CRC sealed again.
fn tampered(edit: impl FnOnce(&mut Header<&mut [u8]>)) -> [u8; HEADER_LEN] {
    let mut b = DISCARD_MAP;
    let mut h = Header::new_checked(&mut b[..]).unwrap();
    edit(&mut h);
    h.fill_header_crc();
    b
}

#[test]
fn discard_map_refuses_flags_and_wrong_payload_length() {
    let neg = neg();
    for flags in [0x01, 0x02, 0x80] {
        assert_eq!(
            refusal(&tampered(|h| h.set_flags(flags)), &neg),
            Cause::UnknownFlags { flags }
        );
    }
    for len in [0u32, 8, 13, 24, 100 * PAGE] {
        assert_eq!(
            refusal(&tampered(|h| h.set_payload_len(len)), &neg),
            Cause::PayloadLength {
                expected: 16,
                received: len
            }
        );
    }
    // 128 pages take exactly the 16 bytes sent; 129 take 24.
    let rec = decode_header(&tampered(|h| h.set_count(128)), &neg, 0).unwrap();
    assert_eq!(rec.payload_len, 16);
    assert_eq!(
        refusal(&tampered(|h| h.set_count(129)), &neg),
        Cause::PayloadLength {
            expected: 24,
            received: 16
        }
    );
    // A sealed literal with a bit flipped in flight.
    let mut b = DISCARD_MAP;
    b[4] ^= 0x01;
    assert!(matches!(refusal(&b, &neg), Cause::HeaderChecksum { .. }));
}

fn return_cases() -> Vec<([u8; HEADER_LEN], ReturnRepr)> {
    vec![
        (
            RET_PAGE_REQUEST,
            ReturnRepr::PageRequest {
                region: 0,
                first: 0x1234,
                count: 1,
            },
        ),
        (
            RET_RESEND,
            ReturnRepr::Resend {
                region: 1,
                first: 2,
                count: 4,
            },
        ),
        (RET_READY, ReturnRepr::Ready),
        (
            RET_ERROR,
            ReturnRepr::Error {
                code: ErrorCode::OutOfRange,
                detail: 0x2000,
            },
        ),
        (
            RET_ACCEPT,
            ReturnRepr::Accept {
                max_channels: 0,
                max_device_bytes: 0,
                session: 0,
            },
        ),
        (RET_STARTED, ReturnRepr::Started),
        (
            RET_ACCEPT_LIMITS,
            ReturnRepr::Accept {
                max_channels: 9,
                max_device_bytes: 1 << 20,
                session: 0,
            },
        ),
    ]
}

#[test]
fn return_records_parse_and_emit_literal_bytes() {
    let neg = neg();
    for (seq, (bytes, repr)) in return_cases().into_iter().enumerate() {
        let rec = ReturnRepr::parse(&Header::new_checked(&bytes[..]).unwrap(), &neg).unwrap();
        assert_eq!(rec.repr, repr);
        assert_eq!(rec.seq, seq as u32);
        let mut out = [0u8; HEADER_LEN];
        repr.emit(seq as u32, &mut out);
        assert_eq!(out, bytes, "{repr:?}");
    }
}

#[test]
fn stream_and_return_kinds_do_not_mix() {
    let neg = neg();
    for (bytes, _) in return_cases() {
        assert!(decode_header(&bytes, &neg, 0).is_err());
    }
    for (bytes, _, _) in stream_cases() {
        assert!(ReturnRepr::parse(&Header::new_checked(&bytes[..]).unwrap(), &neg).is_err());
    }
}

#[test]
fn page_run_reports_where_its_payload_belongs() {
    let neg = neg();
    let rec = decode_header(&PAGE_RUN, &neg, 0).unwrap();
    assert_eq!(rec.page_run(), Some((1, 0x10, 2)));
    assert_eq!(rec.ram_dest(&neg), Some((1, 0x10 * 4096)));
    let zero = decode_header(&ZERO_RUN, &neg, 0).unwrap();
    assert_eq!(zero.page_run(), None);
    assert_eq!(zero.ram_dest(&neg), None);
}

#[test]
fn checksums_off_writes_and_ignores_payload_crc() {
    let mut c = caps();
    c.payload_checksums = false;
    let neg = Negotiated::new(layout(), c);
    let mut enc = StreamEncoder::new(&neg);
    let mut out = [0u8; HEADER_LEN];
    let repr = Repr::PageRun {
        region: 1,
        first: 0x10,
        count: 2,
        requested: false,
        paused: false,
    };
    enc.encode(&repr, &[0xab; 8192], &mut out).unwrap();
    assert_eq!(&out[20..24], &[0, 0, 0, 0]);
    // A header carrying a CRC is accepted and the CRC ignored.
    let rec = decode_header(&PAGE_RUN, &neg, 0).unwrap();
    assert_eq!(rec.payload_crc, 0);
}

#[test]
fn encoder_numbers_records_and_checks_payload_length() {
    let neg = neg();
    let mut enc = StreamEncoder::new(&neg);
    let mut out = [0u8; HEADER_LEN];
    assert_eq!(enc.encode(&Repr::Go, &[], &mut out).unwrap(), 0);
    assert_eq!(enc.encode(&Repr::Go, &[], &mut out).unwrap(), 1);
    let run = Repr::PageRun {
        region: 0,
        first: 0,
        count: 1,
        requested: false,
        paused: false,
    };
    let err = enc.encode(&run, &[0; 100], &mut out).unwrap_err();
    assert_eq!(
        err,
        ferry_core::wire::EmitError::PayloadLength {
            expected: 4096,
            given: 100
        }
    );
    assert_eq!(
        enc.next_seq(),
        2,
        "a refused record takes no sequence number"
    );
    let huge = Repr::PageRun {
        region: 0,
        first: 0,
        count: u32::MAX,
        requested: false,
        paused: false,
    };
    assert!(matches!(
        huge.emit(PAGE, 0, 0, &mut out),
        Err(ferry_core::wire::EmitError::PayloadTooLong { .. })
    ));
}

#[test]
fn hello_round_trips_and_negotiates() {
    let ours = Hello::new(caps(), layout());
    let mut buf = [0u8; ferry_core::wire::MAX_HELLO_LEN];
    let n = ours.emit(&mut buf).unwrap();
    assert_eq!(n, 32 + 32 + 2 * 24);
    assert_eq!(n, ours.wire_len());
    // Literal checks of the hello payload.
    assert_eq!(buf[0], ferry_core::wire::HELLO_KIND);
    assert_eq!(&buf[32..40], b"FERRYMIG");
    assert_eq!(&buf[40..42], &[1, 0], "version");
    assert_eq!(&buf[42..44], &[7, 0], "capability bits");
    assert_eq!(&buf[44..46], &[2, 0], "channels");
    assert_eq!(&buf[46..48], &[2, 0], "region count");
    assert_eq!(&buf[48..52], &[0, 0x10, 0, 0], "page size");
    assert_eq!(&buf[64..66], &[0, 0], "region 0 id");
    assert_eq!(&buf[88..90], &[1, 0], "region 1 id");
    assert_eq!(&buf[96..104], &(4u64 << 30).to_le_bytes(), "region 1 gpa");
    assert_eq!(
        &buf[104..112],
        &(64u64 << 20).to_le_bytes(),
        "region 1 size"
    );
    let head: [u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().unwrap();
    assert_eq!(Hello::payload_len(&head).unwrap(), n - HEADER_LEN);
    let theirs = Hello::parse(&buf[..n]).unwrap();
    assert_eq!(theirs, ours);
    let agreed = theirs.negotiate(&ours).unwrap();
    assert_eq!(agreed, neg());
}

#[test]
fn hello_with_fewer_capabilities_is_accepted() {
    let mut c = caps();
    c.postcopy_ram = false;
    let theirs = Hello::new(c, layout());
    let ours = Hello::new(caps(), layout());
    assert_eq!(theirs.negotiate(&ours).unwrap().caps, c);
}
