//! A series' key as the control plane keeps it, and what it adds up per period.

use std::sync::Arc;

use serde::Serialize;
use trellis_taxonomy::FailureClass;

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
    /// A meshed caller's TCP streams, as the callee's proxy reports them when the caller's
    /// proxy is older than the stream's hello: the caller's identity (mutual TLS) but not its
    /// workload.
    pub fn unnamed_stream(&self) -> bool {
        self.direction == Direction::Inbound
            && self.protocol == Protocol::Tcp
            && self.peer_workload.is_empty()
            && !self.peer_identity.is_empty()
    }

    /// `namespace` of `ns/name`.
    pub fn namespace_of(s: &str) -> &str {
        s.split_once('/').map_or("", |(ns, _)| ns)
    }
}

/// What a latency histogram is kept by: coarser than a series (no route, endpoint, class or
/// status), which is all that `stat` and `edges` show quantiles by.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LatKey {
    /// Direction.
    pub direction: Direction,
    /// The reporting workload.
    pub workload: Arc<str>,
    /// Service.
    pub service: Arc<str>,
    /// The peer's workload.
    pub peer_workload: Arc<str>,
}

/// What one series adds up to over some time: counts only (latency is kept by [`LatKey`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests (effective: after retries).
    pub requests: u64,
    /// Attempts (actual).
    pub attempts: u64,
    /// TCP connections opened.
    pub tcp_opened: u32,
    /// TCP connections closed.
    pub tcp_closed: u32,
    /// TCP bytes, both ways.
    pub tcp_bytes: u64,
    /// TCP connections open at the end of the latest period merged, and that period's slot
    /// (a gauge, not a sum: the latest wins).
    pub tcp_open: u32,
    /// The slot `tcp_open` was reported for (0: never).
    pub tcp_open_at: u32,
}

impl Counts {
    /// Add `o` (in time: the later gauge wins).
    pub fn merge(&mut self, o: &Counts) {
        self.requests += o.requests;
        self.attempts += o.attempts;
        self.tcp_opened = self.tcp_opened.saturating_add(o.tcp_opened);
        self.tcp_closed = self.tcp_closed.saturating_add(o.tcp_closed);
        self.tcp_bytes += o.tcp_bytes;
        if o.tcp_open_at >= self.tcp_open_at && o.tcp_open_at > 0 {
            self.tcp_open = o.tcp_open;
            self.tcp_open_at = o.tcp_open_at;
        }
    }
}
