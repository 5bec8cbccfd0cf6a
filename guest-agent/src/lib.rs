//! thaw's guest agent: PID 1 of the micro-VM. It dials the host over vsock,
//! serves the `thaw.agent.v1.Agent` ttrpc API on that connection, and runs
//! OCI containers with its own small runtime.

pub mod channel;
pub mod cli;
pub mod ephemeral;
pub mod error;
pub mod forward;
pub mod guest;
pub mod host;
pub mod init;
pub mod logging;
pub mod network;
pub mod pid1;
pub mod plan;
pub mod reaper;
pub mod runtime;
pub mod seccomp;
pub mod server;
pub mod share;

pub use error::{Error, Result};
