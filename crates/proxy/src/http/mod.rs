//! The HTTP side of the proxy: serving clients, routing, forwarding.

pub mod body;
pub mod forward;
pub mod route;
pub mod server;
pub(crate) mod upgrade;

use ::http::HeaderName;

// Header names the proxy reads or writes on every request, built once: looking up by `&str`
// parses the name again on each call.
/// `traceparent`.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `x-request-id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `grpc-status`.
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`.
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `x-trellis-failure`.
pub static X_TRELLIS_FAILURE: HeaderName = HeaderName::from_static("x-trellis-failure");
