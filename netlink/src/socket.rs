//! The NETLINK_ROUTE socket and its request/reply loop.
//!
//! Contract: one request at a time, synchronously, on a blocking socket.
//! Each request gets a fresh sequence number and only replies carrying it
//! are read (leftovers of an earlier, failed request are skipped).
//! - `dump`: NLM_F_DUMP; collects every message of the multipart reply up
//!   to NLMSG_DONE. A dump the kernel marks interrupted (NLM_F_DUMP_INTR:
//!   the table changed while it was read) is read to its end and redone,
//!   a few times at most.
//! - `request`: NLM_F_ACK plus the caller's flags; collects replies (for a
//!   plain GET) until the ack.
//!
//! A NLMSG_ERROR with a non-zero code, or a NLMSG_DONE with a negative one,
//! becomes `Error::Kernel` naming the operation, the errno and the kernel's
//! extended-ack text if any.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED,
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::Error;

/// Large enough for any rtnetlink datagram: the kernel sizes dump skbs at
/// 32 KiB at most; a larger one would be reported, not silently cut.
const RECV_BUF: usize = 64 * 1024;
/// How often a dump the kernel reports as interrupted is redone.
const DUMP_TRIES: usize = 5;
/// `NLMSGERR_ATTR_MSG`: the extended-ack error string.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// Size of `struct nlmsghdr`.
const NLMSG_HDR_LEN: usize = 16;

/// A NETLINK_ROUTE socket in the network namespace of the thread that
/// opened it.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").field("seq", &self.seq).finish()
    }
}

impl Netlink {
    /// NETLINK_ROUTE in the calling thread's current network namespace
    /// (the socket stays in that namespace whatever the thread does later).
    pub fn open() -> Result<Self, Error> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(Error::Open)?;
        socket.bind_auto().map_err(Error::Open)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(Error::Open)?;
        // Both are optional comforts (short acks, kernel error strings):
        // kernels without them still work.
        let _ = socket.set_cap_ack(true);
        let _ = socket.set_ext_ack(true);
        Ok(Netlink {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// NETLINK_ROUTE in the network namespace at `netns` (a pod's
    /// `/var/run/netns/…` or `/proc/PID/ns/net`), without moving the
    /// calling thread: a short-lived helper thread enters the namespace and
    /// opens the socket, which stays in that namespace.
    pub fn open_in(netns: &Path) -> Result<Self, Error> {
        let ns_error = |source| Error::Netns {
            path: netns.to_path_buf(),
            source,
        };
        let file = File::open(netns).map_err(ns_error)?;
        let opened = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns takes a descriptor we own (kept open by
                    // `file` for the call) and changes only this helper
                    // thread, which ends right after.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(ns_error(io::Error::last_os_error()));
                    }
                    Netlink::open()
                })
                .join()
        });
        opened.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// All messages of a dump of `msg`'s kind.
    pub(crate) fn dump(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, Error> {
        for _ in 0..DUMP_TRIES {
            let (replies, interrupted) = self.exchange(op, msg.clone(), NLM_F_DUMP)?;
            if !interrupted {
                return Ok(replies);
            }
        }
        Err(Error::Reply {
            op: op.to_string(),
            detail: format!("dump interrupted by concurrent changes {DUMP_TRIES} times"),
        })
    }

    /// Sends `msg` with NLM_F_ACK and `flags`; returns what the kernel sent
    /// before the ack (the object, for a GET; nothing, for a change).
    pub(crate) fn request(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, Error> {
        self.exchange(op, msg, NLM_F_ACK | flags).map(|(r, _)| r)
    }

    fn exchange(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(Vec<RouteNetlinkMessage>, bool), Error> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut out = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut out);
        self.send(op, &out)?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut replies = Vec::new();
        let mut interrupted = false;
        loop {
            let n = self.recv(op)?;
            let mut off = 0;
            while off < n {
                let data = &self.buf[off..n];
                let msg =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(data).map_err(|e| {
                        Error::Reply {
                            op: op.to_string(),
                            detail: format!("{e}"),
                        }
                    })?;
                let len = msg.header.length as usize;
                if len < NLMSG_HDR_LEN {
                    return Err(Error::Reply {
                        op: op.to_string(),
                        detail: format!("message length {len}"),
                    });
                }
                // NLMSG_ALIGN: messages in a datagram start on 4-byte bounds.
                off += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue;
                }
                if msg.header.flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                let outer_flags = msg.header.flags;
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    NetlinkPayload::Done(done) => {
                        if done.code < 0 {
                            return Err(Error::Kernel {
                                op: op.to_string(),
                                errno: -done.code,
                                message: None,
                            });
                        }
                        if dump {
                            return Ok((replies, interrupted));
                        }
                    }
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok((replies, interrupted)),
                            Some(code) => Err(Error::Kernel {
                                op: op.to_string(),
                                errno: -code.get(),
                                message: ext_ack_message(outer_flags, &e.header),
                            }),
                        };
                    }
                    NetlinkPayload::Overrun(_) => {
                        return Err(Error::Reply {
                            op: op.to_string(),
                            detail: "NLMSG_OVERRUN".to_string(),
                        })
                    }
                    // NLMSG_NOOP and types this crate does not know: nothing
                    // to act on.
                    _ => {}
                }
            }
        }
    }

    fn send(&mut self, op: &str, data: &[u8]) -> Result<(), Error> {
        loop {
            match self.socket.send(data, 0) {
                Ok(n) if n == data.len() => return Ok(()),
                Ok(n) => {
                    return Err(Error::Reply {
                        op: op.to_string(),
                        detail: format!("sent {n} of {} bytes", data.len()),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Socket {
                        op: op.to_string(),
                        source,
                    })
                }
            }
        }
    }

    /// One datagram into `self.buf`; returns its length.
    fn recv(&mut self, op: &str) -> Result<usize, Error> {
        loop {
            self.buf.clear();
            // MSG_TRUNC: the return value is the datagram's real length, so
            // a cut datagram is seen.
            match self.socket.recv(&mut self.buf, libc::MSG_TRUNC) {
                Ok(n) if n > self.buf.len() => {
                    return Err(Error::Reply {
                        op: op.to_string(),
                        detail: format!("datagram of {n} bytes exceeds the {RECV_BUF}-byte buffer"),
                    })
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Socket {
                        op: op.to_string(),
                        source,
                    })
                }
            }
        }
    }
}

/// The NLMSGERR_ATTR_MSG string of an extended ack. `rest` is what follows
/// the error code: the request's header (and its payload unless the ack is
/// capped), then the TLVs if NLM_F_ACK_TLVS is set.
fn ext_ack_message(flags: u16, rest: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 || rest.len() < NLMSG_HDR_LEN {
        return None;
    }
    let mut off = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDR_LEN
    } else {
        let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        (len + 3) & !3
    };
    while off + 4 <= rest.len() {
        let len = u16::from_ne_bytes([rest[off], rest[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([rest[off + 2], rest[off + 3]]) & 0x3fff;
        if len < 4 || off + len > rest.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &rest[off + 4..off + len];
            let text = text.split(|b| *b == 0).next().unwrap_or(text);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        off += (len + 3) & !3;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext_ack_message_is_found_after_a_capped_header() {
        let mut rest = vec![0u8; NLMSG_HDR_LEN];
        let text = b"Invalid handle\0";
        rest.extend_from_slice(&((4 + text.len()) as u16).to_ne_bytes());
        rest.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        rest.extend_from_slice(text);
        assert_eq!(
            ext_ack_message(NLM_F_ACK_TLVS | NLM_F_CAPPED, &rest).as_deref(),
            Some("Invalid handle")
        );
        assert_eq!(ext_ack_message(NLM_F_CAPPED, &rest), None);
        assert_eq!(
            ext_ack_message(NLM_F_ACK_TLVS | NLM_F_CAPPED, &rest[..20]),
            None
        );
    }
}
