//! The shim end to end through `ctr` with the host-unisolated backend:
//! real containerd, real shim, the real agent running on the host, real
//! erofs images on loop devices. Everything except the VM boundary.
//! Each test checks that nothing is left behind.

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thaw_tests::binaries::require_agent;
use thaw_tests::cmd::{self, wait_for};
use thaw_tests::containerd::processes_matching;
use thaw_tests::image::{BUSYBOX_REF, CORRUPT_REF, TEST_GID, TEST_UID, TEST_USER};
use thaw_tests::{Backend, PrivateContainerd};

fn setup() -> PrivateContainerd {
    require_agent();
    let c = PrivateContainerd::start(Backend::Host);
    c.import_busybox();
    c
}

/// `ctr run --rm [opts] busybox <id> <cmd...>`.
fn run(c: &PrivateContainerd, opts: &[&str], cmd: &[&str]) -> (String, cmd::Output) {
    let id = c.new_id("run");
    let mut args = c.run_args(&["--rm"]);
    args.extend_from_slice(opts);
    args.push(BUSYBOX_REF);
    args.push(&id);
    args.extend_from_slice(cmd);
    let out = c.ctr_timeout(&args, Duration::from_secs(120));
    (id, out)
}

#[test]
fn run_rm_prints_output_and_returns_exit_codes() {
    let c = setup();
    let (_, out) = run(&c, &[], &["echo", "hello from thaw"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(out.stdout.trim(), "hello from thaw", "{}", out.describe());

    let (_, out) = run(&c, &[], &["sh", "-c", "echo to-stderr >&2; exit 42"]);
    assert_eq!(out.code(), Some(42), "{}", out.describe());
    assert!(out.stderr.contains("to-stderr"), "{}", out.describe());

    let (_, out) = run(&c, &[], &["false"]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    c.assert_no_leaks();
}

#[test]
fn large_output_arrives_complete() {
    let c = setup();
    // 4 MiB through the stream and FIFO, counted on the other side.
    let (_, out) = run(
        &c,
        &[],
        &["sh", "-c", "head -c 4194304 /dev/zero | tr '\\0' x"],
    );
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(out.stdout.len(), 4 << 20);
    c.assert_no_leaks();
}

#[test]
fn env_and_cwd_are_applied() {
    let c = setup();
    let (_, out) = run(
        &c,
        &["--env", "GREETING=hej"],
        &["sh", "-c", "echo $GREETING"],
    );
    assert_eq!(out.stdout.trim(), "hej", "{}", out.describe());

    let (_, out) = run(&c, &["--cwd", "/tmp"], &["pwd"]);
    assert_eq!(out.stdout.trim(), "/tmp", "{}", out.describe());
    c.assert_no_leaks();
}

#[test]
fn stdin_reaches_the_container() {
    let c = setup();
    let id = c.new_id("stdin");
    let mut args = c.run_args(&["--rm"]);
    args.extend([
        BUSYBOX_REF,
        id.as_str(),
        "sh",
        "-c",
        "read line; echo got:$line",
    ]);
    let mut cmd = c.ctr_cmd(&args);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"typed words\n")
        .unwrap();
    let out = cmd::wait_with_deadline(child, start, Duration::from_secs(60));
    assert_eq!(out.stdout.trim(), "got:typed words", "{}", out.describe());
    c.assert_no_leaks();
}

#[test]
fn tty_run_gets_a_terminal() {
    let c = setup();
    c.check_tty_run("tty", Duration::from_secs(60));
    c.assert_no_leaks();
}

/// Starts `cmd` detached and returns its id.
fn detached(c: &PrivateContainerd, prefix: &str, cmd: &[&str]) -> String {
    c.run_detached(prefix, cmd, Duration::from_secs(120))
}

fn remove(c: &PrivateContainerd, id: &str) {
    c.kill_and_remove(id, Duration::from_secs(20));
}

#[test]
fn exec_ps_metrics_pause_resume() {
    let c = setup();
    let id = detached(&c, "life", &["sleep", "600"]);
    assert_eq!(c.task_status(&id), "RUNNING");

    let out = c.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "echo exec-out; exit 5",
    ]);
    assert_eq!(out.code(), Some(5), "{}", out.describe());
    assert!(out.stdout.contains("exec-out"), "{}", out.describe());

    // ctr 1.6 has --user on exec only.
    let ug = format!("{TEST_UID}:{TEST_GID}");
    let out = c.ctr(&["tasks", "exec", "--exec-id", "u1", "--user", &ug, &id, "id"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains(&format!("uid={TEST_UID}({TEST_USER})"))
            && out.stdout.contains(&format!("gid={TEST_GID}")),
        "{}",
        out.describe()
    );

    let out = c.ctr(&["tasks", "ps", &id]);
    assert!(out.success(), "{}", out.describe());
    let pids: Vec<&str> = out
        .stdout
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(!pids.is_empty(), "ps shows the sleep: {}", out.describe());

    let out = c.ctr(&["tasks", "metrics", &id]);
    assert!(out.success(), "{}", out.describe());
    // cgroup v2 metrics as ctr prints them; CPU time is always accounted.
    let cpu = out
        .stdout
        .lines()
        .find(|l| l.starts_with("cpu.usage_usec"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(cpu.is_some_and(|v| v > 0), "{}", out.describe());

    let out = c.ctr(&["tasks", "pause", &id]);
    assert!(out.success(), "{}", out.describe());
    assert_eq!(c.task_status(&id), "PAUSED");
    let out = c.ctr(&["tasks", "resume", &id]);
    assert!(out.success(), "{}", out.describe());
    assert_eq!(c.task_status(&id), "RUNNING");

    remove(&c, &id);
    c.assert_no_leaks();
}

#[test]
fn kill_sigterm_and_sigkill() {
    let c = setup();
    // A shell that exits 3 on SIGTERM.
    let id = detached(
        &c,
        "term",
        &[
            "sh",
            "-c",
            "trap 'exit 3' TERM; while true; do sleep 0.1; done",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let out = c.ctr(&["tasks", "kill", "-s", "SIGTERM", &id]);
    assert!(out.success(), "{}", out.describe());
    let stopped = wait_for(Duration::from_secs(20), || {
        (c.task_status(&id) == "STOPPED").then_some(())
    });
    assert!(stopped.is_some(), "SIGTERM did not stop the task");
    let out = c.ctr(&["tasks", "delete", &id]);
    assert!(
        out.stdout.contains("3") || out.success(),
        "{}",
        out.describe()
    );
    let _ = c.ctr(&["containers", "delete", &id]);

    let id = detached(&c, "kill", &["sleep", "600"]);
    let out = c.ctr(&["tasks", "kill", "-s", "SIGKILL", &id]);
    assert!(out.success(), "{}", out.describe());
    let stopped = wait_for(Duration::from_secs(20), || {
        (c.task_status(&id) == "STOPPED").then_some(())
    });
    assert!(stopped.is_some(), "SIGKILL did not stop the task");
    let out = c.ctr(&["tasks", "delete", &id]);
    assert!(out.success(), "{}", out.describe());
    let _ = c.ctr(&["containers", "delete", &id]);
    c.assert_no_leaks();
}

#[test]
fn two_containers_at_once() {
    let c = setup();
    let a = detached(&c, "twoa", &["sleep", "600"]);
    let b = detached(&c, "twob", &["sleep", "600"]);
    assert_eq!(c.task_status(&a), "RUNNING");
    assert_eq!(c.task_status(&b), "RUNNING");
    // Same image, one cache entry, two references.
    assert_eq!(c.cache_entries().len(), 1);
    let refs = c
        .image_ref_dirs()
        .iter()
        .map(|d| std::fs::read_dir(d).unwrap().count())
        .sum::<usize>();
    assert_eq!(refs, 2);
    // In this namespace's own directory; the cache is owner-only.
    let ns_dir = c
        .thaw_state
        .join("images/ns")
        .join(thaw_tests::containerd::NAMESPACE);
    assert!(c.cache_entries()[0].starts_with(&ns_dir));
    assert_owner_only(&c.thaw_state.join("images"));
    // Each sandbox's directory is 0700, its sockets and log 0600.
    let mut sandboxes = 0;
    for sb in std::fs::read_dir(c.thaw_state.join("run/sandboxes")).unwrap() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let sb = sb.unwrap().path();
        sandboxes += 1;
        assert_eq!(std::fs::metadata(&sb).unwrap().mode() & 0o7777, 0o700);
        for e in std::fs::read_dir(&sb).unwrap().flatten() {
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            if md.file_type().is_socket() || e.file_name() == "sandbox.log" {
                assert_eq!(md.mode() & 0o7777, 0o600, "{}", e.path().display());
            }
        }
    }
    assert_eq!(sandboxes, 2);
    remove(&c, &a);
    assert_eq!(c.task_status(&b), "RUNNING", "b survives a's removal");
    remove(&c, &b);
    c.assert_no_leaks();
}

#[test]
fn corrupt_rootfs_fails_readably_and_leaves_nothing() {
    let c = setup();
    c.import_image(CORRUPT_REF, true);
    let id = c.new_id("corrupt");
    let mut args = c.run_args(&["--rm"]);
    args.extend([CORRUPT_REF, id.as_str(), "/bin/sh", "-c", "true"]);
    let out = c.ctr_timeout(&args, Duration::from_secs(120));
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr.to_lowercase().contains("exec format error") || out.stderr.contains("/bin/sh"),
        "{}",
        out.describe()
    );
    let _ = c.ctr(&["containers", "delete", &id]);
    c.assert_no_leaks();
}

#[test]
fn killing_the_agent_gives_exit_255_within_seconds() {
    let c = setup();
    let id = c.new_id("agentkill");
    let mut args = c.run_args(&["--rm"]);
    args.extend([BUSYBOX_REF, id.as_str(), "sleep", "600"]);
    let mut cmd = c.ctr_cmd(&args);
    let start = Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The agent is the sandbox process of the host backend.
    let agent = wait_for(Duration::from_secs(60), || {
        thaw_tests::containerd::processes_matching(&c.thaw_state.display().to_string(), "-")
            .into_iter()
            .find(|(_, cmd)| cmd.contains("thaw-agent") && cmd.contains("--host"))
            .map(|(pid, _)| pid)
    })
    .expect("agent process did not appear");
    wait_for(Duration::from_secs(30), || {
        (c.task_status(&id) == "RUNNING").then_some(())
    })
    .expect("task never ran");
    let killed_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = cmd::wait_with_deadline(child, start, Duration::from_secs(60));
    let took = killed_at.elapsed();
    assert_eq!(out.code(), Some(255), "{}", out.describe());
    assert!(took < Duration::from_secs(10), "exit took {took:?}");
    let _ = c.ctr(&["containers", "delete", &id]);
    c.assert_no_leaks();
}

#[test]
fn events_are_published_in_order() {
    let c = setup();
    let mut events = c.ctr_cmd(&["events"]);
    events
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let start = Instant::now();
    let ev_child = events.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let id = detached(&c, "events", &["sleep", "600"]);
    let out = c.ctr(&["tasks", "exec", "--exec-id", "ex1", &id, "true"]);
    assert!(out.success(), "{}", out.describe());
    remove(&c, &id);
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ev_child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = cmd::wait_with_deadline(ev_child, start, Duration::from_secs(10));
    let topics: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains(&id))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("/tasks/")))
        .collect();
    let expected = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/exit",
        "/tasks/delete",
    ];
    assert_eq!(topics, expected, "{}", out.stdout);
    c.assert_no_leaks();
}

fn agents(c: &PrivateContainerd) -> Vec<i32> {
    thaw_tests::containerd::processes_matching(&c.thaw_state.display().to_string(), "-")
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("thaw-agent") && cmd.contains("--host"))
        .map(|(pid, _)| pid)
        .collect()
}

#[test]
fn pod_containers_share_the_sandbox_shim_and_vm() {
    let c = setup();
    let sb = c.new_id("pod");
    let sb_type = "io.kubernetes.cri.container-type=sandbox".to_string();
    let sb_id = format!("io.kubernetes.cri.sandbox-id={sb}");
    let app_type = "io.kubernetes.cri.container-type=container".to_string();
    let mut args = c.run_args(&["-d", "--annotation", &sb_type, "--annotation", &sb_id]);
    args.extend([BUSYBOX_REF, sb.as_str(), "sleep", "600"]);
    let out = c.ctr_timeout(&args, Duration::from_secs(120));
    assert!(out.success(), "{}", out.describe());

    let app = c.new_id("app");
    let mut args = c.run_args(&["-d", "--annotation", &app_type, "--annotation", &sb_id]);
    args.extend([BUSYBOX_REF, app.as_str(), "sleep", "600"]);
    let out = c.ctr_timeout(&args, Duration::from_secs(120));
    assert!(out.success(), "{}", out.describe());
    assert_eq!(c.task_status(&sb), "RUNNING");
    assert_eq!(c.task_status(&app), "RUNNING");
    assert_eq!(c.shim_daemons().len(), 1, "one shim for the pod");
    assert_eq!(agents(&c).len(), 1, "one sandbox (VM) for the pod");
    // The app's shim address is the sandbox's, by containerd's formula.
    let sock = thaw_tests::containerd::shim_socket_path(
        &c.address,
        thaw_tests::containerd::NAMESPACE,
        &sb,
    );
    assert!(sock.exists(), "{} missing", sock.display());

    let out = c.ctr(&["tasks", "exec", "--exec-id", "e", &app, "echo", "in-app"]);
    assert!(out.stdout.contains("in-app"), "{}", out.describe());

    // Removing the app leaves the pod running.
    remove(&c, &app);
    assert_eq!(c.task_status(&sb), "RUNNING");
    assert_eq!(c.shim_daemons().len(), 1);
    remove(&c, &sb);
    c.assert_no_leaks();
}

#[test]
fn pod_member_without_its_sandbox_is_refused() {
    let c = setup();
    let app = c.new_id("orphan");
    let sb_id = "io.kubernetes.cri.sandbox-id=no-such-sandbox".to_string();
    let app_type = "io.kubernetes.cri.container-type=container".to_string();
    let mut args = c.run_args(&["--rm", "--annotation", &app_type, "--annotation", &sb_id]);
    args.extend([BUSYBOX_REF, app.as_str(), "true"]);
    let out = c.ctr_timeout(&args, Duration::from_secs(60));
    assert!(!out.success(), "{}", out.describe());
    assert!(out.stderr.contains("no-such-sandbox"), "{}", out.describe());
    let _ = c.ctr(&["containers", "delete", &app]);
    c.assert_no_leaks();
}

#[test]
fn unused_images_are_collected_beyond_the_budget() {
    require_agent();
    let c = PrivateContainerd::start_with(Backend::Host, |cfg| {
        cfg.replace("keep_unused_mib = 64", "keep_unused_mib = 0")
    });
    c.import_busybox();
    let id = detached(&c, "gc", &["sleep", "600"]);
    assert_eq!(c.cache_entries().len(), 1, "in use: kept");
    remove(&c, &id);
    assert!(
        wait_for(Duration::from_secs(10), || c
            .cache_entries()
            .is_empty()
            .then_some(()))
        .is_some(),
        "budget 0: the image goes with its last user: {:?}",
        c.cache_entries()
    );
    c.assert_no_leaks();
}

#[test]
fn a_crashed_shim_is_cleaned_up_by_delete() {
    let c = setup();
    let id = detached(&c, "crash", &["sleep", "600"]);
    // containerd notices the dead shim and runs `containerd-shim-thaw-v2 delete`.
    c.crash_shim(&id);
    c.assert_no_leaks();
}

/// containerd runs `containerd-shim-thaw-v2 delete` as the daemon shuts
/// down, and any client may connect then. ttrpc's sync server can wait
/// forever for a connection accepted during its shutdown; the daemon must
/// exit all the same.
#[test]
fn a_shim_exits_even_with_clients_connecting_while_it_shuts_down() {
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let c = setup();
    let id = detached(&c, "connect", &["sleep", "600"]);
    let sock = thaw_tests::containerd::shim_socket_path(
        &c.address,
        thaw_tests::containerd::NAMESPACE,
        &id,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    let knockers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, accepted, sock) = (stop.clone(), accepted.clone(), sock.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if UnixStream::connect(&sock).is_ok() {
                        accepted.fetch_add(1, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            })
        })
        .collect();
    remove(&c, &id);
    // Until the daemon is gone or the leak check below gives up on it.
    let _ = wait_for(Duration::from_secs(15), || {
        c.shim_daemons().is_empty().then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    for k in knockers {
        k.join().unwrap();
    }
    assert!(
        accepted.load(Ordering::SeqCst) > 0,
        "no connection reached the shim"
    );
    c.assert_no_leaks();
}

/// containerd gives a task delete 10 s when it handles an exit, retries
/// one that takes longer while the first still runs, and sends Shutdown
/// after the retry. On a slow guest that left the pod's shim and VM
/// running for good (the PVM `cri` run of 2026-12-02). A poststop hook
/// that sleeps makes the delete slow here: the retry must not repeat it,
/// and the shim must exit once the first delete ends.
/// A spec running `true` on a fresh rootfs under `work`, with `hooks`.
fn spec_with_hooks(c: &PrivateContainerd, work: &Path, hooks: serde_json::Value) -> PathBuf {
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    thaw_tests::image::populate_rootfs(&rootfs, false);
    let base = c.ctr(&["oci", "spec"]);
    assert!(base.success(), "{}", base.describe());
    let mut spec: serde_json::Value = serde_json::from_str(&base.stdout).unwrap();
    spec["root"] = serde_json::json!({"path": rootfs, "readonly": false});
    spec["process"]["args"] = serde_json::json!(["true"]);
    spec["hooks"] = hooks;
    let spec_path = work.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
    spec_path
}

/// A hook that appends a line to `runs` and then sleeps `secs`.
fn counting_hook(runs: &Path, secs: u32) -> serde_json::Value {
    serde_json::json!([{"path": "/bin/sh", "args": ["sh", "-c",
        format!("echo ran >> {}; sleep {secs}", runs.display())]}])
}

/// A detached `true` whose poststop hook appends a line to `hook_runs`
/// and then sleeps `hook_secs`, run until it stopped.
fn stopped_with_poststop_hook(
    c: &PrivateContainerd,
    work: &Path,
    hook_runs: &Path,
    hook_secs: u32,
) -> String {
    let spec_path = spec_with_hooks(
        c,
        work,
        serde_json::json!({"poststop": counting_hook(hook_runs, hook_secs)}),
    );
    let id = c.new_id("slowdel");
    let mut args = c.run_args(&["-d", "--config", spec_path.to_str().unwrap()]);
    args.push(&id);
    let out = c.ctr_timeout(&args, Duration::from_secs(120));
    assert!(out.success(), "{}", out.describe());
    wait_for(Duration::from_secs(30), || {
        (c.task_status(&id) == "STOPPED").then_some(())
    })
    .unwrap_or_else(|| panic!("task {id} did not stop: {}", c.task_status(&id)));
    id
}

/// `ctr run` interrupted while the shim creates the task: containerd
/// deletes the task and sends Shutdown while the create still runs. The
/// create is undone and the shim exits after it, with nothing left.
#[test]
fn a_start_interrupted_during_the_create_leaves_nothing_behind() {
    let c = setup();
    let work = tempfile::tempdir().unwrap();
    let hook_runs = work.path().join("create-runs");
    let spec_path = spec_with_hooks(
        &c,
        work.path(),
        serde_json::json!({"createRuntime": counting_hook(&hook_runs, 5)}),
    );
    let id = c.new_id("interrupted");
    let mut args = c.run_args(&["--config", spec_path.to_str().unwrap()]);
    args.push(&id);
    let out = c.ctr_timeout(&args, Duration::from_secs(2));
    assert!(
        !out.success(),
        "ctr was to be stopped mid-create: {}",
        out.describe()
    );
    assert_hook_ran_once(&hook_runs);
    assert_shims_exit_within(
        &c,
        Duration::from_secs(20),
        "containerd gave up on its create",
    );
    let _ = c.ctr(&["containers", "delete", &id]);
    c.assert_no_leaks();
}

/// Fails unless every shim has exited within `limit`; `when` says what
/// should have ended it.
fn assert_shims_exit_within(c: &PrivateContainerd, limit: Duration, when: &str) {
    let gone = wait_for(limit, || c.shim_daemons().is_empty().then_some(()));
    assert!(
        gone.is_some(),
        "the shim still runs {limit:?} after {when}: {:?}",
        c.shim_daemons()
    );
}

/// Fails unless the hook that counts in `runs` ran exactly once.
fn assert_hook_ran_once(runs: &Path) {
    let lines = std::fs::read_to_string(runs).unwrap_or_default();
    assert_eq!(
        lines.lines().count(),
        1,
        "hook runs in {}: {lines:?}",
        runs.display()
    );
}

/// A ttrpc Task client on the shim's socket, as containerd holds one.
fn shim_task_client(c: &PrivateContainerd, id: &str) -> containerd_shim_protos::TaskClient {
    let sock =
        thaw_tests::containerd::shim_socket_path(&c.address, thaw_tests::containerd::NAMESPACE, id);
    containerd_shim_protos::TaskClient::new(
        containerd_shim_protos::ttrpc::Client::connect(&format!("unix://{}", sock.display()))
            .unwrap(),
    )
}

#[test]
fn a_slow_delete_retried_and_then_shut_down_still_ends_the_shim() {
    use containerd_shim_protos::api;
    use containerd_shim_protos::ttrpc::context;

    let c = setup();
    let work = tempfile::tempdir().unwrap();
    let hook_runs = work.path().join("poststop-runs");
    let id = stopped_with_poststop_hook(&c, work.path(), &hook_runs, 4);
    let ctx = || context::with_timeout(30_000_000_000);
    let delete = |task: containerd_shim_protos::TaskClient, id: String| {
        std::thread::spawn(move || {
            task.delete(
                ctx(),
                &api::DeleteRequest {
                    id,
                    ..Default::default()
                },
            )
        })
    };
    let first = delete(shim_task_client(&c, &id), id.clone());
    std::thread::sleep(Duration::from_secs(1));
    let retry = delete(shim_task_client(&c, &id), id.clone());
    std::thread::sleep(Duration::from_millis(500));
    // As containerd after the retry: Shutdown while the first delete runs.
    let shutdown = shim_task_client(&c, &id).shutdown(
        ctx(),
        &api::ShutdownRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    assert!(shutdown.is_ok(), "{shutdown:?}");
    // The first delete ends in the hook's 4 s; its answer may be lost to
    // the shim's exit right after it. The retry waits for it and gets the
    // same answer, without deleting again.
    let _ = first.join().unwrap();
    let retried = retry.join().unwrap();
    assert!(
        retried.as_ref().is_ok_and(|r| r.exit_status == 0),
        "the retried delete: {retried:?}"
    );
    assert_hook_ran_once(&hook_runs);
    assert_shims_exit_within(
        &c,
        Duration::from_secs(15),
        "its last container was deleted and it was asked to exit",
    );
    let _ = c.ctr(&["containers", "delete", &id]);
    c.assert_no_leaks();
}

/// containerd's CRI plugin, when a sandbox's delete outlived its 10 s:
/// it retries later by asking for the task's state, killing it, waiting
/// for it and deleting it, then sends Shutdown. Here the first delete has
/// long ended by then.
#[test]
fn a_deleted_task_still_answers_containerds_retry_and_its_shim_exits_unasked() {
    use containerd_shim_protos::api;
    use containerd_shim_protos::ttrpc::{context, Code, Error};
    use containerd_shim_protos::types::task::Status;

    let c = setup();
    let work = tempfile::tempdir().unwrap();
    let hook_runs = work.path().join("poststop-runs");
    let id = stopped_with_poststop_hook(&c, work.path(), &hook_runs, 0);
    let task = shim_task_client(&c, &id);
    let ctx = || context::with_timeout(10_000_000_000);
    let delete = || {
        task.delete(
            ctx(),
            &api::DeleteRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
    };
    let first = delete().unwrap();
    assert_eq!(first.exit_status, 0);

    let st = task
        .state(
            ctx(),
            &api::StateRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(st.status.enum_value_or_default(), Status::STOPPED);
    assert_eq!((st.pid, st.exit_status), (first.pid, 0));
    let kill = task.kill(
        ctx(),
        &api::KillRequest {
            id: id.clone(),
            signal: 9,
            all: true,
            ..Default::default()
        },
    );
    assert!(
        matches!(&kill, Err(Error::RpcStatus(s)) if s.code() == Code::NOT_FOUND),
        "kill of a deleted task: {kill:?}"
    );
    let waited = task
        .wait(
            ctx(),
            &api::WaitRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(waited.exit_status, 0);
    let again = delete().unwrap();
    assert_eq!((again.pid, again.exit_status), (first.pid, 0));
    assert_eq!(again.exited_at, first.exited_at);
    assert_hook_ran_once(&hook_runs);

    // No Shutdown comes: the shim goes on its own after 30 s.
    assert_shims_exit_within(
        &c,
        Duration::from_secs(45),
        "its last container was deleted, with no Shutdown",
    );
    // containerd noticed: the task is gone, the container can go.
    let rm = c.ctr(&["containers", "delete", &id]);
    assert!(rm.success(), "{}", rm.describe());
    c.assert_no_leaks();
}

#[test]
fn every_task_method_is_answered_on_the_shim_socket() {
    use containerd_shim_protos::api;
    use containerd_shim_protos::ttrpc::{context, Code, Error};
    use containerd_shim_protos::TaskClient;

    let c = setup();
    let id = detached(&c, "api", &["sleep", "600"]);
    let sock = thaw_tests::containerd::shim_socket_path(
        &c.address,
        thaw_tests::containerd::NAMESPACE,
        &id,
    );
    let client =
        containerd_shim_protos::ttrpc::Client::connect(&format!("unix://{}", sock.display()))
            .unwrap();
    let task = TaskClient::new(client);
    let ctx = || context::with_timeout(10_000_000_000);
    let code = |r: Result<(), Error>| match r {
        Ok(()) => Code::OK,
        Err(Error::RpcStatus(s)) => s.code(),
        Err(e) => panic!("transport error {e:?}"),
    };

    let st = task
        .state(
            ctx(),
            &api::StateRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        st.status.enum_value_or_default(),
        containerd_shim_protos::types::task::Status::RUNNING
    );
    let cr = task
        .connect(
            ctx(),
            &api::ConnectRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(c.shim_daemons(), vec![cr.shim_pid as i32]);
    assert!(task
        .pids(
            ctx(),
            &api::PidsRequest {
                id: id.clone(),
                ..Default::default()
            }
        )
        .is_ok());
    assert!(task
        .stats(
            ctx(),
            &api::StatsRequest {
                id: id.clone(),
                ..Default::default()
            }
        )
        .is_ok());
    // Update without resources is a caller's mistake, said so.
    let r = task.update(
        ctx(),
        &api::UpdateTaskRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    assert_eq!(code(r.map(|_| ())), Code::INVALID_ARGUMENT);
    let r = task.checkpoint(
        ctx(),
        &api::CheckpointTaskRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    assert_eq!(code(r.map(|_| ())), Code::UNIMPLEMENTED);
    let r = task.resize_pty(
        ctx(),
        &api::ResizePtyRequest {
            id: id.clone(),
            width: 80,
            height: 24,
            ..Default::default()
        },
    );
    assert_eq!(
        code(r.map(|_| ())),
        Code::FAILED_PRECONDITION,
        "no terminal"
    );
    let r = task.close_io(
        ctx(),
        &api::CloseIORequest {
            id: id.clone(),
            stdin: true,
            ..Default::default()
        },
    );
    assert_eq!(code(r.map(|_| ())), Code::OK);
    let r = task.exec(
        ctx(),
        &api::ExecProcessRequest {
            id: id.clone(),
            exec_id: "nospec".into(),
            ..Default::default()
        },
    );
    assert_eq!(code(r.map(|_| ())), Code::INVALID_ARGUMENT);
    let r = task.delete(
        ctx(),
        &api::DeleteRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    assert_eq!(code(r.map(|_| ())), Code::FAILED_PRECONDITION, "running");
    let r = task.create(
        ctx(),
        &api::CreateTaskRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    assert_eq!(code(r.map(|_| ())), Code::ALREADY_EXISTS);
    let r = task.wait(
        ctx(),
        &api::WaitRequest {
            id: id.clone(),
            exec_id: "nosuch".into(),
            ..Default::default()
        },
    );
    assert_eq!(
        code(r.map(|_| ())),
        Code::NOT_FOUND,
        "an unknown exec is the one legitimate NOT_FOUND"
    );
    let r = task.shutdown(
        ctx(),
        &api::ShutdownRequest {
            id: id.clone(),
            ..Default::default()
        },
    );
    assert_eq!(code(r.map(|_| ())), Code::OK);
    assert_eq!(
        c.task_status(&id),
        "RUNNING",
        "shutdown with a live container is ignored"
    );
    drop(task);

    let out = c.ctr(&["tasks", "checkpoint", &id]);
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr.contains("not supported by thaw"),
        "{}",
        out.describe()
    );
    remove(&c, &id);
    c.assert_no_leaks();
}

#[test]
fn native_snapshotter_and_plain_rootfs_dirs_work() {
    let c = setup();
    let (_, out) = run(
        &c,
        &["--snapshotter", "native"],
        &["grep", "-c", TEST_USER, "/etc/passwd"],
    );
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(out.stdout.trim(), "1", "{}", out.describe());

    // `ctr run --rootfs DIR`: no snapshot, the spec's root.path.
    let dir = c.dir().join("plain-rootfs");
    thaw_tests::image::populate_rootfs(&dir, false);
    std::fs::write(dir.join("etc/marker"), "from a plain dir\n").unwrap();
    let id = c.new_id("rootfsdir");
    let mut args = c.run_args(&["--rm", "--rootfs"]);
    let d = dir.to_str().unwrap();
    args.extend([d, id.as_str(), "cat", "/etc/marker"]);
    let out = c.ctr_timeout(&args, Duration::from_secs(120));
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(out.stdout.trim(), "from a plain dir", "{}", out.describe());
    c.assert_no_leaks();
}

/// User + system CPU time of a process so far.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesized command name; utime and stime are the
    // 14th and 15th fields of the line, in clock ticks.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis((f[0] + f[1]) * 1000 / hz)
}

#[test]
fn tasks_survive_a_containerd_restart_and_still_report_exits() {
    let mut c = setup();
    let id = detached(&c, "restart", &["sleep", "600"]);
    // While containerd is down the shim's log pipe has no reader: the shim
    // must wait quietly, not spin on SIGPIPE.
    let shim = processes_matching(&format!("-id {id} "), "-")
        .into_iter()
        .find(|(_, cmdline)| cmdline.contains("containerd-shim-thaw-v2"))
        .map(|(pid, _)| pid)
        .expect("the task's shim process");
    c.stop_containerd();
    let busy = cpu_time(shim);
    std::thread::sleep(Duration::from_secs(2));
    let busy = cpu_time(shim) - busy;
    assert!(
        busy < Duration::from_millis(500),
        "the shim used {busy:?} of CPU in 2 s without containerd"
    );
    c.start_containerd();
    assert_eq!(
        c.task_status(&id),
        "RUNNING",
        "the shim and its task outlive containerd"
    );
    // The exit event must reach the new containerd: the shim's old
    // connection for events is dead and it has to reconnect.
    let mut events = c.ctr_cmd(&["events"]);
    events
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let start = Instant::now();
    let ev = events.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = c.ctr(&["tasks", "kill", "-s", "SIGKILL", &id]);
    assert!(out.success(), "{}", out.describe());
    let stopped = wait_for(Duration::from_secs(20), || {
        (c.task_status(&id) == "STOPPED").then_some(())
    });
    assert!(stopped.is_some(), "status {}", c.task_status(&id));
    std::thread::sleep(Duration::from_millis(500));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ev.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let evs = cmd::wait_with_deadline(ev, start, Duration::from_secs(10));
    assert!(
        evs.stdout
            .lines()
            .any(|l| l.contains("/tasks/exit") && l.contains(&id)),
        "no exit event after the restart: {}",
        evs.stdout
    );
    assert!(c.ctr(&["tasks", "delete", &id]).success());
    assert!(c.ctr(&["containers", "delete", &id]).success());
    c.assert_no_leaks();
}

/// Every directory under `root` (and `root`) is 0700, every other entry 0600.
fn assert_owner_only(root: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let md = std::fs::symlink_metadata(&d).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o700, "{}", d.display());
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p);
            } else {
                assert_eq!(md.mode() & 0o7777, 0o600, "{}", p.display());
            }
        }
    }
}
