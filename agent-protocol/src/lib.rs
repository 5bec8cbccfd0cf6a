//! The protocol between thaw's shim (host) and `thaw-agent` (guest PID 1).
//!
//! The service is defined in `proto/agent.proto` (package `thaw.agent.v1`,
//! service `Agent`) and carried by ttrpc. This crate holds the generated
//! messages ([`agent`]), the sync client/server ([`agent_ttrpc`]), with the
//! `async` feature the tokio client/server ([`agent_ttrpc_async`]), and the
//! transport conventions both sides must agree on ([`transport`]).
//!
//! # Connections
//! Every connection is dialed by the guest, so the host never polls:
//! - **control**: the agent dials host port [`CONTROL_PORT`] (CID 2). Under
//!   the VMM's Firecracker-style vsock that lands on the host Unix socket
//!   `<uds>_1024` ([`transport::host_socket_path`]). The agent is the ttrpc
//!   *server* on that connection and the shim the *client*: the shim
//!   accepts, then builds a ttrpc client on the accepted socket. The
//!   connection's arrival is the readiness signal. When it drops, the agent
//!   dials again (vsock reset after a snapshot restore, shim restart).
//! - **stdio**: for each process the shim picks host ports (unique within
//!   the VM, e.g. counting up from [`FIRST_STDIO_PORT`]), listens on
//!   `<uds>_<port>`, and names them in [`agent::Stdio`]. The agent dials
//!   them during `CreateContainer`/`ExecProcess`, before the call returns,
//!   so the shim may accept after the call. Raw bytes, no framing.
//!   - stdin: the shim writes; a half-close (`shutdown(SHUT_WR)`) gives the
//!     process EOF after every byte before it was delivered.
//!   - stdout/stderr: the agent writes; after the process has exited and
//!     everything it wrote is forwarded, the agent half-closes the stream
//!     and only then reports the exit (WaitProcess, exit event). The shim
//!     must read its streams to EOF before publishing the exit.
//!   - terminal (`process.terminal`): stdin and stdout carry the tty,
//!     stderr is unused.

#[allow(clippy::all, missing_docs, unused_attributes, unused_mut)]
#[allow(dead_code, non_camel_case_types, non_snake_case, unused_results)]
#[allow(non_upper_case_globals, trivial_casts)]
// Generated: the workspace's unwrap/expect/unsafe rules are for our code.
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::undocumented_unsafe_blocks)]
#[rustfmt::skip]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/sync/agent.rs"));
}

#[allow(clippy::all, missing_docs, unused_imports, unused_results)]
#[allow(dead_code, non_camel_case_types, non_snake_case)]
#[allow(non_upper_case_globals, trivial_casts, unsafe_code)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::undocumented_unsafe_blocks)]
#[rustfmt::skip]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/sync/agent_ttrpc.rs"));
}

#[cfg(feature = "async")]
#[allow(clippy::all, missing_docs, unused_imports, unused_results)]
#[allow(dead_code, non_camel_case_types, non_snake_case)]
#[allow(non_upper_case_globals, trivial_casts, unsafe_code)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::undocumented_unsafe_blocks)]
#[rustfmt::skip]
pub mod agent_ttrpc_async {
    include!(concat!(env!("OUT_DIR"), "/async/agent_ttrpc.rs"));
}

pub mod events;
pub mod transport;

pub use transport::{CONTROL_PORT, FIRST_STDIO_PORT, HOST_CID, PROTOCOL_VERSION};

/// Where the agent mounts the sandbox's host share in the guest; the shim
/// rewrites a container's host binds to paths below it.
pub const SHARE_DIR: &str = "/run/thaw/share";

/// Where the agent mounts a pod's memory-backed emptyDir volumes, each a
/// guest tmpfs named by the shim (`MountEphemeral`).
pub const EPHEMERAL_DIR: &str = "/run/thaw/ephemeral";

/// The tag of the VMM's virtio-fs device that serves the share.
pub const SHARE_TAG: &str = "thaw-share";

/// The most of a container's /dev/termination-log the agent sends back
/// (kubelet reads no more than this).
pub const MAX_TERMINATION_MESSAGE: usize = 4096;

// Re-exported so users build clients/servers against the same versions.
pub use protobuf;
pub use ttrpc;
