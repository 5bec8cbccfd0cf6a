//! Host directories in containers, thaw (virtio-fs) against a runc bind
//! mount and the host directory itself, in one run, with one script:
//!
//! - sequential write: `dd` of THAW_BENCH_VOLUME_MB (default 64) MiB,
//!   fsync'd;
//! - sequential read of a file the host wrote just before (warm in the
//!   host's page cache, cold in the guest's);
//! - creating THAW_BENCH_VOLUME_FILES (default 500) empty files, then
//!   checking each exists (stat).
//!
//! Times come from inside the container (coreutils `date +%s%N`, put in
//! the image with `dd` and called by path: busybox's shell would run its
//! own `date`, which has no nanoseconds), so the cost of reaching the
//! container is not in them. THAW_BENCH_RUNS (default 3) rounds, runtimes interleaved; medians.
//! On PVM hosts thaw's figures include the emulated guest kernel's FUSE and
//! page-cache work; they hold only there.
//!
//! Run: `cargo bench -p thaw-benches --bench volumes`.

// Benchmark code: a failed step panics with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use thaw_benches::{count_from_env, host_is_pvm};
use thaw_tests::binaries::binaries;
use thaw_tests::cmd;
use thaw_tests::image::build_image_tar_with_programs;
use thaw_tests::PrivateContainerd;

mod common;
use common::{release_binaries, release_containerd};

const IMAGE: &str = "thaw.test/coreutils:bench";

fn main() {
    if let Err(e) = run() {
        eprintln!("volume benchmark failed: {e}");
        std::process::exit(1);
    }
}

/// One run's figures: write and read MB/s, creates and stats per second.
#[derive(Debug, Clone, Copy)]
struct Sample {
    write: f64,
    read: f64,
    create: f64,
    stat: f64,
}

fn script(dir: &str, mb: usize, files: usize) -> String {
    format!(
        "d={dir}; t0=$(/usr/bin/date +%s%N); /usr/bin/dd if=/dev/zero of=$d/big bs=1M count={mb} conv=fsync 2>/dev/null; \
         t1=$(/usr/bin/date +%s%N); /usr/bin/dd if=$d/hostfile of=/dev/null bs=1M 2>/dev/null; t2=$(/usr/bin/date +%s%N); \
         mkdir $d/small; i=0; while [ $i -lt {files} ]; do : > $d/small/$i; i=$((i+1)); done; t3=$(/usr/bin/date +%s%N); \
         i=0; while [ $i -lt {files} ]; do [ -e $d/small/$i ] || exit 9; i=$((i+1)); done; t4=$(/usr/bin/date +%s%N); \
         echo RESULT $((t1-t0)) $((t2-t1)) $((t3-t2)) $((t4-t3))"
    )
}

fn parse(out: &str, mb: usize, files: usize) -> Result<Sample, String> {
    let line = out
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .ok_or_else(|| format!("no RESULT line in {out:?}"))?;
    let ns: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let [w, r, c, s] = ns[..] else {
        return Err(format!("bad RESULT line {line:?}"));
    };
    let per_sec = |n: f64, t: f64| n / (t.max(1.0) / 1e9);
    Ok(Sample {
        write: per_sec(mb as f64, w),
        read: per_sec(mb as f64, r),
        create: per_sec(files as f64, c),
        stat: per_sec(files as f64, s),
    })
}

/// A fresh directory holding the file the read figure reads.
fn fresh_dir(root: &Path, name: &str, mb: usize) -> Result<std::path::PathBuf, String> {
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("hostfile"), vec![7u8; mb << 20]).map_err(|e| e.to_string())?;
    Ok(dir)
}

fn in_container(
    c: &PrivateContainerd,
    runtime: &str,
    dir: &Path,
    mb: usize,
    files: usize,
) -> Result<Sample, String> {
    let id = c.new_id(if runtime.contains("thaw") {
        "volthaw"
    } else {
        "volrunc"
    });
    let mount = format!("type=bind,src={},dst=/data,options=rbind:rw", dir.display());
    let out = c.ctr_timeout(
        &[
            "run",
            "--rm",
            "--runtime",
            runtime,
            "--mount",
            &mount,
            IMAGE,
            &id,
            "sh",
            "-c",
            &script("/data", mb, files),
        ],
        Duration::from_secs(1800),
    );
    if !out.success() {
        return Err(format!("{runtime}: {}", out.describe()));
    }
    parse(&out.stdout, mb, files)
}

fn on_host(dir: &Path, mb: usize, files: usize) -> Result<Sample, String> {
    let mut c = Command::new("/bin/sh");
    c.args(["-c", &script(&dir.display().to_string(), mb, files)]);
    let out = cmd::run(&mut c, Duration::from_secs(600));
    if !out.success() {
        return Err(format!("host: {}", out.describe()));
    }
    parse(&out.stdout, mb, files)
}

fn median(v: impl Iterator<Item = f64>) -> f64 {
    let mut s: Vec<f64> = v.collect();
    s.sort_by(|a, b| a.total_cmp(b));
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

fn run() -> Result<(), String> {
    let mb = count_from_env("THAW_BENCH_VOLUME_MB", 64).map_err(|e| e.to_string())?;
    let files = count_from_env("THAW_BENCH_VOLUME_FILES", 500).map_err(|e| e.to_string())?;
    let runs = count_from_env("THAW_BENCH_RUNS", 3).map_err(|e| e.to_string())?;
    binaries();
    let release = release_binaries()?;
    let c = release_containerd(&release, false)?;
    c.import_image_in(thaw_tests::containerd::NAMESPACE, IMAGE, |work| {
        build_image_tar_with_programs(work, IMAGE, &["/usr/bin/date", "/usr/bin/dd"])
    });
    // On disk, like a hostPath or an emptyDir: not the harness's tmpfs.
    let root = tempfile::Builder::new()
        .prefix("thaw-bench-volumes-")
        .tempdir_in("/var/tmp")
        .map_err(|e| e.to_string())?;
    let mut samples: Vec<(&str, Vec<Sample>)> = vec![
        ("host", Vec::new()),
        ("runc", Vec::new()),
        ("thaw", Vec::new()),
    ];
    for round in 0..runs {
        eprintln!("round {}/{runs}", round + 1);
        let dir = fresh_dir(root.path(), "host", mb)?;
        samples[0].1.push(on_host(&dir, mb, files)?);
        let dir = fresh_dir(root.path(), "runc", mb)?;
        samples[1]
            .1
            .push(in_container(&c, "io.containerd.runc.v2", &dir, mb, files)?);
        let dir = fresh_dir(root.path(), "thaw", mb)?;
        samples[2]
            .1
            .push(in_container(&c, "io.containerd.thaw.v2", &dir, mb, files)?);
    }
    println!(
        "\nhost directory in a container: {mb} MiB sequential, {files} small files, median of {runs} runs{}",
        if host_is_pvm() {
            " (PVM host: thaw's figures include the emulated guest kernel; they hold only here)"
        } else {
            ""
        }
    );
    println!(
        "{:<6} {:>12} {:>12} {:>12} {:>12}",
        "", "write MB/s", "read MB/s", "creates/s", "stats/s"
    );
    let mut medians = Vec::new();
    for (name, v) in &samples {
        let m = Sample {
            write: median(v.iter().map(|s| s.write)),
            read: median(v.iter().map(|s| s.read)),
            create: median(v.iter().map(|s| s.create)),
            stat: median(v.iter().map(|s| s.stat)),
        };
        println!(
            "{:<6} {:>12.1} {:>12.1} {:>12.0} {:>12.0}",
            name, m.write, m.read, m.create, m.stat
        );
        medians.push(m);
    }
    let (host, runc, thaw) = (medians[0], medians[1], medians[2]);
    println!(
        "thaw/runc: write {:.3}, read {:.3}, create {:.3}, stat {:.3}; thaw/host: write {:.3}, read {:.3}",
        thaw.write / runc.write,
        thaw.read / runc.read,
        thaw.create / runc.create,
        thaw.stat / runc.stat,
        thaw.write / host.write,
        thaw.read / host.read,
    );
    let leaks = c.leaks(Duration::from_secs(10));
    if !leaks.is_empty() {
        return Err(format!("left behind: {leaks:?}"));
    }
    Ok(())
}
