//! Files, directories and sockets only their owner may use: a snapshot's
//! memory file is the guest's RAM (keys, tokens, everything a tenant had in
//! memory), the state file its registers, a cached rootfs image a tenant's
//! image, and a VM's sockets reach its agent and its VMM.
//!
//! Every mode here is set explicitly, whatever the umask: files 0600,
//! directories 0700, sockets 0600. thaw's processes (shim, VMM) run as
//! root, so nothing else needs access; where another party does, the
//! creator says so next to a wider mode.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

pub const FILE_MODE: u32 = 0o600;
pub const DIR_MODE: u32 = 0o700;

/// Creates (or truncates) a file with mode 0600, whatever the umask.
pub fn create_file(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    // An existing file keeps its old mode through open(2): set it.
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// Opens (creating it 0600 if missing, never truncating) a file to hold a
/// flock on.
pub fn open_lock_file(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)?;
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// Writes `data` to a new (or truncated) 0600 file.
pub fn write_file(path: &Path, data: &[u8]) -> io::Result<()> {
    create_file(path)?.write_all(data)
}

/// Creates a directory (and missing parents) with mode 0700; an existing
/// one is narrowed to 0700. Parents it creates are 0700 too.
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)?;
    std::fs::set_permissions(path, Permissions::from_mode(DIR_MODE))
}

/// Creates one directory with mode 0700; fails if it exists.
pub fn create_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(DIR_MODE).create(path)
}

/// Sets a file's mode to 0600 (a file another program created, such as
/// mkfs.erofs's output).
pub fn restrict_file(path: &Path) -> io::Result<()> {
    std::fs::set_permissions(path, Permissions::from_mode(FILE_MODE))
}

/// Binds a Unix socket and sets its mode to 0600. bind(2) creates the
/// socket file from the umask; the socket's directory should be 0700 as
/// well, which closes the moment between bind and chmod.
pub fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    let l = UnixListener::bind(path)?;
    if let Err(e) = std::fs::set_permissions(path, Permissions::from_mode(FILE_MODE)) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o777
    }

    #[test]
    fn modes_are_owner_only_whatever_the_umask() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        create_dir_all(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&t.path().join("a")), 0o700, "created parents too");
        let f = d.join("memory");
        std::fs::write(&f, b"old").unwrap();
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        create_file(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        let e = t.path().join("c");
        create_dir(&e).unwrap();
        assert_eq!(mode(&e), 0o700);
        let l = t.path().join("l");
        std::fs::write(&l, b"keep").unwrap();
        std::fs::set_permissions(&l, Permissions::from_mode(0o666)).unwrap();
        open_lock_file(&l).unwrap();
        assert_eq!(mode(&l), 0o600);
        assert_eq!(std::fs::read(&l).unwrap(), b"keep", "not truncated");
        let w = t.path().join("w");
        write_file(&w, b"data").unwrap();
        assert_eq!(mode(&w), 0o600);
        let s = t.path().join("s.sock");
        let _l = bind_socket(&s).unwrap();
        assert_eq!(mode(&s), 0o600);
    }
}
