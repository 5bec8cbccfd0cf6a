//! End-to-end snapshots: boot the real kernel with the test init, save the
//! running VM through the control socket, restore two VMs from it at once,
//! and check that each resumes where the original stopped, talks over its
//! own new vsock socket, and keeps its own memory. Then a corrupt or
//! mismatched snapshot must be refused without leaving anything behind.

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use thaw_tests::guest::{self, accept_or_exit, read_line, vmm_client, wait_with_deadline};
use thaw_vmm_api::{BootArgs, Disk, RestoreArgs, RunState, Serial, VmmCommand};

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
    let mut vmm = VmmCommand::Restore(RestoreArgs {
        vsock_uds: Some(uds.clone()),
        api_sock: Some(api.clone()),
        serial: Some(Serial::File(dir.join(format!("{name}.console")))),
        ..RestoreArgs::new(snap)
    })
    .command(guest::vmm_binary())
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
    let mut vmm = VmmCommand::Boot(BootArgs {
        disks: vec![Disk::read_only(&root_img), Disk::read_only(&data_img)],
        vsock_uds: Some(uds.clone()),
        api_sock: Some(api.clone()),
        serial: Serial::File(dir.join("orig.console")),
        memory_mib: 128,
        ..BootArgs::new(kernel)
    })
    .command(guest::vmm_binary())
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

    let control = vmm_client(&api);
    let status = control.status().unwrap();
    assert_eq!(status.state, RunState::Running, "{status:?}");
    assert!(status.vmm_rss_kib > 0, "{status:?}");

    // Save while the guest waits for our next line, then stop the original.
    let snap = dir.join("snap");
    let saved = control.snapshot(&snap).unwrap();
    assert!(saved.state_bytes > 0, "{saved:?}");
    assert_eq!(control.status().unwrap().state, RunState::Paused);
    control.stop().unwrap();
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
        let out = VmmCommand::Restore(RestoreArgs {
            vsock_uds: Some(uds.clone()),
            api_sock: Some(api.clone()),
            ..RestoreArgs::new(snapdir)
        })
        .command(guest::vmm_binary())
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
