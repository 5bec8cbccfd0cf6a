//! cgroup v2: one cgroup per container under the agent's root, its limits,
//! freezer, statistics and kill-all.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;
use thaw_agent_protocol::agent::{CpuStats, MemoryStats, PidsStats, StatsResponse};

use crate::error::{Error, Result};

const CONTROLLERS: [&str; 6] = ["cpu", "memory", "pids", "cpuset", "io", "hugetlb"];

#[derive(Debug, Clone)]
pub struct Cgroups {
    root: Option<PathBuf>,
}

fn read_trim(path: &Path) -> std::io::Result<String> {
    fs::read_to_string(path).map(|s| s.trim().to_string())
}

/// Enables every controller `dir` may hand down to its children; best effort
/// (a controller bound elsewhere, e.g. to cgroup v1, simply stays off).
fn enable_controllers(dir: &Path) {
    let Ok(available) = read_trim(&dir.join("cgroup.controllers")) else {
        return;
    };
    for c in available.split_whitespace() {
        if CONTROLLERS.contains(&c) {
            if let Err(e) = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
                log::debug!("cgroup: enabling {c} in {}: {e}", dir.display());
            }
        }
    }
}

/// Reads `key value` lines (cpu.stat, memory.stat, memory.events).
fn flat_keyed(path: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// A single-value file; "max" reads as 0 (no limit).
fn single(path: &Path) -> u64 {
    match read_trim(path) {
        Ok(s) if s == "max" => 0,
        Ok(s) => s.parse().unwrap_or(0),
        Err(_) => 0,
    }
}

fn controller_of(file: &str) -> &str {
    file.split('.').next().unwrap_or(file)
}

impl Cgroups {
    /// `root`: the directory under which container cgroups are made (created
    /// if missing); None disables cgroups (resource limits then fail).
    pub fn new(root: Option<PathBuf>) -> Result<Cgroups> {
        if let Some(root) = &root {
            if let Some(parent) = root.parent() {
                enable_controllers(parent);
            }
            fs::create_dir_all(root).map_err(|e| Error::path("creating cgroup root", root, e))?;
            enable_controllers(root);
        }
        Ok(Cgroups { root })
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// Creates the container's cgroup and applies its limits.
    pub fn create(&self, id: &str, res: Option<&LinuxResources>) -> Result<Option<PathBuf>> {
        let Some(root) = &self.root else {
            if let Some(res) = res {
                if has_limits(res) {
                    return Err(Error::spec(
                        "linux.resources",
                        "cgroups are not available to this agent (started without a cgroup root)",
                    ));
                }
            }
            return Ok(None);
        };
        let dir = root.join(id);
        fs::create_dir(&dir).map_err(|e| Error::path("creating cgroup", &dir, e))?;
        if let Some(res) = res {
            if let Err(e) = apply(&dir, res) {
                let _ = fs::remove_dir(&dir);
                return Err(e);
            }
        }
        Ok(Some(dir))
    }
}

impl Cgroups {
    /// Applies a pod's own limits to the cgroup above all its containers
    /// (the agent's root: one pod per VM). Without a cgroup root, limits
    /// are refused.
    pub fn apply_pod(&self, res: &LinuxResources) -> Result<()> {
        match &self.root {
            Some(root) => apply(root, res),
            None if has_limits(res) => Err(Error::spec(
                "resources_json",
                "cgroups are not available to this agent (started without a cgroup root)",
            )),
            None => Ok(()),
        }
    }
}

fn has_limits(res: &LinuxResources) -> bool {
    let mem = res
        .memory()
        .as_ref()
        .is_some_and(|m| m.limit().is_some() || m.reservation().is_some() || m.swap().is_some());
    let cpu = res.cpu().as_ref().is_some_and(|c| {
        c.shares().is_some() || c.quota().is_some() || c.cpus().is_some() || c.mems().is_some()
    });
    let pids = res.pids().as_ref().is_some_and(|p| p.limit() > 0);
    let unified = res.unified().as_ref().is_some_and(|u| !u.is_empty());
    mem || cpu || pids || unified
}

fn write(dir: &Path, file: &str, value: &str, field: &str) -> Result<()> {
    match fs::write(dir.join(file), value) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::PermissionDenied => {
            Err(Error::spec(
                field,
                format!(
                    "cannot set {file}={value} in {}: the {} controller is not enabled there ({e})",
                    dir.display(),
                    controller_of(file)
                ),
            ))
        }
        Err(e) => Err(Error::spec(
            field,
            format!("writing {file}={value} in {}: {e}", dir.display()),
        )),
    }
}

fn limit_str(v: i64) -> String {
    if v < 0 {
        "max".into()
    } else {
        v.to_string()
    }
}

/// OCI cpu shares (2..262144) to cgroup v2 cpu.weight (1..10000), the
/// conversion runc and crun use.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// Applies new limits to an existing container cgroup.
pub fn update(dir: &Path, res: &LinuxResources) -> Result<()> {
    apply(dir, res)
}

fn apply(dir: &Path, res: &LinuxResources) -> Result<()> {
    if let Some(m) = res.memory() {
        let f = "linux.resources.memory";
        if let Some(limit) = m.limit() {
            if limit == 0 || limit < -1 {
                return Err(Error::spec(format!("{f}.limit"), "must be positive or -1"));
            }
            write(dir, "memory.max", &limit_str(limit), &format!("{f}.limit"))?;
        }
        if let Some(r) = m.reservation() {
            write(
                dir,
                "memory.low",
                &limit_str(r),
                &format!("{f}.reservation"),
            )?;
        }
        if let Some(swap) = m.swap() {
            // OCI's swap is memory+swap; v2's swap.max is swap alone.
            let v = match (swap, m.limit()) {
                (s, _) if s < 0 => "max".to_string(),
                (s, Some(l)) if l > 0 => {
                    if s < l {
                        return Err(Error::spec(
                            format!("{f}.swap"),
                            "memory+swap limit is lower than the memory limit",
                        ));
                    }
                    (s - l).to_string()
                }
                (s, _) => s.to_string(),
            };
            write(dir, "memory.swap.max", &v, &format!("{f}.swap"))?;
        }
        if m.disable_oom_killer() == Some(true) {
            log::warn!(
                "cgroup {}: disableOOMKiller has no cgroup v2 equivalent; ignored",
                dir.display()
            );
        }
    }
    if let Some(c) = res.cpu() {
        let f = "linux.resources.cpu";
        if let Some(shares) = c.shares() {
            if shares > 0 {
                write(
                    dir,
                    "cpu.weight",
                    &shares_to_weight(shares).to_string(),
                    &format!("{f}.shares"),
                )?;
            }
        }
        if c.quota().is_some() || c.period().is_some() {
            let period = c.period().unwrap_or(100_000);
            let quota = match c.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_string(),
            };
            write(
                dir,
                "cpu.max",
                &format!("{quota} {period}"),
                &format!("{f}.quota"),
            )?;
        }
        if let Some(b) = c.burst() {
            write(dir, "cpu.max.burst", &b.to_string(), &format!("{f}.burst"))?;
        }
        if let Some(idle) = c.idle() {
            write(dir, "cpu.idle", &idle.to_string(), &format!("{f}.idle"))?;
        }
        if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
            write(dir, "cpuset.cpus", cpus, &format!("{f}.cpus"))?;
        }
        if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
            write(dir, "cpuset.mems", mems, &format!("{f}.mems"))?;
        }
        if c.realtime_runtime().is_some_and(|r| r != 0) {
            return Err(Error::spec(
                format!("{f}.realtimeRuntime"),
                "real-time scheduling limits do not exist in cgroup v2",
            ));
        }
    }
    if let Some(p) = res.pids() {
        write(
            dir,
            "pids.max",
            &limit_str(if p.limit() > 0 { p.limit() } else { -1 }),
            "linux.resources.pids.limit",
        )?;
    }
    for (i, h) in res.hugepage_limits().iter().flatten().enumerate() {
        let file = format!("hugetlb.{}.max", h.page_size());
        let field = format!("linux.resources.hugepageLimits[{i}]");
        match write(dir, &file, &h.limit().to_string(), &field) {
            // An explicit "no limit" where hugetlb is not enabled is honoured.
            Err(_) if h.limit() == 0 => {}
            r => r?,
        }
    }
    for (key, value) in res.unified().iter().flatten() {
        let field = format!("linux.resources.unified.{key}");
        if key.contains('/') || key.starts_with('.') || key.starts_with("cgroup.") {
            return Err(Error::spec(field, "not a controller file name"));
        }
        write(dir, key, value, &field)?;
    }
    if res.block_io().is_some() {
        log::warn!(
            "cgroup {}: blockIO limits are not applied in the guest",
            dir.display()
        );
    }
    Ok(())
}

/// Freezes or thaws the cgroup and waits until the kernel says it is done.
pub fn set_frozen(dir: &Path, frozen: bool) -> Result<()> {
    let want = if frozen { "1" } else { "0" };
    fs::write(dir.join("cgroup.freeze"), want)
        .map_err(|e| Error::path("writing cgroup.freeze in", dir, e))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = flat_keyed(&dir.join("cgroup.events"), "frozen");
        if state == Some(u64::from(frozen)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Internal(format!(
                "cgroup {} did not become frozen={want} within 5 s",
                dir.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn pids(dir: &Path) -> Result<Vec<i32>> {
    let text = fs::read_to_string(dir.join("cgroup.procs"))
        .map_err(|e| Error::path("reading cgroup.procs in", dir, e))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// SIGKILLs everything in the cgroup (cgroup.kill, or one by one on kernels
/// without it).
pub fn kill_all(dir: &Path) -> Result<()> {
    if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return Ok(());
    }
    for pid in pids(dir)? {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    Ok(())
}

/// Kills what is left and removes the cgroup.
pub fn remove(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // A frozen cgroup cannot die: thaw it first.
    let _ = fs::write(dir.join("cgroup.freeze"), "0");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        kill_all(dir)?;
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(Error::path("removing cgroup", dir, e));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

pub fn oom_kills(dir: &Path) -> u64 {
    flat_keyed(&dir.join("memory.events"), "oom_kill").unwrap_or(0)
}

pub fn stats(dir: &Path) -> StatsResponse {
    let cpu_stat = dir.join("cpu.stat");
    let mem_stat = dir.join("memory.stat");
    let events = dir.join("memory.events");
    let mut cpu = CpuStats::new();
    cpu.usage_usec = flat_keyed(&cpu_stat, "usage_usec").unwrap_or(0);
    cpu.user_usec = flat_keyed(&cpu_stat, "user_usec").unwrap_or(0);
    cpu.system_usec = flat_keyed(&cpu_stat, "system_usec").unwrap_or(0);
    cpu.nr_periods = flat_keyed(&cpu_stat, "nr_periods").unwrap_or(0);
    cpu.nr_throttled = flat_keyed(&cpu_stat, "nr_throttled").unwrap_or(0);
    cpu.throttled_usec = flat_keyed(&cpu_stat, "throttled_usec").unwrap_or(0);
    let mut memory = MemoryStats::new();
    memory.usage_bytes = single(&dir.join("memory.current"));
    memory.limit_bytes = single(&dir.join("memory.max"));
    memory.swap_usage_bytes = single(&dir.join("memory.swap.current"));
    memory.anon_bytes = flat_keyed(&mem_stat, "anon").unwrap_or(0);
    memory.file_bytes = flat_keyed(&mem_stat, "file").unwrap_or(0);
    memory.oom_events = flat_keyed(&events, "oom").unwrap_or(0);
    memory.oom_kill_events = flat_keyed(&events, "oom_kill").unwrap_or(0);
    let mut pids = PidsStats::new();
    pids.current = single(&dir.join("pids.current"));
    pids.limit = single(&dir.join("pids.max"));
    let mut r = StatsResponse::new();
    r.cpu = protobuf::MessageField::some(cpu);
    r.memory = protobuf::MessageField::some(memory);
    r.pids = protobuf::MessageField::some(pids);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_map_like_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }

    #[test]
    fn missing_controller_file_names_field_and_controller() {
        let dir = tempfile::tempdir().unwrap();
        let res: LinuxResources = serde_json::from_str(r#"{"memory":{"limit":1048576}}"#).unwrap();
        // A plain directory has no memory.max, like a cgroup without the
        // memory controller.
        let sub = dir.path().join("nested-missing");
        fs::create_dir(&sub).unwrap();
        fs::remove_dir(&sub).unwrap();
        let e = apply(&sub, &res).unwrap_err().to_string();
        assert!(e.contains("linux.resources.memory.limit"), "{e}");
        assert!(e.contains("memory controller"), "{e}");
    }

    #[test]
    fn flat_keyed_reads_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("memory.events");
        fs::write(&p, "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n").unwrap();
        assert_eq!(flat_keyed(&p, "oom_kill"), Some(1));
        assert_eq!(flat_keyed(&p, "oom"), Some(2));
        assert_eq!(flat_keyed(&p, "nope"), None);
    }
}
