//! End-to-end tests of the vsock device: a fake guest driver writes packets
//! into in-memory virtqueues, real Unix sockets play the host side, and the
//! device's own worker thread sits in between.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use super::connection::BUF_ALLOC;
use super::muxer::MAX_PENDING_CTRL;
use super::packet::*;
use super::*;
use crate::devices::virtio::mmio::tests::{negotiate, r, setup_queue, w, ALL_OK};
use crate::devices::virtio::mmio::{MmioResources, MmioTransport};
use crate::devices::virtio::testutil::{mem, CountingInterrupt, TestQueue, F_NEXT};
use crate::devices::BusDevice;

const MEM_SIZE: usize = 16 << 20;
const BUF_BASE: u64 = 0x10000;
const RX_BUF_LEN: u32 = 4096 + HDR_LEN as u32;
const WAIT: Duration = Duration::from_secs(5);
const GUEST_BUF_ALLOC: u32 = 64 * 1024;

/// The guest driver's side of the three queues.
struct Guest {
    mem: GuestMemoryMmap,
    rx: TestQueue,
    tx: TestQueue,
    evq: TestQueue,
    evts: Vec<EventFd>,
    irq: Arc<CountingInterrupt>,
    next_buf: u64,
    rx_bufs: HashMap<u16, u64>,
    rx_seen: u16,
    ev_bufs: HashMap<u16, u64>,
    ev_seen: u16,
}

impl Guest {
    fn new() -> Self {
        let m = mem(MEM_SIZE);
        Self {
            rx: TestQueue::new(&m, 0x0, QUEUE_SIZE),
            tx: TestQueue::new(&m, 0x4000, QUEUE_SIZE),
            evq: TestQueue::new(&m, 0x8000, QUEUE_SIZE),
            mem: m,
            evts: (0..3)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            irq: CountingInterrupt::new(),
            next_buf: BUF_BASE,
            rx_bufs: HashMap::new(),
            rx_seen: 0,
            ev_bufs: HashMap::new(),
            ev_seen: 0,
        }
    }

    fn queues(&self) -> Vec<Queue> {
        vec![self.rx.queue(), self.tx.queue(), self.evq.queue()]
    }

    fn activate(&self, dev: &mut Vsock, queues: Vec<Queue>) {
        dev.activate(ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.irq.clone(),
            queues,
            queue_events: self.evts.iter().map(|e| e.try_clone().unwrap()).collect(),
        })
        .unwrap();
    }

    fn alloc(&mut self, len: u32) -> u64 {
        if self.next_buf + u64::from(len) > MEM_SIZE as u64 {
            self.next_buf = BUF_BASE;
        }
        let at = self.next_buf;
        self.next_buf = (at + u64::from(len) + 15) & !15;
        at
    }

    fn kick(&self, q: usize) {
        self.evts[q].write(1).unwrap();
    }

    fn give_rx(&mut self, n: usize) {
        for _ in 0..n {
            let addr = self.alloc(RX_BUF_LEN);
            let head = self.rx.add_chain(&[(addr, RX_BUF_LEN, true)]);
            self.rx_bufs.insert(head, addr);
        }
        self.kick(RX);
    }

    fn give_event_buffer(&mut self) {
        let addr = self.alloc(4);
        self.mem
            .write_obj(0xffff_ffffu32, GuestAddress(addr))
            .unwrap();
        let head = self.evq.add_chain(&[(addr, 4, true)]);
        self.ev_bufs.insert(head, addr);
        self.kick(EVQ);
    }

    fn hdr(&self, op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    /// Send header + payload in one readable buffer; `hdr.len` as given.
    fn send_raw(&mut self, hdr: Header, payload: &[u8]) {
        let len = (HDR_LEN + payload.len()) as u32;
        let addr = self.alloc(len);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        self.tx.add_chain(&[(addr, len, false)]);
        self.kick(TX);
    }

    fn send(&mut self, mut hdr: Header, payload: &[u8]) {
        hdr.len = payload.len() as u32;
        self.send_raw(hdr, payload);
    }

    fn try_recv(&mut self, timeout: Duration) -> Option<(Header, Vec<u8>)> {
        if !self.rx.wait_used(self.rx_seen.wrapping_add(1), timeout) {
            return None;
        }
        let (id, len) = self.rx.used_elem(self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        let addr = self.rx_bufs[&(id as u16)];
        if len == 0 {
            return Some((Header::default(), Vec::new()));
        }
        let mut raw = [0u8; HDR_LEN];
        self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
        let hdr = Header::from_bytes(&raw);
        let mut data = vec![0u8; len as usize - HDR_LEN];
        self.mem
            .read_slice(&mut data, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        assert_eq!(hdr.len as usize, data.len());
        Some((hdr, data))
    }

    fn recv(&mut self) -> (Header, Vec<u8>) {
        self.try_recv(WAIT).expect("a packet from the device")
    }

    fn next_event(&mut self) -> Option<(u32, u32)> {
        if !self.evq.wait_used(self.ev_seen.wrapping_add(1), WAIT) {
            return None;
        }
        let (id, len) = self.evq.used_elem(self.ev_seen);
        self.ev_seen = self.ev_seen.wrapping_add(1);
        let value = self
            .mem
            .read_obj::<u32>(GuestAddress(self.ev_bufs[&(id as u16)]))
            .unwrap();
        Some((len, value))
    }
}

fn uds(dir: &TempDir) -> PathBuf {
    dir.as_path().join("vsock.sock")
}

fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

fn accept(listener: &UnixListener) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(WAIT)).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && start.elapsed() < WAIT => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("no connection from the device: {e}"),
        }
    }
}

/// Guest connects to host port `port`, where the test listens.
fn guest_connect(
    g: &mut Guest,
    uds: &Path,
    guest_port: u32,
    port: u32,
) -> (UnixListener, UnixStream) {
    let listener = UnixListener::bind(port_path(uds, port)).unwrap();
    g.send(g.hdr(OP_REQUEST, guest_port, port), &[]);
    let peer = accept(&listener);
    let (resp, _) = g.recv();
    assert_eq!(resp.op, OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (port, guest_port));
    (listener, peer)
}

#[test]
fn host_connect_handshake_and_relay_through_mmio_transport() {
    let dir = TempDir::new().unwrap();
    let uds = uds(&dir);
    let mut g = Guest::new();
    let dev = Vsock::new(3, &uds).unwrap();
    let mut t = MmioTransport::new(g.mem.clone(), dev).unwrap();
    let mut cid = [0u8; 8];
    t.read(0x100, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 3);
    negotiate(&mut t);
    setup_queue(&mut t, 0, &g.rx);
    setup_queue(&mut t, 1, &g.tx);
    setup_queue(&mut t, 2, &g.evq);
    w(&mut t, 0x70, ALL_OK);
    assert_eq!(r(&mut t, 0x70), ALL_OK);
    // The guest "kicks" through the transport's eventfds.
    g.evts = t
        .queue_events()
        .iter()
        .map(|e| e.try_clone().unwrap())
        .collect();
    g.give_rx(16);

    let mut host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(WAIT)).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    let (req, _) = g.recv();
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, 3));
    assert_eq!(req.dst_port, 1024);
    assert_eq!(req.kind, TYPE_STREAM);
    assert_eq!(req.buf_alloc, BUF_ALLOC);
    let local = req.src_port;

    g.send(g.hdr(OP_RESPONSE, 1024, local), &[]);
    let mut reader = BufReader::new(host.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {local}\n"));

    host.write_all(b"ping").unwrap();
    let (rw, data) = g.recv();
    assert_eq!((rw.op, rw.src_port, rw.dst_port), (OP_RW, local, 1024));
    assert_eq!(data, b"ping");

    g.send(g.hdr(OP_RW, 1024, local), b"pong");
    let mut got = [0u8; 4];
    reader.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");

    // The guest closes; the device answers RST and the host sees EOF.
    let mut shut = g.hdr(OP_SHUTDOWN, 1024, local);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(shut, &[]);
    let (rst, _) = g.recv();
    assert_eq!(rst.op, OP_RST);
    assert_eq!(reader.read(&mut got).unwrap(), 0);
    // The transport raised the used-ring interrupt.
    assert_ne!(r(&mut t, 0x60) & 1, 0);
}

#[test]
fn guest_connects_to_host_listener_and_data_flows_both_ways() {
    let dir = TempDir::new().unwrap();
    let uds = uds(&dir);
    let mut g = Guest::new();
    let mut dev = Vsock::new(3, &uds).unwrap();
    g.activate(&mut dev, g.queues());
    g.give_rx(16);
    let (_l, mut peer) = guest_connect(&mut g, &uds, 2000, 5000);

    g.send(g.hdr(OP_RW, 2000, 5000), b"hello host");
    let mut got = [0u8; 10];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host");

    peer.write_all(b"hello guest").unwrap();
    let (rw, data) = g.recv();
    assert_eq!((rw.op, rw.src_port, rw.dst_port), (OP_RW, 5000, 2000));
    assert_eq!(data, b"hello guest");

    // Host half-close: the guest is told no more data comes.
    peer.shutdown(std::net::Shutdown::Write).unwrap();
    let (shut, _) = g.recv();
    assert_eq!(shut.op, OP_SHUTDOWN);
    assert_eq!(shut.flags, SHUTDOWN_SEND);
    // The guest can still send.
    g.send(g.hdr(OP_RW, 2000, 5000), b"bye");
    let mut bye = [0u8; 3];
    peer.read_exact(&mut bye).unwrap();
    assert_eq!(&bye, b"bye");
    // Host closes fully; the guest's next packet gets RST.
    drop(peer);
    g.send(g.hdr(OP_RW, 2000, 5000), b"lost");
    let (rst, _) = g.recv();
    assert_eq!(rst.op, OP_RST);
    assert_eq!(rst.dst_port, 2000);
}

#[test]
fn guest_connect_without_host_listener_gets_rst() {
    let dir = TempDir::new().unwrap();
    let uds = uds(&dir);
    let mut g = Guest::new();
    let mut dev = Vsock::new(3, &uds).unwrap();
    g.activate(&mut dev, g.queues());
    g.give_rx(4);
    g.send(g.hdr(OP_REQUEST, 2001, 6000), &[]);
    let (rst, _) = g.recv();
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 6000, 2001));
}

#[test]
fn hostile_tx_packets_get_rst_or_are_dropped_and_device_keeps_working() {
    let dir = TempDir::new().unwrap();
    let uds = uds(&dir);
    let mut g = Guest::new();
    let mut dev = Vsock::new(3, &uds).unwrap();
    g.activate(&mut dev, g.queues());
    g.give_rx(64);

    // Dropped silently (no header to answer): a 20-byte packet, a looping
    // chain, a buffer outside guest memory, a write-only "packet".
    let a = g.alloc(64);
    g.mem
        .write_slice(&g.hdr(OP_REQUEST, 1, 1).to_bytes(), GuestAddress(a))
        .unwrap();
    g.tx.add_chain(&[(a, 20, false)]);
    g.tx.write_desc(100, a, HDR_LEN as u32, F_NEXT, 100);
    g.tx.publish(100);
    g.tx.add_chain(&[(MEM_SIZE as u64 - 8, 64, false)]);
    g.tx.add_chain(&[(a, HDR_LEN as u32, true)]);
    // RST for an RST is never sent.
    g.send(g.hdr(OP_RST, 10, 10), &[]);

    // Each of these gets an RST back, identified by its source port.
    let mut lying = g.hdr(OP_RW, 11, 7000);
    lying.len = 100; // only 10 bytes follow
    g.send_raw(lying, &[0u8; 10]);
    let mut huge = g.hdr(OP_RW, 12, 7000);
    huge.len = u32::MAX;
    g.send_raw(huge, &[]);
    g.send(g.hdr(99, 13, 7000), &[]);
    let mut wrong_src = g.hdr(OP_REQUEST, 14, 7000);
    wrong_src.src_cid = 7;
    g.send(wrong_src, &[]);
    let mut wrong_dst = g.hdr(OP_REQUEST, 15, 7000);
    wrong_dst.dst_cid = 5;
    g.send(wrong_dst, &[]);
    let mut wrong_type = g.hdr(OP_REQUEST, 16, 7000);
    wrong_type.kind = 2;
    g.send(wrong_type, &[]);
    g.send(g.hdr(OP_RW, 17, 7000), b"no such connection");
    g.send(g.hdr(OP_CREDIT_REQUEST, 18, 7000), &[]);
    g.send(g.hdr(OP_RESPONSE, 19, 7000), &[]);
    let mut shut = g.hdr(OP_SHUTDOWN, 20, 7000);
    shut.flags = 3;
    g.send(shut, &[]);

    for port in 11..=20 {
        let (rst, _) = g.recv();
        assert_eq!(rst.op, OP_RST, "port {port}");
        assert_eq!(rst.dst_port, port);
        assert_eq!(rst.dst_cid, 3);
    }
    assert!(g.try_recv(Duration::from_millis(200)).is_none());
    // Every TX chain (5 dropped, 10 answered) was consumed.
    assert!(g.tx.wait_used(15, WAIT));
    assert_eq!(g.tx.used_idx(), 15);

    // A header split across two descriptors is fine; the device still
    // serves a real connection.
    let _l = UnixListener::bind(port_path(&uds, 7100)).unwrap();
    let b = g.alloc(HDR_LEN as u32);
    g.mem
        .write_slice(&g.hdr(OP_REQUEST, 21, 7100).to_bytes(), GuestAddress(b))
        .unwrap();
    g.tx.add_chain(&[(b, 10, false), (b + 10, HDR_LEN as u32 - 10, false)]);
    g.kick(TX);
    let (resp, _) = g.recv();
    assert_eq!((resp.op, resp.dst_port), (OP_RESPONSE, 21));

    // A broken packet on a live connection resets that connection.
    let mut bad = g.hdr(OP_RW, 21, 7100);
    bad.len = 5000;
    g.send_raw(bad, b"short");
    let (rst, _) = g.recv();
    assert_eq!((rst.op, rst.dst_port), (OP_RST, 21));
}

#[test]
fn malformed_rx_buffers_are_returned_empty() {
    let dir = TempDir::new().unwrap();
    let uds = uds(&dir);
    let mut g = Guest::new();
    let mut dev = Vsock::new(3, &uds).unwrap();
    g.activate(&mut dev, g.queues());
    let a = g.alloc(4096);
    // Too small for a header, device-readable, then a good one.
    let h1 = g.rx.add_chain(&[(a, 10, true)]);
    let h2 = g.rx.add_chain(&[(a, 4096, false)]);
    g.rx_bufs.insert(h1, a);
    g.rx_bufs.insert(h2, a);
    g.give_rx(1);
    g.send(g.hdr(OP_REQUEST, 30, 7200), &[]);
    let (first, _) = g.recv();
    let (second, _) = g.recv();
    let (third, _) = g.recv();
    assert_eq!(first.op, 0, "short buffer returned with length 0");
    assert_eq!(second.op, 0, "readable buffer returned with length 0");
    assert_eq!((third.op, third.dst_port), (OP_RST, 30));
}

#[test]
fn host_data_respects_guest_credit() {
    let dir = TempDir::new().unwrap();
    let uds = uds(&dir);
    let mut g = Guest::new();
    let mut dev = Vsock::new(3, &uds).unwrap();
    g.activate(&mut dev, g.queues());
    g.give_rx(32);
    let listener = UnixListener::bind(port_path(&uds, 5100)).unwrap();
    let mut req = g.hdr(OP_REQUEST, 2100, 5100);
    req.buf_alloc = 100;
    g.send(req, &[]);
    let mut peer = accept(&listener);
    assert_eq!(g.recv().0.op, OP_RESPONSE);

    peer.write_all(&[9u8; 1000]).unwrap();
    let mut got = 0;
    let mut credit_requested = false;
    while let Some((h, data)) = g.try_recv(Duration::from_millis(300)) {
        match h.op {
            OP_RW => got += data.len(),
            OP_CREDIT_REQUEST => credit_requested = true,
            op => panic!("unexpected op {op}"),
        }
    }
    assert_eq!(got, 100, "the device sent more than the guest's buffer");
    assert!(credit_requested);

    // The guest consumed 100 bytes and says so.
    let mut upd = g.hdr(OP_CREDIT_UPDATE, 2100, 5100);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 100;
    g.send(upd, &[]);
    let mut more = 0;
    while let Some((h, data)) = g.try_recv(Duration::from_millis(300)) {
        if h.op == OP_RW {
            more += data.len();
        }
    }
    assert_eq!(more, 100);
}

#[test]
fn guest_ignoring_credit_is_reset_and_host_buffer_stays_bounded() {
    let dir = TempDir::new().unwrap();
    let uds = uds(&dir);
    let mut g = Guest::new();
    let mut dev = Vsock::new(3, &uds).unwrap();
    g.activate(&mut dev, g.queues());
    g.give_rx(32);
    // The host peer never reads.
    let (_l, _peer) = guest_connect(&mut g, &uds, 2200, 5200);
    let chunk = vec![1u8; 60 * 1024];
    // Way past BUF_ALLOC plus what the socket itself buffers.
    for _ in 0..40 {
        g.send(g.hdr(OP_RW, 2200, 5200), &chunk);
    }
    let mut saw_rst = false;
    while let Some((h, _)) = g.try_recv(Duration::from_millis(500)) {
        if h.op == OP_RST && h.dst_port == 2200 {
            saw_rst = true;
        }
    }
    assert!(saw_rst);
    let queues = dev.pause().unwrap();
    let muxer = dev.muxer.as_ref().unwrap();
    assert_eq!(muxer.connection_count(), 0);
    assert!(muxer.buffered_to_host() <= BUF_ALLOC as usize);
    drop(queues);
}

#[test]
fn tx_flood_without_rx_buffers_is_bounded_then_drains() {
    let dir = TempDir::new().unwrap();
    let uds = uds(&dir);
    let mut g = Guest::new();
    let mut dev = Vsock::new(3, &uds).unwrap();
    g.activate(&mut dev, g.queues());
    let flood = 200u16;
    for i in 0..flood {
        g.send(g.hdr(OP_RW, 3000 + u32::from(i), 7300), b"x");
    }
    // Each needs an RST the guest gives no buffer for: the device stops
    // reading TX once its control queue is full.
    assert!(g.tx.wait_used(MAX_PENDING_CTRL as u16, WAIT));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(g.tx.used_idx(), MAX_PENDING_CTRL as u16);
    g.give_rx(250);
    assert!(g.tx.wait_used(flood, WAIT));
    for i in 0..flood {
        let (h, _) = g.recv();
        assert_eq!((h.op, h.dst_port), (OP_RST, 3000 + u32::from(i)));
    }
}

#[test]
fn transport_reset_event_drops_connections() {
    let dir = TempDir::new().unwrap();
    let uds = uds(&dir);
    let mut g = Guest::new();
    let mut dev = Vsock::new(3, &uds).unwrap();
    g.activate(&mut dev, g.queues());
    g.give_rx(8);
    let (_l, mut peer) = guest_connect(&mut g, &uds, 2300, 5300);
    dev.send_transport_reset();
    // No event buffer yet: nothing happens until the guest offers one.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(g.evq.used_idx(), 0);
    g.give_event_buffer();
    assert_eq!(g.next_event(), Some((4, EVENT_TRANSPORT_RESET)));
    let mut b = [0u8; 1];
    assert_eq!(peer.read(&mut b).unwrap(), 0, "host socket closed");
}

#[test]
fn pause_resume_keeps_connections_and_restore_sends_reset() {
    let dir = TempDir::new().unwrap();
    let uds = uds(&dir);
    let mut g = Guest::new();
    let mut dev = Vsock::new(3, &uds).unwrap();
    g.activate(&mut dev, g.queues());
    g.give_rx(8);
    let (_l, mut peer) = guest_connect(&mut g, &uds, 2400, 5400);

    let queues = dev.pause().unwrap();
    assert_eq!(queues.len(), 3);
    // Host data sent while paused waits in the socket.
    peer.write_all(b"while paused").unwrap();
    g.activate(&mut dev, queues);
    let (rw, data) = g.recv();
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"while paused"[..]));

    // Snapshot and restore in a "new process" with a new socket path.
    let queues = dev.pause().unwrap();
    let state = dev.save().unwrap();
    drop(dev);
    assert!(!uds.exists(), "socket file removed with the device");
    let uds2 = dir.as_path().join("restored.sock");
    let mut restored = Vsock::restore(&state, uds2.clone()).unwrap();
    assert_eq!(restored.guest_cid(), 3);
    g.give_event_buffer();
    g.activate(&mut restored, queues);
    assert_eq!(g.next_event(), Some((4, EVENT_TRANSPORT_RESET)));
    // The old connection is gone with the old device.
    let mut b = [0u8; 1];
    assert_eq!(peer.read(&mut b).unwrap(), 0);
    // The new listener works.
    let mut host = UnixStream::connect(&uds2).unwrap();
    host.write_all(b"CONNECT 1025\n").unwrap();
    let (req, _) = g.recv();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 1025));
}

/// The transport around a fresh device, driven to DRIVER_OK by `g`, whose
/// kicks then go to the transport's eventfds.
fn running_transport(g: &mut Guest, uds: &Path) -> MmioTransport<Vsock> {
    let mut t =
        MmioTransport::new(g.mem.clone(), Vsock::new(DEFAULT_GUEST_CID, uds).unwrap()).unwrap();
    negotiate(&mut t);
    setup_queue(&mut t, 0, &g.rx);
    setup_queue(&mut t, 1, &g.tx);
    setup_queue(&mut t, 2, &g.evq);
    w(&mut t, 0x70, ALL_OK);
    g.evts = t
        .queue_events()
        .iter()
        .map(|e| e.try_clone().unwrap())
        .collect();
    t
}

#[test]
fn restored_transport_resets_connections_and_listens_on_the_new_path() {
    let dir = TempDir::new().unwrap();
    let uds1 = uds(&dir);
    let mut g = Guest::new();
    let mut t = running_transport(&mut g, &uds1);
    g.give_rx(16);
    let mut host = UnixStream::connect(&uds1).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    let (req, _) = g.recv();
    g.send(g.hdr(OP_RESPONSE, 1024, req.src_port), &[]);
    let mut line = String::new();
    BufReader::new(host.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("OK "), "{line}");

    t.pause().unwrap();
    let state = crate::devices::persist::through_state_file(&t.save().unwrap());
    assert_eq!(state.device.guest_cid, DEFAULT_GUEST_CID);
    let cid_and_status = |t: &mut MmioTransport<Vsock>| (r(t, 0x100), r(t, 0x70));
    let before = cid_and_status(&mut t);
    drop(t);
    assert!(!uds1.exists(), "socket file removed with the device");

    // A "new process": a fresh transport over the same guest memory,
    // listening elsewhere.
    let uds2 = dir.as_path().join("restored.sock");
    let res = MmioResources {
        mem: g.mem.clone(),
        device: uds2.clone(),
    };
    let mut t2 = MmioTransport::<Vsock>::restore(&state, res).unwrap();
    assert_eq!(t2.save().unwrap(), state);
    assert_eq!(cid_and_status(&mut t2), before);
    t2.resume().unwrap();
    g.evts = t2
        .queue_events()
        .iter()
        .map(|e| e.try_clone().unwrap())
        .collect();
    // The guest hears that its connections are gone; the host side of the
    // old one is closed with the old device.
    g.give_event_buffer();
    assert_eq!(g.next_event(), Some((4, EVENT_TRANSPORT_RESET)));
    host.set_read_timeout(Some(WAIT)).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0);
    // The RX buffers given before the snapshot carry the next request: the
    // ring positions came through the state.
    let mut host = UnixStream::connect(&uds2).unwrap();
    host.write_all(b"CONNECT 1025\n").unwrap();
    let (req, _) = g.recv();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 1025));
}

#[test]
fn driver_reset_closes_host_sockets_and_reserved_cids_are_refused() {
    let dir = TempDir::new().unwrap();
    let uds = uds(&dir);
    assert!(Vsock::new(2, &uds).is_err());
    assert!(Vsock::new(u32::MAX, &uds).is_err());
    let mut g = Guest::new();
    let mut dev = Vsock::new(DEFAULT_GUEST_CID, &uds).unwrap();
    g.activate(&mut dev, g.queues());
    g.give_rx(8);
    let (_l, mut peer) = guest_connect(&mut g, &uds, 2500, 5500);
    assert!(dev.reset());
    let mut b = [0u8; 1];
    assert_eq!(peer.read(&mut b).unwrap(), 0);
    // Still listening after a driver reset.
    assert!(UnixStream::connect(&uds).is_ok());
}

/// xorshift64: reproducible "random" input without a dependency.
struct Rand(u64);
impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Give back as many RX buffers as the device used, until TX has consumed
/// `tx_target` chains.
fn pump(g: &mut Guest, tx_target: u16) -> bool {
    let start = Instant::now();
    while start.elapsed() < WAIT {
        let used = g.rx.used_idx();
        let consumed = used.wrapping_sub(g.rx_seen);
        g.rx_seen = used;
        if consumed > 0 {
            g.give_rx(consumed as usize);
        }
        if g.tx.used_idx() == tx_target {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

#[test]
fn random_hostile_traffic_never_stops_the_device() {
    let dir = TempDir::new().unwrap();
    let uds = uds(&dir);
    let _listeners: Vec<UnixListener> = [9000, 9001]
        .iter()
        .map(|p| UnixListener::bind(port_path(&uds, *p)).unwrap())
        .collect();
    let mut g = Guest::new();
    let mut dev = Vsock::new(3, &uds).unwrap();
    g.activate(&mut dev, g.queues());
    g.give_rx(128);
    let mut rng = Rand(0x9e37_79b9_7f4a_7c15);
    let mut sent: u16 = 0;
    for _batch in 0..60 {
        for _ in 0..32 {
            let mut h = g.hdr(
                rng.below(10) as u16,
                1 + rng.below(8) as u32,
                9000 + rng.below(3) as u32,
            );
            if rng.chance(10) {
                h.src_cid = rng.next();
            }
            if rng.chance(10) {
                h.dst_cid = rng.next();
            }
            if rng.chance(10) {
                h.kind = rng.next() as u16;
            }
            h.flags = rng.below(5) as u32;
            h.buf_alloc = rng.next() as u32;
            h.fwd_cnt = rng.next() as u32;
            let payload = vec![0x5au8; rng.below(300) as usize];
            h.len = if rng.chance(70) {
                payload.len() as u32
            } else {
                rng.next() as u32
            };
            let total = (HDR_LEN + payload.len()) as u32;
            let addr = g.alloc(total);
            g.mem
                .write_slice(&h.to_bytes(), GuestAddress(addr))
                .unwrap();
            g.mem
                .write_slice(&payload, GuestAddress(addr + HDR_LEN as u64))
                .unwrap();
            match rng.below(10) {
                0 => {
                    // Looping chain.
                    let i = 200 + rng.below(50) as u16;
                    g.tx.write_desc(i, addr, total, F_NEXT, i);
                    g.tx.publish(i);
                }
                1 => {
                    g.tx.add_chain(&[(MEM_SIZE as u64 - 4, total, false)]);
                }
                2 | 3 => {
                    let cut = 1 + rng.below(u64::from(total) - 1) as u32;
                    g.tx.add_chain(&[
                        (addr, cut, false),
                        (addr + u64::from(cut), total - cut, false),
                    ]);
                }
                _ => {
                    g.tx.add_chain(&[(addr, total, false)]);
                }
            }
            sent = sent.wrapping_add(1);
        }
        g.kick(TX);
        assert!(pump(&mut g, sent), "device stopped consuming TX");
    }
    // Still a working device.
    let _l = UnixListener::bind(port_path(&uds, 9100)).unwrap();
    let start_seen = g.rx.used_idx();
    g.rx_seen = start_seen;
    g.send(g.hdr(OP_REQUEST, 4242, 9100), &[]);
    let mut got_response = false;
    while let Some((h, _)) = g.try_recv(Duration::from_secs(2)) {
        if h.op == OP_RESPONSE && h.dst_port == 4242 {
            got_response = true;
            break;
        }
    }
    assert!(got_response);
    let queues = dev.pause().unwrap();
    let muxer = dev.muxer.as_ref().unwrap();
    assert!(muxer.connection_count() <= super::muxer::MAX_CONNECTIONS);
    assert!(muxer.buffered_to_host() <= muxer.connection_count() * BUF_ALLOC as usize);
    drop(queues);
}
