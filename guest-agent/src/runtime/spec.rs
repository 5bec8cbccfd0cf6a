//! Reads an OCI runtime spec and turns it into a plan for the init helper,
//! rejecting what the guest cannot honour with the field and the reason.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use oci_spec::runtime::{
    Capabilities, LinuxNamespaceType, LinuxResources, Mount, PosixRlimitType, Process, Spec,
};
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::plan::{CapsPlan, DevicePlan, MountPlan, Ns, ProcessPlan, Rlimit, RootfsPlan};
use crate::runtime::sandbox::{EtcFiles, Sandbox};
use crate::seccomp::{self, Programs};

fn parse<T: DeserializeOwned>(json: &[u8], root: &str) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_slice(json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = match (root, path.as_str()) {
            (r, ".") => r.to_string(),
            ("", p) => p.to_string(),
            (r, p) => format!("{r}.{p}"),
        };
        let field = if field.is_empty() {
            "spec".into()
        } else {
            field
        };
        // serde_json appends "at line 1 column N", which says nothing
        // once the field path is known.
        let reason = e.into_inner().to_string();
        let reason = match reason.rfind(" at line ") {
            Some(i) if reason[i..].contains(" column ") => reason[..i].to_string(),
            _ => reason,
        };
        Error::spec(field, reason)
    })
}

pub fn parse_spec(json: &[u8]) -> Result<Spec> {
    parse(json, "")
}

pub fn parse_process(json: &[u8]) -> Result<Process> {
    parse(json, "process")
}

fn rlimit_resource(t: PosixRlimitType) -> i32 {
    use PosixRlimitType as T;
    (match t {
        T::RlimitCpu => libc::RLIMIT_CPU,
        T::RlimitFsize => libc::RLIMIT_FSIZE,
        T::RlimitData => libc::RLIMIT_DATA,
        T::RlimitStack => libc::RLIMIT_STACK,
        T::RlimitCore => libc::RLIMIT_CORE,
        T::RlimitRss => libc::RLIMIT_RSS,
        T::RlimitNproc => libc::RLIMIT_NPROC,
        T::RlimitNofile => libc::RLIMIT_NOFILE,
        T::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        T::RlimitAs => libc::RLIMIT_AS,
        T::RlimitLocks => libc::RLIMIT_LOCKS,
        T::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        T::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        T::RlimitNice => libc::RLIMIT_NICE,
        T::RlimitRtprio => libc::RLIMIT_RTPRIO,
        T::RlimitRttime => libc::RLIMIT_RTTIME,
    }) as i32
}

fn cap_names(set: &Option<Capabilities>, field: &str) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for cap in set.iter().flatten() {
        let name = format!("CAP_{cap}");
        if caps::Capability::from_str(&name).is_err() {
            return Err(Error::spec(
                field,
                format!("{name} is not a capability this agent knows"),
            ));
        }
        names.push(name);
    }
    names.sort();
    Ok(names)
}

/// The process part of a spec (also an exec request), without seccomp.
pub fn translate_process(p: &Process, f: &str) -> Result<(ProcessPlan, Option<(u16, u16)>)> {
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(Error::spec(format!("{f}.args"), "must not be empty"));
    }
    let cwd = p.cwd().to_string_lossy().to_string();
    if !p.cwd().is_absolute() {
        return Err(Error::spec(
            format!("{f}.cwd"),
            format!("{cwd:?} must be an absolute path"),
        ));
    }
    if p.scheduler().is_some() {
        return Err(Error::spec(
            format!("{f}.scheduler"),
            "not supported by thaw's guest agent",
        ));
    }
    if p.io_priority().is_some() {
        return Err(Error::spec(
            format!("{f}.ioPriority"),
            "not supported by thaw's guest agent",
        ));
    }
    if p.exec_cpu_affinity().is_some() {
        return Err(Error::spec(
            format!("{f}.execCPUAffinity"),
            "not supported by thaw's guest agent",
        ));
    }
    if let Some(profile) = p.apparmor_profile().as_deref().filter(|s| !s.is_empty()) {
        // The guest has no LSM; the VM is the isolation boundary.
        log::info!("{f}.apparmorProfile {profile:?} ignored: no LSM in the guest");
    }
    let mut rlimits = Vec::new();
    let mut seen = HashSet::new();
    for (i, rl) in p.rlimits().iter().flatten().enumerate() {
        let field = format!("{f}.rlimits[{i}]");
        if rl.soft() > rl.hard() {
            return Err(Error::spec(
                field,
                format!("soft limit {} exceeds hard limit {}", rl.soft(), rl.hard()),
            ));
        }
        if !seen.insert(rlimit_resource(rl.typ())) {
            return Err(Error::spec(field, format!("{:?} is given twice", rl.typ())));
        }
        rlimits.push(Rlimit {
            field,
            resource: rlimit_resource(rl.typ()),
            soft: rl.soft(),
            hard: rl.hard(),
        });
    }
    let caps = match p.capabilities() {
        None => None,
        Some(c) => Some(CapsPlan {
            bounding: cap_names(c.bounding(), &format!("{f}.capabilities.bounding"))?,
            effective: cap_names(c.effective(), &format!("{f}.capabilities.effective"))?,
            permitted: cap_names(c.permitted(), &format!("{f}.capabilities.permitted"))?,
            inheritable: cap_names(c.inheritable(), &format!("{f}.capabilities.inheritable"))?,
            ambient: cap_names(c.ambient(), &format!("{f}.capabilities.ambient"))?,
        }),
    };
    let user = p.user();
    let console = p.console_size().map(|b| {
        (
            b.height().min(u16::MAX as u64) as u16,
            b.width().min(u16::MAX as u64) as u16,
        )
    });
    Ok((
        ProcessPlan {
            args,
            env: p.env().clone().unwrap_or_default(),
            cwd,
            terminal: p.terminal().unwrap_or(false),
            uid: user.uid(),
            gid: user.gid(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
            umask: user.umask(),
            rlimits,
            caps,
            no_new_privileges: p.no_new_privileges().unwrap_or(false),
            oom_score_adj: p.oom_score_adj(),
            seccomp: Vec::new(),
        },
        console,
    ))
}

/// Namespaces of a container, resolved for the guest.
#[derive(Debug, Default, Clone)]
pub struct Namespaces {
    pub new: Vec<Ns>,
    pub join: Vec<(Ns, PathBuf)>,
}

impl Namespaces {
    pub fn has_new(&self, ns: Ns) -> bool {
        self.new.contains(&ns)
    }
}

/// Where a container's shared namespaces come from.
pub struct PodContext<'a> {
    pub sandbox: Option<&'a Sandbox>,
    /// Init pid of the sandbox's own container, for a shared pid namespace.
    pub sandbox_init_pid: Option<i32>,
    /// This is the sandbox's own container (CRI's pause), whose new IPC
    /// namespace is the pod's: the pod's sysctls, which CRI puts on it,
    /// then reach every container of the pod, as with runc.
    pub is_sandbox_container: bool,
}

fn namespaces(spec: &Spec, pod: &PodContext) -> Result<Namespaces> {
    let mut out = Namespaces::default();
    let mut seen = HashSet::new();
    let list = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    for (i, ns) in list.iter().enumerate() {
        let field = format!("linux.namespaces[{i}]");
        let typ = ns.typ();
        if !seen.insert(typ as u32) {
            return Err(Error::spec(
                field,
                format!("{typ:?} namespace listed twice"),
            ));
        }
        let kind = match typ {
            LinuxNamespaceType::Mount => Ns::Mount,
            LinuxNamespaceType::Uts => Ns::Uts,
            LinuxNamespaceType::Ipc => Ns::Ipc,
            LinuxNamespaceType::Pid => Ns::Pid,
            LinuxNamespaceType::Cgroup => Ns::Cgroup,
            // The VM's network namespace is the pod's network: containers
            // stay in it (the host-side path means nothing in the guest).
            LinuxNamespaceType::Network => continue,
            LinuxNamespaceType::User => {
                return Err(Error::spec(
                    field,
                    "user namespaces are not supported (the guest kernel is built without them; the VM is the isolation boundary)",
                ))
            }
            LinuxNamespaceType::Time => {
                return Err(Error::spec(field, "time namespaces are not supported"))
            }
        };
        let Some(path) = ns.path().as_ref().filter(|p| !p.as_os_str().is_empty()) else {
            match (kind, pod.sandbox) {
                (Ns::Ipc, Some(sb)) if pod.is_sandbox_container => {
                    out.join.push((kind, sb.ipc_ns.clone()))
                }
                _ => out.new.push(kind),
            }
            continue;
        };
        // A path names another container's namespace on the host; inside a
        // pod that is the pod's shared one.
        let joined = match (kind, pod.sandbox) {
            (Ns::Uts, Some(sb)) => sb.uts_ns.clone(),
            (Ns::Ipc, Some(sb)) => sb.ipc_ns.clone(),
            (Ns::Pid, Some(sb)) => match pod.sandbox_init_pid {
                Some(pid) => PathBuf::from(format!("/proc/{pid}/ns/pid")),
                None => {
                    return Err(Error::spec(
                        format!("{field}.path"),
                        format!("shared pid namespace requested but sandbox {:?} has no running sandbox container", sb.id),
                    ))
                }
            },
            (Ns::Mount, _) => {
                return Err(Error::spec(
                    format!("{field}.path"),
                    "joining an existing mount namespace is not supported",
                ))
            }
            _ if path.exists() => path.clone(),
            _ => {
                return Err(Error::spec(
                    format!("{field}.path"),
                    format!("{} does not exist in the guest (and the container is not in a sandbox)", path.display()),
                ))
            }
        };
        out.join.push((kind, joined));
    }
    if !out.has_new(Ns::Mount) {
        return Err(Error::spec(
            "linux.namespaces",
            "a new mount namespace is required",
        ));
    }
    Ok(out)
}

fn default_devices() -> Vec<DevicePlan> {
    [
        ("/dev/null", 1, 3),
        ("/dev/zero", 1, 5),
        ("/dev/full", 1, 7),
        ("/dev/random", 1, 8),
        ("/dev/urandom", 1, 9),
        ("/dev/tty", 5, 0),
    ]
    .into_iter()
    .map(|(path, major, minor)| DevicePlan {
        path: path.into(),
        kind: 'c',
        major,
        minor,
        mode: 0o666,
        uid: 0,
        gid: 0,
    })
    .collect()
}

fn devices(spec: &Spec) -> Result<Vec<DevicePlan>> {
    let mut by_path: HashMap<String, DevicePlan> = default_devices()
        .into_iter()
        .map(|d| (d.path.clone(), d))
        .collect();
    for (i, d) in spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().clone())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let field = format!("linux.devices[{i}]");
        let path = d.path().to_string_lossy().to_string();
        if !d.path().is_absolute() || !path.starts_with("/dev/") {
            return Err(Error::spec(
                format!("{field}.path"),
                format!("{path:?} must be an absolute path under /dev"),
            ));
        }
        let kind = match format!("{:?}", d.typ()).as_str() {
            "C" | "U" => 'c',
            "B" => 'b',
            "P" => 'p',
            other => {
                return Err(Error::spec(
                    format!("{field}.type"),
                    format!("unsupported device type {other}"),
                ))
            }
        };
        if d.major() < 0 || d.minor() < 0 {
            return Err(Error::spec(field, "major and minor must not be negative"));
        }
        by_path.insert(
            path.clone(),
            DevicePlan {
                path,
                kind,
                major: d.major() as u64,
                minor: d.minor() as u64,
                mode: d.file_mode().unwrap_or(0o666),
                uid: d.uid().unwrap_or(0),
                gid: d.gid().unwrap_or(0),
            },
        );
    }
    let mut v: Vec<DevicePlan> = by_path.into_values().collect();
    v.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(v)
}

const ETC_FILES: [&str; 3] = ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf"];

/// Where CRI binds the host file kubelet reads a container's last words
/// from.
pub const TERMINATION_LOG: &str = "/dev/termination-log";

fn mounts(
    spec: &Spec,
    etc: &EtcFiles,
    termination_log: &Path,
    sandbox: Option<&Sandbox>,
) -> Result<Vec<MountPlan>> {
    let mut out = Vec::new();
    let mut covered = HashSet::new();
    let list: Vec<Mount> = spec.mounts().clone().unwrap_or_default();
    for (i, m) in list.iter().enumerate() {
        let field = format!("mounts[{i}]");
        let dest = m.destination().to_string_lossy().to_string();
        if !m.destination().is_absolute() {
            return Err(Error::spec(
                format!("{field}.destination"),
                format!("{dest:?} must be an absolute path"),
            ));
        }
        let options = m.options().clone().unwrap_or_default();
        let typ = m.typ().clone().unwrap_or_default();
        let source = m
            .source()
            .as_ref()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let bind = typ == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
        let clean_dest = Path::new(&dest)
            .components()
            .collect::<PathBuf>()
            .to_string_lossy()
            .to_string();
        covered.insert(clean_dest.clone());
        let mut plan = MountPlan {
            field: field.clone(),
            destination: dest.clone(),
            typ: typ.clone(),
            source: source.clone(),
            options,
        };
        if bind && !Path::new(&source).exists() {
            // Host-side files (CRI's per-pod /etc files, /dev/shm) do not
            // exist in the guest: use the guest's own equivalents.
            match clean_dest.as_str() {
                "/etc/hosts" => plan.source = etc.hosts.to_string_lossy().into(),
                "/etc/hostname" => plan.source = etc.hostname.to_string_lossy().into(),
                "/etc/resolv.conf" => match &etc.resolv_conf {
                    Some(p) => plan.source = p.to_string_lossy().into(),
                    None => continue,
                },
                // A guest file instead, whose content goes back to the
                // host with the exit.
                TERMINATION_LOG => plan.source = termination_log.to_string_lossy().into(),
                "/dev/shm" => match sandbox {
                    Some(sb) => plan.source = sb.shm.to_string_lossy().into(),
                    None => {
                        plan.typ = "tmpfs".into();
                        plan.source = "shm".into();
                        plan.options = vec!["nosuid".into(), "noexec".into(), "nodev".into(), "mode=1777".into(), "size=65536k".into()];
                    }
                },
                _ => {
                    return Err(Error::spec(
                        format!("{field}.source"),
                        format!("{source:?} does not exist in the guest (host paths must be shared into the VM)"),
                    ))
                }
            }
        }
        out.push(plan);
    }
    // Like Docker and CRI, every container gets the pod's (or its own)
    // /etc files unless the spec mounts its own.
    for dest in ETC_FILES {
        if covered.contains(dest) {
            continue;
        }
        let source = match dest {
            "/etc/hosts" => Some(&etc.hosts),
            "/etc/hostname" => Some(&etc.hostname),
            _ => etc.resolv_conf.as_ref(),
        };
        if let Some(source) = source {
            out.push(MountPlan {
                field: format!("(agent) {dest}"),
                destination: dest.into(),
                typ: "bind".into(),
                source: source.to_string_lossy().into(),
                options: vec!["bind".into()],
            });
        }
    }
    Ok(out)
}

fn reject_unsupported(spec: &Spec) -> Result<()> {
    if let Some(h) = spec.hooks() {
        let any = [
            h.prestart(),
            h.create_runtime(),
            h.create_container(),
            h.start_container(),
            h.poststart(),
            h.poststop(),
        ]
        .iter()
        .any(|l| l.as_ref().is_some_and(|v| !v.is_empty()));
        if any {
            return Err(Error::spec(
                "hooks",
                "OCI hooks are host programs; the shim must run or remove them",
            ));
        }
    }
    if spec.domainname().as_ref().is_some_and(|d| !d.is_empty()) {
        return Err(Error::spec(
            "domainname",
            "not supported by thaw's guest agent",
        ));
    }
    if spec.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
        || spec.gid_mappings().as_ref().is_some_and(|m| !m.is_empty())
    {
        return Err(Error::spec(
            "uidMappings",
            "user namespaces are not supported",
        ));
    }
    if let Some(l) = spec.linux() {
        if l.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
            || l.gid_mappings().as_ref().is_some_and(|m| !m.is_empty())
        {
            return Err(Error::spec(
                "linux.uidMappings",
                "user namespaces are not supported",
            ));
        }
        if l.intel_rdt().is_some() {
            return Err(Error::spec("linux.intelRdt", "not supported in the guest"));
        }
        if l.personality().is_some() {
            return Err(Error::spec(
                "linux.personality",
                "not supported by thaw's guest agent",
            ));
        }
        if l.time_offsets().as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(Error::spec(
                "linux.timeOffsets",
                "time namespaces are not supported",
            ));
        }
    }
    Ok(())
}

/// Everything the agent needs from a container's spec.
#[derive(Debug)]
pub struct ContainerSpec {
    pub process: ProcessPlan,
    pub console_size: Option<(u16, u16)>,
    pub namespaces: Namespaces,
    pub hostname: Option<String>,
    /// The guest file bound at /dev/termination-log in place of the
    /// spec's host file; the caller creates it.
    pub termination_log: Option<PathBuf>,
    /// `path` is left empty: the caller fills in the mounted rootfs.
    pub rootfs: RootfsPlan,
    /// spec.root.path, used when no rootfs image is given.
    pub root_path: Option<PathBuf>,
    pub resources: Option<LinuxResources>,
    pub seccomp: Programs,
}

/// Validates `spec` completely (no side effects) and translates it.
/// `termination_log` is the guest file to bind at /dev/termination-log
/// when the spec binds a host file there.
pub fn translate_container(
    spec: &Spec,
    pod: &PodContext,
    etc: &EtcFiles,
    termination_log: &Path,
) -> Result<ContainerSpec> {
    reject_unsupported(spec)?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| Error::spec("process", "is required"))?;
    let (mut process, console_size) = translate_process(process, "process")?;
    let namespaces = namespaces(spec, pod)?;
    let hostname = spec.hostname().clone().filter(|h| !h.is_empty());
    if hostname.is_some() && !namespaces.has_new(Ns::Uts) {
        return Err(Error::spec(
            "hostname",
            "setting a hostname needs a new UTS namespace",
        ));
    }
    let seccomp = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        Some(s) => seccomp::compile(s)?,
        None => Vec::new(),
    };
    process.seccomp = seccomp.clone();
    let linux = spec.linux().clone().unwrap_or_default();
    let mut sysctl: Vec<(String, String)> = linux
        .sysctl()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    sysctl.sort();
    for (k, _) in &sysctl {
        if k.contains('/') || k.contains("..") || k.is_empty() {
            return Err(Error::spec(
                format!("linux.sysctl.{k}"),
                "not a sysctl name",
            ));
        }
    }
    let root = spec.root().clone();
    let rootfs = RootfsPlan {
        path: PathBuf::new(),
        readonly: root.as_ref().and_then(|r| r.readonly()).unwrap_or(false),
        propagation: linux.rootfs_propagation().clone().filter(|s| !s.is_empty()),
        mounts: mounts(spec, etc, termination_log, pod.sandbox)?,
        devices: devices(spec)?,
        masked_paths: linux.masked_paths().clone().unwrap_or_default(),
        readonly_paths: linux.readonly_paths().clone().unwrap_or_default(),
        sysctl,
    };
    if let Some(p) = &rootfs.propagation {
        if crate::init::propagation_flags(p).is_none() {
            return Err(Error::spec(
                "linux.rootfsPropagation",
                format!("unknown value {p:?}"),
            ));
        }
    }
    let termination_log = rootfs
        .mounts
        .iter()
        .any(|m| m.source == termination_log.to_string_lossy())
        .then(|| termination_log.to_path_buf());
    Ok(ContainerSpec {
        process,
        console_size,
        namespaces,
        hostname,
        termination_log,
        rootfs,
        root_path: root.map(|r| r.path().clone()),
        resources: linux.resources().clone(),
        seccomp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etc() -> EtcFiles {
        EtcFiles {
            hosts: "/run/x/hosts".into(),
            hostname: "/run/x/hostname".into(),
            resolv_conf: None,
        }
    }

    fn minimal(extra_process: &str, extra: &str) -> Vec<u8> {
        format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},
            "process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}}{extra_process}}},
            "linux":{{"namespaces":[{{"type":"mount"}},{{"type":"pid"}},{{"type":"uts"}},{{"type":"network"}}]}}{extra}}}"#
        )
        .into_bytes()
    }

    fn translate(json: &[u8]) -> Result<ContainerSpec> {
        let spec = parse_spec(json)?;
        translate_container(
            &spec,
            &PodContext {
                sandbox: None,
                sandbox_init_pid: None,
                is_sandbox_container: false,
            },
            &etc(),
            Path::new("/run/x/termination-log"),
        )
    }

    #[test]
    fn minimal_spec_translates() {
        let c = translate(&minimal("", r#","hostname":"box""#)).unwrap();
        assert_eq!(c.process.args, vec!["sh"]);
        assert_eq!(c.hostname.as_deref(), Some("box"));
        assert!(c.namespaces.has_new(Ns::Pid));
        // network is the VM's own
        assert_eq!(c.namespaces.new.len(), 3);
        // agent-provided /etc/hosts and /etc/hostname
        assert!(c
            .rootfs
            .mounts
            .iter()
            .any(|m| m.destination == "/etc/hosts" && m.source == "/run/x/hosts"));
        assert!(c.rootfs.devices.iter().any(|d| d.path == "/dev/null"));
    }

    #[test]
    fn type_errors_name_the_field() {
        let e = translate(&minimal(
            r#","rlimits":[{"type":"RLIMIT_NOFILE","soft":"many","hard":1}]"#,
            "",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("process.rlimits[0].soft"), "{e}");
        let e =
            translate(br#"{"ociVersion":"1","process":{"cwd":"/","user":{"uid":"root","gid":0}}}"#)
                .unwrap_err();
        assert!(e.to_string().contains("process.user.uid"), "{e}");
        let e =
            translate(&minimal(r#","capabilities":{"bounding":["CAP_NOPE"]}"#, "")).unwrap_err();
        assert!(
            e.to_string().contains("process.capabilities.bounding"),
            "{e}"
        );
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"ociVersion":"1","process":{"args":["sh"],"cwd":"rel","user":{"uid":0,"gid":0}},"linux":{"namespaces":[{"type":"mount"}]}}"#, "process.cwd"),
            (br#"{"ociVersion":"1","process":{"args":[],"cwd":"/","user":{"uid":0,"gid":0}},"linux":{"namespaces":[{"type":"mount"}]}}"#, "process.args"),
            (br#"{"ociVersion":"1","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"linux":{"namespaces":[{"type":"pid"}]}}"#, "linux.namespaces"),
            (br#"{"ociVersion":"1","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"linux":{"namespaces":[{"type":"mount"},{"type":"user"}]}}"#, "linux.namespaces[1]"),
            (br#"{"ociVersion":"1","hostname":"h","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"linux":{"namespaces":[{"type":"mount"}]}}"#, "hostname"),
            (br#"{"ociVersion":"1","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"mounts":[{"destination":"/data","type":"bind","source":"/no/such/host/dir","options":["rbind"]}],"linux":{"namespaces":[{"type":"mount"}]}}"#, "mounts[0].source"),
            (br#"{"ociVersion":"1","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0},"rlimits":[{"type":"RLIMIT_NOFILE","soft":10,"hard":5}]},"linux":{"namespaces":[{"type":"mount"}]}}"#, "process.rlimits[0]"),
            (br#"{"ociVersion":"1","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"hooks":{"prestart":[{"path":"/bin/true"}]},"linux":{"namespaces":[{"type":"mount"}]}}"#, "hooks"),
        ];
        for (json, field) in cases {
            let e = translate(json).unwrap_err();
            assert!(matches!(e, Error::Spec { .. }), "{e}");
            assert!(
                e.to_string().contains(&format!("spec field {field}:")),
                "want {field}: {e}"
            );
        }
    }

    #[test]
    fn cri_host_files_are_replaced() {
        let json = br#"{"ociVersion":"1","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},
            "mounts":[{"destination":"/etc/hosts","type":"bind","source":"/var/lib/containerd/x/hosts","options":["rbind","rw"]},
                      {"destination":"/dev/shm","type":"bind","source":"/run/containerd/x/shm","options":["rbind"]}],
            "linux":{"namespaces":[{"type":"mount"}]}}"#;
        let c = translate(json).unwrap();
        let hosts: Vec<_> = c
            .rootfs
            .mounts
            .iter()
            .filter(|m| m.destination == "/etc/hosts")
            .collect();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].source, "/run/x/hosts");
        let shm = c
            .rootfs
            .mounts
            .iter()
            .find(|m| m.destination == "/dev/shm")
            .unwrap();
        assert_eq!(shm.typ, "tmpfs");
        assert_eq!(c.termination_log, None);
    }

    #[test]
    fn a_host_termination_log_becomes_a_guest_file() {
        let json = br#"{"ociVersion":"1","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},
            "mounts":[{"destination":"/dev/termination-log","type":"bind","source":"/var/lib/kubelet/pods/u/containers/c/x","options":["rbind","rw"]}],
            "linux":{"namespaces":[{"type":"mount"}]}}"#;
        let c = translate(json).unwrap();
        let m: Vec<_> = c
            .rootfs
            .mounts
            .iter()
            .filter(|m| m.destination == TERMINATION_LOG)
            .collect();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].source, "/run/x/termination-log");
        assert_eq!(
            c.termination_log.as_deref(),
            Some(Path::new("/run/x/termination-log"))
        );
    }

    #[test]
    fn capability_names_are_known_to_caps() {
        let json = minimal(
            r#","capabilities":{"bounding":["CAP_NET_BIND_SERVICE","CAP_SYS_ADMIN","CAP_AUDIT_WRITE"]}"#,
            "",
        );
        let c = translate(&json).unwrap();
        let caps = c.process.caps.unwrap();
        assert_eq!(
            caps.bounding,
            vec!["CAP_AUDIT_WRITE", "CAP_NET_BIND_SERVICE", "CAP_SYS_ADMIN"]
        );
    }
}
