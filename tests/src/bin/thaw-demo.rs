//! `make demo`: what thaw does, end to end, on this machine. With what
//! scripts/demo.sh built (the shim, the VMM, the agent's root image and the
//! guest kernel), starts a private containerd, and runs busybox through
//! `ctr run --runtime io.containerd.thaw.v2` in micro-VMs, then the same
//! with runc, printing output, exit codes and wall times.

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use thaw_tests::image::BUSYBOX_REF;
use thaw_tests::{Backend, PrivateContainerd};

const RUN_TIMEOUT: Duration = Duration::from_secs(900);

fn run(
    c: &PrivateContainerd,
    label: &str,
    runtime: Option<&str>,
    cmd: &[&str],
) -> (Option<i32>, Duration) {
    let id = c.new_id("demo");
    let mut args: Vec<&str> = match runtime {
        None => c.run_args(&["--rm"]),
        Some(rt) => vec!["run", "--rm", "--runtime", rt],
    };
    args.push(BUSYBOX_REF);
    args.push(&id);
    args.extend_from_slice(cmd);
    println!("\n$ ctr {}", args.join(" "));
    let started = Instant::now();
    let out = c.ctr_timeout(&args, RUN_TIMEOUT);
    let took = started.elapsed();
    print!("{}", out.stdout);
    if !out.stderr.trim().is_empty() {
        print!("{}", out.stderr);
    }
    println!(
        "  -> {label}: exit code {:?}, {:.2} s wall",
        out.code(),
        took.as_secs_f64()
    );
    (out.code(), took)
}

fn main() {
    let total = Instant::now();
    println!("thaw demo: starting a private containerd with the thaw runtime");
    let c = PrivateContainerd::start(Backend::Vm);
    println!(
        "private containerd up at {} after {:.1} s",
        c.address.display(),
        total.elapsed().as_secs_f64()
    );
    c.import_busybox();
    println!("busybox image imported (built offline from busybox-static)");

    let first = run(
        &c,
        "thaw, first start (builds the VM template, one cold boot, unless it is stored already)",
        None,
        &["echo", "hello from a thaw micro-VM"],
    );
    let second = run(
        &c,
        "thaw, restored from the template",
        None,
        &["sh", "-c", "uname -a; exit 7"],
    );
    let runc = run(
        &c,
        "runc, same image",
        Some("io.containerd.runc.v2"),
        &["echo", "hello from runc"],
    );

    println!("\nsummary");
    println!(
        "  thaw first start (template if needed + run): {:>8.2} s",
        first.1.as_secs_f64()
    );
    println!(
        "  thaw restored start:                         {:>8.2} s",
        second.1.as_secs_f64()
    );
    println!(
        "  runc:                                        {:>8.2} s",
        runc.1.as_secs_f64()
    );
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        println!("  note: this host's KVM is PVM: guest kernel code is emulated, so in-guest work");
        println!("  (boot, container setup) is far slower here than on hardware KVM.");
    }
    println!("  total demo time: {:.1} s", total.elapsed().as_secs_f64());
    let ok = first.0 == Some(0) && second.0 == Some(7) && runc.0 == Some(0);
    drop(c);
    if !ok {
        eprintln!("thaw demo: a run did not end as expected (see above)");
        std::process::exit(1);
    }
}
