//! Scanning the dirty bitmap of a 1 TiB guest (256 Mi pages, 32 MiB of bitmap)
//! at 0 %, 0.1 %, 1 %, 50 % (random pages), 1 % in clustered runs and 100 %
//! dirty: our page iterator and run extraction beside three baselines in the
//! same run (a bit-at-a-time loop, the classic find-next-bit loop, a plain sum of
//! the words as the memory-bandwidth ceiling). Criterion reports GB/s of bitmap
//! scanned; `cargo run --release -p ferry-benches --bin bitmap_table` prints the
//! same scans as one table with dirty pages per second.
//!
//! Run with `cargo bench -p ferry-benches --bench bitmap_scan`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};

#[path = "../src/bitmap_workload.rs"]
mod workload;

use workload::{Pattern, PAGES};

fn bitmap_scan(c: &mut Criterion) {
    for pattern in Pattern::ALL {
        let words = workload::generate(PAGES, pattern, 0x5EED_0000 + PAGES as u64);
        let dirty: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        let mut group = c.benchmark_group(format!("bitmap_scan/{}", pattern.name()));
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .throughput(Throughput::Bytes((PAGES / 8) as u64));

        group.bench_function("sum (bandwidth ceiling)", |b| {
            b.iter(|| workload::sum_words(black_box(&words)))
        });
        group.bench_function("bit at a time", |b| {
            b.iter(|| {
                let t = workload::bit_at_a_time(black_box(&words), PAGES);
                assert_eq!(t.pages, dirty);
                t
            })
        });
        group.bench_function("find-next-bit", |b| {
            b.iter(|| {
                let t = workload::find_next_bit(black_box(&words));
                assert_eq!(t.pages, dirty);
                t
            })
        });
        group.bench_function("ours: page iterator", |b| {
            b.iter(|| {
                let t = workload::our_pages(black_box(&words), PAGES);
                assert_eq!(t.pages, dirty);
                t
            })
        });
        group.bench_function("ours: drain_runs", |b| {
            b.iter_batched_ref(
                || words.clone(),
                |w| {
                    let t = workload::our_drain_runs(w, PAGES);
                    assert_eq!(t.pages, dirty);
                    t
                },
                BatchSize::PerIteration,
            )
        });
        group.bench_function("ours: take_run loop", |b| {
            b.iter_batched_ref(
                || words.clone(),
                |w| {
                    let t = workload::our_take_run(w, PAGES);
                    assert_eq!(t.pages, dirty);
                    t
                },
                BatchSize::PerIteration,
            )
        });
        group.finish();
    }
}

criterion_group!(benches, bitmap_scan);
criterion_main!(benches);
