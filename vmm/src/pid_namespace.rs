//! The jailed VMM's own pid namespace, whose pid 1 it is: it sees no other
//! process, so it can signal none, and no process of the host can be
//! named by a pid it knows.
//!
//! A process cannot move itself into a new pid namespace, only its
//! children. So the process the shim started forks: the child goes on as
//! the VMM, and the parent re-executes itself as a small waiter
//! (`thaw-vmm --pid-namespace-parent-of PID`) that stands in for it
//! towards the shim:
//! - its exit mirrors the VMM's (same code, or death by the same signal),
//!   so the shim's supervision reads exactly what it read before;
//! - a terminating signal sent to it stops the VMM and then ends it by
//!   that signal (the VMM, as a namespace's init, ignores signals it has
//!   no handler for when they come from outside);
//! - when it dies, the VMM dies (parent-death signal), and it dies with
//!   the shim's supervisor thread as before.
//!
//! Re-executing (rather than waiting in the forked copy) gives the waiter
//! a command line of its own and only the memory a fresh small process
//! needs.

use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, raise, signal, SigHandler, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::jail::{sys, JailError};

/// The argument under which `thaw-vmm` runs as the waiting parent.
pub const PARENT_ARG: &str = "--pid-namespace-parent-of";

/// Signals the waiter passes on as the VMM's end.
const TERMINATING: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// The parent that waits for the VMM, as a pidfd the VMM keeps: readable
/// once that parent has exited.
pub struct Parent(OwnedFd);

impl Parent {
    /// Whether the waiting parent has exited (the VMM's parent-death
    /// signal then already fired, or never will).
    pub fn exited(&self) -> bool {
        let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
        !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
    }
}

/// Moves the VMM into a new pid namespace as its pid 1. Returns in the
/// child, which goes on as the VMM; the parent becomes the waiter and
/// never returns. Must be called while the process is single-threaded.
pub fn enter() -> Result<Parent, JailError> {
    // SAFETY: pidfd_open with our own pid; the fd is checked and owned.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if fd < 0 {
        return Err(JailError::Sys {
            what: "opening a pidfd of the VMM's parent-to-be".into(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let parent = Parent(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    unshare(CloneFlags::CLONE_NEWPID).map_err(sys("unsharing the pid namespace"))?;
    // SAFETY: single-threaded (the caller's contract), so the child may
    // run any code.
    match unsafe { fork() }.map_err(sys("forking into the pid namespace"))? {
        ForkResult::Child => {
            // The parent-death signal is not inherited across fork.
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
                return Err(JailError::Sys {
                    what: "setting the parent-death signal".into(),
                    source: io::Error::last_os_error(),
                });
            }
            if parent.exited() {
                return Err(JailError::Invalid(
                    "the VMM's parent exited while it entered its pid namespace".into(),
                ));
            }
            Ok(parent)
        }
        ForkResult::Parent { child } => {
            drop(parent);
            let err = std::process::Command::new("/proc/self/exe")
                .arg0("thaw-vmm")
                .arg(PARENT_ARG)
                .arg(child.as_raw().to_string())
                .exec();
            // Could not re-execute: wait in this copy instead.
            eprintln!("thaw-vmm: re-executing as the pid namespace's parent: {err}");
            wait_for(child)
        }
    }
}

/// The waiter: `thaw-vmm --pid-namespace-parent-of PID`. Never returns.
pub fn wait_for(child: Pid) -> ! {
    // Re-executed through /proc/self/exe, its name would read "exe".
    // SAFETY: prctl with a NUL-terminated name of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"thaw-vmm-waiter".as_ptr()) };
    let code = match wait_loop(child) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("thaw-vmm: waiting for the VMM (pid {child}): {e}");
            // Whatever went wrong, the VMM must not outlive its waiter.
            let _ = kill(child, Signal::SIGKILL);
            1
        }
    };
    std::process::exit(code)
}

fn wait_loop(child: Pid) -> Result<i32, JailError> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    for s in TERMINATING {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(sys("blocking the signals the waiter reads"))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC)
        .map_err(sys("opening the waiter's signalfd"))?;
    crate::seccomp::confine_waiter().map_err(|e| JailError::Sys {
        what: "confining the waiter".into(),
        source: io::Error::other(e.to_string()),
    })?;
    let mut ending: Option<Signal> = None;
    loop {
        // Checked before each read: a SIGCHLD that came before the mask
        // was set is gone.
        match waitpid(child, Some(WaitPidFlag::WNOHANG)).map_err(sys("waiting for the VMM"))? {
            WaitStatus::Exited(_, code) => return Ok(ending.map_or(code, end_by)),
            WaitStatus::Signaled(_, sig, _) => return Ok(end_by(ending.unwrap_or(sig))),
            _ => {}
        }
        let Some(info) = signals
            .read_signal()
            .map_err(sys("reading the waiter's signals"))?
        else {
            continue;
        };
        let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
            continue;
        };
        if sig != Signal::SIGCHLD && ending.is_none() {
            ending = Some(sig);
            kill(child, Signal::SIGKILL).map_err(sys("stopping the VMM"))?;
        }
    }
}

/// Ends this process by `sig`, as the VMM ended (or as it was asked to):
/// the shim reads the same status as from an unjailed VMM. Returns the
/// exit code to use should the signal not end it.
fn end_by(sig: Signal) -> i32 {
    // SAFETY: restoring the default action for a signal; no handler runs.
    let _ = unsafe { signal(sig, SigHandler::SigDfl) };
    let mut one = SigSet::empty();
    one.add(sig);
    let _ = one.thread_unblock();
    let _ = raise(sig);
    128 + sig as i32
}

/// Parses the waiter's argument list (after [`PARENT_ARG`]).
pub fn parse_parent_arg(arg: Option<&std::ffi::OsStr>) -> Option<Pid> {
    let pid: i32 = arg?.to_str()?.parse().ok()?;
    (pid > 0).then(|| Pid::from_raw(pid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_child::{child_role, command};
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};

    const CHILD: &str = "THAW_VMM_WAITER_TEST_CHILD";
    const TEST: &str = "pid_namespace::tests::the_waiter_mirrors_the_vmm_and_stops_it_when_told";

    /// In the child (a libtest process, so several threads): forks a
    /// single-threaded waiter, which forks a stand-in VMM that ends as
    /// `how` says and waits for it; prints the two pids, then the waiter's
    /// end as `status exit N` or `status signal N`.
    fn child(how: &str) -> ! {
        let say = |line: String| {
            let line = line + "\n";
            // SAFETY: writing our own buffer to stdout.
            unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
        };
        // SAFETY: the children call only what a test child may; the other
        // thread of this process (libtest's) is waiting, holding no lock.
        match unsafe { fork() }.unwrap() {
            // SAFETY: this child is single-threaded.
            ForkResult::Child => match unsafe { fork() }.unwrap() {
                // SAFETY: _exit, raise and pause take plain integers.
                ForkResult::Child => unsafe {
                    match how {
                        "exit" => libc::_exit(7),
                        "sigsys" => {
                            libc::raise(libc::SIGSYS);
                            libc::_exit(99)
                        }
                        _ => loop {
                            libc::pause();
                        },
                    }
                },
                ForkResult::Parent { child } => {
                    say(format!("pids {} {child}", std::process::id()));
                    wait_for(child)
                }
            },
            ForkResult::Parent { child } => {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => say(format!("status exit {code}")),
                    Ok(WaitStatus::Signaled(_, sig, _)) => {
                        say(format!("status signal {}", sig as i32))
                    }
                    other => say(format!("status {other:?}")),
                }
                std::process::exit(0)
            }
        }
    }

    /// Runs the child; returns its output lines as they come.
    fn start(how: &str) -> (std::process::Child, impl Iterator<Item = String>) {
        let mut c = command(TEST, CHILD, how)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(c.stdout.take().unwrap());
        (c, out.lines().map_while(Result::ok))
    }

    fn line_after(lines: &mut impl Iterator<Item = String>, prefix: &str) -> String {
        lines
            .find_map(|l| l.strip_prefix(prefix).map(str::to_string))
            .unwrap_or_else(|| panic!("no line {prefix:?} from the child"))
    }

    fn gone(pid: &str) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie for its new parent to reap.
        stat.is_empty()
            || stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
    }

    #[test]
    fn the_waiter_mirrors_the_vmm_and_stops_it_when_told() {
        if let Some(how) = child_role(CHILD) {
            child(&how);
        }
        // The VMM's exit code and its death signal come through as they were.
        for (how, end) in [("exit", "exit 7"), ("sigsys", "signal 31")] {
            let (mut c, mut lines) = start(how);
            assert_eq!(line_after(&mut lines, "status "), end, "{how}");
            c.wait().unwrap();
        }
        // SIGTERM to the waiter: the VMM is killed, the waiter ends by SIGTERM.
        let (mut c, mut lines) = start("hang");
        let pids = line_after(&mut lines, "pids ");
        let (waiter, vmm) = pids.split_once(' ').unwrap();
        // Once the waiter reads its signals (SigBlk set), SIGTERM is its to handle.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(format!("/proc/{waiter}/status"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("SigBlk:") && !l.ends_with("0000000000000000"))
        {
            assert!(
                Instant::now() < deadline,
                "the waiter never blocked its signals"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        kill(Pid::from_raw(waiter.parse().unwrap()), Signal::SIGTERM).unwrap();
        assert_eq!(line_after(&mut lines, "status "), "signal 15");
        c.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gone(vmm) {
            assert!(
                Instant::now() < deadline,
                "the VMM {vmm} outlived its waiter"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_parent_argument_is_a_positive_pid() {
        use std::ffi::OsStr;
        assert_eq!(
            parse_parent_arg(Some(OsStr::new("42"))),
            Some(Pid::from_raw(42))
        );
        for bad in ["0", "-3", "x", ""] {
            assert_eq!(parse_parent_arg(Some(OsStr::new(bad))), None, "{bad}");
        }
        assert_eq!(parse_parent_arg(None), None);
    }
}
