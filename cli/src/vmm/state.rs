//! The VM's device state as one migratable section: every vCPU's registers.
//!
//! Format (little-endian):
//!
//! ```text
//! magic "FRYVMST\0" | version u32 | vcpus u32 | mem_size u64
//! per vCPU: chunks u32, then chunks of  tag u32 | len u32 | bytes
//! ```
//!
//! Chunks hold the raw KVM structures (`kvm_regs`, `kvm_sregs`, `kvm_xsave`, ...) of the same
//! kernel ABI on both ends. A restore parses and checks everything before it touches a vCPU.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use zerocopy::{FromBytes, IntoBytes};

use super::VmmError;

const MAGIC: &[u8; 8] = b"FRYVMST\0";
const VERSION: u32 = 1;

const TAG_REGS: u32 = 1;
const TAG_SREGS: u32 = 2;
const TAG_FPU: u32 = 3;
const TAG_XSAVE: u32 = 4;
const TAG_XCRS: u32 = 5;
const TAG_MSRS: u32 = 6;
const TAG_EVENTS: u32 = 7;
const TAG_DEBUGREGS: u32 = 8;

/// MSRs worth carrying for a 64-bit guest without a local APIC, when KVM lists them.
pub(crate) const WANTED_MSRS: &[u32] = &[
    0x10,        // IA32_TSC: the guest's TSC continues from where it was
    0x3b,        // IA32_TSC_ADJUST
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// Which optional state the kernel supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StateCaps {
    pub xsave: bool,
    pub xcrs: bool,
    pub events: bool,
    pub debugregs: bool,
}

/// One vCPU's saved state, parsed.
#[derive(Debug, Default)]
struct VcpuState {
    regs: Option<kvm_regs>,
    sregs: Option<kvm_sregs>,
    fpu: Option<kvm_fpu>,
    xsave: Option<Box<kvm_xsave>>,
    xcrs: Option<kvm_xcrs>,
    msrs: Vec<kvm_msr_entry>,
    events: Option<kvm_vcpu_events>,
    debugregs: Option<kvm_debugregs>,
}

fn chunk(out: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Kvm { what, source: e }
}

/// `kvm_fpu` has implicit padding, so it is written field by field.
fn fpu_bytes(f: &kvm_fpu) -> Vec<u8> {
    let mut b = Vec::with_capacity(416);
    for r in &f.fpr {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.fcw.to_le_bytes());
    b.extend_from_slice(&f.fsw.to_le_bytes());
    b.push(f.ftwx);
    b.push(0);
    b.extend_from_slice(&f.last_opcode.to_le_bytes());
    b.extend_from_slice(&f.last_ip.to_le_bytes());
    b.extend_from_slice(&f.last_dp.to_le_bytes());
    for r in &f.xmm {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.mxcsr.to_le_bytes());
    b
}

fn fpu_from(b: &[u8]) -> Option<kvm_fpu> {
    if b.len() != 8 * 16 + 2 + 2 + 2 + 2 + 8 + 8 + 16 * 16 + 4 {
        return None;
    }
    let mut f = kvm_fpu::default();
    let mut o = 0;
    let mut take = |n: usize| {
        let s = &b[o..o + n];
        o += n;
        s
    };
    for r in f.fpr.iter_mut() {
        r.copy_from_slice(take(16));
    }
    f.fcw = u16::from_le_bytes(take(2).try_into().ok()?);
    f.fsw = u16::from_le_bytes(take(2).try_into().ok()?);
    f.ftwx = take(2)[0];
    f.last_opcode = u16::from_le_bytes(take(2).try_into().ok()?);
    f.last_ip = u64::from_le_bytes(take(8).try_into().ok()?);
    f.last_dp = u64::from_le_bytes(take(8).try_into().ok()?);
    for r in f.xmm.iter_mut() {
        r.copy_from_slice(take(16));
    }
    f.mxcsr = u32::from_le_bytes(take(4).try_into().ok()?);
    Some(f)
}

/// Appends vCPU `fd`'s state to `out`.
pub(crate) fn save_vcpu(
    fd: &VcpuFd,
    caps: StateCaps,
    msr_list: &[u32],
    out: &mut Vec<u8>,
) -> Result<(), VmmError> {
    let mut body = Vec::new();
    let mut n = 0u32;
    let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    chunk(&mut body, TAG_REGS, regs.as_bytes());
    n += 1;
    let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    chunk(&mut body, TAG_SREGS, sregs.as_bytes());
    n += 1;
    let fpu = fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
    chunk(&mut body, TAG_FPU, &fpu_bytes(&fpu));
    n += 1;
    if caps.xsave {
        let x = fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
        chunk(&mut body, TAG_XSAVE, x.as_bytes());
        n += 1;
    }
    if caps.xcrs {
        let x = fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
        chunk(&mut body, TAG_XCRS, x.as_bytes());
        n += 1;
    }
    if !msr_list.is_empty() {
        let entries: Vec<kvm_msr_entry> = msr_list
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VmmError::MsrCount {
            wanted: entries.len(),
            got: 0,
        })?;
        let got = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        if got != entries.len() {
            return Err(VmmError::MsrCount {
                wanted: entries.len(),
                got,
            });
        }
        let mut bytes = Vec::with_capacity(got * 16);
        for e in msrs.as_slice() {
            bytes.extend_from_slice(e.as_bytes());
        }
        chunk(&mut body, TAG_MSRS, &bytes);
        n += 1;
    }
    if caps.events {
        let e = fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        chunk(&mut body, TAG_EVENTS, e.as_bytes());
        n += 1;
    }
    if caps.debugregs {
        let d = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        chunk(&mut body, TAG_DEBUGREGS, d.as_bytes());
        n += 1;
    }
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// Writes the section header.
pub(crate) fn header(out: &mut Vec<u8>, vcpus: u32, mem_size: u64) {
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&vcpus.to_le_bytes());
    out.extend_from_slice(&mem_size.to_le_bytes());
}

/// A parsed state section, ready to apply.
#[derive(Debug)]
pub(crate) struct Parsed {
    vcpus: Vec<VcpuState>,
}

struct Reader<'a> {
    buf: &'a [u8],
    off: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], VmmError> {
        let end = self.off.checked_add(n).filter(|e| *e <= self.buf.len());
        let end = end.ok_or(VmmError::BadState {
            offset: self.off,
            why: "the section ends early",
        })?;
        let s = &self.buf[self.off..end];
        self.off = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, VmmError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, VmmError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
}

fn read_struct<T: FromBytes>(bytes: &[u8], offset: usize) -> Result<T, VmmError> {
    T::read_from_bytes(bytes).map_err(|_| VmmError::BadState {
        offset,
        why: "a register block has the wrong size for this kernel",
    })
}

/// Parses and checks a section against this VM's shape.
pub(crate) fn parse(buf: &[u8], vcpus: u32, mem_size: u64) -> Result<Parsed, VmmError> {
    let mut r = Reader { buf, off: 0 };
    if r.take(8)? != MAGIC {
        return Err(VmmError::BadState {
            offset: 0,
            why: "the section does not start with the VM state magic",
        });
    }
    let version = r.u32()?;
    if version != VERSION {
        return Err(VmmError::BadState {
            offset: 8,
            why: "the section has an unknown version",
        });
    }
    let n = r.u32()?;
    let mem = r.u64()?;
    if n != vcpus || mem != mem_size {
        return Err(VmmError::ShapeMismatch {
            vcpus: n,
            mem_size: mem,
            our_vcpus: vcpus,
            our_mem_size: mem_size,
        });
    }
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let chunks = r.u32()?;
        let mut s = VcpuState::default();
        for _ in 0..chunks {
            let tag = r.u32()?;
            let len = r.u32()? as usize;
            let at = r.off;
            let body = r.take(len)?;
            match tag {
                TAG_REGS => s.regs = Some(read_struct(body, at)?),
                TAG_SREGS => s.sregs = Some(read_struct(body, at)?),
                TAG_FPU => {
                    s.fpu = Some(fpu_from(body).ok_or(VmmError::BadState {
                        offset: at,
                        why: "the FPU block has the wrong size",
                    })?)
                }
                TAG_XSAVE => {
                    let x: kvm_xsave = read_struct(body, at)?;
                    s.xsave = Some(Box::new(x));
                }
                TAG_XCRS => s.xcrs = Some(read_struct(body, at)?),
                TAG_MSRS => {
                    if len % 16 != 0 {
                        return Err(VmmError::BadState {
                            offset: at,
                            why: "the MSR block is not a whole number of entries",
                        });
                    }
                    for (i, e) in body.chunks_exact(16).enumerate() {
                        s.msrs.push(read_struct(e, at + i * 16)?);
                    }
                }
                TAG_EVENTS => s.events = Some(read_struct(body, at)?),
                TAG_DEBUGREGS => s.debugregs = Some(read_struct(body, at)?),
                _ => {
                    return Err(VmmError::BadState {
                        offset: at,
                        why: "the section holds an unknown register block",
                    })
                }
            }
        }
        if s.regs.is_none() || s.sregs.is_none() {
            return Err(VmmError::BadState {
                offset: r.off,
                why: "a vCPU lacks its general or segment registers",
            });
        }
        out.push(s);
    }
    if r.off != buf.len() {
        return Err(VmmError::BadState {
            offset: r.off,
            why: "trailing bytes after the last vCPU",
        });
    }
    Ok(Parsed { vcpus: out })
}

impl Parsed {
    /// Applies vCPU `i`'s state to `fd`.
    pub(crate) fn apply(&self, i: usize, fd: &VcpuFd) -> Result<(), VmmError> {
        let Some(s) = self.vcpus.get(i) else {
            return Ok(());
        };
        if let Some(sregs) = &s.sregs {
            fd.set_sregs(sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        }
        if let Some(fpu) = &s.fpu {
            fd.set_fpu(fpu).map_err(kvm_err("KVM_SET_FPU"))?;
        }
        if let Some(xcrs) = &s.xcrs {
            fd.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        if let Some(x) = &s.xsave {
            // SAFETY: `x` is a full `kvm_xsave` saved by KVM_GET_XSAVE on the same kernel
            // ABI; KVM validates its contents and the legacy ioctl reads exactly
            // `size_of::<kvm_xsave>()` bytes.
            unsafe { fd.set_xsave(x) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        }
        if !s.msrs.is_empty() {
            let msrs = Msrs::from_entries(&s.msrs).map_err(|_| VmmError::MsrCount {
                wanted: s.msrs.len(),
                got: 0,
            })?;
            let set = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
            if set != s.msrs.len() {
                return Err(VmmError::MsrCount {
                    wanted: s.msrs.len(),
                    got: set,
                });
            }
        }
        if let Some(ev) = &s.events {
            fd.set_vcpu_events(ev)
                .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        }
        if let Some(d) = &s.debugregs {
            fd.set_debug_regs(d).map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        }
        if let Some(regs) = &s.regs {
            fd.set_regs(regs).map_err(kvm_err("KVM_SET_REGS"))?;
        }
        Ok(())
    }
}
