//! What a private containerd needs to serve CRI the way a Kubernetes node
//! runs it: the runtime configuration from `shim/README.md`, a private CNI
//! configuration, pod cgroups under a parent of the test's own, and the
//! leak checks and clean-up for what CRI creates outside the test's
//! directory (network namespaces in `/run/netns`, cgroups, the bridge).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::binaries::workspace_root;
use crate::cmd;

/// The containerd namespace CRI keeps its pods, containers and images in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// Where Debian's `containernetworking-plugins` puts the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The subnet pods with a network namespace of their own get addresses
/// from. It exists only inside those namespaces: the bridge has no address
/// and no route leads there from the host.
pub const POD_SUBNET: &str = "10.213.0.0/24";
/// Prefix of the addresses in [`POD_SUBNET`].
pub const POD_SUBNET_PREFIX: &str = "10.213.0.";
/// Where CRI pins pod network namespaces.
const NETNS_DIR: &str = "/run/netns";

#[derive(Debug)]
pub struct CriSetup {
    /// `shim/README.md`'s CRI snippet, `ConfigPath` replaced.
    pub snippet: String,
    /// The private CNI configuration directory.
    pub cni_conf_dir: PathBuf,
    /// Parent directory of the pods' log directories.
    pub log_root: PathBuf,
    /// Cgroup parent under which pods get theirs (like kubelet's
    /// `/kubepods`), relative to each cgroup hierarchy's root.
    pub cgroup_parent: String,
    /// The bridge the CNI config attaches pods to.
    pub bridge: String,
    /// CRI's own directory under containerd's root (sandbox files).
    pub cri_root: PathBuf,
    netns_before: BTreeSet<String>,
}

/// The fenced `toml` block of `readme` under the heading naming CRI, which
/// declares the thaw runtime.
pub fn readme_cri_snippet(readme: &str) -> Option<String> {
    let start = readme.find("containerd configuration (CRI)")?;
    let rest = &readme[start..];
    let open = rest.find("```toml\n")? + "```toml\n".len();
    let body = &rest[open..];
    let close = body.find("```")?;
    let snippet = &body[..close];
    (snippet.contains("runtimes.thaw]") && snippet.contains("runtimes.runc]"))
        .then(|| snippet.to_string())
}

impl CriSetup {
    /// Writes the CNI configuration under `dir` and notes what exists
    /// before containerd starts.
    pub fn prepare(dir: &Path, marker: &str, shim_config: &Path) -> CriSetup {
        let readme_path = workspace_root().join("shim/README.md");
        let readme = fs::read_to_string(&readme_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", readme_path.display()));
        let snippet = readme_cri_snippet(&readme).unwrap_or_else(|| {
            panic!(
                "{} has no ```toml block under \"containerd configuration (CRI)\" declaring runtimes.thaw and runtimes.runc",
                readme_path.display()
            )
        });
        let mut replaced = false;
        let snippet = snippet
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("ConfigPath") {
                    replaced = true;
                    let indent = &l[..l.len() - l.trim_start().len()];
                    format!("{indent}ConfigPath = \"{}\"", shim_config.display())
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            replaced,
            "the README's CRI snippet sets no ConfigPath for the thaw runtime"
        );

        let tag = marker.rsplit('=').next().unwrap_or(marker);
        let tag = &tag[..tag.len().min(8)];
        let bridge = format!("thcri{tag}");
        let cni_conf_dir = dir.join("cni/net.d");
        fs::create_dir_all(&cni_conf_dir).unwrap();
        let conf = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "thaw-cri",
            "plugins": [{
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": dir.join("cni/ipam"),
                    "ranges": [[{"subnet": POD_SUBNET}]]
                }
            }]
        });
        fs::write(
            cni_conf_dir.join("10-thaw-cri.conflist"),
            serde_json::to_vec_pretty(&conf).unwrap(),
        )
        .unwrap();
        let log_root = dir.join("pods");
        fs::create_dir_all(&log_root).unwrap();
        CriSetup {
            snippet,
            cni_conf_dir,
            log_root,
            cgroup_parent: format!("/thaw-cri-{tag}"),
            bridge,
            cri_root: dir.join("root/io.containerd.grpc.v1.cri"),
            netns_before: netns_entries(),
        }
    }

    /// The snippet split into its top-level keys and its tables: containerd's
    /// own top-level keys must come before any table.
    pub fn readme_snippet_parts(&self) -> (String, String) {
        let mut top = Vec::new();
        let mut tables = Vec::new();
        let mut in_tables = false;
        for l in self.snippet.lines() {
            in_tables |= l.trim_start().starts_with('[');
            if in_tables {
                tables.push(l);
            } else {
                top.push(l);
            }
        }
        (top.join("\n"), tables.join("\n"))
    }

    /// The CRI settings a node has besides the runtimes: the streaming
    /// server on loopback, CNI from Debian's plugin directory and the
    /// private configuration, and `restrict_oom_score_adj` (as nodes that
    /// run inside a container set it: root here may not lower a process's
    /// `oom_score_adj`, and CRI gives every sandbox -998).
    pub fn own_tables(&self) -> String {
        format!(
            r#"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_tls_streaming = false
  restrict_oom_score_adj = true

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{}"
"#,
            self.cni_conf_dir.display()
        )
    }

    /// The directory of CRI's files for sandbox `id` (hostname, hosts,
    /// resolv.conf, shm).
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.cri_root.join("sandboxes").join(id)
    }

    /// The cgroup parent for a pod, as kubelet's cgroupfs driver names it.
    pub fn pod_cgroup(&self, pod_uid: &str) -> String {
        format!("{}/pod{pod_uid}", self.cgroup_parent)
    }

    /// Every process in the pod's cgroup or below it, in any hierarchy:
    /// (pid, command line), what kubelet's accounting covers.
    pub fn pod_processes(&self, pod_uid: &str) -> Vec<(u32, String)> {
        let rel = self.pod_cgroup(pod_uid);
        let rel = rel.trim_start_matches('/');
        let mut out = std::collections::BTreeMap::new();
        for m in cgroup_mounts() {
            let mut stack = vec![m.join(rel)];
            while let Some(d) = stack.pop() {
                let Ok(rd) = fs::read_dir(&d) else { continue };
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
                let procs = fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                    let cmd = fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                        .unwrap_or_default();
                    out.insert(pid, cmd);
                }
            }
        }
        out.into_iter().collect()
    }

    /// Network namespaces, container cgroups and bridge ports left behind.
    pub fn leaks(&self) -> Vec<String> {
        let mut out = Vec::new();
        for n in netns_entries().difference(&self.netns_before) {
            out.push(format!("network namespace: {NETNS_DIR}/{n}"));
        }
        for (d, depth) in self.cgroup_dirs() {
            // <parent>/pod<uid> is the pod's own (kubelet's to remove);
            // anything deeper belongs to a sandbox or container.
            if depth >= 2 {
                out.push(format!("cgroup: {}", d.display()));
            }
        }
        if let Ok(rd) = fs::read_dir(format!("/sys/class/net/{}/brif", self.bridge)) {
            for e in rd.flatten() {
                out.push(format!(
                    "bridge port: {} on {}",
                    e.file_name().to_string_lossy(),
                    self.bridge
                ));
            }
        }
        out
    }

    /// Removes what CRI made outside the test's directory: network
    /// namespaces it pinned, the cgroup tree under the test's parent, and
    /// the bridge (CNI's bridge plugin never removes it).
    pub fn clean_up(&self) {
        for n in netns_entries().difference(&self.netns_before) {
            let p = Path::new(NETNS_DIR).join(n);
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
            let _ = fs::remove_file(&p);
        }
        let mut dirs = self.cgroup_dirs();
        dirs.sort_by_key(|(_, depth)| std::cmp::Reverse(*depth));
        for (d, _) in dirs {
            let _ = fs::remove_dir(&d);
        }
        if Path::new("/sys/class/net").join(&self.bridge).exists() {
            let _ = cmd::run(
                Command::new("ip").args(["link", "del", &self.bridge]),
                Duration::from_secs(10),
            );
        }
    }

    /// Every directory under the test's cgroup parent, in every hierarchy,
    /// with its depth below the parent (the parent itself is 0).
    fn cgroup_dirs(&self) -> Vec<(PathBuf, usize)> {
        let mut v = Vec::new();
        let rel = self.cgroup_parent.trim_start_matches('/');
        for m in cgroup_mounts() {
            let mut stack = vec![(m.join(rel), 0)];
            while let Some((d, depth)) = stack.pop() {
                if !d.is_dir() {
                    continue;
                }
                if let Ok(rd) = fs::read_dir(&d) {
                    for e in rd.flatten() {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            stack.push((e.path(), depth + 1));
                        }
                    }
                }
                v.push((d, depth));
            }
        }
        v
    }
}

/// Mount points of cgroup (v1 and v2) hierarchies.
fn cgroup_mounts() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split(' ').next()?;
            let mountpoint = pre.split(' ').nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(mountpoint))
        })
        .collect()
}

/// The host's network interfaces by name.
pub fn host_links() -> BTreeSet<String> {
    fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// CRI's pinned network namespaces (`cni-<uuid>`) now present.
fn netns_entries() -> BTreeSet<String> {
    fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("cni-"))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_has_the_cri_snippet() {
        let readme = fs::read_to_string(workspace_root().join("shim/README.md")).unwrap();
        let s = readme_cri_snippet(&readme).expect("snippet");
        assert!(
            s.contains("runtime_type = \"io.containerd.thaw.v2\""),
            "{s}"
        );
    }
}
