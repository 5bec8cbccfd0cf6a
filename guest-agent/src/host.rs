//! How the agent reaches the host: every connection is dialed by the guest.
//!
//! In a VM that is vsock to CID 2; the VMM delivers a connection to host port
//! P on the Unix socket `<uds>_P`. Outside a VM (host tests) the agent
//! connects to `<prefix>_P` directly, which is exactly what the shim sees
//! behind the VMM.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use thaw_agent_protocol::transport::host_socket_path;
use thaw_agent_protocol::HOST_CID;

use crate::error::{Error, Result};

/// Where the host is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostAddr {
    /// vsock, to the given context id (2 = the host).
    Vsock { cid: u32 },
    /// Unix sockets named `<prefix>_<port>`.
    Unix { prefix: PathBuf },
}

impl HostAddr {
    /// Parses `vsock`, `vsock://<cid>` or `unix://<path prefix>`.
    pub fn parse(s: &str) -> Result<HostAddr> {
        if s == "vsock" {
            return Ok(HostAddr::Vsock { cid: HOST_CID });
        }
        if let Some(cid) = s.strip_prefix("vsock://") {
            let cid = cid
                .trim_end_matches([':', '/'])
                .parse()
                .map_err(|_| Error::InvalidRequest(format!("bad vsock cid in {s:?}")))?;
            return Ok(HostAddr::Vsock { cid });
        }
        if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(Error::InvalidRequest(format!("empty unix path in {s:?}")));
            }
            return Ok(HostAddr::Unix {
                prefix: PathBuf::from(path),
            });
        }
        Err(Error::InvalidRequest(format!(
            "host address {s:?}: expected vsock, vsock://<cid> or unix://<path>"
        )))
    }

    /// Connects to host `port`, blocking.
    pub fn dial(&self, port: u32) -> std::io::Result<HostStream> {
        match self {
            HostAddr::Vsock { cid } => {
                let addr = vsock::VsockAddr::new(*cid, port);
                Ok(HostStream::Vsock(vsock::VsockStream::connect(&addr)?))
            }
            HostAddr::Unix { prefix } => Ok(HostStream::Unix(UnixStream::connect(
                host_socket_path(prefix, port),
            )?)),
        }
    }

    pub fn describe(&self, port: u32) -> String {
        match self {
            HostAddr::Vsock { cid } => format!("vsock {cid}:{port}"),
            HostAddr::Unix { prefix } => host_socket_path(prefix, port).display().to_string(),
        }
    }
}

/// A connected stream to the host (blocking).
#[derive(Debug)]
pub enum HostStream {
    Vsock(vsock::VsockStream),
    Unix(UnixStream),
}

impl HostStream {
    pub fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        match self {
            HostStream::Vsock(s) => s.shutdown(how),
            HostStream::Unix(s) => s.shutdown(how),
        }
    }

    pub fn try_clone(&self) -> std::io::Result<HostStream> {
        Ok(match self {
            HostStream::Vsock(s) => HostStream::Vsock(s.try_clone()?),
            HostStream::Unix(s) => HostStream::Unix(s.try_clone()?),
        })
    }
}

impl Read for HostStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            HostStream::Vsock(s) => s.read(buf),
            HostStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for HostStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            HostStream::Vsock(s) => s.write(buf),
            HostStream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for HostStream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            HostStream::Vsock(s) => s.as_raw_fd(),
            HostStream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl AsFd for HostStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd is owned by self and lives as long as the borrow.
        unsafe { BorrowedFd::borrow_raw(self.as_raw_fd()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            HostAddr::parse("vsock").unwrap(),
            HostAddr::Vsock { cid: 2 }
        );
        assert_eq!(
            HostAddr::parse("vsock://3").unwrap(),
            HostAddr::Vsock { cid: 3 }
        );
        assert_eq!(
            HostAddr::parse("unix:///tmp/x/v.sock").unwrap(),
            HostAddr::Unix {
                prefix: PathBuf::from("/tmp/x/v.sock")
            }
        );
        assert!(HostAddr::parse("tcp://1.2.3.4").is_err());
        assert!(HostAddr::parse("unix://").is_err());
    }

    #[test]
    fn unix_dial_uses_port_suffix() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("v.sock");
        let listener =
            std::os::unix::net::UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
        let addr = HostAddr::Unix { prefix };
        let mut s = addr.dial(5000).unwrap();
        s.write_all(b"hi").unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let mut buf = [0u8; 2];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        assert!(addr.dial(5001).is_err());
    }
}
