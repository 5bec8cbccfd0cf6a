//! Template key benchmark: `cargo bench -p thaw-benches --bench template_key`.
//!
//! Every sandbox start computes the key of its template from the guest
//! kernel and the agent root image. Prints p50/p99 of:
//! - hashing both files in full (`TemplateKey::compute`, page cache warm),
//!   the baseline;
//! - the store's key with its digest cache (`Store::key`), after one
//!   uncached call;
//! - and their ratio.
//!
//! Host-side work only: the figures hold on any host.
//!
//! Environment: THAW_BENCH_RUNS (default 20), THAW_KERNEL (else
//! kernel-config/build.sh).

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use thaw_benches::{count_from_env, fmt_duration, summarize, Error};
use thaw_snapshots::template::{Store, TemplateInputs, TemplateKey};
use thaw_tests::{agent, guest};

fn row(label: &str, samples: &[Duration]) -> Option<Duration> {
    let s = summarize(samples)?;
    println!(
        "  {label:<40} {:>10} {:>10}   ({} runs)",
        fmt_duration(s.p50),
        fmt_duration(s.p99),
        s.runs
    );
    Some(s.p50)
}

fn bench() -> Result<(), Error> {
    let runs = count_from_env("THAW_BENCH_RUNS", 20)?;
    let inputs = TemplateInputs {
        kernel: guest::kernel().to_path_buf(),
        root_image: agent::root_image(),
        vcpus: 1,
        memory_mib: 256,
        spare_disks: 4,
        guest_cmdline: String::new(),
    };
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let tmp = tempfile::tempdir().map_err(Error::io("creating a scratch store"))?;
    let store = Store::new(tmp.path());
    let key_err = |e: thaw_snapshots::Error| Error::Boot(format!("computing a template key: {e}"));
    let expected = TemplateKey::compute(&inputs).map_err(key_err)?;
    store.key(&inputs).map_err(key_err)?;

    let (mut full, mut cached) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        // Alternated, so host load hits both alike.
        let t = Instant::now();
        let a = TemplateKey::compute(&inputs).map_err(key_err)?;
        full.push(t.elapsed());
        let t = Instant::now();
        let b = store.key(&inputs).map_err(key_err)?;
        cached.push(t.elapsed());
        if a != expected || b != expected {
            return Err(Error::Boot(format!("keys differ: {a} {b} {expected}")));
        }
    }
    println!(
        "template key of kernel ({} bytes) + agent root image ({} bytes):",
        size(&inputs.kernel),
        size(&inputs.root_image)
    );
    println!("  {:<40} {:>10} {:>10}", "", "p50", "p99");
    let f = row("full hash (baseline)", &full);
    let c = row("store key, digest cache", &cached);
    if let (Some(f), Some(c)) = (f, c) {
        println!(
            "  cached / full (p50): {:.4}",
            c.as_secs_f64() / f.as_secs_f64().max(1e-9)
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("template_key bench: {e}");
            ExitCode::FAILURE
        }
    }
}
