//! Proxy metrics, registered on a registry handed down by the caller (never a global one).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hash, Hasher},
    sync::{Arc, Mutex},
};

pub(crate) use crate::labels::{Direction, Label};
use crate::{
    error::FailureClass,
    fasthash::FastHasher,
    summary::{FailedAttempts, PeerKey, Period, Recorded, TcpSummary},
};

/// Labels of request metrics. Missing values are "unknown".
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    /// Direction.
    pub(crate) direction: Direction,
    /// Source service (the local workload's for outbound).
    pub(crate) src_service: Label,
    /// The caller's SPIFFE ID, for inbound requests over mutual TLS ("unknown" otherwise).
    pub(crate) source_identity: Label,
    /// Destination service.
    pub(crate) dst_service: Label,
    /// Destination workload.
    pub(crate) dst_workload: Label,
    /// Destination environment.
    pub(crate) dst_environment: &'static str,
    /// Destination locality, `region/zone`.
    pub(crate) dst_locality: Label,
    /// Route name.
    pub(crate) route: Label,
    /// HTTP status sent to the client.
    pub(crate) status_code: u16,
    /// gRPC status, empty when not gRPC.
    pub(crate) grpc_status: Option<u32>,
    /// Failure class.
    pub(crate) failure_class: FailureClass,
}

/// A key's period as a summary sees it.
fn recorded(l: &RequestLabels, peer: PeerKey, period: Period) -> Recorded {
    Recorded {
        direction: l.direction,
        service: l.dst_service.clone(),
        route: l.route.clone(),
        class: l.failure_class,
        status: l.status_code,
        peer,
        period,
    }
}

/// Labels of TCP connection metrics.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct TcpLabels {
    /// Direction.
    pub(crate) direction: Direction,
    /// Destination service.
    pub(crate) dst_service: Label,
    /// Destination workload.
    pub(crate) dst_workload: Label,
    /// Failure class.
    pub(crate) failure_class: FailureClass,
}

/// Labels of the rate-limit counter.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct RateLimitLabels {
    /// The RateLimitPolicy, `namespace/name`.
    pub(crate) policy: String,
    /// `caller` or `total`.
    pub(crate) scope: &'static str,
    /// `enforce` (refused) or `shadow` (only counted).
    pub(crate) mode: &'static str,
}

/// Labels keyed by direction and service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct ServiceLabels {
    /// Direction.
    pub(crate) direction: Direction,
    /// Destination service.
    pub(crate) dst_service: Label,
}

/// Labels keyed by cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct ClusterLabels {
    /// `namespace/service:port`.
    pub(crate) cluster: String,
}

/// Labels of retry decisions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct RetryLabels {
    /// Cluster.
    pub(crate) cluster: String,
    /// `sent`, `budget_exhausted`, or `unsent` (a try that never left, sent once more).
    pub(crate) outcome: &'static str,
}

/// Labels of injected faults.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct FaultLabels {
    /// Route.
    pub(crate) route: String,
    /// `delay` or `abort`.
    pub(crate) fault: &'static str,
}

/// Labels of ejections.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct EndpointLabels {
    /// Cluster.
    pub(crate) cluster: String,
    /// Endpoint address.
    pub(crate) endpoint: String,
}

/// Labels of config reloads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct ReloadLabels {
    /// `ok` or `error`.
    pub(crate) result: &'static str,
    /// `full` (the mesh translated) or `endpoints` (only clusters whose endpoints changed).
    pub(crate) scope: &'static str,
}

fn latency() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// Every metric of the proxy.
#[derive(Clone)]
pub(crate) struct Metrics {
    /// Requests by outcome.
    pub(crate) requests: Family<RequestLabels, Counter>,
    /// Request latency (until the response ended).
    pub(crate) request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// TCP connections by outcome.
    pub(crate) tcp_connections: Family<TcpLabels, Counter>,
    /// Open TCP connections.
    pub(crate) tcp_open: Family<ServiceLabels, Gauge>,
    /// Bytes from client to upstream.
    pub(crate) tcp_sent: Family<ServiceLabels, Counter>,
    /// Bytes from upstream to client.
    pub(crate) tcp_received: Family<ServiceLabels, Counter>,
    /// Open upstream connections in the pools.
    pub(crate) pool_open: Family<ClusterLabels, Gauge>,
    /// Upstream connect attempts.
    pub(crate) pool_connects: Family<EndpointLabels, Counter>,
    /// Retries.
    pub(crate) retries: Family<RetryLabels, Counter>,
    /// Faults injected by routes' fault filters, by try.
    pub(crate) faults: Family<FaultLabels, Counter>,
    /// Ejections.
    pub(crate) ejections: Family<EndpointLabels, Counter>,
    /// Currently ejected endpoints.
    pub(crate) ejected: Family<ClusterLabels, Gauge>,
    /// Requests refused by circuit breakers.
    pub(crate) overflows: Family<ClusterLabels, Counter>,
    /// Config reloads.
    pub(crate) reloads: Family<ReloadLabels, Counter>,
    /// Inbound connections refused for want of valid mutual TLS.
    pub(crate) tls_refusals: Counter,
    /// Access-log lines dropped because the writer fell behind.
    pub(crate) access_log_dropped: Counter,
    /// Handles of `requests` and `request_duration` by label identity, with the period's
    /// summary of each key: see [`RequestKey`].
    request_cache: Arc<Mutex<RequestCache>>,
    /// TCP connections' summary for the period.
    pub(crate) tcp_summary: Arc<Mutex<TcpSummary>>,
    /// The period's failed requests, one by one (bounded).
    pub(crate) failed: Arc<Mutex<FailedAttempts>>,
    /// The period's slow requests (not failed), one by one (bounded alike).
    pub(crate) slow: Arc<Mutex<FailedAttempts>>,
    /// Requests over a rate limit.
    pub(crate) rate_limited: Family<RateLimitLabels, Counter>,
    /// The period's ejections by outlier detection, and endpoints let back in early.
    pub(crate) ejections_told: Arc<Mutex<Vec<trellis_telemetry::report::Ejection>>>,
    /// Mirrors' slots and the period's comparisons.
    pub(crate) mirrors: Arc<crate::mirrors::Mirrors>,
    /// Whether periods are summed up for reports (a proxy that reports to a control plane).
    pub(crate) summaries: bool,
}

#[derive(Default)]
struct RequestCache {
    entries: HashMap<RequestKey, (Counter, Histogram, Period), BuildHasherDefault<FastHasher>>,
    /// Failed tries that were retried, by the endpoint they went to and how they failed:
    /// attempts, not requests (the request counts once, by its last try).
    tries: HashMap<(RequestLabels, PeerKey), u64>,
    /// Periods of entries forgotten by a reload, until the next report takes them.
    carried: Vec<(RequestLabels, PeerKey, Period)>,
}

/// Request labels and the peer, compared and hashed by the identity of their shared
/// strings, not their contents: labels come from the config, so identical values are the
/// same allocation. Looking a request's counter, histogram and summary up this way costs a
/// few words of hashing instead of hashing nine labels (strings included) twice with SipHash
/// in the families. The key holds its `Arc`s, so an address cannot be reused while the entry
/// exists. Keys that differ only in the peer share their Prometheus series.
struct RequestKey(RequestLabels, PeerKey);

impl PartialEq for RequestKey {
    fn eq(&self, o: &Self) -> bool {
        let (a, b) = (&self.0, &o.0);
        self.1.same(&o.1)
            && a.direction == b.direction
            && a.status_code == b.status_code
            && a.grpc_status == b.grpc_status
            && a.failure_class == b.failure_class
            && std::ptr::eq(a.dst_environment, b.dst_environment)
            && a.src_service.same(&b.src_service)
            && a.source_identity.same(&b.source_identity)
            && a.dst_service.same(&b.dst_service)
            && a.dst_workload.same(&b.dst_workload)
            && a.dst_locality.same(&b.dst_locality)
            && a.route.same(&b.route)
    }
}

impl Eq for RequestKey {}

impl Hash for RequestKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        let l = &self.0;
        h.write_usize(l.src_service.addr());
        h.write_usize(l.source_identity.addr());
        h.write_usize(l.dst_service.addr());
        h.write_usize(l.dst_workload.addr());
        h.write_usize(l.dst_locality.addr());
        h.write_usize(l.route.addr());
        h.write_usize(l.dst_environment.as_ptr() as usize);
        h.write_u64(
            u64::from(l.status_code)
                | u64::from(l.grpc_status.unwrap_or(u32::MAX)) << 16
                | (l.failure_class as u64) << 48
                | (l.direction as u64) << 56,
        );
        self.1.hash_ids(h);
    }
}

impl Metrics {
    /// Create and register under `reg` (the caller gives it the `trellis` prefix).
    pub(crate) fn register(reg: &mut Registry) -> Self {
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
            faults: Family::default(),
            ejections: Family::default(),
            ejected: Family::default(),
            overflows: Family::default(),
            reloads: Family::default(),
            tls_refusals: Counter::default(),
            access_log_dropped: Counter::default(),
            request_cache: Arc::default(),
            tcp_summary: Arc::default(),
            failed: Arc::default(),
            slow: Arc::default(),
            rate_limited: Family::default(),
            ejections_told: Arc::default(),
            mirrors: Arc::default(),
            summaries: false,
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
            "rate_limited",
            "Inbound requests over a RateLimitPolicy's limit (refused, or counted in shadow mode)",
            m.rate_limited.clone(),
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
            "faults_injected",
            "Tries delayed or aborted by a route's trellis.dev/Fault filter (unstable)",
            m.faults.clone(),
        );
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
            "Config reloads by result and scope (unstable)",
            m.reloads.clone(),
        );
        reg.register(
            "inbound_tls_refusals",
            "Inbound connections refused: plaintext under strict mTLS, or a failed mTLS handshake (unstable)",
            m.tls_refusals.clone(),
        );
        reg.register(
            "access_log_dropped",
            "Access-log lines dropped because the log writer fell behind (unstable)",
            m.access_log_dropped.clone(),
        );
        m
    }

    /// An inbound connection refused for want of valid mutual TLS.
    pub(crate) fn count_tls_refusal(&self) {
        self.tls_refusals.inc();
    }
}

impl Metrics {
    /// Count a finished request (made in `attempts` tries) and its duration, in the metrics
    /// and in the period's summary.
    pub(crate) fn record_request(
        &self,
        labels: RequestLabels,
        peer: PeerKey,
        seconds: f64,
        attempts: u32,
    ) {
        let key = RequestKey(labels, peer);
        let mut cache = self.request_cache.lock().expect("metrics cache lock");
        let (count, duration, period) = cache.entries.entry(key).or_insert_with_key(|k| {
            (
                self.requests.get_or_create(&k.0).clone(),
                self.request_duration.get_or_create(&k.0).clone(),
                Period::default(),
            )
        });
        count.inc();
        duration.observe(seconds);
        if self.summaries {
            period.add(seconds, attempts);
        }
    }

    /// An endpoint ejected (`seconds` > 0) or let back in: the period's report tells it (64 a
    /// period at most).
    pub(crate) fn note_ejection(&self, e: trellis_telemetry::report::Ejection) {
        if !self.summaries {
            return;
        }
        let mut v = self
            .ejections_told
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if v.len() < 64 {
            v.push(e);
        }
    }

    /// A request over a rate limit (refused, or in shadow mode only counted).
    pub(crate) fn count_rate_limited(&self, policy: &str, scope: &'static str, shadow: bool) {
        self.rate_limited
            .get_or_create(&RateLimitLabels {
                policy: policy.to_string(),
                scope,
                mode: if shadow { "shadow" } else { "enforce" },
            })
            .inc();
    }

    /// A try that failed and was retried (summaries only: the request itself is recorded
    /// once, by its last try). Rare: a plain map, keyed by value.
    pub(crate) fn record_try(&self, labels: RequestLabels, peer: PeerKey) {
        let mut cache = self.request_cache.lock().expect("metrics cache lock");
        *cache.tries.entry((labels, peer)).or_default() += 1;
    }

    /// Take the period's request summaries (every key with requests since the last take),
    /// and its retried tries (attempts without a request).
    pub(crate) fn take_periods(&self) -> Vec<Recorded> {
        let mut cache = self.request_cache.lock().expect("metrics cache lock");
        let carried = std::mem::take(&mut cache.carried);
        let mut out: Vec<Recorded> = carried
            .into_iter()
            .map(|(l, peer, period)| recorded(&l, peer, period))
            .collect();
        for ((l, peer), n) in std::mem::take(&mut cache.tries) {
            let period = Period {
                attempts: n,
                ..Period::default()
            };
            out.push(recorded(&l, peer, period));
        }
        for (k, (_, _, p)) in cache.entries.iter_mut() {
            if p.requests > 0 {
                out.push(recorded(&k.0, k.1.clone(), std::mem::take(p)));
            }
        }
        out
    }

    /// Forget cached handles (after a reload, labels are new allocations); their periods
    /// wait for the next report.
    pub(crate) fn clear_request_cache(&self) {
        let mut cache = self.request_cache.lock().expect("metrics cache lock");
        let entries = std::mem::take(&mut cache.entries);
        for (k, (_, _, p)) in entries {
            if p.requests > 0 {
                cache.carried.push((k.0, k.1, p));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(route: &Label, status: u16) -> RequestLabels {
        RequestLabels {
            direction: Direction::outbound,
            src_service: Label::default(),
            source_identity: Label::default(),
            dst_service: Label::from("a.ns"),
            dst_workload: Label::default(),
            dst_environment: "vm",
            dst_locality: Label::default(),
            route: route.clone(),
            status_code: status,
            grpc_status: None,
            failure_class: FailureClass::Ok,
        }
    }

    #[test]
    fn cached_handles_count_into_the_family_series() {
        let mut m = Metrics::register(&mut Registry::default());
        m.summaries = true;
        let (r1, r2) = (Label::from("r"), Label::from("r"));
        let rec = |l| m.record_request(l, PeerKey::default(), 0.1, 1);
        rec(labels(&r1, 200));
        rec(labels(&r1, 200));
        // Same contents, other allocation (as after a reload): the same series.
        rec(labels(&r2, 200));
        rec(labels(&r1, 503));
        assert_eq!(m.requests.get_or_create(&labels(&r1, 200)).get(), 3);
        assert_eq!(m.requests.get_or_create(&labels(&r1, 503)).get(), 1);
        m.clear_request_cache();
        rec(labels(&r1, 200));
        assert_eq!(m.requests.get_or_create(&labels(&r1, 200)).get(), 4);
        // The summaries: the period's requests by key, those of the cleared entries kept.
        let mut by_status = std::collections::BTreeMap::new();
        for r in m.take_periods() {
            *by_status.entry(r.status).or_insert(0) += r.period.requests;
        }
        assert_eq!(
            by_status.into_iter().collect::<Vec<_>>(),
            vec![(200, 4), (503, 1)]
        );
        assert!(m.take_periods().is_empty(), "taken");
    }
}
