//! The demo guest's physical memory layout, the mailbox format, and the boot structures
//! (page tables, GDT, TSS) the host writes before the first run.
//!
//! Everything here mirrors `cli/guest/mailbox.h`; the guest reads its configuration from the
//! mailbox, so the host is the single source of the layout.
//!
//! ```text
//! 0x0000_1000  mailbox (control page)
//! 0x0000_2000  GDT        0x3000 TSS        0x4000 IDT (empty: any fault is a triple fault)
//! 0x0000_7000  page directory for the doorbell (an MMIO address at 511 GiB)
//! 0x0000_8000  PML4       0x9000 PDPT       0xa000.. one page directory per GiB (2 MiB pages)
//! 0x0010_0000  guest code (flat binary, up to 1 MiB)
//! 0x0020_0000  vCPU stacks, 64 KiB each
//! 0x0040_0000  version table: one u32 per workload page
//! 2 MiB-aligned after it, to the end of RAM: workload pages
//! ```

use ferry_host::memory::{MappedMemory, MemoryError};

/// Guest physical address of the mailbox page.
pub const MAILBOX_GPA: u64 = 0x1000;
/// Mailbox magic ("FRRYILBX" little-endian).
pub const MAILBOX_MAGIC: u64 = 0x5842_4c49_5952_5246;
/// Mailbox ABI version.
pub const MAILBOX_ABI: u64 = 1;
/// Offset of vCPU 0's status block inside the mailbox page.
pub const STATUS_OFFSET: u64 = 512;
/// Size of one vCPU status block.
pub const STATUS_STRIDE: u64 = 128;
/// Most vCPUs the mailbox has room for.
pub const MAX_VCPUS: u32 = 16;

/// Mailbox field offsets (host-written configuration and commands).
pub mod mb {
    /// Magic.
    pub const MAGIC: u64 = 0;
    /// ABI version.
    pub const ABI: u64 = 8;
    /// Workload seed.
    pub const SEED: u64 = 16;
    /// Guest TSC frequency in Hz.
    pub const TSC_HZ: u64 = 24;
    /// Dirty rate, bytes per second, all vCPUs together.
    pub const DIRTY_RATE: u64 = 32;
    /// vCPU count.
    pub const NR_VCPUS: u64 = 40;
    /// First workload page.
    pub const WORK_GPA: u64 = 48;
    /// Number of workload pages.
    pub const WORK_PAGES: u64 = 56;
    /// Version table.
    pub const VTAB_GPA: u64 = 64;
    /// Verify command generation.
    pub const VERIFY_CMD: u64 = 72;
    /// Skew added to the guest's TSC reads (test hook for clock jumps).
    pub const CLOCK_SKEW: u64 = 80;
    /// Doorbell address (0: the guest spins instead of sleeping).
    pub const DOORBELL_GPA: u64 = 88;
}

/// vCPU status block field offsets (guest-written).
pub mod st {
    /// Phase (see `Phase`).
    pub const PHASE: u64 = 0;
    /// Heartbeat counter.
    pub const HEARTBEAT: u64 = 8;
    /// Pages filled.
    pub const PAGES_FILLED: u64 = 16;
    /// Pages dirtied after the fill.
    pub const PAGES_DIRTIED: u64 = 24;
    /// Last verify generation answered.
    pub const VERIFY_GEN: u64 = 32;
    /// Pages checked by the last verify.
    pub const VERIFY_CHECKED: u64 = 40;
    /// Mismatching pages found by the last verify.
    pub const VERIFY_MISMATCHES: u64 = 48;
    /// First mismatching workload page index, or `u64::MAX`.
    pub const FIRST_MISMATCH: u64 = 56;
    /// Last TSC read.
    pub const LAST_TSC: u64 = 64;
    /// Dirty rate the pacing uses.
    pub const RATE_SEEN: u64 = 72;
    /// First page of the slice.
    pub const SLICE_LO: u64 = 80;
    /// One past the last page of the slice.
    pub const SLICE_HI: u64 = 88;
}

/// GDT.
pub const GDT_GPA: u64 = 0x2000;
/// TSS.
pub const TSS_GPA: u64 = 0x3000;
/// IDT (empty).
pub const IDT_GPA: u64 = 0x4000;
/// PML4.
pub const PML4_GPA: u64 = 0x8000;
/// PDPT.
pub const PDPT_GPA: u64 = 0x9000;
/// First page directory.
pub const PD_GPA: u64 = 0xa000;
/// Page directory mapping the doorbell.
pub const DOORBELL_PD_GPA: u64 = 0x7000;
/// The doorbell: a guest physical address outside every memory slot (511 GiB), mapped for
/// ring 3. A guest write there is a `KVM_EXIT_MMIO` whose value is a number of TSC ticks
/// to sleep.
pub const DOORBELL_GPA: u64 = 511 << 30;
/// Guest code load address and entry point.
pub const CODE_GPA: u64 = 0x10_0000;
/// Largest guest image.
pub const CODE_MAX: u64 = 0x10_0000;
/// Base of the vCPU stacks.
pub const STACKS_GPA: u64 = 0x20_0000;
/// Stack size per vCPU.
pub const STACK_SIZE: u64 = 0x1_0000;
/// Version table.
pub const VTAB_GPA: u64 = 0x40_0000;
/// Largest guest RAM the page tables cover (the page directories must fit below the code).
pub const MAX_MEM: u64 = 64 << 30;
/// Smallest guest RAM.
pub const MIN_MEM: u64 = 8 << 20;

/// GDT selectors.
pub const SEL_KERNEL_CODE: u16 = 0x08;
/// Kernel data.
pub const SEL_KERNEL_DATA: u16 = 0x10;
/// User data, RPL 3.
pub const SEL_USER_DATA: u16 = 0x18 | 3;
/// User 64-bit code, RPL 3.
pub const SEL_USER_CODE: u16 = 0x20 | 3;
/// TSS.
pub const SEL_TSS: u16 = 0x28;

const TWO_MIB: u64 = 2 << 20;

// The fixed areas must not overlap: page directories below the code, stacks below the
// version table, every vCPU's status block inside the mailbox page.
const _: () = assert!(PD_GPA + (MAX_MEM >> 30) * 0x1000 <= CODE_GPA);
const _: () = assert!(STACKS_GPA + MAX_VCPUS as u64 * STACK_SIZE <= VTAB_GPA);
const _: () = assert!(DOORBELL_GPA >= MAX_MEM && DOORBELL_GPA >> 30 < 512);
const _: () = assert!(STATUS_OFFSET + MAX_VCPUS as u64 * STATUS_STRIDE <= 4096);

/// Where the workload lives for a given RAM size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Guest RAM size.
    pub mem_size: u64,
    /// First workload page.
    pub work_gpa: u64,
    /// Workload pages.
    pub work_pages: u64,
}

impl Layout {
    /// Computes the layout for `mem_size` bytes of RAM, or `None` when it is too small,
    /// too large or not 2 MiB aligned.
    pub fn new(mem_size: u64) -> Option<Self> {
        if !(MIN_MEM..=MAX_MEM).contains(&mem_size) || mem_size % TWO_MIB != 0 {
            return None;
        }
        // Version table: 4 bytes per page of everything after it (an upper bound).
        let vtab_bytes = (mem_size - VTAB_GPA) / 4096 * 4;
        let work_gpa = (VTAB_GPA + vtab_bytes).div_ceil(TWO_MIB) * TWO_MIB;
        if work_gpa >= mem_size {
            return None;
        }
        Some(Self {
            mem_size,
            work_gpa,
            work_pages: (mem_size - work_gpa) / 4096,
        })
    }

    /// Guest physical address of workload page `index`.
    pub fn page_gpa(&self, index: u64) -> Option<u64> {
        (index < self.work_pages).then(|| self.work_gpa + index * 4096)
    }
}

/// Top of vCPU `index`'s stack.
pub fn stack_top(index: u32) -> u64 {
    STACKS_GPA + (u64::from(index) + 1) * STACK_SIZE
}

/// Writes page tables (identity map of all RAM with 2 MiB user pages), GDT, TSS, the guest
/// image and the mailbox configuration into fresh guest memory.
pub fn write_boot(
    mem: &MappedMemory,
    layout: &Layout,
    image: &[u8],
    config: &MailboxConfig,
) -> Result<(), MemoryError> {
    const P_RW_US: u64 = 0b111;
    const PS: u64 = 1 << 7;
    mem.write_u64(PML4_GPA, PDPT_GPA | P_RW_US)?;
    let gibs = layout.mem_size.div_ceil(1 << 30);
    for g in 0..gibs {
        let pd = PD_GPA + g * 0x1000;
        mem.write_u64(PDPT_GPA + g * 8, pd | P_RW_US)?;
        for e in 0..512u64 {
            let addr = (g << 30) + (e << 21);
            if addr >= layout.mem_size {
                break;
            }
            mem.write_u64(pd + e * 8, addr | P_RW_US | PS)?;
        }
    }
    // The doorbell's 2 MiB page, outside RAM, so writes to it exit as MMIO.
    mem.write_u64(
        PDPT_GPA + (DOORBELL_GPA >> 30) * 8,
        DOORBELL_PD_GPA | P_RW_US,
    )?;
    mem.write_u64(DOORBELL_PD_GPA, DOORBELL_GPA | P_RW_US | PS)?;
    // GDT: null, kernel code/data, user data, user code (64-bit), TSS (16 bytes).
    let tss_lo = 0x67 | ((TSS_GPA & 0xff_ffff) << 16) | (0x89u64 << 40) | ((TSS_GPA >> 24) << 56);
    let gdt: [u64; 7] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
        tss_lo,
        TSS_GPA >> 32,
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_u64(GDT_GPA + i as u64 * 8, *e)?;
    }
    // TSS: I/O map base past the limit (no I/O bitmap).
    mem.write(TSS_GPA + 0x66, &104u16.to_le_bytes())?;
    mem.write(CODE_GPA, image)?;
    config.write(mem, layout)
}

/// Host-written mailbox configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxConfig {
    /// Workload seed.
    pub seed: u64,
    /// Guest TSC frequency, Hz.
    pub tsc_hz: u64,
    /// Dirty rate, bytes per second.
    pub dirty_rate: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Let the guest sleep through the doorbell instead of spinning.
    pub doorbell: bool,
}

impl MailboxConfig {
    fn write(&self, mem: &MappedMemory, layout: &Layout) -> Result<(), MemoryError> {
        let f = |off: u64, v: u64| mem.write_u64(MAILBOX_GPA + off, v);
        f(mb::ABI, MAILBOX_ABI)?;
        f(mb::SEED, self.seed)?;
        f(mb::TSC_HZ, self.tsc_hz)?;
        f(mb::DIRTY_RATE, self.dirty_rate)?;
        f(mb::NR_VCPUS, u64::from(self.vcpus))?;
        f(mb::WORK_GPA, layout.work_gpa)?;
        f(mb::WORK_PAGES, layout.work_pages)?;
        f(mb::VTAB_GPA, VTAB_GPA)?;
        f(mb::VERIFY_CMD, 0)?;
        f(mb::CLOCK_SKEW, 0)?;
        f(
            mb::DOORBELL_GPA,
            if self.doorbell { DOORBELL_GPA } else { 0 },
        )?;
        f(mb::MAGIC, MAILBOX_MAGIC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits() {
        assert!(Layout::new(4 << 20).is_none());
        assert!(Layout::new((64 << 20) + 4096).is_none());
        let l = Layout::new(64 << 20).unwrap();
        assert_eq!(l.work_gpa % TWO_MIB, 0);
        assert!(l.work_gpa >= VTAB_GPA + l.work_pages * 4);
        assert_eq!(l.work_gpa + l.work_pages * 4096, 64 << 20);
        let big = Layout::new(MAX_MEM).unwrap();
        assert!(big.work_gpa >= VTAB_GPA + big.work_pages * 4);
    }
}
