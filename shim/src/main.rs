//! containerd-shim-thaw-v2: containerd's runtime v2 shim for thaw
//! (runtime name `io.containerd.thaw.v2`). Each pod, or each plain
//! container, runs in its own micro-VM.

mod agent;
mod child;
mod config;
mod error;
mod events;
mod image_cache;
mod record;
mod rootfs;
mod sandbox;
mod service;
mod shim;
mod spec;
mod stdio;
mod vmm_client;

pub const RUNTIME_ID: &str = "io.containerd.thaw.v2";

fn main() {
    containerd_shim::run::<shim::ThawShim>(RUNTIME_ID, None);
}
