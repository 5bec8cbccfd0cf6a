//! x86_64: guest memory layout, boot structures, and the KVM state of the
//! VM (`vm`) and of each vCPU (`vcpu`): set up at boot, saved and restored
//! by snapshots.

pub mod boot_params;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod vcpu;
pub mod vm;

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
    #[error(
        "cannot snapshot this vCPU: the guest's XSAVE state needs {needed} bytes and \
         KVM_GET_XSAVE holds {room} (dynamic features such as AMX are enabled)"
    )]
    XsaveTooLarge { needed: i32, room: usize },
    #[error("{count} {what} entries do not fit a KVM call")]
    TooManyEntries { what: &'static str, count: usize },
    #[error("KVM refused to restore MSR {0:#x}")]
    MsrRefused(u32),
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ArchError {
    move |source| ArchError::Kvm { what, source }
}
