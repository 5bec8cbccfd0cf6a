//! Saving a paused VM to a snapshot directory and rebuilding a VM from one.
//!
//! The state is plain data: KVM's own structs (serde via kvm-bindings) and
//! the devices' state structs. The file format (version, checksum, CPU
//! check) is `thaw_snapshots::format`; guest RAM goes to a separate file
//! that restore maps copy-on-write (`MAP_PRIVATE`), so every VM restored
//! from one snapshot shares its pages in the host page cache.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use thaw_snapshots::{read_state, write_state, CpuFingerprint, MEMORY_FILE, STATE_FILE};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::config::{DiskConfig, SerialOutput, VmConfig, VsockConfig};
use crate::devices::legacy::{Serial, SerialSnapshot};
use crate::devices::virtio::block::{Block, BlockState};
use crate::devices::virtio::mmio::{MmioError, MmioState, MmioTransport};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockState};
use crate::vcpu::{RunControl, VcpuError};
use crate::vm::{lock, DeviceError, VirtioHandle, Vm};
use crate::Error;

#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    pub config: VmConfig,
    pub memory: Vec<MemoryRegionState>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    pub virtio: Vec<VirtioSlotState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryRegionState {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VirtioSlotState {
    pub name: String,
    pub base: u64,
    pub irq: u32,
    pub transport: MmioState,
    pub device: DeviceState,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DeviceState {
    Block(BlockState),
    Vsock(VsockState),
    Rng,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Format(#[from] thaw_snapshots::Error),
    #[error("device {name}: {source}")]
    Device {
        name: String,
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
        device: String,
        #[source]
        source: MmioError,
    },
    #[error("resuming {device}: {source}")]
    ResumeDevice {
        device: String,
        #[source]
        source: MmioError,
    },
}

/// KVM_GET_XSAVE copies 4 KiB. A guest needs more only with dynamic XSAVE
/// features (AMX), which thaw never asks KVM to permit and hides from the
/// guest's CPUID; if a kernel hands them out anyway, refuse rather than
/// save a truncated FPU state. `needed` is KVM_CAP_XSAVE2 (0 when the
/// kernel predates it).
fn check_xsave_fits(needed: i32) -> Result<(), SnapshotError> {
    let room = std::mem::size_of::<kvm_xsave>();
    if usize::try_from(needed).unwrap_or(0) > room {
        return Err(SnapshotError::Unsupported(format!(
            "the guest's XSAVE state needs {needed} bytes and KVM_GET_XSAVE holds {room} \
             (dynamic features such as AMX are enabled)"
        )));
    }
    Ok(())
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { what, source }
}

/// MSR_IA32_TSC must be set before MSR_IA32_TSC_DEADLINE, or the deadline
/// is computed against a stale TSC.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

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
    slots: Vec<(String, u64, u32, VirtioHandle)>,
}

impl VmHandle {
    pub fn new(vm: &Vm) -> Result<Self, Error> {
        let msr_indices = vm
            .kvm
            .get_msr_index_list()
            .map_err(|source| Error::Kvm {
                what: "KVM_GET_MSR_INDEX_LIST",
                source,
            })?
            .as_slice()
            .to_vec();
        Ok(Self {
            run: vm.control.clone(),
            vm_fd: vm.fd.clone(),
            vcpus: vm.vcpus.clone(),
            msr_indices,
            mem: vm.mem.clone(),
            config: vm.config.clone(),
            serial: vm.serial.clone(),
            slots: vm
                .virtio
                .iter()
                .map(|s| (s.name.clone(), s.base, s.irq, s.handle.clone()))
                .collect(),
        })
    }

    /// Stops the vCPUs, then the device workers.
    pub fn pause(&self) -> Result<(), PauseResumeError> {
        self.run.pause()?;
        for (name, _, _, h) in &self.slots {
            h.pause().map_err(|source| PauseResumeError::PauseDevice {
                device: name.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Restarts the device workers, then the vCPUs.
    pub fn resume(&self) -> Result<(), PauseResumeError> {
        for (name, _, _, h) in &self.slots {
            h.resume()
                .map_err(|source| PauseResumeError::ResumeDevice {
                    device: name.clone(),
                    source,
                })?;
        }
        Ok(self.run.resume()?)
    }

    /// Pauses the VM (it stays paused) and writes `dir/state` and
    /// `dir/memory`. Returns the sizes written.
    pub fn snapshot(&self, dir: &Path) -> Result<(u64, u64), SnapshotError> {
        thaw_snapshots::private::create_dir_all(dir)
            .map_err(io_err(format!("creating {}", dir.display())))?;
        self.pause().map_err(SnapshotError::Pause)?;

        let vm = self.vm_state()?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for fd in &self.vcpus {
            vcpus.push(self.vcpu_state(&lock(fd))?);
        }
        let serial = match &self.serial {
            Some(s) => lock(s).state(),
            None => return Err(SnapshotError::Mismatch("VM has no serial device".into())),
        };
        let mut virtio = Vec::with_capacity(self.slots.len());
        for (name, base, irq, h) in &self.slots {
            let (transport, device) = match h {
                VirtioHandle::Block(t) => {
                    let t = lock(t);
                    (t.state(), DeviceState::Block(t.device().state()))
                }
                VirtioHandle::Vsock(t) => {
                    let t = lock(t);
                    (t.state(), DeviceState::Vsock(t.device().state()))
                }
                VirtioHandle::Rng(t) => (lock(t).state(), DeviceState::Rng),
            };
            let transport = transport.map_err(|source| SnapshotError::Device {
                name: name.clone(),
                source,
            })?;
            virtio.push(VirtioSlotState {
                name: name.clone(),
                base: *base,
                irq: *irq,
                transport,
                device,
            });
        }

        let memory_path = dir.join(MEMORY_FILE);
        let (memory, memory_bytes) = write_memory(&self.mem, &memory_path)?;
        let state = MicrovmState {
            config: self.config.clone(),
            memory,
            vm,
            vcpus,
            serial,
            virtio,
        };
        let state_path = dir.join(STATE_FILE);
        write_state(&state_path, &CpuFingerprint::host(), &state)?;
        let state_bytes = std::fs::metadata(&state_path).map(|m| m.len()).unwrap_or(0);
        Ok((state_bytes, memory_bytes))
    }

    fn vm_state(&self) -> Result<VmState, SnapshotError> {
        let chip = |id| -> Result<kvm_irqchip, SnapshotError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.vm_fd
                .get_irqchip(&mut c)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.vm_fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: self.vm_fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        })
    }

    fn vcpu_state(&self, fd: &VcpuFd) -> Result<VcpuState, SnapshotError> {
        // MP state first, vCPU events last.
        let mp_state = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        check_xsave_fits(self.vm_fd.check_extension_int(kvm_ioctls::Cap::Xsave2))?;
        let xsave = fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
        let debug_regs = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        let msrs = read_msrs(fd, &self.msr_indices)?;
        let tsc_khz = fd.get_tsc_khz().ok();
        let events = fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
            tsc_khz,
        })
    }
}

/// Reads every MSR KVM lists that it can actually read; KVM stops at the
/// first one it refuses, so that one is dropped and the rest retried.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut wanted: Vec<u32> = indices.to_vec();
    loop {
        let entries: Vec<kvm_msr_entry> = wanted
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| {
            SnapshotError::Mismatch(format!("{} MSRs do not fit a KVM call", entries.len()))
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        if read == wanted.len() {
            let mut out = msrs.as_slice().to_vec();
            // TSC first, TSC deadline last: the order restore must use.
            out.sort_by_key(|e| match e.index {
                MSR_IA32_TSC => 0,
                MSR_IA32_TSC_DEADLINE => 2,
                _ => 1,
            });
            return Ok(out);
        }
        wanted.remove(read);
    }
}

/// Writes guest RAM to `path`, skipping all-zero pages so the file stays
/// sparse (a fresh guest is mostly zeros).
fn write_memory(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<(Vec<MemoryRegionState>, u64), SnapshotError> {
    const PAGE: usize = 4096;
    let tmp = path.with_extension("tmp");
    let file = thaw_snapshots::private::create_file(&tmp)
        .map_err(io_err(format!("creating {}", tmp.display())))?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let size = region.len();
        // SAFETY: the region is mapped for `size` bytes for the life of the
        // VM, and the vCPUs and devices are paused, so nothing writes it now.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), size as usize) };
        for (i, page) in bytes.chunks(PAGE).enumerate() {
            if page.iter().all(|b| *b == 0) {
                continue;
            }
            file.write_all_at(page, offset + (i * PAGE) as u64)
                .map_err(io_err(format!("writing {}", tmp.display())))?;
            written += page.len() as u64;
        }
        regions.push(MemoryRegionState {
            guest_addr: region.start_addr().raw_value(),
            size,
            file_offset: offset,
        });
        offset += size;
    }
    file.set_len(offset)
        .map_err(io_err(format!("sizing {}", tmp.display())))?;
    file.sync_all()
        .map_err(io_err(format!("syncing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io_err(format!("renaming {}", tmp.display())))?;
    Ok((regions, written))
}

/// Maps the snapshot's memory file copy-on-write: pages are shared with
/// every other VM restored from it until the guest writes them.
fn map_memory(
    path: &Path,
    regions: &[MemoryRegionState],
) -> Result<GuestMemoryMmap, SnapshotError> {
    let file = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let len = file
        .metadata()
        .map_err(io_err(format!("reading {}", path.display())))?
        .len();
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        if r.file_offset
            .checked_add(r.size)
            .is_none_or(|end| end > len)
        {
            return Err(SnapshotError::Mismatch(format!(
                "memory file {} is {len} bytes, the state expects more",
                path.display()
            )));
        }
        let file = file
            .try_clone()
            .map_err(io_err("duplicating memory file".into()))?;
        let region = MmapRegionBuilder::new(r.size as usize)
            .with_file_offset(FileOffset::new(file, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::Mismatch(format!("mapping guest memory: {e}")))?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
            .ok_or_else(|| SnapshotError::Mismatch("guest memory region overflows".into()))?;
        mapped.push(region);
    }
    GuestMemoryMmap::from_regions(mapped)
        .map_err(|e| SnapshotError::Mismatch(format!("guest memory layout: {e}")))
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
    let mut config = state.config.clone();
    if opts.disks.len() > config.disks.len() {
        return Err(snap_err(SnapshotError::Mismatch(format!(
            "{} disks given, the snapshot has {}",
            opts.disks.len(),
            config.disks.len()
        ))));
    }
    for (slot, d) in opts.disks.iter().enumerate() {
        config.disks[slot] = d.clone();
    }
    if let (Some(v), Some(uds)) = (config.vsock.as_mut(), &opts.vsock_uds) {
        v.uds_path = uds.clone();
    }
    if let Some(s) = &opts.serial {
        config.serial = s.clone();
    }
    config.api_socket = opts.api_socket.clone();

    let mem = map_memory(&opts.snapshot.join(MEMORY_FILE), &state.memory).map_err(snap_err)?;
    let mut vm = Vm::create_with_memory(config.clone(), mem)?;
    vm.attach_legacy_devices(Some(&state.serial))?;
    let mut disk_index = 0;
    for slot in &state.virtio {
        let mem = vm.mem.clone();
        let name = || slot.name.clone();
        match &slot.device {
            DeviceState::Block(b) => {
                // Disks get their paths. Spare slots come back empty; one
                // that held a disk when saved has no path to reopen, so the
                // restore is refused (MissingPath) rather than pulling a
                // mounted filesystem from under the guest.
                let path = if slot.name.starts_with("disk") {
                    let p = config.disks.get(disk_index).map(|d| d.path.clone());
                    disk_index += 1;
                    p
                } else {
                    None
                };
                let dev = Block::from_state(b, path.as_deref()).map_err(|source| {
                    DeviceError::DiskState {
                        name: name(),
                        source,
                    }
                })?;
                let t = MmioTransport::from_state(mem, dev, &slot.transport);
                vm.add_virtio(slot.name.clone(), t, VirtioHandle::Block)?;
            }
            DeviceState::Vsock(v) => {
                let uds = match &config.vsock {
                    Some(VsockConfig { uds_path, .. }) => uds_path.clone(),
                    None => return Err(DeviceError::NoVsockSocket(name()).into()),
                };
                let dev = Vsock::from_state(v, &uds).map_err(|source| DeviceError::VsockState {
                    name: name(),
                    source,
                })?;
                let t = MmioTransport::from_state(mem, dev, &slot.transport);
                vm.add_virtio(slot.name.clone(), t, VirtioHandle::Vsock)?;
            }
            DeviceState::Rng => {
                let t = MmioTransport::from_state(mem, Rng::new(), &slot.transport);
                vm.add_virtio(slot.name.clone(), t, VirtioHandle::Rng)?;
            }
        }
        let placed = vm.virtio.last().map(|s| (s.base, s.irq));
        if placed != Some((slot.base, slot.irq)) {
            return Err(DeviceError::Misplaced {
                name: name(),
                placed,
                base: slot.base,
                irq: slot.irq,
            }
            .into());
        }
    }
    restore_vm_state(&vm.fd, &state.vm).map_err(snap_err)?;
    for (id, s) in state.vcpus.iter().enumerate() {
        let fd = vm.fd.create_vcpu(id as u64).map_err(|source| Error::Kvm {
            what: "KVM_CREATE_VCPU",
            source,
        })?;
        restore_vcpu(&fd, s).map_err(snap_err)?;
        vm.vcpus.push(Arc::new(Mutex::new(fd)));
    }
    for s in &vm.virtio {
        s.handle.resume().map_err(|source| DeviceError::Resume {
            name: s.name.clone(),
            source,
        })?;
    }
    Ok(vm)
}

fn restore_vm_state(fd: &VmFd, s: &VmState) -> Result<(), SnapshotError> {
    fd.set_pit2(&s.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    // Without KVM_CLOCK_REALTIME KVM takes the saved kvmclock value as is:
    // the guest's monotonic clock continues where it stopped instead of
    // jumping by the time the snapshot sat on disk.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        flags: 0,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        fd.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// The order matters: CPUID, MP state, regs, sregs,
/// XSAVE, XCRs, debug regs, LAPIC, MSRs (TSC before TSC deadline), vCPU
/// events, then tell the guest's kvmclock it was paused.
fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), SnapshotError> {
    let cpuid = CpuId::from_entries(&s.cpuid)
        .map_err(|_| SnapshotError::Mismatch("CPUID has too many entries".into()))?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    if let Some(khz) = s.tsc_khz {
        // Hosts with another TSC frequency may refuse; the guest then sees
        // its clock rate change, which kvmclock tolerates.
        if let Err(e) = fd.set_tsc_khz(khz) {
            log::warn!("KVM_SET_TSC_KHZ {khz}: {e}");
        }
    }
    fd.set_mp_state(s.mp_state)
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    // SAFETY: the buffer came from KVM_GET_XSAVE of the same size on a host
    // with the same CPU (checked by the fingerprint).
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debug_regs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    let msrs =
        Msrs::from_entries(&s.msrs).map_err(|_| SnapshotError::Mismatch("too many MSRs".into()))?;
    let set = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if set != s.msrs.len() {
        return Err(SnapshotError::Mismatch(format!(
            "KVM refused MSR {:#x}",
            s.msrs[set].index
        )));
    }
    fd.set_vcpu_events(&s.events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    // Fails when the guest has not enabled kvmclock: nothing to tell then.
    let _ = fd.kvmclock_ctrl();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xsave_state_over_4k_is_refused_by_name() {
        assert!(
            check_xsave_fits(0).is_ok(),
            "kernels without KVM_CAP_XSAVE2"
        );
        assert!(check_xsave_fits(2696).is_ok());
        assert!(check_xsave_fits(4096).is_ok());
        let e = check_xsave_fits(11008).unwrap_err().to_string();
        assert!(e.contains("11008") && e.contains("AMX"), "{e}");
    }
}
