//! The crate's one error type. Every variant that comes from a round trip
//! names the request (`op`), so a message read far from here still says
//! what was being asked of the VMM.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request line the VMM cannot parse (the server's side).
    #[error("bad request: {0}")]
    BadRequest(#[source] serde_json::Error),

    #[error("{op}: cannot encode the request: {source}")]
    Encode {
        op: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("{op}: connecting to {path}: {source}")]
    Connect {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Setting the timeouts, sending, or reading the reply.
    #[error("{op}: {what}: {source}")]
    Io {
        op: &'static str,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("{op}: VMM closed the connection without a reply")]
    NoReply { op: &'static str },

    #[error("{op}: reply longer than {limit} bytes")]
    ReplyTooLong { op: &'static str, limit: u64 },

    #[error("{op}: bad reply {line:?}: {source}")]
    BadReply {
        op: &'static str,
        line: String,
        #[source]
        source: serde_json::Error,
    },

    /// The VMM answered `{"ok":false,"error":message}`.
    #[error("{op}: {message}")]
    Refused { op: &'static str, message: String },
}
