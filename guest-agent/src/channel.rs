//! The private channel between the agent and its container-init helper
//! (`thaw-agent __init`): length-prefixed JSON frames on a Unix stream
//! socketpair, optionally carrying one file descriptor (the tty master).

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{de::DeserializeOwned, Serialize};

/// Largest frame accepted (the plan carries a whole OCI spec and compiled
/// seccomp filters).
const MAX_FRAME: usize = 16 << 20;

fn proto_err(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Sends one frame, with `fd` attached if given.
pub fn send<T: Serialize>(sock: &UnixStream, msg: &T, fd: Option<RawFd>) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(|e| proto_err(e.to_string()))?;
    let len = u32::try_from(body.len()).map_err(|_| proto_err("frame too large"))?;
    let header = len.to_le_bytes();
    // The fd rides on the header bytes; the body follows as plain writes.
    let fds;
    let cmsgs: &[ControlMessage] = match fd {
        Some(fd) => {
            fds = [fd];
            &[ControlMessage::ScmRights(&fds)]
        }
        None => &[],
    };
    let mut sent = 0;
    while sent == 0 {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&header)],
            cmsgs,
            MsgFlags::empty(),
            None,
        ) {
            Ok(n) => sent = n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let mut w = sock;
    w.write_all(&header[sent..])?;
    w.write_all(&body)
}

/// Receives one frame. `Ok(None)` on a clean EOF before a frame started.
pub fn recv<T: DeserializeOwned>(
    sock: &UnixStream,
) -> std::io::Result<Option<(T, Option<OwnedFd>)>> {
    let mut header = [0u8; 4];
    let mut cmsg_buf = nix::cmsg_space!([RawFd; 2]);
    let (n, fd) = loop {
        let mut iov = [IoSliceMut::new(&mut header)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fd = None;
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(fds) = c {
                            for raw in fds {
                                // SAFETY: the kernel just gave us this fd.
                                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                                if fd.is_none() {
                                    fd = Some(owned);
                                }
                            }
                        }
                    }
                }
                break (msg.bytes, fd);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if n == 0 {
        return Ok(None);
    }
    let mut r = sock;
    r.read_exact(&mut header[n..])?;
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(proto_err(format!("frame of {len} bytes is too large")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let msg = serde_json::from_slice(&body).map_err(|e| proto_err(e.to_string()))?;
    Ok(Some((msg, fd)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    #[test]
    fn frames_round_trip_with_fd() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"xyz").unwrap();
        send(&a, &vec!["hello".to_string()], Some(f.as_raw_fd())).unwrap();
        // Larger than the socket buffer: needs a concurrent reader.
        let writer = std::thread::spawn(move || {
            send(&a, &"x".repeat(300_000), None).unwrap();
        });
        let (m, fd): (Vec<String>, _) = recv(&b).unwrap().unwrap();
        assert_eq!(m, vec!["hello"]);
        let mut got = std::fs::File::from(fd.expect("fd attached"));
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "xyz");
        let (big, fd): (String, _) = recv(&b).unwrap().unwrap();
        assert_eq!(big.len(), 300_000);
        assert!(fd.is_none());
        writer.join().unwrap();
        assert!(recv::<String>(&b).unwrap().is_none());
    }
}
