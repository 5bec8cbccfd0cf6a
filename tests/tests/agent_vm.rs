//! The guest agent in a real VM: one cold boot of the agent root image
//! into a template (temporary store), a restore from it, a busybox erofs
//! image attached as /dev/vdb, and containers run through the agent's ttrpc
//! API from the host, exactly as the shim drives it. Reports boot → agent
//! ready, restore → agent ready and create+start+exit of `true` (with the
//! time of each call). `THAW_AGENT_VM_CONSOLE=1` also prints the guest's
//! console after the restore (agent warnings).

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use thaw_agent_protocol::agent::HealthResponse;
use thaw_tests::agent::{self, AgentConn};
use thaw_tests::guest::{
    self, accept_or_exit, processes_mentioning, vmm_client, wait_with_deadline,
};
use thaw_vmm_api::{ReadyProbe, RestoreArgs, Serial, TemplateBuildArgs, VmmCommand};

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

/// On a failing test, prints what the guest and the VMM said.
struct ShowLogsOnPanic(PathBuf);

impl Drop for ShowLogsOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let read = |f: &str| std::fs::read_to_string(self.0.join(f)).unwrap_or_default();
            eprintln!(
                "---- {}: guest console ----\n{}\n---- VMM stderr ----\n{}",
                self.0.display(),
                read("vm.console"),
                read("vmm.stderr")
            );
        }
    }
}

/// One test's VMs at a time: guest kernel work is emulated on PVM hosts,
/// and VMs competing for the two cores slow each other down more than
/// proportionally (the guest's timer ticks take a larger share).
fn one_test_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One template for all tests in this file, built by a single cold boot.
struct Template {
    /// Keeps the store and the busybox image alive for the whole run.
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    busybox_img: PathBuf,
    build_took: Duration,
    /// When the snapshot had been taken (the build had returned).
    built_at: Instant,
    build_ms: serde_json::Value,
}

fn template() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(|| {
        let kernel = guest::kernel();
        let root_img = agent::root_image();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        agent::busybox_rootfs(&dir.join("busybox"));
        let busybox_img = dir.join("busybox.erofs");
        guest::erofs_image(&dir.join("busybox"), &busybox_img);

        // The template builder waits for the agent's dial.
        let started = Instant::now();
        let out = VmmCommand::TemplateBuild(TemplateBuildArgs {
            spare_disks: 2,
            vcpus: 1,
            memory_mib: 128,
            ready: ReadyProbe::Agent,
            timeout_secs: 600,
            store: Some(dir.join("store")),
            ..TemplateBuildArgs::new(kernel, &root_img)
        })
        .command(guest::vmm_binary())
        .output()
        .unwrap();
        let build_took = started.elapsed();
        let built_at = Instant::now();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "template build failed:\n{stderr}");
        let tdir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tdir.join("template.json")).unwrap()).unwrap();
        Template {
            dir: tdir,
            busybox_img,
            build_took,
            built_at,
            build_ms: record["build_ms"].clone(),
            _tmp: tmp,
        }
    })
}

/// A VM restored from the template, with the busybox image in the first
/// spare slot (/dev/vdb) and the agent connected.
struct RestoredVm {
    _logs: ShowLogsOnPanic,
    vmm: Vmm,
    agent: AgentConn,
    tmp: tempfile::TempDir,
    listener: UnixListener,
    restore_ready: Duration,
    health: HealthResponse,
}

impl RestoredVm {
    fn dir(&self) -> &Path {
        self.tmp.path()
    }
    fn api(&self) -> PathBuf {
        self.dir().join("vm.api")
    }
    fn console(&self) -> String {
        std::fs::read_to_string(self.dir().join("vm.console")).unwrap_or_default()
    }
}

/// Gives the container the guest's cgroup tree (read-only, no cgroup
/// namespace), so it can read its own limits and its pod's.
fn mount_cgroupfs(spec: &mut serde_json::Value) {
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "ro"]
        }));
}

/// Puts `img` read-only into spare disk slot `slot` (slot 0 is /dev/vdb).
fn attach(api: &Path, slot: u32, img: &Path) {
    if let Err(e) = vmm_client(api).attach_disk(slot, img, true) {
        panic!("{e}");
    }
}

fn restore() -> RestoredVm {
    let t = template();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Restore; the agent re-dials the control port on the new socket.
    let uds = dir.join("vm.vsock");
    let api = dir.join("vm.api");
    let control_path = dir.join("vm.vsock_1024");
    let listener = UnixListener::bind(&control_path).unwrap();
    let started = Instant::now();
    let mut vmm = Vmm(Some(
        VmmCommand::Restore(RestoreArgs {
            vsock_uds: Some(uds.clone()),
            api_sock: Some(api.clone()),
            serial: Some(Serial::File(dir.join("vm.console"))),
            ..RestoreArgs::new(&t.dir)
        })
        .command(guest::vmm_binary())
        .stderr(std::fs::File::create(dir.join("vmm.stderr")).unwrap())
        .spawn()
        .unwrap(),
    ));
    let logs = ShowLogsOnPanic(dir.to_path_buf());
    let conn = accept_or_exit(
        &listener,
        vmm.0.as_mut().unwrap(),
        Instant::now() + Duration::from_secs(120),
    );
    let restore_ready = started.elapsed();
    let agent = AgentConn::new(conn, &uds);
    let health = agent.health();
    assert!(health.pid1, "the agent is not PID 1: {health:?}");
    assert_eq!(
        health.protocol_version,
        thaw_agent_protocol::PROTOCOL_VERSION
    );
    attach(&api, 0, &t.busybox_img);
    RestoredVm {
        _logs: logs,
        vmm,
        agent,
        tmp,
        listener,
        restore_ready,
        health,
    }
}

/// A restored guest's clocks go on from the snapshot: the time the template
/// sat in the store is not added to the guest's uptime (its BOOTTIME and
/// MONOTONIC clocks), whichever clock source the guest kernel uses. On a
/// host where it was added, the guest kernel also caught up on every second
/// of it at the first tick after a restore, one loop turn per second: an
/// hours-old template then cost PVM hosts seconds per start.
#[test]
fn a_restored_guest_does_not_count_the_templates_age_in_its_uptime() {
    const AGE: Duration = Duration::from_secs(30);
    let _one = one_test_at_a_time();
    let t = template();
    if let Some(rest) = AGE.checked_sub(t.built_at.elapsed()) {
        std::thread::sleep(rest);
    }
    let started = Instant::now();
    let vm = restore();
    let since_restore = started.elapsed();
    let uptime = Duration::from_nanos(vm.health.uptime_ns);
    // The guest booted after the build started and ran at most until the
    // build returned; since the restore it ran at most `since_restore`.
    let most = t.build_took + since_restore;
    assert!(
        uptime <= most + Duration::from_secs(1),
        "guest uptime after restore is {uptime:.1?}, more than the {:.1?} it can have run \
         (cold boot to snapshot {:.1?}, restore to Health {since_restore:.1?}): the {:.0?} \
         the template waited were added to the guest's clock",
        most,
        t.build_took,
        t.built_at.elapsed().saturating_sub(since_restore),
    );
    assert!(uptime > Duration::ZERO, "the agent reported no uptime");
    vm.stop();
}

#[test]
fn busybox_runs_in_the_vm_through_the_agent() {
    let _one = one_test_at_a_time();
    let t = template();
    let vm = restore();
    let RestoredVm {
        _logs,
        mut vmm,
        mut agent,
        tmp,
        listener,
        restore_ready,
        health,
    } = vm;
    let dir = tmp.path();
    let uds = dir.join("vm.vsock");
    let api = dir.join("vm.api");
    let control_path = dir.join("vm.vsock_1024");
    let (build_took, build_ms) = (t.build_took, &t.build_ms);

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
    vmm_client(&api).stop().unwrap();
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
        build_ms
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

impl RestoredVm {
    /// Stops the VMM through its control socket and checks that it exits
    /// cleanly.
    fn stop(mut self) {
        vmm_client(&self.api()).stop().unwrap();
        let mut child = self.vmm.0.take().unwrap();
        let status = wait_with_deadline(&mut child, Duration::from_secs(30));
        assert_eq!(status.code(), Some(0));
    }
}

/// A container over its memory limit is OOM-killed inside the guest (exit
/// 137, as runc reports it) and the agent reports an OOM event for it.
#[test]
fn memory_limit_in_the_vm_ends_in_an_oom_kill_and_event() {
    let _one = one_test_at_a_time();
    let mut vm = restore();
    let mut spec = agent::spec(&["sh", "-c", "x=0123456789; while true; do x=$x$x; done"]);
    spec["linux"]["resources"] = serde_json::json!({"memory": {"limit": 16u64 << 20}});
    // It takes 1-3 s; the bound makes a guest that stops making progress
    // fail this test with its console, well within the suite's limit.
    vm.agent.exit_timeout = Duration::from_secs(
        std::env::var("THAW_AGENT_VM_OOM_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(240),
    );
    let started = Instant::now();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        vm.agent.run("oom", "/dev/vdb", &spec)
    }));
    let took = started.elapsed();
    let console = vm.console();
    let r = r.unwrap_or_else(|_| {
        panic!("the OOM run failed after {took:.1?} (error above); guest console:\n{console}")
    });
    eprintln!("OOM run took {took:.1?}; guest console:\n{console}");
    assert_eq!(
        r.exit_status,
        137,
        "stderr: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let mut req = thaw_agent_protocol::agent::GetEventsRequest::new();
    req.after_seq = 0;
    let evs = vm.agent.client.get_events(agent::ctx(60), &req).unwrap();
    assert!(
        evs.events
            .iter()
            .any(|e| e.has_oom() && e.oom().container_id == "oom"),
        "no OOM event for the container: {:?}",
        evs.events
    );
    vm.stop();
}

/// What one clone reports about itself from inside a container that shares
/// the guest's UTS namespace.
fn clone_report(vm: &mut RestoredVm, hostname: &str, machine_id: &str) -> (String, String) {
    // The fix-ups the shim makes after every restore.
    let mut entropy = vec![0u8; 64];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").unwrap(),
        &mut entropy,
    )
    .unwrap();
    let mut req = thaw_agent_protocol::agent::AddEntropyRequest::new();
    req.data = entropy;
    vm.agent.client.add_entropy(agent::ctx(60), &req).unwrap();
    let mut req = thaw_agent_protocol::agent::SetIdentityRequest::new();
    req.hostname = hostname.into();
    req.machine_id = machine_id.into();
    vm.agent.client.set_identity(agent::ctx(60), &req).unwrap();

    let health = vm.agent.health();
    assert_eq!(
        (health.hostname.as_str(), health.machine_id.as_str()),
        (hostname, machine_id)
    );
    let mut spec = agent::spec(&[
        "sh",
        "-c",
        "hostname; head -c 32 /dev/urandom | od -An -tx1",
    ]);
    spec["linux"]["namespaces"] = serde_json::json!([{"type": "pid"}, {"type": "mount"}]);
    spec.as_object_mut().unwrap().remove("hostname");
    let r = vm.agent.run("report", "/dev/vdb", &spec);
    let out = r.success_stdout();
    let (host, random) = out.split_once('\n').unwrap_or_default();
    (host.to_string(), random.split_whitespace().collect())
}

/// Two VMs restored from one template: each gets the identity the host
/// gives it, and their kernels' RNG output differs after the reseed.
#[test]
fn clones_of_one_template_get_their_own_rng_and_identity() {
    let _one = one_test_at_a_time();
    let (mut a, mut b) = std::thread::scope(|s| {
        let a = s.spawn(restore);
        let b = s.spawn(restore);
        (a.join().unwrap(), b.join().unwrap())
    });
    let (host_a, rand_a) = clone_report(&mut a, "clone-a", "0123456789abcdef0123456789abcdef");
    let (host_b, rand_b) = clone_report(&mut b, "clone-b", "fedcba9876543210fedcba9876543210");
    assert_eq!((host_a.as_str(), host_b.as_str()), ("clone-a", "clone-b"));
    assert_eq!(rand_a.len(), 64, "32 random bytes in hex: {rand_a:?}");
    assert_ne!(
        rand_a, rand_b,
        "two clones read the same /dev/urandom bytes"
    );
    a.stop();
    b.stop();
}

/// The spec's memory, pids and CPU limits reach the guest kernel's cgroup
/// files, as the container itself reads them.
#[test]
fn cgroup_limits_apply_in_the_vm() {
    let _one = one_test_at_a_time();
    let mut vm = restore();
    let mut spec = agent::spec(&[
        "sh",
        "-c",
        "cg=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); \
         cat $cg/memory.max $cg/pids.max $cg/cpu.max $cg/cpu.weight",
    ]);
    mount_cgroupfs(&mut spec);
    spec["linux"]["resources"] = serde_json::json!({
        "memory": {"limit": 48u64 << 20},
        "pids": {"limit": 32},
        "cpu": {"quota": 50000, "period": 100000, "shares": 2048}
    });
    let r = vm.agent.run("limits", "/dev/vdb", &spec);
    // cpu.weight from shares 2048: 1 + (2048 - 2) * 9999 / 262142 = 79.
    assert_eq!(
        r.success_stdout(),
        format!("{}\n32\n50000 100000\n79\n", 48u64 << 20)
    );
    vm.stop();
}

/// A pod's own limits (CRI's sandbox annotations, which the shim passes
/// with CreateSandbox) sit on the cgroup above all the pod's containers.
#[test]
fn pod_limits_apply_above_the_pods_containers() {
    let _one = one_test_at_a_time();
    let mut vm = restore();
    let mut req = thaw_agent_protocol::agent::CreateSandboxRequest::new();
    req.sandbox_id = "pod".into();
    req.hostname = "pod".into();
    req.resources_json = serde_json::to_vec(&serde_json::json!({
        "memory": {"limit": 64u64 << 20},
        "cpu": {"quota": 150000, "period": 100000, "shares": 512}
    }))
    .unwrap();
    vm.agent
        .client
        .create_sandbox(agent::ctx(120), &req)
        .unwrap();
    vm.agent.sandbox_id = "pod".into();
    let mut spec = agent::spec(&[
        "sh",
        "-c",
        "cg=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); pod=${cg%/*}; \
         cat $pod/memory.max $pod/cpu.max $pod/cpu.weight",
    ]);
    mount_cgroupfs(&mut spec);
    let r = vm.agent.run("in-pod", "/dev/vdb", &spec);
    // cpu.weight from shares 512: 1 + (512 - 2) * 9999 / 262142 = 20.
    assert_eq!(
        r.success_stdout(),
        format!("{}\n150000 100000\n20\n", 64u64 << 20)
    );
    vm.stop();
}

/// UpdateContainer (CRI's UpdateContainerResources) changes a running
/// container's limits: the container watches its own memory.max change.
#[test]
fn update_changes_a_running_containers_limits() {
    let _one = one_test_at_a_time();
    let mut vm = restore();
    let mut spec = agent::spec(&[
        "sh",
        "-c",
        // Waits (up to ~60 s) until memory.max is no longer the spec's
        // 48 MiB; `read` is a shell builtin, so a check costs no fork.
        "cg=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); \
         for i in $(seq 600); do read v < $cg/memory.max; [ \"$v\" != 50331648 ] && break; sleep 0.1; done; \
         read p < $cg/pids.max; echo $v $p",
    ]);
    mount_cgroupfs(&mut spec);
    spec["linux"]["resources"] = serde_json::json!({"memory": {"limit": 48u64 << 20}});
    let r = vm.agent.run_with("update", "/dev/vdb", &spec, |client| {
        let mut req = thaw_agent_protocol::agent::UpdateContainerRequest::new();
        req.container_id = "update".into();
        req.resources_json = serde_json::to_vec(
            &serde_json::json!({"memory": {"limit": 40u64 << 20}, "pids": {"limit": 20}}),
        )
        .unwrap();
        client
            .update_container(agent::ctx(120), &req)
            .expect("UpdateContainer");
        // Bad input is refused, naming what was wrong.
        req.resources_json = b"{\"memory\": {\"limit\": \"lots\"}}".to_vec();
        let e = client
            .update_container(agent::ctx(120), &req)
            .expect_err("bad resources accepted");
        assert!(format!("{e:?}").contains("linux.resources"), "{e:?}");
    });
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        format!("{} 20\n", 40u64 << 20),
        "stderr: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    vm.stop();
}

/// A pod runs containers one after another in one VM, so a disk slot is
/// refilled with another image once its container is removed. The next
/// container must see the new image, even when both are the same size (the
/// guest then sees no capacity change to invalidate anything by).
#[test]
fn a_refilled_disk_slot_shows_the_new_image() {
    let _one = one_test_at_a_time();
    let mut vm = restore();
    let dir = vm.dir().to_path_buf();
    let mut images = Vec::new();
    for name in ["one", "two"] {
        let root = dir.join(name);
        agent::busybox_rootfs(&root);
        std::fs::write(root.join("etc/which"), format!("{name}\n")).unwrap();
        let img = dir.join(format!("{name}.erofs"));
        guest::erofs_image(&root, &img);
        images.push(img);
    }
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert_eq!(
        size(&images[0]),
        size(&images[1]),
        "the images must match in size"
    );

    let spec = agent::spec(&["cat", "/etc/which"]);
    for (i, img) in images.iter().enumerate() {
        attach(&vm.api(), 1, img);
        // The previous container was removed (inside run) before this attach.
        let r = vm.agent.run(&format!("which{i}"), "/dev/vdc", &spec);
        let expected = if i == 0 { "one\n" } else { "two\n" };
        assert_eq!(r.success_stdout(), expected);
    }
    vm.stop();
}

/// Disk data read into a restored guest is what the image holds, also when
/// memory pressure makes the guest read it again and again into pages that
/// still belong to the template's memory file (the VMM's write to such a
/// page is what makes the VM's private copy).
#[test]
fn disk_reads_in_a_restored_vm_are_intact_under_memory_pressure() {
    let _one = one_test_at_a_time();
    use sha2::{Digest, Sha256};
    let mut vm = restore();
    let dir = vm.dir().to_path_buf();
    let root = dir.join("big");
    agent::busybox_rootfs(&root);
    // 24 MiB of noise; the container may keep only 16 MiB in memory.
    let mut data = vec![0u8; 24 << 20];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut data)
        .unwrap();
    std::fs::write(root.join("noise"), &data).unwrap();
    let expected: String = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let img = dir.join("big.erofs");
    guest::erofs_image(&root, &img);
    attach(&vm.api(), 1, &img);

    let mut spec = agent::spec(&["sh", "-c", "for i in 1 2 3; do sha256sum /noise; done"]);
    spec["linux"]["resources"] = serde_json::json!({"memory": {"limit": 16u64 << 20}});
    let r = vm.agent.run("noise", "/dev/vdc", &spec);
    let sums: Vec<String> = r
        .success_stdout()
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(sums, vec![expected; 3], "guest console:\n{}", vm.console());
    vm.stop();
}
