//! What a VM is made of: plain data, built from the command line (or by the
//! shim), checked before anything is created.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::devices::virtio::fs::ShareConfig;

/// Everything the VMM needs to build one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub disks: Vec<DiskConfig>,
    /// Empty virtio-blk slots that `attach_disk` can fill later.
    pub spare_disks: u8,
    pub vsock: Option<VsockConfig>,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Appended to thaw's default guest command line.
    pub append: String,
    pub serial: SerialOutput,
    pub api_socket: Option<PathBuf>,
    pub pvm_quirks: PvmQuirks,
    /// The NIC's MAC (every VM has one NIC).
    pub net_mac: [u8; 6],
    /// The tap to bind the NIC to at start (none: later, or never). A host
    /// resource: a restore takes it from its own command line, never from
    /// the snapshot.
    pub tap: Option<String>,
    /// The host directory the virtio-fs device exports from the start
    /// (none: later, with `attach_share`, or never). A host resource, like
    /// the tap: a restore takes it from its own command line.
    pub share: Option<ShareConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SerialOutput {
    None,
    Stdout,
    File(PathBuf),
}

/// Whether to turn on the guest-side workarounds for hosts whose KVM is PVM
/// (see kernel-config/). `Auto` looks at the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum PvmQuirks {
    /// On when the host's KVM is PVM (/sys/module/kvm_pvm).
    Auto,
    On,
    Off,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("--vcpus must be between 1 and {max}, got {got}")]
    Vcpus { got: u8, max: u8 },
    #[error("--memory-mib must be at least {min}, got {got}")]
    Memory { got: u32, min: u32 },
    #[error("{what} {path}: {reason}")]
    Path {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("--cid must be at least 3 (0-2 are reserved), got {0}")]
    Cid(u32),
    #[error("too many disks: {got} (at most {max} including spares)")]
    TooManyDisks { got: usize, max: usize },
}

/// The IOAPIC has 24 pins and IRQ 0-4 are taken: this is the virtio budget.
pub const MAX_VIRTIO_DEVICES: usize = 19;
pub const MIN_MEMORY_MIB: u32 = 32;
/// Slots taken by other than disks: vsock, RNG, NIC, virtio-fs.
const FIXED_DEVICES: usize = 4;

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kernel: PathBuf::new(),
            initramfs: None,
            disks: Vec::new(),
            spare_disks: 0,
            vsock: None,
            vcpus: 1,
            memory_mib: 256,
            append: String::new(),
            serial: SerialOutput::Stdout,
            api_socket: None,
            pvm_quirks: PvmQuirks::Auto,
            net_mac: crate::devices::virtio::net::DEFAULT_MAC,
            tap: None,
            share: None,
        }
    }
}

fn check_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::Path {
        what,
        path: path.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return Err(err("not a regular file or block device".into()));
    }
    Ok(())
}

impl VmConfig {
    /// Checks what can be checked before building the VM, so a mistake is
    /// reported with the option that caused it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let max = crate::arch::mptable::MAX_VCPUS;
        if self.vcpus == 0 || self.vcpus > max {
            return Err(ConfigError::Vcpus {
                got: self.vcpus,
                max,
            });
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::Memory {
                got: self.memory_mib,
                min: MIN_MEMORY_MIB,
            });
        }
        check_file("--kernel", &self.kernel)?;
        if let Some(p) = &self.initramfs {
            check_file("--initramfs", p)?;
        }
        for d in &self.disks {
            check_file("--disk", &d.path)?;
        }
        if let Some(s) = &self.share {
            if !s.dir.is_dir() {
                return Err(ConfigError::Path {
                    what: "--share",
                    path: s.dir.clone(),
                    reason: "not a directory".into(),
                });
            }
        }
        // Block devices, the vsock device, the RNG, the NIC and the
        // virtio-fs device each take a slot.
        let devices = self.disks.len() + self.spare_disks as usize + FIXED_DEVICES;
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDisks {
                got: self.disks.len() + self.spare_disks as usize,
                max: MAX_VIRTIO_DEVICES - FIXED_DEVICES,
            });
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 {
                return Err(ConfigError::Cid(v.guest_cid));
            }
            if let Some(dir) = v.uds_path.parent().filter(|d| !d.as_os_str().is_empty()) {
                if !dir.is_dir() {
                    return Err(ConfigError::Path {
                        what: "--vsock-uds",
                        path: v.uds_path.clone(),
                        reason: format!("directory {} does not exist", dir.display()),
                    });
                }
            }
        }
        Ok(())
    }

    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_kernel() -> (tempfile_path::TempFile, VmConfig) {
        let f = tempfile_path::TempFile::new();
        let cfg = VmConfig {
            kernel: f.path.clone(),
            ..Default::default()
        };
        (f, cfg)
    }

    #[test]
    fn names_the_bad_option() {
        let (_f, cfg) = with_kernel();
        assert_eq!(cfg.validate(), Ok(()));
        let bad = VmConfig {
            vcpus: 0,
            ..cfg.clone()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("--vcpus"));
        let bad = VmConfig {
            memory_mib: 1,
            ..cfg.clone()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--memory-mib"));
        let bad = VmConfig {
            kernel: "/nonexistent/vmlinux".into(),
            ..cfg.clone()
        };
        let msg = bad.validate().unwrap_err().to_string();
        assert!(msg.contains("--kernel /nonexistent/vmlinux"), "{msg}");
        let bad = VmConfig {
            vsock: Some(VsockConfig {
                guest_cid: 2,
                uds_path: "/tmp/v.sock".into(),
            }),
            ..cfg.clone()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("--cid"));
        let bad = VmConfig {
            spare_disks: 30,
            ..cfg
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::TooManyDisks { .. })
        ));
    }

    /// A scratch file removed on drop (no extra dev-dependency needed).
    mod tempfile_path {
        pub struct TempFile {
            pub path: std::path::PathBuf,
        }
        impl TempFile {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path =
                    std::env::temp_dir().join(format!("thaw-vmm-test-{}-{n}", std::process::id()));
                std::fs::write(&path, b"x").unwrap();
                Self { path }
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}
