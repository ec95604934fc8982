//! The demo VM as a migratable guest: the callbacks a migration needs, over
//! [`crate::vmm::Vm`], and its KVM dirty-log tracker.

use std::sync::Arc;

use kvm_ioctls::VmFd;

use crate::vmm::Vm;
use ferry_host::dirty::{DirtyError, KvmDirtyTracker, KvmSlot, ManualProtect};
use ferry_host::migration::{CallbackError, DeviceSection, GuestControl, GuestStarter};

/// Section id of the vCPU state.
pub const VCPU_SECTION: u16 = 1;

/// The source's hold on a running demo VM.
#[derive(Debug)]
pub struct SourceGuest<'a> {
    vm: &'a Vm,
}

impl<'a> SourceGuest<'a> {
    /// Wraps a running VM.
    pub fn new(vm: &'a Vm) -> Self {
        SourceGuest { vm }
    }
}

impl GuestControl for SourceGuest<'_> {
    fn pause(&mut self) -> Result<(), CallbackError> {
        Ok(self.vm.pause()?)
    }

    fn resume(&mut self) -> Result<(), CallbackError> {
        Ok(self.vm.resume()?)
    }

    fn device_state(&mut self) -> Result<Vec<DeviceSection>, CallbackError> {
        Ok(vec![DeviceSection {
            id: VCPU_SECTION,
            bytes: self.vm.save_state()?,
        }])
    }

    fn device_state_estimate(&self) -> u64 {
        // Registers, MSRs and XSAVE of each vCPU: a few KiB each.
        16 * 1024 * u64::from(self.vm.config().vcpus)
    }
}

/// The destination's incoming demo VM: restores the vCPU state and runs.
#[derive(Debug)]
pub struct IncomingGuest<'a> {
    vm: &'a Vm,
}

impl<'a> IncomingGuest<'a> {
    /// Wraps a VM made with [`Vm::new_incoming`].
    pub fn new(vm: &'a Vm) -> Self {
        IncomingGuest { vm }
    }

    /// The guest's own rate since it started here, in pages per second
    /// (in postcopy: how fast it ran while pages were still arriving).
    pub fn rate_since_start(&self) -> Option<f64> {
        let (t, at_start) = self.vm.started_here()?;
        let now = self.vm.guest_status().ok()?.pages_dirtied;
        let s = t.elapsed().as_secs_f64();
        (s > 0.0).then(|| now.saturating_sub(at_start) as f64 / s)
    }
}

/// The device state lacked the vCPU section.
#[derive(Debug, thiserror::Error)]
#[error("the migration carried no vCPU state (section {VCPU_SECTION})")]
pub struct MissingVcpuState;

impl GuestStarter for IncomingGuest<'_> {
    fn start(&mut self, sections: &[DeviceSection]) -> Result<(), CallbackError> {
        let vcpu = sections
            .iter()
            .find(|s| s.id == VCPU_SECTION)
            .ok_or(MissingVcpuState)?;
        // Nothing here reads or writes guest RAM: in postcopy a page still
        // missing would block this thread, which the migration needs free
        // to notice a lost connection. The guest's own start point is taken
        // by its vCPU (`Vm::started_here`).
        self.vm.restore_state(&vcpu.bytes)?;
        self.vm.resume()?;
        Ok(())
    }
}

/// A KVM dirty-log tracker over every memory slot of `vm`, using manual
/// protect (`KVM_CLEAR_DIRTY_LOG`) when the VM enabled it.
pub fn dirty_tracker(vm: &Vm) -> Result<KvmDirtyTracker<Arc<VmFd>>, DirtyError> {
    let slots: Vec<KvmSlot> = vm
        .slots()
        .iter()
        .map(|s| KvmSlot {
            slot: s.slot,
            guest_phys_addr: s.gpa,
            memory_size: s.size,
            userspace_addr: s.host_addr,
            flags: 0,
        })
        .collect();
    let caps = vm.dirty_log_caps();
    let protect = if caps.manual_protect {
        ManualProtect::AlreadyEnabled {
            initially_set: caps.initially_set,
        }
    } else {
        ManualProtect::Off
    };
    // SAFETY: the slots are exactly the VM's own (same numbers, addresses
    // and sizes), so re-registering them with the logging flag changes
    // nothing else; the caller keeps `vm` (and so the memory) alive while the
    // tracker lives.
    unsafe { KvmDirtyTracker::new(vm.vm_fd_shared(), slots, protect) }
}
