//! End to end through real micro-VMs: containerd -> shim -> thaw-vmm ->
//! guest kernel -> thaw-agent (PID 1) -> container.
//!
//! Run on both test platforms by scripts/test.sh: this machine's KVM and
//! the emulated-SVM guest. The guest kernel and root image come from
//! THAW_KERNEL / THAW_ROOT_IMAGE or the cached build scripts;
//! THAW_TEST_BOOT_TIMEOUT and THAW_TEST_AGENT_TIMEOUT (seconds, default 600)
//! bound the waits for the agent.

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use thaw_tests::cmd::{self, wait_for};
use thaw_tests::containerd::processes_matching;
use thaw_tests::image::BUSYBOX_REF;
use thaw_tests::{Backend, PrivateContainerd};

const RUN_TIMEOUT: Duration = Duration::from_secs(900);

fn setup() -> PrivateContainerd {
    let c = PrivateContainerd::start(Backend::Vm);
    c.import_busybox();
    c
}

fn vmm_pid(c: &PrivateContainerd) -> Option<i32> {
    processes_matching(&c.thaw_state.display().to_string(), "-")
        .into_iter()
        .find(|(_, cmd)| cmd.contains("thaw-vmm") && cmd.contains("--api-sock"))
        .map(|(pid, _)| pid)
}

/// A new host directory `name` in a temporary directory (kept while the
/// first value lives), and the `ctr run --mount` that shares it
/// read-write at /data.
fn shared_dir(name: &str) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    let rw = format!("type=bind,src={},dst=/data,options=rbind:rw", dir.display());
    (work, dir, rw)
}

/// Starts `ctr` with `args` (a `ctr run` of task `id`) in the background,
/// its output captured, and returns once the task runs: the child and when
/// it was started.
fn run_until_running(
    c: &PrivateContainerd,
    args: &[&str],
    id: &str,
) -> (std::process::Child, Instant) {
    let start = Instant::now();
    let child = c
        .ctr_cmd(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(RUN_TIMEOUT, || {
        (c.task_status(id) == "RUNNING").then_some(())
    })
    .expect("the task never ran");
    (child, start)
}

/// The parent of a jailed VMM: the waiter that stands in for it.
fn vmm_waiter(vmm: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .map(|p| p.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn vm_run_rm_output_and_exit_codes() {
    let c = setup();
    for (cmdline, code, text) in [
        (vec!["echo", "hello from a VM"], 0, "hello from a VM"),
        (vec!["sh", "-c", "echo oops; exit 9"], 9, "oops"),
    ] {
        let out = c.run_rm("vmrun", &[], &cmdline, RUN_TIMEOUT);
        assert_eq!(out.code(), Some(code), "{}", out.describe());
        assert!(out.stdout.contains(text), "{}", out.describe());
    }
    c.assert_no_leaks();
}

#[test]
fn vm_exec_ps_metrics_pause_resume_kill() {
    let c = setup();
    let id = c.run_detached("vmlife", &["sleep", "600"], RUN_TIMEOUT);
    let out = c.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e",
        &id,
        "sh",
        "-c",
        "echo in-vm; exit 4",
    ]);
    assert_eq!(out.code(), Some(4), "{}", out.describe());
    assert!(out.stdout.contains("in-vm"));
    // containerd sees host pids only, never a guest pid: the pid of the
    // VMM's waiter, the process the shim started (the jailed VMM is pid 1
    // of its own pid namespace, below it).
    let vmm = vmm_waiter(vmm_pid(&c).expect("no thaw-vmm process"));
    let ls = c.ctr(&["tasks", "ls"]);
    let task_pid = ls
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id.as_str()))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_default()
        .to_string();
    assert_eq!(task_pid, vmm, "{}", ls.describe());
    let out = c.ctr(&["tasks", "ps", &id]);
    let pids: Vec<&str> = out
        .stdout
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(!pids.is_empty(), "{}", out.describe());
    assert!(pids.iter().all(|p| *p == vmm), "{}", out.describe());
    let out = c.ctr(&["tasks", "metrics", &id]);
    assert!(out.stdout.contains("memory.usage"), "{}", out.describe());
    assert!(c.ctr(&["tasks", "pause", &id]).success());
    assert_eq!(c.task_status(&id), "PAUSED");
    assert!(c.ctr(&["tasks", "resume", &id]).success());
    c.kill_and_remove(&id, Duration::from_secs(30));
    c.assert_no_leaks();
}

#[test]
fn vm_kill_9_of_the_vmm_gives_exit_255_within_seconds() {
    let c = setup();
    let id = c.new_id("vmkill");
    let mut args = c.run_args(&["--rm"]);
    args.extend([BUSYBOX_REF, id.as_str(), "sleep", "600"]);
    let (child, start) = run_until_running(&c, &args, &id);
    let vmm = vmm_pid(&c).expect("no thaw-vmm process");
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = cmd::wait_with_deadline(child, start, RUN_TIMEOUT);
    assert_eq!(out.code(), Some(255), "{}", out.describe());
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "took {:?}",
        killed.elapsed()
    );
    // The shim says why, with the signal by name (a seccomp kill reads
    // SIGSYS the same way).
    let log = c.containerd_log();
    assert!(
        log.lines()
            .any(|l| l.contains("exited unexpectedly with status 137 (SIGKILL)")),
        "no death reason in the shim log:\n{}",
        thaw_tests::containerd::tail(&log, 40)
    );
    let _ = c.ctr(&["containers", "delete", &id]);
    c.assert_no_leaks();
}

/// A VM that goes over the memory limit of its cgroup on the host (here
/// the test lowers it under a running VM, as a tight pod limit would) is
/// killed there by the OOM killer: the task exits 255 and the shim's log
/// names the OOM killer and the cgroup.
#[test]
fn vm_over_its_cgroup_memory_limit_is_stopped_with_the_reason() {
    let c = setup();
    let (_work, dir, rw) = shared_dir("signal");
    let id = c.new_id("vmcgoom");
    let mut args = c.run_args(&["--rm", "--mount", &rw]);
    // Waits for the go, then dirties 128 MiB of fresh guest memory (dd's
    // buffer): new private pages of the VMM on the host.
    args.extend([
        BUSYBOX_REF,
        id.as_str(),
        "sh",
        "-c",
        "until [ -e /data/go ]; do sleep 0.2; done; \
         dd if=/dev/zero of=/dev/null bs=128M count=1; echo survived; exit 3",
    ]);
    let (child, start) = run_until_running(&c, &args, &id);
    let vmm = vmm_pid(&c).expect("no thaw-vmm process");
    let own = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    // The memory controller's cgroup of the VMM: v1's memory hierarchy, or
    // the unified one.
    let (cg, v1) = match own.lines().find_map(|l| l.split_once(":memory:")) {
        Some((_, rel)) => (format!("/sys/fs/cgroup/memory{}", rel.trim()), true),
        None => {
            let rel = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .expect("a cgroup line");
            (format!("/sys/fs/cgroup{}", rel.trim()), false)
        }
    };
    // ctr gives each container its own cgroup (/<namespace>/<id>): only
    // that one is lowered, never a cgroup the test itself is in.
    assert!(cg.ends_with(&format!("/{id}")), "the VMM's cgroup is {cg}");
    let cg = std::path::Path::new(&cg);
    let (usage, limit) = if v1 {
        ("memory.usage_in_bytes", "memory.limit_in_bytes")
    } else {
        if !cg.join("memory.max").exists() {
            // As kubelet and runc do for pod cgroups: the memory controller
            // on from the root down to the VM's cgroup.
            let mut ancestors: Vec<_> = cg
                .ancestors()
                .skip(1)
                .take_while(|a| a.starts_with("/sys/fs/cgroup"))
                .collect();
            ancestors.reverse();
            for a in ancestors {
                let control = a.join("cgroup.subtree_control");
                let on = std::fs::read_to_string(&control).unwrap_or_default();
                if !on.split_whitespace().any(|c| c == "memory") {
                    std::fs::write(&control, "+memory").unwrap_or_else(|e| {
                        panic!("enabling the memory controller in {}: {e}", a.display())
                    });
                }
            }
        }
        if cg.join("memory.swap.max").exists() {
            std::fs::write(cg.join("memory.swap.max"), "0").unwrap();
        }
        ("memory.current", "memory.max")
    };
    let current: u64 = std::fs::read_to_string(cg.join(usage))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::fs::write(cg.join(limit), (current + (8 << 20)).to_string()).unwrap();
    std::fs::write(dir.join("go"), "").unwrap();
    let out = cmd::wait_with_deadline(child, start, RUN_TIMEOUT);
    assert_eq!(out.code(), Some(255), "{}", out.describe());
    assert!(!out.stdout.contains("survived"), "{}", out.describe());
    let log = c.containerd_log();
    assert!(
        log.lines()
            .any(|l| l.contains("exited unexpectedly with status 137")
                && l.contains("OOM killer")
                && l.contains(&id)),
        "no OOM reason in the shim log:\n{}",
        thaw_tests::containerd::tail(&log, 40)
    );
    let _ = c.ctr(&["containers", "delete", &id]);
    c.assert_no_leaks();
}

#[test]
fn vm_oom_is_reported() {
    let c = setup();
    let mut events = c.ctr_cmd(&["events"]);
    events
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let start = Instant::now();
    let ev = events.spawn().unwrap();
    let id = c.new_id("vmoom");
    let mut args = c.run_args(&["--rm", "--memory-limit", "16777216"]);
    args.extend([
        BUSYBOX_REF,
        id.as_str(),
        "sh",
        "-c",
        "x=0123456789; while true; do x=$x$x; done",
    ]);
    let out = c.ctr_timeout(&args, RUN_TIMEOUT);
    assert_eq!(out.code(), Some(137), "{}", out.describe());
    std::thread::sleep(Duration::from_millis(500));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ev.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let evs = cmd::wait_with_deadline(ev, start, Duration::from_secs(10));
    assert!(
        evs.stdout
            .lines()
            .any(|l| l.contains("/tasks/oom") && l.contains(&id)),
        "{}",
        evs.stdout
    );
    c.assert_no_leaks();
}

#[test]
fn vm_two_containers_get_two_vms() {
    let c = setup();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let id = c.new_id("vmtwo");
        let mut args = c.run_args(&["-d"]);
        args.extend([BUSYBOX_REF, id.as_str(), "sleep", "600"]);
        let out = c.ctr_timeout(&args, RUN_TIMEOUT);
        assert!(out.success(), "{}", out.describe());
        ids.push(id);
    }
    let vmms = processes_matching(&c.thaw_state.display().to_string(), "-")
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("thaw-vmm"))
        .count();
    assert_eq!(vmms, 2);
    for id in &ids {
        let _ = c.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        wait_for(Duration::from_secs(30), || {
            (c.task_status(id) == "STOPPED").then_some(())
        });
        assert!(c.ctr(&["tasks", "delete", id]).success());
        assert!(c.ctr(&["containers", "delete", id]).success());
    }
    c.assert_no_leaks();
}

/// Several pods starting at once all start, each in its own VM. Under
/// load a guest's 2 s vsock connect timeout can expire before its VMM
/// answers; the agent then dials again, and the start must go on.
#[test]
fn vm_concurrent_starts_all_run() {
    const STARTS: usize = 6;
    let c = setup();
    // One start first, as on a node that has run a pod: the template and
    // the image are there (six first starts would each hash the kernel
    // and image for the template's key, and wait for one build).
    let one = Instant::now();
    let out = c.run_rm("vmmany", &[], &["true"], RUN_TIMEOUT);
    assert!(out.success(), "the first start: {}", out.describe());
    let one = one.elapsed();
    let started = Instant::now();
    let runs: Vec<_> = (0..STARTS)
        .map(|i| {
            let id = c.new_id("vmmany");
            let mut args: Vec<String> = c
                .run_args(&["--rm"])
                .iter()
                .map(|a| a.to_string())
                .collect();
            args.extend([
                BUSYBOX_REF.to_string(),
                id,
                "echo".into(),
                format!("start {i} ran"),
            ]);
            let child = c
                .ctr_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (i, child)
        })
        .collect();
    for (i, child) in runs {
        let out = cmd::wait_with_deadline(child, started, RUN_TIMEOUT);
        assert!(
            out.success() && out.stdout.contains(&format!("start {i} ran")),
            "start {i} of {STARTS}: {}",
            out.describe()
        );
    }
    eprintln!(
        "one start took {one:?}; {STARTS} concurrent starts took {:?}",
        started.elapsed()
    );
    c.assert_no_leaks();
}

/// The output of a process arrives in full before its exit status, however
/// slow the host: 2 MB on stdout and 300 kB on stderr, exact. (On a slow
/// host an earlier shim reported the exit after a fixed grace period and
/// lost the rest: 1,585,152 of 2,000,000 bytes.)
#[test]
fn vm_large_output_arrives_in_full_before_the_exit() {
    let c = setup();
    let script = "yes x | head -c 2000000; yes e | head -c 300000 >&2; exit 6";
    let out = c.run_rm("vmbig", &[], &["sh", "-c", script], RUN_TIMEOUT);
    assert_eq!(out.code(), Some(6), "{}", out.describe_short());
    assert_eq!(out.stdout.len(), 2_000_000, "stdout bytes");
    assert!(out.stdout.bytes().step_by(2).all(|b| b == b'x'));
    assert_eq!(out.stderr.len(), 300_000, "stderr bytes");
    c.assert_no_leaks();
}

/// An exec whose shell leaves a child behind that keeps writing (and keeps
/// its stdout open) still returns with the shell's status and output.
#[test]
fn vm_exec_with_a_lingering_writer_returns_its_status() {
    let c = setup();
    let id = c.run_detached("vmlinger", &["sleep", "600"], RUN_TIMEOUT);
    let started = Instant::now();
    let out = c.ctr_timeout(
        &[
            "tasks",
            "exec",
            "--exec-id",
            "linger",
            &id,
            "sh",
            "-c",
            "(while :; do echo child; sleep 0.2; done) & echo parent-done; exit 3",
        ],
        RUN_TIMEOUT,
    );
    assert_eq!(out.code(), Some(3), "{}", out.describe());
    assert!(out.stdout.contains("parent-done"), "{}", out.describe());
    eprintln!(
        "exec with a lingering writer returned after {:?}",
        started.elapsed()
    );
    assert!(c.ctr(&["tasks", "kill", "-s", "SIGKILL", &id]).success());
    wait_for(Duration::from_secs(60), || {
        (c.task_status(&id) == "STOPPED").then_some(())
    })
    .expect("SIGKILL did not stop the task");
    assert!(c.ctr(&["tasks", "delete", &id]).success());
    assert!(c.ctr(&["containers", "delete", &id]).success());
    c.assert_no_leaks();
}

/// Bytes written to `ctr run`'s stdin reach the process in the VM, and its
/// EOF ends `cat`.
#[test]
fn vm_stdin_reaches_the_container_and_eof_ends_it() {
    use std::io::Write;
    let c = setup();
    let id = c.new_id("vmstdin");
    let mut args = c.run_args(&["--rm"]);
    args.extend([BUSYBOX_REF, id.as_str(), "sh", "-c", "cat; echo eof-seen"]);
    let mut cmd = c.ctr_cmd(&args);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let expected = String::from_utf8(input.clone()).unwrap();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&input).unwrap();
    });
    let out = cmd::wait_with_deadline(child, start, RUN_TIMEOUT);
    writer.join().unwrap();
    assert_eq!(out.code(), Some(0), "{}", out.describe_short());
    assert_eq!(
        out.stdout,
        format!("{expected}eof-seen\n"),
        "{}",
        out.describe_short()
    );
    c.assert_no_leaks();
}

/// `ctr run -t`: the process in the VM has a terminal of the client's
/// size, and its output and exit status come back through it.
#[test]
fn vm_tty_run_gets_a_terminal() {
    let c = setup();
    c.check_tty_run("vmtty", RUN_TIMEOUT);
    c.assert_no_leaks();
}

/// A template build that cannot finish in time (here a 1 s deadline) is
/// remembered: the start cold-boots and returns the container's own exit
/// status, and the next start cold-boots at once instead of trying the
/// build again.
#[test]
fn vm_failed_template_build_falls_back_to_a_cold_boot_with_the_containers_status() {
    let store = tempfile::tempdir().unwrap();
    let store_line = format!("template_store = \"{}\"", store.path().display());
    let c = PrivateContainerd::start_with(Backend::Vm, |cfg| {
        let cfg: String = cfg
            .lines()
            .map(|l| {
                if l.starts_with("template_store") {
                    format!("{store_line}\ntemplate_build_timeout_secs = 1\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        assert!(cfg.contains("template_build_timeout_secs = 1"), "{cfg}");
        cfg
    });
    c.import_busybox();
    for round in 0..2 {
        let script = "echo cold-$((3+4)); exit 7";
        let out = c.run_rm("vmcold", &[], &["sh", "-c", script], RUN_TIMEOUT);
        assert_eq!(out.code(), Some(7), "round {round}: {}", out.describe());
        assert!(
            out.stdout.contains("cold-7"),
            "round {round}: {}",
            out.describe()
        );
    }
    let entries: Vec<String> = std::fs::read_dir(store.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock") && !n.ends_with(".in-use") && !n.starts_with(".digests"))
        .collect();
    assert!(
        entries.len() == 1 && entries[0].ends_with(".failed"),
        "expected only a failure record in the store: {entries:?}"
    );
    let log = c.containerd_log();
    assert_eq!(
        log.matches("not retried before").count(),
        1,
        "the second start should skip the build, naming the first failure:\n{}",
        thaw_tests::containerd::tail(&log, 80)
    );
    c.assert_no_leaks();
}

/// `ctr run --cni`: ctr runs CNI in the network namespace of the task's
/// pid (the VMM's, in a namespace the shim made for it) after create; the
/// shim joins that interface to the guest at start. The container gets
/// the address CNI chose and reaches the host through its gateway.
#[test]
fn vm_ctr_run_cni_gets_an_address_and_talks() {
    let cni = thaw_tests::cni::DefaultCni::install("thctr0", 214);
    let c = setup();
    let links_before = host_links();
    // Every connection gets the greeting: the guest's first tries may
    // give up before the answer on a slow host.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let peers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = peers.clone();
    std::thread::spawn(move || {
        use std::io::Write;
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            if let Ok(peer) = s.peer_addr() {
                seen.lock().unwrap().push(peer.ip().to_string());
            }
            let _ = s.write_all(b"hello-from-host\n");
        }
    });
    let script = format!(
        "ip -4 -o addr show eth0; for i in $(seq 30); do out=$(nc -w 10 {} {port} </dev/null) && \
         [ -n \"$out\" ] && {{ echo \"$out\"; exit 0; }}; sleep 0.5; done; exit 1",
        cni.gateway
    );
    let out = c.run_rm("cni", &["--cni"], &["sh", "-c", &script], RUN_TIMEOUT);
    assert!(out.success(), "{}", out.describe());
    assert!(
        out.stdout.contains(&format!("inet {}", cni.prefix)),
        "eth0 has no address from the CNI subnet: {}",
        out.describe()
    );
    assert!(out.stdout.contains("hello-from-host"), "{}", out.describe());
    let peers = peers.lock().unwrap().clone();
    assert!(
        !peers.is_empty() && peers.iter().all(|p| p.starts_with(&cni.prefix)),
        "the host saw connections from {peers:?}"
    );
    c.assert_no_leaks();
    let left: Vec<String> = host_links()
        .difference(&links_before)
        .filter(|l| **l != cni.bridge)
        .cloned()
        .collect();
    assert!(left.is_empty(), "host interfaces left: {left:?}");
    assert!(
        cni.leased().is_empty(),
        "addresses still leased: {:?}",
        cni.leased()
    );
}

fn host_links() -> std::collections::BTreeSet<String> {
    thaw_tests::cri::host_links()
}

/// OCI hooks run on the host, with the VMM's pid in their state: a
/// createRuntime hook sees the VMM and its own network namespace (what
/// nerdctl's networking hook needs), poststop runs at delete, and a
/// failing createRuntime hook fails the run, naming the hook.
#[test]
fn vm_oci_hooks_run_on_the_host_with_the_vmms_pid() {
    let c = setup();
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    thaw_tests::image::populate_rootfs(&rootfs, false);
    let out_dir = work.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let o = out_dir.display();
    let create = format!(
        "cat > {o}/state.json; pid=$(sed -n 's/.*\"pid\":\\([0-9]*\\).*/\\1/p' {o}/state.json); \
         readlink /proc/$pid/ns/net > {o}/netns; tr '\\0' ' ' < /proc/$pid/cmdline > {o}/cmdline"
    );
    let poststop = format!("cat > {o}/poststop.json");
    let spec_for = |hook_script: &str| {
        let base = c.ctr(&["oci", "spec"]);
        assert!(base.success(), "{}", base.describe());
        let mut spec: serde_json::Value = serde_json::from_str(&base.stdout).unwrap();
        spec["root"] = serde_json::json!({"path": rootfs, "readonly": false});
        spec["process"]["args"] = serde_json::json!(["echo", "ran-with-hooks"]);
        spec["hooks"] = serde_json::json!({
            "createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", hook_script]}],
            "poststop": [{"path": "/bin/sh", "args": ["sh", "-c", poststop]}],
        });
        let path = work.path().join(format!("spec-{}.json", hook_script.len()));
        std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
        path
    };
    let spec = spec_for(&create);
    let id = c.new_id("hooks");
    let mut args = c.run_args(&["--rm", "--config", spec.to_str().unwrap()]);
    args.push(&id);
    let out = c.ctr_timeout(&args, RUN_TIMEOUT);
    assert!(out.success(), "{}", out.describe());
    assert!(out.stdout.contains("ran-with-hooks"), "{}", out.describe());
    let read = |f: &str| std::fs::read_to_string(out_dir.join(f)).unwrap_or_default();
    let state: serde_json::Value = serde_json::from_str(&read("state.json")).unwrap();
    assert_eq!(state["id"], id.as_str(), "{state}");
    assert!(
        read("cmdline").contains("thaw-vmm"),
        "the hook's pid is not the VMM: {}",
        read("cmdline")
    );
    let host_netns = std::fs::read_link("/proc/self/ns/net").unwrap();
    let netns = read("netns");
    assert!(netns.starts_with("net:["), "{netns:?}");
    assert_ne!(
        netns.trim(),
        host_netns.to_string_lossy(),
        "the VMM is in the host's network namespace"
    );
    let stopped: serde_json::Value = serde_json::from_str(&read("poststop.json")).unwrap();
    assert_eq!(stopped["status"], "stopped", "{stopped}");

    // A failing createRuntime hook: the run fails and says which hook.
    let failing = spec_for("echo hook-says-no >&2; exit 7");
    let id = c.new_id("hookfail");
    let mut args = c.run_args(&["--rm", "--config", failing.to_str().unwrap()]);
    args.push(&id);
    let out = c.ctr_timeout(&args, RUN_TIMEOUT);
    assert!(!out.success(), "{}", out.describe());
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains("createRuntime hook /bin/sh") && text.contains("hook-says-no"),
        "{}",
        out.describe()
    );
    let _ = c.ctr(&["containers", "delete", &id]);
    c.assert_no_leaks();
}

/// A network namespace path that does not exist, or is not a network
/// namespace, is refused by name, and nothing is left behind.
#[test]
fn vm_a_bogus_network_namespace_is_refused_by_name() {
    let c = setup();
    for (path, says) in [
        ("/var/run/netns/thaw-no-such-netns", "No such file"),
        ("/proc/self/ns/uts", "not a network one"),
    ] {
        let ns = format!("network:{path}");
        let out = c.run_rm("badns", &["--with-ns", &ns], &["true"], RUN_TIMEOUT);
        assert!(!out.success(), "{}", out.describe());
        let text = format!("{}{}", out.stdout, out.stderr);
        assert!(
            text.contains(path) && text.contains(says),
            "{}",
            out.describe()
        );
    }
    c.assert_no_leaks();
}

/// `ctr run --mount type=bind,...`: a host directory shared into the VM
/// (virtio-fs), read-write and read-only, and nothing mounted afterwards.
#[test]
fn vm_ctr_mount_shares_a_host_directory() {
    let c = setup();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("shared");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("in"), "from-the-host\n").unwrap();
    let rw = format!("type=bind,src={},dst=/data,options=rbind:rw", dir.display());
    let ro = format!("type=bind,src={},dst=/ro,options=rbind:ro", dir.display());
    let out = c.run_rm(
        "mount",
        &["--mount", &rw, "--mount", &ro],
        &[
            "sh",
            "-c",
            "cat /data/in; echo from-the-vm > /data/out; echo x > /ro/nope || echo refused",
        ],
        RUN_TIMEOUT,
    );
    assert!(out.success(), "{}", out.describe());
    assert!(out.stdout.contains("from-the-host"), "{}", out.describe());
    assert!(out.stdout.contains("refused"), "{}", out.describe());
    assert!(
        out.stderr.contains("Read-only file system"),
        "{}",
        out.describe()
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("out")).unwrap(),
        "from-the-vm\n"
    );
    assert!(!dir.join("nope").exists());
    c.assert_no_leaks();
    let mounts = thaw_tests::containerd::mounts_under(&c.thaw_state);
    assert!(mounts.is_empty(), "left mounted: {mounts:?}");
}

/// The shim SIGKILLed while its container has a host directory shared in:
/// containerd's `delete` (the shim binary again, from the bundle record)
/// detaches the share's bind mounts and removes the sandbox directory, and
/// the VMM goes too: nothing is left mounted or running.
#[test]
fn vm_a_crashed_shim_leaves_no_share_behind() {
    let c = setup();
    let (_work, dir, rw) = shared_dir("shared");
    let id = c.new_id("share-crash");
    let mut args = c.run_args(&["-d", "--mount", &rw]);
    args.push(BUSYBOX_REF);
    args.push(&id);
    args.extend_from_slice(&["sh", "-c", "echo up > /data/up; sleep 600"]);
    let out = c.ctr_timeout(&args, RUN_TIMEOUT);
    assert!(out.success(), "{}", out.describe());
    assert!(
        wait_for(RUN_TIMEOUT, || {
            (std::fs::read_to_string(dir.join("up")).ok()? == "up\n").then_some(())
        })
        .is_some(),
        "the container never wrote to the share"
    );
    let mounts = thaw_tests::containerd::mounts_under(&c.thaw_state);
    assert!(!mounts.is_empty(), "no share mounted while running");
    c.crash_shim(&id);
    c.assert_no_leaks();
    let mounts = thaw_tests::containerd::mounts_under(&c.thaw_state);
    assert!(mounts.is_empty(), "left mounted: {mounts:?}");
    assert!(dir.join("up").exists(), "the host directory itself is kept");
}

/// The sandbox's VMM is jailed (`vm.jail`, on by default): uid and gid
/// 65534 with only the five kept capabilities, a root holding only its
/// own files (no /etc, no shell, no procfs), no core dumps, its own IPC
/// namespace, a descriptor limit, a system call allow-list on each vCPU
/// and device thread; and through the jail it still restores, attaches the
/// container's disk and serves a volume the shim binds in after the VMM
/// started, files created there owned as the guest asked.
#[test]
fn vm_the_vmm_is_jailed_and_still_serves_disks_and_volumes() {
    let c = setup();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("vol");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("in"), "through the jail").unwrap();
    let rw = format!("type=bind,src={},dst=/data,options=rbind:rw", dir.display());
    let id = c.new_id("jailed");
    let mut args = c.run_args(&["-d", "--mount", &rw]);
    args.extend([BUSYBOX_REF, id.as_str()]);
    args.extend(["sh", "-c", "cat /data/in > /data/copy; sleep 600"]);
    let out = c.ctr_timeout(&args, RUN_TIMEOUT);
    assert!(out.success(), "{}", out.describe());
    let copy = dir.join("copy");
    assert!(
        wait_for(RUN_TIMEOUT, || std::fs::read_to_string(&copy)
            .ok()
            .filter(|t| t == "through the jail"))
        .is_some(),
        "the container's copy through the volume never appeared"
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&copy).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "guest root's file");

    let pid = vmm_pid(&c).expect("a running thaw-vmm");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:"), ["65534"; 4], "{status}");
    assert_eq!(field("Gid:"), ["65534"; 4], "{status}");
    // CHOWN, DAC_OVERRIDE, FOWNER, FSETID, NET_ADMIN.
    for caps in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(field(caps), ["000000000000101b"], "{caps} {status}");
    }
    assert_eq!(field("CapAmb:"), ["0000000000000000"], "{status}");
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    for absent in ["etc/passwd", "bin/sh", "proc/self", "sys/kernel", "root"] {
        assert!(
            !root.join(absent).exists(),
            "/{absent} is visible to the jailed VMM"
        );
    }
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let top = mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .expect("a root mount");
    assert!(top.contains(" ro,") && top.contains(" - tmpfs "), "{top}");
    assert!(
        !mounts.lines().any(|l| l.contains(" - proc ")),
        "a procfs in the jail:\n{mounts}"
    );

    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("a core limit line");
    assert_eq!(
        core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
        ["0", "0"],
        "{core}"
    );
    // Descriptors: at most virtio-fs's bounds and some, soft and hard.
    let files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("an open files line");
    let nofile: Vec<u64> = files
        .split_whitespace()
        .skip(3)
        .take(2)
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(nofile[0] == nofile[1] && nofile[0] <= 132096, "{files}");
    let own = std::fs::read_link("/proc/self/ns/ipc").unwrap();
    let vmm = std::fs::read_link(format!("/proc/{pid}/ns/ipc")).unwrap();
    assert_ne!(own, vmm, "the VMM shares the host's IPC namespace");
    // Its own pid namespace, as its pid 1, below a waiter that stands in
    // for it towards the shim.
    assert_eq!(field("NSpid:").len(), 2, "{status}");
    assert_eq!(field("NSpid:")[1], "1", "{status}");
    assert_ne!(
        std::fs::read_link("/proc/self/ns/pid").unwrap(),
        std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap(),
        "the VMM shares the host's pid namespace"
    );
    let waiter = field("PPid:")[0].to_string();
    let waiter_cmd = std::fs::read(format!("/proc/{waiter}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&waiter_cmd)
            .contains(&format!("--pid-namespace-parent-of\0{pid}\0")),
        "the VMM's parent {waiter} is not its waiter: {waiter_cmd:?}"
    );
    // Every guest-facing thread, and the control thread, runs under its
    // role's allow-list on top of the process filter: two filters; the
    // others (main, launcher) one.
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(task.join("comm")) else {
            continue;
        };
        let comm = comm.trim();
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue;
        };
        let filters = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp_filters:"))
            .map(str::trim)
            .unwrap_or("?");
        let confined =
            comm.starts_with("vcpu") || comm.starts_with("thaw-virtio-") || comm == "control";
        if confined {
            assert_eq!(filters, "2", "thread {comm}: {status}");
        } else if !comm.starts_with("kvm-") {
            assert_eq!(filters, "1", "thread {comm}: {status}");
        }
    }
    c.kill_and_remove(&id, RUN_TIMEOUT);
    c.assert_no_leaks();
    assert_eq!(
        std::fs::read_to_string(dir.join("in")).unwrap(),
        "through the jail"
    );
}

/// A node that caps the size of the files a jailed VMM writes
/// (`vm.jail_max_file_mib`): a container's write past it into a volume's
/// file fails with EFBIG ("File too large"), the file on the host stops at
/// the cap, and the VMM goes on serving the volume.
#[test]
fn vm_a_jailed_vmm_writes_no_file_past_its_size_limit() {
    let c = PrivateContainerd::start_with(Backend::Vm, |cfg| {
        cfg.replace("[vm]\n", "[vm]\njail_max_file_mib = 1\n")
    });
    c.import_busybox();
    let (_work, dir, rw) = shared_dir("shared");
    let out = c.run_rm(
        "fsize",
        &["--mount", &rw],
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/data/big bs=64k count=32; echo dd=$?; \
             echo still served > /data/after && cat /data/after",
        ],
        RUN_TIMEOUT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains("File too large"), "{}", out.describe());
    assert!(!all.contains("dd=0"), "{}", out.describe());
    assert!(out.stdout.contains("still served"), "{}", out.describe());
    let size = std::fs::metadata(dir.join("big")).unwrap().len();
    assert_eq!(size, 1 << 20, "the file on the host");
    c.assert_no_leaks();
}

/// A node that forbids the VMM a system call (`vm.deny_syscalls`, here
/// `getdents64`, which only the virtio-fs server's READDIR makes): the
/// container starts, its `ls` of a shared directory makes the VMM call it,
/// the seccomp filter kills the VMM, and the task exits 255 with the
/// reason, SIGSYS by name, in the shim's log.
#[test]
fn vm_a_forbidden_system_call_kills_the_vmm_and_the_task_exits_255() {
    let c = PrivateContainerd::start_with(Backend::Vm, |cfg| {
        cfg.replace("[vm]\n", "[vm]\ndeny_syscalls = [\"getdents64\"]\n")
    });
    c.import_busybox();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("shared");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("in"), "x").unwrap();
    let rw = format!("type=bind,src={},dst=/data,options=rbind:rw", dir.display());
    let out = c.run_rm(
        "sigsys",
        &["--mount", &rw],
        &[
            "sh",
            "-c",
            "cat /data/in && echo read-ok; ls /data; sleep 600",
        ],
        RUN_TIMEOUT,
    );
    assert_eq!(out.code(), Some(255), "{}", out.describe());
    assert!(out.stdout.contains("read-ok"), "{}", out.describe());
    let log = c.containerd_log();
    assert!(
        log.lines().any(|l| l.contains(
            "with status 159 (SIGSYS: the VMM made a system call its seccomp filter forbids)"
        )),
        "no seccomp death reason in the shim log:\n{}",
        thaw_tests::containerd::tail(&log, 40)
    );
    c.assert_no_leaks();
}
