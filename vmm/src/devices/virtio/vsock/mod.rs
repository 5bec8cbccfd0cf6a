//! virtio-vsock (virtio spec 5.10) emulated in userspace, with the host
//! side as Unix sockets (see `muxer` for the host protocol).
//!
//! API for the VMM:
//! - [`Vsock::new`]`(guest_cid, uds_path)` binds the listener at once, so
//!   host processes may connect before the guest driver is up (they wait in
//!   the backlog). Host CID is 2. The socket file is removed on drop.
//! - [`Vsock::send_transport_reset`]: tell the guest every connection is
//!   gone (after a snapshot restore). `restore` queues one by itself,
//!   delivered as soon as the guest has an event buffer.
//! - Snapshots: [`Persist`] with [`VsockState`]; the restored device listens
//!   on a new uds path. Connections are not part of a snapshot; a
//!   same-process pause/resume keeps them.
//!
//! Limits that keep a hostile guest or a slow host peer from growing the
//! VMM: [`connection::BUF_ALLOC`] buffered bytes per connection,
//! [`muxer::MAX_CONNECTIONS`] connections, [`muxer::MAX_PENDING_CTRL`]
//! queued control packets (TX is not read while they wait).

pub mod connection;
pub mod muxer;
pub mod packet;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::descriptors::{
    parse_chain, read_from_bufs, total_len, write_to_bufs, Chain, ChainError,
};
use super::worker::{
    drain_eventfd, notify_guest, serve_queue, EventLoop, Worker, CHAINS_PER_ROUND,
};
use super::{
    read_config_bytes, ActivateContext, ActivateError, Interrupt, PauseError, VirtioDevice,
    FEATURE_RING_EVENT_IDX, FEATURE_VERSION_1, TYPE_VSOCK,
};
use crate::devices::Persist;
use muxer::{Muxer, MAX_PENDING_CTRL, MAX_PKT_PAYLOAD};
use packet::{Header, EVENT_TRANSPORT_RESET, HDR_LEN};

pub const QUEUE_SIZE: u16 = 256;
pub const DEFAULT_GUEST_CID: u32 = 3;

const RX: usize = 0;
const TX: usize = 1;
const EVQ: usize = 2;
const T_STOP: u64 = 3;
const T_RESET: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest CID {0} is reserved (0, 1, 2 and u32::MAX are not usable)")]
    ReservedCid(u32),
}

/// What a snapshot records about the vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u32,
    pub acked_features: u64,
}

type WorkerOutput = (Vec<Queue>, Muxer);

pub struct Vsock {
    guest_cid: u32,
    uds_path: PathBuf,
    acked_features: u64,
    /// The host side while no worker runs.
    muxer: Option<Muxer>,
    worker: Option<Worker<WorkerOutput>>,
    reset_evt: EventFd,
    reset_pending: Arc<AtomicBool>,
}

impl Vsock {
    pub fn new(guest_cid: u32, uds_path: &Path) -> Result<Self, VsockError> {
        if guest_cid <= 2 || guest_cid == u32::MAX {
            return Err(VsockError::ReservedCid(guest_cid));
        }
        let muxer = Muxer::new(u64::from(guest_cid), uds_path)?;
        let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(|source| VsockError::Listen {
            path: uds_path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            acked_features: 0,
            muxer: Some(muxer),
            worker: None,
            reset_evt,
            reset_pending: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn guest_cid(&self) -> u32 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Send VIRTIO_VSOCK_EVENT_TRANSPORT_RESET and drop every connection.
    /// Delivered by the worker once the guest offers an event buffer (at
    /// the next activation if the device is not running).
    pub fn send_transport_reset(&self) {
        self.reset_pending.store(true, Ordering::SeqCst);
        let _ = self.reset_evt.write(1);
    }
}

impl Persist for Vsock {
    type State = VsockState;
    /// The Unix socket path to listen on (bound at once).
    type Resources = PathBuf;
    type Error = VsockError;

    fn save(&self) -> Result<VsockState, VsockError> {
        Ok(VsockState {
            guest_cid: self.guest_cid,
            acked_features: self.acked_features,
        })
    }

    /// The guest's old connections are gone, so a transport reset is
    /// queued.
    fn restore(state: &VsockState, uds_path: PathBuf) -> Result<Self, VsockError> {
        let mut v = Self::new(state.guest_cid, &uds_path)?;
        v.acked_features = state.acked_features & v.avail_features();
        v.reset_pending.store(true, Ordering::SeqCst);
        Ok(v)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1 | FEATURE_RING_EVENT_IDX
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&u64::from(self.guest_cid).to_le_bytes(), offset, data)
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 3 || ctx.queue_events.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: ctx.queues.len(),
            });
        }
        if let Some(worker) = self.worker.take() {
            if let Ok((_, muxer)) = worker.stop() {
                self.muxer = Some(muxer);
            }
        }
        let muxer = match self.muxer.take() {
            Some(m) => m,
            None => Muxer::new(u64::from(self.guest_cid), &self.uds_path)
                .map_err(|e| ActivateError::Backend(e.to_string()))?,
        };
        let reset_evt = self.reset_evt.try_clone().map_err(ActivateError::Worker)?;
        let reset_pending = self.reset_pending.clone();
        let mut queues = ctx.queues.into_iter();
        let (Some(rx), Some(tx), Some(evq)) = (queues.next(), queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: 0,
            });
        };
        let worker = VsockWorker {
            mem: ctx.mem,
            rx,
            tx,
            evq,
            queue_evts: ctx.queue_events,
            interrupt: ctx.interrupt,
            reset_evt,
            reset_pending,
            muxer,
            tx_pending: true,
            rx_data: Vec::new(),
            tx_data: Vec::new(),
        };
        self.worker = Some(
            Worker::spawn(
                "thaw-virtio-vsock",
                crate::confined::ThreadRole::Vsock,
                move |stop| worker.run(stop),
            )
            .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let Some(worker) = self.worker.take() {
            if let Ok((_, mut muxer)) = worker.stop() {
                muxer.reset_all(None);
                self.muxer = Some(muxer);
            }
        }
        // A fresh driver has no connections to be told about.
        self.reset_pending.store(false, Ordering::SeqCst);
        drain_eventfd(&self.reset_evt);
        true
    }

    fn pause(&mut self) -> Result<Vec<Queue>, PauseError> {
        let worker = self.worker.take().ok_or(PauseError::NotActive)?;
        let (queues, muxer) = worker.stop()?;
        self.muxer = Some(muxer);
        Ok(queues)
    }
}

struct VsockWorker {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    evq: Queue,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<dyn Interrupt>,
    reset_evt: EventFd,
    reset_pending: Arc<AtomicBool>,
    muxer: Muxer,
    /// TX may hold chains we have not read (kick seen, or budget ran out).
    tx_pending: bool,
    rx_data: Vec<u8>,
    tx_data: Vec<u8>,
}

impl VsockWorker {
    fn run(mut self, stop: EventFd) -> WorkerOutput {
        let ev = match self.register(&stop) {
            Ok(ev) => ev,
            Err(e) => {
                log::error!("vsock worker: cannot set up epoll: {e}");
                return self.finish();
            }
        };
        let mut ev = ev;
        loop {
            let busy = self.process(&ev);
            let events = match ev.wait(if busy { 0 } else { -1 }) {
                Ok(events) => events,
                Err(e) => {
                    log::error!("vsock worker: epoll failed: {e}");
                    return self.finish();
                }
            };
            if events.iter().any(|(t, _)| *t == T_STOP) {
                return self.finish();
            }
            for (token, set) in events {
                match token {
                    t if t == RX as u64 || t == EVQ as u64 => {
                        drain_eventfd(&self.queue_evts[t as usize]);
                    }
                    t if t == TX as u64 => {
                        drain_eventfd(&self.queue_evts[TX]);
                        self.tx_pending = true;
                    }
                    T_RESET => drain_eventfd(&self.reset_evt),
                    t => self.muxer.handle_event(&ev, t, set),
                }
            }
        }
    }

    fn register(&self, stop: &EventFd) -> std::io::Result<EventLoop> {
        let ev = EventLoop::new()?;
        for (i, evt) in self.queue_evts.iter().enumerate() {
            ev.add(evt.as_raw_fd(), i as u64, EventSet::IN)?;
        }
        ev.add(stop.as_raw_fd(), T_STOP, EventSet::IN)?;
        ev.add(self.reset_evt.as_raw_fd(), T_RESET, EventSet::IN)?;
        self.muxer.register_all(&ev)?;
        Ok(ev)
    }

    fn finish(self) -> WorkerOutput {
        (vec![self.rx, self.tx, self.evq], self.muxer)
    }

    /// Move packets until nothing more can move. Returns true if work is
    /// left that does not need a new event (budget ran out).
    fn process(&mut self, ev: &EventLoop) -> bool {
        let mut used = [false; 3];
        let mut busy = false;
        for _ in 0..32 {
            let mut progress = false;
            if self.reset_pending.load(Ordering::SeqCst) && self.deliver_reset(ev) {
                used[EVQ] = true;
                progress = true;
            }
            let room = MAX_PENDING_CTRL.saturating_sub(self.muxer.ctrl_len());
            if self.tx_pending && room > 0 {
                let muxer = &mut self.muxer;
                let data = &mut self.tx_data;
                let mem = &self.mem;
                let served = serve_queue(mem, &mut self.tx, room.min(CHAINS_PER_ROUND), |c| {
                    handle_tx(muxer, ev, mem, c, data)
                });
                self.tx_pending = served.more;
                if served.chains > 0 {
                    used[TX] = true;
                    progress = true;
                }
            }
            if self.process_rx(ev) > 0 {
                used[RX] = true;
                progress = true;
            }
            busy = progress;
            if !progress {
                break;
            }
        }
        let mem = &self.mem;
        let irq = self.interrupt.as_ref();
        if used[RX] {
            notify_guest(mem, &mut self.rx, irq);
        }
        if used[TX] {
            notify_guest(mem, &mut self.tx, irq);
        }
        if used[EVQ] {
            notify_guest(mem, &mut self.evq, irq);
        }
        busy || (self.tx_pending && self.muxer.ctrl_len() < MAX_PENDING_CTRL)
    }

    /// Pop the next available chain, re-arming the guest's notification if
    /// the ring is empty (so it kicks us when it adds buffers).
    fn pop<'m>(
        mem: &'m GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Option<virtio_queue::DescriptorChain<&'m GuestMemoryMmap>> {
        if let Some(c) = queue.pop_descriptor_chain(mem) {
            return Some(c);
        }
        match queue.enable_notification(mem) {
            Ok(true) => queue.pop_descriptor_chain(mem),
            _ => None,
        }
    }

    fn process_rx(&mut self, ev: &EventLoop) -> usize {
        let mut used = 0;
        while used < CHAINS_PER_ROUND && self.muxer.has_rx_work() {
            let Some(chain) = Self::pop(&self.mem, &mut self.rx) else {
                break;
            };
            let head = chain.head_index();
            let bufs = match parse_chain(&self.mem, chain) {
                Ok(c) if total_len(&c.writable) >= HDR_LEN as u64 => c.writable,
                Ok(_) | Err(_) => {
                    // Unusable buffer: give it back empty and try the next.
                    log::warn!("vsock: malformed RX buffer dropped");
                    self.add_used(RX, head, 0);
                    used += 1;
                    continue;
                }
            };
            let room = (total_len(&bufs) - HDR_LEN as u64).min(MAX_PKT_PAYLOAD as u64) as usize;
            let Some(hdr) = self.muxer.next_rx_packet(ev, room, &mut self.rx_data) else {
                // Nothing to send after all: leave the buffer for later.
                self.rx.go_to_previous_position();
                break;
            };
            let len = self.rx_data.len();
            let ok = write_to_bufs(&self.mem, &bufs, 0, &hdr.to_bytes()).is_ok()
                && write_to_bufs(&self.mem, &bufs, HDR_LEN as u64, &self.rx_data).is_ok();
            if !ok {
                log::warn!("vsock: cannot write RX buffer; packet lost");
            }
            self.add_used(RX, head, (HDR_LEN + len) as u32);
            used += 1;
        }
        used
    }

    fn deliver_reset(&mut self, ev: &EventLoop) -> bool {
        let Some(chain) = Self::pop(&self.mem, &mut self.evq) else {
            return false;
        };
        let head = chain.head_index();
        let delivered = match parse_chain(&self.mem, chain) {
            Ok(c) => write_to_bufs(
                &self.mem,
                &c.writable,
                0,
                &EVENT_TRANSPORT_RESET.to_le_bytes(),
            )
            .is_ok_and(|n| n == 4),
            Err(_) => false,
        };
        self.add_used(EVQ, head, if delivered { 4 } else { 0 });
        if delivered {
            self.reset_pending.store(false, Ordering::SeqCst);
            self.muxer.reset_all(Some(ev));
        }
        true
    }

    fn add_used(&mut self, which: usize, head: u16, len: u32) {
        let q = match which {
            RX => &mut self.rx,
            TX => &mut self.tx,
            _ => &mut self.evq,
        };
        if let Err(e) = q.add_used(&self.mem, head, len) {
            log::warn!("vsock: cannot add used entry: {e}");
        }
    }
}

/// One packet from the guest. The device writes nothing into TX buffers,
/// so the used length is always 0.
fn handle_tx(
    muxer: &mut Muxer,
    ev: &EventLoop,
    mem: &GuestMemoryMmap,
    chain: Result<Chain, ChainError>,
    data: &mut Vec<u8>,
) -> u32 {
    let chain = match chain {
        Ok(c) => c,
        Err(e) => {
            log::warn!("vsock: malformed TX chain dropped: {e}");
            return 0;
        }
    };
    let mut raw = [0u8; HDR_LEN];
    match read_from_bufs(mem, &chain.readable, 0, &mut raw) {
        Ok(HDR_LEN) => {}
        _ => {
            // Without a whole header we do not even know whom to reset.
            log::warn!("vsock: TX packet shorter than a header dropped");
            return 0;
        }
    }
    let hdr = Header::from_bytes(&raw);
    if !muxer.packet_is_addressed_to_us(&hdr) {
        muxer.reply_rst(&hdr);
        return 0;
    }
    let carried = total_len(&chain.readable) - HDR_LEN as u64;
    if hdr.len as usize > MAX_PKT_PAYLOAD || u64::from(hdr.len) > carried {
        muxer.reject(ev, &hdr);
        return 0;
    }
    data.clear();
    if hdr.op == packet::OP_RW {
        data.resize(hdr.len as usize, 0);
        match read_from_bufs(mem, &chain.readable, HDR_LEN as u64, data) {
            Ok(n) if n == data.len() => {}
            _ => {
                muxer.reject(ev, &hdr);
                return 0;
            }
        }
    }
    muxer.handle_guest_packet(ev, &hdr, data);
    0
}

#[cfg(test)]
mod tests;
