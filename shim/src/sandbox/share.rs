//! The sandbox's shared directory on the host (issue 13): one directory
//! per sandbox, served to the guest by the VMM's virtio-fs device, under
//! which the sources of the containers' host mounts are bind-mounted
//! (Kata's layout): `<share>/<container>/<n>` for the container's n-th
//! host mount.
//!
//! What the guest may do there is decided by these bind mounts, on the
//! host, not by the guest: every one is `nosuid,nodev`, and a read-only
//! mount is remounted read-only, so the VMM's file server hits EROFS from
//! the host kernel whatever the guest asks.
//!
//! Cleanup: a container's mounts are detached (`MNT_DETACH`) and their
//! directories removed when it is deleted; the whole share when the
//! sandbox stops, and by `delete` after a crash (it lives in the sandbox
//! directory).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{Error, Result};

pub struct Share {
    root: PathBuf,
}

fn mount_err(what: String) -> impl FnOnce(nix::errno::Errno) -> Error {
    move |e| Error::io(what, std::io::Error::from(e))
}

/// Makes `<sandbox dir>/share` (0700) a mount point of its own with
/// shared propagation, before a jailed VMM starts: the VMM's mount
/// namespace is a copy taken then, and only through that propagation do
/// the binds [`Share::expose`] makes later reach it.
pub fn prepare_mount_point(sandbox_dir: &Path) -> Result<()> {
    let root = sandbox_dir.join("share");
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&root)
        .map_err(|e| Error::io(format!("creating {}", root.display()), e))?;
    let shown = root.display().to_string();
    let result = mount(
        Some(&root),
        &root,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(mount_err(format!("bind-mounting {shown} on itself")))
    .and_then(|()| {
        mount(
            None::<&str>,
            &root,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(mount_err(format!("making {shown} a shared mount")))
    });
    if result.is_err() {
        let _ = umount2(&root, MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(&root);
    }
    result
}

impl Share {
    /// Makes `<sandbox dir>/share` (0700), or takes the one
    /// [`prepare_mount_point`] made.
    pub fn create(sandbox_dir: &Path) -> Result<Share> {
        let root = sandbox_dir.join("share");
        if !root.is_dir() {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&root)
                .map_err(|e| Error::io(format!("creating {}", root.display()), e))?;
        }
        Ok(Share { root })
    }

    /// The share's host directory, which the VMM serves.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Bind-mounts `source` (a directory or a file) at
    /// `<share>/<container>/<index>`, `nosuid,nodev`, read-only if asked;
    /// returns that path relative to the share.
    pub fn expose(
        &self,
        container: &str,
        index: usize,
        source: &Path,
        read_only: bool,
    ) -> Result<PathBuf> {
        if container.is_empty() || container.contains('/') || container.starts_with('.') {
            return Err(Error::InvalidArgument(format!(
                "container id {container:?} cannot name a share directory"
            )));
        }
        let meta = fs::metadata(source).map_err(|e| {
            Error::InvalidSpec(format!("bind mount source {}: {e}", source.display()))
        })?;
        let dir = self.root.join(container);
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let relative = PathBuf::from(container).join(index.to_string());
        let target = self.root.join(&relative);
        if meta.is_dir() {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&target)
                .map_err(|e| Error::io(format!("creating {}", target.display()), e))?;
        } else {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&target)
                .map_err(|e| Error::io(format!("creating {}", target.display()), e))?;
        }
        let shown = format!("{} on {}", source.display(), target.display());
        let result = (|| {
            mount(
                Some(source),
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(mount_err(format!("bind-mounting {shown}")))?;
            // Flags of a bind mount change only through a remount.
            let mut flags =
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
            if read_only {
                flags |= MsFlags::MS_RDONLY;
            }
            mount(None::<&str>, &target, None::<&str>, flags, None::<&str>).map_err(mount_err(
                format!(
                    "making {shown} nosuid,nodev{}",
                    if read_only { ",ro" } else { "" }
                ),
            ))
        })();
        if let Err(e) = result {
            let _ = umount2(&target, MntFlags::MNT_DETACH);
            let _ = fs::remove_file(&target).or_else(|_| fs::remove_dir(&target));
            return Err(e);
        }
        Ok(relative)
    }

    /// Detaches and removes everything exposed for `container`.
    pub fn withdraw(&self, container: &str) {
        let dir = self.root.join(container);
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if let Err(err) = umount2(&p, MntFlags::MNT_DETACH) {
                if err != nix::errno::Errno::EINVAL {
                    log::warn!("unmounting {}: {err}", p.display());
                }
            }
            let _ = fs::remove_file(&p).or_else(|_| fs::remove_dir(&p));
        }
        let _ = fs::remove_dir(&dir);
    }

    /// Withdraws every container's mounts and removes the share (and its
    /// own mount, if it is one).
    pub fn remove(&self) {
        if let Ok(entries) = fs::read_dir(&self.root) {
            for e in entries.flatten() {
                self.withdraw(&e.file_name().to_string_lossy());
            }
        }
        if let Err(err) = umount2(&self.root, MntFlags::MNT_DETACH) {
            if err != nix::errno::Errno::EINVAL {
                log::warn!("unmounting {}: {err}", self.root.display());
            }
        }
        let _ = fs::remove_dir(&self.root);
    }
}

/// Removes the share of the sandbox directory `sandbox_dir`, if any
/// (also for `delete` after a crash, and for a stale directory).
pub fn remove_in(sandbox_dir: &Path) {
    let root = sandbox_dir.join("share");
    if root.exists() {
        Share { root }.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mounted(p: &Path) -> bool {
        let s = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let p = p.display().to_string();
        s.lines().any(|l| l.split(' ').nth(4) == Some(p.as_str()))
    }

    #[test]
    fn a_read_only_share_is_read_only_on_the_host_and_goes_away() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("f"), "data").unwrap();
        let file_src = d.path().join("one-file");
        fs::write(&file_src, "single").unwrap();
        let sb = d.path().join("sandbox");
        fs::create_dir(&sb).unwrap();
        let share = Share::create(&sb).unwrap();

        let ro = share.expose("c1", 0, &src, true).unwrap();
        let rw = share.expose("c1", 1, &src, false).unwrap();
        let file = share.expose("c1", 2, &file_src, true).unwrap();
        let root = share.root().to_path_buf();
        assert_eq!(
            fs::read_to_string(root.join(&ro).join("f")).unwrap(),
            "data"
        );
        let e = fs::write(root.join(&ro).join("new"), "x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        fs::write(root.join(&rw).join("new"), "x").unwrap();
        assert_eq!(fs::read_to_string(src.join("new")).unwrap(), "x");
        assert_eq!(fs::read_to_string(root.join(&file)).unwrap(), "single");

        // nosuid: a setuid file in the source does not run setuid from the
        // share (the flag is on the mount).
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(root.join(&rw).to_str().unwrap()))
            .unwrap()
            .to_string();
        assert!(line.contains("nosuid") && line.contains("nodev"), "{line}");

        share.withdraw("c1");
        for p in [&ro, &rw, &file] {
            assert!(!mounted(&root.join(p)));
        }
        assert!(!root.join("c1").exists());
        // The sources are untouched.
        assert_eq!(fs::read_to_string(src.join("f")).unwrap(), "data");
        share.remove();
        assert!(!root.exists());
        let _ = fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755));
    }

    #[test]
    fn a_prepared_share_is_a_shared_mount_and_goes_away() {
        let d = tempfile::tempdir().unwrap();
        prepare_mount_point(d.path()).unwrap();
        let root = d.path().join("share");
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(root.to_str().unwrap()))
            .unwrap_or_else(|| panic!("{} is not a mount point", root.display()))
            .to_string();
        assert!(line.contains(" shared:"), "{line}");
        // Twice is an error, naming the directory; the first stays.
        let e = prepare_mount_point(d.path()).unwrap_err().to_string();
        assert!(e.contains(root.to_str().unwrap()), "{e}");
        let share = Share::create(d.path()).unwrap();
        let src = d.path().join("src");
        fs::create_dir(&src).unwrap();
        share.expose("c1", 0, &src, false).unwrap();
        share.remove();
        assert!(!mounted(&root) && !root.exists());
    }

    #[test]
    fn bad_sources_and_ids_are_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let share = Share::create(d.path()).unwrap();
        let e = share
            .expose("c1", 0, Path::new("/nonexistent/thaw-src"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/thaw-src"), "{e}");
        for id in ["", "../x", ".hidden", "a/b"] {
            assert!(share.expose(id, 0, d.path(), false).is_err(), "{id}");
        }
        share.remove();
    }
}
