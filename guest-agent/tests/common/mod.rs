//! Host-side harness for the agent's container runtime: starts the real
//! `thaw-agent` binary (not as PID 1) with `--host unix://<dir>/vsock.sock`,
//! accepts its control connection on `<dir>/vsock.sock_1024` exactly as the
//! shim does behind the VMM, and runs busybox containers through the ttrpc
//! API. Needs root (namespaces, mounts, cgroups).
//!
//! Everything lives in a scratch directory and a scratch cgroup v2 subtree,
//! and is removed on drop, also when a test fails.

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio as ProcStdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thaw_agent_protocol::agent::*;
use thaw_agent_protocol::agent_ttrpc::AgentClient;
use thaw_agent_protocol::transport::{host_socket_path, sync_client};
use thaw_agent_protocol::ttrpc;

pub const AGENT: &str = env!("CARGO_BIN_EXE_thaw-agent");

/// The agent binary under test: `THAW_AGENT_BIN` (e.g. the static one that
/// goes into the guest image) or the one cargo just built.
pub fn agent_bin() -> String {
    std::env::var("THAW_AGENT_BIN").unwrap_or_else(|_| AGENT.to_string())
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Reports a skipped test (or part) on the real stderr, where it shows even
/// though libtest captures the test's output.
pub fn skip(reason: &str) {
    let line = format!("SKIPPED: {reason}\n");
    // SAFETY: write(2) on fd 2 with a valid buffer.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
}

/// Prints a measurement where it shows despite output capture.
pub fn report(line: &str) {
    let line = format!("{line}\n");
    // SAFETY: write(2) on fd 2 with a valid buffer.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
}

pub fn ctx(secs: u64) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(secs).as_nanos() as i64)
}

/// The cgroup v2 mount on this host, if any.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })
}

/// A scratch cgroup v2 subtree: `<base>/agent` holds the agent, `<base>/c`
/// its containers.
pub struct ScratchCgroup {
    pub base: PathBuf,
}

impl ScratchCgroup {
    fn create(name: &str) -> Option<ScratchCgroup> {
        let mount = cgroup2_mount()?;
        let base = mount.join(name);
        fs::create_dir(&base).ok()?;
        fs::create_dir(base.join("agent")).ok()?;
        Some(ScratchCgroup { base })
    }

    pub fn containers(&self) -> PathBuf {
        self.base.join("c")
    }

    /// Controllers the containers' cgroups can use.
    pub fn controllers(&self) -> Vec<String> {
        let mount = self
            .base
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        fs::read_to_string(mount.join("cgroup.controllers"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }
}

fn remove_cgroup_tree(dir: &Path) {
    let _ = fs::write(dir.join("cgroup.freeze"), "0");
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::remove_dir(dir).is_err() && Instant::now() < deadline && dir.exists() {
        let _ = fs::write(dir.join("cgroup.kill"), "1");
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.base);
    }
}

/// Unmounts anything left under `dir` in this (the host's) mount namespace.
fn unmount_below(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A busybox root filesystem in `dir`.
pub fn busybox_rootfs(dir: &Path) {
    for d in [
        "bin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "home/user",
        "root",
    ] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("busybox-static at /bin/busybox");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = symlink("busybox", dir.join("bin").join(applet));
        }
    }
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
    )
    .unwrap();
    fs::write(dir.join("etc/group"), "root:x:0:\ntty:x:5:\nuser:x:1000:\n").unwrap();
    fs::set_permissions(
        dir.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
}

/// The agent process and everything it may leave behind; cleaned on drop.
pub struct Env {
    pub dir: PathBuf,
    agent: Option<Child>,
    pub cgroup: Option<ScratchCgroup>,
}

pub struct Harness {
    // Dropped first: the control connection closes before the agent stops.
    pub client: AgentClient,
    pub dir: PathBuf,
    pub rootfs: PathBuf,
    prefix: PathBuf,
    control_listener: UnixListener,
    next_port: AtomicU32,
    /// From spawning the agent to its control connection arriving.
    pub ready_after: Duration,
    pub env: Env,
}

fn accept_timeout(l: &UnixListener, timeout: Duration) -> std::io::Result<UnixStream> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no connection",
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}

impl Harness {
    /// Starts an agent; `with_cgroup` false runs it without cgroups.
    pub fn start(name: &str, with_cgroup: bool) -> Harness {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the agent's host tests need root (namespaces, mounts, cgroups)"
        );
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let tag = format!("thaw-agent-test-{}-{n}-{name}", std::process::id());
        let dir = std::env::temp_dir().join(&tag);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let rootfs = dir.join("bundle/rootfs");
        busybox_rootfs(&rootfs);
        let cgroup = if with_cgroup {
            let cg = ScratchCgroup::create(&tag);
            if cg.is_none() {
                skip(&format!(
                    "{name}: no cgroup v2 mount on this host; running without cgroups"
                ));
            }
            cg
        } else {
            None
        };
        let prefix = dir.join("vsock.sock");
        let control_listener = UnixListener::bind(host_socket_path(&prefix, 1024)).unwrap();
        let log = fs::File::create(dir.join("agent.log")).unwrap();
        let mut cmd = Command::new(agent_bin());
        cmd.arg("--host")
            .arg(format!("unix://{}", prefix.display()))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--private-mounts")
            .arg("--log-level")
            .arg("debug")
            .arg("--cgroup-root");
        match &cgroup {
            Some(cg) => cmd.arg(cg.containers()),
            None => cmd.arg("none"),
        };
        cmd.stdin(ProcStdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let spawned_at = Instant::now();
        let agent = cmd.spawn().expect("start thaw-agent");
        if let Some(cg) = &cgroup {
            fs::write(cg.base.join("agent/cgroup.procs"), agent.id().to_string()).unwrap();
        }
        let env = Env {
            dir: dir.clone(),
            agent: Some(agent),
            cgroup,
        };
        let stream = match accept_timeout(&control_listener, Duration::from_secs(20)) {
            Ok(s) => s,
            Err(e) => panic!("agent never dialed in: {e}\n{}", env.log()),
        };
        let ready_after = spawned_at.elapsed();
        Harness {
            ready_after,
            client: sync_client(stream).unwrap(),
            dir,
            rootfs,
            prefix,
            control_listener,
            next_port: AtomicU32::new(0x10000),
            env,
        }
    }

    pub fn log(&self) -> String {
        self.env.log()
    }

    pub fn cgroup(&self) -> Option<&ScratchCgroup> {
        self.env.cgroup.as_ref()
    }

    /// Waits for the agent to dial the control port again.
    pub fn reaccept(&mut self) {
        let stream = accept_timeout(&self.control_listener, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("agent did not dial again: {e}\n{}", self.log()));
        self.client = sync_client(stream).unwrap();
    }

    pub fn port(&self) -> u32 {
        self.next_port.fetch_add(1, Ordering::SeqCst)
    }

    pub fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(host_socket_path(&self.prefix, port)).unwrap()
    }

    /// Listeners for a process's stdio.
    pub fn stdio(&self, stdin: bool, stdout: bool, stderr: bool) -> PendingIo {
        let mut s = thaw_agent_protocol::agent::Stdio::new();
        let mk = |on: bool| {
            on.then(|| {
                let p = self.port();
                (p, self.listen(p))
            })
        };
        let i = mk(stdin);
        let o = mk(stdout);
        let e = mk(stderr);
        s.stdin_port = i.as_ref().map(|x| x.0).unwrap_or(0);
        s.stdout_port = o.as_ref().map(|x| x.0).unwrap_or(0);
        s.stderr_port = e.as_ref().map(|x| x.0).unwrap_or(0);
        PendingIo {
            proto: s,
            stdin: i.map(|x| x.1),
            stdout: o.map(|x| x.1),
            stderr: e.map(|x| x.1),
        }
    }

    pub fn create(&self, id: &str, spec: &Value, io: &PendingIo) -> Result<u32, ttrpc::Error> {
        self.create_in(id, "", spec, io)
    }

    pub fn create_in(
        &self,
        id: &str,
        sandbox: &str,
        spec: &Value,
        io: &PendingIo,
    ) -> Result<u32, ttrpc::Error> {
        let mut req = CreateContainerRequest::new();
        req.container_id = id.into();
        req.sandbox_id = sandbox.into();
        req.spec_json = serde_json::to_vec(spec).unwrap();
        let mut r = Rootfs::new();
        r.source = self.rootfs.to_string_lossy().into();
        req.rootfs = protobuf::MessageField::some(r);
        req.stdio = protobuf::MessageField::some(io.proto.clone());
        self.client.create_container(ctx(60), &req).map(|r| r.pid)
    }

    pub fn start_proc(&self, id: &str, exec_id: &str) -> Result<u32, ttrpc::Error> {
        let mut req = StartProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        self.client.start_process(ctx(60), &req).map(|r| r.pid)
    }

    pub fn wait(&self, id: &str, exec_id: &str) -> u32 {
        let mut req = WaitProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        self.client
            .wait_process(ctx(120), &req)
            .expect("wait")
            .exit_status
    }

    pub fn signal(&self, id: &str, exec_id: &str, sig: i32, all: bool) -> Result<(), ttrpc::Error> {
        let mut req = SignalProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.signal = sig as u32;
        req.all = all;
        self.client.signal_process(ctx(10), &req).map(drop)
    }

    pub fn remove(&self, id: &str) {
        let mut req = RemoveContainerRequest::new();
        req.container_id = id.into();
        self.client
            .remove_container(ctx(60), &req)
            .expect("remove container");
    }

    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &Value,
        io: &PendingIo,
    ) -> Result<u32, ttrpc::Error> {
        let mut req = ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.process_json = serde_json::to_vec(process).unwrap();
        req.stdio = protobuf::MessageField::some(io.proto.clone());
        self.client.exec_process(ctx(60), &req).map(|r| r.pid)
    }

    /// Create, start, feed stdin, wait: the common case.
    pub fn run(&self, id: &str, spec: &Value, stdin: Option<&[u8]>) -> RunResult {
        let io = self.stdio(stdin.is_some(), true, true);
        self.create(id, spec, &io)
            .unwrap_or_else(|e| panic!("create {id}: {e:?}\n{}", self.log()));
        let mut streams = io.accept();
        self.start_proc(id, "").expect("start");
        if let Some(data) = stdin {
            let mut s = streams.stdin.take().unwrap();
            s.write_all(data).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let status = self.wait(id, "");
        let (stdout, stderr) = streams.collect();
        self.remove(id);
        RunResult {
            status,
            stdout,
            stderr,
        }
    }

    pub fn events(&self, after: u64, timeout_ms: u32) -> Vec<Event> {
        let mut req = GetEventsRequest::new();
        req.after_seq = after;
        req.timeout_ms = timeout_ms;
        self.client
            .get_events(ctx(30), &req)
            .expect("events")
            .events
    }

    /// Directory entries left in the agent's container state dir.
    pub fn leftover_container_dirs(&self) -> Vec<String> {
        fs::read_dir(self.dir.join("run/c"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Env {
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Mount points the agent sees (it has a mount namespace of its own)
    /// at or below `dir`.
    pub fn agent_mounts_below(&self, dir: &Path) -> Vec<PathBuf> {
        let Some(agent) = &self.agent else {
            return Vec::new();
        };
        let info = fs::read_to_string(format!("/proc/{}/mountinfo", agent.id())).unwrap();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .filter(|p| p.starts_with(dir))
            .collect()
    }

    /// Stops the agent (SIGTERM: it removes its containers), then SIGKILL.
    fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop_agent();
        // Whatever survived the agent (it was SIGKILLed, say) dies with the
        // scratch cgroup.
        self.cgroup.take();
        unmount_below(&self.dir);
        if std::thread::panicking() {
            eprintln!("---- agent log ----\n{}", self.log());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub struct PendingIo {
    pub proto: thaw_agent_protocol::agent::Stdio,
    stdin: Option<UnixListener>,
    stdout: Option<UnixListener>,
    stderr: Option<UnixListener>,
}

fn reader(s: UnixStream) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut s = s;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    })
}

impl PendingIo {
    /// Accepts the connections, unread: (stdin, stdout, stderr).
    pub fn accept_raw(self) -> (Option<UnixStream>, Option<UnixStream>, Option<UnixStream>) {
        let acc = |l: Option<UnixListener>| {
            l.map(|l| accept_timeout(&l, Duration::from_secs(10)).expect("stdio dial"))
        };
        (acc(self.stdin), acc(self.stdout), acc(self.stderr))
    }

    /// Accepts the connections the agent dialed during create/exec.
    pub fn accept(self) -> Streams {
        let acc = |l: Option<UnixListener>| {
            l.map(|l| accept_timeout(&l, Duration::from_secs(10)).expect("stdio dial"))
        };
        Streams {
            stdin: acc(self.stdin),
            stdout: acc(self.stdout).map(reader),
            stderr: acc(self.stderr).map(reader),
        }
    }
}

pub struct Streams {
    pub stdin: Option<UnixStream>,
    pub stdout: Option<JoinHandle<Vec<u8>>>,
    pub stderr: Option<JoinHandle<Vec<u8>>>,
}

impl Streams {
    /// Output of both streams, read to EOF.
    pub fn collect(self) -> (Vec<u8>, Vec<u8>) {
        let join =
            |h: Option<JoinHandle<Vec<u8>>>| h.map(|h| h.join().unwrap()).unwrap_or_default();
        (join(self.stdout), join(self.stderr))
    }
}

pub struct RunResult {
    pub status: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl RunResult {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Capabilities Docker/containerd give containers by default.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// A spec shaped like containerd's default for `ctr run`.
pub fn spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "hostname": "thaw-test",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS, "permitted": DEFAULT_CAPS
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// `process` object for exec.
pub fn process(args: &[&str]) -> Value {
    json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin"],
        "cwd": "/",
        "capabilities": {"bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS, "permitted": DEFAULT_CAPS},
        "noNewPrivileges": true
    })
}

/// Reads `stream` until `needle` has been seen or `timeout` passes.
pub fn read_until(s: &mut UnixStream, needle: &str, timeout: Duration) -> String {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&got).contains(needle) {
                    break;
                }
            }
            Err(_) => {}
        }
    }
    s.set_read_timeout(None).unwrap();
    String::from_utf8_lossy(&got).into_owned()
}
