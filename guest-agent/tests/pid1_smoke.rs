//! The agent as PID 1, as close to the guest as this host allows without a
//! VM: a new pid, mount and network namespace whose init is thaw-agent,
//! chrooted into a read-only root with only the mount points the guest root
//! image has. It must mount its early filesystems, bring up lo, dial in,
//! run a container, and reap orphans reparented to it.

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use thaw_agent_protocol::agent::*;
use thaw_agent_protocol::transport::{host_socket_path, sync_client};

/// The unshare'd namespace and its scratch directory; gone on drop.
struct Pid1Env {
    dir: PathBuf,
    ns: Option<Child>,
    cgroup: PathBuf,
}

impl Pid1Env {
    fn agent_pid(&self) -> Option<i32> {
        let ns = self.ns.as_ref()?;
        let children = fs::read_to_string(format!("/proc/{0}/task/{0}/children", ns.id())).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }
}

impl Drop for Pid1Env {
    fn drop(&mut self) {
        // Killing the namespace's init ends every process in it; its mount
        // namespace, and all the agent's mounts, go with it.
        if let Some(pid) = self.agent_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut ns) = self.ns.take() {
            let _ = ns.kill();
            let _ = ns.wait();
        }
        remove_cgroups(&self.cgroup);
        if std::thread::panicking() {
            eprintln!(
                "---- namespace log ----\n{}",
                fs::read_to_string(self.dir.join("ns.log")).unwrap_or_default()
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn remove_cgroups(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroups(&e.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while dir.exists() && fs::remove_dir(dir).is_err() && Instant::now() < deadline {
        let _ = fs::write(dir.join("cgroup.kill"), "1");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Makes the namespace's root like the guest image: empty mount points, the
/// agent as /sbin/init, and (this binary is not static) the host's /usr for
/// its shared libraries. Then exec's the agent as PID 1 in it.
const BOOT: &str = r#"
set -eu
R=$1; AGENT=$2; SCRATCH=$3; CG=$4
mount -t tmpfs -o mode=0755 root "$R"
mkdir -p "$R/sbin" "$R/proc" "$R/sys" "$R/dev" "$R/run" "$R/tmp" "$R/mnt" "$R/etc" "$R/usr"
ln -s usr/lib "$R/lib"; ln -s usr/lib64 "$R/lib64"
mount --bind /usr "$R/usr"; mount -o remount,bind,ro "$R/usr"
cp "$AGENT" "$R/sbin/thaw-agent"; ln -s thaw-agent "$R/sbin/init"
mount --bind "$SCRATCH" "$R/mnt"
mount -o remount,ro "$R"
exec chroot "$R" /sbin/init thaw_pvm --host unix:///mnt/vsock.sock --cgroup-root "$CG" --log-level warn
"#;

#[test]
fn agent_as_pid1_boots_serves_and_reaps() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let dir = std::env::temp_dir().join(format!("thaw-agent-pid1-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let scratch = dir.join("scratch");
    fs::create_dir_all(dir.join("root")).unwrap();
    busybox_rootfs(&scratch.join("rootfs"));
    let listener = UnixListener::bind(host_socket_path(&scratch.join("vsock.sock"), 1024)).unwrap();
    // The agent mounts its own cgroup2 at /sys/fs/cgroup: its containers'
    // cgroups land in this host's cgroup v2 tree under a unique name.
    let cg_name = format!("thaw-agent-pid1-{}", std::process::id());
    let host_cg = cgroup2_mount()
        .map(|m| m.join(&cg_name))
        .unwrap_or_default();
    let log = fs::File::create(dir.join("ns.log")).unwrap();
    let ns = Command::new("unshare")
        .args([
            "--mount",
            "--pid",
            "--net",
            "--fork",
            "--propagation",
            "private",
            "sh",
            "-c",
            BOOT,
            "boot",
        ])
        .arg(dir.join("root"))
        .arg(agent_bin())
        .arg(&scratch)
        .arg(format!("/sys/fs/cgroup/{cg_name}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("unshare");
    let env = Pid1Env {
        dir: dir.clone(),
        ns: Some(ns),
        cgroup: host_cg.clone(),
    };

    let started = Instant::now();
    listener.set_nonblocking(true).unwrap();
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(_) if started.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("the agent as PID 1 never dialed in: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    println!("namespace start to agent ready: {:?}", started.elapsed());
    let client = sync_client(stream).unwrap();
    let health = client.health(ctx(10), &HealthRequest::new()).unwrap();
    assert!(health.pid1, "the agent does not see itself as PID 1");

    // A container without its own pid namespace: its background child is
    // orphaned to the agent when the container's shell exits.
    let mut s = spec(&["sh", "-c", "ip link show lo | head -1; grep -c ' /dev/pts ' /proc/self/mountinfo; (sleep 0.3 &); echo done"]);
    s["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]);
    s["mounts"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["destination"] != "/proc");
    s["mounts"].as_array_mut().unwrap().insert(
        0,
        json!({"destination": "/proc", "type": "bind", "source": "/proc", "options": ["rbind"]}),
    );
    let stdout_port = 0x10000;
    let out_listener =
        UnixListener::bind(host_socket_path(&scratch.join("vsock.sock"), stdout_port)).unwrap();
    let mut req = CreateContainerRequest::new();
    req.container_id = "c1".into();
    req.spec_json = serde_json::to_vec(&s).unwrap();
    let mut r = Rootfs::new();
    r.source = "/mnt/rootfs".into();
    req.rootfs = protobuf::MessageField::some(r);
    let mut io = thaw_agent_protocol::agent::Stdio::new();
    io.stdout_port = stdout_port;
    req.stdio = protobuf::MessageField::some(io);
    client
        .create_container(ctx(60), &req)
        .unwrap_or_else(|e| panic!("create: {e:?}"));
    let (mut out, _) = out_listener.accept().unwrap();
    let mut start = StartProcessRequest::new();
    start.container_id = "c1".into();
    client.start_process(ctx(30), &start).unwrap();
    let mut wait = WaitProcessRequest::new();
    wait.container_id = "c1".into();
    assert_eq!(client.wait_process(ctx(60), &wait).unwrap().exit_status, 0);
    let mut text = String::new();
    std::io::Read::read_to_string(&mut out, &mut text).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].contains("lo:") && lines[0].contains("UP"),
        "lo not up: {text}"
    );
    assert_eq!(lines[1], "1", "/dev/pts not mounted by the agent: {text}");
    assert_eq!(lines[2], "done");

    // Stats work: the agent mounted cgroup2 and made the container a cgroup.
    let mut creq = ContainerRequest::new();
    creq.container_id = "c1".into();
    match client.stats(ctx(10), &creq) {
        Ok(_) => assert!(host_cg.join("c1").exists(), "container cgroup missing"),
        Err(e) => panic!("stats as PID 1: {e:?}"),
    }

    // The orphaned sleep is reaped by the agent: no zombie children remain.
    std::thread::sleep(Duration::from_millis(800));
    let agent = env.agent_pid().expect("agent pid");
    let children =
        fs::read_to_string(format!("/proc/{agent}/task/{agent}/children")).unwrap_or_default();
    for pid in children.split_whitespace() {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().unwrap_or("").trim().chars().next();
        assert_ne!(state, Some('Z'), "zombie child {pid} of the agent: {stat}");
    }
    let mut rm = RemoveContainerRequest::new();
    rm.container_id = "c1".into();
    client.remove_container(ctx(30), &rm).unwrap();
    assert!(!host_cg.join("c1").exists());
}
