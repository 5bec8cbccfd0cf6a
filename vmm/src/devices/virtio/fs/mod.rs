//! virtio-fs (virtio spec 5.11) served inside the VMM process: a FUSE
//! server over one per-sandbox host directory, under which the shim
//! bind-mounts the sources of the containers' mounts (Kata's layout).
//!
//! Why our own server, not `fuse-backend-rs`: its newest release (0.14)
//! pins `vm-memory =0.17.1` and `virtio-queue 0.17`, the workspace is on
//! 0.18; serving from it would mean a second `GuestMemoryMmap` type built
//! with `unsafe` over the same mappings, and its passthrough confines the
//! guest by path checks in userspace. Ours is small (the ops below), has no
//! version split, and leaves containment to the kernel: every guest name is
//! resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)` from an `O_PATH` fd (see [`passthrough`] for the
//! whole containment contract). Serving in process (not vhost-user) keeps
//! the template's `MAP_PRIVATE` guest memory working: no other process needs
//! to map it.
//!
//! API for the VMM:
//! - [`Fs::new`]`(tag)`: the device with no share. It is part of every VM
//!   and of the template; the guest driver probes it and nothing mounts it.
//!   Without a share, every request is answered `ENXIO` (a mount fails).
//! - [`Fs::attach_share`]`(dir, read_only)`: exports `dir`, at any time,
//!   also while the worker runs. A second share is refused, naming the
//!   first. Read-only is enforced here (`EROFS`), not only by the guest.
//! - Snapshots: [`Persist`] with [`FsState`] (tag, negotiated features,
//!   whether a FUSE session was live). The contract: a template is
//!   snapshotted before anything mounts the share, so no inode or handle
//!   needs to survive a restore; restore refuses a state with a live session
//!   ([`FsError::MountedInSnapshot`]). The share is a host resource, never
//!   state: restore takes an optional new one.
//!
//! Data path: queue 0 (hiprio: FORGET, BATCH_FORGET) and queue 1 (requests)
//! on one worker thread. A chain's readable part (`fuse_in_header` and
//! arguments, at most [`server::MAX_REQUEST`] bytes) is gathered, served by
//! [`server::Server`], and the reply (`fuse_out_header` and its body)
//! scattered into the writable part, never longer than that part.
//! Bounds: 65536 inodes and 65536 open handles per share
//! ([`passthrough::Limits`]); beyond, `ENFILE`.

pub mod passthrough;
pub mod protocol;
pub mod server;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::descriptors::{read_from_bufs, total_len, write_to_bufs, Chain, ChainError};
use super::worker::{
    drain_eventfd, notify_guest, serve_queue, EventLoop, Worker, CHAINS_PER_ROUND,
};
use super::{
    read_config_bytes, ActivateContext, ActivateError, Interrupt, PauseError, VirtioDevice,
    FEATURE_RING_EVENT_IDX, FEATURE_RING_INDIRECT_DESC, FEATURE_VERSION_1, TYPE_FS,
};
use crate::devices::Persist;
use crate::vm::lock;
use passthrough::{Limits, Share, ShareError};
use server::{Server, MAX_REQUEST};

/// Large enough for a 1 MiB request in 4 KiB pages plus headers.
pub const QUEUE_SIZE: u16 = 1024;
pub const NUM_QUEUES: usize = 2;
/// The tag every thaw VM's share has; the guest mounts it by this name.
pub const DEFAULT_TAG: &str = "thaw-share";
/// The config space's tag field (virtio spec 5.11.4).
pub const TAG_LEN: usize = 36;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("tag {0:?} is empty or longer than {TAG_LEN} bytes")]
    BadTag(String),
    #[error("share {bound} is already attached (asked to attach {requested})")]
    AlreadyAttached { bound: PathBuf, requested: PathBuf },
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error("the snapshot has the share mounted by the guest; only a template saved before any mount can be restored")]
    MountedInSnapshot,
}

/// What a snapshot records about the device (the share is not part of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    pub tag: String,
    pub acked_features: u64,
    /// A FUSE session was live when saved (restore refuses it).
    pub mounted: bool,
}

/// A host directory to export, as the CLI and control socket give it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareConfig {
    pub dir: PathBuf,
    pub read_only: bool,
}

pub struct Fs {
    tag: String,
    acked_features: u64,
    limits: Limits,
    server: Arc<Mutex<Server>>,
    worker: Option<Worker<Vec<Queue>>>,
}

impl Fs {
    pub fn new(tag: &str) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::BadTag(tag.to_string()));
        }
        Ok(Self {
            tag: tag.to_string(),
            acked_features: 0,
            limits: Limits::default(),
            server: Arc::new(Mutex::new(Server::new())),
            worker: None,
        })
    }

    /// Other bounds on inodes and handles (for tests; before attaching).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn share_dir(&self) -> Option<PathBuf> {
        lock(&self.server).share_dir().map(Path::to_path_buf)
    }

    /// Whether the guest has the share mounted (INIT without DESTROY).
    pub fn mounted(&self) -> bool {
        lock(&self.server).mounted()
    }

    /// Exports `dir`. A running worker serves it from the next request.
    pub fn attach_share(&mut self, dir: &Path, read_only: bool) -> Result<(), FsError> {
        let mut server = lock(&self.server);
        if let Some(bound) = server.share_dir() {
            return Err(FsError::AlreadyAttached {
                bound: bound.to_path_buf(),
                requested: dir.to_path_buf(),
            });
        }
        server.set_share(Share::new(dir, read_only, self.limits)?);
        Ok(())
    }

    fn config(&self) -> [u8; TAG_LEN + 4] {
        let mut c = [0u8; TAG_LEN + 4];
        c[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        // num_request_queues: one.
        c[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        c
    }

    fn stop_worker(&mut self) -> Result<Vec<Queue>, PauseError> {
        self.worker.take().ok_or(PauseError::NotActive)?.stop()
    }
}

impl Persist for Fs {
    type State = FsState;
    /// The share to export, if any (a restored VM may get it later).
    type Resources = Option<ShareConfig>;
    type Error = FsError;

    fn save(&self) -> Result<FsState, FsError> {
        Ok(FsState {
            tag: self.tag.clone(),
            acked_features: self.acked_features,
            mounted: self.mounted(),
        })
    }

    fn restore(state: &FsState, share: Option<ShareConfig>) -> Result<Self, FsError> {
        if state.mounted {
            return Err(FsError::MountedInSnapshot);
        }
        let mut fs = Self::new(&state.tag)?;
        fs.acked_features = state.acked_features & fs.avail_features();
        if let Some(s) = share {
            fs.attach_share(&s.dir, s.read_only)?;
        }
        Ok(fs)
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1 | FEATURE_RING_EVENT_IDX | FEATURE_RING_INDIRECT_DESC
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data)
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The config space is read-only.
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let got = ctx.queues.len();
        if got != NUM_QUEUES || ctx.queue_events.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got,
            });
        }
        if self.worker.is_some() {
            let _ = self.stop_worker();
        }
        let worker = FsWorker {
            mem: ctx.mem,
            queues: ctx.queues,
            queue_evts: ctx.queue_events,
            interrupt: ctx.interrupt,
            server: self.server.clone(),
            scratch: Vec::new(),
        };
        self.worker = Some(
            Worker::spawn(
                "thaw-virtio-fs",
                crate::confined::ThreadRole::Fs,
                move |stop| worker.run(stop),
            )
            .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if self.worker.is_some() {
            let _ = self.stop_worker();
        }
        // A reset driver has forgotten every node id and handle.
        lock(&self.server).end_session();
        true
    }

    fn pause(&mut self) -> Result<Vec<Queue>, PauseError> {
        self.stop_worker()
    }
}

struct FsWorker {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<dyn Interrupt>,
    server: Arc<Mutex<Server>>,
    scratch: Vec<u8>,
}

const T_STOP: u64 = NUM_QUEUES as u64;

impl FsWorker {
    fn run(mut self, stop: EventFd) -> Vec<Queue> {
        let mut events = match self.register(&stop) {
            Ok(ev) => ev,
            Err(e) => {
                log::error!("virtio-fs worker: cannot set up epoll: {e}");
                return self.queues;
            }
        };
        // Requests may have been queued before we started (resume).
        let mut pending = [true; NUM_QUEUES];
        loop {
            for (i, want) in pending.iter_mut().enumerate() {
                if *want {
                    *want = self.serve(i);
                }
            }
            let timeout = if pending.iter().any(|p| *p) { 0 } else { -1 };
            let ready = match events.wait(timeout) {
                Ok(ready) => ready,
                Err(e) => {
                    log::error!("virtio-fs worker: epoll failed: {e}");
                    return self.queues;
                }
            };
            for (token, _) in ready {
                if token == T_STOP {
                    return self.queues;
                }
                if let Some(evt) = self.queue_evts.get(token as usize) {
                    drain_eventfd(evt);
                    pending[token as usize] = true;
                }
            }
        }
    }

    fn register(&self, stop: &EventFd) -> io::Result<EventLoop> {
        let ev = EventLoop::new()?;
        for (i, evt) in self.queue_evts.iter().enumerate() {
            ev.add(evt.as_raw_fd(), i as u64, EventSet::IN)?;
        }
        ev.add(stop.as_raw_fd(), T_STOP, EventSet::IN)?;
        Ok(ev)
    }

    /// One budgeted pass over queue `i`; true if work may be left.
    fn serve(&mut self, i: usize) -> bool {
        let Self {
            mem,
            queues,
            interrupt,
            server,
            scratch,
            ..
        } = self;
        let Some(queue) = queues.get_mut(i) else {
            return false;
        };
        let served = serve_queue(mem, queue, CHAINS_PER_ROUND, |chain| {
            serve_chain(mem, chain, server, scratch)
        });
        if served.chains > 0 {
            notify_guest(mem, queue, interrupt.as_ref());
        }
        served.more
    }
}

/// Serve one chain; returns the bytes written into it.
pub(crate) fn serve_chain(
    mem: &GuestMemoryMmap,
    chain: Result<Chain, ChainError>,
    server: &Mutex<Server>,
    scratch: &mut Vec<u8>,
) -> u32 {
    let chain = match chain {
        Ok(c) => c,
        Err(e) => {
            log::warn!("virtio-fs: dropping malformed chain: {e}");
            return 0;
        }
    };
    // One byte more than we accept, so an oversized request is seen as
    // such (its header's len disagrees) rather than silently cut.
    let want = total_len(&chain.readable).min(MAX_REQUEST as u64 + 1) as usize;
    scratch.resize(want, 0);
    let got = match read_from_bufs(mem, &chain.readable, 0, scratch) {
        Ok(n) => n,
        Err(e) => {
            log::warn!("virtio-fs: cannot read a request: {e}");
            return 0;
        }
    };
    let room = usize::try_from(total_len(&chain.writable)).unwrap_or(usize::MAX);
    let reply = lock(server).handle(&scratch[..got], room);
    match write_to_bufs(mem, &chain.writable, 0, &reply) {
        Ok(n) => n as u32,
        Err(e) => {
            log::warn!("virtio-fs: cannot write a reply: {e}");
            0
        }
    }
}
