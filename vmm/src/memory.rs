//! Guest RAM in a snapshot: its layout ([`MemoryRegionState`]), dumped to a
//! sparse file, and that file mapped copy-on-write (`MAP_PRIVATE`) by every
//! VM restored from it, so they share its pages in the host page cache.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

const PAGE: usize = 4096;

/// Where one region of guest RAM lives in the memory file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryRegionState {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("memory file {path} is {len} bytes, the state expects more")]
    FileTooShort { path: PathBuf, len: u64 },
    #[error("mapping guest memory: {0}")]
    Map(String),
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> MemoryError + 'a {
    move |source| MemoryError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes guest RAM to `path` (atomically, owner-only), skipping all-zero
/// pages so the file stays sparse (a fresh guest is mostly zeros). Nothing
/// may write guest memory meanwhile: the vCPUs and devices are paused.
/// Returns the layout and the bytes actually written.
pub fn save(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<(Vec<MemoryRegionState>, u64), MemoryError> {
    let tmp = path.with_extension("tmp");
    let file = thaw_snapshots::private::create_file(&tmp).map_err(io_err("creating", &tmp))?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let size = region.len();
        // SAFETY: the region is mapped for `size` bytes for the life of the
        // VM, and the vCPUs and devices are paused, so nothing writes it now.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), size as usize) };
        for (i, page) in bytes.chunks(PAGE).enumerate() {
            if page.iter().all(|b| *b == 0) {
                continue;
            }
            file.write_all_at(page, offset + (i * PAGE) as u64)
                .map_err(io_err("writing", &tmp))?;
            written += page.len() as u64;
        }
        regions.push(MemoryRegionState {
            guest_addr: region.start_addr().raw_value(),
            size,
            file_offset: offset,
        });
        offset += size;
    }
    file.set_len(offset).map_err(io_err("sizing", &tmp))?;
    file.sync_all().map_err(io_err("syncing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("renaming", &tmp))?;
    Ok((regions, written))
}

/// Maps the memory file copy-on-write: pages are shared with every other
/// VM restored from it until the guest writes them.
pub fn restore(path: &Path, regions: &[MemoryRegionState]) -> Result<GuestMemoryMmap, MemoryError> {
    let file = File::open(path).map_err(io_err("opening", path))?;
    let len = file.metadata().map_err(io_err("reading", path))?.len();
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        if r.file_offset
            .checked_add(r.size)
            .is_none_or(|end| end > len)
        {
            return Err(MemoryError::FileTooShort {
                path: path.to_path_buf(),
                len,
            });
        }
        let file = file.try_clone().map_err(io_err("duplicating", path))?;
        let region = MmapRegionBuilder::new(r.size as usize)
            .with_file_offset(FileOffset::new(file, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
            .ok_or_else(|| MemoryError::Map("a region overflows the address space".into()))?;
        mapped.push(region);
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Map(format!("layout: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn saved_memory_is_sparse_and_maps_back_copy_on_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x100000), 0x8000),
        ])
        .unwrap();
        mem.write_slice(b"low", GuestAddress(0x2000)).unwrap();
        mem.write_slice(b"high", GuestAddress(0x107ffc)).unwrap();
        let (regions, written) = save(&mem, &path).unwrap();
        assert_eq!(written, 2 * PAGE as u64, "zero pages are skipped");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0x18000);
        assert_eq!(regions[1].file_offset, 0x10000);

        let a = restore(&path, &regions).unwrap();
        let b = restore(&path, &regions).unwrap();
        let mut buf = [0u8; 4];
        a.read_slice(&mut buf, GuestAddress(0x107ffc)).unwrap();
        assert_eq!(&buf, b"high");
        // A write stays in its own mapping: not in the file, not in b.
        a.write_slice(b"mine", GuestAddress(0x2000)).unwrap();
        b.read_slice(&mut buf[..3], GuestAddress(0x2000)).unwrap();
        assert_eq!(&buf[..3], b"low");
        assert_eq!(&std::fs::read(&path).unwrap()[0x2000..0x2003], b"low");

        std::fs::write(&path, [0u8; PAGE]).unwrap();
        let e = restore(&path, &regions).unwrap_err().to_string();
        assert!(e.contains("memory file"), "{e}");
    }
}
