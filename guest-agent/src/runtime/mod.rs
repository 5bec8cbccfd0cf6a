//! The in-guest container runtime: sandboxes, containers and their
//! processes, driven by the ttrpc service.

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
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio as ChildFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::fcntl::OFlag;
use thaw_agent_protocol::agent::{
    CreateContainerRequest, CreateSandboxRequest, ExecProcessRequest, ProcessInfo, Rootfs,
    StatsResponse, Stdio,
};

use crate::error::{Error, Result};
use crate::host::{HostAddr, HostStream};
use crate::plan::{Ns, Plan};
use crate::reaper::Reaper;
use crate::seccomp::Programs;
use events::EventLog;
use oom::OomWatcher;
use process::{ExitInfo, Proc, Status};
use rootfs::MountedRootfs;
use sandbox::{EtcFiles, Sandbox};
use spawn::ChildStdio;

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

pub struct Container {
    pub id: String,
    pub sandbox_id: Option<String>,
    dir: PathBuf,
    rootfs: Mutex<Option<MountedRootfs>>,
    pub cgroup: Option<PathBuf>,
    /// Namespace kinds an exec joins (through /proc/<init>/ns/).
    namespaces: Vec<Ns>,
    seccomp: Programs,
    pub init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
}

impl Container {
    fn execs(&self) -> MutexGuard<'_, HashMap<String, Arc<Proc>>> {
        self.execs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn process(&self, exec_id: &str) -> Result<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind: "exec process",
                id: format!("{}/{exec_id}", self.id),
            })
    }
}

#[derive(Default)]
struct State {
    sandboxes: HashMap<String, Arc<Sandbox>>,
    containers: HashMap<String, Arc<Container>>,
    /// Ids whose creation is under way.
    reserved: HashSet<String>,
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

/// Runs the recorded undo steps (in reverse) unless disarmed.
#[derive(Default)]
struct Undo(Vec<Box<dyn FnOnce() + Send>>);

impl Undo {
    fn push(&mut self, f: impl FnOnce() + Send + 'static) {
        self.0.push(Box::new(f));
    }
    fn disarm(mut self) {
        self.0.clear();
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        while let Some(f) = self.0.pop() {
            f();
        }
    }
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

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::errno("pipe", e))
}

/// The host streams and child fds for one process.
struct StdioSetup {
    child: ChildStdio,
    terminal: bool,
    stdin: Option<(HostStream, Option<OwnedFd>)>,
    outputs: Vec<(String, Option<OwnedFd>, HostStream)>,
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

    fn dial(&self, port: u32, field: &str) -> Result<HostStream> {
        self.cfg.host.dial(port).map_err(|e| {
            Error::io(
                format!(
                    "stdio.{field} {port}: connecting to {}",
                    self.cfg.host.describe(port)
                ),
                e,
            )
        })
    }

    fn setup_stdio(&self, s: Option<&Stdio>, terminal: bool, name: &str) -> Result<StdioSetup> {
        let ports = s.cloned().unwrap_or_default();
        let mut setup = StdioSetup {
            child: ChildStdio {
                stdin: ChildFd::null(),
                stdout: ChildFd::null(),
                stderr: ChildFd::null(),
            },
            terminal,
            stdin: None,
            outputs: Vec::new(),
        };
        if ports.stdin_port != 0 {
            let stream = self.dial(ports.stdin_port, "stdin_port")?;
            if terminal {
                setup.stdin = Some((stream, None));
            } else {
                let (r, w) = pipe()?;
                setup.child.stdin = ChildFd::from(r);
                setup.stdin = Some((stream, Some(w)));
            }
        }
        if ports.stdout_port != 0 {
            let stream = self.dial(ports.stdout_port, "stdout_port")?;
            if terminal {
                setup.outputs.push((format!("{name}-tty"), None, stream));
            } else {
                let (r, w) = pipe()?;
                setup.child.stdout = ChildFd::from(w);
                setup
                    .outputs
                    .push((format!("{name}-stdout"), Some(r), stream));
            }
        }
        if ports.stderr_port != 0 && !terminal {
            let stream = self.dial(ports.stderr_port, "stderr_port")?;
            let (r, w) = pipe()?;
            setup.child.stderr = ChildFd::from(w);
            setup
                .outputs
                .push((format!("{name}-stderr"), Some(r), stream));
        }
        Ok(setup)
    }

    /// Starts the pumps of a freshly spawned process.
    fn start_io(
        proc: &Arc<Proc>,
        setup: StdioSetup,
        tty_master: Option<OwnedFd>,
        console: Option<(u16, u16)>,
    ) -> Result<()> {
        let (exit_r, exit_w) = stdio::exit_signal().map_err(|e| Error::io("pipe", e))?;
        let master = match (setup.terminal, tty_master) {
            (true, Some(m)) => Some(Arc::new(m)),
            (true, None) => return Err(Error::Setup("no tty master received".into())),
            (false, _) => None,
        };
        let dup = |m: &Arc<OwnedFd>| -> Result<OwnedFd> {
            m.try_clone().map_err(|e| Error::io("dup tty master", e))
        };
        let mut io = proc.io();
        io.exit_signal = Some(exit_w);
        io.tty_master = master.clone();
        for (name, src, dst) in setup.outputs {
            let src = match (src, &master) {
                (Some(fd), _) => fd,
                (None, Some(m)) => dup(m)?,
                (None, None) => continue,
            };
            let h = stdio::spawn_output(name, src, dst, exit_r.clone(), io.output_moved.clone())
                .map_err(|e| Error::io("starting output pump", e))?;
            io.outputs.push(h);
        }
        if let Some((stream, pipe_w)) = setup.stdin {
            let dst = match (pipe_w, &master) {
                (Some(fd), _) => Some(fd),
                (None, Some(m)) => Some(dup(m)?),
                (None, None) => None,
            };
            if let Some(dst) = dst {
                io.stdin_ctl = stream.try_clone().ok();
                let h = stdio::spawn_input(format!("{}-stdin", proc.container_id), stream, dst)
                    .map_err(|e| Error::io("starting input pump", e))?;
                io.inputs.push(h);
            }
        }
        drop(io);
        if let Some((rows, cols)) = console {
            let _ = proc.resize(cols, rows);
        }
        Ok(())
    }

    pub fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<()> {
        validate_id("sandbox id", &req.sandbox_id)?;
        if self.state().sandboxes.contains_key(&req.sandbox_id) {
            return Err(Error::AlreadyExists {
                kind: "sandbox",
                id: req.sandbox_id.clone(),
            });
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

    pub fn mount_rootfs(&self, id: &str, r: &Rootfs) -> Result<PathBuf> {
        validate_id("container id", id)?;
        {
            let st = self.state();
            if st.containers.contains_key(id)
                || st.reserved.contains(id)
                || st.premounted.contains_key(id)
            {
                return Err(Error::AlreadyExists {
                    kind: "container rootfs",
                    id: id.to_string(),
                });
            }
        }
        let dir = self.cfg.run_dir.join("c").join(id);
        fs::create_dir_all(&dir).map_err(|e| Error::path("creating", &dir, e))?;
        let mounted = MountedRootfs::mount(&dir, r).inspect_err(|_| {
            let _ = fs::remove_dir_all(&dir);
        })?;
        let path = mounted.merged.clone();
        self.state().premounted.insert(id.to_string(), mounted);
        Ok(path)
    }

    pub fn create_container(&self, req: &CreateContainerRequest) -> Result<u32> {
        let id = req.container_id.clone();
        validate_id("container id", &id)?;
        let spec = spec::parse_spec(&req.spec_json)?;
        let mut undo = Undo::default();

        let (sandbox, sandbox_init_pid, premounted) = {
            let mut st = self.state();
            if st.containers.contains_key(&id) || st.reserved.contains(&id) {
                return Err(Error::AlreadyExists {
                    kind: "container",
                    id,
                });
            }
            let sandbox =
                if req.sandbox_id.is_empty() {
                    None
                } else {
                    Some(st.sandboxes.get(&req.sandbox_id).cloned().ok_or_else(|| {
                        Error::NotFound {
                            kind: "sandbox",
                            id: req.sandbox_id.clone(),
                        }
                    })?)
                };
            let init_pid = sandbox.as_ref().and_then(|sb| {
                st.containers
                    .get(&sb.id)
                    .filter(|c| c.init.exit_info().is_none() && !c.init.is_reaped())
                    .map(|c| c.init.pid())
            });
            st.reserved.insert(id.clone());
            (sandbox, init_pid, st.premounted.remove(&id))
        };
        {
            let state = self.state.clone();
            let id2 = id.clone();
            undo.push(move || {
                state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .reserved
                    .remove(&id2);
            });
        }

        let dir = self.cfg.run_dir.join("c").join(&id);
        fs::create_dir_all(&dir).map_err(|e| Error::path("creating", &dir, e))?;
        {
            let dir = dir.clone();
            undo.push(move || {
                rootfs::unmount_below(&dir);
                let _ = fs::remove_dir_all(&dir);
            });
        }
        let mut mounted = premounted;
        if let Some(m) = mounted.clone() {
            undo.push(move || {
                let mut m = m;
                m.unmount();
            });
        }

        let hostname = spec
            .hostname()
            .clone()
            .or_else(|| sandbox.as_ref().map(|s| s.hostname.clone()))
            .unwrap_or_default();
        let etc = match &sandbox {
            Some(sb) => sb.etc.clone(),
            None => EtcFiles::write(&dir.join("etc"), &hostname, "", "")?,
        };
        let pod = spec::PodContext {
            sandbox: sandbox.as_deref(),
            sandbox_init_pid,
        };
        let mut cs = spec::translate_container(&spec, &pod, &etc)?;

        if let Some(r) = req.rootfs.as_ref() {
            if mounted.is_some() {
                return Err(Error::InvalidRequest(format!(
                    "container {id}: rootfs given but one was already mounted by MountRootfs"
                )));
            }
            let m = MountedRootfs::mount(&dir, r)?;
            let m2 = m.clone();
            undo.push(move || {
                let mut m = m2;
                m.unmount();
            });
            mounted = Some(m);
        }
        cs.rootfs.path = match &mounted {
            Some(m) => m.merged.clone(),
            None => {
                let p = cs.root_path.clone().unwrap_or_default();
                if !p.is_absolute() || !p.is_dir() {
                    return Err(Error::spec(
                        "root.path",
                        format!(
                            "{} is not an existing absolute directory in the guest, and no rootfs was given",
                            p.display()
                        ),
                    ));
                }
                p
            }
        };

        let cgroup = self.cgroups.create(&id, cs.resources.as_ref())?;
        if let Some(cg) = cgroup.clone() {
            undo.push(move || {
                let _ = cgroup::remove(&cg);
            });
        }

        let stdio = self.setup_stdio(req.stdio.as_ref(), cs.process.terminal, &id)?;
        let mut kinds: Vec<Ns> = cs.namespaces.new.clone();
        kinds.extend(cs.namespaces.join.iter().map(|(k, _)| *k));
        let plan = Plan {
            cgroup: cgroup.clone(),
            join_ns: cs.namespaces.join.clone(),
            new_ns: cs.namespaces.new.clone(),
            rootfs: Some(cs.rootfs.clone()),
            hostname: cs.hostname.clone(),
            process: cs.process.clone(),
        };
        let proc = Proc::new(&id, "");
        let pid = self.spawn_process(&proc, &plan, stdio, cs.console_size, true)?;
        undo.push(move || {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        });
        if let Some(cg) = &cgroup {
            self.oom.watch(&id, cg.clone());
        }

        let container = Arc::new(Container {
            id: id.clone(),
            sandbox_id: sandbox.map(|s| s.id.clone()),
            dir,
            rootfs: Mutex::new(mounted),
            cgroup,
            namespaces: kinds,
            seccomp: cs.seccomp,
            init: proc,
            execs: Mutex::new(HashMap::new()),
        });
        {
            let mut st = self.state();
            st.reserved.remove(&id);
            st.containers.insert(id, container);
        }
        undo.disarm();
        Ok(pid as u32)
    }

    /// Spawns the helper for `proc` and wires its stdio.
    fn spawn_process(
        &self,
        proc: &Arc<Proc>,
        plan: &Plan,
        stdio: StdioSetup,
        console: Option<(u16, u16)>,
        is_init: bool,
    ) -> Result<i32> {
        let StdioSetup {
            child,
            terminal,
            stdin,
            outputs,
        } = stdio;
        let p2 = proc.clone();
        let events = self.events.clone();
        let oom = is_init.then(|| self.oom.clone());
        let pending = spawn::spawn(&self.reaper, plan, child, move |exit| {
            p2.on_exit(exit, events, oom)
        })?;
        let pid = pending.pid;
        proc.set_created(pid, pending.chan);
        let setup = StdioSetup {
            child: ChildStdio {
                stdin: ChildFd::null(),
                stdout: ChildFd::null(),
                stderr: ChildFd::null(),
            },
            terminal,
            stdin,
            outputs,
        };
        if let Err(e) = Self::start_io(proc, setup, pending.tty_master, console) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(e);
        }
        Ok(pid)
    }

    pub fn exec_process(&self, req: &ExecProcessRequest) -> Result<u32> {
        validate_id("exec id", &req.exec_id)?;
        let c = self.container(&req.container_id)?;
        match &*c.init.status() {
            Status::Running => {}
            Status::Created(_) => {
                return Err(Error::FailedPrecondition(format!(
                    "container {} is not started",
                    c.id
                )))
            }
            Status::Exited(_) => {
                return Err(Error::FailedPrecondition(format!(
                    "container {} has exited",
                    c.id
                )))
            }
        }
        if c.init.is_reaped() {
            return Err(Error::FailedPrecondition(format!(
                "container {} has exited",
                c.id
            )));
        }
        if c.execs().contains_key(&req.exec_id) {
            return Err(Error::AlreadyExists {
                kind: "exec process",
                id: format!("{}/{}", c.id, req.exec_id),
            });
        }
        let process = spec::parse_process(&req.process_json)?;
        let (mut pp, console) = spec::translate_process(&process, "process")?;
        pp.seccomp = c.seccomp.clone();
        let init_pid = c.init.pid();
        let plan = Plan {
            cgroup: c.cgroup.clone(),
            join_ns: c
                .namespaces
                .iter()
                .map(|ns| {
                    (
                        *ns,
                        PathBuf::from(format!("/proc/{init_pid}/ns/{}", ns.proc_name())),
                    )
                })
                .collect(),
            new_ns: Vec::new(),
            rootfs: None,
            hostname: None,
            process: pp,
        };
        let stdio = self.setup_stdio(
            req.stdio.as_ref(),
            plan.process.terminal,
            &format!("{}-{}", c.id, req.exec_id),
        )?;
        let proc = Proc::new(&c.id, &req.exec_id);
        {
            // Reserve the exec id while spawning.
            let mut execs = c.execs();
            if execs.contains_key(&req.exec_id) {
                return Err(Error::AlreadyExists {
                    kind: "exec process",
                    id: format!("{}/{}", c.id, req.exec_id),
                });
            }
            execs.insert(req.exec_id.clone(), proc.clone());
        }
        match self.spawn_process(&proc, &plan, stdio, console, false) {
            Ok(pid) => Ok(pid as u32),
            Err(e) => {
                c.execs().remove(&req.exec_id);
                Err(e)
            }
        }
    }

    pub fn start_process(&self, id: &str, exec_id: &str) -> Result<u32> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        let chan = {
            let mut st = p.status();
            match std::mem::replace(&mut *st, Status::Running) {
                Status::Created(chan) => chan,
                other => {
                    let msg = match &other {
                        Status::Exited(_) => "has exited",
                        _ => "is already started",
                    };
                    *st = other;
                    return Err(Error::FailedPrecondition(format!(
                        "process {id}/{exec_id} {msg}"
                    )));
                }
            }
        };
        spawn::start(chan)?;
        Ok(p.pid() as u32)
    }

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

    pub fn delete_process(&self, id: &str, exec_id: &str) -> Result<()> {
        if exec_id.is_empty() {
            return Err(Error::InvalidRequest(
                "DeleteProcess is for exec processes; use RemoveContainer".into(),
            ));
        }
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        if p.exit_info().is_none() {
            if matches!(&*p.status(), Status::Running) {
                return Err(Error::FailedPrecondition(format!(
                    "process {id}/{exec_id} is still running"
                )));
            }
            // Created but never started: it is waiting on its channel.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.pid()),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        c.execs().remove(exec_id);
        Ok(())
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        let c = {
            let mut st = self.state();
            st.containers.remove(id).ok_or_else(|| Error::NotFound {
                kind: "container",
                id: id.to_string(),
            })?
        };
        self.oom.unwatch(id);
        let mut errors = Vec::new();
        let procs: Vec<Arc<Proc>> = std::iter::once(c.init.clone())
            .chain(c.execs().values().cloned())
            .collect();
        if let Some(cg) = &c.cgroup {
            if let Err(e) = cgroup::remove(cg) {
                errors.push(e.to_string());
            }
        }
        for p in &procs {
            if !p.is_reaped() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p.pid()),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for p in &procs {
            if p.wait_blocking(Duration::from_secs(10)).is_none() {
                errors.push(format!("pid {} did not exit after SIGKILL", p.pid()));
            }
        }
        if let Some(mut m) = c.rootfs.lock().unwrap_or_else(|e| e.into_inner()).take() {
            m.unmount();
        }
        rootfs::unmount_below(&c.dir);
        if let Err(e) = fs::remove_dir_all(&c.dir) {
            errors.push(format!("removing {}: {e}", c.dir.display()));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Internal(format!(
                "container {id} removed with errors: {}",
                errors.join("; ")
            )))
        }
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
