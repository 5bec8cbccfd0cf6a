//! A container's root filesystem in the guest: the image (a read-only block
//! device, or a directory in host tests) as the lower layer of an overlay
//! whose upper layer is a tmpfs, so the image itself is never written.

use std::fs;
use std::path::{Path, PathBuf};

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
