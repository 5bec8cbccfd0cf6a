//! Where things live in guest physical memory. The low-memory layout follows
//! the one most micro-VMMs use, so kernels and tools find what they expect.

/// GDT and IDT used for the 64-bit entry.
pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
/// Linux boot parameters ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// A few instructions the vCPU runs before the kernel: they write the
/// kernel-entry boot marker, then jump to the kernel's 64-bit entry.
pub const BOOT_STUB_ADDR: u64 = 0x8000;
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Identity page tables for the first GiB (2 MiB pages).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPTE_ADDR: u64 = 0xa000;
pub const PDE_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area; the MP table goes there.
pub const EBDA_START: u64 = 0x9fc00;
/// The kernel is loaded at 1 MiB and above.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole: device windows, IOAPIC and LAPIC live here.
pub const MMIO_HOLE_START: u64 = 0xd000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// KVM needs these two pages for real-mode emulation on Intel.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;

/// thaw's boot marker: a guest write here (MMIO, from the guest's init
/// through /dev/mem) or to `BOOT_MARKER_PORT` (from the boot stub or a
/// kernel) makes the VMM record the time. The written byte says which mark.
pub const BOOT_MARKER_MMIO: u64 = MMIO_HOLE_START;
pub const BOOT_MARKER_PORT: u16 = 0x511;
/// virtio-mmio device windows follow the marker page, one 4 KiB slot each.
pub const VIRTIO_MMIO_START: u64 = MMIO_HOLE_START + 0x1000;
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// Legacy IRQs 0-4 are the timer, keyboard, cascade, COM2 and COM1.
pub const SERIAL_IRQ: u32 = 4;
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// The IOAPIC has 24 pins.
pub const MAX_IRQ: u32 = 23;
