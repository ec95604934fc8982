//! The incremental decoders: a real stream decoded into a model of guest RAM and
//! section buffers, fed whole, one byte at a time, in odd pieces, and with page payloads
//! received "in place"; torn pages; borrowing; the return path.
#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use ferry_core::wire::{
    Capabilities, Dest, ErrorCode, Event, Layout, Negotiated, Record, Region, Repr, ReturnDecoder,
    ReturnRepr, StreamDecoder, StreamEncoder, HEADER_LEN,
};

const PAGE: u32 = 4096;

fn neg(checksums: bool) -> Negotiated {
    let layout = Layout::new(
        PAGE,
        &[
            Region {
                id: 0,
                gpa: 0,
                size: 64 * 4096,
            },
            Region {
                id: 9,
                gpa: 1 << 30,
                size: 16 * 4096,
            },
        ],
    )
    .unwrap();
    Negotiated::new(
        layout,
        Capabilities {
            postcopy_ram: true,
            postcopy_only_sections: true,
            payload_checksums: checksums,
            channels: 1,
        },
    )
}

/// Guest RAM and section data as the destination would hold them.
struct Model {
    ram: Vec<Vec<u8>>,
    sections: Vec<u8>,
    postcopy_sections: Vec<u8>,
    zeroed: Vec<(u16, u64, u32)>,
    discarded: Vec<(u16, u64, u32)>,
    /// Each region's discard bitmap (one bit per page, whole 64-bit words).
    discard_maps: Vec<Vec<u8>>,
    markers: Vec<Repr>,
    torn: Vec<Record>,
    complete: usize,
}

impl Model {
    fn new() -> Self {
        Model {
            ram: vec![vec![0; 64 * 4096], vec![0; 16 * 4096]],
            sections: vec![0; 256],
            postcopy_sections: vec![0; 256],
            zeroed: vec![],
            discarded: vec![],
            discard_maps: vec![vec![0; 8], vec![0; 8]],
            markers: vec![],
            torn: vec![],
            complete: 0,
        }
    }

    fn region(&mut self, id: u16) -> &mut Vec<u8> {
        &mut self.ram[if id == 0 { 0 } else { 1 }]
    }

    fn discard_map(&mut self, id: u16) -> &mut Vec<u8> {
        &mut self.discard_maps[if id == 0 { 0 } else { 1 }]
    }

    fn apply(&mut self, ev: Event<'_>) {
        match ev {
            Event::Header(_) => {}
            Event::Payload { dest, bytes, .. } => match dest {
                Dest::Ram { region, offset } => {
                    let o = offset as usize;
                    self.region(region)[o..o + bytes.len()].copy_from_slice(bytes);
                }
                Dest::Section {
                    offset,
                    postcopy_only,
                    ..
                } => {
                    let o = offset as usize;
                    let buf = if postcopy_only {
                        &mut self.postcopy_sections
                    } else {
                        &mut self.sections
                    };
                    buf[o..o + bytes.len()].copy_from_slice(bytes);
                }
                Dest::DiscardMap { region, offset } => {
                    let o = offset as usize;
                    self.discard_map(region)[o..o + bytes.len()].copy_from_slice(bytes);
                }
            },
            Event::Complete(r) => {
                self.complete += 1;
                match r.repr {
                    Repr::ZeroRun {
                        region,
                        first,
                        count,
                    } => self.zeroed.push((region, first, count)),
                    Repr::Discard {
                        region,
                        first,
                        count,
                    } => self.discarded.push((region, first, count)),
                    Repr::PageRun { .. }
                    | Repr::Section { .. }
                    | Repr::PostcopySection { .. }
                    | Repr::DiscardMap { .. } => {}
                    m => self.markers.push(m),
                }
            }
            Event::Torn { record, .. } => self.torn.push(record),
        }
    }
}

fn page(fill: u8) -> Vec<u8> {
    (0..PAGE as usize)
        .map(|i| fill ^ (i as u8).wrapping_mul(7))
        .collect()
}

/// The discard map of region 0 in [`build`]: pages 0..4 and 60..64.
const DISCARD_MAP: u64 = 0xf000_0000_0000_000f;

/// A stream of every record kind; returns it with the records' payloads.
fn build(neg: &Negotiated, tear: Option<usize>) -> Vec<u8> {
    let mut enc = StreamEncoder::new(neg);
    let mut out = Vec::new();
    let two: Vec<u8> = [page(1), page(2)].concat();
    let records: Vec<(Repr, Vec<u8>)> = vec![
        (
            Repr::PageRun {
                region: 0,
                first: 3,
                count: 2,
                requested: false,
                paused: false,
            },
            two,
        ),
        (
            Repr::ZeroRun {
                region: 9,
                first: 0,
                count: 16,
            },
            vec![],
        ),
        (
            Repr::Section {
                section: 4,
                offset: 10,
                len: 5,
                last: true,
            },
            b"state".to_vec(),
        ),
        (Repr::StopAndCopy, vec![]),
        (
            Repr::PageRun {
                region: 9,
                first: 15,
                count: 1,
                requested: true,
                paused: false,
            },
            page(3),
        ),
        (
            Repr::Discard {
                region: 0,
                first: 60,
                count: 4,
            },
            vec![],
        ),
        (Repr::PostcopyListen, vec![]),
        (
            Repr::DiscardMap {
                region: 0,
                first: 0,
                count: 64,
            },
            DISCARD_MAP.to_le_bytes().to_vec(),
        ),
        (Repr::PostcopyRun, vec![]),
        (Repr::Go, vec![]),
        (
            Repr::PostcopySection {
                section: 1,
                offset: 0,
                len: 3,
                last: true,
            },
            vec![0xaa, 0xbb, 0xcc],
        ),
        (Repr::End, vec![]),
    ];
    for (i, (repr, mut payload)) in records.into_iter().enumerate() {
        let mut head = [0u8; HEADER_LEN];
        enc.encode(&repr, &payload, &mut head).unwrap();
        if tear == Some(i) {
            payload[100] ^= 0x04;
        }
        out.extend_from_slice(&head);
        out.extend_from_slice(&payload);
    }
    out
}

fn check_model(m: &Model) {
    assert_eq!(&m.ram[0][3 * 4096..4 * 4096], &page(1)[..]);
    assert_eq!(&m.ram[0][4 * 4096..5 * 4096], &page(2)[..]);
    assert!(m.ram[0][..3 * 4096].iter().all(|&b| b == 0));
    assert!(m.ram[0][5 * 4096..].iter().all(|&b| b == 0));
    assert_eq!(&m.ram[1][15 * 4096..], &page(3)[..]);
    assert_eq!(&m.sections[10..15], b"state");
    assert_eq!(&m.postcopy_sections[..3], &[0xaa, 0xbb, 0xcc]);
    assert_eq!(m.zeroed, vec![(9, 0, 16)]);
    assert_eq!(m.discarded, vec![(0, 60, 4)]);
    assert_eq!(m.discard_maps[0], DISCARD_MAP.to_le_bytes());
    assert_eq!(m.discard_maps[1], [0; 8]);
    assert_eq!(
        m.markers,
        vec![
            Repr::StopAndCopy,
            Repr::PostcopyListen,
            Repr::PostcopyRun,
            Repr::Go,
            Repr::End
        ]
    );
    assert_eq!(m.complete, 12);
}

/// Feeds `stream` in pieces of the given sizes (cycled).
fn decode(neg: Negotiated, stream: &[u8], sizes: &[usize]) -> Model {
    let mut dec = StreamDecoder::new(neg);
    let mut m = Model::new();
    let mut pos = 0;
    let mut k = 0;
    while pos < stream.len() {
        let n = sizes[k % sizes.len()].min(stream.len() - pos);
        k += 1;
        let mut input = &stream[pos..pos + n];
        loop {
            let s = dec.step(input).unwrap();
            if let Some(Event::Payload { bytes, .. }) = s.event {
                assert_eq!(bytes.as_ptr(), input.as_ptr(), "the payload is borrowed");
            }
            input = &input[s.consumed..];
            match s.event {
                Some(ev) => m.apply(ev),
                None if s.consumed == 0 => break,
                None => {}
            }
        }
        pos += n;
    }
    dec.finish().unwrap();
    assert_eq!(dec.offset(), stream.len() as u64);
    m
}

#[test]
fn whole_stream_into_guest_ram() {
    let n = neg(true);
    let s = build(&n, None);
    check_model(&decode(n, &s, &[s.len()]));
}

#[test]
fn one_byte_at_a_time() {
    let n = neg(true);
    let s = build(&n, None);
    check_model(&decode(n, &s, &[1]));
}

#[test]
fn odd_pieces_straddling_headers_and_payloads() {
    let n = neg(true);
    let s = build(&n, None);
    for sizes in [
        &[31usize, 33][..],
        &[7, 4096, 1, 100],
        &[32],
        &[4128],
        &[5000, 3],
    ] {
        check_model(&decode(n, &s, sizes));
    }
}

#[test]
fn without_checksums() {
    let n = neg(false);
    let s = build(&n, None);
    check_model(&decode(n, &s, &[13, 2000]));
}

#[test]
fn torn_page_is_reported_and_decoding_goes_on() {
    let n = neg(true);
    let s = build(&n, Some(4));
    let m = decode(n, &s, &[77]);
    assert_eq!(m.torn.len(), 1);
    assert_eq!(m.torn[0].page_run(), Some((9, 15, 1)));
    assert_eq!(m.torn[0].seq, 4);
    // Everything after it still arrived.
    assert_eq!(m.markers.last(), Some(&Repr::End));
    assert_eq!(m.complete, 11);
}

#[test]
fn torn_section_is_reported_too() {
    let n = neg(true);
    let s = build(&n, Some(0));
    let m = decode(n, &s, &[4096]);
    assert_eq!(m.torn.len(), 1);
    assert_eq!(m.torn[0].seq, 0);
}

#[test]
fn without_checksums_a_flipped_payload_is_not_detected() {
    // The documented consequence of not negotiating checksums.
    let n = neg(false);
    let s = build(&n, Some(4));
    let m = decode(n, &s, &[64]);
    assert!(m.torn.is_empty());
}

#[test]
fn header_event_says_where_the_payload_goes_before_it_arrives() {
    let n = neg(true);
    let s = build(&n, None);
    let mut dec = StreamDecoder::new(n);
    let st = dec.step(&s[..HEADER_LEN]).unwrap();
    assert_eq!(st.consumed, HEADER_LEN);
    let Some(Event::Header(r)) = st.event else {
        panic!("{st:?}")
    };
    assert_eq!(r.ram_dest(&n), Some((0, 3 * 4096)));
    assert_eq!(r.payload_len, 8192);
    assert_eq!(dec.payload_remaining(), 8192);
    // No input: nothing happens.
    let st = dec.step(&[]).unwrap();
    assert_eq!((st.consumed, st.event), (0, None));
}

#[test]
fn payload_received_in_place() {
    let n = neg(true);
    let s = build(&n, None);
    let mut dec = StreamDecoder::new(n);
    let mut ram = vec![0u8; 64 * 4096];
    let mut input = &s[..];
    let mut runs = 0;
    loop {
        let st = dec.step(input).unwrap();
        input = &input[st.consumed..];
        match st.event {
            Some(Event::Header(r)) if r.page_run().is_some() && r.page_run().unwrap().0 == 0 => {
                // The transport receives the payload straight into guest RAM, in two reads.
                let (_, off) = r.ram_dest(&n).unwrap();
                let len = r.payload_len as usize;
                let dst = &mut ram[off as usize..off as usize + len];
                dst.copy_from_slice(&input[..len]);
                assert_eq!(dec.accept_in_place(&dst[..1000]), 1000);
                assert_eq!(dec.accept_in_place(&dst[1000..]), len - 1000);
                assert_eq!(
                    dec.accept_in_place(&dst[..1]),
                    0,
                    "nothing beyond the payload"
                );
                input = &input[len..];
                let done = dec.step(input).unwrap();
                assert_eq!(done.consumed, 0);
                assert!(matches!(done.event, Some(Event::Complete(_))));
                runs += 1;
            }
            Some(_) => {}
            None if st.consumed == 0 => break,
            None => {}
        }
    }
    dec.finish().unwrap();
    assert_eq!(runs, 1);
    assert_eq!(&ram[3 * 4096..5 * 4096], &[page(1), page(2)].concat()[..]);
}

#[test]
fn in_place_payload_that_was_torn() {
    let n = neg(true);
    let s = build(&n, Some(0));
    let mut dec = StreamDecoder::new(n);
    let st = dec.step(&s).unwrap();
    assert!(matches!(st.event, Some(Event::Header(_))));
    let body = &s[HEADER_LEN..HEADER_LEN + 8192];
    assert_eq!(dec.accept_in_place(body), 8192);
    assert!(matches!(
        dec.step(&[]).unwrap().event,
        Some(Event::Torn { .. })
    ));
}

#[test]
fn accept_in_place_outside_a_payload_takes_nothing() {
    let mut dec = StreamDecoder::new(neg(true));
    assert_eq!(dec.accept_in_place(&[1, 2, 3]), 0);
    assert_eq!(dec.offset(), 0);
}

/// A discard map over pages 128..428 of a 1024-page region: its 40-byte bitmap
/// arrives as `Dest::DiscardMap` pieces at bitmap bytes 16..56, whatever the split.
#[test]
fn discard_map_payload_goes_to_the_region_bitmap() {
    let layout = Layout::new(
        PAGE,
        &[Region {
            id: 5,
            gpa: 0,
            size: 1024 * 4096,
        }],
    )
    .unwrap();
    let caps = Capabilities {
        postcopy_ram: true,
        postcopy_only_sections: false,
        payload_checksums: true,
        channels: 1,
    };
    let n = Negotiated::new(layout, caps);
    let map = Repr::DiscardMap {
        region: 5,
        first: 128,
        count: 300,
    };
    // Pages to drop: 128, 191, 192, 300 and 427 (the last one covered).
    let dropped = [128u64, 191, 192, 300, 427];
    let mut words = [0u64; 5];
    for p in dropped {
        let i = (p - 128) as usize;
        words[i / 64] |= 1 << (i % 64);
    }
    let payload: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(payload.len(), 40);

    let mut enc = StreamEncoder::new(&n);
    let mut stream = Vec::new();
    for (repr, body) in [
        (Repr::PostcopyListen, &[][..]),
        (map, &payload[..]),
        (Repr::End, &[][..]),
    ] {
        let mut head = [0u8; HEADER_LEN];
        enc.encode(&repr, body, &mut head).unwrap();
        stream.extend_from_slice(&head);
        stream.extend_from_slice(body);
    }

    for size in [1usize, 3, 7, 31, 33, stream.len()] {
        let mut dec = StreamDecoder::new(n);
        let mut bitmap = [0u8; 1024 / 8];
        let mut next = None;
        let mut header = None;
        for piece in stream.chunks(size) {
            let mut input = piece;
            loop {
                let st = dec.step(input).unwrap();
                input = &input[st.consumed..];
                match st.event {
                    Some(Event::Header(r)) if r.repr == map => {
                        assert_eq!(r.payload_len, 40);
                        header = Some(r);
                        next = Some(16);
                    }
                    Some(Event::Payload { dest, bytes, .. }) => {
                        let Dest::DiscardMap { region, offset } = dest else {
                            panic!("{dest:?} for a discard map");
                        };
                        assert_eq!(region, 5);
                        assert_eq!(Some(offset), next, "pieces are contiguous");
                        let o = offset as usize;
                        bitmap[o..o + bytes.len()].copy_from_slice(bytes);
                        next = Some(offset + bytes.len() as u64);
                    }
                    Some(Event::Complete(r)) if r.repr == map => {
                        assert_eq!(next, Some(56), "the whole bitmap arrived");
                    }
                    Some(Event::Torn { record, .. }) => panic!("{record:?} torn"),
                    Some(_) => {}
                    None if st.consumed == 0 => break,
                    None => {}
                }
            }
        }
        dec.finish().unwrap();
        assert!(header.is_some(), "size {size}");
        assert_eq!(&bitmap[16..56], &payload[..], "size {size}");
        let set: Vec<u64> = (0..1024u64)
            .filter(|&p| bitmap[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect();
        assert_eq!(set, dropped, "size {size}");
    }
}

#[test]
fn return_path_byte_at_a_time() {
    let n = neg(true);
    let recs = [
        ReturnRepr::Accept {
            max_channels: 4,
            max_device_bytes: 1 << 20,
            session: 0,
        },
        ReturnRepr::PageRequest {
            region: 9,
            first: 2,
            count: 3,
        },
        ReturnRepr::Resend {
            region: 0,
            first: 63,
            count: 1,
        },
        ReturnRepr::Ready,
        ReturnRepr::Error {
            code: ErrorCode::Checksum,
            detail: 77,
        },
    ];
    let mut bytes = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        let mut h = [0u8; HEADER_LEN];
        r.emit(i as u32, &mut h);
        bytes.extend_from_slice(&h);
    }
    let mut dec = ReturnDecoder::new(n);
    let mut got = Vec::new();
    for b in bytes.chunks(1) {
        let (used, rec) = dec.step(b).unwrap();
        assert_eq!(used, 1);
        got.extend(rec);
    }
    assert!(!dec.in_record());
    let reprs: Vec<_> = got.iter().map(|r| r.repr).collect();
    assert_eq!(reprs, recs);
    assert_eq!(
        got.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );

    // All at once: one record per step.
    let mut dec = ReturnDecoder::new(n);
    let mut input = &bytes[..];
    let mut count = 0;
    while !input.is_empty() {
        let (used, rec) = dec.step(input).unwrap();
        assert_eq!(used, HEADER_LEN);
        assert!(rec.is_some());
        input = &input[used..];
        count += 1;
    }
    assert_eq!(count, 5);
    assert_eq!(dec.step(&[]).unwrap(), (0, None));
}

#[test]
fn offsets_can_start_after_the_hello() {
    let n = neg(true);
    let mut dec = StreamDecoder::starting_at(n, 1000);
    let mut bad = [0u8; HEADER_LEN];
    Repr::Go.emit(PAGE, 1, 0, &mut bad).unwrap(); // seq 1 where 0 is due
    let e = dec.step(&bad).unwrap_err();
    assert_eq!((e.offset, e.seq), (1000, 1));
}
