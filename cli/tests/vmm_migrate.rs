//! Migration in miniature: save the vCPU state of a paused VM, copy all of its RAM into a
//! freshly created incoming VM, restore the state there, and the guest runs on and verifies.

use std::path::Path;
use std::time::Duration;

use ferry_cli::vmm::{Vm, VmConfig, VmmError};

const T: Duration = Duration::from_secs(60);

fn kvm_present() -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        eprintln!("skipping: /dev/kvm is missing on this machine, so no KVM guest can run");
        false
    }
}

fn config(vcpus: u32) -> VmConfig {
    VmConfig {
        mem_size: 64 << 20,
        vcpus,
        dirty_rate: 16 << 20,
        seed: 0xfeed,
        max_slot_size: 32 << 20,
        ..VmConfig::default()
    }
}

/// Copies every slot of `src` into `dst`; both must be stopped.
fn copy_ram(src: &Vm, dst: &Vm) {
    assert_eq!(src.slots().len(), dst.slots().len());
    for (a, b) in src.memory().regions().iter().zip(dst.memory().regions()) {
        assert_eq!((a.gpa(), a.size()), (b.gpa(), b.size()));
        // SAFETY: the source is paused and the destination has not run.
        unsafe { b.as_mut_slice().copy_from_slice(a.as_slice()) };
    }
}

fn running_source(vcpus: u32) -> Vm {
    let vm = Vm::new(config(vcpus)).unwrap();
    vm.resume().unwrap();
    vm.wait_filled(T).unwrap();
    let d = vm.guest_status().unwrap().pages_dirtied;
    vm.wait_until(T, "dirty pages", |s| s.pages_dirtied > d + 200)
        .unwrap();
    vm
}

#[test]
fn guest_continues_in_a_new_vm_and_verifies() {
    if !kvm_present() {
        return;
    }
    let src = running_source(2);
    assert_eq!(src.slots().len(), 2);
    src.pause().unwrap();
    let at_pause = src.guest_status().unwrap();
    let state = src.save_state().unwrap();

    let dst = Vm::new_incoming(config(2)).unwrap();
    copy_ram(&src, &dst);
    dst.restore_state(&state).unwrap();
    dst.resume().unwrap();

    // The guest picks up exactly where it stopped: counters continue from the source's.
    let s = dst
        .wait_until(T, "run on", |s| {
            s.vcpus
                .iter()
                .zip(&at_pause.vcpus)
                .all(|(d, p)| d.heartbeat > p.heartbeat)
                && s.pages_dirtied > at_pause.pages_dirtied + 100
        })
        .unwrap();
    assert_eq!(s.pages_filled, at_pause.pages_filled);
    let r = dst.request_verify(T).unwrap();
    assert_eq!(r.mismatches, 0, "{r:?}");
    assert_eq!(r.pages_checked, dst.layout().work_pages);
    dst.check_fault().unwrap();

    // The source stayed frozen all along.
    assert_eq!(src.guest_status().unwrap(), at_pause);
}

#[test]
fn a_page_left_behind_is_found() {
    if !kvm_present() {
        return;
    }
    let src = running_source(1);
    // Stop dirtying before the switch, so nothing rewrites the lost page on the destination.
    src.set_dirty_rate(0).unwrap();
    src.wait_rate_applied(T).unwrap();
    src.pause().unwrap();
    let state = src.save_state().unwrap();
    let dst = Vm::new_incoming(config(1)).unwrap();
    copy_ram(&src, &dst);
    // Lose one workload page: the destination's copy stays zero.
    let victim = dst.layout().work_pages - 7;
    let gpa = dst.layout().page_gpa(victim).unwrap();
    dst.memory().write(gpa, &[0u8; 4096]).unwrap();
    dst.restore_state(&state).unwrap();
    dst.resume().unwrap();
    let r = dst.request_verify(T).unwrap();
    assert_eq!(r.mismatches, 1, "{r:?}");
    assert_eq!(r.first_mismatch, Some(victim));
    // The workload resumes at the rate set later on the destination.
    dst.set_dirty_rate(8 << 20).unwrap();
    let d = dst.guest_status().unwrap().pages_dirtied;
    dst.wait_until(T, "dirty pages", |s| s.pages_dirtied > d + 20)
        .unwrap();
}

#[test]
fn state_without_ram_does_not_verify() {
    if !kvm_present() {
        return;
    }
    // Restoring registers over RAM that did not arrive must not look like success.
    let src = running_source(1);
    src.set_dirty_rate(0).unwrap();
    src.wait_rate_applied(T).unwrap();
    src.pause().unwrap();
    let state = src.save_state().unwrap();
    let dst = Vm::new_incoming(config(1)).unwrap();
    // Copy only the boot structures and mailbox area (first 2 MiB slot part), not the
    // workload or version table.
    let mut low = vec![0u8; 0x40_0000];
    src.memory().read(0, &mut low).unwrap();
    dst.memory().write(0, &low).unwrap();
    dst.restore_state(&state).unwrap();
    dst.resume().unwrap();
    let r = dst.request_verify(T).unwrap();
    assert_eq!(
        r.mismatches,
        dst.layout().work_pages,
        "every page must mismatch"
    );
}

#[test]
fn malformed_or_foreign_state_is_refused() {
    if !kvm_present() {
        return;
    }
    let src = Vm::new(config(1)).unwrap();
    let state = src.save_state().unwrap();
    let dst = Vm::new_incoming(config(1)).unwrap();
    // An incoming VM never runs before its state is in place.
    assert!(matches!(dst.resume(), Err(VmmError::NotRestored)));
    assert!(matches!(
        dst.restore_state(&state[..state.len() - 1]),
        Err(VmmError::BadState { .. })
    ));
    let mut extra = state.clone();
    extra.push(0);
    assert!(matches!(
        dst.restore_state(&extra),
        Err(VmmError::BadState { .. })
    ));
    let mut bad = state.clone();
    bad[0] ^= 1;
    assert!(matches!(
        dst.restore_state(&bad),
        Err(VmmError::BadState { .. })
    ));
    assert!(matches!(dst.resume(), Err(VmmError::NotRestored)));
    let two = Vm::new_incoming(config(2)).unwrap();
    assert!(matches!(
        two.restore_state(&state),
        Err(VmmError::ShapeMismatch { .. })
    ));
    dst.restore_state(&state).unwrap();
    dst.resume().unwrap();
    assert!(matches!(
        dst.restore_state(&state),
        Err(VmmError::NotPaused)
    ));
}

/// `a - b` for two readings of the guest's 64-bit clock, which wraps.
fn clock_diff(a: u64, b: u64) -> i64 {
    a.wrapping_sub(b) as i64
}

#[test]
fn pacing_survives_clock_jumps_after_migration() {
    if !kvm_present() {
        return;
    }
    let rate = 16 << 20;
    let src = running_source(1);
    src.pause().unwrap();
    let state = src.save_state().unwrap();
    let dst = Vm::new_incoming(config(1)).unwrap();
    copy_ram(&src, &dst);
    dst.restore_state(&state).unwrap();
    let hz = dst.tsc_hz() as i64;
    let last = src.guest_status().unwrap().vcpus[0].last_tsc;

    // The destination's clock reads far behind the source's: 1000 s more than the TSC has
    // counted since boot, as on a destination booted minutes before the migration, so the
    // skewed clock goes "before zero" and wraps. The guest compares clock readings as
    // wrapping differences; its pacing must restart rather than wait for the old deadline.
    let back = i64::try_from(last).expect("a TSC below 2^63") + 1000 * hz;
    dst.skew_guest_clock(-back).unwrap();
    dst.resume().unwrap();
    let d = dst.guest_status().unwrap().pages_dirtied;
    dst.wait_until(T, "dirty after a backward clock jump", |s| {
        s.pages_dirtied > d + 100
    })
    .unwrap();
    let now = dst.guest_status().unwrap().vcpus[0].last_tsc;
    assert!(
        clock_diff(now, last) < -900 * hz,
        "the guest clock went back: {now:#x} against {last:#x}"
    );
    assert!(now > last, "the skewed clock wrapped below zero: {now:#x}");

    // 100 s ahead: pacing must not write the missed 100 s of pages in a burst.
    let before = dst.guest_status().unwrap();
    let t0 = std::time::Instant::now();
    dst.skew_guest_clock(1100 * hz).unwrap();
    dst.wait_until(T, "see the jump", |s| {
        clock_diff(s.vcpus[0].last_tsc, before.vcpus[0].last_tsc) > 99 * hz
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let after = dst.guest_status().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let allowed = (secs * rate as f64 / 4096.0 * 1.5) as u64 + 64;
    let written = after.pages_dirtied - before.pages_dirtied;
    assert!(
        written <= allowed,
        "{written} pages in {secs:.2} s after a forward clock jump, at most {allowed} allowed"
    );
    assert!(written > 0, "dirtying goes on after the jump");
    assert_eq!(dst.request_verify(T).unwrap().mismatches, 0);
}
