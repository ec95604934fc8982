//! Streams guest pages over loopback TCP from registered memory into registered memory, for the
//! io_uring transport (plain and SEND_ZC), the blocking std transport and the TLS record
//! channel (AES-128-GCM on fixed keys: the record layer, not the handshake), with 1 and 2 bulk
//! channels, sequential runs and scattered single pages — beside the raw ceiling measured in
//! the same run: one plain socket pair streaming one large buffer with no framing.
//!
//! `cargo run --release -p ferry-benches --bin transport_stream [-- --gib 4 --reps 3 --json]`
#![allow(clippy::unwrap_used, clippy::panic)]

use std::alloc::{alloc, dealloc, Layout};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::ptr::NonNull;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use ferry_uring::{
    bulk_channel_for, probe, share_out, AnyChannel, Channel, Decoder, MemRegion, OutRecord,
    Payload, Placement, ProbeReport, RecvStrategy, Stream, Transport, UringConfig, HEADER_LEN,
};

const PAGE: usize = 4096;
/// Pages per record on the sequential pattern (2 MiB runs).
const RUN_PAGES: u64 = 512;
/// Records per `send` call.
const BATCH: usize = 512;

/// Page-aligned heap memory standing in for guest RAM.
struct Mem {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain heap memory, accessed by one channel thread at a time through raw pointers.
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Mem {
    fn new(len: usize, seed: u64) -> Self {
        let layout = Layout::from_size_align(len, PAGE).unwrap();
        // SAFETY: `layout` has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc(layout) }).unwrap();
        let mut x = seed | 1;
        for i in 0..len / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // SAFETY: `i * 8 + 8 <= len`; the pointer is 8-aligned (page-aligned base). `| 1`
            // keeps every page non-zero.
            unsafe { ptr.as_ptr().cast::<u64>().add(i).write(x | 1) };
        }
        Self { ptr, len }
    }

    fn region(&self) -> MemRegion {
        // SAFETY: the memory outlives every channel of the benchmark (dropped at the end of
        // `main`), and no reference to it exists while channels run.
        unsafe { MemRegion::new(self.ptr, self.len) }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align(self.len, PAGE).unwrap(),
            )
        };
    }
}

fn header(first: u64, count: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = 1;
    h[4..8].copy_from_slice(&count.to_le_bytes());
    h[8..16].copy_from_slice(&first.to_le_bytes());
    h[16..20].copy_from_slice(&(count * PAGE as u32).to_le_bytes());
    h
}

/// Page runs of region 0: `count` pages from `first`.
struct Runs;

impl Decoder for Runs {
    type Error = &'static str;

    fn place(&mut self, h: &[u8; HEADER_LEN]) -> Result<Placement, &'static str> {
        if h[0] != 1 {
            return Err("not a page run");
        }
        let count = u64::from(u32::from_le_bytes([h[4], h[5], h[6], h[7]]));
        let first = u64::from_le_bytes(h[8..16].try_into().map_err(|_| "short header")?);
        Ok(Placement::Guest {
            region: 0,
            offset: first * PAGE as u64,
            len: count * PAGE as u64,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    Sequential,
    Scattered,
}

#[derive(Clone, Copy)]
struct Case {
    pattern: Pattern,
    channels: usize,
    name: &'static str,
    send: Transport,
    recv: Transport,
    /// Inside TLS records instead (the transports above are then unused).
    tls: bool,
}

/// The TLS record channel's keys for one benchmark connection: fixed, the same at both ends.
fn protection() -> ferry_uring::tls::Protection {
    use ferry_uring::tls::{Direction, Suite};
    let d = || Direction::new(Suite::Aes128Gcm, &[0x5a; 16], &[0xa5; 12], 0).unwrap();
    ferry_uring::tls::Protection { tx: d(), rx: d() }
}

fn tcp_pairs(n: usize) -> Vec<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    (0..n)
        .map(|_| {
            let a = TcpStream::connect(addr).unwrap();
            let (b, _) = l.accept().unwrap();
            (a, b)
        })
        .collect()
}

/// The record lists, per channel, for one pass over `mem_len` bytes.
fn plan(pattern: Pattern, mem_len: usize, channels: usize, seed: u64) -> Vec<Vec<(u64, u32)>> {
    let pages = (mem_len / PAGE) as u64;
    let mut per: Vec<Vec<(u64, u32)>> = vec![Vec::new(); channels];
    match pattern {
        Pattern::Sequential => {
            let mut at = 0;
            while at < pages {
                let n = RUN_PAGES.min(pages - at);
                for (ch, f, c) in share_out(at, n, channels) {
                    per[ch].push((f, c as u32));
                }
                at += n;
            }
        }
        Pattern::Scattered => {
            // 1 % of the pages, chosen at random, sent in address order as single pages.
            let mut x = seed | 1;
            let mut dirty: Vec<u64> = (0..pages / 100)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % pages
                })
                .collect();
            dirty.sort_unstable();
            dirty.dedup();
            for p in dirty {
                per[bulk_channel_for(p, channels)].push((p, 1));
            }
        }
    }
    per
}

/// Streams `total` payload bytes; returns the wall time from the start of sending until the
/// last byte was placed.
fn run_case(case: &Case, src: &Mem, dst: &Mem, total: u64, probe: &ProbeReport) -> Duration {
    let pairs = tcp_pairs(case.channels);
    let start = Arc::new(Barrier::new(2 * case.channels + 1));
    let mut handles = Vec::new();
    // Different dirty sets per pass so scattered pages really are scattered over time.
    let plans: Vec<Vec<Vec<(u64, u32)>>> = (0..8)
        .map(|i| plan(case.pattern, src.len, case.channels, 17 + i))
        .collect();
    let pass_bytes: u64 = plans[0]
        .iter()
        .flatten()
        .map(|&(_, c)| u64::from(c) * PAGE as u64)
        .sum();
    let passes = total.div_ceil(pass_bytes);
    for (ch, (a, b)) in pairs.into_iter().enumerate() {
        let (tx, rx) = if case.tls {
            (
                AnyChannel::protected(Stream::from(a), &[src.region()], protection()).unwrap(),
                AnyChannel::protected(Stream::from(b), &[dst.region()], protection()).unwrap(),
            )
        } else {
            (
                AnyChannel::new(Stream::from(a), &[src.region()], case.send, probe).unwrap(),
                AnyChannel::new(Stream::from(b), &[dst.region()], case.recv, probe).unwrap(),
            )
        };
        let lists: Vec<Vec<(u64, u32)>> = plans.iter().map(|p| p[ch].clone()).collect();
        let (s1, s2) = (start.clone(), start.clone());
        handles.push(thread::spawn(move || {
            let mut tx = tx;
            s1.wait();
            let mut recs = Vec::with_capacity(BATCH);
            for pass in 0..passes {
                for chunk in lists[pass as usize % lists.len()].chunks(BATCH) {
                    recs.clear();
                    recs.extend(chunk.iter().map(|&(f, c)| OutRecord {
                        header: header(f, c),
                        payload: Payload::Guest {
                            region: 0,
                            offset: f * PAGE as u64,
                            len: u64::from(c) * PAGE as u64,
                        },
                    }));
                    tx.send(&recs).unwrap();
                }
            }
            tx.flush().unwrap();
            tx.stream().shutdown().unwrap();
            None
        }));
        handles.push(thread::spawn(move || {
            let mut rx = rx;
            s2.wait();
            while rx.recv(&mut Runs, &mut []).unwrap().is_some() {}
            Some(Instant::now())
        }));
    }
    start.wait();
    let t0 = Instant::now();
    let mut end = t0;
    for h in handles {
        if let Some(t) = h.join().unwrap() {
            end = end.max(t);
        }
    }
    end - t0
}

/// One plain socket pair streaming one large buffer, no framing: the ceiling.
fn ceiling(src: &Mem, dst: &Mem, total: u64) -> Duration {
    let (mut a, mut b) = tcp_pairs(1).pop().unwrap();
    let (sp, sl) = (src.ptr.as_ptr() as usize, src.len);
    let (dp, dl) = (dst.ptr.as_ptr() as usize, dst.len);
    let start = Arc::new(Barrier::new(3));
    let (s1, s2) = (start.clone(), start.clone());
    let w = thread::spawn(move || {
        // SAFETY: `src` outlives this thread (joined below) and nothing writes it meanwhile.
        let buf = unsafe { std::slice::from_raw_parts(sp as *const u8, sl) };
        s1.wait();
        let mut left = total;
        while left > 0 {
            let n = left.min(sl as u64) as usize;
            a.write_all(&buf[..n]).unwrap();
            left -= n as u64;
        }
    });
    let r = thread::spawn(move || {
        // SAFETY: `dst` outlives this thread (joined below) and only this thread touches it.
        let buf = unsafe { std::slice::from_raw_parts_mut(dp as *mut u8, dl) };
        s2.wait();
        let mut left = total;
        let mut at = 0;
        while left > 0 {
            let want = (dl - at).min(left as usize);
            let n = b.read(&mut buf[at..at + want]).unwrap();
            assert!(n > 0, "the ceiling stream ended early");
            left -= n as u64;
            at = (at + n) % dl;
        }
        Instant::now()
    });
    start.wait();
    let t0 = Instant::now();
    w.join().unwrap();
    r.join().unwrap() - t0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mut gib = 4u64;
    let mut reps = 3usize;
    let mut json = false;
    let mut filter = String::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--gib" => gib = args.next().and_then(|v| v.parse().ok()).unwrap_or(gib),
            "--reps" => reps = args.next().and_then(|v| v.parse().ok()).unwrap_or(reps),
            "--json" => json = true,
            "--only" => filter = args.next().unwrap_or_default(),
            _ => {
                eprintln!("usage: transport_stream [--gib N] [--reps N] [--json] [--only TEXT]");
                std::process::exit(2);
            }
        }
    }
    let total = gib << 30;
    let p = probe();
    println!("{p}");
    let mem_len = 1usize << 30;
    let src = Mem::new(mem_len, 0x1234_5678);
    let dst = Mem::new(mem_len, 0x9abc_def1);

    let uring = Transport::Uring(UringConfig::default());
    let zc = Transport::Uring(UringConfig {
        zero_copy: true,
        ..UringConfig::default()
    });
    let std_t = Transport::Std(RecvStrategy::default());
    let with_recv = |r| {
        Transport::Uring(UringConfig {
            recv: r,
            ..UringConfig::default()
        })
    };
    let mut cases = Vec::new();
    for pattern in [Pattern::Sequential, Pattern::Scattered] {
        for channels in [1, 2] {
            cases.push(Case {
                pattern,
                channels,
                name: "std",
                send: std_t,
                recv: std_t,
                tls: false,
            });
            cases.push(Case {
                pattern,
                channels,
                name: "tls AES-128-GCM",
                send: std_t,
                recv: std_t,
                tls: true,
            });
            cases.push(Case {
                pattern,
                channels,
                name: "io_uring",
                send: uring,
                recv: uring,
                tls: false,
            });
            if p.send_zc {
                cases.push(Case {
                    pattern,
                    channels,
                    name: "io_uring SEND_ZC",
                    send: zc,
                    recv: uring,
                    tls: false,
                });
            }
        }
        cases.push(Case {
            pattern,
            channels: 1,
            name: "io_uring recv direct",
            send: uring,
            recv: with_recv(RecvStrategy::Direct),
            tls: false,
        });
        cases.push(Case {
            pattern,
            channels: 1,
            name: "io_uring recv staged",
            send: uring,
            recv: with_recv(RecvStrategy::Staged),
            tls: false,
        });
    }

    // Each case runs right after its own ceiling measurement, and is reported as the median of
    // those paired ratios: the machine is shared, so only same-moment comparisons mean much.
    // `--only TEXT` keeps the cases whose "pattern channels transport" line contains TEXT.
    cases.retain(|c| {
        let pat = if c.pattern == Pattern::Sequential {
            "sequential"
        } else {
            "scattered"
        };
        format!("{pat} {} {}", c.channels, c.name).contains(&filter)
    });
    let gbps = |d: Duration| total as f64 / d.as_secs_f64() / 1e9;
    let mut ceil: Vec<f64> = Vec::new();
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..reps {
        for (i, c) in cases.iter().enumerate() {
            let base = gbps(ceiling(&src, &dst, total));
            let got = gbps(run_case(c, &src, &dst, total, &p));
            ceil.push(base);
            results[i].push(got);
            ratios[i].push(got / base);
        }
    }
    let ceil_m = median(&mut ceil.clone());
    if json {
        print!("{{\"gib\":{gib},\"reps\":{reps},\"ceiling_gbps\":{ceil_m:.3},\"cases\":[");
        for (i, c) in cases.iter().enumerate() {
            let m = median(&mut results[i]);
            let r = median(&mut ratios[i]);
            let pat = if c.pattern == Pattern::Sequential {
                "sequential"
            } else {
                "scattered"
            };
            print!(
                "{}{{\"pattern\":\"{pat}\",\"channels\":{},\"transport\":\"{}\",\"gbps\":{m:.3},\"of_ceiling\":{r:.3}}}",
                if i > 0 { "," } else { "" },
                c.channels,
                c.name,
            );
        }
        println!("]}}");
        return;
    }
    println!(
        "{gib} GiB of non-zero 4 KiB pages per run over loopback TCP, registered memory to registered memory; \
         medians of {reps} runs; each run paired with a ceiling run just before it"
    );
    ceil.sort_by(|a, b| a.total_cmp(b));
    println!(
        "raw ceiling (one socket pair, one large buffer, no framing): median {ceil_m:.2} GB/s, range {:.2}..{:.2}",
        ceil.first().copied().unwrap_or(0.0),
        ceil.last().copied().unwrap_or(0.0)
    );
    println!(
        "{:<11} {:>3}  {:<22} {:>8} {:>11}  runs (GB/s)",
        "pattern", "ch", "transport", "GB/s", "of ceiling"
    );
    for (i, c) in cases.iter().enumerate() {
        let m = median(&mut results[i].clone());
        let r = median(&mut ratios[i]);
        let pat = if c.pattern == Pattern::Sequential {
            "sequential"
        } else {
            "scattered"
        };
        println!(
            "{pat:<11} {:>3}  {:<22} {m:>8.2} {:>10.0}%  {:.2?}",
            c.channels,
            c.name,
            100.0 * r,
            results[i]
        );
    }
}
