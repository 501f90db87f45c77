//! The proxy's compact, validated model. Everything here is already checked: the proxy never
//! has to handle a dangling reference or a zero weight.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use serde::Serialize;

use crate::{
    resource::{Environment, LbKind, Locality, NamespacedName, Protocol},
    value::RegexValue,
};

/// The whole configuration of one proxy.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProxyConfig {
    /// The workload this proxy serves, if any.
    pub local: Option<LocalWorkload>,
    /// Every service, by `namespace/name`.
    pub services: BTreeMap<NamespacedName, ServiceConfig>,
    /// Clusters (a service port and its endpoints), by key `namespace/name:port`.
    pub clusters: BTreeMap<String, ClusterConfig>,
    /// Explicit-mode local listeners.
    pub tcp_binds: Vec<BindConfig>,
}

/// The workload served by this proxy.
#[derive(Clone, Debug, Serialize)]
pub struct LocalWorkload {
    /// Its id.
    pub id: NamespacedName,
    /// The first service that selects it (the "source service" of its outbound traffic).
    pub service: Option<NamespacedName>,
    /// Environment.
    pub environment: Environment,
    /// Where the inbound listener forwards, by service port.
    pub inbound_ports: Vec<InboundPort>,
}

/// One inbound forwarding target.
#[derive(Clone, Debug, Serialize)]
pub struct InboundPort {
    /// Service port callers used.
    pub port: u16,
    /// Local address of the application.
    pub target: SocketAddr,
    /// Protocol.
    pub protocol: Protocol,
    /// The service.
    pub service: NamespacedName,
}

/// A service and its ports.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceConfig {
    /// `NAME.NAMESPACE`, as callers name it (shared: it labels every request).
    pub host: Arc<str>,
    /// Ports in declaration order.
    pub ports: Vec<PortConfig>,
}

/// A service port with its routes.
#[derive(Clone, Debug, Serialize)]
pub struct PortConfig {
    /// Port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Routes in precedence order; the last one is the default route to the service itself
    /// unless an HTTPRoute took over the port.
    pub routes: Vec<RouteConfig>,
}

/// One route rule.
#[derive(Clone, Debug, Serialize)]
pub struct RouteConfig {
    /// `namespace/route[.rule]` or `default` (shared: it labels every request).
    pub name: Arc<str>,
    /// Any match selects the route; empty means all.
    pub matches: Vec<MatchConfig>,
    /// Weighted clusters (never empty; weights never all zero).
    pub backends: Vec<WeightedCluster>,
    /// Request header edits.
    pub request_headers: HeaderEdits,
    /// Response header edits.
    pub response_headers: HeaderEdits,
    /// Deadline until response headers, retries included.
    pub timeout: Option<Duration>,
    /// Retry policy.
    pub retry: Option<RetryConfig>,
}

/// A match.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MatchConfig {
    /// Path.
    pub path: Option<PathMatchConfig>,
    /// Method (upper-case).
    pub method: Option<String>,
    /// Headers (lower-case names).
    pub headers: Vec<(String, ValueMatcher)>,
    /// Query parameters.
    pub query: Vec<(String, ValueMatcher)>,
}

/// Path matchers.
#[derive(Clone, Debug, Serialize)]
pub enum PathMatchConfig {
    /// Equal.
    Exact(String),
    /// Segment prefix (stored without trailing slash, `/` matches everything).
    Prefix(String),
    /// Regex.
    Regex(RegexValue),
}

/// Value matchers.
#[derive(Clone, Debug, Serialize)]
pub enum ValueMatcher {
    /// Equal.
    Exact(String),
    /// Regex.
    Regex(RegexValue),
}

/// A cluster with a weight.
#[derive(Clone, Debug, Serialize)]
pub struct WeightedCluster {
    /// Cluster key.
    pub cluster: String,
    /// Weight.
    pub weight: u32,
}

/// Header edits.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HeaderEdits {
    /// Overwrite.
    pub set: Vec<(String, String)>,
    /// Append.
    pub add: Vec<(String, String)>,
    /// Remove.
    pub remove: Vec<String>,
}

impl HeaderEdits {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// Retry policy.
#[derive(Clone, Debug, Serialize)]
pub struct RetryConfig {
    /// Retries after the first try.
    pub attempts: u32,
    /// Retried HTTP status codes.
    pub codes: Vec<u16>,
    /// Retried gRPC status codes (numeric).
    pub grpc_codes: Vec<u32>,
    /// Base back-off.
    pub backoff: Duration,
    /// Timeout of each try.
    pub per_try_timeout: Option<Duration>,
}

/// A service port and its endpoints, with the backend policy that applies.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterConfig {
    /// The service.
    pub service: NamespacedName,
    /// The service port.
    pub port: u16,
    /// Upstream protocol.
    pub protocol: Protocol,
    /// Endpoints.
    pub endpoints: Vec<EndpointConfig>,
    /// Policy.
    pub policy: BackendPolicy,
}

/// One endpoint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EndpointConfig {
    /// Address to connect to.
    pub addr: SocketAddr,
    /// Weight (>= 1).
    pub weight: u32,
    /// Workload.
    pub workload: NamespacedName,
    /// Environment.
    pub environment: Environment,
    /// Locality.
    pub locality: Locality,
}

/// Effective backend policy with defaults filled in.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendPolicy {
    /// Algorithm.
    pub lb: LbKind,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Idle pooled connection lifetime.
    pub idle_timeout: Duration,
    /// Max connections (all endpoints).
    pub max_connections: u32,
    /// Max requests waiting for admission.
    pub max_pending: u32,
    /// Max requests in flight.
    pub max_requests: u32,
    /// Consecutive failures that eject (0 = outlier detection off).
    pub consecutive_failures: u32,
    /// First ejection time.
    pub base_ejection: Duration,
    /// Ejection cap.
    pub max_ejection: Duration,
    /// Max share of endpoints ejected.
    pub max_ejection_percent: u32,
    /// Retry budget: percent of requests.
    pub retry_budget_percent: u32,
    /// Retry budget floor per second.
    pub retry_min_per_second: u32,
}

impl Default for BackendPolicy {
    fn default() -> Self {
        Self {
            lb: LbKind::PeakEWMA,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_pending: 1024,
            max_requests: 1024,
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
            retry_budget_percent: 20,
            retry_min_per_second: 10,
        }
    }
}

/// An explicit-mode listener.
#[derive(Clone, Debug, Serialize)]
pub struct BindConfig {
    /// Where to listen.
    pub bind: SocketAddr,
    /// The service.
    pub service: NamespacedName,
    /// The service port.
    pub port: u16,
    /// Cluster key.
    pub cluster: String,
    /// Protocol of the service port.
    pub protocol: Protocol,
}

/// The cluster key of a service port.
pub fn cluster_key(service: &NamespacedName, port: u16) -> String {
    format!("{}/{}:{}", service.namespace, service.name, port)
}
