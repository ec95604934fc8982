//! Encrypted, authenticated migrations over real loopback TCP, in the manner of QEMU's
//! migration TLS tests: PSK match and mismatch, valid x509, a client of another CA, an
//! anonymous client, a destination whose name does not match, an identity outside the
//! allow list, a connection injected into the session, and a recorded session replayed.
//! Each runs a real migration (or the attempt at one) of process memory under writes.

mod common;
use common::{fill, memory, same_bytes, tracker_for, Starter, Writer};

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ferry_host::destination::{self, DestinationConfig, DestinationError};
use ferry_host::link::{
    Acceptor, ChannelRole, Conn, Connected, Connector, Endpoint, LinkError, Listener,
};
use ferry_host::memory::MappedMemory;
use ferry_host::migration::SourceConfig;
use ferry_host::migration::SourceReport;
use ferry_host::ram::Ram;
use ferry_host::source::{self, SourceError};
use ferry_host::tls::{
    generate_x509, DestinationTls, End, PskKey, RecordError, SourceTls, TlsError, X509Credentials,
};
use ferry_uring::{Transport, UringConfig};

const MIB: u64 = 1 << 20;
const GUEST: u64 = 32 * MIB;
/// A pattern put in guest memory that must never be seen on the wire.
const SECRET: &[u8; 32] = b"ferry-guest-secret-0123456789abc";

fn psk(id: &str, byte: u8) -> PskKey {
    PskKey {
        identity: id.into(),
        key: vec![byte; 32],
    }
}

fn x509_dir(tag: &str, client: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-tls-test-{}-{tag}", std::process::id()));
    generate_x509(&dir, &["localhost", "127.0.0.1"], client).expect("throw-away CA");
    dir
}

fn src_x509(dir: &std::path::Path, name: &str) -> SourceTls {
    SourceTls::x509(
        X509Credentials::from_dir(dir, End::Source).expect("source creds"),
        name,
    )
    .expect("source TLS")
}

fn dst_x509(dir: &std::path::Path, authz: &[&str]) -> DestinationTls {
    DestinationTls::x509(
        X509Credentials::from_dir(dir, End::Destination).expect("destination creds"),
        authz.iter().map(|s| s.to_string()).collect(),
    )
    .expect("destination TLS")
}

/// A listener whose every accept is bounded, so a destination that refuses everything ends.
struct Bounded<'l>(&'l Listener, Duration);

impl Acceptor for Bounded<'_> {
    fn accept(&mut self, channel: ChannelRole) -> Result<Conn, LinkError> {
        self.0.accept_within(channel, self.1)
    }
    fn accept_within(&mut self, channel: ChannelRole, bound: Duration) -> Result<Conn, LinkError> {
        self.0.accept_within(channel, bound.min(self.1))
    }
}

struct Guests {
    src: MappedMemory,
    dst: MappedMemory,
}

impl Guests {
    fn new() -> Guests {
        let src = memory(GUEST);
        let dst = memory(GUEST);
        fill(&src);
        // The secret sits at the start of every 64th page.
        let base = src.regions()[0].host_ptr();
        for page in (0..GUEST / 4096).step_by(64) {
            // SAFETY: inside the test's own mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(SECRET.as_ptr(), base.add((page * 4096) as usize), 32)
            };
        }
        Guests { src, dst }
    }

    fn destination_untouched(&self) -> bool {
        let r = &self.dst.regions()[0];
        // SAFETY: the mapping is alive and nobody writes it now.
        let bytes = unsafe { std::slice::from_raw_parts(r.host_ptr(), r.size() as usize) };
        bytes.iter().all(|&b| b == 0)
    }
}

fn source_config() -> SourceConfig {
    SourceConfig {
        give_up_after: Some(Duration::from_secs(30)),
        ..SourceConfig::default()
    }
}

fn transport() -> Transport {
    Transport::Uring(UringConfig::default())
}

/// Runs the source over `connector` against a destination behind `acceptor`.
fn migrate<C: Connector>(
    g: &Guests,
    connector: &mut C,
    acceptor: &(dyn Fn() -> Result<(), DestinationError> + Sync),
) -> (
    Result<SourceReport, SourceError>,
    Result<(), DestinationError>,
) {
    let (s, d, _) = migrate_counting(g, connector, acceptor);
    (s, d)
}

/// As [`migrate`], also saying whether the source guest runs at the end (its pauses all
/// resumed).
fn migrate_counting<C: Connector>(
    g: &Guests,
    connector: &mut C,
    acceptor: &(dyn Fn() -> Result<(), DestinationError> + Sync),
) -> (
    Result<SourceReport, SourceError>,
    Result<(), DestinationError>,
    bool,
) {
    let src_ram = Ram::from_memory(&g.src);
    let mut tracker = tracker_for(&g.src);
    let base = g.src.regions()[0].host_ptr() as usize;
    let mut writer = Writer::start(base + (GUEST / 2) as usize, 512, 4);
    let runs = |w: &Writer| {
        w.pauses.load(std::sync::atomic::Ordering::Relaxed)
            == w.resumes.load(std::sync::atomic::Ordering::Relaxed)
    };
    thread::scope(|s| {
        let d = s.spawn(acceptor);
        let r = source::migrate_over(
            &src_ram,
            &mut tracker,
            &mut writer,
            &source_config(),
            connector,
            transport(),
            2,
            &mut |_| {},
        );
        (r, d.join().expect("destination thread"), runs(&writer))
    })
}

fn receive<A: Acceptor>(g: &Guests, acceptor: A) -> Result<(), DestinationError> {
    let dst_ram = Ram::from_memory(&g.dst);
    let mut starter = Starter::default();
    let config = DestinationConfig::new(transport());
    destination::receive_with(acceptor, &dst_ram, &mut starter, &config).map(|_| {
        assert_eq!(starter.sections[0].bytes, b"registers of the writer");
    })
}

fn listener() -> (Listener, Endpoint) {
    let l = Listener::bind(&"127.0.0.1:0".parse().expect("addr")).expect("bind");
    let e = l.local_endpoint().expect("endpoint");
    (l, e)
}

/// A TCP relay that records what the source sends on each connection.
struct Recorder {
    endpoint: Endpoint,
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
}

fn recorder(to: Endpoint) -> Recorder {
    relay(to, None)
}

/// As [`recorder`]; with `tamper = Some((n, k))` it flips one bit in the body of TLS record
/// `k` (from 0, the ClientHello) of what the source sends on its `n`-th connection (0:
/// control, 1: bulk 0, ...).
fn relay(to: Endpoint, tamper: Option<(usize, usize)>) -> Recorder {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = Endpoint::Tcp(l.local_addr().expect("addr"));
    let sent: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let log = sent.clone();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut inbound) = c else { return };
            let Endpoint::Tcp(a) = to else { return };
            let Ok(mut out) = TcpStream::connect(a) else {
                return;
            };
            let idx = {
                let mut l = log.lock().expect("log");
                l.push(Vec::new());
                l.len() - 1
            };
            let (mut in2, mut out2) = (
                inbound.try_clone().expect("clone"),
                out.try_clone().expect("clone"),
            );
            thread::spawn(move || {
                let _ = std::io::copy(&mut out2, &mut in2);
                let _ = in2.shutdown(std::net::Shutdown::Write);
            });
            let log = log.clone();
            thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                // The stream so far, the next record header's offset, its number, and the
                // offset of the byte to flip once the record to change is found.
                let (mut all, mut next, mut number, mut flip) = (Vec::new(), 0usize, 0usize, None);
                loop {
                    match inbound.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let seen = all.len();
                            all.extend_from_slice(&buf[..n]);
                            if let Some((conn, k)) = tamper.filter(|t| t.0 == idx) {
                                let _ = conn;
                                while flip.is_none() && next + 5 <= all.len() {
                                    if number == k {
                                        flip = Some(next + 7);
                                    }
                                    next += 5 + usize::from(u16::from_be_bytes([
                                        all[next + 3],
                                        all[next + 4],
                                    ]));
                                    number += 1;
                                }
                                if let Some(at) = flip.filter(|&a| (seen..seen + n).contains(&a)) {
                                    buf[at - seen] ^= 0x10;
                                }
                            }
                            log.lock().expect("log")[idx].extend_from_slice(&buf[..n]);
                            if out.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = out.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Recorder { endpoint, sent }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every recorded connection opens with a TLS ClientHello and carries neither guest bytes
/// nor the device state in clear.
fn assert_nothing_readable(sent: &[Vec<u8>]) {
    for (i, c) in sent.iter().enumerate() {
        assert_eq!(
            &c[..3],
            &[0x16, 0x03, 0x01],
            "connection {i} opens with a TLS ClientHello"
        );
        assert!(
            !contains(c, SECRET),
            "connection {i} carries guest bytes in clear"
        );
        assert!(
            !contains(c, b"registers of the writer"),
            "connection {i} carries device state in clear"
        );
    }
}

#[test]
fn psk_match_migrates_byte_exact_and_the_wire_shows_nothing() {
    let g = Guests::new();
    let (l, e) = listener();
    let rec = recorder(e);
    let dst = DestinationTls::psk(vec![psk("source-a", 7)], vec![]).expect("destination TLS");
    let acc = dst.acceptor(&l);
    let tls = SourceTls::psk(psk("source-a", 7)).expect("source TLS");
    let mut conn = tls.connector(rec.endpoint.clone());
    let (s, d) = migrate(&g, &mut conn, &|| receive(&g, &acc));
    s.expect("the source completes");
    d.expect("the destination completes");
    same_bytes(&g.src, &g.dst).expect("destination RAM equals source RAM");
    assert!(acc.refused().is_empty(), "refused: {:?}", acc.refused());
    let sent = rec.sent.lock().expect("log");
    assert_eq!(
        sent.len(),
        3,
        "control and two bulk connections, no urgent one"
    );
    let all: usize = sent.iter().map(Vec::len).sum();
    assert!(
        all as u64 > GUEST / 2,
        "the guest's pages crossed the relay ({all} bytes)"
    );
    assert_nothing_readable(&sent);
}

#[test]
fn psk_mismatch_is_refused_and_the_destination_waits_for_the_right_source() {
    let g = Guests::new();
    let (l, e) = listener();
    let dst = DestinationTls::psk(vec![psk("source-a", 7)], vec![]).expect("destination TLS");
    let acc = dst.acceptor(&l);
    let src_ram = Ram::from_memory(&g.src);
    thread::scope(|s| {
        let d = s.spawn(|| receive(&g, &acc));
        // A source with the wrong key for the same identity.
        let wrong = SourceTls::psk(psk("source-a", 8)).expect("source TLS");
        let mut tracker = tracker_for(&g.src);
        let mut writer = Writer::start(g.src.regions()[0].host_ptr() as usize, 64, 0);
        let err = source::migrate_over(
            &src_ram,
            &mut tracker,
            &mut writer,
            &source_config(),
            &mut wrong.connector(e.clone()),
            transport(),
            1,
            &mut |_| {},
        )
        .expect_err("a wrong key is refused");
        let msg = err.to_string();
        assert!(
            msg.contains("does not hold our pre-shared key"),
            "the source says why: {msg}"
        );
        assert!(g.destination_untouched(), "nothing reached guest RAM");
        // The destination refused it and still waits: the right source completes.
        let right = SourceTls::psk(psk("source-a", 7)).expect("source TLS");
        source::migrate_over(
            &src_ram,
            &mut tracker,
            &mut writer,
            &source_config(),
            &mut right.connector(e.clone()),
            transport(),
            1,
            &mut |_| {},
        )
        .expect("the right source completes");
        d.join()
            .expect("destination")
            .expect("the destination completes");
    });
    let refused = acc.refused();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("does not hold the pre-shared key"),
        "{refused:?}"
    );
    same_bytes(&g.src, &g.dst).expect("destination RAM equals source RAM");
}

#[test]
fn x509_with_an_allowed_identity_migrates() {
    let dir = x509_dir("valid", "source-1.example");
    let g = Guests::new();
    let (l, e) = listener();
    let acc = dst_x509(&dir, &["source-1.example"]).acceptor(&l);
    let mut conn = src_x509(&dir, "127.0.0.1").connector(e);
    let (s, d) = migrate(&g, &mut conn, &|| receive(&g, &acc));
    s.expect("the source completes");
    d.expect("the destination completes");
    same_bytes(&g.src, &g.dst).expect("destination RAM equals source RAM");
    assert_eq!(acc.peer_identity().as_deref(), Some("source-1.example"));
}

/// Runs a source that must be refused at its first connection against a destination that
/// must refuse it; returns both errors' messages and what the destination recorded.
fn refused_case(
    g: &Guests,
    tls_src: SourceTls,
    dst: DestinationTls,
) -> (String, String, Vec<String>) {
    let (l, e) = listener();
    let acc = dst.acceptor(Bounded(&l, Duration::from_secs(2)));
    let t = Instant::now();
    let (s, d) = migrate(g, &mut tls_src.connector(e), &|| receive(g, &acc));
    let s = s.expect_err("the source is refused").to_string();
    let d = d
        .expect_err("the destination ends without a migration")
        .to_string();
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "bounded: {:?}",
        t.elapsed()
    );
    assert!(g.destination_untouched(), "nothing reached guest RAM");
    (s, d, acc.refused())
}

#[test]
fn a_source_of_another_ca_is_refused() {
    let ours = x509_dir("ours", "source-1.example");
    let theirs = x509_dir("theirs", "source-1.example");
    let g = Guests::new();
    let (s, _, refused) = refused_case(&g, src_x509(&theirs, "127.0.0.1"), dst_x509(&ours, &[]));
    // The source does not trust our destination either: it fails first, on its side.
    assert!(
        s.contains("TLS handshake on the control connection failed"),
        "{s}"
    );
    assert!(!refused.is_empty());
    assert!(refused.iter().all(|r| r.contains("control")), "{refused:?}");
}

#[test]
fn a_source_with_a_certificate_of_another_ca_but_our_ca_trusted_is_refused() {
    // The hostile client trusts our CA (it knows the destination's certificate) but its
    // own certificate comes from another CA.
    let ours = x509_dir("ours2", "source-1.example");
    let theirs = x509_dir("theirs2", "source-1.example");
    std::fs::copy(ours.join("ca-cert.pem"), theirs.join("ca-cert.pem")).expect("copy CA");
    let g = Guests::new();
    let (s, _, refused) = refused_case(&g, src_x509(&theirs, "127.0.0.1"), dst_x509(&ours, &[]));
    assert!(s.contains("control"), "{s}");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("UnknownIssuer") || refused[0].contains("BadSignature"),
        "{refused:?}"
    );
}

#[test]
fn an_anonymous_client_is_refused() {
    let dir = x509_dir("anon", "source-1.example");
    let g = Guests::new();
    let (l, e) = listener();
    let acc = dst_x509(&dir, &[]).acceptor(Bounded(&l, Duration::from_secs(2)));
    let Endpoint::Tcp(addr) = e else {
        unreachable!()
    };
    let d = thread::scope(|s| {
        let d = s.spawn(|| receive(&g, &acc));
        // A TLS client with no certificate, trusting our CA.
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(dir.join("ca-cert.pem")).expect("ca");
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
            roots.add(c.expect("pem")).expect("root");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), "127.0.0.1".try_into().expect("name"))
                .expect("client");
        let mut sock = TcpStream::connect(addr).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut stream = rustls::Stream::new(&mut conn, &mut sock);
        let _ = stream.write_all(&[0u8; 137]);
        let mut b = [0u8; 33];
        assert!(
            stream.read_exact(&mut b).is_err(),
            "an anonymous client gets no answer"
        );
        d.join().expect("destination")
    });
    assert!(d.is_err());
    let refused = acc.refused();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("peer sent no certificates"),
        "{refused:?}"
    );
    assert!(g.destination_untouched());
}

#[test]
fn a_destination_whose_name_does_not_match_is_refused_by_the_source() {
    let dir = x509_dir("name", "source-1.example");
    let g = Guests::new();
    let (s, _, _) = refused_case(&g, src_x509(&dir, "migration.example"), dst_x509(&dir, &[]));
    assert!(
        s.contains("not valid for name \"migration.example\""),
        "{s}"
    );
}

#[test]
fn an_identity_outside_the_allow_list_is_refused() {
    let dir = x509_dir("authz", "intruder.example");
    let g = Guests::new();
    let (s, _, refused) = refused_case(
        &g,
        src_x509(&dir, "localhost"),
        dst_x509(&dir, &["source-1.example"]),
    );
    assert!(s.contains("our identity is not in its allow list"), "{s}");
    assert!(refused[0].contains("is not authorised"), "{refused:?}");
}

/// Hands the destination an intruder's stream when it awaits bulk channel 0, before the
/// real source's.
struct Injecting<'l> {
    listener: &'l Listener,
    intruder: Option<Conn>,
}

impl Acceptor for Injecting<'_> {
    fn accept(&mut self, channel: ChannelRole) -> Result<Conn, LinkError> {
        if channel == ChannelRole::Bulk(0) {
            if let Some(c) = self.intruder.take() {
                return Ok(c);
            }
        }
        self.listener.accept()
    }
}

#[test]
fn a_connection_of_another_session_is_refused_and_the_migration_completes() {
    let dir = x509_dir("inject", "source-1.example");
    let g = Guests::new();
    let (l, e) = listener();
    // The intruder holds valid credentials and a session of its own, with a decoy.
    let (to_decoy, decoy_end) = UnixStream::pair().expect("pair");
    let (intruder_end, into_dst) = UnixStream::pair().expect("pair");
    let decoy = dst_x509(&dir, &[]);
    let intruder = src_x509(&dir, "localhost");
    let acc = dst_x509(&dir, &["source-1.example"]).acceptor(Injecting {
        listener: &l,
        intruder: Some(Conn::Unix(into_dst)),
    });
    thread::scope(|s| {
        s.spawn(|| {
            let decoy_acc = decoy.acceptor(Connected::new(Conn::Unix(decoy_end)));
            let mut a = &decoy_acc;
            a.accept(ChannelRole::Control)
                .expect("the decoy accepts the intruder");
        });
        s.spawn(|| {
            let mut c = intruder.connector(
                Connected::new(Conn::Unix(to_decoy)).with_bulk(Conn::Unix(intruder_end)),
            );
            c.connect(ChannelRole::Control)
                .expect("the intruder's own session");
            let e = c.connect(ChannelRole::Bulk(0)).expect_err("refused");
            assert!(
                e.to_string().contains("does not belong to the session"),
                "{e}"
            );
        });
        let mut conn = src_x509(&dir, "localhost").connector(e.clone());
        let (s, d) = migrate(&g, &mut conn, &|| receive(&g, &acc));
        s.expect("the source completes");
        d.expect("the destination completes");
    });
    same_bytes(&g.src, &g.dst).expect("destination RAM equals source RAM");
    let refused = acc.refused();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("does not belong to this migration's session"),
        "{refused:?}"
    );
}

#[test]
fn a_recorded_session_replayed_is_refused() {
    let g = Guests::new();
    let (l, e) = listener();
    let rec = recorder(e);
    let dst = DestinationTls::psk(vec![psk("source-a", 7)], vec![]).expect("destination TLS");
    let acc = dst.acceptor(&l);
    let tls = SourceTls::psk(psk("source-a", 7)).expect("source TLS");
    let (s, d) = migrate(&g, &mut tls.connector(rec.endpoint.clone()), &|| {
        receive(&g, &acc)
    });
    if let Err(e) = &s {
        panic!(
            "the recorded migration failed: {e:?}; destination: {d:?}; refused {:?}",
            acc.refused()
        );
    }
    d.expect("the destination completes");
    let recorded = rec.sent.lock().expect("log").clone();

    // Replay every connection's bytes, in order, into a fresh destination.
    let fresh = Guests::new();
    let (l2, e2) = listener();
    let acc2 = dst.acceptor(Bounded(&l2, Duration::from_secs(2)));
    let Endpoint::Tcp(addr) = e2 else {
        unreachable!()
    };
    let d = thread::scope(|s| {
        let d = s.spawn(|| receive(&fresh, &acc2));
        for bytes in &recorded {
            let mut c = TcpStream::connect(addr).expect("connect");
            let _ = c.write_all(bytes);
            let _ = c.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let _ = c.read_to_end(&mut sink);
        }
        d.join().expect("destination")
    });
    assert!(d.is_err(), "the replay did not migrate");
    assert!(
        fresh.destination_untouched(),
        "nothing of the replay reached guest RAM"
    );
    let refused = acc2.refused();
    assert!(!refused.is_empty());
    assert!(refused[0].contains("control"), "{refused:?}");
}

/// A bit flipped on the wire, on connection `conn` at byte `at`: the migration fails with a
/// clear error, the source guest runs on, and the destination never started it.
fn tampered(conn: usize, at: usize) -> (String, String, Option<RecordError>) {
    let g = Guests::new();
    let (l, e) = listener();
    let rec = relay(e, Some((conn, at)));
    let dst = DestinationTls::psk(vec![psk("source-a", 7)], vec![]).expect("destination TLS");
    let acc = dst.acceptor(Bounded(&l, Duration::from_secs(5)));
    let tls = SourceTls::psk(psk("source-a", 7)).expect("source TLS");
    let (s, d, runs) = migrate_counting(&g, &mut tls.connector(rec.endpoint.clone()), &|| {
        receive(&g, &acc)
    });
    let s = s
        .expect_err("a tampered stream fails the migration")
        .to_string();
    let d = d
        .expect_err("the destination does not complete")
        .to_string();
    assert!(runs, "the guest runs on at the source");
    eprintln!("source: {s}\ndestination: {d}");
    (s, d, acc.record_fault())
}

#[test]
fn a_bit_flipped_on_a_bulk_connection_fails_the_migration_and_the_guest_runs_on() {
    // Well into the pages: record 100 of bulk connection 0.
    let (s, d, _) = tampered(1, 100);
    assert!(d.contains("failed authentication"), "destination: {d}");
    // The destination said why on the return path before it closed.
    assert!(s.contains("failed authentication"), "source: {s}");
}

#[test]
fn a_bit_flipped_on_the_control_connection_fails_the_migration_and_the_guest_runs_on() {
    // Records 0-3 are the ClientHello, ChangeCipherSpec, Finished and the channel hello:
    // record 4 carries the migration's own hello.
    let (s, d, fault) = tampered(0, 4);
    assert!(
        !s.is_empty() && !d.is_empty(),
        "source: {s}; destination: {d}"
    );
    // The relay kept why the control connection ended.
    assert_eq!(fault, Some(RecordError::Authentication));
}

#[test]
fn psk_files_in_qemu_format_read_and_bad_ones_are_named() {
    let dir = std::env::temp_dir().join(format!("ferry-psk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let good = dir.join("keys.psk");
    std::fs::write(
        &good,
        "# keys\nsource-a:000102030405060708090a0b0c0d0e0f\n\n",
    )
    .expect("write");
    let keys = PskKey::read_file(&good).expect("a good file");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].identity, "source-a");
    assert_eq!(keys[0].key, (0u8..16).collect::<Vec<_>>());
    for (text, why) in [
        ("source-a 0001", "no ':'"),
        ("source-a:zz", "not hexadecimal"),
        ("source-a:0001", "shorter than 16 bytes"),
        ("", "holds no key"),
    ] {
        let bad = dir.join("bad.psk");
        std::fs::write(&bad, text).expect("write");
        let e = PskKey::read_file(&bad).expect_err("a bad file");
        assert!(matches!(e, TlsError::PskFile { .. }), "{e:?}");
        assert!(e.to_string().contains(why), "{e}");
    }
}

/// The destination guest of an encrypted postcopy: on start, a thread reads pages at random
/// (most missing at first), so that vCPU-like faults become page requests on the urgent
/// connection.
struct Toucher {
    base: usize,
    pages: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
    touched: Arc<std::sync::atomic::AtomicU64>,
    handle: Option<thread::JoinHandle<()>>,
}

impl ferry_host::migration::GuestStarter for Toucher {
    fn start(
        &mut self,
        _sections: &[ferry_host::migration::DeviceSection],
    ) -> Result<(), ferry_host::migration::CallbackError> {
        use std::sync::atomic::Ordering;
        let (base, pages, stop, touched) = (
            self.base,
            self.pages,
            self.stop.clone(),
            self.touched.clone(),
        );
        self.handle = Some(thread::spawn(move || {
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            while !stop.load(Ordering::Acquire) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = base + ((x % pages) * 4096) as usize;
                // SAFETY: inside the destination's guest memory, which lives until the
                // test ends; a missing page faults through userfaultfd until it arrives.
                let _ = unsafe { std::ptr::read_volatile(at as *const u8) };
                touched.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_micros(100));
            }
        }));
        Ok(())
    }
}

/// Postcopy over TLS: page requests and their replies cross the urgent connection, which
/// carries its own keys (no relay); nothing on any connection, the urgent one included, is
/// readable, and the destination ends with the source's bytes.
#[test]
fn encrypted_postcopy_serves_faults_on_the_urgent_connection() {
    use std::sync::atomic::Ordering;
    let g = Guests::new();
    let (l, e) = listener();
    let rec = recorder(e);
    let dst_tls = DestinationTls::psk(vec![psk("source-a", 7)], vec![]).expect("destination TLS");
    let acc = dst_tls.acceptor(&l);
    let src_tls = SourceTls::psk(psk("source-a", 7)).expect("source TLS");
    let mut conn = src_tls.connector(rec.endpoint.clone());
    let src_ram = Ram::from_memory(&g.src);
    let dst_ram = Ram::from_memory(&g.dst);
    let mut tracker = tracker_for(&g.src);
    let base = g.src.regions()[0].host_ptr() as usize;
    let mut writer = Writer::start(base, GUEST / 4096, 16);
    let mut toucher = Toucher {
        base: g.dst.regions()[0].host_ptr() as usize,
        pages: GUEST / 4096,
        stop: Arc::default(),
        touched: Arc::default(),
        handle: None,
    };
    let config = SourceConfig {
        bandwidth_cap: Some(16 * MIB),
        offer_postcopy_ram: true,
        postcopy_after_first_pass: true,
        ..source_config()
    };
    let dst_config = DestinationConfig {
        postcopy_ram: true,
        ..DestinationConfig::new(transport())
    };
    let (s, d) = thread::scope(|sc| {
        let d = sc.spawn(|| destination::receive_with(&acc, &dst_ram, &mut toucher, &dst_config));
        let s = source::migrate_over(
            &src_ram,
            &mut tracker,
            &mut writer,
            &config,
            &mut conn,
            transport(),
            2,
            &mut |_| {},
        );
        (s, d.join().expect("destination thread"))
    });
    toucher.stop.store(true, Ordering::Release);
    if let Some(h) = toucher.handle.take() {
        h.join().expect("toucher");
    }
    let s = s.expect("the source completes");
    let d = d.expect("the destination completes");
    same_bytes(&g.src, &g.dst).expect("destination RAM equals source RAM");
    let spc = s.postcopy.expect("the source's postcopy report");
    let dpc = d.postcopy.expect("the destination's postcopy report");
    assert!(
        spc.pages_discarded > 0,
        "pages changed after they were sent"
    );
    assert!(
        dpc.faults > 0 && spc.requests > 0,
        "faults were served on the urgent connection: {dpc:?}"
    );
    assert!(toucher.touched.load(Ordering::Relaxed) > 0);
    let sent = rec.sent.lock().expect("log");
    assert_eq!(sent.len(), 4, "control, two bulk and the urgent connection");
    assert!(
        sent[3].len() as u64 >= spc.pages_requested * 4096,
        "the replies crossed the urgent connection ({} bytes for {} pages)",
        sent[3].len(),
        spc.pages_requested
    );
    assert_nothing_readable(&sent);
}
