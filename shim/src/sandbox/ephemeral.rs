//! Memory-backed emptyDir volumes (`medium: Memory`), issue 13. kubelet
//! makes each one a tmpfs on the host, at
//! `<kubelet root>/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>`,
//! sized by the volume's `sizeLimit`, and binds it into every container
//! that mounts it. Sharing that tmpfs into a VM would keep the pod's data
//! in host memory outside the pod's VM and send every access through
//! virtio-fs; a user of Kata expects what Kata does instead: a tmpfs in
//! the guest, of the same size, shared by the pod's containers. The
//! host tmpfs stays empty and kubelet removes it as usual.
//!
//! Recognized by both marks kubelet leaves: the parent directory's name
//! and a tmpfs at the source. A subPath into such a volume reaches the
//! shim as a bind of a `volume-subpaths` path and is shared from the host
//! like any other bind (said in the README).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The directory kubelet keeps emptyDir volumes in, below the pod's.
const EMPTY_DIR_PLUGIN: &str = "kubernetes.io~empty-dir";

/// One memory-backed emptyDir as the guest gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryVolume {
    /// The guest tmpfs's name below `EPHEMERAL_DIR`: a hash of the host
    /// path, so every container naming the same volume gets the same one.
    pub name: String,
    pub size_bytes: u64,
    /// Permission bits of the host tmpfs's root (kubelet: 0777).
    pub mode: u32,
}

/// `Some` if `source` is a memory-backed emptyDir volume.
pub fn memory_volume(source: &Path) -> Result<Option<MemoryVolume>> {
    let in_empty_dir = source
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|n| n == EMPTY_DIR_PLUGIN);
    if !in_empty_dir {
        return Ok(None);
    }
    let fs = nix::sys::statfs::statfs(source).map_err(|e| {
        Error::io(
            format!("statfs {}", source.display()),
            std::io::Error::from(e),
        )
    })?;
    if fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        return Ok(None);
    }
    let md = std::fs::metadata(source)
        .map_err(|e| Error::io(format!("stat {}", source.display()), e))?;
    let size_bytes = fs.blocks().saturating_mul(fs.block_size() as u64);
    let mut h = Sha256::new();
    h.update(source.as_os_str().as_encoded_bytes());
    let name = format!("{:x}", h.finalize())[..32].to_string();
    Ok(Some(MemoryVolume {
        name,
        size_bytes: size_bytes.max(1),
        mode: md.permissions().mode() & 0o1777,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::mount::{mount, umount2, MntFlags, MsFlags};

    /// A kubelet-style pod volume directory under a fresh temp dir.
    fn volume_dir(root: &Path, name: &str) -> std::path::PathBuf {
        let d = root
            .join("pods/uid-1/volumes")
            .join(EMPTY_DIR_PLUGIN)
            .join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_tmpfs_emptydir_is_a_memory_volume_of_its_size() {
        let root = tempfile::tempdir().unwrap();
        let d = volume_dir(root.path(), "cache");
        mount(
            Some("tmpfs"),
            &d,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=4m,mode=777"),
        )
        .unwrap();
        let got = memory_volume(&d);
        umount2(&d, MntFlags::MNT_DETACH).unwrap();
        let v = got.unwrap().expect("a memory volume");
        assert_eq!(v.size_bytes, 4 << 20);
        assert_eq!(v.mode, 0o777);
        assert_eq!(v.name.len(), 32);
        // Same path, same guest tmpfs; another path, another.
        let again = memory_volume(&d).unwrap();
        assert!(again.is_none(), "no tmpfs any more: a plain directory");
        let other = volume_dir(root.path(), "other");
        mount(
            Some("tmpfs"),
            &other,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let o = memory_volume(&other);
        umount2(&other, MntFlags::MNT_DETACH).unwrap();
        assert_ne!(o.unwrap().expect("a memory volume").name, v.name);
    }

    #[test]
    fn disk_emptydirs_and_other_tmpfs_are_not() {
        let root = tempfile::tempdir().unwrap();
        let tmp_type = nix::sys::statfs::statfs(root.path())
            .unwrap()
            .filesystem_type();
        assert_ne!(
            tmp_type,
            nix::sys::statfs::TMPFS_MAGIC,
            "this test needs a disk-backed temp dir"
        );
        let disk = volume_dir(root.path(), "disk");
        assert_eq!(memory_volume(&disk).unwrap(), None);
        let elsewhere = root.path().join("plain-tmpfs");
        std::fs::create_dir_all(&elsewhere).unwrap();
        mount(
            Some("tmpfs"),
            &elsewhere,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let got = memory_volume(&elsewhere);
        umount2(&elsewhere, MntFlags::MNT_DETACH).unwrap();
        assert_eq!(got.unwrap(), None);
    }
}
