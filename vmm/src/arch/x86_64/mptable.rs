//! Intel MultiProcessor Specification 1.4 tables. Without ACPI this is how
//! the guest kernel learns about its vCPUs, the IOAPIC and the IRQ routing.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, MAX_IRQ};
use super::ArchError;

/// APIC ids are one byte and the IOAPIC takes the id after the last vCPU.
pub const MAX_VCPUS: u8 = 254;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const ISA_BUS_ID: u8 = 0;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

fn entries(vcpus: u8) -> (Vec<u8>, u16) {
    let mut e = Vec::new();
    let mut count = 0u16;
    let ioapic_id = vcpus + 1;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        e.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        e.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        e.extend_from_slice(&((1u32 << 9) | 1).to_le_bytes()); // APIC, FPU
        e.extend_from_slice(&[0; 8]);
        count += 1;
    }
    e.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    e.extend_from_slice(b"ISA   ");
    count += 1;
    e.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    e.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..=MAX_IRQ as u8 {
        e.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0]);
        e.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 of every LAPIC is ExtINT (the PIC), LINT1 is NMI.
    e.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0]);
    e.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, 0]);
    e.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0]);
    e.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, 1]);
    count += 2;
    (e, count)
}

/// The whole table, floating pointer first, as it sits at `EBDA_START`.
pub fn build(vcpus: u8) -> Result<Vec<u8>, ArchError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(ArchError::TooManyVcpus(vcpus));
    }
    let table_addr = EBDA_START as u32 + FLOATING_POINTER_LEN as u32;
    let mut fp = Vec::with_capacity(FLOATING_POINTER_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 16 B, rev 1.4
    fp[10] = checksum(&fp);

    let (body, count) = entries(vcpus);
    let mut table = Vec::with_capacity(HEADER_LEN + body.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_le_bytes());
    table.extend_from_slice(&[4, 0]); // spec rev, checksum (filled below)
    table.extend_from_slice(b"THAW    ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&[0; 4]); // OEM table pointer
    table.extend_from_slice(&[0; 2]); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]);
    table.extend_from_slice(&body);
    table[7] = checksum(&table);

    fp.extend_from_slice(&table);
    Ok(fp)
}

pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), ArchError> {
    let bytes = build(vcpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|source| ArchError::GuestWrite {
            addr: EBDA_START,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts_are_valid() {
        let t = build(4).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        // 4 CPUs, bus, IOAPIC, 24 IRQs, 2 local interrupts.
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        // Only the first CPU is the bootstrap processor.
        assert_eq!(table[HEADER_LEN + 3], CPU_ENABLED | CPU_BOOTSTRAP);
        assert_eq!(table[HEADER_LEN + 20 + 3], CPU_ENABLED);
    }

    #[test]
    fn vcpu_count_is_bounded() {
        assert!(build(0).is_err());
        assert!(build(255).is_err());
        assert!(build(MAX_VCPUS).is_ok());
    }
}
