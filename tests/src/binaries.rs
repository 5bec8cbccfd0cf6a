//! Builds (once per test process) and locates the binaries the tests run:
//! the shim, the guest agent (run on the host by the host backend), the
//! VMM and the `thaw` admin CLI.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::cmd;

#[derive(Debug, Clone)]
pub struct Binaries {
    pub shim: PathBuf,
    pub agent: PathBuf,
    /// Why the agent could not be built (it is another crate, possibly
    /// mid-change); tests that run it fail with this message.
    pub agent_error: Option<String>,
    pub vmm: PathBuf,
    /// `thaw`, the operator's CLI.
    pub admin: PathBuf,
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Whether everything was built before the tests started
/// (`THAW_TEST_PREBUILT=1`, set by scripts/test.sh): then the harness runs
/// no cargo and no build script, which matters inside the emulated-SVM
/// guest, where a build would run 10-50x slower.
pub fn prebuilt() -> bool {
    std::env::var("THAW_TEST_PREBUILT").is_ok_and(|v| v == "1")
}

fn build(package: &str) -> Result<(), String> {
    if prebuilt() {
        return Ok(());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(workspace_root())
        .arg("build")
        .arg("-p")
        .arg(package);
    let out = cmd::run(&mut c, Duration::from_secs(1800));
    if out.success() {
        Ok(())
    } else {
        Err(format!(
            "building {package} failed:\n{}",
            crate::containerd::tail(&out.stderr, 40)
        ))
    }
}

/// Panics with the agent's build failure, for tests that run the agent.
pub fn require_agent() {
    if let Some(e) = &binaries().agent_error {
        panic!("this test runs the guest agent on the host, which does not build: {e}");
    }
}

/// Builds the shim, the agent and the VMM with the same cargo that runs
/// the tests, once per process (or finds them prebuilt).
pub fn binaries() -> &'static Binaries {
    static BINS: OnceLock<Binaries> = OnceLock::new();
    BINS.get_or_init(|| {
        if let Err(e) = build("containerd-shim-thaw-v2") {
            panic!("{e}");
        }
        let agent_error = build("thaw-agent").err();
        for package in ["thaw-vmm", "thaw-cli"] {
            if let Err(e) = build(package) {
                panic!("{e}");
            }
        }
        let dir = target_dir().join("debug");
        let bins = Binaries {
            shim: dir.join("containerd-shim-thaw-v2"),
            agent: dir.join("thaw-agent"),
            agent_error,
            vmm: dir.join("thaw-vmm"),
            admin: dir.join("thaw"),
        };
        for b in [&bins.shim, &bins.vmm, &bins.admin] {
            assert!(b.exists(), "{} missing", b.display());
        }
        bins
    })
}

/// The guest kernel and root image for VM tests: `THAW_KERNEL` and
/// `THAW_ROOT_IMAGE`, or what the cached build scripts print (the kernel
/// from kernel-config/build.sh, the root image from
/// guest-agent/build-rootfs.sh: the one recipe `make install` uses too).
#[derive(Debug, Clone)]
pub struct VmAssets {
    pub kernel: PathBuf,
    pub root_image: PathBuf,
}

/// Runs a build script that prints its product's path on its last line.
fn built_by(script: &str, what: &str) -> PathBuf {
    assert!(
        !prebuilt(),
        "THAW_TEST_PREBUILT=1 but the {what} is not given; scripts/test.sh sets it"
    );
    let out = cmd::run(
        &mut Command::new(workspace_root().join(script)),
        Duration::from_secs(3600),
    );
    assert!(out.success(), "building the {what}: {}", out.describe());
    PathBuf::from(out.stdout.lines().last().unwrap_or("").trim())
}

pub fn vm_assets() -> &'static VmAssets {
    static ASSETS: OnceLock<VmAssets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        let kernel = std::env::var_os("THAW_KERNEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| built_by("kernel-config/build.sh", "guest kernel"));
        let root_image = std::env::var_os("THAW_ROOT_IMAGE")
            .map(PathBuf::from)
            .unwrap_or_else(|| built_by("guest-agent/build-rootfs.sh", "guest root image"));
        for (what, p) in [("guest kernel", &kernel), ("guest root image", &root_image)] {
            assert!(p.is_file(), "{what} {} missing", p.display());
        }
        VmAssets { kernel, root_image }
    })
}

/// VM templates shared by all test runs (keyed by their inputs, so a new
/// kernel or root image gets a new one): one cold boot, then restores.
pub fn template_store() -> PathBuf {
    target_dir().join("thaw-e2e/templates")
}
