//! thaw's guest kernel command line, as the files beside this crate hold
//! it: `cmdline.txt` on every host, plus `cmdline-pvm.txt` on PVM hosts.
//! `#` lines are comments; the rest are joined with spaces.
//!
//! A crate of its own so the words stay in one place, next to the kernel
//! config and patches they go with, and `thaw-vmm` reads them without an
//! `include_str!` reaching out of its crate. (A build script copying them
//! into the VMM's OUT_DIR would only move that reach into build.rs.)

/// `cmdline.txt`: the guest command line on every host.
pub const CMDLINE: &str = include_str!("../cmdline.txt");
/// `cmdline-pvm.txt`: added on PVM hosts.
pub const CMDLINE_PVM: &str = include_str!("../cmdline-pvm.txt");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_files_have_words() {
        for file in [CMDLINE, CMDLINE_PVM] {
            assert!(file
                .lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')));
        }
        assert!(CMDLINE.contains("console=ttyS0"));
        assert!(CMDLINE_PVM.contains("thaw_pvm"));
    }
}
