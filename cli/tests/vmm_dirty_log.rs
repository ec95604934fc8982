//! The VM exposes its memory slots so KVM's dirty log can be driven from outside: guest
//! writes show up in KVM_GET_DIRTY_LOG for the right slot and page.

use std::path::Path;
use std::time::Duration;

use ferry_cli::vmm::{layout, Vm, VmConfig};

const T: Duration = Duration::from_secs(60);

fn kvm_present() -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        eprintln!("skipping: /dev/kvm is missing on this machine, so no KVM guest can run");
        false
    }
}

#[test]
fn guest_writes_appear_in_the_dirty_log() {
    if !kvm_present() {
        return;
    }
    let vm = Vm::new(VmConfig {
        mem_size: 64 << 20,
        dirty_rate: 0,
        max_slot_size: 32 << 20,
        ..VmConfig::default()
    })
    .unwrap();
    vm.resume().unwrap();
    vm.wait_filled(T).unwrap();
    assert_eq!(vm.slots().len(), 2);
    vm.set_dirty_logging(true).unwrap();
    // Drain whatever is set right after enabling.
    for s in vm.slots() {
        let _ = vm.vm_fd().get_dirty_log(s.slot, s.size as usize).unwrap();
    }
    vm.set_dirty_rate(8 << 20).unwrap();
    let d = vm.guest_status().unwrap().pages_dirtied;
    vm.wait_until(T, "dirty pages", |s| s.pages_dirtied > d + 50)
        .unwrap();
    vm.set_dirty_rate(0).unwrap();
    vm.wait_rate_applied(T).unwrap();

    let mut dirty_pages = 0u64;
    let mut mailbox_dirty = false;
    let mut workload_dirty = 0u64;
    for s in vm.slots() {
        let bm = vm.vm_fd().get_dirty_log(s.slot, s.size as usize).unwrap();
        for (w, word) in bm.iter().enumerate() {
            for b in 0..64 {
                if word & (1 << b) != 0 {
                    let gpa = s.gpa + ((w * 64 + b) as u64) * 4096;
                    dirty_pages += 1;
                    mailbox_dirty |= gpa == layout::MAILBOX_GPA;
                    if gpa >= vm.layout().work_gpa {
                        workload_dirty += 1;
                    }
                }
            }
        }
    }
    assert!(mailbox_dirty, "the mailbox page is written constantly");
    assert!(
        workload_dirty >= 40,
        "only {workload_dirty} workload pages dirty"
    );
    assert!(dirty_pages < vm.layout().work_pages / 2);
    vm.set_dirty_logging(false).unwrap();
    assert_eq!(vm.request_verify(T).unwrap().mismatches, 0);
}
