//! A small real KVM virtual machine with a built-in guest workload, for the demo and tests.
//!
//! The guest (source in `cli/guest/`, built by `build.rs`) runs entirely in 64-bit ring 3:
//! the host sets up long mode, page tables, GDT and TSS itself and starts every vCPU at the
//! guest's entry point with user-mode segments, because this machine's KVM (nested through
//! PVM) runs guest ring 0 very slowly and ring 3 natively. The guest never exits; host and
//! guest talk through a mailbox page in guest RAM (see [`layout`]).
//!
//! The workload fills every workload page with pseudo-random data derived from
//! (seed, page, version), then rewrites random pages with new versions at the requested rate,
//! paced by the TSC, and verifies every page against its version table on request.
//!
//! ```no_run
//! use ferry_cli::vmm::{Vm, VmConfig};
//! use std::time::Duration;
//!
//! let vm = Vm::new(VmConfig { mem_size: 256 << 20, dirty_rate: 10 << 20, ..VmConfig::default() })?;
//! vm.resume()?;
//! vm.wait_filled(Duration::from_secs(30))?;
//! let report = vm.request_verify(Duration::from_secs(30))?;
//! assert_eq!(report.mismatches, 0);
//! # Ok::<(), ferry_cli::vmm::VmmError>(())
//! ```
//!
//! Migration in miniature: pause the source, [`Vm::save_state`], copy every memory slot into a
//! VM made with [`Vm::new_incoming`], [`Vm::restore_state`] there, then [`Vm::resume`] it.

pub mod layout;
mod state;
mod vcpu;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use ferry_host::memory::{MappedMemory, MemoryError, MemoryOptions};
use layout::{mb, st, Layout, MailboxConfig};

/// The guest workload image, built from `cli/guest/` by `build.rs`.
pub static GUEST_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.bin"));

/// How often the host polls the mailbox while waiting for the guest.
const POLL: Duration = Duration::from_micros(100);

/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
const CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`.
pub const DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1;
/// `KVM_DIRTY_LOG_INITIALLY_SET`.
pub const DIRTY_LOG_INITIALLY_SET: u64 = 2;

/// Errors of the demo VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// KVM error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated or accessed.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// The configuration cannot be run.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// The vCPU kick signal handler could not be installed.
    #[error("installing the vCPU kick signal handler failed: {0}")]
    Signal(#[source] std::io::Error),
    /// A vCPU thread could not be started.
    #[error("starting a vCPU thread failed: {0}")]
    Thread(#[source] std::io::Error),
    /// Some vCPUs did not leave `KVM_RUN` in time.
    #[error("{running} vCPU(s) did not stop in time")]
    PauseTimeout {
        /// vCPUs still running.
        running: usize,
    },
    /// The operation needs the VM paused.
    #[error("the VM must be paused for this")]
    NotPaused,
    /// An incoming VM was asked to run before its state was restored.
    #[error("this incoming VM has no vCPU state yet: restore_state must succeed before resume")]
    NotRestored,
    /// A vCPU stopped on an exit the guest should never cause.
    #[error("vCPU {vcpu} stopped: {why}")]
    VcpuFault {
        /// vCPU index.
        vcpu: usize,
        /// What happened.
        why: String,
    },
    /// `KVM_GET_MSRS`/`KVM_SET_MSRS` handled fewer MSRs than asked.
    #[error("KVM handled {got} of {wanted} MSRs")]
    MsrCount {
        /// MSRs asked.
        wanted: usize,
        /// MSRs handled.
        got: usize,
    },
    /// A state section is malformed.
    #[error("VM state section is malformed at byte {offset}: {why}")]
    BadState {
        /// Offset in the section.
        offset: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// A state section is for a VM of another shape.
    #[error("VM state is for {vcpus} vCPU(s) and {mem_size} bytes of RAM, but this VM has {our_vcpus} and {our_mem_size}")]
    ShapeMismatch {
        /// vCPUs in the section.
        vcpus: u32,
        /// RAM size in the section.
        mem_size: u64,
        /// Our vCPUs.
        our_vcpus: u32,
        /// Our RAM size.
        our_mem_size: u64,
    },
    /// The guest's mailbox is not initialised (RAM not loaded, or not this guest).
    #[error("the guest mailbox is not initialised")]
    NoMailbox,
    /// Waiting for the guest timed out.
    #[error("timed out after {0:?} waiting for the guest to {1}")]
    Timeout(Duration, &'static str),
}

/// How to build the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest RAM in bytes: a multiple of 2 MiB, 8 MiB to 64 GiB.
    pub mem_size: u64,
    /// vCPUs (1 to 16); each owns an equal slice of the workload pages.
    pub vcpus: u32,
    /// Dirty rate in bytes per second for all vCPUs together (0: idle after the fill).
    pub dirty_rate: u64,
    /// Workload seed.
    pub seed: u64,
    /// Guest RAM backing and huge pages. Default: anonymous base pages. The `ferry`
    /// command asks for transparent huge pages (`--huge-pages thp`, as QEMU does): the
    /// io_uring registration of guest RAM then pins 2 MiB at a time (the source's setup
    /// took 4-11 ms for 1 GiB, against 28-39 ms) and the destination receives into fewer
    /// pages. On a machine that is itself a VM, a fresh 2 MiB page may cost the outer
    /// hypervisor's first touch: an earlier session saw prefaulting 2 GiB take 7-11 s with
    /// THP against 1.5-3 s.
    pub memory: MemoryOptions,
    /// Prefault guest RAM (`MADV_POPULATE_WRITE`): synchronously in [`Vm::new`], on a
    /// background thread in [`Vm::new_incoming`] (joined by [`Vm::restore_state`]).
    pub prefault: bool,
    /// Largest memory slot; RAM is split into slots of at most this size.
    pub max_slot_size: u64,
    /// Enable `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` when the kernel has it.
    pub manual_dirty_log_protect: bool,
    /// With manual protect, also ask for `KVM_DIRTY_LOG_INITIALLY_SET` when available.
    pub dirty_log_initially_set: bool,
    /// Let the guest give its host CPU back while it waits (idle, or ahead of its dirty
    /// rate) by sleeping through an MMIO doorbell, instead of spinning on it. On by default:
    /// a spinning vCPU takes a whole host core from the migration.
    pub yield_when_idle: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            mem_size: 256 << 20,
            vcpus: 1,
            dirty_rate: 0,
            seed: 0x5eed_f322_0001,
            memory: MemoryOptions::default(),
            prefault: true,
            max_slot_size: 1 << 30,
            manual_dirty_log_protect: true,
            dirty_log_initially_set: false,
            yield_when_idle: true,
        }
    }
}

/// A KVM memory slot backing guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemorySlot {
    /// KVM slot number (also the [`MappedMemory`] region id).
    pub slot: u32,
    /// Guest physical base.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the mapping.
    pub host_addr: u64,
}

/// Phase of a vCPU's workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Phase {
    /// Not started (or the mailbox is not loaded).
    NotStarted,
    /// Filling its pages.
    Filling,
    /// Dirtying pages at the requested rate.
    Dirtying,
    /// Verifying its pages.
    Verifying,
    /// Filled, rate 0: spinning idle.
    Idle,
    /// A value this host does not know.
    Unknown(u64),
}

impl Phase {
    fn from_raw(v: u64) -> Self {
        match v {
            0 => Self::NotStarted,
            1 => Self::Filling,
            2 => Self::Dirtying,
            3 => Self::Verifying,
            4 => Self::Idle,
            x => Self::Unknown(x),
        }
    }
}

/// One vCPU's workload status, read from the mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct VcpuStatus {
    /// Phase.
    pub phase: Phase,
    /// Counter the guest bumps on every loop iteration and every page.
    pub heartbeat: u64,
    /// Pages filled so far (equals the slice size once filled).
    pub pages_filled: u64,
    /// Pages rewritten after the fill.
    pub pages_dirtied: u64,
    /// First workload page of this vCPU's slice.
    pub slice_lo: u64,
    /// One past its last page.
    pub slice_hi: u64,
    /// Dirty rate the guest's pacing uses now (bytes/s, all vCPUs).
    pub rate_seen: u64,
    /// Last guest TSC the vCPU read.
    pub last_tsc: u64,
}

/// The guest workload's status over all vCPUs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GuestStatus {
    /// Per vCPU.
    pub vcpus: Vec<VcpuStatus>,
    /// Workload pages in the guest.
    pub work_pages: u64,
    /// Sum of heartbeats.
    pub heartbeat: u64,
    /// Sum of pages filled.
    pub pages_filled: u64,
    /// Sum of pages dirtied.
    pub pages_dirtied: u64,
}

impl GuestStatus {
    /// Whether every vCPU finished its fill.
    pub fn filled(&self) -> bool {
        self.pages_filled >= self.work_pages
            && self
                .vcpus
                .iter()
                .all(|v| v.pages_filled >= v.slice_hi.saturating_sub(v.slice_lo))
    }
}

/// Result of a guest self-verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Workload pages checked.
    pub pages_checked: u64,
    /// Pages whose content does not match their recorded version.
    pub mismatches: u64,
    /// Lowest mismatching workload page index, if any.
    pub first_mismatch: Option<u64>,
    /// Verify generation answered.
    pub generation: u64,
}

/// What the kernel offers for dirty logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DirtyLogCaps {
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` is enabled on this VM: `KVM_GET_DIRTY_LOG` does not
    /// re-protect pages; `KVM_CLEAR_DIRTY_LOG` must be used to clear (and re-protect) them.
    pub manual_protect: bool,
    /// `KVM_DIRTY_LOG_INITIALLY_SET` is enabled too: enabling logging starts with every bit
    /// set and pages stay writable until cleared.
    pub initially_set: bool,
}

/// The demo VM.
#[derive(Debug)]
pub struct Vm {
    // Drop order matters: vCPU threads stop first, then the VM fd, then guest RAM.
    vcpus: vcpu::Vcpus,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    memory: MappedMemory,
    slots: Vec<MemorySlot>,
    config: VmConfig,
    layout: Layout,
    tsc_hz: u64,
    dirty_caps: DirtyLogCaps,
    state_caps: state::StateCaps,
    msr_list: Vec<u32>,
    prefault: Mutex<Option<JoinHandle<Result<(), MemoryError>>>>,
    restored: AtomicBool,
    /// When the guest first ran after a restore, and the pages it had dirtied by then.
    started_here: Arc<Mutex<Option<(Instant, u64)>>>,
}

impl Vm {
    /// Creates a VM with its guest loaded and ready; it stays paused until [`Vm::resume`].
    pub fn new(config: VmConfig) -> Result<Self, VmmError> {
        let vm = Self::build(config)?;
        if config.prefault {
            vm.memory.populate()?;
        }
        let mbox = MailboxConfig {
            seed: config.seed,
            tsc_hz: vm.tsc_hz,
            dirty_rate: config.dirty_rate,
            vcpus: config.vcpus,
            doorbell: config.yield_when_idle,
        };
        layout::write_boot(&vm.memory, &vm.layout, GUEST_IMAGE, &mbox)?;
        for i in 0..vm.vcpus.len() {
            vm.vcpus
                .with_fd(i, |fd| setup_vcpu_registers(fd, i as u32))
                .unwrap_or(Ok(()))?;
        }
        vm.restored.store(true, Ordering::SeqCst);
        Ok(vm)
    }

    /// Creates a VM for an incoming migration: RAM allocated (left empty for the pages to
    /// arrive) and vCPUs created but paused until [`Vm::restore_state`] and [`Vm::resume`].
    /// Of `config`, only the shape matters here (`mem_size`, `vcpus`, `memory`,
    /// `max_slot_size`, `prefault`, dirty-log options): seed, rate and the rest arrive with
    /// the guest's RAM. `resume` is refused until `restore_state` succeeded.
    pub fn new_incoming(config: VmConfig) -> Result<Self, VmmError> {
        let vm = Self::build(config)?;
        if config.prefault {
            let h = vm.memory.populate_in_background();
            *vm.prefault.lock().unwrap_or_else(PoisonError::into_inner) = Some(h);
        }
        Ok(vm)
    }

    /// Waits for the background prefault started by [`Vm::new_incoming`], if any.
    pub fn wait_prefault(&self) -> Result<(), VmmError> {
        let h = self
            .prefault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match h {
            None => Ok(()),
            Some(h) => match h.join() {
                Ok(r) => Ok(r?),
                Err(_) => Err(MemoryError::PopulateThread.into()),
            },
        }
    }

    fn build(config: VmConfig) -> Result<Self, VmmError> {
        let layout = Layout::new(config.mem_size).ok_or_else(|| {
            VmmError::Config(format!(
                "memory size {:#x} must be a multiple of 2 MiB between {} MiB and {} GiB",
                config.mem_size,
                layout::MIN_MEM >> 20,
                layout::MAX_MEM >> 30
            ))
        })?;
        if config.vcpus == 0 || config.vcpus > layout::MAX_VCPUS {
            return Err(VmmError::Config(format!(
                "{} vCPUs requested; 1 to {} are supported",
                config.vcpus,
                layout::MAX_VCPUS
            )));
        }
        if GUEST_IMAGE.len() as u64 > layout::CODE_MAX {
            return Err(VmmError::Config("the guest image is too large".to_owned()));
        }
        let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
        let vm = Arc::new(kvm.create_vm().map_err(|e| VmmError::Kvm {
            what: "KVM_CREATE_VM",
            source: e,
        })?);

        let mut dirty_caps = DirtyLogCaps {
            manual_protect: false,
            initially_set: false,
        };
        if config.manual_dirty_log_protect {
            let supported = vm.check_extension_raw(u64::from(CAP_MANUAL_DIRTY_LOG_PROTECT2));
            let supported = u64::try_from(supported).unwrap_or(0);
            if supported & DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0 {
                let mut flags = DIRTY_LOG_MANUAL_PROTECT_ENABLE;
                if config.dirty_log_initially_set && supported & DIRTY_LOG_INITIALLY_SET != 0 {
                    flags |= DIRTY_LOG_INITIALLY_SET;
                }
                let mut cap = kvm_enable_cap {
                    cap: CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    ..Default::default()
                };
                cap.args[0] = flags;
                vm.enable_cap(&cap).map_err(|e| VmmError::Kvm {
                    what: "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
                    source: e,
                })?;
                dirty_caps = DirtyLogCaps {
                    manual_protect: true,
                    initially_set: flags & DIRTY_LOG_INITIALLY_SET != 0,
                };
            }
        }

        let memory = MappedMemory::with_size(config.mem_size, config.max_slot_size, config.memory)?;
        let mut slots = Vec::new();
        for r in memory.regions() {
            let slot = MemorySlot {
                slot: r.id(),
                gpa: r.gpa(),
                size: r.size(),
                host_addr: r.host_ptr() as u64,
            };
            set_slot(&vm, &slot, 0)?;
            slots.push(slot);
        }

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::Kvm {
                what: "KVM_GET_SUPPORTED_CPUID",
                source: e,
            })?;
        let mut fds = Vec::new();
        for i in 0..config.vcpus {
            let fd = vm.create_vcpu(u64::from(i)).map_err(|e| VmmError::Kvm {
                what: "KVM_CREATE_VCPU",
                source: e,
            })?;
            fd.set_cpuid2(&cpuid).map_err(|e| VmmError::Kvm {
                what: "KVM_SET_CPUID2",
                source: e,
            })?;
            fds.push(fd);
        }
        let tsc_hz = match fds.first().map(VcpuFd::get_tsc_khz) {
            Some(Ok(khz)) if khz > 0 => u64::from(khz) * 1000,
            _ => calibrate_tsc_hz(),
        };
        let state_caps = state::StateCaps {
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            events: kvm.check_extension(Cap::VcpuEvents),
            debugregs: kvm.check_extension(Cap::Debugregs),
        };
        let msr_list = match kvm.get_msr_index_list() {
            Ok(list) => state::WANTED_MSRS
                .iter()
                .copied()
                .filter(|m| list.as_slice().contains(m))
                .collect(),
            Err(_) => Vec::new(),
        };
        let vcpus = vcpu::Vcpus::spawn(fds, tsc_hz)?;
        Ok(Self {
            vcpus,
            vm,
            _kvm: kvm,
            memory,
            slots,
            config,
            layout,
            tsc_hz,
            dirty_caps,
            state_caps,
            msr_list,
            prefault: Mutex::new(None),
            restored: AtomicBool::new(false),
            started_here: Arc::default(),
        })
    }

    /// The configuration the VM was built with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The workload layout in guest RAM.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Guest RAM.
    pub fn memory(&self) -> &MappedMemory {
        &self.memory
    }

    /// The KVM VM file descriptor (for `KVM_GET_DIRTY_LOG`, `KVM_CLEAR_DIRTY_LOG`, ...).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// A shared handle to the VM file descriptor, for a dirty tracker that owns its VM handle
    /// (it then may outlive this `Vm`; the slots' memory does not).
    pub fn vm_fd_shared(&self) -> Arc<VmFd> {
        Arc::clone(&self.vm)
    }

    /// The raw VM file descriptor.
    pub fn vm_raw_fd(&self) -> RawFd {
        self.vm.as_raw_fd()
    }

    /// The memory slots backing guest RAM, in guest physical order.
    pub fn slots(&self) -> &[MemorySlot] {
        &self.slots
    }

    /// What dirty logging this VM has enabled.
    pub fn dirty_log_caps(&self) -> DirtyLogCaps {
        self.dirty_caps
    }

    /// Turns `KVM_MEM_LOG_DIRTY_PAGES` on or off for every slot.
    pub fn set_dirty_logging(&self, enabled: bool) -> Result<(), VmmError> {
        let flags = if enabled { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        self.slots
            .iter()
            .try_for_each(|s| set_slot(&self.vm, s, flags))
    }

    /// TSC frequency in Hz, as given to the guest.
    pub fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }

    /// Lets the vCPUs run. Fails if a vCPU has faulted, or on an incoming VM whose state
    /// was not restored yet.
    pub fn resume(&self) -> Result<(), VmmError> {
        if !self.restored.load(Ordering::SeqCst) {
            return Err(VmmError::NotRestored);
        }
        self.check_fault()?;
        self.vcpus.resume();
        Ok(())
    }

    /// Stops every vCPU and returns once none is executing guest code.
    pub fn pause(&self) -> Result<(), VmmError> {
        self.vcpus.pause(Duration::from_secs(5))
    }

    /// Whether the VM is paused (or was never resumed).
    pub fn is_paused(&self) -> bool {
        self.vcpus.paused()
    }

    /// An error if a vCPU stopped on an unexpected exit.
    pub fn check_fault(&self) -> Result<(), VmmError> {
        match self.vcpus.fault() {
            Some((vcpu, why)) => Err(VmmError::VcpuFault { vcpu, why }),
            None => Ok(()),
        }
    }

    /// Number of kick signals sent to vCPU threads so far.
    pub fn kicks(&self) -> u64 {
        self.vcpus.kicks()
    }

    /// How many times the guest gave its CPU back through the doorbell (see
    /// [`VmConfig::yield_when_idle`]).
    pub fn doorbell_rings(&self) -> u64 {
        self.vcpus.doorbells()
    }

    /// Saves every vCPU's state as one section. The VM must be paused.
    pub fn save_state(&self) -> Result<Vec<u8>, VmmError> {
        if !self.is_paused() {
            return Err(VmmError::NotPaused);
        }
        let mut out = Vec::with_capacity(8 << 10);
        state::header(&mut out, self.config.vcpus, self.config.mem_size);
        for i in 0..self.vcpus.len() {
            self.vcpus
                .with_fd(i, |fd| {
                    state::save_vcpu(fd, self.state_caps, &self.msr_list, &mut out)
                })
                .unwrap_or(Ok(()))?;
        }
        Ok(out)
    }

    /// Restores a section from [`Vm::save_state`] into this (paused) VM. It also has this
    /// host's TSC frequency written into the guest's mailbox, so the workload paces correctly
    /// on a host with another TSC rate: by vCPU 0's thread just before the guest first runs,
    /// so that in postcopy a mailbox page still missing blocks that vCPU, not the caller
    /// (which must stay free to notice a lost connection).
    pub fn restore_state(&self, data: &[u8]) -> Result<(), VmmError> {
        if !self.is_paused() {
            return Err(VmmError::NotPaused);
        }
        let parsed = state::parse(data, self.config.vcpus, self.config.mem_size)?;
        self.wait_prefault()?;
        for i in 0..self.vcpus.len() {
            self.vcpus
                .with_fd(i, |fd| parsed.apply(i, fd))
                .unwrap_or(Ok(()))?;
        }
        let at = |gpa: u64| self.memory.host_address(gpa, 8).map(|p| p as usize);
        let magic = at(layout::MAILBOX_GPA + mb::MAGIC)?;
        let tsc = at(layout::MAILBOX_GPA + mb::TSC_HZ)?;
        let dirtied = (0..self.config.vcpus)
            .map(|i| {
                at(layout::MAILBOX_GPA
                    + layout::STATUS_OFFSET
                    + u64::from(i) * layout::STATUS_STRIDE
                    + st::PAGES_DIRTIED)
            })
            .collect::<Result<Vec<usize>, _>>()?;
        let (tsc_hz, started) = (self.tsc_hz, self.started_here.clone());
        self.vcpus.before_first_run(Box::new(move || {
            // SAFETY: 8-byte aligned addresses inside guest RAM (checked above), which stays
            // mapped until the vCPU threads have ended (`Vm` drops its vCPUs first).
            unsafe {
                if std::ptr::read_volatile(magic as *const u64) != layout::MAILBOX_MAGIC {
                    return;
                }
                std::ptr::write_volatile(tsc as *mut u64, tsc_hz);
                let d = dirtied
                    .iter()
                    .map(|&a| std::ptr::read_volatile(a as *const u64))
                    .sum();
                *started.lock().unwrap_or_else(PoisonError::into_inner) = Some((Instant::now(), d));
            }
        }));
        self.restored.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// When the guest first ran here after [`Vm::restore_state`], and how many pages it had
    /// dirtied by then (by its own count); `None` before it ran.
    pub fn started_here(&self) -> Option<(Instant, u64)> {
        *self
            .started_here
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the guest's clock jump by `ticks` TSC ticks (negative: backwards), as a TSC
    /// that differs after a migration between hosts would. The workload's pacing must cope:
    /// it neither stalls after a backward jump nor bursts to catch up a forward one. (On this
    /// machine's PVM-based KVM the guest reads the host TSC directly and a restored
    /// `IA32_TSC` does not take effect, so this mailbox skew is how tests jump the clock.)
    pub fn skew_guest_clock(&self, ticks: i64) -> Result<(), VmmError> {
        if !self.mailbox_valid() {
            return Err(VmmError::NoMailbox);
        }
        let gpa = layout::MAILBOX_GPA + mb::CLOCK_SKEW;
        let skew = self.memory.read_u64(gpa)?.wrapping_add_signed(ticks);
        self.memory.write_u64(gpa, skew)?;
        Ok(())
    }

    fn mailbox_valid(&self) -> bool {
        self.memory
            .read_u64(layout::MAILBOX_GPA + mb::MAGIC)
            .is_ok_and(|m| m == layout::MAILBOX_MAGIC)
    }

    fn mb_read(&self, off: u64) -> Result<u64, VmmError> {
        Ok(self.memory.read_u64(layout::MAILBOX_GPA + off)?)
    }

    fn st_read(&self, vcpu: u32, off: u64) -> Result<u64, VmmError> {
        let base =
            layout::MAILBOX_GPA + layout::STATUS_OFFSET + u64::from(vcpu) * layout::STATUS_STRIDE;
        Ok(self.memory.read_u64(base + off)?)
    }

    /// The guest workload's status, read from the mailbox.
    pub fn guest_status(&self) -> Result<GuestStatus, VmmError> {
        if !self.mailbox_valid() {
            return Err(VmmError::NoMailbox);
        }
        let mut s = GuestStatus {
            vcpus: Vec::with_capacity(self.config.vcpus as usize),
            work_pages: self.mb_read(mb::WORK_PAGES)?,
            heartbeat: 0,
            pages_filled: 0,
            pages_dirtied: 0,
        };
        for i in 0..self.config.vcpus {
            let v = VcpuStatus {
                phase: Phase::from_raw(self.st_read(i, st::PHASE)?),
                heartbeat: self.st_read(i, st::HEARTBEAT)?,
                pages_filled: self.st_read(i, st::PAGES_FILLED)?,
                pages_dirtied: self.st_read(i, st::PAGES_DIRTIED)?,
                slice_lo: self.st_read(i, st::SLICE_LO)?,
                slice_hi: self.st_read(i, st::SLICE_HI)?,
                rate_seen: self.st_read(i, st::RATE_SEEN)?,
                last_tsc: self.st_read(i, st::LAST_TSC)?,
            };
            s.heartbeat = s.heartbeat.wrapping_add(v.heartbeat);
            s.pages_filled += v.pages_filled;
            s.pages_dirtied += v.pages_dirtied;
            s.vcpus.push(v);
        }
        Ok(s)
    }

    /// Sets the guest's dirty rate (bytes per second, all vCPUs together; 0 stops dirtying).
    pub fn set_dirty_rate(&self, bytes_per_sec: u64) -> Result<(), VmmError> {
        if !self.mailbox_valid() {
            return Err(VmmError::NoMailbox);
        }
        self.memory
            .write_u64(layout::MAILBOX_GPA + mb::DIRTY_RATE, bytes_per_sec)?;
        Ok(())
    }

    /// Waits until every vCPU's pacing uses the current dirty rate (so no page write at an
    /// older rate is still to come after the next one finishes). The VM must be running.
    pub fn wait_rate_applied(&self, timeout: Duration) -> Result<(), VmmError> {
        let rate = self.mb_read(mb::DIRTY_RATE)?;
        self.wait_until(timeout, "apply the dirty rate", |s| {
            s.vcpus.iter().all(|v| v.rate_seen == rate)
        })
        .map(|_| ())
    }

    /// Waits until the guest has filled all its pages. The VM must be running.
    pub fn wait_filled(&self, timeout: Duration) -> Result<GuestStatus, VmmError> {
        self.wait_until(timeout, "fill its memory", GuestStatus::filled)
    }

    /// Polls the guest status until `done` holds, a vCPU faults, or `timeout` passes.
    pub fn wait_until(
        &self,
        timeout: Duration,
        what: &'static str,
        mut done: impl FnMut(&GuestStatus) -> bool,
    ) -> Result<GuestStatus, VmmError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_fault()?;
            let s = self.guest_status()?;
            if done(&s) {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(VmmError::Timeout(timeout, what));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Asks the guest to check every workload page against its version table and waits for
    /// the answer of every vCPU. The VM must be running; a vCPU still filling answers after
    /// its fill.
    pub fn request_verify(&self, timeout: Duration) -> Result<VerifyReport, VmmError> {
        if !self.mailbox_valid() {
            return Err(VmmError::NoMailbox);
        }
        let gen = self.mb_read(mb::VERIFY_CMD)?.wrapping_add(1);
        self.memory
            .write_u64(layout::MAILBOX_GPA + mb::VERIFY_CMD, gen)?;
        let deadline = Instant::now() + timeout;
        loop {
            self.check_fault()?;
            let mut all = true;
            for i in 0..self.config.vcpus {
                if self.st_read(i, st::VERIFY_GEN)? != gen {
                    all = false;
                    break;
                }
            }
            if all {
                break;
            }
            if Instant::now() >= deadline {
                return Err(VmmError::Timeout(timeout, "verify its memory"));
            }
            std::thread::sleep(POLL);
        }
        let mut r = VerifyReport {
            pages_checked: 0,
            mismatches: 0,
            first_mismatch: None,
            generation: gen,
        };
        for i in 0..self.config.vcpus {
            r.pages_checked += self.st_read(i, st::VERIFY_CHECKED)?;
            let bad = self.st_read(i, st::VERIFY_MISMATCHES)?;
            r.mismatches += bad;
            if bad > 0 {
                let first = self.st_read(i, st::FIRST_MISMATCH)?;
                r.first_mismatch = Some(r.first_mismatch.map_or(first, |f| f.min(first)));
            }
        }
        Ok(r)
    }
}

/// Registers (or re-registers with new flags) one memory slot.
fn set_slot(vm: &VmFd, s: &MemorySlot, flags: u32) -> Result<(), VmmError> {
    let region = kvm_userspace_memory_region {
        slot: s.slot,
        flags,
        guest_phys_addr: s.gpa,
        memory_size: s.size,
        userspace_addr: s.host_addr,
    };
    // SAFETY: the host range is a live mapping owned by the VM's `MappedMemory`. The vCPUs,
    // the only users of the slot, are stopped and joined before that memory is dropped
    // (field order of `Vm`); a VM fd kept alive elsewhere after that runs no guest code, and
    // the kernel treats a stale user address as a fault, not as our memory.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| VmmError::Kvm {
        what: "KVM_SET_USER_MEMORY_REGION",
        source: e,
    })
}

fn segment(selector: u16, type_: u8, dpl: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts vCPU `index` in 64-bit ring 3 at the guest entry point.
fn setup_vcpu_registers(fd: &VcpuFd, index: u32) -> Result<(), VmmError> {
    let kvm = |what| move |e| VmmError::Kvm { what, source: e };
    let mut s = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    // CR0: PE | MP | ET | NE | WP | AM | PG. CR4: PAE | OSFXSR | OSXMMEXCPT.
    s.cr0 = 0x8005_0033;
    s.cr4 = 0x620;
    // EFER: SCE | LME | LMA | NXE.
    s.efer = 0xd01;
    s.cr3 = layout::PML4_GPA;
    s.gdt.base = layout::GDT_GPA;
    s.gdt.limit = 7 * 8 - 1;
    s.idt.base = layout::IDT_GPA;
    s.idt.limit = 0;
    s.cs = segment(layout::SEL_USER_CODE, 0xb, 3, true);
    let data = segment(layout::SEL_USER_DATA, 0x3, 3, false);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: layout::TSS_GPA,
        limit: 0x67,
        selector: layout::SEL_TSS,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    s.ldt = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    fd.set_sregs(&s).map_err(kvm("KVM_SET_SREGS"))?;
    let mut r = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    r.rip = layout::CODE_GPA;
    r.rsp = layout::stack_top(index);
    r.rdi = u64::from(index);
    r.rflags = 0x2;
    fd.set_regs(&r).map_err(kvm("KVM_SET_REGS"))
}

/// Measures the TSC against the monotonic clock over ~50 ms.
fn calibrate_tsc_hz() -> u64 {
    // SAFETY: RDTSC has no memory effects and is available on every x86_64 CPU.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    let c0 = Instant::now();
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    let ns = c0.elapsed().as_nanos().max(1);
    (u128::from(t1.wrapping_sub(t0)) * 1_000_000_000 / ns) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn vm_is_shareable_across_threads() {
        assert_send_sync::<Vm>();
        assert_send_sync::<MappedMemory>();
    }
}
