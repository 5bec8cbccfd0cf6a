//! What the shim writes into each container's bundle (`thaw.json`) so that
//! `containerd-shim-thaw-v2 delete`, run by containerd after a shim crash,
//! can release what the dead shim held.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::image_cache::ImageRef;

pub const FILE: &str = "thaw.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub namespace: String,
    pub id: String,
    /// The shim daemon serving the container.
    pub shim_pid: u32,
    /// The sandbox directory and its process (VMM or host agent).
    pub sandbox_dir: PathBuf,
    pub sandbox_pid: u32,
    /// The cgroup holding everything the sandbox ran (host backend).
    #[serde(default)]
    pub sandbox_cgroup: Option<PathBuf>,
    /// The pod cgroup directories the VMM ran in (VM backend).
    #[serde(default)]
    pub vmm_cgroups: Vec<PathBuf>,
    /// The pod's network namespace (CRI's), where the shim redirected the
    /// CNI interface to the VM with tc.
    #[serde(default)]
    pub pod_netns: Option<PathBuf>,
    /// The cached rootfs image this container holds a reference on.
    pub image: Option<ImageRef>,
}

impl ContainerRecord {
    pub fn write(&self, bundle: &Path) -> Result<()> {
        let path = bundle.join(FILE);
        let tmp = bundle.join(format!(".{FILE}.tmp"));
        let data = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Shim(format!("encoding {FILE}: {e}")))?;
        // In containerd's bundle (root's); names paths of thaw's state only.
        thaw_snapshots::private::write_file(&tmp, &data)
            .ctx(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).ctx(|| format!("renaming to {}", path.display()))
    }

    pub fn read(bundle: &Path) -> Result<Option<ContainerRecord>> {
        let path = bundle.join(FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Shim(format!("parsing {}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    pub fn remove(bundle: &Path) {
        let _ = std::fs::remove_file(bundle.join(FILE));
    }
}

/// Whether `pid` is alive and its command line mentions `needle` (guards
/// against a recycled pid).
pub fn process_matches(pid: u32, needle: &str) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
    // Zombies have an empty command line.
    !cmd.is_empty() && cmd.contains(needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(ContainerRecord::read(d.path()).unwrap(), None);
        let r = ContainerRecord {
            namespace: "default".into(),
            id: "c1".into(),
            shim_pid: 42,
            sandbox_dir: "/run/thaw/sandboxes/x".into(),
            sandbox_pid: 43,
            sandbox_cgroup: None,
            vmm_cgroups: vec!["/sys/fs/cgroup/kubepods/pod1/x".into()],
            pod_netns: Some("/var/run/netns/cni-1".into()),
            image: None,
        };
        r.write(d.path()).unwrap();
        assert_eq!(ContainerRecord::read(d.path()).unwrap(), Some(r));
        ContainerRecord::remove(d.path());
        assert_eq!(ContainerRecord::read(d.path()).unwrap(), None);
    }

    #[test]
    fn own_process_matches_its_command_line() {
        let me = std::process::id();
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_string_lossy().to_string();
        assert!(process_matches(me, &name));
        assert!(!process_matches(me, "definitely-not-in-the-command-line"));
        assert!(!process_matches(0, ""));
    }
}
