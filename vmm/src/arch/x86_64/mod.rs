//! x86_64: guest memory layout, boot structures and vCPU setup.

pub mod boot_params;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;

#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("guest memory write at {addr:#x}: {source}")]
    GuestWrite {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("KVM ioctl {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{0} vCPUs do not fit the MP table (at most {max})", max = mptable::MAX_VCPUS)]
    TooManyVcpus(u8),
    #[error("command line is {len} bytes, at most {max} fit", max = layout::CMDLINE_MAX_SIZE)]
    CmdlineTooLong { len: usize },
    #[error("initramfs of {size} bytes does not fit below {limit:#x}")]
    InitrdTooLarge { size: u64, limit: u64 },
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ArchError {
    move |source| ArchError::Kvm { what, source }
}
