//! One host Unix socket and the guest stream it is joined to: the bytes on
//! their way to the host and the credit accounting in both directions.
//!
//! Guest -> host: the guest may have at most [`BUF_ALLOC`] bytes that we
//! have not yet written to the host socket (that is the credit we grant).
//! A guest that sends more breaks the protocol and is reset; this is what
//! keeps a slow host reader from making the VMM's memory grow.
//! Host -> guest: we only read from the host socket when the guest has
//! credit and an RX buffer is in hand, so nothing is buffered that way.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use nix::sys::socket::{send, MsgFlags};

/// Receive buffer we advertise per connection (guest -> host direction).
pub const BUF_ALLOC: u32 = 128 * 1024;
/// Send a credit update once this much has been forwarded unannounced.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A host process connected to the listener; we wait for its
    /// `CONNECT <port>\n` line.
    AwaitingConnect,
    /// We sent REQUEST to the guest for a host-initiated connection.
    RequestSent,
    Established,
    /// The guest side is gone (we sent or got RST); the rest of what the
    /// guest sent is written to the host, then the socket is closed.
    Draining,
}

#[derive(Debug, PartialEq, Eq)]
pub struct CreditViolation;

pub struct Connection {
    pub stream: UnixStream,
    pub state: State,
    /// Our port (the host side) and the guest's port.
    pub local_port: u32,
    pub peer_port: u32,

    to_host: VecDeque<u8>,
    /// Leading bytes of `to_host` that are ours (the `OK` line), not the
    /// guest's, so they do not count as forwarded credit.
    uncredited: usize,
    /// Guest payload bytes received and written to the host (wrapping).
    rx_cnt: u32,
    pub fwd_cnt: u32,
    pub last_fwd_cnt_sent: u32,
    pub credit_update_queued: bool,

    /// Payload bytes sent to the guest, and the guest's last word on its
    /// buffer size and how much of it it has consumed.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    pub credit_request_sent: bool,

    /// Edge-triggered readiness as last reported by epoll.
    pub readable: bool,
    pub writable: bool,
    /// The host closed both directions.
    pub hup: bool,
    /// The host will send nothing more (read returned 0).
    pub host_eof: bool,
    /// SHUTDOWN flags the guest sent.
    pub guest_shutdown: u32,
    host_write_closed: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            to_host: VecDeque::new(),
            uncredited: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            credit_update_queued: false,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_request_sent: false,
            readable: true,
            writable: true,
            hup: false,
            host_eof: false,
            guest_shutdown: 0,
            host_write_closed: false,
        }
    }

    /// Every packet from the guest carries its current buffer size and
    /// how much it has consumed.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
        if self.peer_credit() > 0 {
            self.credit_request_sent = false;
        }
    }

    /// Bytes we may still send to the guest. A guest whose numbers do not
    /// add up gets nothing rather than an underflowed huge credit.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn record_sent_to_guest(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// Bytes waiting to be written to the host.
    pub fn pending_to_host(&self) -> usize {
        self.to_host.len()
    }

    /// Queue our own bytes (the `OK <port>\n` reply) ahead of guest data.
    pub fn push_reply(&mut self, line: &[u8]) {
        self.to_host.extend(line);
        self.uncredited += line.len();
    }

    /// Take payload from the guest. Refused if it exceeds the credit we
    /// granted; nothing is queued then.
    pub fn push_from_guest(&mut self, data: &[u8]) -> Result<(), CreditViolation> {
        let buffered = self.rx_cnt.wrapping_sub(self.fwd_cnt);
        let after = u64::from(buffered) + data.len() as u64;
        if after > u64::from(BUF_ALLOC) {
            return Err(CreditViolation);
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(data.len() as u32);
        self.to_host.extend(data);
        Ok(())
    }

    /// Write what we can to the host without blocking. An error means the
    /// host socket is broken and the connection must go.
    pub fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() && self.writable {
            let (front, _) = self.to_host.as_slices();
            // MSG_NOSIGNAL: a closed peer is an EPIPE error, not a signal.
            match send(
                self.stream.as_raw_fd(),
                front,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    let ours = n.min(self.uncredited);
                    self.uncredited -= ours;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - ours) as u32);
                }
                Err(nix::errno::Errno::EAGAIN) => self.writable = false,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if self.to_host.is_empty() {
            if self.to_host.capacity() > 64 * 1024 {
                self.to_host = VecDeque::new();
            }
            if self.guest_shutdown & super::packet::SHUTDOWN_SEND != 0 && !self.host_write_closed {
                // The guest will send nothing more: pass the EOF on.
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
                self.host_write_closed = true;
            }
        }
        Ok(())
    }

    /// Whether the guest should hear about freed buffer space now.
    pub fn wants_credit_update(&self) -> bool {
        !self.credit_update_queued
            && self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Read host data for the guest. `Ok(0)` is EOF; `WouldBlock` clears
    /// the readable flag.
    pub fn read_from_host(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&self.stream).read(buf) {
                Ok(0) if !buf.is_empty() => {
                    self.host_eof = true;
                    return Ok(0);
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() == io::ErrorKind::WouldBlock {
                        self.readable = false;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// May we read host data and send it to the guest right now?
    pub fn can_send_to_guest(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && self.guest_shutdown & super::packet::SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, State::Established, 1, 2), b)
    }

    #[test]
    fn guest_cannot_exceed_granted_credit() {
        let (mut c, _peer) = pair();
        c.push_from_guest(&vec![1u8; BUF_ALLOC as usize - 10])
            .unwrap();
        assert_eq!(c.push_from_guest(&[0u8; 11]), Err(CreditViolation));
        assert_eq!(c.pending_to_host(), BUF_ALLOC as usize - 10);
        c.push_from_guest(&[0u8; 10]).unwrap();
        assert_eq!(c.push_from_guest(&[0u8; 1]), Err(CreditViolation));
    }

    #[test]
    fn forwarding_frees_credit_and_asks_for_an_update() {
        let (mut c, mut peer) = pair();
        c.push_reply(b"OK 1\n");
        c.push_from_guest(&[7u8; 100_000]).unwrap();
        // The peer reads while we flush (the socket buffer is smaller).
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 5 + 100_000];
            peer.read_exact(&mut got).unwrap();
            got
        });
        while c.pending_to_host() > 0 {
            c.writable = true;
            c.flush_to_host().unwrap();
            std::thread::yield_now();
        }
        let got = reader.join().unwrap();
        assert_eq!(&got[..5], b"OK 1\n");
        assert!(got[5..].iter().all(|&b| b == 7));
        // The OK line does not count as forwarded guest data.
        assert_eq!(c.fwd_cnt, 100_000);
        assert!(c.wants_credit_update());
    }

    #[test]
    fn peer_credit_never_underflows() {
        let (mut c, _peer) = pair();
        c.update_peer_credit(100, 0);
        assert_eq!(c.peer_credit(), 100);
        c.record_sent_to_guest(100);
        assert_eq!(c.peer_credit(), 0);
        // A guest claiming to have consumed more than we sent.
        c.update_peer_credit(100, 5000);
        assert_eq!(c.peer_credit(), 0);
        c.update_peer_credit(100, 60);
        assert_eq!(c.peer_credit(), 60);
    }

    #[test]
    fn write_to_closed_host_is_an_error_not_a_signal() {
        let (mut c, peer) = pair();
        drop(peer);
        c.push_from_guest(b"data").unwrap();
        assert!(c.flush_to_host().is_err());
    }
}
