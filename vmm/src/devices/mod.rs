//! Devices the guest sees. Every device sits on a bus behind [`BusDevice`];
//! virtio devices additionally implement [`virtio::VirtioDevice`] and are
//! reached through the MMIO transport.
//!
//! Snapshots (added by the device models): every state is a plain serde
//! struct; host resources (image files, socket paths) are given again when
//! rebuilding.
//! - Save: `transport.pause()` (stops and joins the device worker, takes
//!   the queues back), then `transport.state()` (`mmio::MmioState`) and the
//!   device's own `state()` (`BlockState`, `VsockState`; `Rng` has none),
//!   `Serial::state()` (`SerialSnapshot`). `transport.resume()` continues.
//! - Restore: `Block::from_state(&s, Some(new_path))`,
//!   `Vsock::from_state(&s, new_uds_path)` (queues a TRANSPORT_RESET
//!   event), `Rng::new()`; then `MmioTransport::from_state(mem, device,
//!   &mmio_state)`, register its eventfds with KVM, `resume()`.

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
