//! The virtio-mmio transport, version 2 ("modern"), virtio spec 4.2.2.
//!
//! One 4 KiB window per device: registers below 0x100, the device's config
//! space from 0x100. Everything the guest writes is checked; a value the
//! device cannot work with sets `DEVICE_NEEDS_RESET` (and raises a config
//! interrupt) or is ignored, never a panic.
//!
//! API for the VMM:
//! - [`MmioTransport::new`], then put it on the MMIO bus at a 4 KiB slot,
//!   register [`MmioTransport::queue_events`]`[i]` as ioeventfd at
//!   `base + 0x50` (datamatch `i`) and [`MmioTransport::interrupt_event`]
//!   as irqfd on the slot's GSI.
//! - Snapshots: for a device that implements [`Persist`], the transport
//!   does too. [`MmioTransport::pause`] then `save` ([`MmioDeviceState`]:
//!   the device's state inside the transport's); on the restoring side
//!   `restore` (new guest memory and the device's new host resources), then
//!   [`MmioTransport::resume`] after registering the eventfds with KVM.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::{virtio_config, virtio_mmio};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateContext, ActivateError, Interrupt, PauseError, VirtioDevice, FEATURE_RING_EVENT_IDX,
    FEATURE_VERSION_1,
};
use crate::devices::{BusDevice, DeviceRequest, Persist};

/// Size of the register window each device occupies.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// "THAW" in little endian; drivers do not care about the vendor.
const VENDOR_ID: u32 = 0x5741_4854;

// Register offsets (virtio spec 4.2.2); the bindings type them u32.
const REG_MAGIC: u64 = virtio_mmio::VIRTIO_MMIO_MAGIC_VALUE as u64;
const REG_VERSION: u64 = virtio_mmio::VIRTIO_MMIO_VERSION as u64;
const REG_DEVICE_ID: u64 = virtio_mmio::VIRTIO_MMIO_DEVICE_ID as u64;
const REG_VENDOR_ID: u64 = virtio_mmio::VIRTIO_MMIO_VENDOR_ID as u64;
const REG_DEVICE_FEATURES: u64 = virtio_mmio::VIRTIO_MMIO_DEVICE_FEATURES as u64;
const REG_DEVICE_FEATURES_SEL: u64 = virtio_mmio::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
const REG_DRIVER_FEATURES: u64 = virtio_mmio::VIRTIO_MMIO_DRIVER_FEATURES as u64;
const REG_DRIVER_FEATURES_SEL: u64 = virtio_mmio::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
const REG_QUEUE_SEL: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_SEL as u64;
const REG_QUEUE_NUM_MAX: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
const REG_QUEUE_NUM: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_NUM as u64;
const REG_QUEUE_READY: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_READY as u64;
const REG_QUEUE_NOTIFY: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
const REG_INTERRUPT_STATUS: u64 = virtio_mmio::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const REG_INTERRUPT_ACK: u64 = virtio_mmio::VIRTIO_MMIO_INTERRUPT_ACK as u64;
const REG_STATUS: u64 = virtio_mmio::VIRTIO_MMIO_STATUS as u64;
const REG_QUEUE_DESC_LOW: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
const REG_QUEUE_DESC_HIGH: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
const REG_QUEUE_AVAIL_LOW: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
const REG_QUEUE_AVAIL_HIGH: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
const REG_QUEUE_USED_LOW: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
const REG_QUEUE_USED_HIGH: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
const REG_CONFIG_GENERATION: u64 = virtio_mmio::VIRTIO_MMIO_CONFIG_GENERATION as u64;
const CONFIG_SPACE: u64 = virtio_mmio::VIRTIO_MMIO_CONFIG as u64;

pub const STATUS_ACKNOWLEDGE: u32 = virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
pub const STATUS_DRIVER: u32 = virtio_config::VIRTIO_CONFIG_S_DRIVER;
pub const STATUS_DRIVER_OK: u32 = virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
pub const STATUS_FEATURES_OK: u32 = virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;
pub const STATUS_NEEDS_RESET: u32 = virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
pub const STATUS_FAILED: u32 = virtio_config::VIRTIO_CONFIG_S_FAILED;

pub const INTERRUPT_USED_RING: u32 = virtio_mmio::VIRTIO_MMIO_INT_VRING;
pub const INTERRUPT_CONFIG: u32 = virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("snapshot is for device type {found}, this device is type {expected}")]
    DeviceType { expected: u32, found: u32 },
    #[error("snapshot has {found} queues, the device has {expected}")]
    QueueCount { expected: usize, found: usize },
    #[error("queue {index} in the snapshot is invalid: {reason}")]
    BadQueue { index: usize, reason: String },
    #[error("the device is running; pause it before taking its state")]
    NotPaused,
    #[error(transparent)]
    Pause(#[from] PauseError),
    #[error(transparent)]
    Activate(#[from] ActivateError),
    #[error(transparent)]
    Device(Box<dyn std::error::Error + Send + Sync>),
}

/// The interrupt status register plus the irqfd that raises the GSI.
pub struct MmioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl MmioInterrupt {
    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("virtio-mmio: cannot signal irqfd: {e}");
        }
    }
}

impl Interrupt for MmioInterrupt {
    fn signal_used_queue(&self) {
        self.raise(INTERRUPT_USED_RING);
    }
    fn signal_config_change(&self) {
        self.raise(INTERRUPT_CONFIG);
    }
}

/// What a snapshot records about one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<&Queue> for QueueSnapshot {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

impl QueueSnapshot {
    fn to_queue(self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// A virtio device behind its transport, as a snapshot records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioDeviceState<S> {
    pub transport: MmioState,
    pub device: S,
}

/// What a restored transport runs on: the new VM's guest memory and its
/// device's host resources.
pub struct MmioResources<R> {
    pub mem: GuestMemoryMmap,
    pub device: R,
}

/// The transport's registers as a snapshot records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub acked_features: u64,
    pub queue_select: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnapshot>,
}

pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    queue_events: Vec<EventFd>,
    queues: Vec<Queue>,
    status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    config_generation: u32,
    /// The device's worker runs (DRIVER_OK reached and not paused).
    active: bool,
    /// Paused for a snapshot; `resume` restarts the device.
    paused: bool,
}

fn fresh_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        // An invalid maximum is a bug in the device model; such a queue
        // stays at size 0 and can never be made ready.
        .map(|&max| Queue::new(max).unwrap_or_default())
        .collect()
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(mem: GuestMemoryMmap, device: D) -> Result<Self, MmioError> {
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?;
        let queue_events = (0..device.queue_max_sizes().len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(MmioError::EventFd)?;
        let queues = fresh_queues(device.queue_max_sizes());
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(MmioInterrupt {
                status: AtomicU32::new(0),
                irqfd,
            }),
            queue_events,
            queues,
            status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            config_generation: 0,
            active: false,
            paused: false,
        })
    }

    /// The irqfd to register with KVM on this device's GSI.
    pub fn interrupt_event(&self) -> &EventFd {
        &self.interrupt.irqfd
    }

    /// One eventfd per queue, to register as ioeventfds on QueueNotify.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status register (e.g. to see whether the driver is up).
    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Stop the device's worker and take its queues back, so `state` can
    /// record ring positions. A no-op for a device the driver never started.
    pub fn pause(&mut self) -> Result<(), MmioError> {
        if self.paused {
            return Ok(());
        }
        if self.active {
            self.queues = self.device.pause()?;
            self.active = false;
        }
        self.paused = true;
        Ok(())
    }

    /// Restart a paused device (same process, or after `restore`).
    pub fn resume(&mut self) -> Result<(), MmioError> {
        if !self.paused {
            return Ok(());
        }
        self.paused = false;
        if self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0 {
            self.activate()?;
            // An interrupt raised just before the snapshot may have been
            // lost with the old irqfd; a spurious one is harmless.
            if self.interrupt.status.load(Ordering::SeqCst) != 0 {
                let _ = self.interrupt.irqfd.write(1);
            }
        }
        Ok(())
    }

    /// The transport registers. Fails while the device runs, because its
    /// queues (and their ring positions) then belong to the worker.
    fn registers(&self) -> Result<MmioState, MmioError> {
        if self.active {
            return Err(MmioError::NotPaused);
        }
        Ok(MmioState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            interrupt_status: self.interrupt.status.load(Ordering::SeqCst),
            config_generation: self.config_generation,
            queues: self.queues.iter().map(QueueSnapshot::from).collect(),
        })
    }

    /// A transport around `device` (itself rebuilt from its own state) with
    /// the saved registers and queues. The result is paused.
    fn with_registers(
        mem: GuestMemoryMmap,
        device: D,
        state: &MmioState,
    ) -> Result<Self, MmioError> {
        let mut t = Self::new(mem, device)?;
        let expected = t.device.device_type();
        if state.device_type != expected {
            return Err(MmioError::DeviceType {
                expected,
                found: state.device_type,
            });
        }
        let max_sizes = t.device.queue_max_sizes().to_vec();
        if state.queues.len() != max_sizes.len() {
            return Err(MmioError::QueueCount {
                expected: max_sizes.len(),
                found: state.queues.len(),
            });
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (index, (snap, &max)) in state.queues.iter().zip(&max_sizes).enumerate() {
            if snap.max_size != max {
                return Err(MmioError::BadQueue {
                    index,
                    reason: format!("max size {} (device has {max})", snap.max_size),
                });
            }
            let q = snap.to_queue().map_err(|e| MmioError::BadQueue {
                index,
                reason: e.to_string(),
            })?;
            if q.ready() && !q.is_valid(&t.mem) {
                return Err(MmioError::BadQueue {
                    index,
                    reason: "rings outside guest memory".into(),
                });
            }
            queues.push(q);
        }
        t.queues = queues;
        t.status = state.status;
        t.device_features_select = state.device_features_select;
        t.driver_features_select = state.driver_features_select;
        t.acked_features = state.acked_features & t.device.avail_features();
        t.queue_select = state.queue_select;
        t.config_generation = state.config_generation;
        t.interrupt
            .status
            .store(state.interrupt_status, Ordering::SeqCst);
        if t.status & STATUS_FEATURES_OK != 0 {
            t.device.set_acked_features(t.acked_features);
        }
        t.paused = true;
        Ok(t)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may only change between FEATURES_OK and DRIVER_OK,
    /// and only while the selected queue is not ready.
    fn queue_config_writable(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0
            && self.status & STATUS_DRIVER_OK == 0
            && self
                .queues
                .get(self.queue_select as usize)
                .is_some_and(|q| !q.ready())
    }

    fn needs_reset(&mut self, why: &str) {
        log::warn!(
            "virtio-mmio (type {}): {why}; device needs reset",
            self.device.device_type()
        );
        if self.status & STATUS_NEEDS_RESET == 0 {
            self.status |= STATUS_NEEDS_RESET;
            if self.status & STATUS_DRIVER_OK != 0 {
                self.interrupt.signal_config_change();
            }
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_select as usize);
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = self.device.avail_features() | FEATURE_VERSION_1;
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status.load(Ordering::SeqCst),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self
                .config_generation
                .wrapping_add(self.device.config_generation()),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NUM => {
                if !self.queue_config_writable() {
                    return;
                }
                let size_ok = u16::try_from(value)
                    .ok()
                    .and_then(|v| self.selected_queue().map(|q| q.try_set_size(v).is_ok()))
                    .unwrap_or(false);
                if !size_ok {
                    self.needs_reset("invalid queue size");
                }
            }
            REG_QUEUE_READY => self.write_queue_ready(value),
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH | REG_QUEUE_AVAIL_LOW
            | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW | REG_QUEUE_USED_HIGH => {
                self.write_queue_address(offset, value)
            }
            REG_QUEUE_NOTIFY => {
                // The VMM normally catches this write with an ioeventfd; if
                // it did not, forward it the same way.
                if let Some(evt) = self.queue_events.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            REG_INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            REG_STATUS => self.write_status(value),
            _ => {}
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features can only be negotiated before FEATURES_OK.
        if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
            return;
        }
        let offered = self.device.avail_features() | FEATURE_VERSION_1;
        let (shift, mask) = match self.driver_features_select {
            0 => (0, 0xffff_ffffu64),
            1 => (32, 0xffff_ffff_0000_0000u64),
            _ => return,
        };
        self.acked_features =
            (self.acked_features & !mask) | ((u64::from(value) << shift) & offered);
    }

    fn write_queue_ready(&mut self, value: u32) {
        if self.status & STATUS_DRIVER_OK != 0 {
            return;
        }
        let mem = self.mem.clone();
        let Some(q) = self.queues.get_mut(self.queue_select as usize) else {
            return;
        };
        match value {
            0 => q.set_ready(false),
            1 if self.status & STATUS_FEATURES_OK != 0 => {
                q.set_ready(true);
                // is_valid checks size, alignment and that all three rings
                // lie in guest memory.
                if !q.is_valid(&mem) {
                    q.set_ready(false);
                    self.needs_reset("queue rings outside guest memory");
                }
            }
            _ => {}
        }
    }

    fn write_queue_address(&mut self, offset: u64, value: u32) {
        if !self.queue_config_writable() {
            return;
        }
        let Some(q) = self.queues.get_mut(self.queue_select as usize) else {
            return;
        };
        let high = offset & 4 != 0;
        let merge = |old: u64| {
            if high {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (old & !0xffff_ffff) | u64::from(value)
            }
        };
        let result = match offset & !4 {
            REG_QUEUE_DESC_LOW => q.try_set_desc_table_address(GuestAddress(merge(q.desc_table()))),
            REG_QUEUE_AVAIL_LOW => {
                q.try_set_avail_ring_address(GuestAddress(merge(q.avail_ring())))
            }
            _ => q.try_set_used_ring_address(GuestAddress(merge(q.used_ring()))),
        };
        if result.is_err() {
            self.needs_reset("misaligned queue address");
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // The driver sets bits one step at a time and never clears one
        // (except by writing 0). NEEDS_RESET belongs to the device.
        if value & old & !STATUS_NEEDS_RESET != old & !STATUS_NEEDS_RESET {
            log::warn!("virtio-mmio: driver tried to clear status bits {old:#x} -> {value:#x}");
            return;
        }
        let added = value & !old & !STATUS_NEEDS_RESET;
        if added & STATUS_FAILED != 0 {
            self.status |= STATUS_FAILED;
        }
        for bit in [
            STATUS_ACKNOWLEDGE,
            STATUS_DRIVER,
            STATUS_FEATURES_OK,
            STATUS_DRIVER_OK,
        ] {
            if added & bit == 0 {
                continue;
            }
            let allowed = match bit {
                STATUS_ACKNOWLEDGE => true,
                STATUS_DRIVER => self.status & STATUS_ACKNOWLEDGE != 0,
                STATUS_FEATURES_OK => {
                    // No legacy interface: a driver that does not accept
                    // VERSION_1 cannot drive this device.
                    self.status & STATUS_DRIVER != 0 && self.acked_features & FEATURE_VERSION_1 != 0
                }
                _ => self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_NEEDS_RESET == 0,
            };
            if !allowed {
                log::warn!("virtio-mmio: refused status bit {bit:#x} (status {old:#x})");
                return;
            }
            match bit {
                STATUS_FEATURES_OK => {
                    self.device.set_acked_features(self.acked_features);
                    self.status |= bit;
                }
                STATUS_DRIVER_OK => {
                    if !self.queues.iter().all(|q| q.ready()) {
                        self.needs_reset("DRIVER_OK with queues not ready");
                        return;
                    }
                    self.status |= bit;
                    if let Err(e) = self.activate() {
                        self.needs_reset(&format!("activation failed: {e}"));
                    }
                }
                _ => self.status |= bit,
            }
        }
    }

    fn activate(&mut self) -> Result<(), MmioError> {
        let event_idx = self.acked_features & FEATURE_RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, q) in self.queues.iter().enumerate() {
            let mut live = Queue::try_from(q.state()).map_err(|e| MmioError::BadQueue {
                index,
                reason: e.to_string(),
            })?;
            live.set_event_idx(event_idx);
            queues.push(live);
        }
        let queue_events = self
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(MmioError::EventFd)?;
        self.device.activate(ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues,
            queue_events,
        })?;
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        if !self.device.reset() {
            log::error!(
                "virtio-mmio (type {}): device refused reset",
                self.device.device_type()
            );
        }
        self.active = false;
        self.paused = false;
        self.queues = fresh_queues(self.device.queue_max_sizes());
        self.status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
        for evt in &self.queue_events {
            let _ = evt.read();
        }
    }
}

impl<D: VirtioDevice + Persist> Persist for MmioTransport<D> {
    type State = MmioDeviceState<D::State>;
    type Resources = MmioResources<D::Resources>;
    type Error = MmioError;

    /// Only after [`MmioTransport::pause`] (or before the driver started
    /// the device): a running worker owns the queues.
    fn save(&self) -> Result<Self::State, MmioError> {
        Ok(MmioDeviceState {
            transport: self.registers()?,
            device: self
                .device
                .save()
                .map_err(|e| MmioError::Device(Box::new(e)))?,
        })
    }

    /// The device first (its own state over its new host resources), then
    /// the transport around it. The result is paused: register the
    /// eventfds with KVM, then call [`MmioTransport::resume`].
    fn restore(state: &Self::State, res: Self::Resources) -> Result<Self, MmioError> {
        let device =
            D::restore(&state.device, res.device).map_err(|e| MmioError::Device(Box::new(e)))?;
        Self::with_registers(res.mem, device, &state.transport)
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE {
            if offset < MMIO_WINDOW_SIZE {
                self.device.read_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        // Registers are 32 bits wide and must be accessed as such.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceRequest {
        if offset >= CONFIG_SPACE {
            if offset < MMIO_WINDOW_SIZE && self.status & STATUS_DRIVER != 0 {
                self.device.write_config(offset - CONFIG_SPACE, data);
            }
            return DeviceRequest::None;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return DeviceRequest::None;
        };
        if offset.is_multiple_of(4) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
        DeviceRequest::None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::testutil::{mem, TestQueue};
    use std::sync::Mutex;

    /// A device that records what the transport did to it.
    #[derive(Default)]
    pub struct FakeDevice {
        pub acked: u64,
        pub activations: usize,
        pub resets: usize,
        pub live_queues: Option<Vec<Queue>>,
        pub config: [u8; 8],
        pub fail_activate: bool,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn avail_features(&self) -> u64 {
            FEATURE_VERSION_1 | FEATURE_RING_EVENT_IDX | 1
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data)
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(b) = self.config.get_mut(offset as usize) {
                *b = data[0];
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::Backend("refused".into()));
            }
            self.activations += 1;
            self.live_queues = Some(ctx.queues);
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            self.live_queues = None;
            true
        }
        fn pause(&mut self) -> Result<Vec<Queue>, PauseError> {
            self.live_queues.take().ok_or(PauseError::NotActive)
        }
    }

    /// Its state is its config space; a state of all 0xff is refused.
    impl Persist for FakeDevice {
        type State = [u8; 8];
        type Resources = ();
        type Error = std::io::Error;
        fn save(&self) -> std::io::Result<[u8; 8]> {
            Ok(self.config)
        }
        fn restore(state: &[u8; 8], (): ()) -> std::io::Result<Self> {
            if *state == [0xff; 8] {
                return Err(std::io::Error::other("refused by the device"));
            }
            Ok(Self {
                config: *state,
                ..Self::default()
            })
        }
    }

    pub fn w(t: &mut impl BusDevice, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    pub fn r(t: &mut impl BusDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Drive the transport the way Linux' virtio_mmio driver does.
    pub fn setup_queue(t: &mut impl BusDevice, index: u32, q: &TestQueue) {
        w(t, REG_QUEUE_SEL, index);
        assert_eq!(r(t, REG_QUEUE_READY), 0);
        assert!(r(t, REG_QUEUE_NUM_MAX) >= u32::from(q.size));
        w(t, REG_QUEUE_NUM, u32::from(q.size));
        w(t, REG_QUEUE_DESC_LOW, q.desc as u32);
        w(t, REG_QUEUE_DESC_HIGH, (q.desc >> 32) as u32);
        w(t, REG_QUEUE_AVAIL_LOW, q.avail as u32);
        w(t, REG_QUEUE_AVAIL_HIGH, (q.avail >> 32) as u32);
        w(t, REG_QUEUE_USED_LOW, q.used as u32);
        w(t, REG_QUEUE_USED_HIGH, (q.used >> 32) as u32);
        w(t, REG_QUEUE_READY, 1);
    }

    /// ACKNOWLEDGE, DRIVER, features (all offered), FEATURES_OK.
    pub fn negotiate(t: &mut impl BusDevice) -> u64 {
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DEVICE_FEATURES_SEL, 0);
        let lo = r(t, REG_DEVICE_FEATURES);
        w(t, REG_DEVICE_FEATURES_SEL, 1);
        let hi = r(t, REG_DEVICE_FEATURES);
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, lo);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, hi);
        w(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r(t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    pub const ALL_OK: u32 =
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    fn transport() -> (GuestMemoryMmap, MmioTransport<FakeDevice>) {
        let m = mem(0x20000);
        let t = MmioTransport::new(m.clone(), FakeDevice::default()).unwrap();
        (m, t)
    }

    #[test]
    fn identification_registers() {
        let (_m, mut t) = transport();
        assert_eq!(r(&mut t, REG_MAGIC), 0x7472_6976);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 42);
        // Non-32-bit register reads return zeros.
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn full_driver_sequence_activates_with_configured_queues() {
        let (m, mut t) = transport();
        let features = negotiate(&mut t);
        assert_eq!(features, FEATURE_VERSION_1 | FEATURE_RING_EVENT_IDX | 1);
        assert_eq!(t.device().acked, features);
        let q0 = TestQueue::new(&m, 0x1000, 16);
        let q1 = TestQueue::new(&m, 0x2000, 8);
        setup_queue(&mut t, 0, &q0);
        setup_queue(&mut t, 1, &q1);
        w(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(r(&mut t, REG_STATUS), ALL_OK);
        assert!(t.is_active());
        let live = t.device().live_queues.as_ref().unwrap();
        assert_eq!(live[0].desc_table(), 0x1000);
        assert_eq!(live[1].size(), 8);
        assert!(live[0].event_idx_enabled());
    }

    #[test]
    fn invalid_queue_size_and_addresses_set_needs_reset() {
        let (m, mut t) = transport();
        negotiate(&mut t);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 12); // not a power of two
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);

        let (_m2, mut t) = transport();
        negotiate(&mut t);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 32); // above the maximum
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);

        let (_m3, mut t) = transport();
        negotiate(&mut t);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_DESC_LOW, 0x1001); // misaligned
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);

        // Rings outside guest memory: the queue does not become ready and
        // DRIVER_OK is refused.
        let (_m4, mut t) = transport();
        negotiate(&mut t);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_DESC_LOW, 0);
        w(&mut t, REG_QUEUE_DESC_HIGH, 0x10);
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        let q1 = TestQueue::new(&m, 0x2000, 8);
        setup_queue(&mut t, 1, &q1);
        w(&mut t, REG_STATUS, ALL_OK | STATUS_NEEDS_RESET);
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_DRIVER_OK, 0);
        assert_eq!(t.device().activations, 0);
    }

    #[test]
    fn status_steps_out_of_order_are_refused() {
        let (_m, mut t) = transport();
        w(&mut t, REG_STATUS, STATUS_DRIVER_OK);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert_eq!(r(&mut t, REG_STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // FEATURES_OK without VERSION_1 acked is refused.
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        // Clearing a bit without a reset is ignored.
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(r(&mut t, REG_STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // DRIVER_OK before queues are ready: needs reset, no activation.
        let (_m, mut t) = transport();
        negotiate(&mut t);
        w(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(t.device().activations, 0);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn failed_activation_sets_needs_reset() {
        let (m, mut t) = transport();
        t.device_mut().fail_activate = true;
        negotiate(&mut t);
        setup_queue(&mut t, 0, &TestQueue::new(&m, 0x1000, 16));
        setup_queue(&mut t, 1, &TestQueue::new(&m, 0x2000, 8));
        w(&mut t, REG_STATUS, ALL_OK);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert!(!t.is_active());
    }

    #[test]
    fn reset_returns_everything_to_initial_values() {
        let (m, mut t) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, &TestQueue::new(&m, 0x1000, 16));
        setup_queue(&mut t, 1, &TestQueue::new(&m, 0x2000, 8));
        w(&mut t, REG_STATUS, ALL_OK);
        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(t.device().resets, 1);
        assert!(!t.is_active());
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        // The driver can go through the whole sequence again.
        negotiate(&mut t);
        setup_queue(&mut t, 0, &TestQueue::new(&m, 0x1000, 16));
        setup_queue(&mut t, 1, &TestQueue::new(&m, 0x2000, 8));
        w(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(t.device().activations, 2);
    }

    #[test]
    fn queue_registers_locked_after_driver_ok() {
        let (m, mut t) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, &TestQueue::new(&m, 0x1000, 16));
        setup_queue(&mut t, 1, &TestQueue::new(&m, 0x2000, 8));
        w(&mut t, REG_STATUS, ALL_OK);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_DESC_LOW, 0x8000);
        w(&mut t, REG_QUEUE_READY, 0);
        w(&mut t, REG_QUEUE_NUM, 2);
        t.pause().unwrap();
        let st = t.save().unwrap().transport;
        assert_eq!(st.queues[0].desc_table, 0x1000);
        assert!(st.queues[0].ready);
    }

    #[test]
    fn notify_and_interrupt_registers() {
        let (_m, mut t) = transport();
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        w(&mut t, REG_QUEUE_NOTIFY, 99); // no such queue: ignored
        t.interrupt.signal_used_queue();
        t.interrupt.signal_config_change();
        assert_eq!(t.interrupt_event().read().unwrap(), 2);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 3);
        w(&mut t, REG_INTERRUPT_ACK, INTERRUPT_USED_RING);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INTERRUPT_CONFIG);
    }

    #[test]
    fn config_space_is_forwarded_and_bounded() {
        let (_m, mut t) = transport();
        t.device_mut().config = *b"abcdefgh";
        let mut b = [0u8; 4];
        t.read(0x104, &mut b);
        assert_eq!(&b, b"efgh");
        t.read(0x106, &mut b);
        assert_eq!(&b, b"gh\0\0");
        t.read(0xfff, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn garbage_writes_never_panic() {
        let (_m, mut t) = transport();
        let mut seed = 0x1234_5678u64;
        for _ in 0..20000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let off = (seed % 0x1100) & !3;
            let len = [1usize, 2, 4, 8][(seed >> 20) as usize % 4];
            let val = (seed >> 32).to_le_bytes();
            t.write(off, &val[..len]);
            let mut b = vec![0u8; len];
            t.read(off, &mut b);
        }
    }

    /// Every register a driver can read, from every queue.
    fn registers(t: &mut MmioTransport<FakeDevice>) -> Vec<u32> {
        let mut regs = Vec::new();
        for off in [
            REG_MAGIC,
            REG_DEVICE_ID,
            REG_INTERRUPT_STATUS,
            REG_STATUS,
            REG_CONFIG_GENERATION,
            CONFIG_SPACE,
            CONFIG_SPACE + 4,
        ] {
            regs.push(r(t, off));
        }
        for sel in 0..2 {
            w(t, REG_DEVICE_FEATURES_SEL, sel);
            regs.push(r(t, REG_DEVICE_FEATURES));
        }
        for q in 0..2 {
            w(t, REG_QUEUE_SEL, q);
            regs.push(r(t, REG_QUEUE_NUM_MAX));
            regs.push(r(t, REG_QUEUE_READY));
        }
        regs
    }

    #[test]
    fn pause_save_restore_resume_round_trip() {
        let (m, mut t) = transport();
        t.device_mut().config = *b"abcdefgh";
        negotiate(&mut t);
        setup_queue(&mut t, 0, &TestQueue::new(&m, 0x1000, 16));
        setup_queue(&mut t, 1, &TestQueue::new(&m, 0x2000, 8));
        w(&mut t, REG_STATUS, ALL_OK);
        t.interrupt.signal_used_queue();
        // The worker advanced the rings.
        let live = t.device_mut().live_queues.as_mut().unwrap();
        live[0].set_next_avail(5);
        live[0].set_next_used(4);
        assert!(matches!(t.save(), Err(MmioError::NotPaused)));
        t.pause().unwrap();
        let state = crate::devices::persist::through_state_file(&t.save().unwrap());
        assert_eq!(state.transport.queues[0].next_avail, 5);
        assert_eq!(state.transport.queues[0].next_used, 4);
        assert_eq!(&state.device, b"abcdefgh");

        let res = || MmioResources {
            mem: m.clone(),
            device: (),
        };
        let shared = Arc::new(Mutex::new(
            MmioTransport::<FakeDevice>::restore(&state, res()).unwrap(),
        ));
        let mut t2 = shared.lock().unwrap();
        assert_eq!(t2.save().unwrap(), state, "restored paused, same state");
        assert_eq!(t2.device().acked, state.transport.acked_features);
        assert_eq!(t2.device().activations, 0);
        t2.resume().unwrap();
        assert_eq!(t2.device().activations, 1);
        let live = t2.device().live_queues.as_ref().unwrap();
        assert_eq!(live[0].next_avail(), 5);
        assert_eq!(live[0].next_used(), 4);
        assert_eq!(registers(&mut t2), registers(&mut t));
        assert_eq!(r(&mut *t2, REG_STATUS), ALL_OK);
        // The pending interrupt is raised again on the new irqfd.
        assert_eq!(t2.interrupt_event().read().unwrap(), 1);

        // A snapshot that does not fit the device is refused.
        let refused = |f: &dyn Fn(&mut MmioDeviceState<[u8; 8]>)| {
            let mut bad = state.clone();
            f(&mut bad);
            MmioTransport::<FakeDevice>::restore(&bad, res()).err()
        };
        assert!(refused(&|s| s.transport.queues[0].size = 3).is_some());
        assert!(refused(&|s| s.transport.queues.truncate(1)).is_some());
        assert!(refused(&|s| s.transport.device_type = 2).is_some());
        assert!(refused(&|s| s.transport.queues[1].used_ring = 1 << 40).is_some());
        let e = refused(&|s| s.device = [0xff; 8]).unwrap();
        assert!(matches!(e, MmioError::Device(_)), "{e:?}");
        assert_eq!(e.to_string(), "refused by the device");
    }
}
