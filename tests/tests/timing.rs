//! `ctr run --rm busybox true` wall time, thaw next to runc, in one run of
//! one private containerd. Prints the numbers (run with --nocapture); fails
//! only if a run fails. With THAW_E2E_VM=1 thaw uses real VMs, otherwise
//! the host-unisolated backend (which measures the shim, the agent and the
//! erofs image path, not VM start).

use std::time::Duration;

use thaw_tests::binaries::{require_agent, vm_tests_enabled};
use thaw_tests::image::BUSYBOX_REF;
use thaw_tests::{Backend, PrivateContainerd};

const ROUNDS: usize = 7;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn ctr_run_rm_true_wall_time_thaw_vs_runc() {
    let backend = if vm_tests_enabled() {
        Backend::Vm
    } else {
        require_agent();
        Backend::Host
    };
    let c = PrivateContainerd::start(backend);
    c.import_busybox();
    let privileged = std::env::var_os("THAW_TEST_PRIVILEGED").is_some();

    let thaw = |c: &PrivateContainerd| {
        let id = c.new_id("tthaw");
        let mut args = c.run_args(&["--rm"]);
        args.extend([BUSYBOX_REF, id.as_str(), "true"]);
        let out = c.ctr_timeout(&args, Duration::from_secs(900));
        assert_eq!(out.code(), Some(0), "{}", out.describe());
        out.elapsed
    };
    let runc = |c: &PrivateContainerd| {
        let id = c.new_id("trunc");
        let mut args = vec!["run", "--rm"];
        if privileged {
            args.push("--privileged");
        }
        args.extend([BUSYBOX_REF, id.as_str(), "true"]);
        let out = c.ctr(&args);
        assert_eq!(out.code(), Some(0), "{}", out.describe());
        out.elapsed
    };

    // First runs: thaw builds the erofs image (cache miss), runc warms up.
    let thaw_first = thaw(&c);
    let runc_first = runc(&c);
    let mut t = Vec::new();
    let mut r = Vec::new();
    for _ in 0..ROUNDS {
        t.push(thaw(&c));
        r.push(runc(&c));
    }
    let (tm, rm) = (median(t.clone()), median(r.clone()));
    eprintln!(
        "ctr run --rm busybox true, {ROUNDS} rounds interleaved, same containerd:\n  \
         thaw ({}): first {:?} (image cache miss), median {:?}, min {:?}, max {:?}\n  \
         runc: first {:?}, median {:?}, min {:?}, max {:?}",
        if backend == Backend::Vm {
            "VM backend"
        } else {
            "host-unisolated backend, no VM"
        },
        thaw_first,
        tm,
        t.iter().min().copied().unwrap_or_default(),
        t.iter().max().copied().unwrap_or_default(),
        runc_first,
        rm,
        r.iter().min().copied().unwrap_or_default(),
        r.iter().max().copied().unwrap_or_default(),
    );
    c.assert_no_leaks();
}
