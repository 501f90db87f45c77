//! The HTTP side of the proxy: serving client connections, bodies, headers, the authority
//! a request names.

pub(crate) mod authority;
pub(crate) mod body;
pub(crate) mod headers;
pub(crate) mod proxy_status;
pub(crate) mod server;
pub(crate) mod upgrade;

use ::http::HeaderName;

/// Which listener a connection came in on.
#[derive(Clone, Debug)]
pub(crate) enum Listener {
    /// The outbound listener: the service is named by the authority.
    Outbound,
    /// The inbound listener: the local workload is the destination.
    Inbound,
    /// An explicit-mode bind for one service port.
    Bind {
        /// Cluster key.
        cluster: String,
    },
}

// Header names the proxy reads or writes on every request, built once: looking up by `&str`
// parses the name again on each call.
/// `traceparent`.
pub(crate) static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `x-request-id`.
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `grpc-status`.
pub(crate) static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`.
pub(crate) static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `x-trellis-failure`.
pub(crate) static X_TRELLIS_FAILURE: HeaderName = HeaderName::from_static("x-trellis-failure");
/// `x-trellis-peer`: who the caller is, from its proxy (believed only over mutual TLS).
pub(crate) static X_TRELLIS_PEER: HeaderName = HeaderName::from_static("x-trellis-peer");
