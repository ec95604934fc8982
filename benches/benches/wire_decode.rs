//! Decoding a stream of 4 KiB page records into guest RAM, in GB/s of payload, beside
//! baselines measured in the same run: `memcpy` of the same bytes (the floor any
//! receiver pays to place pages; one 64 MiB copy, and page by page as the decoder does)
//! and CRC32 alone over the same pages (crc32fast, with run-time CPU detection). The decoder is measured with payload checksums on (CRC per
//! record, verified) and off, and fed the stream whole and in 64 KiB pieces (a socket
//! read's worth). Targets: ≥ 50 % of memcpy with checksums on, ≥ 90 % with them off.
//!
//! Before the criterion groups, the same variants are timed round-robin and printed as
//! one table of medians, each with its ratio to memcpy of the same payload bytes out of
//! the stream buffer in the same round (robust to the load of a shared machine), once
//! for 1 MiB (in cache: the decoder's own cost shows) and once for 64 MiB.
//!
//! Run with `cargo bench -p ferry-benches --bench wire_decode`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, Criterion, SamplingMode, Throughput};
use ferry_core::wire::{
    Capabilities, Dest, Event, Layout, Negotiated, Region, Repr, StreamDecoder, StreamEncoder,
    HEADER_LEN,
};

const PAGE: usize = 4096;
/// 64 MiB of guest RAM for the criterion groups: larger than the caches, as a guest is.
const PAGES: usize = 16384;

fn session(checksums: bool, pages: usize) -> Negotiated {
    let layout = Layout::new(
        PAGE as u32,
        &[Region {
            id: 0,
            gpa: 0,
            size: (pages * PAGE) as u64,
        }],
    )
    .expect("valid layout");
    Negotiated::new(
        layout,
        Capabilities {
            postcopy_ram: false,
            postcopy_only_sections: false,
            payload_checksums: checksums,
            channels: 1,
        },
    )
}

/// Guest pages with non-trivial contents.
fn guest(pages: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..pages * PAGE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// One page-run record per page, in order, then end of stream.
fn stream(neg: &Negotiated, src: &[u8]) -> Vec<u8> {
    let mut enc = StreamEncoder::new(neg);
    let mut out = Vec::with_capacity(src.len() / PAGE * (PAGE + HEADER_LEN) + HEADER_LEN);
    let mut head = [0u8; HEADER_LEN];
    for (i, page) in src.chunks_exact(PAGE).enumerate() {
        let repr = Repr::PageRun {
            region: 0,
            first: i as u64,
            count: 1,
            requested: false,
            paused: false,
        };
        enc.encode(&repr, page, &mut head).expect("encodes");
        out.extend_from_slice(&head);
        out.extend_from_slice(page);
    }
    enc.encode(&Repr::End, &[], &mut head).expect("encodes");
    out.extend_from_slice(&head);
    out
}

/// Decodes `stream` into `ram`, `piece` bytes at a time; returns records completed.
fn decode(neg: Negotiated, stream: &[u8], ram: &mut [u8], piece: usize) -> usize {
    let mut dec = StreamDecoder::new(neg);
    let mut done = 0;
    for chunk in stream.chunks(piece) {
        let mut input = chunk;
        loop {
            let step = dec.step(input).expect("a valid stream");
            input = &input[step.consumed..];
            match step.event {
                Some(Event::Payload {
                    dest: Dest::Ram { offset, .. },
                    bytes,
                    ..
                }) => {
                    let o = offset as usize;
                    ram[o..o + bytes.len()].copy_from_slice(bytes);
                }
                Some(Event::Complete(_)) => done += 1,
                Some(Event::Torn { .. }) => panic!("a torn page in a clean stream"),
                Some(_) => {}
                None if step.consumed == 0 => break,
                None => {}
            }
        }
    }
    dec.finish().expect("the stream ends");
    done
}

fn wire_decode(c: &mut Criterion) {
    let src = guest(PAGES);
    let with = session(true, PAGES);
    let without = session(false, PAGES);
    let s_on = stream(&with, &src);
    let s_off = stream(&without, &src);
    let mut ram = vec![0u8; PAGES * PAGE];

    let mut group = c.benchmark_group("wire_decode/4KiB_pages");
    group
        .sample_size(20)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes((PAGES * PAGE) as u64));

    group.bench_function("baseline: memcpy", |b| {
        b.iter(|| ram.copy_from_slice(black_box(&src)))
    });
    group.bench_function("baseline: memcpy per page", |b| {
        b.iter(|| {
            for (d, p) in ram
                .chunks_exact_mut(PAGE)
                .zip(black_box(&src).chunks_exact(PAGE))
            {
                d.copy_from_slice(p);
            }
        })
    });
    group.bench_function("baseline: crc32 per page", |b| {
        b.iter(|| {
            black_box(&src)
                .chunks_exact(PAGE)
                .fold(0u32, |acc, p| acc ^ crc32fast::hash(p))
        })
    });
    for (name, neg, s) in [
        ("decode, checksums on", with, &s_on),
        ("decode, checksums off", without, &s_off),
    ] {
        group.bench_function(format!("{name}, whole stream"), |b| {
            b.iter(|| decode(neg, black_box(s), &mut ram, usize::MAX))
        });
        group.bench_function(format!("{name}, 64 KiB pieces"), |b| {
            b.iter(|| decode(neg, black_box(s), &mut ram, 64 << 10))
        });
    }
    group.finish();
    assert_eq!(decode(with, &s_on, &mut ram, 1 << 16), PAGES + 1);
    assert!(ram == src, "the decoded guest RAM differs from the source");
}

/// The same variants timed round-robin (one iteration of each per round), so that
/// load from other processes on a shared machine hits all of them alike; prints the
/// median GB/s of each and its median ratio to the baseline of the same round: memcpy of
/// the same payload bytes, page by page, out of the stream buffer into guest RAM.
fn interleaved_table(pages: usize, rounds: usize) {
    use std::time::Instant;
    let src = guest(pages);
    let with = session(true, pages);
    let without = session(false, pages);
    let s_on = stream(&with, &src);
    let s_off = stream(&without, &src);
    let mut ram = vec![0u8; pages * PAGE];
    let names = [
        "memcpy, one copy",
        "memcpy per page, from the stream (baseline)",
        "crc32 per page (baseline)",
        "decode, checksums on, whole",
        "decode, checksums on, 64 KiB pieces",
        "decode, checksums off, whole",
        "decode, checksums off, 64 KiB pieces",
    ];
    let mut secs = vec![Vec::with_capacity(rounds); names.len()];
    let mut ratio = vec![Vec::with_capacity(rounds); names.len()];
    for _ in 0..rounds {
        let mut t = [0f64; 7];
        for (i, slot) in t.iter_mut().enumerate() {
            let start = Instant::now();
            match i {
                0 => ram.copy_from_slice(black_box(&src)),
                1 => {
                    // The very bytes the decoder copies: the payloads inside the stream.
                    let s = black_box(&s_on);
                    for (i, d) in ram.chunks_exact_mut(PAGE).enumerate() {
                        let at = HEADER_LEN + i * (HEADER_LEN + PAGE);
                        d.copy_from_slice(&s[at..at + PAGE]);
                    }
                }
                2 => {
                    black_box(
                        src.chunks_exact(PAGE)
                            .fold(0u32, |acc, p| acc ^ crc32fast::hash(p)),
                    );
                }
                3 => {
                    black_box(decode(with, black_box(&s_on), &mut ram, usize::MAX));
                }
                4 => {
                    black_box(decode(with, black_box(&s_on), &mut ram, 64 << 10));
                }
                5 => {
                    black_box(decode(without, black_box(&s_off), &mut ram, usize::MAX));
                }
                _ => {
                    black_box(decode(without, black_box(&s_off), &mut ram, 64 << 10));
                }
            }
            *slot = start.elapsed().as_secs_f64();
        }
        for i in 0..t.len() {
            secs[i].push(t[i]);
            ratio[i].push(t[1] / t[i]);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let bytes = (pages * PAGE) as f64;
    println!(
        "wire_decode: {pages} records of 4 KiB ({} KiB of payload), {rounds} interleaved rounds, medians",
        (pages * PAGE) >> 10
    );
    println!("{:<44} {:>8} {:>12}", "variant", "GB/s", "vs baseline");
    for i in 0..names.len() {
        let s = median(&mut secs[i]);
        let r = median(&mut ratio[i]);
        println!(
            "{:<44} {:>8.2} {:>11.0}%",
            names[i],
            bytes / s / 1e9,
            r * 100.0
        );
    }
}

criterion_group!(benches, wire_decode);

fn main() {
    // In cache (the decoder's own cost shows) and far larger than the caches (a guest).
    interleaved_table(256, 401);
    interleaved_table(PAGES, 41);
    benches();
    Criterion::default().configure_from_args().final_summary();
}
