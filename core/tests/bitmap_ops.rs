//! The dirty bitmap on small literal bitmaps and at its edges.
#![allow(clippy::unwrap_used)]

use ferry_core::bitmap::{words_for, BitmapError, DirtyBitmap, DirtyBitmapView, Run};

fn runs(bitmap: &mut DirtyBitmap<'_>, max_len: usize) -> Vec<(usize, usize)> {
    bitmap
        .drain_runs(max_len)
        .map(|r| (r.first, r.len))
        .collect()
}

fn take_all(bitmap: &mut DirtyBitmap<'_>, max_len: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(r) = bitmap.take_run(at, max_len) {
        out.push((r.first, r.len));
        at = r.end();
    }
    out
}

#[test]
fn geometry_is_checked() {
    assert_eq!(words_for(0), 0);
    assert_eq!(words_for(1), 1);
    assert_eq!(words_for(64), 1);
    assert_eq!(words_for(65), 2);

    let mut words = [0u64; 2];
    assert_eq!(
        DirtyBitmap::new(&mut words, 129).unwrap_err(),
        BitmapError::SliceTooShort {
            pages: 129,
            needed: 3,
            words: 2
        }
    );
    // A longer slice is fine; only the words needed are used.
    let bitmap = DirtyBitmap::new(&mut words, 64).unwrap();
    assert_eq!(bitmap.words().len(), 1);
    assert_eq!(bitmap.page_count(), 64);

    // A bit past the last page is refused, by both constructors.
    let mut words = [0u64, 1 << 5];
    let err = DirtyBitmap::new(&mut words, 69).unwrap_err();
    assert_eq!(err, BitmapError::StrayBit { pages: 69, bit: 69 });
    assert_eq!(
        DirtyBitmapView::new(&words, 69).unwrap_err(),
        BitmapError::StrayBit { pages: 69, bit: 69 }
    );
    assert!(DirtyBitmap::new(&mut words, 70).is_ok());
    // Words past the ones needed are not looked at.
    let words = [1u64, u64::MAX];
    assert!(DirtyBitmapView::new(&words, 64).is_ok());

    // The messages read as sentences.
    let text = err.to_string();
    assert!(
        text.contains("bit 69") && text.contains("69-page"),
        "{text}"
    );

    // An empty region.
    let mut none: [u64; 0] = [];
    let mut empty = DirtyBitmap::new(&mut none, 0).unwrap();
    assert!(empty.is_empty());
    assert_eq!(empty.count(), 0);
    assert_eq!(empty.take_run(0, 8), None);
    assert_eq!(empty.iter().next(), None);
    assert_eq!(empty.drain_runs(8).next(), None);
    assert_eq!(
        empty.set(0),
        Err(BitmapError::PageOutOfRange { page: 0, pages: 0 })
    );
}

#[test]
fn set_test_clear_single_pages() {
    let mut words = [0u64; 2];
    let mut b = DirtyBitmap::new(&mut words, 100).unwrap();
    assert_eq!(b.set(0), Ok(true));
    assert_eq!(b.set(0), Ok(false));
    assert_eq!(b.set(63), Ok(true));
    assert_eq!(b.set(64), Ok(true));
    assert_eq!(b.set(99), Ok(true));
    assert_eq!(
        b.set(100),
        Err(BitmapError::PageOutOfRange {
            page: 100,
            pages: 100
        })
    );
    assert_eq!(b.test(63), Ok(true));
    assert_eq!(b.test(62), Ok(false));
    assert!(b.test(100).is_err());
    assert_eq!(b.count(), 4);
    assert_eq!(b.test_and_clear(63), Ok(true));
    assert_eq!(b.test_and_clear(63), Ok(false));
    assert_eq!(b.clear(99), Ok(true));
    assert!(b.test_and_clear(100).is_err());
    assert_eq!(b.words(), &[1, 1]);
    assert_eq!(b.next_dirty(1), Some(64));
    assert_eq!(b.next_dirty(65), None);
    assert!(!b.is_empty());
    b.clear_all();
    assert!(b.is_empty());
}

#[test]
fn ranges_set_clear_and_count() {
    let mut words = [0u64; 3];
    let mut b = DirtyBitmap::new(&mut words, 150).unwrap();
    assert_eq!(b.set_range(10..20), Ok(10));
    assert_eq!(b.set_range(15..25), Ok(5));
    assert_eq!(b.set_range(60..130), Ok(70));
    assert_eq!(b.set_range(7..7), Ok(0));
    assert_eq!(b.count(), 15 + 70);
    assert_eq!(b.count_range(0..150), Ok(85));
    assert_eq!(b.count_range(12..13), Ok(1));
    assert_eq!(b.count_range(0..10), Ok(0));
    assert_eq!(b.count_range(64..128), Ok(64));
    assert_eq!(b.count_range(63..129), Ok(66));
    assert_eq!(b.count_range(20..20), Ok(0));
    assert_eq!(
        b.count_range(140..151),
        Err(BitmapError::RangeOutOfRange {
            start: 140,
            end: 151,
            pages: 150
        })
    );
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = 30..20;
    assert!(b.clear_range(reversed).is_err());
    assert_eq!(b.clear_range(62..66), Ok(4));
    assert_eq!(b.clear_range(62..66), Ok(0));
    assert_eq!(
        b.words(),
        &[
            ((1u64 << 25) - 1) & !((1u64 << 10) - 1) | (0b11 << 60),
            !0b11u64,
            0b11
        ]
    );
    // The view sees the same thing.
    let v = b.view();
    assert_eq!(v.count(), 81);
    assert_eq!(v.count_range(64..150), Ok(64));
    assert_eq!(v.test(66), Ok(true));
    // set_all stops at the last page.
    assert_eq!(b.set_all(), 150 - 81);
    assert_eq!(b.words()[2], (1u64 << 22) - 1);
    assert_eq!(b.count(), 150);
}

#[test]
fn merge_counts_newly_dirty_pages_and_ignores_the_tail() {
    let mut words = [0b1010u64, 0];
    let mut b = DirtyBitmap::new(&mut words, 70).unwrap();
    // The log's bits past page 70 must not leak into the bitmap.
    let log = [0b0110u64, u64::MAX];
    assert_eq!(b.merge_from(&log), Ok(1 + 6));
    assert_eq!(b.words(), &[0b1110, 0b11_1111]);
    assert_eq!(b.merge_from(&log), Ok(0));
    assert_eq!(
        b.merge_from(&[0]),
        Err(BitmapError::LogSizeMismatch {
            expected: 2,
            words: 1
        })
    );
    // A longer merge goes through the chunked path and its remainder.
    let mut words = [0u64; 19];
    let mut b = DirtyBitmap::new(&mut words, 19 * 64).unwrap();
    let mut log = [0u64; 19];
    for (i, w) in log.iter_mut().enumerate() {
        *w = (i as u64) * 0x0101_0101;
    }
    let expected: usize = log.iter().map(|w| w.count_ones() as usize).sum();
    assert_eq!(b.merge_from(&log), Ok(expected));
    assert_eq!(b.words(), &log);
}

#[test]
fn runs_within_and_across_words() {
    let mut words = [0u64; 4];
    let mut b = DirtyBitmap::new(&mut words, 250).unwrap();
    b.set_range(3..6).unwrap(); // inside word 0
    b.set_range(60..70).unwrap(); // across words 0 and 1
    b.set_range(100..200).unwrap(); // across words 1, 2 and 3, word 2 whole
    b.set(249).unwrap(); // the very last page
    let expected = vec![(3, 3), (60, 10), (100, 100), (249, 1)];
    let mut copy = [0u64; 4];
    copy.copy_from_slice(b.words());
    assert_eq!(runs(&mut b, 1000), expected);
    assert!(b.is_empty());

    let mut b2 = DirtyBitmap::new(&mut copy, 250).unwrap();
    assert_eq!(take_all(&mut b2, 1000), expected);
    assert!(b2.is_empty());
}

#[test]
fn runs_are_bounded_by_max_len() {
    let mut words = [0u64; 4];
    let mut b = DirtyBitmap::new(&mut words, 256).unwrap();
    b.set_range(60..200).unwrap();
    let mut copy = [0u64; 4];
    copy.copy_from_slice(b.words());
    let expected = vec![(60, 64), (124, 64), (188, 12)];
    assert_eq!(runs(&mut b, 64), expected);
    let mut b2 = DirtyBitmap::new(&mut copy, 256).unwrap();
    assert_eq!(take_all(&mut b2, 64), expected);

    // max_len not a divisor of 64, and max_len of zero taken as one.
    let mut words = [0u64; 2];
    let mut b = DirtyBitmap::new(&mut words, 128).unwrap();
    b.set_range(62..68).unwrap();
    assert_eq!(b.take_run(0, 0), Some(Run { first: 62, len: 1 }));
    assert_eq!(b.take_run(0, 3), Some(Run { first: 63, len: 3 }));
    assert_eq!(runs(&mut b, 0), vec![(66, 1), (67, 1)]);
}

#[test]
fn take_run_starts_where_asked_and_leaves_the_rest() {
    let mut words = [0u64; 2];
    let mut b = DirtyBitmap::new(&mut words, 128).unwrap();
    b.set_range(10..20).unwrap();
    b.set(127).unwrap();
    // Starting inside a run takes only its tail.
    assert_eq!(b.take_run(15, 100), Some(Run { first: 15, len: 5 }));
    assert_eq!(b.count_range(10..15), Ok(5));
    assert_eq!(b.take_run(20, 100), Some(Run { first: 127, len: 1 }));
    assert_eq!(b.take_run(128, 100), None);
    assert_eq!(b.take_run(usize::MAX, 100), None);
    assert_eq!(b.take_run(0, 100), Some(Run { first: 10, len: 5 }));
    assert_eq!(b.take_run(0, 100), None);
    assert_eq!(Run { first: 3, len: 4 }.pages(), 3..7);
}

#[test]
fn full_bitmap_runs_and_pages() {
    const PAGES: usize = 64 * 300 + 17;
    let mut words = [0u64; words_for(PAGES)];
    let mut b = DirtyBitmap::new(&mut words, PAGES).unwrap();
    assert_eq!(b.set_all(), PAGES);
    assert!(b.iter().eq(0..PAGES));
    let got = runs(&mut b, 512);
    assert_eq!(got.len(), PAGES.div_ceil(512));
    for (i, &(first, len)) in got.iter().enumerate() {
        assert_eq!(first, i * 512);
        assert_eq!(len, (PAGES - first).min(512));
    }
    assert!(b.is_empty());
    b.set_all();
    assert_eq!(runs(&mut b, usize::MAX), vec![(0, PAGES)]);
}

#[test]
fn iterator_on_literal_words() {
    let words = [0x8000_0000_0000_0001u64, 0, 0, 0b110, 1 << 9];
    let v = DirtyBitmapView::new(&words, 64 * 4 + 10).unwrap();
    let pages: Vec<usize> = v.iter().collect();
    assert_eq!(pages, [0, 63, 64 * 3 + 1, 64 * 3 + 2, 64 * 4 + 9]);
    assert_eq!(v.into_iter().count(), 5);
    assert_eq!(v.next_dirty(0), Some(0));
    assert_eq!(v.next_dirty(1), Some(63));
    assert_eq!(v.next_dirty(64), Some(193));
    assert_eq!(v.next_dirty(64 * 4 + 10), None);
}

#[test]
fn dropping_a_drain_early_loses_no_page() {
    // Enough scattered runs that the iterator decodes ahead of what it returns.
    const PAGES: usize = 64 * 64;
    let mut words = [0u64; words_for(PAGES)];
    let mut b = DirtyBitmap::new(&mut words, PAGES).unwrap();
    let mut expected = Vec::new();
    for first in (0..PAGES - 40).step_by(37) {
        let len = 1 + first % 29;
        b.set_range(first..first + len).unwrap();
    }
    let mut copy = [0u64; words_for(PAGES)];
    copy.copy_from_slice(b.words());
    let all = runs(&mut DirtyBitmap::new(&mut copy, PAGES).unwrap(), 8);
    for take in [0, 1, 5, 63, 64, 65, 200] {
        let before = b.count();
        let taken: Vec<Run> = b.drain_runs(8).take(take).collect();
        let taken_pages: usize = taken.iter().map(|r| r.len).sum();
        assert_eq!(b.count(), before - taken_pages, "after taking {take}");
        for r in &taken {
            assert_eq!(b.count_range(r.pages()), Ok(0));
        }
        expected.extend(taken.iter().map(|r| (r.first, r.len)));
    }
    expected.extend(runs(&mut b, 8));
    assert_eq!(expected, all);
    assert!(b.is_empty());
}

#[test]
fn drop_restores_a_run_left_open_across_the_buffer() {
    // Alternating bits fill the decode buffer half a word at a time, then a run
    // of full words is open when the buffer stops.
    const PAGES: usize = 64 * 8;
    let mut words = [0u64; 8];
    words[0] = 0x5555_5555_5555_5555;
    words[1] = 0x5555_5555_5555_5555;
    words[2] = 0xD555_5555_5555_5555; // ends with a run (190, 191) that continues
    words[3] = u64::MAX;
    words[4] = 0x0000_0000_0000_FFFF;
    let original = words;
    let mut b = DirtyBitmap::new(&mut words, PAGES).unwrap();
    let first: Vec<Run> = b.drain_runs(4).take(3).collect();
    assert_eq!(first.len(), 3);
    let mut expected = original;
    for r in &first {
        for p in r.pages() {
            expected[p / 64] &= !(1 << (p % 64));
        }
    }
    assert_eq!(b.words(), &expected);
    let rest: Vec<Run> = b.drain_runs(1000).collect();
    assert_eq!(
        rest.last(),
        Some(&Run {
            first: 190,
            len: 2 + 64 + 16
        })
    );
    assert!(b.is_empty());
}
