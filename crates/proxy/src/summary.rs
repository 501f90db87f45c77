//! Stage `record`'s summaries for the control plane: what this proxy recorded in a period,
//! by key (direction, service, route, peer, failure class, status class), with a latency
//! histogram that merges exactly (see `trellis_telemetry::hist`). The metrics' request
//! cache holds each key's [`Period`], so a request costs no second lookup; TCP connections,
//! far fewer, have a table of their own ([`TcpSummary`]). The reporter turns a period into
//! a report's series ([`series`]).

use std::{collections::HashMap, hash::Hasher, net::SocketAddr};

use trellis_telemetry::{
    hist::Histogram,
    report::{Latency, Series},
    store::OTHER,
};

use crate::{
    error::FailureClass,
    labels::{Direction, Label},
};

pub(crate) use trellis_telemetry::now_ms;

/// The other end of a request or connection: for outbound, the endpoint called; for
/// inbound, the caller (from its proxy's `x-trellis-peer` and its certificate).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct PeerKey {
    /// Workload, `namespace/name`.
    pub(crate) workload: Label,
    /// Identity: a SPIFFE ID (inbound), or `namespace/identity` the endpoint must present
    /// (outbound).
    pub(crate) identity: Label,
    /// Environment.
    pub(crate) environment: Label,
    /// Locality, `region/zone`.
    pub(crate) locality: Label,
    /// The address connected to (outbound).
    pub(crate) endpoint: Option<SocketAddr>,
    /// Mutual TLS.
    pub(crate) mtls: bool,
}

impl PeerKey {
    /// A caller as the callee's proxy knows it: its workload, environment and locality (from
    /// its proxy's `x-trellis-peer` or stream hello) and its SPIFFE ID (mutual TLS), empty
    /// when it did not say.
    pub(crate) fn caller(
        workload: &Label,
        identity: &Label,
        environment: &Label,
        locality: &Label,
    ) -> Self {
        Self {
            workload: workload.clone(),
            identity: identity.clone(),
            environment: environment.clone(),
            locality: locality.clone(),
            endpoint: None,
            mtls: identity.get().is_some(),
        }
    }

    /// Compared by the identity of the shared strings (see `metrics::RequestKey`).
    pub(crate) fn same(&self, o: &Self) -> bool {
        self.endpoint == o.endpoint
            && self.mtls == o.mtls
            && self.workload.same(&o.workload)
            && self.identity.same(&o.identity)
            && self.environment.same(&o.environment)
            && self.locality.same(&o.locality)
    }

    /// Hashed by the same.
    pub(crate) fn hash_ids<H: Hasher>(&self, h: &mut H) {
        h.write_usize(self.workload.addr());
        h.write_usize(self.identity.addr());
        h.write_usize(self.environment.addr());
        h.write_usize(self.locality.addr());
        if let Some(a) = self.endpoint {
            match a {
                SocketAddr::V4(v4) => h.write_u32(u32::from(*v4.ip())),
                SocketAddr::V6(v6) => h.write_u128(u128::from(*v6.ip())),
            }
            h.write_u16(a.port());
        }
        h.write_u8(u8::from(self.mtls));
    }
}

/// A request key's period, as the metrics' cache hands it over.
pub(crate) struct Recorded {
    /// Direction.
    pub(crate) direction: Direction,
    /// Service (`name.namespace`).
    pub(crate) service: Label,
    /// Route.
    pub(crate) route: Label,
    /// Failure class.
    pub(crate) class: FailureClass,
    /// Status sent.
    pub(crate) status: u16,
    /// The other end.
    pub(crate) peer: PeerKey,
    /// What was recorded.
    pub(crate) period: Period,
}

/// One key's requests in a period.
#[derive(Default)]
pub(crate) struct Period {
    /// Requests.
    pub(crate) requests: u64,
    /// Tries made for them.
    pub(crate) attempts: u64,
    /// Their latency, seconds.
    pub(crate) latency: Histogram,
}

impl Period {
    /// One more request.
    pub(crate) fn add(&mut self, seconds: f64, attempts: u32) {
        self.requests += 1;
        self.attempts += u64::from(attempts.max(1));
        self.latency.record(seconds);
    }
}

/// The period's failed requests, one by one, up to [`FailedAttempts::CAP`]: beyond it, those
/// with the smallest attempt ids. Ids are random, so this is a uniform sample, and the same
/// one at both ends of a hop (the caller's attempt id is the callee's parent id): the
/// control plane can still join what the caller and the callee listed.
#[derive(Default)]
pub(crate) struct FailedAttempts {
    /// Listed.
    pub(crate) items: Vec<trellis_telemetry::report::Attempt>,
    /// Beyond the bound.
    pub(crate) dropped: u64,
}

impl FailedAttempts {
    /// Failed requests listed per period at most; the rest are counted.
    pub(crate) const CAP: usize = 64;

    /// The sampling key: an attempt without id (from an unmeshed caller) cannot be joined
    /// and goes first.
    fn key(a: &trellis_telemetry::report::Attempt) -> u64 {
        if a.id == 0 {
            u64::MAX
        } else {
            a.id
        }
    }

    /// Add one; when the list is full, it takes the place of the one with the largest id
    /// if its own is smaller, and one of the two is counted as dropped.
    pub(crate) fn push(&mut self, a: trellis_telemetry::report::Attempt) {
        if self.items.len() < Self::CAP {
            self.items.push(a);
            return;
        }
        self.dropped += 1;
        let (at, largest) = self
            .items
            .iter()
            .enumerate()
            .map(|(i, x)| (i, Self::key(x)))
            .max_by_key(|(_, k)| *k)
            .unwrap_or((0, 0));
        if Self::key(&a) < largest {
            self.items[at] = a;
        }
    }

    /// The largest id listed when some were dropped (every failed attempt of the period
    /// with an id up to it is listed), else 0.
    pub(crate) fn below(&self) -> u64 {
        if self.dropped == 0 {
            return 0;
        }
        self.items.iter().map(Self::key).max().unwrap_or(0)
    }
}

/// TCP connections by key, and those open now.
#[derive(Default)]
pub(crate) struct TcpSummary {
    closed: HashMap<TcpKey, TcpPeriod>,
    opened: HashMap<(Direction, Label), u64>,
    open: HashMap<(Direction, Label), u64>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct TcpKey {
    direction: Direction,
    service: Label,
    class: FailureClass,
    peer: PeerKey,
}

#[derive(Default)]
struct TcpPeriod {
    closed: u64,
    sent: u64,
    received: u64,
}

impl TcpSummary {
    /// A connection to `service` opened.
    pub(crate) fn opened(&mut self, direction: Direction, service: &Label) {
        *self.opened.entry((direction, service.clone())).or_default() += 1;
        *self.open.entry((direction, service.clone())).or_default() += 1;
    }

    /// A connection to `service` closed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn closed(
        &mut self,
        direction: Direction,
        service: &Label,
        class: FailureClass,
        peer: PeerKey,
        sent: u64,
        received: u64,
    ) {
        if let Some(n) = self.open.get_mut(&(direction, service.clone())) {
            *n = n.saturating_sub(1);
        }
        let p = self.tally(direction, service, class, peer);
        p.closed += 1;
        p.sent += sent;
        p.received += received;
    }

    /// A connection's try that failed before another endpoint was tried: counted by its
    /// endpoint and class as a closed connection is (as an HTTP request's failed try is), the
    /// connection itself still open.
    pub(crate) fn failed_try(
        &mut self,
        direction: Direction,
        service: &Label,
        class: FailureClass,
        peer: PeerKey,
    ) {
        self.tally(direction, service, class, peer).closed += 1;
    }

    fn tally(
        &mut self,
        direction: Direction,
        service: &Label,
        class: FailureClass,
        peer: PeerKey,
    ) -> &mut TcpPeriod {
        self.closed
            .entry(TcpKey {
                direction,
                service: service.clone(),
                class,
                peer,
            })
            .or_default()
    }

    fn take(&mut self) -> Vec<Series> {
        let mut out = Vec::new();
        for ((direction, service), opened) in self.opened.drain() {
            let open = self
                .open
                .get(&(direction, service.clone()))
                .copied()
                .unwrap_or(0);
            out.push(Series {
                tcp_opened: opened,
                tcp_open: open,
                ..series_for(
                    direction,
                    &service,
                    None,
                    &PeerKey::default(),
                    FailureClass::Ok,
                    0,
                    1,
                )
            });
        }
        // Services with connections still open and none opened this period: their gauge.
        for ((direction, service), &open) in &self.open {
            if open > 0
                && !out.iter().any(|s| {
                    s.direction == dir_code(*direction) && s.service == host_to_id(service)
                })
            {
                out.push(Series {
                    tcp_open: open,
                    ..series_for(
                        *direction,
                        service,
                        None,
                        &PeerKey::default(),
                        FailureClass::Ok,
                        0,
                        1,
                    )
                });
            }
        }
        self.open.retain(|_, n| *n > 0);
        for (k, p) in self.closed.drain() {
            out.push(Series {
                tcp_closed: p.closed,
                bytes_sent: p.sent,
                bytes_received: p.received,
                ..series_for(k.direction, &k.service, None, &k.peer, k.class, 0, 1)
            });
        }
        out
    }
}

fn dir_code(d: Direction) -> u32 {
    match d {
        Direction::outbound => 0,
        Direction::inbound => 1,
    }
}

/// `name.namespace` (how services are labelled) as `namespace/name`.
pub(crate) fn host_to_id(host: &Label) -> String {
    match host.get().and_then(|h| h.split_once('.')) {
        Some((name, ns)) => format!("{ns}/{name}"),
        None => host.get().unwrap_or_default().to_string(),
    }
}

fn series_for(
    direction: Direction,
    service: &Label,
    route: Option<&Label>,
    peer: &PeerKey,
    class: FailureClass,
    status: u16,
    protocol: u32,
) -> Series {
    Series {
        direction: dir_code(direction),
        protocol,
        service: host_to_id(service),
        route: route.and_then(Label::get).unwrap_or_default().to_string(),
        peer_workload: peer.workload.get().unwrap_or_default().to_string(),
        peer_identity: peer.identity.get().unwrap_or_default().to_string(),
        peer_environment: peer.environment.get().unwrap_or_default().to_string(),
        peer_locality: peer.locality.get().unwrap_or_default().to_string(),
        endpoint: peer.endpoint.map(|a| a.to_string()).unwrap_or_default(),
        mtls: peer.mtls,
        class: class.as_str().to_string(),
        status_class: u32::from(status / 100).min(5),
        ..Default::default()
    }
}

/// What a period adds up to: series (counts), latency groups, and how many series were
/// folded into `other` rows.
pub(crate) struct PeriodReport {
    pub(crate) series: Vec<Series>,
    pub(crate) latencies: Vec<Latency>,
    pub(crate) folded: u64,
}

/// A period's series: request summaries grouped by series key (entries that differ only in
/// the exact status fold together), then TCP; at most `cap` series, the rest folded into one
/// `other` row per direction and class. Latency by direction, service and peer workload.
pub(crate) fn series(requests: Vec<Recorded>, tcp: &mut TcpSummary, cap: usize) -> PeriodReport {
    let mut by_key: HashMap<SeriesId, Series> = HashMap::new();
    let mut latency: HashMap<(u32, String, String), Histogram> = HashMap::new();
    for r in requests {
        let (peer, p) = (&r.peer, &r.period);
        let s = series_for(
            r.direction,
            &r.service,
            Some(&r.route),
            peer,
            r.class,
            r.status,
            0,
        );
        // Retried tries carry no latency of a request.
        if p.requests > 0 {
            latency
                .entry((s.direction, s.service.clone(), s.peer_workload.clone()))
                .or_default()
                .merge(&p.latency);
        }
        let e = by_key.entry(SeriesId::of(&s)).or_insert(s);
        e.requests += p.requests;
        e.attempts += p.attempts;
    }
    let latencies = latency
        .into_iter()
        .map(|((direction, service, peer_workload), h)| Latency {
            direction,
            service,
            peer_workload,
            histogram: Some((&h).into()),
        })
        .collect();
    let mut out: Vec<Series> = by_key.into_values().collect();
    out.extend(tcp.take());
    let mut folded = 0;
    if out.len() > cap {
        // The busiest series are kept whole.
        out.sort_by_key(|s| std::cmp::Reverse(s.requests + s.tcp_closed));
        let rest = out.split_off(cap.saturating_sub(1));
        folded = rest.len() as u64;
        let mut others: HashMap<(u32, u32, String, u32), Series> = HashMap::new();
        for s in rest {
            let o = others
                .entry((s.direction, s.protocol, s.class.clone(), s.status_class))
                .or_insert_with(|| Series {
                    direction: s.direction,
                    protocol: s.protocol,
                    service: OTHER.into(),
                    route: OTHER.into(),
                    peer_workload: OTHER.into(),
                    class: s.class.clone(),
                    status_class: s.status_class,
                    ..Default::default()
                });
            merge_into(o, &s);
        }
        out.extend(others.into_values());
    }
    PeriodReport {
        series: out,
        latencies,
        folded,
    }
}

/// A series' key fields (a `Series` holds floats, so it is no map key itself).
#[derive(PartialEq, Eq, Hash)]
struct SeriesId(u32, [String; 7], bool, String, u32);

impl SeriesId {
    fn of(s: &Series) -> Self {
        Self(
            s.direction,
            [
                s.service.clone(),
                s.route.clone(),
                s.peer_workload.clone(),
                s.peer_identity.clone(),
                s.peer_environment.clone(),
                s.peer_locality.clone(),
                s.endpoint.clone(),
            ],
            s.mtls,
            s.class.clone(),
            s.status_class,
        )
    }
}

fn merge_into(o: &mut Series, s: &Series) {
    o.requests += s.requests;
    o.attempts += s.attempts;
    o.tcp_opened += s.tcp_opened;
    o.tcp_closed += s.tcp_closed;
    o.tcp_open += s.tcp_open;
    o.bytes_sent += s.bytes_sent;
    o.bytes_received += s.bytes_received;
}

#[cfg(test)]
mod tests;
