//! Threads that run guest-facing code each under an allow-list of system
//! calls for their role ([`crate::seccomp::thread_program`]), on top of
//! the process-wide filter.
//!
//! A seccomp filter is inherited by the threads a thread starts, and
//! stacked filters intersect: a device worker started by a vCPU thread
//! (the guest activating a device) would be bound by the vCPU's list too.
//! So once the VM runs, every confined thread is started by the launcher,
//! a thread that is itself unconfined and only spawns threads. Before
//! that (a restore starts its device workers), the main thread starts them.
//!
//! Off until [`enable`] (the VMM binary calls it): unit tests run device
//! threads unconfined.

use std::io;
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::{self, JoinHandle};

use seccompiler::BpfProgram;

use crate::seccomp;

/// What a thread does, and so which system calls it may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadRole {
    Vcpu,
    Block,
    Rng,
    Net,
    Vsock,
    Fs,
    /// The control socket's server: the host's requests (status,
    /// pause, hot-plug, snapshots), never guest data.
    Control,
}

impl ThreadRole {
    pub const ALL: [ThreadRole; 7] = [
        ThreadRole::Vcpu,
        ThreadRole::Block,
        ThreadRole::Rng,
        ThreadRole::Net,
        ThreadRole::Vsock,
        ThreadRole::Fs,
        ThreadRole::Control,
    ];
}

type Launch = Box<dyn FnOnce() + Send>;

/// Each role's allow-list, built once confinement is on.
static PROGRAMS: OnceLock<Vec<(ThreadRole, BpfProgram)>> = OnceLock::new();
static LAUNCHER: OnceLock<Mutex<Sender<Launch>>> = OnceLock::new();

/// Turns confinement on: threads [`spawn`]ed from now on install their
/// role's allow-list, less `denied`. Call before any device or vCPU
/// thread exists.
pub fn enable(denied: &[libc::c_long]) -> Result<(), seccomp::SeccompError> {
    // Built here, once: a bad list surfaces before the guest runs, and
    // starting a thread costs no filter compilation.
    let programs = ThreadRole::ALL
        .into_iter()
        .map(|role| {
            Ok((
                role,
                seccomp::thread_program(role, std::process::id(), denied)?,
            ))
        })
        .collect::<Result<Vec<_>, seccomp::SeccompError>>()?;
    let _ = PROGRAMS.set(programs);
    Ok(())
}

/// Starts the launcher: from now on confined threads are started by it.
/// Call from the main thread once the VM is set up, before its vCPUs run.
pub fn start_launcher() -> io::Result<()> {
    let (tx, rx) = mpsc::channel::<Launch>();
    thread::Builder::new()
        .name("launcher".into())
        .spawn(move || {
            for launch in rx {
                launch();
            }
        })?;
    let _ = LAUNCHER.set(Mutex::new(tx));
    Ok(())
}

/// Starts `body` on a thread named `name` which, once confinement is
/// enabled, first installs `role`'s allow-list. A thread that cannot be
/// confined ends the VMM: guest-facing code never runs unconfined.
pub fn spawn<T, F>(name: &str, role: ThreadRole, body: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let name = name.to_string();
    let Some(prog) = PROGRAMS
        .get()
        .and_then(|all| all.iter().find(|(r, _)| *r == role))
        .map(|(_, prog)| prog)
    else {
        return thread::Builder::new().name(name).spawn(body);
    };
    let start = move || {
        thread::Builder::new().name(name.clone()).spawn(move || {
            if let Err(e) = seccomp::confine_thread(role, prog) {
                eprintln!("thaw-vmm: thread {name}: {e}; stopping");
                // SAFETY: _exit ends the process at once; nothing here
                // needs unwinding.
                unsafe { libc::_exit(1) };
            }
            body()
        })
    };
    let Some(launcher) = LAUNCHER.get() else {
        return start();
    };
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    let launch: Launch = Box::new(move || {
        let _ = reply_tx.send(start());
    });
    let sent = launcher
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(launch);
    if sent.is_err() {
        return Err(io::Error::other("the thread launcher is gone"));
    }
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the thread launcher did not answer"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_child::{child_role, rerun};

    const CHILD: &str = "THAW_VMM_CONFINED_TEST_CHILD";

    /// In the child: confinement on, then a thread of `role` opens a Unix
    /// socket; exits 0 if that was allowed.
    fn child(role: &str) -> ! {
        let role = match role {
            "net" => ThreadRole::Net,
            _ => ThreadRole::Vsock,
        };
        crate::seccomp::install(&[]).unwrap();
        enable(&[]).unwrap();
        start_launcher().unwrap();
        let t = spawn("test-confined", role, || {
            // SAFETY: socket(2) with integer arguments; closed below.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            // SAFETY: the fd just made.
            unsafe { libc::close(fd) };
            fd >= 0
        })
        .unwrap();
        std::process::exit(if t.join().unwrap() { 0 } else { 5 });
    }

    #[test]
    fn a_thread_dies_on_a_call_outside_its_role() {
        if let Some(role) = child_role(CHILD) {
            child(&role);
        }
        use std::os::unix::process::ExitStatusExt;
        let run = |role: &str| {
            rerun(
                "confined::tests::a_thread_dies_on_a_call_outside_its_role",
                CHILD,
                role,
            )
        };
        // virtio-net never opens sockets; virtio-vsock does.
        let net = run("net");
        assert_eq!(net.signal(), Some(libc::SIGSYS), "net thread: {net}");
        let vsock = run("vsock");
        assert_eq!(vsock.code(), Some(0), "vsock thread: {vsock}");
    }

    #[test]
    fn without_enable_threads_run_unconfined() {
        let t = spawn("test-free", ThreadRole::Net, || {
            std::fs::read_to_string("/proc/thread-self/status").unwrap()
        })
        .unwrap();
        let status = t.join().unwrap();
        // The test harness runs without a filter; so does this thread.
        assert!(status.contains("Seccomp:\t0"), "{status}");
    }
}
