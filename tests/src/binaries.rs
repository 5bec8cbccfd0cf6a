//! Builds (once per test process) and locates the binaries the tests run:
//! the shim, the guest agent (run on the host by the host backend) and,
//! for VM tests, the VMM.

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
    /// Only built when VM tests are enabled.
    pub vmm: Option<PathBuf>,
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn build(package: &str) -> Result<(), String> {
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

/// Whether end-to-end tests through a real VM are enabled.
pub fn vm_tests_enabled() -> bool {
    std::env::var("THAW_E2E_VM")
        .map(|v| v == "1")
        .unwrap_or(false)
}

/// Panics with the agent's build failure, for tests that run the agent.
pub fn require_agent() {
    if let Some(e) = &binaries().agent_error {
        panic!("this test runs the guest agent on the host, which does not build: {e}");
    }
}

/// Builds the shim and agent (and the VMM when VM tests are on) with the
/// same cargo that runs the tests, once per process.
pub fn binaries() -> &'static Binaries {
    static BINS: OnceLock<Binaries> = OnceLock::new();
    BINS.get_or_init(|| {
        let vm = vm_tests_enabled();
        if let Err(e) = build("containerd-shim-thaw-v2") {
            panic!("{e}");
        }
        let agent_error = build("thaw-agent").err();
        if vm {
            if let Err(e) = build("thaw-vmm") {
                panic!("THAW_E2E_VM=1 but {e}");
            }
        }
        let dir = target_dir().join("debug");
        let bins = Binaries {
            shim: dir.join("containerd-shim-thaw-v2"),
            agent: dir.join("thaw-agent"),
            agent_error,
            vmm: vm.then(|| dir.join("thaw-vmm")),
        };
        assert!(bins.shim.exists(), "{} missing", bins.shim.display());
        bins
    })
}

/// The guest kernel and root image for VM tests: THAW_E2E_KERNEL and
/// THAW_E2E_ROOT_IMAGE, or built here (the kernel with
/// kernel-config/build.sh, cached; the root image as an erofs whose
/// /sbin/init is a static thaw-agent).
#[derive(Debug, Clone)]
pub struct VmAssets {
    pub kernel: PathBuf,
    pub root_image: PathBuf,
}

pub fn vm_assets() -> &'static VmAssets {
    static ASSETS: OnceLock<VmAssets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        let kernel = match std::env::var_os("THAW_E2E_KERNEL") {
            Some(k) => PathBuf::from(k),
            None => {
                let script = workspace_root().join("kernel-config/build.sh");
                let out = cmd::run(&mut Command::new(&script), Duration::from_secs(3600));
                assert!(
                    out.success(),
                    "building the guest kernel: {}",
                    out.describe()
                );
                PathBuf::from(out.stdout.lines().last().unwrap_or("").trim())
            }
        };
        assert!(
            kernel.is_file(),
            "guest kernel {} missing",
            kernel.display()
        );
        let root_image = match std::env::var_os("THAW_E2E_ROOT_IMAGE") {
            Some(r) => PathBuf::from(r),
            None => build_root_image(),
        };
        assert!(
            root_image.is_file(),
            "guest root image {} missing",
            root_image.display()
        );
        VmAssets { kernel, root_image }
    })
}

/// VM templates shared by all test runs (keyed by their inputs, so a new
/// kernel or root image gets a new one): one cold boot, then restores.
pub fn template_store() -> PathBuf {
    target_dir().join("thaw-e2e/templates")
}

fn build_root_image() -> PathBuf {
    let triple = "x86_64-unknown-linux-gnu";
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(workspace_root())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // Release: the guest pages the agent in through an emulated kernel
        // on slow hosts; a debug binary is ten times the size.
        .args(["build", "--release", "-p", "thaw-agent", "--target", triple]);
    let out = cmd::run(&mut c, Duration::from_secs(1800));
    assert!(
        out.success(),
        "building the static agent: {}",
        out.describe()
    );
    let agent = target_dir().join(triple).join("release/thaw-agent");
    let dir = target_dir().join("thaw-e2e");
    let image = dir.join("root.img");
    // Reuse the image while the agent is unchanged, so VM templates built
    // from it stay valid across test runs.
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(img), Some(ag)) = (mtime(&image), mtime(&agent)) {
        if img > ag {
            return image;
        }
    }
    let root = dir.join("rootfs");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["sbin", "proc", "sys", "dev", "run", "tmp", "etc", "mnt"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(&agent, root.join("sbin/init")).unwrap();
    let _ = std::fs::remove_file(&image);
    let out = cmd::run(
        Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg("--all-root")
            .arg(&image)
            .arg(&root),
        Duration::from_secs(300),
    );
    assert!(out.success(), "mkfs.erofs root image: {}", out.describe());
    image
}
