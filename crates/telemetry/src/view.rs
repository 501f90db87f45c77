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
    hist::Histogram,
    key::{Direction, Key, Protocol, Stats},
};

/// Whose view a row is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
}

impl Latency {
    fn of(h: &Histogram) -> Self {
        let ms = |q| h.quantile(q).map(|s| s * 1000.0);
        Self {
            p50: ms(0.5),
            p95: ms(0.95),
            p99: ms(0.99),
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
    classes: BTreeMap<FailureClass, u64>,
}

impl Acc {
    fn add(&mut self, k: &Key, s: &Stats) {
        self.tcp_opened += s.tcp_opened;
        self.tcp_bytes += s.bytes_sent + s.bytes_received;
        // Gauges of different series add up (each is one series' latest).
        self.tcp_open += s.tcp_open.map_or(0, |(n, _)| n);
        if k.protocol == Protocol::Tcp {
            if k.class != FailureClass::Ok && s.tcp_closed > 0 {
                *self.classes.entry(k.class).or_default() += s.tcp_closed;
            }
            return;
        }
        self.requests += s.requests;
        self.attempts += s.attempts.max(s.requests);
        self.latency.merge(&s.latency);
        if k.class != FailureClass::Ok {
            *self.classes.entry(k.class).or_default() += s.requests;
            if !matches!(k.class.category(), Category::Client | Category::Ok) {
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
    fn full_name(&self) -> Option<String> {
        let n = self.name.as_deref()?;
        Some(if n.contains('/') {
            n.to_string()
        } else {
            format!("{}/{n}", self.namespace.as_deref().unwrap_or("default"))
        })
    }

    fn matches(&self, name: &str) -> bool {
        match (self.full_name(), &self.namespace) {
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
    environments: BTreeSet<String>,
    localities: BTreeSet<String>,
    meshed: bool,
    services: BTreeSet<String>,
    src_identity: String,
    dst_identity: String,
    src_environment: String,
    dst_environment: String,
}

fn insert(set: &mut BTreeSet<String>, v: &Arc<str>) {
    if !v.is_empty() {
        set.insert(v.to_string());
    }
}

/// `trellis stat` rows from a window of series (`window_s` seconds long).
pub fn stat(series: &[(Arc<Key>, Stats)], sel: &Selector, window_s: f64) -> Vec<StatRow> {
    let kind = sel.kind.unwrap_or(Kind::Service);
    // name → (seen, group); a name with a callers' view uses only that one.
    let mut callers: BTreeMap<String, Group> = BTreeMap::new();
    let mut served: BTreeMap<String, Group> = BTreeMap::new();
    for (k, s) in series {
        let (name, map) = match (kind, k.direction) {
            (Kind::Service, Direction::Outbound) => (&k.service, &mut callers),
            (Kind::Service, Direction::Inbound) => (&k.service, &mut served),
            (Kind::Workload, Direction::Inbound) => (&k.workload, &mut served),
            (Kind::Workload, Direction::Outbound) => (&k.workload, &mut callers),
        };
        if name.is_empty() || !sel.matches(name) {
            continue;
        }
        let g = map.entry(name.to_string()).or_default();
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
    let mut rows = Vec::new();
    let row = |name: String, g: Group, seen| StatRow {
        kind,
        name,
        environments: g.environments.into_iter().collect(),
        localities: g.localities.into_iter().collect(),
        meshed: g.meshed,
        seen,
        figures: g.acc.figures(window_s),
    };
    // A workload's own view (what it served) comes first; a service's is its callers'.
    let (first, second, s1, s2) = match kind {
        Kind::Service => (callers, served, Seen::Callers, Seen::Served),
        Kind::Workload => (served, callers, Seen::Served, Seen::Callers),
    };
    let mut seen_names = BTreeSet::new();
    for (name, g) in first {
        seen_names.insert(name.clone());
        rows.push(row(name, g, s1));
    }
    for (name, g) in second {
        if !seen_names.contains(&name) {
            rows.push(row(name, g, s2));
        }
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    rows
}

/// `trellis edges` rows: pairs where either end matches `sel` (by workload).
pub fn edges(
    series: &[(Arc<Key>, Stats)],
    sel: &Selector,
    window_s: f64,
    identity_of: impl Fn(&str) -> Option<String>,
) -> Vec<EdgeRow> {
    let mut groups: BTreeMap<(String, String, Seen), Group> = BTreeMap::new();
    for (k, s) in series {
        let (src, dst, seen) = match k.direction {
            Direction::Outbound => (
                k.workload.to_string(),
                k.peer_workload.to_string(),
                Seen::Callers,
            ),
            // A meshed caller's own proxy reports the edge; the callee's view is used only
            // for callers without one.
            Direction::Inbound if k.peer_workload.is_empty() => {
                ("unmeshed".to_string(), k.workload.to_string(), Seen::Served)
            }
            Direction::Inbound => continue,
        };
        if dst.is_empty() {
            continue;
        }
        let any = sel.name.is_none() && sel.namespace.is_none();
        if !any && !sel.matches(&src) && !sel.matches(&dst) {
            continue;
        }
        let g = groups.entry((src.clone(), dst, seen)).or_default();
        g.acc.add(k, s);
        g.meshed |= k.mtls;
        insert(&mut g.services, &k.service);
        match k.direction {
            Direction::Outbound => {
                g.src_environment = k.environment.to_string();
                g.dst_environment = k.peer_environment.to_string();
                if !k.peer_identity.is_empty() {
                    g.dst_identity = k.peer_identity.to_string();
                }
                if g.src_identity.is_empty() {
                    g.src_identity = identity_of(&src).unwrap_or_default();
                }
            }
            Direction::Inbound => {
                g.src_environment = k.peer_environment.to_string();
                g.dst_environment = k.environment.to_string();
                if !k.peer_identity.is_empty() {
                    g.src_identity = k.peer_identity.to_string();
                }
                if g.dst_identity.is_empty() {
                    g.dst_identity = identity_of(&k.workload).unwrap_or_default();
                }
            }
        }
    }
    groups
        .into_iter()
        .map(|((src, dst, seen), g)| EdgeRow {
            src,
            src_environment: g.src_environment,
            src_identity: g.src_identity,
            dst,
            dst_environment: g.dst_environment,
            dst_identity: g.dst_identity,
            services: g.services.into_iter().collect(),
            mtls: g.meshed,
            seen,
            figures: g.acc.figures(window_s),
        })
        .collect()
}
