//! thaw's KVM virtual machine monitor.
//!
//! Layout: `arch/` (x86_64 boot structures, the VM's and the vCPUs' KVM
//! state), `devices/` (serial, i8042, virtio over MMIO, the `Persist`
//! trait), `vm` (building a VM, fresh or from saved states), `slots` (the
//! virtio slot table), `vcpu` (vCPU threads, pause/resume), `memory`
//! (guest RAM in a snapshot), `jail`, `pid_namespace` and `proc_self` (the VMM's confinement), `snapshot` (save/restore orchestration),
//! `control` (the control socket), `cli` and `config` (what a VM is made
//! of), `boot_marker` (boot timing).

pub mod arch;
pub mod boot_marker;
pub mod cli;
pub mod config;
pub mod confined;
pub mod control;
pub mod devices;
pub mod jail;
pub mod logger;
pub mod memory;
pub mod pid_namespace;
pub mod proc_self;
pub mod profile;
pub mod seccomp;
pub mod slots;
pub mod snapshot;
pub mod template;
#[cfg(test)]
mod test_child;
pub mod vcpu;
pub mod vm;

/// The VMM's one error type; every variant says what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("cannot open /dev/kvm: {source} (is KVM available and are you allowed to use it?)")]
    OpenKvm {
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM lacks a capability thaw needs: {0}")]
    MissingCapability(&'static str),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    GuestMemory(#[source] vm_memory::mmap::FromRangesError),
    #[error("guest memory: initramfs: {source}")]
    Initramfs {
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("loading kernel {path}: {source}")]
    Kernel {
        path: std::path::PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("device setup: {0}")]
    Device(#[from] vm::DeviceError),
    #[error(transparent)]
    Bus(#[from] devices::BusError),
    #[error(transparent)]
    Arch(#[from] arch::ArchError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error("snapshot {dir}: {source}")]
    Snapshot {
        dir: std::path::PathBuf,
        #[source]
        source: snapshot::SnapshotError,
    },
    #[error("template: {0}")]
    TemplateStore(#[from] thaw_snapshots::Error),
    #[error("template: {source}{diagnostics}")]
    TemplateBuild {
        #[source]
        source: template::BuildError,
        /// The tails of the VMM's stderr and the guest console.
        diagnostics: String,
    },
}

/// Resident memory of this process in KiB: (the VMM's own, guest RAM),
/// split by whether a mapping lies inside one of `guest_ram` host ranges.
pub fn memory_usage(guest_ram: &[(u64, u64)]) -> std::io::Result<(u64, u64)> {
    let smaps = proc_self::smaps()?;
    let (mut own, mut guest) = (0, 0);
    let mut in_guest = false;
    for line in smaps.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            let kib: u64 = rss
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            if in_guest {
                guest += kib;
            } else {
                own += kib;
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    in_guest = guest_ram.iter().any(|(s, e)| a >= *s && b <= *e);
                }
            }
        }
    }
    Ok((own, guest))
}
