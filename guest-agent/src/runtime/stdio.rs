//! A process's stdio: the host streams the shim asked for, wired to the
//! process through pipes (or its tty), and the pumps that copy between them.
//!
//! Before the spawn, [`StdioSetup::connect`] dials the host's streams and
//! makes the pipes; the process starts with their far ends. After the
//! spawn, [`start_io`] starts one pump thread per stream.
//!
//! Output after exit is bounded by what the process left behind: once the
//! process is reaped, each output pump forwards the bytes that were waiting
//! in its pipe at that moment (FIONREAD) and then half-closes its stream, so
//! a daemonized child that inherited the pipe can neither hold the stream
//! open nor extend it. The exit is published only after every output pump
//! has finished, or once the pumps stopped moving bytes for a while (a host
//! that does not read); a slow host that keeps reading loses nothing.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Stdio as ChildFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use thaw_agent_protocol::agent::Stdio;

use crate::error::{Error, Result};
use crate::host::{HostAddr, HostStream};
use crate::runtime::process::Proc;
use crate::runtime::spawn::ChildStdio;

/// A process's stdio, set up before it is spawned.
pub struct StdioSetup {
    /// The fds the process starts with: pipe ends, or null.
    pub child: ChildStdio,
    /// Our side, for the pumps once the process runs.
    pub ours: HostSide,
}

/// The host streams and our ends of the process's pipes.
pub struct HostSide {
    terminal: bool,
    /// The host's stdin stream and the pipe end to write it to (None with
    /// a tty: the tty master, known only after the spawn, is written).
    stdin: Option<(HostStream, Option<OwnedFd>)>,
    /// Pump name, the pipe end to read (None with a tty: the master is
    /// read), and the host stream to write.
    outputs: Vec<(String, Option<OwnedFd>, HostStream)>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::errno("pipe", e))
}

fn dial(host: &HostAddr, port: u32, field: &str) -> Result<HostStream> {
    host.dial(port).map_err(|e| {
        Error::io(
            format!(
                "stdio.{field} {port}: connecting to {}",
                host.describe(port)
            ),
            e,
        )
    })
}

impl StdioSetup {
    /// Dials the host's stream for each port the request names (0 = not
    /// wired: the process gets /dev/null) and makes the pipes; with a
    /// terminal, stdout and stderr are one stream: the tty's. `name`
    /// names the pump threads.
    pub fn connect(
        host: &HostAddr,
        ports: Option<&Stdio>,
        terminal: bool,
        name: &str,
    ) -> Result<StdioSetup> {
        let ports = ports.cloned().unwrap_or_default();
        let mut child = ChildStdio {
            stdin: ChildFd::null(),
            stdout: ChildFd::null(),
            stderr: ChildFd::null(),
        };
        let mut ours = HostSide {
            terminal,
            stdin: None,
            outputs: Vec::new(),
        };
        if ports.stdin_port != 0 {
            let stream = dial(host, ports.stdin_port, "stdin_port")?;
            if terminal {
                ours.stdin = Some((stream, None));
            } else {
                let (r, w) = pipe()?;
                child.stdin = ChildFd::from(r);
                ours.stdin = Some((stream, Some(w)));
            }
        }
        if ports.stdout_port != 0 {
            let stream = dial(host, ports.stdout_port, "stdout_port")?;
            if terminal {
                ours.outputs.push((format!("{name}-tty"), None, stream));
            } else {
                let (r, w) = pipe()?;
                child.stdout = ChildFd::from(w);
                ours.outputs
                    .push((format!("{name}-stdout"), Some(r), stream));
            }
        }
        if ports.stderr_port != 0 && !terminal {
            let stream = dial(host, ports.stderr_port, "stderr_port")?;
            let (r, w) = pipe()?;
            child.stderr = ChildFd::from(w);
            ours.outputs
                .push((format!("{name}-stderr"), Some(r), stream));
        }
        Ok(StdioSetup { child, ours })
    }
}

/// Starts the pumps of a freshly spawned process; `tty_master` is its
/// terminal's master, if it has one, and `console` the terminal's initial
/// size (rows, columns).
pub fn start_io(
    proc: &Arc<Proc>,
    ours: HostSide,
    tty_master: Option<OwnedFd>,
    console: Option<(u16, u16)>,
) -> Result<()> {
    let (exit_r, exit_w) = exit_signal().map_err(|e| Error::io("pipe", e))?;
    let master = match (ours.terminal, tty_master) {
        (true, Some(m)) => Some(Arc::new(m)),
        (true, None) => return Err(Error::Setup("no tty master received".into())),
        (false, _) => None,
    };
    let dup = |m: &Arc<OwnedFd>| -> Result<OwnedFd> {
        m.try_clone().map_err(|e| Error::io("dup tty master", e))
    };
    let mut io = proc.io();
    io.exit_signal = Some(exit_w);
    io.tty_master = master.clone();
    for (name, src, dst) in ours.outputs {
        let src = match (src, &master) {
            (Some(fd), _) => fd,
            (None, Some(m)) => dup(m)?,
            (None, None) => continue,
        };
        let h = spawn_output(name, src, dst, exit_r.clone(), io.output_moved.clone())
            .map_err(|e| Error::io("starting output pump", e))?;
        io.outputs.push(h);
    }
    if let Some((stream, pipe_w)) = ours.stdin {
        let dst = match (pipe_w, &master) {
            (Some(fd), _) => Some(fd),
            (None, Some(m)) => Some(dup(m)?),
            (None, None) => None,
        };
        if let Some(dst) = dst {
            io.stdin_ctl = stream.try_clone().ok();
            let h = spawn_input(format!("{}-stdin", proc.container_id), stream, dst)
                .map_err(|e| Error::io("starting input pump", e))?;
            io.inputs.push(h);
        }
    }
    drop(io);
    if let Some((rows, cols)) = console {
        let _ = proc.resize(cols, rows);
    }
    Ok(())
}

// The pumps: one thread per stream.

const BUF: usize = 64 * 1024;
/// How long a tty's output may trail the reap of its process.
const TTY_SETTLE_MS: u16 = 100;

/// Becomes readable (EOF) when the process has exited: the write end is
/// dropped by the exit handler.
fn exit_signal() -> std::io::Result<(Arc<OwnedFd>, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    Ok((Arc::new(r), w))
}

fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match nix::unistd::read(fd.as_raw_fd(), buf) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes to the host unless it has gone away; output is then discarded so
/// the process never blocks on a dead stream. Counts what it moved.
fn forward(dst: &mut Option<HostStream>, data: &[u8], name: &str, moved: &AtomicU64) {
    if let Some(s) = dst {
        if let Err(e) = s.write_all(data) {
            log::warn!("{name}: host stream write failed, discarding further output: {e}");
            *dst = None;
        }
    }
    moved.fetch_add(data.len() as u64, Ordering::Relaxed);
}

/// Starts copying `src` (a pipe read end or a tty master) to `dst`, adding
/// every byte it moves to `moved`.
fn spawn_output(
    name: String,
    src: OwnedFd,
    dst: HostStream,
    exited: Arc<OwnedFd>,
    moved: Arc<AtomicU64>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("out-{name}"))
        .spawn(move || {
            let mut dst = Some(dst);
            let mut buf = vec![0u8; BUF];
            loop {
                let mut fds = [
                    PollFd::new(src.as_fd(), PollFlags::POLLIN),
                    PollFd::new(exited.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        log::error!("{name}: poll: {e}");
                        break;
                    }
                }
                // The exit first: a child that outlives the process and
                // keeps writing must not keep this loop going.
                if fds[1].any().unwrap_or(false) {
                    drain_after_exit(&src, &mut dst, &mut buf, &name, &moved);
                    break;
                }
                if fds[0].any().unwrap_or(false) {
                    match read_fd(&src, &mut buf) {
                        Ok(0) => break,
                        Ok(n) => forward(&mut dst, &buf[..n], &name, &moved),
                        // A tty master reads EIO once every slave is closed.
                        Err(_) => break,
                    }
                }
            }
            if let Some(s) = &dst {
                let _ = s.shutdown(Shutdown::Write);
            }
        })
}

/// Bytes waiting to be read from a pipe or tty master.
fn pending_bytes(fd: &OwnedFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which is valid.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r < 0 {
        0
    } else {
        n.max(0) as usize
    }
}

/// Forwards what the exited process left in `src`: the bytes pending at
/// this moment, and no more.
fn drain_after_exit(
    src: &OwnedFd,
    dst: &mut Option<HostStream>,
    buf: &mut [u8],
    name: &str,
    moved: &AtomicU64,
) {
    let mut left = pending_bytes(src);
    if fcntl(src.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).is_err() {
        return;
    }
    while left > 0 {
        let want = left.min(buf.len());
        match read_fd(src, &mut buf[..want]) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                forward(dst, &buf[..n], name, moved);
                left -= n;
            }
        }
    }
    // A tty hands the slave's last bytes to the master asynchronously (the
    // flip buffer): they may arrive just after the reap. Take what comes
    // within a short quiet period, up to one buffer more.
    if nix::unistd::isatty(src.as_raw_fd()).unwrap_or(false) {
        let mut extra = buf.len();
        while extra > 0 {
            let mut fds = [PollFd::new(src.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(TTY_SETTLE_MS)) {
                Ok(n) if n > 0 => {}
                _ => return,
            }
            let want = extra.min(buf.len());
            match read_fd(src, &mut buf[..want]) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    forward(dst, &buf[..n], name, moved);
                    extra -= n;
                }
            }
        }
    }
}

/// Starts copying the host's stdin stream into `dst` (pipe write end or a
/// tty master). When the host half-closes (or CloseStdin shuts the stream),
/// `dst` is dropped: the process reads EOF.
fn spawn_input(name: String, mut src: HostStream, dst: OwnedFd) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("in-{name}"))
        .spawn(move || {
            let mut dst = std::fs::File::from(dst);
            let mut buf = vec![0u8; BUF];
            loop {
                match src.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if dst.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
        })
}
