//! Reading and checking the bundle's OCI spec, the CRI pod annotations,
//! and what a VM guest can and cannot honour of it.
//!
//! The spec is kept as JSON and handed to the agent as is (minus what the
//! VM cannot provide), so fields the shim does not inspect pass through.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// Where a container stands in a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRole {
    /// A plain `ctr`/`nerdctl` container: its own VM.
    Standalone,
    /// A CRI pod's sandbox (pause) container: creates the pod's VM.
    Sandbox { sandbox_id: String },
    /// A CRI pod's app container: joins the pod's VM.
    Member { sandbox_id: String },
}

impl PodRole {
    /// The id that selects the shim (and VM) for this container.
    pub fn grouping<'a>(&'a self, id: &'a str) -> &'a str {
        match self {
            PodRole::Standalone => id,
            PodRole::Sandbox { sandbox_id } | PodRole::Member { sandbox_id } => sandbox_id,
        }
    }

    /// The agent's sandbox id ("" = none).
    pub fn agent_sandbox_id(&self) -> &str {
        match self {
            PodRole::Standalone => "",
            PodRole::Sandbox { sandbox_id } | PodRole::Member { sandbox_id } => sandbox_id,
        }
    }
}

pub fn pod_role(annotations: &HashMap<String, String>, id: &str) -> PodRole {
    let kind = annotations.get(CRI_CONTAINER_TYPE).map(String::as_str);
    let sandbox = annotations
        .get(CRI_SANDBOX_ID)
        .filter(|s| !s.is_empty())
        .cloned();
    match (kind, sandbox) {
        (Some("sandbox"), s) => PodRole::Sandbox {
            sandbox_id: s.unwrap_or_else(|| id.to_string()),
        },
        (Some("container"), Some(s)) => PodRole::Member { sandbox_id: s },
        _ => PodRole::Standalone,
    }
}

/// The parts of `config.json` the shim needs, and the JSON itself.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    pub json: Value,
    pub annotations: HashMap<String, String>,
    pub root_path: Option<String>,
    pub hostname: String,
}

/// Only the annotations of `<bundle>/config.json`, leniently: `start`
/// needs them to find the pod, and leaves reporting a bad spec to
/// `create`, whose errors reach the user more plainly.
pub fn annotations(bundle: &Path) -> HashMap<String, String> {
    let Ok(text) = std::fs::read(bundle.join("config.json")) else {
        return HashMap::new();
    };
    let Ok(v) = serde_json::from_slice::<Value>(&text) else {
        return HashMap::new();
    };
    v.get("annotations")
        .and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads `<bundle>/config.json`.
pub fn load(bundle: &Path) -> Result<BundleSpec> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path)
        .map_err(|e| Error::InvalidSpec(format!("reading {}: {e}", path.display())))?;
    parse(&text)
}

pub fn parse(text: &[u8]) -> Result<BundleSpec> {
    let json: Value = serde_json::from_slice(text)
        .map_err(|e| Error::InvalidSpec(format!("config.json is not valid JSON: {e}")))?;
    if !json.is_object() {
        return Err(Error::InvalidSpec(
            "config.json is not a JSON object".into(),
        ));
    }
    let mut annotations = HashMap::new();
    if let Some(a) = json.get("annotations") {
        let obj = a
            .as_object()
            .ok_or_else(|| Error::InvalidSpec("annotations must be an object".into()))?;
        for (k, v) in obj {
            let v = v
                .as_str()
                .ok_or_else(|| Error::InvalidSpec(format!("annotation {k} must be a string")))?;
            annotations.insert(k.clone(), v.to_string());
        }
    }
    let process = json
        .get("process")
        .ok_or_else(|| Error::InvalidSpec("process is missing".into()))?;
    check_process(process, "process")?;
    let root_path = json
        .get("root")
        .and_then(|r| r.get("path"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let hostname = json
        .get("hostname")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    Ok(BundleSpec {
        json,
        annotations,
        root_path,
        hostname,
    })
}

/// Checks an OCI `process` object; `field` prefixes messages.
pub fn check_process(p: &Value, field: &str) -> Result<()> {
    let args = p
        .get("args")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::InvalidSpec(format!("{field}.args is missing")))?;
    if args.is_empty() {
        return Err(Error::InvalidSpec(format!(
            "{field}.args is empty: no program to run"
        )));
    }
    if args.iter().any(|a| !a.is_string()) {
        return Err(Error::InvalidSpec(format!("{field}.args must be strings")));
    }
    match p.get("cwd").and_then(Value::as_str) {
        Some(c) if c.starts_with('/') => {}
        Some(c) => {
            return Err(Error::InvalidSpec(format!(
                "{field}.cwd {c:?} is not an absolute path"
            )))
        }
        None => return Err(Error::InvalidSpec(format!("{field}.cwd is missing"))),
    }
    if let Some(env) = p.get("env") {
        let ok = env
            .as_array()
            .map(|a| a.iter().all(Value::is_string))
            .unwrap_or(false);
        if !ok {
            return Err(Error::InvalidSpec(format!(
                "{field}.env must be a list of strings"
            )));
        }
    }
    Ok(())
}

/// Host files CRI binds into containers that the agent provides itself
/// inside a VM: per-pod /etc files, whose contents the shim hands over with
/// the pod (see [`pod_etc_files`]).
const GUEST_PROVIDED: &[&str] = &["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"];

/// Where CRI binds the file kubelet reads a container's last words from.
const TERMINATION_LOG: &str = "/dev/termination-log";

/// Host binds the agent replaces with a guest equivalent of its own: CRI's
/// per-pod /dev/shm becomes the pod's guest tmpfs, the termination log a
/// guest file whose content comes back with the exit (see
/// [`termination_log_from_binds`]). Passed through, so the agent sees that
/// the spec asks for them.
const GUEST_REMAPPED: &[&str] = &["/dev/shm", TERMINATION_LOG];

/// The host file a spec binds at /dev/termination-log: in a VM the shim
/// writes the container's message there before it reports the exit.
pub fn termination_log_from_binds(spec: &Value) -> Option<PathBuf> {
    spec.get("mounts")?
        .as_array()?
        .iter()
        .filter(|m| is_bind(m))
        .find(|m| m.get("destination").and_then(Value::as_str) == Some(TERMINATION_LOG))
        .and_then(|m| m.get("source").and_then(Value::as_str))
        .map(PathBuf::from)
}

/// The largest /etc file taken from the host into the guest.
const MAX_ETC_FILE: u64 = 64 * 1024;

/// The /etc files a spec binds from the host (CRI writes a pod's
/// /etc/hosts, /etc/hostname and /etc/resolv.conf and binds them into every
/// container), read for the guest: `(name, content)` with name `hosts`,
/// `hostname` or `resolv.conf`. The binds themselves cannot cross into the
/// VM; the agent serves these contents at the same places.
pub fn etc_files_from_binds(spec: &Value) -> Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    let Some(mounts) = spec.get("mounts").and_then(Value::as_array) else {
        return Ok(files);
    };
    for m in mounts.iter().filter(|m| is_bind(m)) {
        let dst = m.get("destination").and_then(Value::as_str).unwrap_or("");
        let Some(name) = dst.strip_prefix("/etc/") else {
            continue;
        };
        if !matches!(name, "hosts" | "hostname" | "resolv.conf") {
            continue;
        }
        let src = m.get("source").and_then(Value::as_str).unwrap_or("");
        files.push((name.to_string(), read_small_text(Path::new(src), dst)?));
    }
    Ok(files)
}

/// A pod's /etc/hosts, /etc/resolv.conf and hostname for the guest to serve
/// to its containers, from the sandbox spec (its binds, its hostname).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodEtcFiles {
    pub hosts: String,
    pub resolv_conf: String,
    pub hostname: String,
}

pub fn pod_etc_files(spec: &BundleSpec) -> Result<PodEtcFiles> {
    let mut files = PodEtcFiles {
        hostname: spec.hostname.clone(),
        ..Default::default()
    };
    let mut bound_hostname = String::new();
    for (name, content) in etc_files_from_binds(&spec.json)? {
        match name.as_str() {
            "hosts" => files.hosts = content,
            "resolv.conf" => files.resolv_conf = content,
            _ => bound_hostname = content.lines().next().unwrap_or("").trim().to_string(),
        }
    }
    if files.hostname.is_empty() {
        files.hostname = bound_hostname;
    }
    // CRI leaves a hostNetwork pod's spec hostname empty and writes the
    // node's hostname into its /etc/hostname: the same, from here.
    if files.hostname.is_empty() && !has_namespace(&spec.json, "network") {
        files.hostname = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
    }
    Ok(files)
}

/// The pod's own limits from CRI's sandbox annotations, as an OCI
/// linux.resources object (JSON) for the guest's pod cgroup; empty when
/// the pod has none. A value that is not a number is refused, naming it.
pub fn pod_resources_json(annotations: &HashMap<String, String>) -> Result<Vec<u8>> {
    use thaw_config::{
        pod_number, SANDBOX_CPU_PERIOD, SANDBOX_CPU_QUOTA, SANDBOX_CPU_SHARES, SANDBOX_MEMORY,
    };
    let (memory, quota, period, shares) = (
        pod_number(annotations, SANDBOX_MEMORY)?,
        pod_number(annotations, SANDBOX_CPU_QUOTA)?,
        pod_number(annotations, SANDBOX_CPU_PERIOD)?,
        pod_number(annotations, SANDBOX_CPU_SHARES)?,
    );
    let mut res = serde_json::Map::new();
    if memory > 0 {
        res.insert("memory".into(), serde_json::json!({"limit": memory}));
    }
    let mut cpu = serde_json::Map::new();
    if quota > 0 && period > 0 {
        cpu.insert("quota".into(), quota.into());
        cpu.insert("period".into(), period.into());
    }
    if shares > 0 {
        cpu.insert("shares".into(), shares.into());
    }
    if !cpu.is_empty() {
        res.insert("cpu".into(), cpu.into());
    }
    if res.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::to_vec(&res).map_err(|e| Error::InvalidSpec(format!("encoding pod resources: {e}")))
}

/// The network namespace a spec joins by path: for a pod with its own
/// network, the one CRI made and CNI configured.
pub fn network_namespace_path(spec: &Value) -> Option<String> {
    spec.get("linux")?
        .get("namespaces")?
        .as_array()?
        .iter()
        .find(|n| n.get("type").and_then(Value::as_str) == Some("network"))?
        .get("path")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
}

pub fn has_namespace(spec: &Value, kind: &str) -> bool {
    spec.get("linux")
        .and_then(|l| l.get("namespaces"))
        .and_then(Value::as_array)
        .is_some_and(|list| {
            list.iter()
                .any(|n| n.get("type").and_then(Value::as_str) == Some(kind))
        })
}

fn read_small_text(path: &Path, dst: &str) -> Result<String> {
    use std::io::Read;
    let bad =
        |why: String| Error::InvalidSpec(format!("bind mount {} -> {dst}: {why}", path.display()));
    let f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let meta = f.metadata().map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let mut text = String::new();
    f.take(MAX_ETC_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    if text.len() as u64 > MAX_ETC_FILE {
        return Err(bad(format!("larger than {MAX_ETC_FILE} bytes")));
    }
    Ok(text)
}

/// A host path a container's spec binds, which a VM must share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// Its index in `mounts`.
    pub index: usize,
    pub source: PathBuf,
    pub read_only: bool,
}

/// The spec's binds of host paths that only a share can bring into the VM
/// (not the files the guest provides or replaces itself).
pub fn host_binds(spec: &Value) -> Vec<HostBind> {
    let Some(mounts) = spec.get("mounts").and_then(Value::as_array) else {
        return Vec::new();
    };
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| is_bind(m))
        .filter_map(|(index, m)| {
            let dst = m.get("destination").and_then(Value::as_str).unwrap_or("");
            if GUEST_PROVIDED.contains(&dst) || GUEST_REMAPPED.contains(&dst) {
                return None;
            }
            let source = PathBuf::from(m.get("source").and_then(Value::as_str).unwrap_or(""));
            let read_only = m
                .get("options")
                .and_then(Value::as_array)
                .is_some_and(|o| o.iter().any(|o| o.as_str() == Some("ro")));
            Some(HostBind {
                index,
                source,
                read_only,
            })
        })
        .collect()
}

/// `spec` with each bind's source replaced as `rewritten` says (index in
/// `mounts`, new source).
pub fn with_bind_sources(spec: &Value, rewritten: &[(usize, String)]) -> Value {
    let mut spec = spec.clone();
    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        for (index, source) in rewritten {
            if let Some(m) = mounts.get_mut(*index) {
                m["source"] = Value::String(source.clone());
            }
        }
    }
    spec
}

fn is_bind(m: &Value) -> bool {
    let t = m.get("type").and_then(Value::as_str).unwrap_or("");
    let opts = m
        .get("options")
        .and_then(Value::as_array)
        .map(|o| {
            o.iter()
                .filter_map(Value::as_str)
                .any(|o| o == "bind" || o == "rbind")
        })
        .unwrap_or(false);
    t == "bind" || t == "rbind" || opts
}

/// A spec without a PID or IPC namespace asks for the host's (CRI's
/// hostPID and hostIPC). In a VM the nearest thing is the guest's own,
/// where the agent runs: that would hand the container the agent's
/// processes, so it is refused, naming the field.
fn refuse_host_namespaces(spec: &Value) -> Result<()> {
    let listed = spec
        .get("linux")
        .and_then(|l| l.get("namespaces"))
        .is_some_and(Value::is_array);
    if !listed {
        // No linux.namespaces at all: the agent gives the defaults.
        return Ok(());
    }
    for (t, what) in [("pid", "hostPID"), ("ipc", "hostIPC")] {
        if !has_namespace(spec, t) {
            return Err(Error::InvalidSpec(format!(
                "linux.namespaces has no {t} namespace, which asks for the host's ({what}): \
                 a container in a thaw VM cannot share the host's {t} namespace"
            )));
        }
    }
    Ok(())
}

/// The spec as a VM guest gets it: host bind mounts cannot cross into the
/// VM (no shared filesystem), so the guest-provided ones are dropped and
/// any other is refused with a clear message.
pub fn for_vm(spec: &Value) -> Result<Value> {
    refuse_host_namespaces(spec)?;
    let mut spec = spec.clone();
    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        let mut kept = Vec::new();
        for m in mounts.drain(..) {
            if !is_bind(&m) {
                kept.push(m);
                continue;
            }
            let dst = m.get("destination").and_then(Value::as_str).unwrap_or("");
            if GUEST_PROVIDED.contains(&dst) {
                log::debug!("dropping host bind mount for {dst}: provided in the guest");
                continue;
            }
            if GUEST_REMAPPED.contains(&dst) {
                kept.push(m);
                continue;
            }
            let src = m.get("source").and_then(Value::as_str).unwrap_or("");
            // Host binds arrive here rewritten to the guest's view of the
            // sandbox's share or to a guest tmpfs for a memory-backed
            // emptyDir (`Sandbox::expose_host_mounts`).
            if Path::new(src).starts_with(thaw_agent_protocol::SHARE_DIR)
                || Path::new(src).starts_with(thaw_agent_protocol::EPHEMERAL_DIR)
            {
                kept.push(m);
                continue;
            }
            return Err(Error::InvalidSpec(format!(
                "bind mount {src} -> {dst}: the host directory was not shared into the VM"
            )));
        }
        *mounts = kept;
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(process: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "ociVersion": "1.0.2",
            "process": process,
            "root": {"path": "rootfs"},
            "hostname": "h",
            "annotations": {"io.kubernetes.cri.container-type": "container",
                            "io.kubernetes.cri.sandbox-id": "sb1"}
        }))
        .unwrap()
    }

    #[test]
    fn valid_spec_parses() {
        let s = parse(&spec(json!({"args": ["sh"], "cwd": "/"}))).unwrap();
        assert_eq!(s.root_path.as_deref(), Some("rootfs"));
        assert_eq!(s.hostname, "h");
        assert_eq!(
            pod_role(&s.annotations, "c1"),
            PodRole::Member {
                sandbox_id: "sb1".into()
            }
        );
    }

    #[test]
    fn invalid_specs_say_what_is_wrong() {
        let e = parse(&spec(json!({"args": [], "cwd": "/"})))
            .unwrap_err()
            .to_string();
        assert!(e.contains("process.args is empty"), "{e}");
        let e = parse(&spec(json!({"args": ["sh"], "cwd": "tmp"})))
            .unwrap_err()
            .to_string();
        assert!(e.contains("process.cwd"), "{e}");
        let e = parse(b"{not json").unwrap_err().to_string();
        assert!(e.contains("not valid JSON"), "{e}");
        let e = parse(br#"{"root":{"path":"r"}}"#).unwrap_err().to_string();
        assert!(e.contains("process is missing"), "{e}");
    }

    #[test]
    fn pod_roles() {
        let mut a = HashMap::new();
        assert_eq!(pod_role(&a, "x"), PodRole::Standalone);
        a.insert(CRI_CONTAINER_TYPE.into(), "sandbox".into());
        a.insert(CRI_SANDBOX_ID.into(), "x".into());
        let r = pod_role(&a, "x");
        assert_eq!(r.grouping("x"), "x");
        a.insert(CRI_CONTAINER_TYPE.into(), "container".into());
        let r = pod_role(&a, "app");
        assert_eq!(r.grouping("app"), "x");
        assert_eq!(r.agent_sandbox_id(), "x");
    }

    #[test]
    fn vm_spec_drops_guest_files_and_refuses_other_binds() {
        let s = json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind"]},
        ]});
        let v = for_vm(&s).unwrap();
        assert_eq!(v["mounts"].as_array().unwrap().len(), 1);
        let s = json!({"mounts": [
            {"destination": "/data", "type": "none", "source": "/srv/data", "options": ["rbind", "rw"]},
        ]});
        let e = for_vm(&s).unwrap_err().to_string();
        assert!(e.contains("/srv/data") && e.contains("/data"), "{e}");
        // CRI's /dev/shm bind goes to the agent, which gives the pod's tmpfs.
        let s = json!({"mounts": [
            {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/x/shm", "options": ["rbind", "ro"]},
        ]});
        assert_eq!(for_vm(&s).unwrap()["mounts"], s["mounts"]);
        // So does the termination log; the shim keeps its host path.
        let s = json!({"mounts": [
            {"destination": "/dev/termination-log", "type": "bind", "source": "/var/lib/kubelet/pods/u/containers/c/1", "options": ["rbind", "rw"]},
        ]});
        assert_eq!(for_vm(&s).unwrap()["mounts"], s["mounts"]);
        assert_eq!(
            termination_log_from_binds(&s),
            Some(PathBuf::from("/var/lib/kubelet/pods/u/containers/c/1"))
        );
        assert_eq!(termination_log_from_binds(&json!({"mounts": []})), None);
    }

    #[test]
    fn host_binds_are_found_and_rewritten_to_the_share() {
        let s = json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind"]},
            {"destination": "/data", "type": "none", "source": "/srv/data", "options": ["rbind", "rw"]},
            {"destination": "/cfg", "type": "bind", "source": "/srv/cfg", "options": ["rbind", "ro"]},
        ]});
        let binds = host_binds(&s);
        assert_eq!(
            binds,
            vec![
                HostBind {
                    index: 2,
                    source: "/srv/data".into(),
                    read_only: false
                },
                HostBind {
                    index: 3,
                    source: "/srv/cfg".into(),
                    read_only: true
                },
            ]
        );
        let shared = with_bind_sources(
            &s,
            &[
                (2, format!("{}/c1/2", thaw_agent_protocol::SHARE_DIR)),
                (3, format!("{}/c1/3", thaw_agent_protocol::SHARE_DIR)),
            ],
        );
        let v = for_vm(&shared).unwrap();
        let m = v["mounts"].as_array().unwrap();
        assert_eq!(m.len(), 3, "{v}");
        assert_eq!(
            m[1]["source"],
            format!("{}/c1/2", thaw_agent_protocol::SHARE_DIR)
        );
        assert_eq!(m[2]["options"], json!(["rbind", "ro"]));
        // Not rewritten: refused, naming both paths.
        let e = for_vm(&s).unwrap_err().to_string();
        assert!(e.contains("/srv/data") && e.contains("not shared"), "{e}");
    }

    #[test]
    fn pod_resources_come_from_the_sandbox_annotations() {
        let a = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        assert!(pod_resources_json(&a(&[])).unwrap().is_empty());
        let json = pod_resources_json(&a(&[
            ("io.kubernetes.cri.sandbox-memory", "67108864"),
            ("io.kubernetes.cri.sandbox-cpu-quota", "150000"),
            ("io.kubernetes.cri.sandbox-cpu-period", "100000"),
            ("io.kubernetes.cri.sandbox-cpu-shares", "512"),
        ]))
        .unwrap();
        let v: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            v,
            json!({"memory": {"limit": 67108864}, "cpu": {"quota": 150000, "period": 100000, "shares": 512}})
        );
        let e = pod_resources_json(&a(&[("io.kubernetes.cri.sandbox-memory", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sandbox-memory"), "{e}");
    }

    #[test]
    fn a_cni_network_namespace_is_found_by_its_path() {
        let spec = json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}});
        assert_eq!(
            network_namespace_path(&spec).as_deref(),
            Some("/var/run/netns/cni-1")
        );
        let own = json!({"linux": {"namespaces": [{"type": "network"}]}});
        assert_eq!(network_namespace_path(&own), None);
        assert_eq!(network_namespace_path(&json!({})), None);
    }

    #[test]
    fn host_pid_and_ipc_namespaces_are_refused() {
        let ns = |types: &[&str]| json!({"linux": {"namespaces": types.iter().map(|t| json!({"type": t})).collect::<Vec<_>>()}});
        assert!(for_vm(&ns(&["pid", "ipc", "uts", "mount"])).is_ok());
        // hostNetwork is fine: the container gets the VM's network.
        assert!(for_vm(&ns(&["pid", "ipc", "mount"])).is_ok());
        let e = for_vm(&ns(&["ipc", "uts", "mount"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hostPID") && e.contains("linux.namespaces"),
            "{e}"
        );
        let e = for_vm(&ns(&["pid", "mount"])).unwrap_err().to_string();
        assert!(e.contains("hostIPC"), "{e}");
        // A shared pod namespace (a path) is still a namespace entry.
        let shared = json!({"linux": {"namespaces": [
            {"type": "pid", "path": "/proc/42/ns/pid"}, {"type": "ipc", "path": "/proc/42/ns/ipc"}]}});
        assert!(for_vm(&shared).is_ok());
    }

    #[test]
    fn etc_files_come_from_the_binds_cri_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        let resolv = dir.path().join("resolv.conf");
        let hostname = dir.path().join("hostname");
        std::fs::write(&hosts, "10.0.0.5\tpod-a\n").unwrap();
        std::fs::write(
            &resolv,
            "nameserver 10.96.0.10\nsearch ns.svc.cluster.local\n",
        )
        .unwrap();
        std::fs::write(&hostname, "node-7\n").unwrap();
        let json = json!({"mounts": [
            {"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "rw"]},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": resolv, "options": ["rbind", "ro"]},
            {"destination": "/etc/hostname", "type": "bind", "source": hostname, "options": ["rbind", "rw"]},
            {"destination": "/etc/other", "type": "bind", "source": hosts, "options": ["rbind"]},
            {"destination": "/proc", "type": "proc", "source": "proc"},
        ], "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]}});
        let files = etc_files_from_binds(&json).unwrap();
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["hosts", "resolv.conf", "hostname"]);
        let spec = |json: Value, hostname: &str| BundleSpec {
            json,
            annotations: HashMap::new(),
            root_path: None,
            hostname: hostname.into(),
        };
        let f = pod_etc_files(&spec(json.clone(), "")).unwrap();
        assert_eq!(f.hosts, "10.0.0.5\tpod-a\n");
        assert!(f.resolv_conf.contains("nameserver 10.96.0.10"));
        assert_eq!(
            f.hostname, "node-7",
            "from the bound file when the spec has none"
        );
        assert_eq!(
            pod_etc_files(&spec(json.clone(), "pod-a"))
                .unwrap()
                .hostname,
            "pod-a"
        );
        // hostNetwork (no network namespace), nothing bound: the node's name.
        let host_net = json!({"linux": {"namespaces": [{"type": "pid"}]}});
        let node = nix::unistd::gethostname()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert_eq!(pod_etc_files(&spec(host_net, "")).unwrap().hostname, node);

        std::fs::write(&hosts, vec![b'x'; 70 * 1024]).unwrap();
        let e = etc_files_from_binds(&json).unwrap_err().to_string();
        assert!(e.contains("/etc/hosts") && e.contains("larger than"), "{e}");
        let missing = json!({"mounts": [
            {"destination": "/etc/resolv.conf", "type": "bind", "source": "/nonexistent/resolv", "options": ["rbind"]},
        ]});
        let e = etc_files_from_binds(&missing).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/resolv"), "{e}");
    }
}
