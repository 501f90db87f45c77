//! The HTTP side of the proxy: serving client connections, bodies, headers, the authority
//! a request names.

pub(crate) mod authority;
pub(crate) mod body;
pub(crate) mod headers;
pub(crate) mod proxy_status;
pub(crate) mod server;
pub(crate) mod spare;
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

/// The target a request is sent upstream with: its path and query (origin form), `/` when it
/// has none, and a `/` before a query that came without a path (`http://host?q` in absolute
/// form; RFC 9112 §3.2.1), which would be no valid target on its own.
pub(crate) fn origin_form(uri: &::http::Uri) -> ::http::uri::PathAndQuery {
    match uri.path_and_query() {
        Some(p) if p.as_str().starts_with('/') || p.as_str() == "*" => p.clone(),
        Some(p) => format!("/{}", p.as_str())
            .parse()
            .unwrap_or_else(|_| ::http::uri::PathAndQuery::from_static("/")),
        None => ::http::uri::PathAndQuery::from_static("/"),
    }
}
