//! The host-process backend: the guest agent runs directly on the host.
//! NOT ISOLATED: containers share the host kernel like with runc. It
//! exists so the whole shim can be tested on machines where a VM cannot
//! run guest user space, and is only used when the config says
//! `backend = "host-unisolated"`.
//!
//! Containment stands in for the VM boundary: the agent runs in its own
//! mount namespace (`--private-mounts`, its mounts vanish with it) and in a
//! cgroup v2 directory of its own that holds every container it starts, so
//! `cgroup.kill` ends everything at once, as a VM's death would. Images
//! reach it as read-only loop devices.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use thaw_agent_protocol::agent as proto;

use super::{Attached, Backend};
use crate::child;
use crate::error::{Error, IoContext, Result};
use thaw_config::HostConfig;

pub struct HostBackend {
    host: HostConfig,
    cgroup: Mutex<Option<PathBuf>>,
}

impl HostBackend {
    pub fn new(host: HostConfig) -> Self {
        HostBackend {
            host,
            cgroup: Mutex::new(None),
        }
    }
}

/// Where cgroup v2 is mounted (/sys/fs/cgroup, or .../unified on hybrid
/// hosts).
fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split(' ').next()? != "cgroup2" {
            return None;
        }
        pre.split(' ').nth(4).map(PathBuf::from)
    })
}

/// Kills every process in `cg` (and below) and removes the directories.
pub fn kill_cgroup(cg: &Path) {
    if !cg.exists() {
        return;
    }
    if let Err(e) = fs::write(cg.join("cgroup.kill"), "1") {
        log::warn!("cgroup.kill in {}: {e}", cg.display());
    }
    // Directories go bottom-up once their processes are gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if remove_tree(cg) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if cg.exists() {
        log::warn!("cgroup {} could not be removed", cg.display());
    }
}

/// rmdir of a cgroup tree, deepest first; true when all of it is gone.
fn remove_tree(dir: &Path) -> bool {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    fs::remove_dir(dir).is_ok() || !dir.exists()
}

/// Drops resource limits whose cgroup v2 controller the host does not
/// offer (on hybrid hosts they are bound to cgroup v1). Inside a VM the
/// guest has them all; here they would only make every create fail.
fn strip_unavailable_limits(spec: &serde_json::Value, available: &str) -> serde_json::Value {
    let mut spec = spec.clone();
    let have: Vec<&str> = available.split_whitespace().collect();
    if let Some(res) = spec
        .get_mut("linux")
        .and_then(|l| l.get_mut("resources"))
        .and_then(|r| r.as_object_mut())
    {
        for (field, controller) in [
            ("cpu", "cpu"),
            ("memory", "memory"),
            ("pids", "pids"),
            ("blockIO", "io"),
            ("hugepageLimits", "hugetlb"),
        ] {
            if res.contains_key(field) && !have.contains(&controller) {
                log::warn!(
                    "host-unisolated: ignoring linux.resources.{field}: no {controller} controller in cgroup v2 here"
                );
                res.remove(field);
            }
        }
    }
    spec
}

fn losetup(args: &[&str]) -> Result<String> {
    let f = child::run(Command::new("losetup").args(args), Duration::from_secs(30))?;
    if f.code != 0 {
        return Err(Error::Sandbox(format!(
            "losetup {}: {}",
            args.join(" "),
            f.stderr.trim()
        )));
    }
    Ok(f.stdout.trim().to_string())
}

impl Backend for HostBackend {
    fn agent_pids_are_host_pids(&self) -> bool {
        true
    }

    fn check(&self) -> Result<()> {
        if !self.host.agent.exists() {
            return Err(Error::Sandbox(format!(
                "host.agent {} does not exist (set host.agent in the thaw config)",
                self.host.agent.display()
            )));
        }
        super::vm::need_executable("host.agent", &self.host.agent)?;
        if cgroup2_mount().is_none() {
            return Err(Error::Sandbox(
                "the host-unisolated backend needs a cgroup v2 mount to contain the agent".into(),
            ));
        }
        Ok(())
    }

    fn prepare(&self, dir: &Path) -> Result<Option<PathBuf>> {
        let root = cgroup2_mount()
            .ok_or_else(|| Error::Sandbox("no cgroup v2 mount".into()))?
            .join("thaw-host");
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "sandbox".into());
        let cg = root.join(name);
        if cg.exists() {
            kill_cgroup(&cg);
        }
        fs::create_dir_all(&cg).ctx(|| format!("creating cgroup {}", cg.display()))?;
        if let Ok(mut g) = self.cgroup.lock() {
            *g = Some(cg.clone());
        }
        Ok(Some(cg))
    }

    fn command(&self, uds: &Path, dir: &Path) -> Command {
        let cg = self.cgroup.lock().ok().and_then(|g| g.clone());
        let mut c = Command::new(&self.host.agent);
        c.arg("--host")
            .arg(format!("unix://{}", uds.display()))
            .arg("--private-mounts")
            .arg("--run-dir")
            .arg(dir.join("agent"))
            .arg("--log-level")
            .arg("debug");
        if let Some(cg) = cg {
            c.arg("--cgroup-root").arg(cg.join("containers"));
            let procs: Vec<CString> = CString::new(cg.join("cgroup.procs").as_os_str().as_bytes())
                .into_iter()
                .collect();
            // SAFETY: `join` makes only async-signal-safe calls, on paths
            // allocated before fork.
            unsafe {
                c.pre_exec(move || super::cgroup::join(&procs));
            }
        } else {
            c.arg("--cgroup-root").arg("none");
        }
        c
    }

    fn attach(&self, slot: u32, image: &Path) -> Result<(proto::Rootfs, Attached)> {
        let image = image.to_str().ok_or_else(|| {
            Error::Sandbox(format!("image path {} is not UTF-8", image.display()))
        })?;
        let dev = losetup(&["--find", "--show", "--read-only", image])?;
        if !dev.starts_with("/dev/loop") {
            return Err(Error::Sandbox(format!(
                "losetup printed {dev:?}, not a loop device"
            )));
        }
        let mut r = proto::Rootfs::new();
        r.source = dev.clone();
        r.fstype = "erofs".into();
        Ok((
            r,
            Attached {
                slot,
                loop_dev: Some(dev),
            },
        ))
    }

    fn adapt_spec(&self, spec: &serde_json::Value) -> Result<serde_json::Value> {
        let available = self
            .cgroup
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .and_then(|cg| fs::read_to_string(cg.join("cgroup.controllers")).ok())
            .unwrap_or_default();
        Ok(strip_unavailable_limits(spec, &available))
    }

    fn mounted(&self, attached: &Attached) {
        // Detaching a mounted loop device only marks it auto-clear: the
        // kernel frees it when the agent's mount goes, even if the agent
        // dies. So nothing is left to clean after a crash.
        self.detach(attached);
    }

    fn detach(&self, attached: &Attached) {
        if let Some(dev) = &attached.loop_dev {
            if let Err(e) = losetup(&["--detach", dev]) {
                log::debug!("{e}");
            }
        }
    }

    fn request_stop(&self, pid: u32) {
        // The agent removes its containers on SIGTERM; the caller kills
        // what is left.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }

    fn after_exit(&self) {
        if let Some(cg) = self.cgroup.lock().ok().and_then(|g| g.clone()) {
            kill_cgroup(&cg);
        }
    }

    fn describe(&self) -> String {
        format!("host-unisolated agent ({})", self.host.agent.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_unavailable_limits_are_dropped() {
        let spec = json!({"linux": {"resources": {
            "cpu": {"shares": 1024}, "memory": {"limit": 1000000}, "devices": []
        }}});
        let out = strip_unavailable_limits(&spec, "memory hugetlb\n");
        let res = &out["linux"]["resources"];
        assert!(res.get("cpu").is_none());
        assert_eq!(res["memory"]["limit"], 1000000);
        assert!(res.get("devices").is_some());
    }
}
