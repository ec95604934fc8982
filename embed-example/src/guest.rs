//! The example guest: its memory map, its boot structures and its program.
//!
//! Guest RAM is two vm-memory regions, as a VMM with a PCI hole lays it out: *low* from 0 and
//! *high* from 4 GiB. The vCPU starts directly in 64-bit ring 3 with paging on (this is how
//! the project's demo VMM runs too: on a KVM nested through PVM, guest ring 0 is very slow and
//! ring 3 runs natively), so the host writes everything the CPU needs first:
//!
//! ```text
//! low   0x0000_1000  GDT            0x2000 TSS       0x3000 IDT (empty: a fault is a triple fault)
//!       0x0000_8000  PML4           0x9000 PDPT      0xa000 PD of low, 0xb000 PD of high (2 MiB pages)
//!       0x0010_0000  the program (23 bytes)
//!       0x0020_0000  the device ring: 16 pages only the VMM writes (see `Device`)
//!       0x0021_0000  the device's status page, which the VMM writes when the VM pauses
//! high  0x1_0000_0000..  the buffer the program writes, one page after the other, forever
//! ```
//!
//! The program, hand-assembled:
//!
//! ```text
//! again: mov  rdi, rbx          ; 48 89 df    cursor = start of the buffer
//! next:  inc  rax               ; 48 ff c0    counter += 1
//!        mov  [rdi], rax        ; 48 89 07    store it in the cursor's page
//!        add  rdi, 4096         ; 48 81 c7 00 10 00 00
//!        cmp  rdi, rcx          ; 48 39 cf    end of the buffer?
//!        jb   next              ; 72 ee
//!        jmp  again             ; eb e9
//! ```
//!
//! `rbx` and `rcx` (buffer start and end) and `rax` (the counter) are set by the VMM with
//! `KVM_SET_REGS`. The program never exits to the VMM: it only stops when the VMM kicks it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::ExampleError;

/// The program (see the module docs).
pub const PROGRAM: [u8; 23] = [
    0x48, 0x89, 0xdf, // mov rdi, rbx
    0x48, 0xff, 0xc0, // inc rax
    0x48, 0x89, 0x07, // mov [rdi], rax
    0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 4096
    0x48, 0x39, 0xcf, // cmp rdi, rcx
    0x72, 0xee, // jb next
    0xeb, 0xe9, // jmp again
];

/// Guest address of the low region.
pub const LOW_BASE: u64 = 0;
/// Guest address of the high region (above a 4 GiB PCI hole... of a machine with no PCI).
pub const HIGH_BASE: u64 = 4 << 30;
/// GDT.
pub const GDT_GPA: u64 = 0x1000;
/// TSS.
pub const TSS_GPA: u64 = 0x2000;
/// IDT (empty).
pub const IDT_GPA: u64 = 0x3000;
/// PML4.
pub const PML4_GPA: u64 = 0x8000;
/// PDPT.
pub const PDPT_GPA: u64 = 0x9000;
/// Page directory mapping the low region.
pub const PD_LOW_GPA: u64 = 0xa000;
/// Page directory mapping the high region.
pub const PD_HIGH_GPA: u64 = 0xb000;
/// The program's load address and entry point.
pub const CODE_GPA: u64 = 0x10_0000;
/// The device ring: pages only the VMM writes.
pub const DEVICE_GPA: u64 = 0x20_0000;
/// Pages in the device ring.
pub const DEVICE_PAGES: u64 = 16;
/// The device's status page, right after the ring.
pub const STATUS_GPA: u64 = DEVICE_GPA + DEVICE_PAGES * 4096;

/// User data selector, RPL 3.
pub const SEL_USER_DATA: u16 = 0x18 | 3;
/// User 64-bit code selector, RPL 3.
pub const SEL_USER_CODE: u16 = 0x20 | 3;
/// TSS selector.
pub const SEL_TSS: u16 = 0x28;

const MIB: u64 = 1 << 20;
const TWO_MIB: u64 = 2 * MIB;

/// The guest's shape: the sizes of its two regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Size of the low region, from guest address 0: 4 MiB to 1 GiB, a multiple of 2 MiB.
    pub low: u64,
    /// Size of the high region, from 4 GiB: 2 MiB to 1 GiB, a multiple of 2 MiB. The
    /// program writes all of it.
    pub high: u64,
}

impl Shape {
    /// Checks the sizes.
    pub fn check(&self) -> Result<(), ExampleError> {
        let ok = |len: u64, min: u64| (min..=1 << 30).contains(&len) && len % TWO_MIB == 0;
        if ok(self.low, 4 * MIB) && ok(self.high, TWO_MIB) {
            Ok(())
        } else {
            Err(ExampleError::Shape(*self))
        }
    }

    /// Total guest RAM in bytes.
    pub fn total(&self) -> u64 {
        self.low + self.high
    }

    /// The regions as vm-memory ranges.
    pub fn ranges(&self) -> [(GuestAddress, usize); 2] {
        [
            (GuestAddress(LOW_BASE), self.low as usize),
            (GuestAddress(HIGH_BASE), self.high as usize),
        ]
    }

    /// Fresh, zeroed guest memory of this shape.
    pub fn memory(&self) -> Result<GuestMemoryMmap, ExampleError> {
        self.check()?;
        Ok(GuestMemoryMmap::from_ranges(&self.ranges())?)
    }
}

/// Writes page tables, GDT, TSS and the program into fresh guest memory.
pub fn write_boot(memory: &GuestMemoryMmap, shape: &Shape) -> Result<(), ExampleError> {
    const P: u64 = 1;
    const RW: u64 = 2;
    const US: u64 = 4;
    const ACCESSED: u64 = 0x20;
    const DIRTY: u64 = 0x40;
    const PS: u64 = 0x80;
    // Accessed and dirty are set already, so the CPU never writes the tables itself.
    let table = P | RW | US | ACCESSED;
    let put = |gpa: u64, v: u64| memory.write_obj(v, GuestAddress(gpa));
    put(PML4_GPA, PDPT_GPA | table)?;
    put(PDPT_GPA + 8 * (LOW_BASE >> 30), PD_LOW_GPA | table)?;
    put(PDPT_GPA + 8 * (HIGH_BASE >> 30), PD_HIGH_GPA | table)?;
    for (pd, base, len) in [
        (PD_LOW_GPA, LOW_BASE, shape.low),
        (PD_HIGH_GPA, HIGH_BASE, shape.high),
    ] {
        for i in 0..len / TWO_MIB {
            put(pd + 8 * i, (base + i * TWO_MIB) | table | DIRTY | PS)?;
        }
    }
    // GDT: null, kernel code and data, user data, user code (64-bit), TSS (two entries).
    let tss = 0x67 | ((TSS_GPA & 0xff_ffff) << 16) | (0x89 << 40) | ((TSS_GPA >> 24) << 56);
    let gdt: [u64; 7] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
        tss,
        TSS_GPA >> 32,
    ];
    for (i, e) in gdt.iter().enumerate() {
        put(GDT_GPA + 8 * i as u64, *e)?;
    }
    // TSS: the I/O map base past its limit (no I/O bitmap).
    memory.write_obj(104u16, GuestAddress(TSS_GPA + 0x66))?;
    memory.write_slice(&PROGRAM, GuestAddress(CODE_GPA))?;
    Ok(())
}

/// The registers of the program that a migration carries: where it is and what it counts.
/// The segment and paging state is the same on both sides by construction ([`write_boot`]
/// and `ExampleVm`'s system registers) and so not carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegs {
    /// Instruction pointer.
    pub rip: u64,
    /// Flags.
    pub rflags: u64,
    /// The counter.
    pub rax: u64,
    /// Buffer start.
    pub rbx: u64,
    /// Buffer end.
    pub rcx: u64,
    /// Cursor.
    pub rdi: u64,
}

impl GuestRegs {
    const LEN: usize = 6 * 8;

    /// The registers at the entry point, for a guest of `shape`.
    pub fn at_entry(shape: &Shape) -> GuestRegs {
        GuestRegs {
            rip: CODE_GPA,
            rflags: 0x2,
            rax: 0,
            rbx: HIGH_BASE,
            rcx: HIGH_BASE + shape.high,
            rdi: HIGH_BASE,
        }
    }

    /// As bytes, for a device section.
    pub fn to_bytes(&self) -> Vec<u8> {
        [
            self.rip,
            self.rflags,
            self.rax,
            self.rbx,
            self.rcx,
            self.rdi,
        ]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
    }

    /// From [`to_bytes`](Self::to_bytes)'s bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<GuestRegs, ExampleError> {
        if bytes.len() != Self::LEN {
            return Err(ExampleError::BadState { len: bytes.len() });
        }
        let mut v = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()));
        let mut next = || v.next().unwrap_or_default();
        Ok(GuestRegs {
            rip: next(),
            rflags: next(),
            rax: next(),
            rbx: next(),
            rcx: next(),
            rdi: next(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn the_program_branches_where_it_should() {
        // jb at offset 19 jumps back to `next` (offset 3), jmp at 21 to `again` (offset 0).
        assert_eq!(21 + i64::from(PROGRAM[20] as i8), 3);
        assert_eq!(23 + i64::from(PROGRAM[22] as i8), 0);
    }

    #[test]
    fn registers_round_trip_and_shapes_are_checked() {
        let shape = Shape {
            low: 4 << 20,
            high: 2 << 20,
        };
        let r = GuestRegs {
            rax: 77,
            ..GuestRegs::at_entry(&shape)
        };
        assert_eq!(GuestRegs::from_bytes(&r.to_bytes()).unwrap(), r);
        assert!(GuestRegs::from_bytes(&[0; 47]).is_err());
        let memory = shape.memory().unwrap();
        assert_eq!(memory.num_regions(), 2);
        write_boot(&memory, &shape).unwrap();
        let pde: u64 = memory.read_obj(GuestAddress(PD_HIGH_GPA)).unwrap();
        assert_eq!(pde & !0xfff, HIGH_BASE);
        assert!(Shape {
            low: 3 << 20,
            high: 2 << 20
        }
        .check()
        .is_err());
        assert!(Shape {
            low: 4 << 20,
            high: 2 << 30
        }
        .check()
        .is_err());
    }
}
