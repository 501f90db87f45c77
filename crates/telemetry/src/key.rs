//! A series' key as the control plane keeps it, and what it adds up per period.

use std::sync::Arc;

use serde::Serialize;
use trellis_taxonomy::FailureClass;

use crate::hist::Histogram;

/// Which side of a hop the reporting proxy was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The reporter called the peer.
    Outbound,
    /// The peer called the reporter's workload.
    Inbound,
}

/// HTTP (and gRPC) requests, or TCP connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Requests.
    Http,
    /// Connections.
    Tcp,
}

/// Everything a series is told apart by. Strings are shared (interned by the store).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// Direction.
    pub direction: Direction,
    /// Protocol.
    pub protocol: Protocol,
    /// The reporting workload, `namespace/name` (or `node:ID` for a proxy with none).
    pub workload: Arc<str>,
    /// Its environment.
    pub environment: Arc<str>,
    /// Its locality.
    pub locality: Arc<str>,
    /// Service, `namespace/name`.
    pub service: Arc<str>,
    /// Route.
    pub route: Arc<str>,
    /// The peer's workload (empty: unknown).
    pub peer_workload: Arc<str>,
    /// The peer's SPIFFE ID (empty: not mutual TLS).
    pub peer_identity: Arc<str>,
    /// The peer's environment.
    pub peer_environment: Arc<str>,
    /// The peer's locality.
    pub peer_locality: Arc<str>,
    /// The address connected to.
    pub endpoint: Arc<str>,
    /// Mutual TLS.
    pub mtls: bool,
    /// Failure class.
    pub class: FailureClass,
    /// Status hundreds, 0 for none.
    pub status_class: u8,
}

impl Key {
    /// `namespace` of `ns/name`.
    pub fn namespace_of(s: &str) -> &str {
        s.split_once('/').map_or("", |(ns, _)| ns)
    }
}

/// What one series adds up to over some time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Requests (effective: after retries).
    pub requests: u64,
    /// Attempts (actual).
    pub attempts: u64,
    /// Latency of requests, or durations of closed TCP connections.
    pub latency: Histogram,
    /// TCP connections opened.
    pub tcp_opened: u64,
    /// TCP connections closed.
    pub tcp_closed: u64,
    /// TCP bytes from clients.
    pub bytes_sent: u64,
    /// TCP bytes to clients.
    pub bytes_received: u64,
    /// TCP connections open at the end of the latest period merged, with that period's
    /// start (Unix ms): a gauge, not a sum.
    pub tcp_open: Option<(u64, u64)>,
}

impl Stats {
    /// Add `o`.
    pub fn merge(&mut self, o: &Stats) {
        self.requests += o.requests;
        self.attempts += o.attempts;
        self.latency.merge(&o.latency);
        self.tcp_opened += o.tcp_opened;
        self.tcp_closed += o.tcp_closed;
        self.bytes_sent += o.bytes_sent;
        self.bytes_received += o.bytes_received;
        self.tcp_open = match (self.tcp_open, o.tcp_open) {
            (Some(a), Some(b)) => Some(if b.1 >= a.1 { b } else { a }),
            (a, b) => a.or(b),
        };
    }

    /// Bytes on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.latency.heap_bytes()
    }
}
