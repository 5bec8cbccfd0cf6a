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

/// How long an attached image may take to show its size in the guest.
const SIZE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest pause between two looks at its size.
const MAX_SIZE_POLL: Duration = Duration::from_millis(50);

/// Waits until block device `dev` has `bytes` of capacity. The host
/// attaches an image with a config-change interrupt, and the guest's
/// virtio-blk driver reads the new capacity later from a workqueue; a
/// mount before that sees the slot's old size (0 for a fresh slot) and
/// fails with EINVAL.
fn wait_for_size(sys_block: &Path, dev: &Path, bytes: u64, timeout: Duration) -> Result<()> {
    let name = dev.file_name().ok_or_else(|| {
        Error::InvalidRequest(format!("rootfs.source {}: no device name", dev.display()))
    })?;
    let size_file = sys_block.join(name).join("size");
    let deadline = Instant::now() + timeout;
    // Doubling pauses: a size that is late is late under load, where
    // twenty guests reading sysfs every 2 ms only add to it.
    let mut pause = Duration::from_millis(1);
    loop {
        // sysfs counts 512-byte sectors whatever the device's block size.
        let seen = fs::read_to_string(&size_file)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|sectors| sectors * 512);
        if seen == Some(bytes) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let seen = seen.map_or_else(
                || format!("no readable {}", size_file.display()),
                |b| format!("{b} bytes"),
            );
            return Err(Error::Internal(format!(
                "rootfs device {} shows {seen} after {timeout:?}, not the attached image's {bytes} bytes",
                dev.display()
            )));
        }
        std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        pause = (pause * 2).min(MAX_SIZE_POLL);
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
            if r.size_bytes > 0 {
                wait_for_size(
                    Path::new("/sys/class/block"),
                    Path::new(&r.source),
                    r.size_bytes,
                    SIZE_TIMEOUT,
                )?;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sys_block_with(name: &str, sectors: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join(name)).unwrap();
        fs::write(root.path().join(name).join("size"), sectors).unwrap();
        root
    }

    #[test]
    fn a_device_of_the_right_size_is_ready_at_once() {
        let sys = sys_block_with("vdb", "8\n");
        wait_for_size(sys.path(), Path::new("/dev/vdb"), 4096, Duration::ZERO).unwrap();
    }

    #[test]
    fn the_wait_ends_when_the_guest_catches_up_with_the_new_capacity() {
        let sys = sys_block_with("vdc", "0\n");
        let size = sys.path().join("vdc/size");
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            fs::write(size, "16\n").unwrap();
        });
        let start = Instant::now();
        wait_for_size(
            sys.path(),
            Path::new("/dev/vdc"),
            8192,
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(start.elapsed() >= Duration::from_millis(40));
        late.join().unwrap();
    }

    #[test]
    fn a_device_that_keeps_its_old_size_fails_naming_it_and_both_sizes() {
        let sys = sys_block_with("vdd", "2\n");
        let e = wait_for_size(
            sys.path(),
            Path::new("/dev/vdd"),
            4096,
            Duration::from_millis(20),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/dev/vdd"), "{e}");
        assert!(e.contains("1024 bytes"), "{e}");
        assert!(e.contains("4096 bytes"), "{e}");
        // The doubling pauses stop at the deadline, not past it.
        let start = Instant::now();
        wait_for_size(
            sys.path(),
            Path::new("/dev/vdd"),
            4096,
            Duration::from_millis(120),
        )
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(1));
        let e = wait_for_size(sys.path(), Path::new("/dev/vde"), 4096, Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no readable") && e.contains("vde/size"), "{e}");
    }
}
