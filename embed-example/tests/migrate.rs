//! The example VMM migrates its running KVM guest with Ferry, and the destination's memory is
//! the source's, byte for byte.

use std::path::Path;
use std::time::Duration;

use ferry_embed_example::guest::{Shape, DEVICE_GPA, STATUS_GPA};
use ferry_embed_example::{migrate_example, Config};

fn kvm_present() -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        eprintln!("skipping: /dev/kvm is missing on this machine, so no KVM guest can run");
        false
    }
}

/// A 128 MiB guest (64 MiB low, 64 MiB at 4 GiB) whose program rewrites all 64 MiB of its
/// buffer over and over, and a device writing through the VMM's mapping every 2 ms.
#[test]
fn a_running_guest_and_its_vmm_writes_migrate_exactly() {
    if !kvm_present() {
        return;
    }
    let config = Config {
        shape: Shape {
            low: 64 << 20,
            high: 64 << 20,
        },
        device_interval: Duration::from_millis(2),
        run_on_destination: Duration::from_millis(50),
        report_vmm_writes: true,
    };
    let o = migrate_example(&config).expect("the example migrates");
    eprintln!("{o:#?}");
    let s = &o.source;

    // Every byte arrived: the destination equals the paused source.
    assert_eq!(o.mismatch.pages, o.guest_pages);
    assert_eq!(
        o.mismatch.differing, 0,
        "pages differ, the first at {:#x?}",
        o.mismatch.first
    );
    // The guest really ran during the migration: it counted on, and pages it dirtied after
    // the first pass were sent again.
    assert!(
        o.counter_at_pause > o.counter_at_start,
        "the guest did not run: {} -> {}",
        o.counter_at_start,
        o.counter_at_pause
    );
    assert!(
        s.pages_sent + s.zero_pages > o.guest_pages,
        "no page was sent twice: {} + {} pages for a guest of {}",
        s.pages_sent,
        s.zero_pages,
        o.guest_pages
    );
    assert!(o.tracker.starts_with("kvm-dirty-log"), "{}", o.tracker);
    // The device's writes after the first pass (one right after it, one when the VM paused)
    // reached the destination only through the VMM's own marks: KVM's dirty log never saw
    // them.
    assert!(o.device_writes >= 1);
    assert!(
        o.vmm_only_reports >= 1,
        "no page came from the VMM's marks alone"
    );
    assert_eq!(o.destination.sections, 1);
    // The guest runs on on the destination from where it stopped.
    assert!(
        o.counter_on_destination > o.counter_at_pause,
        "{} -> {}",
        o.counter_at_pause,
        o.counter_on_destination
    );
}

/// The control experiment: the same migration with the device's marks withheld from Ferry.
/// Everything the guest wrote arrives (KVM's dirty log saw it); what the VMM wrote through
/// its own mapping after the page was sent does not. The status page, which the device
/// writes only when the VM pauses, differs every time; ring pages written after their last
/// send may differ too; nothing else does.
#[test]
fn without_its_marks_the_vmm_writes_are_lost() {
    if !kvm_present() {
        return;
    }
    let config = Config {
        shape: Shape {
            low: 32 << 20,
            high: 32 << 20,
        },
        report_vmm_writes: false,
        ..Config::default()
    };
    let o = migrate_example(&config).expect("the example migrates");
    let m = o.mismatch;
    assert_eq!(o.vmm_only_reports, 0);
    assert_eq!(m.last, Some(STATUS_GPA), "{m:?}");
    let device = DEVICE_GPA..=STATUS_GPA;
    assert!(
        device.contains(&m.first.unwrap()),
        "pages outside the device's differ: {m:?}"
    );
}

#[test]
fn shapes_it_cannot_run_are_refused() {
    let config = Config {
        shape: Shape {
            low: 3 << 20,
            high: 64 << 20,
        },
        ..Config::default()
    };
    let err = migrate_example(&config).expect_err("3 MiB is too small");
    assert!(err.to_string().contains("multiple of 2 MiB"), "{err}");
}
