//! Architecture-specific code. Only x86_64 today; aarch64 goes beside it.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::*;
