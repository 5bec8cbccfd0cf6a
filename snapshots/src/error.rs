//! The crate's one error type: snapshot files and the template store.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not a thaw snapshot (bad magic)")]
    BadMagic(String),
    #[error("{path}: snapshot format version {found}, this thaw reads version {expected}")]
    Version {
        path: String,
        found: u32,
        expected: u32,
    },
    #[error("{path}: taken on another CPU: {reason}")]
    Cpu { path: String, reason: String },
    #[error("{path}: corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("{path}: cannot serialize state: {reason}")]
    Encode { path: String, reason: String },
    #[error("{0:?} is not a template key (expected 64 lowercase hex digits)")]
    BadKey(String),
    #[error("no template {0} in the store")]
    NotFound(String),
    #[error("template record {path}: {reason}")]
    Record { path: String, reason: String },
    #[error("building template {key}: {reason}")]
    Build { key: String, reason: String },
    #[error("template {key} failed to build {age_secs} s ago and is not retried before {retry_after_secs} s: {reason}")]
    RecentFailure {
        key: String,
        age_secs: u64,
        retry_after_secs: u64,
        reason: String,
    },
}

/// Wraps an I/O error with what was being done and to which path.
pub(crate) fn io(
    what: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.display().to_string();
    move |source| Error::Io { what, path, source }
}
