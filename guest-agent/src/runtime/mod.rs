//! The in-guest container runtime: sandboxes, containers and their
//! processes, driven by the ttrpc service.
//!
//! [`Runtime`] holds the state; the container lifecycle (create, exec,
//! start, delete, remove) is in [`container`], a process's stdio in
//! [`stdio`], and this module has the pods' sandboxes and the calls on a
//! running container (signal, pause, stats, pids, tty, stdin).

mod container;
mod undo;

pub mod cgroup;
pub mod events;
pub mod oom;
pub mod process;
pub mod rootfs;
pub mod sandbox;
pub mod spawn;
pub mod spec;
pub mod stdio;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use thaw_agent_protocol::agent::{CreateSandboxRequest, ProcessInfo, StatsResponse};

use crate::error::{Error, Result};
use crate::host::HostAddr;
use crate::reaper::Reaper;
use events::EventLog;
use oom::OomWatcher;
use process::{ExitInfo, Proc};
use rootfs::MountedRootfs;
use sandbox::Sandbox;

pub use container::Container;

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Agent state: container and sandbox directories, mounts.
    pub run_dir: PathBuf,
    pub host: HostAddr,
    /// Parent of container cgroups; None runs without cgroups.
    pub cgroup_root: Option<PathBuf>,
    /// Is the agent the guest's init.
    pub pid1: bool,
}

#[derive(Default)]
struct State {
    sandboxes: HashMap<String, Arc<Sandbox>>,
    containers: HashMap<String, Arc<Container>>,
    /// Ids whose creation is under way.
    reserved: HashSet<String>,
    /// Rootfs mounted by MountRootfs for a create still to come.
    premounted: HashMap<String, MountedRootfs>,
}

pub struct Runtime {
    cfg: RuntimeConfig,
    cgroups: cgroup::Cgroups,
    reaper: Reaper,
    pub events: Arc<EventLog>,
    oom: OomWatcher,
    state: Arc<Mutex<State>>,
}

pub fn validate_id(kind: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "{kind} {id:?}: must be 1-128 characters of [A-Za-z0-9_.-]"
        )))
    }
}

impl Runtime {
    pub fn new(cfg: RuntimeConfig, reaper: Reaper) -> Result<Runtime> {
        for sub in ["c", "s"] {
            let d = cfg.run_dir.join(sub);
            fs::create_dir_all(&d).map_err(|e| Error::path("creating", &d, e))?;
        }
        let cgroups = match cgroup::Cgroups::new(cfg.cgroup_root.clone()) {
            Ok(c) => c,
            // As init there is no one to report to: serve without cgroups
            // (limits then fail with a clear error) rather than not at all.
            Err(e) if cfg.pid1 => {
                log::error!("cgroups unavailable, containers get no resource limits: {e}");
                cgroup::Cgroups::new(None)?
            }
            Err(e) => return Err(e),
        };
        let events = Arc::new(EventLog::default());
        let oom = OomWatcher::start(events.clone());
        Ok(Runtime {
            cfg,
            cgroups,
            reaper,
            events,
            oom,
            state: Arc::new(Mutex::new(State::default())),
        })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.state()
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind: "container",
                id: id.to_string(),
            })
    }

    // A pod's sandbox: the files its containers share.

    pub fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<()> {
        validate_id("sandbox id", &req.sandbox_id)?;
        if self.state().sandboxes.contains_key(&req.sandbox_id) {
            return Err(Error::AlreadyExists {
                kind: "sandbox",
                id: req.sandbox_id.clone(),
            });
        }
        if !req.resources_json.is_empty() {
            let res: oci_spec::runtime::LinuxResources =
                serde_json::from_slice(&req.resources_json).map_err(|e| {
                    Error::spec(
                        "resources_json",
                        format!("not an OCI linux.resources object: {e}"),
                    )
                })?;
            self.cgroups.apply_pod(&res)?;
        }
        let dir = self.cfg.run_dir.join("s").join(&req.sandbox_id);
        let sb = Sandbox::create(
            &req.sandbox_id,
            dir,
            &req.hostname,
            &req.hosts,
            &req.resolv_conf,
        )?;
        let mut st = self.state();
        if st.sandboxes.contains_key(&req.sandbox_id) {
            drop(st);
            sb.destroy();
            return Err(Error::AlreadyExists {
                kind: "sandbox",
                id: req.sandbox_id.clone(),
            });
        }
        st.sandboxes.insert(req.sandbox_id.clone(), Arc::new(sb));
        Ok(())
    }

    pub fn destroy_sandbox(&self, id: &str) -> Result<()> {
        let sb = {
            let mut st = self.state();
            if st
                .containers
                .values()
                .any(|c| c.sandbox_id.as_deref() == Some(id))
            {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id:?} still has containers"
                )));
            }
            st.sandboxes.remove(id).ok_or_else(|| Error::NotFound {
                kind: "sandbox",
                id: id.to_string(),
            })?
        };
        sb.destroy();
        Ok(())
    }

    // Calls on a created or running container.

    pub fn signal_process(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
            .ok_or_else(|| Error::InvalidRequest(format!("signal {signal} is not a signal")))?;
        let c = self.container(id)?;
        if all {
            let pids = match &c.cgroup {
                Some(cg) => cgroup::pids(cg)?,
                None => vec![c.init.pid()],
            };
            for pid in pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            }
            return Ok(());
        }
        let p = c.process(exec_id)?;
        if p.is_reaped() {
            return Err(Error::NotFound {
                kind: "running process",
                id: format!("{id}/{exec_id} (already exited)"),
            });
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid()), sig)
            .map_err(|e| Error::errno(format!("kill({}, {sig})", p.pid()), e))
    }

    pub fn process_handle(&self, id: &str, exec_id: &str) -> Result<Arc<Proc>> {
        self.container(id)?.process(exec_id)
    }

    fn cgroup_of(&self, id: &str) -> Result<PathBuf> {
        self.container(id)?.cgroup.clone().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "container {id} has no cgroup (agent runs without one)"
            ))
        })
    }

    pub fn pause(&self, id: &str, frozen: bool) -> Result<()> {
        cgroup::set_frozen(&self.cgroup_of(id)?, frozen)
    }

    /// New limits for a running container, as OCI `linux.resources` JSON.
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let res: oci_spec::runtime::LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| {
                Error::spec("linux.resources", format!("not valid resources JSON: {e}"))
            })?;
        cgroup::update(&self.cgroup_of(id)?, &res)
    }

    pub fn stats(&self, id: &str) -> Result<StatsResponse> {
        Ok(cgroup::stats(&self.cgroup_of(id)?))
    }

    pub fn pids(&self, id: &str) -> Result<Vec<ProcessInfo>> {
        let c = self.container(id)?;
        let pids = match &c.cgroup {
            Some(cg) => cgroup::pids(cg)?,
            None if !c.init.is_reaped() => vec![c.init.pid()],
            None => vec![],
        };
        let execs: HashMap<i32, String> = c
            .execs()
            .iter()
            .map(|(k, p)| (p.pid(), k.clone()))
            .collect();
        Ok(pids
            .into_iter()
            .map(|pid| {
                let mut pi = ProcessInfo::new();
                pi.pid = pid as u32;
                pi.exec_id = execs.get(&pid).cloned().unwrap_or_default();
                pi
            })
            .collect())
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let p = self.process_handle(id, exec_id)?;
        if let Some(s) = p.io().stdin_ctl.take() {
            s.shutdown(std::net::Shutdown::Read)
                .map_err(|e| Error::io("closing stdin stream", e))?;
        }
        Ok(())
    }

    pub fn resize_tty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let p = self.process_handle(id, exec_id)?;
        let w =
            u16::try_from(width).map_err(|_| Error::InvalidRequest("width too large".into()))?;
        let h =
            u16::try_from(height).map_err(|_| Error::InvalidRequest("height too large".into()))?;
        match p.resize(w, h) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::FailedPrecondition(format!(
                "process {id}/{exec_id} has no terminal"
            ))),
            Err(e) => Err(Error::io("TIOCSWINSZ", e)),
        }
    }

    /// Kills and removes everything (agent shutdown in host mode).
    pub fn teardown(&self) {
        let ids: Vec<String> = self.state().containers.keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.remove_container(&id) {
                log::warn!("teardown: {e}");
            }
        }
        let sbs: Vec<String> = self.state().sandboxes.keys().cloned().collect();
        for id in sbs {
            let _ = self.destroy_sandbox(&id);
        }
        let pre: Vec<MountedRootfs> = self.state().premounted.drain().map(|(_, m)| m).collect();
        for mut m in pre {
            m.unmount();
        }
    }

    pub fn exit_info(&self, id: &str, exec_id: &str) -> Result<Option<ExitInfo>> {
        Ok(self.process_handle(id, exec_id)?.exit_info())
    }
}
