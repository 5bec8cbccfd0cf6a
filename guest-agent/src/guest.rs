//! Guest-wide settings the host adjusts: clock, RNG, uptime.

use std::os::fd::AsRawFd;

use crate::error::{Error, Result};

/// Nanoseconds since boot, suspend included.
pub fn boottime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Sets CLOCK_REALTIME. Outside a VM (host tests) this would change the
/// host's clock, so it is refused unless the agent is the guest's init.
pub fn set_time(unix_ns: i64, pid1: bool) -> Result<()> {
    if unix_ns <= 0 {
        return Err(Error::InvalidRequest(format!(
            "unix_time_ns {unix_ns} is not a time after 1970"
        )));
    }
    if !pid1 {
        return Err(Error::FailedPrecondition(
            "refusing to set the clock: the agent is not the guest's init".into(),
        ));
    }
    let ts = nix::sys::time::TimeSpec::new(unix_ns / 1_000_000_000, unix_ns % 1_000_000_000);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| Error::errno("clock_settime(CLOCK_REALTIME)", e))
}

/// Largest entropy blob accepted per call.
pub const MAX_ENTROPY: usize = 4096;

/// RNDADDENTROPY = _IOW('R', 0x03, int[2]).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// Mixes `data` into the kernel's pool and credits it as entropy, so a
/// restored snapshot stops sharing its RNG state with its siblings.
pub fn add_entropy(data: &[u8]) -> Result<()> {
    if data.is_empty() || data.len() > MAX_ENTROPY {
        return Err(Error::InvalidRequest(format!(
            "entropy data must be 1..={MAX_ENTROPY} bytes, got {}",
            data.len()
        )));
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut req = Vec::with_capacity(8 + data.len());
    req.extend_from_slice(&((data.len() * 8) as i32).to_ne_bytes());
    req.extend_from_slice(&(data.len() as i32).to_ne_bytes());
    req.extend_from_slice(data);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/random")
        .map_err(|e| Error::io("opening /dev/random", e))?;
    // SAFETY: the buffer holds a complete rand_pool_info of the size given.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, req.as_ptr()) };
    if r != 0 {
        return Err(Error::io(
            "ioctl(RNDADDENTROPY)",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_time_is_refused_outside_the_guest() {
        let e = set_time(1_700_000_000_000_000_000, false).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        assert!(matches!(set_time(-5, true), Err(Error::InvalidRequest(_))));
    }

    #[test]
    fn entropy_size_is_checked() {
        assert!(matches!(add_entropy(&[]), Err(Error::InvalidRequest(_))));
        assert!(matches!(
            add_entropy(&vec![0u8; MAX_ENTROPY + 1]),
            Err(Error::InvalidRequest(_))
        ));
    }
}
