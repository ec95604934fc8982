//! A small VMM on kvm-ioctls and vm-memory that embeds Ferry, as a hypervisor would.
//!
//! [`migrate_example`] is the whole story in one call:
//!
//! 1. guest RAM is a vm-memory [`GuestMemoryMmap`] of two regions ([`guest::Shape`]); the
//!    KVM VM's memory slots are its regions; one vCPU runs a tiny program that keeps writing
//!    a counter into successive pages of a buffer ([`guest`]);
//! 2. an emulated device writes pages of guest RAM through the VMM's own mapping, which KVM's
//!    dirty log does not see, and marks each write in a [`VmmWrites`] ([`Device`]): while it
//!    runs, once more after the migration's first pass, and a last time when the VM pauses;
//! 3. Ferry migrates the running guest's memory to a second `GuestMemoryMmap` in a
//!    destination thread, over Unix socket pairs the VMM connected itself
//!    ([`Connected`]), tracking the guest's writes with [`KvmDirtyTracker`] and the VMM's
//!    with [`WithVmmWrites`] around it;
//! 4. with the source paused, every byte of the destination's memory is compared with the
//!    source's, and the guest is resumed on the destination in a new KVM VM from the
//!    registers the migration carried.
//!
//! `cargo run --release -p ferry-embed-example` prints a report; the crate's test runs the
//! same and checks it.

pub mod guest;
mod vcpu;

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_host::destination::{self, DestinationError};
use ferry_host::dirty::{
    DirtyError, DirtyTracker, KvmDirtyTracker, KvmSlot, ManualProtect, VmmWrites, WithVmmWrites,
};
use ferry_host::link::{Conn, Connected};
use ferry_host::migration::{
    CallbackError, DestinationReport, DeviceSection, Event, GuestControl, GuestStarter,
    SourceConfig, SourceReport,
};
use ferry_host::ram::{Ram, RamError, PAGE_SIZE};
use ferry_host::source::{self, SourceError};
use ferry_uring::{Transport, UringConfig};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion,
};

use guest::{GuestRegs, Shape};

/// Section id of the vCPU registers.
pub const VCPU_SECTION: u16 = 1;

/// What can go wrong in the example.
#[derive(Debug, thiserror::Error)]
pub enum ExampleError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The guest's shape is not one the example runs.
    #[error("guest shape {0:?}: each region must be a multiple of 2 MiB, low 4 MiB to 1 GiB, high 2 MiB to 1 GiB")]
    Shape(Shape),
    /// Guest memory could not be mapped.
    #[error("mapping guest memory failed: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    /// Guest memory could not be read or written.
    #[error("guest memory access failed: {0}")]
    Access(#[from] GuestMemoryError),
    /// Ferry refused the guest memory.
    #[error("guest memory: {0}")]
    Ram(#[from] RamError),
    /// Dirty tracking failed.
    #[error("dirty tracking: {0}")]
    Dirty(#[from] DirtyError),
    /// The migration failed on the source.
    #[error("migration (source): {0}")]
    Source(#[from] SourceError),
    /// The migration failed on the destination.
    #[error("migration (destination): {0}")]
    Destination(#[from] DestinationError),
    /// The destination thread panicked.
    #[error("the destination thread panicked")]
    DestinationPanicked,
    /// No vCPU state came with the migration, or it was malformed.
    #[error("the vCPU section is missing or malformed ({len} bytes)")]
    BadState {
        /// Its length.
        len: usize,
    },
    /// Sockets could not be made.
    #[error("socketpair failed: {0}")]
    Socket(#[source] std::io::Error),
    /// The vCPU kick handler could not be installed.
    #[error("installing the vCPU kick signal handler failed: {0}")]
    Signal(#[source] std::io::Error),
    /// A thread could not be started.
    #[error("starting a thread failed: {0}")]
    Thread(#[source] std::io::Error),
    /// The vCPU did not stop in time.
    #[error("the vCPU did not stop in time")]
    PauseTimeout,
    /// The vCPU stopped on a fault.
    #[error("the vCPU stopped: {0}")]
    VcpuFault(String),
    /// The emulated device could not write guest memory or mark its write.
    #[error("the device failed: {0}")]
    Device(String),
    /// The guest did not get going.
    #[error("the guest wrote nothing within {0:?}")]
    GuestIdle(Duration),
}

/// A KVM VM of one vCPU over a vm-memory guest memory.
#[derive(Debug)]
pub struct ExampleVm {
    // Drop order: the vCPU thread stops first, then the VM goes, then its memory.
    vcpu: vcpu::Vcpu,
    vm: VmFd,
    _kvm: Kvm,
    memory: GuestMemoryMmap,
    shape: Shape,
}

impl ExampleVm {
    /// A VM whose memory holds a fresh guest: boot structures and program written, vCPU at
    /// the entry point. Paused until [`resume`](Self::resume).
    pub fn boot(shape: Shape) -> Result<ExampleVm, ExampleError> {
        let memory = shape.memory()?;
        guest::write_boot(&memory, &shape)?;
        ExampleVm::with_memory(memory, shape, &GuestRegs::at_entry(&shape))
    }

    /// A VM over `memory`, which already holds the guest (received by a migration), with
    /// the vCPU's registers set to `regs`. Paused until [`resume`](Self::resume).
    pub fn with_memory(
        memory: GuestMemoryMmap,
        shape: Shape,
        regs: &GuestRegs,
    ) -> Result<ExampleVm, ExampleError> {
        let kvm_err = |what| move |source| ExampleError::Kvm { what, source };
        let kvm = Kvm::new().map_err(ExampleError::NoKvm)?;
        let vm = create_vm(&kvm).map_err(kvm_err("KVM_CREATE_VM"))?;
        for (slot, r) in memory.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
            };
            // SAFETY: the range is a live mapping owned by `memory`, which this VM owns and
            // drops only after the vCPU thread has stopped and the VM fd is closed (field
            // order of `ExampleVm`).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let fd = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        // Long mode needs the guest's CPUID to say the CPU has it.
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        set_system_registers(&fd).map_err(kvm_err("KVM_SET_SREGS"))?;
        let mut r = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        r.rip = regs.rip;
        r.rflags = regs.rflags;
        r.rax = regs.rax;
        r.rbx = regs.rbx;
        r.rcx = regs.rcx;
        r.rdi = regs.rdi;
        fd.set_regs(&r).map_err(kvm_err("KVM_SET_REGS"))?;
        let vcpu = vcpu::Vcpu::spawn(fd)?;
        Ok(ExampleVm {
            vcpu,
            vm,
            _kvm: kvm,
            memory,
            shape,
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The guest's shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Lets the vCPU run.
    pub fn resume(&self) -> Result<(), ExampleError> {
        self.vcpu.resume()
    }

    /// Stops the vCPU; no guest instruction runs once this returns.
    pub fn pause(&self) -> Result<(), ExampleError> {
        self.vcpu.pause()
    }

    /// The program's registers; the VM must be paused (this waits for the vCPU otherwise).
    pub fn regs(&self) -> Result<GuestRegs, ExampleError> {
        let r = self
            .vcpu
            .with_fd(|fd| fd.get_regs())
            .map_err(|source| ExampleError::Kvm {
                what: "KVM_GET_REGS",
                source,
            })?;
        Ok(GuestRegs {
            rip: r.rip,
            rflags: r.rflags,
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdi: r.rdi,
        })
    }

    /// An error if the vCPU stopped on a fault.
    pub fn check_fault(&self) -> Result<(), ExampleError> {
        self.vcpu
            .fault()
            .map_or(Ok(()), |why| Err(ExampleError::VcpuFault(why)))
    }

    /// KVM's dirty log over the VM's memory slots, region `i` of the memory being slot `i`,
    /// with manual protect (`KVM_CLEAR_DIRTY_LOG`) when the kernel offers it.
    pub fn dirty_tracker(&self) -> Result<KvmDirtyTracker<&VmFd>, DirtyError> {
        let slots = self
            .memory
            .iter()
            .enumerate()
            .map(|(slot, r)| KvmSlot {
                slot: slot as u32,
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                flags: 0,
            })
            .collect();
        // SAFETY: these are exactly the slots `with_memory` registered (same ids, addresses,
        // sizes, no flags); the tracker borrows the VM, so it cannot outlive the VM or the
        // memory the VM owns.
        unsafe { KvmDirtyTracker::new(&self.vm, slots, ManualProtect::EnableIfSupported) }
    }
}

/// `KVM_CREATE_VM`, again when interrupted. The kernel gives up with `EINTR` when the
/// calling thread has work pending on its way back to user space, which io_uring queues on
/// the thread that ran a migration (task work counts as a pending signal there).
fn create_vm(kvm: &Kvm) -> Result<VmFd, kvm_ioctls::Error> {
    let mut tries = 0;
    loop {
        match kvm.create_vm() {
            Err(e) if e.errno() == libc::EINTR && tries < 100 => tries += 1,
            r => return r,
        }
    }
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

/// 64-bit mode, paging on ([`guest::PML4_GPA`]), ring 3 code and data segments.
fn set_system_registers(fd: &kvm_ioctls::VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut s = fd.get_sregs()?;
    s.cr0 = 0x8005_0033; // PE MP ET NE WP AM PG
    s.cr4 = 0x620; // PAE OSFXSR OSXMMEXCPT
    s.efer = 0xd01; // SCE LME LMA NXE
    s.cr3 = guest::PML4_GPA;
    s.gdt.base = guest::GDT_GPA;
    s.gdt.limit = 7 * 8 - 1;
    s.idt.base = guest::IDT_GPA;
    s.idt.limit = 0;
    s.cs = segment(guest::SEL_USER_CODE, 0xb, true);
    let data = segment(guest::SEL_USER_DATA, 0x3, false);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.tr = kvm_segment {
        base: guest::TSS_GPA,
        limit: 0x67,
        selector: guest::SEL_TSS,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    s.ldt = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    fd.set_sregs(&s)
}

/// An emulated device that writes guest RAM through the VMM's own mapping, as a virtio
/// device completes requests: every `interval` (and on [`write_now`](Self::write_now)) it
/// fills the next page of the device ring ([`guest::DEVICE_GPA`]) and marks the write in a
/// [`VmmWrites`]. KVM's dirty log does not see these writes; the marks are how they reach
/// the destination.
#[derive(Debug)]
pub struct Device {
    shared: Arc<DeviceShared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct DeviceShared {
    state: Mutex<DeviceState>,
    cv: Condvar,
    memory: GuestMemoryMmap,
    writes: Arc<VmmWrites>,
}

#[derive(Debug)]
struct DeviceState {
    running: bool,
    exit: bool,
    seq: u64,
    error: Option<String>,
}

impl DeviceShared {
    fn lock(&self) -> MutexGuard<'_, DeviceState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One device write into the next ring page, made and marked under the state lock, so a
    /// `pause` that took the lock has no write in flight behind it.
    fn write(&self, st: &mut DeviceState) {
        st.seq += 1;
        let gpa = guest::DEVICE_GPA + (st.seq % guest::DEVICE_PAGES) * PAGE_SIZE;
        let mut page = [st.seq as u8; PAGE_SIZE as usize];
        page[..8].copy_from_slice(&st.seq.to_le_bytes());
        self.write_page(st, gpa, &page);
    }

    fn write_page(&self, st: &mut DeviceState, gpa: u64, page: &[u8]) {
        let r = self
            .memory
            .write_slice(page, GuestAddress(gpa))
            .map_err(|e| e.to_string())
            // After the write, never before: see ferry_host::dirty::vmm_writes.
            .and_then(|()| {
                self.writes
                    .mark_gpa(gpa, PAGE_SIZE)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = r {
            st.error.get_or_insert(e);
        }
    }
}

impl Device {
    /// Starts the device, paused, over `memory` (a clone of the VM's: the same mappings),
    /// marking its writes in `writes`.
    pub fn start(
        memory: GuestMemoryMmap,
        writes: Arc<VmmWrites>,
        interval: Duration,
    ) -> Result<Device, ExampleError> {
        let shared = Arc::new(DeviceShared {
            state: Mutex::new(DeviceState {
                running: false,
                exit: false,
                seq: 0,
                error: None,
            }),
            cv: Condvar::new(),
            memory,
            writes,
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("device".into())
            .spawn(move || {
                let mut st = s.lock();
                while !st.exit {
                    if st.running {
                        s.write(&mut st);
                    }
                    st =
                        s.cv.wait_timeout(st, interval)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                }
            })
            .map_err(ExampleError::Thread)?;
        Ok(Device {
            shared,
            thread: Some(thread),
        })
    }

    /// Lets the device write.
    pub fn resume(&self) {
        self.shared.lock().running = true;
        self.shared.cv.notify_all();
    }

    /// Stops the device; once this returns no write of its is in flight or unmarked.
    /// Stopping completes the request in flight, as a virtio device does when its VM
    /// pauses: the device writes its status page ([`guest::STATUS_GPA`]) one last time.
    pub fn pause(&self) {
        let mut st = self.shared.lock();
        if st.running {
            st.running = false;
            st.seq += 1;
            let mut page = [0u8; PAGE_SIZE as usize];
            page[..8].copy_from_slice(&st.seq.to_le_bytes());
            page[8..16].copy_from_slice(b"quiesced");
            self.shared.write_page(&mut st, guest::STATUS_GPA, &page);
        }
    }

    /// Makes one write now and returns its sequence number.
    pub fn write_now(&self) -> u64 {
        let mut st = self.shared.lock();
        self.shared.write(&mut st);
        st.seq
    }

    /// Writes made so far.
    pub fn writes(&self) -> u64 {
        self.shared.lock().seq
    }

    /// The first write that failed, if any.
    pub fn error(&self) -> Option<String> {
        self.shared.lock().error.clone()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.lock().exit = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The source's hold on the VM, for Ferry: pausing stops the vCPU and the device.
#[derive(Debug)]
pub struct SourceGuest<'a> {
    vm: &'a ExampleVm,
    device: &'a Device,
}

impl<'a> SourceGuest<'a> {
    /// Wraps a running VM and its device.
    pub fn new(vm: &'a ExampleVm, device: &'a Device) -> SourceGuest<'a> {
        SourceGuest { vm, device }
    }
}

impl GuestControl for SourceGuest<'_> {
    fn pause(&mut self) -> Result<(), CallbackError> {
        self.vm.pause()?;
        // The VMM's own writers stop too, their last writes marked, before the final sync.
        self.device.pause();
        Ok(())
    }

    fn resume(&mut self) -> Result<(), CallbackError> {
        self.device.resume();
        Ok(self.vm.resume()?)
    }

    fn device_state(&mut self) -> Result<Vec<DeviceSection>, CallbackError> {
        Ok(vec![DeviceSection {
            id: VCPU_SECTION,
            bytes: self.vm.regs()?.to_bytes(),
        }])
    }

    fn device_state_estimate(&self) -> u64 {
        64
    }
}

/// The destination's starter: keeps the device sections; the VM is made after the memory
/// check.
#[derive(Debug, Default)]
pub struct Incoming {
    /// The sections received on *go*.
    pub sections: Vec<DeviceSection>,
}

impl GuestStarter for Incoming {
    fn start(&mut self, sections: &[DeviceSection]) -> Result<(), CallbackError> {
        self.sections = sections.to_vec();
        Ok(())
    }
}

/// How [`migrate_example`] runs.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// The guest's memory.
    pub shape: Shape,
    /// How often the device writes while the VM runs.
    pub device_interval: Duration,
    /// How long the guest runs on the destination before it is checked.
    pub run_on_destination: Duration,
    /// Report the device's writes to Ferry (the point of the example). `false` shows what
    /// happens without: the tracker gets a log nobody marks, and the device's writes after
    /// the first pass never reach the destination.
    pub report_vmm_writes: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            shape: Shape {
                low: 64 << 20,
                high: 64 << 20,
            },
            device_interval: Duration::from_millis(2),
            run_on_destination: Duration::from_millis(100),
            report_vmm_writes: true,
        }
    }
}

/// Pages of two guest memories that differ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mismatch {
    /// Pages compared.
    pub pages: u64,
    /// Pages that differ.
    pub differing: u64,
    /// Guest address of the first page that differs.
    pub first: Option<u64>,
    /// Guest address of the last page that differs.
    pub last: Option<u64>,
}

/// Compares two guest memories of the same shape byte for byte, page by page.
///
/// # Safety
///
/// Nothing may write either memory during the call: the source guest and its device are
/// paused, the destination's guest has not started.
pub unsafe fn compare_memory(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> Mismatch {
    let mut m = Mismatch::default();
    for (ra, rb) in a.iter().zip(b.iter()) {
        let len = ra.len().min(rb.len()) as usize;
        // SAFETY: each region is a live mapping of at least `len` bytes, borrowed for the
        // call; the caller guarantees nothing writes it meanwhile.
        let (sa, sb) = unsafe {
            (
                std::slice::from_raw_parts(ra.as_ptr(), len),
                std::slice::from_raw_parts(rb.as_ptr(), len),
            )
        };
        let differ = ra.start_addr() != rb.start_addr() || ra.len() != rb.len();
        for (i, (pa, pb)) in sa
            .chunks(PAGE_SIZE as usize)
            .zip(sb.chunks(PAGE_SIZE as usize))
            .enumerate()
        {
            m.pages += 1;
            if differ || pa != pb {
                m.differing += 1;
                let gpa = ra.start_addr().0 + i as u64 * PAGE_SIZE;
                m.first.get_or_insert(gpa);
                m.last = Some(gpa);
            }
        }
    }
    if a.num_regions() != b.num_regions() {
        m.differing += 1;
    }
    m
}

/// What [`migrate_example`] measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Guest RAM, bytes.
    pub guest_bytes: u64,
    /// Guest RAM, pages.
    pub guest_pages: u64,
    /// The dirty tracker, as Ferry named it.
    pub tracker: String,
    /// The source's report.
    pub source: SourceReport,
    /// The destination's report.
    pub destination: DestinationReport,
    /// The guest's counter when the migration started.
    pub counter_at_start: u64,
    /// The guest's counter when the source paused it for good.
    pub counter_at_pause: u64,
    /// Device writes made during the migration (after its start).
    pub device_writes: u64,
    /// Pages the dirty log did not report and the VMM's marks did, summed over the syncs.
    pub vmm_only_reports: u64,
    /// The memory check with the source paused and the destination not started.
    pub mismatch: Mismatch,
    /// The counter after the guest ran on on the destination.
    pub counter_on_destination: u64,
    /// Wall time of the migration (connect to *go*), as the caller saw it.
    pub elapsed: Duration,
}

/// Boots a guest, lets it run, migrates its memory with Ferry to a destination memory while
/// it and its device keep writing, checks the destination's memory against the paused
/// source's, and resumes the guest on the destination, as the crate docs tell.
pub fn migrate_example(config: &Config) -> Result<Outcome, ExampleError> {
    let shape = config.shape;
    let vm = ExampleVm::boot(shape)?;
    let src_ram = Ram::from_guest_memory(vm.memory())?;
    let writes = Arc::new(VmmWrites::for_ram(&src_ram));
    let device = Device::start(
        vm.memory().clone(),
        Arc::clone(&writes),
        config.device_interval,
    )?;
    vm.resume()?;
    device.resume();
    // Let the program finish a pass over its buffer before the migration starts.
    let last = GuestAddress(guest::HIGH_BASE + shape.high - PAGE_SIZE);
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm.memory().read_obj::<u64>(last)? == 0 {
        vm.check_fault()?;
        if Instant::now() > deadline {
            return Err(ExampleError::GuestIdle(Duration::from_secs(10)));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.pause()?;
    let counter_at_start = vm.regs()?.rax;
    let writes_at_start = device.writes();
    vm.resume()?;

    let log = if config.report_vmm_writes {
        Arc::clone(&writes)
    } else {
        Arc::new(VmmWrites::for_ram(&src_ram))
    };
    let mut tracker = WithVmmWrites::new(vm.dirty_tracker()?, log)?;
    let tracker_name = tracker.name().to_owned();
    let dst_memory = shape.memory()?;
    let dst_ram = Ram::from_guest_memory(&dst_memory)?;

    // The VMM connects the streams itself: a control and a bulk one, each a socket pair.
    let pair = || UnixStream::pair().map_err(ExampleError::Socket);
    let ((c_src, c_dst), (b_src, b_dst)) = (pair()?, pair()?);
    let mut src_conns = Connected::new(Conn::Unix(c_src)).with_bulk(Conn::Unix(b_src));
    let dst_conns = Connected::new(Conn::Unix(c_dst)).with_bulk(Conn::Unix(b_dst));
    let transport = Transport::Uring(UringConfig::default());
    let source_config = SourceConfig {
        give_up_after: Some(Duration::from_secs(60)),
        ..SourceConfig::default()
    };
    let mut guest = SourceGuest::new(&vm, &device);
    let started = Instant::now();
    let (source, destination) = std::thread::scope(|s| {
        let dst = s.spawn(|| {
            let mut incoming = Incoming::default();
            destination::receive(dst_conns, &dst_ram, &mut incoming, transport)
                .map(|report| (report, incoming))
        });
        let source = source::migrate_over(
            &src_ram,
            &mut tracker,
            &mut guest,
            &source_config,
            &mut src_conns,
            transport,
            1,
            &mut |event| {
                // Once the first pass has sent every page, the device writes one more:
                // only the VMM's mark can bring this one across.
                if let Event::Round(p) = event {
                    if p.round == 0 {
                        device.write_now();
                    }
                }
            },
        );
        (source, dst.join())
    });
    let elapsed = started.elapsed();
    let source = source?;
    let (destination, incoming) = destination.map_err(|_| ExampleError::DestinationPanicked)??;
    if let Some(e) = device.error() {
        return Err(ExampleError::Device(e));
    }
    let vmm_only_reports = tracker.vmm_only_reports();
    drop(tracker);

    // SAFETY: the source's vCPU and device are paused (the migration succeeded, so the
    // guest now belongs to the destination), and the destination's guest has not started.
    let mismatch = unsafe { compare_memory(vm.memory(), &dst_memory) };
    let regs = incoming
        .sections
        .iter()
        .find(|s| s.id == VCPU_SECTION)
        .map(|s| GuestRegs::from_bytes(&s.bytes))
        .unwrap_or(Err(ExampleError::BadState { len: 0 }))?;

    // The guest goes on in a new VM over the destination's memory.
    let resumed = ExampleVm::with_memory(dst_memory, shape, &regs)?;
    resumed.resume()?;
    std::thread::sleep(config.run_on_destination);
    resumed.pause()?;
    let counter_on_destination = resumed.regs()?.rax;

    Ok(Outcome {
        guest_bytes: shape.total(),
        guest_pages: shape.total() / PAGE_SIZE,
        tracker: tracker_name,
        source,
        destination,
        counter_at_start,
        counter_at_pause: regs.rax,
        device_writes: device.writes() - writes_at_start,
        vmm_only_reports,
        mismatch,
        counter_on_destination,
        elapsed,
    })
}
