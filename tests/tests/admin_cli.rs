//! `thaw`, the operator's CLI, as a user runs it: `thaw doctor` and `thaw
//! templates` against a config in a temporary directory. No VM: the
//! templates are fixtures made through the store, and `thaw-vmm` is a
//! script that records how it was called.

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use thaw_snapshots::template::{Store, TemplateInputs, TemplateKey};
use thaw_tests::binaries::binaries;
use thaw_tests::cmd::{self, Output};

/// A thaw install in a temporary directory: config, kernel, root image,
/// a stand-in thaw-vmm, a template store and a containerd config.
struct Install {
    dir: tempfile::TempDir,
}

impl Install {
    fn new() -> Install {
        let dir = tempfile::tempdir().unwrap();
        let i = Install { dir };
        // Just the magic numbers `doctor` looks for.
        fs::write(i.kernel(), b"\x7fELF\x02\x01\x01 not really a kernel").unwrap();
        let mut image = vec![0u8; 4096];
        image[1024..1028].copy_from_slice(&[0xe2, 0xe1, 0xf5, 0xe0]);
        fs::write(i.root_image(), image).unwrap();
        // Records its argv, prints a directory as thaw-vmm does, and exits
        // with $FAKE_VMM_EXIT.
        let vmm = i.vmm();
        fs::write(
            &vmm,
            format!(
                "#!/bin/sh\necho \"$@\" > {}\necho {}/built\nexit ${{FAKE_VMM_EXIT:-0}}\n",
                i.path("vmm-argv").display(),
                i.store().display()
            ),
        )
        .unwrap();
        fs::set_permissions(&vmm, fs::Permissions::from_mode(0o755)).unwrap();
        i.write_config("");
        fs::write(
            i.containerd_config(),
            "version = 2\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.thaw]\n  \
             runtime_type = \"io.containerd.thaw.v2\"\n",
        )
        .unwrap();
        i
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn config(&self) -> PathBuf {
        self.path("config.toml")
    }
    fn kernel(&self) -> PathBuf {
        self.path("vmlinux")
    }
    fn root_image(&self) -> PathBuf {
        self.path("root.img")
    }
    fn vmm(&self) -> PathBuf {
        self.path("thaw-vmm")
    }
    fn store(&self) -> PathBuf {
        self.path("templates")
    }
    fn containerd_config(&self) -> PathBuf {
        self.path("containerd.toml")
    }

    /// The config with `extra` appended to its `[vm]` table.
    fn write_config(&self, extra: &str) {
        let text = format!(
            "state_dir = \"{dir}/state\"\nrun_dir = \"{dir}/run\"\n\n[vm]\n\
             vmm = \"{vmm}\"\nkernel = \"{kernel}\"\nroot_image = \"{root}\"\n\
             memory_mib = 128\nspare_disks = 2\ntemplate_store = \"{store}\"\n{extra}",
            dir = self.dir.path().display(),
            vmm = self.vmm().display(),
            kernel = self.kernel().display(),
            root = self.root_image().display(),
            store = self.store().display(),
        );
        fs::write(self.config(), text).unwrap();
    }

    /// `thaw --config CONFIG ARGS`.
    fn thaw(&self, args: &[&str]) -> Output {
        self.thaw_env(args, &[])
    }

    fn thaw_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(&binaries().admin);
        c.arg("--config").arg(self.config()).args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        cmd::run(&mut c, Duration::from_secs(60))
    }

    fn doctor(&self) -> Output {
        self.thaw(&[
            "doctor",
            "--containerd-config",
            &self.containerd_config().to_string_lossy(),
        ])
    }

    /// A template in the store as a build would leave it, without a VM.
    fn fake_template(&self, vcpus: u8) -> TemplateKey {
        let inputs = TemplateInputs {
            kernel: self.kernel(),
            root_image: self.root_image(),
            vcpus,
            memory_mib: 128,
            spare_disks: 2,
            guest_cmdline: "console=ttyS0".into(),
        };
        let store = Store::new(self.store());
        let key = store.key(&inputs).unwrap();
        store
            .build(&key, &inputs, |out: &Path| {
                fs::write(out.join(thaw_snapshots::STATE_FILE), b"state")?;
                fs::write(out.join(thaw_snapshots::MEMORY_FILE), b"memory")
            })
            .unwrap();
        key
    }
}

/// The line `doctor` printed for one check: `STATUS  name: reason`, the
/// status padded to four.
fn line<'a>(out: &'a Output, name: &str) -> &'a str {
    let tag = format!("{name}: ");
    out.stdout
        .lines()
        .find(|l| l.get(6..).is_some_and(|rest| rest.starts_with(&tag)))
        .unwrap_or_else(|| panic!("no {name} line:\n{}", out.describe()))
}

#[test]
fn doctor_reports_each_check_and_fails_on_a_missing_kernel() {
    let i = Install::new();
    let out = i.doctor();
    let shown = |p: PathBuf| p.display().to_string();
    assert_eq!(
        line(&out, "config"),
        format!("OK    config: {} parses", shown(i.config()))
    );
    assert_eq!(
        line(&out, "thaw-vmm"),
        format!("OK    thaw-vmm: {}", shown(i.vmm()))
    );
    assert_eq!(
        line(&out, "guest kernel"),
        format!(
            "OK    guest kernel: {} is an uncompressed ELF vmlinux (not a bzImage)",
            shown(i.kernel())
        )
    );
    assert_eq!(
        line(&out, "guest root image"),
        format!(
            "OK    guest root image: {} is an erofs image",
            shown(i.root_image())
        )
    );
    assert_eq!(
        line(&out, "containerd config"),
        format!(
            "OK    containerd config: runtime handler thaw is io.containerd.thaw.v2 ({})",
            shown(i.containerd_config())
        )
    );
    // What this host has is its own business, but every check speaks,
    // each line is STATUS, name and reason, and FAIL decides the exit.
    for name in ["kvm", "kvm type", "containerd", "cni plugins", "mkfs.erofs"] {
        let l = line(&out, name);
        assert!(
            ["OK    ", "WARN  ", "FAIL  "]
                .iter()
                .any(|s| l.starts_with(s)),
            "{l}"
        );
    }
    let fails = out.stdout.lines().filter(|l| l.starts_with("FAIL")).count();
    let summary = out.stdout.lines().last().unwrap_or("");
    assert!(
        summary.starts_with(&format!("{fails} failed, ")),
        "{}",
        out.describe()
    );
    assert_eq!(out.code(), Some(if fails > 0 { 1 } else { 0 }));

    fs::remove_file(i.kernel()).unwrap();
    fs::write(i.containerd_config(), "version = 2\n").unwrap();
    let out = i.doctor();
    assert_eq!(
        line(&out, "guest kernel"),
        format!(
            "FAIL  guest kernel: {} is missing (make install puts it there)",
            shown(i.kernel())
        )
    );
    assert!(
        line(&out, "containerd config").starts_with("WARN  containerd config: "),
        "{}",
        out.describe()
    );
    assert_eq!(out.code(), Some(1), "{}", out.describe());
}

#[test]
fn doctor_names_the_config_key_at_fault() {
    let i = Install::new();
    i.write_config("vcpus = 0\n");
    let out = i.doctor();
    let l = line(&out, "config");
    assert!(
        l.starts_with("FAIL  config: config ") && l.contains("key `vm.vcpus`"),
        "{l}"
    );
    assert!(
        !out.stdout.contains(" guest kernel: "),
        "{}",
        out.describe()
    );
    assert_eq!(out.code(), Some(1));
}

#[test]
fn templates_gc_keeps_the_store_within_its_quota() {
    let i = Install::new();
    i.write_config("template_store_max_mib = 1\n");
    let store = Store::new(i.store());
    let keys: Vec<TemplateKey> = (1..=3).map(|v| i.fake_template(v)).collect();
    // 700 KiB allocated each; the first built is the least recently used.
    for (age, key) in [(300, &keys[0]), (200, &keys[1]), (100, &keys[2])] {
        let dir = i.store().join(key.as_str());
        fs::write(dir.join(thaw_snapshots::MEMORY_FILE), vec![1u8; 700 << 10]).unwrap();
        let t = std::time::SystemTime::now() - Duration::from_secs(age);
        fs::File::open(dir.join("template.json"))
            .unwrap()
            .set_modified(t)
            .unwrap();
        let in_use = i.store().join(format!("{key}.in-use"));
        if in_use.exists() {
            fs::File::options()
                .write(true)
                .open(&in_use)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
    }
    let out = i.thaw(&["templates", "gc"]);
    assert!(out.success(), "{}", out.describe());
    assert_eq!(
        out.stdout.trim(),
        format!(
            "evicted {} (store over 1 MiB)\nevicted {} (store over 1 MiB)",
            keys[0], keys[1]
        ),
        "{}",
        out.describe()
    );
    assert!(store.get(&keys[2]).is_some());
}

#[test]
fn templates_list_rm_and_gc() {
    let i = Install::new();
    let out = i.thaw(&["templates", "list"]);
    assert!(out.success(), "{}", out.describe());
    assert_eq!(out.stdout, "");
    assert_eq!(
        out.stderr.trim(),
        format!("thaw: no templates in {}", i.store().display())
    );

    let key = i.fake_template(1);
    let out = i.thaw(&["templates", "list"]);
    assert!(out.success(), "{}", out.describe());
    let expected = format!(
        "{key}  vcpus=1 memory_mib=128 spare_disks=2 kernel={} root={} created=",
        i.kernel().display(),
        i.root_image().display()
    );
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.describe());
    assert!(out.stdout.starts_with(&expected), "{}", out.describe());

    let out = i.thaw(&["templates", "rm", key.as_str()]);
    assert!(out.success(), "{}", out.describe());
    assert_eq!(out.stdout.trim(), format!("removed {key}"));
    let out = i.thaw(&["templates", "rm", key.as_str()]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr
            .contains(&format!("no template {key} in the store")),
        "{}",
        out.describe()
    );
    let out = i.thaw(&["templates", "rm", "not-a-key"]);
    assert_eq!(out.code(), Some(64), "{}", out.describe());
    assert!(
        out.stderr.contains("not a template key"),
        "{}",
        out.describe()
    );

    // gc keeps what is current and removes what an input change outdated.
    let one = i.fake_template(1);
    let out = i.thaw(&["templates", "gc"]);
    assert!(out.success() && out.stdout.is_empty(), "{}", out.describe());
    fs::write(i.kernel(), b"\x7fELF a new kernel").unwrap();
    let two = i.fake_template(2);
    let out = i.thaw(&["templates", "gc"]);
    assert!(out.success(), "{}", out.describe());
    assert_eq!(out.stdout.trim(), format!("removed {one}"));
    let out = i.thaw(&["templates", "list"]);
    assert!(out.stdout.starts_with(two.as_str()), "{}", out.describe());
}

#[test]
fn templates_build_runs_thaw_vmm_as_the_shim_does() {
    let i = Install::new();
    let argv = || fs::read_to_string(i.path("vmm-argv")).unwrap();
    let out = i.thaw(&["templates", "build"]);
    assert!(out.success(), "{}", out.describe());
    // thaw-vmm's stdout (the template's directory) passes through.
    assert_eq!(out.stdout.trim(), format!("{}/built", i.store().display()));
    assert!(
        out.stderr
            .contains("thaw: building the template for vcpus=1 memory_mib=128 spare_disks=2"),
        "{}",
        out.describe()
    );
    let (k, r, s) = (
        i.kernel().display().to_string(),
        i.root_image().display().to_string(),
        i.store().display().to_string(),
    );
    assert_eq!(
        argv().trim(),
        format!(
            "template build --kernel {k} --disk {r},ro --spare-disks 2 --vcpus 1 \
             --memory-mib 128 --ready agent --timeout 600 --retry-after 600 --store {s} \
             --max-store-mib 8192"
        )
    );
    let out = i.thaw(&["templates", "build", "--vcpus", "2", "--memory-mib", "512"]);
    assert!(out.success(), "{}", out.describe());
    assert!(
        argv().contains(" --vcpus 2 --memory-mib 512 "),
        "{}",
        argv()
    );

    let out = i.thaw_env(&["templates", "build"], &[("FAKE_VMM_EXIT", "3")]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains(&format!(
            "thaw: {} template build failed (exit status: 3)",
            i.vmm().display()
        )),
        "{}",
        out.describe()
    );
}
