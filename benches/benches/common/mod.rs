//! What several benchmarks share: release builds of the VMM and the shim,
//! and a private containerd whose thaw runtime uses them.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use thaw_tests::binaries::workspace_root;
use thaw_tests::cmd;
use thaw_tests::{Backend, PrivateContainerd};

pub struct Release {
    pub vmm: PathBuf,
    pub shim: PathBuf,
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Release builds of the VMM and the shim (the tests use debug builds,
/// whose host-side cost is not what users get).
/// With `THAW_TEST_PREBUILT=1` (scripts/bench-report.sh, and inside the
/// emulated-SVM guest) nothing is built: the binaries must be there.
pub fn release_binaries() -> Result<Release, String> {
    let dir = target_dir().join("release");
    let release = Release {
        vmm: dir.join("thaw-vmm"),
        shim: dir.join("containerd-shim-thaw-v2"),
    };
    if thaw_tests::binaries::prebuilt() {
        for b in [&release.vmm, &release.shim] {
            if !b.is_file() {
                return Err(format!(
                    "THAW_TEST_PREBUILT=1 but {} is missing",
                    b.display()
                ));
            }
        }
        return Ok(release);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "thaw-vmm",
        "-p",
        "containerd-shim-thaw-v2",
    ]);
    let out = cmd::run(&mut c, Duration::from_secs(1800));
    if !out.success() {
        return Err(format!("release build failed:\n{}", out.describe()));
    }
    Ok(release)
}

/// A private containerd (the test harness's) whose thaw runtime runs the
/// release VMM, restoring from templates, through the release shim; with
/// containerd's CRI plugin serving the runtimes of `shim/README.md`
/// (handlers `runc` and `thaw`) when `cri`.
pub fn release_containerd(release: &Release, cri: bool) -> Result<PrivateContainerd, String> {
    let vmm = release.vmm.display().to_string();
    let edit = |cfg: String| {
        cfg.lines()
            .map(|l| {
                if l.starts_with("vmm = ") {
                    format!("vmm = \"{vmm}\"\ntemplates = true")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    };
    let c = if cri {
        PrivateContainerd::start_cri_with(Backend::Vm, edit)
    } else {
        PrivateContainerd::start_with(Backend::Vm, edit)
    };
    // containerd looks the shim up in PATH at every start: point the link
    // in the private bin dir at the release build.
    let link = c.dir().join("bin/containerd-shim-thaw-v2");
    std::fs::remove_file(&link).map_err(|e| format!("removing {}: {e}", link.display()))?;
    std::os::unix::fs::symlink(&release.shim, &link)
        .map_err(|e| format!("linking the release shim: {e}"))?;
    Ok(c)
}
