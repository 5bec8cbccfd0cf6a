//! The vsock muxer between guest packets and host Unix sockets: packets
//! from the guest (checked the way the device's TX path checks them),
//! host peers connecting with `CONNECT <port>` lines, writing, closing,
//! host listeners for guest-initiated connections, epoll events, and the
//! guest taking RX packets.

#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use thaw_vmm::devices::virtio::vsock::muxer::{Muxer, MAX_PENDING_CTRL, MAX_PKT_PAYLOAD};
use thaw_vmm::devices::virtio::vsock::packet::{Header, HOST_CID, TYPE_STREAM};
use thaw_vmm::devices::virtio::worker::EventLoop;

const GUEST_CID: u64 = 3;
const MAX_OPS: usize = 96;
const MAX_PEERS: usize = 8;
/// Host ports: two with a listener (guest connects succeed), two without,
/// the first local ports the muxer gives host-initiated connections (so
/// the guest can answer them), and the largest.
const PORTS: [u32; 8] = [
    1024,
    52,
    7,
    1025,
    1 << 30,
    (1 << 30) + 1,
    (1 << 30) + 2,
    u32::MAX,
];

#[derive(Arbitrary, Debug)]
enum Op {
    Guest {
        /// Low bits: wrong source CID, wrong destination CID, wrong type.
        misaddress: u8,
        dst_port: u8,
        src_port: u8,
        op: u8,
        flags: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
        /// None: the payload's length.
        len: Option<u32>,
        payload: Vec<u8>,
    },
    /// A host process connects to the muxer's socket and writes a line.
    HostConnect {
        line: Vec<u8>,
    },
    /// A canned `CONNECT <port>\n`.
    HostConnectPort {
        port: u8,
    },
    HostWrite {
        peer: u8,
        data: Vec<u8>,
    },
    HostRead {
        peer: u8,
    },
    HostShutdown {
        peer: u8,
        how: u8,
    },
    HostDrop {
        peer: u8,
    },
    /// Accept what the guest connected to on a host port's listener.
    Accept {
        port: u8,
    },
    /// Hand the muxer what epoll says.
    Events,
    /// The guest offers an RX buffer with room for `room` payload bytes.
    Rx {
        room: u16,
    },
}

struct Harness {
    muxer: Muxer,
    ev: EventLoop,
    listeners: Vec<UnixListener>,
    peers: Vec<UnixStream>,
    sock: std::path::PathBuf,
    rx_data: Vec<u8>,
}

impl Harness {
    fn peer(&mut self, i: u8) -> Option<&mut UnixStream> {
        let n = self.peers.len();
        if n == 0 {
            return None;
        }
        self.peers.get_mut(usize::from(i) % n)
    }

    fn add_peer(&mut self, s: UnixStream) {
        if self.peers.len() < MAX_PEERS && s.set_nonblocking(true).is_ok() {
            self.peers.push(s);
        }
    }

    fn events(&mut self) {
        let Ok(ready) = self.ev.wait(0) else {
            return;
        };
        for (token, set) in ready {
            self.muxer.handle_event(&self.ev, token, set);
        }
    }

    fn rx(&mut self, room: usize) {
        if self.muxer.has_rx_work() {
            let _ =
                self.muxer
                    .next_rx_packet(&self.ev, room.min(MAX_PKT_PAYLOAD), &mut self.rx_data);
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Guest {
                misaddress,
                dst_port,
                src_port,
                op,
                flags,
                buf_alloc,
                fwd_cnt,
                len,
                payload,
            } => {
                let hdr = Header {
                    src_cid: if misaddress & 1 != 0 { 4 } else { GUEST_CID },
                    dst_cid: if misaddress & 2 != 0 { 1 } else { HOST_CID },
                    src_port: 1000 + u32::from(src_port % 8),
                    dst_port: PORTS[usize::from(dst_port % 8)],
                    len: len.unwrap_or(payload.len() as u32),
                    kind: if misaddress & 4 != 0 { 2 } else { TYPE_STREAM },
                    op: u16::from(op % 9),
                    flags,
                    buf_alloc,
                    fwd_cnt,
                };
                // The device reads no TX while its control queue is full:
                // the guest takes RX packets first.
                while self.muxer.ctrl_len() >= MAX_PENDING_CTRL {
                    self.rx(MAX_PKT_PAYLOAD);
                }
                // What the device's TX path does before the muxer sees it.
                if !self.muxer.packet_is_addressed_to_us(&hdr) {
                    self.muxer.reply_rst(&hdr);
                    return;
                }
                if hdr.len as usize > MAX_PKT_PAYLOAD || hdr.len as usize > payload.len() {
                    self.muxer.reject(&self.ev, &hdr);
                    return;
                }
                let data = if hdr.op == thaw_vmm::devices::virtio::vsock::packet::OP_RW {
                    &payload[..hdr.len as usize]
                } else {
                    &[][..]
                };
                self.muxer.handle_guest_packet(&self.ev, &hdr, data);
            }
            Op::HostConnect { line } => {
                if let Ok(mut s) = UnixStream::connect(&self.sock) {
                    let _ = s.write_all(&line);
                    self.add_peer(s);
                }
            }
            Op::HostConnectPort { port } => {
                if let Ok(mut s) = UnixStream::connect(&self.sock) {
                    let _ = write!(s, "CONNECT {}\n", 1000 + u32::from(port % 8));
                    self.add_peer(s);
                }
            }
            Op::HostWrite { peer, data } => {
                if let Some(s) = self.peer(peer) {
                    let _ = s.write(&data);
                }
            }
            Op::HostRead { peer } => {
                if let Some(s) = self.peer(peer) {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf);
                }
            }
            Op::HostShutdown { peer, how } => {
                let how = [Shutdown::Read, Shutdown::Write, Shutdown::Both][usize::from(how % 3)];
                if let Some(s) = self.peer(peer) {
                    let _ = s.shutdown(how);
                }
            }
            Op::HostDrop { peer } => {
                if !self.peers.is_empty() {
                    let n = self.peers.len();
                    self.peers.remove(usize::from(peer) % n);
                }
            }
            Op::Accept { port } => {
                let n = self.listeners.len();
                if let Some(Ok((s, _))) = self
                    .listeners
                    .get(usize::from(port) % n)
                    .map(|l| l.accept())
                {
                    self.add_peer(s);
                }
            }
            Op::Events => self.events(),
            Op::Rx { room } => self.rx(usize::from(room)),
        }
    }
}

fn listener(sock: &Path, port: u32) -> Option<UnixListener> {
    let mut path = sock.as_os_str().to_owned();
    path.push(format!("_{port}"));
    let l = UnixListener::bind(path).ok()?;
    l.set_nonblocking(true).ok()?;
    Some(l)
}

fuzz_target!(|ops: Vec<Op>| {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let sock = dir.path().join("v.sock");
    let Ok(muxer) = Muxer::new(GUEST_CID, &sock) else {
        return;
    };
    let Ok(ev) = EventLoop::new() else {
        return;
    };
    if muxer.register_all(&ev).is_err() {
        return;
    }
    // Listeners on the first two ports only.
    let listeners: Vec<UnixListener> = PORTS[..2]
        .iter()
        .filter_map(|&p| listener(&sock, p))
        .collect();
    if listeners.len() != 2 {
        return;
    }
    let mut h = Harness {
        muxer,
        ev,
        listeners,
        peers: Vec::new(),
        sock,
        rx_data: Vec::new(),
    };
    for op in ops.into_iter().take(MAX_OPS) {
        h.apply(op);
    }
    // Let the muxer see the last host events and hand out what it queued.
    h.events();
    for _ in 0..8 {
        h.rx(MAX_PKT_PAYLOAD);
    }
});
