//! Copies a process's stdio between its pipes (or tty) and the host streams.
//!
//! Output is drained after exit: once the process is reaped, each output
//! pump reads what is left in its pipe without waiting for writers that
//! outlive the process (daemonized children), then half-closes its stream.
//! The exit is published only after every output pump has finished.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::host::HostStream;

const BUF: usize = 64 * 1024;

/// Becomes readable (EOF) when the process has exited: the write end is
/// dropped by the exit handler.
pub fn exit_signal() -> std::io::Result<(Arc<OwnedFd>, OwnedFd)> {
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
/// the process never blocks on a dead stream.
fn forward(dst: &mut Option<HostStream>, data: &[u8], name: &str) {
    if let Some(s) = dst {
        if let Err(e) = s.write_all(data) {
            log::warn!("{name}: host stream write failed, discarding further output: {e}");
            *dst = None;
        }
    }
}

/// Starts copying `src` (a pipe read end or a tty master) to `dst`.
pub fn spawn_output(
    name: String,
    src: OwnedFd,
    dst: HostStream,
    exited: Arc<OwnedFd>,
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
                let src_ready = fds[0].any().unwrap_or(false);
                let exit_ready = fds[1].any().unwrap_or(false);
                if src_ready {
                    match read_fd(&src, &mut buf) {
                        Ok(0) => break,
                        Ok(n) => forward(&mut dst, &buf[..n], &name),
                        // A tty master reads EIO once every slave is closed.
                        Err(_) => break,
                    }
                    continue;
                }
                if exit_ready {
                    drain(&src, &mut dst, &mut buf, &name);
                    break;
                }
            }
            if let Some(s) = &dst {
                let _ = s.shutdown(Shutdown::Write);
            }
        })
}

/// Reads whatever is buffered without waiting for more.
fn drain(src: &OwnedFd, dst: &mut Option<HostStream>, buf: &mut [u8], name: &str) {
    if fcntl(src.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).is_err() {
        return;
    }
    loop {
        match read_fd(src, buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => forward(dst, &buf[..n], name),
        }
    }
}

/// Starts copying the host's stdin stream into `dst` (pipe write end or a
/// tty master). When the host half-closes (or CloseStdin shuts the stream),
/// `dst` is dropped: the process reads EOF.
pub fn spawn_input(
    name: String,
    mut src: HostStream,
    dst: OwnedFd,
) -> std::io::Result<JoinHandle<()>> {
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
