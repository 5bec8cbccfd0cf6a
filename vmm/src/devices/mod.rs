//! Devices the guest sees. Every device sits on a bus behind [`BusDevice`];
//! virtio devices additionally implement [`virtio::VirtioDevice`] and are
//! reached through the MMIO transport.

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

/// What a device asks of the VMM after an access (e.g. the guest asked to
/// reset the machine through the i8042 controller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    None,
    /// The guest asked for a reset/reboot: the VMM stops the VM.
    Reset,
}
