//! The transport suite: every test runs against io_uring, io_uring with SEND_ZC, and the
//! blocking std transport, over TCP and Unix stream sockets, through the same generic
//! functions.
#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};
use std::thread;

use ferry_uring::{
    probe, AnyChannel, Channel, ChannelSet, Decoder, Error, MemRegion, OutRecord, Payload,
    Placement, ProbeReport, RecvStrategy, Stream, Transport, UringConfig, HEADER_LEN,
};

const PAGE: usize = 4096;

/// Anonymous memory standing in for guest RAM.
struct Mem {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain anonymous memory, only accessed through raw pointers or short-lived slices.
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Mem {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh private anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Self {
            ptr: NonNull::new(p.cast()).unwrap(),
            len,
        }
    }

    fn region(&self) -> MemRegion {
        // SAFETY: the mapping outlives every channel in these tests (channels are dropped
        // before the `Mem`), and no slice of it is alive while a channel receives into it.
        unsafe { MemRegion::new(self.ptr, self.len) }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes; callers look only while no channel writes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    #[allow(clippy::mut_from_ref)]
    fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: as above; the tests never hold two of these at once.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    fn fill_random(&self, seed: u64) {
        let mut x = seed | 1;
        for c in self.bytes_mut().chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`, no longer used.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// A test wire format, independent of ferry-core: kind 1 = page run (id = region, count pages
// from page `first`), 2 = bytes for the caller's buffer, 3 = bytes to discard, 4 = none.
fn header(kind: u8, region: u16, first: u64, count: u32, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind;
    h[2..4].copy_from_slice(&region.to_le_bytes());
    h[4..8].copy_from_slice(&count.to_le_bytes());
    h[8..16].copy_from_slice(&first.to_le_bytes());
    h[16..20].copy_from_slice(&len.to_le_bytes());
    h
}

fn run(region: u16, first: u64, count: u32) -> OutRecord<'static> {
    OutRecord {
        header: header(1, region, first, count, count * PAGE as u32),
        payload: Payload::Guest {
            region: region.into(),
            offset: first * PAGE as u64,
            len: u64::from(count) * PAGE as u64,
        },
    }
}

struct TestDecoder;

impl Decoder for TestDecoder {
    type Error = String;

    fn place(&mut self, h: &[u8; HEADER_LEN]) -> Result<Placement, String> {
        let region = u16::from_le_bytes([h[2], h[3]]);
        let count = u32::from_le_bytes(h[4..8].try_into().unwrap());
        let first = u64::from_le_bytes(h[8..16].try_into().unwrap());
        let len = u64::from(u32::from_le_bytes(h[16..20].try_into().unwrap()));
        match h[0] {
            1 if len == u64::from(count) * PAGE as u64 => Ok(Placement::Guest {
                region: region.into(),
                offset: first.wrapping_mul(PAGE as u64),
                len,
            }),
            2 => Ok(Placement::Buffer { len }),
            3 => Ok(Placement::Discard { len }),
            4 if len == 0 => Ok(Placement::Empty),
            k => Err(format!("unknown record kind {k}")),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Uring,
    UringZc,
    UringDirect,
    UringStaged,
    Std,
}

const KINDS: [Kind; 5] = [
    Kind::Uring,
    Kind::UringZc,
    Kind::UringDirect,
    Kind::UringStaged,
    Kind::Std,
];

#[derive(Clone, Copy, Debug)]
enum Sock {
    Tcp,
    Unix,
}

fn probed() -> &'static ProbeReport {
    static P: OnceLock<ProbeReport> = OnceLock::new();
    P.get_or_init(probe)
}

fn make(kind: Kind, s: Stream, regions: &[MemRegion]) -> AnyChannel {
    let t = match kind {
        Kind::Uring => Transport::Uring(UringConfig::default()),
        Kind::UringZc => Transport::Uring(UringConfig {
            zero_copy: true,
            ..UringConfig::default()
        }),
        Kind::UringDirect => Transport::Uring(UringConfig {
            recv: RecvStrategy::Direct,
            ..UringConfig::default()
        }),
        Kind::UringStaged => Transport::Uring(UringConfig {
            recv: RecvStrategy::Staged,
            ..UringConfig::default()
        }),
        Kind::Std => Transport::Std(RecvStrategy::default()),
    };
    let c = AnyChannel::new(s, regions, t, probed()).unwrap();
    if !matches!(kind, Kind::Std) {
        assert!(
            matches!(c, AnyChannel::Uring(_)),
            "io_uring must be available on this machine: {}",
            probed()
        );
    }
    c
}

fn pair(sock: Sock) -> (Stream, Stream) {
    match sock {
        Sock::Tcp => {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (b, _) = l.accept().unwrap();
            (a.into(), b.into())
        }
        Sock::Unix => {
            let (a, b) = UnixStream::pair().unwrap();
            (a.into(), b.into())
        }
    }
}

fn raw_write(s: &mut Stream, b: &[u8]) {
    match s {
        Stream::Tcp(t) => t.write_all(b).unwrap(),
        Stream::Unix(u) => u.write_all(b).unwrap(),
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Page runs covering `0..pages` in shuffled order: half single pages, half runs up to 512.
fn runs(pages: u64, seed: u64) -> Vec<(u64, u32)> {
    let mut x = seed | 1;
    let mut v = Vec::new();
    let mut at = 0;
    while at < pages {
        let r = xorshift(&mut x);
        let n = if r % 2 == 0 { 1 } else { (r >> 8) % 512 + 1 }.min(pages - at);
        v.push((at, n as u32));
        at += n;
    }
    for i in (1..v.len()).rev() {
        let j = (xorshift(&mut x) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// Streams every page of `src` to `dst` over one channel pair, in batches of mixed runs.
fn stream_all(kind: Kind, sock: Sock, src: &Mem, dst: &Mem, seed: u64) {
    let (a, b) = pair(sock);
    let mut tx = make(kind, a, &[src.region()]);
    let mut rx = make(kind, b, &[dst.region()]);
    let pages = (src.len / PAGE) as u64;
    let list = runs(pages, seed);
    let sender = thread::spawn(move || {
        for chunk in list.chunks(700) {
            let recs: Vec<_> = chunk.iter().map(|&(f, n)| run(0, f, n)).collect();
            tx.send(&recs).unwrap();
        }
        tx.flush().unwrap();
        drop(tx);
    });
    let mut got = 0u64;
    while let Some(r) = rx.recv(&mut TestDecoder, &mut []).unwrap() {
        got += r.placement.len();
    }
    sender.join().unwrap();
    assert_eq!(got, src.len as u64);
}

fn big() -> &'static Mutex<()> {
    static M: Mutex<()> = Mutex::new(());
    &M
}

/// ≥ 1 GiB of random pages arrives byte-exact, for every transport over TCP and Unix. One
/// source and one destination GiB are shared by all combinations, run one after another.
#[test]
fn one_gib_random_pages_byte_exact() {
    let _g = big().lock().unwrap();
    let len = 1usize << 30;
    let src = Mem::new(len);
    src.fill_random(0x9e37_79b9_7f4a_7c15);
    let dst = Mem::new(len);
    for (i, kind) in [Kind::Uring, Kind::UringZc, Kind::Std]
        .into_iter()
        .enumerate()
    {
        for sock in [Sock::Tcp, Sock::Unix] {
            dst.bytes_mut().fill(0);
            stream_all(kind, sock, &src, &dst, i as u64 * 7 + 3);
            assert!(
                src.bytes() == dst.bytes(),
                "{kind:?} over {sock:?}: destination differs from source"
            );
        }
    }
}

/// Smaller streams through the direct-only and staged-only receive strategies.
#[test]
fn receive_strategies_byte_exact() {
    let _g = big().lock().unwrap();
    let src = Mem::new(64 << 20);
    src.fill_random(77);
    let dst = Mem::new(64 << 20);
    for kind in KINDS {
        for sock in [Sock::Tcp, Sock::Unix] {
            dst.bytes_mut().fill(0);
            stream_all(kind, sock, &src, &dst, 11);
            assert!(src.bytes() == dst.bytes(), "{kind:?} over {sock:?}");
        }
    }
}

fn set_bufs(s: &Stream, size: i32) {
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setting an int socket option on a valid socket.
        let r = unsafe {
            libc::setsockopt(
                s.fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const i32).cast(),
                4,
            )
        };
        assert_eq!(r, 0);
    }
}

/// Short writes and reads: tiny socket buffers, a peer that reads a few hundred bytes at a
/// time (so the channel's sends complete in many pieces), and a peer that writes records in
/// 7-byte dribbles (so headers and payloads arrive split at arbitrary points).
fn short_reads_and_writes(kind: Kind, sock: Sock) {
    let src = Mem::new(4 << 20);
    src.fill_random(5);
    // Sending side: the channel writes, a raw reader trickles.
    let (a, mut b) = pair(sock);
    set_bufs(&a, 32768);
    set_bufs(&b, 32768);
    let mut tx = make(kind, a, &[src.region()]);
    let reader = thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 333];
        loop {
            let n = match &mut b {
                Stream::Tcp(t) => t.read(&mut buf).unwrap(),
                Stream::Unix(u) => u.read(&mut buf).unwrap(),
            };
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    });
    let recs = [
        run(0, 0, 64),
        run(0, 300, 1),
        run(0, 512, 100),
        run(0, 1000, 3),
    ];
    tx.send(&recs).unwrap();
    tx.flush().unwrap();
    drop(tx);
    let out = reader.join().unwrap();
    let mut want = Vec::new();
    for r in &recs {
        want.extend_from_slice(&r.header);
        if let Payload::Guest { offset, len, .. } = r.payload {
            want.extend_from_slice(&src.bytes()[offset as usize..(offset + len) as usize]);
        }
    }
    assert_eq!(out.len(), want.len(), "{kind:?} {sock:?}: byte count");
    assert!(out == want, "{kind:?} {sock:?}: bytes differ");

    // Receiving side: a raw writer dribbles, the channel reassembles.
    let dst = Mem::new(4 << 20);
    let (mut a, b) = pair(sock);
    set_bufs(&b, 32768);
    let mut rx = make(kind, b, &[dst.region()]);
    let mut stream = Vec::new();
    for r in &recs {
        stream.extend_from_slice(&r.header);
        if let Payload::Guest { offset, len, .. } = r.payload {
            stream.extend_from_slice(&src.bytes()[offset as usize..(offset + len) as usize]);
        }
    }
    stream.extend_from_slice(&header(2, 0, 0, 0, 10));
    stream.extend_from_slice(b"0123456789");
    let writer = thread::spawn(move || {
        // A 7-byte write then a 4093-byte one, over and over: every header and payload
        // boundary lands at a different point of a read.
        for c in stream.chunks(4100) {
            let (x, y) = c.split_at(c.len().min(7));
            raw_write(&mut a, x);
            raw_write(&mut a, y);
        }
    });
    let mut buf = [0u8; 16];
    for r in &recs {
        let got = rx.recv(&mut TestDecoder, &mut buf).unwrap().unwrap();
        assert_eq!(got.header, r.header);
    }
    let last = rx.recv(&mut TestDecoder, &mut buf).unwrap().unwrap();
    assert_eq!(last.placement, Placement::Buffer { len: 10 });
    assert_eq!(&buf[..10], b"0123456789");
    writer.join().unwrap();
    assert!(rx.recv(&mut TestDecoder, &mut buf).unwrap().is_none());
    for r in &recs {
        if let Payload::Guest { offset, len, .. } = r.payload {
            let (o, l) = (offset as usize, len as usize);
            assert!(
                src.bytes()[o..o + l] == dst.bytes()[o..o + l],
                "{kind:?} {sock:?}: payload at {o}"
            );
        }
    }
}

/// The peer closes mid-header, mid-payload, and while the channel is sending: errors, never
/// a hang.
fn peer_closes_mid_record(kind: Kind, sock: Sock) {
    let dst = Mem::new(1 << 20);
    for cut in [10usize, HEADER_LEN + 1000] {
        let (mut a, b) = pair(sock);
        let mut rx = make(kind, b, &[dst.region()]);
        let mut bytes = header(1, 0, 0, 16, 16 * PAGE as u32).to_vec();
        bytes.resize(HEADER_LEN + 16 * PAGE, 0xab);
        raw_write(&mut a, &bytes[..cut]);
        drop(a);
        match rx.recv(&mut TestDecoder, &mut []) {
            Err(Error::UnexpectedEof { offset: 0, missing }) => {
                // Before the header is complete, only the header is known to be missing.
                let want = if cut < HEADER_LEN {
                    HEADER_LEN - cut
                } else {
                    bytes.len() - cut
                };
                assert_eq!(missing as usize, want, "{kind:?} {sock:?}")
            }
            other => panic!(
                "{kind:?} {sock:?}: cut at {cut}: expected end-of-stream error, got {other:?}"
            ),
        }
        // The channel stays refused afterwards.
        assert!(matches!(
            rx.recv(&mut TestDecoder, &mut []),
            Err(Error::Broken)
        ));
    }

    // Sending to a peer that goes away.
    let src = Mem::new(32 << 20);
    let (a, b) = pair(sock);
    let mut tx = make(kind, a, &[src.region()]);
    drop(b);
    let recs: Vec<_> = (0..8).map(|i| run(0, i * 1024, 1024)).collect();
    let mut failed = false;
    for _ in 0..64 {
        if tx.send(&recs).and_then(|_| tx.flush()).is_err() {
            failed = true;
            break;
        }
    }
    assert!(
        failed,
        "{kind:?} {sock:?}: sending to a closed peer never failed"
    );
}

/// A record pointing outside guest memory is refused before a byte of it is written.
fn out_of_range_refused(kind: Kind, sock: Sock) {
    let dst = Mem::new(64 * PAGE);
    let cases = [
        header(1, 0, 60, 8, 8 * PAGE as u32), // runs past the end
        header(1, 1, 0, 1, PAGE as u32),      // no such region
        header(1, 0, u64::MAX / PAGE as u64, 1, PAGE as u32), // offset overflows
    ];
    for h in cases {
        let (mut a, b) = pair(sock);
        let mut rx = make(kind, b, &[dst.region()]);
        let len = u32::from_le_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut bytes = h.to_vec();
        bytes.resize(HEADER_LEN + len, 0xcd);
        raw_write(&mut a, &bytes);
        let r = rx.recv(&mut TestDecoder, &mut []);
        assert!(
            matches!(r, Err(Error::OutOfRange { offset: 0, .. })),
            "{kind:?} {sock:?}: {r:?}"
        );
        assert!(
            dst.bytes().iter().all(|&x| x == 0),
            "{kind:?} {sock:?}: bytes were written"
        );
    }
    // A payload larger than the caller's buffer, and an unknown kind, are refused too.
    let (mut a, b) = pair(sock);
    let mut rx = make(kind, b, &[dst.region()]);
    raw_write(&mut a, &header(2, 0, 0, 0, 100));
    let mut small = [0u8; 10];
    assert!(matches!(
        rx.recv(&mut TestDecoder, &mut small),
        Err(Error::BufferTooSmall { len: 100, .. })
    ));
    let (mut a, b) = pair(sock);
    let mut rx = make(kind, b, &[dst.region()]);
    raw_write(&mut a, &header(9, 0, 0, 0, 0));
    assert!(matches!(
        rx.recv(&mut TestDecoder, &mut []),
        Err(Error::Refused { .. })
    ));

    // The sending side refuses a record outside its memory before sending anything.
    let (a, _b) = pair(sock);
    let mut tx = make(kind, a, &[dst.region()]);
    let r = tx.send(&[run(0, 0, 1), run(0, 63, 2)]);
    assert!(
        matches!(r, Err(Error::SendOutOfRange { index: 1, .. })),
        "{r:?}"
    );
}

/// Records flow both ways on one channel (the return path), with caller-buffer payloads,
/// discards and empty records mixed in.
fn return_path_both_ways(kind: Kind, sock: Sock) {
    let mem_a = Mem::new(1 << 20);
    mem_a.fill_random(1);
    let mem_b = Mem::new(1 << 20);
    let (a, b) = pair(sock);
    let mut ca = make(kind, a, &[mem_a.region()]);
    let mut cb = make(kind, b, &[mem_b.region()]);
    let t = thread::spawn(move || {
        let mut buf = vec![0u8; 64];
        let mut n = 0;
        while let Some(r) = cb.recv(&mut TestDecoder, &mut buf).unwrap() {
            if let Placement::Buffer { len } = r.placement {
                // Answer each request on the same channel.
                let reply = buf[..len as usize]
                    .iter()
                    .rev()
                    .copied()
                    .collect::<Vec<_>>();
                cb.send(&[OutRecord {
                    header: header(2, 0, 0, 0, reply.len() as u32),
                    payload: Payload::Bytes(&reply),
                }])
                .unwrap();
            }
            n += 1;
        }
        (n, cb)
    });
    let mut buf = vec![0u8; 64];
    for i in 0..50u8 {
        let req = [i, i + 1, i + 2];
        let junk = [0xeeu8; 100];
        ca.send(&[
            run(0, u64::from(i), 1),
            OutRecord {
                header: header(3, 0, 0, 0, 100),
                payload: Payload::Bytes(&junk),
            },
            OutRecord {
                header: header(4, 0, 0, 0, 0),
                payload: Payload::None,
            },
            OutRecord {
                header: header(2, 0, 0, 0, 3),
                payload: Payload::Bytes(&req),
            },
        ])
        .unwrap();
        let r = ca.recv(&mut TestDecoder, &mut buf).unwrap().unwrap();
        assert_eq!(r.placement, Placement::Buffer { len: 3 });
        assert_eq!(buf[..3], [i + 2, i + 1, i]);
    }
    ca.stream().shutdown().unwrap();
    let (n, _cb) = t.join().unwrap();
    assert_eq!(n, 200);
    assert!(mem_a.bytes()[..50 * PAGE] == mem_b.bytes()[..50 * PAGE]);
}

macro_rules! suite {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            for kind in KINDS {
                for sock in [Sock::Tcp, Sock::Unix] {
                    super::$name(kind, sock);
                }
            }
        }
    )*};
}

mod all_transports {
    use super::*;
    suite!(
        short_reads_and_writes,
        peer_closes_mid_record,
        out_of_range_refused,
        return_path_both_ways
    );
}

/// N bulk channels plus the urgent one, introduced to each other over TCP.
#[test]
fn channel_set_over_tcp() {
    let mem = Mem::new(8 << 20);
    mem.fill_random(3);
    let dst = Mem::new(8 << 20);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (r1, r2) = (mem.region(), dst.region());
    let srv = thread::spawn(move || {
        let rx = ChannelSet::accept(
            2,
            || l.accept().map(|(s, _)| Stream::from(s)),
            |s| Ok(make(Kind::Uring, s, &[r2])),
        )
        .unwrap();
        let ChannelSet { bulk, mut urgent } = rx;
        let handles: Vec<_> = bulk
            .into_iter()
            .map(|mut c| {
                thread::spawn(move || while c.recv(&mut TestDecoder, &mut []).unwrap().is_some() {})
            })
            .collect();
        let mut buf = [0u8; 8];
        let u = urgent.recv(&mut TestDecoder, &mut buf).unwrap().unwrap();
        assert_eq!(u.placement, Placement::Buffer { len: 4 });
        assert_eq!(&buf[..4], b"page");
        for h in handles {
            h.join().unwrap();
        }
    });
    let mut tx = ChannelSet::connect(
        2,
        || TcpStream::connect(addr).map(Stream::from),
        |s| Ok(make(Kind::Uring, s, &[r1])),
    )
    .unwrap();
    // The urgent record travels on its own connection, beside the bulk data.
    let pages = (8 << 20) / PAGE as u64;
    for (ch, first, count) in ferry_uring::share_out(0, pages, 2) {
        tx.bulk[ch].send(&[run(0, first, count as u32)]).unwrap();
    }
    tx.urgent
        .send(&[OutRecord {
            header: header(2, 0, 0, 0, 4),
            payload: Payload::Bytes(b"page"),
        }])
        .unwrap();
    for c in &mut tx.bulk {
        c.flush().unwrap();
        c.stream().shutdown().unwrap();
    }
    srv.join().unwrap();
    assert!(mem.bytes() == dst.bytes());
}

#[test]
fn probe_reports_one_line() {
    let p = probed();
    let line = p.to_string();
    assert!(!line.contains('\n'));
    assert!(line.starts_with("io_uring "), "{line}");
}

/// Records encoded by `ferry_core::wire` and placed by `WireDecoder`: page runs land in guest
/// memory, a section chunk in the caller's buffer, a corrupted header is refused.
fn wire_decoder_places_records(kind: Kind, sock: Sock) {
    use ferry_core::wire::{Capabilities, Layout, Negotiated, Region, Repr, StreamEncoder};
    let len = 4usize << 20;
    let layout = Layout::new(
        PAGE as u32,
        &[Region {
            id: 0,
            gpa: 0,
            size: len as u64,
        }],
    )
    .unwrap();
    let caps = Capabilities {
        payload_checksums: true,
        channels: 1,
        ..Capabilities::default()
    };
    let neg = Negotiated::new(layout, caps);
    let src = Mem::new(len);
    src.fill_random(9);
    let dst = Mem::new(len);
    let (a, b) = pair(sock);
    let mut tx = make(kind, a, &[src.region()]);
    let mut rx = make(kind, b, &[dst.region()]);
    let mut enc = StreamEncoder::new(&neg);
    let mut recs = Vec::new();
    for (first, count) in [(0u64, 256u32), (300, 1), (700, 324)] {
        let repr = Repr::PageRun {
            region: 0,
            first,
            count,
            requested: false,
            paused: false,
        };
        let (o, l) = (first as usize * PAGE, count as usize * PAGE);
        let mut h = [0u8; HEADER_LEN];
        enc.encode(&repr, &src.bytes()[o..o + l], &mut h).unwrap();
        recs.push(OutRecord {
            header: h,
            payload: Payload::Guest {
                region: 0,
                offset: o as u64,
                len: l as u64,
            },
        });
    }
    let state = b"device state";
    let repr = Repr::Section {
        section: 3,
        offset: 0,
        len: state.len() as u32,
        last: true,
    };
    let mut h = [0u8; HEADER_LEN];
    enc.encode(&repr, state, &mut h).unwrap();
    recs.push(OutRecord {
        header: h,
        payload: Payload::Bytes(state),
    });
    let mut bad = recs[1];
    bad.header[5] ^= 1;
    recs.push(bad);
    let t = thread::spawn(move || {
        tx.send(&recs).unwrap();
        tx.flush().unwrap();
        tx
    });
    let mut dec = ferry_uring::WireDecoder::new(neg, 64);
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        let r = rx.recv(&mut dec, &mut buf).unwrap().unwrap();
        assert!(matches!(r.placement, Placement::Guest { region: 0, .. }));
        let rec = dec.last().unwrap();
        if let Placement::Guest { offset, len, .. } = r.placement {
            let got = &dst.bytes()[offset as usize..(offset + len) as usize];
            assert_eq!(crc32fast::hash(got), rec.payload_crc, "{kind:?} {sock:?}");
        }
    }
    let r = rx.recv(&mut dec, &mut buf).unwrap().unwrap();
    assert_eq!(
        r.placement,
        Placement::Buffer {
            len: state.len() as u64
        }
    );
    assert_eq!(&buf[..state.len()], state);
    let r = rx.recv(&mut dec, &mut buf);
    assert!(
        matches!(r, Err(Error::Refused { .. })),
        "{kind:?} {sock:?}: {r:?}"
    );
    drop(t.join().unwrap());
}

mod wire {
    use super::*;
    suite!(wire_decoder_places_records);
}

/// When the probe found no io_uring, asking for it yields the std transport, which works.
#[test]
fn falls_back_to_std_without_io_uring() {
    let mut p = probed().clone();
    p.io_uring = Err("io_uring is disabled by kernel.io_uring_disabled".into());
    assert!(p.to_string().starts_with("io_uring unavailable"), "{p}");
    let mem = Mem::new(16 * PAGE);
    mem.fill_random(4);
    let dst = Mem::new(16 * PAGE);
    let (a, b) = pair(Sock::Unix);
    let t = Transport::Uring(UringConfig::default());
    let mut tx = AnyChannel::new(a, &[mem.region()], t, &p).unwrap();
    let mut rx = AnyChannel::new(b, &[dst.region()], t, &p).unwrap();
    assert_eq!(tx.name(), "std");
    tx.send(&[run(0, 0, 16)]).unwrap();
    let r = rx.recv(&mut TestDecoder, &mut []).unwrap().unwrap();
    assert_eq!(
        r.placement,
        Placement::Guest {
            region: 0,
            offset: 0,
            len: 16 * PAGE as u64
        }
    );
    assert!(mem.bytes() == dst.bytes());
}

#[test]
fn share_out_splits_at_stripes() {
    let s = ferry_uring::STRIPE_PAGES;
    let pieces: Vec<_> = ferry_uring::share_out(s - 2, s + 4, 2).collect();
    assert_eq!(pieces, vec![(0, s - 2, 2), (1, s, s), (0, 2 * s, 2)]);
    let total: u64 = pieces.iter().map(|p| p.2).sum();
    assert_eq!(total, s + 4);
    assert_eq!(ferry_uring::bulk_channel_for(5, 0), 0);
}

/// The running kernel's (major, minor) version.
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn uring_sharing(s: Stream, regions: &[MemRegion], share: &AnyChannel) -> AnyChannel {
    let t = Transport::Uring(UringConfig::default());
    AnyChannel::new_sharing(s, regions, t, probed(), Some(share)).unwrap()
}

fn shares(c: &AnyChannel) -> bool {
    matches!(c, AnyChannel::Uring(u) if u.shares_registration())
}

/// A second channel over the same memory clones the first one's registration of it (on
/// 6.12+), keeps its own header slab and staging buffer, and streams every byte exactly,
/// even after the first channel is gone; over other memory it registers its own.
#[test]
fn a_second_channel_shares_the_first_ones_registration() {
    let _g = big().lock().unwrap_or_else(|e| e.into_inner());
    let (src, dst) = (Mem::new(64 << 20), Mem::new(64 << 20));
    src.fill_random(0x5ca1e);
    let (a1, b1) = pair(Sock::Tcp);
    let first_tx = make(Kind::Uring, a1, &[src.region()]);
    let first_rx = make(Kind::Uring, b1, &[dst.region()]);
    let (a2, b2) = pair(Sock::Tcp);
    let mut tx = uring_sharing(a2, &[src.region()], &first_tx);
    let mut rx = uring_sharing(b2, &[dst.region()], &first_rx);
    if kernel_version() >= (6, 12) {
        assert!(shares(&tx) && shares(&rx), "cloning is in this kernel");
    }
    assert!(!shares(&first_tx) && !shares(&first_rx));
    drop(first_tx);
    drop(first_rx);
    let pages = (src.len / PAGE) as u64;
    let list = runs(pages, 77);
    let sender = thread::spawn(move || {
        for chunk in list.chunks(700) {
            let recs: Vec<_> = chunk.iter().map(|&(f, n)| run(0, f, n)).collect();
            tx.send(&recs).unwrap();
        }
        tx.flush().unwrap();
    });
    let mut got = 0u64;
    while let Some(r) = rx.recv(&mut TestDecoder, &mut []).unwrap() {
        got += r.placement.len();
    }
    sender.join().unwrap();
    assert_eq!(got, src.len as u64);
    assert!(src.bytes() == dst.bytes(), "every byte arrived in place");

    // Other memory: nothing to share, its own registration.
    let other = Mem::new(8 << 20);
    let (a3, _b3) = pair(Sock::Tcp);
    let (a4, _b4) = pair(Sock::Tcp);
    let base = make(Kind::Uring, a3, &[src.region()]);
    let own = uring_sharing(a4, &[other.region()], &base);
    assert!(matches!(own, AnyChannel::Uring(_)) && !shares(&own));
}
