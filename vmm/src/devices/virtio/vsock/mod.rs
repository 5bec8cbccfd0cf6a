//! virtio-vsock emulated in userspace (in progress).
