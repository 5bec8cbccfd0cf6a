//! The sandbox's host share (issue 13): the VMM's virtio-fs device serves
//! one host directory per sandbox, under which the shim bind-mounts the
//! sources of the containers' host mounts. The agent mounts it once, at
//! [`SHARE_DIR`]; container specs then bind paths below it like any guest
//! path.

use std::path::Path;

use nix::mount::{mount, MsFlags};

use crate::error::{Error, Result};

pub use thaw_agent_protocol::{SHARE_DIR, SHARE_TAG};

/// Whether something is mounted at `dir` (its mountinfo line).
pub(crate) fn is_mount_point(dir: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4).map(Path::new) == Some(dir))
}

/// Mounts the share (idempotent). `nosuid,nodev` here as on the host: a
/// setuid file or a device node in a shared directory gives nothing.
pub fn mount_share(pid1: bool) -> Result<()> {
    if !pid1 {
        return Err(Error::FailedPrecondition(
            "refusing to mount the share: the agent is not the guest's init".into(),
        ));
    }
    if is_mount_point(Path::new(SHARE_DIR)) {
        return Ok(());
    }
    std::fs::create_dir_all(SHARE_DIR).map_err(|e| Error::path("creating", SHARE_DIR, e))?;
    mount(
        Some(SHARE_TAG),
        Path::new(SHARE_DIR),
        Some("virtiofs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| Error::errno(format!("mounting virtiofs {SHARE_TAG} on {SHARE_DIR}"), e))
}
