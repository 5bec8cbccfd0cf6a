//! Legacy PC devices on the port I/O bus.
//!
//! API for the VMM:
//! - [`Serial::new`] at [`COM1_PORT`] (length [`SERIAL_PORT_LEN`]); register
//!   its irq eventfd as irqfd on [`COM1_GSI`].
//! - [`I8042::new`] at [`I8042_PORT`] (length [`I8042_PORT_LEN`]); a write of
//!   0xfe to port 0x64 returns `DeviceRequest::Reset`.
//! - Console output goes through [`BoundedOutput`] (at most
//!   [`serial::OUTPUT_LIMIT`] bytes per VM).
//! - Snapshots: both implement [`crate::devices::Persist`] ([`SerialState`]
//!   with new [`SerialResources`]; [`I8042State`] with none).

pub mod i8042;
pub mod serial;

pub use i8042::{I8042State, I8042, I8042_PORT, I8042_PORT_LEN};
pub use serial::{
    BoundedOutput, Serial, SerialResources, SerialState, COM1_GSI, COM1_PORT, SERIAL_PORT_LEN,
};
