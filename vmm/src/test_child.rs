//! For tests that must watch a process end (killed by a seccomp filter,
//! say): the test runs its own binary again on itself alone, with an
//! environment variable saying what the child is to do ([`rerun`]); the
//! test, started that way, plays the child ([`child_role`]).

use std::process::{Command, ExitStatus, Stdio};

/// The child's part, when this process is the child `var` names: core
/// dumps are off (it is meant to die of a signal).
pub fn child_role(var: &str) -> Option<String> {
    let role = std::env::var_os(var)?.to_string_lossy().into_owned();
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
    Some(role)
}

/// A child running only `test`, with `var`=`role`, its output discarded.
pub fn command(test: &str, var: &str, role: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("the test binary"));
    c.args(["--exact", test, "--nocapture"])
        .env(var, role)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Runs `test` again as a child with `var`=`role`; its exit status.
pub fn rerun(test: &str, var: &str, role: &str) -> ExitStatus {
    command(test, var, role)
        .status()
        .expect("running the test binary again")
}
