//! Bad input through `ctr run`: each fails with a readable error and
//! leaves nothing behind. These need no VM and no agent: the shim rejects
//! them before anything starts.

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;

use thaw_tests::image::BUSYBOX_REF;
use thaw_tests::{Backend, PrivateContainerd};

/// A VM config whose kernel does not exist. The VMM path is an existing
/// file so the kernel is what the shim complains about; it never runs.
fn missing_kernel(config: String) -> String {
    let mut out = String::new();
    for line in config.lines() {
        if line.starts_with("kernel = ") {
            out.push_str("kernel = \"/nonexistent/thaw/vmlinux\"\n");
        } else if line.starts_with("vmm = ") {
            out.push_str("vmm = \"/bin/true\"\n");
        } else if line.starts_with("root_image = ") {
            out.push_str("root_image = \"/bin/true\"\n");
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[test]
fn missing_kernel_path_fails_ctr_run_with_a_readable_error() {
    let c = PrivateContainerd::start_with(Backend::Vm, missing_kernel);
    c.import_busybox();
    let id = c.new_id("nokernel");
    let mut args = c.run_args(&["--rm"]);
    args.extend([BUSYBOX_REF, id.as_str(), "true"]);
    let out = c.ctr(&args);
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr.contains("vm.kernel") && out.stderr.contains("/nonexistent/thaw/vmlinux"),
        "the error must name the key and the path:\n{}",
        out.describe()
    );
    // ctr run --rm does not delete a container whose task failed to start.
    let _ = c.ctr(&["containers", "delete", &id]);
    c.assert_no_leaks();
    assert!(c.cache_entries().len() <= 1);
}

#[test]
fn config_error_names_the_bad_key() {
    let c = PrivateContainerd::start_with(Backend::Host, |cfg| {
        format!("{cfg}\n[vm]\nvcpus = \"two\"\n")
    });
    c.import_busybox();
    let id = c.new_id("badcfg");
    let mut args = c.run_args(&["--rm"]);
    args.extend([BUSYBOX_REF, id.as_str(), "true"]);
    let out = c.ctr(&args);
    assert!(!out.success(), "{}", out.describe());
    assert!(out.stderr.contains("vm.vcpus"), "{}", out.describe());
    let _ = c.ctr(&["containers", "delete", &id]);
    c.assert_no_leaks();
}

#[test]
fn runtime_config_path_option_is_used() {
    let c = PrivateContainerd::start(Backend::Host);
    c.import_busybox();
    let alt = c.dir().join("alternative.toml");
    fs::write(&alt, "backend = \"vm\"\n[vm]\nmemory_mibs = 512\n").unwrap();
    let id = c.new_id("cfgpath");
    let alt_s = alt.to_str().unwrap();
    let mut args = c.run_args(&["--rm", "--runtime-config-path", alt_s]);
    args.extend([BUSYBOX_REF, id.as_str(), "true"]);
    let out = c.ctr(&args);
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr.contains("alternative.toml") && out.stderr.contains("memory_mibs"),
        "the shim must read the file given by --runtime-config-path:\n{}",
        out.describe()
    );
    let _ = c.ctr(&["containers", "delete", &id]);
    c.assert_no_leaks();
}

#[test]
fn invalid_spec_fails_ctr_run_with_a_readable_error() {
    let c = PrivateContainerd::start(Backend::Host);
    c.import_busybox();
    let id = c.new_id("badspec");
    // A relative working directory is invalid per the OCI spec.
    let mut args = c.run_args(&["--rm", "--cwd", "relative/dir"]);
    args.extend([BUSYBOX_REF, id.as_str(), "true"]);
    let out = c.ctr(&args);
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr.contains("invalid OCI spec") && out.stderr.contains("process.cwd"),
        "{}",
        out.describe()
    );
    let _ = c.ctr(&["containers", "delete", &id]);
    c.assert_no_leaks();
}

/// `ctr run` with annotations under a VM config that fails before boot;
/// returns ctr's stderr.
fn run_with_annotations(c: &PrivateContainerd, annotations: &[&str]) -> String {
    let id = c.new_id("annot");
    let mut args = c.run_args(&["--rm"]);
    for a in annotations {
        args.push("--annotation");
        args.push(a);
    }
    args.extend([BUSYBOX_REF, id.as_str(), "true"]);
    let out = c.ctr(&args);
    assert!(!out.success(), "{}", out.describe());
    let _ = c.ctr(&["containers", "delete", &id]);
    out.stderr
}

#[test]
fn pod_annotations_override_the_vm_config_and_are_checked() {
    let c = PrivateContainerd::start_with(Backend::Vm, |cfg| {
        format!(
            "{}\n[annotations]\nallow = [\"vcpus\", \"kernel\"]\n",
            missing_kernel(cfg)
        )
    });
    c.import_busybox();
    let e = run_with_annotations(&c, &["io.thaw.vm.vcpus=lots"]);
    assert!(
        e.contains("io.thaw.vm.vcpus") && e.contains("not a number"),
        "{e}"
    );
    let e = run_with_annotations(&c, &["io.thaw.vm.memory_mib=512"]);
    assert!(
        e.contains("io.thaw.vm.memory_mib") && e.contains("not allowed"),
        "{e}"
    );
    // An allowed override is what the shim then uses.
    let e = run_with_annotations(&c, &["io.thaw.vm.kernel=/nonexistent/override/vmlinux"]);
    assert!(e.contains("/nonexistent/override/vmlinux"), "{e}");
    c.assert_no_leaks();
}
