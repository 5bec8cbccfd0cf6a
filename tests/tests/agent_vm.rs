//! The guest agent in a real VM: one cold boot of the agent root image
//! into a template (temporary store), a restore from it, a busybox erofs
//! image attached as /dev/vdb, and containers run through the agent's ttrpc
//! API from the host, exactly as the shim drives it. Reports boot → agent
//! ready, restore → agent ready and create+start+exit of `true` (with the
//! time of each call). `THAW_AGENT_VM_CONSOLE=1` also prints the guest's
//! console after the restore (agent warnings).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thaw_tests::agent::{self, AgentConn};
use thaw_tests::guest::{self, accept_or_exit, control, wait_with_deadline};

/// Kills the VMM if the test fails before stopping it.
struct Vmm(Option<Child>);

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How many live processes have `path` in their command line.
fn processes_mentioning(path: &Path) -> usize {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains(&needle))
        .count()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn busybox_runs_in_the_vm_through_the_agent() {
    let kernel = guest::kernel();
    let root_img = agent::root_image();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    agent::busybox_rootfs(&dir.join("busybox"));
    let busybox_img = dir.join("busybox.erofs");
    guest::erofs_image(&dir.join("busybox"), &busybox_img);

    // One cold boot: the template builder waits for the agent's dial.
    let store = dir.join("store");
    let started = Instant::now();
    let out = Command::new(guest::vmm_binary())
        .args(["template", "build", "--kernel"])
        .arg(kernel)
        .arg("--disk")
        .arg(&root_img)
        .args(["--spare-disks", "2", "--vcpus", "1", "--memory-mib", "128"])
        .args(["--ready", "agent", "--timeout", "600", "--store"])
        .arg(&store)
        .output()
        .unwrap();
    let build_took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "template build failed:\n{stderr}");
    let tdir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tdir.join("template.json")).unwrap()).unwrap();

    // Restore; the agent re-dials the control port on the new socket.
    let uds = dir.join("vm.vsock");
    let api = dir.join("vm.api");
    let control_path = dir.join("vm.vsock_1024");
    let listener = UnixListener::bind(&control_path).unwrap();
    let started = Instant::now();
    let mut vmm = Vmm(Some(
        Command::new(guest::vmm_binary())
            .arg("--restore")
            .arg(&tdir)
            .arg("--vsock-uds")
            .arg(&uds)
            .arg("--api-sock")
            .arg(&api)
            .arg("--serial")
            .arg(dir.join("vm.console"))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let conn = accept_or_exit(
        &listener,
        vmm.0.as_mut().unwrap(),
        Instant::now() + Duration::from_secs(120),
    );
    let restore_ready = started.elapsed();
    let mut agent = AgentConn::new(conn, &uds);

    let health = agent.health();
    assert!(health.pid1, "the agent is not PID 1: {health:?}");
    assert_eq!(
        health.protocol_version,
        thaw_agent_protocol::PROTOCOL_VERSION
    );

    // The busybox image goes into the first spare slot: /dev/vdb.
    let reply = control(
        &api,
        &serde_json::json!({
            "op": "attach_disk", "slot": 0, "path": busybox_img, "read_only": true
        })
        .to_string(),
    );
    assert!(reply.starts_with(r#"{"ok":true"#), "attach_disk: {reply}");

    let r = agent.run(
        "echo",
        "/dev/vdb",
        &agent::spec(&["/bin/busybox", "echo", "hello-from-thaw"]),
    );
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "hello-from-thaw\n",
        "stderr: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(r.exit_status, 0);

    let r = agent.run("exit3", "/dev/vdb", &agent::spec(&["sh", "-c", "exit 3"]));
    assert_eq!(
        r.exit_status,
        3,
        "stderr: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(r.stdout.is_empty());

    let mut runs = Vec::new();
    let mut phases = Vec::new();
    for i in 0..5 {
        let started = Instant::now();
        let r = agent.run(&format!("true{i}"), "/dev/vdb", &agent::spec(&["true"]));
        runs.push(started.elapsed());
        phases.push(r.phases);
        assert_eq!(r.exit_status, 0);
    }
    let true_median = median(runs.clone());

    // Stop: the VMM exits and removes its sockets.
    drop(agent);
    assert_eq!(control(&api, r#"{"op":"stop"}"#).trim(), r#"{"ok":true}"#);
    let mut child = vmm.0.take().unwrap();
    let pid = child.id();
    let status = wait_with_deadline(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(!uds.exists() && !api.exists(), "the VMM left its sockets");
    drop(listener);
    std::fs::remove_file(&control_path).unwrap();
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vm.vsock") || n.starts_with("vm.api"))
        .collect();
    assert!(left.is_empty(), "sockets left: {left:?}");
    assert_eq!(processes_mentioning(dir), 0, "a VMM process survived");

    eprintln!("agent in VM (kernel-side times reflect PVM emulation of guest kernel code here):");
    eprintln!(
        "  cold boot -> agent ready (template build, incl. snapshot of 128 MiB): {build_took:.1?} \
         (builder's own build_ms {})",
        record["build_ms"]
    );
    eprintln!(
        "  guest uptime at the first Health after restore (guest clock: boot -> ready, \
         plus snapshot/restore): {:.1?}",
        Duration::from_nanos(health.uptime_ns)
    );
    eprintln!("  restore -> agent ready (host-side): {restore_ready:.1?}");
    eprintln!("  create+start+exit of `true`: median {true_median:.1?} of {runs:.1?}");
    for p in &phases {
        eprintln!(
            "    create {:.1?}, start {:.1?}, output EOF {:.1?}, wait {:.1?}, remove {:.1?}",
            p[0], p[1], p[2], p[3], p[4]
        );
    }
    if std::env::var_os("THAW_AGENT_VM_CONSOLE").is_some() {
        eprintln!(
            "---- guest console after restore ----\n{}",
            std::fs::read_to_string(dir.join("vm.console")).unwrap_or_default()
        );
    }
}
