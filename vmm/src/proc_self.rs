//! The VMM's own `/proc/self` files, opened once before the jail (which
//! has no procfs) and used from these fds after: `smaps` for the memory
//! figures of `status`, and the `fd` directory through which the virtio-fs
//! server reopens its `O_PATH` fds. Without [`open`] (an unjailed VMM, unit
//! tests) each use opens `/proc/self` afresh.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, OnceLock};

struct Opened {
    smaps: Mutex<File>,
    fd_dir: OwnedFd,
}

static OPENED: OnceLock<Opened> = OnceLock::new();

fn open_fd_dir() -> io::Result<OwnedFd> {
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open("/proc/self/fd")?;
    Ok(dir.into())
}

/// Opens the files; call before entering the jail.
pub fn open() -> io::Result<()> {
    let opened = Opened {
        smaps: Mutex::new(File::open("/proc/self/smaps")?),
        fd_dir: open_fd_dir()?,
    };
    // A second call keeps the first files, which name the same process.
    let _ = OPENED.set(opened);
    Ok(())
}

/// The text of `/proc/self/smaps`, read now.
pub fn smaps() -> io::Result<String> {
    let Some(opened) = OPENED.get() else {
        return std::fs::read_to_string("/proc/self/smaps");
    };
    let mut f = opened.smaps.lock().unwrap_or_else(|e| e.into_inner());
    // Reading from offset 0 again makes the kernel generate it afresh.
    f.seek(SeekFrom::Start(0))?;
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    Ok(text)
}

/// An `O_PATH` fd of `/proc/self/fd`, for `openat` of `N`.
pub fn fd_dir() -> io::Result<OwnedFd> {
    match OPENED.get() {
        Some(opened) => opened.fd_dir.as_fd().try_clone_to_owned(),
        None => open_fd_dir(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_reads_afresh_each_time() {
        open().unwrap();
        let before = smaps().unwrap();
        assert!(before.contains("Rss:"));
        // A new mapping shows in the next read from the same fd.
        let len = 3 << 20;
        // SAFETY: an anonymous mapping we unmap below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let start = format!("{:x}-", addr as usize);
        let after = smaps().unwrap();
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(addr, len) };
        assert!(!before.contains(&start) && after.contains(&start));
        assert!(fd_dir().is_ok());
    }
}
