//! A host-side client for `thaw-agent` running in a VM: the ttrpc client on
//! the control connection the agent dialed, and stdio listeners on
//! `<uds>_<port>`, as the shim uses them.

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thaw_agent_protocol::agent::*;
use thaw_agent_protocol::agent_ttrpc::AgentClient;
use thaw_agent_protocol::transport::{host_socket_path, sync_client};
use thaw_agent_protocol::{protobuf, ttrpc, FIRST_STDIO_PORT};

/// The agent's root image: whatever the cached build script prints.
pub fn root_image() -> PathBuf {
    crate::binaries::vm_assets().root_image.clone()
}

/// A busybox root filesystem: busybox-static and the applets the tests use.
pub fn busybox_rootfs(dir: &Path) {
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "run", "root"] {
        std::fs::create_dir_all(dir.join(d)).expect("creating rootfs dir");
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("busybox-static at /bin/busybox");
    for applet in [
        "echo",
        "true",
        "sh",
        "hostname",
        "head",
        "od",
        "cat",
        "cut",
        "sha256sum",
    ] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))
            .expect("applet symlink");
    }
}

/// A timeout for one call. Generous: guest kernel work is emulated on PVM.
pub fn ctx(secs: u64) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(secs).as_nanos() as i64)
}

/// Accepts one connection within `limit`.
pub fn accept_within(l: &UnixListener, limit: Duration) -> std::io::Result<UnixStream> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + limit;
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
                        "nothing dialed in time",
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A spec shaped like containerd's default, trimmed to what a busybox
/// image needs.
pub fn spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "hostname": "thaw-vm-test",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
        }
    })
}

pub struct RunResult {
    pub exit_status: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// How long each call took, in order: create, start, output EOF,
    /// wait, remove.
    pub phases: [Duration; 5],
}

impl RunResult {
    /// The stdout of a run that must have exited 0 (else the test fails
    /// with its stderr).
    pub fn success_stdout(&self) -> String {
        assert_eq!(
            self.exit_status,
            0,
            "stderr: {}",
            String::from_utf8_lossy(&self.stderr)
        );
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// The agent's control connection plus the stdio ports of one VM.
pub struct AgentConn {
    pub client: AgentClient,
    uds: PathBuf,
    next_port: u32,
    /// How long `run` waits for the process to exit.
    pub exit_timeout: Duration,
    /// The agent sandbox (pod) `run` puts containers in; empty: none.
    pub sandbox_id: String,
}

fn reader(s: UnixStream, limit: Duration) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut s = s;
        // A stalled guest must not hang the test forever.
        let _ = s.set_read_timeout(Some(limit));
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    })
}

impl AgentConn {
    /// A client on `control`, the connection the agent dialed on
    /// `<uds>_1024`.
    pub fn new(control: UnixStream, uds: &Path) -> AgentConn {
        AgentConn {
            client: sync_client(control).expect("ttrpc client"),
            uds: uds.to_path_buf(),
            next_port: FIRST_STDIO_PORT,
            exit_timeout: Duration::from_secs(300),
            sandbox_id: String::new(),
        }
    }

    pub fn health(&self) -> HealthResponse {
        self.client
            .health(ctx(60), &HealthRequest::new())
            .expect("Health")
    }

    fn listen(&mut self) -> (u32, UnixListener) {
        let port = self.next_port;
        self.next_port += 1;
        let path = host_socket_path(&self.uds, port);
        (port, UnixListener::bind(&path).expect("stdio listener"))
    }

    /// Create (rootfs from the block device `device`), start, read stdout
    /// and stderr to EOF, wait, remove.
    pub fn run(&mut self, id: &str, device: &str, spec: &Value) -> RunResult {
        self.run_with(id, device, spec, |_| {})
    }

    /// Like [`AgentConn::run`], calling `after_start` with the agent client
    /// once the process runs (to act on it while it runs).
    pub fn run_with(
        &mut self,
        id: &str,
        device: &str,
        spec: &Value,
        after_start: impl FnOnce(&AgentClient),
    ) -> RunResult {
        let (out_port, out_l) = self.listen();
        let (err_port, err_l) = self.listen();
        let mut stdio = Stdio::new();
        stdio.stdout_port = out_port;
        stdio.stderr_port = err_port;
        let mut rootfs = Rootfs::new();
        rootfs.source = device.into();
        rootfs.fstype = "erofs".into();
        let mut req = CreateContainerRequest::new();
        req.container_id = id.into();
        req.sandbox_id = self.sandbox_id.clone();
        req.spec_json = serde_json::to_vec(spec).expect("spec json");
        req.rootfs = protobuf::MessageField::some(rootfs);
        req.stdio = protobuf::MessageField::some(stdio);
        let mut phases = [Duration::ZERO; 5];
        let mut t = Instant::now();
        let mut lap = |i: usize| {
            phases[i] = t.elapsed();
            t = Instant::now();
        };
        let created = self.client.create_container(ctx(120), &req);
        lap(0);
        // The agent dialed the stdio ports during the call; accept them
        // before judging it, so the listeners go either way.
        let out = accept_within(&out_l, Duration::from_secs(10));
        let err = accept_within(&err_l, Duration::from_secs(10));
        for l in [&out_l, &err_l] {
            if let Ok(a) = l.local_addr() {
                if let Some(p) = a.as_pathname() {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        if let Err(e) = created {
            panic!("CreateContainer {id}: {e:?}");
        }
        let out = reader(out.expect("stdout dial"), self.exit_timeout);
        let err = reader(err.expect("stderr dial"), self.exit_timeout);

        let mut req = StartProcessRequest::new();
        req.container_id = id.into();
        self.client
            .start_process(ctx(120), &req)
            .unwrap_or_else(|e| panic!("StartProcess {id}: {e:?}"));
        after_start(&self.client);
        lap(1);
        let stdout = out.join().expect("stdout reader");
        let stderr = err.join().expect("stderr reader");
        lap(2);
        let mut req = WaitProcessRequest::new();
        req.container_id = id.into();
        let exit_status = self
            .client
            .wait_process(ctx(self.exit_timeout.as_secs().max(1)), &req)
            .unwrap_or_else(|e| panic!("WaitProcess {id}: {e:?}"))
            .exit_status;
        lap(3);
        let mut req = RemoveContainerRequest::new();
        req.container_id = id.into();
        self.client
            .remove_container(ctx(120), &req)
            .unwrap_or_else(|e| panic!("RemoveContainer {id}: {e:?}"));
        lap(4);
        RunResult {
            exit_status,
            stdout,
            stderr,
            phases,
        }
    }
}
