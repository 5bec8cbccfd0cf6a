//! A terminal for the container process, allocated inside the container (its
//! own devpts instance), with the master handed to the agent.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};

use super::{fail, mounts, R};
use crate::channel;
use crate::plan::FromInit;

pub fn setup(sock: &UnixStream, new_root: bool) -> R<()> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| fail(format!("opening /dev/ptmx: {e}")))?;
    grantpt(&master).map_err(|e| fail(format!("grantpt: {e}")))?;
    unlockpt(&master).map_err(|e| fail(format!("unlockpt: {e}")))?;
    let name = ptsname_r(&master).map_err(|e| fail(format!("ptsname: {e}")))?;
    let slave: OwnedFd = nix::fcntl::open(
        Path::new(&name),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map(|fd| {
        // SAFETY: open just returned this fd.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    })
    .map_err(|e| fail(format!("opening {name}: {e}")))?;

    channel::send(sock, &FromInit::Tty, Some(master.as_raw_fd()))
        .map_err(|e| fail(format!("sending tty master: {e}")))?;
    drop(master);

    for target in 0..=2 {
        nix::unistd::dup2(slave.as_raw_fd(), target)
            .map_err(|e| fail(format!("dup2 tty to fd {target}: {e}")))?;
    }
    // SAFETY: ioctl on our own stdin with an integer argument.
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
        return Err(fail(format!(
            "making {name} the controlling terminal: {}",
            std::io::Error::last_os_error()
        )));
    }
    drop(slave);
    if new_root {
        mounts::bind_console(Path::new(&name))?;
    }
    Ok(())
}
