//! Saving a paused VM to a snapshot directory and rebuilding a VM from one.
//!
//! Only the orchestration lives here: pause, collect every component's
//! state, write the files; read them, rebuild, resume. Each component owns
//! its state, a plain serde struct kept next to it: the devices and the
//! virtio transport (`devices::Persist`), the slot table (`slots`), the
//! VM's and the vCPUs' KVM state (`arch::vm`, `arch::vcpu`), guest RAM
//! (`memory`, a separate file that restore maps copy-on-write). The file
//! format (version, checksum, CPU check) is `thaw_snapshots::format`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use thaw_snapshots::{read_state, write_state, CpuFingerprint, MEMORY_FILE, STATE_FILE};
use vm_memory::GuestMemoryMmap;

use crate::arch::vcpu::VcpuState;
use crate::arch::vm::VmState;
use crate::arch::{self, ArchError};
use crate::config::{DiskConfig, SerialOutput, VmConfig};
use crate::devices::legacy::{I8042State, Serial, SerialState, I8042};
use crate::devices::virtio::mmio::MmioError;
use crate::devices::Persist;
use crate::memory::{self, MemoryError, MemoryRegionState};
use crate::slots::{SlotRole, VirtioSlot, VirtioSlotState};
use crate::vcpu::{RunControl, VcpuError};
use crate::vm::{lock, Vm};
use crate::Error;

/// Everything a snapshot's state file holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    pub config: VmConfig,
    pub memory: Vec<MemoryRegionState>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialState,
    pub i8042: I8042State,
    /// In slot order: restore hands slots out in the same order.
    pub virtio: Vec<VirtioSlotState>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Format(#[from] thaw_snapshots::Error),
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("device {slot}: {source}")]
    Device {
        slot: SlotRole,
        #[source]
        source: MmioError,
    },
    #[error("pausing the VM: {0}")]
    Pause(#[source] PauseResumeError),
    #[error("snapshot does not match: {0}")]
    Mismatch(String),
    #[error("cannot snapshot this VM: {0}")]
    Unsupported(String),
}

/// Why the VM could not be paused or resumed.
#[derive(Debug, thiserror::Error)]
pub enum PauseResumeError {
    #[error(transparent)]
    Vcpus(#[from] VcpuError),
    #[error("pausing {device}: {source}")]
    PauseDevice {
        device: SlotRole,
        #[source]
        source: MmioError,
    },
    #[error("resuming {device}: {source}")]
    ResumeDevice {
        device: SlotRole,
        #[source]
        source: MmioError,
    },
}

/// Everything needed to save (and pause/resume) a running VM, shared with
/// the control socket thread.
pub struct VmHandle {
    pub run: Arc<RunControl>,
    vm_fd: Arc<VmFd>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    msr_indices: Vec<u32>,
    mem: GuestMemoryMmap,
    config: VmConfig,
    serial: Option<Arc<Mutex<Serial>>>,
    i8042: Option<Arc<Mutex<I8042>>>,
    slots: Vec<VirtioSlot>,
}

impl VmHandle {
    pub fn new(vm: &Vm) -> Result<Self, Error> {
        Ok(Self {
            run: vm.control.clone(),
            vm_fd: vm.fd.clone(),
            vcpus: vm.vcpus.clone(),
            msr_indices: arch::vcpu::msr_index_list(&vm.kvm)?,
            mem: vm.mem.clone(),
            config: vm.config.clone(),
            serial: vm.serial.clone(),
            i8042: vm.i8042.clone(),
            slots: vm.virtio.clone(),
        })
    }

    /// Stops the vCPUs, then the device workers.
    pub fn pause(&self) -> Result<(), PauseResumeError> {
        self.run.pause()?;
        for s in &self.slots {
            s.handle
                .pause()
                .map_err(|source| PauseResumeError::PauseDevice {
                    device: s.role,
                    source,
                })?;
        }
        Ok(())
    }

    /// Restarts the device workers, then the vCPUs.
    pub fn resume(&self) -> Result<(), PauseResumeError> {
        for s in &self.slots {
            s.handle
                .resume()
                .map_err(|source| PauseResumeError::ResumeDevice {
                    device: s.role,
                    source,
                })?;
        }
        Ok(self.run.resume()?)
    }

    /// Pauses the VM (it stays paused) and writes `dir/state` and
    /// `dir/memory`. Returns the sizes written.
    pub fn snapshot(&self, dir: &Path) -> Result<(u64, u64), SnapshotError> {
        thaw_snapshots::private::create_dir_all(dir).map_err(|source| SnapshotError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        self.pause().map_err(SnapshotError::Pause)?;

        let vm = arch::vm::save(&self.vm_fd)?;
        let vcpus = self
            .vcpus
            .iter()
            .map(|fd| arch::vcpu::save(&lock(fd), &self.vm_fd, &self.msr_indices))
            .collect::<Result<Vec<_>, _>>()?;
        let (Some(serial), Some(i8042)) = (&self.serial, &self.i8042) else {
            return Err(SnapshotError::Mismatch(
                "VM has no serial or i8042 device".into(),
            ));
        };
        let serial = lock(serial).save().map_err(|source| SnapshotError::Io {
            what: "serial state".into(),
            source,
        })?;
        let Ok(i8042) = lock(i8042).save();
        let virtio = self
            .slots
            .iter()
            .map(|s| {
                s.save().map_err(|source| SnapshotError::Device {
                    slot: s.role,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (memory, memory_bytes) = memory::save(&self.mem, &dir.join(MEMORY_FILE))?;

        let state = MicrovmState {
            config: self.config.clone(),
            memory,
            vm,
            vcpus,
            serial,
            i8042,
            virtio,
        };
        let state_path = dir.join(STATE_FILE);
        write_state(&state_path, &CpuFingerprint::host(), &state)?;
        let state_bytes = std::fs::metadata(&state_path).map(|m| m.len()).unwrap_or(0);
        Ok((state_bytes, memory_bytes))
    }
}

/// What a restore may change: the host-side resources of the new VM.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub snapshot: PathBuf,
    pub vsock_uds: Option<PathBuf>,
    /// Replaces the snapshot's disks in order (same count or fewer).
    pub disks: Vec<DiskConfig>,
    pub serial: Option<SerialOutput>,
    pub api_socket: Option<PathBuf>,
    /// The tap for the NIC (none: bind one later with `attach_tap`).
    pub tap: Option<String>,
    /// The directory the virtio-fs device exports (none: attach one later
    /// with `attach_share`).
    pub share: Option<crate::config::ShareConfig>,
}

impl RestoreOptions {
    /// The saved configuration with these host resources in place of the
    /// saved ones.
    fn apply(&self, saved: &VmConfig) -> Result<VmConfig, SnapshotError> {
        let mut config = saved.clone();
        if self.disks.len() > config.disks.len() {
            return Err(SnapshotError::Mismatch(format!(
                "{} disks given, the snapshot has {}",
                self.disks.len(),
                config.disks.len()
            )));
        }
        for (slot, d) in self.disks.iter().enumerate() {
            config.disks[slot] = d.clone();
        }
        if let (Some(v), Some(uds)) = (config.vsock.as_mut(), &self.vsock_uds) {
            v.uds_path = uds.clone();
        }
        if let Some(s) = &self.serial {
            config.serial = s.clone();
        }
        config.api_socket = self.api_socket.clone();
        config.tap = self.tap.clone();
        config.share = self.share.clone();
        Ok(config)
    }
}

/// Builds a VM from a snapshot, ready to `start`. Nothing is half-loaded:
/// the state file is fully checked before any KVM object exists.
pub fn restore(opts: &RestoreOptions) -> Result<Vm, Error> {
    let snap_err = |source: SnapshotError| Error::Snapshot {
        dir: opts.snapshot.clone(),
        source,
    };
    let state: MicrovmState = read_state(&opts.snapshot.join(STATE_FILE), &CpuFingerprint::host())
        .map_err(|e| snap_err(e.into()))?;
    let config = opts.apply(&state.config).map_err(snap_err)?;
    if state.vcpus.len() != usize::from(config.vcpus) {
        return Err(snap_err(SnapshotError::Mismatch(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            config.vcpus
        ))));
    }
    let mem = memory::restore(&opts.snapshot.join(MEMORY_FILE), &state.memory)
        .map_err(|e| snap_err(e.into()))?;

    let mut vm = Vm::create_with_memory(config, mem)?;
    vm.attach_legacy_devices(Some(&state.serial), Some(&state.i8042))?;
    for slot in &state.virtio {
        vm.restore_virtio(slot)?;
    }
    arch::vm::restore(&vm.fd, &state.vm).map_err(|e| snap_err(e.into()))?;
    for (id, s) in (0u8..).zip(&state.vcpus) {
        let fd = vm.create_vcpu(id)?;
        arch::vcpu::restore(&fd, s).map_err(|e| snap_err(e.into()))?;
        vm.vcpus.push(Arc::new(Mutex::new(fd)));
    }
    vm.resume_virtio()?;
    Ok(vm)
}
