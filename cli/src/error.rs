//! The `thaw` CLI's one error type.

use std::path::PathBuf;
use std::process::ExitStatus;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] thaw_config::Error),
    #[error("template store {store}: {source}")]
    Store {
        store: PathBuf,
        #[source]
        source: thaw_snapshots::Error,
    },
    #[error("running {vmm}: {source}")]
    Spawn {
        vmm: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{vmm} template build failed ({status})")]
    BuildFailed { vmm: PathBuf, status: ExitStatus },
}
