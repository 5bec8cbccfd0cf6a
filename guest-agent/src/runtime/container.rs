//! A container in the guest and its lifecycle: its rootfs mounted, its
//! init spawned (set up and waiting for start), execs added, processes
//! started and deleted, and the container removed with all it held.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thaw_agent_protocol::agent::{CreateContainerRequest, ExecProcessRequest, Rootfs, Stdio};

use super::process::{Proc, Status};
use super::rootfs::{self, MountedRootfs};
use super::sandbox::EtcFiles;
use super::spec::{self, ContainerSpec};
use super::stdio::{start_io, StdioSetup};
use super::undo::Undo;
use super::{cgroup, spawn, validate_id, Runtime};
use crate::error::{Error, Result};
use crate::plan::{Ns, Plan};
use crate::seccomp::Programs;

pub struct Container {
    pub id: String,
    pub sandbox_id: Option<String>,
    dir: PathBuf,
    /// Unmounted when taken out by RemoveContainer, or when the container
    /// is dropped.
    rootfs: Mutex<Option<MountedRootfs>>,
    pub cgroup: Option<PathBuf>,
    /// Namespace kinds an exec joins (through /proc/<init>/ns/).
    namespaces: Vec<Ns>,
    seccomp: Programs,
    pub init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
}

impl Container {
    pub(super) fn execs(&self) -> MutexGuard<'_, HashMap<String, Arc<Proc>>> {
        self.execs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The init (`exec_id` empty) or one of the execs.
    pub(super) fn process(&self, exec_id: &str) -> Result<Arc<Proc>> {
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

impl Runtime {
    /// Mounts a container's rootfs ahead of its creation (MountRootfs);
    /// the create that follows uses it.
    pub fn mount_rootfs(&self, id: &str, r: &Rootfs) -> Result<PathBuf> {
        validate_id("container id", id)?;
        {
            let mut st = self.state();
            if st.containers.contains_key(id)
                || st.reserved.contains(id)
                || st.premounted.contains_key(id)
            {
                return Err(Error::AlreadyExists {
                    kind: "container rootfs",
                    id: id.to_string(),
                });
            }
            // Reserved while mounting, so that a concurrent MountRootfs or
            // CreateContainer of the same id cannot mount on the same
            // directory (two owners of one set of mount points).
            st.reserved.insert(id.to_string());
        }
        let dir = self.cfg.run_dir.join("c").join(id);
        let mounted = fs::create_dir_all(&dir)
            .map_err(|e| Error::path("creating", &dir, e))
            .and_then(|()| {
                MountedRootfs::mount(&dir, r).inspect_err(|_| {
                    let _ = fs::remove_dir_all(&dir);
                })
            });
        let mut st = self.state();
        st.reserved.remove(id);
        let mounted = mounted?;
        let path = mounted.merged.clone();
        st.premounted.insert(id.to_string(), mounted);
        Ok(path)
    }

    /// Sets up a container and spawns its init, which waits for
    /// StartProcess; returns the init's pid.
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
        // The rootfs's one owner until the container takes it. Declared
        // after `undo`, so an error return drops it (which unmounts it)
        // before the undo steps above run.
        let mut mounted = premounted;

        let hostname = spec
            .hostname()
            .clone()
            .or_else(|| sandbox.as_ref().map(|s| s.hostname.clone()))
            .unwrap_or_default();
        let etc = match &sandbox {
            Some(sb) => sb.etc.clone(),
            None => EtcFiles::write(&dir.join("etc"), &hostname, "", "")?,
        }
        .with_overrides(&dir.join("etc"), &req.etc_files)?;
        let pod = spec::PodContext {
            sandbox: sandbox.as_deref(),
            sandbox_init_pid,
            is_sandbox_container: sandbox.as_ref().is_some_and(|sb| sb.id == id),
        };
        let mut cs = spec::translate_container(&spec, &pod, &etc, &dir.join("termination-log"))?;
        if let Some(path) = &cs.termination_log {
            create_termination_log(path)?;
        }

        if let Some(r) = req.rootfs.as_ref() {
            if mounted.is_some() {
                return Err(Error::InvalidRequest(format!(
                    "container {id}: rootfs given but one was already mounted by MountRootfs"
                )));
            }
            mounted = Some(MountedRootfs::mount(&dir, r)?);
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

        let (proc, pid, cgroup) = self.spawn_init(&id, &cs, req.stdio.as_ref())?;
        if let Some(cg) = &cgroup {
            self.oom.watch(&id, cg.clone());
        }
        let mut kinds: Vec<Ns> = cs.namespaces.new.clone();
        kinds.extend(cs.namespaces.join.iter().map(|(k, _)| *k));
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

    /// Creates the container's cgroup, wires its stdio and spawns its
    /// init; on an error the cgroup is removed again.
    fn spawn_init(
        &self,
        id: &str,
        cs: &ContainerSpec,
        ports: Option<&Stdio>,
    ) -> Result<(Arc<Proc>, i32, Option<PathBuf>)> {
        let mut undo = Undo::default();
        let cgroup = self.cgroups.create(id, cs.resources.as_ref())?;
        if let Some(cg) = cgroup.clone() {
            undo.push(move || {
                let _ = cgroup::remove(&cg);
            });
        }
        let stdio = StdioSetup::connect(&self.cfg.host, ports, cs.process.terminal, id)?;
        let plan = Plan {
            cgroup: cgroup.clone(),
            join_ns: cs.namespaces.join.clone(),
            new_ns: cs.namespaces.new.clone(),
            rootfs: Some(cs.rootfs.clone()),
            hostname: cs.hostname.clone(),
            process: cs.process.clone(),
        };
        let proc = Proc::new(id, "");
        if let Some(path) = &cs.termination_log {
            proc.set_termination_log(path.clone());
        }
        let pid = self.spawn_process(&proc, &plan, stdio, cs.console_size, true)?;
        undo.disarm();
        Ok((proc, pid, cgroup))
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
        let StdioSetup { child, ours } = stdio;
        let p2 = proc.clone();
        let events = self.events.clone();
        let oom = is_init.then(|| self.oom.clone());
        let pending = spawn::spawn(&self.reaper, plan, child, move |exit| {
            p2.on_exit(exit, events, oom)
        })?;
        let pid = pending.pid;
        proc.set_created(pid, pending.chan);
        if let Err(e) = start_io(proc, ours, pending.tty_master, console) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(e);
        }
        Ok(pid)
    }

    /// Spawns an exec process in a running container, waiting for
    /// StartProcess; returns its pid.
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
        let stdio = StdioSetup::connect(
            &self.cfg.host,
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

    /// Lets a created process exec its program.
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

    /// Forgets an exec process (one never started is killed first).
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

    /// Kills a container's processes and removes its cgroup, rootfs and
    /// directory.
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
        let rootfs = c.rootfs.lock().unwrap_or_else(|e| e.into_inner()).take();
        let device = rootfs.and_then(MountedRootfs::unmount_keeping_device);
        rootfs::unmount_below(&c.dir);
        if let Some(dev) = device {
            // An error keeps the host from refilling the disk slot.
            if let Err(e) = rootfs::wait_released(&dev) {
                errors.push(e.to_string());
            }
        }
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
}

/// An empty termination log any container user may write, as kubelet
/// makes the host's (mode 0666).
fn create_termination_log(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, b"").map_err(|e| Error::path("creating", path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o666))
        .map_err(|e| Error::path("setting the mode of", path, e))
}
