//! The demo guest on real KVM: boots in ring 3, fills, dirties at a paced rate, verifies its
//! memory, notices corruption, and stops when paused.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_cli::vmm::{Phase, Vm, VmConfig};

const T: Duration = Duration::from_secs(60);

fn kvm_present() -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        eprintln!("skipping: /dev/kvm is missing on this machine, so no KVM guest can run");
        false
    }
}

fn config(rate: u64, vcpus: u32) -> VmConfig {
    VmConfig {
        mem_size: 64 << 20,
        vcpus,
        dirty_rate: rate,
        seed: 0x1234_5678,
        ..VmConfig::default()
    }
}

fn started(rate: u64, vcpus: u32) -> Vm {
    let vm = Vm::new(config(rate, vcpus)).unwrap();
    vm.resume().unwrap();
    let s = vm.wait_filled(T).unwrap();
    assert_eq!(s.pages_filled, vm.layout().work_pages);
    vm
}

/// Waits until the summed heartbeat moves past `from`.
fn wait_heartbeat_past(vm: &Vm, from: u64) {
    vm.wait_until(T, "beat", |s| s.heartbeat > from).unwrap();
}

#[test]
fn boots_fills_and_verifies_clean() {
    if !kvm_present() {
        return;
    }
    let vm = started(4 << 20, 2);
    let s = vm.guest_status().unwrap();
    assert_eq!(s.vcpus.len(), 2);
    // Slices cover all workload pages without overlap.
    assert_eq!(s.vcpus[0].slice_lo, 0);
    assert_eq!(s.vcpus[0].slice_hi, s.vcpus[1].slice_lo);
    assert_eq!(s.vcpus[1].slice_hi, vm.layout().work_pages);
    let r = vm.request_verify(T).unwrap();
    assert_eq!(r.pages_checked, vm.layout().work_pages);
    assert_eq!(r.mismatches, 0, "{r:?}");
    assert_eq!(r.first_mismatch, None);
    // Every workload word is non-zero after the fill.
    let mut page = vec![0u8; 4096];
    for i in [0, vm.layout().work_pages / 2, vm.layout().work_pages - 1] {
        vm.memory()
            .read(vm.layout().page_gpa(i).unwrap(), &mut page)
            .unwrap();
        assert!(page.chunks_exact(8).all(|w| w != [0u8; 8]), "page {i}");
    }
    vm.check_fault().unwrap();
}

#[test]
fn dirtying_is_paced_and_rate_zero_stops_it() {
    if !kvm_present() {
        return;
    }
    let rate = 4_096_000u64; // 1000 pages/s
    let vm = started(rate, 1);
    let d0 = vm.guest_status().unwrap().pages_dirtied;
    let t0 = Instant::now();
    // Progress: some pages get dirtied.
    vm.wait_until(T, "dirty pages", |s| s.pages_dirtied >= d0 + 50)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let d1 = vm.guest_status().unwrap().pages_dirtied;
    let secs = t0.elapsed().as_secs_f64();
    // Pacing: an unpaced loop writes hundreds of thousands of pages a second; the pacer may
    // fall behind on a busy host but never runs ahead by more than rounding.
    let allowed = (secs * rate as f64 / 4096.0 * 1.5) as u64 + 64;
    assert!(
        d1 - d0 <= allowed,
        "{} pages in {secs:.2} s, at most {allowed} allowed",
        d1 - d0
    );
    assert!(vm
        .guest_status()
        .unwrap()
        .vcpus
        .iter()
        .all(|v| v.phase == Phase::Dirtying));

    vm.set_dirty_rate(0).unwrap();
    vm.wait_rate_applied(T).unwrap();
    let s0 = vm.guest_status().unwrap();
    wait_heartbeat_past(&vm, s0.heartbeat + 20);
    let s1 = vm.guest_status().unwrap();
    assert_eq!(
        s1.pages_dirtied, s0.pages_dirtied,
        "rate 0 must stop dirtying"
    );
    assert!(s1.vcpus.iter().all(|v| v.phase == Phase::Idle));

    vm.set_dirty_rate(rate).unwrap();
    vm.wait_until(T, "dirty again", |s| s.pages_dirtied > s1.pages_dirtied)
        .unwrap();

    // Below a page per second the gap between writes exceeds a second; that must still be
    // paced, not taken for a clock that jumped back.
    vm.set_dirty_rate(2048).unwrap();
    vm.wait_rate_applied(T).unwrap();
    let s2 = vm.guest_status().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let s3 = vm.guest_status().unwrap();
    assert!(s3.heartbeat > s2.heartbeat);
    assert!(
        s3.pages_dirtied - s2.pages_dirtied <= 2,
        "{} pages in 0.5 s at one page per 2 s",
        s3.pages_dirtied - s2.pages_dirtied
    );
}

#[test]
fn corruption_is_counted_exactly() {
    if !kvm_present() {
        return;
    }
    let vm = started(8 << 20, 2);
    // Let some versions advance, then stop writes so the corruption cannot be overwritten.
    let d = vm.guest_status().unwrap().pages_dirtied;
    vm.wait_until(T, "dirty pages", |s| s.pages_dirtied > d + 100)
        .unwrap();
    vm.set_dirty_rate(0).unwrap();
    vm.wait_rate_applied(T).unwrap();
    assert_eq!(vm.request_verify(T).unwrap().mismatches, 0);

    let pages = vm.layout().work_pages;
    let victim = pages * 3 / 4 + 5;
    let gpa = vm.layout().page_gpa(victim).unwrap();
    let mut byte = [0u8; 1];
    vm.memory().read(gpa + 1000, &mut byte).unwrap();
    vm.memory().write(gpa + 1000, &[byte[0] ^ 0x40]).unwrap();
    let r = vm.request_verify(T).unwrap();
    assert_eq!(r.mismatches, 1, "{r:?}");
    assert_eq!(r.first_mismatch, Some(victim));
    assert_eq!(r.pages_checked, pages);

    // A zeroed page is a mismatch too, and counts once per page.
    vm.memory().write(gpa, &[0u8; 4096]).unwrap();
    let zero = vm.layout().page_gpa(3).unwrap();
    vm.memory().write(zero, &[0u8; 4096]).unwrap();
    let r = vm.request_verify(T).unwrap();
    assert_eq!(r.mismatches, 2, "{r:?}");
    assert_eq!(r.first_mismatch, Some(3));
}

#[test]
fn stale_page_is_a_mismatch() {
    if !kvm_present() {
        return;
    }
    let vm = started(0, 1);
    let l = *vm.layout();
    // Snapshot every page and the version table, let the guest rewrite pages, then put
    // one old page back: its version table entry is newer than its content.
    let mut before = vec![0u8; (l.work_pages * 4096) as usize];
    vm.memory().read(l.work_gpa, &mut before).unwrap();
    let vtab_len = (l.work_pages * 4) as usize;
    let mut vt0 = vec![0u8; vtab_len];
    vm.memory()
        .read(ferry_cli::vmm::layout::VTAB_GPA, &mut vt0)
        .unwrap();
    vm.set_dirty_rate(40 << 20).unwrap();
    let d = vm.guest_status().unwrap().pages_dirtied;
    vm.wait_until(T, "dirty pages", |s| s.pages_dirtied > d + 200)
        .unwrap();
    vm.set_dirty_rate(0).unwrap();
    vm.wait_rate_applied(T).unwrap();
    let mut vt1 = vec![0u8; vtab_len];
    vm.memory()
        .read(ferry_cli::vmm::layout::VTAB_GPA, &mut vt1)
        .unwrap();
    let changed = (0..l.work_pages as usize)
        .find(|&i| vt0[i * 4..i * 4 + 4] != vt1[i * 4..i * 4 + 4])
        .expect("some page was rewritten");
    let old = &before[changed * 4096..(changed + 1) * 4096];
    vm.memory()
        .write(l.page_gpa(changed as u64).unwrap(), old)
        .unwrap();
    let r = vm.request_verify(T).unwrap();
    assert_eq!(r.mismatches, 1, "{r:?}");
    assert_eq!(r.first_mismatch, Some(changed as u64));
}

#[test]
fn pause_freezes_the_guest_and_resume_continues() {
    if !kvm_present() {
        return;
    }
    let vm = started(4 << 20, 2);
    for _ in 0..3 {
        vm.pause().unwrap();
        assert!(vm.is_paused());
        let a = vm.guest_status().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let b = vm.guest_status().unwrap();
        assert_eq!(a, b, "a paused guest must not change its mailbox");
        vm.resume().unwrap();
        assert!(!vm.is_paused());
        // Every vCPU runs again.
        vm.wait_until(T, "beat on every vCPU", |c| {
            c.vcpus
                .iter()
                .zip(&b.vcpus)
                .all(|(c, b)| c.heartbeat > b.heartbeat)
        })
        .unwrap();
    }
    assert!(vm.kicks() > 0);
    // Pausing twice is fine; save_state needs a paused VM.
    vm.pause().unwrap();
    vm.pause().unwrap();
    assert!(vm.save_state().is_ok());
    vm.resume().unwrap();
    assert!(matches!(
        vm.save_state(),
        Err(ferry_cli::vmm::VmmError::NotPaused)
    ));
}

#[test]
fn bad_configurations_are_refused() {
    if !kvm_present() {
        return;
    }
    for (mem, vcpus) in [
        ((64 << 20) + 4096, 1),
        (1 << 20, 1),
        (64 << 20, 0),
        (64 << 20, 17),
    ] {
        let c = VmConfig {
            mem_size: mem,
            vcpus,
            ..VmConfig::default()
        };
        assert!(matches!(
            Vm::new(c),
            Err(ferry_cli::vmm::VmmError::Config(_))
        ));
    }
}

#[test]
fn waiting_guest_sleeps_through_the_doorbell_or_spins_when_told() {
    if !kvm_present() {
        return;
    }
    for yield_when_idle in [true, false] {
        let vm = Vm::new(VmConfig {
            yield_when_idle,
            ..config(1 << 20, 1)
        })
        .unwrap();
        vm.resume().unwrap();
        vm.wait_filled(T).unwrap();
        let d = vm.guest_status().unwrap().pages_dirtied;
        vm.wait_until(T, "dirty pages", |s| s.pages_dirtied > d + 20)
            .unwrap();
        if yield_when_idle {
            assert!(vm.doorbell_rings() > 0);
        } else {
            assert_eq!(vm.doorbell_rings(), 0);
        }
        vm.set_dirty_rate(0).unwrap();
        vm.wait_rate_applied(T).unwrap();
        assert_eq!(vm.request_verify(T).unwrap().mismatches, 0);
        vm.check_fault().unwrap();
    }
}

#[test]
fn memfd_backed_ram_runs_and_can_be_mapped_twice() {
    if !kvm_present() {
        return;
    }
    let vm = Vm::new(VmConfig {
        memory: ferry_host::memory::MemoryOptions {
            backing: ferry_host::memory::Backing::Memfd,
            huge_pages: ferry_host::memory::HugePages::Transparent,
        },
        ..config(0, 1)
    })
    .unwrap();
    vm.resume().unwrap();
    vm.wait_filled(T).unwrap();
    // A write through the second mapping is what the guest sees.
    let region = &vm.memory().regions()[0];
    let second = region.map_second().unwrap();
    let page = vm.layout().work_pages - 1;
    let off = vm.layout().page_gpa(page).unwrap() - region.gpa();
    // SAFETY: in bounds of the second mapping; the guest is idle (rate 0, filled).
    unsafe { second.as_ptr().add(off as usize + 8).write_volatile(0) };
    let r = vm.request_verify(T).unwrap();
    assert_eq!(r.mismatches, 1, "{r:?}");
    assert_eq!(r.first_mismatch, Some(page));
}
