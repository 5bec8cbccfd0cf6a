//! The crate's one error type.
//!
//! Contract: every variant says what was being done (the operation, with the
//! link index or name, address or route it was about) and, for kernel
//! refusals, the errno, by name and number, so a log line alone explains a
//! failed pod network setup.

use std::io;

/// Everything that can go wrong talking rtnetlink.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The NETLINK_ROUTE socket could not be made, bound or connected.
    #[error("opening a NETLINK_ROUTE socket: {0}")]
    Open(#[source] io::Error),
    /// The network namespace at `path` could not be opened or entered.
    #[error("entering network namespace {}: {source}", path.display())]
    Netns {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    /// send/recv on the socket failed.
    #[error("{op}: netlink socket: {source}")]
    Socket {
        op: String,
        #[source]
        source: io::Error,
    },
    /// The kernel answered the request with NLMSG_ERROR (or a failed
    /// NLMSG_DONE) carrying `errno`; `message` is the kernel's extended ack
    /// text when it gave one ("Exclusivity flag on, cannot modify", …).
    #[error("{op}: {} ({}){}", errno_name(*errno), io::Error::from_raw_os_error(*errno),
            message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Kernel {
        op: String,
        errno: i32,
        message: Option<String>,
    },
    /// A reply that does not decode or does not make sense.
    #[error("{op}: bad netlink reply: {detail}")]
    Reply { op: String, detail: String },
    /// No link of that name in the current network namespace.
    #[error("link {0:?} not found")]
    LinkNotFound(String),
    /// A request the crate refuses before sending it.
    #[error("{op}: {reason}")]
    Invalid { op: String, reason: String },
    #[error("invalid MAC address {0:?} (want aa:bb:cc:dd:ee:ff)")]
    InvalidMac(String),
    #[error("invalid IP network {input:?}: {reason}")]
    InvalidIpNet { input: String, reason: String },
}

impl Error {
    /// The kernel's errno, for `Kernel` errors (and `Socket` ones with an OS
    /// error), so callers can tell EEXIST from the rest.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { errno, .. } => Some(*errno),
            Error::Socket { source, .. } | Error::Netns { source, .. } | Error::Open(source) => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

/// The symbolic name of the errnos rtnetlink gives back in practice; the
/// numeric form for the rest (Display adds the libc text either way).
fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ERANGE => "ERANGE",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETDOWN => "ENETDOWN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ENOBUFS => "ENOBUFS",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_error_names_op_and_errno() {
        let e = Error::Kernel {
            op: "adding address 10.1.2.3/24 to link 7".into(),
            errno: libc::EEXIST,
            message: None,
        };
        let s = e.to_string();
        assert!(
            s.starts_with("adding address 10.1.2.3/24 to link 7: EEXIST ("),
            "{s}"
        );
        assert!(s.contains("os error 17"), "{s}");
        assert_eq!(e.errno(), Some(libc::EEXIST));
        let odd = Error::Kernel {
            op: "x".into(),
            errno: 4000,
            message: Some("Invalid handle".into()),
        };
        assert!(odd.to_string().starts_with("x: errno 4000 ("), "{odd}");
        assert!(odd.to_string().ends_with("): Invalid handle"), "{odd}");
    }
}
