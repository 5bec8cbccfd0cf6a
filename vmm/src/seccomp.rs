//! The VMM's seccomp filter, installed before the guest runs; every
//! thread made after it (vCPUs, device workers, control) inherits it.
//!
//! The guest is hostile: a bug in a device model that gives the guest code
//! execution in this process must not give it the host. The filter kills
//! the whole process on any system call a running VMM never makes and an
//! escaping attacker would want: starting programs, debugging or reading
//! other processes, changing mounts, namespaces or root, loading kernel
//! code, BPF and perf, keyrings, the clock, the handle-based file API that
//! reaches around mount namespaces, raw I/O ports, reboot.
//!
//! It is a deny-list, a first layer: everything else stays allowed because
//! the control socket's operations (snapshots, disk attach) open files and
//! map memory at any time (`attach_tap` opens `/dev/net/tun` and issues
//! `TUNSETIFF`/`TUNSETVNETHDRSZ`/`TUNSETOFFLOAD`; the NIC's worker uses
//! `readv`/`writev` on it: none of that is denied, and it must stay so;
//! the virtio-fs server resolves guest names with `openat2` and reopens its
//! `O_PATH` fds through `/proc/self/fd`, and also needs the `*at` calls,
//! `getdents64`, `pread64`/`pwrite64`, `ftruncate`, `fsync` and `fstatfs`).
//! The handle-based file API stays denied: the virtio-fs server never uses
//! it, so a guest can never reach around its share with it.
//! On top of it, each vCPU and device thread installs an allow-list for
//! its role ([`thread_program`], [`crate::confined`]); the main, control
//! and launcher threads, which serve only the host, keep this filter.

use std::collections::BTreeMap;

use crate::confined::ThreadRole;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What the running VMM may never call (x86_64 numbers from libc).
pub const DENIED: &[(&str, libc::c_long)] = &[
    ("execve", libc::SYS_execve),
    ("execveat", libc::SYS_execveat),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("kcmp", libc::SYS_kcmp),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("open_tree", libc::SYS_open_tree),
    ("move_mount", libc::SYS_move_mount),
    ("fsopen", libc::SYS_fsopen),
    ("fsmount", libc::SYS_fsmount),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("sethostname", libc::SYS_sethostname),
    ("setdomainname", libc::SYS_setdomainname),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("quotactl", libc::SYS_quotactl),
    ("syslog", libc::SYS_syslog),
    ("vhangup", libc::SYS_vhangup),
    ("personality", libc::SYS_personality),
];

/// System calls the VMM makes only for a feature an operator may not use,
/// which `--deny-syscall NAME` can forbid as well (any other call by its
/// number). Forbidding one a running VM needs kills it: the point of the
/// option is a tighter filter for nodes without volumes.
pub const DENIABLE: &[(&str, libc::c_long)] = &[
    // The virtio-fs server (volumes).
    ("openat2", libc::SYS_openat2),
    ("getdents64", libc::SYS_getdents64),
    ("mkdirat", libc::SYS_mkdirat),
    ("mknodat", libc::SYS_mknodat),
    ("unlinkat", libc::SYS_unlinkat),
    ("renameat2", libc::SYS_renameat2),
    ("linkat", libc::SYS_linkat),
    ("symlinkat", libc::SYS_symlinkat),
    ("fchownat", libc::SYS_fchownat),
    ("fchmodat", libc::SYS_fchmodat),
    ("utimensat", libc::SYS_utimensat),
    ("fallocate", libc::SYS_fallocate),
];

/// What every confined thread may call: memory, futexes, signals to
/// itself, time, its epoll loop and eventfds, stderr, and ending.
const THREAD_BASE: &[(&str, libc::c_long)] = &[
    ("read", libc::SYS_read),
    ("write", libc::SYS_write),
    ("readv", libc::SYS_readv),
    ("writev", libc::SYS_writev),
    ("close", libc::SYS_close),
    ("fcntl", libc::SYS_fcntl),
    ("futex", libc::SYS_futex),
    ("mmap", libc::SYS_mmap),
    ("munmap", libc::SYS_munmap),
    ("mprotect", libc::SYS_mprotect),
    ("mremap", libc::SYS_mremap),
    ("madvise", libc::SYS_madvise),
    ("brk", libc::SYS_brk),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("sched_yield", libc::SYS_sched_yield),
    ("sched_getaffinity", libc::SYS_sched_getaffinity),
    ("clock_gettime", libc::SYS_clock_gettime),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("nanosleep", libc::SYS_nanosleep),
    ("gettid", libc::SYS_gettid),
    ("getpid", libc::SYS_getpid),
    ("getrandom", libc::SYS_getrandom),
    ("epoll_create1", libc::SYS_epoll_create1),
    ("epoll_ctl", libc::SYS_epoll_ctl),
    ("epoll_wait", libc::SYS_epoll_wait),
    ("epoll_pwait", libc::SYS_epoll_pwait),
    ("eventfd2", libc::SYS_eventfd2),
    ("rseq", libc::SYS_rseq),
    ("set_robust_list", libc::SYS_set_robust_list),
    ("prctl", libc::SYS_prctl),
    ("exit", libc::SYS_exit),
    ("exit_group", libc::SYS_exit_group),
];

/// A vCPU: KVM's ioctls (run, registers at pause and snapshot) and the
/// guest console's file.
const VCPU: &[(&str, libc::c_long)] = &[("ioctl", libc::SYS_ioctl), ("fsync", libc::SYS_fsync)];

/// virtio-blk: reads and writes at offsets of its disk files, flushes.
const BLOCK: &[(&str, libc::c_long)] = &[
    ("pread64", libc::SYS_pread64),
    ("pwrite64", libc::SYS_pwrite64),
    ("preadv", libc::SYS_preadv),
    ("pwritev", libc::SYS_pwritev),
    ("fsync", libc::SYS_fsync),
    ("fdatasync", libc::SYS_fdatasync),
];

/// virtio-net: frames through the tap (read, write: in the base list).
const NET: &[(&str, libc::c_long)] = &[];

/// virtio-vsock: the host's Unix sockets, dialled and accepted.
const VSOCK: &[(&str, libc::c_long)] = &[
    ("socket", libc::SYS_socket),
    ("connect", libc::SYS_connect),
    ("accept4", libc::SYS_accept4),
    ("recvfrom", libc::SYS_recvfrom),
    ("sendto", libc::SYS_sendto),
    ("recvmsg", libc::SYS_recvmsg),
    ("sendmsg", libc::SYS_sendmsg),
    ("shutdown", libc::SYS_shutdown),
    ("getsockopt", libc::SYS_getsockopt),
    ("setsockopt", libc::SYS_setsockopt),
];

/// virtio-fs: the FUSE server's file API (the `*at` calls relative to
/// the share's fds), besides the calls in [`DENIABLE`].
const FS: &[(&str, libc::c_long)] = &[
    ("openat", libc::SYS_openat),
    ("newfstatat", libc::SYS_newfstatat),
    ("fstat", libc::SYS_fstat),
    ("statx", libc::SYS_statx),
    ("fstatfs", libc::SYS_fstatfs),
    ("readlinkat", libc::SYS_readlinkat),
    ("lseek", libc::SYS_lseek),
    ("pread64", libc::SYS_pread64),
    ("pwrite64", libc::SYS_pwrite64),
    ("preadv", libc::SYS_preadv),
    ("pwritev", libc::SYS_pwritev),
    ("ftruncate", libc::SYS_ftruncate),
    ("fsync", libc::SYS_fsync),
    ("fdatasync", libc::SYS_fdatasync),
    ("fchmod", libc::SYS_fchmod),
    ("fchown", libc::SYS_fchown),
    ("dup", libc::SYS_dup),
];

/// The control socket's server: serves the host's requests on its Unix
/// socket; hot-plugs disks, taps and shares (opening them); writes
/// snapshots.
const CONTROL: &[(&str, libc::c_long)] = &[
    ("accept4", libc::SYS_accept4),
    ("recvfrom", libc::SYS_recvfrom),
    ("sendto", libc::SYS_sendto),
    ("recvmsg", libc::SYS_recvmsg),
    ("sendmsg", libc::SYS_sendmsg),
    ("shutdown", libc::SYS_shutdown),
    ("openat", libc::SYS_openat),
    ("openat2", libc::SYS_openat2),
    ("newfstatat", libc::SYS_newfstatat),
    ("fstat", libc::SYS_fstat),
    ("statx", libc::SYS_statx),
    ("lseek", libc::SYS_lseek),
    ("pread64", libc::SYS_pread64),
    ("pwrite64", libc::SYS_pwrite64),
    ("ftruncate", libc::SYS_ftruncate),
    ("fsync", libc::SYS_fsync),
    ("fdatasync", libc::SYS_fdatasync),
    ("fchmod", libc::SYS_fchmod),
    ("chmod", libc::SYS_chmod),
    ("mkdir", libc::SYS_mkdir),
    ("rename", libc::SYS_rename),
    ("unlink", libc::SYS_unlink),
];

/// The calls a thread of `role` may make besides [`THREAD_BASE`] and
/// signalling itself.
pub fn allowed(role: ThreadRole) -> Vec<(&'static str, libc::c_long)> {
    let own: &[(&str, libc::c_long)] = match role {
        ThreadRole::Vcpu => VCPU,
        ThreadRole::Block => BLOCK,
        ThreadRole::Rng => &[],
        ThreadRole::Net => NET,
        ThreadRole::Vsock => VSOCK,
        ThreadRole::Fs => FS,
        ThreadRole::Control => CONTROL,
    };
    let mut calls: Vec<_> = own.to_vec();
    if role == ThreadRole::Fs {
        calls.extend_from_slice(DENIABLE);
    }
    calls
}

/// The ioctl types (the request's second byte) a thread of `role` may
/// use: KVM's (0xAE) on the vCPU; the tty/tun family ('T': `FIONBIO` on
/// sockets, `TUNSET*` on the tap) where sockets or the tap are used.
fn ioctl_types(role: ThreadRole) -> &'static [u8] {
    match role {
        ThreadRole::Vcpu => &[0xAE],
        ThreadRole::Net | ThreadRole::Vsock => b"T",
        // KVM's for pause and snapshots, tun's for the pod's tap.
        ThreadRole::Control => &[0xAE, b'T'],
        ThreadRole::Block | ThreadRole::Rng | ThreadRole::Fs => &[],
    }
}

/// What a confined thread meets on a call its role does not make.
const OFF_LIST: SeccompAction = SeccompAction::KillProcess;

/// `role`'s allow-list as a BPF program: [`THREAD_BASE`], [`allowed`],
/// and the signalling calls on `own_pid` only; never `denied`.
pub fn thread_program(
    role: ThreadRole,
    own_pid: u32,
    denied: &[libc::c_long],
) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = THREAD_BASE
        .iter()
        .copied()
        .chain(allowed(role))
        .map(|(_, nr)| nr)
        .filter(|nr| !denied.contains(nr))
        .map(|nr| (nr, Vec::new()))
        .collect();
    for (_, nr) in SIGNALLING {
        let own = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            u64::from(own_pid),
        )
        .map_err(build)?;
        if !denied.contains(nr) {
            rules.insert(*nr, vec![SeccompRule::new(vec![own]).map_err(build)?]);
        }
    }
    let ioctls = ioctl_types(role)
        .iter()
        .map(|t| {
            let of_type = SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(0xff00),
                u64::from(*t) << 8,
            )
            .map_err(build)?;
            SeccompRule::new(vec![of_type]).map_err(build)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !ioctls.is_empty() && !denied.contains(&libc::SYS_ioctl) {
        rules.insert(libc::SYS_ioctl, ioctls);
    }
    let filter = SeccompFilter::new(rules, OFF_LIST, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SeccompError::Build(e.to_string()))?;
    filter.try_into().map_err(build)
}

/// Installs a thread's allow-list (built by [`thread_program`]) on the
/// calling thread only (threads it starts inherit it).
pub fn confine_thread(role: ThreadRole, prog: &BpfProgram) -> Result<(), SeccompError> {
    no_new_privs()?;
    seccompiler::apply_filter(prog)
        .map_err(|e| SeccompError::Install(format!("{role:?} thread: {e}")))
}

/// The number of a system call named by `--deny-syscall`: a name from
/// [`DENIABLE`] or a number below 1024.
pub fn deniable(value: &str) -> Result<libc::c_long, String> {
    if let Some((_, nr)) = DENIABLE.iter().find(|(n, _)| *n == value) {
        return Ok(*nr);
    }
    match value.parse::<libc::c_long>() {
        Ok(nr) if (0..1024).contains(&nr) => Ok(nr),
        _ => Err(format!(
            "{value:?} is neither a system call number (0-1023) nor one of {}",
            DENIABLE
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the VMM's seccomp filter: {0}")]
    Build(String),
    #[error("installing the VMM's seccomp filter: {0}")]
    Install(String),
}

/// Calls that signal a process (or open one to signal it), with the
/// argument naming it: allowed only on the VMM's own pid (vCPU kicks are
/// `tgkill(own pid, tid, ...)`), so a VMM cannot signal any other
/// process, another VMM of the jail's uid included.
pub const SIGNALLING: &[(&str, libc::c_long)] = &[
    ("kill", libc::SYS_kill),
    ("tgkill", libc::SYS_tgkill),
    ("rt_sigqueueinfo", libc::SYS_rt_sigqueueinfo),
    ("rt_tgsigqueueinfo", libc::SYS_rt_tgsigqueueinfo),
    ("pidfd_open", libc::SYS_pidfd_open),
];

/// Signalling calls with no pid to check: denied outright.
pub const SIGNALLING_DENIED: &[(&str, libc::c_long)] = &[
    ("tkill", libc::SYS_tkill),
    ("pidfd_send_signal", libc::SYS_pidfd_send_signal),
];

/// The filter as a BPF program: [`DENIED`], [`SIGNALLING`] on other pids
/// than `own_pid`, and `extra`.
pub fn program(extra: &[libc::c_long], own_pid: u32) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED
        .iter()
        .chain(SIGNALLING_DENIED)
        .map(|(_, nr)| *nr)
        .chain(extra.iter().copied())
        .map(|nr| (nr, Vec::new()))
        .collect();
    for (_, nr) in SIGNALLING {
        let other_pid = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Ne,
            u64::from(own_pid),
        )
        .map_err(build)?;
        let rule = SeccompRule::new(vec![other_pid]).map_err(build)?;
        // An `extra` entry already denies it whatever the pid.
        rules.entry(*nr).or_insert_with(|| vec![rule]);
    }
    deny_program(rules)
}

fn build(e: seccompiler::BackendError) -> SeccompError {
    SeccompError::Build(e.to_string())
}

/// A program that kills the process on the calls `rules` match and allows
/// everything else.
fn deny_program(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::KillProcess,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(e.to_string()))?;
    filter.try_into().map_err(build)
}

fn no_new_privs() -> Result<(), SeccompError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SeccompError::Install(format!(
            "no_new_privs: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Installs the filter on every thread of this process (threads made later
/// inherit it). Sets no_new_privs, which a filter needs without
/// CAP_SYS_ADMIN. Call before any thread has a filter of its own.
pub fn install(extra: &[libc::c_long]) -> Result<(), SeccompError> {
    let prog = program(extra, std::process::id())?;
    no_new_privs()?;
    seccompiler::apply_filter_all_threads(&prog).map_err(|e| SeccompError::Install(e.to_string()))
}

/// All the pid namespace's waiter ([`crate::pid_namespace`]) does once it
/// waits: read its signalfd, reap or signal the VMM, end itself by a
/// signal or exit (the C library closes descriptors on the way), and
/// print an error.
const WAITER: &[(&str, libc::c_long)] = &[
    ("read", libc::SYS_read),
    ("write", libc::SYS_write),
    ("close", libc::SYS_close),
    ("fcntl", libc::SYS_fcntl),
    ("wait4", libc::SYS_wait4),
    ("kill", libc::SYS_kill),
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("getpid", libc::SYS_getpid),
    ("gettid", libc::SYS_gettid),
    ("tgkill", libc::SYS_tgkill),
    ("brk", libc::SYS_brk),
    ("mmap", libc::SYS_mmap),
    ("munmap", libc::SYS_munmap),
    ("futex", libc::SYS_futex),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("exit", libc::SYS_exit),
    ("exit_group", libc::SYS_exit_group),
];

/// Confines the pid namespace's waiter to [`WAITER`]: it runs as root in
/// the host's namespaces, so it may do nothing else.
pub fn confine_waiter() -> Result<(), SeccompError> {
    let rules = WAITER.iter().map(|(_, nr)| (*nr, Vec::new())).collect();
    let filter = SeccompFilter::new(rules, OFF_LIST, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SeccompError::Build(e.to_string()))?;
    let prog: BpfProgram = filter.try_into().map_err(build)?;
    no_new_privs()?;
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Install(format!("waiter: {e}")))
}

/// Forbids `denied` to the calling thread and the threads it starts later
/// (the VMM's main thread, once the VM is set up with them allowed).
pub fn deny_on_this_thread(denied: &[libc::c_long]) -> Result<(), SeccompError> {
    if denied.is_empty() {
        return Ok(());
    }
    let prog = deny_program(denied.iter().map(|nr| (*nr, Vec::new())).collect())?;
    no_new_privs()?;
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Install(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_child::{child_role, rerun};

    const CHILD: &str = "THAW_VMM_SECCOMP_TEST_CHILD";

    /// In the child: installs the filter and does what `act` names; exits
    /// 0 if the filter let it through.
    fn child_act(act: &str) -> ! {
        install(&[]).unwrap();
        // SAFETY: execve with NUL-terminated strings and NULL-terminated
        // arrays; signal 0 only probes, it is never delivered.
        unsafe {
            match act {
                "execve" => {
                    let path = c"/bin/true";
                    let argv = [path.as_ptr(), std::ptr::null()];
                    let envp = [std::ptr::null()];
                    libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
                }
                "signal-parent" => {
                    libc::kill(libc::getppid(), 0);
                }
                "signal-self" => {
                    libc::kill(libc::getpid(), 0);
                    libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), 0);
                }
                _ => std::process::exit(4),
            }
        }
        std::process::exit(0);
    }

    /// The filter really kills: this test runs itself again as a child,
    /// which installs the filter and calls execve; the child must die of
    /// SIGSYS before the call returns.
    #[test]
    fn a_denied_call_kills_the_process() {
        if let Some(act) = child_role(CHILD) {
            child_act(&act);
        }
        use std::os::unix::process::ExitStatusExt;
        let status = rerun(
            "seccomp::tests::a_denied_call_kills_the_process",
            CHILD,
            "execve",
        );
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "child ended with {status}"
        );
    }

    /// Signalling another process kills the VMM; its own threads and
    /// itself may be signalled.
    #[test]
    fn only_the_vmm_itself_may_be_signalled() {
        if let Some(act) = child_role(CHILD) {
            child_act(&act);
        }
        use std::os::unix::process::ExitStatusExt;
        let test = "seccomp::tests::only_the_vmm_itself_may_be_signalled";
        let other = rerun(test, CHILD, "signal-parent");
        assert_eq!(
            other.signal(),
            Some(libc::SIGSYS),
            "child ended with {other}"
        );
        let own = rerun(test, CHILD, "signal-self");
        assert_eq!(own.code(), Some(0), "child ended with {own}");
    }

    #[test]
    fn the_filter_builds_and_names_each_call_once() {
        let prog = program(&[], 42).unwrap();
        assert!(!prog.is_empty());
        let tighter = program(&[libc::SYS_openat2, libc::SYS_execve], 42).unwrap();
        assert!(tighter.len() > prog.len());
        let mut nrs: Vec<_> = DENIED.iter().map(|(_, nr)| *nr).collect();
        nrs.sort_unstable();
        nrs.dedup();
        assert_eq!(nrs.len(), DENIED.len());
        assert!(DENIED.iter().any(|(n, _)| *n == "execve"));
    }

    #[test]
    fn deniable_calls_are_named_or_numbered() {
        assert_eq!(deniable("openat2"), Ok(libc::SYS_openat2));
        assert_eq!(deniable("39"), Ok(39));
        for bad in ["", "open_tree2", "-1", "1024", "execve "] {
            let e = deniable(bad).unwrap_err();
            assert!(e.contains("openat2"), "{bad:?}: {e}");
        }
    }
}
