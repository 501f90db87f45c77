//! What `trellis stat` and `trellis edges` show, computed from a window of the store: the
//! API returns these as JSON and the CLI prints them.
//!
//! A service's row is what its callers got (the callers' proxies' outbound series, after
//! retries), so that failures that never reached the service (a refused connection, a cut
//! link) count against it; a service called only by unmeshed clients is shown as served
//! (its workloads' inbound series). A workload's row is what it served (inbound), or, for a
//! workload that only calls others, what its calls got. An edge is a caller workload and a
//! callee workload joined by requests: from the caller's proxy when it has one, else from
//! the callee's (an unmeshed caller).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use trellis_taxonomy::{Category, FailureClass};

use crate::{
    fx::FxMap,
    hist::Histogram,
    key::{Counts, Direction, Key, LatKey, Protocol},
    store::Window,
};

/// Whose view a row is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Seen {
    /// By the callers' proxies (outbound).
    Callers,
    /// By the workload's own proxy (inbound).
    Served,
}

/// Latency quantiles, milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: Option<f64>,
    /// 95th percentile.
    pub p95: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// The most a quantile may be off, relative (half a bucket of the histogram behind it).
    pub error: Option<f64>,
}

impl Latency {
    fn of(h: &Histogram) -> Self {
        let ms = |q| h.quantile(q).map(|s| s * 1000.0);
        Self {
            p50: ms(0.5),
            p95: ms(0.95),
            p99: ms(0.99),
            error: (h.count() > 0).then(|| h.relative_error()),
        }
    }
}

/// Failures of one class.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCount {
    /// Class.
    pub class: FailureClass,
    /// How many.
    pub count: u64,
}

/// Failures by category, each class most frequent first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failures {
    /// The network (or a peer's transport).
    pub network: Vec<ClassCount>,
    /// The application.
    pub application: Vec<ClassCount>,
    /// The mesh's policy.
    pub policy: Vec<ClassCount>,
    /// The client (4xx, went away): not counted against success.
    pub client: Vec<ClassCount>,
}

/// The figures of a row or an edge.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Requests (as the caller got them, after retries).
    pub requests: u64,
    /// Requests per second over the window.
    pub rps: f64,
    /// Share of requests that did not fail by the network, the application or the mesh's
    /// policy (client errors are not the service's failures); `None` with no requests.
    pub success: Option<f64>,
    /// Latency of the requests.
    pub latency_ms: Latency,
    /// Attempts made (each retry is one more).
    pub attempts: u64,
    /// Share of attempts that succeeded (every attempt but a request's last failed).
    pub actual_success: Option<f64>,
    /// TCP connections opened in the window.
    pub tcp_opened: u64,
    /// TCP connections open at the end of the window.
    pub tcp_open: u64,
    /// TCP bytes, both ways.
    pub tcp_bytes: u64,
    /// TCP connections that ended in the window, a try that failed before another endpoint
    /// took the connection counted as one (as an HTTP request's attempts are).
    #[serde(default)]
    pub tcp_closed: u64,
    /// Share of those that did not fail by the network, the application or the mesh's policy;
    /// `None` with none.
    #[serde(default)]
    pub tcp_success: Option<f64>,
    /// TCP connections that ended, per second over the window: a TCP row's rate, as `rps`
    /// is a row's of requests.
    #[serde(default)]
    pub tcp_cps: f64,
    /// Failures.
    pub failures: Failures,
}

/// Adds series up into [`Figures`].
#[derive(Default)]
struct Acc {
    requests: u64,
    attempts: u64,
    failed: u64,
    latency: Histogram,
    tcp_opened: u64,
    tcp_open: u64,
    tcp_bytes: u64,
    tcp_closed: u64,
    tcp_failed: u64,
    classes: BTreeMap<FailureClass, u64>,
}

/// Whether an ending of class `c` counts against a service's success: the network's, the
/// application's and the mesh policy's do; a client's (4xx, went away) does not.
fn fails_the_service(c: FailureClass) -> bool {
    !matches!(c.category(), Category::Client | Category::Ok)
}

impl Acc {
    fn add(&mut self, k: &Key, s: &Counts) {
        self.tcp_opened += u64::from(s.tcp_opened);
        self.tcp_bytes += s.tcp_bytes;
        // Gauges of different series add up (each is one series' latest).
        self.tcp_open += u64::from(s.tcp_open);
        if k.protocol == Protocol::Tcp {
            let closed = u64::from(s.tcp_closed);
            self.tcp_closed += closed;
            if k.class != FailureClass::Ok && closed > 0 {
                *self.classes.entry(k.class).or_default() += closed;
                if fails_the_service(k.class) {
                    self.tcp_failed += closed;
                }
            }
            return;
        }
        self.requests += s.requests;
        self.attempts += s.attempts.max(s.requests);
        // Failures are the requests' (what callers got); tries that failed and were retried
        // (attempts without a request) show in the actual success only.
        if k.class != FailureClass::Ok && s.requests > 0 {
            *self.classes.entry(k.class).or_default() += s.requests;
            if fails_the_service(k.class) {
                self.failed += s.requests;
            }
        }
    }

    fn figures(self, window_s: f64) -> Figures {
        let mut failures = Failures::default();
        let mut classes: Vec<_> = self.classes.into_iter().collect();
        classes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (class, count) in classes {
            let c = ClassCount { class, count };
            match class.category() {
                Category::Network => failures.network.push(c),
                Category::Application => failures.application.push(c),
                Category::Policy => failures.policy.push(c),
                Category::Client | Category::Ok => failures.client.push(c),
            }
        }
        let ratio = |good: u64, all: u64| (all > 0).then(|| good as f64 / all as f64);
        // Every attempt but a request's last failed; of the last ones, the failed requests.
        let attempt_failures = self.attempts - self.requests + self.failed;
        Figures {
            requests: self.requests,
            rps: self.requests as f64 / window_s,
            success: ratio(self.requests - self.failed, self.requests),
            latency_ms: Latency::of(&self.latency),
            attempts: self.attempts,
            actual_success: ratio(self.attempts - attempt_failures, self.attempts),
            tcp_opened: self.tcp_opened,
            tcp_open: self.tcp_open,
            tcp_bytes: self.tcp_bytes,
            tcp_closed: self.tcp_closed,
            tcp_success: ratio(self.tcp_closed - self.tcp_failed, self.tcp_closed),
            tcp_cps: self.tcp_closed as f64 / window_s,
            failures,
        }
    }
}

/// What a row is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A service.
    Service,
    /// A workload.
    Workload,
}

/// One row of `trellis stat`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatRow {
    /// Service or workload.
    pub kind: Kind,
    /// `namespace/name`.
    pub name: String,
    /// Environments: of the service's endpoints that served, or of the workload.
    pub environments: Vec<String>,
    /// Localities, as environments.
    pub localities: Vec<String>,
    /// Whether requests were mutual TLS between proxies.
    pub meshed: bool,
    /// Whose view.
    pub seen: Seen,
    /// The figures.
    #[serde(flatten)]
    pub figures: Figures,
    /// A workload's inbound adaptive concurrency limit, as its proxy last reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<crate::report::Adaptive>,
}

/// One caller → callee pair of `trellis edges`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EdgeRow {
    /// The caller's workload (`unmeshed` when it has no proxy).
    pub src: String,
    /// The caller's environment.
    pub src_environment: String,
    /// The caller's SPIFFE ID (empty when not mutual TLS).
    pub src_identity: String,
    /// The callee's workload.
    pub dst: String,
    /// The callee's environment.
    pub dst_environment: String,
    /// The callee's SPIFFE ID (empty when not mutual TLS).
    pub dst_identity: String,
    /// The services the requests named.
    pub services: Vec<String>,
    /// Mutual TLS.
    pub mtls: bool,
    /// Whose view.
    pub seen: Seen,
    /// The figures.
    #[serde(flatten)]
    pub figures: Figures,
    /// The kernel's figures of the caller's connections to the callee, when its proxy
    /// measured them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkFigures>,
}

/// The kernel's TCP figures of one caller's connections to one callee.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkFigures {
    /// Mean smoothed round trip, milliseconds.
    pub rtt_ms: f64,
    /// Share of segments retransmitted, 0 to 1.
    pub retransmitted: f64,
    /// Open connections.
    pub connections: u32,
}

/// The link figures of `src` → `dst` in `w` (every endpoint of `dst` added up).
fn link_of(w: &Window, src: &str, dst: &str) -> Option<LinkFigures> {
    let (mut n, mut rtt, mut segs, mut re) = (0u32, 0u64, 0u64, 0u64);
    for (r, l) in &w.links {
        if &**r == src && l.peer_workload == dst {
            n += l.sockets;
            rtt += u64::from(l.rtt_us) * u64::from(l.sockets);
            segs += l.segs_out;
            re += l.retrans;
        }
    }
    (n > 0).then(|| LinkFigures {
        rtt_ms: rtt as f64 / f64::from(n) / 1000.0,
        retransmitted: re as f64 / segs.max(1) as f64,
        connections: n,
    })
}

/// What to show.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Selector {
    /// Services or workloads (default: services).
    pub kind: Option<Kind>,
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only this name (`namespace/name`, or a name within `namespace`).
    pub name: Option<String>,
}

impl Selector {
    /// The selector with its name made whole (`namespace/name`), ready to match.
    fn prepared(&self) -> Matcher {
        let full = self.name.as_deref().map(|n| {
            if n.contains('/') {
                n.to_string()
            } else {
                format!("{}/{n}", self.namespace.as_deref().unwrap_or("default"))
            }
        });
        Matcher {
            full,
            namespace: self.namespace.clone(),
        }
    }
}

/// A [`Selector`] ready to match names.
struct Matcher {
    full: Option<String>,
    namespace: Option<String>,
}

impl Matcher {
    fn any(&self) -> bool {
        self.full.is_none() && self.namespace.is_none()
    }

    fn matches(&self, name: &str) -> bool {
        match (&self.full, &self.namespace) {
            (Some(full), _) => name == full,
            (None, Some(ns)) => Key::namespace_of(name) == ns,
            (None, None) => true,
        }
    }
}

/// A group's accumulator with the labels it collects.
#[derive(Default)]
struct Group {
    acc: Acc,
    environments: BTreeSet<Arc<str>>,
    localities: BTreeSet<Arc<str>>,
    meshed: bool,
    services: BTreeSet<Arc<str>>,
    src_identity: Option<Arc<str>>,
    dst_identity: Option<Arc<str>>,
    src_environment: Option<Arc<str>>,
    dst_environment: Option<Arc<str>>,
}

fn insert(set: &mut BTreeSet<Arc<str>>, v: &Arc<str>) {
    if !v.is_empty() && !set.contains(v) {
        set.insert(v.clone());
    }
}

/// `trellis stat` rows from a window (`window_s` seconds long).
pub fn stat(w: &Window, sel: &Selector, window_s: f64) -> Vec<StatRow> {
    let kind = sel.kind.unwrap_or(Kind::Service);
    let m = sel.prepared();
    // The name a series or latency group counts for, and whose view that is.
    let name_of =
        |direction: Direction, workload: &Arc<str>, service: &Arc<str>| -> (Arc<str>, Seen) {
            match (kind, direction) {
                (Kind::Service, Direction::Outbound) => (service.clone(), Seen::Callers),
                (Kind::Service, Direction::Inbound) => (service.clone(), Seen::Served),
                (Kind::Workload, Direction::Inbound) => (workload.clone(), Seen::Served),
                (Kind::Workload, Direction::Outbound) => (workload.clone(), Seen::Callers),
            }
        };
    let mut groups: FxMap<(Arc<str>, Seen), Group> = FxMap::default();
    for (k, s) in &w.series {
        let (name, seen) = name_of(k.direction, &k.workload, &k.service);
        if name.is_empty() || !m.matches(&name) {
            continue;
        }
        let g = groups.entry((name, seen)).or_default();
        g.acc.add(k, s);
        g.meshed |= k.mtls;
        match (kind, k.direction) {
            (Kind::Service, Direction::Outbound) => {
                insert(&mut g.environments, &k.peer_environment);
                insert(&mut g.localities, &k.peer_locality);
            }
            _ => {
                insert(&mut g.environments, &k.environment);
                insert(&mut g.localities, &k.locality);
            }
        }
    }
    for (k, h) in &w.latency {
        if let Some(g) = groups.get_mut(&name_of(k.direction, &k.workload, &k.service)) {
            g.acc.latency.merge(h);
        }
    }
    // A service's view is its callers' when it has one; a workload's, what it served.
    let preferred = match kind {
        Kind::Service => Seen::Callers,
        Kind::Workload => Seen::Served,
    };
    let names: BTreeSet<Arc<str>> = groups.keys().map(|(n, _)| n.clone()).collect();
    let mut rows: Vec<StatRow> = Vec::with_capacity(names.len());
    for name in names {
        let other = if preferred == Seen::Callers {
            Seen::Served
        } else {
            Seen::Callers
        };
        let (seen, g) = match groups.remove(&(name.clone(), preferred)) {
            Some(g) => (preferred, g),
            None => match groups.remove(&(name.clone(), other)) {
                Some(g) => (other, g),
                None => continue,
            },
        };
        rows.push(StatRow {
            kind,
            name: name.to_string(),
            environments: strings(g.environments),
            localities: strings(g.localities),
            meshed: g.meshed,
            seen,
            figures: g.acc.figures(window_s),
            adaptive: (kind == Kind::Workload)
                .then(|| {
                    w.adaptive
                        .iter()
                        .find(|(r, _)| **r == *name)
                        .map(|(_, a)| *a)
                })
                .flatten(),
        });
    }
    rows
}

fn strings(set: BTreeSet<Arc<str>>) -> Vec<String> {
    set.into_iter().map(|s| s.to_string()).collect()
}

fn text(s: Option<Arc<str>>) -> String {
    s.map(|s| s.to_string()).unwrap_or_default()
}

/// The caller, callee and view of the edge a series or latency group is part of: from the
/// caller's proxy, or from the callee's for a caller without one.
fn edge_of(
    direction: Direction,
    workload: &Arc<str>,
    peer_workload: &Arc<str>,
    unmeshed: &Arc<str>,
) -> Option<(Arc<str>, Arc<str>, Seen)> {
    match direction {
        Direction::Outbound if !peer_workload.is_empty() => {
            Some((workload.clone(), peer_workload.clone(), Seen::Callers))
        }
        Direction::Inbound if peer_workload.is_empty() => {
            Some((unmeshed.clone(), workload.clone(), Seen::Served))
        }
        _ => None,
    }
}

/// `trellis edges` rows: pairs where either end matches `sel` (by workload).
pub fn edges(
    w: &Window,
    sel: &Selector,
    window_s: f64,
    identity_of: impl Fn(&str) -> Option<String>,
) -> Vec<EdgeRow> {
    let m = sel.prepared();
    let unmeshed: Arc<str> = "unmeshed".into();
    let mut groups: FxMap<(Arc<str>, Arc<str>, Seen), Group> = FxMap::default();
    for (k, s) in &w.series {
        // A meshed caller's TCP stream from a proxy older than the stream's hello names its
        // identity but not its workload at the callee: its edge is the caller's own report,
        // not an unmeshed one.
        if k.unnamed_stream() {
            continue;
        }
        // A TCP service's count of connections opened and open, which a proxy keeps by
        // service and names no peer by: no caller's edge (it drew an "unmeshed" one for
        // every TCP service behind a proxy).
        let gauge = k.protocol == Protocol::Tcp
            && s.tcp_closed == 0
            && s.requests == 0
            && k.peer_workload.is_empty()
            && k.peer_identity.is_empty();
        if gauge {
            continue;
        }
        let Some(e) = edge_of(k.direction, &k.workload, &k.peer_workload, &unmeshed) else {
            continue;
        };
        if !m.any() && !m.matches(&e.0) && !m.matches(&e.1) {
            continue;
        }
        let g = groups.entry(e).or_default();
        g.acc.add(k, s);
        g.meshed |= k.mtls;
        insert(&mut g.services, &k.service);
        let known = |v: &Arc<str>| (!v.is_empty()).then(|| v.clone());
        match k.direction {
            Direction::Outbound => {
                g.src_environment = Some(k.environment.clone());
                g.dst_environment = Some(k.peer_environment.clone());
                g.dst_identity = known(&k.peer_identity).or(g.dst_identity.take());
            }
            Direction::Inbound => {
                g.src_environment = Some(k.peer_environment.clone());
                g.dst_environment = Some(k.environment.clone());
                g.src_identity = known(&k.peer_identity).or(g.src_identity.take());
            }
        }
    }
    for (k, h) in &w.latency {
        if let Some(e) = edge_of(k.direction, &k.workload, &k.peer_workload, &unmeshed) {
            if let Some(g) = groups.get_mut(&e) {
                g.acc.latency.merge(h);
            }
        }
    }
    let mut rows: Vec<EdgeRow> = groups
        .into_iter()
        .map(|((src, dst, seen), g)| {
            // The identity a proxy reported with, for the end that has no other source.
            let src_identity = match g.src_identity {
                Some(i) => i.to_string(),
                None => identity_of(&src).unwrap_or_default(),
            };
            let dst_identity = match (g.dst_identity, seen) {
                (Some(i), _) => i.to_string(),
                (None, Seen::Served) => identity_of(&dst).unwrap_or_default(),
                (None, Seen::Callers) => String::new(),
            };
            EdgeRow {
                src: src.to_string(),
                src_environment: text(g.src_environment),
                src_identity,
                dst: dst.to_string(),
                dst_environment: text(g.dst_environment),
                dst_identity,
                services: strings(g.services),
                mtls: g.meshed,
                seen,
                figures: g.acc.figures(window_s),
                link: link_of(w, &src, &dst),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.src, &a.dst).cmp(&(&b.src, &b.dst)));
    rows
}

/// Whether a latency group can count for a row or edge `sel` selects (a cheap filter before
/// histograms are merged).
pub fn wants_latency(sel: &Selector, k: &LatKey) -> bool {
    let m = sel.prepared();
    m.any() || m.matches(&k.workload) || m.matches(&k.service) || m.matches(&k.peer_workload)
}

/// A route's mirror added up over a window: how the mirror's answers compared with the
/// primary's.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MirrorRow {
    /// The route, `namespace/route[.rule]`.
    pub route: String,
    /// The service called, `namespace/name`.
    pub service: String,
    /// The mirror's cluster, `namespace/name:port`.
    pub mirror: String,
    /// Copies sent.
    pub sent: u64,
    /// Copies skipped (body over the cap or unfinished, too many at once).
    pub skipped: u64,
    /// Copies compared with the primary.
    pub compared: u64,
    /// Of those, the share whose status class agreed with the primary's.
    pub agreement: Option<f64>,
    /// The mirror's time to its answer minus the primary's, on average, ms.
    pub latency_diff_ms: Option<f64>,
    /// The mirror's failures by class.
    pub failures: BTreeMap<String, u64>,
}

impl MirrorRow {
    /// One line, as `trellis stat` prints it under the services.
    pub fn line(&self) -> String {
        let mut s = format!(
            "mirror {} → {}: {} mirrored",
            self.route, self.mirror, self.sent
        );
        if self.skipped > 0 {
            s.push_str(&format!(" ({} skipped)", self.skipped));
        }
        if let Some(a) = self.agreement {
            s.push_str(&format!("; {:.1} % agree with the primary", a * 100.0));
        }
        if let Some(d) = self.latency_diff_ms {
            let (word, d) = if d >= 0.0 {
                ("slower", d)
            } else {
                ("faster", -d)
            };
            s.push_str(&format!("; the mirror {d:.1} ms {word} on average"));
        }
        if !self.failures.is_empty() {
            let f: Vec<String> = self
                .failures
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            s.push_str(&format!("; its failures: {}", f.join(", ")));
        }
        s
    }
}

/// The window's mirrors, by route and mirror, of the services `sel` names (namespace, name).
pub fn mirrors(w: &Window, sel: &Selector) -> Vec<MirrorRow> {
    let m = sel.prepared();
    let mut by: BTreeMap<(String, String), (MirrorRow, i64)> = BTreeMap::new();
    for f in &w.mirrors {
        let x = &f.figures;
        if !m.matches(&x.service) {
            continue;
        }
        let (row, diff) = by
            .entry((x.route.clone(), x.mirror.clone()))
            .or_insert_with(|| {
                (
                    MirrorRow {
                        route: x.route.clone(),
                        service: x.service.clone(),
                        mirror: x.mirror.clone(),
                        ..Default::default()
                    },
                    0,
                )
            });
        row.sent += x.sent;
        row.skipped += x.skipped;
        row.compared += x.compared;
        *diff += x.latency_diff_ms;
        // `agreement` holds the count until the end.
        *row.agreement.get_or_insert(0.0) += x.agreed as f64;
        for (c, n) in &x.failures {
            *row.failures.entry(c.clone()).or_default() += n;
        }
    }
    by.into_values()
        .map(|(mut row, diff)| {
            let n = row.compared;
            row.agreement = row.agreement.filter(|_| n > 0).map(|a| a / n as f64);
            row.latency_diff_ms = (n > 0).then(|| diff as f64 / n as f64);
            row
        })
        .collect()
}
