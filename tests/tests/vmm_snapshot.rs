//! End-to-end snapshots: boot the real kernel with the test init, save the
//! running VM through the control socket, restore two VMs from it at once,
//! and check that each resumes where the original stopped, talks over its
//! own new vsock socket, and keeps its own memory. Then a corrupt or
//! mismatched snapshot must be refused without leaving anything behind.

use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thaw_tests::guest::{self, accept_or_exit, control, read_line, wait_with_deadline};

struct Guest {
    vmm: Child,
    conn: BufReader<UnixStream>,
    w: UnixStream,
}

impl Guest {
    fn ask(&mut self, line: &str) -> String {
        writeln!(self.w, "{line}").unwrap();
        read_line(&mut self.conn).trim().to_string()
    }
}

fn wait_ready(
    listener: &UnixListener,
    vmm: &mut Child,
    limit: Duration,
) -> (BufReader<UnixStream>, UnixStream) {
    let conn = accept_or_exit(listener, vmm, Instant::now() + limit);
    let w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    assert_eq!(read_line(&mut r), "ready\n");
    (r, w)
}

fn restore(snap: &Path, dir: &Path, name: &str) -> (Guest, PathBuf, PathBuf) {
    let uds = dir.join(format!("{name}.vsock"));
    let api = dir.join(format!("{name}.api"));
    let listener = UnixListener::bind(dir.join(format!("{name}.vsock_1234"))).unwrap();
    let mut vmm = Command::new(guest::vmm_binary())
        .arg("--restore")
        .arg(snap)
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--api-sock")
        .arg(&api)
        .arg("--serial")
        .arg(dir.join(format!("{name}.console")))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The restored guest's old connection was reset; it dials again.
    let (conn, w) = wait_ready(&listener, &mut vmm, Duration::from_secs(120));
    (Guest { vmm, conn, w }, uds, api)
}

#[test]
fn restored_vms_resume_independently_and_bad_snapshots_are_refused() {
    let kernel = guest::kernel();
    let init = guest::static_binary("thaw-test-init", "thaw-test-init");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    guest::root_dir_with_init(&dir.join("root"), &init);
    let root_img = dir.join("root.erofs");
    guest::erofs_image(&dir.join("root"), &root_img);
    let data_img = dir.join("data.img");
    std::fs::write(&data_img, vec![7u8; 4096]).unwrap();

    let uds = dir.join("orig.vsock");
    let api = dir.join("orig.api");
    let report = UnixListener::bind(dir.join("orig.vsock_1234")).unwrap();
    let mut vmm = Command::new(guest::vmm_binary())
        .arg("--kernel")
        .arg(kernel)
        .arg("--disk")
        .arg(format!("{},ro", root_img.display()))
        .arg("--disk")
        .arg(format!("{},ro", data_img.display()))
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--api-sock")
        .arg(&api)
        .arg("--serial")
        .arg(dir.join("orig.console"))
        .args(["--memory-mib", "128"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Walk the init through its boot steps to its serve loop.
    let conn = accept_or_exit(&report, &mut vmm, Instant::now() + Duration::from_secs(600));
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    assert!(read_line(&mut r).starts_with("disk 4096 "));
    writeln!(w, "nonce 1").unwrap();
    assert_eq!(read_line(&mut r), "ack 1\n");
    let mut host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    host.write_all(b"CONNECT 5001\nping\n").unwrap();
    let mut hr = BufReader::new(host.try_clone().unwrap());
    assert!(read_line(&mut hr).starts_with("OK "));
    assert_eq!(read_line(&mut hr), "echo ping\n");
    let (conn, w) = wait_ready(&report, &mut vmm, Duration::from_secs(60));
    let mut original = Guest { vmm, conn, w };
    assert_eq!(original.ask("write base"), "ok");

    let status = control(&api, r#"{"op":"status"}"#);
    assert!(status.contains(r#""state":"running""#), "{status}");
    assert!(status.contains("vmm_rss_kib"), "{status}");

    // Save while the guest waits for our next line, then stop the original.
    let snap = dir.join("snap");
    let reply = control(
        &api,
        &format!(r#"{{"op":"snapshot","dir":"{}"}}"#, snap.display()),
    );
    assert!(reply.starts_with(r#"{"ok":true"#), "{reply}");
    assert!(control(&api, r#"{"op":"status"}"#).contains(r#""state":"paused""#));
    assert_eq!(control(&api, r#"{"op":"stop"}"#).trim(), r#"{"ok":true}"#);
    let status = wait_with_deadline(&mut original.vmm, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));
    drop(report);

    // Two VMs from one snapshot, at the same time.
    let started = Instant::now();
    let (mut a, a_uds, a_api) = restore(&snap, dir, "a");
    let (mut b, b_uds, b_api) = restore(&snap, dir, "b");
    eprintln!("two restores to guest-ready took {:?}", started.elapsed());
    assert_eq!(a.ask("write alpha"), "ok");
    assert_eq!(b.ask("write beta"), "ok");
    // Each sees the note written before the snapshot and only its own after.
    assert_eq!(a.ask("read"), "notes base alpha");
    assert_eq!(b.ask("read"), "notes base beta");
    for (g, uds, api) in [(&mut a, &a_uds, &a_api), (&mut b, &b_uds, &b_api)] {
        writeln!(g.w, "reboot").unwrap();
        let status = wait_with_deadline(&mut g.vmm, Duration::from_secs(120));
        assert_eq!(status.code(), Some(0));
        assert!(
            !uds.exists() && !api.exists(),
            "restored VMM left its sockets"
        );
    }

    // A flipped byte in the state file: refused, nothing left behind.
    let bad = dir.join("bad");
    std::fs::create_dir(&bad).unwrap();
    let mut state = std::fs::read(snap.join("state")).unwrap();
    let n = state.len();
    state[n - 100] ^= 0x5a;
    std::fs::write(bad.join("state"), state).unwrap();
    std::fs::copy(snap.join("memory"), bad.join("memory")).unwrap();
    let refused = |snapdir: &Path, needle: &str| {
        let uds = dir.join("r.vsock");
        let api = dir.join("r.api");
        let out = Command::new(guest::vmm_binary())
            .arg("--restore")
            .arg(snapdir)
            .arg("--vsock-uds")
            .arg(&uds)
            .arg("--api-sock")
            .arg(&api)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "expected {needle:?} in: {err}");
        assert!(
            !uds.exists() && !api.exists(),
            "a refused restore left sockets"
        );
    };
    refused(&bad, "checksum mismatch");

    // A memory file that does not fit the state.
    std::fs::copy(snap.join("state"), bad.join("state")).unwrap();
    std::fs::write(bad.join("memory"), vec![0u8; 4096]).unwrap();
    refused(&bad, "memory file");

    // Not a snapshot at all.
    std::fs::write(bad.join("state"), b"hello").unwrap();
    refused(&bad, "not a thaw snapshot");
}
