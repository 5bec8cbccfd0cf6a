//! End-to-end: `thaw-vmm` boots the real guest kernel under real KVM with a
//! tiny static init on an erofs root disk. The init marks the boot, reads a
//! second disk, talks to the host over vsock both ways, and reboots; the
//! VMM must then exit 0 and leave no sockets behind.
//!
//! On PVM hosts (this project's CI) the guest kernel runs emulated: the
//! boot takes tens of seconds, hence the generous deadlines.

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use thaw_tests::guest::{self, accept_or_exit, read_line, wait_with_deadline};
use thaw_vmm_api::{BootArgs, Disk, Serial, VmmCommand};

const BOOT_DEADLINE: Duration = Duration::from_secs(600);

#[test]
fn boots_to_init_then_disk_vsock_and_reboot_work() {
    let kernel = guest::kernel();
    let vmm_bin = guest::vmm_binary();
    let init = guest::static_binary("thaw-test-init", "thaw-test-init");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    guest::root_dir_with_init(&root, &init);
    let root_img = tmp.path().join("root.erofs");
    guest::erofs_image(&root, &root_img);

    // 64 KiB + a partial sector of data whose hash the guest reports back.
    let data: Vec<u8> = (0..65_536u32 + 300)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let data_img = tmp.path().join("data.img");
    std::fs::write(&data_img, &data).unwrap();
    // The device exposes whole sectors only: a partial last sector is not
    // visible to the guest (as with Firecracker and QEMU).
    let visible = &data[..data.len() / 512 * 512];

    let uds = tmp.path().join("vsock.sock");
    let report = UnixListener::bind(tmp.path().join("vsock.sock_1234")).unwrap();
    let api = tmp.path().join("api.sock");
    let console = tmp.path().join("console.log");

    let started = Instant::now();
    let mut vmm = VmmCommand::Boot(BootArgs {
        disks: vec![Disk::read_only(&root_img), Disk::read_only(&data_img)],
        vsock_uds: Some(uds.clone()),
        api_sock: Some(api.clone()),
        serial: Serial::File(console.clone()),
        memory_mib: 128,
        ..BootArgs::new(kernel)
    })
    .command(vmm_bin)
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();

    // Guest-initiated connection: the init dials host port 1234.
    let conn = accept_or_exit(&report, &mut vmm, started + BOOT_DEADLINE);
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    let line = read_line(&mut r);
    assert_eq!(
        line.trim(),
        format!("disk {} {:016x}", visible.len(), guest::fnv1a(visible))
    );
    writeln!(w, "nonce 8bd1e57a").unwrap();
    assert_eq!(read_line(&mut r).trim(), "ack 8bd1e57a");

    // Host-initiated connection through the Firecracker-style handshake.
    let mut host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    host.write_all(b"CONNECT 5001\n").unwrap();
    let mut hr = BufReader::new(host.try_clone().unwrap());
    let ok = read_line(&mut hr);
    assert!(ok.starts_with("OK "), "handshake reply {ok:?}");
    host.write_all(b"hello from the host\n").unwrap();
    assert_eq!(read_line(&mut hr), "echo hello from the host\n");

    // The init then serves on a new connection until told to reboot.
    let conn = accept_or_exit(&report, &mut vmm, Instant::now() + Duration::from_secs(120));
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    assert_eq!(read_line(&mut r), "ready\n");
    // The running VMM is under its seccomp filter, on every thread.
    for task in std::fs::read_dir(format!("/proc/{}/task", vmm.id())).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        assert!(
            status.lines().any(|l| l == "Seccomp:\t2"),
            "a VMM thread without its seccomp filter:\n{status}"
        );
    }
    // A guest writing the marker page in a loop: each mark is recorded
    // and printed once, so the VMM's memory and log stay bounded.
    let rss_before = rss_kib(vmm.id());
    const FLOOD: usize = 100_000;
    writeln!(w, "flood {FLOOD}").unwrap();
    assert_eq!(read_line(&mut r), format!("flooded {FLOOD}\n"));
    let grown = rss_kib(vmm.id()).saturating_sub(rss_before);
    assert!(
        grown < 4096,
        "the VMM grew by {grown} KiB over {FLOOD} marker writes"
    );
    writeln!(w, "reboot").unwrap();

    let status = wait_with_deadline(&mut vmm, Duration::from_secs(300));
    let mut stderr = String::new();
    vmm.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let console_text = std::fs::read_to_string(&console).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(0),
        "VMM stderr:\n{stderr}\nconsole:\n{console_text}"
    );
    for mark in ["first-guest-instruction", "kernel-entry", "init"] {
        assert!(
            stderr.contains(&format!("thaw-vmm: mark {mark} ")),
            "no {mark} mark:\n{stderr}"
        );
    }
    assert!(stderr.contains("guest requested reset"), "{stderr}");
    let mark_lines = stderr
        .lines()
        .filter(|l| l.starts_with("thaw-vmm: mark "))
        .count();
    assert!(
        mark_lines <= 256 + 8,
        "{mark_lines} mark lines after the flood: one per mark name at most"
    );
    assert!(
        console_text.contains("thaw-test-init: echoed the host's line"),
        "{console_text}"
    );
    // Nothing left behind: the VMM removed its sockets.
    assert!(!api.exists(), "control socket left behind");
    assert!(!uds.exists(), "vsock socket left behind");
    eprintln!(
        "boot to reboot took {:?} (PVM emulates the guest kernel here)",
        started.elapsed()
    );
}

#[test]
fn bad_arguments_are_named_and_nothing_is_left() {
    let vmm_bin = guest::vmm_binary();
    // A mistake the command builder cannot make, so argv by hand.
    let out = Command::new(vmm_bin)
        .args(["--kernel", "/k", "--vcpus", "many"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'many' for '--vcpus <N>'"),
        "{err}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let api = tmp.path().join("api.sock");
    let out = VmmCommand::Boot(BootArgs {
        api_sock: Some(api.clone()),
        ..BootArgs::new("/nonexistent/vmlinux")
    })
    .command(vmm_bin)
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kernel /nonexistent/vmlinux"), "{err}");
    assert!(!api.exists());

    // A file that is not an ELF kernel is refused with the loader's reason.
    let junk = tmp.path().join("junk");
    std::fs::write(&junk, b"not a kernel").unwrap();
    let out = VmmCommand::Boot(BootArgs::new(&junk))
        .command(vmm_bin)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("loading kernel") && err.contains(&*junk.to_string_lossy()),
        "{err}"
    );
    let _ = Path::new("/");
}

/// The resident set of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("a VmRSS line")
}
