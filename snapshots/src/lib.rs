//! thaw snapshots: the on-disk format of a paused VM's state and the
//! templates that every sandbox start restores from.
//!
//! A snapshot is a directory with two files:
//! - `state`: a versioned, checksummed header followed by the VM's state as
//!   plain serialized data (what the state *is* lives with the VMM, which
//!   owns the KVM and device objects);
//! - `memory`: guest RAM, byte for byte, mapped copy-on-write at restore.

pub mod cpu;
pub mod digest;
pub mod error;
pub mod format;
pub mod private;
pub mod template;

pub use cpu::CpuFingerprint;
pub use error::Error;
pub use format::{decode_state, encode_state, read_state, write_state, FORMAT_VERSION};

/// File names inside a snapshot directory.
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";
