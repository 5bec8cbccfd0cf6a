//! virtio devices over the MMIO transport (virtio 1.x, "modern" only).
//!
//! Contract between the VMM core and the device models:
//! - The VMM builds a device (e.g. `block::Block`), wraps it in
//!   `mmio::MmioTransport`, puts the transport on the MMIO bus at a 4 KiB
//!   slot, registers `transport.queue_events()[i]` as a KVM ioeventfd at
//!   `base + 0x50` with datamatch `i`, and `transport.interrupt_event()` as
//!   a KVM irqfd on the slot's GSI. The kernel finds the device through
//!   `virtio_mmio.device=4K@<base>:<gsi>` on its command line.
//! - On DRIVER_OK the transport calls [`VirtioDevice::activate`]; the device
//!   starts its own worker thread, which waits on the queue eventfds and its
//!   backend's fds. Nothing a guest writes may panic or block that thread
//!   forever.
//! - State is plain data (`serde`), so a snapshot is just serialization.
//!
//! Added by the device models (extensions of the contract above):
//! - [`VirtioDevice::pause`] (default: unsupported) stops the worker and
//!   hands the live queues back, so the transport can record ring positions
//!   in a snapshot and later re-activate the device with the same queues.
//! - `descriptors` (chain validation and gather/scatter copies), `worker`
//!   (a joinable device thread and an epoll loop) are shared helpers.
//! - [`VirtioDevice::config_generation`] (default 0): the device's share of
//!   the ConfigGeneration register.
//! - `impl VirtioDevice for Box<dyn VirtioDevice>`, so a transport can hold
//!   either a concrete device (typed access for the VMM) or a boxed one.

pub mod block;
pub mod descriptors;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
pub(crate) mod testutil;
pub mod vsock;
pub mod worker;

use std::sync::Arc;

use virtio_bindings::{virtio_config, virtio_ids, virtio_ring};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Device ids from the virtio spec, section 5.
pub const TYPE_BLOCK: u32 = virtio_ids::VIRTIO_ID_BLOCK;
pub const TYPE_RNG: u32 = virtio_ids::VIRTIO_ID_RNG;
pub const TYPE_VSOCK: u32 = virtio_ids::VIRTIO_ID_VSOCK;
pub const TYPE_NET: u32 = virtio_ids::VIRTIO_ID_NET;
pub const TYPE_FS: u32 = virtio_ids::VIRTIO_ID_FS;

/// Feature bits shared by every device (virtio spec, section 6).
pub const FEATURE_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
pub const FEATURE_RING_INDIRECT_DESC: u64 = 1 << virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
pub const FEATURE_RING_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// How a device raises its interrupt: the transport owns the status
/// register and the irqfd.
pub trait Interrupt: Send + Sync {
    /// Signal that the device put buffers in a used ring.
    fn signal_used_queue(&self);
    /// Signal that the device configuration changed.
    fn signal_config_change(&self);
}

/// Everything a device needs to start serving its queues.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn Interrupt>,
    pub queues: Vec<Queue>,
    pub queue_events: Vec<EventFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device needs {expected} queues, the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("cannot start the device worker: {0}")]
    Worker(#[source] std::io::Error),
    #[error("device backend: {0}")]
    Backend(String),
}

#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("the device is not active")]
    NotActive,
    #[error("the device worker panicked; its queues are lost")]
    WorkerPanicked,
    #[error("this device cannot be paused")]
    Unsupported,
}

/// The one small trait every virtio device implements.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (VIRTIO_F_VERSION_1 included by the device).
    fn avail_features(&self) -> u64;
    fn set_acked_features(&mut self, features: u64);
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stop the worker and forget the queues (driver reset). Returns false
    /// if the device cannot be reset.
    fn reset(&mut self) -> bool;
    /// Stop the worker (joined) and hand back the live queues, ring
    /// positions included. The device keeps its backend; a later
    /// [`VirtioDevice::activate`] with these queues resumes it.
    fn pause(&mut self) -> Result<Vec<Queue>, PauseError> {
        Err(PauseError::Unsupported)
    }
    /// Bumped by the device whenever its config space changes (e.g. a disk
    /// attached), so the driver can tell a torn multi-word read.
    fn config_generation(&self) -> u32 {
        0
    }
}

impl<T: VirtioDevice + ?Sized> VirtioDevice for Box<T> {
    fn device_type(&self) -> u32 {
        (**self).device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        (**self).queue_max_sizes()
    }
    fn avail_features(&self) -> u64 {
        (**self).avail_features()
    }
    fn set_acked_features(&mut self, features: u64) {
        (**self).set_acked_features(features)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        (**self).read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        (**self).write_config(offset, data)
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        (**self).activate(ctx)
    }
    fn reset(&mut self) -> bool {
        (**self).reset()
    }
    fn pause(&mut self) -> Result<Vec<Queue>, PauseError> {
        (**self).pause()
    }
    fn config_generation(&self) -> u32 {
        (**self).config_generation()
    }
}

/// Copy the part of a device's config space at `offset` into `data`; bytes
/// past the end read as zero (a guest may probe anywhere in the window).
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}
