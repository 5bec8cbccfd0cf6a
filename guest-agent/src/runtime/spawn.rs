//! Starts the init helper (`thaw-agent __init`) and follows its setup
//! until it is ready to exec.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::channel;
use crate::error::{Error, Result};
use crate::init;
use crate::plan::{FromInit, Plan, ToInit};
use crate::reaper::{Exit, Reaper};

/// Setup longer than this (a hung mount, say) is abandoned. The caller's
/// own deadline is the shim's request timeout (`agent.request_timeout_secs`,
/// up to 600 s on slow hosts); this one only reclaims a helper that hangs,
/// so it must not be shorter: 20 VMs starting at once on a 2-core PVM host
/// took over 60 s to set up a container, and failed when it was 60 s.
const SETUP_TIMEOUT: Duration = Duration::from_secs(600);

/// A process set up and waiting for `Start`.
pub struct Pending {
    pub pid: i32,
    /// Kept until start; closed by a successful exec.
    pub chan: UnixStream,
    pub tty_master: Option<OwnedFd>,
}

/// The three stdio fds the helper (and so the process) starts with.
pub struct ChildStdio {
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
}

fn from_init_error(field: Option<String>, message: String) -> Error {
    match field {
        Some(field) => Error::Spec {
            field,
            reason: message,
        },
        None => Error::Setup(message),
    }
}

/// Spawns the helper with `plan`; `on_exit` is called when the container
/// process (not the helper) exits.
pub fn spawn(
    reaper: &Reaper,
    plan: &Plan,
    stdio: ChildStdio,
    on_exit: impl FnOnce(Exit) + Send + 'static,
) -> Result<Pending> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| Error::io("socketpair", e))?;
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(init::ARG)
        .env_clear()
        .env(init::FD_ENV, theirs_fd.to_string())
        .stdin(stdio.stdin)
        .stdout(stdio.stdout)
        .stderr(stdio.stderr);
    // SAFETY: only fcntl on an fd number, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(theirs_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(theirs_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    {
        let mut guard = reaper.hold();
        let child = cmd
            .spawn()
            .map_err(|e| Error::io("starting the init helper (/proc/self/exe)", e))?;
        // The helper's own exit tells us nothing the channel does not.
        guard.watch(child.id() as i32, |_| {});
    }
    drop(theirs);
    ours.set_read_timeout(Some(SETUP_TIMEOUT))
        .map_err(|e| Error::io("setting channel timeout", e))?;

    channel::send(&ours, &ToInit::Plan(Box::new(plan.clone())), None)
        .map_err(|e| Error::io("sending the plan to the init helper", e))?;

    let mut pid = None;
    let mut on_exit = Some(on_exit);
    let mut tty_master = None;
    let result = loop {
        match channel::recv::<FromInit>(&ours) {
            Ok(Some((FromInit::Pid(p), _))) => {
                pid = Some(p);
                if let Some(f) = on_exit.take() {
                    reaper.watch(p, f);
                }
            }
            Ok(Some((FromInit::Tty, fd))) => match fd {
                Some(fd) => tty_master = Some(fd),
                None => break Err(Error::Setup("tty message without a file descriptor".into())),
            },
            Ok(Some((FromInit::Ready, _))) => break Ok(()),
            Ok(Some((FromInit::Error { field, message }, _))) => {
                break Err(from_init_error(field, message))
            }
            Ok(None) => break Err(Error::Setup("the init helper exited during setup".into())),
            Err(e) => break Err(Error::io("waiting for container setup", e)),
        }
    };
    match (result, pid) {
        (Ok(()), Some(pid)) => {
            ours.set_read_timeout(None)
                .map_err(|e| Error::io("clearing channel timeout", e))?;
            Ok(Pending {
                pid,
                chan: ours,
                tty_master,
            })
        }
        (Ok(()), None) => Err(Error::Setup("ready before reporting a pid".into())),
        (Err(e), pid) => {
            if let Some(pid) = pid {
                // A hung setup must not linger.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Err(e)
        }
    }
}

/// Lets a pending process exec; errors if the exec itself failed.
pub fn start(chan: UnixStream) -> Result<()> {
    channel::send(&chan, &ToInit::Start, None).map_err(|e| Error::io("sending start", e))?;
    chan.set_read_timeout(Some(SETUP_TIMEOUT))
        .map_err(|e| Error::io("setting channel timeout", e))?;
    match channel::recv::<FromInit>(&chan) {
        // The channel is close-on-exec: EOF means the program is running.
        Ok(None) => Ok(()),
        Ok(Some((FromInit::Error { field, message }, _))) => Err(from_init_error(field, message)),
        Ok(Some((other, _))) => Err(Error::Setup(format!("unexpected {other:?} at start"))),
        Err(e) => Err(Error::io("waiting for exec", e)),
    }
}
