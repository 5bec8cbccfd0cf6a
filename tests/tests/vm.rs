//! End to end through real micro-VMs: containerd -> shim -> thaw-vmm ->
//! guest kernel -> thaw-agent (PID 1) -> container.
//!
//! Run on both test platforms by scripts/test.sh: this machine's KVM and
//! the emulated-SVM guest. The guest kernel and root image come from
//! THAW_KERNEL / THAW_ROOT_IMAGE or the cached build scripts;
//! THAW_TEST_BOOT_TIMEOUT and THAW_TEST_AGENT_TIMEOUT (seconds, default 600)
//! bound the waits for the agent.

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

fn task_status(c: &PrivateContainerd, id: &str) -> String {
    let out = c.ctr(&["tasks", "ls"]);
    out.stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("")
        .to_string()
}

#[test]
fn vm_run_rm_output_and_exit_codes() {
    let c = setup();
    for (cmdline, code, text) in [
        (vec!["echo", "hello from a VM"], 0, "hello from a VM"),
        (vec!["sh", "-c", "echo oops; exit 9"], 9, "oops"),
    ] {
        let id = c.new_id("vmrun");
        let mut args = c.run_args(&["--rm"]);
        args.push(BUSYBOX_REF);
        args.push(&id);
        args.extend(cmdline.iter().copied());
        let out = c.ctr_timeout(&args, RUN_TIMEOUT);
        assert_eq!(out.code(), Some(code), "{}", out.describe());
        assert!(out.stdout.contains(text), "{}", out.describe());
    }
    c.assert_no_leaks();
}

#[test]
fn vm_exec_ps_metrics_pause_resume_kill() {
    let c = setup();
    let id = c.new_id("vmlife");
    let mut args = c.run_args(&["-d"]);
    args.extend([BUSYBOX_REF, id.as_str(), "sleep", "600"]);
    let out = c.ctr_timeout(&args, RUN_TIMEOUT);
    assert!(out.success(), "{}", out.describe());
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
    let out = c.ctr(&["tasks", "ps", &id]);
    assert!(out.stdout.lines().count() >= 2, "{}", out.describe());
    let out = c.ctr(&["tasks", "metrics", &id]);
    assert!(out.stdout.contains("memory.usage"), "{}", out.describe());
    assert!(c.ctr(&["tasks", "pause", &id]).success());
    assert_eq!(task_status(&c, &id), "PAUSED");
    assert!(c.ctr(&["tasks", "resume", &id]).success());
    assert!(c.ctr(&["tasks", "kill", "-s", "SIGKILL", &id]).success());
    wait_for(Duration::from_secs(30), || {
        (task_status(&c, &id) == "STOPPED").then_some(())
    })
    .expect("SIGKILL did not stop the task");
    assert!(c.ctr(&["tasks", "delete", &id]).success());
    assert!(c.ctr(&["containers", "delete", &id]).success());
    c.assert_no_leaks();
}

#[test]
fn vm_kill_9_of_the_vmm_gives_exit_255_within_seconds() {
    let c = setup();
    let id = c.new_id("vmkill");
    let mut args = c.run_args(&["--rm"]);
    args.extend([BUSYBOX_REF, id.as_str(), "sleep", "600"]);
    let mut cmd = c.ctr_cmd(&args);
    let start = Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(RUN_TIMEOUT, || {
        (task_status(&c, &id) == "RUNNING").then_some(())
    })
    .expect("the task never ran");
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
            (task_status(&c, id) == "STOPPED").then_some(())
        });
        assert!(c.ctr(&["tasks", "delete", id]).success());
        assert!(c.ctr(&["containers", "delete", id]).success());
    }
    c.assert_no_leaks();
}
