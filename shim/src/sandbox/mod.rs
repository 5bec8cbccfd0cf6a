//! One sandbox: the process that hosts the guest side (a `thaw-vmm` VM, or
//! for tests the agent as a host process), its agent connection, its disk
//! slots and stdio ports, and the watch on its death.
//!
//! The backends differ only in how the process is started, how an image
//! reaches the guest and how it is asked to stop; see [`Backend`].

mod cgroup;
mod ephemeral;
mod host;
pub mod network;
mod port_forward;
pub mod share;
mod sk_lookup;
mod vm;

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use containerd_shim::monitor::{monitor_subscribe, Subject, Topic};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use sha2::{Digest, Sha256};
use thaw_agent_protocol::{agent as proto, transport, CONTROL_PORT, FIRST_STDIO_PORT};

use crate::agent::Agent;
use crate::child;
use crate::error::{Error, IoContext, Result};
use thaw_config::{BackendKind, Config, VmConfig};

pub use cgroup::{remove_dirs as remove_cgroups, PodCgroup};
pub use host::{kill_cgroup, HostBackend};
pub use network::PodNetns;
pub use vm::VmBackend;

/// When set (in containerd's environment), a directory where stopped
/// sandboxes leave copies of their logs.
pub const KEEP_LOGS_ENV: &str = "THAW_KEEP_SANDBOX_LOGS";

/// A disk image made visible to the guest.
#[derive(Debug)]
pub struct Attached {
    pub slot: u32,
    /// Host loop device (host backend).
    pub loop_dev: Option<String>,
}

/// What differs between a VM and the host-process stand-in.
pub trait Backend: Send + Sync {
    /// Checks inputs (binaries, kernel, images) so a user gets a plain
    /// error instead of a process dying early.
    fn check(&self) -> Result<()>;
    /// Host-side setup before the process starts; returns a cgroup that
    /// contains the sandbox, if the backend uses one.
    fn prepare(&self, _dir: &Path) -> Result<Option<PathBuf>> {
        Ok(None)
    }
    /// The command that starts the sandbox process; the agent inside must
    /// dial `<uds>_1024`.
    fn command(&self, uds: &Path, dir: &Path) -> Command;
    /// Makes `image` visible to the guest in `slot`; returns the rootfs
    /// description for the agent.
    fn attach(&self, slot: u32, image: &Path) -> Result<(proto::Rootfs, Attached)>;
    /// Called once the agent mounted the image (it holds it from now on).
    fn mounted(&self, attached: &Attached);
    /// Undoes `attach` (the guest no longer uses the image).
    fn detach(&self, attached: &Attached);
    /// Asks the sandbox process to end (it is killed if it does not).
    fn request_stop(&self, pid: u32);
    /// The spec as this backend's agent can honour it.
    fn adapt_spec(&self, spec: &serde_json::Value) -> Result<serde_json::Value>;
    /// Whether the guest resumed from a snapshot (its clock and entropy
    /// are stale and need the agent's fix-ups).
    fn restored(&self) -> bool {
        false
    }
    /// Whether the agent's pids are host pids (the agent runs as a host
    /// process); in a VM they are guest pids, meaningless on the host.
    fn agent_pids_are_host_pids(&self) -> bool {
        false
    }
    /// Runs once the sandbox process has exited, however it ended.
    fn after_exit(&self) {}
    /// Whether host paths reach the guest only through a share (a VM);
    /// the host-process stand-in sees them as they are.
    fn needs_share(&self) -> bool {
        false
    }
    /// Has the sandbox process serve `dir` to the guest (virtio-fs).
    fn attach_share(&self, dir: &Path) -> Result<()> {
        Err(Error::Sandbox(format!(
            "{}: cannot share {}",
            self.describe(),
            dir.display()
        )))
    }
    /// Has the sandbox process open the tap `name` in its network
    /// namespace and join it to the guest's NIC.
    fn attach_tap(&self, name: &str) -> Result<()> {
        Err(Error::Sandbox(format!(
            "{}: no network device to join {name} to",
            self.describe()
        )))
    }
    fn describe(&self) -> String;
}

/// Fix-ups before a guest's first use. A resumed guest wakes with the
/// template's clock, RNG state and identity, shared by every VM made from
/// it. A guest whose RNG output may match its siblings' must not run
/// anything, so a failed reseed fails the start; a stale clock only warns.
fn prepare_guest(agent: &Agent, id: &str, restored: bool, kind: BackendKind) -> Result<()> {
    if restored {
        if let Err(e) = agent.set_time(std::time::SystemTime::now()) {
            log::warn!("sandbox {id}: setting the guest clock: {e}");
        }
        agent
            .add_entropy()
            .map_err(|e| Error::Sandbox(format!("reseeding the restored guest's RNG: {e}")))?;
    }
    // The host-unisolated test backend shares the host's hostname.
    if kind == BackendKind::Vm {
        let (hostname, machine_id) = guest_identity(id)?;
        agent.set_identity(&hostname, &machine_id).map_err(|e| {
            Error::Sandbox(format!("setting the guest's identity ({hostname}): {e}"))
        })?;
    }
    Ok(())
}

/// The guest's hostname (the sandbox id, made a valid hostname) and a fresh
/// random machine id.
fn guest_identity(id: &str) -> Result<(String, String)> {
    let mut hostname: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if hostname.is_empty() {
        hostname = "thaw".into();
    }
    let machine_id = crate::agent::host_random(16)?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((hostname, machine_id))
}

/// How the sandbox process ended.
#[derive(Debug, Default)]
struct Life {
    exit: Mutex<Option<i32>>,
    cond: Condvar,
}

impl Life {
    fn set(&self, code: i32) {
        if let Ok(mut e) = self.exit.lock() {
            *e = Some(code);
            self.cond.notify_all();
        }
    }

    fn get(&self) -> Option<i32> {
        self.exit.lock().ok().and_then(|e| *e)
    }

    fn wait(&self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let mut g = self.exit.lock().ok()?;
        while g.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            g = self.cond.wait_timeout(g, left).ok()?.0;
        }
        *g
    }
}

type DeathHook = Box<dyn FnOnce(String) + Send>;

pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    uds: PathBuf,
    /// The cgroup containing everything the sandbox runs (host backend).
    pub cgroup: Option<PathBuf>,
    /// The pod's host cgroup the VMM runs in (VM backend), one directory
    /// per hierarchy; removed once the VMM has exited.
    pub vmm_cgroups: Vec<PathBuf>,
    backend: Arc<dyn Backend>,
    agent: Agent,
    pid: u32,
    life: Arc<Life>,
    stopping: Arc<AtomicBool>,
    on_death: Arc<Mutex<Option<DeathHook>>>,
    next_port: Arc<AtomicU32>,
    slots: Mutex<Vec<bool>>,
    /// CRI PortForward into the guest (pods with a network namespace).
    forwarder: Mutex<Option<port_forward::PortForwarder>>,
    /// Where the VMM's network namespace came from.
    netns: PodNetns,
    /// The host share, made and attached at the first container with host
    /// mounts.
    share: Mutex<Option<share::Share>>,
    /// Whether the pod's network was looked at (once, at the first start).
    network_checked: Mutex<bool>,
    _control: UnixListener,
}

/// The per-sandbox directory: short, because Unix socket paths must fit in
/// 108 bytes.
pub fn sandbox_dir(run_dir: &Path, namespace: &str, id: &str) -> PathBuf {
    let mut h = Sha256::new();
    h.update(namespace.as_bytes());
    h.update(b"/");
    h.update(id.as_bytes());
    let hex = format!("{:x}", h.finalize());
    run_dir.join("sandboxes").join(&hex[..20])
}

/// The last non-empty lines of `text`, joined for one log line.
pub fn last_lines(text: &str, n: usize) -> String {
    let v: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(n)..].join(" | ")
}

/// The last lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(4096);
    let text = String::from_utf8_lossy(&text[start..]);
    let v: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

fn make_backend(cfg: &Config, vm: &VmConfig, namespace: &str) -> Result<Arc<dyn Backend>> {
    Ok(match cfg.backend {
        BackendKind::Vm => {
            let images = crate::image_cache::namespace_dir(&cfg.state_dir, namespace)?;
            Arc::new(VmBackend::new(vm.clone(), Some(images)))
        }
        BackendKind::HostUnisolated => Arc::new(HostBackend::new(cfg.host.clone())),
    })
}

impl Sandbox {
    /// Starts the sandbox process and waits for its agent to dial in.
    /// `pod_cgroup` is where the VMM runs (the sandbox spec's
    /// linux.cgroupsPath); the host backend ignores it.
    pub fn start(
        cfg: &Config,
        vm: &VmConfig,
        namespace: &str,
        id: &str,
        pod_cgroup: Option<PodCgroup>,
        netns: PodNetns,
    ) -> Result<Sandbox> {
        let backend = make_backend(cfg, vm, namespace)?;
        backend.check()?;
        let dir = sandbox_dir(&cfg.run_dir, namespace, id);
        if dir.exists() {
            // Left by a crashed shim of the same id; `delete` normally
            // removes it. Nothing in it is live: its process died with it.
            share::remove_in(&dir);
            let _ = fs::remove_dir_all(&dir);
        }
        // Its sockets reach the VMM and the agent: 0700, whatever the umask.
        thaw_snapshots::private::create_dir_all(&dir)
            .ctx(|| format!("creating {}", dir.display()))?;
        let pod_cgroup = pod_cgroup.filter(|_| cfg.backend == BackendKind::Vm);
        // The host-process stand-in stays in the shim's namespace.
        let netns = match cfg.backend {
            BackendKind::Vm => netns,
            BackendKind::HostUnisolated => PodNetns::Host,
        };
        let result = Self::start_in(cfg, backend, &dir, id, pod_cgroup, netns);
        if result.is_err() {
            share::remove_in(&dir);
            let _ = fs::remove_dir_all(&dir);
        }
        result
    }

    fn start_in(
        cfg: &Config,
        backend: Arc<dyn Backend>,
        dir: &Path,
        id: &str,
        pod_cgroup: Option<PodCgroup>,
        netns: PodNetns,
    ) -> Result<Sandbox> {
        let uds = dir.join("vsock.sock");
        let control_path = transport::host_socket_path(&uds, CONTROL_PORT);
        let control = thaw_snapshots::private::bind_socket(&control_path)
            .ctx(|| format!("listening on {}", control_path.display()))?;
        control
            .set_nonblocking(true)
            .ctx(|| "setting the control socket non-blocking".into())?;

        let log_path = dir.join("sandbox.log");
        let log = thaw_snapshots::private::create_file(&log_path)
            .ctx(|| format!("creating {}", log_path.display()))?;
        let log2 = log
            .try_clone()
            .ctx(|| "duplicating the log file handle".into())?;
        let cgroup = backend.prepare(dir)?;
        let mut cmd = backend.command(&uds, dir);
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        let vmm_cgroups = match &pod_cgroup {
            Some(cg) => {
                if let Err(e) = cg.create() {
                    cg.remove();
                    return Err(e);
                }
                log::info!(
                    "sandbox {id}: the VMM runs in the pod cgroup {}",
                    cg.relative.display()
                );
                cg.dirs.clone()
            }
            None => Vec::new(),
        };
        let procs = pod_cgroup
            .as_ref()
            .map(PodCgroup::procs_files)
            .unwrap_or_default();
        let enter_netns = netns.enter_in_child();
        // The VMM uses no System V IPC or POSIX message queues: a private
        // IPC namespace hides the host's from it. (The host-process
        // stand-in runs containers itself and keeps the shim's.)
        let own_ipc = cfg.backend == BackendKind::Vm;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Die with the thread that spawned us (the supervisor below,
                // which lives as long as the process): a crashed shim must
                // not leave a VM behind.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if own_ipc && libc::unshare(libc::CLONE_NEWIPC) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                cgroup::join(&procs)?;
                enter_netns()
            });
        }

        let life = Arc::new(Life::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let on_death: Arc<Mutex<Option<DeathHook>>> = Arc::new(Mutex::new(None));
        let pid = match supervise(
            cmd,
            backend.clone(),
            vmm_cgroups.clone(),
            life.clone(),
            stopping.clone(),
            on_death.clone(),
            log_path.clone(),
        ) {
            Ok(p) => p,
            Err(e) => {
                backend.after_exit();
                cgroup::remove_dirs(&vmm_cgroups);
                return Err(e);
            }
        };
        log::info!("sandbox {id}: {} started, pid {pid}", backend.describe());

        let boot_timeout = match cfg.backend {
            BackendKind::Vm => Duration::from_secs(cfg.vm.boot_timeout_secs),
            BackendKind::HostUnisolated => Duration::from_secs(cfg.host.start_timeout_secs),
        };
        let request_timeout = Duration::from_secs(cfg.agent.request_timeout_secs);
        let agent = match accept_healthy_agent(&control, boot_timeout, &life, request_timeout) {
            Ok(a) => a,
            Err(e) => {
                let err = match e {
                    AcceptError::Died(code) => Error::Sandbox(format!(
                        "{} exited with status {code} before the agent connected: {}",
                        backend.describe(),
                        log_tail(&log_path, 8)
                    )),
                    AcceptError::Timeout => Error::Sandbox(format!(
                        "the agent did not connect within {boot_timeout:?} ({}); log: {}",
                        backend.describe(),
                        log_tail(&log_path, 8)
                    )),
                    AcceptError::Io(e) => {
                        Error::Sandbox(format!("accepting the agent connection: {e}"))
                    }
                    AcceptError::Agent(e) => e,
                };
                stop_process(&*backend, pid, &life, &stopping);
                return Err(err);
            }
        };
        if let Err(e) = prepare_guest(&agent, id, backend.restored(), cfg.backend) {
            stop_process(&*backend, pid, &life, &stopping);
            return Err(e);
        }
        let spare = match cfg.backend {
            BackendKind::Vm => cfg.vm.spare_disks,
            BackendKind::HostUnisolated => 64,
        };
        Ok(Sandbox {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            uds,
            cgroup,
            vmm_cgroups,
            backend,
            agent,
            pid,
            life,
            stopping,
            on_death,
            next_port: Arc::new(AtomicU32::new(FIRST_STDIO_PORT)),
            forwarder: Mutex::new(None),
            slots: Mutex::new(vec![false; spare as usize]),
            netns,
            share: Mutex::new(None),
            network_checked: Mutex::new(false),
            _control: control,
        })
    }

    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The sandbox process (VMM) pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The pid containerd is told for a process the agent reported as
    /// `agent_pid`: in a VM always the VMM's. A guest pid would point
    /// containerd and cAdvisor at whatever host process has that number
    /// (a guest's pid 1 at the host's init).
    pub fn task_pid(&self, agent_pid: u32) -> u32 {
        if self.backend.agent_pids_are_host_pids() {
            agent_pid
        } else {
            self.pid
        }
    }

    pub fn uds(&self) -> &Path {
        &self.uds
    }

    pub fn next_port(&self) -> u32 {
        self.next_port.fetch_add(1, Ordering::SeqCst)
    }

    /// Whether the sandbox process has exited.
    pub fn is_dead(&self) -> bool {
        self.life.get().is_some()
    }

    /// Whether the sandbox process exits within `timeout` (at once if it
    /// has): a failed agent call may be the first sign of its death.
    pub fn dies_within(&self, timeout: Duration) -> bool {
        self.life.wait(timeout).is_some()
    }

    /// Runs `hook` (once) with a description when the process dies without
    /// being asked to. Runs at once if it already died.
    pub fn on_death(&self, hook: impl FnOnce(String) + Send + 'static) {
        if let Ok(mut h) = self.on_death.lock() {
            if let Some(code) = self.life.get() {
                drop(h);
                if !self.stopping.load(Ordering::SeqCst) {
                    hook(format!("sandbox process exited with status {code}"));
                }
                return;
            }
            *h = Some(Box::new(hook));
        }
    }

    /// Attaches a container's image to a free slot.
    pub fn attach(&self, image: &Path) -> Result<(proto::Rootfs, Attached)> {
        let slot = {
            let mut slots = self
                .slots
                .lock()
                .map_err(|_| Error::Shim("slots lock poisoned".into()))?;
            let Some(i) = slots.iter().position(|used| !used) else {
                return Err(Error::Sandbox(format!(
                    "all {} disk slots of the sandbox are in use (vm.spare_disks)",
                    slots.len()
                )));
            };
            slots[i] = true;
            i as u32
        };
        match self.backend.attach(slot, image) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.free_slot(slot);
                Err(e)
            }
        }
    }

    pub fn adapt_spec(&self, spec: &serde_json::Value) -> Result<serde_json::Value> {
        let mut spec = self.backend.adapt_spec(spec)?;
        // Host programs, run by the shim (crate::hooks), never the guest.
        if let Some(o) = spec.as_object_mut() {
            o.remove("hooks");
        }
        Ok(spec)
    }

    pub fn mounted(&self, a: &Attached) {
        self.backend.mounted(a);
    }

    pub fn detach(&self, a: &Attached) {
        self.backend.detach(a);
        self.free_slot(a.slot);
    }

    fn free_slot(&self, slot: u32) {
        if let Ok(mut slots) = self.slots.lock() {
            if let Some(s) = slots.get_mut(slot as usize) {
                *s = false;
            }
        }
    }

    /// `spec` with its host binds brought into the VM. A memory-backed
    /// emptyDir becomes a guest tmpfs of the same size, shared by the
    /// pod's containers ([`ephemeral`]). Every other source is
    /// bind-mounted under the sandbox's share (nosuid, nodev, read-only
    /// if the mount is) and the spec names its guest path below
    /// SHARE_DIR. Undone by [`Sandbox::withdraw_host_mounts`].
    pub fn expose_host_mounts(
        &self,
        container: &str,
        spec: &serde_json::Value,
    ) -> Result<serde_json::Value> {
        let binds = crate::spec::host_binds(spec);
        if binds.is_empty() || !self.backend.needs_share() {
            return Ok(spec.clone());
        }
        let mut rewritten = Vec::with_capacity(binds.len());
        let mut shared = Vec::with_capacity(binds.len());
        for b in binds {
            match ephemeral::memory_volume(&b.source)? {
                Some(v) => {
                    self.agent.mount_ephemeral(&v.name, v.size_bytes, v.mode)?;
                    let guest = Path::new(thaw_agent_protocol::EPHEMERAL_DIR).join(&v.name);
                    rewritten.push((b.index, guest.display().to_string()));
                }
                None => shared.push(b),
            }
        }
        if shared.is_empty() {
            return Ok(crate::spec::with_bind_sources(spec, &rewritten));
        }
        let mut guard = self
            .share
            .lock()
            .map_err(|_| Error::Shim("share lock poisoned".into()))?;
        if guard.is_none() {
            let s = share::Share::create(&self.dir)?;
            let attached = self
                .backend
                .attach_share(s.root())
                .and_then(|()| self.agent.mount_share());
            if let Err(e) = attached {
                s.remove();
                return Err(e);
            }
            *guard = Some(s);
        }
        let Some(s) = guard.as_ref() else {
            return Err(Error::Shim("the share vanished".into()));
        };
        for b in &shared {
            match s.expose(container, b.index, &b.source, b.read_only) {
                Ok(rel) => rewritten.push((
                    b.index,
                    Path::new(thaw_agent_protocol::SHARE_DIR)
                        .join(rel)
                        .display()
                        .to_string(),
                )),
                Err(e) => {
                    s.withdraw(container);
                    return Err(e);
                }
            }
        }
        Ok(crate::spec::with_bind_sources(spec, &rewritten))
    }

    /// Removes what [`Sandbox::expose_host_mounts`] made for `container`.
    pub fn withdraw_host_mounts(&self, container: &str) {
        if let Ok(g) = self.share.lock() {
            if let Some(s) = g.as_ref() {
                s.withdraw(container);
            }
        }
    }

    /// The pod network namespace that outlives the VMM (CRI's), which
    /// `delete` cleans after a shim crash.
    pub fn joined_netns(&self) -> Option<PathBuf> {
        match &self.netns {
            PodNetns::Joined { path, .. } => Some(path.clone()),
            _ => None,
        }
    }

    /// Joins the interface CNI configured in the VMM's network namespace
    /// to the guest (see [`network`]); runs once, at the first container
    /// start, when CNI has run in every flow (CRI before create, `ctr run
    /// --cni` and nerdctl's hook after it). No interface: loopback only.
    pub fn connect_network(&self) -> Result<()> {
        let mut checked = self
            .network_checked
            .lock()
            .map_err(|_| Error::Shim("network lock poisoned".into()))?;
        if *checked {
            return Ok(());
        }
        *checked = true;
        let Some(netns) = self.netns.path(self.pid) else {
            return Ok(());
        };
        if let PodNetns::Joined { .. } = self.netns {
            let f = port_forward::PortForwarder::start(
                &netns,
                self.agent.clone(),
                self.uds.clone(),
                self.next_port.clone(),
            )?;
            if let Ok(mut g) = self.forwarder.lock() {
                *g = Some(f);
            }
        }
        let Some((interface, req)) = network::read_interface(&netns)? else {
            log::info!(
                "sandbox {}: no interface in {}: the guest has loopback only",
                self.id,
                netns.display()
            );
            return Ok(());
        };
        self.backend.attach_tap(network::TAP_NAME)?;
        network::redirect(&netns, &interface, req.mtu)?;
        self.agent.configure_network(&req)?;
        log::info!(
            "sandbox {}: {interface} in {} joined to the guest ({} addresses)",
            self.id,
            netns.display(),
            req.addresses.len()
        );
        Ok(())
    }

    /// Stops the sandbox process and removes its directory.
    pub fn stop(&self) {
        if let Ok(mut f) = self.forwarder.lock() {
            f.take();
        }
        stop_process(&*self.backend, self.pid, &self.life, &self.stopping);
        if let Some(netns) = self.joined_netns() {
            network::unlink(&netns);
        }
        // Debug aid: keep the logs (console, VMM stderr) of stopped sandboxes.
        if let Some(keep) = std::env::var_os(KEEP_LOGS_ENV) {
            let dest = PathBuf::from(keep).join(self.dir.file_name().unwrap_or_default());
            let _ = thaw_snapshots::private::create_dir_all(&dest);
            for f in ["sandbox.log", "console.log"] {
                let _ = fs::copy(self.dir.join(f), dest.join(f));
            }
        }
        // Detach the binds first: removing the directory must never reach
        // into a shared host directory.
        share::remove_in(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Asks, then forces, the sandbox process to end.
fn stop_process(backend: &dyn Backend, pid: u32, life: &Life, stopping: &AtomicBool) {
    stopping.store(true, Ordering::SeqCst);
    if life.get().is_some() {
        return;
    }
    backend.request_stop(pid);
    if life.wait(Duration::from_secs(3)).is_some() {
        return;
    }
    log::warn!("sandbox process {pid} did not stop; killing it");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    if life.wait(Duration::from_secs(5)).is_none() {
        log::error!("sandbox process {pid} survived SIGKILL for 5 s");
    }
}

#[derive(Debug)]
enum AcceptError {
    Died(i32),
    Timeout,
    Io(std::io::Error),
    Agent(Error),
}

/// Accepts the agent's control connection and checks its health, within
/// `timeout`. A connection that closes before the agent answered is not
/// the end: the agent dials again. That happens on a loaded host: the
/// guest gives up a vsock connect after 2 s of its time, and if the VMM's
/// answer comes later the guest resets the connection the host side had
/// already accepted.
fn accept_healthy_agent(
    l: &UnixListener,
    timeout: Duration,
    life: &Life,
    request_timeout: Duration,
) -> std::result::Result<Agent, AcceptError> {
    let deadline = Instant::now() + timeout;
    loop {
        let stream = accept_agent(l, deadline.saturating_duration_since(Instant::now()), life)?;
        match Agent::new(stream, request_timeout) {
            Ok(a) => return Ok(a),
            Err(Error::AgentClosed(m)) if Instant::now() < deadline => {
                log::warn!("the agent's connection closed before it answered ({m}); waiting for it to dial again");
            }
            Err(e) => return Err(AcceptError::Agent(e)),
        }
    }
}

fn accept_agent(
    l: &UnixListener,
    timeout: Duration,
    life: &Life,
) -> std::result::Result<std::os::unix::net::UnixStream, AcceptError> {
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(AcceptError::Io)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(AcceptError::Io(e)),
        }
        if let Some(code) = life.get() {
            return Err(AcceptError::Died(code));
        }
        if Instant::now() >= deadline {
            return Err(AcceptError::Timeout);
        }
        let mut fds = [PollFd::new(l.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(50u16));
    }
}

/// What an exit status says beyond its number, for the death message.
fn exit_meaning(code: i32) -> &'static str {
    match code - 128 {
        libc::SIGSYS => " (SIGSYS: the VMM made a system call its seccomp filter forbids)",
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGSEGV => " (SIGSEGV)",
        _ => "",
    }
}

/// Spawns `cmd` from a thread that then waits for its exit for as long as
/// it lives (so PR_SET_PDEATHSIG, tied to the spawning thread, holds).
/// Returns the pid.
fn supervise(
    mut cmd: Command,
    backend: Arc<dyn Backend>,
    cgroups: Vec<PathBuf>,
    life: Arc<Life>,
    stopping: Arc<AtomicBool>,
    on_death: Arc<Mutex<Option<DeathHook>>>,
    log_path: PathBuf,
) -> Result<u32> {
    let (tx, rx) = std::sync::mpsc::channel::<std::io::Result<u32>>();
    let what = format!("{:?}", cmd.get_program());
    std::thread::Builder::new()
        .name("sandbox-supervisor".into())
        .spawn(move || {
            let sub = if child::reaper_active() {
                match monitor_subscribe(Topic::Pid) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        let _ = tx.send(Err(std::io::Error::other(e.to_string())));
                        return;
                    }
                }
            } else {
                None
            };
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let pid = child.id();
            let _ = tx.send(Ok(pid));
            let code = match sub {
                Some(sub) => loop {
                    match sub.rx.recv() {
                        Ok(ev) => {
                            if matches!(ev.subject, Subject::Pid(p) if p == pid as i32) {
                                break ev.exit_code;
                            }
                        }
                        Err(_) => break -1,
                    }
                },
                None => {
                    use std::os::unix::process::ExitStatusExt;
                    match child.wait() {
                        Ok(st) => st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)),
                        Err(_) => -1,
                    }
                }
            };
            backend.after_exit();
            // Read before the directories go: the cgroup is the VMM's own.
            let oom_killed = cgroup::oom_killed_in(&cgroups).map(Path::to_path_buf);
            cgroup::remove_dirs(&cgroups);
            life.set(code);
            if !stopping.load(Ordering::SeqCst) {
                let meaning = match oom_killed {
                    Some(dir) if code == 128 + libc::SIGKILL => format!(
                        " (SIGKILL from the host's OOM killer: the VM went over the memory \
                         limit of its cgroup {})",
                        dir.display()
                    ),
                    _ => exit_meaning(code).to_string(),
                };
                let why = format!(
                    "sandbox process {pid} exited unexpectedly with status {code}{meaning}: {}",
                    log_tail(&log_path, 8)
                );
                log::error!("{why}");
                let hook = on_death.lock().ok().and_then(|mut h| h.take());
                if let Some(hook) = hook {
                    hook(why);
                }
            }
        })
        .ctx(|| "spawning the sandbox supervisor thread".into())?;
    match rx.recv() {
        Ok(Ok(pid)) => Ok(pid),
        Ok(Err(e)) => Err(Error::Sandbox(format!("starting {what}: {e}"))),
        Err(_) => Err(Error::Sandbox(format!(
            "starting {what}: supervisor thread died"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_connection_closed_before_its_answer_is_followed_by_the_next() {
        use crate::agent::hostile_agent_tests::{health_reply, read_request, send_frame};
        use std::os::unix::net::UnixStream;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let l = UnixListener::bind(&path).unwrap();
        l.set_nonblocking(true).unwrap();
        let agent = std::thread::spawn(move || {
            drop(UnixStream::connect(&path).unwrap());
            let mut second = UnixStream::connect(&path).unwrap();
            let (stream_id, req) = read_request(&mut second);
            assert_eq!(req.method, "Health");
            send_frame(&mut second, stream_id, &health_reply("second"));
            second
        });
        let a = accept_healthy_agent(
            &l,
            Duration::from_secs(30),
            &Life::default(),
            Duration::from_secs(30),
        )
        .unwrap();
        let _second = agent.join().unwrap();
        drop(a);

        // Without a second dial, the first close ends in the deadline.
        let start = Instant::now();
        let path = dir.path().join("control2.sock");
        let l = UnixListener::bind(&path).unwrap();
        l.set_nonblocking(true).unwrap();
        drop(UnixStream::connect(&path).unwrap());
        let r = accept_healthy_agent(
            &l,
            Duration::from_secs(1),
            &Life::default(),
            Duration::from_secs(1),
        );
        assert!(
            matches!(
                r,
                Err(AcceptError::Timeout) | Err(AcceptError::Agent(Error::AgentClosed(_)))
            ),
            "{:?}",
            r.err().map(|e| format!("{e:?}"))
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn each_guest_gets_a_valid_hostname_and_its_own_machine_id() {
        let (h, a) = guest_identity("k8s_pod/default:web#1").unwrap();
        assert_eq!(h, "k8s-pod-default-web-1");
        let (long, b) = guest_identity(&"f".repeat(80)).unwrap();
        assert_eq!(long.len(), 64);
        for id in [&a, &b] {
            assert_eq!(id.len(), 32);
            assert!(id
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        }
        assert_ne!(a, b);
    }
}
