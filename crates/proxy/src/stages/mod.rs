//! The request path as named stages, each in its own file, in the order a request meets
//! them:
//!
//! 1. accept and sniff (the connection: [`crate::listen`], [`crate::http::server`]);
//! 2. [`route`]: authority → service port → route → weighted backend (outbound; inbound
//!    picks the local workload's port);
//! 3. [`policy`]: mutual TLS required, authorization (rate and concurrency limits later);
//! 4. [`fault`]: a route's injected delays and aborts, rolled for each try inside
//!    [`attempt`]'s retry loop;
//!    [`mirror`]: a copy of a share of the requests to another backend, compared;
//! 5. [`balance`]: the cluster's circuit breaker, then an endpoint;
//! 6. [`attempt`]: the tries, with timeouts, retries within the budget and the replayed body;
//! 7. [`respond`]: the proxy's own answer for a failure, or the upstream's relayed;
//! 8. [`record`]: one access-log line and its metrics, for every ending.
//!
//! Stages are plain functions over the request and its record rather than tower layers:
//! each is called once per request in a fixed order, so a static chain costs no boxing, no
//! `poll_ready` and no type erasure (measured in `docs/benchmarks.md`). Each stage is
//! testable in-process; [`crate::inbound`] and [`crate::outbound`] compose them.

pub(crate) mod attempt;
pub(crate) mod balance;
pub(crate) mod exchange;
pub(crate) mod fault;
pub(crate) mod mirror;
pub(crate) mod policy;
pub(crate) mod record;
pub(crate) mod respond;
pub(crate) mod route;

use std::sync::Arc;

use http::Response;

use crate::{cluster::Cluster, http::body::ProxyBody};

/// What to do with a request once it is routed and admitted. Routing is synchronous; exactly
/// one of these is awaited, so the per-request future is the size of one forward, not of
/// every branch. The request itself stays where it was parsed: routing and forwarding
/// borrow it (it is 240 bytes, and every move is a copy).
pub(crate) enum Next<'a> {
    /// The proxy answers itself.
    Reply(Response<ProxyBody>),
    /// Forward to a cluster.
    Forward(attempt::Plan<'a>, Box<record::Record>),
    /// HTTP/1.1 Upgrade to a cluster.
    Upgrade(Arc<Cluster>, Box<record::Record>),
    /// CONNECT tunnel to a cluster.
    Tunnel(Arc<Cluster>, Box<record::Record>),
    /// A Service the config does not hold, to ask the control plane for (outbound, xDS).
    Discover(trellis_model::NamespacedName, Box<record::Record>),
}
