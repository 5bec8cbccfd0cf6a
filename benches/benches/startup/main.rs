//! Startup, concurrency and density, all figures from one run on one
//! machine, each with p50/p99 and its ratio to runc measured in the same run:
//!
//! 1. restore -> agent ready: `thaw-vmm --restore <template>` spawned until
//!    the guest agent dials the control port, measured on the host;
//! 2. `ctr run --rm busybox true`: thaw restoring from a template, thaw
//!    cold-booting (templates off), runc, and gVisor (Debian's `runsc`
//!    through containerd's runc shim with `--runc-binary`, a wrapper that
//!    adds `--network=none`);
//! 3. THAW_BENCH_CONCURRENCY (default 20) concurrent `ctr run`s per runtime
//!    (thaw restore, runc, runsc): each start's p50/p99, the total time,
//!    and the ratio to one start;
//! 4. RunPodSandbox -> CreateContainer -> StartContainer -> running through
//!    containerd's CRI plugin (pod network on CNI), thaw vs runc;
//! 5. idle sandbox memory: THAW_BENCH_IDLE (default 5) idle sandboxes at
//!    once; per sandbox the private memory it adds (`Private_Dirty` of its
//!    shim and sandbox processes), for thaw split into guest pages dirtied
//!    over the shared template and the VMM's own RSS without guest memory.
//!
//! p50/p99 over THAW_BENCH_RUNS runs (default 20); the cold boots, which
//! take one to three minutes each under PVM, over THAW_BENCH_COLD_RUNS
//! (default the same); CRI pod starts over THAW_BENCH_CRI_RUNS (default the
//! same). Everything runs in one private containerd (with CRI) and one shim
//! image cache, and the runtimes are interleaved round by round, so they
//! see the same machine load. The VMM and shim are release builds.
//!
//! Output: the table on stdout and in `<dir>/startup-<platform>.md`, the
//! plot in `<dir>/startup-<platform>.svg`; `<dir>` is THAW_BENCH_REPORT_DIR
//! (default `benches/report`), `<platform>` THAW_BENCH_PLATFORM (default
//! `pvm` on PVM hosts, else `kvm`). `scripts/bench-report.sh host|svm|all`
//! runs it on this machine's KVM and inside the emulated-SVM guest.
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

use thaw_benches::report::{Report, Row, Unit};
use thaw_benches::{count_from_env, fmt_duration, summarize, Summary};

#[path = "../common/mod.rs"]
mod common;
mod cri;
mod memory;
use common::{release_binaries, release_containerd, Release};
use thaw_tests::binaries::{binaries, template_store, vm_assets};
use thaw_tests::cmd;
use thaw_tests::image::BUSYBOX_REF;
use thaw_tests::PrivateContainerd;
use thaw_vmm_api::{Disk, ReadyProbe, RestoreArgs, Serial, TemplateBuildArgs, VmmCommand};

const RUNS_ENV: &str = "THAW_BENCH_RUNS";
const COLD_RUNS_ENV: &str = "THAW_BENCH_COLD_RUNS";
const CRI_RUNS_ENV: &str = "THAW_BENCH_CRI_RUNS";
const CONCURRENCY_ENV: &str = "THAW_BENCH_CONCURRENCY";
const IDLE_ENV: &str = "THAW_BENCH_IDLE";
/// Debian's gVisor package.
const RUNSC: &str = "/usr/bin/runsc";
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

/// Run counts, from the environment.
struct Counts {
    runs: usize,
    cold_runs: usize,
    cri_runs: usize,
    concurrency: usize,
    idle: usize,
}

fn run() -> Result<(), String> {
    let runs = count_from_env(RUNS_ENV, 20).map_err(|e| e.to_string())?;
    let n = Counts {
        runs,
        cold_runs: count_from_env(COLD_RUNS_ENV, runs).map_err(|e| e.to_string())?,
        cri_runs: count_from_env(CRI_RUNS_ENV, runs).map_err(|e| e.to_string())?,
        concurrency: count_from_env(CONCURRENCY_ENV, 20).map_err(|e| e.to_string())?,
        idle: count_from_env(IDLE_ENV, 5).map_err(|e| e.to_string())?,
    };
    let load_start = loadavg();
    let wall = Instant::now();
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
    let template_took = started.elapsed();
    eprintln!(
        "template {} ready after {template_took:?} (one cold boot if it was not built yet)",
        template.display(),
    );

    let mut restore = Figure::new("restore -> agent ready (host side)", "thaw restore", runs);
    for i in 0..runs {
        let r = restore_to_agent_ready(&release.vmm, &template, &assets.root_image);
        restore.record(i, r);
        if restore.gave_up() {
            break;
        }
    }

    let ctr = ctr_figures(&release, &n)?;
    let load_end = loadavg();
    let report = build_report(
        &n,
        &restore,
        &ctr,
        template_took,
        &load_start,
        &load_end,
        wall.elapsed(),
    );
    let md = report.markdown();
    println!("\n{md}");
    write_report(&report, &md)?;
    let failed = ctr
        .all()
        .iter()
        .chain([&&restore])
        .any(|f| !f.failures.is_empty());
    if failed || !ctr.leaks.is_empty() {
        return Err("some runs failed or leaked; see above".into());
    }
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// THAW_BENCH_PLATFORM, else `pvm` on PVM hosts and `kvm` elsewhere.
fn platform() -> String {
    std::env::var("THAW_BENCH_PLATFORM").unwrap_or_else(|_| {
        if thaw_benches::host_is_pvm() {
            "pvm".into()
        } else {
            "kvm".into()
        }
    })
}

fn write_report(report: &Report, md: &str) -> Result<(), String> {
    let dir = std::env::var_os("THAW_BENCH_REPORT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| thaw_tests::binaries::workspace_root().join("benches/report"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let name = format!("startup-{}", platform());
    let md_path = dir.join(format!("{name}.md"));
    std::fs::write(&md_path, md).map_err(|e| format!("writing {}: {e}", md_path.display()))?;
    let svg_path = dir.join(format!("{name}.svg"));
    let svg = report.svg()?;
    std::fs::write(&svg_path, svg).map_err(|e| format!("writing {}: {e}", svg_path.display()))?;
    eprintln!("wrote {} and {}", md_path.display(), svg_path.display());
    Ok(())
}

/// Samples and failures of one figure for one runtime.
struct Figure {
    name: String,
    runtime: String,
    planned: usize,
    samples: Vec<Duration>,
    failures: Vec<String>,
}

impl Figure {
    fn new(name: &str, runtime: &str, planned: usize) -> Figure {
        Figure {
            name: name.into(),
            runtime: runtime.into(),
            planned,
            samples: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// The report's row, failures summed up in its notes.
    fn row(&self) -> Row {
        let mut note = String::new();
        if !self.failures.is_empty() {
            note = format!(
                "{} failed{}: {}",
                self.failures.len(),
                if self.gave_up() && self.samples.len() + self.failures.len() < self.planned {
                    format!(" (stopped after {MAX_FAILURES})")
                } else {
                    String::new()
                },
                self.failures[0]
            );
        }
        Row::times(&self.name, &self.runtime, &self.samples, self.planned).with_note(note)
    }

    fn record(&mut self, i: usize, r: Result<Duration, String>) {
        match r {
            Ok(d) => {
                eprintln!(
                    "  {} [{}] run {}: {}",
                    self.name,
                    self.runtime,
                    i + 1,
                    fmt_duration(d)
                );
                self.samples.push(d);
            }
            Err(e) => {
                eprintln!(
                    "  {} [{}] run {}: FAILED: {e}",
                    self.name,
                    self.runtime,
                    i + 1
                );
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

/// Spawns a restore the way the shim does (same flags; the console off, the
/// shim's default) and times it until the agent dials `<uds>_1024`.
/// Sockets live in a temporary directory removed on return.
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
        serial: Some(Serial::None),
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

const CTR: &str = "ctr run --rm busybox true";
const RUNC: &str = "runc";
const THAW: &str = "thaw restore";
const COLD: &str = "thaw cold boot";
const GVISOR: &str = "gVisor (runsc)";

/// One timed start of a runtime, callable from several threads.
type Start<'a> = dyn Fn() -> Result<Duration, String> + Sync + 'a;

/// N concurrent starts of one runtime.
struct Concurrent {
    each: Figure,
    total: Option<Duration>,
}

struct CtrFigures {
    runc: Figure,
    restore: Figure,
    cold: Figure,
    runsc: Figure,
    concurrent: Vec<Concurrent>,
    cri: Vec<Figure>,
    memory: Vec<Row>,
    first_restore: Option<Duration>,
    first_runc: Option<Duration>,
    first_runsc: Option<Duration>,
    /// Why gVisor was not measured, when it was not.
    runsc_missing: Option<String>,
    leaks: Vec<String>,
}

impl CtrFigures {
    fn all(&self) -> Vec<&Figure> {
        let mut v = vec![&self.runc, &self.restore, &self.cold, &self.runsc];
        v.extend(self.concurrent.iter().map(|c| &c.each));
        v.extend(self.cri.iter());
        v
    }
}

/// Every figure but restore -> agent ready, in one private containerd with
/// CRI: the restore config is the shim's config with `templates = true`;
/// cold boots pass a copy with `templates = false` through
/// `--runtime-config-path`; gVisor runs through the runc shim with
/// `--runc-binary` (a wrapper adding `--network=none`, without which
/// runsc refuses the root network namespace).
fn ctr_figures(release: &Release, n: &Counts) -> Result<CtrFigures, String> {
    let c = release_containerd(release, true)?;
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
    let runsc_missing = (!Path::new(RUNSC).is_file()).then(|| {
        format!("{RUNSC} is not installed (scripts/bench-report.sh installs Debian's runsc)")
    });
    let wrapper = c.dir().join("bin/runsc-no-network");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec {RUNSC} --network=none \"$@\"\n"),
    )
    .map_err(|e| format!("writing {}: {e}", wrapper.display()))?;
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(|e| e.to_string())?;
    let wrapper = wrapper.display().to_string();
    c.import_busybox();

    let thaw = |extra: &[&str], cmd: &[&str], timeout: u64| -> Result<Duration, String> {
        let id = c.new_id("bthaw");
        let mut args = c.run_args(&[]);
        args.extend_from_slice(extra);
        args.extend([BUSYBOX_REF, id.as_str()]);
        args.extend_from_slice(cmd);
        ctr_run(&c, &id, &args, timeout)
    };
    let plain = |prefix: &str, extra: &[&str], cmd: &[&str], timeout: u64| {
        let id = c.new_id(prefix);
        let mut args = vec!["run", "--env", c.marker.as_str()];
        args.extend_from_slice(extra);
        args.extend([BUSYBOX_REF, id.as_str()]);
        args.extend_from_slice(cmd);
        ctr_run(&c, &id, &args, timeout)
    };
    // Every runtime gets thaw's limit: under 20 concurrent starts in the
    // emulated-SVM guest runc's took 44-59 s, and a 60 s limit counted slow
    // starts as failures.
    let runc = || plain("brunc", &["--rm"], &["true"], 600);
    let runsc = || -> Result<Duration, String> {
        if let Some(why) = &runsc_missing {
            return Err(why.clone());
        }
        plain(
            "brunsc",
            &["--rm", "--runc-binary", &wrapper],
            &["true"],
            600,
        )
    };
    let restore_run = || thaw(&["--rm"], &["true"], 600);
    let cold_run = || {
        thaw(
            &["--rm", "--runtime-config-path", cold_config.as_str()],
            &["true"],
            900,
        )
    };

    // Not counted: thaw's first run converts the image to erofs (cache
    // miss) and finds the template; runc's and runsc's first runs warm
    // their caches.
    eprintln!("warm-up (not counted):");
    let warm = |name: &str, r: Result<Duration, String>| {
        r.map_err(|e| eprintln!("  {name} first run FAILED: {e}"))
            .ok()
    };
    let first_restore = warm("thaw", restore_run());
    let first_runc = warm("runc", runc());
    let first_runsc = warm("runsc", runsc());
    eprintln!("  thaw (restore) {first_restore:?}, runc {first_runc:?}, runsc {first_runsc:?}");

    let mut f = CtrFigures {
        runc: Figure::new(CTR, RUNC, n.runs),
        restore: Figure::new(CTR, THAW, n.runs),
        cold: Figure::new(CTR, COLD, n.cold_runs),
        runsc: Figure::new(CTR, GVISOR, n.runs),
        concurrent: Vec::new(),
        cri: Vec::new(),
        memory: Vec::new(),
        first_restore,
        first_runc,
        first_runsc,
        runsc_missing: runsc_missing.clone(),
        leaks: Vec::new(),
    };
    for i in 0..n.runs.max(n.cold_runs) {
        if i < n.runs && !f.runc.gave_up() {
            f.runc.record(i, runc());
        }
        if i < n.runs && !f.restore.gave_up() {
            f.restore.record(i, restore_run());
        }
        if i < n.runs && !f.runsc.gave_up() {
            f.runsc.record(i, runsc());
        }
        if i < n.cold_runs && !f.cold.gave_up() {
            f.cold.record(i, cold_run());
        }
    }

    // N at once, one runtime after the other.
    let name = format!("{} concurrent ctr run: each", n.concurrency);
    let starts: [(&str, &Start); 3] = [(RUNC, &runc), (THAW, &restore_run), (GVISOR, &runsc)];
    for (runtime, start) in starts {
        eprintln!("{} concurrent starts: {runtime}", n.concurrency);
        let mut each = Figure::new(&name, runtime, n.concurrency);
        let barrier = std::sync::Barrier::new(n.concurrency);
        let barrier = &barrier;
        let t = Instant::now();
        let results: Vec<Result<Duration, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n.concurrency)
                .map(|_| {
                    s.spawn(move || {
                        barrier.wait();
                        start()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("the start panicked".into()))
                })
                .collect()
        });
        let total = t.elapsed();
        for (i, r) in results.into_iter().enumerate() {
            each.record(i, r);
        }
        let total = (!each.samples.is_empty()).then_some(total);
        f.concurrent.push(Concurrent { each, total });
    }

    // CRI: pods, interleaved; one warm-up pod each (thaw converts the
    // pause image; both pull nothing: the images are imported).
    match cri::CriBench::new(&c, Duration::from_secs(600)) {
        Ok(bench) => {
            let name = "CRI RunPodSandbox -> container running";
            let handlers = [("runc", RUNC), ("thaw", THAW)];
            for (h, _) in handlers {
                let r = bench.pod_start(h);
                eprintln!("  CRI warm-up {h} (not counted): {r:?}");
            }
            let mut figs: Vec<Figure> = handlers
                .iter()
                .map(|(_, rt)| Figure::new(name, rt, n.cri_runs))
                .collect();
            for i in 0..n.cri_runs {
                for ((h, _), fig) in handlers.iter().zip(figs.iter_mut()) {
                    if !fig.gave_up() {
                        fig.record(i, bench.pod_start(h));
                    }
                }
            }
            let left = bench.remove_leftovers();
            if left > 0 {
                f.leaks.push(format!("{left} CRI pods were still listed"));
            }
            f.cri = figs;
        }
        Err(e) => {
            let mut fig = Figure::new("CRI RunPodSandbox -> container running", THAW, n.cri_runs);
            fig.failures.push(format!("CRI setup: {e}"));
            f.cri.push(fig);
        }
    }

    // Idle sandboxes, all at once.
    let idle = |prefix: &str, extra: &[&str], thaw_rt: bool| -> Result<String, String> {
        let id = c.new_id(prefix);
        let mut args = if thaw_rt {
            c.run_args(&["-d"])
        } else {
            vec!["run", "-d", "--env", c.marker.as_str()]
        };
        args.extend_from_slice(extra);
        args.extend([BUSYBOX_REF, id.as_str(), "sleep", "100000"]);
        ctr_run(&c, &id, &args, 600).map(|_| id)
    };
    let mut ids: Vec<(&str, String)> = Vec::new();
    let mut idle_errors: Vec<(&str, String)> = Vec::new();
    for _ in 0..n.idle {
        for (rt, r) in [
            (RUNC, idle("irunc", &[], false)),
            (THAW, idle("ithaw", &[], true)),
            (
                GVISOR,
                match &runsc_missing {
                    Some(why) => Err(why.clone()),
                    None => idle("irunsc", &["--runc-binary", &wrapper], false),
                },
            ),
        ] {
            match r {
                Ok(id) => ids.push((rt, id)),
                Err(e) => idle_errors.push((rt, e)),
            }
        }
    }
    let settle = Duration::from_secs(
        std::env::var("THAW_BENCH_IDLE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
    );
    eprintln!(
        "{} idle sandboxes up; reading their memory after {settle:?}",
        ids.len()
    );
    std::thread::sleep(settle);
    f.memory = memory_rows(&c, &ids, &idle_errors, n.idle);
    for (_, id) in &ids {
        remove(&c, id);
    }

    f.leaks.extend(c.leaks(Duration::from_secs(30)));
    for l in &f.leaks {
        eprintln!("LEAK: {l}");
    }
    Ok(f)
}

/// The pid `ctr tasks ls` shows for task `id`.
fn task_pid(c: &PrivateContainerd, id: &str) -> Option<u32> {
    c.ctr(&["tasks", "ls"])
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
}

/// `pid` and every process below it.
fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        out.extend(memory::children_of(out[i]));
        i += 1;
    }
    out
}

/// The memory rows of the idle sandboxes: per runtime, the Private_Dirty
/// of the shim and everything below it (plus the task's process); for
/// thaw also the VMM's split between guest memory and its own.
fn memory_rows(
    c: &PrivateContainerd,
    ids: &[(&str, String)],
    errors: &[(&str, String)],
    planned: usize,
) -> Vec<Row> {
    const ADDED: &str = "idle sandbox: private memory added";
    const DIRTIED: &str = "idle sandbox: guest pages dirtied over the template";
    const VMM_RSS: &str = "idle sandbox: VMM RSS without guest memory";
    const VMM_DIRTY: &str = "idle sandbox: VMM Private_Dirty without guest memory";
    let mut added: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
    let (mut dirtied, mut vmm_rss, mut vmm_dirty, mut template) = (vec![], vec![], vec![], 0);
    let mut problems: Vec<(&str, String)> = errors.to_vec();
    for (rt, id) in ids {
        let Some(shim) = memory::shim_of(id) else {
            problems.push((rt, format!("no shim process found for {id}")));
            continue;
        };
        let mut pids = tree(shim);
        if let Some(p) = task_pid(c, id) {
            if !pids.contains(&p) {
                pids.extend(tree(p));
            }
        }
        let mut total = 0;
        let mut guest = None;
        for p in &pids {
            match memory::smaps_of(*p) {
                Ok(s) => {
                    total += s.private_dirty;
                    if s.guest_size > 0 {
                        guest = Some(s);
                    }
                }
                Err(e) => problems.push((rt, e)),
            }
        }
        added.entry(rt).or_default().push(total);
        if *rt == THAW {
            match guest {
                Some(s) => {
                    dirtied.push(s.guest_private_dirty);
                    vmm_rss.push(s.rss_without_guest());
                    vmm_dirty.push(s.private_dirty_without_guest());
                    template = s.guest_size;
                }
                None => problems.push((
                    rt,
                    format!(
                        "no guest-memory mapping below shim {shim} of {id} ({:?})",
                        pids.iter()
                            .map(|p| memory::exe_name(*p))
                            .collect::<Vec<_>>()
                    ),
                )),
            }
        }
    }
    let note = |rt: &str| -> String {
        let p: Vec<&String> = problems
            .iter()
            .filter(|(r, _)| *r == rt)
            .map(|(_, e)| e)
            .collect();
        match p.first() {
            Some(e) => format!("{} problem(s): {e}", p.len()),
            None => String::new(),
        }
    };
    let mut rows = Vec::new();
    for rt in [RUNC, THAW, GVISOR] {
        let samples = added.get(rt).cloned().unwrap_or_default();
        let mut note = note(rt);
        if rt == THAW && template > 0 {
            note = format!(
                "shim + VMM; template {} (shared){}",
                thaw_benches::report::fmt_kib(template),
                if note.is_empty() {
                    String::new()
                } else {
                    format!("; {note}")
                }
            );
        } else if rt == RUNC {
            note = format!(
                "shim + container process{}",
                if note.is_empty() {
                    String::new()
                } else {
                    format!("; {note}")
                }
            );
        } else if note.is_empty() {
            note = "shim + runsc sandbox and gofer".into();
        }
        rows.push(Row::new(ADDED, rt, Unit::Memory, &samples, planned).with_note(note));
    }
    rows.push(
        Row::new(DIRTIED, THAW, Unit::Memory, &dirtied, planned).with_note(format!(
            "Private_Dirty of the guest-memory mapping, of {}",
            thaw_benches::report::fmt_kib(template)
        )),
    );
    rows.push(Row::new(VMM_RSS, THAW, Unit::Memory, &vmm_rss, planned));
    rows.push(Row::new(VMM_DIRTY, THAW, Unit::Memory, &vmm_dirty, planned));
    rows
}

/// Kills and removes container `id` (best effort; leaks show up in the
/// leak check).
fn remove(c: &PrivateContainerd, id: &str) {
    let _ = c.ctr_timeout(
        &["tasks", "kill", "-s", "SIGKILL", id],
        Duration::from_secs(30),
    );
    let _ = cmd::wait_for(Duration::from_secs(120), || {
        let out = c.ctr(&["tasks", "ls"]);
        let line = out
            .stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .map(str::to_string);
        (line.is_none() || line.is_some_and(|l| l.contains("STOPPED"))).then_some(())
    });
    let _ = c.ctr_timeout(&["tasks", "delete", "-f", id], Duration::from_secs(120));
    let _ = c.ctr_timeout(&["containers", "delete", id], Duration::from_secs(60));
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

#[allow(clippy::too_many_arguments)]
fn build_report(
    n: &Counts,
    restore: &Figure,
    ctr: &CtrFigures,
    template_took: Duration,
    load_start: &str,
    load_end: &str,
    took: Duration,
) -> Report {
    let platform = platform();
    let pvm = thaw_benches::host_is_pvm();
    let mut header = vec![
        format!(
            "platform: `{platform}` ({}); one run, release `thaw-vmm` and shim; VM {VCPUS} vCPU, {MEMORY_MIB} MiB",
            match platform.as_str() {
                "pvm" => "this machine's KVM: PVM, guest kernel code emulated, guest user code native",
                "svm" => "hardware-style KVM (AMD SVM, nested paging) inside a QEMU TCG guest (scripts/svm-run): thaw's stock kernel path, everything emulated evenly",
                _ => "hardware KVM",
            }
        ),
        format!(
            "runs: {} per figure (THAW_BENCH_RUNS), {} cold boots, {} CRI pods per handler, {} concurrent starts per runtime, {} idle sandboxes per runtime; percentiles are nearest-rank (measured values: with 10 runs p99 is the slowest)",
            n.runs, n.cold_runs, n.cri_runs, n.concurrency, n.idle
        ),
        format!(
            "machine load: the machine is shared with other work; load average (1/5/15 min) {load_start} at the start, {load_end} at the end{}",
            if pvm { "" } else { " (inside the guest)" }
        ),
        format!("whole run {}; template ready after {} (a cold boot when it was not stored yet)", fmt_duration(took), fmt_duration(template_took)),
        format!(
            "warm-up, not counted: first thaw run (erofs conversion, template lookup) {}, first runc run {}, first runsc run {}",
            ctr.first_restore.map(fmt_duration).unwrap_or("failed".into()),
            ctr.first_runc.map(fmt_duration).unwrap_or("failed".into()),
            ctr.first_runsc.map(fmt_duration).unwrap_or("failed".into()),
        ),
    ];
    if let Some(why) = &ctr.runsc_missing {
        header.push(format!("gVisor not measured: {why}"));
    }
    let mut rows = vec![restore.row()];
    for f in [&ctr.runc, &ctr.restore, &ctr.cold, &ctr.runsc] {
        rows.push(f.row());
    }
    let one = |runtime: &str| {
        [&ctr.runc, &ctr.restore, &ctr.runsc]
            .into_iter()
            .find(|f| f.runtime == runtime)
            .and_then(|f| f.summary())
    };
    let mut conc_notes = Vec::new();
    for c in &ctr.concurrent {
        let mut row = c.each.row();
        if let (Some(total), Some(s1), Some(sn)) = (c.total, one(&c.each.runtime), c.each.summary())
        {
            let extra = format!(
                "total {}; each p50 / one start p50 {}",
                fmt_duration(total),
                thaw_benches::report::ratio(sn.p50.as_micros() as u64, s1.p50.as_micros() as u64)
            );
            conc_notes.push(format!(
                "{}: {extra}, total / one start p50 {}",
                c.each.runtime,
                thaw_benches::report::ratio(total.as_micros() as u64, s1.p50.as_micros() as u64)
            ));
            row.note = if row.note.is_empty() {
                extra
            } else {
                format!("{extra}; {}", row.note)
            };
        }
        rows.push(row);
    }
    for c in &ctr.concurrent {
        if let Some(t) = c.total {
            rows.push(Row::times(
                &format!("{} concurrent ctr run: total", n.concurrency),
                &c.each.runtime,
                &[t],
                1,
            ));
        }
    }
    rows.extend(ctr.cri.iter().map(Figure::row));
    rows.extend(ctr.memory.iter().cloned());

    let mut notes = vec![format!(
        "Concurrency, each runtime's {} starts against its own sequential p50: {}.",
        n.concurrency,
        if conc_notes.is_empty() {
            "no round succeeded".to_string()
        } else {
            conc_notes.join("; ")
        }
    )];
    let setup_timeouts = ctr
        .concurrent
        .iter()
        .flat_map(|c| &c.each.failures)
        .filter(|e| e.contains("waiting for container setup"))
        .count();
    if setup_timeouts > 0 {
        notes.push(format!("{setup_timeouts} concurrent thaw start(s) failed with `waiting for container setup: Resource temporarily unavailable`: the guest agent waits at most 60 s (`SETUP_TIMEOUT` in guest-agent/src/runtime/spawn.rs) for its init helper to set a container up, and with {} VMs sharing this machine's cores that in-guest work took longer. It is a fixed timeout inside the guest, not covered by the shim's agent request timeout.", n.concurrency));
    }
    notes.push("Memory: `private memory added` is the `Private_Dirty` (from `/proc/<pid>/smaps`) of the sandbox's shim and every process below it: for thaw the VMM, whose guest-memory mapping of the template's memory file is `MAP_PRIVATE`, so its `Private_Dirty` counts exactly the guest pages this sandbox wrote; the template's clean pages are shared page cache and not counted. For runc the shim and the container's process; for gVisor the shim, the runsc sandbox and gofer.".into());
    if pvm {
        notes.push("What holds only on hardware KVM (this run is on PVM: every guest kernel instruction is emulated at ~1 µs, guest user code is native): the thaw `ctr run` and CRI times, thaw cold boot, and every thaw/runc ratio are dominated by emulated guest kernel work (mounting the image, namespaces, exec, page faults, teardown) and are upper bounds here; on hardware that work takes milliseconds. restore -> agent ready is mostly host-side work (mapping the memory file, recreating vCPU and device state) plus a short emulated vsock reset. runc and gVisor run natively here (runsc's ptrace platform), so their absolute figures are meaningful. Memory figures are page counts and hold on hardware too (the guest may dirty a few more or fewer pages there).".into());
    } else if platform == "svm" {
        notes.push("What holds only on hardware KVM (this run is in the emulated-SVM guest: QEMU TCG runs everything, host and guest, 10-50x slower than native, one vCPU): absolute times are slow and mean little; the ratios are the better proxy for hardware, since guest kernel code is emulated at the same speed as everything else, unlike PVM. This is the stock hardware-KVM code path of thaw (no `thaw_pvm`). Memory figures are page counts and hold on hardware.".into());
    }
    Report {
        title: format!("thaw startup, concurrency and density on `{platform}`"),
        header,
        rows,
        baseline: RUNC.into(),
        notes,
    }
}
