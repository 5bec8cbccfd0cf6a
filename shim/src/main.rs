//! containerd-shim-thaw-v2: containerd's runtime v2 shim for thaw
//! (runtime name `io.containerd.thaw.v2`). Each pod, or each plain
//! container, runs in its own micro-VM.

mod agent;
mod child;
mod error;
mod events;
mod heap;
mod hooks;
mod image_cache;
mod metrics;
mod record;
mod rootfs;
mod sandbox;
mod service;
mod shim;
mod spec;
mod stdio;
mod task;
mod vmm;

pub const RUNTIME_ID: &str = "io.containerd.thaw.v2";

fn main() {
    heap::one_arena();
    // containerd-shim catches SIGPIPE only to log it, and its log is a pipe
    // to containerd: with containerd down, each such log line raises the
    // next SIGPIPE and the shim spins. Blocked in every thread (all are
    // spawned after this), writes just fail with EPIPE. Children start
    // with an empty mask (std's spawn resets it).
    let mut pipe = nix::sys::signal::SigSet::empty();
    pipe.add(nix::sys::signal::Signal::SIGPIPE);
    if let Err(e) = pipe.thread_block() {
        eprintln!("containerd-shim-thaw-v2: blocking SIGPIPE: {e}");
    }
    containerd_shim::run::<shim::ThawShim>(RUNTIME_ID, None);
}
