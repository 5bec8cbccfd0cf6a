//! An OCI busybox image built offline from the host's `busybox-static`,
//! written as an OCI image layout and packed as a tar that
//! `ctr images import` accepts.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::cmd;

/// The reference the imported image is known by.
pub const BUSYBOX_REF: &str = "docker.io/thaw-test/busybox:latest";
/// An image whose `/bin/sh` and `/bin/busybox` are garbage bytes.
pub const CORRUPT_REF: &str = "docker.io/thaw-test/corrupt:latest";

/// The user the `user` test switches to, present in the image's /etc/passwd.
pub const TEST_USER: &str = "thawuser";
pub const TEST_UID: u32 = 1234;
pub const TEST_GID: u32 = 4321;

fn sha256_hex(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    format!("{:x}", h.finalize())
}

/// Writes a blob into `layout/blobs/sha256/` and returns (digest, size).
fn put_blob(layout: &Path, data: &[u8]) -> (String, usize) {
    let hex = sha256_hex(data);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(&hex), data).unwrap();
    (format!("sha256:{hex}"), data.len())
}

/// Fills `root` with a minimal busybox root filesystem.
pub fn populate_rootfs(root: &Path, corrupt: bool) {
    for d in [
        "bin", "etc", "tmp", "proc", "sys", "dev", "root", "home", "var", "work",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    let busybox = root.join("bin/busybox");
    if corrupt {
        fs::write(
            &busybox,
            b"\x7fELF this is not a program, just garbage bytes\n",
        )
        .unwrap();
    } else {
        fs::copy("/bin/busybox", &busybox).expect("busybox-static must be installed");
    }
    fs::set_permissions(&busybox, fs::Permissions::from_mode(0o755)).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" {
            continue;
        }
        let _ = symlink("busybox", root.join("bin").join(applet));
    }
    fs::write(
        root.join("etc/passwd"),
        format!(
            "root:x:0:0:root:/root:/bin/sh\n{TEST_USER}:x:{TEST_UID}:{TEST_GID}:test:/home:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
        ),
    )
    .unwrap();
    fs::write(
        root.join("etc/group"),
        format!("root:x:0:\n{TEST_USER}:x:{TEST_GID}:\nnogroup:x:65534:\n"),
    )
    .unwrap();
    fs::write(root.join("etc/hostname"), "busybox\n").unwrap();
}

/// The image config of the busybox images: a shell, a standard PATH.
fn shell_config() -> serde_json::Value {
    serde_json::json!({
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["sh"],
        "WorkingDir": "/"
    })
}

/// Builds the image tar for `name` in `work` and returns its path.
pub fn build_image_tar(work: &Path, name: &str, corrupt: bool) -> PathBuf {
    let root = work.join("rootfs");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).unwrap();
    populate_rootfs(&root, corrupt);
    let config = shell_config();
    pack_image(work, &root, name, config, "thaw-tests: busybox-static")
}

/// The busybox image plus host `programs` (absolute paths) and the shared
/// libraries `ldd` names for them, each at its host path: for benchmarks
/// that need a real tool (iperf3) in the container.
pub fn build_image_tar_with_programs(work: &Path, name: &str, programs: &[&str]) -> PathBuf {
    let root = work.join("rootfs");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).unwrap();
    populate_rootfs(&root, false);
    let mut files: Vec<PathBuf> = Vec::new();
    for p in programs {
        files.push(PathBuf::from(p));
        let ldd = Command::new("ldd").arg(p).output().unwrap();
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // "libc.so.6 => /lib/.../libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
            let path = line
                .split("=>")
                .last()
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("");
            if path.starts_with('/') {
                files.push(PathBuf::from(path));
            }
        }
    }
    for f in files {
        let dest = root.join(f.strip_prefix("/").unwrap());
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        // Follow links: the library's real bytes under its linked name.
        fs::copy(&f, &dest).unwrap_or_else(|e| panic!("copying {}: {e}", f.display()));
    }
    let config = shell_config();
    pack_image(
        work,
        &root,
        name,
        config,
        "thaw-tests: busybox-static + host programs",
    )
}

/// The pod sandbox ("pause") image CRI starts first in every pod: only the
/// static busybox, sleeping forever. `env` goes into the image config, so
/// the harness can tell the pause processes of its pods from others'.
pub fn build_pause_image_tar(work: &Path, name: &str, env: &[&str]) -> PathBuf {
    let root = work.join("rootfs");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(root.join("bin")).unwrap();
    let busybox = root.join("bin/busybox");
    fs::copy("/bin/busybox", &busybox).expect("busybox-static must be installed");
    fs::set_permissions(&busybox, fs::Permissions::from_mode(0o755)).unwrap();
    let mut envs = vec!["PATH=/bin".to_string()];
    envs.extend(env.iter().map(|e| e.to_string()));
    let config = serde_json::json!({
        "Env": envs,
        "Entrypoint": ["/bin/busybox", "sleep", "infinity"],
        "WorkingDir": "/"
    });
    pack_image(
        work,
        &root,
        name,
        config,
        "thaw-tests: pause (busybox sleep)",
    )
}

/// Packs the tree `root` as a one-layer OCI image named `name` with the
/// image config `config` (the `config` object of the OCI image config),
/// returns the tar `ctr images import` takes, and removes `root`.
fn pack_image(
    work: &Path,
    root: &Path,
    name: &str,
    config: serde_json::Value,
    created_by: &str,
) -> PathBuf {
    let layout = work.join("layout");
    let _ = fs::remove_dir_all(&layout);
    fs::create_dir_all(&layout).unwrap();

    let layer_tar = work.join("layer.tar");
    let out = cmd::run(
        Command::new("tar")
            .arg("--numeric-owner")
            .arg("--owner=0")
            .arg("--group=0")
            .arg("--sort=name")
            .arg("-C")
            .arg(root)
            .arg("-cf")
            .arg(&layer_tar)
            .arg("."),
        Duration::from_secs(60),
    );
    assert!(out.success(), "tar layer: {}", out.describe());
    let layer = fs::read(&layer_tar).unwrap();
    let diff_id = format!("sha256:{}", sha256_hex(&layer));
    let (layer_digest, layer_size) = put_blob(&layout, &layer);

    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": created_by}]
    });
    let (config_digest, config_size) = put_blob(&layout, &serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer_size
        }]
    });
    let (manifest_digest, manifest_size) =
        put_blob(&layout, &serde_json::to_vec(&manifest).unwrap());
    let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag
            }
        }]
    });
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();

    let image_tar = work.join(format!("{}.tar", sha256_hex(name.as_bytes())));
    let out = cmd::run(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&image_tar)
            .arg("oci-layout")
            .arg("index.json")
            .arg("blobs"),
        Duration::from_secs(60),
    );
    assert!(out.success(), "tar image: {}", out.describe());
    let _ = fs::remove_dir_all(root);
    let _ = fs::remove_dir_all(&layout);
    let _ = fs::remove_file(&layer_tar);
    image_tar
}
