//! What a real guest needs: the guest kernel (built and cached by
//! kernel-config/build.sh), static guest binaries, and erofs images.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::binaries::workspace_root;
use crate::cmd;

/// The guest kernel (see [`crate::binaries::vm_assets`]).
pub fn kernel() -> &'static Path {
    &crate::binaries::vm_assets().kernel
}

/// A binary of the workspace as a static executable for the guest, built
/// by tests/build-static.sh (or, with THAW_TEST_PREBUILT=1, where that
/// script puts it).
pub fn static_binary(package: &str, bin: &str) -> PathBuf {
    let path = workspace_root()
        .join("target/guest/x86_64-unknown-linux-gnu/release")
        .join(bin);
    if !crate::binaries::prebuilt() {
        let out = cmd::run(
            Command::new(workspace_root().join("tests/build-static.sh"))
                .arg(package)
                .arg(bin),
            Duration::from_secs(1800),
        );
        assert!(
            out.success(),
            "static build of {bin} failed:\n{}",
            out.describe()
        );
    }
    assert!(path.is_file(), "{} missing", path.display());
    path
}

/// A read-only erofs image of `dir`, built with the real `mkfs.erofs`.
pub fn erofs_image(dir: &Path, image: &Path) {
    let out = cmd::run(
        Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(image)
            .arg(dir),
        Duration::from_secs(120),
    );
    assert!(out.success(), "mkfs.erofs failed:\n{}", out.describe());
}

/// A minimal root filesystem whose init is `init`: the mount points the
/// kernel and init expect, nothing else.
pub fn root_dir_with_init(dir: &Path, init: &Path) {
    for d in ["dev", "proc", "sys", "tmp", "run", "sbin"] {
        std::fs::create_dir_all(dir.join(d)).expect("creating root dir");
    }
    std::fs::copy(init, dir.join("sbin/init")).expect("copying init");
}

/// The `thaw-vmm` binary, built once per test process.
pub fn vmm_binary() -> &'static Path {
    &crate::binaries::binaries().vmm
}

/// FNV-1a, the hash the test init reports for the disk it read.
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Accepts the guest's connection on `listener`, failing the test with the
/// VMM's stderr if the VMM exits first or the deadline passes.
pub fn accept_or_exit(
    listener: &std::os::unix::net::UnixListener,
    vmm: &mut std::process::Child,
    deadline: std::time::Instant,
) -> std::os::unix::net::UnixStream {
    use std::io::Read;
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).expect("blocking stream");
                s.set_read_timeout(Some(Duration::from_secs(120)))
                    .expect("read timeout");
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if let Some(status) = vmm.try_wait().expect("try_wait") {
            let mut err = String::new();
            if let Some(mut e) = vmm.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("thaw-vmm exited ({status}) before the guest dialed the host:\n{err}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not dial the host in time"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn read_line(r: &mut impl std::io::BufRead) -> String {
    let mut line = String::new();
    r.read_line(&mut line)
        .expect("reading a line from the guest");
    line
}

/// Waits for the VMM to exit; kills it and fails after `limit`.
pub fn wait_with_deadline(
    vmm: &mut std::process::Child,
    limit: Duration,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = vmm.try_wait().expect("try_wait") {
            return s;
        }
        if std::time::Instant::now() > deadline {
            let _ = vmm.kill();
            let _ = vmm.wait();
            panic!("thaw-vmm did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client of the VMM control socket at `api`. Its timeout is generous:
/// a snapshot writes all of guest RAM, and on PVM hosts the guest is slow.
pub fn vmm_client(api: &Path) -> thaw_vmm_api::VmmClient {
    thaw_vmm_api::VmmClient::new(api, Duration::from_secs(300))
}

/// How many live processes have `path` in their command line.
pub fn processes_mentioning(path: &Path) -> usize {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains(&needle))
        .count()
}
