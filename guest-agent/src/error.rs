//! The agent's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in the agent. Errors that reach the shim are
/// turned into ttrpc statuses with [`Error::code`] and their `Display` text,
/// so each variant says what was being done and to what.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The container's spec asks for something wrong or unsupported.
    #[error("spec field {field}: {reason}")]
    Spec { field: String, reason: String },

    /// The request itself is malformed (ids, ports, sizes).
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },

    #[error("{kind} {id:?} already exists")]
    AlreadyExists { kind: &'static str, id: String },

    /// The object exists but is in the wrong state for the call.
    #[error("{0}")]
    FailedPrecondition(String),

    /// A system call or file operation failed; `what` names it and its target.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{what} {}: {source}", path.display())]
    Path {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The container init helper reported a failure while setting up.
    #[error("container setup failed: {0}")]
    Setup(String),

    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn spec(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Spec {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub fn path(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Path {
            what,
            path: path.into(),
            source,
        }
    }

    pub fn errno(what: impl Into<String>, errno: nix::errno::Errno) -> Self {
        Error::io(what, std::io::Error::from(errno))
    }

    /// The ttrpc status code this error maps to.
    pub fn code(&self) -> ttrpc::Code {
        match self {
            Error::Spec { .. } | Error::InvalidRequest(_) => ttrpc::Code::INVALID_ARGUMENT,
            Error::NotFound { .. } => ttrpc::Code::NOT_FOUND,
            Error::AlreadyExists { .. } => ttrpc::Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Error::Io { .. } | Error::Path { .. } | Error::Setup(_) | Error::Internal(_) => {
                ttrpc::Code::INTERNAL
            }
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}
