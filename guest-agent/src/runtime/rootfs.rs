//! A container's root filesystem in the guest: the image (a read-only block
//! device, or a directory in host tests) as the lower layer of an overlay
//! whose upper layer is a tmpfs, so the image itself is never written.

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use thaw_agent_protocol::agent::Rootfs;

use crate::error::{Error, Result};

/// What was mounted, so it can be unmounted in reverse. It has exactly one
/// owner at a time (it is neither `Clone` nor constructible outside this
/// module), and dropping it unmounts: a rootfs is unmounted once, by
/// whoever holds it last.
#[derive(Debug)]
pub struct MountedRootfs {
    /// The merged tree handed to the container.
    pub merged: PathBuf,
    /// Mount points in mount order.
    mounts: Vec<PathBuf>,
    /// The block device under the lower layer, when the image is one. The
    /// host refills its disk slot with another image once the container is
    /// gone, so removal waits until it is let go.
    device: Option<PathBuf>,
}

/// How long an unmounted device may stay busy before removal fails.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until nothing holds `dev` open exclusively (a mounted filesystem
/// does), then opens and closes it: closing the last opener drops the
/// device's page cache, so a new image in the same slot is read afresh.
/// Fails if that takes longer than [`RELEASE_TIMEOUT`].
pub fn wait_released(dev: &Path) -> Result<()> {
    wait_released_within(dev, RELEASE_TIMEOUT)
}

fn wait_released_within(dev: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(dev)
        {
            Ok(_) => return Ok(()),
            // Gone already: nothing can read stale data from it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                return Err(Error::Internal(format!(
                    "rootfs device {} is still in use after unmounting: {e}",
                    dev.display()
                )))
            }
        }
    }
}

fn check_overlay_path(p: &Path, field: &str) -> Result<String> {
    let s = p
        .to_str()
        .ok_or_else(|| Error::InvalidRequest(format!("{field}: path is not UTF-8")))?;
    if s.contains([',', ':']) {
        return Err(Error::InvalidRequest(format!(
            "{field}: {s:?} contains ',' or ':', which overlayfs options cannot carry"
        )));
    }
    Ok(s.to_string())
}

fn mkdir(p: &Path) -> Result<()> {
    fs::create_dir_all(p).map_err(|e| Error::path("creating directory", p, e))
}

impl MountedRootfs {
    /// Mounts `r` under `dir` (which must exist): `dir/lower`, `dir/scratch`
    /// (tmpfs with upper/ and work/), and `dir/rootfs` (the overlay).
    pub fn mount(dir: &Path, r: &Rootfs) -> Result<MountedRootfs> {
        if r.source.is_empty() {
            return Err(Error::InvalidRequest("rootfs.source is empty".into()));
        }
        let mut done = MountedRootfs {
            merged: dir.join("rootfs"),
            mounts: Vec::new(),
            device: None,
        };
        match done.mount_inner(dir, r) {
            Ok(()) => Ok(done),
            Err(e) => {
                done.unmount();
                Err(e)
            }
        }
    }

    fn mount_inner(&mut self, dir: &Path, r: &Rootfs) -> Result<()> {
        let lower = if r.fstype.is_empty() {
            let src = PathBuf::from(&r.source);
            if !src.is_dir() {
                return Err(Error::InvalidRequest(format!(
                    "rootfs.source {}: not a directory (and no fstype given)",
                    src.display()
                )));
            }
            src
        } else {
            let lower = dir.join("lower");
            mkdir(&lower)?;
            let opts = r.options.join(",");
            mount(
                Some(r.source.as_str()),
                &lower,
                Some(r.fstype.as_str()),
                MsFlags::MS_RDONLY,
                (!opts.is_empty()).then_some(opts.as_str()),
            )
            .map_err(|e| {
                Error::errno(
                    format!(
                        "mounting rootfs {} ({}) read-only on {}",
                        r.source,
                        r.fstype,
                        lower.display()
                    ),
                    e,
                )
            })?;
            self.mounts.push(lower.clone());
            self.device = Some(PathBuf::from(&r.source));
            lower
        };
        let scratch = dir.join("scratch");
        mkdir(&scratch)?;
        mount(
            Some("tmpfs"),
            &scratch,
            Some("tmpfs"),
            MsFlags::MS_NODEV,
            Some("mode=0755"),
        )
        .map_err(|e| Error::errno(format!("mounting tmpfs on {}", scratch.display()), e))?;
        self.mounts.push(scratch.clone());
        let upper = scratch.join("upper");
        let work = scratch.join("work");
        mkdir(&upper)?;
        mkdir(&work)?;
        mkdir(&self.merged)?;
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            check_overlay_path(&lower, "rootfs lower")?,
            check_overlay_path(&upper, "rootfs upper")?,
            check_overlay_path(&work, "rootfs work")?
        );
        mount(
            Some("overlay"),
            &self.merged,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(|e| Error::errno(format!("mounting overlay on {}", self.merged.display()), e))?;
        self.mounts.push(self.merged.clone());
        Ok(())
    }

    /// Unmounts everything (lazily: container namespaces may still hold
    /// copies); errors are logged, never fatal. A second call does nothing.
    pub fn unmount(&mut self) {
        while let Some(m) = self.mounts.pop() {
            if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
                log::warn!("unmounting {}: {e}", m.display());
            }
        }
    }
}

impl MountedRootfs {
    /// Unmounts and hands back the block device to wait for (with
    /// [`wait_released`]) before the host may reuse its slot, once
    /// anything else mounted over the tree is gone too.
    pub fn unmount_keeping_device(mut self) -> Option<PathBuf> {
        self.unmount();
        self.device.take()
    }
}

impl Drop for MountedRootfs {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Unmounts every mount at or below `dir` (deepest first), for cleaning up
/// directories whose mounts we may have lost track of.
pub fn unmount_below(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = umount2(&p, MntFlags::MNT_DETACH);
    }
}
