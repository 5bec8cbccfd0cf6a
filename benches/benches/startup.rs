//! Startup latency, all figures from one run on one machine:
//!
//! 1. restore → agent ready: `thaw-vmm --restore <template>` spawned until
//!    the guest agent dials the control port, measured on the host;
//! 2. `ctr run --rm busybox true` with thaw restoring from a template;
//! 3. the same with thaw cold-booting the VM (templates off);
//! 4. the same with runc;
//! 5. the ratios of 2-4.
//!
//! p50/p99 over THAW_BENCH_RUNS runs (default 20); the cold boots, which
//! take one to three minutes each under PVM, over THAW_BENCH_COLD_RUNS (default the
//! same). The `ctr run` figures share one private containerd and one shim
//! image cache and are interleaved round by round, so they see the same
//! machine load. The VMM and shim are release builds.
//!
//! Run: `cargo bench -p thaw-benches --bench startup`.

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use thaw_benches::{count_from_env, fmt_duration, summarize, Summary};

mod common;
use common::{release_binaries, release_containerd, Release};
use thaw_tests::binaries::{binaries, template_store, vm_assets};
use thaw_tests::cmd;
use thaw_tests::image::BUSYBOX_REF;
use thaw_tests::PrivateContainerd;
use thaw_vmm_api::{Disk, ReadyProbe, RestoreArgs, Serial, TemplateBuildArgs, VmmCommand};

const RUNS_ENV: &str = "THAW_BENCH_RUNS";
const COLD_RUNS_ENV: &str = "THAW_BENCH_COLD_RUNS";
/// The VM shape of the shim's config in the test harness (vm_config plus
/// the shim's defaults), so figure 1 restores the very template the shim
/// restores in figure 2.
const VCPUS: u32 = 1;
const MEMORY_MIB: u32 = 256;
const SPARE_DISKS: u32 = 8;
/// A figure stops after this many failed runs (the failures are printed).
const MAX_FAILURES: usize = 3;

fn main() {
    if let Err(e) = run() {
        eprintln!("startup benchmark failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let runs = count_from_env(RUNS_ENV, 20).map_err(|e| e.to_string())?;
    let cold_runs = count_from_env(COLD_RUNS_ENV, runs).map_err(|e| e.to_string())?;
    let assets = vm_assets();
    // Debug builds for the harness's own needs; the measured binaries are
    // release builds.
    binaries();
    let release = release_binaries()?;
    eprintln!(
        "kernel {}\nroot image {}\nthaw-vmm {}\nshim {}",
        assets.kernel.display(),
        assets.root_image.display(),
        release.vmm.display(),
        release.shim.display()
    );

    let store = template_store();
    let started = Instant::now();
    let template = build_template(&release.vmm, &assets.kernel, &assets.root_image, &store)?;
    eprintln!(
        "template {} ready after {:?} (one cold boot if it was not built yet)",
        template.display(),
        started.elapsed()
    );

    let mut restore = Figure::new("restore -> agent ready (thaw-vmm, host side)", runs);
    for i in 0..runs {
        let r = restore_to_agent_ready(&release.vmm, &template, &assets.root_image);
        restore.record(i, r);
        if restore.gave_up() {
            break;
        }
    }

    let ctr = ctr_figures(&release, runs, cold_runs)?;
    print_report(runs, cold_runs, &restore, &ctr);
    let failed = [&restore, &ctr.runc, &ctr.restore, &ctr.cold]
        .iter()
        .any(|f| !f.failures.is_empty());
    if failed || !ctr.leaks.is_empty() {
        return Err("some runs failed or leaked; see above".into());
    }
    Ok(())
}

/// Samples and failures of one figure.
struct Figure {
    name: &'static str,
    planned: usize,
    samples: Vec<Duration>,
    failures: Vec<String>,
}

impl Figure {
    fn new(name: &'static str, planned: usize) -> Figure {
        Figure {
            name,
            planned,
            samples: Vec::new(),
            failures: Vec::new(),
        }
    }

    fn record(&mut self, i: usize, r: Result<Duration, String>) {
        match r {
            Ok(d) => {
                eprintln!("  {} run {}: {}", self.name, i + 1, fmt_duration(d));
                self.samples.push(d);
            }
            Err(e) => {
                eprintln!("  {} run {}: FAILED: {e}", self.name, i + 1);
                self.failures.push(e);
            }
        }
    }

    fn gave_up(&self) -> bool {
        self.failures.len() >= MAX_FAILURES
    }

    fn summary(&self) -> Option<Summary> {
        summarize(&self.samples)
    }
}

/// The agent root image: the last line guest-agent/build-rootfs.sh prints.
/// `thaw-vmm template build` with the shim's arguments (so the shim finds
/// the same template): one cold boot, or the stored template at once.
fn build_template(vmm: &Path, kernel: &Path, root: &Path, store: &Path) -> Result<PathBuf, String> {
    let mut c = VmmCommand::TemplateBuild(TemplateBuildArgs {
        spare_disks: SPARE_DISKS,
        vcpus: VCPUS,
        memory_mib: MEMORY_MIB,
        ready: ReadyProbe::Agent,
        timeout_secs: 600,
        store: Some(store.to_path_buf()),
        ..TemplateBuildArgs::new(kernel, root)
    })
    .command(vmm);
    let out = cmd::run(&mut c, Duration::from_secs(660));
    let dir = PathBuf::from(out.stdout.lines().last().unwrap_or_default().trim());
    if !out.success() || !dir.is_dir() {
        return Err(format!("template build:\n{}", out.describe()));
    }
    Ok(dir)
}

/// A VMM that is killed and reaped when dropped, also on early returns.
struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns a restore the way the shim does (same flags) and times it until
/// the agent dials `<uds>_1024`. Sockets and console live in a temporary
/// directory removed on return.
fn restore_to_agent_ready(vmm: &Path, template: &Path, root: &Path) -> Result<Duration, String> {
    let tmp = tempfile::Builder::new()
        .prefix("thaw-bench-restore-")
        .tempdir_in("/tmp")
        .map_err(|e| format!("temp dir: {e}"))?;
    let uds = tmp.path().join("vm.vsock");
    let listener = UnixListener::bind(tmp.path().join("vm.vsock_1024"))
        .map_err(|e| format!("binding the control socket: {e}"))?;
    let started = Instant::now();
    let restore = VmmCommand::Restore(RestoreArgs {
        disks: vec![Disk::read_only(root)],
        vsock_uds: Some(uds.clone()),
        serial: Some(Serial::File(tmp.path().join("console.log"))),
        api_sock: Some(tmp.path().join("vm.api")),
        ..RestoreArgs::new(template)
    });
    let child = restore
        .command(vmm)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("vmm.err")).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("spawning thaw-vmm: {e}"))?;
    let mut vm = Vmm(child);
    let accepted = accept_until(&listener, &mut vm.0, started + Duration::from_secs(120));
    let took = started.elapsed();
    drop(vm);
    match accepted {
        Ok(_conn) => Ok(took),
        Err(e) => {
            let err = std::fs::read_to_string(tmp.path().join("vmm.err")).unwrap_or_default();
            Err(format!("{e}; vmm stderr: {}", last_lines(&err, 5)))
        }
    }
}

/// Accepts one connection, waking at once when it arrives (poll) and
/// checking every 10 ms that the VMM is still alive.
fn accept_until(
    listener: &UnixListener,
    vmm: &mut Child,
    deadline: Instant,
) -> Result<UnixStream, String> {
    loop {
        let mut fd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut fd, 1, 10) };
        if n > 0 {
            return listener
                .accept()
                .map(|(s, _)| s)
                .map_err(|e| format!("accept: {e}"));
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("poll: {e}"));
            }
        }
        if let Ok(Some(status)) = vmm.try_wait() {
            return Err(format!(
                "thaw-vmm exited ({status}) before the agent dialed"
            ));
        }
        if Instant::now() > deadline {
            return Err("the agent did not dial within 120 s".into());
        }
    }
}

struct CtrFigures {
    runc: Figure,
    restore: Figure,
    cold: Figure,
    first_restore: Option<Duration>,
    first_runc: Option<Duration>,
    leaks: Vec<String>,
}

/// The three `ctr run` figures in one private containerd: the restore
/// config is the shim's config with `templates = true`; cold boots pass a
/// copy with `templates = false` through `--runtime-config-path`, so both
/// share the image cache and the machine's state.
fn ctr_figures(release: &Release, runs: usize, cold_runs: usize) -> Result<CtrFigures, String> {
    let c = release_containerd(release)?;
    let restore_cfg = std::fs::read_to_string(&c.shim_config).map_err(|e| e.to_string())?;
    if !restore_cfg.contains("templates = true") {
        return Err(format!(
            "shim config lost its templates line:\n{restore_cfg}"
        ));
    }
    let cold_config = c.dir().join("thaw-cold.toml");
    std::fs::write(
        &cold_config,
        restore_cfg.replace("templates = true", "templates = false"),
    )
    .map_err(|e| format!("writing {}: {e}", cold_config.display()))?;
    let cold_config = cold_config.display().to_string();
    c.import_busybox();

    let thaw = |extra: &[&str], timeout: u64| -> Result<Duration, String> {
        let id = c.new_id("bthaw");
        let mut args = c.run_args(&["--rm"]);
        args.extend_from_slice(extra);
        args.extend([BUSYBOX_REF, id.as_str(), "true"]);
        ctr_run(&c, &id, &args, timeout)
    };
    let runc = || -> Result<Duration, String> {
        let id = c.new_id("brunc");
        let args = vec!["run", "--rm", BUSYBOX_REF, id.as_str(), "true"];
        ctr_run(&c, &id, &args, 60)
    };
    let restore_run = || thaw(&[], 300);
    let cold_run = || thaw(&["--runtime-config-path", cold_config.as_str()], 900);

    // Not counted: thaw's first run converts the image to erofs (cache
    // miss) and finds the template; runc's first run warms its caches.
    eprintln!("warm-up (not counted):");
    let first_restore = restore_run()
        .map_err(|e| eprintln!("  thaw first run FAILED: {e}"))
        .ok();
    let first_runc = runc()
        .map_err(|e| eprintln!("  runc first run FAILED: {e}"))
        .ok();
    eprintln!("  thaw (restore) first run {first_restore:?}, runc first run {first_runc:?}");

    let mut f = CtrFigures {
        runc: Figure::new("ctr run --rm busybox true: runc", runs),
        restore: Figure::new("ctr run --rm busybox true: thaw, restore", runs),
        cold: Figure::new("ctr run --rm busybox true: thaw, cold boot", cold_runs),
        first_restore,
        first_runc,
        leaks: Vec::new(),
    };
    for i in 0..runs.max(cold_runs) {
        if i < runs && !f.runc.gave_up() {
            f.runc.record(i, runc());
        }
        if i < runs && !f.restore.gave_up() {
            f.restore.record(i, restore_run());
        }
        if i < cold_runs && !f.cold.gave_up() {
            f.cold.record(i, cold_run());
        }
    }
    f.leaks = c.leaks(Duration::from_secs(15));
    for l in &f.leaks {
        eprintln!("LEAK: {l}");
    }
    Ok(f)
}

/// One timed `ctr run`; on failure removes what is left of the container.
fn ctr_run(
    c: &PrivateContainerd,
    id: &str,
    args: &[&str],
    timeout_secs: u64,
) -> Result<Duration, String> {
    let out = c.ctr_timeout(args, Duration::from_secs(timeout_secs));
    if out.success() {
        return Ok(out.elapsed);
    }
    let _ = c.ctr_timeout(
        &["tasks", "kill", "-s", "SIGKILL", id],
        Duration::from_secs(10),
    );
    let _ = c.ctr_timeout(&["tasks", "delete", "-f", id], Duration::from_secs(30));
    let _ = c.ctr_timeout(&["containers", "delete", id], Duration::from_secs(30));
    Err(format!(
        "exit {:?}{}: {}",
        out.code(),
        if out.timed_out { " (timed out)" } else { "" },
        last_lines(&out.stderr, 5)
    ))
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() {
        return "n/a".into();
    }
    format!("{:.1}x", a.as_secs_f64() / b.as_secs_f64())
}

fn print_report(runs: usize, cold_runs: usize, restore: &Figure, ctr: &CtrFigures) {
    println!();
    println!("thaw startup benchmark: {runs} runs per figure ({RUNS_ENV}), {cold_runs} cold boots ({COLD_RUNS_ENV})");
    println!("percentiles are nearest-rank: measured values; with 20 runs p99 is the slowest run");
    println!(
        "VM: {VCPUS} vCPU, {MEMORY_MIB} MiB, {SPARE_DISKS} spare disks; release thaw-vmm and shim"
    );
    println!();
    println!(
        "{:<48} {:>5} {:>10} {:>10} {:>10} {:>10}",
        "figure", "runs", "p50", "p99", "min", "max"
    );
    let figures = [restore, &ctr.restore, &ctr.cold, &ctr.runc];
    for f in figures {
        match f.summary() {
            Some(s) => println!(
                "{:<48} {:>5} {:>10} {:>10} {:>10} {:>10}",
                f.name,
                s.runs,
                fmt_duration(s.p50),
                fmt_duration(s.p99),
                fmt_duration(s.min),
                fmt_duration(s.max)
            ),
            None => println!("{:<48} {:>5} no successful run", f.name, 0),
        }
        if f.samples.len() < f.planned {
            println!(
                "  ^ only {} of {} runs succeeded; {} failed{}",
                f.samples.len(),
                f.planned,
                f.failures.len(),
                if f.gave_up() {
                    format!(" (stopped after {MAX_FAILURES} failures)")
                } else {
                    String::new()
                }
            );
            for e in &f.failures {
                println!("    failure: {e}");
            }
        }
    }
    if cold_runs < 20 {
        println!(
            "  note: only {cold_runs} cold boots ({COLD_RUNS_ENV}={cold_runs}), fewer than 20: \
             a cold boot takes minutes on this PVM host{}",
            ctr.cold
                .summary()
                .map(|s| format!(" (p50 {} in this run)", fmt_duration(s.p50)))
                .unwrap_or_default()
        );
    }
    println!(
        "warm-up, not counted: first thaw run (erofs conversion, template lookup) {}, first runc run {}",
        ctr.first_restore.map(fmt_duration).unwrap_or("failed".into()),
        ctr.first_runc.map(fmt_duration).unwrap_or("failed".into())
    );
    println!();
    println!("{:<48} {:>10} {:>10}", "ratio", "p50", "p99");
    let (r, w, c) = (
        ctr.restore.summary(),
        ctr.runc.summary(),
        ctr.cold.summary(),
    );
    let pairs = [
        ("thaw-restore / runc", r, w),
        ("thaw-cold / runc", c, w),
        ("thaw-cold / thaw-restore", c, r),
    ];
    for (name, a, b) in pairs {
        match (a, b) {
            (Some(a), Some(b)) => println!(
                "{:<48} {:>10} {:>10}",
                name,
                ratio(a.p50, b.p50),
                ratio(a.p99, b.p99)
            ),
            _ => println!("{name:<48} n/a (a figure has no successful run)"),
        }
    }
    println!();
    println!("What these mean on this host (KVM is PVM here: guest kernel code is emulated, guest user code native):");
    println!("- restore -> agent ready is the meaningful figure: mostly host-side work (mapping the memory");
    println!("  file, recreating vCPU and device state) plus a short emulated vsock reset and agent re-dial.");
    println!("- the thaw `ctr run` figures are dominated by emulated guest kernel work (mounting the image,");
    println!("  creating namespaces, exec and page faults of `true`, teardown), which takes seconds here and");
    println!("  milliseconds on hardware KVM: thaw-restore, thaw-cold and every ratio only mean something");
    println!("  on hardware KVM; here they are upper bounds. runc is native and meaningful.");
    println!("- the machine is shared: other people's builds and VMs ran during this benchmark.");
    if !ctr.leaks.is_empty() {
        println!("LEAKS after the ctr runs:");
        for l in &ctr.leaks {
            println!("  {l}");
        }
    }
}
