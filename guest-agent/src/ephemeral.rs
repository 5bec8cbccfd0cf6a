//! Memory-backed emptyDir volumes (issue 13). kubelet makes such a volume
//! a tmpfs on the host; in a VM the memory it should use is the guest's,
//! so the shim asks for a guest tmpfs of the same size instead of sharing
//! the host's. One tmpfs per volume, at `EPHEMERAL_DIR/<name>`, mounted
//! at the first container that uses it and shared by the pod's containers
//! (container specs bind it like any guest path); it goes with the VM.

use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

use crate::error::{Error, Result};
use crate::share::is_mount_point;

pub use thaw_agent_protocol::EPHEMERAL_DIR;

/// What one `MountEphemeral` asks for, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ephemeral {
    pub dir: PathBuf,
    pub size_bytes: u64,
    pub mode: u32,
}

impl Ephemeral {
    /// Checks the request's fields, naming the first bad one.
    pub fn parse(name: &str, size_bytes: u64, mode: u32) -> Result<Self> {
        let hex = name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if name.is_empty() || name.len() > 64 || !hex {
            return Err(Error::InvalidRequest(format!(
                "ephemeral volume name {name:?}: want 1 to 64 lowercase hex characters"
            )));
        }
        if size_bytes == 0 {
            return Err(Error::InvalidRequest(format!(
                "ephemeral volume {name}: size_bytes is 0"
            )));
        }
        if mode & !0o1777 != 0 {
            return Err(Error::InvalidRequest(format!(
                "ephemeral volume {name}: mode {mode:#o} (only permission bits and sticky)"
            )));
        }
        Ok(Ephemeral {
            dir: Path::new(EPHEMERAL_DIR).join(name),
            size_bytes,
            mode,
        })
    }

    /// The tmpfs mount options.
    pub fn options(&self) -> String {
        format!("size={},mode={:o}", self.size_bytes, self.mode)
    }
}

/// Mounts the tmpfs unless it already is (a second container of the pod).
pub fn mount_ephemeral(e: &Ephemeral, pid1: bool) -> Result<()> {
    if !pid1 {
        return Err(Error::FailedPrecondition(
            "refusing to mount an ephemeral volume: the agent is not the guest's init".into(),
        ));
    }
    if is_mount_point(&e.dir) {
        return Ok(());
    }
    std::fs::create_dir_all(&e.dir).map_err(|err| Error::path("creating", &e.dir, err))?;
    mount(
        Some("tmpfs"),
        &e.dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(e.options().as_str()),
    )
    .map_err(|err| Error::errno(format!("mounting tmpfs on {}", e.dir.display()), err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_field_by_field() {
        let e = Ephemeral::parse("0123abcd", 8 << 20, 0o777).unwrap();
        assert_eq!(e.dir, Path::new(EPHEMERAL_DIR).join("0123abcd"));
        assert_eq!(e.options(), "size=8388608,mode=777");
        for (name, size, mode, want) in [
            ("", 1, 0o777, "name"),
            ("../x", 1, 0o777, "name"),
            ("ABCD", 1, 0o777, "name"),
            (&"a".repeat(65)[..], 1, 0o777, "name"),
            ("ab", 0, 0o777, "size_bytes"),
            ("ab", 1, 0o4777, "mode"),
        ] {
            let err = Ephemeral::parse(name, size, mode).unwrap_err().to_string();
            assert!(err.contains(want), "{name:?}/{size}/{mode:o}: {err}");
        }
    }

    #[test]
    fn only_the_guest_init_mounts() {
        let e = Ephemeral::parse("ab", 1, 0o755).unwrap();
        let err = mount_ephemeral(&e, false).unwrap_err().to_string();
        assert!(err.contains("not the guest's init"), "{err}");
    }
}
