//! KVM dirty-log tracking against a real VM on /dev/kvm.
//!
//! Where /dev/kvm is missing the tests say so and return.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;

use ferry_host::dirty::{
    bitmap_words, DirtyError, DirtyTracker, KvmDirtyTracker, KvmSlot, ManualProtect, PAGE_SIZE,
};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VmFd};

fn kvm() -> Option<Kvm> {
    match Kvm::new() {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm is not usable here ({e})");
            None
        }
    }
}

/// Guest memory: an anonymous mapping registered as one slot.
struct GuestMem {
    addr: usize,
    len: usize,
}

impl GuestMem {
    fn new(vm: &VmFd, slot: u32, gpa: u64, pages: u64) -> (GuestMem, KvmSlot) {
        let len = (pages * PAGE_SIZE) as usize;
        // SAFETY: a fresh anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let s = KvmSlot {
            slot,
            guest_phys_addr: gpa,
            memory_size: len as u64,
            userspace_addr: p as u64,
            flags: 0,
        };
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len as u64,
            userspace_addr: p as u64,
        };
        // SAFETY: the mapping outlives the VM in every test (it is dropped after the VM).
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        (
            GuestMem {
                addr: p as usize,
                len,
            },
            s,
        )
    }

    fn write(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= self.len);
        // SAFETY: in bounds of the mapping; the guest is not running.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), (self.addr + off) as *mut u8, bytes.len())
        };
    }

    fn read(&self, off: usize) -> u8 {
        assert!(off < self.len);
        // SAFETY: in bounds of the mapping; the guest is not running.
        unsafe { std::ptr::read_volatile((self.addr + off) as *const u8) }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

fn bits(words: &[u64]) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for (i, w) in words.iter().enumerate() {
        for b in 0..64 {
            if w >> b & 1 == 1 {
                set.insert(i as u64 * 64 + b);
            }
        }
    }
    set
}

fn sync_set<T: DirtyTracker>(t: &mut T, region: usize) -> BTreeSet<u64> {
    let mut out = vec![0u64; bitmap_words(t.pages(region).unwrap())];
    let newly = t.sync(region, &mut out).unwrap();
    let set = bits(&out);
    assert_eq!(newly as usize, set.len());
    set
}

/// Idle VM: logging starts, the log is clean, CLEAR accepts unaligned ranges (including the
/// unaligned tail of a slot whose size is not a multiple of 64 pages), and stop works.
fn idle_vm(protect: ManualProtect) {
    let Some(kvm) = kvm() else { return };
    let vm = Arc::new(kvm.create_vm().unwrap());
    let (_a, sa) = GuestMem::new(&vm, 0, 0, 256);
    let (_b, sb) = GuestMem::new(&vm, 1, 0x10_0000, 100);
    // SAFETY: the slots are exactly what was registered above and the mappings outlive the
    // tracker.
    let mut t = unsafe { KvmDirtyTracker::new(Arc::clone(&vm), vec![sa, sb], protect) }.unwrap();
    eprintln!("{}: manual protect {}", t.name(), t.manual_protect());
    assert_eq!(t.regions(), 2);
    assert_eq!(t.pages(1).unwrap(), 100);
    let mut out = [0u64; 4];
    assert!(matches!(
        t.sync(0, &mut out),
        Err(DirtyError::WrongState { .. })
    ));
    t.start().unwrap();
    assert!(sync_set(&mut t, 0).is_empty());
    assert!(sync_set(&mut t, 1).is_empty());
    for (first, count) in [
        (0, 1),
        (3, 5),
        (60, 70),
        (63, 1),
        (64, 64),
        (0, 256),
        (200, 56),
    ] {
        t.clear(0, first, count).unwrap();
    }
    for (first, count) in [(0, 100), (64, 36), (99, 1), (70, 30), (5, 0)] {
        t.clear(1, first, count).unwrap();
    }
    t.clear_mask(1, 64, &[u64::MAX]).unwrap();
    t.clear_mask(0, 0, &[u64::MAX; 4]).unwrap();
    assert!(matches!(
        t.clear(1, 90, 11),
        Err(DirtyError::PagesOutOfRange { .. })
    ));
    let mut short = [0u64; 1];
    assert!(matches!(
        t.sync(1, &mut short),
        Err(DirtyError::BitmapTooSmall { needed: 2, .. })
    ));
    assert!(sync_set(&mut t, 0).is_empty());
    t.stop().unwrap();
    assert!(matches!(t.stop(), Err(DirtyError::WrongState { .. })));
    // Logging can be started again.
    t.start().unwrap();
    assert!(sync_set(&mut t, 1).is_empty());
    t.stop().unwrap();
}

#[test]
fn idle_vm_classic() {
    idle_vm(ManualProtect::Off);
}

#[test]
fn idle_vm_manual_protect() {
    let Some(kvm) = kvm() else { return };
    let vm = kvm.create_vm().unwrap();
    if !kvm_supports_manual_protect(&vm) {
        eprintln!("SKIPPED: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is not offered");
        return;
    }
    idle_vm(ManualProtect::Require);
}

fn kvm_supports_manual_protect(vm: &VmFd) -> bool {
    vm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) & 1 != 0
}

#[test]
fn slots_are_validated() {
    let Some(kvm) = kvm() else { return };
    let vm = kvm.create_vm().unwrap();
    let good = KvmSlot {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: 8 * PAGE_SIZE,
        userspace_addr: 0x1000_0000,
        flags: 0,
    };
    let cases = [
        KvmSlot {
            memory_size: 0,
            ..good
        },
        KvmSlot {
            memory_size: 100,
            ..good
        },
        KvmSlot {
            flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
            ..good
        },
    ];
    for bad in cases {
        // SAFETY: construction fails before anything is registered.
        let r = unsafe { KvmDirtyTracker::new(&vm, vec![bad], ManualProtect::Off) };
        assert!(matches!(r, Err(DirtyError::BadRegion { region: 0, .. })));
    }
    // SAFETY: as above.
    let r = unsafe { KvmDirtyTracker::new(&vm, vec![good, good], ManualProtect::Off) };
    assert!(matches!(r, Err(DirtyError::BadRegion { region: 1, .. })));
}

/// Real-mode guest at 0x1000: writes one byte to pages 0x10 and 0x23 (same 64-page window),
/// halts, writes them again, halts again.
const GUEST: &[u8] = &[
    0xb8, 0x00, 0x10, // mov ax, 0x1000
    0x8e, 0xd8, // mov ds, ax
    0xc6, 0x06, 0x00, 0x00, 0x11, // mov byte [0], 0x11        -> 0x10000, page 0x10
    0xb8, 0x45, 0x23, // mov ax, 0x2345
    0x8e, 0xd8, // mov ds, ax
    0xc6, 0x06, 0x10, 0x00, 0x22, // mov byte [0x10], 0x22     -> 0x23460, page 0x23
    0xf4, // hlt
    0xb8, 0x00, 0x10, // mov ax, 0x1000
    0x8e, 0xd8, // mov ds, ax
    0xc6, 0x06, 0x00, 0x00, 0x33, // mov byte [0], 0x33
    0xb8, 0x45, 0x23, // mov ax, 0x2345
    0x8e, 0xd8, // mov ds, ax
    0xc6, 0x06, 0x10, 0x00, 0x44, // mov byte [0x10], 0x44
    0xf4, // hlt
];

fn run_to_halt(vcpu: &mut kvm_ioctls::VcpuFd) -> bool {
    match vcpu.run() {
        Ok(VcpuExit::Hlt) => true,
        Ok(exit) => {
            eprintln!("guest exited with {exit:?}");
            false
        }
        Err(e) => {
            eprintln!("KVM_RUN failed: {e}");
            false
        }
    }
}

/// A guest writes to pages; the tracker reports exactly them. With manual protect, clearing
/// one page leaves the other (dirty, in the same 64-page window) reported; the cleared page
/// is reported again once the guest writes it again.
fn guest_dirties(protect: ManualProtect) {
    let Some(kvm) = kvm() else { return };
    let vm = Arc::new(kvm.create_vm().unwrap());
    // 1 MiB at guest physical 0.
    let (mem, slot) = GuestMem::new(&vm, 0, 0, 256);
    mem.write(0x1000, GUEST);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();

    // SAFETY: the slot is exactly what was registered and `mem` outlives the tracker.
    let mut t = unsafe { KvmDirtyTracker::new(Arc::clone(&vm), vec![slot], protect) }.unwrap();
    let manual = t.manual_protect();
    t.start().unwrap();
    assert!(sync_set(&mut t, 0).is_empty());

    assert!(
        run_to_halt(&mut vcpu),
        "the guest did not reach its first hlt"
    );
    assert_eq!(mem.read(0x10000), 0x11);
    assert_eq!(mem.read(0x23460), 0x22);
    assert_eq!(sync_set(&mut t, 0), [0x10, 0x23].into_iter().collect());

    t.clear(0, 0x10, 1).unwrap();
    if manual {
        // Manual protect keeps reporting 0x23 until it is cleared; 0x10 was cleared.
        assert_eq!(sync_set(&mut t, 0), [0x23].into_iter().collect());
    } else {
        // Classic mode cleared everything as it read.
        assert!(sync_set(&mut t, 0).is_empty());
    }

    assert!(run_to_halt(&mut vcpu));
    assert_eq!(mem.read(0x10000), 0x33);
    assert_eq!(sync_set(&mut t, 0), [0x10, 0x23].into_iter().collect());
    t.stop().unwrap();
}

#[test]
fn guest_writes_are_reported_classic() {
    guest_dirties(ManualProtect::Off);
}

#[test]
fn guest_writes_are_reported_manual_protect() {
    guest_dirties(ManualProtect::EnableIfSupported);
}

/// Real-mode guest at 0x1000: `rounds` times, writes the round number (a u16) at offsets 0
/// and 0xffe of each page 0x10..0x80, then halts.
fn looping_guest(rounds: u16) -> Vec<u8> {
    let [lo, hi] = rounds.to_le_bytes();
    vec![
        0xbe, 0x01, 0x00, // 0: mov si, 1
        0xb8, 0x00, 0x10, // 3: mov ax, 0x1000
        0x8e, 0xd8, // 6: mov ds, ax
        0x89, 0x36, 0x00, 0x00, // 8: mov [0], si
        0x89, 0x36, 0xfe, 0x0f, // 12: mov [0xffe], si
        0x05, 0x00, 0x01, // 16: add ax, 0x100
        0x3d, 0x00, 0x80, // 19: cmp ax, 0x8000
        0x75, 0xee, // 22: jne 6
        0x46, // 24: inc si
        0x81, 0xfe, lo, hi, // 25: cmp si, rounds
        0x75, 0xe4, // 29: jne 3
        0xf4, // 31: hlt
    ]
}

/// A migration loop racing a running guest: sync, then for each reported page clear it and
/// copy it to a "destination"; after the guest halts, a final sync and copy. Every page must
/// then match the guest's memory: one lost write leaves a stale round number.
fn migrate_against_guest(protect: ManualProtect) {
    use std::sync::atomic::{AtomicU16, Ordering};
    let Some(kvm) = kvm() else { return };
    let vm = Arc::new(kvm.create_vm().unwrap());
    let (mem, slot) = GuestMem::new(&vm, 0, 0, 256);
    let rounds: u16 = 600;
    mem.write(0x1000, &looping_guest(rounds));
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();

    // SAFETY: the slot is exactly what was registered and `mem` outlives the tracker.
    let mut t = unsafe { KvmDirtyTracker::new(Arc::clone(&vm), vec![slot], protect) }.unwrap();
    t.start().unwrap();
    let base = mem.addr;
    let word = move |page: u64, off: usize| -> u16 {
        // SAFETY: in bounds of the guest mapping, 2-byte aligned; the guest writes it
        // concurrently, so it is read atomically.
        let a =
            unsafe { &*((base + page as usize * PAGE_SIZE as usize + off) as *const AtomicU16) };
        a.load(Ordering::Relaxed)
    };
    let pages = 256u64;
    let mut dest = vec![[0u16; 2]; pages as usize];
    let copy = |dest: &mut Vec<[u16; 2]>, p: u64| {
        dest[p as usize] = [word(p, 0), word(p, 0xffe)];
    };
    // First pass.
    for p in 0..pages {
        copy(&mut dest, p);
    }

    let guest = std::thread::spawn(move || run_to_halt(&mut vcpu));
    let mut syncs = 0u32;
    let mut round = vec![0u64; bitmap_words(pages)];
    while !guest.is_finished() {
        round.fill(0);
        t.sync(0, &mut round).unwrap();
        // Some scanning work before the send, as a real source does: the guest keeps
        // writing, so pages dirtied here must not be lost by the clear below.
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_micros(50) {
            std::hint::spin_loop();
        }
        // Clear with one mask call, then "send".
        t.clear_mask(0, 0, &round).unwrap();
        for p in bits(&round) {
            copy(&mut dest, p);
        }
        syncs += 1;
    }
    assert!(guest.join().unwrap(), "the guest did not halt");
    round.fill(0);
    t.sync(0, &mut round).unwrap();
    for p in bits(&round) {
        copy(&mut dest, p);
    }
    t.stop().unwrap();
    eprintln!("{}: {syncs} syncs while the guest ran", t.name());
    for p in 0..pages {
        let src = [word(p, 0), word(p, 0xffe)];
        assert_eq!(
            dest[p as usize], src,
            "page {p:#x} is stale on the destination"
        );
        if (0x10..0x80).contains(&p) {
            assert_eq!(src, [rounds - 1; 2], "page {p:#x}");
        }
    }
}

#[test]
fn no_write_lost_against_a_running_guest_classic() {
    migrate_against_guest(ManualProtect::Off);
}

#[test]
fn no_write_lost_against_a_running_guest_manual_protect() {
    migrate_against_guest(ManualProtect::EnableIfSupported);
}

/// The VM's creator enabled manual protect with `KVM_DIRTY_LOG_INITIALLY_SET`: the first
/// sync reports every page; clearing them (as the first pass does) leaves the log clean
/// except for what the guest then writes.
#[test]
fn initially_set_reports_everything_until_cleared() {
    let Some(kvm) = kvm() else { return };
    let vm = Arc::new(kvm.create_vm().unwrap());
    let offered =
        vm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    let wanted = u64::from(
        kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            | kvm_bindings::KVM_DIRTY_LOG_INITIALLY_SET,
    );
    if offered < 0 || offered as u64 & wanted != wanted {
        eprintln!("SKIPPED: KVM_DIRTY_LOG_INITIALLY_SET is not offered ({offered:#x})");
        return;
    }
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = wanted;
    vm.enable_cap(&cap).unwrap();

    let (mem, slot) = GuestMem::new(&vm, 0, 0, 256);
    mem.write(0x1000, GUEST);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();

    let protect = ManualProtect::AlreadyEnabled {
        initially_set: true,
    };
    // SAFETY: the slot is exactly what was registered and `mem` outlives the tracker.
    let mut t = unsafe { KvmDirtyTracker::new(Arc::clone(&vm), vec![slot], protect) }.unwrap();
    assert!(t.manual_protect() && t.initially_set());
    t.start().unwrap();
    assert_eq!(sync_set(&mut t, 0), (0..256).collect());
    // First pass: clear in two unaligned pieces, as chunks of a send would.
    t.clear(0, 0, 100).unwrap();
    assert_eq!(sync_set(&mut t, 0), (100..256).collect());
    t.clear(0, 100, 156).unwrap();
    assert!(sync_set(&mut t, 0).is_empty());
    assert!(run_to_halt(&mut vcpu));
    assert_eq!(sync_set(&mut t, 0), [0x10, 0x23].into_iter().collect());
    t.stop().unwrap();
}
