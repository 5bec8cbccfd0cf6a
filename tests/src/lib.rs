//! Helpers shared by the end-to-end tests: a private containerd, an offline
//! busybox OCI image, commands with deadlines, and leak checks.

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod agent;
pub mod binaries;
pub mod cmd;
pub mod cni;
pub mod containerd;
pub mod cri;
pub mod guest;
pub mod image;

pub use containerd::{Backend, PrivateContainerd};
