//! The Linux "zero page" (boot parameters), the command line and the e820
//! map, for the 64-bit boot protocol (no real-mode setup code).

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::layout::*;
use super::ArchError;

/// `boot_params` is a plain C struct of integers: any byte pattern is valid.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct BootParams(boot_params);
// SAFETY: boot_params is repr(C), made only of integers and arrays of them.
unsafe impl ByteValued for BootParams {}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// Guest RAM as (start, size) ranges, leaving the 32-bit MMIO hole free.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let below = mem_size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), below as usize)];
    if mem_size > MMIO_HOLE_START {
        ranges.push((
            GuestAddress(MMIO_HOLE_END),
            (mem_size - MMIO_HOLE_START) as usize,
        ));
    }
    ranges
}

/// Where an initramfs of `size` bytes goes: as high as possible in low RAM,
/// page aligned, so it never collides with the kernel.
pub fn initrd_address(mem: &GuestMemoryMmap, size: u64) -> Result<GuestAddress, ArchError> {
    let low_end = mem.last_addr().raw_value().min(MMIO_HOLE_START - 1) + 1;
    let limit = low_end;
    let start = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= HIMEM_START)
        .ok_or(ArchError::InitrdTooLarge { size, limit })?;
    Ok(GuestAddress(start))
}

pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &[u8]) -> Result<(), ArchError> {
    // The kernel wants a NUL-terminated string.
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(ArchError::CmdlineTooLong { len: cmdline.len() });
    }
    let mut buf = cmdline.to_vec();
    buf.push(0);
    mem.write_slice(&buf, GuestAddress(CMDLINE_ADDR))
        .map_err(|source| ArchError::GuestWrite {
            addr: CMDLINE_ADDR,
            source,
        })
}

pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
) -> Result<(), ArchError> {
    let mut params = BootParams::default();
    let hdr = &mut params.0.hdr;
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline_len as u32;
    hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr.raw_value() as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut entries = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, size) in ram_ranges(mem_size) {
        // The first range starts at 0: its low part is described above.
        let start = start.raw_value().max(HIMEM_START);
        let end = if start == HIMEM_START {
            size as u64
        } else {
            start + size as u64
        };
        if end > start {
            entries.push((start, end - start, E820_RAM));
        }
    }
    for (i, (addr, size, type_)) in entries.into_iter().enumerate() {
        params.0.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
        params.0.e820_entries = i as u8 + 1;
    }

    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|source| ArchError::GuestWrite {
            addr: ZERO_PAGE_ADDR,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_params(mem: &GuestMemoryMmap) -> boot_params {
        mem.read_obj::<BootParams>(GuestAddress(ZERO_PAGE_ADDR))
            .unwrap()
            .0
    }

    #[test]
    fn e820_covers_ram_and_skips_the_hole() {
        let size = MMIO_HOLE_START + (512 << 20);
        let mem = GuestMemoryMmap::<()>::from_ranges(&ram_ranges(size)).unwrap();
        write_zero_page(&mem, size, 10, None).unwrap();
        let p = read_params(&mem);
        let e: Vec<_> = p.e820_table[..p.e820_entries as usize]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(e[0], (0, EBDA_START, E820_RAM));
        assert_eq!(e[2], (HIMEM_START, MMIO_HOLE_START - HIMEM_START, E820_RAM));
        assert_eq!(e[3], (MMIO_HOLE_END, 512 << 20, E820_RAM));
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
    }

    #[test]
    fn small_guest_has_one_high_range() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&ram_ranges(64 << 20)).unwrap();
        write_zero_page(&mem, 64 << 20, 0, Some((GuestAddress(0x200_0000), 4096))).unwrap();
        let p = read_params(&mem);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].size }, (64 << 20) - HIMEM_START);
        assert_eq!({ p.hdr.ramdisk_image }, 0x200_0000);
    }

    #[test]
    fn initrd_goes_high_and_too_large_is_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&ram_ranges(64 << 20)).unwrap();
        let a = initrd_address(&mem, 10_000).unwrap();
        assert_eq!(a.raw_value() % 4096, 0);
        assert!(a.raw_value() + 10_000 <= 64 << 20);
        assert!(initrd_address(&mem, 64 << 20).is_err());
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&ram_ranges(16 << 20)).unwrap();
        assert!(write_cmdline(&mem, &vec![b'a'; CMDLINE_MAX_SIZE]).is_err());
        write_cmdline(&mem, b"console=ttyS0").unwrap();
    }
}
