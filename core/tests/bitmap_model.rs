//! The dirty bitmap against a naive model (a vector of booleans), on random
//! operations from a deterministic generator.
#![allow(clippy::unwrap_used)]

use ferry_core::bitmap::{words_for, DirtyBitmap, DirtyBitmapView, Run};

/// xorshift64*: small, deterministic, good enough for test patterns.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// The model's runs at or after `start`, at most `max_len` long, taken in order.
fn model_take_run(model: &mut [bool], start: usize, max_len: usize) -> Option<Run> {
    let first = (start..model.len()).find(|&p| model[p])?;
    let mut len = 0;
    while first + len < model.len() && model[first + len] && len < max_len.max(1) {
        model[first + len] = false;
        len += 1;
    }
    Some(Run { first, len })
}

fn model_runs(model: &mut [bool], max_len: usize) -> Vec<Run> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(r) = model_take_run(model, at, max_len) {
        at = r.end();
        out.push(r);
    }
    out
}

/// Fills the bitmap with one of several patterns: sparse bits, clustered runs,
/// nearly full, alternating, full.
fn fill(rng: &mut XorShift, b: &mut DirtyBitmap<'_>, model: &mut [bool]) {
    let pages = model.len();
    b.clear_all();
    model.fill(false);
    match rng.below(5) {
        0 => {
            for _ in 0..rng.below(pages / 8 + 2) {
                let p = rng.below(pages);
                b.set(p).unwrap();
                model[p] = true;
            }
        }
        1 => {
            for _ in 0..rng.below(12) {
                let a = rng.below(pages);
                let e = (a + rng.below(200)).min(pages);
                b.set_range(a..e).unwrap();
                model[a..e].fill(true);
            }
        }
        2 => {
            b.set_all();
            model.fill(true);
            for _ in 0..rng.below(20) {
                let p = rng.below(pages);
                b.clear(p).unwrap();
                model[p] = false;
            }
        }
        3 => {
            for p in (rng.below(2)..pages).step_by(2) {
                b.set(p).unwrap();
                model[p] = true;
            }
        }
        _ => {
            b.set_all();
            model.fill(true);
        }
    }
}

fn check_same(b: &DirtyBitmap<'_>, model: &[bool], what: &str) {
    let expected: Vec<usize> = (0..model.len()).filter(|&p| model[p]).collect();
    let got: Vec<usize> = b.iter().collect();
    assert_eq!(got, expected, "pages differ after {what}");
    assert_eq!(b.count(), expected.len(), "count after {what}");
    assert_eq!(b.is_empty(), expected.is_empty(), "is_empty after {what}");
}

#[test]
fn random_operations_match_the_model() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    // Sizes around word, chunk and block boundaries.
    let sizes = [
        1,
        63,
        64,
        65,
        127,
        511,
        512,
        513,
        4095,
        4096,
        4097,
        64 * 64 * 3 + 5,
        20_000,
    ];
    let mut ops_run = 0;
    for &pages in &sizes {
        let mut words = vec![0u64; words_for(pages)];
        let mut model = vec![false; pages];
        let mut b = DirtyBitmap::new(&mut words, pages).unwrap();
        for round in 0..60 {
            if round % 10 == 0 {
                fill(&mut rng, &mut b, &mut model);
            }
            for _ in 0..40 {
                ops_run += 1;
                let p = rng.below(pages);
                match rng.below(10) {
                    0 => {
                        assert_eq!(b.set(p).unwrap(), !model[p]);
                        model[p] = true;
                    }
                    1 => {
                        assert_eq!(b.test_and_clear(p).unwrap(), model[p]);
                        model[p] = false;
                    }
                    2 => assert_eq!(b.test(p).unwrap(), model[p]),
                    3 | 4 => {
                        let e = p + rng.below(pages - p + 1);
                        let was = model[p..e].iter().filter(|&&d| d).count();
                        if rng.below(2) == 0 {
                            assert_eq!(b.set_range(p..e).unwrap(), (e - p) - was);
                            model[p..e].fill(true);
                        } else {
                            assert_eq!(b.clear_range(p..e).unwrap(), was);
                            model[p..e].fill(false);
                        }
                    }
                    5 => {
                        let e = p + rng.below(pages - p + 1);
                        let want = model[p..e].iter().filter(|&&d| d).count();
                        assert_eq!(b.count_range(p..e).unwrap(), want);
                        assert_eq!(b.view().count_range(p..e).unwrap(), want);
                    }
                    6 => {
                        let want = (p..pages).find(|&q| model[q]);
                        assert_eq!(b.next_dirty(p), want);
                    }
                    7 => {
                        let max_len = 1 + rng.below(150);
                        let want = model_take_run(&mut model, p, max_len);
                        assert_eq!(b.take_run(p, max_len), want, "take_run({p}, {max_len})");
                    }
                    8 => {
                        // Merge a random log, with garbage past the end.
                        let mut log = vec![0u64; words_for(pages)];
                        let mut newly = 0;
                        for _ in 0..rng.below(64) {
                            let q = rng.below(pages);
                            if log[q / 64] & (1 << (q % 64)) == 0 {
                                log[q / 64] |= 1 << (q % 64);
                                if !model[q] {
                                    newly += 1;
                                }
                                model[q] = true;
                            }
                        }
                        if pages % 64 != 0 {
                            *log.last_mut().unwrap() |= u64::MAX << (pages % 64);
                        }
                        assert_eq!(b.merge_from(&log).unwrap(), newly);
                    }
                    _ => {
                        // Drain some runs and drop the iterator early.
                        let max_len = 1 + rng.below(300);
                        let take = rng.below(100);
                        let got: Vec<Run> = b.drain_runs(max_len).take(take).collect();
                        let mut want = Vec::new();
                        for _ in 0..take {
                            match model_take_run(&mut model, 0, max_len) {
                                Some(r) => want.push(r),
                                None => break,
                            }
                        }
                        assert_eq!(got, want, "drain_runs({max_len}).take({take})");
                    }
                }
            }
            check_same(&b, &model, "a round of random operations");
            if round % 10 == 9 {
                let max_len = [1, 3, 64, 65, 512, usize::MAX][rng.below(6)];
                let want = model_runs(&mut model, max_len);
                let got: Vec<Run> = b.drain_runs(max_len).collect();
                assert_eq!(got, want, "drain_runs({max_len}) on {pages} pages");
                check_same(&b, &model, "a full drain");
            }
        }
        // The view over the same words agrees too.
        let v = DirtyBitmapView::new(&words, pages).unwrap();
        let expected: Vec<usize> = (0..pages).filter(|&p| model[p]).collect();
        assert_eq!(v.iter().collect::<Vec<_>>(), expected);
    }
    assert!(ops_run > 20_000);
}

#[test]
fn random_patterns_drain_exactly_like_the_model() {
    let mut rng = XorShift(42);
    for trial in 0..300 {
        let pages = 1 + rng.below(64 * 200);
        let mut words = vec![0u64; words_for(pages)];
        let mut model = vec![false; pages];
        let mut b = DirtyBitmap::new(&mut words, pages).unwrap();
        fill(&mut rng, &mut b, &mut model);
        let max_len = 1 + rng.below(1000);
        let pages_seen: Vec<usize> = b.iter().collect();
        let want_pages: Vec<usize> = (0..pages).filter(|&p| model[p]).collect();
        assert_eq!(pages_seen, want_pages, "trial {trial}");
        let want = model_runs(&mut model.clone(), max_len);
        if trial % 2 == 0 {
            let got: Vec<Run> = b.drain_runs(max_len).collect();
            assert_eq!(got, want, "trial {trial}: drain_runs({max_len})");
        } else {
            let mut got = Vec::new();
            let mut at = 0;
            while let Some(r) = b.take_run(at, max_len) {
                at = r.end();
                got.push(r);
            }
            assert_eq!(got, want, "trial {trial}: take_run(.., {max_len})");
        }
        assert!(b.is_empty());
    }
}
