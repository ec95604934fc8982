//! Shared by the bitmap benchmarks (`benches/bitmap_scan.rs`, `bin/bitmap_table.rs`):
//! the dirty patterns of a 1 TiB guest, the three baselines, and our scans, each
//! folded into the same checksum so the compiler cannot drop any of them.

use ferry_core::bitmap::{words_for, DirtyBitmap, DirtyBitmapView};

/// Pages of a 1 TiB guest with 4 KiB pages: 256 Mi pages, 32 MiB of bitmap.
pub const PAGES: usize = 256 << 20;

/// The longest run taken at once: 512 pages, 2 MiB.
pub const MAX_RUN: usize = 512;

/// A dirty pattern.
#[derive(Clone, Copy, Debug)]
pub enum Pattern {
    /// No page dirty.
    Clean,
    /// Pages dirty independently, this many per million.
    Scattered(u32),
    /// One page in a hundred dirty, in runs of 1 to 127 pages (64 on average).
    Clustered,
    /// Every page dirty.
    Full,
}

impl Pattern {
    /// Every pattern of the benchmark, in table order.
    pub const ALL: [Pattern; 6] = [
        Pattern::Clean,
        Pattern::Scattered(1_000),
        Pattern::Scattered(10_000),
        Pattern::Scattered(500_000),
        Pattern::Clustered,
        Pattern::Full,
    ];

    /// A short name for tables and benchmark ids.
    pub fn name(self) -> String {
        match self {
            Pattern::Clean => "0%".into(),
            Pattern::Scattered(ppm) => format!("{}%", f64::from(ppm) / 10_000.0),
            Pattern::Clustered => "1%-runs".into(),
            Pattern::Full => "100%".into(),
        }
    }
}

/// xorshift64*: a small deterministic generator, so every run measures the same bitmaps.
pub struct XorShift(pub u64);

impl XorShift {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The bitmap words of `pages` pages dirtied with `pattern`.
pub fn generate(pages: usize, pattern: Pattern, seed: u64) -> Vec<u64> {
    let mut words = vec![0u64; words_for(pages)];
    let mut rng = XorShift(seed | 1);
    match pattern {
        Pattern::Clean => {}
        Pattern::Full => {
            words.fill(u64::MAX);
        }
        Pattern::Scattered(500_000) => {
            for w in &mut words {
                *w = rng.next_u64();
            }
        }
        Pattern::Scattered(ppm) => {
            let target = (pages as u64 * u64::from(ppm) / 1_000_000) as usize;
            let mut n = 0;
            while n < target {
                let p = rng.below(pages);
                let bit = 1u64 << (p % 64);
                if words[p / 64] & bit == 0 {
                    words[p / 64] |= bit;
                    n += 1;
                }
            }
        }
        Pattern::Clustered => {
            let target = pages / 100;
            let mut n = 0;
            while n < target {
                let len = 1 + rng.below(127);
                let first = rng.below(pages - len);
                for p in first..first + len {
                    let bit = 1u64 << (p % 64);
                    if words[p / 64] & bit == 0 {
                        words[p / 64] |= bit;
                        n += 1;
                    }
                }
            }
        }
    }
    if pages % 64 != 0 {
        if let Some(last) = words.last_mut() {
            *last &= (1u64 << (pages % 64)) - 1;
        }
    }
    words
}

/// What a scan found: pages (or runs) seen and a checksum of their indices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Dirty pages found.
    pub pages: u64,
    /// Wrapping sum of the indices found (of run starts, for runs).
    pub sum: u64,
}

/// Baseline: test every bit, one at a time.
pub fn bit_at_a_time(words: &[u64], pages: usize) -> Tally {
    let mut t = Tally::default();
    for p in 0..pages {
        if (words[p / 64] >> (p % 64)) & 1 != 0 {
            t.pages += 1;
            t.sum = t.sum.wrapping_add(p as u64);
        }
    }
    t
}

/// Baseline: the classic find-next-bit loop (skip zero words, `trailing_zeros`,
/// clear the lowest bit of a copy), as QEMU walks its dirty bitmaps.
pub fn find_next_bit(words: &[u64]) -> Tally {
    let mut t = Tally::default();
    for (i, &w) in words.iter().enumerate() {
        let mut x = w;
        if x == 0 {
            continue;
        }
        while x != 0 {
            let p = i * 64 + x.trailing_zeros() as usize;
            t.pages += 1;
            t.sum = t.sum.wrapping_add(p as u64);
            x &= x - 1;
        }
    }
    t
}

/// Baseline: a plain sum of the words, the memory-bandwidth ceiling.
pub fn sum_words(words: &[u64]) -> Tally {
    Tally {
        pages: 0,
        sum: words.iter().fold(0u64, |a, &w| a.wrapping_add(w)),
    }
}

/// Ours: the page iterator.
pub fn our_pages(words: &[u64], pages: usize) -> Tally {
    let mut t = Tally::default();
    if let Ok(view) = DirtyBitmapView::new(words, pages) {
        for p in view.iter() {
            t.pages += 1;
            t.sum = t.sum.wrapping_add(p as u64);
        }
    }
    t
}

/// Ours: take every run (at most [`MAX_RUN`] pages), clearing the bitmap.
pub fn our_drain_runs(words: &mut [u64], pages: usize) -> Tally {
    let mut t = Tally::default();
    if let Ok(mut bitmap) = DirtyBitmap::new(words, pages) {
        for run in bitmap.drain_runs(MAX_RUN) {
            t.pages += run.len as u64;
            t.sum = t.sum.wrapping_add(run.first as u64);
        }
    }
    t
}

/// Ours: `take_run` called in a loop, clearing the bitmap.
pub fn our_take_run(words: &mut [u64], pages: usize) -> Tally {
    let mut t = Tally::default();
    if let Ok(mut bitmap) = DirtyBitmap::new(words, pages) {
        let mut at = 0;
        while let Some(run) = bitmap.take_run(at, MAX_RUN) {
            t.pages += run.len as u64;
            t.sum = t.sum.wrapping_add(run.first as u64);
            at = run.end();
        }
    }
    t
}
