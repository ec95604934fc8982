//! End-to-end migrations of a plain process memory region: a writer thread
//! stands in for the guest, the userfaultfd write-protect tracker logs its
//! writes, and source and destination talk over real loopback sockets through
//! the real transports.

mod common;
use common::{fill, memory, same_bytes, tracker_for, Starter, Writer};

use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use ferry_host::destination::{self, DestinationErrorKind};
use ferry_host::link::{Conn, Connected, Endpoint, Listener};
use ferry_host::migration::{DeviceSection, SourceConfig};
use ferry_host::ram::{Ram, PAGE_SIZE};
use ferry_host::source::{self, SourceError, SourceLink};
use ferry_uring::{RecvStrategy, Transport, UringConfig};

const MIB: u64 = 1 << 20;

/// The writer of these tests: `hot_pages` of the `len` bytes at `base`,
/// handing over a large and an empty device section besides the registers.
fn migrate_writer(base: usize, len: usize, pages_per_ms: u64, hot_pages: u64) -> Writer {
    let mut w = Writer::start(
        base,
        (len as u64 / PAGE_SIZE).min(hot_pages.max(1)),
        pages_per_ms,
    );
    let big: Vec<u8> = (0..3 * MIB as usize).map(|i| (i * 7 % 251) as u8).collect();
    w.sections.push(DeviceSection { id: 2, bytes: big });
    w.sections.push(DeviceSection {
        id: 3,
        bytes: Vec::new(),
    });
    w.estimate = 64 * 1024;
    w
}

fn transports() -> Vec<(&'static str, Transport)> {
    vec![
        ("uring", Transport::Uring(UringConfig::default())),
        ("std", Transport::Std(RecvStrategy::Direct)),
    ]
}

/// How the two sides of a test migration get their connections.
enum Wiring {
    /// The destination listens here and the source dials it.
    Dial(Endpoint),
    /// Streams connected beforehand, as management software would hand in.
    Given { src: Connected, dst: Connected },
}

/// `bulk` bulk streams besides the control one, each a connected Unix socket
/// pair: one end for the source, the other for the destination.
fn unix_pairs(bulk: usize) -> Wiring {
    let pair = || UnixStream::pair().expect("socketpair");
    let (a, b) = pair();
    let (mut src, mut dst) = (Connected::new(Conn::Unix(a)), Connected::new(Conn::Unix(b)));
    for _ in 0..bulk {
        let (a, b) = pair();
        src = src.with_bulk(Conn::Unix(a));
        dst = dst.with_bulk(Conn::Unix(b));
    }
    Wiring::Given { src, dst }
}

/// As [`unix_pairs`], over loopback TCP, each stream handed over as a bare
/// file descriptor (the way a management process passes sockets in).
fn tcp_fds(bulk: usize) -> Wiring {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let pair = || {
        let a = TcpStream::connect(addr).expect("connect");
        let (b, _) = l.accept().expect("accept");
        let fd = |s: TcpStream| Conn::from_fd(OwnedFd::from(s)).expect("a TCP socket is accepted");
        (fd(a), fd(b))
    };
    let (a, b) = pair();
    let (mut src, mut dst) = (Connected::new(a), Connected::new(b));
    for _ in 0..bulk {
        let (a, b) = pair();
        src = src.with_bulk(a);
        dst = dst.with_bulk(b);
    }
    Wiring::Given { src, dst }
}

fn migrate_under_writes(transport: Transport, channels: usize, wiring: Wiring) {
    let src_mem = memory(96 * MIB);
    let dst_mem = memory(96 * MIB);
    fill(&src_mem);
    let src_ram = Ram::from_memory(&src_mem);
    let dst_ram = Ram::from_memory(&dst_mem);
    let base = src_mem.regions()[0].host_ptr() as usize;
    let mut tracker = tracker_for(&src_mem);
    let mut writer = migrate_writer(base, (96 * MIB) as usize, 8, 4096);
    let config = SourceConfig {
        give_up_after: Some(Duration::from_secs(60)),
        ..SourceConfig::default()
    };
    let (report, dst) = thread::scope(|s| match wiring {
        Wiring::Dial(endpoint) => {
            let listener = Listener::bind(&endpoint).expect("bind");
            let endpoint = listener.local_endpoint().expect("endpoint");
            let dst = s.spawn(move || {
                let mut starter = Starter::default();
                destination::receive(&listener, &dst_ram, &mut starter, transport)
                    .map(|r| (r, starter))
            });
            let link = SourceLink {
                endpoint,
                transport,
                bulk_channels: channels,
            };
            let report = source::migrate(
                &src_ram,
                &mut tracker,
                &mut writer,
                &config,
                &link,
                &mut |_| {},
            );
            (report, dst.join().expect("destination thread"))
        }
        Wiring::Given { mut src, dst } => {
            let dst = s.spawn(move || {
                let mut starter = Starter::default();
                destination::receive(dst, &dst_ram, &mut starter, transport).map(|r| (r, starter))
            });
            // `channels` is ignored: the source uses as many bulk streams
            // as it was given.
            let report = source::migrate_over(
                &src_ram,
                &mut tracker,
                &mut writer,
                &config,
                &mut src,
                transport,
                channels,
                &mut |_| {},
            );
            (report, dst.join().expect("destination thread"))
        }
    });
    let report = report.expect("the migration succeeds");
    let (dst_report, starter) = dst.expect("the destination succeeds");
    // The guest stayed paused after go: the source memory is final.
    assert_eq!(writer.pauses.load(Ordering::Relaxed), 1);
    assert_eq!(writer.resumes.load(Ordering::Relaxed), 0);
    assert!(
        writer.written.load(Ordering::Relaxed) > 0,
        "the writer wrote while migrating"
    );
    same_bytes(&src_mem, &dst_mem).expect("destination RAM equals source RAM");
    assert_eq!(starter.sections.len(), 3);
    assert_eq!(starter.sections[0].bytes, b"registers of the writer");
    assert_eq!(starter.sections[1].bytes.len(), 3 * MIB as usize);
    assert!(starter.sections[2].bytes.is_empty());
    assert!(
        report.zero_pages >= 96 * MIB / PAGE_SIZE / 8 - 600,
        "zero pages sent as zero runs: {}",
        report.zero_pages
    );
    assert!(dst_report.resumed_at_ns >= report.paused_at_ns);
    assert!(report.pages_sent + report.zero_pages >= 96 * MIB / PAGE_SIZE);
}

#[test]
fn process_memory_migrates_byte_exact_under_writes() {
    for (name, t) in transports() {
        eprintln!("transport {name}");
        migrate_under_writes(t, 1, Wiring::Dial("127.0.0.1:0".parse().expect("endpoint")));
    }
}

#[test]
fn two_bulk_channels_over_unix_sockets() {
    for (name, t) in transports() {
        eprintln!("transport {name}");
        let path =
            std::env::temp_dir().join(format!("ferry-test-{}-{name}.sock", std::process::id()));
        migrate_under_writes(t, 2, Wiring::Dial(Endpoint::Unix(path)));
    }
}

/// Management software owns the connections: it opens Unix socket pairs
/// and loopback TCP connections itself and hands one end of each to either
/// side (the TCP ones as bare file descriptors).
#[test]
fn migrates_over_connections_the_caller_opened() {
    for (name, t) in transports() {
        eprintln!("transport {name}, unix socket pairs");
        migrate_under_writes(t, 0, unix_pairs(2));
        eprintln!("transport {name}, TCP file descriptors");
        migrate_under_writes(t, 0, tcp_fds(1));
    }
}

/// A file descriptor that is not a TCP or Unix stream socket is refused
/// with an error that says what it is.
#[test]
fn a_descriptor_that_is_not_a_stream_socket_is_refused() {
    let file = std::fs::File::open("/proc/self/status").expect("open");
    let err = Conn::from_fd(OwnedFd::from(file)).expect_err("a file is not a socket");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTSOCK), "{err}");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let err = Conn::from_fd(OwnedFd::from(udp)).expect_err("UDP is not a stream");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("not a stream socket"), "{err}");
}

/// The destination was handed fewer bulk streams than the source opens: it
/// says which one is missing, and the source's guest was never paused.
#[test]
fn a_missing_caller_connection_fails_cleanly_and_the_guest_runs_on() {
    let src_mem = memory(32 * MIB);
    let dst_mem = memory(32 * MIB);
    fill(&src_mem);
    let (src_ram, dst_ram) = (Ram::from_memory(&src_mem), Ram::from_memory(&dst_mem));
    let mut tracker = tracker_for(&src_mem);
    let mut writer = migrate_writer(
        src_mem.regions()[0].host_ptr() as usize,
        (32 * MIB) as usize,
        1,
        64,
    );
    // The source gets two bulk streams, the destination only the first.
    let (c_src, c_dst) = UnixStream::pair().expect("socketpair");
    let (b_src, b_dst) = UnixStream::pair().expect("socketpair");
    let (b2_src, b2_dst) = UnixStream::pair().expect("socketpair");
    let mut src = Connected::new(Conn::Unix(c_src))
        .with_bulk(Conn::Unix(b_src))
        .with_bulk(Conn::Unix(b2_src));
    let dst = Connected::new(Conn::Unix(c_dst)).with_bulk(Conn::Unix(b_dst));
    let transport = Transport::Uring(UringConfig::default());
    let (src_result, dst_result) = thread::scope(|s| {
        let dst = s.spawn(|| {
            let r = destination::receive(dst, &dst_ram, &mut Starter::default(), transport);
            // The destination process ends: every descriptor it held closes,
            // the one it was never asked for too.
            drop(b2_dst);
            r
        });
        let r = source::migrate_over(
            &src_ram,
            &mut tracker,
            &mut writer,
            &SourceConfig::default(),
            &mut src,
            transport,
            1,
            &mut |_| {},
        );
        (r, dst.join().expect("destination thread"))
    });
    let derr = dst_result.expect_err("the destination lacks bulk 1");
    assert!(!derr.go_received);
    assert!(
        derr.to_string()
            .contains("no connection was given for the bulk 1 channel"),
        "{derr}"
    );
    src_result.expect_err("the source fails too");
    assert_eq!(
        writer.pauses.load(Ordering::Relaxed),
        writer.resumes.load(Ordering::Relaxed),
        "the source guest runs: every pause was undone"
    );
}

/// A destination whose RAM differs refuses the handshake; the source's
/// guest is never paused.
#[test]
fn layout_mismatch_is_refused_and_the_source_is_unharmed() {
    let src_mem = memory(64 * MIB);
    let dst_mem = memory(32 * MIB);
    let listener = Listener::bind(&"127.0.0.1:0".parse().expect("endpoint")).expect("bind");
    let endpoint = listener.local_endpoint().expect("endpoint");
    let (src_ram, dst_ram) = (Ram::from_memory(&src_mem), Ram::from_memory(&dst_mem));
    let mut tracker = tracker_for(&src_mem);
    let mut writer = migrate_writer(
        src_mem.regions()[0].host_ptr() as usize,
        (64 * MIB) as usize,
        1,
        64,
    );
    let transport = Transport::Uring(UringConfig::default());
    let (src, dst) = thread::scope(|s| {
        let dst = s.spawn(|| {
            destination::receive(&listener, &dst_ram, &mut Starter::default(), transport)
        });
        let link = SourceLink {
            endpoint,
            transport,
            bulk_channels: 1,
        };
        let src = source::migrate(
            &src_ram,
            &mut tracker,
            &mut writer,
            &SourceConfig::default(),
            &link,
            &mut |_| {},
        );
        (src, dst.join().expect("destination thread"))
    });
    let err = src.expect_err("the source must fail");
    assert!(matches!(err, SourceError::Link(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("refused"), "{msg}");
    let derr = dst.expect_err("the destination must fail");
    assert!(!derr.go_received);
    assert!(matches!(derr.kind, DestinationErrorKind::Link(_)), "{derr}");
    assert!(
        derr.to_string().contains("region"),
        "the error names the region: {derr}"
    );
    assert_eq!(writer.pauses.load(Ordering::Relaxed), 0);
}

/// The destination dies mid-precopy: the source reports it, and its guest
/// keeps running (it was never paused).
#[test]
fn destination_lost_mid_precopy_leaves_the_source_running() {
    let src_mem = memory(256 * MIB);
    fill(&src_mem);
    let listener = Listener::bind(&"127.0.0.1:0".parse().expect("endpoint")).expect("bind");
    let endpoint = listener.local_endpoint().expect("endpoint");
    let src_ram = Ram::from_memory(&src_mem);
    let mut tracker = tracker_for(&src_mem);
    let mut writer = migrate_writer(
        src_mem.regions()[0].host_ptr() as usize,
        (256 * MIB) as usize,
        8,
        4096,
    );
    let transport = Transport::Uring(UringConfig::default());
    let before = writer.written.load(Ordering::Relaxed);
    let src = thread::scope(|s| {
        // A destination that handshakes properly, reads a little, then dies.
        s.spawn(|| {
            use std::io::Read;
            let mut ctl = listener.accept().expect("accept");
            let layout = src_ram.layout().expect("layout");
            let ours = ferry_core::wire::Hello::new(
                ferry_core::wire::Capabilities {
                    postcopy_ram: false,
                    postcopy_only_sections: false,
                    payload_checksums: true,
                    channels: 2,
                },
                layout,
            );
            let ret = ferry_host::link::ReturnWriter::new(ctl.try_clone().expect("clone"));
            let mut session = ferry_core::session::DestinationSession::new(
                0,
                ferry_core::session::Timeouts::DEFAULT,
                ferry_core::session::Limits {
                    max_channels: 4,
                    max_device_bytes: 1 << 20,
                },
            );
            ferry_host::link::destination_handshake(&mut ctl, &ours, &ret, &mut session)
                .expect("handshake");
            let mut bulk = listener.accept().expect("accept bulk");
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0;
            while got < 8 << 20 {
                got += bulk.read(&mut buf).expect("read");
            }
            let _ = bulk.shutdown();
            let _ = ctl.shutdown();
        });
        let link = SourceLink {
            endpoint,
            transport,
            bulk_channels: 1,
        };
        source::migrate(
            &src_ram,
            &mut tracker,
            &mut writer,
            &SourceConfig::default(),
            &link,
            &mut |_| {},
        )
    });
    let err = src.expect_err("the source must fail");
    eprintln!("source error: {err}");
    assert!(!matches!(err, SourceError::AfterGo(_)));
    assert_eq!(writer.pauses.load(Ordering::Relaxed), 0, "never paused");
    thread::sleep(Duration::from_millis(50));
    assert!(
        writer.written.load(Ordering::Relaxed) > before,
        "the guest keeps running"
    );
}

/// A guest that dirties faster than the (capped) link: the migration gives
/// up with a "not converging" error instead of stopping the guest for long,
/// and never switches to postcopy on its own.
#[test]
fn a_guest_faster_than_the_link_does_not_converge() {
    let src_mem = memory(64 * MIB);
    let dst_mem = memory(64 * MIB);
    fill(&src_mem);
    let listener = Listener::bind(&"127.0.0.1:0".parse().expect("endpoint")).expect("bind");
    let endpoint = listener.local_endpoint().expect("endpoint");
    let (src_ram, dst_ram) = (Ram::from_memory(&src_mem), Ram::from_memory(&dst_mem));
    let mut tracker = tracker_for(&src_mem);
    // ~64 pages/ms = 256 MB/s over 16 Ki hot pages, against a 16 MB/s link.
    let mut writer = migrate_writer(
        src_mem.regions()[0].host_ptr() as usize,
        (64 * MIB) as usize,
        64,
        16 * 1024,
    );
    let transport = Transport::Uring(UringConfig::default());
    let (src, dst) = thread::scope(|s| {
        let dst = s.spawn(|| {
            destination::receive(&listener, &dst_ram, &mut Starter::default(), transport)
        });
        let link = SourceLink {
            endpoint,
            transport,
            bulk_channels: 1,
        };
        let config = SourceConfig {
            bandwidth_cap: Some(16 * MIB),
            give_up_after: Some(Duration::from_secs(8)),
            downtime_limit: Duration::from_millis(50),
            ..SourceConfig::default()
        };
        let src = source::migrate(
            &src_ram,
            &mut tracker,
            &mut writer,
            &config,
            &link,
            &mut |_| {},
        );
        (src, dst.join().expect("destination thread"))
    });
    let err = src.expect_err("the migration must not complete");
    assert!(matches!(err, SourceError::NotConverging { .. }), "{err}");
    assert!(err.to_string().contains("not converging"));
    assert_eq!(writer.pauses.load(Ordering::Relaxed), 0, "never paused");
    let derr = dst.expect_err("the destination sees the source go away");
    assert!(!derr.go_received);
}

/// A page that arrives torn and is not healed by a later copy before the end
/// of the stream: the destination asks for it again on the return path, the
/// (stopped) source resends it on the control channel, and only then does
/// the destination say ready. Driven by a hand-made source so the tear is
/// certain.
#[test]
fn a_page_still_torn_at_the_end_is_asked_for_again_before_ready() {
    use ferry_core::wire::{Capabilities, Hello, Repr, ReturnRepr, StreamEncoder, HEADER_LEN};
    use ferry_host::link;
    use ferry_uring::{AnyChannel, Channel, OutRecord, Payload};

    let src_mem = memory(8 * MIB);
    let dst_mem = memory(8 * MIB);
    fill(&src_mem);
    let listener = Listener::bind(&"127.0.0.1:0".parse().expect("endpoint")).expect("bind");
    let endpoint = listener.local_endpoint().expect("endpoint");
    let (src_ram, dst_ram) = (Ram::from_memory(&src_mem), Ram::from_memory(&dst_mem));
    let transport = Transport::Std(RecvStrategy::Direct);
    let page = 5u64;
    // SAFETY: nothing writes the source memory during the test.
    let good = unsafe { src_ram.regions()[0].pages_slice(page, 1) }
        .expect("page")
        .to_vec();
    let (dst, resends) = thread::scope(|s| {
        let dst = s.spawn(|| {
            let mut starter = Starter::default();
            destination::receive(&listener, &dst_ram, &mut starter, transport).map(|r| (r, starter))
        });
        let probe = ferry_uring::probe();
        let layout = src_ram.layout().expect("layout");
        let caps = Capabilities {
            postcopy_ram: false,
            postcopy_only_sections: false,
            payload_checksums: true,
            channels: 2,
        };
        let mut ctl_conn = link::connect(&endpoint).expect("connect");
        let (neg, mut ret_dec, _accept) = link::source_handshake(
            &mut ctl_conn,
            &Hello::new(caps, layout),
            Duration::from_secs(10),
        )
        .expect("handshake");
        let mut ret_conn = ctl_conn.try_clone().expect("clone");
        let mut ctl = AnyChannel::new(ctl_conn, &[], transport, &probe).expect("control channel");
        let mut bulk = AnyChannel::new(
            link::connect(&endpoint).expect("connect bulk"),
            &src_ram.mem_regions(),
            transport,
            &probe,
        )
        .expect("bulk channel");
        let (mut ctl_enc, mut bulk_enc) = (StreamEncoder::new(&neg), StreamEncoder::new(&neg));
        let mut h = [0u8; HEADER_LEN];
        // Every other page as zero runs: ready needs the whole layout. The
        // torn page's only copy is the torn one: it is not missing, it is
        // asked for again.
        let pages = src_ram.regions()[0].pages();
        let mut first = 0;
        while first < pages {
            if first == page {
                first += 1;
                continue;
            }
            let end = if first < page { page } else { pages };
            let count = (end - first).min(1024) as u32;
            bulk_enc
                .encode_with_crc(
                    &Repr::ZeroRun {
                        region: 0,
                        first,
                        count,
                    },
                    0,
                    &mut h,
                )
                .expect("encode");
            bulk.send(&[OutRecord {
                header: h,
                payload: Payload::None,
            }])
            .expect("zero run");
            first += u64::from(count);
        }
        // The page, with a checksum that does not match what arrives: torn.
        let run = Repr::PageRun {
            region: 0,
            first: page,
            count: 1,
            requested: false,
            paused: false,
        };
        bulk_enc
            .encode_with_crc(&run, ferry_core::wire::payload_crc(&good) ^ 1, &mut h)
            .expect("encode");
        bulk.send(&[OutRecord {
            header: h,
            payload: Payload::Guest {
                region: 0,
                offset: page * PAGE_SIZE,
                len: PAGE_SIZE,
            },
        }])
        .expect("send torn page");
        bulk_enc
            .encode_with_crc(&Repr::End, 0, &mut h)
            .expect("encode");
        bulk.send(&[OutRecord {
            header: h,
            payload: Payload::None,
        }])
        .and_then(|_| bulk.flush())
        .expect("end bulk");
        let state = b"device".to_vec();
        ctl_enc
            .encode(&Repr::StopAndCopy, &[], &mut h)
            .expect("encode");
        ctl.send(&[OutRecord {
            header: h,
            payload: Payload::None,
        }])
        .expect("stop-and-copy");
        ctl_enc
            .encode(
                &Repr::Section {
                    section: 1,
                    offset: 0,
                    len: state.len() as u32,
                    last: true,
                },
                &state,
                &mut h,
            )
            .expect("encode");
        ctl.send(&[OutRecord {
            header: h,
            payload: Payload::Bytes(&state),
        }])
        .expect("section");
        ctl_enc.encode(&Repr::End, &[], &mut h).expect("encode");
        ctl.send(&[OutRecord {
            header: h,
            payload: Payload::None,
        }])
        .and_then(|_| ctl.flush())
        .expect("end");
        // Serve resends until ready, then go.
        let mut resends = 0;
        loop {
            let rec = link::read_return(&mut ret_conn, &mut ret_dec).expect("a return record");
            match rec.repr {
                ReturnRepr::Resend {
                    region: 0,
                    first,
                    count: 1,
                } if first == page => {
                    resends += 1;
                    ctl_enc.encode(&run, &good, &mut h).expect("encode");
                    ctl.send(&[OutRecord {
                        header: h,
                        payload: Payload::Bytes(&good),
                    }])
                    .and_then(|_| ctl.flush())
                    .expect("resend");
                }
                ReturnRepr::Ready => break,
                other => panic!("unexpected return record {other:?}"),
            }
        }
        ctl_enc.encode(&Repr::Go, &[], &mut h).expect("encode");
        ctl.send(&[OutRecord {
            header: h,
            payload: Payload::None,
        }])
        .and_then(|_| ctl.flush())
        .expect("go");
        (dst.join().expect("destination thread"), resends)
    });
    let (report, starter) = dst.expect("the destination completes");
    assert!(resends >= 1, "the torn page was asked for again");
    assert!(report.resend_requests >= 1);
    assert_eq!(starter.sections.len(), 1);
    // SAFETY: the destination is done with its memory.
    let got = unsafe { dst_ram.regions()[0].pages_slice(page, 1) }
        .expect("page")
        .to_vec();
    assert_eq!(got, good, "the page on the destination is the intact copy");
}
