//! End-to-end templates: `thaw-vmm template build` boots the real kernel
//! with the test init once, snapshots it into a store, and a second build
//! with the same inputs returns the stored template without booting. A VM
//! restored from the template comes back on its new vsock socket. Then
//! `template rm` empties the store. One cold boot in all (30-70 s here).

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use thaw_tests::guest::{
    self, accept_or_exit, processes_mentioning, read_line, wait_with_deadline,
};
use thaw_vmm_api::{ReadyProbe, RestoreArgs, Serial, TemplateBuildArgs, VmmCommand};

/// `thaw-vmm template ARGS --store STORE`, argv as given: for mistakes
/// (which the command builder cannot make) and for list and rm.
fn template(args: &[&str], store: &Path) -> Output {
    Command::new(guest::vmm_binary())
        .arg("template")
        .args(args)
        .arg("--store")
        .arg(store)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Store entries other than lock and in-use files and the input digest
/// cache (a build must leave no debris).
/// The one entry a failed build leaves: its failure record, holding the
/// reason, so the next start does not pay the same failure again.
fn assert_only_a_failure_record(store: &Path, reason: &str) {
    let entries = store_entries(store);
    assert!(
        entries.len() == 1 && entries[0].ends_with(".failed"),
        "{entries:?}"
    );
    let record = std::fs::read_to_string(store.join(&entries[0])).unwrap();
    assert!(record.contains(reason), "{record}");
}

fn store_entries(store: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock") && !n.ends_with(".in-use") && n != ".digests")
        .collect();
    v.sort();
    v
}

#[test]
fn template_is_built_once_listed_restored_and_removed() {
    let kernel = guest::kernel();
    let init = guest::static_binary("thaw-test-init", "thaw-test-init");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    guest::root_dir_with_init(&dir.join("root"), &init);
    let root_img = dir.join("root.erofs");
    guest::erofs_image(&dir.join("root"), &root_img);
    let store = dir.join("store");
    let (k, r) = (kernel.to_str().unwrap(), root_img.to_str().unwrap());
    // The test init reads /dev/vdb: one spare (empty) disk slot gives it one.
    let build = || {
        VmmCommand::TemplateBuild(TemplateBuildArgs {
            spare_disks: 1,
            memory_mib: 128,
            ready: ReadyProbe::TestInit,
            timeout_secs: 400,
            store: Some(store.clone()),
            ..TemplateBuildArgs::new(kernel, &root_img)
        })
        .command(guest::vmm_binary())
        .output()
        .unwrap()
    };

    // Mistakes name the option and touch nothing.
    let out = template(&["build", "--kernel", k], &store);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("required arguments were not provided")
            && text(&out.stderr).contains("--disk <ROOT_IMAGE"),
        "{}",
        text(&out.stderr)
    );
    let out = template(
        &["build", "--kernel", k, "--disk", r, "--vcpus", "x"],
        &store,
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("invalid value 'x' for '--vcpus <N>'"),
        "{}",
        text(&out.stderr)
    );
    assert!(!store.exists(), "a refused command created the store");

    // Cold build: boots, waits for the guest, snapshots.
    let started = Instant::now();
    let out = build();
    let cold = started.elapsed();
    assert!(out.status.success(), "build failed:\n{}", text(&out.stderr));
    let tdir = PathBuf::from(text(&out.stdout).trim());
    eprintln!("cold template build took {cold:?}");
    let key = tdir.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(tdir.parent(), Some(store.as_path()));
    assert_eq!(key.len(), 64, "{key}");
    let mut files: Vec<String> = std::fs::read_dir(&tdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["memory", "state", "template.json"]);
    // The memory file is the guest's RAM: owner-only, whatever the umask.
    let mode =
        |p: &Path| std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(p).unwrap()) & 0o777;
    assert_eq!(mode(&store), 0o700, "store");
    assert_eq!(mode(&tdir), 0o700, "template directory");
    for f in &files {
        assert_eq!(mode(&tdir.join(f)), 0o600, "{f}");
    }
    assert_eq!(
        std::fs::metadata(tdir.join("memory")).unwrap().len(),
        128 << 20
    );
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tdir.join("template.json")).unwrap()).unwrap();
    assert_eq!(record["key"], key.as_str());
    assert_eq!(record["inputs"]["memory_mib"], 128);
    assert_eq!(record["inputs"]["kernel"], k);
    assert_eq!(store_entries(&store), [key.as_str()]);

    let out = template(&["list"], &store);
    assert!(out.status.success());
    let listing = text(&out.stdout);
    assert_eq!(listing.lines().count(), 1, "{listing}");
    assert!(
        listing.starts_with(&format!("{key}  vcpus=1 memory_mib=128 spare_disks=1 ")),
        "{listing}"
    );

    // Same inputs: the stored template, without a boot.
    let started = Instant::now();
    let out = build();
    let cached = started.elapsed();
    eprintln!("cached template build took {cached:?}");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(PathBuf::from(text(&out.stdout).trim()), tdir);
    assert!(text(&out.stderr).contains("already built"));
    // A boot alone takes 30 s or more here; hashing the inputs takes far less.
    assert!(
        cached < Duration::from_secs(10),
        "cached build took {cached:?}"
    );
    assert_eq!(store_entries(&store), [key.as_str()]);

    // Restore from the template: the guest re-dials on its new socket.
    let uds = dir.join("r.vsock");
    let api = dir.join("r.api");
    let listener = UnixListener::bind(dir.join("r.vsock_1234")).unwrap();
    let started = Instant::now();
    let mut vmm = VmmCommand::Restore(RestoreArgs {
        vsock_uds: Some(uds.clone()),
        api_sock: Some(api.clone()),
        serial: Some(Serial::File(dir.join("r.console"))),
        ..RestoreArgs::new(&tdir)
    })
    .command(guest::vmm_binary())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let conn = accept_or_exit(
        &listener,
        &mut vmm,
        Instant::now() + Duration::from_secs(120),
    );
    let mut w = conn.try_clone().unwrap();
    let mut rd = BufReader::new(conn);
    assert_eq!(read_line(&mut rd), "ready\n");
    eprintln!("restore to guest ready took {:?}", started.elapsed());
    writeln!(w, "write restored").unwrap();
    assert_eq!(read_line(&mut rd), "ok\n");
    writeln!(w, "read").unwrap();
    assert_eq!(read_line(&mut rd), "notes restored\n");
    // The running VM's sockets and console are owner-only, and it holds
    // its template: the store's quota cannot evict it, however old its
    // last use looks.
    for p in [&uds, &api, &dir.join("r.console")] {
        assert_eq!(mode(p), 0o600, "{}", p.display());
    }
    let in_use = store.join(format!("{key}.in-use"));
    assert_eq!(mode(&in_use), 0o600);
    std::fs::File::options()
        .write(true)
        .open(&in_use)
        .unwrap()
        .set_modified(std::time::SystemTime::UNIX_EPOCH)
        .unwrap();
    std::fs::File::open(tdir.join("template.json"))
        .unwrap()
        .set_modified(std::time::SystemTime::UNIX_EPOCH)
        .unwrap();
    let held = thaw_snapshots::template::Store::new(&store);
    assert!(held.evict_to(0, None).unwrap().is_empty(), "evicted in use");
    assert!(tdir.join("memory").exists());
    writeln!(w, "reboot").unwrap();
    let status = wait_with_deadline(&mut vmm, Duration::from_secs(120));
    assert_eq!(status.code(), Some(0));
    assert!(
        !uds.exists() && !api.exists(),
        "restored VMM left its sockets"
    );

    // Remove it; a second removal says so.
    let out = template(&["rm", &key], &store);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!tdir.exists());
    assert!(store_entries(&store).is_empty());
    assert_eq!(text(&template(&["list"], &store).stdout), "");
    let out = template(&["rm", &key], &store);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no template"),
        "{}",
        text(&out.stderr)
    );
    let out = template(&["rm", "not-a-key"], &store);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("not a template key"));
}

#[test]
fn a_build_that_cannot_boot_fails_and_leaves_only_its_record() {
    // Not a kernel: the VMM exits at once; the build must report it and
    // leave neither a template nor a half-built directory nor sockets,
    // only the record of the failure, which the next build reports at once.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fake_kernel = dir.join("vmlinux");
    std::fs::write(&fake_kernel, b"not an ELF kernel").unwrap();
    let root = dir.join("root.img");
    std::fs::write(&root, vec![0u8; 4096]).unwrap();
    let store = dir.join("store");
    // The builder's private socket directory goes to TMPDIR.
    let sockets = dir.join("tmp");
    std::fs::create_dir(&sockets).unwrap();
    let build = || {
        VmmCommand::TemplateBuild(TemplateBuildArgs {
            timeout_secs: 60,
            store: Some(store.clone()),
            ..TemplateBuildArgs::new(&fake_kernel, &root)
        })
        .command(guest::vmm_binary())
        .env("TMPDIR", &sockets)
        .output()
        .unwrap()
    };
    let out = build();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("thaw-vmm exited"), "{err}");
    assert!(
        err.contains("kernel"),
        "the VMM's own error is quoted: {err}"
    );
    assert_only_a_failure_record(&store, "thaw-vmm exited");
    assert_eq!(
        std::fs::read_dir(&sockets).unwrap().count(),
        0,
        "socket directory leaked"
    );
    let again = build();
    let err = text(&again.stderr);
    assert_eq!(again.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not retried before 600 s") && err.contains("thaw-vmm exited"),
        "{err}"
    );
    assert_only_a_failure_record(&store, "thaw-vmm exited");
}

#[test]
fn a_guest_that_never_gets_ready_is_killed_at_the_deadline() {
    // The real kernel and a guest that stays up and silent (its init only
    // sleeps): at the deadline the VMM is killed and nothing is left but
    // the failure record. (An init that fails and reboots would end the
    // build before the deadline on a fast host.)
    let kernel = guest::kernel();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("root");
    thaw_tests::agent::busybox_rootfs(&root);
    std::os::unix::fs::symlink("busybox", root.join("bin/sleep")).unwrap();
    std::fs::create_dir_all(root.join("sbin")).unwrap();
    std::fs::write(root.join("sbin/init"), "#!/bin/sh\nexec sleep 100000\n").unwrap();
    std::fs::set_permissions(
        root.join("sbin/init"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let root_img = dir.join("root.erofs");
    guest::erofs_image(&dir.join("root"), &root_img);
    let store = dir.join("store");
    let sockets = dir.join("tmp");
    std::fs::create_dir(&sockets).unwrap();
    let started = Instant::now();
    let out = VmmCommand::TemplateBuild(TemplateBuildArgs {
        ready_port: Some(4321),
        timeout_secs: 5,
        store: Some(store.clone()),
        ..TemplateBuildArgs::new(kernel, &root_img)
    })
    .command(guest::vmm_binary())
    .env("TMPDIR", &sockets)
    .output()
    .unwrap();
    let took = started.elapsed();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not ready before the deadline"), "{err}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(
        processes_mentioning(&sockets),
        0,
        "the template VMM survived"
    );
    assert_only_a_failure_record(&store, "not ready before the deadline");
    assert_eq!(
        std::fs::read_dir(&sockets).unwrap().count(),
        0,
        "socket directory leaked"
    );
}
