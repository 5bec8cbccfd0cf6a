//! containerd-shim-thaw-v2: containerd's runtime v2 shim for thaw.

mod child;
mod config;
mod error;
mod image_cache;
mod rootfs;
mod stdio;
mod vmm_client;

fn main() {}
