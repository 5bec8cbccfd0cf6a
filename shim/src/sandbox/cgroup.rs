//! The pod's host cgroup, where the VMM runs: the sandbox spec's
//! `linux.cgroupsPath`, as runc would use it for the pause container. The
//! pod cgroup kubelet made (and limits) is its parent, so kubelet's
//! accounting and limits cover the whole VM: guest memory, vCPU threads and
//! the VMM's own.
//!
//! Both cgroupsPath forms kubelet's drivers produce are understood:
//! cgroupfs (`/kubepods/burstable/pod<uid>/<id>`) and systemd
//! (`kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`, the unit's
//! directory under its slices). On a cgroup v1 (or hybrid) host the VMM
//! joins the path in every mounted hierarchy, as runc's cgroupfs driver
//! does. The directories are made by the shim directly, without asking
//! systemd, and removed once the VMM has exited.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// A cgroupsPath resolved against this host's cgroup mounts: one directory
/// per hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    /// The path below each hierarchy's root (no leading slash).
    pub relative: PathBuf,
    /// `<mount>/<relative>` for every hierarchy, cgroup v2 first.
    pub dirs: Vec<PathBuf>,
    /// Which of `dirs` are cpuset hierarchies (v1), whose new directories
    /// need cpus and mems before a process may join.
    cpuset: Vec<bool>,
}

/// The path below a hierarchy root that `cgroups_path` names.
pub fn relative_path(cgroups_path: &str) -> Result<PathBuf> {
    let bad = |why: &str| Error::InvalidSpec(format!("linux.cgroupsPath {cgroups_path:?}: {why}"));
    let rel = if let Some(abs) = cgroups_path.strip_prefix('/') {
        PathBuf::from(abs)
    } else {
        let parts: Vec<&str> = cgroups_path.split(':').collect();
        let [slice, prefix, name] = parts[..] else {
            return Err(bad(
                "neither an absolute path (cgroupfs) nor slice:prefix:name (systemd)",
            ));
        };
        let mut p = expand_slice(if slice.is_empty() { "-.slice" } else { slice })
            .ok_or_else(|| bad("not a systemd slice name"))?;
        let unit = if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        };
        if name.is_empty() || name.contains('/') {
            return Err(bad("the unit name is empty or has a '/'"));
        }
        p.push(unit);
        p
    };
    if rel.as_os_str().is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(bad("must name a cgroup below the root, without '..'"));
    }
    Ok(rel)
}

/// `a-b-c.slice` -> `a.slice/a-b.slice/a-b-c.slice` (systemd's nesting of
/// slices by dashes); `-.slice` is the root.
fn expand_slice(slice: &str) -> Option<PathBuf> {
    let base = slice.strip_suffix(".slice")?;
    let mut out = PathBuf::new();
    if base == "-" {
        return Some(out);
    }
    if base.is_empty()
        || base.starts_with('-')
        || base.ends_with('-')
        || base.contains("--")
        || base.contains('/')
    {
        return None;
    }
    let mut prefix = String::new();
    for part in base.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        out.push(format!("{prefix}.slice"));
    }
    Some(out)
}

/// The cgroup hierarchies mounted here: (mount point, is cpuset), cgroup v2
/// first. From /proc/self/mountinfo; a v1 hierarchy mounted twice counts
/// once.
fn hierarchies() -> Vec<(PathBuf, bool)> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let (mut v2, mut v1) = (Vec::new(), Vec::new());
    let mut seen = std::collections::HashSet::new();
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mut post = post.split(' ');
        let (Some(fstype), _, Some(opts)) = (post.next(), post.next(), post.next()) else {
            continue;
        };
        let Some(mount) = pre.split(' ').nth(4) else {
            continue;
        };
        match fstype {
            "cgroup2" => v2.push((PathBuf::from(mount), false)),
            "cgroup" if seen.insert(opts.to_string()) => {
                let cpuset = opts.split(',').any(|o| o == "cpuset");
                v1.push((PathBuf::from(mount), cpuset));
            }
            _ => {}
        }
    }
    v2.truncate(1);
    v2.extend(v1);
    v2
}

impl PodCgroup {
    /// The cgroup a sandbox spec names, resolved on this host; None when
    /// the spec names none or no cgroup hierarchy is mounted.
    pub fn from_spec(spec: &Value) -> Result<Option<PodCgroup>> {
        let Some(path) = spec
            .get("linux")
            .and_then(|l| l.get("cgroupsPath"))
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
        else {
            return Ok(None);
        };
        let relative = relative_path(path)?;
        let found = hierarchies();
        if found.is_empty() {
            log::warn!("no cgroup hierarchy is mounted: the VMM stays out of {path}");
            return Ok(None);
        }
        Ok(Some(PodCgroup {
            dirs: found.iter().map(|(m, _)| m.join(&relative)).collect(),
            cpuset: found.iter().map(|(_, c)| *c).collect(),
            relative,
        }))
    }

    /// Makes the directories (and missing parents, as runc does).
    pub fn create(&self) -> Result<()> {
        for (dir, cpuset) in self.dirs.iter().zip(&self.cpuset) {
            if *cpuset {
                create_cpuset(dir)?;
            } else {
                fs::create_dir_all(dir).map_err(|e| {
                    Error::Sandbox(format!("creating the pod cgroup {}: {e}", dir.display()))
                })?;
            }
        }
        Ok(())
    }

    /// `cgroup.procs` of each directory, ready for [`join`] between fork
    /// and exec.
    pub fn procs_files(&self) -> Vec<CString> {
        self.dirs
            .iter()
            .filter_map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).ok())
            .collect()
    }

    /// Removes the directories (their parents are kubelet's). Retries
    /// briefly: a cgroup stays busy for a moment after its last process
    /// exited.
    pub fn remove(&self) {
        remove_dirs(&self.dirs);
    }
}

/// The first of these directories in which an OOM killer ended a
/// process: a nonzero `oom_kill` count in cgroup v2's `memory.events`, or
/// in v1's `memory.oom_control`.
pub fn oom_killed_in(dirs: &[PathBuf]) -> Option<&Path> {
    dirs.iter().map(PathBuf::as_path).find(|d| {
        ["memory.events", "memory.oom_control"].iter().any(|f| {
            fs::read_to_string(d.join(f)).is_ok_and(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .is_some_and(|n| n > 0)
            })
        })
    })
}

/// rmdir of each directory, retrying for up to a second while busy.
pub fn remove_dirs(dirs: &[PathBuf]) {
    for dir in dirs {
        for attempt in 0..50 {
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if attempt == 49 => {
                    log::warn!("removing the pod cgroup {}: {e}", dir.display())
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }
}

/// A v1 cpuset directory with every new level given its parent's cpus and
/// mems (an empty cpuset admits no process).
fn create_cpuset(dir: &Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut p = dir;
    while !p.exists() {
        missing.push(p.to_path_buf());
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    for d in missing.iter().rev() {
        fs::create_dir(d)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| Error::Sandbox(format!("creating the pod cgroup {}: {e}", d.display())))?;
        for f in ["cpuset.cpus", "cpuset.mems"] {
            let parent = d.parent().map(|p| p.join(f));
            if let Some(v) = parent.and_then(|p| fs::read_to_string(p).ok()) {
                let _ = fs::write(d.join(f), v.trim());
            }
        }
    }
    Ok(())
}

/// Moves the calling process into each cgroup: for a child between fork
/// and exec, so only async-signal-safe calls.
pub fn join(procs: &[CString]) -> std::io::Result<()> {
    for f in procs {
        // SAFETY: open/write/close on a NUL-terminated path prepared before
        // the fork, with a constant buffer.
        unsafe {
            let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let r = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if r != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_read_from_memory_events_or_oom_control() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, none) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
        for dir in [&a, &b, &none] {
            fs::create_dir(dir).unwrap();
        }
        fs::write(
            a.join("memory.events"),
            "low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\n",
        )
        .unwrap();
        fs::write(b.join("memory.events"), "oom_kill 2\noom_group_kill 0\n").unwrap();
        // cgroup v1
        fs::write(
            none.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        )
        .unwrap();
        assert_eq!(
            oom_killed_in(&[none.clone(), b.clone(), a]),
            Some(b.as_path())
        );
        assert_eq!(oom_killed_in(&[none]), None);
    }

    #[test]
    fn cgroupfs_paths_are_below_the_root() {
        assert_eq!(
            relative_path("/kubepods/burstable/podabc/123").unwrap(),
            PathBuf::from("kubepods/burstable/podabc/123")
        );
        for bad in ["/", "/a/../b", "relative/path", "a:b"] {
            let e = relative_path(bad).unwrap_err().to_string();
            assert!(e.contains("linux.cgroupsPath"), "{bad}: {e}");
        }
    }

    #[test]
    fn systemd_paths_become_the_units_directory() {
        assert_eq!(
            relative_path("kubepods-burstable-pod12.slice:cri-containerd:abc").unwrap(),
            PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            relative_path(":cri-containerd:abc").unwrap(),
            PathBuf::from("cri-containerd-abc.scope")
        );
        assert!(relative_path("kube--pods.slice:p:abc").is_err());
        assert!(relative_path("pods.slice:p:").is_err());
    }

    #[test]
    fn a_spec_without_a_cgroups_path_names_none() {
        assert_eq!(PodCgroup::from_spec(&serde_json::json!({})).unwrap(), None);
        assert_eq!(
            PodCgroup::from_spec(&serde_json::json!({"linux": {"cgroupsPath": ""}})).unwrap(),
            None
        );
        let e =
            PodCgroup::from_spec(&serde_json::json!({"linux": {"cgroupsPath": "/a/../../etc"}}))
                .unwrap_err()
                .to_string();
        assert!(e.contains("cgroupsPath"), "{e}");
    }
}
