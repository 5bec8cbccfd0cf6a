//! The shim's one error type. Every variant carries enough context for the
//! message to reach a `ctr` user and make sense on its own.

use containerd_shim::protos::ttrpc::{self, Code};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file or a pod annotation (the message names which).
    #[error(transparent)]
    Config(#[from] thaw_config::Error),

    #[error("invalid OCI spec: {0}")]
    InvalidSpec(String),

    #[error("invalid request: {0}")]
    InvalidArgument(String),

    #[error("rootfs: {0}")]
    Rootfs(String),

    #[error("image cache: {0}")]
    ImageCache(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("VMM control: {0}")]
    Vmm(#[from] thaw_vmm_api::Error),

    #[error("VMM control: the VMM was not started")]
    VmmNotStarted,

    #[error("sandbox: {0}")]
    Sandbox(String),

    #[error("guest agent: {0}")]
    Agent(String),

    /// The agent's connection closed before its first answer.
    #[error("guest agent: {0} (the connection closed)")]
    AgentClosed(String),

    #[error("{0} not found")]
    NotFound(String),

    #[error("{0} already exists")]
    AlreadyExists(String),

    #[error("{0}")]
    FailedPrecondition(String),

    #[error("{0}")]
    Unimplemented(String),

    #[error("shim: {0}")]
    Shim(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    fn code(&self) -> Code {
        match self {
            Error::Config(_) | Error::InvalidSpec(_) | Error::InvalidArgument(_) => {
                Code::INVALID_ARGUMENT
            }
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            Error::Agent(_)
            | Error::AgentClosed(_)
            | Error::Sandbox(_)
            | Error::Vmm(_)
            | Error::VmmNotStarted => Code::UNAVAILABLE,
            _ => Code::INTERNAL,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

impl From<Error> for containerd_shim::Error {
    fn from(e: Error) -> Self {
        containerd_shim::Error::Other(e.to_string())
    }
}

/// Adds context to io::Result values.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), std::io::Error::from(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unimplemented_maps_to_unimplemented_code() {
        let e: ttrpc::Error = Error::Unimplemented("checkpoint is not supported".into()).into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::UNIMPLEMENTED);
                assert!(s.message().contains("checkpoint"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
