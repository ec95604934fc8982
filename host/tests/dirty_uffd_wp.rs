//! userfaultfd write-protect dirty tracking over real mmap'd memory and real writer threads.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use ferry_host::dirty::{
    bitmap_words, DirtyError, DirtyTracker, ProcessRegion, UffdWpTracker, PAGE_SIZE,
};

const PAGE: usize = PAGE_SIZE as usize;
const WORDS_PER_PAGE: usize = PAGE / 8;

/// An anonymous private mapping, unmapped on drop.
struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    fn anon(pages: usize) -> Mapping {
        Self::map(pages, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
    }

    fn memfd(pages: usize) -> Mapping {
        // SAFETY: test code; creates a memfd and sizes it.
        let fd = unsafe { libc::memfd_create(c"ferry-dirty-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: sizes the memfd just created.
        let ret = unsafe { libc::ftruncate(fd, (pages * PAGE) as libc::off_t) };
        assert_eq!(ret, 0);
        let m = Self::map(pages, libc::MAP_SHARED, fd);
        // SAFETY: the mapping keeps the file alive.
        unsafe { libc::close(fd) };
        m
    }

    fn map(pages: usize, flags: i32, fd: i32) -> Mapping {
        let len = pages * PAGE;
        // SAFETY: a fresh mapping at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Mapping {
            addr: p as usize,
            len,
        }
    }

    fn region(&self) -> ProcessRegion {
        ProcessRegion::new(self.addr, self.len)
    }

    /// `pages` pages, starting on a 2 MiB boundary, with transparent huge pages asked for
    /// and the first huge page populated.
    fn anon_thp(pages: usize) -> Mapping {
        const HUGE: usize = 2 << 20;
        let raw = Self::anon(pages + HUGE / PAGE);
        let start = raw.addr.next_multiple_of(HUGE);
        // Keep [start, start + len) mapped, give the rest back.
        let (head, tail) = (
            start - raw.addr,
            raw.addr + raw.len - (start + pages * PAGE),
        );
        // SAFETY: unmapping parts of our own fresh mapping.
        unsafe {
            if head > 0 {
                libc::munmap(raw.addr as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((start + pages * PAGE) as *mut libc::c_void, tail);
            }
            libc::madvise(
                start as *mut libc::c_void,
                pages * PAGE,
                libc::MADV_HUGEPAGE,
            );
        }
        std::mem::forget(raw);
        let m = Mapping {
            addr: start,
            len: pages * PAGE,
        };
        for p in 0..HUGE / PAGE {
            m.write(p, 1);
        }
        m
    }

    fn pages(&self) -> usize {
        self.len / PAGE
    }

    /// Word `w` of page `page`, as an atomic (writers and readers race on purpose).
    fn word(&self, page: usize, w: usize) -> &AtomicU64 {
        assert!(page < self.pages() && w < WORDS_PER_PAGE);
        // SAFETY: in bounds of a live mapping, 8-byte aligned; all accesses in these tests go
        // through atomics.
        unsafe { &*((self.addr + page * PAGE + w * 8) as *const AtomicU64) }
    }

    /// Writes `v` to the first and last word of `page`.
    fn write(&self, page: usize, v: u64) {
        self.word(page, 0).store(v, Ordering::Relaxed);
        self.word(page, WORDS_PER_PAGE - 1)
            .store(v, Ordering::Relaxed);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

fn bits(words: &[u64]) -> BTreeSet<usize> {
    let mut set = BTreeSet::new();
    for (i, w) in words.iter().enumerate() {
        for b in 0..64 {
            if w >> b & 1 == 1 {
                set.insert(i * 64 + b);
            }
        }
    }
    set
}

fn sync_set(t: &mut UffdWpTracker, region: usize) -> BTreeSet<usize> {
    let mut out = vec![0u64; bitmap_words(t.pages(region).unwrap())];
    let newly = t.sync(region, &mut out).unwrap();
    let set = bits(&out);
    assert_eq!(newly as usize, set.len());
    set
}

#[test]
fn reports_exactly_the_pages_written() {
    let m = Mapping::anon(300);
    // Populate some pages before start; leave the others never touched, so both populated and
    // unpopulated pages are covered.
    for p in (0..300).step_by(2) {
        m.write(p, 1);
    }
    let mut t = UffdWpTracker::new(&[m.region()]).unwrap();
    assert_eq!(t.pages(0).unwrap(), 300);
    t.start().unwrap();
    assert!(sync_set(&mut t, 0).is_empty(), "nothing written yet");

    let written: BTreeSet<usize> = [0, 1, 63, 64, 65, 128, 199, 200, 255, 298, 299]
        .into_iter()
        .collect();
    let m = Arc::new(m);
    let writer = {
        let m = Arc::clone(&m);
        let pages = written.clone();
        std::thread::spawn(move || {
            for p in pages {
                m.write(p, 0xabcd_0000 + p as u64);
            }
        })
    };
    writer.join().unwrap();
    // Reads never dirty.
    let mut sum = 0u64;
    for p in 0..300 {
        sum = sum.wrapping_add(m.word(p, 7).load(Ordering::Relaxed));
    }
    assert_eq!(sum, 0);
    assert_eq!(sync_set(&mut t, 0), written);
    assert!(sync_set(&mut t, 0).is_empty(), "sync takes what it reports");
    for p in &written {
        assert_eq!(
            m.word(*p, 0).load(Ordering::Relaxed),
            0xabcd_0000 + *p as u64
        );
    }
    t.stop().unwrap();
}

#[test]
fn clear_rearms_exactly_the_pages_given() {
    let m = Mapping::anon(128);
    let mut t = UffdWpTracker::new(&[m.region()]).unwrap();
    t.start().unwrap();
    for p in [3, 4, 5, 70] {
        m.write(p, 1);
    }
    assert_eq!(sync_set(&mut t, 0), [3, 4, 5, 70].into_iter().collect());

    // Not re-armed: a second write is not trapped (the first report is what the caller acts
    // on, and it clears before sending).
    m.write(4, 2);
    assert!(sync_set(&mut t, 0).is_empty());

    // Re-arm 4 and 70 only; rewrite all four.
    t.clear(0, 4, 1).unwrap();
    t.clear(0, 70, 1).unwrap();
    for p in [3, 4, 5, 70] {
        m.write(p, 3);
    }
    assert_eq!(sync_set(&mut t, 0), [4, 70].into_iter().collect());

    // clear_mask: disarm 64..128 by writing them, then re-arm 64 + {1, 6} with one call.
    for p in 64..128 {
        m.write(p, 4);
    }
    assert_eq!(
        sync_set(&mut t, 0),
        (64..128).filter(|&p| p != 70).collect()
    );
    t.clear_mask(0, 64, &[(1 << 1) | (1 << 6)]).unwrap();
    for p in 64..128 {
        m.write(p, 4);
    }
    assert_eq!(sync_set(&mut t, 0), [65, 70].into_iter().collect());

    // Clearing a page that was never written is harmless; it stays clean until written.
    t.clear(0, 100, 20).unwrap();
    assert!(sync_set(&mut t, 0).is_empty());
    m.write(119, 5);
    assert_eq!(sync_set(&mut t, 0), [119].into_iter().collect());
    t.stop().unwrap();
}

#[test]
fn several_regions_and_shared_memory() {
    let a = Mapping::anon(10);
    let b = Mapping::memfd(70);
    let mut t = UffdWpTracker::new(&[a.region(), b.region()]).unwrap();
    assert_eq!(t.regions(), 2);
    assert_eq!(t.pages(1).unwrap(), 70);
    t.start().unwrap();
    a.write(9, 1);
    b.write(0, 1);
    b.write(69, 1);
    assert_eq!(sync_set(&mut t, 0), [9].into_iter().collect());
    assert_eq!(sync_set(&mut t, 1), [0, 69].into_iter().collect());
    t.clear(1, 69, 1).unwrap();
    b.write(69, 2);
    b.write(0, 2);
    assert_eq!(sync_set(&mut t, 1), [69].into_iter().collect());
    t.stop().unwrap();
}

#[test]
fn stop_unprotects_and_start_rearms() {
    let m = Mapping::anon(16);
    let mut t = UffdWpTracker::new(&[m.region()]).unwrap();
    t.start().unwrap();
    m.write(1, 1);
    t.stop().unwrap();
    assert!(!t.is_started());
    // After stop, writes do not block (the test would hang) and sync is refused.
    for p in 0..16 {
        m.write(p, 2);
    }
    let mut out = [0u64; 1];
    assert!(matches!(
        t.sync(0, &mut out),
        Err(DirtyError::WrongState { .. })
    ));
    assert!(matches!(t.stop(), Err(DirtyError::WrongState { .. })));

    // A second session starts clean: nothing from before is reported.
    t.start().unwrap();
    assert!(matches!(t.start(), Err(DirtyError::WrongState { .. })));
    assert!(sync_set(&mut t, 0).is_empty());
    m.write(15, 3);
    assert_eq!(sync_set(&mut t, 0), [15].into_iter().collect());
    // Dropping while started unprotects and ends the handler.
    drop(t);
    m.write(14, 4);
}

#[test]
fn bad_arguments_are_refused() {
    let m = Mapping::anon(100);
    let misaligned = ProcessRegion::new(m.addr + 8, PAGE);
    assert!(matches!(
        UffdWpTracker::new(&[misaligned]),
        Err(DirtyError::BadRegion { region: 0, .. })
    ));
    let first = ProcessRegion::new(m.addr, 10 * PAGE);
    let overlapping = ProcessRegion::new(m.addr + 9 * PAGE, 2 * PAGE);
    assert!(matches!(
        UffdWpTracker::new(&[first, overlapping]),
        Err(DirtyError::BadRegion { region: 1, .. })
    ));
    let odd_unit = ProcessRegion::hugetlb(m.addr, 12 * PAGE, 3 * PAGE);
    assert!(matches!(
        UffdWpTracker::new(&[odd_unit]),
        Err(DirtyError::BadRegion { region: 0, .. })
    ));

    let mut t = UffdWpTracker::new(&[m.region()]).unwrap();
    let mut out = [0u64; 2];
    assert!(matches!(
        t.sync(0, &mut out),
        Err(DirtyError::WrongState { .. })
    ));
    t.start().unwrap();
    let mut short = [0u64; 1];
    assert!(matches!(
        t.sync(0, &mut short),
        Err(DirtyError::BitmapTooSmall { needed: 2, .. })
    ));
    assert!(matches!(
        t.sync(1, &mut out),
        Err(DirtyError::NoSuchRegion { region: 1, .. })
    ));
    assert!(matches!(
        t.clear(0, 99, 2),
        Err(DirtyError::PagesOutOfRange { .. })
    ));
    assert!(matches!(
        t.clear_mask(0, 3, &[1]),
        Err(DirtyError::MaskMisaligned { .. })
    ));
    t.stop().unwrap();
}

/// A small migration loop against a writer thread that never stops writing: every round
/// syncs, then for each reported page clears it and copies it to a "destination". After the
/// writer stops, a final sync and copy must leave the destination identical to the source:
/// a single lost write would leave a stale page. Also checks that the union of all syncs
/// covers every page the writer wrote.
fn migrate_against_writers(m: Mapping, writers: usize, writes_per_writer: u64) {
    let pages = m.pages();
    let m = Arc::new(m);
    for p in 0..pages {
        m.write(p, 0);
    }
    let mut t = UffdWpTracker::new(&[m.region()]).unwrap();
    t.start().unwrap();

    // First pass: everything, as the migration's first pass would do (no clear needed: the
    // pages were armed by start).
    let mut dest = vec![[0u64; 2]; pages];
    let copy = |dest: &mut Vec<[u64; 2]>, p: usize| {
        dest[p] = [
            m.word(p, 0).load(Ordering::Relaxed),
            m.word(p, WORDS_PER_PAGE - 1).load(Ordering::Relaxed),
        ];
    };
    for p in 0..pages {
        copy(&mut dest, p);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..writers)
        .map(|id| {
            let m = Arc::clone(&m);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                // xorshift; writer `id` owns pages with p % writers == id.
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (id as u64 + 1);
                let mut wrote = BTreeSet::new();
                let mut n = 0u64;
                while n < writes_per_writer && !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let p = (x as usize % (pages / writers)) * writers + id;
                    n += 1;
                    m.write(p, (id as u64) << 48 | n);
                    wrote.insert(p);
                }
                (wrote, n)
            })
        })
        .collect();

    let mut union = BTreeSet::new();
    let mut rounds = 0;
    let mut round = vec![0u64; bitmap_words(pages as u64)];
    while !handles.iter().all(|h| h.is_finished()) {
        round.fill(0);
        t.sync(0, &mut round).unwrap();
        for p in bits(&round) {
            t.clear(0, p as u64, 1).unwrap();
            copy(&mut dest, p);
            union.insert(p);
        }
        rounds += 1;
    }
    let mut written = BTreeSet::new();
    let mut total = 0;
    for h in handles {
        let (w, n) = h.join().unwrap();
        written.extend(w);
        total += n;
    }
    // Final round with the "guest" stopped.
    round.fill(0);
    t.sync(0, &mut round).unwrap();
    for p in bits(&round) {
        copy(&mut dest, p);
        union.insert(p);
    }
    t.stop().unwrap();

    assert!(total > 0 && rounds > 1, "{total} writes, {rounds} rounds");
    let missed: Vec<_> = written.difference(&union).collect();
    assert!(
        missed.is_empty(),
        "written pages never reported: {missed:?}"
    );
    for (p, d) in dest.iter().enumerate() {
        let src = [
            m.word(p, 0).load(Ordering::Relaxed),
            m.word(p, WORDS_PER_PAGE - 1).load(Ordering::Relaxed),
        ];
        assert_eq!(*d, src, "page {p} is stale on the destination");
        assert_eq!(src[0], src[1], "page {p} torn on the source");
    }
    assert!(t.faults() as usize >= written.len());
}

#[test]
fn concurrent_writes_are_never_lost_one_writer() {
    migrate_against_writers(Mapping::anon(512), 1, 200_000);
}

#[test]
fn concurrent_writes_are_never_lost_two_writers_shared_memory() {
    migrate_against_writers(Mapping::memfd(1024), 2, 100_000);
}

/// Transparent huge pages: protecting a huge mapping and unprotecting one 4 KiB page of it
/// (the kernel splits the huge page) reports exactly the pages written.
#[test]
fn transparent_huge_pages() {
    let m = Mapping::anon_thp(1024);
    let mut t = UffdWpTracker::new(&[m.region()]).unwrap();
    t.start().unwrap();
    for p in [0, 1, 511, 512, 1023] {
        m.write(p, 2);
    }
    assert_eq!(
        sync_set(&mut t, 0),
        [0, 1, 511, 512, 1023].into_iter().collect()
    );
    t.clear(0, 1, 1).unwrap();
    m.write(0, 3);
    m.write(1, 3);
    assert_eq!(sync_set(&mut t, 0), [1].into_iter().collect());
    t.stop().unwrap();
}

/// A protection unit larger than 4 KiB (as for hugetlbfs memory, exercised here on ordinary
/// memory): a write marks its whole unit, and `clear` re-protects whole units, so pages next
/// to the cleared ones are trapped again too (safe: it only adds traps).
#[test]
fn protection_unit_larger_than_a_page() {
    const UNIT: usize = 2 << 20;
    let per_unit = UNIT / PAGE;
    let m = Mapping::anon_thp(3 * per_unit);
    let region = ProcessRegion::hugetlb(m.addr, m.len, UNIT);
    let mut t = UffdWpTracker::new(&[region]).unwrap();
    t.start().unwrap();
    m.write(per_unit + 7, 1);
    let expect: BTreeSet<usize> = (per_unit..2 * per_unit).collect();
    assert_eq!(sync_set(&mut t, 0), expect);
    // The unit is unprotected now: more writes in it are not trapped.
    m.write(per_unit + 8, 1);
    assert!(sync_set(&mut t, 0).is_empty());
    // Re-arm one page: the whole unit is trapped again.
    t.clear(0, (per_unit + 100) as u64, 1).unwrap();
    m.write(2 * per_unit - 1, 2);
    assert_eq!(sync_set(&mut t, 0), expect);
    // A range straddling units 0 and 1 re-arms both.
    t.clear(0, (per_unit - 1) as u64, 2).unwrap();
    m.write(0, 3);
    assert_eq!(sync_set(&mut t, 0), (0..per_unit).collect());
    m.write(per_unit, 3);
    assert_eq!(sync_set(&mut t, 0), expect);
    t.stop().unwrap();
}
