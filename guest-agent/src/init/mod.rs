//! `thaw-agent __init`: the helper that becomes a container process.
//!
//! The agent is multi-threaded (tokio), and fork() from a threaded process
//! may only run async-signal-safe code before exec. So the agent re-executes
//! itself as this single-threaded helper, which can then do the real setup:
//! join the cgroup and namespaces, fork into the new pid namespace, build the
//! root filesystem, report `Ready`, wait for `Start`, drop privileges and
//! exec the container's program. See `plan` for the messages.

mod mounts;
pub use mounts::propagation_flags;
mod process;
mod tty;

use std::convert::Infallible;
use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::sched::CloneFlags;
use nix::unistd::{fork, ForkResult};

use crate::channel;
use crate::plan::{FromInit, Ns, Plan, ToInit};

/// Environment variable carrying the channel's fd number.
pub const FD_ENV: &str = "_THAW_INIT_FD";

/// The argv[1] that selects the helper.
pub const ARG: &str = "__init";

/// A failure, with the spec field it concerns when there is one.
#[derive(Debug)]
pub struct InitError {
    pub field: Option<String>,
    pub message: String,
}

pub type R<T> = Result<T, InitError>;

pub fn fail(message: impl Into<String>) -> InitError {
    InitError {
        field: None,
        message: message.into(),
    }
}

pub fn field_fail(field: impl Into<String>, message: impl Into<String>) -> InitError {
    InitError {
        field: Some(field.into()),
        message: message.into(),
    }
}

/// The agent blocks SIGTERM/SIGINT and ignores SIGPIPE, and both survive
/// fork and exec: give the container a clean slate.
fn reset_signals() {
    use nix::sys::signal::{signal, SigHandler, SigSet, Signal};
    let _ = SigSet::empty().thread_set_mask();
    for sig in Signal::iterator() {
        if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
            // SAFETY: restoring the default disposition installs no handler.
            let _ = unsafe { signal(sig, SigHandler::SigDfl) };
        }
    }
}

/// Helper entry point; never returns.
pub fn main() -> ! {
    reset_signals();
    let sock = match std::env::var(FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        // SAFETY: the agent passed us this fd, open and otherwise unused.
        Some(fd) if fd > 2 => unsafe { UnixStream::from_raw_fd(fd) },
        _ => {
            eprintln!("thaw-agent {ARG}: internal helper, started only by the agent");
            std::process::exit(2);
        }
    };
    let Err(e) = run(&sock);
    let _ = channel::send(
        &sock,
        &FromInit::Error {
            field: e.field,
            message: e.message,
        },
        None,
    );
    std::process::exit(1)
}

fn run(sock: &UnixStream) -> R<Infallible> {
    let plan = match channel::recv::<ToInit>(sock) {
        Ok(Some((ToInit::Plan(plan), _))) => *plan,
        Ok(_) => return Err(fail("expected a plan from the agent")),
        Err(e) => return Err(fail(format!("reading plan: {e}"))),
    };

    if let Some(cg) = &plan.cgroup {
        std::fs::write(cg.join("cgroup.procs"), "0")
            .map_err(|e| fail(format!("joining cgroup {}: {e}", cg.display())))?;
    }

    // Open every namespace first: entering the mount namespace changes
    // what the other paths resolve to.
    let mut joins: Vec<(Ns, File)> = Vec::new();
    for (ns, path) in &plan.join_ns {
        let f = File::open(path).map_err(|e| {
            fail(format!(
                "opening {} namespace {}: {e}",
                ns.proc_name(),
                path.display()
            ))
        })?;
        joins.push((*ns, f));
    }
    joins.sort_by_key(|(ns, _)| *ns == Ns::Mount);
    for (ns, f) in &joins {
        nix::sched::setns(f, ns.clone_flag())
            .map_err(|e| fail(format!("entering {} namespace: {e}", ns.proc_name())))?;
    }
    drop(joins);

    let mut flags = CloneFlags::empty();
    for ns in &plan.new_ns {
        flags |= ns.clone_flag();
    }
    if !flags.is_empty() {
        nix::sched::unshare(flags).map_err(|e| fail(format!("unshare({flags:?}): {e}")))?;
    }

    // The child waits until we have reported its pid, so our frame and its
    // frames never interleave on the channel.
    let (release_r, release_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| fail(format!("pipe: {e}")))?;
    // SAFETY: this helper is single-threaded.
    match unsafe { fork() }.map_err(|e| fail(format!("fork: {e}")))? {
        ForkResult::Parent { child } => {
            drop(release_r);
            let sent = channel::send(sock, &FromInit::Pid(child.as_raw()), None);
            drop(release_w);
            std::process::exit(if sent.is_ok() { 0 } else { 1 });
        }
        ForkResult::Child => {
            drop(release_w);
            wait_release(release_r);
            child(plan, sock)
        }
    }
}

fn wait_release(fd: OwnedFd) {
    let mut f = File::from(fd);
    let mut buf = [0u8; 1];
    while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
}

fn child(plan: Plan, sock: &UnixStream) -> R<Infallible> {
    // Our own session: signals to the agent's process group stay there, and
    // a tty can become our controlling terminal.
    nix::unistd::setsid().map_err(|e| fail(format!("setsid: {e}")))?;

    if let Some(rootfs) = &plan.rootfs {
        mounts::setup(rootfs)?;
    }
    if let Some(name) = &plan.hostname {
        nix::unistd::sethostname(name).map_err(|e| field_fail("hostname", e.to_string()))?;
    }
    if plan.process.terminal {
        tty::setup(sock, plan.rootfs.is_some())?;
    }
    let exe = process::resolve_exe(&plan.process)?;
    process::check_cwd(&plan.process)?;

    channel::send(sock, &FromInit::Ready, None)
        .map_err(|e| fail(format!("reporting ready: {e}")))?;
    match channel::recv::<ToInit>(sock) {
        Ok(Some((ToInit::Start, _))) => {}
        // The agent dropped us before start (container removed): just go.
        Ok(None) => std::process::exit(0),
        Ok(Some(_)) => return Err(fail("expected start from the agent")),
        Err(e) => return Err(fail(format!("waiting for start: {e}"))),
    }
    process::exec(&plan.process, &exe, sock)
}
