//! CRI PortForward for a pod in a VM. containerd dials `localhost:<port>`
//! inside the pod's network namespace; there, one listener catches every
//! loopback TCP connection ([`super::sk_lookup`]), reads the port the
//! client asked for from the connection's local address, and has the agent
//! connect to that port on the guest's loopback and dial back a stream,
//! which it joins to the client's connection.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thaw_agent_protocol::transport;

use super::network::in_netns;
use super::sk_lookup::{steer_loopback, Steering};
use crate::agent::Agent;
use crate::error::{Error, Result};

/// Forwarded connections at once; more are refused (closed).
const MAX_CONNECTIONS: usize = 128;
/// How long the agent has to dial back once it said yes.
const DIAL_BACK: Duration = Duration::from_secs(10);

/// A running forwarder; dropping it detaches the steering, stops
/// accepting and joins the accept thread (connections in flight go on).
pub struct PortForwarder {
    listener: Arc<TcpListener>,
    _steering: Steering,
    accept: Option<JoinHandle<()>>,
}

impl PortForwarder {
    /// Starts forwarding in the network namespace `netns`. `ports` hands
    /// out the sandbox's host vsock ports; `uds` is its vsock socket.
    pub fn start(
        netns: &Path,
        agent: Agent,
        uds: PathBuf,
        ports: Arc<AtomicU32>,
    ) -> Result<PortForwarder> {
        let shown = netns.display().to_string();
        let (listener, steering) = in_netns(netns, move || {
            let listener = TcpListener::bind("127.0.0.1:0")
                .map_err(|e| Error::io(format!("listening on the loopback of {shown}"), e))?;
            let ns = std::fs::File::open("/proc/thread-self/ns/net")
                .map_err(|e| Error::io("opening the pod network namespace".to_string(), e))?;
            let steering = steer_loopback(ns.as_raw_fd(), &listener).map_err(|e| {
                Error::io(
                    format!("steering loopback connections in {shown} (port forwarding)"),
                    e,
                )
            })?;
            Ok((listener, steering))
        })?;
        let listener = Arc::new(listener);
        let l = listener.clone();
        let accept = std::thread::Builder::new()
            .name("thaw-port-fwd".into())
            .spawn(move || accept_loop(&l, &agent, &uds, &ports))
            .map_err(|e| Error::io("starting the port forwarding thread".to_string(), e))?;
        Ok(PortForwarder {
            listener,
            _steering: steering,
            accept: Some(accept),
        })
    }
}

impl Drop for PortForwarder {
    fn drop(&mut self) {
        // Shutting a listening socket down wakes its blocked accept.
        // SAFETY: shutdown on a descriptor the listener owns.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, agent: &Agent, uds: &Path, ports: &AtomicU32) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            // EINVAL after shutdown: the forwarder is being dropped.
            Err(_) => return,
        };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            log::warn!("port forwarding: {MAX_CONNECTIONS} connections open; refusing one");
            continue;
        }
        let (agent, uds, open) = (agent.clone(), uds.to_path_buf(), open.clone());
        let host_port = ports.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("thaw-port-fwd-conn".into())
            .spawn(move || {
                if let Err(e) = forward_one(conn, &agent, &uds, host_port) {
                    log::info!("port forwarding: {e}");
                }
                open.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            log::warn!("port forwarding: cannot start a thread: {e}");
        }
    }
}

fn forward_one(conn: TcpStream, agent: &Agent, uds: &Path, host_port: u32) -> Result<()> {
    let port = conn
        .local_addr()
        .map_err(|e| Error::io("reading the forwarded port".to_string(), e))?
        .port();
    let path = transport::host_socket_path(uds, host_port);
    let listener = thaw_snapshots::private::bind_socket(&path)
        .map_err(|e| Error::io(format!("binding {}", path.display()), e))?;
    let guest = (|| {
        agent.forward_port(u32::from(port), host_port)?;
        accept_within(&listener, DIAL_BACK)
    })();
    let _ = std::fs::remove_file(&path);
    let guest = guest.map_err(|e| Error::Sandbox(format!("port {port}: {e}")))?;
    join(conn, guest);
    Ok(())
}

fn accept_within(listener: &UnixListener, within: Duration) -> Result<UnixStream> {
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("setting a socket non-blocking".to_string(), e))?;
    let deadline = Instant::now() + within;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .map_err(|e| Error::io("setting a socket blocking".to_string(), e))?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(Error::Agent(format!(
                        "the agent did not dial back within {within:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(Error::io("accepting the agent's stream".to_string(), e)),
        }
    }
}

/// Copies both ways until both sides have closed; each EOF is passed on
/// as a half-close.
fn join(tcp: TcpStream, guest: UnixStream) {
    let (Ok(tcp2), Ok(guest2)) = (tcp.try_clone(), guest.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let (mut from, mut to) = (&tcp2, &guest2);
        let _ = io::copy(&mut from, &mut to);
        let _ = guest2.shutdown(Shutdown::Write);
    });
    let (mut from, mut to) = (&guest, &tcp);
    let _ = io::copy(&mut from, &mut to);
    let _ = tcp.shutdown(Shutdown::Write);
    let _ = up.join();
}
