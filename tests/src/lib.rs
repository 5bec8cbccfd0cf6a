//! Helpers shared by the end-to-end tests: a private containerd, an offline
//! busybox OCI image, commands with deadlines, and leak checks.

pub mod agent;
pub mod binaries;
pub mod cmd;
pub mod containerd;
pub mod guest;
pub mod image;

pub use containerd::{Backend, PrivateContainerd};
