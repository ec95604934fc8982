//! The handover against fake peers over real loopback sockets: a destination
//! that answers *ready* and vanishes, one that stalls at stop-and-copy, and
//! sources that fall silent at each of the destination's waits. Each case
//! checks where the guest ends up and that every wait ends within its bound.

mod common;
use common::{fill, memory, tracker_for, Writer};

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use ferry_core::session::{DestinationSession, Failure, Limits, Timeouts, Wait};
use ferry_core::wire::{Capabilities, Hello, Negotiated, Repr};
use ferry_host::destination::{self, DestinationConfig, DestinationErrorKind};
use ferry_host::link::{self, Conn, Listener, ReturnWriter, WireDecoder};
use ferry_host::migration::{CallbackError, DeviceSection, GuestStarter, SourceConfig};
use ferry_host::ram::Ram;
use ferry_host::source::{self, SourceError, SourceLink};
use ferry_uring::{RecvStrategy, Transport};

const MIB: u64 = 1 << 20;

fn short_timeouts() -> Timeouts {
    Timeouts {
        handshake: 2_000_000_000,
        idle: 1_500_000_000,
        ready: 1_500_000_000,
        go: 1_500_000_000,
        started: 1_500_000_000,
        resend: 1_500_000_000,
    }
}

/// What a fake destination does once the source's end of stream arrived.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AfterEnd {
    /// Answers ready, reads go, then closes without answering started.
    ReadyThenVanish,
    /// Never answers, keeps the connection open and reads nothing more.
    Stall,
}

/// A fake destination: a real handshake, then it reads the control channel
/// record by record (and drains the bulk channel) until the end of stream.
fn fake_destination(listener: &Listener, ram: &Ram<'_>, after: AfterEnd) -> Option<Repr> {
    let mut ctl = listener.accept().expect("accept");
    let ours = Hello::new(
        Capabilities {
            postcopy_ram: false,
            postcopy_only_sections: false,
            payload_checksums: true,
            channels: 2,
        },
        ram.layout().expect("layout"),
    );
    let ret = ReturnWriter::new(ctl.try_clone().expect("clone"));
    let mut session = DestinationSession::new(
        0,
        Timeouts::DEFAULT,
        Limits {
            max_channels: 4,
            max_device_bytes: 64 * MIB,
        },
    );
    let neg: Negotiated =
        link::destination_handshake(&mut ctl, &ours, &ret, &mut session).expect("handshake");
    let mut bulk = listener.accept().expect("accept bulk");
    let drain = thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        while matches!(bulk.read(&mut buf), Ok(n) if n > 0) {}
    });
    let mut dec = WireDecoder::buffered(neg, 4 * MIB as usize);
    let mut buf = vec![0u8; 4 * MIB as usize];
    loop {
        let Ok(Some((rec, _))) = link::read_stream_record(&mut ctl, &mut dec, &mut buf) else {
            return None;
        };
        if rec.repr == Repr::End {
            break;
        }
    }
    let last = match after {
        AfterEnd::ReadyThenVanish => {
            ret.send(&ferry_core::wire::ReturnRepr::Ready)
                .expect("ready");
            let got = link::read_stream_record(&mut ctl, &mut dec, &mut buf)
                .ok()
                .flatten()
                .map(|(r, _)| r.repr);
            let _ = ctl.shutdown();
            got
        }
        AfterEnd::Stall => {
            // Hold the socket open, silent, well past the source's bound.
            thread::sleep(Duration::from_secs(4));
            None
        }
    };
    drop(drain);
    last
}

fn run_against(
    after: AfterEnd,
) -> (
    Result<ferry_host::migration::SourceReport, SourceError>,
    Option<Repr>,
    (u64, u64),
    Duration,
) {
    let src_mem = memory(32 * MIB);
    fill(&src_mem);
    let listener = Listener::bind(&"127.0.0.1:0".parse().expect("endpoint")).expect("bind");
    let endpoint = listener.local_endpoint().expect("endpoint");
    let src_ram = Ram::from_memory(&src_mem);
    let mut tracker = tracker_for(&src_mem);
    let mut writer = Writer::start(src_mem.regions()[0].host_ptr() as usize, 256, 4);
    writer.sections.push(DeviceSection {
        id: 1,
        bytes: vec![7; 4096],
    });
    let config = SourceConfig {
        timeouts: short_timeouts(),
        ..SourceConfig::default()
    };
    let (result, last, took) = thread::scope(|s| {
        let fake = s.spawn(|| fake_destination(&listener, &src_ram, after));
        let link = SourceLink {
            endpoint,
            transport: Transport::Std(RecvStrategy::Direct),
            bulk_channels: 1,
        };
        let t = Instant::now();
        let r = source::migrate(
            &src_ram,
            &mut tracker,
            &mut writer,
            &config,
            &link,
            &mut |_| {},
        );
        let took = t.elapsed();
        (r, fake.join().expect("fake destination"), took)
    });
    let counts = (
        writer.pauses.load(Ordering::Relaxed),
        writer.resumes.load(Ordering::Relaxed),
    );
    // The writer stops (dropped) before its memory is unmapped.
    drop(writer);
    (result, last, counts, took)
}

#[test]
fn a_destination_that_answers_ready_and_vanishes_leaves_the_guest_held() {
    let (result, last, (pauses, resumes), took) = run_against(AfterEnd::ReadyThenVanish);
    assert_eq!(last, Some(Repr::Go), "the fake destination received go");
    let err = result.expect_err("never a success without started");
    eprintln!("source: {err}");
    assert!(
        matches!(err, SourceError::GoUnconfirmed { .. }),
        "go sent, not confirmed: {err:?}"
    );
    assert_eq!(pauses, 1, "paused once");
    assert_eq!(resumes, 0, "never resumed on its own after go");
    assert!(
        took < Duration::from_secs(10),
        "ended within its bound: {took:?}"
    );
}

#[test]
fn a_stall_at_stop_and_copy_resumes_the_guest_within_the_ready_bound() {
    let (result, _, (pauses, resumes), took) = run_against(AfterEnd::Stall);
    let err = result.expect_err("no ready");
    eprintln!("source: {err}");
    match &err {
        SourceError::Session(e) => assert_eq!(
            e.failure,
            Failure::Timeout {
                wait: Wait::Ready,
                after_ns: short_timeouts().ready
            }
        ),
        other => panic!("expected the ready bound to fire, got {other:?}"),
    }
    assert_eq!(pauses, 1);
    assert_eq!(resumes, 1, "resumed here");
    // The bound (1.5 s) plus the precopy of 32 MiB, far below the fake's 4 s stall.
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

#[derive(Default)]
struct Starter(u32);

impl GuestStarter for Starter {
    fn start(&mut self, _: &[DeviceSection]) -> Result<(), CallbackError> {
        self.0 += 1;
        Ok(())
    }
}

/// Runs a real destination against `peer`, which plays the source.
fn destination_against(
    peer: impl FnOnce(link::Endpoint) + Send,
) -> (
    Result<ferry_host::migration::DestinationReport, destination::DestinationError>,
    u32,
    Duration,
) {
    destination_limited(
        DestinationConfig::new(Transport::Std(RecvStrategy::Direct)).limits,
        peer,
    )
}

/// As [`destination_against`], with the destination stating `limits`.
fn destination_limited(
    limits: Limits,
    peer: impl FnOnce(link::Endpoint) + Send,
) -> (
    Result<ferry_host::migration::DestinationReport, destination::DestinationError>,
    u32,
    Duration,
) {
    let dst_mem = memory(8 * MIB);
    let listener = Listener::bind(&"127.0.0.1:0".parse().expect("endpoint")).expect("bind");
    let endpoint = listener.local_endpoint().expect("endpoint");
    let dst_ram = Ram::from_memory(&dst_mem);
    let config = DestinationConfig {
        timeouts: short_timeouts(),
        limits,
        ..DestinationConfig::new(Transport::Std(RecvStrategy::Direct))
    };
    let mut starter = Starter::default();
    let (r, took) = thread::scope(|s| {
        s.spawn(move || peer(endpoint));
        let t = Instant::now();
        let r = destination::receive_with(&listener, &dst_ram, &mut starter, &config);
        (r, t.elapsed())
    });
    (r, starter.0, took)
}

fn hello_for(mem: u64, channels: u16) -> Vec<u8> {
    let m = memory(mem);
    let ram = Ram::from_memory(&m);
    let hello = Hello::new(
        Capabilities {
            postcopy_ram: false,
            postcopy_only_sections: false,
            payload_checksums: true,
            channels,
        },
        ram.layout().expect("layout"),
    );
    let mut buf = vec![0u8; ferry_core::wire::MAX_HELLO_LEN];
    let n = hello.emit(&mut buf).expect("emit");
    buf.truncate(n);
    buf
}

#[test]
fn a_silent_peer_at_the_hello_gets_a_clear_error_in_time() {
    let (r, started, took) = destination_against(|ep| {
        let c = link::connect(&ep).expect("connect");
        thread::sleep(Duration::from_secs(4));
        drop(c);
    });
    let e = r.expect_err("no hello");
    eprintln!("destination: {e}");
    assert!(!e.go_received);
    assert_eq!(started, 0);
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

#[test]
fn a_source_silent_after_the_handshake_times_out_idle() {
    let (r, started, took) = destination_against(|ep| {
        let mut c = link::connect(&ep).expect("connect");
        c.write_all(&hello_for(8 * MIB, 2)).expect("hello");
        let _bulk = link::connect(&ep).expect("bulk");
        thread::sleep(Duration::from_secs(5));
        drop(c);
    });
    let e = r.expect_err("silence");
    eprintln!("destination: {e}");
    match &e.kind {
        DestinationErrorKind::Session(s) => assert_eq!(
            s.failure,
            Failure::Timeout {
                wait: Wait::Idle,
                after_ns: short_timeouts().idle
            }
        ),
        other => panic!("expected the idle bound, got {other:?}"),
    }
    assert!(!e.go_received);
    assert_eq!(started, 0);
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn too_many_channels_are_refused_at_the_hello() {
    let (r, started, _) = destination_against(|ep| {
        let mut c: Conn = link::connect(&ep).expect("connect");
        c.write_all(&hello_for(8 * MIB, 40)).expect("hello");
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    });
    let e = r.expect_err("refused");
    eprintln!("destination: {e}");
    assert!(
        e.to_string().contains("more than the 16 this side serves"),
        "{e}"
    );
    assert_eq!(started, 0);
}

#[test]
fn ready_is_refused_with_pages_missing() {
    // A source that sends the markers and the end of the stream but no page.
    let (r, started, _) = destination_against(|ep| {
        let (mut c, mut bulk, neg) = hostile(&ep);
        let (mut ctl_enc, mut bulk_enc) = (
            ferry_core::wire::StreamEncoder::new(&neg),
            ferry_core::wire::StreamEncoder::new(&neg),
        );
        let mut h = [0u8; ferry_core::wire::HEADER_LEN];
        bulk_enc.encode(&Repr::End, &[], &mut h).expect("encode");
        bulk.write_all(&h).expect("bulk end");
        for r in [Repr::StopAndCopy, Repr::End] {
            ctl_enc.encode(&r, &[], &mut h).expect("encode");
            c.write_all(&h).expect("record");
        }
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    });
    let e = r.expect_err("pages missing");
    eprintln!("destination: {e}");
    match &e.kind {
        DestinationErrorKind::Session(s) => assert_eq!(s.failure, Failure::Incomplete),
        other => panic!("expected an incomplete stream, got {other:?}"),
    }
    assert_eq!(started, 0, "never started");
    assert!(!e.go_received);
}

#[test]
fn a_section_flood_is_refused_at_the_stated_cap() {
    let cap = MIB;
    let limits = Limits {
        max_channels: 4,
        max_device_bytes: cap,
    };
    let (r, started, _) = destination_limited(limits, move |ep| {
        let mut c = link::connect(&ep).expect("connect");
        c.write_all(&hello_for(8 * MIB, 2)).expect("hello");
        // The accept states the cap.
        let mut accept = [0u8; ferry_core::wire::HEADER_LEN];
        c.read_exact(&mut accept).expect("accept");
        let hdr = ferry_core::wire::Header::new_checked(&accept[..]).expect("header");
        assert_eq!(hdr.first(), cap, "the accept states the device-state cap");
        let _bulk = link::connect(&ep).expect("bulk");
        let m = memory(8 * MIB);
        let neg = Negotiated::new(
            Ram::from_memory(&m).layout().expect("layout"),
            Capabilities {
                postcopy_ram: false,
                postcopy_only_sections: false,
                payload_checksums: true,
                channels: 2,
            },
        );
        let mut enc = ferry_core::wire::StreamEncoder::new(&neg);
        let chunk = vec![0x5a_u8; 64 << 10];
        let mut h = [0u8; ferry_core::wire::HEADER_LEN];
        // Up to 64 MiB, far past the cap; the destination stops reading.
        for i in 0..1024u64 {
            let rec = Repr::Section {
                section: 1,
                offset: i * chunk.len() as u64,
                len: chunk.len() as u32,
                last: false,
            };
            enc.encode(&rec, &chunk, &mut h).expect("encode");
            if c.write_all(&h).and_then(|()| c.write_all(&chunk)).is_err() {
                break;
            }
        }
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    });
    let e = r.expect_err("refused");
    eprintln!("destination: {e}");
    match &e.kind {
        DestinationErrorKind::Session(s) => assert_eq!(s.failure, Failure::OverLimit),
        other => panic!("expected the cap, got {other:?}"),
    }
    assert_eq!(started, 0);
}

#[test]
fn a_bad_checksum_on_a_page_from_the_paused_source_fails_the_migration() {
    // After the pause a page cannot be torn: a bad checksum is corruption,
    // never asked for again and never installed silently.
    let (r, started, _) = destination_against(|ep| {
        let (mut c, mut bulk, neg) = hostile(&ep);
        let mut enc = ferry_core::wire::StreamEncoder::new(&neg);
        let page = vec![0x33_u8; 4096];
        let mut h = [0u8; ferry_core::wire::HEADER_LEN];
        let run = Repr::PageRun {
            region: 0,
            first: 3,
            count: 1,
            requested: false,
            paused: true,
        };
        enc.encode_with_crc(&run, ferry_core::wire::payload_crc(&page) ^ 1, &mut h)
            .expect("encode");
        bulk.write_all(&h)
            .and_then(|()| bulk.write_all(&page))
            .expect("page");
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    });
    let e = r.expect_err("corruption");
    eprintln!("destination: {e}");
    assert!(
        matches!(
            e.kind,
            DestinationErrorKind::Checksum {
                region: 0,
                first: 3,
                count: 1
            }
        ),
        "{e:?}"
    );
    assert_eq!(started, 0);
}

/// The hostile source's connections after a good hello: control, one bulk.
fn hostile(ep: &link::Endpoint) -> (Conn, Conn, Negotiated) {
    let mut c = link::connect(ep).expect("connect");
    c.write_all(&hello_for(8 * MIB, 2)).expect("hello");
    let bulk = link::connect(ep).expect("bulk");
    let m = memory(8 * MIB);
    let neg = Negotiated::new(
        Ram::from_memory(&m).layout().expect("layout"),
        Capabilities {
            postcopy_ram: false,
            postcopy_only_sections: false,
            payload_checksums: true,
            channels: 2,
        },
    );
    (c, bulk, neg)
}

#[test]
fn a_page_run_past_the_end_of_guest_ram_is_refused_before_a_byte_is_written() {
    let (r, started, _) = destination_against(|ep| {
        let (mut c, mut bulk, neg) = hostile(&ep);
        // A well-formed header whose pages lie past the region's end, with a
        // valid header checksum: only the layout check can stop it.
        let mut h = ferry_core::wire::RecordHeader {
            kind: 0x01,
            flags: 0,
            id: 0u16.into(),
            count: 4u32.into(),
            first: (8 * MIB / 4096 - 2).into(),
            payload_len: (4 * 4096u32).into(),
            payload_crc: 0u32.into(),
            seq: 0u32.into(),
            header_crc: 0u32.into(),
        };
        h.seal();
        let _ = neg;
        let _ = bulk.write_all(zerocopy::IntoBytes::as_bytes(&h));
        let _ = bulk.write_all(&vec![0xee; 4 * 4096]);
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    });
    let e = r.expect_err("out of range");
    eprintln!("destination: {e}");
    assert!(
        e.to_string().contains("region") || e.to_string().contains("outside"),
        "{e}"
    );
    assert_eq!(started, 0);
}

#[test]
fn a_record_cut_short_then_silence_ends_within_the_idle_bound() {
    let (r, started, took) = destination_against(|ep| {
        let (mut c, _bulk, neg) = hostile(&ep);
        let mut enc = ferry_core::wire::StreamEncoder::new(&neg);
        let chunk = vec![1u8; 4096];
        let mut h = [0u8; ferry_core::wire::HEADER_LEN];
        let rec = Repr::Section {
            section: 1,
            offset: 0,
            len: chunk.len() as u32,
            last: true,
        };
        enc.encode(&rec, &chunk, &mut h).expect("encode");
        // The header and half the payload, then nothing.
        c.write_all(&h)
            .and_then(|()| c.write_all(&chunk[..2048]))
            .expect("write");
        thread::sleep(Duration::from_secs(5));
    });
    let e = r.expect_err("silence");
    eprintln!("destination: {e}");
    match &e.kind {
        DestinationErrorKind::Session(s) => assert_eq!(
            s.failure,
            Failure::Timeout {
                wait: Wait::Idle,
                after_ns: short_timeouts().idle
            }
        ),
        other => panic!("expected the idle bound, got {other:?}"),
    }
    assert_eq!(started, 0);
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn go_before_ready_and_a_replayed_hello_are_refused() {
    for replay in [false, true] {
        let (r, started, _) = destination_against(move |ep| {
            let (mut c, _bulk, neg) = hostile(&ep);
            if replay {
                // The same hello again on the control channel.
                c.write_all(&hello_for(8 * MIB, 2)).expect("hello again");
            } else {
                let mut enc = ferry_core::wire::StreamEncoder::new(&neg);
                let mut h = [0u8; ferry_core::wire::HEADER_LEN];
                enc.encode(&Repr::Go, &[], &mut h).expect("encode");
                c.write_all(&h).expect("go");
            }
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
        });
        let e = r.expect_err("refused");
        eprintln!("destination (replay {replay}): {e}");
        assert!(!e.go_received, "go was never accepted");
        assert_eq!(started, 0, "the guest never started");
    }
}

#[test]
fn a_destination_that_stops_reading_in_precopy_ends_the_migration_within_give_up() {
    // 256 MiB cannot fit in socket buffers: the senders block on a peer that
    // accepted everything and reads nothing.
    let src_mem = memory(256 * MIB);
    fill(&src_mem);
    let listener = Listener::bind(&"127.0.0.1:0".parse().expect("endpoint")).expect("bind");
    let endpoint = listener.local_endpoint().expect("endpoint");
    let src_ram = Ram::from_memory(&src_mem);
    let mut tracker = tracker_for(&src_mem);
    let mut writer = Writer::start(src_mem.regions()[0].host_ptr() as usize, 256, 4);
    let config = SourceConfig {
        give_up_after: Some(Duration::from_secs(2)),
        timeouts: short_timeouts(),
        ..SourceConfig::default()
    };
    let (result, took) = thread::scope(|s| {
        s.spawn(|| {
            let mut ctl = listener.accept().expect("accept");
            let ours = Hello::new(
                Capabilities {
                    postcopy_ram: false,
                    postcopy_only_sections: false,
                    payload_checksums: true,
                    channels: 2,
                },
                src_ram.layout().expect("layout"),
            );
            let ret = ReturnWriter::new(ctl.try_clone().expect("clone"));
            let mut session = DestinationSession::new(
                0,
                Timeouts::DEFAULT,
                Limits {
                    max_channels: 4,
                    max_device_bytes: MIB,
                },
            );
            link::destination_handshake(&mut ctl, &ours, &ret, &mut session).expect("handshake");
            let bulk = listener.accept().expect("accept bulk");
            // Read nothing, hold everything open.
            thread::sleep(Duration::from_secs(6));
            drop((bulk, ctl));
        });
        let link = SourceLink {
            endpoint,
            transport: Transport::Std(RecvStrategy::Direct),
            bulk_channels: 1,
        };
        let t = Instant::now();
        let r = source::migrate(
            &src_ram,
            &mut tracker,
            &mut writer,
            &config,
            &link,
            &mut |_| {},
        );
        (r, t.elapsed())
    });
    let err = result.expect_err("a stalled peer");
    eprintln!("source: {err} after {took:?}");
    // The bound is the shorter of give_up_after (2 s) and the idle bound (1.5 s).
    assert!(
        matches!(err, SourceError::Stalled { after_ms: 1500 }),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(writer.pauses.load(Ordering::Relaxed), 0, "never paused");
    let before = writer.written.load(Ordering::Relaxed);
    thread::sleep(Duration::from_millis(50));
    assert!(
        writer.written.load(Ordering::Relaxed) > before,
        "the guest runs on"
    );
    drop(writer);
}

#[test]
fn a_source_that_never_opens_its_bulk_channel_is_given_up_within_the_handshake_bound() {
    let (r, started, took) = destination_against(|ep| {
        let mut c = link::connect(&ep).expect("connect");
        c.write_all(&hello_for(8 * MIB, 2)).expect("hello");
        let mut accept = [0u8; ferry_core::wire::HEADER_LEN];
        c.read_exact(&mut accept).expect("accept");
        // No bulk connection; the control connection stays open, silent.
        thread::sleep(Duration::from_secs(4));
    });
    let e = r.expect_err("no bulk channel");
    eprintln!("destination: {e}");
    assert!(
        matches!(
            e.kind,
            DestinationErrorKind::Link(link::LinkError::AcceptTimeout {
                channel: link::ChannelRole::Bulk(0),
                after_ms: 2000
            })
        ),
        "{e:?}"
    );
    assert_eq!(started, 0);
    assert!(took < Duration::from_secs(4), "took {took:?}");
}
