//! Compiles an OCI seccomp profile into BPF programs (with `seccompiler`,
//! which does the BPF code generation, 64-bit argument comparisons and the
//! architecture check).
//!
//! OCI profiles carry one action per rule, but a seccompiler filter has one
//! match action. libseccomp's meaning ("the action of the matching rule,
//! else the default") is kept by stacking filters, relying on the kernel
//! returning the most restrictive action of all installed filters:
//! - a "default" filter that allows every syscall some rule matches and
//!   returns the default action for the rest;
//! - one filter per other action that returns that action for its rules and
//!   allows everything else.

mod syscalls_x86_64;

use std::collections::{BTreeMap, HashMap};

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One BPF instruction, serializable so the agent can compile the profile
/// and the init helper only installs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Insn(pub u16, pub u8, pub u8, pub u32);

/// Filters in installation order.
pub type Programs = Vec<Vec<Insn>>;

fn syscall_nr(name: &str) -> Option<i64> {
    syscalls_x86_64::SYSCALLS
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .map(|i| syscalls_x86_64::SYSCALLS[i].1)
}

/// Errno returned when a profile asks for SCMP_ACT_ERRNO without a number.
const DEFAULT_ERRNO: u32 = libc::EPERM as u32;

fn action(act: LinuxSeccompAction, errno: Option<u32>, field: &str) -> Result<SeccompAction> {
    Ok(match act {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(errno.unwrap_or(DEFAULT_ERRNO)),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno.unwrap_or(0)),
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(Error::spec(
                field,
                "SCMP_ACT_NOTIFY is not supported (no seccomp agent in the guest)",
            ))
        }
    })
}

/// A comparable key for actions (SeccompAction is not Ord).
fn action_key(a: &SeccompAction) -> u32 {
    u32::from(a.clone())
}

fn condition(
    field: &str,
    index: usize,
    op: LinuxSeccompOperator,
    value: u64,
    value_two: Option<u64>,
) -> Result<SeccompCondition> {
    let (op, value) = match op {
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, value),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, value),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, value),
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, value),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, value),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, value),
        // OCI: `value` is the mask, `valueTwo` the expected masked value.
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            (SeccompCmpOp::MaskedEq(value), value_two.unwrap_or(0))
        }
    };
    let index =
        u8::try_from(index).map_err(|_| Error::spec(format!("{field}.index"), "must be 0..5"))?;
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| Error::spec(format!("{field}.index"), e.to_string()))
}

/// Rules for one syscall: `None` = matches whatever the arguments.
type Rules = Option<Vec<SeccompRule>>;

fn merge(into: &mut HashMap<i64, Rules>, nr: i64, rule: Option<SeccompRule>) {
    let entry = into.entry(nr).or_insert_with(|| Some(Vec::new()));
    match (entry.as_mut(), rule) {
        (Some(rules), Some(rule)) => rules.push(rule),
        (Some(_), None) => *entry = None,
        (None, _) => {}
    }
}

fn to_map(rules: &HashMap<i64, Rules>) -> BTreeMap<i64, Vec<SeccompRule>> {
    rules
        .iter()
        .map(|(nr, r)| (*nr, r.clone().unwrap_or_default()))
        .collect()
}

fn build(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    on_match: SeccompAction,
) -> Result<Vec<Insn>> {
    let filter = SeccompFilter::new(rules, mismatch, on_match, seccompiler::TargetArch::x86_64)
        .map_err(|e| Error::spec("linux.seccomp", e.to_string()))?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::spec("linux.seccomp", e.to_string()))?;
    Ok(prog
        .into_iter()
        .map(|i| Insn(i.code, i.jt, i.jf, i.k))
        .collect())
}

/// Compiles `profile`; errors name the offending field.
pub fn compile(profile: &LinuxSeccomp) -> Result<Programs> {
    if let Some(archs) = profile.architectures() {
        let ok = archs.is_empty()
            || archs
                .iter()
                .any(|a| format!("{a:?}").eq_ignore_ascii_case("ScmpArchX86_64"));
        if !ok {
            return Err(Error::spec(
                "linux.seccomp.architectures",
                "does not include SCMP_ARCH_X86_64, the guest's architecture",
            ));
        }
    }
    if profile.listener_path().is_some() {
        return Err(Error::spec(
            "linux.seccomp.listenerPath",
            "seccomp notify listeners are not supported in the guest",
        ));
    }
    let default = action(
        profile.default_action(),
        profile.default_errno_ret(),
        "linux.seccomp.defaultAction",
    )?;

    let mut all: HashMap<i64, Rules> = HashMap::new();
    let mut by_action: BTreeMap<u32, (SeccompAction, HashMap<i64, Rules>)> = BTreeMap::new();
    for (i, sc) in profile.syscalls().iter().flatten().enumerate() {
        let field = format!("linux.seccomp.syscalls[{i}]");
        let act = action(sc.action(), sc.errno_ret(), &format!("{field}.action"))?;
        if act == default {
            continue;
        }
        let mut conds = Vec::new();
        for (j, a) in sc.args().iter().flatten().enumerate() {
            conds.push(condition(
                &format!("{field}.args[{j}]"),
                a.index(),
                a.op(),
                a.value(),
                a.value_two(),
            )?);
        }
        let rule = if conds.is_empty() {
            None
        } else {
            Some(SeccompRule::new(conds).map_err(|e| Error::spec(&field, e.to_string()))?)
        };
        for name in sc.names() {
            // Profiles list syscalls of every architecture; libseccomp
            // skips names it does not know for this one, and so do we.
            let Some(nr) = syscall_nr(name) else {
                log::debug!("seccomp: {field}: unknown syscall {name:?} skipped");
                continue;
            };
            merge(&mut all, nr, rule.clone());
            let (_, rules) = by_action
                .entry(action_key(&act))
                .or_insert_with(|| (act.clone(), HashMap::new()));
            merge(rules, nr, rule.clone());
        }
    }

    let mut programs = Vec::new();
    if default != SeccompAction::Allow {
        programs.push(build(to_map(&all), default.clone(), SeccompAction::Allow)?);
    }
    for (_, (act, rules)) in by_action {
        if act == SeccompAction::Allow {
            continue;
        }
        programs.push(build(to_map(&rules), SeccompAction::Allow, act)?);
    }
    Ok(programs)
}

/// Installs compiled filters on the calling thread, in order.
pub fn install(programs: &Programs) -> std::io::Result<()> {
    for prog in programs {
        let bpf: BpfProgram = prog
            .iter()
            .map(|Insn(code, jt, jf, k)| seccompiler::sock_filter {
                code: *code,
                jt: *jt,
                jf: *jf,
                k: *k,
            })
            .collect();
        seccompiler::apply_filter(&bpf).map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn syscall_table_lookup() {
        assert_eq!(syscall_nr("read"), Some(0));
        assert_eq!(syscall_nr("mkdir"), Some(libc::SYS_mkdir));
        assert_eq!(syscall_nr("clone3"), Some(libc::SYS_clone3));
        assert_eq!(syscall_nr("no_such_call"), None);
    }

    #[test]
    fn allowlist_with_specific_errno_gives_two_filters() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["read","write","bogus_name"],"action":"SCMP_ACT_ALLOW"},
                {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38},
                {"names":["personality"],"action":"SCMP_ACT_ALLOW",
                 "args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        let progs = compile(&p).unwrap();
        assert_eq!(progs.len(), 2);
        assert!(progs.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn blocklist_needs_no_default_filter() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}]}"#,
        );
        assert_eq!(compile(&p).unwrap().len(), 1);
    }

    #[test]
    fn notify_is_rejected_with_field() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["mkdir"],"action":"SCMP_ACT_ALLOW"},
                {"names":["mkdir"],"action":"SCMP_ACT_NOTIFY"}]}"#,
        );
        let e = compile(&p).unwrap_err().to_string();
        assert!(e.contains("linux.seccomp.syscalls[1].action"), "{e}");
    }

    #[test]
    fn wrong_architecture_is_rejected() {
        let p =
            profile(r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_AARCH64"]}"#);
        let e = compile(&p).unwrap_err().to_string();
        assert!(e.contains("linux.seccomp.architectures"), "{e}");
    }

    /// Installs a blocklist filter in a forked child and checks the errno it
    /// gets back: the compiled program really does what the profile says.
    #[test]
    fn installed_filter_returns_profile_errno() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["getcwd"],"action":"SCMP_ACT_ERRNO","errnoRet":42}]}"#,
        );
        let progs = compile(&p).unwrap();
        // SAFETY: the child only makes raw syscalls and exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                // SAFETY: prctl with integer arguments touches no memory.
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                let code = match install(&progs) {
                    Err(_) => 1,
                    Ok(()) => {
                        let mut buf = [0u8; 256];
                        // SAFETY: getcwd writes at most 256 bytes into buf,
                        // which has 256.
                        let r = unsafe { libc::syscall(libc::SYS_getcwd, buf.as_mut_ptr(), 256) };
                        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                        if r == -1 && errno == 42 {
                            0
                        } else {
                            2
                        }
                    }
                };
                // SAFETY: _exit ends the forked child without running the
                // parent's destructors or atexit handlers twice.
                unsafe { libc::_exit(code) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
