//! vCPU state at boot: 64-bit long mode with identity-mapped page tables,
//! entering the boot stub with the zero page in RSI.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use super::{kvm_err, ArchError};

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub(super) const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// GDT: null, 64-bit code, data, TSS (the flat layout Linux expects).
const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];
const CODE_SELECTOR: u16 = 0x8;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    v: T,
    addr: u64,
) -> Result<(), ArchError> {
    mem.write_obj(v, GuestAddress(addr))
        .map_err(|source| ArchError::GuestWrite { addr, source })
}

/// A segment descriptor's fields, unpacked the way `kvm_sregs` wants them.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let flags = (entry >> 40) as u16;
    let g = (flags >> 15) & 1;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: g as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// The boot stub: `mov dx, BOOT_MARKER_PORT; mov al, 1; out dx, al;
/// mov rax, entry; jmp rax`. It marks "kernel entry" for the boot timer.
pub fn boot_stub(entry: u64) -> Vec<u8> {
    let mut code = vec![0x66, 0xba];
    code.extend_from_slice(&BOOT_MARKER_PORT.to_le_bytes());
    code.extend_from_slice(&[
        0xb0,
        crate::boot_marker::MARK_KERNEL_ENTRY,
        0xee,
        0x48,
        0xb8,
    ]);
    code.extend_from_slice(&entry.to_le_bytes());
    code.extend_from_slice(&[0xff, 0xe0]);
    code
}

/// Writes the GDT, an empty IDT, identity page tables and the boot stub.
pub fn write_boot_structures(mem: &GuestMemoryMmap, kernel_entry: u64) -> Result<(), ArchError> {
    for (i, e) in GDT.iter().enumerate() {
        write(mem, *e, GDT_ADDR + 8 * i as u64)?;
    }
    write(mem, 0u64, IDT_ADDR)?;
    write(mem, PDPTE_ADDR | 0x3, PML4_ADDR)?;
    write(mem, PDE_ADDR | 0x3, PDPTE_ADDR)?;
    for i in 0..512u64 {
        // 2 MiB pages: present, writable, page size.
        write(mem, (i << 21) | 0x83, PDE_ADDR + 8 * i)?;
    }
    mem.write_slice(&boot_stub(kernel_entry), GuestAddress(BOOT_STUB_ADDR))
        .map_err(|source| ArchError::GuestWrite {
            addr: BOOT_STUB_ADDR,
            source,
        })
}

pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), ArchError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let code = segment(GDT[1], CODE_SELECTOR);
    let data = segment(GDT[2], DATA_SELECTOR);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT[3], TSS_SELECTOR);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))
}

pub fn setup_regs(vcpu: &VcpuFd, is_boot_cpu: bool) -> Result<(), ArchError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: BOOT_STUB_ADDR,
        rsp: BOOT_STACK_ADDR,
        rbp: BOOT_STACK_ADDR,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    };
    // Secondary vCPUs wait for the kernel's INIT/SIPI; their registers are
    // set by the in-kernel LAPIC then.
    if is_boot_cpu {
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    }
    Ok(())
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), ArchError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))
}

pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), ArchError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| ArchError::Kvm {
        what: "building the boot MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if set != entries.len() {
        let index = entries[set].index;
        log::warn!("KVM refused boot MSR {index:#x}; continuing without it");
    }
    Ok(())
}

fn lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, f: impl FnOnce(u32) -> u32) {
    let mut b = [0u8; 4];
    for (i, v) in b.iter_mut().enumerate() {
        *v = regs[offset + i] as u8;
    }
    let v = f(u32::from_le_bytes(b)).to_le_bytes();
    for (i, v) in v.iter().enumerate() {
        regs[offset + i] = *v as std::os::raw::c_char;
    }
}

/// LINT0 delivers ExtINT (the PIC), LINT1 delivers NMI.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), ArchError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let mode = |mode: u32| move |v: u32| (v & !0x700) | (mode << 8);
    lapic_reg(&mut lapic.regs, APIC_LVT0, mode(APIC_MODE_EXTINT));
    lapic_reg(&mut lapic.regs, APIC_LVT1, mode(APIC_MODE_NMI));
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_unpack_to_flat_long_mode_segments() {
        let cs = segment(GDT[1], CODE_SELECTOR);
        assert_eq!(
            (cs.base, cs.limit, cs.l, cs.db, cs.present),
            (0, 0xffff_ffff, 1, 0, 1)
        );
        assert_eq!(cs.type_, 0xb);
        let ds = segment(GDT[2], DATA_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 0x3));
    }

    #[test]
    fn boot_stub_marks_then_jumps() {
        let code = boot_stub(0x0100_0000);
        assert_eq!(&code[..2], &[0x66, 0xba]);
        assert_eq!(u16::from_le_bytes([code[2], code[3]]), BOOT_MARKER_PORT);
        assert_eq!(code[6], 0xee);
        assert_eq!(
            u64::from_le_bytes(code[9..17].try_into().unwrap()),
            0x0100_0000
        );
        assert_eq!(&code[17..], &[0xff, 0xe0]);
    }
}
