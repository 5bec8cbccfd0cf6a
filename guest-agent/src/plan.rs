//! What the agent tells its container-init helper to do, and the messages
//! they exchange. Plain data: the agent validates the OCI spec and turns it
//! into a plan; the helper only carries it out.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::seccomp::Programs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ns {
    Mount,
    Uts,
    Ipc,
    Pid,
    Cgroup,
    Net,
}

impl Ns {
    pub fn clone_flag(self) -> nix::sched::CloneFlags {
        use nix::sched::CloneFlags as F;
        match self {
            Ns::Mount => F::CLONE_NEWNS,
            Ns::Uts => F::CLONE_NEWUTS,
            Ns::Ipc => F::CLONE_NEWIPC,
            Ns::Pid => F::CLONE_NEWPID,
            Ns::Cgroup => F::CLONE_NEWCGROUP,
            Ns::Net => F::CLONE_NEWNET,
        }
    }

    /// The name under /proc/<pid>/ns/.
    pub fn proc_name(self) -> &'static str {
        match self {
            Ns::Mount => "mnt",
            Ns::Uts => "uts",
            Ns::Ipc => "ipc",
            Ns::Pid => "pid",
            Ns::Cgroup => "cgroup",
            Ns::Net => "net",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// cgroup directory the process joins first (so children inherit it).
    pub cgroup: Option<PathBuf>,
    /// Namespaces to enter, in order (mount last: it changes the root).
    pub join_ns: Vec<(Ns, PathBuf)>,
    /// Namespaces to create.
    pub new_ns: Vec<Ns>,
    /// Present for a container's init; absent for exec.
    pub rootfs: Option<RootfsPlan>,
    /// Set in a new UTS namespace.
    pub hostname: Option<String>,
    pub process: ProcessPlan,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootfsPlan {
    /// The prepared root directory (agent's mount namespace).
    pub path: PathBuf,
    pub readonly: bool,
    /// linux.rootfsPropagation, applied to / after pivot_root.
    pub propagation: Option<String>,
    pub mounts: Vec<MountPlan>,
    pub devices: Vec<DevicePlan>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub sysctl: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountPlan {
    /// Where this mount came from, for error messages (e.g. "mounts[3]").
    pub field: String,
    pub destination: String,
    pub typ: String,
    pub source: String,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicePlan {
    pub path: String,
    /// 'c', 'b' or 'p'.
    pub kind: char,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rlimit {
    pub field: String,
    pub resource: i32,
    pub soft: u64,
    pub hard: u64,
}

/// Capability sets by name ("CAP_CHOWN").
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CapsPlan {
    pub bounding: Vec<String>,
    pub effective: Vec<String>,
    pub permitted: Vec<String>,
    pub inheritable: Vec<String>,
    pub ambient: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessPlan {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub terminal: bool,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
    pub rlimits: Vec<Rlimit>,
    /// None: keep the helper's capabilities (all).
    pub caps: Option<CapsPlan>,
    pub no_new_privileges: bool,
    pub oom_score_adj: Option<i32>,
    pub seccomp: Programs,
}

/// Helper -> agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromInit {
    /// The container process's pid (in the agent's pid namespace).
    Pid(i32),
    /// The tty master is attached to this frame.
    Tty,
    /// Set up and waiting for `Start`.
    Ready,
    /// Setup or exec failed; `field` names the spec field when there is one.
    Error {
        field: Option<String>,
        message: String,
    },
}

/// Agent -> helper.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToInit {
    Plan(Box<Plan>),
    Start,
}
