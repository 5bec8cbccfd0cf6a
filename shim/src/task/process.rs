//! A container's init or exec process as containerd sees it: its state,
//! the transitions between states (created -> running <-> paused ->
//! stopped), and its exit, which is published only once its output has
//! reached the client.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;
use containerd_shim::protos::types::task::Status;

use super::lock;
use crate::agent::Agent;
use crate::error::{Error, Result};
use crate::events::Events;
use crate::stdio::{Bridges, StdioPaths};

/// An exit is published once the process's output reached EOF. It waits
/// as long as the output keeps moving, so a slow host loses nothing; after
/// this long without a byte moved (the client stopped reading, or the guest
/// holds a stream open without writing) it is published anyway. The agent
/// sends after an exit only what the process left in its pipes.
const OUTPUT_IDLE: Duration = Duration::from_secs(30);
/// How long a failed start waits for the process's exit to be recorded
/// before it answers (see `Process::start`).
const START_FAILURE_EXIT_WAIT: Duration = Duration::from_secs(5);

pub fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// The agent's exit time (Unix nanoseconds; 0 = unknown, taken as now).
pub fn ts_from_ns(ns: i64) -> Timestamp {
    if ns <= 0 {
        return now();
    }
    Timestamp {
        seconds: ns / 1_000_000_000,
        nanos: (ns % 1_000_000_000) as i32,
        ..Default::default()
    }
}

#[derive(Debug, Clone)]
pub struct ProcState {
    pub status: Status,
    pub pid: u32,
    pub exit_status: u32,
    pub exited_at: Option<Timestamp>,
}

pub struct Process {
    pub container_id: String,
    /// Empty for the container's init.
    pub exec_id: String,
    pub stdio: StdioPaths,
    st: Mutex<ProcState>,
    /// Signalled when the process stops.
    cond: Condvar,
    bridges: Mutex<Option<Bridges>>,
    /// Set by the first exit report: one waiter per process, however often
    /// (or falsely) the guest reports it.
    exit_seen: AtomicBool,
    /// The host file bound at the container's /dev/termination-log, which
    /// gets the guest's copy at exit (a container init in a VM).
    pub termination_log: OnceLock<PathBuf>,
}

/// Writes the container's termination message into the host file kubelet
/// reads it from. The file is the one the spec named (kubelet made it); it
/// is not created, and a link is not followed. The guest sends at most
/// MAX_TERMINATION_MESSAGE bytes; no more is written.
fn write_termination_log(path: &Path, message: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let message = &message[..message
        .len()
        .min(thaw_agent_protocol::MAX_TERMINATION_MESSAGE)];
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    f.write_all(message)
}

impl Process {
    pub fn new(
        container_id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        pid: u32,
        bridges: Bridges,
    ) -> Arc<Self> {
        Arc::new(Process {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            stdio,
            st: Mutex::new(ProcState {
                status: Status::CREATED,
                pid,
                exit_status: 0,
                exited_at: None,
            }),
            cond: Condvar::new(),
            bridges: Mutex::new(Some(bridges)),
            exit_seen: AtomicBool::new(false),
            termination_log: OnceLock::new(),
        })
    }

    pub fn state(&self) -> ProcState {
        lock(&self.st).clone()
    }

    pub fn exited(&self) -> bool {
        lock(&self.st).status == Status::STOPPED
    }

    pub fn stop_bridges(&self) {
        if let Some(b) = lock(&self.bridges).take() {
            b.stop();
        }
    }

    /// The process reads EOF on stdin.
    pub fn close_stdin(&self) {
        if let Some(b) = lock(&self.bridges).as_ref() {
            b.close_stdin();
        }
    }

    /// Created -> running. Publishes TaskStart (init) or TaskExecStarted.
    /// `task_pid` maps the agent's pid to the one containerd sees (see
    /// [`crate::sandbox::Sandbox::task_pid`]).
    pub fn start(
        &self,
        agent: &Agent,
        task_pid: impl Fn(u32) -> u32,
        events: &Events,
    ) -> Result<u32> {
        let (id, exec_id) = (&self.container_id, &self.exec_id);
        // Held across the RPC so the exit (which takes the same lock) is
        // published after TaskStart.
        let mut st = lock(&self.st);
        if st.status != Status::CREATED {
            return Err(Error::FailedPrecondition(format!(
                "process {id}/{exec_id} is not in created state"
            )));
        }
        let agent_pid = match agent.start_process(id, exec_id) {
            Ok(pid) => pid,
            Err(e) => {
                // A process that failed to start (exec refused) exits at
                // once, and containerd's client deletes a task only once
                // it is stopped: answer after its exit is recorded, so a
                // `ctr run --rm` that gets this error can delete it.
                drop(st);
                self.wait_stopped(START_FAILURE_EXIT_WAIT);
                return Err(e);
            }
        };
        if agent_pid != 0 {
            st.pid = task_pid(agent_pid);
        }
        st.status = Status::RUNNING;
        let pid = st.pid;
        if exec_id.is_empty() {
            events.publish(
                topics::TASK_START_EVENT_TOPIC,
                ev::TaskStart {
                    container_id: id.clone(),
                    pid,
                    ..Default::default()
                },
            );
        } else {
            events.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                ev::TaskExecStarted {
                    container_id: id.clone(),
                    exec_id: exec_id.clone(),
                    pid,
                    ..Default::default()
                },
            );
        }
        Ok(pid)
    }

    /// Running -> paused (`pause`) or paused -> running: freezes or thaws
    /// the whole container, so it is called on the init. The same state
    /// check, agent call, state change and event either way.
    pub fn set_paused(&self, pause: bool, agent: &Agent, events: &Events) -> Result<()> {
        let id = &self.container_id;
        let mut st = lock(&self.st);
        let (from, to, from_name) = if pause {
            (Status::RUNNING, Status::PAUSED, "running")
        } else {
            (Status::PAUSED, Status::RUNNING, "paused")
        };
        if st.status != from {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not {from_name}"
            )));
        }
        let container_id = id.clone();
        if pause {
            agent.pause(id)?;
            st.status = to;
            events.publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                ev::TaskPaused {
                    container_id,
                    ..Default::default()
                },
            );
        } else {
            agent.resume(id)?;
            st.status = to;
            events.publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                ev::TaskResumed {
                    container_id,
                    ..Default::default()
                },
            );
        }
        Ok(())
    }

    /// Signals the process (or, with `all`, every process of its
    /// container). `agent` is None once the sandbox is gone.
    pub fn kill(&self, agent: Option<&Agent>, signal: u32, all: bool) -> Result<()> {
        let (id, exec_id) = (&self.container_id, &self.exec_id);
        if self.exited() {
            // containerd reads NOT_FOUND on kill as "already stopped".
            return Err(Error::NotFound(format!(
                "process {id}/{exec_id} already finished"
            )));
        }
        let Some(agent) = agent else {
            return Err(Error::NotFound(
                "the sandbox is gone; so is the process".into(),
            ));
        };
        agent.signal_process(id, exec_id, signal, all)
    }

    /// The process ended: its exit is published once its output has
    /// reached the client (see [`OUTPUT_IDLE`]), on a thread of its own so
    /// other processes' events are not held up meanwhile.
    /// `termination_message` is what the container left in its
    /// /dev/termination-log (empty if nothing or none).
    pub fn on_exit(
        self: &Arc<Self>,
        status: u32,
        at: Timestamp,
        termination_message: &[u8],
        events: &Arc<Events>,
    ) {
        if self.exited() || self.exit_seen.swap(true, Ordering::SeqCst) {
            return;
        }
        if let (Some(path), false) = (self.termination_log.get(), termination_message.is_empty()) {
            if let Err(e) = write_termination_log(path, termination_message) {
                log::warn!(
                    "{}: writing its termination message to {}: {e}",
                    self.container_id,
                    path.display()
                );
            }
        }
        let (p, events2, at2) = (self.clone(), events.clone(), at.clone());
        let waiter = move || {
            let drained = lock(&p.bridges)
                .as_ref()
                .map(|b| b.wait_output(OUTPUT_IDLE))
                .unwrap_or(true);
            if !drained {
                log::warn!(
                    "{}/{}: output stalled for {OUTPUT_IDLE:?} after exit; reporting the exit anyway",
                    p.container_id,
                    p.exec_id
                );
            }
            p.publish_exit(status, at2, &events2);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("exit".into())
            .spawn(waiter)
        {
            log::warn!(
                "spawning the exit waiter: {e}; reporting the exit without waiting for output"
            );
            self.publish_exit(status, at, events);
        }
    }

    /// -> stopped: records the exit once, wakes waiters and publishes
    /// TaskExit.
    pub fn publish_exit(&self, status: u32, at: Timestamp, events: &Events) {
        let mut st = lock(&self.st);
        if st.status == Status::STOPPED {
            return;
        }
        st.status = Status::STOPPED;
        st.exit_status = status;
        st.exited_at = Some(at.clone());
        let id = if self.exec_id.is_empty() {
            self.container_id.clone()
        } else {
            self.exec_id.clone()
        };
        events.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            ev::TaskExit {
                container_id: self.container_id.clone(),
                id,
                pid: st.pid,
                exit_status: status,
                exited_at: MessageField::some(at),
                ..Default::default()
            },
        );
        self.cond.notify_all();
    }

    /// Waits up to `limit` for the process to stop; whether it did.
    fn wait_stopped(&self, limit: Duration) -> bool {
        let st = lock(&self.st);
        let (st, _) = self
            .cond
            .wait_timeout_while(st, limit, |st| st.status != Status::STOPPED)
            .unwrap_or_else(|e| e.into_inner());
        st.status == Status::STOPPED
    }

    /// Blocks until the process has stopped; returns its final state.
    pub fn wait(&self) -> ProcState {
        let mut st = lock(&self.st);
        while st.status != Status::STOPPED {
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.clone()
    }
}
