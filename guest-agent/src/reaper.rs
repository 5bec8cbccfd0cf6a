//! Reaps every child (the agent is PID 1 in the guest, or a child subreaper
//! on the host) and hands exit statuses to whoever watches that pid.
//!
//! Nothing else in the agent may call wait(): this thread takes them all.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub pid: i32,
    /// Exit code, or 128 + signal number.
    pub status: u32,
    pub at: SystemTime,
}

type OnExit = Box<dyn FnOnce(Exit) + Send>;

#[derive(Default)]
struct State {
    watchers: HashMap<i32, OnExit>,
    /// Exits nobody watched (yet): orphans, or a pid registered a moment
    /// after it died. Kept briefly so a late `watch` still gets its exit.
    unclaimed: HashMap<i32, (Exit, Instant)>,
    /// Set when a child was spawned, so the thread retries wait() after ECHILD.
    spawned: bool,
}

/// Unclaimed exits older than this are dropped.
const UNCLAIMED_TTL: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Reaper {
    inner: Arc<(Mutex<State>, Condvar)>,
}

/// Held while forking: the reaper cannot dispatch an exit until the new pid
/// is registered, so a child that dies at once is not missed.
pub struct SpawnGuard<'a> {
    state: MutexGuard<'a, State>,
    cond: &'a Condvar,
}

impl SpawnGuard<'_> {
    pub fn watch(&mut self, pid: i32, on_exit: impl FnOnce(Exit) + Send + 'static) {
        self.state.watchers.insert(pid, Box::new(on_exit));
        self.state.spawned = true;
        self.cond.notify_all();
    }
}

impl Reaper {
    /// Starts the reaping thread. `subreaper`: become a child subreaper, so
    /// orphaned grandchildren (container processes) are reparented to us
    /// (automatic when we are PID 1).
    pub fn start(subreaper: bool) -> std::io::Result<Reaper> {
        if subreaper {
            // SAFETY: plain prctl with integer arguments.
            let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let reaper = Reaper {
            inner: Arc::new((Mutex::new(State::default()), Condvar::new())),
        };
        let r = reaper.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r.run())?;
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a watcher panicked; the map is intact.
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks out exit dispatch while a child is forked; see [`SpawnGuard`].
    pub fn hold(&self) -> SpawnGuard<'_> {
        SpawnGuard {
            state: self.lock(),
            cond: &self.inner.1,
        }
    }

    /// Calls `on_exit` once `pid` (a child or a reparented descendant) exits;
    /// at once if it already did.
    pub fn watch(&self, pid: i32, on_exit: impl FnOnce(Exit) + Send + 'static) {
        let mut state = self.lock();
        if let Some((exit, _)) = state.unclaimed.remove(&pid) {
            drop(state);
            on_exit(exit);
            return;
        }
        state.watchers.insert(pid, Box::new(on_exit));
    }

    /// Stops watching `pid` (its exit becomes unclaimed).
    pub fn unwatch(&self, pid: i32) {
        self.lock().watchers.remove(&pid);
    }

    fn run(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), None) {
                Ok(WaitStatus::Exited(pid, code)) => self.dispatch(pid.as_raw(), code as u32),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.dispatch(pid.as_raw(), 128 + sig as u32)
                }
                Ok(_) => {}
                Err(Errno::EINTR) => {}
                Err(Errno::ECHILD) => {
                    let mut state = self.lock();
                    while !state.spawned {
                        let (s, _) = self
                            .inner
                            .1
                            .wait_timeout(state, Duration::from_secs(1))
                            .unwrap_or_else(|e| e.into_inner());
                        state = s;
                    }
                    state.spawned = false;
                }
                Err(e) => {
                    log::error!("reaper: waitpid: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn dispatch(&self, pid: i32, status: u32) {
        let exit = Exit {
            pid,
            status,
            at: SystemTime::now(),
        };
        let mut state = self.lock();
        match state.watchers.remove(&pid) {
            Some(on_exit) => {
                drop(state);
                on_exit(exit);
            }
            None => {
                let now = Instant::now();
                state
                    .unclaimed
                    .retain(|_, (_, t)| now.duration_since(*t) < UNCLAIMED_TTL);
                state.unclaimed.insert(pid, (exit, now));
            }
        }
    }
}
