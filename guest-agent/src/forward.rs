//! Port forwarding, guest side (CRI PortForward): a TCP connection to a
//! port on the guest's loopback, joined to a stream the agent dials to the
//! host, as every guest-host stream is. Containers share the guest's
//! network namespace, so 127.0.0.1 reaches a server in any of them.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::host::{HostAddr, HostStream};

/// Forwarded connections open at once; a client opening more is refused
/// rather than letting it pile up threads in the guest.
pub const MAX_FORWARDS: usize = 128;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

static OPEN: AtomicUsize = AtomicUsize::new(0);

/// Connects to 127.0.0.1:`port`, dials host `host_port` and copies both
/// ways on two threads until both directions are closed.
pub fn forward(host: &HostAddr, port: u32, host_port: u32) -> Result<()> {
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Error::InvalidRequest(format!("port {port} is not 1..=65535")))?;
    if OPEN.fetch_add(1, Ordering::SeqCst) >= MAX_FORWARDS {
        OPEN.fetch_sub(1, Ordering::SeqCst);
        return Err(Error::FailedPrecondition(format!(
            "{MAX_FORWARDS} forwarded connections are open already"
        )));
    }
    let result = start(host, port, host_port);
    if result.is_err() {
        OPEN.fetch_sub(1, Ordering::SeqCst);
    }
    result
}

fn start(host: &HostAddr, port: u16, host_port: u32) -> Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let tcp = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|e| Error::io(format!("connecting to {addr} in the guest"), e))?;
    let stream = host
        .dial(host_port)
        .map_err(|e| Error::io(format!("dialing host port {host_port}"), e))?;
    let (tcp2, stream2) = (
        tcp.try_clone()
            .map_err(|e| Error::io("duplicating the TCP socket", e))?,
        stream
            .try_clone()
            .map_err(|e| Error::io("duplicating the host stream", e))?,
    );
    let up = std::thread::Builder::new()
        .name("thaw-fwd-up".into())
        .spawn(move || pump(tcp2, stream2, |s: &HostStream| s.shutdown(Shutdown::Write)))
        .map_err(|e| Error::io("starting a forwarding thread", e))?;
    std::thread::Builder::new()
        .name("thaw-fwd-down".into())
        .spawn(move || {
            pump(stream, tcp, |s: &TcpStream| s.shutdown(Shutdown::Write));
            let _ = up.join();
            OPEN.fetch_sub(1, Ordering::SeqCst);
        })
        .map_err(|e| Error::io("starting a forwarding thread", e))?;
    Ok(())
}

/// Copies `from` to `to` until EOF or an error, then half-closes `to`.
fn pump<R: Read, W: Write>(mut from: R, mut to: W, close: impl FnOnce(&W) -> std::io::Result<()>) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = close(&to);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;
    use std::os::unix::net::UnixListener;

    #[test]
    fn bytes_go_both_ways_and_eof_is_passed_on() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("v.sock");
        let host = HostAddr::Unix {
            prefix: prefix.clone(),
        };
        let host_side = UnixListener::bind(thaw_agent_protocol::transport::host_socket_path(
            &prefix, 70000,
        ))
        .unwrap();
        forward(&host, u32::from(port), 70000).unwrap();
        let (mut guest_side, _) = server.accept().unwrap();
        let (mut h, _) = host_side.accept().unwrap();
        h.write_all(b"ping\n").unwrap();
        h.shutdown(Shutdown::Write).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&guest_side)
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "ping\n");
        guest_side.write_all(b"pong").unwrap();
        drop(guest_side);
        let mut back = String::new();
        h.read_to_string(&mut back).unwrap();
        assert_eq!(back, "pong");
    }

    #[test]
    fn a_closed_port_and_a_bad_port_are_errors() {
        let host = HostAddr::Unix {
            prefix: "/nonexistent/v.sock".into(),
        };
        let e = forward(&host, 0, 70000).unwrap_err().to_string();
        assert!(e.contains("port 0"), "{e}");
        let unused = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = unused.local_addr().unwrap().port();
        drop(unused);
        let e = forward(&host, u32::from(port), 70000)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    }
}
