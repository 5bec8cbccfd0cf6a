//! Pod networking, thaw against runc in one run: a container started with
//! `ctr run --cni` on a bridge network (the same CNI config for both),
//! measured from the host.
//!
//! - host -> container and container -> host TCP throughput (`iperf3`
//!   from Debian, client on the host, server in the container);
//! - TCP round trip of one byte (an echo server in the container), p50/p99
//!   over THAW_BENCH_RTT_ROUNDS (default 500);
//! - thaw only: host CPU time per GiB moved (user + system) of the whole
//!   VMM process (on PVM that includes emulating the guest kernel, which
//!   runs on the vCPU threads) and of its virtio-net worker thread alone,
//!   the device model's and the tap's host-side cost.
//!
//! Each throughput figure runs THAW_BENCH_NET_SECS (default 5) seconds,
//! THAW_BENCH_NET_RUNS (default 3) times, runtimes interleaved. On PVM
//! hosts the guest kernel's network stack is emulated (~1 µs per
//! instruction), so thaw's figures there measure that; only the ratio on
//! hardware KVM says what users get. The per-packet cost of the device
//! model alone is `cargo bench --bench net_device`.
//!
//! Run: `cargo bench -p thaw-benches --bench net_throughput`.

// Benchmark code: a failed step panics with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use thaw_benches::{count_from_env, fmt_duration, host_is_pvm, summarize};
use thaw_tests::binaries::binaries;
use thaw_tests::cmd;
use thaw_tests::cni::DefaultCni;
use thaw_tests::containerd::processes_matching;
use thaw_tests::image::build_image_tar_with_programs;
use thaw_tests::PrivateContainerd;

mod common;
use common::{release_binaries, release_containerd};

const IMAGE: &str = "thaw.test/iperf3:bench";
const IPERF: &str = "/usr/bin/iperf3";
const ECHO_PORT: u16 = 7001;

fn main() {
    if let Err(e) = run() {
        eprintln!("network benchmark failed: {e}");
        std::process::exit(1);
    }
}

/// One runtime's figures.
#[derive(Default)]
struct Figures {
    to_pod_gbps: Vec<f64>,
    from_pod_gbps: Vec<f64>,
    rtt: Vec<Duration>,
    /// VMM CPU seconds per GiB moved, all threads (thaw only); on PVM
    /// this includes the emulation of the guest kernel.
    vmm_cpu_per_gib: Vec<f64>,
    /// The virtio-net worker thread's share: the device's host cost.
    device_cpu_per_gib: Vec<f64>,
}

fn run() -> Result<(), String> {
    let secs = count_from_env("THAW_BENCH_NET_SECS", 5).map_err(|e| e.to_string())?;
    let runs = count_from_env("THAW_BENCH_NET_RUNS", 3).map_err(|e| e.to_string())?;
    let rounds = count_from_env("THAW_BENCH_RTT_ROUNDS", 500).map_err(|e| e.to_string())?;
    if !std::path::Path::new(IPERF).exists() {
        return Err(format!("{IPERF} is missing (Debian package iperf3)"));
    }
    binaries();
    let release = release_binaries()?;
    let cni = DefaultCni::install("thbench0", 215);
    let c = release_containerd(&release, false)?;
    c.import_image_in(thaw_tests::containerd::NAMESPACE, IMAGE, |work| {
        build_image_tar_with_programs(work, IMAGE, &[IPERF])
    });

    let mut figures = [("runc", Figures::default()), ("thaw", Figures::default())];
    for round in 0..runs {
        for (runtime, f) in figures.iter_mut() {
            eprintln!("round {}/{runs}: {runtime}", round + 1);
            measure(&c, &cni, runtime, secs, rounds, f)?;
        }
    }
    print_report(&figures, secs, runs, rounds);
    let leaks = c.leaks(Duration::from_secs(10));
    if !leaks.is_empty() {
        return Err(format!("left behind: {leaks:?}"));
    }
    Ok(())
}

fn runtime_arg(runtime: &str) -> &'static str {
    if runtime == "runc" {
        "io.containerd.runc.v2"
    } else {
        "io.containerd.thaw.v2"
    }
}

fn measure(
    c: &PrivateContainerd,
    cni: &DefaultCni,
    runtime: &str,
    secs: usize,
    rounds: usize,
    f: &mut Figures,
) -> Result<(), String> {
    let id = c.new_id(&format!("net{runtime}"));
    let script = format!("iperf3 -s --logfile /tmp/iperf3.log & exec nc -ll -p {ECHO_PORT} -e cat");
    let out = c.ctr_timeout(
        &[
            "run",
            "-d",
            "--cni",
            "--runtime",
            runtime_arg(runtime),
            IMAGE,
            &id,
            "sh",
            "-c",
            &script,
        ],
        Duration::from_secs(600),
    );
    if !out.success() {
        return Err(format!("starting {runtime}: {}", out.describe()));
    }
    let result = (|| {
        let addr = c.ctr(&[
            "tasks",
            "exec",
            "--exec-id",
            "ip",
            &id,
            "ip",
            "-4",
            "-o",
            "addr",
            "show",
            "eth0",
        ]);
        let ip = addr
            .stdout
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .filter(|a| a.starts_with(&cni.prefix))
            .ok_or_else(|| format!("{runtime}: no address on eth0: {}", addr.describe()))?
            .to_string();
        // Not a bare connect to iperf3's port: its server takes that for a
        // client and is busy with it for a while.
        wait_listening(&ip, ECHO_PORT)?;
        let vmm = (runtime == "thaw").then(|| vmm_pid(c)).flatten();
        let cpu_before = vmm.map(|p| cpu_seconds(&format!("/proc/{p}/stat")));
        let device = vmm.and_then(net_worker_stat);
        let device_before = device.as_deref().map(cpu_seconds);
        let server_log = || {
            let out = c.ctr(&[
                "tasks",
                "exec",
                "--exec-id",
                "log",
                &id,
                "cat",
                "/tmp/iperf3.log",
            ]);
            format!("{}{}", out.stdout, out.stderr)
        };
        let (to_pod, bytes_to) =
            iperf(&ip, secs, false).map_err(|e| format!("{e}\nserver log:\n{}", server_log()))?;
        let (from_pod, bytes_from) =
            iperf(&ip, secs, true).map_err(|e| format!("{e}\nserver log:\n{}", server_log()))?;
        let gib = (bytes_to + bytes_from) / f64::from(1u32 << 30);
        if let (Some(pid), Some(before), true) = (vmm, cpu_before, gib > 0.0) {
            let used = cpu_seconds(&format!("/proc/{pid}/stat")) - before;
            f.vmm_cpu_per_gib.push(used / gib);
        }
        if let (Some(stat), Some(before), true) = (&device, device_before, gib > 0.0) {
            f.device_cpu_per_gib
                .push((cpu_seconds(stat) - before) / gib);
        }
        f.to_pod_gbps.push(to_pod);
        f.from_pod_gbps.push(from_pod);
        f.rtt.extend(round_trips(&ip, rounds)?);
        Ok(())
    })();
    let _ = c.ctr(&["tasks", "kill", "-s", "SIGKILL", &id]);
    let _ = cmd::wait_for(Duration::from_secs(60), || {
        c.ctr(&["tasks", "delete", &id]).success().then_some(())
    });
    let _ = c.ctr(&["containers", "delete", &id]);
    result
}

fn wait_listening(ip: &str, port: u16) -> Result<(), String> {
    let addr = format!("{ip}:{port}").parse().map_err(|e| format!("{e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("nothing listens on {addr}: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// [`iperf_once`], again while the server is not ready (busy or still
/// starting) for up to 5 tries.
fn iperf(ip: &str, secs: usize, reverse: bool) -> Result<(f64, f64), String> {
    let mut last = String::new();
    for _ in 0..5 {
        match iperf_once(ip, secs, reverse) {
            Ok(r) => return Ok(r),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    Err(last)
}

/// Bits per second received and bytes moved, from iperf3's JSON.
fn iperf_once(ip: &str, secs: usize, reverse: bool) -> Result<(f64, f64), String> {
    let mut cmd = Command::new(IPERF);
    cmd.args(["-c", ip, "-t", &secs.to_string(), "-J"]);
    if reverse {
        cmd.arg("-R");
    }
    let out = cmd::run(&mut cmd, Duration::from_secs(secs as u64 + 120));
    if !out.success() {
        return Err(format!("iperf3: {}", out.describe()));
    }
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).map_err(|e| format!("iperf3 JSON: {e}"))?;
    let sum = &v["end"]["sum_received"];
    let bps = sum["bits_per_second"].as_f64().ok_or_else(|| {
        format!(
            "iperf3 -c {ip}{}: no result; its error: {}",
            if reverse { " -R" } else { "" },
            v["error"]
        )
    })?;
    let bytes = sum["bytes"].as_f64().unwrap_or(0.0);
    Ok((bps / 1e9, bytes))
}

fn round_trips(ip: &str, rounds: usize) -> Result<Vec<Duration>, String> {
    let mut s = TcpStream::connect((ip, ECHO_PORT)).map_err(|e| format!("echo: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(rounds);
    let mut b = [0u8; 1];
    for _ in 0..rounds {
        let t = Instant::now();
        s.write_all(b"x").map_err(|e| format!("echo write: {e}"))?;
        s.read_exact(&mut b)
            .map_err(|e| format!("echo read: {e}"))?;
        out.push(t.elapsed());
    }
    Ok(out)
}

fn vmm_pid(c: &PrivateContainerd) -> Option<i32> {
    processes_matching(&c.thaw_state.display().to_string(), "-")
        .into_iter()
        .find(|(_, cmd)| cmd.contains("thaw-vmm") && cmd.contains("--api-sock"))
        .map(|(pid, _)| pid)
}

/// The stat file of the VMM's virtio-net worker thread.
fn net_worker_stat(pid: i32) -> Option<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.flatten().find_map(|t| {
        let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
        (comm.trim() == "thaw-virtio-net").then(|| t.path().join("stat").display().to_string())
    })
}

/// User + system CPU seconds from a /proc stat file (process or thread).
fn cpu_seconds(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    let after_comm = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat(5): the 12th and 13th after the comm.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz.max(1.0)
}

/// Round trips are microseconds on a host, milliseconds through PVM.
fn fmt_rtt(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    } else {
        fmt_duration(d)
    }
}

fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s.get(s.len() / 2).copied()
}

fn print_report(figures: &[(&str, Figures); 2], secs: usize, runs: usize, rounds: usize) {
    println!(
        "\npod networking, ctr run --cni on a bridge; {runs} runs of {secs} s per throughput figure, {rounds} round trips per run{}",
        if host_is_pvm() {
            " (PVM host: the guest kernel's network stack is emulated; thaw's figures hold only here)"
        } else {
            ""
        }
    );
    println!(
        "{:<6} {:>18} {:>18} {:>10} {:>10} {:>14} {:>17}",
        "",
        "host->pod Gbit/s",
        "pod->host Gbit/s",
        "RTT p50",
        "RTT p99",
        "VMM CPU s/GiB",
        "device CPU s/GiB"
    );
    for (name, f) in figures {
        let rtt = summarize(&f.rtt);
        println!(
            "{:<6} {:>18} {:>18} {:>10} {:>10} {:>14} {:>17}",
            name,
            median(&f.to_pod_gbps).map_or("-".into(), |g| format!("{g:.4}")),
            median(&f.from_pod_gbps).map_or("-".into(), |g| format!("{g:.4}")),
            rtt.as_ref().map_or("-".into(), |s| fmt_rtt(s.p50)),
            rtt.as_ref().map_or("-".into(), |s| fmt_rtt(s.p99)),
            median(&f.vmm_cpu_per_gib).map_or("-".into(), |c| format!("{c:.2}")),
            median(&f.device_cpu_per_gib).map_or("-".into(), |c| format!("{c:.2}")),
        );
    }
    let (runc, thaw) = (&figures[0].1, &figures[1].1);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
        _ => "-".into(),
    };
    let rtt_p50 = |f: &Figures| summarize(&f.rtt).map(|s| s.p50.as_secs_f64());
    println!(
        "thaw/runc: host->pod {}, pod->host {}, RTT p50 {}",
        ratio(median(&thaw.to_pod_gbps), median(&runc.to_pod_gbps)),
        ratio(median(&thaw.from_pod_gbps), median(&runc.from_pod_gbps)),
        ratio(rtt_p50(thaw), rtt_p50(runc)),
    );
}
