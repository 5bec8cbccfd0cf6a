//! What the agent does as the guest's init before serving: the early
//! filesystems, the loopback interface, and a clean VM reset when all else
//! fails (init must never exit: the kernel would panic).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

struct EarlyMount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID: MsFlags = MsFlags::MS_NOSUID;
const NODEV: MsFlags = MsFlags::MS_NODEV;
const NOEXEC: MsFlags = MsFlags::MS_NOEXEC;

fn early_mounts() -> [EarlyMount; 8] {
    [
        EarlyMount {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: NOSUID.union(NODEV).union(NOEXEC),
            data: None,
        },
        EarlyMount {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: NOSUID.union(NODEV).union(NOEXEC),
            data: None,
        },
        EarlyMount {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: NOSUID,
            data: Some("mode=0755"),
        },
        EarlyMount {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: NOSUID.union(NOEXEC),
            data: Some("gid=5,mode=0620,ptmxmode=0666"),
        },
        EarlyMount {
            source: "shm",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: NOSUID.union(NODEV),
            data: Some("mode=1777"),
        },
        EarlyMount {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: NOSUID.union(NODEV),
            data: Some("mode=0755"),
        },
        EarlyMount {
            source: "tmpfs",
            target: "/tmp",
            fstype: "tmpfs",
            flags: NOSUID.union(NODEV),
            data: Some("mode=1777"),
        },
        EarlyMount {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: NOSUID.union(NODEV).union(NOEXEC),
            data: Some("nsdelegate"),
        },
    ]
}

/// Mounts the early filesystems. Failures are returned as messages (to be
/// logged once logging works) and never stop the boot.
pub fn early_setup() -> Vec<String> {
    let mut problems = Vec::new();
    for m in early_mounts() {
        let target = Path::new(m.target);
        if !target.exists() {
            if let Err(e) = fs::create_dir_all(target) {
                problems.push(format!("creating {}: {e}", m.target));
                continue;
            }
        }
        match mount(Some(m.source), target, Some(m.fstype), m.flags, m.data) {
            Ok(()) => {}
            // devtmpfs is often mounted by the kernel already.
            Err(Errno::EBUSY) => {}
            Err(e) => problems.push(format!("mounting {} on {}: {e}", m.fstype, m.target)),
        }
    }
    for (target, name) in [
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ] {
        if fs::symlink_metadata(name).is_err() {
            if let Err(e) = symlink(target, name) {
                problems.push(format!("symlink {name}: {e}"));
            }
        }
    }
    if let Err(e) = loopback_up() {
        problems.push(format!("bringing up lo: {e}"));
    }
    problems
}

/// struct ifreq with the flags member of its union.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket().
    let _owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write a struct ifreq.
    unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reads `thaw.<key>=<value>` from the kernel command line.
pub fn cmdline_param(key: &str) -> Option<String> {
    let cmdline = fs::read_to_string("/proc/cmdline").ok()?;
    let prefix = format!("thaw.{key}=");
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix).map(str::to_string))
}

/// Last resort: flush and reset the VM. The guest boots with `reboot=k`
/// (no ACPI, so a power-off would only halt the CPU and look alive to the
/// host); the reset reaches the VMM, which ends the VM, and the host reports
/// the sandbox's tasks as exited.
pub fn fatal_reset() -> ! {
    nix::unistd::sync();
    // SAFETY: reboot(2) with a documented command; it does not return on
    // success.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
