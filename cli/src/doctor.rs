//! `thaw doctor`: is this host ready to run thaw? Each check gives OK,
//! WARN (works, with a caveat) or FAIL (thaw cannot run a container here)
//! and one line saying why. Every host path a check reads comes from
//! [`Host`], so the checks run against fixture files in tests.

use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use thaw_config::{BackendKind, Config};

/// containerd's runtime name for thaw.
pub const RUNTIME_TYPE: &str = "io.containerd.thaw.v2";
/// The CNI plugins a CRI pod network needs (containerd's default conflist).
pub const CNI_PLUGINS: [&str; 3] = ["bridge", "host-local", "loopback"];
/// Where containerd's CRI looks for CNI plugins unless configured.
pub const CNI_DEFAULT_DIR: &str = "/opt/cni/bin";
/// Where Debian's containernetworking-plugins puts them.
pub const CNI_DEBIAN_DIR: &str = "/usr/lib/cni";
/// The oldest containerd thaw is tested with.
const CONTAINERD_TESTED: (u32, u32) = (1, 6);
/// The ELF magic: thaw-vmm loads an uncompressed vmlinux.
const ELF_MAGIC: &[u8] = b"\x7fELF";
/// erofs's superblock magic (little-endian 0xE0F5E1E2) and where it is.
const EROFS_MAGIC: &[u8] = &[0xe2, 0xe1, 0xf5, 0xe0];
const EROFS_MAGIC_OFFSET: u64 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub reason: String,
}

impl Check {
    fn new(name: &'static str, status: Status, reason: impl Into<String>) -> Check {
        Check {
            name,
            status,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<4}  {}: {}", self.status, self.name, self.reason)
    }
}

/// The host files and search path the checks read.
#[derive(Debug, Clone)]
pub struct Host {
    pub dev_kvm: PathBuf,
    /// `/sys/module`: which KVM module is loaded.
    pub sys_module: PathBuf,
    pub cpuinfo: PathBuf,
    pub containerd_config: PathBuf,
    /// Where to look for CNI plugins besides what containerd's config names.
    pub cni_fallback_dirs: Vec<PathBuf>,
    /// `$PATH`, for containerd and mkfs.erofs.
    pub path: OsString,
}

impl Host {
    /// This machine.
    pub fn this(containerd_config: PathBuf) -> Host {
        Host {
            dev_kvm: "/dev/kvm".into(),
            sys_module: "/sys/module".into(),
            cpuinfo: "/proc/cpuinfo".into(),
            containerd_config,
            cni_fallback_dirs: vec![CNI_DEFAULT_DIR.into(), CNI_DEBIAN_DIR.into()],
            path: std::env::var_os("PATH").unwrap_or_default(),
        }
    }
}

/// The thaw config as `thaw` loaded it: the file, and whether it exists.
pub type LoadedConfig = Result<(Config, PathBuf), thaw_config::Error>;

/// Runs every check, in the order a person fixes things.
pub fn run(host: &Host, config: &LoadedConfig) -> Vec<Check> {
    let mut checks = vec![check_kvm(&host.dev_kvm), check_kvm_type(host)];
    checks.push(check_containerd(&host.path));
    let (containerd_config, cni_dirs) = check_containerd_config(&host.containerd_config);
    checks.push(containerd_config);
    match config {
        Ok((cfg, path)) => {
            checks.push(check_config(cfg, path));
            checks.push(check_executable("thaw-vmm", &cfg.vm.vmm, &host.path));
            checks.push(check_image(
                "guest kernel",
                &cfg.vm.kernel,
                ELF_MAGIC,
                0,
                "an uncompressed ELF vmlinux (not a bzImage)",
            ));
            checks.push(check_image(
                "guest root image",
                &cfg.vm.root_image,
                EROFS_MAGIC,
                EROFS_MAGIC_OFFSET,
                "an erofs image",
            ));
            checks.push(check_cni(&cni_dirs, &host.cni_fallback_dirs));
            checks.push(check_executable(
                "mkfs.erofs",
                &cfg.image_cache.mkfs_erofs,
                &host.path,
            ));
        }
        Err(e) => {
            checks.push(Check::new(
                "config",
                Status::Fail,
                format!("{e}; its kernel, root image and VMM were not checked"),
            ));
            checks.push(check_cni(&cni_dirs, &host.cni_fallback_dirs));
            checks.push(check_executable(
                "mkfs.erofs",
                Path::new("mkfs.erofs"),
                &host.path,
            ));
        }
    }
    checks
}

/// `/dev/kvm` opens, speaks KVM API 12 and creates a VM.
pub fn check_kvm(dev: &Path) -> Check {
    const NAME: &str = "kvm";
    let shown = dev.display();
    let meta = match std::fs::metadata(dev) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Check::new(
                NAME,
                Status::Fail,
                format!(
                    "{shown} is missing: no KVM module is loaded (kvm_intel, kvm_amd or kvm_pvm)"
                ),
            )
        }
        Err(e) => return Check::new(NAME, Status::Fail, format!("{shown}: {e}")),
    };
    if !meta.file_type().is_char_device() {
        return Check::new(
            NAME,
            Status::Fail,
            format!("{shown} is not a character device"),
        );
    }
    let Ok(cpath) = CString::new(dev.as_os_str().as_bytes()) else {
        return Check::new(NAME, Status::Fail, format!("{shown}: path holds a NUL"));
    };
    let kvm = match kvm_ioctls::Kvm::new_with_path(&cpath) {
        Ok(k) => k,
        Err(e) if e.errno() == libc_eacces() => {
            return Check::new(
                NAME,
                Status::Fail,
                format!("{shown}: permission denied: run as root or as a member of its group"),
            )
        }
        Err(e) => return Check::new(NAME, Status::Fail, format!("opening {shown}: {e}")),
    };
    let api = kvm.get_api_version();
    if api != 12 {
        return Check::new(
            NAME,
            Status::Fail,
            format!("{shown} speaks KVM API {api}, thaw-vmm needs 12"),
        );
    }
    match kvm.create_vm() {
        Ok(_) => Check::new(
            NAME,
            Status::Ok,
            format!("{shown} opens, KVM API 12, a VM can be created"),
        ),
        Err(e) => Check::new(
            NAME,
            Status::Fail,
            format!("{shown} opens but creating a VM fails: {e}"),
        ),
    }
}

/// EACCES without a libc dependency: std knows the raw code.
fn libc_eacces() -> i32 {
    std::io::Error::from(ErrorKind::PermissionDenied)
        .raw_os_error()
        .unwrap_or(13)
}

/// Which KVM this is: hardware VMX/SVM (the target) or PVM (development
/// hosts, guest kernel emulated).
pub fn check_kvm_type(host: &Host) -> Check {
    const NAME: &str = "kvm type";
    let loaded = |m: &str| host.sys_module.join(m).exists();
    if loaded("kvm_pvm") {
        return Check::new(
            NAME,
            Status::Warn,
            "PVM (kvm_pvm loaded): guest kernel code is emulated, so a cold boot takes \
             tens of seconds (restores stay fast); thaw-vmm turns on its PVM workarounds",
        );
    }
    if loaded("kvm_intel") {
        return Check::new(NAME, Status::Ok, "hardware VMX (kvm_intel)");
    }
    if loaded("kvm_amd") {
        return Check::new(NAME, Status::Ok, "hardware SVM (kvm_amd)");
    }
    let flags = cpu_flags(&host.cpuinfo);
    let reason = if flags.iter().any(|f| f == "vmx") {
        "the CPU has VMX but kvm_intel is not loaded (modprobe kvm_intel)".to_string()
    } else if flags.iter().any(|f| f == "svm") {
        "the CPU has SVM but kvm_amd is not loaded (modprobe kvm_amd)".to_string()
    } else {
        format!(
            "no kvm_intel, kvm_amd or kvm_pvm module and no vmx/svm flag in {}: \
             enable virtualization (firmware, or nested virtualization in a VM)",
            host.cpuinfo.display()
        )
    };
    Check::new(NAME, Status::Fail, reason)
}

/// The first `flags` line of a cpuinfo file, split into words.
fn cpu_flags(cpuinfo: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(cpuinfo).unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "flags").then(|| value.split_whitespace().map(String::from).collect())
        })
        .unwrap_or_default()
}

/// `containerd --version` runs; versions before the tested one warn.
pub fn check_containerd(path: &OsStr) -> Check {
    const NAME: &str = "containerd";
    let Some(bin) = which(Path::new("containerd"), path) else {
        return Check::new(NAME, Status::Fail, "containerd is not in PATH");
    };
    let out = match Command::new(&bin).arg("--version").output() {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            return Check::new(
                NAME,
                Status::Fail,
                format!("{} --version failed ({})", bin.display(), o.status),
            )
        }
        Err(e) => {
            return Check::new(
                NAME,
                Status::Fail,
                format!("running {}: {e}", bin.display()),
            )
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    containerd_version_check(&text, &bin)
}

/// Judges `containerd --version`'s output.
pub fn containerd_version_check(output: &str, bin: &Path) -> Check {
    const NAME: &str = "containerd";
    let Some((version, major, minor)) = parse_containerd_version(output) else {
        return Check::new(
            NAME,
            Status::Warn,
            format!(
                "{}: cannot read a version in {:?}",
                bin.display(),
                output.trim()
            ),
        );
    };
    if (major, minor) < CONTAINERD_TESTED {
        let (tm, tn) = CONTAINERD_TESTED;
        return Check::new(
            NAME,
            Status::Warn,
            format!(
                "{version} ({}): thaw is tested with {tm}.{tn} and later",
                bin.display()
            ),
        );
    }
    Check::new(NAME, Status::Ok, format!("{version} ({})", bin.display()))
}

/// The version word of `containerd --version` (e.g. `containerd
/// github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3`, or
/// `... v2.0.0 ...`), with its major and minor numbers.
pub fn parse_containerd_version(output: &str) -> Option<(String, u32, u32)> {
    output.split_whitespace().find_map(|word| {
        let v = word.strip_prefix('v').unwrap_or(word);
        let mut parts = v.split(|c: char| !c.is_ascii_digit());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        v.contains('.').then(|| (word.to_string(), major, minor))
    })
}

/// Whether containerd's config declares a runtime of type
/// `io.containerd.thaw.v2` (for CRI pods; `ctr run --runtime` needs none).
/// Also returns the CNI plugin directories the config names.
pub fn check_containerd_config(path: &Path) -> (Check, Vec<PathBuf>) {
    const NAME: &str = "containerd config";
    let shown = path.display();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return (
                Check::new(
                    NAME,
                    Status::Warn,
                    format!(
                        "{shown} is missing, so no {RUNTIME_TYPE} runtime is declared: CRI pods \
                         cannot use RuntimeClass thaw (shim/README.md has the snippet); \
                         ctr run --runtime {RUNTIME_TYPE} works without it"
                    ),
                ),
                Vec::new(),
            )
        }
        Err(e) => {
            return (
                Check::new(NAME, Status::Fail, format!("{shown}: {e}")),
                Vec::new(),
            )
        }
    };
    let doc: toml::Table = match text.parse() {
        Ok(d) => d,
        Err(e) => {
            let first = e.to_string();
            let first = first.lines().next().unwrap_or("").to_string();
            return (
                Check::new(
                    NAME,
                    Status::Fail,
                    format!("{shown} does not parse (containerd will not start): {first}"),
                ),
                Vec::new(),
            );
        }
    };
    let mut handlers = Vec::new();
    let mut cni_dirs = Vec::new();
    walk(&doc, None, &mut handlers, &mut cni_dirs);
    let check = if handlers.is_empty() {
        Check::new(
            NAME,
            Status::Warn,
            format!(
                "{shown} declares no runtime of type {RUNTIME_TYPE}: CRI pods cannot use \
                 RuntimeClass thaw (shim/README.md has the snippet); ctr run --runtime \
                 {RUNTIME_TYPE} works without it"
            ),
        )
    } else {
        Check::new(
            NAME,
            Status::Ok,
            format!(
                "runtime handler {} is {RUNTIME_TYPE} ({shown})",
                handlers.join(", ")
            ),
        )
    };
    (check, cni_dirs)
}

/// Collects the names of tables whose `runtime_type` is thaw's (CRI
/// runtime handlers) and the `bin_dir`/`bin_dirs` of tables named `cni`,
/// wherever they are: containerd's config layout differs between versions.
fn walk(
    table: &toml::Table,
    name: Option<&str>,
    handlers: &mut Vec<String>,
    cni_dirs: &mut Vec<PathBuf>,
) {
    if table.get("runtime_type").and_then(toml::Value::as_str) == Some(RUNTIME_TYPE) {
        handlers.push(name.unwrap_or("(top level)").to_string());
    }
    if name == Some("cni") {
        if let Some(dir) = table.get("bin_dir").and_then(toml::Value::as_str) {
            cni_dirs.push(dir.into());
        }
        if let Some(dirs) = table.get("bin_dirs").and_then(toml::Value::as_array) {
            cni_dirs.extend(
                dirs.iter()
                    .filter_map(toml::Value::as_str)
                    .map(PathBuf::from),
            );
        }
    }
    for (key, value) in table {
        if let Some(t) = value.as_table() {
            walk(t, Some(key), handlers, cni_dirs);
        }
    }
}

/// thaw's own config parsed; the host-unisolated backend is a warning.
pub fn check_config(config: &Config, path: &Path) -> Check {
    const NAME: &str = "config";
    let shown = path.display();
    if config.backend == BackendKind::HostUnisolated {
        return Check::new(
            NAME,
            Status::Warn,
            format!("{shown}: backend = \"host-unisolated\": containers are NOT isolated from this host (tests only)"),
        );
    }
    if path.exists() {
        Check::new(NAME, Status::Ok, format!("{shown} parses"))
    } else {
        Check::new(
            NAME,
            Status::Ok,
            format!("{shown} is missing: the built-in defaults apply"),
        )
    }
}

/// A configured file exists, is readable and starts (at `offset`) with
/// `magic`.
pub fn check_image(
    name: &'static str,
    path: &Path,
    magic: &[u8],
    offset: u64,
    expected: &str,
) -> Check {
    let shown = path.display();
    let fail = |why: String| Check::new(name, Status::Fail, why);
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return fail(format!("{shown} is missing (make install puts it there)"))
        }
        Err(e) => return fail(format!("{shown} is not readable: {e}")),
    };
    match f.metadata() {
        Ok(m) if m.is_file() || m.file_type().is_block_device() => {}
        Ok(_) => return fail(format!("{shown} is not a file")),
        Err(e) => return fail(format!("{shown}: {e}")),
    }
    let mut head = vec![0u8; magic.len()];
    let read = f
        .seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut head));
    match read {
        Ok(()) if head == magic => Check::new(name, Status::Ok, format!("{shown} is {expected}")),
        Ok(()) => fail(format!("{shown} is not {expected}")),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
            fail(format!("{shown} is too short to be {expected}"))
        }
        Err(e) => fail(format!("{shown} is not readable: {e}")),
    }
}

/// A program (a path, or a name looked up in `path`) that can be run.
pub fn check_executable(name: &'static str, program: &Path, path: &OsStr) -> Check {
    match which(program, path) {
        Some(found) => Check::new(name, Status::Ok, found.display().to_string()),
        None if program.components().count() > 1 => Check::new(
            name,
            Status::Fail,
            format!("{} is missing or not executable", program.display()),
        ),
        None => Check::new(
            name,
            Status::Fail,
            format!("{} is not in PATH", program.display()),
        ),
    }
}

/// Where `program` resolves: itself if it has a directory part, else the
/// first executable file of that name in `path`'s directories.
pub fn which(program: &Path, path: &OsStr) -> Option<PathBuf> {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 {
        return executable(program).then(|| program.to_path_buf());
    }
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

/// The CNI plugins a CRI pod network needs, in the directories containerd
/// looks in (its config's, else /opt/cni/bin). Missing ones only warn:
/// thaw does not need them for `ctr run`.
pub fn check_cni(configured: &[PathBuf], fallbacks: &[PathBuf]) -> Check {
    const NAME: &str = "cni plugins";
    let used: Vec<PathBuf> = if configured.is_empty() {
        vec![PathBuf::from(CNI_DEFAULT_DIR)]
    } else {
        configured.to_vec()
    };
    let missing_in = |dir: &Path| -> Vec<&str> {
        CNI_PLUGINS
            .iter()
            .copied()
            .filter(|p| which(&dir.join(p), OsStr::new("")).is_none())
            .collect()
    };
    let all = CNI_PLUGINS.join(", ");
    if let Some(dir) = used.iter().find(|d| missing_in(d).is_empty()) {
        return Check::new(NAME, Status::Ok, format!("{all} in {}", dir.display()));
    }
    let shown_used = used
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if let Some(dir) = fallbacks
        .iter()
        .find(|d| !used.contains(d) && missing_in(d).is_empty())
    {
        return Check::new(
            NAME,
            Status::Warn,
            format!(
                "{all} are in {}, but containerd's CRI looks in {shown_used}: set its cni \
                 bin_dir to {}",
                dir.display(),
                dir.display()
            ),
        );
    }
    let missing = missing_in(&used[0]).join(", ");
    Check::new(
        NAME,
        Status::Warn,
        format!(
            "{missing} missing in {shown_used}: CRI pods get no network (install the CNI \
             plugins, e.g. Debian's containernetworking-plugins); ctr run does not need them"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn executable(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn host(root: &Path) -> Host {
        Host {
            dev_kvm: root.join("dev/kvm"),
            sys_module: root.join("sys/module"),
            cpuinfo: root.join("cpuinfo"),
            containerd_config: root.join("containerd.toml"),
            cni_fallback_dirs: vec![root.join("opt/cni/bin"), root.join("usr/lib/cni")],
            path: root.join("bin").into_os_string(),
        }
    }

    #[test]
    fn kvm_missing_or_not_a_device_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let c = check_kvm(&tmp.path().join("kvm"));
        assert_eq!(c.status, Status::Fail);
        assert!(c.reason.contains("is missing"), "{c}");
        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        let c = check_kvm(&file);
        assert_eq!(c.status, Status::Fail);
        assert!(c.reason.contains("not a character device"), "{c}");
        // A character device that is not KVM: the ioctl is refused.
        let c = check_kvm(Path::new("/dev/null"));
        assert_eq!(c.status, Status::Fail, "{c}");
    }

    #[test]
    fn kvm_type_from_modules_and_cpu_flags() {
        let tmp = tempfile::tempdir().unwrap();
        let h = host(tmp.path());
        std::fs::write(&h.cpuinfo, "processor\t: 0\nflags\t\t: fpu vme sse2\n").unwrap();
        let c = check_kvm_type(&h);
        assert_eq!(c.status, Status::Fail);
        assert!(c.reason.contains("no vmx/svm flag"), "{c}");

        std::fs::write(&h.cpuinfo, "flags\t\t: fpu vmx sse2\n").unwrap();
        let c = check_kvm_type(&h);
        assert_eq!(c.status, Status::Fail);
        assert!(c.reason.contains("modprobe kvm_intel"), "{c}");
        std::fs::write(&h.cpuinfo, "flags\t\t: fpu svm sse2\n").unwrap();
        assert!(check_kvm_type(&h).reason.contains("modprobe kvm_amd"));

        std::fs::create_dir_all(h.sys_module.join("kvm_amd")).unwrap();
        let c = check_kvm_type(&h);
        assert_eq!(
            (c.status, c.reason.as_str()),
            (Status::Ok, "hardware SVM (kvm_amd)")
        );
        std::fs::create_dir_all(h.sys_module.join("kvm_intel")).unwrap();
        assert_eq!(check_kvm_type(&h).reason, "hardware VMX (kvm_intel)");
        std::fs::create_dir_all(h.sys_module.join("kvm_pvm")).unwrap();
        let c = check_kvm_type(&h);
        assert_eq!(c.status, Status::Warn);
        assert!(c.reason.starts_with("PVM"), "{c}");
    }

    #[test]
    fn containerd_versions() {
        let bin = Path::new("/usr/bin/containerd");
        let debian =
            "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3\n";
        assert_eq!(
            parse_containerd_version(debian),
            Some(("1.6.20~ds1".into(), 1, 6))
        );
        let c = containerd_version_check(debian, bin);
        assert_eq!(c.status, Status::Ok);
        assert_eq!(c.reason, "1.6.20~ds1 (/usr/bin/containerd)");
        let v2 = "containerd containerd.io v2.0.4 1a43cb6a1035441f9aca8f5666a9b3ef9e70ab20\n";
        assert_eq!(parse_containerd_version(v2), Some(("v2.0.4".into(), 2, 0)));
        assert_eq!(containerd_version_check(v2, bin).status, Status::Ok);
        let old = "containerd github.com/containerd/containerd v1.4.13 9cc61520\n";
        let c = containerd_version_check(old, bin);
        assert_eq!(c.status, Status::Warn);
        assert!(c.reason.contains("tested with 1.6"), "{c}");
        assert_eq!(
            containerd_version_check("nonsense", bin).status,
            Status::Warn
        );
    }

    #[test]
    fn containerd_not_in_path_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let c = check_containerd(tmp.path().as_os_str());
        assert_eq!(c.status, Status::Fail);
        assert_eq!(c.reason, "containerd is not in PATH");
    }

    #[test]
    fn containerd_config_names_the_runtime() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("config.toml");
        let (c, dirs) = check_containerd_config(&path);
        assert_eq!(c.status, Status::Warn);
        assert!(c.reason.contains("is missing"), "{c}");
        assert!(dirs.is_empty());

        std::fs::write(
            &path,
            r#"version = 2
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
"#,
        )
        .unwrap();
        let (c, dirs) = check_containerd_config(&path);
        assert_eq!(c.status, Status::Warn);
        assert!(c.reason.contains("declares no runtime"), "{c}");
        assert_eq!(dirs, [PathBuf::from("/usr/lib/cni")]);

        // The snippet from shim/README.md.
        std::fs::write(
            &path,
            r#"version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.thaw]
  runtime_type = "io.containerd.thaw.v2"
  pod_annotations = ["io.thaw.vm.*"]
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.thaw.options]
    ConfigPath = "/etc/thaw/config.toml"
"#,
        )
        .unwrap();
        let (c, _) = check_containerd_config(&path);
        assert_eq!(c.status, Status::Ok, "{c}");
        assert!(
            c.reason
                .starts_with("runtime handler thaw is io.containerd.thaw.v2"),
            "{c}"
        );

        // containerd 2's layout, several bin dirs.
        std::fs::write(
            &path,
            r#"version = 3
[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["/a", "/b"]
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.kata-thaw]
  runtime_type = "io.containerd.thaw.v2"
"#,
        )
        .unwrap();
        let (c, dirs) = check_containerd_config(&path);
        assert!(c.reason.starts_with("runtime handler kata-thaw"), "{c}");
        assert_eq!(dirs, [PathBuf::from("/a"), PathBuf::from("/b")]);

        std::fs::write(&path, "[plugins\n").unwrap();
        let (c, _) = check_containerd_config(&path);
        assert_eq!(c.status, Status::Fail);
        assert!(c.reason.contains("does not parse"), "{c}");
    }

    #[test]
    fn images_are_checked_for_their_magic() {
        let tmp = tempfile::tempdir().unwrap();
        let k = tmp.path().join("vmlinux");
        let c = check_image("guest kernel", &k, ELF_MAGIC, 0, "an ELF");
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.reason
                .ends_with("is missing (make install puts it there)"),
            "{c}"
        );
        std::fs::write(&k, b"\x7fELF\x02\x01").unwrap();
        assert_eq!(
            check_image("k", &k, ELF_MAGIC, 0, "an ELF").status,
            Status::Ok
        );
        std::fs::write(&k, b"MZ bzImage").unwrap();
        let c = check_image("k", &k, ELF_MAGIC, 0, "an ELF");
        assert_eq!(c.status, Status::Fail);
        assert!(c.reason.ends_with("is not an ELF"), "{c}");

        let r = tmp.path().join("root.img");
        std::fs::write(&r, [0u8; 100]).unwrap();
        let c = check_image("r", &r, EROFS_MAGIC, EROFS_MAGIC_OFFSET, "an erofs image");
        assert!(c.reason.contains("too short"), "{c}");
        let mut img = vec![0u8; 4096];
        img[1024..1028].copy_from_slice(EROFS_MAGIC);
        std::fs::write(&r, &img).unwrap();
        let c = check_image("r", &r, EROFS_MAGIC, EROFS_MAGIC_OFFSET, "an erofs image");
        assert_eq!(c.status, Status::Ok, "{c}");
        let c = check_image("r", tmp.path(), EROFS_MAGIC, 0, "an erofs image");
        assert_eq!(c.status, Status::Fail, "{c}");
    }

    #[test]
    fn programs_are_found_in_path_or_by_path() {
        let tmp = tempfile::tempdir().unwrap();
        let h = host(tmp.path());
        let c = check_executable("mkfs.erofs", Path::new("mkfs.erofs"), &h.path);
        assert_eq!(
            (c.status, c.reason.as_str()),
            (Status::Fail, "mkfs.erofs is not in PATH")
        );
        let bin = tmp.path().join("bin/mkfs.erofs");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::write(&bin, "").unwrap();
        // Present but not executable.
        let c = check_executable("mkfs.erofs", Path::new("mkfs.erofs"), &h.path);
        assert_eq!(c.status, Status::Fail);
        executable(&bin);
        let c = check_executable("mkfs.erofs", Path::new("mkfs.erofs"), &h.path);
        assert_eq!(c.status, Status::Ok);
        assert_eq!(c.reason, bin.display().to_string());
        let c = check_executable("thaw-vmm", &tmp.path().join("nope/thaw-vmm"), &h.path);
        assert_eq!(c.status, Status::Fail);
        assert!(c.reason.ends_with("is missing or not executable"), "{c}");
    }

    #[test]
    fn cni_plugins_where_containerd_looks() {
        let tmp = tempfile::tempdir().unwrap();
        let h = host(tmp.path());
        let (opt, debian) = (&h.cni_fallback_dirs[0], &h.cni_fallback_dirs[1]);
        let c = check_cni(std::slice::from_ref(opt), &h.cni_fallback_dirs);
        assert_eq!(c.status, Status::Warn);
        assert!(
            c.reason.starts_with("bridge, host-local, loopback missing"),
            "{c}"
        );
        for p in CNI_PLUGINS {
            executable(&debian.join(p));
        }
        executable(&opt.join("loopback"));
        // Installed, but not where containerd looks.
        let c = check_cni(std::slice::from_ref(opt), &h.cni_fallback_dirs);
        assert_eq!(c.status, Status::Warn);
        assert!(c.reason.contains("set its cni bin_dir"), "{c}");
        let c = check_cni(std::slice::from_ref(debian), &h.cni_fallback_dirs);
        assert_eq!(c.status, Status::Ok);
        assert_eq!(
            c.reason,
            format!("bridge, host-local, loopback in {}", debian.display())
        );
    }

    #[test]
    fn a_broken_config_fails_and_skips_what_depends_on_it() {
        let tmp = tempfile::tempdir().unwrap();
        let h = host(tmp.path());
        let broken = thaw_config::Config::parse("[vm]\nvcpus = 0\n", Path::new("/etc/thaw/x.toml"));
        let checks = run(&h, &broken.map(|c| (c, PathBuf::from("/etc/thaw/x.toml"))));
        let config = checks.iter().find(|c| c.name == "config").unwrap();
        assert_eq!(config.status, Status::Fail);
        assert!(config.reason.contains("vm.vcpus"), "{config}");
        assert!(!checks.iter().any(|c| c.name == "guest kernel"));
    }

    #[test]
    fn host_unisolated_warns() {
        let cfg =
            thaw_config::Config::parse("backend = \"host-unisolated\"\n", Path::new("/x.toml"))
                .unwrap();
        let c = check_config(&cfg, Path::new("/x.toml"));
        assert_eq!(c.status, Status::Warn);
        assert!(c.reason.contains("NOT isolated"), "{c}");
    }

    #[test]
    fn lines_read_as_status_name_reason() {
        let c = Check::new("kvm", Status::Ok, "fine");
        assert_eq!(c.to_string(), "OK    kvm: fine");
        let c = Check::new("kvm", Status::Fail, "no");
        assert_eq!(c.to_string(), "FAIL  kvm: no");
    }
}
