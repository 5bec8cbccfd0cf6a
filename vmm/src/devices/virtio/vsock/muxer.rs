//! The host side of vsock: the Unix listener, the host sockets, and what
//! each guest packet means for them. It knows nothing about virtqueues;
//! the worker feeds it guest packets and asks it for packets to send.
//!
//! Host protocol (Firecracker's): a host process connects to `uds_path`
//! and writes `CONNECT <port>\n`; once the guest accepts, it reads
//! `OK <local_port>\n` and then the stream. A guest connecting to host port
//! P reaches whoever listens on `<uds_path>_P`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::ops::Bound;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    connect, recv, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr,
};
use vmm_sys_util::epoll::EventSet;

use super::connection::{Connection, State, BUF_ALLOC};
use super::packet::*;
use super::VsockError;
use crate::devices::virtio::worker::EventLoop;

/// Host sockets of all kinds (waiting for CONNECT, live, draining) we keep
/// at most; with [`BUF_ALLOC`] this bounds what a guest can make us buffer.
pub const MAX_CONNECTIONS: usize = 256;
/// Control packets (RST, RESPONSE, credit updates...) waiting for an RX
/// buffer. When full, TX is not read until the guest takes some.
pub const MAX_PENDING_CTRL: usize = 128;
/// Largest payload in one packet, both directions (Linux' limit too).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

pub const LISTENER_TOKEN: u64 = 5;
const FIRST_CONN_TOKEN: u64 = 16;
/// `CONNECT 4294967295\n` is 19 bytes; anything much longer is garbage.
const MAX_CONNECT_LINE: usize = 32;
/// Host-initiated connections get local ports from here up, far from the
/// well-known ports a guest connects to.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// The listening socket; its path is removed when it goes away.
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
}

impl Listener {
    pub fn bind(path: &Path) -> Result<Self, VsockError> {
        let err = |source| VsockError::Listen {
            path: path.to_path_buf(),
            source,
        };
        // A socket left over by a previous VMM would make bind fail; any
        // other kind of file is not ours to remove.
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                std::fs::remove_file(path).map_err(err)?;
            }
        }
        // Whoever may connect reaches the guest's ports: owner only.
        let inner = thaw_snapshots::private::bind_socket(path).map_err(err)?;
        inner.set_nonblocking(true).map_err(err)?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A header-only packet waiting to go to the guest.
#[derive(Debug, Clone, Copy)]
struct Ctrl {
    local_port: u32,
    peer_port: u32,
    op: u16,
    flags: u32,
}

type Key = (u32, u32);

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Listener,
    conns: HashMap<u64, Connection>,
    /// (local port, guest port) -> token, for connections the guest can
    /// address (requested or established).
    by_key: BTreeMap<Key, u64>,
    ctrl: VecDeque<Ctrl>,
    next_token: u64,
    next_local_port: u32,
    /// Where the last RX data packet came from, for round-robin.
    rr_cursor: Key,
}

const CONN_EVENTS: u32 =
    libc::EPOLLIN as u32 | libc::EPOLLOUT as u32 | libc::EPOLLRDHUP as u32 | libc::EPOLLET as u32;

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener: Listener::bind(uds_path)?,
            conns: HashMap::new(),
            by_key: BTreeMap::new(),
            ctrl: VecDeque::new(),
            next_token: FIRST_CONN_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            rr_cursor: (0, 0),
        })
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn ctrl_len(&self) -> usize {
        self.ctrl.len()
    }

    /// Register the listener and every host socket with a fresh epoll set
    /// (the worker builds a new one each time it starts).
    pub fn register_all(&self, ev: &EventLoop) -> io::Result<()> {
        ev.add(
            self.listener.inner.as_raw_fd(),
            LISTENER_TOKEN,
            EventSet::IN,
        )?;
        for (token, conn) in &self.conns {
            ev.add(
                conn.stream.as_raw_fd(),
                *token,
                EventSet::from_bits_truncate(CONN_EVENTS),
            )?;
        }
        Ok(())
    }

    /// Drop every connection (driver reset, transport reset). Host sockets
    /// are closed, so host processes see EOF.
    pub fn reset_all(&mut self, ev: Option<&EventLoop>) {
        for (_, conn) in self.conns.drain() {
            if let Some(ev) = ev {
                let _ = ev.remove(conn.stream.as_raw_fd());
            }
        }
        self.by_key.clear();
        self.ctrl.clear();
    }

    fn add_conn(&mut self, ev: &EventLoop, conn: Connection) -> Option<u64> {
        let token = self.next_token;
        self.next_token += 1;
        if let Err(e) = ev.add(
            conn.stream.as_raw_fd(),
            token,
            EventSet::from_bits_truncate(CONN_EVENTS),
        ) {
            log::warn!("vsock: cannot watch host socket: {e}");
            return None;
        }
        self.conns.insert(token, conn);
        Some(token)
    }

    fn remove_conn(&mut self, ev: &EventLoop, token: u64) {
        if let Some(conn) = self.conns.remove(&token) {
            let _ = ev.remove(conn.stream.as_raw_fd());
            if self.by_key.get(&(conn.local_port, conn.peer_port)) == Some(&token) {
                self.by_key.remove(&(conn.local_port, conn.peer_port));
            }
        }
    }

    fn push_ctrl(&mut self, local_port: u32, peer_port: u32, op: u16, flags: u32) {
        self.ctrl.push_back(Ctrl {
            local_port,
            peer_port,
            op,
            flags,
        });
    }

    /// Answer a packet we cannot accept with RST (never answer an RST).
    pub fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op != OP_RST {
            self.push_ctrl(hdr.dst_port, hdr.src_port, OP_RST, 0);
        }
    }

    /// A malformed packet: reset its connection if there is one, else just
    /// answer RST.
    pub fn reject(&mut self, ev: &EventLoop, hdr: &Header) {
        match self.by_key.get(&(hdr.dst_port, hdr.src_port)).copied() {
            Some(token) if hdr.op != OP_RST => self.abort(ev, token),
            Some(token) => self.close_guest_side(ev, token, false),
            None => self.reply_rst(hdr),
        }
    }

    /// The guest side of a connection is over: tell the guest (RST), and
    /// let the host socket drain what the guest already sent.
    fn close_guest_side(&mut self, ev: &EventLoop, token: u64, send_rst: bool) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let key = (conn.local_port, conn.peer_port);
        if send_rst {
            self.ctrl.push_back(Ctrl {
                local_port: key.0,
                peer_port: key.1,
                op: OP_RST,
                flags: 0,
            });
        }
        if self.by_key.get(&key) == Some(&token) {
            self.by_key.remove(&key);
        }
        conn.state = State::Draining;
        conn.guest_shutdown |= SHUTDOWN_SEND | SHUTDOWN_RCV;
        self.finish_draining(ev, token);
    }

    /// Close a draining connection once everything is written (or the host
    /// stopped reading for good).
    fn finish_draining(&mut self, ev: &EventLoop, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.state != State::Draining {
            return;
        }
        let broken = conn.flush_to_host().is_err() || conn.hup;
        if broken || conn.pending_to_host() == 0 {
            self.remove_conn(ev, token);
        }
    }

    /// Both sides are gone or the host socket broke: RST and close now.
    fn abort(&mut self, ev: &EventLoop, token: u64) {
        if let Some(conn) = self.conns.get(&token) {
            if conn.state != State::AwaitingConnect && conn.state != State::Draining {
                let (l, p) = (conn.local_port, conn.peer_port);
                self.push_ctrl(l, p, OP_RST, 0);
            }
        }
        self.remove_conn(ev, token);
    }

    // ---- host side events ----

    pub fn handle_event(&mut self, ev: &EventLoop, token: u64, events: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept_all(ev);
            return;
        }
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            conn.readable = true;
        }
        if events.contains(EventSet::OUT) {
            conn.writable = true;
        }
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            conn.hup = true;
        }
        match conn.state {
            State::AwaitingConnect => self.read_connect_line(ev, token),
            State::Draining => self.finish_draining(ev, token),
            State::RequestSent => {
                if conn.hup {
                    // The host gave up before the guest answered.
                    self.abort(ev, token);
                }
            }
            State::Established => {
                if conn.flush_to_host().is_err() {
                    self.abort(ev, token);
                    return;
                }
                let Some(conn_ref) = self.conns.get(&token) else {
                    return;
                };
                // Nobody will read what is left: the guest does not
                // receive any more, or the host closed both directions.
                if conn_ref.hup && conn_ref.guest_shutdown & SHUTDOWN_RCV != 0 {
                    self.abort(ev, token);
                } else if conn_ref.wants_credit_update() {
                    self.queue_credit_update(token);
                }
            }
        }
    }

    fn accept_all(&mut self, ev: &EventLoop) {
        loop {
            match self.listener.inner.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNECTIONS {
                        log::warn!("vsock: too many connections, refusing a host connection");
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let conn = Connection::new(stream, State::AwaitingConnect, 0, 0);
                    if let Some(token) = self.add_conn(ev, conn) {
                        self.read_connect_line(ev, token);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::warn!("vsock: accept failed: {e}");
                    }
                    return;
                }
            }
        }
    }

    /// Read `CONNECT <port>\n` without consuming anything after it: a host
    /// may send its first bytes right behind the line.
    fn read_connect_line(&mut self, ev: &EventLoop, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let mut peek = [0u8; MAX_CONNECT_LINE];
        let fd = conn.stream.as_raw_fd();
        let n = match recv(fd, &mut peek, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => return,
            Err(_) => {
                self.remove_conn(ev, token);
                return;
            }
        };
        let Some(eol) = peek[..n].iter().position(|&b| b == b'\n') else {
            if n == 0 || n == MAX_CONNECT_LINE || conn.hup {
                // EOF, or a line too long to be a CONNECT.
                self.remove_conn(ev, token);
            }
            return;
        };
        let port = std::str::from_utf8(&peek[..eol])
            .ok()
            .and_then(|l| l.trim_end_matches('\r').strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        // Consume exactly the line.
        let mut line = [0u8; MAX_CONNECT_LINE];
        let consumed = recv(fd, &mut line[..eol + 1], MsgFlags::MSG_DONTWAIT);
        let (Some(port), Ok(c)) = (port, consumed) else {
            self.remove_conn(ev, token);
            return;
        };
        if c != eol + 1 {
            self.remove_conn(ev, token);
            return;
        }
        let Some(local_port) = self.allocate_local_port(port) else {
            self.remove_conn(ev, token);
            return;
        };
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.state = State::RequestSent;
            conn.local_port = local_port;
            conn.peer_port = port;
        }
        self.by_key.insert((local_port, port), token);
        self.push_ctrl(local_port, port, OP_REQUEST, 0);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..1024 {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.by_key.contains_key(&(p, peer_port)) {
                return Some(p);
            }
        }
        None
    }

    // ---- guest packets ----

    /// Is this a packet we handle at all? (Everything else gets RST.)
    pub fn packet_is_addressed_to_us(&self, hdr: &Header) -> bool {
        hdr.src_cid == self.guest_cid && hdr.dst_cid == HOST_CID && hdr.kind == TYPE_STREAM
    }

    pub fn handle_guest_packet(&mut self, ev: &EventLoop, hdr: &Header, payload: &[u8]) {
        let key = (hdr.dst_port, hdr.src_port);
        let token = self.by_key.get(&key).copied();
        if hdr.op == OP_REQUEST {
            self.guest_connect(ev, hdr, token);
            return;
        }
        let Some(token) = token else {
            self.reply_rst(hdr);
            return;
        };
        let Some(conn) = self.conns.get_mut(&token) else {
            self.by_key.remove(&key);
            self.reply_rst(hdr);
            return;
        };
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        match (hdr.op, conn.state) {
            (OP_RST, _) => self.close_guest_side(ev, token, false),
            (OP_RESPONSE, State::RequestSent) => {
                conn.state = State::Established;
                conn.push_reply(format!("OK {}\n", conn.local_port).as_bytes());
                if conn.flush_to_host().is_err() {
                    self.abort(ev, token);
                }
            }
            (OP_RW, State::Established) => {
                if conn.guest_shutdown & SHUTDOWN_SEND != 0
                    || conn.push_from_guest(payload).is_err()
                {
                    log::warn!("vsock: guest port {} broke flow control", hdr.src_port);
                    self.abort(ev, token);
                    return;
                }
                if conn.flush_to_host().is_err() {
                    self.abort(ev, token);
                } else if conn.wants_credit_update() {
                    self.queue_credit_update(token);
                }
            }
            (OP_CREDIT_UPDATE, State::Established) => {}
            (OP_CREDIT_REQUEST, State::Established) => self.queue_credit_update(token),
            (OP_SHUTDOWN, State::Established) => {
                conn.guest_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if conn.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    // The guest closed: it waits for our RST.
                    self.close_guest_side(ev, token, true);
                } else if conn.flush_to_host().is_err() {
                    self.abort(ev, token);
                }
            }
            // Anything else is out of place for this connection's state,
            // or an unknown op.
            _ => self.abort(ev, token),
        }
    }

    fn queue_credit_update(&mut self, token: u64) {
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.credit_update_queued = true;
            let (l, p) = (conn.local_port, conn.peer_port);
            self.push_ctrl(l, p, OP_CREDIT_UPDATE, 0);
        }
    }

    fn guest_connect(&mut self, ev: &EventLoop, hdr: &Header, existing: Option<u64>) {
        if let Some(token) = existing {
            // A second REQUEST on a live connection: both are wrong now.
            self.abort(ev, token);
            self.reply_rst(hdr);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.reply_rst(hdr);
            return;
        }
        let mut path: OsString = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                log::debug!(
                    "vsock: guest connect to {}: {e}",
                    Path::new(&path).display()
                );
                self.reply_rst(hdr);
                return;
            }
        };
        let mut conn = Connection::new(stream, State::Established, hdr.dst_port, hdr.src_port);
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        match self.add_conn(ev, conn) {
            Some(token) => {
                self.by_key.insert((hdr.dst_port, hdr.src_port), token);
                self.push_ctrl(hdr.dst_port, hdr.src_port, OP_RESPONSE, 0);
            }
            None => self.reply_rst(hdr),
        }
    }

    // ---- packets for the guest ----

    /// Is there anything to put in an RX buffer? Also asks the guest for
    /// credit where a connection is blocked on it.
    pub fn has_rx_work(&mut self) -> bool {
        if !self.ctrl.is_empty() {
            return true;
        }
        let mut work = false;
        let mut want_credit = Vec::new();
        for (&key, token) in &self.by_key {
            let Some(conn) = self.conns.get(token) else {
                continue;
            };
            if conn.can_send_to_guest() {
                work = true;
            } else if conn.state == State::Established
                && conn.readable
                && !conn.host_eof
                && conn.peer_credit() == 0
                && !conn.credit_request_sent
            {
                want_credit.push((key, *token));
            }
        }
        for (key, token) in want_credit {
            if let Some(conn) = self.conns.get_mut(&token) {
                conn.credit_request_sent = true;
            }
            self.push_ctrl(key.0, key.1, OP_CREDIT_REQUEST, 0);
            work = true;
        }
        work
    }

    fn header(&mut self, local_port: u32, peer_port: u32, op: u16, flags: u32, len: u32) -> Header {
        let fwd_cnt = match self.by_key.get(&(local_port, peer_port)) {
            Some(token) => match self.conns.get_mut(token) {
                Some(conn) => {
                    conn.last_fwd_cnt_sent = conn.fwd_cnt;
                    if op == OP_CREDIT_UPDATE {
                        conn.credit_update_queued = false;
                    }
                    conn.fwd_cnt
                }
                None => 0,
            },
            None => 0,
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: local_port,
            dst_port: peer_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    /// The next packet for the guest: a control packet if one waits, else
    /// host data (at most `max_payload` bytes, read into `data`). `None`
    /// if there is nothing to send after all.
    pub fn next_rx_packet(
        &mut self,
        ev: &EventLoop,
        max_payload: usize,
        data: &mut Vec<u8>,
    ) -> Option<Header> {
        data.clear();
        // Each round either returns or removes a candidate's readiness, so
        // this ends; the bound is a guard.
        for _ in 0..=self.by_key.len() + 1 {
            if let Some(c) = self.ctrl.pop_front() {
                return Some(self.header(c.local_port, c.peer_port, c.op, c.flags, 0));
            }
            let token = self.next_data_candidate()?;
            let conn = self.conns.get_mut(&token)?;
            let n = max_payload
                .min(conn.peer_credit() as usize)
                .min(MAX_PKT_PAYLOAD);
            data.resize(n, 0);
            match conn.read_from_host(data) {
                Ok(0) => {
                    data.clear();
                    // The host closed its side: if it closed both, the
                    // connection is over; else tell the guest no more
                    // data comes.
                    let (l, p, hup) = (conn.local_port, conn.peer_port, conn.hup);
                    if hup {
                        self.abort(ev, token);
                    } else {
                        self.push_ctrl(l, p, OP_SHUTDOWN, SHUTDOWN_SEND);
                    }
                }
                Ok(n) => {
                    data.truncate(n);
                    conn.record_sent_to_guest(n as u32);
                    let (l, p) = (conn.local_port, conn.peer_port);
                    self.rr_cursor = (l, p);
                    return Some(self.header(l, p, OP_RW, 0, n as u32));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => data.clear(),
                Err(_) => {
                    data.clear();
                    self.abort(ev, token);
                }
            }
        }
        None
    }

    /// Round-robin over connections that can send, starting after the one
    /// served last.
    fn next_data_candidate(&self) -> Option<u64> {
        let after = self
            .by_key
            .range((Bound::Excluded(self.rr_cursor), Bound::Unbounded));
        let before = self.by_key.range(..=self.rr_cursor);
        after
            .chain(before)
            .map(|(_, t)| *t)
            .find(|t| self.conns.get(t).is_some_and(Connection::can_send_to_guest))
    }
}

/// Connect without blocking: a host listener whose backlog is full makes
/// the guest's connect fail instead of stalling the device thread.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

impl Muxer {
    /// For the host-side tests: the buffered bytes of every connection.
    #[cfg(test)]
    pub fn buffered_to_host(&self) -> usize {
        self.conns.values().map(Connection::pending_to_host).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use vmm_sys_util::tempdir::TempDir;

    fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn stale_socket_is_replaced_and_path_removed_on_drop() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("v.sock");
        let first = UnixListener::bind(&path).unwrap();
        drop(first); // leaves the socket file behind
        let m = Muxer::new(3, &path).unwrap();
        assert!(path.exists());
        // Owner only, whatever the umask: it reaches the guest's ports.
        let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&path).unwrap());
        assert_eq!(mode & 0o777, 0o600);
        drop(m);
        assert!(!path.exists());
        // A regular file in the way is an error, not something we delete.
        std::fs::write(&path, b"x").unwrap();
        assert!(Muxer::new(3, &path).is_err());
        assert!(path.exists());
    }

    #[test]
    fn flooding_guest_cannot_grow_host_buffers() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("v.sock");
        let ev = EventLoop::new().unwrap();
        let mut m = Muxer::new(3, &path).unwrap();
        m.register_all(&ev).unwrap();
        let mut p = path.clone().into_os_string();
        p.push("_9000");
        // A host peer that never reads.
        let _host = UnixListener::bind(&p).unwrap();
        m.handle_guest_packet(&ev, &hdr(OP_REQUEST, 1000, 9000), &[]);
        let mut data = Vec::new();
        let resp = m.next_rx_packet(&ev, 4096, &mut data).unwrap();
        assert_eq!(resp.op, OP_RESPONSE);
        let chunk = vec![0u8; MAX_PKT_PAYLOAD];
        let mut rst = false;
        for _ in 0..64 {
            let mut h = hdr(OP_RW, 1000, 9000);
            h.len = chunk.len() as u32;
            m.handle_guest_packet(&ev, &h, &chunk);
            assert!(m.buffered_to_host() <= BUF_ALLOC as usize);
            if let Some(pkt) = m.next_rx_packet(&ev, 4096, &mut data) {
                if pkt.op == OP_RST {
                    rst = true;
                    break;
                }
            }
        }
        assert!(rst, "a guest ignoring credit must be reset");
        assert_eq!(m.connection_count(), 0);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn connect_line_followed_by_data_keeps_the_data() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("v.sock");
        let ev = EventLoop::new().unwrap();
        let mut m = Muxer::new(3, &path).unwrap();
        m.register_all(&ev).unwrap();
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 52\nearly").unwrap();
        m.handle_event(&ev, LISTENER_TOKEN, EventSet::IN);
        let mut data = Vec::new();
        let req = m.next_rx_packet(&ev, 4096, &mut data).unwrap();
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, 52));
        assert!(req.src_port >= FIRST_LOCAL_PORT);
        m.handle_guest_packet(&ev, &hdr(OP_RESPONSE, 52, req.src_port), &[]);
        let mut ok = vec![0u8; 32];
        let n = host.read(&mut ok).unwrap();
        assert_eq!(&ok[..n], format!("OK {}\n", req.src_port).as_bytes());
        let rw = m.next_rx_packet(&ev, 4096, &mut data).unwrap();
        assert_eq!(rw.op, OP_RW);
        assert_eq!(&data[..], b"early");
    }

    #[test]
    fn bad_connect_lines_close_the_host_socket() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("v.sock");
        let ev = EventLoop::new().unwrap();
        let mut m = Muxer::new(3, &path).unwrap();
        for line in [
            &b"CONNECT x\n"[..],
            b"HELLO 5\n",
            b"CONNECT 99999999999\n",
            &[b'A'; 40],
        ] {
            let mut host = UnixStream::connect(&path).unwrap();
            host.write_all(line).unwrap();
            m.handle_event(&ev, LISTENER_TOKEN, EventSet::IN);
            let mut b = [0u8; 8];
            host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            // Closed: EOF, or a reset because our line was left unread.
            match host.read(&mut b) {
                Ok(0) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                other => panic!("{line:?}: host socket still open: {other:?}"),
            }
        }
        assert_eq!(m.connection_count(), 0);
        assert_eq!(m.ctrl_len(), 0);
    }
}
