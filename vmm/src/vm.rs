//! Building and running one VM: KVM objects, guest memory, devices, the
//! kernel, vCPUs. The finished `Vm` is driven by `run`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::arch::{self, boot_params, layout, mptable, regs};
use crate::boot_marker::{BootMarker, BootTimes};
use crate::config::{PvmQuirks, SerialOutput, VmConfig};
use crate::devices::legacy::{
    BoundedOutput, I8042State, Serial, SerialResources, SerialState, I8042,
};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::fs::{Fs, FsError, DEFAULT_TAG};
use crate::devices::virtio::mmio::{MmioError, MmioResources, MmioTransport};
use crate::devices::virtio::net::{Net, NetError, Tap};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::devices::virtio::VirtioDevice;
use crate::devices::{Bus, Persist};
use crate::slots::{SlotRole, VirtioHandle, VirtioSlot, VirtioSlotState, VirtioState};
use crate::vcpu::{RunControl, Vcpu, VmExit};
use crate::Error;

/// thaw's guest command line (kernel-config/cmdline*.txt, through the
/// thaw-kernel-config crate); PVM hosts get the extra workarounds.
const BASE_CMDLINE: &str = thaw_kernel_config::CMDLINE;
const PVM_CMDLINE: &str = thaw_kernel_config::CMDLINE_PVM;

const SERIAL_PORT: u64 = 0x3f8;
const I8042_PORT: u64 = 0x60;

/// A kernel-config/cmdline*.txt file as one line: `#` lines are comments.
fn cmdline_words(file: &str) -> String {
    let words = file
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(str::split_whitespace);
    words.collect::<Vec<_>>().join(" ")
}

/// thaw's own part of the guest command line on this host (what a
/// template's snapshot has baked in, so it is part of the template key).
pub fn default_guest_cmdline(pvm_quirks: bool) -> String {
    let mut c = cmdline_words(BASE_CMDLINE);
    if pvm_quirks {
        c += " ";
        c += &cmdline_words(PVM_CMDLINE);
    }
    c
}

/// Is this host's KVM the PVM flavour (guest kernel emulated)?
/// Looked up once: a jailed VMM no longer sees `/sys`.
pub fn host_is_pvm() -> bool {
    static PVM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PVM.get_or_init(|| Path::new("/sys/module/kvm_pvm").exists())
}

/// Fills a spare disk slot: `(slot, image, read_only)`.
pub type DiskAttacher = Box<dyn Fn(usize, &Path, bool) -> Result<(), AttachError> + Send + Sync>;

/// Binds the NIC to a tap, by interface name.
pub type TapAttacher = Box<dyn Fn(&str) -> Result<(), AttachError> + Send + Sync>;

/// Exports a host directory through virtio-fs: `(dir, read_only)`.
pub type ShareAttacher = Box<dyn Fn(&Path, bool) -> Result<(), AttachError> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("no spare disk slot {slot} (there are {count})")]
    NoSlot { slot: usize, count: usize },
    #[error(transparent)]
    Disk(#[from] BlockError),
    #[error("this VM has no NIC")]
    NoNic,
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("this VM has no virtio-fs device")]
    NoFs,
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// A device that could not be created, restored or started.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("disk {path}: {source}")]
    Disk {
        path: PathBuf,
        #[source]
        source: BlockError,
    },
    #[error("vsock {path}: {source}")]
    Vsock {
        path: PathBuf,
        #[source]
        source: VsockError,
    },
    #[error("NIC: {0}")]
    Net(#[source] NetError),
    #[error("virtio-fs: {0}")]
    Fs(#[source] FsError),
    #[error("serial eventfd: {0}")]
    SerialEventFd(#[source] std::io::Error),
    #[error("serial from snapshot: {0}")]
    SerialState(#[source] std::io::Error),
    #[error("no IRQ left for {0}")]
    NoIrq(SlotRole),
    #[error("{slot}: {source}")]
    Transport {
        slot: SlotRole,
        #[source]
        source: MmioError,
    },
    #[error("{slot} from snapshot: {source}")]
    Restore {
        slot: SlotRole,
        #[source]
        source: MmioError,
    },
    #[error("{slot} from snapshot: it holds a {kind} device")]
    WrongKind { slot: SlotRole, kind: &'static str },
    #[error("{0} from snapshot: no vsock socket configured")]
    NoVsockSocket(SlotRole),
    #[error("{slot} from snapshot: landed at {placed:?}, saved at {base:#x}/{irq}")]
    Misplaced {
        slot: SlotRole,
        placed: Option<(u64, u32)>,
        base: u64,
        irq: u32,
    },
    #[error("resuming {slot}: {source}")]
    Resume {
        slot: SlotRole,
        #[source]
        source: MmioError,
    },
}

pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Vm {
    pub config: VmConfig,
    pub kvm: Kvm,
    pub fd: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    pub io_bus: Bus,
    pub mmio_bus: Bus,
    pub vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    pub virtio: Vec<VirtioSlot>,
    /// Empty disk slots, filled through the control socket.
    pub spare_disks: Vec<Arc<Mutex<MmioTransport<Block>>>>,
    /// The NIC, whose tap the control socket can bind.
    pub net: Option<Arc<Mutex<MmioTransport<Net>>>>,
    /// The virtio-fs device, whose share the control socket can attach.
    pub fs: Option<Arc<Mutex<MmioTransport<Fs>>>>,
    pub serial: Option<Arc<Mutex<Serial>>>,
    pub i8042: Option<Arc<Mutex<I8042>>>,
    pub times: BootTimes,
    pub control: Arc<RunControl>,
    cmdline: String,
    exit_tx: Option<mpsc::Sender<VmExit>>,
}

fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

impl Vm {
    /// Creates the KVM VM with fresh (zeroed) memory, interrupt controllers
    /// and timer.
    pub fn create(config: VmConfig) -> Result<Self, Error> {
        config.validate()?;
        let mem = GuestMemoryMmap::from_ranges(&boot_params::ram_ranges(config.memory_bytes()))
            .map_err(Error::GuestMemory)?;
        Self::create_with_memory(config, mem)
    }

    /// Like `create`, with guest memory supplied (a snapshot's, mapped
    /// copy-on-write).
    pub fn create_with_memory(config: VmConfig, mem: GuestMemoryMmap) -> Result<Self, Error> {
        let kvm = Kvm::new().map_err(|source| Error::OpenKvm { source })?;
        for (cap, name) in [
            (Cap::Irqchip, "in-kernel irqchip"),
            (Cap::Ioeventfd, "ioeventfd"),
            (Cap::Irqfd, "irqfd"),
            (Cap::UserMemory, "user memory"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCapability(name));
            }
        }
        let fd = kvm.create_vm().map_err(kvm_error("KVM_CREATE_VM"))?;
        arch::vm::setup(&fd)?;
        register_memory(&fd, &mem)?;

        Ok(Self {
            config,
            kvm,
            fd: Arc::new(fd),
            mem,
            io_bus: Bus::new(),
            mmio_bus: Bus::new(),
            vcpus: Vec::new(),
            virtio: Vec::new(),
            spare_disks: Vec::new(),
            net: None,
            fs: None,
            serial: None,
            i8042: None,
            times: BootTimes::default(),
            control: RunControl::new(),
            cmdline: String::new(),
            exit_tx: None,
        })
    }

    fn pvm_quirks(&self) -> bool {
        match self.config.pvm_quirks {
            PvmQuirks::On => true,
            PvmQuirks::Off => false,
            PvmQuirks::Auto => host_is_pvm(),
        }
    }

    /// Serial console, i8042 (for reset), boot marker, virtio devices.
    pub fn attach_devices(&mut self) -> Result<(), Error> {
        self.attach_legacy_devices(None, None)?;
        let mem = self.mem.clone();
        for (i, disk) in (0u8..).zip(self.config.disks.clone()) {
            let dev =
                Block::new(&disk.path, disk.read_only).map_err(|source| DeviceError::Disk {
                    path: disk.path.clone(),
                    source,
                })?;
            let slot = SlotRole::Disk(i);
            self.add_virtio(slot, new_transport(&mem, slot, dev)?, VirtioHandle::Block)?;
        }
        for i in 0..self.config.spare_disks {
            let slot = SlotRole::SpareDisk(i);
            let t = new_transport(&mem, slot, Block::empty())?;
            self.add_virtio(slot, t, VirtioHandle::Block)?;
        }
        if let Some(v) = self.config.vsock.clone() {
            let dev =
                Vsock::new(v.guest_cid, &v.uds_path).map_err(|source| DeviceError::Vsock {
                    path: v.uds_path.clone(),
                    source,
                })?;
            let slot = SlotRole::Vsock;
            self.add_virtio(slot, new_transport(&mem, slot, dev)?, VirtioHandle::Vsock)?;
        }
        let slot = SlotRole::Rng;
        self.add_virtio(
            slot,
            new_transport(&mem, slot, Rng::new())?,
            VirtioHandle::Rng,
        )?;
        let mut net = Net::new(self.config.net_mac).map_err(DeviceError::Net)?;
        if let Some(name) = &self.config.tap {
            net.attach_tap(name).map_err(DeviceError::Net)?;
        }
        let slot = SlotRole::Net;
        self.add_virtio(slot, new_transport(&mem, slot, net)?, VirtioHandle::Net)?;
        let mut fs = Fs::new(DEFAULT_TAG).map_err(DeviceError::Fs)?;
        if let Some(s) = &self.config.share {
            fs.attach_share(&s.dir, s.read_only)
                .map_err(DeviceError::Fs)?;
        }
        let slot = SlotRole::Fs;
        self.add_virtio(slot, new_transport(&mem, slot, fs)?, VirtioHandle::Fs)
    }

    /// Puts a saved virtio device back, in its saved slot, on the host
    /// resources its role names in this VM's configuration. Paused, like
    /// every restored device: see [`Vm::resume_virtio`].
    pub fn restore_virtio(&mut self, saved: &VirtioSlotState) -> Result<(), Error> {
        let slot = saved.role;
        let mem = self.mem.clone();
        let restored = |source| DeviceError::Restore { slot, source };
        let wrong_kind = |kind| DeviceError::WrongKind { slot, kind };
        match &saved.state {
            VirtioState::Block(state) => {
                // Disks get their paths. Spare slots come back empty; one
                // that held a disk when saved has no path to reopen, so the
                // restore is refused (MissingPath) rather than pulling a
                // mounted filesystem from under the guest.
                let image = match slot {
                    SlotRole::Disk(n) => self.config.disks.get(usize::from(n)),
                    SlotRole::SpareDisk(_) => None,
                    _ => return Err(wrong_kind("block").into()),
                };
                let device = image.map(|d| d.path.clone());
                let t = MmioTransport::<Block>::restore(state, MmioResources { mem, device })
                    .map_err(restored)?;
                self.add_virtio(slot, t, VirtioHandle::Block)?;
            }
            VirtioState::Vsock(state) => {
                if slot != SlotRole::Vsock {
                    return Err(wrong_kind("vsock").into());
                }
                let Some(v) = &self.config.vsock else {
                    return Err(DeviceError::NoVsockSocket(slot).into());
                };
                let device = v.uds_path.clone();
                let t = MmioTransport::<Vsock>::restore(state, MmioResources { mem, device })
                    .map_err(restored)?;
                self.add_virtio(slot, t, VirtioHandle::Vsock)?;
            }
            VirtioState::Rng(state) => {
                if slot != SlotRole::Rng {
                    return Err(wrong_kind("rng").into());
                }
                let t = MmioTransport::<Rng>::restore(state, MmioResources { mem, device: () })
                    .map_err(restored)?;
                self.add_virtio(slot, t, VirtioHandle::Rng)?;
            }
            VirtioState::Net(state) => {
                if slot != SlotRole::Net {
                    return Err(wrong_kind("net").into());
                }
                // The tap is this VM's, by its own configuration.
                let device = match &self.config.tap {
                    Some(name) => {
                        Some(Tap::open(name).map_err(|e| DeviceError::Net(NetError::Tap(e)))?)
                    }
                    None => None,
                };
                let t = MmioTransport::<Net>::restore(state, MmioResources { mem, device })
                    .map_err(restored)?;
                self.add_virtio(slot, t, VirtioHandle::Net)?;
            }
            VirtioState::Fs(state) => {
                if slot != SlotRole::Fs {
                    return Err(wrong_kind("fs").into());
                }
                // The share is this VM's, by its own configuration; the
                // device refuses a state the guest had mounted.
                let device = self.config.share.clone();
                let t = MmioTransport::<Fs>::restore(state, MmioResources { mem, device })
                    .map_err(restored)?;
                self.add_virtio(slot, t, VirtioHandle::Fs)?;
            }
        }
        let placed = self.virtio.last().map(|s| (s.base, s.irq));
        if placed != Some((saved.base, saved.irq)) {
            return Err(DeviceError::Misplaced {
                slot,
                placed,
                base: saved.base,
                irq: saved.irq,
            }
            .into());
        }
        Ok(())
    }

    /// Starts the restored virtio devices whose driver had started them.
    pub fn resume_virtio(&self) -> Result<(), Error> {
        for s in &self.virtio {
            s.handle.resume().map_err(|source| DeviceError::Resume {
                slot: s.role,
                source,
            })?;
        }
        Ok(())
    }

    /// Serial, i8042 (fresh, or from a snapshot's states) and the boot
    /// marker.
    pub fn attach_legacy_devices(
        &mut self,
        serial_state: Option<&SerialState>,
        i8042_state: Option<&I8042State>,
    ) -> Result<(), Error> {
        let serial_irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
            .map_err(DeviceError::SerialEventFd)?;
        self.fd
            .register_irqfd(&serial_irq, layout::SERIAL_IRQ)
            .map_err(kvm_error("KVM_IRQFD (serial)"))?;
        let limit = crate::devices::legacy::serial::OUTPUT_LIMIT;
        let out: Box<dyn std::io::Write + Send> = match &self.config.serial {
            SerialOutput::None => Box::new(std::io::sink()),
            SerialOutput::Stdout => Box::new(BoundedOutput::new(std::io::stdout(), limit)),
            // The guest console can carry whatever a guest prints: owner only.
            SerialOutput::File(p) => Box::new(BoundedOutput::new(
                thaw_snapshots::private::create_file(p).map_err(|source| Error::Io {
                    what: format!("serial output {}", p.display()),
                    source,
                })?,
                limit,
            )),
        };
        let serial = match serial_state {
            Some(state) => {
                let res = SerialResources {
                    irq: serial_irq,
                    out,
                };
                Serial::restore(state, res).map_err(DeviceError::SerialState)?
            }
            None => Serial::new(serial_irq, out),
        };
        let serial = Arc::new(Mutex::new(serial));
        self.io_bus.insert(SERIAL_PORT, 8, serial.clone())?;
        self.serial = Some(serial);
        let i8042 = match i8042_state {
            Some(state) => {
                let Ok(dev) = I8042::restore(state, ());
                dev
            }
            None => I8042::new(),
        };
        let i8042 = Arc::new(Mutex::new(i8042));
        self.io_bus.insert(I8042_PORT, 5, i8042.clone())?;
        self.i8042 = Some(i8042);
        let marker = Arc::new(Mutex::new(BootMarker::new(self.times.clone())));
        self.io_bus
            .insert(u64::from(layout::BOOT_MARKER_PORT), 1, marker.clone())?;
        self.mmio_bus
            .insert(layout::BOOT_MARKER_MMIO, 0x1000, marker)?;
        Ok(())
    }

    /// Puts a transport on the next MMIO slot, with its ioeventfds and irqfd.
    /// Slots are handed out in order, so rebuilding devices in the saved
    /// order gives each the address and IRQ the guest knows.
    pub fn add_virtio<D>(
        &mut self,
        role: SlotRole,
        transport: MmioTransport<D>,
        wrap: impl FnOnce(Arc<Mutex<MmioTransport<D>>>) -> VirtioHandle,
    ) -> Result<(), Error>
    where
        D: VirtioDevice + 'static,
    {
        let index = self.virtio.len() as u64;
        let base = layout::VIRTIO_MMIO_START + index * layout::VIRTIO_MMIO_SLOT_SIZE;
        let irq = layout::FIRST_VIRTIO_IRQ + index as u32;
        if irq > layout::MAX_IRQ {
            return Err(DeviceError::NoIrq(role).into());
        }
        for (q, evt) in transport.queue_events().iter().enumerate() {
            self.fd
                .register_ioevent(evt, &IoEventAddress::Mmio(base + 0x50), q as u32)
                .map_err(kvm_error("KVM_IOEVENTFD"))?;
        }
        self.fd
            .register_irqfd(transport.interrupt_event(), irq)
            .map_err(kvm_error("KVM_IRQFD"))?;
        let transport = Arc::new(Mutex::new(transport));
        self.mmio_bus
            .insert(base, layout::VIRTIO_MMIO_SLOT_SIZE, transport.clone())?;
        let handle = wrap(transport);
        match (role, &handle) {
            (SlotRole::SpareDisk(_), VirtioHandle::Block(t)) => self.spare_disks.push(t.clone()),
            (SlotRole::Net, VirtioHandle::Net(t)) => self.net = Some(t.clone()),
            (SlotRole::Fs, VirtioHandle::Fs(t)) => self.fs = Some(t.clone()),
            _ => {}
        }
        self.virtio.push(VirtioSlot {
            role,
            base,
            irq,
            handle,
        });
        self.cmdline += &format!(" virtio_mmio.device=4K@{base:#x}:{irq}");
        Ok(())
    }

    /// The full guest command line: thaw's base, PVM workarounds, devices,
    /// root disk, then what the user appended (which wins where it repeats).
    pub fn guest_cmdline(&self) -> String {
        let mut c = default_guest_cmdline(self.pvm_quirks());
        c += &self.cmdline;
        if !self.config.disks.is_empty() && !self.config.append.contains("root=") {
            c += " root=/dev/vda ro";
        }
        if !self.config.append.is_empty() {
            c += " ";
            c += self.config.append.trim();
        }
        c
    }

    /// Loads the kernel (and initramfs) and writes every boot structure.
    pub fn load_kernel(&mut self) -> Result<(), Error> {
        let path = &self.config.kernel;
        let mut file = File::open(path).map_err(|source| Error::Io {
            what: format!("kernel {}", path.display()),
            source,
        })?;
        let loaded = Elf::load(
            &self.mem,
            None,
            &mut file,
            Some(GuestAddress(layout::HIMEM_START)),
        )
        .map_err(|source| Error::Kernel {
            path: path.clone(),
            source,
        })?;
        let entry = loaded.kernel_load.raw_value();

        let initrd = match &self.config.initramfs {
            Some(p) => {
                let data = std::fs::read(p).map_err(|source| Error::Io {
                    what: format!("initramfs {}", p.display()),
                    source,
                })?;
                let addr = boot_params::initrd_address(&self.mem, data.len() as u64)?;
                self.mem
                    .write_slice(&data, addr)
                    .map_err(|source| Error::Initramfs { source })?;
                Some((addr, data.len() as u64))
            }
            None => None,
        };

        let cmdline = self.guest_cmdline();
        log::info!("guest command line: {cmdline}");
        boot_params::write_cmdline(&self.mem, cmdline.as_bytes())?;
        boot_params::write_zero_page(&self.mem, self.config.memory_bytes(), cmdline.len(), initrd)?;
        mptable::write(&self.mem, self.config.vcpus)?;
        regs::write_boot_structures(&self.mem, entry)?;
        Ok(())
    }

    /// Creates the vCPUs in their boot state.
    pub fn create_vcpus(&mut self) -> Result<(), Error> {
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_error("KVM_GET_SUPPORTED_CPUID"))?;
        for id in 0..self.config.vcpus {
            let vcpu = self.create_vcpu(id)?;
            arch::vcpu::setup_boot(&vcpu, &supported, id, self.config.vcpus)?;
            self.vcpus.push(Arc::new(Mutex::new(vcpu)));
        }
        Ok(())
    }

    /// A new vCPU with nothing set up (the VM's own vCPUs are in `vcpus`).
    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, Error> {
        self.fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_error("KVM_CREATE_VCPU"))
    }

    /// Starts the vCPUs and returns a handle plus the channel on which the
    /// first vCPU to stop reports why.
    pub fn start(&mut self) -> Result<mpsc::Receiver<VmExit>, Error> {
        crate::vcpu::install_kick_handler()?;
        let (tx, rx) = mpsc::channel();
        let io_bus = Arc::new(self.io_bus.clone());
        let mmio_bus = Arc::new(self.mmio_bus.clone());
        for (id, fd) in self.vcpus.iter().enumerate() {
            let vcpu = Vcpu {
                id: id as u8,
                fd: fd.clone(),
                io_bus: io_bus.clone(),
                mmio_bus: mmio_bus.clone(),
                mem: self.mem.clone(),
                times: self.times.clone(),
            };
            vcpu.spawn(self.control.clone(), tx.clone())?;
        }
        self.exit_tx = Some(tx);
        Ok(rx)
    }

    /// Lets others (the control socket) end the VM with a reason. Only
    /// meaningful after `start`; before it, the sender goes nowhere.
    pub fn exit_sender(&self) -> mpsc::Sender<VmExit> {
        match &self.exit_tx {
            Some(tx) => tx.clone(),
            None => mpsc::channel().0,
        }
    }

    /// `attach_disk` for the control socket: fills spare slot `slot`.
    pub fn disk_attacher(&self) -> DiskAttacher {
        let spares = self.spare_disks.clone();
        Box::new(move |slot, path, read_only| {
            let t = spares.get(slot).ok_or(AttachError::NoSlot {
                slot,
                count: spares.len(),
            })?;
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            Ok(t.device_mut().attach(path, read_only)?)
        })
    }

    /// `attach_tap` for the control socket: binds the NIC to a tap.
    pub fn tap_attacher(&self) -> TapAttacher {
        let net = self.net.clone();
        Box::new(move |name| {
            let t = net.as_ref().ok_or(AttachError::NoNic)?;
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            Ok(t.device_mut().attach_tap(name)?)
        })
    }

    /// `attach_share` for the control socket: exports a host directory
    /// through the virtio-fs device.
    pub fn share_attacher(&self) -> ShareAttacher {
        let fs = self.fs.clone();
        Box::new(move |dir, read_only| {
            let t = fs.as_ref().ok_or(AttachError::NoFs)?;
            Ok(lock(t).device_mut().attach_share(dir, read_only)?)
        })
    }

    /// Host address range of guest RAM, to tell guest pages from the VMM's
    /// own in /proc/self/smaps.
    pub fn guest_ram_host_ranges(&self) -> Vec<(u64, u64)> {
        self.mem
            .iter()
            .map(|r| {
                let start = r.as_ptr() as u64;
                (start, start + r.len())
            })
            .collect()
    }
}

fn new_transport<D: VirtioDevice>(
    mem: &GuestMemoryMmap,
    slot: SlotRole,
    device: D,
) -> Result<MmioTransport<D>, DeviceError> {
    MmioTransport::new(mem.clone(), device)
        .map_err(|source| DeviceError::Transport { slot, source })
}

fn register_memory(fd: &VmFd, mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region stays mapped for the life of the VM (the
        // GuestMemoryMmap is owned by the Vm and cloned by reference count).
        unsafe { fd.set_user_memory_region(region_desc) }
            .map_err(kvm_error("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Builds a VM from `config`, ready to `start`.
pub fn build(config: VmConfig) -> Result<Vm, Error> {
    let mut vm = Vm::create(config)?;
    vm.attach_devices()?;
    vm.load_kernel()?;
    vm.create_vcpus()?;
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_files_drop_comments_and_join_words() {
        let text = "# why\na=1  b\n  # indented comment\n\nc=3\n";
        assert_eq!(cmdline_words(text), "a=1 b c=3");
        for file in [BASE_CMDLINE, PVM_CMDLINE] {
            let words = cmdline_words(file);
            assert!(!words.contains('#'), "{words}");
            assert!(!words.is_empty());
        }
    }

    #[test]
    fn clearcpuid_fits_the_kernels_buffer() {
        // cpu_parse_early_param() copies clearcpuid= into char[128] and
        // silently cuts the rest, features included.
        let words = cmdline_words(PVM_CMDLINE);
        let list = words
            .split(' ')
            .find_map(|w| w.strip_prefix("clearcpuid="))
            .expect("cmdline-pvm.txt clears CPU features");
        assert!(list.len() <= 127, "{} characters: {list}", list.len());
        assert!(list.split(',').any(|f| f == "erms"), "{list}");
    }

    /// A VM over 1 MiB of anonymous memory with the configured devices; no
    /// kernel, no vCPUs (KVM is needed for the irqfds and ioeventfds).
    fn vm_with_devices(config: VmConfig) -> Vm {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut vm = Vm::create_with_memory(config, mem).expect("/dev/kvm");
        vm.attach_devices().unwrap();
        vm
    }

    #[test]
    fn restored_slots_land_where_saved_and_take_host_resources_by_role() {
        let dir = tempfile::tempdir().unwrap();
        let image = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, [0u8; 4096]).unwrap();
            crate::config::DiskConfig {
                path: p,
                read_only: true,
            }
        };
        let config = VmConfig {
            disks: vec![image("a.img"), image("b.img")],
            spare_disks: 2,
            vsock: Some(crate::config::VsockConfig {
                guest_cid: 3,
                uds_path: dir.path().join("v1.sock"),
            }),
            serial: SerialOutput::None,
            ..VmConfig::default()
        };
        let vm = vm_with_devices(config.clone());
        let roles: Vec<SlotRole> = vm.virtio.iter().map(|s| s.role).collect();
        use SlotRole::*;
        assert_eq!(
            roles,
            [
                Disk(0),
                Disk(1),
                SpareDisk(0),
                SpareDisk(1),
                Vsock,
                Rng,
                Net,
                Fs
            ]
        );
        assert_eq!(vm.spare_disks.len(), 2);
        let saved: Vec<VirtioSlotState> = vm
            .virtio
            .iter()
            .map(|s| {
                s.handle.pause().unwrap();
                s.save().unwrap()
            })
            .collect();
        let saved = crate::devices::persist::through_state_file(&saved);

        // The new VM's host resources: another second disk, another socket.
        let mut config2 = config.clone();
        config2.disks[1] = image("c.img");
        config2.vsock = Some(crate::config::VsockConfig {
            guest_cid: 3,
            uds_path: dir.path().join("v2.sock"),
        });
        let restore_all = |config: &VmConfig, saved: &[VirtioSlotState]| {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let mut vm = Vm::create_with_memory(config.clone(), mem).unwrap();
            for s in saved {
                vm.restore_virtio(s)?;
            }
            vm.resume_virtio()?;
            Ok::<_, Error>(vm)
        };
        let vm2 = restore_all(&config2, &saved).unwrap();
        for (a, b) in vm.virtio.iter().zip(&vm2.virtio) {
            assert_eq!((a.role, a.base, a.irq), (b.role, b.base, b.irq));
        }
        assert_eq!(vm2.cmdline, vm.cmdline, "the guest finds each where it was");
        assert_eq!(vm2.spare_disks.len(), 2);
        let disk_path = |slot: &VirtioSlot| match &slot.handle {
            VirtioHandle::Block(t) => lock(t).device().path(),
            _ => None,
        };
        let paths: Vec<Option<PathBuf>> = vm2.virtio.iter().map(disk_path).collect();
        assert_eq!(paths[0], Some(config2.disks[0].path.clone()));
        assert_eq!(paths[1], Some(config2.disks[1].path.clone()));
        assert_eq!((paths[2].clone(), paths[3].clone()), (None, None));
        assert!(dir.path().join("v2.sock").exists());

        // A state in a slot of another kind is refused by name.
        let mut wrong = saved.clone();
        wrong[0].role = SlotRole::Rng;
        let e = restore_all(&config2, &wrong).err().unwrap().to_string();
        assert!(
            e.contains("rng from snapshot") && e.contains("block"),
            "{e}"
        );
        // A spare slot that held a disk has no image to reopen.
        vm.disk_attacher()(1, &config.disks[0].path, true).unwrap();
        let spare = vm.virtio[3].save().unwrap();
        let mut attached = saved.clone();
        attached[3] = spare;
        let e = restore_all(&config2, &attached).err().unwrap().to_string();
        assert!(
            e.contains("spare1 from snapshot") && e.contains("no image path"),
            "{e}"
        );
    }

    #[test]
    fn the_share_comes_from_the_config_or_the_control_socket() {
        let dir = tempfile::tempdir().unwrap();
        let share_of = |vm: &Vm| {
            let t = vm.fs.as_ref().expect("every VM has a virtio-fs device");
            lock(t).device().share_dir()
        };
        let config = VmConfig {
            serial: SerialOutput::None,
            ..VmConfig::default()
        };
        let vm = vm_with_devices(config.clone());
        assert_eq!(share_of(&vm), None);
        let attach = vm.share_attacher();
        attach(dir.path(), true).unwrap();
        assert_eq!(share_of(&vm).as_deref(), Some(dir.path()));
        let e = attach(Path::new("/"), false).unwrap_err().to_string();
        assert!(e.contains("already attached"), "{e}");
        let fs = vm.virtio.last().unwrap();
        assert_eq!(fs.role, SlotRole::Fs);
        let saved: Vec<VirtioSlotState> = vm
            .virtio
            .iter()
            .map(|s| {
                s.handle.pause().unwrap();
                s.save().unwrap()
            })
            .collect();
        let saved = crate::devices::persist::through_state_file(&saved);
        drop(attach);
        drop(vm);

        // A restore exports the share of its own configuration, if any.
        let config2 = VmConfig {
            share: Some(crate::config::ShareConfig {
                dir: dir.path().to_path_buf(),
                read_only: false,
            }),
            ..config.clone()
        };
        let restore_all = |config: &VmConfig, saved: &[VirtioSlotState]| {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let mut vm = Vm::create_with_memory(config.clone(), mem).unwrap();
            for s in saved {
                vm.restore_virtio(s)?;
            }
            Ok::<_, Error>(vm)
        };
        let vm2 = restore_all(&config2, &saved).unwrap();
        assert_eq!(share_of(&vm2).as_deref(), Some(dir.path()));
        let vm3 = restore_all(&config, &saved).unwrap();
        assert_eq!(share_of(&vm3), None);
        // A snapshot taken while the guest had it mounted is refused.
        let mut mounted = saved.clone();
        if let Some(VirtioState::Fs(s)) = mounted.last_mut().map(|s| &mut s.state) {
            s.device.mounted = true;
        }
        let e = restore_all(&config2, &mounted).err().unwrap().to_string();
        assert!(e.contains("fs from snapshot"), "{e}");
    }

    #[test]
    fn the_nic_binds_its_tap_from_the_config_or_the_control_socket() {
        crate::devices::virtio::net::tests::in_netns(|| {
            let tap_of = |vm: &Vm| {
                let t = vm.net.as_ref().expect("every VM has a NIC");
                lock(t).device().tap_name().map(String::from)
            };
            let config = VmConfig {
                serial: SerialOutput::None,
                net_mac: [2, 0, 0, 0, 0, 0x42],
                ..VmConfig::default()
            };
            let vm = vm_with_devices(config.clone());
            assert_eq!(tap_of(&vm), None);
            let attach = vm.tap_attacher();
            attach("thawvm0").unwrap();
            assert_eq!(tap_of(&vm).as_deref(), Some("thawvm0"));
            let e = attach("thawvm1").unwrap_err().to_string();
            assert!(e.contains("thawvm0"), "{e}");
            let net = vm.virtio.iter().find(|s| s.role == SlotRole::Net).unwrap();
            net.handle.pause().unwrap();
            let saved = crate::devices::persist::through_state_file(&net.save().unwrap());
            drop(attach);
            drop(vm);

            // A restore binds the tap of its own configuration, if any.
            let config2 = VmConfig {
                tap: Some("thawvm2".into()),
                ..config
            };
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let mut vm2 = Vm::create_with_memory(config2, mem).unwrap();
            // Fill the slots before the NIC's so it lands where it was.
            for _ in 0..saved.base.saturating_sub(layout::VIRTIO_MMIO_START)
                / layout::VIRTIO_MMIO_SLOT_SIZE
            {
                let slot = SlotRole::Rng;
                let t = new_transport(&vm2.mem.clone(), slot, Rng::new()).unwrap();
                vm2.add_virtio(slot, t, VirtioHandle::Rng).unwrap();
            }
            vm2.restore_virtio(&saved).unwrap();
            assert_eq!(tap_of(&vm2).as_deref(), Some("thawvm2"));
            let mut mac = [0u8; 6];
            let t = vm2.net.as_ref().unwrap();
            assert_eq!(lock(t).device().mac(), [2, 0, 0, 0, 0, 0x42]);
            lock(t).device().read_config(0, &mut mac);
            assert_eq!(mac, [2, 0, 0, 0, 0, 0x42]);
        });
    }
}
