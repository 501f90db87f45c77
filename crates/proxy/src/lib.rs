//! Trellis data plane: an L4/L7 proxy with routing, load balancing, resilience, and a failure
//! class on every request and connection.
//!
//! [`Proxy::start`] binds every listener and returns a handle; [`Proxy::run`] serves until
//! SIGTERM, reloading on SIGHUP or when the config file changes. The request path is a list
//! of named stages ([`stages`]); `docs/ARCHITECTURE.md` walks through them.

pub(crate) mod access_log;
pub(crate) mod adaptive;
pub(crate) mod admin;
pub(crate) mod cluster;
pub mod control_link;
pub mod credentials;
pub(crate) mod decimal;
pub mod demand;
pub(crate) mod drain;
pub(crate) mod error;
pub(crate) mod fasthash;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub(crate) mod h1;
pub(crate) mod h2_client;
pub(crate) mod h2_stream;
pub mod handoff;
pub(crate) mod http;
pub mod identity;
pub(crate) mod inbound;
pub(crate) mod labels;
pub(crate) mod links;
pub(crate) mod listen;
pub(crate) mod metrics;
pub(crate) mod mirrors;
pub(crate) mod mtls;
pub(crate) mod mux;
pub mod net;
pub(crate) mod notify;
pub mod options;
pub(crate) mod otlp;
pub(crate) mod outbound;
pub(crate) mod peer_stream;
pub(crate) mod pipe;
pub(crate) mod pool;
pub(crate) mod ratelimit;
pub(crate) mod reporter;
pub mod run;
pub(crate) mod shared;
pub(crate) mod slot;
pub(crate) mod snapshot;
pub(crate) mod spill_link;
pub(crate) mod stages;
pub(crate) mod summary;
pub(crate) mod tap;
pub(crate) mod tap_link;
pub(crate) mod tcp;
pub(crate) mod telemetry;
pub(crate) mod trace;
pub mod xds;

#[cfg(test)]
mod test_util;

pub use http::server::ServerLimits;
pub use listen::BindError;
pub use options::{Options, Source};
pub use otlp::{check_collector, check_endpoint, BadEndpoint, CollectorError, CollectorTls};
pub use run::{load, Loaded, Proxy, ProxyError, Stopped};
pub use shared::Services;
pub use trellis_taxonomy::FailureClass;
