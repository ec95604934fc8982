//! The page installer under the races postcopy creates: a page requested on
//! fault and arriving at the same moment from the background stream is
//! installed once (`EEXIST` from the loser is success), and the faulting
//! thread is always woken — never left waiting. Real userfaultfd faults on
//! real anonymous memory.

use std::ptr::NonNull;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use ferry_host::postcopy::{PageInstaller, Uffd, Via};
use ferry_host::ram::{Ram, PAGE_SIZE};

const PAGES: u64 = 256;

struct Map(NonNull<u8>, usize);

impl Map {
    fn new(len: usize) -> Map {
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
        Map(NonNull::new(p.cast()).unwrap(), len)
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`.
        unsafe { libc::munmap(self.0.as_ptr().cast(), self.1) };
    }
}

fn page_bytes(page: u64) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| (page as u8).wrapping_mul(31).wrapping_add(i as u8) | 1)
        .collect()
}

/// Waits for the fault at `addr` to be queued and returns it.
fn next_fault(uffd: &Uffd) -> u64 {
    let mut out = Vec::new();
    for _ in 0..500 {
        if uffd.wait(Duration::from_millis(10)) {
            uffd.read_faults(&mut out).unwrap();
            if let Some(a) = out.first() {
                return *a;
            }
        }
    }
    panic!("no fault arrived");
}

#[test]
fn request_and_stream_race_installs_once_and_wakes_the_waiter() {
    let map = Map::new((PAGES * PAGE_SIZE) as usize);
    let base = map.0.as_ptr() as usize;
    // SAFETY: the mapping lives until the end of the test.
    let ram = unsafe { Ram::from_raw(&[(0, map.0, PAGES * PAGE_SIZE)]) };
    let inst = Arc::new(PageInstaller::new(&ram));
    // Precopy delivered the even pages; the odd ones are missing at switchover.
    for p in (0..PAGES).step_by(2) {
        inst.install(0, p, &page_bytes(p), Via::Stream).unwrap();
    }
    inst.arm(Uffd::new().unwrap()).unwrap();
    let uffd = inst.uffd().unwrap();
    assert_eq!(inst.missing(), PAGES / 2);
    for p in (1..PAGES).step_by(2) {
        // A "vCPU" touches the missing page and blocks.
        let seen = thread::spawn(move || {
            // SAFETY: reading inside the mapping; the read faults until the
            // page is installed.
            unsafe { std::ptr::read_volatile((base + (p * PAGE_SIZE) as usize + 8) as *const u8) }
        });
        let addr = next_fault(&uffd);
        assert_eq!(inst.page_of(addr), Some((0, p)));
        assert_eq!(
            inst.on_fault(addr).unwrap(),
            Some((0, p)),
            "a missing page is requested once"
        );
        assert_eq!(
            inst.on_fault(addr).unwrap(),
            None,
            "a second fault on it sends no second request"
        );
        // The urgent reply and the background stream land at the same time.
        let go = Arc::new(Barrier::new(2));
        let bytes = page_bytes(p);
        thread::scope(|s| {
            for via in [Via::Request, Via::Stream] {
                let (go, inst, bytes) = (go.clone(), &inst, &bytes);
                s.spawn(move || {
                    go.wait();
                    inst.install(0, p, bytes, via).unwrap();
                });
            }
        });
        let v = seen.join().unwrap();
        assert_eq!(v, bytes[8], "the waiter was woken and sees the page");
        assert!(inst.has(0, p));
    }
    assert_eq!(inst.missing(), 0);
    let r = inst.report();
    // Every page counted once, by whichever path won.
    assert_eq!(r.pages_on_demand + r.pages_streamed, PAGES / 2);
    assert_eq!(r.faults, PAGES / 2);
    assert_eq!(r.fault_latency.count, PAGES / 2);
    // SAFETY: every page is installed; nobody writes the mapping now.
    let all =
        unsafe { std::slice::from_raw_parts(base as *const u8, (PAGES * PAGE_SIZE) as usize) };
    for (p, chunk) in all.chunks(PAGE_SIZE as usize).enumerate() {
        assert_eq!(chunk, &page_bytes(p as u64)[..], "page {p}");
    }
}

#[test]
fn a_fault_on_a_page_installed_meanwhile_is_woken_not_requested() {
    let map = Map::new((16 * PAGE_SIZE) as usize);
    let base = map.0.as_ptr() as usize;
    // SAFETY: the mapping lives until the end of the test.
    let ram = unsafe { Ram::from_raw(&[(0, map.0, 16 * PAGE_SIZE)]) };
    let inst = PageInstaller::new(&ram);
    inst.arm(Uffd::new().unwrap()).unwrap();
    let uffd = inst.uffd().unwrap();
    let seen = thread::spawn(move || {
        // SAFETY: inside the mapping; faults until installed.
        unsafe { std::ptr::read_volatile((base + 5 * PAGE_SIZE as usize) as *const u8) }
    });
    let addr = next_fault(&uffd);
    // The background stream installs the page before the fault is handled.
    inst.install(0, 5, &page_bytes(5), Via::Stream).unwrap();
    assert_eq!(
        inst.on_fault(addr).unwrap(),
        None,
        "no request for a page already here"
    );
    assert_eq!(seen.join().unwrap(), page_bytes(5)[0]);
    assert_eq!(inst.missing(), 15);
    // A discard after switchover is refused by the destination; a zero run
    // installs zero pages and wakes.
    inst.install_zero(0, 6, 10).unwrap();
    assert_eq!(inst.missing(), 5);
    assert_eq!(inst.missing_runs(1024), vec![(0, 0, 5)]);
}

/// In place (memfd, UFFDIO_CONTINUE): the first receiver to claim a page
/// writes it through the second mapping and maps it; a copy arriving later
/// claims nothing, so it never overwrites what the guest wrote since.
#[test]
fn in_place_claims_keep_late_copies_off_a_page_the_guest_wrote() {
    use ferry_host::memory::{Backing, MappedMemory, MemoryOptions};
    use ferry_host::postcopy::Claim;
    let pages = 512u64;
    let opts = MemoryOptions {
        backing: Backing::Memfd,
        ..MemoryOptions::default()
    };
    let mem = MappedMemory::with_size(2 << 20, 1 << 30, opts).unwrap();
    let region = &mem.regions()[0];
    let second = region.map_second().unwrap();
    let ram = Ram::from_memory(&mem);
    // SAFETY: the second mapping lives until the end of the test.
    let second_ram = unsafe {
        Ram::from_raw(&[(
            0,
            NonNull::new(second.as_ptr()).unwrap(),
            second.len() as u64,
        )])
    };
    let inst = PageInstaller::new_in_place(&ram, &second_ram);
    assert!(inst.in_place());
    // Precopy put every page but page 7 in place.
    for p in (0..pages).filter(|&p| p != 7) {
        assert_eq!(
            inst.claim(0, p, 1).unwrap(),
            Claim::All,
            "before switchover every page is ours"
        );
        // SAFETY: one claimed page of the second mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                page_bytes(p).as_ptr(),
                inst.in_place_ptr(0, p, 1).unwrap(),
                PAGE_SIZE as usize,
            )
        };
        inst.install_in_place(0, p, 1, Via::Stream).unwrap();
    }
    inst.arm(Uffd::new_minor().unwrap()).unwrap();
    let uffd = inst.uffd().unwrap();
    let base = region.host_ptr() as usize;
    // Arming maps nothing (the downtime stays short). A first touch of a
    // received page is a minor fault, which maps the received pages of its
    // 64-page block: the touch of page 70 maps 64..128, so page 100 then
    // reads without a fault.
    let touch = |p: u64| {
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            // SAFETY: inside the guest mapping.
            let v =
                unsafe { std::ptr::read_volatile((base + (p * PAGE_SIZE) as usize) as *const u8) };
            let _ = tx.send(v);
        });
        rx
    };
    let r70 = touch(70);
    let addr = next_fault(&uffd);
    assert_eq!(
        inst.on_fault(addr).unwrap(),
        None,
        "a received page is not asked for"
    );
    assert_eq!(
        r70.recv_timeout(Duration::from_secs(5)).unwrap(),
        page_bytes(70)[0]
    );
    assert_eq!(
        touch(100).recv_timeout(Duration::from_secs(5)).unwrap(),
        page_bytes(100)[0],
        "mapped with its block"
    );
    // The mapper, which runs while the guest does, maps every page
    // received (those of the block were mapped already), and page 7 only
    // once it arrives.
    assert_eq!(inst.map_received().unwrap(), pages - 1);
    // Received pages are mapped now: reading one does not fault.
    // SAFETY: inside the guest mapping.
    let seen9 = unsafe { std::ptr::read_volatile((base + 9 * PAGE_SIZE as usize) as *const u8) };
    assert_eq!(seen9, page_bytes(9)[0]);
    let reader = thread::spawn(move || {
        // SAFETY: inside the guest mapping; faults until page 7 is mapped.
        unsafe { std::ptr::read_volatile((base + 7 * PAGE_SIZE as usize) as *const u8) }
    });
    let addr = next_fault(&uffd);
    assert_eq!(inst.on_fault(addr).unwrap(), Some((0, 7)));
    // The urgent reply claims the page first; the background copy of the
    // same run (pages 6..9) gets only what nobody had.
    assert_eq!(inst.claim(0, 7, 1).unwrap(), Claim::All);
    assert_eq!(inst.claim(0, 6, 3).unwrap(), Claim::Some(vec![]));
    // SAFETY: page 7 is claimed by this (urgent) receiver.
    unsafe {
        std::ptr::copy_nonoverlapping(
            page_bytes(7).as_ptr(),
            inst.in_place_ptr(0, 7, 1).unwrap(),
            PAGE_SIZE as usize,
        )
    };
    inst.install_in_place(0, 7, 1, Via::Request).unwrap();
    assert_eq!(
        reader.join().unwrap(),
        page_bytes(7)[0],
        "the waiter was woken and sees the page"
    );
    // The guest writes the page; a late copy finds it claimed.
    // SAFETY: inside the guest mapping, page 7 is mapped now.
    unsafe { std::ptr::write_volatile((base + 7 * PAGE_SIZE as usize) as *mut u8, 0xee) };
    assert_eq!(inst.claim(0, 7, 1).unwrap(), Claim::Some(vec![]));
    // SAFETY: reading the guest mapping.
    let seen7 = unsafe { std::ptr::read_volatile((base + 7 * PAGE_SIZE as usize) as *const u8) };
    assert_eq!(seen7, 0xee);
    assert_eq!(inst.missing(), 0);
    assert_eq!(inst.report().pages_on_demand, 1);
}
