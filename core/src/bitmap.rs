//! The dirty bitmap of one guest memory region, and its fast scan.
//!
//! A [`DirtyBitmap`] is a view over a caller-owned `&mut [u64]`: bit `i % 64` of
//! word `i / 64` stands for page `i` of the region, the layout of the KVM dirty
//! log (`KVM_GET_DIRTY_LOG`) on a little-endian host. Bits past the last page are
//! always zero; [`DirtyBitmap::new`] checks it and every operation keeps it so.
//! [`DirtyBitmapView`] is the read-only counterpart, for counting pending pages
//! in a bitmap that someone else owns.
//!
//! The scans are built for the shapes a migration sees:
//!
//! - **Mostly clean** (an idle guest, late rounds): clean memory is skipped
//!   several words at a time, the words OR-ed together so that the compiler
//!   vectorises the test, with one predictable branch per 64-byte chunk
//!   ([`DirtyBitmap::take_run`], [`DirtyBitmap::next_dirty`]) or per 512-byte
//!   block (the iterators).
//! - **Scattered** (a busy guest): the iterators visit the words of a block
//!   through a mask of its non-zero pairs of words, and write the positions of
//!   a word's first dirty bits into a small buffer without testing how many
//!   there are, so a bitmap whose words are half clean, half dirty costs no
//!   branch misprediction per word,
//!   where the classic "skip zero words" loop mispredicts on about every other
//!   word.
//! - **Dense** (the first round, a guest rewriting its memory): runs are found
//!   with `trailing_zeros`/`trailing_ones` on whole words (or, in
//!   [`DrainRuns`], as the start and end bits `x & !(x << 1)` and
//!   `x & !(x >> 1)`), and a word that is entirely dirty is consumed whole,
//!   never bit by bit.
//!
//! ```
//! use ferry_core::bitmap::{words_for, DirtyBitmap, Run};
//!
//! let mut words = [0u64; words_for(200)];
//! let mut bitmap = DirtyBitmap::new(&mut words, 200)?;
//! bitmap.set_range(60..70)?;
//! bitmap.set(199)?;
//! assert_eq!(bitmap.count(), 11);
//! assert_eq!(bitmap.take_run(0, 8), Some(Run { first: 60, len: 8 }));
//! let rest: Vec<Run> = bitmap.drain_runs(64).collect();
//! assert_eq!(rest, [Run { first: 68, len: 2 }, Run { first: 199, len: 1 }]);
//! assert!(bitmap.is_empty());
//! # Ok::<(), ferry_core::bitmap::BitmapError>(())
//! ```

use core::fmt;
use core::ops::Range;

/// Pages covered by one word of the bitmap.
pub const PAGES_PER_WORD: usize = u64::BITS as usize;

/// Words OR-ed together when skipping clean memory: one 64-byte cache line.
const CHUNK: usize = 8;

/// Words summarised by one non-zero mask in the iterators.
const BLOCK: usize = 64;

/// Words summarised by one bit of a block mask in the page iterator, and in
/// the run iterator. Coarser groups make the mask cheaper (x86-64 has no 64-bit
/// vector compare before SSE4.1); a clean word of a dirty group then decodes to
/// nothing, without a branch. Pairs measured best for both (against single
/// words and groups of four) on 0.1 % and 1 % scattered bitmaps.
const PAGES_GROUP: usize = 2;
const RUNS_GROUP: usize = 2;

/// Entries in an iterator's decode buffer (a power of two, so that indices can be
/// masked instead of bounds-checked).
const BUF: usize = 128;

/// The number of `u64` words a bitmap of `pages` pages needs.
pub const fn words_for(pages: usize) -> usize {
    pages.div_ceil(PAGES_PER_WORD)
}

/// Why a bitmap operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BitmapError {
    /// The slice given to a constructor cannot hold one bit per page.
    SliceTooShort {
        /// Pages in the region.
        pages: usize,
        /// Words those pages need.
        needed: usize,
        /// Words in the slice.
        words: usize,
    },
    /// A bit past the last page of the region is set.
    StrayBit {
        /// Pages in the region.
        pages: usize,
        /// The first bit found set past the end.
        bit: usize,
    },
    /// A page number lies outside the region.
    PageOutOfRange {
        /// The page asked for.
        page: usize,
        /// Pages in the region.
        pages: usize,
    },
    /// A page range is reversed or reaches past the end of the region.
    RangeOutOfRange {
        /// First page of the range.
        start: usize,
        /// One past the last page of the range.
        end: usize,
        /// Pages in the region.
        pages: usize,
    },
    /// A dirty log to merge does not have the geometry of the bitmap.
    LogSizeMismatch {
        /// Words the bitmap has.
        expected: usize,
        /// Words the log has.
        words: usize,
    },
}

impl fmt::Display for BitmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BitmapError::SliceTooShort {
                pages,
                needed,
                words,
            } => write!(
                f,
                "a bitmap of {pages} pages needs {needed} words, but the slice holds {words}"
            ),
            BitmapError::StrayBit { pages, bit } => write!(
                f,
                "bit {bit} is set, past the last page of a {pages}-page bitmap"
            ),
            BitmapError::PageOutOfRange { page, pages } => {
                write!(f, "page {page} is outside a region of {pages} pages")
            }
            BitmapError::RangeOutOfRange { start, end, pages } => write!(
                f,
                "page range {start}..{end} does not fit in a region of {pages} pages"
            ),
            BitmapError::LogSizeMismatch { expected, words } => write!(
                f,
                "the dirty log holds {words} words where the bitmap has {expected}"
            ),
        }
    }
}

impl core::error::Error for BitmapError {}

/// A run of consecutive dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Run {
    /// The first page of the run.
    pub first: usize,
    /// The number of pages in the run (at least one).
    pub len: usize,
}

impl Run {
    /// One past the last page of the run.
    pub const fn end(&self) -> usize {
        self.first + self.len
    }

    /// The pages of the run as a range.
    pub const fn pages(&self) -> Range<usize> {
        self.first..self.first + self.len
    }
}

/// The dirty bitmap of one memory region, over a caller-owned slice.
#[derive(Debug)]
pub struct DirtyBitmap<'a> {
    words: &'a mut [u64],
    pages: usize,
}

/// A read-only view of a dirty bitmap, for counting and iterating.
#[derive(Clone, Copy, Debug)]
pub struct DirtyBitmapView<'a> {
    words: &'a [u64],
    pages: usize,
}

/// Checks the geometry shared by both constructors and returns the words in use.
fn check_geometry(words: &[u64], pages: usize) -> Result<usize, BitmapError> {
    let needed = words_for(pages);
    if words.len() < needed {
        return Err(BitmapError::SliceTooShort {
            pages,
            needed,
            words: words.len(),
        });
    }
    let tail = pages % PAGES_PER_WORD;
    if tail != 0 {
        if let Some(&last) = words.get(needed - 1) {
            let stray = last & !low_mask(tail);
            if stray != 0 {
                return Err(BitmapError::StrayBit {
                    pages,
                    bit: pages - tail + stray.trailing_zeros() as usize,
                });
            }
        }
    }
    Ok(needed)
}

impl<'a> DirtyBitmapView<'a> {
    /// A view of `pages` pages over `words`.
    ///
    /// `words` must hold at least [`words_for(pages)`](words_for) words; words
    /// past those are ignored. A bit set past the last page is an error.
    pub fn new(words: &'a [u64], pages: usize) -> Result<Self, BitmapError> {
        let needed = check_geometry(words, pages)?;
        Ok(DirtyBitmapView {
            words: words.get(..needed).unwrap_or(&[]),
            pages,
        })
    }

    /// Pages in the region.
    pub fn page_count(&self) -> usize {
        self.pages
    }

    /// The words of the bitmap (exactly [`words_for`] of the page count).
    pub fn words(&self) -> &'a [u64] {
        self.words
    }

    /// Whether `page` is dirty.
    pub fn test(&self, page: usize) -> Result<bool, BitmapError> {
        let (w, bit) = self.locate(page)?;
        Ok(self.words.get(w).is_some_and(|&x| x & bit != 0))
    }

    /// The number of dirty pages.
    pub fn count(&self) -> usize {
        popcount(self.words)
    }

    /// The number of dirty pages in `range`.
    pub fn count_range(&self, range: Range<usize>) -> Result<usize, BitmapError> {
        check_range(&range, self.pages)?;
        Ok(count_range_raw(self.words, range))
    }

    /// Whether no page is dirty.
    pub fn is_empty(&self) -> bool {
        next_nonzero_word(self.words, 0).is_none()
    }

    /// The first dirty page at or after `from`, if any.
    pub fn next_dirty(&self, from: usize) -> Option<usize> {
        next_set_bit(self.words, from)
    }

    /// An iterator over the dirty pages, in ascending order.
    pub fn iter(&self) -> DirtyPages<'a> {
        DirtyPages::new(self.words)
    }

    fn locate(&self, page: usize) -> Result<(usize, u64), BitmapError> {
        locate(page, self.pages)
    }
}

impl<'a> IntoIterator for DirtyBitmapView<'a> {
    type Item = usize;
    type IntoIter = DirtyPages<'a>;

    fn into_iter(self) -> DirtyPages<'a> {
        self.iter()
    }
}

impl<'a> DirtyBitmap<'a> {
    /// A bitmap of `pages` pages over `words`.
    ///
    /// `words` must hold at least [`words_for(pages)`](words_for) words; words
    /// past those are left alone. A bit set past the last page is an error, so a
    /// buffer reused with another geometry is caught rather than trusted.
    pub fn new(words: &'a mut [u64], pages: usize) -> Result<Self, BitmapError> {
        let needed = check_geometry(words, pages)?;
        let len = words.len();
        let (used, _) = words.split_at_mut(needed.min(len));
        Ok(DirtyBitmap { words: used, pages })
    }

    /// A read-only view of this bitmap.
    pub fn view(&self) -> DirtyBitmapView<'_> {
        DirtyBitmapView {
            words: self.words,
            pages: self.pages,
        }
    }

    /// Pages in the region.
    pub fn page_count(&self) -> usize {
        self.pages
    }

    /// The words of the bitmap (exactly [`words_for`] of the page count), for
    /// sending it or handing it to the kernel.
    pub fn words(&self) -> &[u64] {
        self.words
    }

    /// Marks `page` dirty; returns whether it was clean before.
    pub fn set(&mut self, page: usize) -> Result<bool, BitmapError> {
        let (w, bit) = locate(page, self.pages)?;
        Ok(self.words.get_mut(w).is_some_and(|x| {
            let was_clean = *x & bit == 0;
            *x |= bit;
            was_clean
        }))
    }

    /// Marks `page` clean; returns whether it was dirty before.
    pub fn clear(&mut self, page: usize) -> Result<bool, BitmapError> {
        self.test_and_clear(page)
    }

    /// Whether `page` is dirty.
    pub fn test(&self, page: usize) -> Result<bool, BitmapError> {
        self.view().test(page)
    }

    /// Marks `page` clean and returns whether it was dirty.
    pub fn test_and_clear(&mut self, page: usize) -> Result<bool, BitmapError> {
        let (w, bit) = locate(page, self.pages)?;
        Ok(self.words.get_mut(w).is_some_and(|x| {
            let was_dirty = *x & bit != 0;
            *x &= !bit;
            was_dirty
        }))
    }

    /// Marks every page in `range` dirty; returns how many were clean before.
    pub fn set_range(&mut self, range: Range<usize>) -> Result<usize, BitmapError> {
        check_range(&range, self.pages)?;
        Ok(set_range_raw(self.words, range))
    }

    /// Marks every page in `range` clean; returns how many were dirty before.
    pub fn clear_range(&mut self, range: Range<usize>) -> Result<usize, BitmapError> {
        check_range(&range, self.pages)?;
        Ok(clear_range_raw(self.words, range))
    }

    /// Marks every page of the region dirty (the first round of a migration);
    /// returns how many were clean before.
    pub fn set_all(&mut self) -> usize {
        set_range_raw(self.words, 0..self.pages)
    }

    /// Marks every page of the region clean.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    /// The number of dirty pages.
    pub fn count(&self) -> usize {
        popcount(self.words)
    }

    /// The number of dirty pages in `range`.
    pub fn count_range(&self, range: Range<usize>) -> Result<usize, BitmapError> {
        self.view().count_range(range)
    }

    /// Whether no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.view().is_empty()
    }

    /// The first dirty page at or after `from`, if any.
    pub fn next_dirty(&self, from: usize) -> Option<usize> {
        next_set_bit(self.words, from)
    }

    /// An iterator over the dirty pages, in ascending order, leaving them dirty.
    pub fn iter(&self) -> DirtyPages<'_> {
        DirtyPages::new(self.words)
    }

    /// ORs a dirty log of the same geometry (one bit per page, as many words as
    /// this bitmap) into this bitmap; returns how many pages became dirty that
    /// were clean before.
    ///
    /// Bits of the log past the last page are ignored. A log of another size is
    /// an error and changes nothing.
    pub fn merge_from(&mut self, log: &[u64]) -> Result<usize, BitmapError> {
        if log.len() != self.words.len() {
            return Err(BitmapError::LogSizeMismatch {
                expected: self.words.len(),
                words: log.len(),
            });
        }
        let tail = self.pages % PAGES_PER_WORD;
        let full = if tail == 0 {
            self.words.len()
        } else {
            self.words.len() - 1
        };
        let (dst_full, dst_tail) = self.words.split_at_mut(full);
        let (src_full, src_tail) = log.split_at(full);
        let mut newly = 0usize;
        // Chunks of a fixed length so that the loop is vectorised.
        let mut dst_chunks = dst_full.chunks_exact_mut(CHUNK);
        let mut src_chunks = src_full.chunks_exact(CHUNK);
        for (d, s) in (&mut dst_chunks).zip(&mut src_chunks) {
            for (d, &s) in d.iter_mut().zip(s) {
                newly += (s & !*d).count_ones() as usize;
                *d |= s;
            }
        }
        for (d, &s) in dst_chunks
            .into_remainder()
            .iter_mut()
            .zip(src_chunks.remainder())
        {
            newly += (s & !*d).count_ones() as usize;
            *d |= s;
        }
        if let (Some(d), Some(&s)) = (dst_tail.first_mut(), src_tail.first()) {
            let s = s & low_mask(tail);
            newly += (s & !*d).count_ones() as usize;
            *d |= s;
        }
        Ok(newly)
    }

    /// Finds the first run of dirty pages at or after `start`, at most `max_len`
    /// pages long, marks it clean and returns it.
    ///
    /// A run longer than `max_len` is split: the rest stays dirty for the next
    /// call. A `max_len` of zero is taken as one. Returns `None` when no page at
    /// or after `start` is dirty.
    pub fn take_run(&mut self, start: usize, max_len: usize) -> Option<Run> {
        if start >= self.pages {
            return None;
        }
        let first = next_set_bit(self.words, start)?;
        let len = take_run_at(self.words, first, max_len.max(1));
        Some(Run { first, len })
    }

    /// An iterator that takes every run of dirty pages, in ascending order, at
    /// most `max_len` pages each (a `max_len` of zero is taken as one), marking
    /// them clean.
    ///
    /// The iterator decodes a little ahead of what it has returned. If it is
    /// dropped before the end, the runs it decoded but did not return are marked
    /// dirty again, so no page is lost; only a leaked iterator
    /// ([`core::mem::forget`]) can lose them.
    pub fn drain_runs(&mut self, max_len: usize) -> DrainRuns<'_> {
        DrainRuns::new(self.words, max_len.max(1))
    }
}

// ---------------------------------------------------------------------------
// Word-level helpers. They rely on the invariant that bits past the last page
// are zero, and on ranges having been checked.

/// The low `n` bits set (`n` in `0..=64`).
#[inline]
fn low_mask(n: usize) -> u64 {
    if n >= PAGES_PER_WORD {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// The word index and bit of `page`, if it lies in the region.
#[inline]
fn locate(page: usize, pages: usize) -> Result<(usize, u64), BitmapError> {
    if page >= pages {
        return Err(BitmapError::PageOutOfRange { page, pages });
    }
    Ok((page / PAGES_PER_WORD, 1u64 << (page % PAGES_PER_WORD)))
}

fn check_range(range: &Range<usize>, pages: usize) -> Result<(), BitmapError> {
    if range.start > range.end || range.end > pages {
        return Err(BitmapError::RangeOutOfRange {
            start: range.start,
            end: range.end,
            pages,
        });
    }
    Ok(())
}

/// Calls `f(word, mask)` for each word that `range` touches, with the bits of
/// the range in that word.
#[inline]
fn for_each_masked(words: &mut [u64], range: Range<usize>, mut f: impl FnMut(&mut u64, u64)) {
    if range.start >= range.end {
        return;
    }
    let first = range.start / PAGES_PER_WORD;
    let last = (range.end - 1) / PAGES_PER_WORD;
    let head = !low_mask(range.start % PAGES_PER_WORD);
    let tail = low_mask(range.end - last * PAGES_PER_WORD);
    let Some(span) = words.get_mut(first..=last) else {
        return;
    };
    match span {
        [] => {}
        [only] => f(only, head & tail),
        [lo, mid @ .., hi] => {
            f(lo, head);
            for w in mid {
                f(w, u64::MAX);
            }
            f(hi, tail);
        }
    }
}

fn set_range_raw(words: &mut [u64], range: Range<usize>) -> usize {
    let mut newly = 0usize;
    for_each_masked(words, range, |w, m| {
        newly += (m & !*w).count_ones() as usize;
        *w |= m;
    });
    newly
}

fn clear_range_raw(words: &mut [u64], range: Range<usize>) -> usize {
    let mut cleared = 0usize;
    for_each_masked(words, range, |w, m| {
        cleared += (m & *w).count_ones() as usize;
        *w &= !m;
    });
    cleared
}

fn count_range_raw(words: &[u64], range: Range<usize>) -> usize {
    if range.start >= range.end {
        return 0;
    }
    let first = range.start / PAGES_PER_WORD;
    let last = (range.end - 1) / PAGES_PER_WORD;
    let head = !low_mask(range.start % PAGES_PER_WORD);
    let tail = low_mask(range.end - last * PAGES_PER_WORD);
    match words.get(first..=last) {
        Some([only]) => (only & head & tail).count_ones() as usize,
        Some([lo, mid @ .., hi]) => {
            (lo & head).count_ones() as usize + popcount(mid) + (hi & tail).count_ones() as usize
        }
        _ => 0,
    }
}

/// The number of set bits in `words`.
fn popcount(words: &[u64]) -> usize {
    let mut chunks = words.chunks_exact(CHUNK);
    let mut total = 0usize;
    for c in &mut chunks {
        total += c.iter().map(|x| x.count_ones() as usize).sum::<usize>();
    }
    total
        + chunks
            .remainder()
            .iter()
            .map(|x| x.count_ones() as usize)
            .sum::<usize>()
}

/// The OR of a chunk of words, written so that the compiler vectorises it.
#[inline(always)]
fn or_all(chunk: &[u64]) -> u64 {
    chunk.iter().fold(0, |acc, &x| acc | x)
}

/// The index of the first non-zero word at or after `from`.
///
/// Clean memory is skipped a cache line at a time: the eight words of a chunk
/// are OR-ed together and tested once.
#[inline]
fn next_nonzero_word(words: &[u64], from: usize) -> Option<usize> {
    let rest = words.get(from..)?;
    let mut chunks = rest.chunks_exact(CHUNK);
    let clean = chunks
        .position(|c| or_all(c) != 0)
        .unwrap_or(rest.len() / CHUNK);
    let base = clean * CHUNK;
    rest.get(base..)?
        .iter()
        .position(|&x| x != 0)
        .map(|i| from + base + i)
}

/// The first set bit at or after `from`.
#[inline]
fn next_set_bit(words: &[u64], from: usize) -> Option<usize> {
    let w = from / PAGES_PER_WORD;
    let first = words.get(w)? & !low_mask(from % PAGES_PER_WORD);
    if first != 0 {
        return Some(w * PAGES_PER_WORD + first.trailing_zeros() as usize);
    }
    let w = next_nonzero_word(words, w + 1)?;
    let x = words.get(w)?;
    Some(w * PAGES_PER_WORD + x.trailing_zeros() as usize)
}

/// Clears the run of set bits starting at `first` (which is set), at most
/// `max_len` (at least one) long; returns its length.
fn take_run_at(words: &mut [u64], first: usize, max_len: usize) -> usize {
    let mut w = first / PAGES_PER_WORD;
    let shift = first % PAGES_PER_WORD;
    let Some(x) = words.get_mut(w) else {
        return 0;
    };
    // The run inside the first word.
    let room = PAGES_PER_WORD - shift;
    let ones = ((*x >> shift).trailing_ones() as usize).min(room);
    let mut len = ones.min(max_len);
    *x &= !(low_mask(len) << shift);
    if len < ones || ones < room {
        return len;
    }
    // The run reaches the end of the word: continue, whole words at a time.
    w += 1;
    while let Some(x) = words.get_mut(w) {
        let budget = max_len - len;
        if budget == 0 {
            break;
        }
        if *x == u64::MAX && budget >= PAGES_PER_WORD {
            *x = 0;
            len += PAGES_PER_WORD;
            w += 1;
            continue;
        }
        let n = (x.trailing_ones() as usize).min(budget);
        *x &= !low_mask(n);
        len += n;
        break;
    }
    len
}

/// Walks the non-zero groups of `G` words of a bitmap in order, 64-word block
/// by block.
///
/// A block is first tested as a whole (OR of its words, a vectorisable loop), so
/// clean memory costs one predictable branch per 512 bytes; a block that is not
/// clean is summarised as a mask of its non-zero groups, whose bits are then
/// visited with `trailing_zeros`. This replaces the classic
/// "is this word zero?" branch, which mispredicts half the time on a bitmap
/// whose words are half clean, by one loop exit per block.
#[derive(Clone, Debug)]
struct NonZeroWords<const G: usize> {
    /// Word index of the next block to load.
    next_block: usize,
    /// Word index of the current block.
    base: usize,
    /// Non-zero groups of the current block not yet visited.
    mask: u64,
    /// The last block loaded had a non-zero word.
    dirty: bool,
}

impl<const G: usize> NonZeroWords<G> {
    fn new() -> Self {
        NonZeroWords {
            next_block: 0,
            base: 0,
            mask: 0,
            dirty: false,
        }
    }

    /// The index of the first word of the next non-zero group, if any.
    #[inline(always)]
    fn next(&mut self, words: &[u64]) -> Option<usize> {
        if self.mask == 0 && !self.load_block(words) {
            return None;
        }
        let i = self.mask.trailing_zeros() as usize;
        self.mask &= self.mask - 1;
        Some(self.base + G * i)
    }

    /// Loads the next block that has a non-zero word; false at the end.
    #[inline(never)]
    fn load_block(&mut self, words: &[u64]) -> bool {
        loop {
            let start = self.next_block;
            let rest = words.get(start..).unwrap_or(&[]);
            let (mask, len) = match rest.first_chunk::<BLOCK>() {
                // A whole block: skipped on one test if clean. Right after a
                // dirty block the test is left out, as the next one is likely
                // dirty too.
                Some(block) if !self.dirty && or_all(block) == 0 => (0, BLOCK),
                Some(block) => (nonzero_mask::<G>(block), BLOCK),
                None if rest.is_empty() => return false,
                None => (nonzero_mask::<G>(rest), rest.len()),
            };
            self.next_block = start + len;
            self.dirty = mask != 0;
            if mask != 0 {
                self.base = start;
                self.mask = mask;
                return true;
            }
        }
    }
}

/// Bit `i` set when one of the words `G * i .. G * (i + 1)` of `block` (at most
/// 64 words) is not zero.
#[inline(always)]
fn nonzero_mask<const G: usize>(block: &[u64]) -> u64 {
    let mut mask = 0u64;
    let groups = block.chunks_exact(G);
    let tail = or_all(groups.remainder());
    let n = groups.len();
    for (i, group) in groups.enumerate() {
        mask |= u64::from(or_all(group) != 0) << i;
    }
    mask | u64::from(tail != 0) << n
}

/// The next word to decode: the next of the current group if any is left,
/// else the first of the next non-zero group. `pending` is the range of words
/// of the current group still to decode.
#[inline(always)]
fn next_word<const G: usize>(
    cursor: &mut NonZeroWords<G>,
    pending: &mut Range<usize>,
    words: &[u64],
) -> Option<usize> {
    if G > 1 && pending.start < pending.end {
        let w = pending.start;
        pending.start += 1;
        return Some(w);
    }
    let w = cursor.next(words)?;
    if G > 1 {
        *pending = w + 1..(w + G).min(words.len());
    }
    Some(w)
}

/// Writes the positions of the first `K` set bits of `x`, offset by `base`,
/// into `buf` from `n` on; returns the new fill and the bits of `x` left over.
///
/// The positions are written whether or not `x` has that many bits (past the
/// fill they are harmless scratch), so a sparse word decodes without a branch
/// that depends on its contents.
#[inline(always)]
fn decode_few<const K: usize>(
    buf: &mut [usize; BUF],
    mut n: usize,
    mut x: u64,
    base: usize,
) -> (usize, u64) {
    for _ in 0..K {
        buf[n % BUF] = base + x.trailing_zeros() as usize;
        n += usize::from(x != 0);
        x &= x.wrapping_sub(1);
    }
    (n, x)
}

/// Writes the positions of all set bits of `x`, offset by `base`, into `buf`
/// from `n` on; returns the new fill. `n + 64` must not exceed the buffer.
#[inline(always)]
fn decode_all<const K: usize>(buf: &mut [usize; BUF], n: usize, x: u64, base: usize) -> usize {
    let (mut n, mut x) = decode_few::<K>(buf, n, x, base);
    while x != 0 {
        buf[n % BUF] = base + x.trailing_zeros() as usize;
        n += 1;
        x &= x - 1;
    }
    n
}

/// An iterator over the dirty pages of a bitmap, in ascending order.
///
/// Made by [`DirtyBitmap::iter`] and [`DirtyBitmapView::iter`]. Sparse words
/// are decoded ahead into a small buffer without a branch per bit; the rest of a
/// dense word is walked in place, as a word with many bits set makes the loop
/// predictable anyway.
#[derive(Clone, Debug)]
pub struct DirtyPages<'a> {
    words: &'a [u64],
    cursor: NonZeroWords<PAGES_GROUP>,
    buf: [usize; BUF],
    head: usize,
    fill: usize,
    /// Bits of a dense word still to return, after the buffer.
    rest: u64,
    /// The first page of the word `rest` belongs to.
    rest_base: usize,
    /// Words of the current group not decoded yet.
    pending: Range<usize>,
    /// Every non-zero word has been decoded.
    done: bool,
}

impl<'a> DirtyPages<'a> {
    fn new(words: &'a [u64]) -> Self {
        DirtyPages {
            words,
            cursor: NonZeroWords::new(),
            buf: [0; BUF],
            head: 0,
            fill: 0,
            rest: 0,
            rest_base: 0,
            pending: 0..0,
            done: false,
        }
    }

    /// Decodes non-zero words until the buffer holds more than half its size or
    /// a dense word is met.
    #[inline(never)]
    fn refill(&mut self) {
        // Work on locals: the compiler cannot tell that the buffer writes leave
        // the other fields alone.
        let mut cursor = self.cursor.clone();
        let mut pending = self.pending.clone();
        let words = self.words;
        let buf = &mut self.buf;
        let mut n = 0;
        while n <= BUF - PAGES_PER_WORD {
            let Some(w) = next_word(&mut cursor, &mut pending, words) else {
                self.done = true;
                break;
            };
            let x = words.get(w).copied().unwrap_or(0);
            let base = w * PAGES_PER_WORD;
            let (fill, rest) = decode_few::<2>(buf, n, x, base);
            n = fill;
            if rest != 0 {
                self.rest = rest;
                self.rest_base = base;
                break;
            }
        }
        self.cursor = cursor;
        self.pending = pending;
        self.head = 0;
        self.fill = n;
    }
}

impl Iterator for DirtyPages<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        loop {
            if self.head != self.fill {
                let page = self.buf[self.head % BUF];
                self.head += 1;
                return Some(page);
            }
            if self.rest != 0 {
                let page = self.rest_base + self.rest.trailing_zeros() as usize;
                self.rest &= self.rest - 1;
                return Some(page);
            }
            if self.done {
                return None;
            }
            self.refill();
        }
    }
}

impl core::iter::FusedIterator for DirtyPages<'_> {}

/// An iterator that takes the runs of dirty pages of a bitmap, clearing them.
///
/// Made by [`DirtyBitmap::drain_runs`]. Each non-zero word is decoded at once
/// into the starts and ends of the runs it holds (`x & !(x << 1)` and
/// `x & !(x >> 1)`, with the neighbouring words' edge bits), so a word costs
/// the same whatever its pattern, and an entirely dirty word costs nothing
/// beyond being cleared. The words are cleared as they are decoded; the runs
/// decoded but not yet returned are marked dirty again if the iterator is
/// dropped.
#[derive(Debug)]
pub struct DrainRuns<'b> {
    words: &'b mut [u64],
    max_len: usize,
    cursor: NonZeroWords<RUNS_GROUP>,
    /// First pages of the decoded runs (the run at `head` may have been
    /// partly returned already).
    starts: [usize; BUF],
    /// One past the last pages of the decoded runs.
    ends: [usize; BUF],
    head: usize,
    /// Decoded starts; `n_starts - n_ends` is 1 when the last run continues
    /// past the words decoded so far, else 0.
    n_starts: usize,
    n_ends: usize,
    /// The last word decoded and its original top bit, to carry a run over a
    /// word boundary.
    last_word: usize,
    last_top: u64,
    /// Words of the current group not decoded yet.
    pending: Range<usize>,
    done: bool,
}

impl<'b> DrainRuns<'b> {
    fn new(words: &'b mut [u64], max_len: usize) -> Self {
        DrainRuns {
            words,
            max_len,
            cursor: NonZeroWords::new(),
            starts: [0; BUF],
            ends: [0; BUF],
            head: 0,
            n_starts: 0,
            n_ends: 0,
            last_word: usize::MAX,
            last_top: 0,
            pending: 0..0,
            done: false,
        }
    }

    /// Decodes non-zero words (clearing them) until at least half the buffer is
    /// in use. A run left open at the end of the buffer is carried to the front.
    #[inline(never)]
    fn refill(&mut self) {
        let open = self.n_starts - self.n_ends;
        if open != 0 {
            self.starts[0] = self.starts[self.n_ends % BUF];
        }
        // Work on locals: the compiler cannot tell that the stores to the
        // bitmap and the buffers leave the other fields alone.
        let mut cursor = self.cursor.clone();
        let mut pending = self.pending.clone();
        let mut last_word = self.last_word;
        let mut last_top = self.last_top;
        let words = &mut *self.words;
        let starts_buf = &mut self.starts;
        let ends_buf = &mut self.ends;
        let mut ns = open;
        let mut ne = 0;
        let mut done = false;
        while ns <= BUF - PAGES_PER_WORD {
            let Some(w) = next_word(&mut cursor, &mut pending, words) else {
                done = true;
                break;
            };
            let next_low = words.get(w + 1).map_or(0, |&y| y & 1);
            let Some(slot) = words.get_mut(w) else {
                done = true;
                break;
            };
            let x = *slot;
            *slot = 0;
            let carry = last_top & u64::from(last_word.wrapping_add(1) == w);
            let starts = x & !((x << 1) | carry);
            let ends = x & !((x >> 1) | (next_low << 63));
            // A word inside a run (all ones, the run going on both sides) has
            // neither starts nor ends: nothing to decode. (A clean word has
            // none either, but is decoded anyway: testing for it would be a
            // branch as unpredictable as the bitmap.)
            if x != u64::MAX || starts | ends != 0 {
                let base = w * PAGES_PER_WORD;
                ns = decode_all::<2>(starts_buf, ns, starts, base);
                ne = decode_all::<2>(ends_buf, ne, ends, base + 1);
            }
            last_word = w;
            last_top = x >> 63;
        }
        self.cursor = cursor;
        self.pending = pending;
        self.last_word = last_word;
        self.last_top = last_top;
        self.done = done;
        self.head = 0;
        self.n_starts = ns;
        self.n_ends = ne;
    }
}

impl Iterator for DrainRuns<'_> {
    type Item = Run;

    #[inline]
    fn next(&mut self) -> Option<Run> {
        if self.head == self.n_ends {
            if self.done {
                return None;
            }
            self.refill();
            if self.n_ends == 0 {
                return None;
            }
        }
        let i = self.head % BUF;
        let first = self.starts[i];
        let len = self.ends[i] - first;
        if len > self.max_len {
            self.starts[i] = first + self.max_len;
            return Some(Run {
                first,
                len: self.max_len,
            });
        }
        self.head += 1;
        Some(Run { first, len })
    }
}

impl core::iter::FusedIterator for DrainRuns<'_> {}

impl Drop for DrainRuns<'_> {
    fn drop(&mut self) {
        // Give back what was cleared but not returned.
        for i in self.head..self.n_ends {
            let run = self.starts[i % BUF]..self.ends[i % BUF];
            set_range_raw(self.words, run);
        }
        if self.n_starts > self.n_ends {
            let first = self.starts[self.n_ends % BUF];
            let end = self.last_word.wrapping_add(1) * PAGES_PER_WORD;
            set_range_raw(self.words, first..end);
        }
    }
}
