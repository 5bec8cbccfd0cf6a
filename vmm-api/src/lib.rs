//! How to talk to `thaw-vmm` from outside it, without linking the VMM (no
//! KVM crates here):
//!
//! - [`wire`]: the control socket's requests and replies (`--api-sock`),
//!   newline-delimited JSON, one request line and one reply line per round
//!   trip: `{"op":"status"}` -> `{"ok":true,...}` or
//!   `{"ok":false,"error":"..."}`;
//! - [`VmmClient`]: a blocking client for that socket;
//! - [`VmmCommand`]: `thaw-vmm`'s command line (cold boot, restore,
//!   `template build`) as data, turned into a `std::process::Command`.
//!
//! The VMM's own server and CLI parser use the same types, and the tests of
//! both sides pin the literal wire strings and argv.

pub mod client;
pub mod command;
pub mod error;
pub mod wire;

pub use client::VmmClient;
pub use command::{
    BootArgs, Disk, Jail, JailBind, Pvm, ReadyProbe, RestoreArgs, Serial, Share, TemplateBuildArgs,
    VmmCommand,
};
pub use error::Error;
pub use wire::{BootMark, Reply, Request, RunState, SnapshotSaved, Status};
