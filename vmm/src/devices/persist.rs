//! Saving a device as plain data and rebuilding it from that: the one trait
//! every device with snapshot state implements (and the virtio-MMIO
//! transport, which wraps a device's state with its own).
//!
//! A state is what the guest could observe: registers, negotiated
//! features, ring positions, buffered bytes. Host resources (an image file,
//! a listening socket, a tap, an eventfd, guest memory) are not part of it;
//! the restoring VMM hands in new ones, because the snapshot may be restored
//! in another process, by another tenant, with other paths.

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub trait Persist: Sized {
    /// Plain data: a snapshot serializes it as is.
    type State: Serialize + DeserializeOwned + Clone + Debug;
    /// What a rebuilt device needs besides its state: the host resources
    /// it runs on (`()` for a device without any).
    type Resources;
    type Error: std::error::Error + Send + Sync + 'static;

    /// The state the guest can observe. Fails only when it cannot be taken
    /// now (e.g. a transport whose device worker still owns the queues).
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// A device that behaves as the saved one did, over `resources`. A state
    /// that does not fit them (a disk of another size, a queue outside guest
    /// memory) is refused rather than half-applied.
    fn restore(state: &Self::State, resources: Self::Resources) -> Result<Self, Self::Error>;
}

/// For the devices' tests: a state written to and read back from a real
/// snapshot state file, so a test sees exactly what a restore would.
#[cfg(test)]
pub(crate) fn through_state_file<T: Serialize + DeserializeOwned>(state: &T) -> T {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join(thaw_snapshots::STATE_FILE);
    let cpu = thaw_snapshots::CpuFingerprint::host();
    thaw_snapshots::write_state(&path, &cpu, state).expect("writing the state file");
    thaw_snapshots::read_state(&path, &cpu).expect("reading the state file")
}
