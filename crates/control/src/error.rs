//! Why the control plane could not start, or could not use its store or CA.

use std::{net::SocketAddr, path::PathBuf};

use trellis_store::StoreError;

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Which listener.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The CA could not be loaded or made.
    #[error("certificate authority: {0}")]
    Ca(#[from] trellis_identity::CaError),
    /// The stored identity setup does not fit the options.
    #[error("{0}")]
    Identity(String),
    /// The data directory or token file could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}
