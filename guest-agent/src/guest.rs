//! Guest-wide settings the host adjusts: clock, RNG, identity, uptime.

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
/// RNDRESEEDCRNG = _IO('R', 0x07).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `data` into the kernel's pool, credits it as entropy and reseeds
/// the kernel's CRNG from it, so a restored snapshot stops sharing its RNG
/// output with its siblings. The reseed matters: once the CRNG is ready,
/// new entropy only reaches it at the next periodic reseed (up to a minute
/// later), and until then every clone of a template would read the same
/// /dev/urandom bytes.
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
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) };
    if r != 0 {
        return Err(Error::io(
            "ioctl(RNDRESEEDCRNG)",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Where the agent keeps the machine id; the root image's /etc/machine-id
/// is a symlink to it (the image itself is read-only).
pub const MACHINE_ID_PATH: &str = "/run/machine-id";

/// Checks a hostname: 1..=64 characters of letters, digits, `.` and `-`.
pub fn check_hostname(h: &str) -> Result<()> {
    let ok = !h.is_empty()
        && h.len() <= 64
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "hostname {h:?} must be 1..=64 characters of [A-Za-z0-9.-]"
        )))
    }
}

/// Checks a machine id: 32 lowercase hex digits, not all zero.
pub fn check_machine_id(id: &str) -> Result<()> {
    let ok = id.len() == 32
        && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && id.bytes().any(|b| b != b'0');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "machine_id {id:?} must be 32 lowercase hex digits, not all zero"
        )))
    }
}

/// Sets the guest's hostname and machine id. Like the clock, refused
/// outside a VM, where it would rename the host.
pub fn set_identity(hostname: &str, machine_id: &str, pid1: bool) -> Result<()> {
    check_hostname(hostname)?;
    check_machine_id(machine_id)?;
    if !pid1 {
        return Err(Error::FailedPrecondition(
            "refusing to set the hostname: the agent is not the guest's init".into(),
        ));
    }
    nix::unistd::sethostname(hostname).map_err(|e| Error::errno("sethostname", e))?;
    // Written beside and renamed, so a reader never sees half an id.
    let tmp = format!("{MACHINE_ID_PATH}.new");
    std::fs::write(&tmp, format!("{machine_id}\n"))
        .and_then(|()| std::fs::rename(&tmp, MACHINE_ID_PATH))
        .map_err(|e| Error::io(format!("writing {MACHINE_ID_PATH}"), e))
}

/// The guest's hostname and machine id (empty when unset or unreadable).
pub fn identity() -> (String, String) {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id = std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    (host, id)
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
    fn identity_is_checked_before_anything_changes() {
        let id = "0123456789abcdef0123456789abcdef";
        for bad in ["", "a b", "x_y", &"h".repeat(65)] {
            let e = set_identity(bad, id, true).unwrap_err();
            assert!(e.to_string().contains("hostname"), "{bad:?}: {e}");
        }
        for bad in [
            "",
            "0123",
            &"0".repeat(32),
            &"A".repeat(32),
            &"g".repeat(32),
        ] {
            let e = set_identity("pod-1", bad, true).unwrap_err();
            assert!(e.to_string().contains("machine_id"), "{bad:?}: {e}");
        }
        let e = set_identity("pod-1", id, false).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
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
