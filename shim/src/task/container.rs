//! A container: its init and exec processes, its rootfs image and the disk
//! slot that image is attached to; and the steps that create it (rootfs
//! image, disk, agent, stdio, undone on failure), add execs to it and
//! delete it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_shim::api;
use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;
use containerd_shim::protos::types::task::Status;
use thaw_agent_protocol::agent as proto;

use super::process::{now, ProcState, Process};
use super::undo::Undo;
use super::{lock, DeletedInit, Tasks};
use crate::error::{Error, Result};
use crate::hooks::{HookState, Hooks, Stage};
use crate::image_cache::{ImageCache, ImageRef};
use crate::record::ContainerRecord;
use crate::rootfs;
use crate::sandbox::{Attached, Sandbox};
use crate::spec::{self, PodRole};
use crate::stdio::{self, StdioPaths};
use thaw_config::Config;

/// How long the agent has to dial the stdio streams it was given.
const STDIO_CONNECT: Duration = Duration::from_secs(20);

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    role: PodRole,
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    image: Mutex<Option<ImageRef>>,
    attached: Mutex<Option<Attached>>,
    /// The spec's OCI hooks, run on the host (see [`crate::hooks`]).
    hooks: Hooks,
    oci_version: String,
    annotations: HashMap<String, String>,
    /// Held by the delete of the init: containerd retries a delete that
    /// outlives its 10 s event timeout while the first still runs, and the
    /// second must not repeat the guest-side removal.
    deleting: Mutex<()>,
}

impl Container {
    /// Runs the container's hooks of `stage`, with the sandbox process's
    /// pid in the state.
    pub fn run_hooks(&self, stage: Stage, pid: u32) -> Result<()> {
        self.hooks.run(stage, &self.hook_state(pid))
    }

    /// [`Container::run_hooks`] for the stages whose failure is only logged.
    pub fn run_hooks_logged(&self, stage: Stage, pid: u32) {
        self.hooks.run_logged(stage, &self.hook_state(pid));
    }

    fn hook_state(&self, pid: u32) -> HookState<'_> {
        HookState {
            oci_version: &self.oci_version,
            id: &self.id,
            pid,
            bundle: &self.bundle,
            annotations: &self.annotations,
        }
    }

    /// The init (`exec_id` empty) or one of the execs.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} in container {}", self.id)))
    }

    pub fn all_processes(&self) -> Vec<Arc<Process>> {
        let mut v = vec![self.init.clone()];
        v.extend(lock(&self.execs).values().cloned());
        v
    }
}

fn image_cache(cfg: &Config) -> ImageCache {
    ImageCache::new(
        &cfg.state_dir,
        cfg.image_cache.keep_unused_mib,
        &cfg.image_cache.mkfs_erofs,
    )
}

impl Tasks {
    /// Creates a container (starting the sandbox for the first one) and
    /// returns its init's pid. `config_path` is the config file the
    /// runtime options name, if any.
    pub fn create(
        self: &Arc<Self>,
        req: &api::CreateTaskRequest,
        config_path: Option<&Path>,
    ) -> Result<u32> {
        let id = req.id.clone();
        if id.is_empty() || id.contains('/') {
            return Err(Error::InvalidArgument(format!("bad container id {id:?}")));
        }
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented(
                "restoring a task from a checkpoint is not supported by thaw".into(),
            ));
        }
        self.creates.fetch_add(1, Ordering::SeqCst);
        {
            let containers = lock(&self.containers);
            let mut creating = lock(&self.creating);
            if containers.contains_key(&id) || creating.contains_key(&id) {
                return Err(Error::AlreadyExists(format!("container {id}")));
            }
            creating.insert(id.clone(), false);
        }
        let result = self.create_registered(req, config_path);
        lock(&self.creating).remove(&id);
        // A Shutdown that came meanwhile waited for this create.
        self.shutdown_if_asked();
        result
    }

    /// [`Tasks::create`] once `req.id` is listed as under way.
    fn create_registered(
        self: &Arc<Self>,
        req: &api::CreateTaskRequest,
        config_path: Option<&Path>,
    ) -> Result<u32> {
        let id = req.id.clone();
        let bundle = PathBuf::from(&req.bundle);
        let bundle_spec = spec::load(&bundle)?;
        let role = spec::pod_role(&bundle_spec.annotations, &id);
        // Only one container per shim unless it is a pod.
        if !lock(&self.containers).is_empty() && role == PodRole::Standalone {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not part of this shim's pod"
            )));
        }
        let (sb, cfg, started_here) = self.ensure_sandbox(&id, config_path, &bundle_spec, &role)?;
        let mut undo = Undo::default();
        if started_here {
            let (me, sb2) = (self.clone(), sb.clone());
            undo.push(move || {
                sb2.stop();
                lock(&me.sandbox).take();
            });
        }
        let result = self.create_in(
            req,
            &bundle,
            &bundle_spec,
            role,
            &sb,
            &cfg,
            started_here,
            &mut undo,
        );
        match result {
            Ok(pid) => {
                undo.forget();
                Ok(pid)
            }
            Err(e) => {
                log::error!("create {id}: {e}");
                undo.run();
                Err(e)
            }
        }
    }

    /// The steps of a create once the sandbox runs; each pushes its undo.
    #[allow(clippy::too_many_arguments)]
    fn create_in(
        self: &Arc<Self>,
        req: &api::CreateTaskRequest,
        bundle: &Path,
        bundle_spec: &spec::BundleSpec,
        role: PodRole,
        sb: &Arc<Sandbox>,
        cfg: &Config,
        started_here: bool,
        undo: &mut Undo,
    ) -> Result<u32> {
        let id = req.id.clone();
        let agent = sb.agent();
        if started_here {
            if let PodRole::Sandbox { sandbox_id } = &role {
                let files = spec::pod_etc_files(bundle_spec)?;
                let mut r = proto::CreateSandboxRequest::new();
                r.sandbox_id = sandbox_id.clone();
                r.hostname = files.hostname;
                r.hosts = files.hosts;
                r.resolv_conf = files.resolv_conf;
                r.resources_json = spec::pod_resources_json(&bundle_spec.annotations)?;
                agent.create_sandbox(&r)?;
            }
        }

        // Rootfs: Mount list -> cached erofs image -> guest disk.
        let src =
            rootfs::source_from_mounts(&req.rootfs, bundle, bundle_spec.root_path.as_deref())?;
        let cache = image_cache(cfg);
        let owner = format!("{}/{id}", self.namespace);
        let (image, outcome) = cache.acquire(&src, &self.namespace, &owner)?;
        log::info!("{id}: rootfs image {} ({outcome:?})", image.key);
        {
            let (cache, image) = (cache.clone(), image.clone());
            undo.push(move || {
                if let Err(e) = cache.release(&image) {
                    log::warn!("releasing image {}: {e}", image.key);
                }
            });
        }
        let record = ContainerRecord {
            namespace: self.namespace.clone(),
            id: id.clone(),
            shim_pid: std::process::id(),
            sandbox_dir: sb.dir.clone(),
            sandbox_pid: sb.pid(),
            sandbox_cgroup: sb.cgroup.clone(),
            vmm_cgroups: sb.vmm_cgroups.clone(),
            pod_netns: sb.joined_netns(),
            image: Some(image.clone()),
        };
        record.write(bundle)?;
        {
            let b = bundle.to_path_buf();
            undo.push(move || ContainerRecord::remove(&b));
        }
        let (rootfs, attached) = sb.attach(&image.path)?;
        let attached = Arc::new(Mutex::new(Some(attached)));
        {
            let (sb, a) = (sb.clone(), attached.clone());
            undo.push(move || {
                if let Some(a) = lock(&a).take() {
                    sb.detach(&a);
                }
            });
        }

        let hooks = Hooks::from_spec(&bundle_spec.json)?;
        let oci_version = bundle_spec
            .json
            .get("ociVersion")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("1.0.2")
            .to_string();
        hooks.run(
            Stage::Create,
            &HookState {
                oci_version: &oci_version,
                id: &id,
                pid: sb.pid(),
                bundle,
                annotations: &bundle_spec.annotations,
            },
        )?;
        let exposed = sb.expose_host_mounts(&id, &bundle_spec.json)?;
        {
            let (sb, id) = (sb.clone(), id.clone());
            undo.push(move || sb.withdraw_host_mounts(&id));
        }
        let spec_json = sb.adapt_spec(&exposed)?;
        let stdio_paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let pending = stdio::prepare(&stdio_paths, sb.uds(), || sb.next_port())?;
        let mut creq = proto::CreateContainerRequest::new();
        creq.container_id = id.clone();
        creq.sandbox_id = role.agent_sandbox_id().to_string();
        creq.spec_json = serde_json::to_vec(&spec_json)
            .map_err(|e| Error::InvalidSpec(format!("encoding the spec: {e}")))?;
        creq.rootfs = MessageField::some(rootfs);
        creq.stdio = MessageField::some(pending.ports());
        creq.etc_files = spec::etc_files_from_binds(&bundle_spec.json)?
            .into_iter()
            .map(|(name, content)| proto::EtcFile {
                name,
                content,
                ..Default::default()
            })
            .collect();
        let guest_pid = agent.create_container(&creq)?;
        let pid = sb.task_pid(guest_pid);
        log::debug!("{id}: init is pid {guest_pid} in the sandbox, {pid} for containerd");
        {
            let (sb, id, a) = (sb.clone(), id.clone(), attached.clone());
            undo.push(move || {
                if !sb.is_dead() {
                    if let Err(e) = sb.agent().remove_container(&id) {
                        log::warn!(
                            "removing half-created container {id}: {e}; its disk slot stays reserved"
                        );
                        // The detach below then finds nothing to free.
                        lock(&a).take();
                    }
                }
            });
        }
        if let Some(a) = lock(&attached).as_ref() {
            sb.mounted(a);
        }
        let bridges = pending.connect(STDIO_CONNECT)?;
        let init = Process::new(&id, "", stdio_paths.clone(), pid, bridges);
        if let Some(path) = spec::termination_log_from_binds(&bundle_spec.json) {
            let _ = init.termination_log.set(path);
        }
        let c = Arc::new(Container {
            id: id.clone(),
            bundle: bundle.to_path_buf(),
            role,
            init,
            execs: Mutex::new(HashMap::new()),
            image: Mutex::new(Some(image)),
            attached: Mutex::new(lock(&attached).take()),
            hooks,
            oci_version,
            annotations: bundle_spec.annotations.clone(),
            deleting: Mutex::new(()),
        });
        {
            let mut containers = lock(&self.containers);
            if lock(&self.creating).get(&id) == Some(&true) {
                drop(containers);
                c.init.stop_bridges();
                return Err(Error::NotFound(format!(
                    "container {id}: containerd deleted it while it was being created"
                )));
            }
            containers.insert(id.clone(), c);
        }
        self.events.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            ev::TaskCreate {
                container_id: id,
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(ev::TaskIO {
                    stdin: stdio_paths.stdin,
                    stdout: stdio_paths.stdout,
                    stderr: stdio_paths.stderr,
                    terminal: stdio_paths.terminal,
                    ..Default::default()
                }),
                checkpoint: String::new(),
                pid,
                ..Default::default()
            },
        );
        Ok(pid)
    }

    /// Adds an exec process (created, not started) to a running container.
    pub fn exec(&self, req: &api::ExecProcessRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        if req.exec_id.is_empty() {
            return Err(Error::InvalidArgument("exec id is empty".into()));
        }
        if lock(&c.execs).contains_key(&req.exec_id) {
            return Err(Error::AlreadyExists(format!(
                "exec {} in {}",
                req.exec_id, req.id
            )));
        }
        if c.init.state().status != Status::RUNNING {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                req.id
            )));
        }
        let sb = self.running_sandbox()?;
        let process: serde_json::Value = req
            .spec
            .as_ref()
            .map(|a| serde_json::from_slice(&a.value))
            .transpose()
            .map_err(|e| Error::InvalidSpec(format!("exec process spec: {e}")))?
            .ok_or_else(|| Error::InvalidSpec("exec without a process spec".into()))?;
        spec::check_process(&process, "exec process")?;
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let pending = stdio::prepare(&paths, sb.uds(), || sb.next_port())?;
        let mut r = proto::ExecProcessRequest::new();
        r.container_id = req.id.clone();
        r.exec_id = req.exec_id.clone();
        r.process_json = serde_json::to_vec(&process)
            .map_err(|e| Error::InvalidSpec(format!("encoding the exec spec: {e}")))?;
        r.stdio = MessageField::some(pending.ports());
        let pid = sb.task_pid(sb.agent().exec_process(&r)?);
        let bridges = match pending.connect(STDIO_CONNECT) {
            Ok(b) => b,
            Err(e) => {
                let _ = sb.agent().delete_process(&req.id, &req.exec_id);
                return Err(e);
            }
        };
        let p = Process::new(&req.id, &req.exec_id, paths, pid, bridges);
        lock(&c.execs).insert(req.exec_id.clone(), p);
        self.events.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            ev::TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            },
        );
        Ok(())
    }

    /// Deletes a stopped exec, or a container with its init stopped (its
    /// guest side, disk slot, image reference and record go with it).
    /// Returns the process's final state, `exited_at` always set.
    pub fn delete(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<ProcState> {
        let found = if exec_id.is_empty() {
            self.container_or_abandon(id)
        } else {
            self.container(id)
        };
        let c = match found {
            // containerd's retry of a delete it gave up waiting for.
            Err(Error::NotFound(_)) if exec_id.is_empty() => {
                return self.deleted_init(id).map(|init| init.state);
            }
            r => r?,
        };
        let p = c.process(exec_id)?;
        let mut st = p.state();
        if st.status == Status::RUNNING || st.status == Status::PAUSED {
            return Err(Error::FailedPrecondition(format!(
                "process {id}{}{exec_id} is still running; kill it first",
                if exec_id.is_empty() { "" } else { "/" }
            )));
        }
        let sb = self.live_sandbox();
        if !exec_id.is_empty() {
            if let Some(sb) = &sb {
                if let Err(e) = sb.agent().delete_process(id, exec_id) {
                    log::warn!("agent delete of {id}/{exec_id}: {e}");
                }
            }
            p.stop_bridges();
            lock(&c.execs).remove(exec_id);
            st.exited_at = Some(st.exited_at.unwrap_or_else(now));
            return Ok(st);
        }

        // The init: the container goes, once.
        let _one_delete = lock(&c.deleting);
        if !self.is_current(&c) {
            // A retry that waited for the first delete gets its answer.
            return self
                .deleted_init(id)
                .map(|init| init.state)
                .map_err(|_| Error::NotFound(format!("container {id} (deleted meanwhile)")));
        }
        let mut removed_in_guest = sb.is_none();
        if let Some(sb) = &sb {
            match sb.agent().remove_container(id) {
                Ok(()) => removed_in_guest = true,
                Err(e) => log::error!("agent remove of {id}: {e}; its disk slot stays reserved"),
            }
        }
        for proc_ in c.all_processes() {
            // Execs still running died with the container; their exit
            // events may not have arrived yet.
            if !proc_.exited() {
                proc_.stop_bridges();
                proc_.publish_exit(128 + libc::SIGKILL as u32, now(), &self.events);
            }
            proc_.stop_bridges();
        }
        if let Some(a) = lock(&c.attached).take() {
            // A slot the guest may still use stays reserved.
            if let (Some(sb), true) = (&sb, removed_in_guest) {
                sb.detach(&a);
            }
        }
        if let Some(image) = lock(&c.image).take() {
            let cfg = lock(&self.config).clone().unwrap_or_default();
            if let Err(e) = image_cache(&cfg).release(&image) {
                log::warn!("releasing image {}: {e}", image.key);
            }
        }
        if let Some(sb) = &sb {
            sb.withdraw_host_mounts(id);
        }
        c.run_hooks_logged(Stage::Poststop, st.pid);
        ContainerRecord::remove(&c.bundle);
        if let (PodRole::Sandbox { sandbox_id }, Some(sb)) = (&c.role, &sb) {
            if let Err(e) = sb.agent().destroy_sandbox(sandbox_id) {
                log::debug!("agent destroy of sandbox {sandbox_id}: {e}");
            }
        }
        let exited_at = st.exited_at.clone().unwrap_or_else(now);
        st.exited_at = Some(exited_at.clone());
        self.remember_deleted(
            id,
            DeletedInit {
                bundle: c.bundle.clone(),
                state: st.clone(),
            },
        );
        lock(&self.containers).remove(id);
        self.events.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            ev::TaskDelete {
                container_id: id.into(),
                pid: st.pid,
                exit_status: st.exit_status,
                exited_at: MessageField::some(exited_at),
                id: id.into(),
                ..Default::default()
            },
        );
        // After the event: shutting down closes the event queue.
        self.shutdown_if_asked();
        self.exit_if_left_empty();
        Ok(st)
    }
}
