//! thaw's TOML configuration (`/etc/thaw/config.toml` by default) and the
//! per-pod overrides pods may make through annotations. The shim runs on
//! it; the `thaw` admin CLI reads it to check an install and to build the
//! templates the shim will look for.
//!
//! Where the file comes from, first match wins: the runtime options'
//! `ConfigPath` (`ctr run --runtime-config-path`, CRI `options.ConfigPath`),
//! the `THAW_CONFIG` environment variable, `/etc/thaw/config.toml`. A
//! missing default file means built-in defaults; a missing explicit file is
//! an error. Every error names the key at fault.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thaw_vmm_api::TemplateBuildArgs;

/// A configuration mistake, naming the file or annotation and the key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },

    #[error("annotation {key}: {message}")]
    Annotation { key: String, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/thaw/config.toml";
pub const CONFIG_ENV: &str = "THAW_CONFIG";
/// Prefix of the annotations that override `[vm]` settings per pod.
pub const ANNOTATION_PREFIX: &str = "io.thaw.vm.";

/// How containers are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// One micro-VM per pod (the product).
    #[default]
    Vm,
    /// The guest agent as a plain host process: NO isolation from the host.
    /// For tests and debugging only.
    HostUnisolated,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub backend: BackendKind,
    /// Persistent state: the rootfs image cache.
    pub state_dir: PathBuf,
    /// Runtime state: per-sandbox sockets and logs.
    pub run_dir: PathBuf,
    /// error, warn, info, debug or trace.
    pub log_level: String,
    pub vm: VmConfig,
    pub host: HostConfig,
    pub agent: AgentConfig,
    pub image_cache: ImageCacheConfig,
    pub annotations: AnnotationPolicy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    /// Disk 0, the guest's root filesystem with the agent.
    pub root_image: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Appended to the VMM's default kernel command line.
    pub kernel_append: String,
    /// Empty virtio-blk slots for container rootfs images.
    pub spare_disks: u32,
    /// How long to wait for the agent to dial in after the VMM starts.
    pub boot_timeout_secs: u64,
    /// "none", "stdout" or a file path for the guest console.
    pub serial: String,
    /// Start VMs by restoring a snapshot of a booted template (built with
    /// one cold boot on first use, then shared); false: always cold boot.
    pub templates: bool,
    /// Where templates are kept (`thaw-vmm template --store`).
    pub template_store: PathBuf,
    /// Deadline of one template build (a cold boot until the agent is
    /// ready, then the snapshot). Separate from `boot_timeout_secs`: a
    /// build is paid once per shape, and on a slow host a boot can take
    /// minutes.
    pub template_build_timeout_secs: u64,
    /// After a failed build, starts cold-boot at once for this long
    /// instead of each paying another failed build first.
    pub template_retry_secs: u64,
    /// The most disk the template store may take, in MiB (templates are
    /// sparse: what counts is what is allocated). Past it, the least
    /// recently used templates that no running VM was restored from are
    /// removed after a start; 0: no limit.
    pub template_store_max_mib: u64,
    /// Upper bounds for annotation overrides.
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
    /// The guest memory sizes a pod's VM may get (each gets its own
    /// template): a pod whose containers' limits need more than
    /// `memory_mib` gets the smallest of these that holds them.
    pub memory_shapes_mib: Vec<u32>,
    /// What the guest kernel and agent need beside a pod's containers,
    /// added to the pod's memory before a shape is picked.
    pub guest_overhead_mib: u32,
    /// System calls forbidden to sandbox VMMs on top of their seccomp
    /// filter (`thaw-vmm --deny-syscall`): names of calls the VMM makes
    /// only for volumes, or numbers. A node without volumes can forbid
    /// the virtio-fs server's calls; a VMM that makes one is killed.
    pub deny_syscalls: Vec<String>,
    /// Jail each sandbox's VMM (`thaw-vmm --jail`): a mount namespace with
    /// only its own files, `jail_uid`:`jail_gid`, a few capabilities.
    pub jail: bool,
    pub jail_uid: u32,
    pub jail_gid: u32,
    /// The largest file a jailed VMM may write (RLIMIT_FSIZE), in MiB;
    /// 0: no limit. It bounds what a guest writes to one file of a
    /// volume (beyond it the guest's write fails with EFBIG).
    pub jail_max_file_mib: u64,
}

/// The sum of a pod's container memory limits (bytes), which containerd's
/// CRI plugin puts on the sandbox's spec from kubelet's PodSandboxConfig.
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// The pod's CPU quota and period (microseconds), likewise.
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const SANDBOX_CPU_SHARES: &str = "io.kubernetes.cri.sandbox-cpu-shares";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// The agent binary run as a host process by the host-unisolated backend.
    pub agent: PathBuf,
    /// How long to wait for it to dial in.
    pub start_timeout_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Deadline of one agent request (container create may mount and start
    /// namespaces in a slow guest).
    pub request_timeout_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageCacheConfig {
    /// Unreferenced images kept for reuse, least recently used go first.
    pub keep_unused_mib: u64,
    pub mkfs_erofs: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnnotationPolicy {
    /// Which `io.thaw.vm.<key>` overrides pods may use. Path keys (`kernel`,
    /// `root_image`) let a pod pick a host file: only allow them for trusted
    /// pods.
    pub allow: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: BackendKind::Vm,
            state_dir: PathBuf::from("/var/lib/thaw"),
            run_dir: PathBuf::from("/run/thaw"),
            log_level: "info".into(),
            vm: VmConfig::default(),
            host: HostConfig::default(),
            agent: AgentConfig::default(),
            image_cache: ImageCacheConfig::default(),
            annotations: AnnotationPolicy::default(),
        }
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vmm: PathBuf::from("/usr/local/bin/thaw-vmm"),
            kernel: PathBuf::from("/usr/local/share/thaw/vmlinux"),
            root_image: PathBuf::from("/usr/local/share/thaw/root.img"),
            vcpus: 1,
            memory_mib: 256,
            kernel_append: String::new(),
            spare_disks: 8,
            boot_timeout_secs: 120,
            serial: "none".into(),
            templates: true,
            template_store: PathBuf::from("/var/lib/thaw/templates"),
            template_build_timeout_secs: 600,
            template_retry_secs: 600,
            template_store_max_mib: 8192,
            max_vcpus: 8,
            max_memory_mib: 16384,
            memory_shapes_mib: vec![256, 512, 1024, 2048, 4096, 8192, 16384],
            guest_overhead_mib: 64,
            deny_syscalls: Vec::new(),
            jail: true,
            jail_uid: 65534,
            jail_gid: 65534,
            jail_max_file_mib: 0,
        }
    }
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            agent: PathBuf::from("/usr/local/bin/thaw-agent"),
            start_timeout_secs: 20,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            request_timeout_secs: 60,
        }
    }
}

impl Default for ImageCacheConfig {
    fn default() -> Self {
        ImageCacheConfig {
            keep_unused_mib: 2048,
            mkfs_erofs: PathBuf::from("mkfs.erofs"),
        }
    }
}

impl Default for AnnotationPolicy {
    fn default() -> Self {
        AnnotationPolicy {
            allow: vec!["vcpus".into(), "memory_mib".into()],
        }
    }
}

const OVERRIDABLE: &[&str] = &[
    "vcpus",
    "memory_mib",
    "kernel",
    "root_image",
    "kernel_append",
];

impl Config {
    /// Parses TOML text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let err = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let de = toml::Deserializer::parse(text).map_err(|e| err(one_line(&e.to_string())))?;
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = one_line(&e.inner().to_string());
            if key.is_empty() || key == "." {
                err(inner)
            } else {
                err(format!("key `{key}`: {inner}"))
            }
        })?;
        cfg.validate()
            .map_err(|(key, m)| err(format!("key `{key}`: {m}")))?;
        Ok(cfg)
    }

    /// Loads from an explicit path (must exist) or the default lookup.
    pub fn load(explicit: Option<&Path>) -> Result<(Config, PathBuf)> {
        let (path, required) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => match std::env::var_os(CONFIG_ENV) {
                Some(p) if !p.is_empty() => (PathBuf::from(p), true),
                _ => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
            },
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok((Config::parse(&text, &path)?, path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok((Config::default(), path))
            }
            Err(e) => Err(Error::Config {
                path,
                message: format!("cannot read: {e}"),
            }),
        }
    }

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let abs = |key: &str, p: &Path| {
            if p.is_absolute() {
                Ok(())
            } else {
                Err((
                    key.to_string(),
                    format!("{} must be an absolute path", p.display()),
                ))
            }
        };
        abs("state_dir", &self.state_dir)?;
        abs("run_dir", &self.run_dir)?;
        abs("vm.vmm", &self.vm.vmm)?;
        abs("vm.kernel", &self.vm.kernel)?;
        abs("vm.root_image", &self.vm.root_image)?;
        abs("vm.template_store", &self.vm.template_store)?;
        abs("host.agent", &self.host.agent)?;
        if !["error", "warn", "info", "debug", "trace"].contains(&self.log_level.as_str()) {
            return Err((
                "log_level".into(),
                format!(
                    "{:?} is not one of error, warn, info, debug, trace",
                    self.log_level
                ),
            ));
        }
        check_vcpus(self.vm.vcpus, self.vm.max_vcpus).map_err(|m| ("vm.vcpus".into(), m))?;
        check_memory(self.vm.memory_mib, self.vm.max_memory_mib)
            .map_err(|m| ("vm.memory_mib".into(), m))?;
        for (i, m) in self.vm.memory_shapes_mib.iter().enumerate() {
            check_memory(*m, self.vm.max_memory_mib)
                .map_err(|e| (format!("vm.memory_shapes_mib[{i}]"), e))?;
        }
        if self.vm.spare_disks == 0 || self.vm.spare_disks > 24 {
            return Err((
                "vm.spare_disks".into(),
                format!("{} is not within 1..=24", self.vm.spare_disks),
            ));
        }
        if self.vm.boot_timeout_secs == 0 {
            return Err(("vm.boot_timeout_secs".into(), "must be > 0".into()));
        }
        if self.vm.template_build_timeout_secs == 0 {
            return Err((
                "vm.template_build_timeout_secs".into(),
                "must be > 0".into(),
            ));
        }
        if self.agent.request_timeout_secs == 0 {
            return Err(("agent.request_timeout_secs".into(), "must be > 0".into()));
        }
        for (i, k) in self.annotations.allow.iter().enumerate() {
            if !OVERRIDABLE.contains(&k.as_str()) {
                return Err((
                    format!("annotations.allow[{i}]"),
                    format!("{k:?} is not one of {}", OVERRIDABLE.join(", ")),
                ));
            }
        }
        Ok(())
    }

    /// The `[vm]` settings for one pod: sized for the pod's resources (the
    /// CRI sandbox annotations), then its `io.thaw.vm.*` annotations.
    pub fn vm_for_pod(&self, annotations: &HashMap<String, String>) -> Result<VmConfig> {
        let mut vm = self.vm.clone();
        size_for_pod(&mut vm, annotations)?;
        let mut keys: Vec<&String> = annotations.keys().collect();
        keys.sort();
        for key in keys {
            let Some(name) = key.strip_prefix(ANNOTATION_PREFIX) else {
                continue;
            };
            let value = &annotations[key];
            let bad = |message: String| Error::Annotation {
                key: key.clone(),
                message,
            };
            if !OVERRIDABLE.contains(&name) {
                return Err(bad(format!(
                    "unknown setting; known: {}",
                    OVERRIDABLE.join(", ")
                )));
            }
            if !self.annotations.allow.iter().any(|a| a == name) {
                return Err(bad(
                    "not allowed by the shim config's [annotations] allow list".into(),
                ));
            }
            match name {
                "vcpus" => {
                    vm.vcpus = value
                        .parse()
                        .map_err(|_| bad(format!("{value:?} is not a number")))?;
                    check_vcpus(vm.vcpus, vm.max_vcpus).map_err(bad)?;
                }
                "memory_mib" => {
                    vm.memory_mib = value
                        .parse()
                        .map_err(|_| bad(format!("{value:?} is not a number")))?;
                    check_memory(vm.memory_mib, vm.max_memory_mib).map_err(bad)?;
                    // Each size is a template of its own: only the allowed
                    // shapes, so pods cannot make the host build and keep
                    // templates without bound.
                    if vm.memory_mib != self.vm.memory_mib
                        && !self.vm.memory_shapes_mib.contains(&vm.memory_mib)
                    {
                        return Err(bad(format!(
                            "{} is not one of vm.memory_shapes_mib {:?}",
                            vm.memory_mib, self.vm.memory_shapes_mib
                        )));
                    }
                }
                "kernel" | "root_image" => {
                    let p = PathBuf::from(value);
                    if !p.is_absolute() {
                        return Err(bad(format!("{value:?} must be an absolute path")));
                    }
                    if name == "kernel" {
                        vm.kernel = p;
                    } else {
                        vm.root_image = p;
                    }
                }
                _ => vm.kernel_append = value.clone(),
            }
        }
        Ok(vm)
    }
}

impl VmConfig {
    /// `thaw-vmm template build` for this shape: what the shim runs before
    /// a start, so a template an operator builds is the one it finds.
    pub fn template_build_args(&self) -> TemplateBuildArgs {
        TemplateBuildArgs {
            spare_disks: self.spare_disks,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            timeout_secs: self.template_build_timeout_secs,
            retry_after_secs: self.template_retry_secs,
            store: Some(self.template_store.clone()),
            max_store_mib: (self.template_store_max_mib > 0).then_some(self.template_store_max_mib),
            ..TemplateBuildArgs::new(&self.kernel, &self.root_image)
        }
    }
}

/// A number-valued CRI annotation; absent, 0 or negative = no limit.
pub fn pod_number(annotations: &HashMap<String, String>, key: &str) -> Result<u64> {
    match annotations.get(key).map(|v| v.trim()) {
        None | Some("") => Ok(0),
        Some(v) => v
            .parse::<i64>()
            .map(|n| n.max(0) as u64)
            .map_err(|_| Error::Annotation {
                key: key.into(),
                message: format!("{v:?} is not a number"),
            }),
    }
}

/// Grows `vm` to hold the pod: memory to the smallest allowed shape that
/// holds the pod's memory plus the guest's overhead, vCPUs to the pod's CPU
/// quota rounded up. Never below the configured size; a pod that needs
/// more than the largest shape (or `max_vcpus`) is refused.
fn size_for_pod(vm: &mut VmConfig, annotations: &HashMap<String, String>) -> Result<()> {
    let bytes = pod_number(annotations, SANDBOX_MEMORY)?;
    if bytes > 0 {
        let pod_mib = bytes.div_ceil(1 << 20);
        let need = pod_mib + u64::from(vm.guest_overhead_mib);
        let mut shapes = vm.memory_shapes_mib.clone();
        shapes.sort_unstable();
        let fit = shapes
            .iter()
            .copied()
            .find(|&s| u64::from(s) >= need && s >= vm.memory_mib);
        match fit {
            Some(s) => vm.memory_mib = s,
            None if need <= u64::from(vm.memory_mib) => {}
            None => {
                return Err(Error::Annotation {
                    key: SANDBOX_MEMORY.into(),
                    message: format!(
                        "the pod needs a {need} MiB VM ({pod_mib} MiB of container limits + \
                         {} MiB vm.guest_overhead_mib); the largest allowed shape \
                         (vm.memory_shapes_mib) is {} MiB",
                        vm.guest_overhead_mib,
                        shapes
                            .last()
                            .copied()
                            .unwrap_or(vm.memory_mib)
                            .max(vm.memory_mib)
                    ),
                })
            }
        }
    }
    let quota = pod_number(annotations, SANDBOX_CPU_QUOTA)?;
    let period = pod_number(annotations, SANDBOX_CPU_PERIOD)?;
    if quota > 0 && period > 0 {
        let need = quota.div_ceil(period);
        if need > u64::from(vm.max_vcpus) {
            return Err(Error::Annotation {
                key: SANDBOX_CPU_QUOTA.into(),
                message: format!(
                    "the pod's CPU limit ({quota}/{period}) needs {need} vCPUs; \
                     vm.max_vcpus is {}",
                    vm.max_vcpus
                ),
            });
        }
        vm.vcpus = vm.vcpus.max(need as u32);
    }
    Ok(())
}

fn check_vcpus(v: u32, max: u32) -> std::result::Result<(), String> {
    if v == 0 || v > max {
        return Err(format!("{v} is not within 1..={max} (vm.max_vcpus)"));
    }
    Ok(())
}

fn check_memory(m: u32, max: u32) -> std::result::Result<(), String> {
    if !(64..=max).contains(&m) {
        return Err(format!("{m} is not within 64..={max} (vm.max_memory_mib)"));
    }
    Ok(())
}

/// toml errors span several lines with a source excerpt; logs and `ctr`
/// show one line better.
fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^'))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config> {
        Config::parse(s, Path::new("/etc/thaw/config.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn full_file_parses() {
        let c = parse(
            r#"
backend = "host-unisolated"
state_dir = "/tmp/s"
run_dir = "/tmp/r"
log_level = "debug"
[vm]
vmm = "/opt/thaw-vmm"
kernel = "/k"
root_image = "/r"
vcpus = 2
memory_mib = 512
kernel_append = "quiet"
[host]
agent = "/a"
[image_cache]
keep_unused_mib = 0
[annotations]
allow = ["vcpus", "kernel"]
"#,
        )
        .unwrap();
        assert_eq!(c.backend, BackendKind::HostUnisolated);
        assert_eq!(c.vm.vcpus, 2);
        assert_eq!(c.vm.memory_mib, 512);
        assert_eq!(c.vm.kernel, PathBuf::from("/k"));
        assert_eq!(c.image_cache.keep_unused_mib, 0);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("[vm]\nvcpu = 2\n").unwrap_err().to_string();
        assert!(e.contains("vcpu"), "{e}");
        assert!(e.contains("/etc/thaw/config.toml"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_key_path() {
        let e = parse("[vm]\nmemory_mib = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("vm.memory_mib"), "{e}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let e = parse("[vm]\nvcpus = 0\n").unwrap_err().to_string();
        assert!(e.contains("vm.vcpus"), "{e}");
        let e = parse("[vm]\nkernel = \"vmlinux\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("vm.kernel") && e.contains("absolute"), "{e}");
        let e = parse("backend = \"qemu\"\n").unwrap_err().to_string();
        assert!(e.contains("backend"), "{e}");
        let e = parse("[annotations]\nallow = [\"vcpus\", \"vmm\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("annotations.allow[1]"), "{e}");
    }

    #[test]
    fn syntax_error_is_reported_with_position() {
        let e = parse("[vm\nvcpus = 1\n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/thaw.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/thaw.toml"), "{e}");
    }

    #[test]
    fn a_pod_gets_the_smallest_vm_shape_that_holds_it() {
        let c = Config::default();
        let pod = |mem: &str, quota: &str| {
            HashMap::from([
                (SANDBOX_MEMORY.to_string(), mem.to_string()),
                (SANDBOX_CPU_QUOTA.to_string(), quota.to_string()),
                (SANDBOX_CPU_PERIOD.to_string(), "100000".to_string()),
            ])
        };
        // No limits: the configured size.
        let vm = c.vm_for_pod(&pod("0", "0")).unwrap();
        assert_eq!((vm.memory_mib, vm.vcpus), (256, 1));
        // 100 MiB + 64 fits the default 256; 600 + 64 needs 1024.
        assert_eq!(c.vm_for_pod(&pod("104857600", "")).unwrap().memory_mib, 256);
        let vm = c.vm_for_pod(&pod("629145600", "250000")).unwrap();
        assert_eq!((vm.memory_mib, vm.vcpus), (1024, 3));
        // Beyond the largest shape, or more CPUs than allowed: refused,
        // naming the annotation.
        let e = c
            .vm_for_pod(&pod("17179869184", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains(SANDBOX_MEMORY) && e.contains("16384 MiB"), "{e}");
        let e = c.vm_for_pod(&pod("", "900000")).unwrap_err().to_string();
        assert!(
            e.contains(SANDBOX_CPU_QUOTA) && e.contains("max_vcpus"),
            "{e}"
        );
        let e = c.vm_for_pod(&pod("lots", "")).unwrap_err().to_string();
        assert!(e.contains("not a number"), "{e}");
    }

    #[test]
    fn annotations_override_allowed_keys_only() {
        let c = Config::default();
        let mut a = HashMap::new();
        a.insert("io.thaw.vm.vcpus".to_string(), "2".to_string());
        a.insert("io.thaw.vm.memory_mib".to_string(), "1024".to_string());
        a.insert("unrelated".to_string(), "x".to_string());
        let vm = c.vm_for_pod(&a).unwrap();
        assert_eq!((vm.vcpus, vm.memory_mib), (2, 1024));

        let mut a = HashMap::new();
        a.insert("io.thaw.vm.kernel".to_string(), "/evil".to_string());
        let e = c.vm_for_pod(&a).unwrap_err().to_string();
        assert!(
            e.contains("io.thaw.vm.kernel") && e.contains("not allowed"),
            "{e}"
        );

        // A size outside the allowed shapes would be one more template.
        let mut a = HashMap::new();
        a.insert("io.thaw.vm.memory_mib".to_string(), "1000".to_string());
        let e = c.vm_for_pod(&a).unwrap_err().to_string();
        assert!(
            e.contains("io.thaw.vm.memory_mib") && e.contains("memory_shapes_mib"),
            "{e}"
        );

        let mut a = HashMap::new();
        a.insert("io.thaw.vm.vcpus".to_string(), "many".to_string());
        let e = c.vm_for_pod(&a).unwrap_err().to_string();
        assert!(e.contains("io.thaw.vm.vcpus"), "{e}");

        let mut a = HashMap::new();
        a.insert("io.thaw.vm.vcpus".to_string(), "1000".to_string());
        assert!(c.vm_for_pod(&a).is_err());
    }
}
