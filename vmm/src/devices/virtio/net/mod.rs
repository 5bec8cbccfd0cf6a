//! virtio-net (virtio spec 5.1) over a Linux tap.
//!
//! API for the VMM:
//! - [`Net::new`]`(mac)`: a NIC without a backend. That is a valid state:
//!   the template VM boots and is snapshotted with it, the guest driver
//!   probes it and configures nothing. Without a tap, frames the guest
//!   sends are consumed and dropped (counted), and nothing is received.
//! - [`Net::attach_tap`]`(name)` binds a tap (see [`tap`]) at any time,
//!   also while the device runs: the worker picks it up without losing
//!   its place in the rings. Binding a second one is refused, naming the
//!   first.
//! - Snapshots: [`Persist`] with [`NetState`] (MAC, negotiated features,
//!   link status). The tap is a host resource, never state: restore takes
//!   an optional new one.
//!
//! Data path: two queues (RX 0, TX 1) on one worker thread. Frames carry
//! the 12-byte `virtio_net_hdr_v1`, the tap's vnet header too, so it
//! passes through unchanged; on RX the device only writes `num_buffers`.
//! TX gathers a chain's guest buffers straight into `writev` on the tap;
//! RX reads with `readv` straight into the guest's buffers when they can
//! hold any frame, else through a bounce buffer, holding the frame until
//! enough buffers arrive (mergeable buffers) or dropping it when the one
//! chain it may use is too small. Work per wakeup is bounded, malformed
//! chains are returned empty and counted, and a full tap (EAGAIN) parks
//! TX until the tap is writable again.

pub mod tap;

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::descriptors::{parse_chain, total_len, write_to_bufs, Buf, Chain, ChainError};
use super::worker::{drain_eventfd, notify_guest, EventLoop, Worker, CHAINS_PER_ROUND};
use super::{
    read_config_bytes, ActivateContext, ActivateError, Interrupt, PauseError, VirtioDevice,
    FEATURE_RING_EVENT_IDX, FEATURE_RING_INDIRECT_DESC, FEATURE_VERSION_1, TYPE_NET,
};
use crate::devices::Persist;
use crate::vm::lock;
pub use tap::{Tap, TapError, VNET_HDR_LEN};

pub const QUEUE_SIZE: u16 = 256;
/// Locally administered, unicast: the template's MAC until the guest agent
/// sets the pod's.
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x74, 0x68, 0x61, 0x77, 0x01];
/// The largest frame either way: a 64 KiB GSO packet plus room for link
/// headers. Longer ones are dropped and counted.
pub const MAX_FRAME_LEN: usize = 64 * 1024 + 64;
/// A frame with its vnet header.
const MAX_BUF_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Linux's UIO_MAXIOV: more iovecs than this and readv/writev refuse.
const MAX_IOVS: usize = 1024;
/// Where `num_buffers` sits in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: u64 = 10;

const RX: usize = 0;
const TX: usize = 1;
const T_RX: u64 = 0;
const T_TX: u64 = 1;
const T_STOP: u64 = 2;
const T_ATTACH: u64 = 3;
const T_TAP: u64 = 4;

const fn bit(b: u32) -> u64 {
    1 << b
}
pub const FEATURE_CSUM: u64 = bit(virtio_net::VIRTIO_NET_F_CSUM);
pub const FEATURE_GUEST_CSUM: u64 = bit(virtio_net::VIRTIO_NET_F_GUEST_CSUM);
pub const FEATURE_MAC: u64 = bit(virtio_net::VIRTIO_NET_F_MAC);
pub const FEATURE_GUEST_TSO4: u64 = bit(virtio_net::VIRTIO_NET_F_GUEST_TSO4);
pub const FEATURE_GUEST_TSO6: u64 = bit(virtio_net::VIRTIO_NET_F_GUEST_TSO6);
pub const FEATURE_HOST_TSO4: u64 = bit(virtio_net::VIRTIO_NET_F_HOST_TSO4);
pub const FEATURE_HOST_TSO6: u64 = bit(virtio_net::VIRTIO_NET_F_HOST_TSO6);
pub const FEATURE_MRG_RXBUF: u64 = bit(virtio_net::VIRTIO_NET_F_MRG_RXBUF);
pub const FEATURE_STATUS: u64 = bit(virtio_net::VIRTIO_NET_F_STATUS);
const STATUS_LINK_UP: u16 = virtio_net::VIRTIO_NET_S_LINK_UP as u16;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("tap {bound} is already bound to the NIC (asked to bind {requested})")]
    AlreadyAttached { bound: String, requested: String },
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("virtio-net eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// What a snapshot records about the NIC (the tap is not part of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub acked_features: u64,
    pub link_up: bool,
}

/// Frames and drops, for tests, benchmarks and debugging.
#[derive(Debug, Default)]
pub struct NetStats {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Sent while no tap was bound.
    pub tx_no_backend: AtomicU64,
    pub tx_malformed: AtomicU64,
    pub tx_too_big: AtomicU64,
    /// The tap refused the frame (e.g. a bad GSO header).
    pub tx_errors: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// RX chains the device could not write into (returned empty).
    pub rx_malformed: AtomicU64,
    /// Frames longer than the buffers the guest gave for them.
    pub rx_too_big: AtomicU64,
    pub rx_errors: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub struct Net {
    mac: [u8; 6],
    acked_features: u64,
    link_up: bool,
    /// The tap while no worker holds it: the worker takes it when it
    /// starts and when `attach_evt` fires, and hands it back when stopped.
    tap_slot: Arc<Mutex<Option<Tap>>>,
    /// The bound tap's name, wherever the tap itself is.
    tap_name: Option<String>,
    attach_evt: EventFd,
    stats: Arc<NetStats>,
    worker: Option<Worker<WorkerOutput>>,
}

type WorkerOutput = (Vec<Queue>, Option<Tap>);

impl Net {
    pub fn new(mac: [u8; 6]) -> Result<Self, NetError> {
        Ok(Self {
            mac,
            acked_features: 0,
            link_up: true,
            tap_slot: Arc::new(Mutex::new(None)),
            tap_name: None,
            attach_evt: EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd)?,
            stats: Arc::new(NetStats::default()),
            worker: None,
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn tap_name(&self) -> Option<&str> {
        self.tap_name.as_deref()
    }

    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    /// Opens tap `name` and binds it (see [`Net::attach`]). A second
    /// binding is refused before anything is opened.
    pub fn attach_tap(&mut self, name: &str) -> Result<(), NetError> {
        self.check_unbound(name)?;
        self.attach(Tap::open(name)?)
    }

    /// Binds an open tap. A running worker picks it up at once; otherwise
    /// the next activation does.
    pub fn attach(&mut self, tap: Tap) -> Result<(), NetError> {
        self.check_unbound(tap.name())?;
        self.tap_name = Some(tap.name().to_string());
        *lock(&self.tap_slot) = Some(tap);
        // Fails only if the counter would overflow: a wakeup is pending.
        let _ = self.attach_evt.write(1);
        Ok(())
    }

    fn check_unbound(&self, requested: &str) -> Result<(), NetError> {
        match &self.tap_name {
            Some(bound) => Err(NetError::AlreadyAttached {
                bound: bound.clone(),
                requested: requested.to_string(),
            }),
            None => Ok(()),
        }
    }

    fn config(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac);
        let status = if self.link_up { STATUS_LINK_UP } else { 0 };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        // max_virtqueue_pairs: one (only read with VIRTIO_NET_F_MQ).
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }

    /// Stops the worker, keeping the tap. Returns the queues it held.
    fn stop_worker(&mut self) -> Result<Vec<Queue>, PauseError> {
        let worker = self.worker.take().ok_or(PauseError::NotActive)?;
        match worker.stop() {
            Ok((queues, tap)) => {
                if let Some(tap) = tap {
                    *lock(&self.tap_slot) = Some(tap);
                }
                Ok(queues)
            }
            Err(e) => {
                // The tap went down with the thread; allow a new one.
                if lock(&self.tap_slot).is_none() {
                    self.tap_name = None;
                }
                Err(e)
            }
        }
    }
}

/// The offloads the tap may use in frames it hands us: those the guest
/// can take (`GUEST_*`). Frames the guest sends may carry any offload it
/// negotiated (`HOST_*`); the tap takes those without being told.
pub fn tap_offload(acked: u64) -> libc::c_uint {
    let mut flags = 0;
    if acked & FEATURE_GUEST_CSUM != 0 {
        flags |= libc::TUN_F_CSUM;
        // The kernel refuses TSO without checksum offload.
        if acked & FEATURE_GUEST_TSO4 != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if acked & FEATURE_GUEST_TSO6 != 0 {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

impl Persist for Net {
    type State = NetState;
    /// The tap to bind, if any (a restored VM may get its tap later).
    type Resources = Option<Tap>;
    type Error = NetError;

    fn save(&self) -> Result<NetState, NetError> {
        Ok(NetState {
            mac: self.mac,
            acked_features: self.acked_features,
            link_up: self.link_up,
        })
    }

    fn restore(state: &NetState, tap: Option<Tap>) -> Result<Self, NetError> {
        let mut net = Self::new(state.mac)?;
        net.acked_features = state.acked_features & net.avail_features();
        net.link_up = state.link_up;
        if let Some(tap) = tap {
            net.attach(tap)?;
        }
        Ok(net)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1
            | FEATURE_RING_EVENT_IDX
            | FEATURE_RING_INDIRECT_DESC
            | FEATURE_CSUM
            | FEATURE_GUEST_CSUM
            | FEATURE_MAC
            | FEATURE_HOST_TSO4
            | FEATURE_HOST_TSO6
            | FEATURE_GUEST_TSO4
            | FEATURE_GUEST_TSO6
            | FEATURE_MRG_RXBUF
            | FEATURE_STATUS
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data)
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Read-only for a VERSION_1 driver (no CTRL_MAC_ADDR offered).
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let got = ctx.queues.len();
        if got != 2 || ctx.queue_events.len() != 2 {
            return Err(ActivateError::QueueCount { expected: 2, got });
        }
        if self.worker.is_some() {
            let _ = self.stop_worker();
        }
        let mut queues = ctx.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        let worker = NetWorker {
            mem: ctx.mem,
            rx,
            tx,
            queue_evts: ctx.queue_events,
            interrupt: ctx.interrupt,
            tap: None,
            tap_slot: self.tap_slot.clone(),
            attach_evt: self.attach_evt.try_clone().map_err(ActivateError::Worker)?,
            offload: tap_offload(self.acked_features),
            mrg_rxbuf: self.acked_features & FEATURE_MRG_RXBUF != 0,
            stats: self.stats.clone(),
            tap_interest: None,
            tx_pending: true,
            tx_blocked: false,
            rx_wanted: true,
            tap_readable: false,
            rx_chains: VecDeque::new(),
            held: None,
            bounce: Vec::new(),
            overflow: [0],
        };
        self.worker = Some(
            Worker::spawn(
                "thaw-virtio-net",
                crate::confined::ThreadRole::Net,
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
        true
    }

    fn pause(&mut self) -> Result<Vec<Queue>, PauseError> {
        self.stop_worker()
    }
}

/// A popped RX chain the device may write a frame into.
struct RxChain {
    head: u16,
    bufs: Vec<Buf>,
    cap: u64,
}

/// Whether a pass over a queue did anything, and whether it stopped on
/// its budget with work left.
#[derive(Default)]
struct Progress {
    used: bool,
    more: bool,
}

struct NetWorker {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<dyn Interrupt>,
    tap: Option<Tap>,
    tap_slot: Arc<Mutex<Option<Tap>>>,
    attach_evt: EventFd,
    offload: libc::c_uint,
    mrg_rxbuf: bool,
    stats: Arc<NetStats>,
    /// What epoll watches the tap for (None: not registered).
    tap_interest: Option<EventSet>,
    /// TX may hold chains we have not sent.
    tx_pending: bool,
    /// The tap said EAGAIN: TX waits for EPOLLOUT.
    tx_blocked: bool,
    /// The RX ring may hold buffers (false once seen empty, until a kick).
    rx_wanted: bool,
    /// The tap may hold a frame (false after EAGAIN, until EPOLLIN).
    tap_readable: bool,
    /// Popped, not yet used RX chains: always the latest positions popped,
    /// so a pause can give them back by rewinding.
    rx_chains: VecDeque<RxChain>,
    /// Length of a frame waiting in `bounce` for more RX buffers.
    held: Option<usize>,
    bounce: Vec<u8>,
    /// Where a frame longer than the RX buffers spills (see `read_frame`).
    overflow: [u8; 1],
}

/// Pop the next available chain, re-arming the guest's notification when
/// the ring is empty (so it kicks us when it adds buffers).
fn pop<'m>(
    mem: &'m GuestMemoryMmap,
    queue: &mut Queue,
) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
    if let Some(c) = queue.pop_descriptor_chain(mem) {
        return Some(c);
    }
    match queue.enable_notification(mem) {
        Ok(true) => queue.pop_descriptor_chain(mem),
        _ => None,
    }
}

/// Host iovecs over guest buffers, appended to `out`. None if there would
/// be more than [`MAX_IOVS`] or a buffer is not in guest memory.
fn guest_iovecs(mem: &GuestMemoryMmap, bufs: &[Buf], out: &mut Vec<libc::iovec>) -> Option<()> {
    for buf in bufs {
        for slice in mem.get_slices(buf.addr, buf.len as usize) {
            let slice = slice.ok()?;
            if out.len() == MAX_IOVS {
                return None;
            }
            // The pointer outlives the guard: mmap-backed guest memory stays
            // mapped while `mem` (held by the worker) lives; the guard only
            // matters for Xen's on-demand mappings, which thaw does not use.
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Some(())
}

enum Sent {
    Done,
    /// The tap is full: the chain goes back to the ring.
    Blocked,
}

impl NetWorker {
    fn run(mut self, stop: EventFd) -> WorkerOutput {
        let mut ev = match self.register(&stop) {
            Ok(ev) => ev,
            Err(e) => {
                log::error!("virtio-net worker: cannot set up epoll: {e}");
                return self.finish();
            }
        };
        self.take_tap(&ev);
        loop {
            let busy = self.process();
            self.update_tap_interest(&ev);
            let events = match ev.wait(if busy { 0 } else { -1 }) {
                Ok(events) => events,
                Err(e) => {
                    log::error!("virtio-net worker: epoll failed: {e}");
                    return self.finish();
                }
            };
            if events.iter().any(|(t, _)| *t == T_STOP) {
                return self.finish();
            }
            for (token, set) in events {
                match token {
                    T_RX => {
                        drain_eventfd(&self.queue_evts[RX]);
                        self.rx_wanted = true;
                    }
                    T_TX => {
                        drain_eventfd(&self.queue_evts[TX]);
                        self.tx_pending = true;
                    }
                    T_ATTACH => {
                        drain_eventfd(&self.attach_evt);
                        self.take_tap(&ev);
                    }
                    T_TAP => {
                        // Errors and hangups are found by the next read
                        // or write, which says what they are.
                        let trouble = set.intersects(EventSet::ERROR | EventSet::HANG_UP);
                        if set.contains(EventSet::IN) || trouble {
                            self.tap_readable = true;
                        }
                        if set.contains(EventSet::OUT) || trouble {
                            self.tx_blocked = false;
                            self.tx_pending = true;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn register(&self, stop: &EventFd) -> io::Result<EventLoop> {
        let ev = EventLoop::new()?;
        ev.add(self.queue_evts[RX].as_raw_fd(), T_RX, EventSet::IN)?;
        ev.add(self.queue_evts[TX].as_raw_fd(), T_TX, EventSet::IN)?;
        ev.add(stop.as_raw_fd(), T_STOP, EventSet::IN)?;
        ev.add(self.attach_evt.as_raw_fd(), T_ATTACH, EventSet::IN)?;
        Ok(ev)
    }

    /// Takes a newly bound tap from the slot, tells it the guest's offloads
    /// and starts watching it.
    fn take_tap(&mut self, ev: &EventLoop) {
        if self.tap.is_some() {
            return;
        }
        let Some(tap) = lock(&self.tap_slot).take() else {
            return;
        };
        if let Err(e) = tap.set_offload(self.offload) {
            // Without offloads the kernel segments and checksums for us.
            log::warn!("virtio-net: {e}");
        }
        match ev.add(tap.as_raw_fd(), T_TAP, EventSet::empty()) {
            Ok(()) => self.tap_interest = Some(EventSet::empty()),
            Err(e) => log::error!("virtio-net: cannot watch tap {}: {e}", tap.name()),
        }
        self.tap = Some(tap);
        self.tap_readable = true;
        self.tx_blocked = false;
    }

    /// Watch the tap for frames only while there are buffers to put them
    /// in, and for room only while TX waits for it: a level-triggered fd
    /// watched otherwise would wake us in a loop.
    fn update_tap_interest(&mut self, ev: &EventLoop) {
        let (Some(tap), Some(current)) = (&self.tap, self.tap_interest) else {
            return;
        };
        let mut want = EventSet::empty();
        if self.rx_wanted && self.held.is_none() {
            want |= EventSet::IN;
        }
        if self.tx_blocked {
            want |= EventSet::OUT;
        }
        if want != current {
            match ev.modify(tap.as_raw_fd(), T_TAP, want) {
                Ok(()) => self.tap_interest = Some(want),
                Err(e) => log::error!("virtio-net: cannot watch tap {}: {e}", tap.name()),
            }
        }
    }

    /// Gives popped RX chains back to the ring (a frame waiting for them is
    /// lost) and hands back the queues and the tap.
    fn finish(mut self) -> WorkerOutput {
        for _ in 0..self.rx_chains.len() {
            self.rx.go_to_previous_position();
        }
        self.rx_chains.clear();
        if self.held.take().is_some() {
            bump(&self.stats.rx_too_big);
        }
        (vec![self.rx, self.tx], self.tap)
    }

    /// One round of TX then RX. Returns true if work is left that needs no
    /// new event (a budget ran out).
    fn process(&mut self) -> bool {
        let tx = self.process_tx();
        let rx = self.process_rx();
        let irq = self.interrupt.as_ref();
        if tx.used {
            notify_guest(&self.mem, &mut self.tx, irq);
        }
        if rx.used {
            notify_guest(&self.mem, &mut self.rx, irq);
        }
        tx.more || rx.more
    }

    fn add_used(mem: &GuestMemoryMmap, q: &mut Queue, head: u16, len: u32) {
        if let Err(e) = q.add_used(mem, head, len) {
            log::warn!("virtio-net: cannot add used entry {head}: {e}");
        }
    }

    fn process_tx(&mut self) -> Progress {
        let mut p = Progress::default();
        if !self.tx_pending || self.tx_blocked {
            return p;
        }
        if let Err(e) = self.tx.disable_notification(&self.mem) {
            log::warn!("virtio-net: cannot disable TX notifications: {e}");
        }
        for _ in 0..CHAINS_PER_ROUND {
            let Some(chain) = pop(&self.mem, &mut self.tx) else {
                self.tx_pending = false;
                return p;
            };
            let head = chain.head_index();
            match self.send(parse_chain(&self.mem, chain)) {
                Sent::Done => {
                    Self::add_used(&self.mem, &mut self.tx, head, 0);
                    p.used = true;
                }
                Sent::Blocked => {
                    self.tx.go_to_previous_position();
                    self.tx_blocked = true;
                    return p;
                }
            }
        }
        p.more = true;
        p
    }

    /// Sends one TX chain to the tap, or drops it (counted).
    fn send(&mut self, chain: Result<Chain, ChainError>) -> Sent {
        let stats = &self.stats;
        let chain = match chain {
            Ok(c) if c.writable.is_empty() => c,
            Ok(_) => {
                log::warn!("virtio-net: TX chain with device-writable buffers dropped");
                bump(&stats.tx_malformed);
                return Sent::Done;
            }
            Err(e) => {
                log::warn!("virtio-net: malformed TX chain dropped: {e}");
                bump(&stats.tx_malformed);
                return Sent::Done;
            }
        };
        let len = total_len(&chain.readable);
        if len < VNET_HDR_LEN as u64 {
            log::warn!("virtio-net: TX chain shorter than its header dropped");
            bump(&stats.tx_malformed);
            return Sent::Done;
        }
        if len > MAX_BUF_LEN as u64 {
            log::warn!("virtio-net: TX frame of {len} bytes dropped (limit {MAX_BUF_LEN})");
            bump(&stats.tx_too_big);
            return Sent::Done;
        }
        let Some(tap) = &self.tap else {
            bump(&stats.tx_no_backend);
            return Sent::Done;
        };
        let mut iovs = Vec::with_capacity(chain.readable.len());
        if guest_iovecs(&self.mem, &chain.readable, &mut iovs).is_none() {
            log::warn!("virtio-net: TX chain has too many buffers, dropped");
            bump(&stats.tx_malformed);
            return Sent::Done;
        }
        match tap.writev(&iovs) {
            Ok(_) => {
                bump(&stats.tx_frames);
                stats
                    .tx_bytes
                    .fetch_add(len - VNET_HDR_LEN as u64, Ordering::Relaxed);
                Sent::Done
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Sent::Blocked,
            Err(e) => {
                log::warn!("virtio-net: tap {} refused a frame: {e}", tap.name());
                bump(&stats.tx_errors);
                Sent::Done
            }
        }
    }

    fn rx_cap(&self) -> u64 {
        self.rx_chains.iter().map(|c| c.cap).sum()
    }

    /// Pops RX chains until they can hold what is wanted: one chain without
    /// mergeable buffers; with them, the waiting frame, or any frame.
    /// Returns false if it stopped early on a malformed chain or the iovec
    /// limit (not an empty ring), so waiting for more buffers is useless.
    fn collect_rx_chains(&mut self, p: &mut Progress) -> bool {
        loop {
            let bufs: usize = self.rx_chains.iter().map(|c| c.bufs.len()).sum();
            let enough = if self.mrg_rxbuf {
                self.rx_cap() >= self.held.unwrap_or(MAX_BUF_LEN) as u64
            } else {
                !self.rx_chains.is_empty()
            };
            if enough {
                return true;
            }
            if bufs >= MAX_IOVS / 2 {
                return false;
            }
            let Some(chain) = pop(&self.mem, &mut self.rx) else {
                return true;
            };
            let head = chain.head_index();
            match parse_chain(&self.mem, chain) {
                Ok(c)
                    if c.readable.is_empty()
                        && c.writable.len() <= MAX_IOVS / 4
                        && total_len(&c.writable) >= VNET_HDR_LEN as u64 =>
                {
                    let cap = total_len(&c.writable);
                    self.rx_chains.push_back(RxChain {
                        head,
                        bufs: c.writable,
                        cap,
                    });
                }
                bad if self.rx_chains.is_empty() => {
                    match bad {
                        Err(e) => log::warn!("virtio-net: malformed RX chain returned empty: {e}"),
                        Ok(_) => log::warn!(
                            "virtio-net: RX chain with readable or too few bytes returned empty"
                        ),
                    }
                    bump(&self.stats.rx_malformed);
                    Self::add_used(&self.mem, &mut self.rx, head, 0);
                    p.used = true;
                }
                _ => {
                    // Held chains come first in the used ring; this one is
                    // dealt with once they are gone.
                    self.rx.go_to_previous_position();
                    return false;
                }
            }
        }
    }

    fn process_rx(&mut self) -> Progress {
        let mut p = Progress::default();
        if self.tap.is_none() || !self.rx_wanted {
            return p;
        }
        if let Err(e) = self.rx.disable_notification(&self.mem) {
            log::warn!("virtio-net: cannot disable RX notifications: {e}");
        }
        for _ in 0..CHAINS_PER_ROUND {
            let may_grow = self.collect_rx_chains(&mut p);
            if self.rx_chains.is_empty() {
                self.rx_wanted = false;
                return p;
            }
            let cap = self.rx_cap();
            let n = match self.held {
                Some(n) => n,
                None => {
                    if !self.tap_readable {
                        return p;
                    }
                    let direct = !self.mrg_rxbuf || cap >= MAX_BUF_LEN as u64;
                    match self.read_frame(direct) {
                        Ok((n, true)) => {
                            if n as u64 <= cap {
                                self.deliver(n, &mut p);
                            } else {
                                bump(&self.stats.rx_too_big);
                            }
                            continue;
                        }
                        Ok((n, false)) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.tap_readable = false;
                            return p;
                        }
                        Err(e) => {
                            log::warn!("virtio-net: reading the tap: {e}");
                            bump(&self.stats.rx_errors);
                            self.tap_readable = false;
                            return p;
                        }
                    }
                }
            };
            // A frame in the bounce buffer.
            if n as u64 <= cap {
                self.held = None;
                self.copy_bounce(n);
                self.deliver(n, &mut p);
            } else if n > MAX_BUF_LEN || !self.mrg_rxbuf || !may_grow {
                self.held = None;
                bump(&self.stats.rx_too_big);
            } else {
                // Wait for the guest to add buffers (it kicks: the ring
                // was seen empty, which re-armed its notification).
                self.held = Some(n);
                self.rx_wanted = false;
                return p;
            }
        }
        p.more = true;
        p
    }

    /// One frame from the tap: straight into the RX chains (all of them
    /// with mergeable buffers, else the first) if `direct`, or into the
    /// bounce buffer. Returns the frame's length and whether it went
    /// straight in.
    fn read_frame(&mut self, direct: bool) -> io::Result<(usize, bool)> {
        let Some(tap) = &self.tap else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        if direct {
            let take = if self.mrg_rxbuf {
                self.rx_chains.len()
            } else {
                1
            };
            let mut iovs = Vec::new();
            let mapped = self
                .rx_chains
                .iter()
                .take(take)
                .all(|c| guest_iovecs(&self.mem, &c.bufs, &mut iovs).is_some());
            // Collection keeps chains within the iovec limit; should they
            // not be, the bounce buffer still works.
            if mapped {
                // A read returns at most what the buffers hold, so a frame
                // that was cut and one that just fit look alike: a byte
                // past the guest's buffers tells them apart.
                iovs.push(libc::iovec {
                    iov_base: self.overflow.as_mut_ptr().cast(),
                    iov_len: self.overflow.len(),
                });
                return tap.readv(&iovs).map(|n| (n, true));
            }
        }
        // One byte more than any frame, for the same reason.
        self.bounce.resize(MAX_BUF_LEN + 1, 0);
        let iov = libc::iovec {
            iov_base: self.bounce.as_mut_ptr().cast(),
            iov_len: self.bounce.len(),
        };
        tap.readv(&[iov]).map(|n| (n, false))
    }

    /// Copies a bounced frame of `n` bytes into the RX chains, in order.
    fn copy_bounce(&mut self, n: usize) {
        let mut done = 0;
        for c in &self.rx_chains {
            if done == n {
                break;
            }
            let end = n.min(done + c.cap as usize);
            if let Err(e) = write_to_bufs(&self.mem, &c.bufs, 0, &self.bounce[done..end]) {
                log::warn!("virtio-net: cannot write an RX buffer: {e}");
            }
            done = end;
        }
    }

    /// Completes a frame of `n` bytes (header included) that is in the
    /// first RX chains: writes num_buffers, puts the chains in the used
    /// ring.
    fn deliver(&mut self, n: usize, p: &mut Progress) {
        let mut left = n as u64;
        let mut count: u16 = 0;
        for c in &self.rx_chains {
            count += 1;
            if left <= c.cap {
                break;
            }
            left -= c.cap;
        }
        if let Some(first) = self.rx_chains.front() {
            if let Err(e) = write_to_bufs(
                &self.mem,
                &first.bufs,
                NUM_BUFFERS_OFFSET,
                &count.to_le_bytes(),
            ) {
                log::warn!("virtio-net: cannot write an RX header: {e}");
            }
        }
        let mut left = n as u64;
        for _ in 0..count {
            let Some(c) = self.rx_chains.pop_front() else {
                break;
            };
            let len = left.min(c.cap);
            left -= len;
            Self::add_used(&self.mem, &mut self.rx, c.head, len as u32);
        }
        bump(&self.stats.rx_frames);
        self.stats
            .rx_bytes
            .fetch_add((n - VNET_HDR_LEN.min(n)) as u64, Ordering::Relaxed);
        p.used = true;
    }
}

#[cfg(test)]
pub(crate) mod tests;
