//! Proxy metrics, registered on a registry handed down by the caller (never a global one).

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use std::sync::Arc;

use crate::FailureClass;

/// A label value shared by every request that carries it: built once per config (service,
/// workload, route), cloned per request by a reference count. Empty means "unknown".
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Label(Option<Arc<str>>);

impl Label {
    /// The value, or "unknown".
    pub fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or("unknown")
    }
}

impl From<Arc<str>> for Label {
    fn from(s: Arc<str>) -> Self {
        Self(Some(s))
    }
}

impl From<&str> for Label {
    fn from(s: &str) -> Self {
        Self(Some(s.into()))
    }
}

impl EncodeLabelValue for Label {
    fn encode(
        &self,
        e: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(e, self.as_str())
    }
}

impl serde::Serialize for Label {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Traffic direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    /// From the local workload to a service.
    outbound,
    /// From a peer to the local workload.
    inbound,
}

impl Direction {
    /// Name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::outbound => "outbound",
            Self::inbound => "inbound",
        }
    }
}

/// Labels of request metrics. Missing values are "unknown".
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// Direction.
    pub direction: Direction,
    /// Source service (the local workload's for outbound).
    pub src_service: Label,
    /// Destination service.
    pub dst_service: Label,
    /// Destination workload.
    pub dst_workload: Label,
    /// Destination environment.
    pub dst_environment: &'static str,
    /// Route name.
    pub route: Label,
    /// HTTP status sent to the client.
    pub status_code: u16,
    /// gRPC status, empty when not gRPC.
    pub grpc_status: Option<u32>,
    /// Failure class.
    pub failure_class: FailureClass,
}

/// Labels of TCP connection metrics.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    /// Direction.
    pub direction: Direction,
    /// Destination service.
    pub dst_service: Label,
    /// Destination workload.
    pub dst_workload: Label,
    /// Failure class.
    pub failure_class: FailureClass,
}

/// Labels keyed by direction and service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ServiceLabels {
    /// Direction.
    pub direction: Direction,
    /// Destination service.
    pub dst_service: Label,
}

/// Labels keyed by cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ClusterLabels {
    /// `namespace/service:port`.
    pub cluster: String,
}

/// Labels of retry decisions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RetryLabels {
    /// Cluster.
    pub cluster: String,
    /// `sent` or `budget_exhausted`.
    pub outcome: &'static str,
}

/// Labels of ejections.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EndpointLabels {
    /// Cluster.
    pub cluster: String,
    /// Endpoint address.
    pub endpoint: String,
}

/// Result label.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

fn latency() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// Every metric of the proxy.
#[derive(Clone)]
pub struct Metrics {
    /// Requests by outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency (until the response ended).
    pub request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// TCP connections by outcome.
    pub tcp_connections: Family<TcpLabels, Counter>,
    /// Open TCP connections.
    pub tcp_open: Family<ServiceLabels, Gauge>,
    /// Bytes from client to upstream.
    pub tcp_sent: Family<ServiceLabels, Counter>,
    /// Bytes from upstream to client.
    pub tcp_received: Family<ServiceLabels, Counter>,
    /// Open upstream connections in the pools.
    pub pool_open: Family<ClusterLabels, Gauge>,
    /// Upstream connect attempts.
    pub pool_connects: Family<EndpointLabels, Counter>,
    /// Retries.
    pub retries: Family<RetryLabels, Counter>,
    /// Ejections.
    pub ejections: Family<EndpointLabels, Counter>,
    /// Currently ejected endpoints.
    pub ejected: Family<ClusterLabels, Gauge>,
    /// Requests refused by circuit breakers.
    pub overflows: Family<ClusterLabels, Counter>,
    /// Config reloads.
    pub reloads: Family<ResultLabels, Counter>,
}

impl Metrics {
    /// Create and register under `reg` (the caller gives it the `trellis` prefix).
    pub fn register(reg: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency),
            tcp_connections: Family::default(),
            tcp_open: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            pool_open: Family::default(),
            pool_connects: Family::default(),
            retries: Family::default(),
            ejections: Family::default(),
            ejected: Family::default(),
            overflows: Family::default(),
            reloads: Family::default(),
        };
        reg.register(
            "http_requests",
            "HTTP requests by outcome (unstable)",
            m.requests.clone(),
        );
        reg.register_with_unit(
            "http_request_duration",
            "HTTP request duration until the response ended (unstable)",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        reg.register(
            "tcp_connections",
            "TCP connections by outcome (unstable)",
            m.tcp_connections.clone(),
        );
        reg.register(
            "tcp_connections_open",
            "Open proxied TCP connections (unstable)",
            m.tcp_open.clone(),
        );
        reg.register_with_unit(
            "tcp_sent",
            "Bytes sent to upstreams over TCP (unstable)",
            Unit::Bytes,
            m.tcp_sent.clone(),
        );
        reg.register_with_unit(
            "tcp_received",
            "Bytes received from upstreams over TCP (unstable)",
            Unit::Bytes,
            m.tcp_received.clone(),
        );
        reg.register(
            "upstream_connections_open",
            "Open pooled upstream connections (unstable)",
            m.pool_open.clone(),
        );
        reg.register(
            "upstream_connects",
            "Upstream connections opened (unstable)",
            m.pool_connects.clone(),
        );
        reg.register("retries", "Retry decisions (unstable)", m.retries.clone());
        reg.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection (unstable)",
            m.ejections.clone(),
        );
        reg.register(
            "outlier_ejected_endpoints",
            "Endpoints currently ejected (unstable)",
            m.ejected.clone(),
        );
        reg.register(
            "circuit_breaker_overflows",
            "Requests refused by circuit breakers (unstable)",
            m.overflows.clone(),
        );
        reg.register(
            "config_reloads",
            "Config reloads by result (unstable)",
            m.reloads.clone(),
        );
        m
    }
}
