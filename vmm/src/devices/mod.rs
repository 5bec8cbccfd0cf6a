//! Devices the guest sees. Every device sits on a bus behind [`BusDevice`];
//! virtio devices additionally implement [`virtio::VirtioDevice`] and are
//! reached through the MMIO transport.
//!
//! Snapshots: every device with state implements [`Persist`]. Its state
//! is a plain serde struct kept next to the device (`SerialState`,
//! `I8042State`, `BlockState`, `VsockState`, `RngState`, `NetState`,
//! `FsState`); the virtio-MMIO transport's `Persist` wraps its device's
//! state with the transport registers and queues (`mmio::MmioDeviceState`). A transport is saved
//! after `pause()` (which stops the device worker and takes the queues
//! back) and comes back from `restore` paused: register its eventfds with
//! KVM, then `resume()`.

pub mod bus;
pub mod legacy;
pub mod persist;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use persist::Persist;

/// What a device asks of the VMM after an access (e.g. the guest asked to
/// reset the machine through the i8042 controller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    None,
    /// The guest asked for a reset/reboot: the VMM stops the VM.
    Reset,
}
