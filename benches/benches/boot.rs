//! Boot benchmark: `cargo bench -p thaw-benches --bench boot`.
//!
//! Boots the guest kernel to the static test init (tests/test-init) N times
//! under the release `thaw-vmm` and, as a baseline, under QEMU's microvm
//! (same kernel, root image and command line), alternating the two so host
//! load hits both alike. Prints p50/p99 of:
//! - VMM process start -> first guest instruction, -> kernel entry, -> init
//!   marker (the VMM's `thaw-vmm: mark` lines);
//! - the VMM's own RSS (guest memory excluded) while the guest runs, from
//!   the control socket's status reply, after the init mark;
//! - spawn -> init for thaw-vmm and QEMU, and their ratio.
//!
//! Environment: THAW_BENCH_RUNS (default 3 on PVM hosts, where one boot
//! takes half a minute or more; 10 elsewhere), THAW_BENCH_MEMORY_MIB
//! (default 256, the VMM's and the shim's default), THAW_KERNEL (else
//! kernel-config/build.sh). QEMU comes from scripts/install-deps.sh.

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use thaw_benches::run::{self, QemuOptions, ThawBoot, ThawOptions};
use thaw_benches::{count_from_env, fmt_duration, host_is_pvm, percentile_of, summarize, Error};
use thaw_tests::binaries::workspace_root;
use thaw_tests::{cmd, guest};

const RUNS_ENV: &str = "THAW_BENCH_RUNS";
const MEMORY_ENV: &str = "THAW_BENCH_MEMORY_MIB";
const RSS_TARGET_KIB: u64 = 3 * 1024;

/// `cargo build --release -p thaw-vmm`: the benchmark measures the release
/// VMM, whatever profile the bench itself was built with.
fn release_vmm() -> Result<PathBuf, Error> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = cmd::run(
        Command::new(cargo).current_dir(workspace_root()).args([
            "build",
            "--release",
            "-p",
            "thaw-vmm",
        ]),
        Duration::from_secs(1800),
    );
    if !out.success() {
        return Err(Error::Boot(format!(
            "building the release thaw-vmm failed:\n{}",
            out.describe()
        )));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target.join("release/thaw-vmm"))
}

fn qemu_available() -> bool {
    Command::new(run::QEMU)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn ms(micros: u64) -> Duration {
    Duration::from_micros(micros)
}

fn kib(v: u64) -> String {
    format!("{:.2} MiB", v as f64 / 1024.0)
}

/// One table row: p50, p99, min, max of durations.
fn time_row(label: &str, samples: &[Duration]) {
    match summarize(samples) {
        Some(s) => println!(
            "  {label:<46} {:>10} {:>10} {:>10} {:>10}",
            fmt_duration(s.p50),
            fmt_duration(s.p99),
            fmt_duration(s.min),
            fmt_duration(s.max)
        ),
        None => println!("  {label:<46} {:>10}", "n/a"),
    }
}

fn kib_row(label: &str, samples: &[u64]) {
    let p = |q| {
        percentile_of(samples, q)
            .map(kib)
            .unwrap_or_else(|| "n/a".into())
    };
    let min = samples.iter().min().copied().map(kib).unwrap_or_default();
    let max = samples.iter().max().copied().map(kib).unwrap_or_default();
    println!(
        "  {label:<46} {:>10} {:>10} {:>10} {:>10}",
        p(50.0),
        p(99.0),
        min,
        max
    );
}

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boot benchmark failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<(), Error> {
    let pvm = host_is_pvm();
    let runs = count_from_env(RUNS_ENV, if pvm { 3 } else { 10 })?;
    let memory_mib = count_from_env(MEMORY_ENV, 256)? as u32;
    let deadline = Duration::from_secs(if pvm { 900 } else { 60 });

    eprintln!("boot bench: building the release thaw-vmm, the static test init, the guest kernel");
    let vmm = release_vmm()?;
    let init = guest::static_binary("thaw-test-init", "thaw-test-init");
    let kernel = guest::kernel();
    let work = tempfile::tempdir().map_err(Error::io("creating a temporary directory"))?;
    let rootfs = work.path().join("rootfs");
    guest::root_dir_with_init(&rootfs, &init);
    let root = work.path().join("root.erofs");
    guest::erofs_image(&rootfs, &root);
    // The test init reads /dev/vdb before it dials the host over vsock.
    let data = work.path().join("data.img");
    std::fs::write(&data, vec![0x5a; 64 * 1024]).map_err(Error::io("writing the data disk"))?;
    let mut qemu_note = (!qemu_available()).then(|| {
        format!(
            "{} not found (scripts/install-deps.sh installs it)",
            run::QEMU
        )
    });

    println!("thaw boot benchmark: {runs} runs ({RUNS_ENV}), {memory_mib} MiB guest, 1 vCPU");
    println!("  vmm    {}", vmm.display());
    println!("  kernel {}", kernel.display());
    println!(
        "  host KVM: {}",
        if pvm {
            "PVM (guest kernel code is emulated, ~1 us per instruction)"
        } else {
            "hardware (VMX/SVM)"
        }
    );

    let mut boots: Vec<ThawBoot> = Vec::new();
    let mut qemu_init: Vec<Duration> = Vec::new();
    for i in 1..=runs {
        let dir = tempfile::tempdir_in(work.path()).map_err(Error::io("run directory"))?;
        let b = run::boot_thaw(&ThawOptions {
            vmm: &vmm,
            kernel,
            root: &root,
            data: &data,
            work: dir.path(),
            memory_mib,
            deadline,
        })?;
        let mut line = format!(
            "  run {i}: thaw init mark {}, spawn -> init {}, VMM RSS {}",
            b.mark("init").map(ms).map(fmt_duration).unwrap_or_default(),
            fmt_duration(b.spawn_to_init),
            kib(b.vmm_rss_kib),
        );
        if qemu_note.is_none() {
            let cmdline = b
                .cmdline
                .as_deref()
                .map(run::cmdline_for_qemu)
                .ok_or_else(|| Error::Boot("the VMM did not log its command line".into()))?;
            match run::boot_qemu(&QemuOptions {
                kernel,
                root: &root,
                data: &data,
                cmdline: &cmdline,
                memory_mib,
                pvm,
                deadline,
            }) {
                Ok(d) => {
                    line += &format!("; QEMU spawn -> init {}", fmt_duration(d));
                    qemu_init.push(d);
                }
                Err(e) => qemu_note = Some(format!("failed, so no baseline: {e}")),
            }
        }
        println!("{line}");
        boots.push(b);
    }

    let marks = |name: &str| -> Vec<Duration> {
        boots.iter().filter_map(|b| b.mark(name)).map(ms).collect()
    };
    let thaw_init: Vec<Duration> = boots.iter().map(|b| b.spawn_to_init).collect();
    let star = if pvm { " [*]" } else { "" };
    println!();
    println!(
        "  {:<46} {:>10} {:>10} {:>10} {:>10}",
        "", "p50", "p99", "min", "max"
    );
    time_row(
        "process start -> first guest instruction",
        &marks("first-guest-instruction"),
    );
    time_row("process start -> kernel entry", &marks("kernel-entry"));
    time_row(
        &format!("process start -> init marker{star}"),
        &marks("init"),
    );
    let vmm_rss: Vec<u64> = boots.iter().map(|b| b.vmm_rss_kib).collect();
    kib_row("VMM RSS, guest memory excluded", &vmm_rss);
    kib_row(
        &format!("guest RSS (for reference){star}"),
        &boots.iter().map(|b| b.guest_rss_kib).collect::<Vec<_>>(),
    );
    time_row(&format!("spawn -> init, thaw-vmm{star}"), &thaw_init);
    time_row(
        &format!("spawn -> init, QEMU microvm baseline{star}"),
        &qemu_init,
    );
    match (summarize(&thaw_init), summarize(&qemu_init)) {
        (Some(t), Some(q)) => println!(
            "  {:<46} {:>10}",
            format!("thaw / QEMU, time to init (p50){star}"),
            format!("{:.2}x", t.p50.as_secs_f64() / q.p50.as_secs_f64())
        ),
        _ => println!("  thaw / QEMU, time to init: n/a"),
    }
    if let Some(note) = &qemu_note {
        println!("  QEMU baseline: {note}");
    }
    if let Some(p99) = percentile_of(&vmm_rss, 99.0) {
        println!(
            "  VMM RSS p99 {} against the 3 MiB target: {}",
            kib(p99),
            if p99 <= RSS_TARGET_KIB {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    if let Some(c) = boots.first().and_then(|b| b.cmdline.as_deref()) {
        println!("  guest command line: {c}");
    }
    if pvm {
        println!(
            "  [*] guest-kernel time: on this PVM host every guest kernel instruction is\n      \
             emulated, so these figures, and the thaw/QEMU ratio (both pay it), say little\n      \
             about hardware KVM. Process start -> first guest instruction / kernel entry\n      \
             and the VMM's RSS are VMM-side figures and hold on both."
        );
    }
    Ok(())
}
