//! The VM's virtio slots: what each one is for ([`SlotRole`]), where it sits
//! (MMIO base and IRQ), its device behind the transport with the concrete
//! type kept ([`VirtioHandle`]), and all of that as a snapshot records it
//! ([`VirtioSlotState`]). A new device kind adds a variant to the role (if
//! it has a new one), to the handle and to [`VirtioState`].

use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::devices::virtio::block::{Block, BlockState};
use crate::devices::virtio::fs::{Fs, FsState};
use crate::devices::virtio::mmio::{MmioDeviceState, MmioError, MmioTransport};
use crate::devices::virtio::net::{Net, NetState};
use crate::devices::virtio::rng::{Rng, RngState};
use crate::devices::virtio::vsock::{Vsock, VsockState};
use crate::devices::Persist;
use crate::vm::lock;

/// What a virtio slot is for. Restore takes the slot's host resources from
/// it: disk `n` reopens the `n`th configured disk, a spare disk slot comes
/// back empty, the vsock device listens on the configured socket, the NIC
/// binds the configured tap (if any), the virtio-fs device exports the
/// configured share (if any).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotRole {
    /// The `n`th disk given when the VM was built (`--disk`).
    Disk(u8),
    /// The `n`th empty slot that `attach_disk` fills later.
    SpareDisk(u8),
    Vsock,
    Rng,
    /// The NIC, in every VM; its tap may come later (`attach_tap`).
    Net,
    /// The virtio-fs device, in every VM; its share may come later
    /// (`attach_share`).
    Fs,
}

impl fmt::Display for SlotRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotRole::Disk(n) => write!(f, "disk{n}"),
            SlotRole::SpareDisk(n) => write!(f, "spare{n}"),
            SlotRole::Vsock => f.write_str("vsock"),
            SlotRole::Rng => f.write_str("rng"),
            SlotRole::Net => f.write_str("net"),
            SlotRole::Fs => f.write_str("fs"),
        }
    }
}

/// A virtio device behind its transport, with its concrete type kept so it
/// can be paused, saved and rebuilt.
#[derive(Clone)]
pub enum VirtioHandle {
    Block(Arc<Mutex<MmioTransport<Block>>>),
    Vsock(Arc<Mutex<MmioTransport<Vsock>>>),
    Rng(Arc<Mutex<MmioTransport<Rng>>>),
    Net(Arc<Mutex<MmioTransport<Net>>>),
    Fs(Arc<Mutex<MmioTransport<Fs>>>),
}

impl VirtioHandle {
    pub fn pause(&self) -> Result<(), MmioError> {
        match self {
            VirtioHandle::Block(t) => lock(t).pause(),
            VirtioHandle::Vsock(t) => lock(t).pause(),
            VirtioHandle::Rng(t) => lock(t).pause(),
            VirtioHandle::Net(t) => lock(t).pause(),
            VirtioHandle::Fs(t) => lock(t).pause(),
        }
    }

    pub fn resume(&self) -> Result<(), MmioError> {
        match self {
            VirtioHandle::Block(t) => lock(t).resume(),
            VirtioHandle::Vsock(t) => lock(t).resume(),
            VirtioHandle::Rng(t) => lock(t).resume(),
            VirtioHandle::Net(t) => lock(t).resume(),
            VirtioHandle::Fs(t) => lock(t).resume(),
        }
    }

    /// The device's and its transport's state; only while paused.
    pub fn save(&self) -> Result<VirtioState, MmioError> {
        Ok(match self {
            VirtioHandle::Block(t) => VirtioState::Block(lock(t).save()?),
            VirtioHandle::Vsock(t) => VirtioState::Vsock(lock(t).save()?),
            VirtioHandle::Rng(t) => VirtioState::Rng(lock(t).save()?),
            VirtioHandle::Net(t) => VirtioState::Net(lock(t).save()?),
            VirtioHandle::Fs(t) => VirtioState::Fs(lock(t).save()?),
        })
    }
}

/// One virtio device on the MMIO bus.
#[derive(Clone)]
pub struct VirtioSlot {
    pub role: SlotRole,
    pub base: u64,
    pub irq: u32,
    pub handle: VirtioHandle,
}

impl VirtioSlot {
    /// Only while paused.
    pub fn save(&self) -> Result<VirtioSlotState, MmioError> {
        Ok(VirtioSlotState {
            role: self.role,
            base: self.base,
            irq: self.irq,
            state: self.handle.save()?,
        })
    }
}

/// A slot as a snapshot records it. Restore puts the device back at `base`
/// and `irq`, where the guest's driver knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VirtioSlotState {
    pub role: SlotRole,
    pub base: u64,
    pub irq: u32,
    pub state: VirtioState,
}

/// A device's and its transport's state, by device kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VirtioState {
    Block(MmioDeviceState<BlockState>),
    Vsock(MmioDeviceState<VsockState>),
    Rng(MmioDeviceState<RngState>),
    Net(MmioDeviceState<NetState>),
    Fs(MmioDeviceState<FsState>),
}
