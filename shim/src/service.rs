//! containerd's Task API (v2) for thaw: every method is answered; what thaw
//! does not support says so with UNIMPLEMENTED and a reason.
//!
//! One shim serves one sandbox (a VM): a plain container, or a CRI pod's
//! sandbox container plus the app containers that join it. The sandbox is
//! started by the first `create` and stopped by `shutdown` once the last
//! container is gone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim::api;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{CodedInputStream, MessageField};
use containerd_shim::protos::shim::oci::ProcessDetails;
use containerd_shim::protos::topics;
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::{ExitSignal, Task, TtrpcContext, TtrpcResult};
use thaw_agent_protocol::agent as proto;

use crate::config::{BackendKind, Config};
use crate::error::{Error, Result};
use crate::events::Events;
use crate::image_cache::{ImageCache, ImageRef};
use crate::record::ContainerRecord;
use crate::rootfs;
use crate::sandbox::{Attached, Sandbox};
use crate::spec::{self, PodRole};
use crate::stdio::{self, Bridges, StdioPaths};

/// Exit status of processes whose sandbox died under them.
pub const SANDBOX_DIED_STATUS: u32 = 255;
/// An exit is published once the process's output reached EOF. It waits
/// as long as the output keeps moving, so a slow host loses nothing; after
/// this long without a byte moved (the client stopped reading, or the guest
/// holds a stream open without writing) it is published anyway. The agent
/// sends after an exit only what the process left in its pipes.
const OUTPUT_IDLE: Duration = Duration::from_secs(30);
/// How long the agent has to dial the stdio streams it was given.
const STDIO_CONNECT: Duration = Duration::from_secs(20);
/// Long-poll window for agent events.
const EVENT_POLL: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

fn ts_from_ns(ns: i64) -> Timestamp {
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
struct ProcState {
    status: Status,
    pid: u32,
    exit_status: u32,
    exited_at: Option<Timestamp>,
}

/// A container's init or exec process as containerd sees it.
struct Process {
    container_id: String,
    exec_id: String,
    stdio: StdioPaths,
    st: Mutex<ProcState>,
    cond: Condvar,
    bridges: Mutex<Option<Bridges>>,
    /// Set by the first exit report: one waiter per process, however often
    /// (or falsely) the guest reports it.
    exit_seen: AtomicBool,
}

impl Process {
    fn new(
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
        })
    }

    fn state(&self) -> ProcState {
        lock(&self.st).clone()
    }

    fn exited(&self) -> bool {
        lock(&self.st).status == Status::STOPPED
    }

    fn stop_bridges(&self) {
        if let Some(b) = lock(&self.bridges).take() {
            b.stop();
        }
    }
}

struct Container {
    id: String,
    bundle: PathBuf,
    role: PodRole,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    image: Mutex<Option<ImageRef>>,
    attached: Mutex<Option<Attached>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} in container {}", self.id)))
    }

    fn all_processes(&self) -> Vec<Arc<Process>> {
        let mut v = vec![self.init.clone()];
        v.extend(lock(&self.execs).values().cloned());
        v
    }
}

struct Inner {
    namespace: String,
    exit: Arc<ExitSignal>,
    events: Events,
    /// Serializes sandbox start so two creates cannot boot two VMs.
    starting: Mutex<()>,
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    config: Mutex<Option<Config>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    shutting_down: AtomicBool,
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

/// `runtimeoptions.v1.Options` (containerd's generic runtime options, as
/// `ctr run --runtime-config-path` and CRI's `options.ConfigPath` send
/// them): field 2 is `config_path`. Decoded by hand since the message is
/// not part of containerd-shim-protos.
fn config_path_from_options(opts: &MessageField<Any>) -> Option<PathBuf> {
    let any = opts.as_ref()?;
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut is = CodedInputStream::from_bytes(&any.value);
    let mut path = None;
    while let Ok(Some(tag)) = is.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 2 && wire == 2 {
            path = is.read_string().ok();
        } else if is
            .skip_field(containerd_shim::protos::protobuf::rt::WireType::new(wire)?)
            .is_err()
        {
            break;
        }
    }
    path.filter(|p| !p.is_empty()).map(PathBuf::from)
}

impl Service {
    pub fn new(namespace: &str, exit: Arc<ExitSignal>, events: Events) -> Service {
        Service {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                exit,
                events,
                starting: Mutex::new(()),
                sandbox: Mutex::new(None),
                config: Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    /// Pause (freeze) or resume a running container's processes: the same
    /// state check, agent call, state change and event either way.
    fn set_paused(&self, id: &str, pause: bool) -> Result<api::Empty> {
        let c = self.inner.container(id)?;
        let sb = self
            .inner
            .live_sandbox()
            .ok_or_else(|| Error::Sandbox("the sandbox is not running".into()))?;
        let mut st = lock(&c.init.st);
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
        let container_id = id.to_string();
        if pause {
            sb.agent().pause(id)?;
            st.status = to;
            self.inner.events.publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                ev::TaskPaused {
                    container_id,
                    ..Default::default()
                },
            );
        } else {
            sb.agent().resume(id)?;
            st.status = to;
            self.inner.events.publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                ev::TaskResumed {
                    container_id,
                    ..Default::default()
                },
            );
        }
        Ok(api::Empty::new())
    }
}

impl Inner {
    fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    /// The sandbox if it is alive, for calls that are moot otherwise.
    fn live_sandbox(&self) -> Option<Arc<Sandbox>> {
        lock(&self.sandbox).clone().filter(|s| !s.is_dead())
    }

    /// Returns the running sandbox, starting it for the first container.
    fn ensure_sandbox(
        self: &Arc<Self>,
        req: &api::CreateTaskRequest,
        bundle_spec: &spec::BundleSpec,
        role: &PodRole,
    ) -> Result<(Arc<Sandbox>, Config, bool)> {
        let _g = lock(&self.starting);
        if let Some(sb) = lock(&self.sandbox).clone() {
            if sb.is_dead() {
                return Err(Error::Sandbox(format!(
                    "sandbox {} has died; its shim accepts no new containers",
                    sb.id
                )));
            }
            let cfg = lock(&self.config).clone().unwrap_or_default();
            return Ok((sb, cfg, false));
        }
        if let PodRole::Member { sandbox_id } = role {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {sandbox_id} is not running in this shim; create it first"
            )));
        }
        let explicit = config_path_from_options(&req.options);
        let (cfg, path) = Config::load(explicit.as_deref())?;
        log::set_max_level(match cfg.log_level.as_str() {
            "error" => log::LevelFilter::Error,
            "warn" => log::LevelFilter::Warn,
            "debug" => log::LevelFilter::Debug,
            "trace" => log::LevelFilter::Trace,
            _ => log::LevelFilter::Info,
        });
        log::info!("config {} (backend {:?})", path.display(), cfg.backend);
        if cfg.backend == BackendKind::HostUnisolated {
            log::warn!("backend host-unisolated: containers are NOT isolated in a VM");
        }
        let vm = cfg.vm_for_pod(&bundle_spec.annotations)?;
        let grouping = role.grouping(&req.id).to_string();
        let sb = Arc::new(Sandbox::start(&cfg, &vm, &self.namespace, &grouping)?);
        let weak = Arc::downgrade(self);
        sb.on_death(move |why| {
            if let Some(inner) = weak.upgrade() {
                inner.sandbox_died(&why);
            }
        });
        *lock(&self.sandbox) = Some(sb.clone());
        *lock(&self.config) = Some(cfg.clone());
        start_event_loop(Arc::downgrade(self), sb.clone());
        Ok((sb, cfg, true))
    }

    /// Every process still running ends with status 255.
    fn sandbox_died(self: &Arc<Self>, why: &str) {
        log::error!("sandbox died, its tasks exit with {SANDBOX_DIED_STATUS}: {why}");
        let containers: Vec<_> = lock(&self.containers).values().cloned().collect();
        for c in containers {
            for p in c.all_processes() {
                self.process_exited(&p, SANDBOX_DIED_STATUS, now());
            }
        }
    }

    /// A process ended: its exit is published once its output has reached
    /// the client (see [`OUTPUT_IDLE`]), on a thread of its own so other
    /// processes' events are not held up meanwhile.
    fn process_exited(self: &Arc<Self>, p: &Arc<Process>, status: u32, at: Timestamp) {
        if p.exited() || p.exit_seen.swap(true, Ordering::SeqCst) {
            return;
        }
        let (me, p2, at2) = (self.clone(), p.clone(), at.clone());
        let waiter = move || {
            let drained = lock(&p2.bridges)
                .as_ref()
                .map(|b| b.wait_output(OUTPUT_IDLE))
                .unwrap_or(true);
            if !drained {
                log::warn!(
                    "{}/{}: output stalled for {OUTPUT_IDLE:?} after exit; reporting the exit anyway",
                    p2.container_id,
                    p2.exec_id
                );
            }
            me.publish_exit(&p2, status, at2);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("exit".into())
            .spawn(waiter)
        {
            log::warn!(
                "spawning the exit waiter: {e}; reporting the exit without waiting for output"
            );
            self.publish_exit(p, status, at);
        }
    }

    /// Records an exit once, wakes waiters and publishes TaskExit.
    fn publish_exit(&self, p: &Process, status: u32, at: Timestamp) {
        let mut st = lock(&p.st);
        if st.status == Status::STOPPED {
            return;
        }
        st.status = Status::STOPPED;
        st.exit_status = status;
        st.exited_at = Some(at.clone());
        let id = if p.exec_id.is_empty() {
            p.container_id.clone()
        } else {
            p.exec_id.clone()
        };
        self.events.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            ev::TaskExit {
                container_id: p.container_id.clone(),
                id,
                pid: st.pid,
                exit_status: status,
                exited_at: MessageField::some(at),
                ..Default::default()
            },
        );
        p.cond.notify_all();
    }

    fn find_process(&self, container_id: &str, exec_id: &str) -> Option<Arc<Process>> {
        let c = lock(&self.containers).get(container_id).cloned()?;
        c.process(exec_id).ok()
    }

    fn handle_agent_event(self: &Arc<Self>, e: &proto::Event) {
        match &e.kind {
            Some(proto::event::Kind::Exit(x)) => {
                let Some(p) = self.find_process(&x.container_id, &x.exec_id) else {
                    log::debug!("exit of unknown process {}/{}", x.container_id, x.exec_id);
                    return;
                };
                self.process_exited(&p, x.exit_status, ts_from_ns(x.exited_at_unix_ns));
            }
            Some(proto::event::Kind::Oom(o))
                if lock(&self.containers).contains_key(&o.container_id) =>
            {
                self.events.publish(
                    topics::TASK_OOM_EVENT_TOPIC,
                    ev::TaskOOM {
                        container_id: o.container_id.clone(),
                        ..Default::default()
                    },
                );
            }
            _ => {}
        }
    }

    /// Events were lost: ask the agent for each live process's exit.
    fn resync_exits(self: &Arc<Self>, sb: &Arc<Sandbox>) {
        let containers: Vec<_> = lock(&self.containers).values().cloned().collect();
        for c in containers {
            for p in c.all_processes() {
                let s = p.state().status;
                if s == Status::RUNNING || s == Status::PAUSED {
                    let (inner, sb) = (self.clone(), sb.clone());
                    let _ = std::thread::Builder::new()
                        .name("wait-fallback".into())
                        .spawn(move || {
                            if let Ok(r) = sb.agent().wait_process(&p.container_id, &p.exec_id) {
                                inner.process_exited(
                                    &p,
                                    r.exit_status,
                                    ts_from_ns(r.exited_at_unix_ns),
                                );
                            }
                        });
                }
            }
        }
    }

    fn create(self: &Arc<Self>, req: api::CreateTaskRequest) -> Result<u32> {
        let id = req.id.clone();
        if id.is_empty() || id.contains('/') {
            return Err(Error::InvalidArgument(format!("bad container id {id:?}")));
        }
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented(
                "restoring a task from a checkpoint is not supported by thaw".into(),
            ));
        }
        if lock(&self.containers).contains_key(&id) {
            return Err(Error::AlreadyExists(format!("container {id}")));
        }
        let bundle = PathBuf::from(&req.bundle);
        let bundle_spec = spec::load(&bundle)?;
        let role = spec::pod_role(&bundle_spec.annotations, &id);
        // Only one container per shim unless it is a pod.
        if !lock(&self.containers).is_empty() && role == PodRole::Standalone {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not part of this shim's pod"
            )));
        }
        let (sb, cfg, started_here) = self.ensure_sandbox(&req, &bundle_spec, &role)?;
        let mut undo = Undo::default();
        if started_here {
            let (me, sb2) = (self.clone(), sb.clone());
            undo.push(move || {
                sb2.stop();
                lock(&me.sandbox).take();
            });
        }
        let result = self.create_in(
            &req,
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
                let files = spec::pod_etc_files(&bundle_spec.json)?;
                let mut r = proto::CreateSandboxRequest::new();
                r.sandbox_id = sandbox_id.clone();
                r.hostname = bundle_spec.hostname.clone();
                r.hosts = files.hosts;
                r.resolv_conf = files.resolv_conf;
                agent.create_sandbox(&r)?;
            }
        }

        // Rootfs: Mount list -> cached erofs image -> guest disk.
        let src =
            rootfs::source_from_mounts(&req.rootfs, bundle, bundle_spec.root_path.as_deref())?;
        let cache = ImageCache::new(
            &cfg.state_dir,
            cfg.image_cache.keep_unused_mib,
            &cfg.image_cache.mkfs_erofs,
        );
        let owner = format!("{}/{id}", self.namespace);
        let (image, outcome) = cache.acquire(&src, &owner)?;
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

        let spec_json = sb.adapt_spec(&bundle_spec.json)?;
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
        let pid = agent.create_container(&creq)?;
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
        let c = Arc::new(Container {
            id: id.clone(),
            bundle: bundle.to_path_buf(),
            role,
            init,
            execs: Mutex::new(HashMap::new()),
            image: Mutex::new(Some(image)),
            attached: Mutex::new(lock(&attached).take()),
        });
        lock(&self.containers).insert(id.clone(), c);
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

    fn start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        let sb = self
            .live_sandbox()
            .ok_or_else(|| Error::Sandbox("the sandbox is not running".into()))?;
        // Held across the RPC so the exit (which takes the same lock) is
        // published after TaskStart.
        let mut st = lock(&p.st);
        if st.status != Status::CREATED {
            return Err(Error::FailedPrecondition(format!(
                "process {id}/{exec_id} is not in created state"
            )));
        }
        let pid = sb.agent().start_process(id, exec_id)?;
        if pid != 0 {
            st.pid = pid;
        }
        st.status = Status::RUNNING;
        let pid = st.pid;
        if exec_id.is_empty() {
            self.events.publish(
                topics::TASK_START_EVENT_TOPIC,
                ev::TaskStart {
                    container_id: id.into(),
                    pid,
                    ..Default::default()
                },
            );
        } else {
            self.events.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                ev::TaskExecStarted {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                    pid,
                    ..Default::default()
                },
            );
        }
        Ok(pid)
    }

    fn delete(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        let st = p.state();
        if st.status == Status::RUNNING || st.status == Status::PAUSED {
            return Err(Error::FailedPrecondition(format!(
                "process {id}{}{exec_id} is still running; kill it first",
                if exec_id.is_empty() { "" } else { "/" }
            )));
        }
        let sb = self.live_sandbox();
        let resp = |st: &ProcState| api::DeleteResponse {
            pid: st.pid,
            exit_status: st.exit_status,
            exited_at: MessageField::some(st.exited_at.clone().unwrap_or_else(now)),
            ..Default::default()
        };
        if !exec_id.is_empty() {
            if let Some(sb) = &sb {
                if let Err(e) = sb.agent().delete_process(id, exec_id) {
                    log::warn!("agent delete of {id}/{exec_id}: {e}");
                }
            }
            p.stop_bridges();
            lock(&c.execs).remove(exec_id);
            return Ok(resp(&st));
        }

        // The init: the container goes.
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
                self.publish_exit(&proc_, 128 + libc::SIGKILL as u32, now());
            }
            proc_.stop_bridges();
        }
        if let Some(a) = lock(&c.attached).take() {
            match (&sb, removed_in_guest) {
                (Some(sb), true) => sb.detach(&a),
                (None, _) => {}
                (Some(_), false) => {}
            }
        }
        if let Some(image) = lock(&c.image).take() {
            let cfg = lock(&self.config).clone().unwrap_or_default();
            let cache = ImageCache::new(
                &cfg.state_dir,
                cfg.image_cache.keep_unused_mib,
                &cfg.image_cache.mkfs_erofs,
            );
            if let Err(e) = cache.release(&image) {
                log::warn!("releasing image {}: {e}", image.key);
            }
        }
        ContainerRecord::remove(&c.bundle);
        if let (PodRole::Sandbox { sandbox_id }, Some(sb)) = (&c.role, &sb) {
            if let Err(e) = sb.agent().destroy_sandbox(sandbox_id) {
                log::debug!("agent destroy of sandbox {sandbox_id}: {e}");
            }
        }
        lock(&self.containers).remove(id);
        let out = resp(&st);
        self.events.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            ev::TaskDelete {
                container_id: id.into(),
                pid: out.pid,
                exit_status: out.exit_status,
                exited_at: out.exited_at.clone(),
                id: id.into(),
                ..Default::default()
            },
        );
        Ok(out)
    }

    fn exec(&self, req: &api::ExecProcessRequest) -> Result<()> {
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
        let sb = self
            .live_sandbox()
            .ok_or_else(|| Error::Sandbox("the sandbox is not running".into()))?;
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
        let pid = sb.agent().exec_process(&r)?;
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

    fn kill(&self, req: &api::KillRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if p.exited() {
            // containerd reads NOT_FOUND on kill as "already stopped".
            return Err(Error::NotFound(format!(
                "process {}/{} already finished",
                req.id, req.exec_id
            )));
        }
        let Some(sb) = self.live_sandbox() else {
            return Err(Error::NotFound(
                "the sandbox is gone; so is the process".into(),
            ));
        };
        sb.agent()
            .signal_process(&req.id, &req.exec_id, req.signal, req.all)
    }

    fn shutdown(&self) {
        if !lock(&self.containers).is_empty() {
            return;
        }
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        log::info!("last container gone; stopping the sandbox and the shim");
        let sb = lock(&self.sandbox).take();
        if let Some(sb) = sb {
            sb.stop();
        }
        self.events.close(Duration::from_secs(5));
        self.exit.signal();
    }
}

/// Polls the agent's event stream for exits and OOMs until the sandbox
/// dies or the shim shuts down.
fn start_event_loop(inner: Weak<Inner>, sb: Arc<Sandbox>) {
    let spawned = std::thread::Builder::new()
        .name("agent-events".into())
        .spawn(move || {
            let mut seq = 0u64;
            let mut failures = 0u32;
            loop {
                if sb.is_dead() {
                    return;
                }
                let Some(me) = inner.upgrade() else { return };
                if me.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                drop(me);
                match sb.agent().get_events(seq, EVENT_POLL) {
                    Ok(r) => {
                        failures = 0;
                        let Some(me) = inner.upgrade() else { return };
                        if r.first_seq > seq + 1 && seq > 0 {
                            log::warn!(
                                "missed agent events {}..{}; asking for exits",
                                seq + 1,
                                r.first_seq
                            );
                            me.resync_exits(&sb);
                        }
                        for e in &r.events {
                            if e.seq > seq {
                                seq = e.seq;
                            }
                            me.handle_agent_event(e);
                        }
                    }
                    Err(e) => {
                        if sb.is_dead() {
                            return;
                        }
                        failures += 1;
                        log::warn!("agent events: {e}");
                        if failures >= 20 {
                            if let Some(me) = inner.upgrade() {
                                if !me.shutting_down.load(Ordering::SeqCst) {
                                    me.sandbox_died(&format!("agent connection lost: {e}"));
                                }
                            }
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(250));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("spawning the agent event thread: {e}");
    }
}

/// Cleanup steps for a create that fails halfway, run newest first.
#[derive(Default)]
struct Undo(Vec<Box<dyn FnOnce() + Send>>);

impl Undo {
    fn push(&mut self, f: impl FnOnce() + Send + 'static) {
        self.0.push(Box::new(f));
    }

    fn run(&mut self) {
        while let Some(f) = self.0.pop() {
            f();
        }
    }

    fn forget(&mut self) {
        self.0.clear();
    }
}

fn metrics_from(s: &proto::StatsResponse) -> v2::Metrics {
    let mut m = v2::Metrics::new();
    if let Some(c) = s.cpu.as_ref() {
        m.cpu = MessageField::some(v2::CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(mem) = s.memory.as_ref() {
        m.memory = MessageField::some(v2::MemoryStat {
            usage: mem.usage_bytes,
            usage_limit: mem.limit_bytes,
            swap_usage: mem.swap_usage_bytes,
            anon: mem.anon_bytes,
            file: mem.file_bytes,
            ..Default::default()
        });
        m.memory_events = MessageField::some(v2::MemoryEvents {
            oom: mem.oom_events,
            oom_kill: mem.oom_kill_events,
            ..Default::default()
        });
    }
    if let Some(p) = s.pids.as_ref() {
        m.pids = MessageField::some(v2::PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        });
    }
    m
}

fn to_any(m: &dyn containerd_shim::protos::protobuf::MessageDyn) -> Result<Any> {
    let mut a = Any::new();
    a.type_url = m.descriptor_dyn().full_name().to_string();
    a.value = m
        .write_to_bytes_dyn()
        .map_err(|e| Error::Shim(format!("encoding {}: {e}", a.type_url)))?;
    Ok(a)
}

fn rpc<T>(what: &str, r: Result<T>) -> TtrpcResult<T> {
    r.map_err(|e| {
        log::debug!("{what}: {e}");
        e.into()
    })
}

impl Task for Service {
    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let r = (|| {
            let c = self.inner.container(&req.id)?;
            let p = c.process(&req.exec_id)?;
            let st = p.state();
            Ok(api::StateResponse {
                id: req.id.clone(),
                bundle: c.bundle.display().to_string(),
                pid: st.pid,
                status: st.status.into(),
                stdin: p.stdio.stdin.clone(),
                stdout: p.stdio.stdout.clone(),
                stderr: p.stdio.stderr.clone(),
                terminal: p.stdio.terminal,
                exit_status: st.exit_status,
                exited_at: st.exited_at.map(MessageField::some).unwrap_or_default(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
        })();
        rpc("state", r)
    }

    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        log::info!("create {} (bundle {})", req.id, req.bundle);
        let r = self.inner.create(req).map(|pid| api::CreateTaskResponse {
            pid,
            ..Default::default()
        });
        rpc("create", r)
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let r = self
            .inner
            .start(&req.id, &req.exec_id)
            .map(|pid| api::StartResponse {
                pid,
                ..Default::default()
            });
        rpc("start", r)
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        rpc("delete", self.inner.delete(&req.id, &req.exec_id))
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let r = (|| {
            self.inner.container(&req.id)?;
            let sb = self
                .inner
                .live_sandbox()
                .ok_or_else(|| Error::Sandbox("the sandbox is not running".into()))?;
            let l = sb.agent().list_pids(&req.id)?;
            let mut out = api::PidsResponse::new();
            for p in l.processes {
                let mut info = ProcessInfo::new();
                info.pid = p.pid;
                if !p.exec_id.is_empty() {
                    let d = ProcessDetails {
                        exec_id: p.exec_id.clone(),
                        ..Default::default()
                    };
                    info.info = MessageField::some(to_any(&d)?);
                }
                out.processes.push(info);
            }
            Ok(out)
        })();
        rpc("pids", r)
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        rpc("pause", self.set_paused(&req.id, true))
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        rpc("resume", self.set_paused(&req.id, false))
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        rpc(
            "checkpoint",
            Err(Error::Unimplemented(
                "checkpointing a task is not supported by thaw (VM snapshots are internal)".into(),
            )),
        )
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        rpc("kill", self.inner.kill(&req).map(|_| api::Empty::new()))
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        rpc("exec", self.inner.exec(&req).map(|_| api::Empty::new()))
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let r = (|| {
            let c = self.inner.container(&req.id)?;
            let p = c.process(&req.exec_id)?;
            if !p.stdio.terminal {
                return Err(Error::FailedPrecondition(format!(
                    "process {}/{} has no terminal",
                    req.id, req.exec_id
                )));
            }
            let sb = self
                .inner
                .live_sandbox()
                .ok_or_else(|| Error::Sandbox("the sandbox is not running".into()))?;
            sb.agent()
                .resize_tty(&req.id, &req.exec_id, req.width, req.height)?;
            Ok(api::Empty::new())
        })();
        rpc("resize_pty", r)
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let r = (|| {
            let c = self.inner.container(&req.id)?;
            let p = c.process(&req.exec_id)?;
            if req.stdin {
                if let Some(b) = lock(&p.bridges).as_ref() {
                    b.close_stdin();
                }
            }
            Ok(api::Empty::new())
        })();
        rpc("close_io", r)
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let r = self.inner.container(&req.id).and_then(|_| {
            Err(Error::Unimplemented(
                "changing the resources of a running thaw container is not supported yet".into(),
            ))
        });
        rpc("update", r)
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let r = (|| {
            let c = self.inner.container(&req.id)?;
            let p = c.process(&req.exec_id)?;
            let mut st = lock(&p.st);
            while st.status != Status::STOPPED {
                st = p.cond.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            Ok(api::WaitResponse {
                exit_status: st.exit_status,
                exited_at: st
                    .exited_at
                    .clone()
                    .map(MessageField::some)
                    .unwrap_or_default(),
                ..Default::default()
            })
        })();
        rpc("wait", r)
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let r = (|| {
            self.inner.container(&req.id)?;
            let sb = self
                .inner
                .live_sandbox()
                .ok_or_else(|| Error::Sandbox("the sandbox is not running".into()))?;
            let s = sb.agent().stats(&req.id)?;
            let mut out = api::StatsResponse::new();
            out.stats = MessageField::some(to_any(&metrics_from(&s))?);
            Ok(out)
        })();
        rpc("stats", r)
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = lock(&self.inner.sandbox)
            .as_ref()
            .map(|s| s.pid())
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        self.inner.shutdown();
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::Message;

    #[test]
    fn runtime_options_config_path_is_decoded() {
        // runtimeoptions.v1.Options{type_url: "x", config_path: "/etc/thaw/a.toml"}
        let mut value = vec![0x0a, 1, b'x', 0x12, 16];
        value.extend_from_slice(b"/etc/thaw/a.toml");
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        assert_eq!(
            config_path_from_options(&MessageField::some(any)),
            Some(PathBuf::from("/etc/thaw/a.toml"))
        );
        let other = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![0x12, 1, b'y'],
            ..Default::default()
        };
        assert_eq!(config_path_from_options(&MessageField::some(other)), None);
        assert_eq!(config_path_from_options(&MessageField::none()), None);
    }

    #[test]
    fn metrics_are_cgroup_v2_metrics() {
        let mut s = proto::StatsResponse::new();
        let mut m = proto::MemoryStats::new();
        m.usage_bytes = 1234;
        m.oom_kill_events = 2;
        s.memory = MessageField::some(m);
        let any = to_any(&metrics_from(&s)).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let back = v2::Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(back.memory.usage, 1234);
        assert_eq!(back.memory_events.oom_kill, 2);
    }
}
