//! One process the agent started (a container's init or an exec), its
//! state, and what happens when it exits.

use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thaw_agent_protocol::agent::ExitEvent;
use tokio::sync::watch;

use crate::host::HostStream;
use crate::reaper::Exit;
use crate::runtime::events::EventLog;
use crate::runtime::oom::OomWatcher;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub status: u32,
    pub at: SystemTime,
}

impl ExitInfo {
    pub fn unix_ns(&self) -> i64 {
        self.at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
            .unwrap_or(0)
    }
}

pub enum Status {
    /// Set up, waiting for start; holds the helper channel.
    Created(UnixStream),
    Running,
    Exited(ExitInfo),
}

#[derive(Default)]
pub struct Io {
    pub outputs: Vec<JoinHandle<()>>,
    /// Bytes the output pumps moved so far: how an exit tells a slow host
    /// (still reading, so keep waiting) from one that stopped reading.
    pub output_moved: Arc<AtomicU64>,
    pub inputs: Vec<JoinHandle<()>>,
    /// Dropped at exit: tells the output pumps to drain and stop.
    pub exit_signal: Option<OwnedFd>,
    /// A clone of the stdin stream, to close it from outside the pump.
    pub stdin_ctl: Option<HostStream>,
    pub tty_master: Option<Arc<OwnedFd>>,
}

pub struct Proc {
    pub container_id: String,
    /// Empty for the container's init.
    pub exec_id: String,
    pid: AtomicI32,
    /// Set the moment the reaper saw the exit (the pid may be reused after).
    reaped: AtomicBool,
    status: Mutex<Status>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    pub io: Mutex<Io>,
    /// The guest file bound at the container's /dev/termination-log (a
    /// container init whose spec binds one).
    termination_log: OnceLock<PathBuf>,
    /// What that file held at exit, read before the exit is published.
    termination_message: Mutex<Vec<u8>>,
}

/// The start of the file at `path`, at most MAX_TERMINATION_MESSAGE
/// bytes. The container could write anything there, so it is read without
/// following links or blocking, and only if it is a regular file.
pub fn read_termination_log(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut out = Vec::new();
    f.take(thaw_agent_protocol::MAX_TERMINATION_MESSAGE as u64)
        .read_to_end(&mut out)?;
    Ok(out)
}

/// An exit waits for its output as long as the output keeps moving; after
/// this long without a byte moved (the host stopped reading) it is
/// published anyway. What it waits for is bounded: the bytes the process
/// left in its pipes (see stdio.rs).
const OUTPUT_IDLE: Duration = Duration::from_secs(30);

/// Joins the output pumps; gives up (false) once `moved` has not grown for
/// `idle`.
fn wait_while_moving(outputs: Vec<JoinHandle<()>>, moved: &AtomicU64, idle: Duration) -> bool {
    let mut last = moved.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    for h in outputs {
        while !h.is_finished() {
            let now = moved.load(Ordering::Relaxed);
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= idle {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = h.join();
    }
    true
}

impl Proc {
    pub fn new(container_id: &str, exec_id: &str) -> Arc<Proc> {
        Arc::new(Proc {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            pid: AtomicI32::new(0),
            reaped: AtomicBool::new(false),
            status: Mutex::new(Status::Running),
            exit_tx: watch::channel(None).0,
            io: Mutex::new(Io::default()),
            termination_log: OnceLock::new(),
            termination_message: Mutex::new(Vec::new()),
        })
    }

    /// Makes the exit carry what the container left in `path` (its
    /// /dev/termination-log).
    pub fn set_termination_log(&self, path: PathBuf) {
        let _ = self.termination_log.set(path);
    }

    pub fn termination_message(&self) -> Vec<u8> {
        self.termination_message
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn pid(&self) -> i32 {
        self.pid.load(Ordering::SeqCst)
    }

    pub fn set_created(&self, pid: i32, chan: UnixStream) {
        self.pid.store(pid, Ordering::SeqCst);
        let mut st = self.status();
        if !matches!(*st, Status::Exited(_)) {
            *st = Status::Created(chan);
        }
    }

    pub fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn io(&self) -> MutexGuard<'_, Io> {
        self.io.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_reaped(&self) -> bool {
        self.reaped.load(Ordering::SeqCst)
    }

    pub fn exit_info(&self) -> Option<ExitInfo> {
        *self.exit_tx.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.exit_tx.subscribe()
    }

    /// Blocks until the exit is published or `timeout` passes.
    pub fn wait_blocking(&self, timeout: Duration) -> Option<ExitInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.exit_info() {
                return Some(e);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Reaper callback: drain output, then publish the exit (on a thread of
    /// its own, so the reaper keeps reaping meanwhile).
    pub fn on_exit(self: &Arc<Self>, exit: Exit, events: Arc<EventLog>, oom: Option<OomWatcher>) {
        self.reaped.store(true, Ordering::SeqCst);
        let me = self.clone();
        let finish = move || {
            let (outputs, signal, moved) = {
                let mut io = me.io();
                (
                    std::mem::take(&mut io.outputs),
                    io.exit_signal.take(),
                    io.output_moved.clone(),
                )
            };
            drop(signal);
            if !wait_while_moving(outputs, &moved, OUTPUT_IDLE) {
                log::warn!(
                    "{}/{}: output stalled for {} s after exit (the host is not reading); reporting the exit anyway",
                    me.container_id,
                    me.exec_id,
                    OUTPUT_IDLE.as_secs()
                );
            }
            if let Some(s) = me.io().stdin_ctl.take() {
                let _ = s.shutdown(Shutdown::Both);
            }
            if let Some(oom) = &oom {
                oom.check_now(&me.container_id);
            }
            if let Some(path) = me.termination_log.get() {
                match read_termination_log(path) {
                    Ok(m) => {
                        *me.termination_message
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()) = m
                    }
                    Err(e) => log::warn!(
                        "{}: reading its termination log {}: {e}",
                        me.container_id,
                        path.display()
                    ),
                }
            }
            let info = ExitInfo {
                status: exit.status,
                at: exit.at,
            };
            *me.status() = Status::Exited(info);
            me.exit_tx.send_replace(Some(info));
            let mut ev = ExitEvent::new();
            ev.container_id = me.container_id.clone();
            ev.exec_id = me.exec_id.clone();
            ev.pid = exit.pid as u32;
            ev.exit_status = exit.status;
            ev.exited_at_unix_ns = info.unix_ns();
            ev.termination_message = me.termination_message();
            events.push_exit(ev);
        };
        if std::thread::Builder::new()
            .name(format!("exit-{}", exit.pid))
            .spawn(finish)
            .is_err()
        {
            log::error!("cannot start exit thread for pid {}", exit.pid);
        }
    }

    pub fn resize(&self, width: u16, height: u16) -> std::io::Result<bool> {
        let io = self.io();
        let Some(master) = &io.tty_master else {
            return Ok(false);
        };
        let ws = libc::winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ with a pointer to a local winsize.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_termination_log_is_read_up_to_the_limit_and_never_through_a_link() {
        let dir = std::env::temp_dir().join(format!("thaw-termlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("termination-log");
        std::fs::write(&log, vec![b'x'; 10_000]).unwrap();
        let got = read_termination_log(&log).unwrap();
        assert_eq!(got.len(), thaw_agent_protocol::MAX_TERMINATION_MESSAGE);
        let link = dir.join("link");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        assert!(read_termination_log(&link).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
