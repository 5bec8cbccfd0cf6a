//! Transport conventions shared by the shim and the agent.

use std::path::{Path, PathBuf};

/// The host's vsock context id (as seen from the guest).
pub const HOST_CID: u32 = 2;

/// Host port the agent dials for the control (ttrpc) connection.
pub const CONTROL_PORT: u32 = 1024;

/// A suggested first host port for stdio streams; everything at or above it
/// is free for the shim to hand out.
pub const FIRST_STDIO_PORT: u32 = 0x1_0000;

/// Bumped on incompatible protocol changes; reported by `Health`.
pub const PROTOCOL_VERSION: u32 = 8;

/// The host Unix socket that a guest-initiated vsock connection to host
/// `port` arrives on, given the VMM's vsock socket `uds` (Firecracker's
/// convention: `<uds>_<port>`).
pub fn host_socket_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// A sync ttrpc client on a control connection the shim accepted on
/// `<uds>_1024`. The client owns the socket from here on.
pub fn sync_client(
    stream: std::os::unix::net::UnixStream,
) -> ttrpc::Result<crate::agent_ttrpc::AgentClient> {
    use std::os::fd::IntoRawFd;
    let client = ttrpc::Client::new(stream.into_raw_fd())?;
    Ok(crate::agent_ttrpc::AgentClient::new(client))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_socket_path_appends_port() {
        assert_eq!(
            host_socket_path(Path::new("/run/thaw/abc/vsock.sock"), CONTROL_PORT),
            PathBuf::from("/run/thaw/abc/vsock.sock_1024")
        );
    }
}
