//! The last steps before exec: limits, identity, capabilities, seccomp.

use std::collections::HashSet;
use std::convert::Infallible;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use caps::{CapSet, Capability};
use nix::unistd::{Gid, Uid};

use super::{fail, field_fail, R};
use crate::plan::{CapsPlan, ProcessPlan};
use crate::seccomp;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn env_value<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    env.iter().rev().find_map(|kv| {
        kv.split_once('=')
            .and_then(|(k, v)| (k == key).then_some(v))
    })
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|md| md.is_file() && md.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds args[0] the way execvp would, with the container's PATH.
pub fn resolve_exe(p: &ProcessPlan) -> R<PathBuf> {
    let Some(arg0) = p.args.first() else {
        return Err(field_fail("process.args", "must not be empty"));
    };
    if arg0.contains('/') {
        let path = PathBuf::from(arg0);
        return match std::fs::metadata(&path) {
            Ok(_) => Ok(path),
            Err(e) => Err(field_fail("process.args[0]", format!("{arg0}: {e}"))),
        };
    }
    let search = env_value(&p.env, "PATH").unwrap_or(DEFAULT_PATH);
    for dir in search.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(arg0);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(field_fail(
        "process.args[0]",
        format!("{arg0:?}: executable file not found in $PATH ({search})"),
    ))
}

pub fn check_cwd(p: &ProcessPlan) -> R<()> {
    match std::fs::metadata(&p.cwd) {
        Ok(md) if md.is_dir() => Ok(()),
        Ok(_) => Err(field_fail(
            "process.cwd",
            format!("{}: not a directory", p.cwd),
        )),
        Err(e) => Err(field_fail("process.cwd", format!("{}: {e}", p.cwd))),
    }
}

fn cap_set(names: &[String], field: &str) -> R<HashSet<Capability>> {
    names
        .iter()
        .map(|n| {
            Capability::from_str(n)
                .map_err(|_| field_fail(field, format!("unknown capability {n:?}")))
        })
        .collect()
}

fn apply_caps(c: &CapsPlan, stage: CapsStage) -> R<()> {
    match stage {
        CapsStage::Bounding => {
            let keep = cap_set(&c.bounding, "process.capabilities.bounding")?;
            let supported = caps::runtime::thread_all_supported();
            for cap in supported.difference(&keep) {
                caps::drop(None, CapSet::Bounding, *cap)
                    .map_err(|e| field_fail("process.capabilities.bounding", e.to_string()))?;
            }
        }
        CapsStage::Sets => {
            let supported = caps::runtime::thread_all_supported();
            let only = |s: HashSet<Capability>| -> HashSet<Capability> {
                s.intersection(&supported).copied().collect()
            };
            let permitted = only(cap_set(&c.permitted, "process.capabilities.permitted")?);
            let effective = only(cap_set(&c.effective, "process.capabilities.effective")?);
            let inheritable = only(cap_set(&c.inheritable, "process.capabilities.inheritable")?);
            let ambient = only(cap_set(&c.ambient, "process.capabilities.ambient")?);
            // Each call rewrites one set, and the kernel insists that
            // effective stays within permitted at every step: shrink
            // effective first, permitted last.
            caps::set(None, CapSet::Effective, &effective)
                .map_err(|e| field_fail("process.capabilities.effective", e.to_string()))?;
            caps::set(None, CapSet::Inheritable, &inheritable)
                .map_err(|e| field_fail("process.capabilities.inheritable", e.to_string()))?;
            caps::set(None, CapSet::Permitted, &permitted).map_err(|e| {
                field_fail(
                    "process.capabilities.permitted",
                    format!("{e} (effective must be a subset of permitted)"),
                )
            })?;
            for cap in ambient {
                // Ambient needs the cap in permitted and inheritable; like
                // runc, skip what the kernel refuses rather than fail.
                if let Err(e) = caps::raise(None, CapSet::Ambient, cap) {
                    log::debug!("ambient {cap}: {e}");
                }
            }
        }
    }
    Ok(())
}

enum CapsStage {
    Bounding,
    Sets,
}

fn set_identity(p: &ProcessPlan) -> R<()> {
    let gids: Vec<Gid> = p
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&gids)
        .map_err(|e| field_fail("process.user.additionalGids", e.to_string()))?;
    let gid = Gid::from_raw(p.gid);
    nix::unistd::setresgid(gid, gid, gid)
        .map_err(|e| field_fail("process.user.gid", e.to_string()))?;
    let uid = Uid::from_raw(p.uid);
    nix::unistd::setresuid(uid, uid, uid)
        .map_err(|e| field_fail("process.user.uid", e.to_string()))?;
    Ok(())
}

fn cstrings(items: &[String], field: &str) -> R<Vec<CString>> {
    items
        .iter()
        .map(|s| CString::new(s.as_bytes()).map_err(|_| field_fail(field, "contains a NUL byte")))
        .collect()
}

/// Everything after `Start`: ends in execve, or returns why it could not.
pub fn exec(p: &ProcessPlan, exe: &Path, sock: &UnixStream) -> R<Infallible> {
    for rl in &p.rlimits {
        let lim = libc::rlimit {
            rlim_cur: rl.soft,
            rlim_max: rl.hard,
        };
        // SAFETY: setrlimit with a valid pointer to a local struct.
        if unsafe { libc::setrlimit(rl.resource as _, &lim) } != 0 {
            return Err(field_fail(
                &rl.field,
                std::io::Error::last_os_error().to_string(),
            ));
        }
    }
    if let Some(adj) = p.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| field_fail("process.oomScoreAdj", e.to_string()))?;
    }
    // Without no_new_privs, loading a filter needs CAP_SYS_ADMIN: load it
    // while we still have it (runc does the same).
    if !p.no_new_privileges {
        seccomp::install(&p.seccomp).map_err(|e| field_fail("linux.seccomp", e.to_string()))?;
    }
    if let Some(c) = &p.caps {
        apply_caps(c, CapsStage::Bounding)?;
        // Keep permitted capabilities across the switch away from uid 0.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    }
    set_identity(p)?;
    if let Some(c) = &p.caps {
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
        apply_caps(c, CapsStage::Sets)?;
    }
    if let Some(mask) = p.umask {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
    }
    nix::unistd::chdir(Path::new(&p.cwd))
        .map_err(|e| field_fail("process.cwd", format!("{}: {e}", p.cwd)))?;
    if p.no_new_privileges {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(field_fail(
                "process.noNewPrivileges",
                std::io::Error::last_os_error().to_string(),
            ));
        }
        seccomp::install(&p.seccomp).map_err(|e| field_fail("linux.seccomp", e.to_string()))?;
    }

    let path = CString::new(exe.as_os_str().as_encoded_bytes())
        .map_err(|_| field_fail("process.args[0]", "contains a NUL byte"))?;
    let args = cstrings(&p.args, "process.args")?;
    let env = cstrings(&p.env, "process.env")?;
    // The channel closes on a successful exec; that EOF is how the agent
    // learns the program started.
    nix::fcntl::fcntl(
        sock.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| fail(format!("fcntl: {e}")))?;
    let Err(err) = nix::unistd::execve(&path, &args, &env);
    Err(field_fail(
        "process.args[0]",
        format!("exec {}: {err}", exe.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str], env: &[&str]) -> ProcessPlan {
        ProcessPlan {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            cwd: "/".into(),
            terminal: false,
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            umask: None,
            rlimits: vec![],
            caps: None,
            no_new_privileges: false,
            oom_score_adj: None,
            seccomp: vec![],
        }
    }

    #[test]
    fn resolves_through_path() {
        let p = plan(&["sh"], &["PATH=/nonexistent:/bin"]);
        assert_eq!(resolve_exe(&p).unwrap(), PathBuf::from("/bin/sh"));
        let e = resolve_exe(&plan(&["no-such-prog-xyz"], &["PATH=/bin"])).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("process.args[0]"));
        assert!(e.message.contains("not found"), "{}", e.message);
        let e = resolve_exe(&plan(&[], &[])).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("process.args"));
    }

    #[test]
    fn last_env_value_wins() {
        let env = vec!["A=1".to_string(), "PATH=/x".into(), "PATH=/y".into()];
        assert_eq!(env_value(&env, "PATH"), Some("/y"));
        assert_eq!(env_value(&env, "B"), None);
    }
}
