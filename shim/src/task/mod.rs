//! What the shim serves behind containerd's Task API: one sandbox (a VM,
//! or the host-process stand-in) and the containers running in it, each
//! with its init and exec processes.
//!
//! One shim serves one sandbox: a plain container, or a CRI pod's sandbox
//! container plus the app containers that join it. The sandbox is started
//! by the first `create` and stopped by `shutdown` once the last container
//! is gone.
//!
//! - [`process`]: a process's state and its transitions (created, running,
//!   paused, stopped), the exit path and `wait`;
//! - [`container`]: a container and the steps that create and delete it;
//! - [`sandbox_lifecycle`]: starting the sandbox, its death, shutdown;
//! - [`agent_events`]: the loop that turns the agent's events into exits
//!   and OOM events.

mod agent_events;
mod container;
mod process;
mod sandbox_lifecycle;
mod undo;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};

use containerd_shim::ExitSignal;

use crate::error::{Error, Result};
use crate::events::Events;
use crate::sandbox::Sandbox;
use thaw_config::Config;

use container::Container;
use process::{ProcState, Process};

/// How many deleted inits the shim remembers (a pod's containers; more
/// only if one shim saw many come and go).
const DELETED_INITS_KEPT: usize = 64;

/// The end of a deleted container's init. containerd gives a task delete
/// 10 s; when thaw's took longer, containerd retries, and it first asks
/// for the task's state: a NotFound there makes it skip the delete and
/// the Shutdown after it, and the shim would stay forever. So a deleted
/// init still answers state, wait and delete with how it ended.
#[derive(Debug, Clone)]
pub struct DeletedInit {
    pub bundle: PathBuf,
    pub state: ProcState,
}

/// A poisoned lock still guards consistent data here (no update is left
/// half-done by a panic), so it is used as it is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The shim's sandbox and containers.
pub struct Tasks {
    namespace: String,
    exit: Arc<ExitSignal>,
    events: Arc<Events>,
    /// Serializes sandbox start so two creates cannot boot two VMs.
    starting: Mutex<()>,
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    config: Mutex<Option<Config>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    shutting_down: AtomicBool,
    /// containerd asked the shim to exit (it does after every task
    /// delete) while a container was left: the shim goes once the last
    /// one is deleted. A delete that outlived containerd's timeout ends
    /// after the Shutdown that follows it.
    exit_when_empty: AtomicBool,
    deleted: Mutex<VecDeque<(String, DeletedInit)>>,
    /// Creates under way, by container id; true once containerd deleted
    /// the id meanwhile (it does when the caller of a create gave up:
    /// `ctr` interrupted, a timeout), so the create is undone at its end.
    /// The shim does not exit while one runs, which would leave its
    /// half-made sandbox behind.
    creating: Mutex<HashMap<String, bool>>,
    /// Counts creates, so an exit planned while the shim was empty is
    /// called off by a container that came after.
    creates: AtomicU64,
}

impl Tasks {
    pub fn new(namespace: &str, exit: Arc<ExitSignal>, events: Events) -> Tasks {
        Tasks {
            namespace: namespace.to_string(),
            exit,
            events: Arc::new(events),
            starting: Mutex::new(()),
            sandbox: Mutex::new(None),
            config: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            exit_when_empty: AtomicBool::new(false),
            deleted: Mutex::new(VecDeque::new()),
            creating: Mutex::new(HashMap::new()),
            creates: AtomicU64::new(0),
        }
    }

    /// Where task events go (in order, from one thread).
    pub fn events(&self) -> &Arc<Events> {
        &self.events
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    /// The container `id`; if it is still being created, marks that
    /// create to be undone at its end (the delete comes from containerd
    /// cleaning up after a create whose caller gave up).
    fn container_or_abandon(&self, id: &str) -> Result<Arc<Container>> {
        let containers = lock(&self.containers);
        if let Some(c) = containers.get(id) {
            return Ok(c.clone());
        }
        if let Some(abandoned) = lock(&self.creating).get_mut(id) {
            log::warn!("delete of {id} while it is being created: the create will be undone");
            *abandoned = true;
            return Err(Error::NotFound(format!(
                "container {id} (still being created)"
            )));
        }
        Err(Error::NotFound(format!("container {id}")))
    }

    /// How the init of the deleted container `id` ended, if it was
    /// deleted here.
    /// NotFound if it was not.
    pub fn deleted_init(&self, id: &str) -> Result<DeletedInit> {
        lock(&self.deleted)
            .iter()
            .find(|(d, _)| d == id)
            .map(|(_, init)| init.clone())
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    fn remember_deleted(&self, id: &str, init: DeletedInit) {
        let mut deleted = lock(&self.deleted);
        deleted.retain(|(d, _)| d != id);
        if deleted.len() >= DELETED_INITS_KEPT {
            deleted.pop_front();
        }
        deleted.push_back((id.to_string(), init));
    }

    /// Whether `c` is still the container listed under its id.
    fn is_current(&self, c: &Arc<Container>) -> bool {
        lock(&self.containers)
            .get(&c.id)
            .is_some_and(|listed| Arc::ptr_eq(listed, c))
    }

    /// A container's init (`exec_id` empty) or one of its execs.
    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        self.container(id)?.process(exec_id)
    }

    /// The sandbox if it is alive, for calls that are moot otherwise.
    pub fn live_sandbox(&self) -> Option<Arc<Sandbox>> {
        lock(&self.sandbox).clone().filter(|s| !s.is_dead())
    }

    /// The sandbox, for calls that need it alive.
    pub fn running_sandbox(&self) -> Result<Arc<Sandbox>> {
        self.live_sandbox()
            .ok_or_else(|| Error::Sandbox("the sandbox is not running".into()))
    }

    /// The sandbox process's host pid (0 before it started): the task pid
    /// containerd sees, since guest pids mean nothing on the host.
    pub fn sandbox_pid(&self) -> u32 {
        lock(&self.sandbox).as_ref().map(|s| s.pid()).unwrap_or(0)
    }

    fn all_containers(&self) -> Vec<Arc<Container>> {
        lock(&self.containers).values().cloned().collect()
    }
}
