//! Prints the dirty-bitmap scan table: a 1 TiB guest's bitmap (256 Mi pages,
//! 32 MiB) at several dirty patterns, our page iterator and run extraction
//! beside three baselines measured in the same run (bit at a time, the classic
//! find-next-bit loop, and a plain sum of the words as the memory-bandwidth
//! ceiling). Median of several repetitions; GB/s of bitmap scanned and dirty
//! pages per second.
//!
//! Usage: `cargo run --release -p ferry-benches --bin bitmap_table [REPS [PATTERN]]`,
//! PATTERN being one of 0%, 0.1%, 1%, 50%, 1%-runs, 100%.

use std::hint::black_box;
use std::time::{Duration, Instant};

#[path = "../bitmap_workload.rs"]
mod workload;

use workload::{Pattern, Tally, MAX_RUN, PAGES};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A scan over a fresh copy of the bitmap.
type Scan = Box<dyn Fn(&mut [u64]) -> Tally>;

/// One scan under test.
struct Method {
    name: &'static str,
    /// Slow baselines run fewer times.
    slow: bool,
    scan: Scan,
    times: Vec<Duration>,
    tally: Tally,
}

impl Method {
    fn new(name: &'static str, slow: bool, scan: impl Fn(&mut [u64]) -> Tally + 'static) -> Self {
        Method {
            name,
            slow,
            scan: Box::new(scan),
            times: Vec::new(),
            tally: Tally::default(),
        }
    }
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(9)
        .max(1);
    let only = std::env::args().nth(2);
    let bytes = (PAGES / 8) as f64;
    println!(
        "dirty bitmap of a 1 TiB guest: {} Mi pages, {} MiB of bitmap; median of {reps} runs; runs of at most {MAX_RUN} pages",
        PAGES >> 20,
        PAGES >> 23
    );
    println!(
        "{:<8} {:<23} {:>9} {:>9} {:>8} {:>9} {:>8} {:>8}",
        "dirty", "scan", "ms", "(min ms)", "GB/s", "Gpages/s", "vs fnb", "vs sum"
    );
    let mut scratch = vec![0u64; PAGES / 64];
    let mut failed = false;
    for pattern in Pattern::ALL {
        if only.as_ref().is_some_and(|o| *o != pattern.name()) {
            continue;
        }
        let words = workload::generate(PAGES, pattern, 0x5EED_0000 + PAGES as u64);
        let dirty: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        let mut methods = vec![
            Method::new("sum (bandwidth ceiling)", false, |w| workload::sum_words(w)),
            Method::new("bit at a time", true, |w| workload::bit_at_a_time(w, PAGES)),
            Method::new("find-next-bit", false, |w| workload::find_next_bit(w)),
            Method::new("ours: page iterator", false, |w| {
                workload::our_pages(w, PAGES)
            }),
            Method::new("ours: drain_runs", false, |w| {
                workload::our_drain_runs(w, PAGES)
            }),
            Method::new("ours: take_run loop", false, |w| {
                workload::our_take_run(w, PAGES)
            }),
        ];
        // Interleaved, so that a noisy neighbour slows every scan alike; each
        // scan starts from a fresh copy, with the bitmap in the same cache state.
        for rep in 0..reps {
            for m in &mut methods {
                if m.slow && rep >= 3 {
                    continue;
                }
                scratch.copy_from_slice(&words);
                let t0 = Instant::now();
                m.tally = black_box((m.scan)(black_box(&mut scratch)));
                m.times.push(t0.elapsed());
            }
        }
        let medians: Vec<f64> = methods
            .iter()
            .map(|m| median(m.times.clone()).as_secs_f64())
            .collect();
        let (sum_t, fnb_t) = (medians[0], medians[2]);
        for (m, &secs) in methods.iter().zip(&medians) {
            let gbs = bytes / secs / 1e9;
            let gpages = if m.name.starts_with("sum") {
                "-".to_string()
            } else {
                format!("{:.2}", dirty as f64 / secs / 1e9)
            };
            println!(
                "{:<8} {:<23} {:>9.3} {:>9.3} {:>8.2} {:>9} {:>7.2}x {:>7.2}x",
                pattern.name(),
                m.name,
                secs * 1e3,
                m.times.iter().min().map_or(0.0, |t| t.as_secs_f64() * 1e3),
                gbs,
                gpages,
                fnb_t / secs,
                sum_t / secs
            );
            if !m.name.starts_with("sum") && m.tally.pages != dirty {
                println!("  ^ found {} dirty pages, expected {dirty}", m.tally.pages);
                failed = true;
            }
        }
        // The page scans must agree on the pages themselves, not just their number.
        if methods[1].tally != methods[2].tally || methods[2].tally != methods[3].tally {
            println!("  ^ the page scans disagree");
            failed = true;
        }
    }
    if failed {
        std::process::exit(1);
    }
}
