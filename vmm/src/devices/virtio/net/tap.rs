//! A Linux tap device as virtio-net's backend.
//!
//! [`Tap::open`] opens `/dev/net/tun` and binds the fd to the interface
//! `name` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, in the VMM's current
//! network namespace. An interface of that name that does not exist is
//! created, not persistent, owned by the fd: it disappears when the VMM
//! exits, which is how thaw cleans it up. Nothing is brought up here; the
//! host side (the shim) sets the link up and wires it.
//!
//! Every frame read or written carries the 12-byte `virtio_net_hdr_v1`
//! (`TUNSETVNETHDRSZ` 12), so a VERSION_1 guest's header passes through
//! unchanged. The fd is nonblocking: the device waits in epoll.
//!
//! The ioctls are issued through `vmm-sys-util`'s helpers with `libc`'s
//! request numbers and flags. rust-vmm publishes no maintained standalone
//! tap crate usable with our versions (Firecracker's and Cloud
//! Hypervisor's tap code lives inside those projects), and the surface is
//! three ioctls.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// Size of `virtio_net_hdr_v1` (num_buffers included): what the tap
/// prepends to every frame.
pub const VNET_HDR_LEN: usize = 12;

const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "tap name {0:?} is not a valid interface name (1 to 15 bytes, no '/', ':', NUL or blanks)"
    )]
    BadName(String),
    #[error("cannot open {TUN_PATH}: {0}")]
    OpenTun(#[source] io::Error),
    #[error("tap {name}: {what}: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// An open tap: frames in and out, each behind a 12-byte vnet header.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// What the kernel accepts as an interface name (`dev_valid_name`).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

impl Tap {
    /// Binds a new fd to tap `name` (creating it if needed), with a
    /// 12-byte vnet header and no offloads until [`Tap::set_offload`].
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the
        // call; the fd is ours.
        let rc = unsafe { ioctl_with_mut_ref(&tap.file, libc::TUNSETIFF as _, &mut ifr) };
        tap.check(rc, "TUNSETIFF")?;
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which lives for the call.
        let rc = unsafe { ioctl_with_ref(&tap.file, libc::TUNSETVNETHDRSZ as _, &hdr_len) };
        tap.check(rc, "TUNSETVNETHDRSZ")?;
        Ok(tap)
    }

    fn check(&self, rc: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if rc < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which offloads the kernel may use in frames it hands us (`TUN_F_*`):
    /// only those the guest said it can take.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let rc = unsafe {
            ioctl_with_val(
                &self.file,
                libc::TUNSETOFFLOAD as _,
                libc::c_ulong::from(flags),
            )
        };
        self.check(rc, "TUNSETOFFLOAD")
    }

    /// Reads one frame (header first) into `iovs`. Returns the frame's
    /// full length, which is more than the buffers hold if it was cut.
    pub fn readv(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iovs.len()).map_err(|_| too_many())?;
        // SAFETY: every iovec describes memory the caller keeps valid and
        // writable for the call.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iovs.as_ptr(), count) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Writes one frame (header first) gathered from `iovs`.
    pub fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iovs.len()).map_err(|_| too_many())?;
        // SAFETY: every iovec describes memory the caller keeps valid and
        // readable for the call.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iovs.as_ptr(), count) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

fn too_many() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        for bad in ["", "a/b", "x:1", "sixteen-bytes-xx", ".", "a b"] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::BadName(_))),
                "{bad:?}"
            );
        }
        assert!(valid_name("tap0") && valid_name("fifteen-bytes-x"));
    }
}
