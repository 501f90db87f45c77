//! `trellis diagnose`: what is failing, whether it is the network, the application, the
//! mesh's policy or the configuration, where, and the evidence, from both ends of each hop.
//!
//! Every hop has a proxy at each end, and both report: the caller what it got (its outbound
//! series, by callee workload and failure class), the callee what it saw and what its own
//! connect to the application gave (its inbound series, by caller). The rules join the two:
//!
//! - the callee's proxy could not connect to its application → the application is down on
//!   that workload's host (whatever the callers saw);
//! - the callee's application answered errors → the application, confirmed by both sides;
//! - the caller timed out, and the callee saw those requests → the application is slower
//!   than the caller waits (the callee's latency is the evidence);
//! - the caller's attempts failed in the network (timed out, reset, refused by the callee's
//!   proxy) and the callee never saw them → the link from the caller when other callers of
//!   that callee are fine, the callee's host when every caller fails;
//! - requests that take far longer at the caller than at the callee spend the difference
//!   between the two proxies → a slow link (or the callee's host, when every caller waits);
//! - requests that did not fail but took a second or more, listed at both ends: slow at the
//!   callee too → the application; quick at the callee → the link;
//! - TLS failures → the two identities and which side refused;
//! - denied or overloaded → the mesh's policy (the policies that target the service);
//! - no endpoint, no route, a refused config, an unresolved reference → configuration, or the
//!   application when the workloads exist but are down.
//!
//! The rules read classes and counts, never the names of the tests' scenarios; each verdict
//! carries the counts it rests on so that a reader can disagree with it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use trellis_taxonomy::FailureClass;

use crate::{
    key::{Direction, LatKey, Protocol},
    store::{FailedAttempt, Window},
};

/// What kind of problem a verdict names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The network between two proxies, or a host.
    Network,
    /// The application.
    Application,
    /// The mesh's policy (authorization, limits).
    MeshPolicy,
    /// The mesh's configuration (resources, a proxy's config).
    Configuration,
    /// The callers.
    Client,
}

/// One end of a link.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct End {
    /// Workload, `namespace/name` (empty: an unmeshed caller).
    pub workload: String,
    /// Its environment.
    pub environment: String,
    /// Its locality.
    pub locality: String,
}

/// Where a problem is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Place {
    /// A workload (its application, its host or its proxy).
    Workload {
        /// The workload.
        at: End,
    },
    /// The network path from one workload's host to another's.
    Link {
        /// The caller.
        from: End,
        /// The callee.
        to: End,
    },
    /// A service as a whole.
    Service {
        /// `namespace/name`.
        name: String,
    },
    /// A resource or a proxy's config.
    Resource {
        /// `Kind namespace/name`, or the proxy.
        name: String,
    },
}

impl Place {
    /// The names it mentions (for a selector).
    fn names(&self) -> Vec<&str> {
        match self {
            Place::Workload { at } => vec![&at.workload],
            Place::Link { from, to } => vec![&from.workload, &to.workload],
            Place::Service { name } | Place::Resource { name } => vec![name],
        }
    }
}

/// What a diagnosis read of its selection: the proxies heard from in the window and the
/// requests and TCP connections they reported (a hop counts at each end that reported it).
/// With no verdict, it tells "nothing failed" from "nothing to judge".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Judged {
    /// Proxies that reported in the window.
    pub proxies: usize,
    /// Requests they reported, both ends of each hop.
    pub requests: u64,
    /// TCP connections they reported opened, both ends.
    pub connections: u64,
}

/// What `w` holds to judge ([`Judged`]) of what `names` selects (as [`diagnose`]'s: a
/// series counts when its workload, service or peer is selected; a proxy by its workload).
pub fn judged(w: &Window, names: &dyn Fn(&str) -> bool) -> Judged {
    let (requests, connections) = w
        .series
        .iter()
        .filter(|(k, _)| names(&k.workload) || names(&k.service) || names(&k.peer_workload))
        .fold((0, 0), |(r, c), (_, n)| {
            (r + n.requests, c + u64::from(n.tcp_opened))
        });
    Judged {
        proxies: w.reporting.iter().filter(|(r, _)| names(r)).count(),
        requests,
        connections,
    }
}

/// A problem found, with its evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Network, application, mesh policy, configuration or client.
    pub cause: Cause,
    /// The problem, in a sentence.
    pub problem: String,
    /// Where.
    pub place: Place,
    /// The services concerned.
    pub services: Vec<String>,
    /// Failed requests (or attempts) it accounts for.
    pub failed: u64,
    /// What the callers' proxies recorded, by class.
    pub caller_saw: BTreeMap<FailureClass, u64>,
    /// What the callee's proxy recorded, by class (`ok` included: it saw those).
    pub callee_saw: BTreeMap<FailureClass, u64>,
    /// The facts it rests on, one a line.
    pub evidence: Vec<String>,
    /// The next thing to check.
    pub next: String,
    /// Trace ids of some of the failed requests (a few), to look up in a tracing backend.
    #[serde(default)]
    pub traces: Vec<String>,
    /// When the first and the last of the failed requests it rests on ended (Unix ms, by
    /// the proxies' clocks), from those listed one by one; absent when none was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_ms: Option<u64>,
    /// See `first_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ms: Option<u64>,
}

/// Sample trace ids kept per verdict.
const TRACES: usize = 3;

/// What the failed requests listed one by one say of one caller, service, callee and class:
/// how many the caller listed, how many of those the callee's proxy listed too (joined by
/// the attempt's id), and some of their trace ids.
struct Joined {
    listed: usize,
    arrived: usize,
    traces: Vec<String>,
}

/// Of `mine` (a caller's attempts listed one by one), those that can be looked for in what
/// `callee`'s proxy listed in `list` — beyond its bound a proxy lists the attempts with the
/// smallest ids, so only a caller's attempts below every bound the callee's lists had — and
/// how many of those the callee listed as coming from `caller`.
fn joinable<'a>(
    w: &Window,
    mine: &[&'a crate::report::Attempt],
    list: &[std::sync::Arc<FailedAttempt>],
    caller: &str,
    callee: &str,
) -> (Vec<&'a crate::report::Attempt>, usize) {
    // An attempt the callee's proxy could not have told of yet (it last reported before the
    // attempt ended, give or take [`SETTLE_MS`]) is not compared: its absence there says
    // nothing. A callee not heard from at all in the window is compared as before (its
    // silence is evidence of its own).
    let heard = w
        .reporting
        .iter()
        .find(|(r, _)| &**r == callee)
        .map(|(_, at)| *at);
    let theirs: Vec<&FailedAttempt> = list
        .iter()
        .filter(|a| &*a.reporter == callee && a.attempt.direction == 1)
        .map(|a| &**a)
        .collect();
    let below = theirs
        .iter()
        .map(|a| a.listed_below)
        .min()
        .unwrap_or(u64::MAX);
    let ids: BTreeSet<u64> = theirs
        .iter()
        .filter(|a| a.attempt.peer_workload == caller)
        .map(|a| a.attempt.id)
        .collect();
    let comparable: Vec<&crate::report::Attempt> = mine
        .iter()
        .copied()
        .filter(|a| a.id != 0 && a.id <= below)
        .filter(|a| heard.is_none_or(|h| a.at_ms + SETTLE_MS <= h))
        .collect();
    let found = comparable.iter().filter(|a| ids.contains(&a.id)).count();
    (comparable, found)
}

fn join(w: &Window, caller: &str, svc: &str, callee: &str, class: FailureClass) -> Joined {
    let mine: Vec<&crate::report::Attempt> = w
        .attempts
        .iter()
        .filter(|a| {
            &*a.reporter == caller
                && a.attempt.direction == 0
                && a.attempt.service == svc
                && a.attempt.peer_workload == callee
                && a.attempt.class == class.as_str()
        })
        .map(|a| &a.attempt)
        .collect();
    let (comparable, arrived) = joinable(w, &mine, &w.attempts, caller, callee);
    Joined {
        listed: comparable.len(),
        arrived,
        traces: mine
            .iter()
            .rev()
            .take(TRACES)
            .map(|a| a.trace_id.clone())
            .collect(),
    }
}
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// Authorization policies by the service they target (`ns/name` → `ns/policy (ACTION)`).
    pub policies: BTreeMap<String, Vec<String>>,
    /// The workloads each service (`ns/name`) selects, with their health when known.
    pub selects: BTreeMap<String, Vec<(String, Option<bool>)>>,
    /// The shortest route timeout of each service, milliseconds.
    pub timeouts_ms: BTreeMap<String, u64>,
    /// Proxies that refused their config: (who, why).
    pub refused: Vec<(String, String)>,
    /// Resources whose references do not resolve: (resource, message).
    pub unresolved: Vec<(String, String)>,
    /// The backends that do not resolve in the routes served for each service (`ns/name`),
    /// one line each (route, backend, its weight, why): the requests the routes send them
    /// are answered 500, class `no_route`.
    pub dangling: BTreeMap<String, Vec<String>>,
    /// Workloads' events in the window, oldest first: (when, workload, `joined`, `left`,
    /// `healthy` or `unhealthy`).
    pub events: Vec<(u64, String, String)>,
    /// Workloads that left in the window, by each service (`ns/name`) that selected them:
    /// (workload, when).
    pub departed: BTreeMap<String, Vec<(String, u64)>>,
    /// Now (Unix ms): events are told as so long ago.
    pub now_ms: u64,
}

impl Facts {
    /// The latest events of `workload`, as evidence lines (at most three).
    fn events_of(&self, workload: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .events
            .iter()
            .rev()
            .filter(|(_, w, _)| w == workload)
            .take(3)
            .map(|(at, w, kind)| {
                format!("{w}: {kind} {} ago", ago(self.now_ms.saturating_sub(*at)))
            })
            .collect();
        v.reverse();
        v
    }
}

/// `ms` milliseconds as a person says it: seconds, minutes or hours.
pub fn ago(ms: u64) -> String {
    match ms / 1000 {
        s @ 0..=119 => format!("{s} s"),
        s @ 120..=7199 => format!("{} min", s / 60),
        s => format!("{} h", s / 3600),
    }
}

/// A caller's requests to one service's workload, or to the service when no endpoint was
/// picked.
#[derive(Default)]
struct Pair {
    caller: End,
    callee: End,
    identity: String,
    requests: u64,
    attempts: u64,
    classes: BTreeMap<FailureClass, u64>,
    /// A callee's HTTP requests, and TCP streams that named their caller, whose exchange with
    /// its own application was reset (the application's side: a caller that goes away is
    /// `client_disconnect`). An older proxy's stream reset could be either side's, so it is
    /// not counted here.
    app_resets: u64,
}

impl Pair {
    fn failed(&self) -> u64 {
        self.classes
            .iter()
            .filter(|(c, _)| counts_against(**c))
            .map(|(_, n)| n)
            .sum()
    }

    fn ok(&self) -> u64 {
        self.classes.get(&FailureClass::Ok).copied().unwrap_or(0)
    }
}

/// Whether a class is a failure of the service (not the client's doing).
fn counts_against(c: FailureClass) -> bool {
    !matches!(
        c,
        FailureClass::Ok | FailureClass::ClientError | FailureClass::ClientDisconnect
    )
}

/// The least failures a verdict needs: one failure may be chance.
const MIN_FAILED: u64 = 2;

fn end(workload: &str, environment: &str, locality: &str) -> End {
    End {
        workload: workload.into(),
        environment: environment.into(),
        locality: locality.into(),
    }
}

fn named(e: &End) -> String {
    if e.workload.is_empty() {
        return "unmeshed callers".into();
    }
    match (e.environment.as_str(), e.locality.as_str()) {
        ("" | "unknown", "") => e.workload.clone(),
        (env, "") => format!("{} ({env})", e.workload),
        ("" | "unknown", loc) => format!("{} ({loc})", e.workload),
        (env, loc) => format!("{} ({env}, {loc})", e.workload),
    }
}

fn classes_text(m: &BTreeMap<FailureClass, u64>) -> String {
    let mut v: Vec<(&FailureClass, &u64)> = m.iter().filter(|(_, n)| **n > 0).collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    let parts: Vec<String> = v.iter().map(|(c, n)| format!("{c} {n}")).collect();
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(", ")
    }
}

/// Verdicts accumulate by (cause, problem kind, place): two callers seeing one fault give
/// one verdict.
#[derive(Default)]
struct Found(BTreeMap<(Cause, &'static str, Place), Verdict>);

impl Found {
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        cause: Cause,
        kind: &'static str,
        place: Place,
        service: &str,
        problem: String,
        failed: u64,
        caller: &BTreeMap<FailureClass, u64>,
        callee: &BTreeMap<FailureClass, u64>,
        evidence: Vec<String>,
        next: String,
    ) -> &mut Verdict {
        let v = self
            .0
            .entry((cause, kind, place.clone()))
            .or_insert_with(|| Verdict {
                cause,
                problem,
                place,
                services: Vec::new(),
                failed: 0,
                caller_saw: BTreeMap::new(),
                callee_saw: BTreeMap::new(),
                evidence: Vec::new(),
                next,
                traces: Vec::new(),
                first_ms: None,
                last_ms: None,
            });
        if !service.is_empty() && !v.services.iter().any(|s| s == service) {
            v.services.push(service.to_string());
        }
        v.failed += failed;
        for (c, n) in caller {
            *v.caller_saw.entry(*c).or_default() += n;
        }
        for (c, n) in callee {
            *v.callee_saw.entry(*c).or_default() += n;
        }
        for e in evidence {
            if !v.evidence.contains(&e) {
                v.evidence.push(e);
            }
        }
        v
    }
}

impl Verdict {
    /// Add what the one-by-one lists say.
    fn joined(&mut self, j: Option<&Joined>, caller: &str, callee: &str) {
        let Some(j) = j else {
            return;
        };
        if j.listed > 0 {
            let line = format!(
                "by attempt id: {} of the {} failed attempts {caller} listed reached {callee}'s proxy",
                j.arrived, j.listed
            );
            if !self.evidence.contains(&line) {
                self.evidence.push(line);
            }
        }
        for t in &j.traces {
            if self.traces.len() < TRACES && !self.traces.contains(t) {
                self.traces.push(t.clone());
            }
        }
    }
}

fn only(m: &BTreeMap<FailureClass, u64>, keep: &[FailureClass]) -> BTreeMap<FailureClass, u64> {
    m.iter()
        .filter(|(c, _)| keep.contains(c))
        .map(|(c, n)| (*c, *n))
        .collect()
}

fn sum(m: &BTreeMap<FailureClass, u64>, of: &[FailureClass]) -> u64 {
    of.iter().map(|c| m.get(c).copied().unwrap_or(0)).sum()
}

fn inbound_p99_ms(w: &Window, callee: &str, service: &str, caller: &str) -> Option<f64> {
    w.latency
        .iter()
        .filter(|(k, _)| is_inbound(k, callee, service, caller))
        .find_map(|(_, h)| h.quantile(0.99))
        .map(|s| s * 1000.0)
}

fn is_inbound(k: &LatKey, callee: &str, service: &str, caller: &str) -> bool {
    k.direction == Direction::Inbound
        && &*k.workload == callee
        && &*k.service == service
        && &*k.peer_workload == caller
}

/// The callers of one hop (service, callee): workload → (environment, locality).
type Callers<'a> = BTreeMap<&'a str, (&'a str, &'a str)>;

/// Every problem in `w`, most failed requests first. `names` keeps only the verdicts whose
/// place or services mention one of them (empty: all).
pub fn diagnose(w: &Window, facts: &Facts, names: &dyn Fn(&str) -> bool) -> Vec<Verdict> {
    use FailureClass as F;
    // Both sides of every hop, by (caller, service, callee).
    let mut out_pairs: BTreeMap<(String, String, String), Pair> = BTreeMap::new();
    let mut in_pairs: BTreeMap<(String, String, String), Pair> = BTreeMap::new();
    // Who called each callee for each service, by the callers' own reports. A TCP stream
    // from a proxy older than the stream's hello carries its caller's identity (mutual TLS)
    // but not its workload: the callee's side of such a stream is joined to the caller that
    // reported the same hop, when only one did.
    let mut callers_of: BTreeMap<(&str, &str), Callers<'_>> = BTreeMap::new();
    for (k, _) in &w.series {
        if k.direction == Direction::Outbound && !k.peer_workload.is_empty() {
            callers_of
                .entry((&*k.service, &*k.peer_workload))
                .or_default()
                .insert(&*k.workload, (&*k.environment, &*k.locality));
        }
    }
    let sole_caller = |k: &crate::key::Key| {
        k.unnamed_stream()
            .then(|| callers_of.get(&(&*k.service, &*k.workload)))
            .flatten()
            .filter(|m| m.len() == 1)
            .and_then(|m| m.iter().next())
            .map(|(w, (e, l))| (*w, *e, *l))
    };
    // The callee's side of meshed callers' streams that could not be joined to one caller
    // (several share the hop), by (service, callee).
    let mut unnamed_streams: BTreeMap<(String, String), BTreeMap<FailureClass, u64>> =
        BTreeMap::new();
    for (k, c) in &w.series {
        let (map, key, caller, callee) = match k.direction {
            Direction::Outbound => (
                &mut out_pairs,
                (
                    k.workload.to_string(),
                    k.service.to_string(),
                    k.peer_workload.to_string(),
                ),
                end(&k.workload, &k.environment, &k.locality),
                end(&k.peer_workload, &k.peer_environment, &k.peer_locality),
            ),
            Direction::Inbound => {
                let sole = sole_caller(k);
                if sole.is_none() && k.unnamed_stream() {
                    let n = u64::from(c.tcp_closed);
                    *unnamed_streams
                        .entry((k.service.to_string(), k.workload.to_string()))
                        .or_default()
                        .entry(k.class)
                        .or_default() += n;
                }
                let (pw, pe, pl) =
                    sole.unwrap_or((&k.peer_workload, &k.peer_environment, &k.peer_locality));
                (
                    &mut in_pairs,
                    (
                        pw.to_string(),
                        k.service.to_string(),
                        k.workload.to_string(),
                    ),
                    end(pw, pe, pl),
                    end(&k.workload, &k.environment, &k.locality),
                )
            }
        };
        let p = map.entry(key).or_default();
        if p.caller.workload.is_empty() {
            p.caller = caller;
        }
        if p.callee.workload.is_empty() {
            p.callee = callee;
        }
        if p.identity.is_empty() {
            p.identity = k.peer_identity.to_string();
        }
        let n = c.requests + u64::from(c.tcp_closed);
        p.requests += n;
        p.attempts += c.attempts;
        // A series of tries that failed and were retried has attempts and no request:
        // they count by their attempts (the endpoint failed, even if a retry saved them).
        let failed_tries = if n == 0 { c.attempts } else { 0 };
        *p.classes.entry(k.class).or_default() += n + failed_tries;
        // The callee's proxy saw its application reset the exchange: an HTTP request's, or
        // a stream's that names its caller (its hello did, so the callee's proxy is one that
        // tells its application's resets, `connection_reset`, from its caller's leaving,
        // `client_disconnect`; an older proxy's stream reset could be either side's).
        let told_apart = k.protocol == Protocol::Http || !k.peer_workload.is_empty();
        if k.direction == Direction::Inbound
            && told_apart
            && k.class == FailureClass::ConnectionReset
        {
            p.app_resets += n + failed_tries;
        }
    }
    // What each callee's proxy saw, from every caller.
    let mut callee_all: BTreeMap<(String, String), BTreeMap<F, u64>> = BTreeMap::new();
    for ((_, svc, callee), p) in &in_pairs {
        let m = callee_all.entry((svc.clone(), callee.clone())).or_default();
        for (c, n) in &p.classes {
            *m.entry(*c).or_default() += n;
        }
    }
    let empty = BTreeMap::new();
    let mut found = Found::default();

    // 1. What the callees' proxies recorded about their own applications.
    for ((caller, svc, _), p) in &in_pairs {
        let refused = sum(&p.classes, &[F::ConnectRefused, F::ConnectTimeout]);
        if refused >= MIN_FAILED {
            let m = only(&p.classes, &[F::ConnectRefused, F::ConnectTimeout]);
            found.add(
                Cause::Application,
                "app_down",
                Place::Workload { at: p.callee.clone() },
                svc,
                format!(
                    "the application of {} does not accept connections from its proxy",
                    p.callee.workload
                ),
                refused,
                &empty,
                &m,
                vec![format!(
                    "{}'s proxy could not connect to its application {refused} times ({})",
                    p.callee.workload,
                    classes_text(&m)
                )],
                format!(
                    "is the application of {} running and listening on the port its Workload declares for {svc}?",
                    p.callee.workload
                ),
            );
        }
        let errors = sum(&p.classes, &[F::AppError, F::AppGrpcError]);
        if errors >= MIN_FAILED {
            let m = only(&p.classes, &[F::AppError, F::AppGrpcError, F::Ok]);
            let share = errors as f64 / p.requests.max(1) as f64;
            found.add(
                Cause::Application,
                "app_errors",
                Place::Workload { at: p.callee.clone() },
                svc,
                format!("the application of {} answers errors", p.callee.workload),
                errors,
                &empty,
                &m,
                vec![format!(
                    "{}'s proxy relayed {errors} error answers of its application ({:.0} % of {} requests from {})",
                    p.callee.workload,
                    share * 100.0,
                    p.requests,
                    if caller.is_empty() { "unmeshed callers" } else { caller }
                )],
                format!("see the logs of the application of {}", p.callee.workload),
            );
        }
        if p.app_resets >= MIN_FAILED {
            let n = p.app_resets;
            app_resets(
                &mut found,
                svc,
                &p.callee,
                n,
                &empty,
                &BTreeMap::from([(F::ConnectionReset, n)]),
                format!(
                    "{}'s proxy had {n} exchanges for {svc} with its application cut by a reset or close (of {} from {})",
                    p.callee.workload,
                    p.requests,
                    if caller.is_empty() { "unmeshed callers" } else { caller }
                ),
            );
        }
        let tls = sum(&p.classes, &[F::TlsError]);
        if tls >= MIN_FAILED {
            found.add(
                Cause::Network,
                "tls",
                Place::Workload {
                    at: p.callee.clone(),
                },
                svc,
                format!("{}'s proxy refuses TLS handshakes", p.callee.workload),
                tls,
                &empty,
                &only(&p.classes, &[F::TlsError]),
                vec![format!(
                    "{}'s proxy failed {tls} inbound handshakes",
                    p.callee.workload
                )],
                "check that callers have a certificate of the mesh's current roots (trellis check)"
                    .into(),
            );
        }
        // A meshed caller's refusals are joined from its side below (both counts at once).
        for class in [F::Denied, F::Overloaded, F::RateLimited] {
            let n = p.classes.get(&class).copied().unwrap_or(0);
            if n >= MIN_FAILED && caller.is_empty() {
                policy(
                    &mut found,
                    facts,
                    svc,
                    &p.callee,
                    class,
                    n,
                    &empty,
                    &p.classes,
                    Refuser::Own,
                );
            }
        }
    }

    // Every caller's resets of each hop, for the streams that are not joined one by one.
    let mut resets_to: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for ((_, svc, callee), p) in &out_pairs {
        *resets_to.entry((svc, callee)).or_default() +=
            p.classes.get(&F::ConnectionReset).copied().unwrap_or(0);
    }

    // 2. What the callers got, joined with what their callees saw.
    for ((caller, svc, callee), p) in &out_pairs {
        if callee.is_empty() {
            // No endpoint was picked: the service as a whole, or the caller's own limits
            // (even one such request may join the verdict that explains it).
            no_endpoint(&mut found, facts, svc, p);
            continue;
        }
        if p.failed() < MIN_FAILED {
            continue;
        }
        let joined = in_pairs.get(&(caller.clone(), svc.clone(), callee.clone()));
        let seen = joined.map(|q| q.classes.clone()).unwrap_or_default();
        let seen_n: u64 = seen.values().sum();
        let at_callee = callee_all
            .get(&(svc.clone(), callee.clone()))
            .cloned()
            .unwrap_or_default();
        let callee_ok = at_callee.get(&F::Ok).copied().unwrap_or(0);
        // The callee's proxy could not reach its application: found above.
        let app_down = sum(&at_callee, &[F::ConnectRefused, F::ConnectTimeout]) >= MIN_FAILED;
        let app_errors = sum(&at_callee, &[F::AppError, F::AppGrpcError]) >= MIN_FAILED;
        // What the callee's proxy recorded of the streams this caller saw reset: its own
        // (joined to it), or, when several callers share the hop and the callee's side names
        // none of them, all the hop's streams, which must then explain every caller's
        // resets together.
        let unnamed = unnamed_streams.get(&(svc.clone(), callee.clone()));
        let all_resets = resets_to
            .get(&(svc.as_str(), callee.as_str()))
            .copied()
            .unwrap_or(0);
        // The callee's records of `set` must cover this caller's resets on top of what the
        // caller already got back as `set` (an HTTP caller is told a refusal).
        let explains = |set: &[F], n: u64| {
            sum(&seen, set) >= n + sum(&p.classes, set)
                || unnamed.is_some_and(|u| sum(u, set) >= all_resets.max(n))
        };
        let stream_seen = match unnamed {
            Some(u) if seen.is_empty() => u.clone(),
            _ => seen.clone(),
        };
        // This caller's requests whose exchange the callee's application reset.
        let reset_there = joined.map_or(0, |q| q.app_resets);
        for (class, n) in &p.classes {
            let n = *n;
            if !counts_against(*class) || n == 0 {
                continue;
            }
            // The one-by-one lists joined once per class that needs them.
            let j = matches!(
                class,
                F::ConnectRefused | F::ConnectTimeout | F::UpstreamTimeout | F::ConnectionReset
            )
            .then(|| join(w, caller, svc, callee, *class));
            match class {
                F::AppError | F::AppGrpcError => {
                    if !app_errors {
                        // The caller got errors the callee's proxy did not record as its
                        // application's: an unmeshed callee, or one that does not report.
                        found.add(
                            Cause::Application,
                            "app_errors",
                            Place::Workload { at: p.callee.clone() },
                            svc,
                            format!("the application of {} answers errors", p.callee.workload),
                            n,
                            &only(&p.classes, &[*class, F::Ok]),
                            &seen,
                            vec![format!(
                                "{} got {n} error answers from {} (its proxy reported none: not meshed, or not reporting)",
                                p.caller.workload, p.callee.workload
                            )],
                            format!("see the logs of the application of {}", p.callee.workload),
                        );
                    } else {
                        found.add(
                            Cause::Application,
                            "app_errors",
                            Place::Workload {
                                at: p.callee.clone(),
                            },
                            svc,
                            format!("the application of {} answers errors", p.callee.workload),
                            0,
                            &only(&p.classes, &[*class, F::Ok]),
                            &empty,
                            vec![format!(
                                "{} got {n} of them (both sides agree)",
                                p.caller.workload
                            )],
                            format!("see the logs of the application of {}", p.callee.workload),
                        );
                    }
                }
                // A refused or timed-out connect is the callee's answer, carried back, only if
                // the attempts reached its proxy (by their ids, else by its count of this
                // caller's requests that ended so): its application being down in the same
                // window does not make the caller's own connects to its proxy its answers.
                F::ConnectRefused | F::ConnectTimeout | F::UpstreamTimeout | F::ConnectionReset
                    if app_down
                        && ((matches!(class, F::ConnectRefused | F::ConnectTimeout)
                            && arrived(
                                j.as_ref(),
                                sum(&seen, &[F::ConnectRefused, F::ConnectTimeout]),
                                n,
                            ))
                            || (*class == F::ConnectionReset
                                && explains(&[F::ConnectRefused, F::ConnectTimeout], n))) =>
                {
                    // The far hop's own answer, carried back: the application is down. Or,
                    // for a TCP stream from a proxy older than the stream's answer: the
                    // callee's proxy took as many of this caller's streams and closed them,
                    // its application refusing them.
                    let told = if *class == F::ConnectionReset {
                        format!(
                            "{} had {n} connections closed by {}'s proxy (connection_reset), whose application refused as many of its callers' streams",
                            p.caller.workload, p.callee.workload
                        )
                    } else {
                        format!(
                            "{} got {n} {class} answers from {}'s proxy",
                            p.caller.workload, p.callee.workload
                        )
                    };
                    found.add(
                        Cause::Application,
                        "app_down",
                        Place::Workload { at: p.callee.clone() },
                        svc,
                        format!(
                            "the application of {} does not accept connections from its proxy",
                            p.callee.workload
                        ),
                        0,
                        &only(&p.classes, &[*class]),
                        &empty,
                        vec![told],
                        format!(
                            "is the application of {} running and listening on the port its Workload declares for {svc}?",
                            p.callee.workload
                        ),
                    );
                }
                F::ConnectionReset if reset_there >= MIN_FAILED && reset_there >= n => {
                    // The callee's proxy saw its application reset as many of this caller's
                    // requests, and told the caller so: the application's, on its workload.
                    app_resets(
                        &mut found,
                        svc,
                        &p.callee,
                        0,
                        &only(&p.classes, &[*class]),
                        &empty,
                        format!(
                            "{} got {n} of them for {svc} as connection_reset (both sides agree)",
                            p.caller.workload
                        ),
                    );
                }
                F::ConnectionReset if explains(&[F::Denied, F::Overloaded, F::RateLimited], n) => {
                    // A TCP stream the callee's proxy refuses (policy, its limit) is closed
                    // without an answer by a proxy older than the stream's answer: the caller
                    // sees it reset. The callee's proxy recorded at
                    // least as many of this caller's streams so: its reason is the verdict's.
                    let refused = [F::Denied, F::Overloaded, F::RateLimited]
                        .into_iter()
                        .max_by_key(|c| stream_seen.get(c).copied().unwrap_or(0))
                        .unwrap_or(F::Denied);
                    policy(
                        &mut found,
                        facts,
                        svc,
                        &p.callee,
                        refused,
                        n,
                        &only(&p.classes, &[*class]),
                        // Streams not joined to this caller are counted once, from the
                        // callee's side (step 1).
                        if seen.is_empty() { &empty } else { &seen },
                        Refuser::Callee,
                    );
                }
                F::UpstreamTimeout if arrived(j.as_ref(), seen_n, n) => {
                    // The callee saw them: its application took too long.
                    let p99 = inbound_p99_ms(w, callee, svc, caller);
                    let timeout = facts.timeouts_ms.get(svc);
                    let mut ev = vec![format!(
                        "{} timed out {n} times waiting for {}; {}'s proxy saw {seen_n} requests from it ({})",
                        p.caller.workload,
                        p.callee.workload,
                        p.callee.workload,
                        classes_text(&seen)
                    )];
                    if let Some(ms) = p99 {
                        ev.push(format!(
                            "the callee's requests from this caller took up to {ms:.0} ms (p99)"
                        ));
                    }
                    if let Some(t) = timeout {
                        ev.push(format!("the route's timeout is {t} ms"));
                    }
                    found.add(
                        Cause::Application,
                        "slow",
                        Place::Workload { at: p.callee.clone() },
                        svc,
                        format!(
                            "the application of {} answers slower than its callers wait",
                            p.callee.workload
                        ),
                        n,
                        &only(&p.classes, &[*class]),
                        &seen,
                        ev,
                        format!(
                            "why is the application of {} slow (its load, what it waits on)? Or raise {svc}'s route timeout",
                            p.callee.workload
                        ),
                    )
                    .joined(j.as_ref(), caller, callee);
                }
                F::ConnectRefused | F::ConnectTimeout | F::UpstreamTimeout | F::ConnectionReset => {
                    let up = w
                        .reporting
                        .iter()
                        .filter(|(r, _)| &**r == callee)
                        .map(|(_, at)| facts.now_ms.saturating_sub(*at))
                        .min();
                    let seen = Seen {
                        classes: &seen,
                        n: seen_n,
                        ok: callee_ok,
                        reported_ago_ms: up,
                    };
                    network(&mut found, &out_pairs, p, svc, *class, n, &seen).joined(
                        j.as_ref(),
                        caller,
                        callee,
                    );
                }
                F::TlsError => {
                    let mut ev = vec![format!(
                        "{} failed {n} TLS handshakes with {}'s proxy, which had to prove {}",
                        p.caller.workload,
                        p.callee.workload,
                        if p.identity.is_empty() {
                            "its identity"
                        } else {
                            &p.identity
                        }
                    )];
                    let refused_there = seen.get(&F::TlsError).copied().unwrap_or(0);
                    ev.push(if refused_there > 0 {
                        format!("{}'s proxy refused {refused_there} of them: the caller's certificate", p.callee.workload)
                    } else {
                        "the callee's proxy recorded none: the caller refused the callee's certificate (wrong identity, or a root it does not trust)".into()
                    });
                    found.add(
                        Cause::Configuration,
                        "tls",
                        Place::Link {
                            from: p.caller.clone(),
                            to: p.callee.clone(),
                        },
                        svc,
                        format!(
                            "mutual TLS fails between {} and {}",
                            p.caller.workload, p.callee.workload
                        ),
                        n,
                        &only(&p.classes, &[F::TlsError]),
                        &seen,
                        ev,
                        format!(
                            "does {}'s Workload name the identity its certificate has (trellis get workload {})?",
                            p.callee.workload, p.callee.workload
                        ),
                    );
                }
                F::Denied | F::Overloaded | F::RateLimited => {
                    let whose = if seen.get(class).copied().unwrap_or(0) > 0 {
                        Refuser::Callee
                    } else {
                        Refuser::Either
                    };
                    policy(
                        &mut found,
                        facts,
                        svc,
                        &p.callee,
                        *class,
                        n,
                        &only(&p.classes, &[*class]),
                        &seen,
                        whose,
                    );
                }
                F::ProtocolError => {
                    found.add(
                        Cause::Application,
                        "protocol",
                        Place::Workload {
                            at: p.callee.clone(),
                        },
                        svc,
                        format!(
                            "{} does not speak the protocol its Service declares",
                            p.callee.workload
                        ),
                        n,
                        &only(&p.classes, &[*class]),
                        &seen,
                        vec![format!(
                            "{} got {n} answers it could not parse",
                            p.caller.workload
                        )],
                        format!("check the protocol of {svc}'s port (HTTP, HTTP2, GRPC, TCP)"),
                    );
                }
                // Faults the mesh injected on purpose: neither the network's nor the
                // application's, whatever their status says.
                F::Injected => {
                    found.add(
                        Cause::MeshPolicy,
                        "injected",
                        Place::Service { name: svc.clone() },
                        svc,
                        format!("requests to {svc} fail by faults the mesh injects on purpose"),
                        n,
                        &only(&p.classes, &[*class]),
                        &empty,
                        vec![format!(
                            "{} got {n} answers from its own proxy's trellis.dev/Fault filter (class injected), not from {}",
                            p.caller.workload, p.callee.workload
                        )],
                        format!(
                            "when the experiment is over, remove the fault filter from {svc}'s route (trellis get httproutes -n {})",
                            svc.split('/').next().unwrap_or_default()
                        ),
                    );
                }
                _ => no_endpoint(&mut found, facts, svc, p),
            }
        }
    }

    // 3. The kernel's figures of each link: loss or latency, even when few requests fail;
    //    and the time requests spend between the two proxies of a hop.
    link_figures(&mut found, w);
    latency_gaps(&mut found, w);
    slow_lists(&mut found, w);

    // 4. What the control plane knows of the configuration.
    for (who, why) in &facts.refused {
        found.add(
            Cause::Configuration,
            "refused",
            Place::Resource {
                name: format!("proxy {who}"),
            },
            "",
            format!("the proxy of {who} refused its configuration and serves the previous one"),
            0,
            &empty,
            &empty,
            vec![why.clone()],
            "fix what it names, then apply again (trellis status shows the proxy's state)".into(),
        );
    }
    for (res, why) in &facts.unresolved {
        found.add(
            Cause::Configuration,
            "unresolved",
            Place::Resource { name: res.clone() },
            "",
            format!("{res} refers to something that does not exist"),
            0,
            &empty,
            &empty,
            vec![why.clone()],
            format!("trellis describe {res}"),
        );
    }

    fold_ejections(&mut found);
    // What the control plane saw happen to the workloads a verdict is about.
    for v in found.0.values_mut() {
        let at = match &v.place {
            Place::Workload { at } => at.workload.clone(),
            Place::Link { to, .. } => to.workload.clone(),
            _ => continue,
        };
        for e in facts
            .events_of(&at)
            .into_iter()
            .chain(ejections_of(w, facts.now_ms, &at))
        {
            if !v.evidence.contains(&e) {
                v.evidence.push(e);
            }
        }
    }
    for v in found.0.values_mut() {
        if let Some((first, last)) = first_last(w, v) {
            v.first_ms = Some(first);
            v.last_ms = Some(last);
        }
    }
    let mut v: Vec<Verdict> = found
        .0
        .into_values()
        .filter(|v| v.place.names().iter().any(|n| names(n)) || v.services.iter().any(|s| names(s)))
        .collect();
    v.sort_by(|a, b| b.failed.cmp(&a.failed).then(a.place.cmp(&b.place)));
    v
}

/// What the callers' outlier detection did to `workload`'s endpoints, as evidence lines
/// (the newest three).
fn ejections_of(w: &Window, now_ms: u64, workload: &str) -> Vec<String> {
    let mut v: Vec<String> = w
        .ejections
        .iter()
        .rev()
        .filter(|e| e.ejection.peer_workload == workload)
        .take(3)
        .map(|e| {
            let x = &e.ejection;
            let when = ago(now_ms.saturating_sub(x.at_ms));
            if x.seconds == 0 {
                format!(
                    "{}'s proxy let {workload} back in {when} ago (its health check passed)",
                    e.reporter
                )
            } else {
                format!(
                    "{}'s proxy ejected {workload} ({}) {when} ago for {} s: {} failures in a row, the last {}",
                    e.reporter, x.endpoint, x.seconds, x.failures, x.class
                )
            }
        })
        .collect();
    v.reverse();
    v
}

/// When the failed requests a verdict rests on ended, first and last: those listed one by
/// one, of its classes and services, by a proxy at its place.
fn first_last(w: &Window, v: &Verdict) -> Option<(u64, u64)> {
    let classes: BTreeSet<&str> = v
        .caller_saw
        .keys()
        .chain(v.callee_saw.keys())
        .filter(|c| counts_against(**c))
        .map(|c| c.as_str())
        .collect();
    let at_place = |reporter: &str, peer: &str| match &v.place {
        Place::Workload { at } => reporter == at.workload || peer == at.workload,
        Place::Link { from, to } => {
            (reporter == from.workload && peer == to.workload)
                || (reporter == to.workload && peer == from.workload)
        }
        Place::Service { .. } | Place::Resource { .. } => true,
    };
    w.attempts
        .iter()
        .filter(|a| {
            classes.contains(a.attempt.class.as_str())
                && v.services.iter().any(|s| *s == a.attempt.service)
                && at_place(&a.reporter, &a.attempt.peer_workload)
        })
        .map(|a| a.attempt.at_ms)
        .fold(None, |acc, t| match acc {
            None => Some((t, t)),
            Some((f, l)) => Some((f.min(t), l.max(t))),
        })
}

/// Requests that found no usable endpoint of a service whose workloads were failing are a
/// consequence (outlier detection ejected them), not a problem of their own: they join the
/// verdict that explains them.
fn fold_ejections(found: &mut Found) {
    let ejected: Vec<_> = found
        .0
        .keys()
        .filter(|(c, k, _)| *k == "no_endpoint" && *c == Cause::Network)
        .cloned()
        .collect();
    for key in ejected {
        let Some(e) = found.0.get(&key).cloned() else {
            continue;
        };
        let svc = e.services.first().cloned().unwrap_or_default();
        let cause = found
            .0
            .iter_mut()
            .filter(|(k, _)| **k != key)
            .map(|(_, v)| v)
            .filter(|v| v.services.contains(&svc) && v.failed > 0)
            .max_by_key(|v| v.failed);
        if let Some(v) = cause {
            v.failed += e.failed;
            for (c, n) in &e.caller_saw {
                *v.caller_saw.entry(*c).or_default() += n;
            }
            v.evidence.push(format!(
                "then outlier detection ejected it: {} more requests to {svc} found no endpoint",
                e.failed
            ));
            found.0.remove(&key);
        }
    }
    // What no other verdict explains stands alone only if it is more than chance.
    found
        .0
        .retain(|(_, k, _), v| *k != "no_endpoint" || v.failed >= MIN_FAILED);
}

/// Segments sent before a link's retransmissions mean anything.
const LINK_MIN_SEGS: u64 = 200;
/// Retransmitted segments (per mille) that make a link lossy, and that a fine one stays under.
const LOSSY_PERMILLE: u64 = 20;
const FINE_PERMILLE: u64 = 5;
/// A round trip this long (µs), and this many times the others' to the same callee, is slow.
const SLOW_RTT_US: u32 = 50_000;
const SLOW_RTT_TIMES: u32 = 10;

/// A workload as one end of a link: its environment and locality from any series of it.
fn end_of(w: &Window, workload: &str) -> End {
    for (k, _) in &w.series {
        if &*k.workload == workload {
            return end(workload, &k.environment, &k.locality);
        }
        if &*k.peer_workload == workload {
            return end(workload, &k.peer_environment, &k.peer_locality);
        }
    }
    end(workload, "", "")
}

fn permille(l: &crate::report::Link) -> u64 {
    l.retrans * 1000 / l.segs_out.max(1)
}

/// Loss and latency on the links the proxies measured.
fn link_figures(found: &mut Found, w: &Window) {
    let empty = BTreeMap::new();
    for (reporter, l) in &w.links {
        if l.peer_workload.is_empty() {
            continue;
        }
        let others: Vec<&crate::report::Link> = w
            .links
            .iter()
            .filter(|(r, o)| r != reporter && o.peer_workload == l.peer_workload)
            .map(|(_, o)| o)
            .collect();
        let lossy = l.segs_out >= LINK_MIN_SEGS && permille(l) >= LOSSY_PERMILLE;
        let mut rtts: Vec<u32> = others.iter().map(|o| o.rtt_us).collect();
        rtts.sort_unstable();
        let median = rtts.get(rtts.len() / 2).copied();
        let slow = l.rtt_us >= SLOW_RTT_US
            && median.is_some_and(|m| l.rtt_us >= m.saturating_mul(SLOW_RTT_TIMES));
        if !lossy && !slow {
            continue;
        }
        let from = end_of(w, reporter);
        let to = end_of(w, &l.peer_workload);
        let figures = format!(
            "{reporter}'s connections to {} ({}): {} of {} segments retransmitted ({:.1} %), {} connection(s), round trip {:.1} ms",
            l.peer_workload,
            l.endpoint,
            l.retrans,
            l.segs_out,
            permille(l) as f64 / 10.0,
            l.sockets,
            f64::from(l.rtt_us) / 1000.0
        );
        let fine = others
            .iter()
            .filter(|o| o.segs_out >= LINK_MIN_SEGS / 2 && permille(o) < FINE_PERMILLE)
            .count();
        let mut ev = vec![figures];
        let (place, kind) = if lossy && fine == 0 && !others.is_empty() {
            ev.push(format!(
                "every other caller's link to {} loses segments too",
                l.peer_workload
            ));
            (Place::Workload { at: to.clone() }, "host_loss")
        } else {
            if !others.is_empty() {
                ev.push(format!(
                    "{} other caller(s) reach {} {}",
                    others.len(),
                    l.peer_workload,
                    if slow {
                        format!(
                            "with a round trip of {:.1} ms (median)",
                            f64::from(median.unwrap_or(0)) / 1000.0
                        )
                    } else {
                        "without loss".into()
                    }
                ));
            }
            (
                Place::Link {
                    from: from.clone(),
                    to: to.clone(),
                },
                if lossy { "loss" } else { "latency" },
            )
        };
        let problem = match (kind, lossy) {
            ("host_loss", _) => format!("the network of {} loses packets", named(&to)),
            (_, true) => format!(
                "packets are lost between {} and {}",
                named(&from),
                named(&to)
            ),
            _ => format!(
                "the network between {} and {} is slow",
                named(&from),
                named(&to)
            ),
        };
        found.add(
            Cause::Network,
            kind,
            place,
            "",
            problem,
            0,
            &empty,
            &empty,
            ev,
            format!(
                "check the path between the hosts of {reporter} and {}: interface errors and drops (ip -s link), a congested or faulty link",
                l.peer_workload
            ),
        );
    }
}

/// Time between two proxies (median, caller's minus callee's) from which a link is slow.
const GAP_SLOW_MS: f64 = 50.0;
/// ... and at most this for the link to count as fine.
const GAP_FINE_MS: f64 = 20.0;
/// Requests each side must have timed for their medians to count.
const GAP_MIN_REQUESTS: u64 = 20;

/// One caller → callee pair timed at both ends.
struct Gap {
    caller: String,
    callee: String,
    service: String,
    /// Medians, ms: at the caller's proxy (the whole way) and at the callee's (its
    /// application and its proxy's own work).
    caller_ms: f64,
    callee_ms: f64,
}

impl Gap {
    fn ms(&self) -> f64 {
        self.caller_ms - self.callee_ms
    }
}

/// Requests that take much longer at the caller than at the callee spend that time between
/// the two proxies: the network (or the callee's host), even when nothing fails. The
/// medians of both ends' histograms for the same caller, service and callee are compared;
/// the link when other callers of that callee are fine, the callee's host when all are slow.
fn latency_gaps(found: &mut Found, w: &Window) {
    let median = |k: &LatKey, h: &crate::hist::Histogram| -> Option<f64> {
        (h.count() >= GAP_MIN_REQUESTS && !k.peer_workload.is_empty())
            .then(|| h.quantile(0.5))
            .flatten()
            .map(|s| s * 1000.0)
    };
    // The callees' medians by (callee, service, caller): looked up once per caller's group
    // (a scan per group would be quadratic in the fleet's edges).
    let inbound: BTreeMap<(&str, &str, &str), f64> = w
        .latency
        .iter()
        .filter(|(k, _)| k.direction == Direction::Inbound)
        .filter_map(|(k, h)| {
            Some((
                (&*k.workload, &*k.service, &*k.peer_workload),
                median(k, h)?,
            ))
        })
        .collect();
    let mut gaps: Vec<Gap> = Vec::new();
    for (k, h) in &w.latency {
        if k.direction != Direction::Outbound {
            continue;
        }
        let Some(caller_ms) = median(k, h) else {
            continue;
        };
        let callee_ms = inbound
            .get(&(&*k.peer_workload, &*k.service, &*k.workload))
            .copied();
        if let Some(callee_ms) = callee_ms {
            gaps.push(Gap {
                caller: k.workload.to_string(),
                callee: k.peer_workload.to_string(),
                service: k.service.to_string(),
                caller_ms,
                callee_ms,
            });
        }
    }
    let empty = BTreeMap::new();
    for g in &gaps {
        if g.ms() < GAP_SLOW_MS || g.caller_ms < 2.0 * g.callee_ms {
            continue;
        }
        let others: Vec<&Gap> = gaps
            .iter()
            .filter(|o| o.callee == g.callee && o.caller != g.caller)
            .collect();
        let fine = others.iter().filter(|o| o.ms() <= GAP_FINE_MS).count();
        let (from, to) = (end_of(w, &g.caller), end_of(w, &g.callee));
        let mut ev = vec![format!(
            "{} waited {:.0} ms (median) for {}'s answers to {}, whose proxy took {:.1} ms: {:.0} ms between the two proxies",
            g.caller, g.caller_ms, g.callee, g.service, g.callee_ms, g.ms()
        )];
        let (place, kind, problem) = if !others.is_empty() && fine == 0 {
            ev.push(format!(
                "every other caller of {} waits too ({} other(s))",
                g.callee,
                others.len()
            ));
            (
                Place::Workload { at: to.clone() },
                "host_latency",
                format!(
                    "requests to {} are slow on the way, from every caller",
                    named(&to)
                ),
            )
        } else {
            if fine > 0 {
                ev.push(format!(
                    "{fine} other caller(s) of {} see less than {GAP_FINE_MS:.0} ms between the proxies",
                    g.callee
                ));
            }
            (
                Place::Link {
                    from: from.clone(),
                    to: to.clone(),
                },
                "latency",
                format!(
                    "the network between {} and {} is slow",
                    named(&from),
                    named(&to)
                ),
            )
        };
        found.add(
            Cause::Network,
            kind,
            place,
            &g.service,
            problem,
            0,
            &empty,
            &empty,
            ev,
            format!(
                "check the path between the hosts of {} and {} (a congested or long route, a saturated link, a VPN), and the host of {} (CPU starved?)",
                g.caller, g.callee, g.callee
            ),
        );
    }
}

/// How long after an attempt ended its callee's proxy must have reported for the attempt
/// to be looked for there (a report built just before the attempt ended arrives after it).
const SETTLE_MS: u64 = 1_000;

/// Slow requests a caller listed, at least this many, make a verdict.
const SLOW_MIN: usize = 3;

/// Requests that did not fail but took a second or more, listed one by one at both ends of
/// a hop: those the callee's proxy timed as slow too are its application's; those it timed
/// as quick lost their time between the two proxies (a retransmitted SYN or segment, a
/// queue on the way), which medians miss when it is only the tail.
fn slow_lists(found: &mut Found, w: &Window) {
    let mut by: BTreeMap<(&str, &str, &str), Vec<&crate::report::Attempt>> = BTreeMap::new();
    for a in w.slow.iter().filter(|a| a.attempt.direction == 0) {
        by.entry((&*a.reporter, &a.attempt.service, &a.attempt.peer_workload))
            .or_default()
            .push(&a.attempt);
    }
    let empty = BTreeMap::new();
    for ((caller, svc, callee), mine) in by {
        if mine.len() < SLOW_MIN || callee.is_empty() {
            continue;
        }
        let (comparable, slow_there) = joinable(w, &mine, &w.slow, caller, callee);
        if comparable.len() < SLOW_MIN {
            continue;
        }
        let worst = mine.iter().map(|a| a.latency_ms).max().unwrap_or(0);
        let (from, to) = (end_of(w, caller), end_of(w, callee));
        let head = format!(
            "{} of {caller}'s requests to {callee} took {} ms or more, the slowest {worst} ms (none failed)",
            mine.len(),
            crate::report::SLOW_MS
        );
        let v = if slow_there * 2 >= comparable.len() {
            found.add(
                Cause::Application,
                "slow",
                Place::Workload { at: to.clone() },
                svc,
                format!("the application of {callee} is slow"),
                0,
                &empty,
                &empty,
                vec![
                    head,
                    format!(
                        "by attempt id: {callee}'s proxy timed {slow_there} of {} of them as slow too: the time is its application's",
                        comparable.len()
                    ),
                ],
                format!("why is the application of {callee} slow (its load, what it waits on)?"),
            )
        } else {
            found.add(
                Cause::Network,
                "latency",
                Place::Link {
                    from: from.clone(),
                    to: to.clone(),
                },
                svc,
                format!(
                    "the network between {} and {} is slow",
                    named(&from),
                    named(&to)
                ),
                0,
                &empty,
                &empty,
                vec![
                    head,
                    format!(
                        "by attempt id: {callee}'s proxy timed only {slow_there} of {} of them as slow: the rest of the time was spent between the two proxies",
                        comparable.len()
                    ),
                ],
                format!(
                    "check the path between the hosts of {caller} and {callee}: retransmissions (ss -ti), a saturated link or queue"
                ),
            )
        };
        for a in mine.iter().rev().take(TRACES) {
            if v.traces.len() < TRACES && !v.traces.contains(&a.trace_id) {
                v.traces.push(a.trace_id.clone());
            }
        }
        for a in &mine {
            v.first_ms = Some(v.first_ms.map_or(a.at_ms, |f| f.min(a.at_ms)));
            v.last_ms = Some(v.last_ms.map_or(a.at_ms, |l| l.max(a.at_ms)));
        }
    }
}

/// What the callee's side says of a caller's failed attempts.
struct Seen<'a> {
    /// The callee's proxy's inbound series from that caller, by class.
    classes: &'a BTreeMap<FailureClass, u64>,
    /// Their requests.
    n: u64,
    /// Requests the callee answered well, from any caller.
    ok: u64,
    /// How long ago the callee's proxy last reported, if it did in the window: then its
    /// host was up.
    reported_ago_ms: Option<u64>,
}

/// A network failure on the way from `p.caller` to `p.callee`: the link, or the callee's
/// host, depending on whether other callers of that callee are fine and whether the
/// callee's proxy still reports.
fn network<'a>(
    found: &'a mut Found,
    out_pairs: &BTreeMap<(String, String, String), Pair>,
    p: &Pair,
    svc: &str,
    class: FailureClass,
    n: u64,
    seen: &Seen,
) -> &'a mut Verdict {
    // Other callers of the same callee: are they fine?
    let others: Vec<&Pair> = out_pairs
        .values()
        .filter(|o| {
            o.callee.workload == p.callee.workload && o.caller.workload != p.caller.workload
        })
        .collect();
    let others_ok = others
        .iter()
        .filter(|o| o.ok() > 0 && o.failed() * 10 < o.requests.max(1))
        .count();
    let others_failing = others.iter().filter(|o| o.failed() > o.ok()).count();
    let mut ev = vec![if p.requests == 0 {
        format!(
            "{} got {n} {class} trying {} (each retried on another endpoint)",
            p.caller.workload, p.callee.workload
        )
    } else {
        format!(
            "{} got {n} {class} trying {} ({} attempts for {} requests that ended there)",
            p.caller.workload, p.callee.workload, p.attempts, p.requests
        )
    }];
    ev.push(if seen.n == 0 {
        format!(
            "{}'s proxy saw no request from {} in the same window",
            p.callee.workload, p.caller.workload
        )
    } else {
        format!(
            "{}'s proxy saw only {} requests from {} ({})",
            p.callee.workload,
            seen.n,
            p.caller.workload,
            classes_text(seen.classes)
        )
    });
    // A proxy that reports runs, and so does its host.
    let up = seen.reported_ago_ms;
    if let Some(ago_ms) = up {
        ev.push(format!(
            "{}'s proxy reported to the control plane {} ago: its host is up",
            p.callee.workload,
            ago(ago_ms)
        ));
    }
    let (place, problem, next) = if others_ok > 0 {
        ev.push(format!(
            "{others_ok} other caller(s) of {} got answers",
            p.callee.workload
        ));
        (
            Place::Link {
                from: p.caller.clone(),
                to: p.callee.clone(),
            },
            format!(
                "the network from {} to {} fails ({class})",
                named(&p.caller),
                named(&p.callee)
            ),
            format!(
                "check the path between the hosts of {} and {} (firewall rules, routes, MTU); other callers reach {} fine",
                p.caller.workload, p.callee.workload, p.callee.workload
            ),
        )
    } else if others_failing > 0 || (seen.ok == 0 && !others.is_empty()) {
        ev.push(format!(
            "every caller of {} fails ({} other(s))",
            p.callee.workload,
            others.len()
        ));
        let (problem, next) = if up.is_some() {
            (
                format!(
                    "no caller gets through to {}, whose proxy is up ({class})",
                    named(&p.callee)
                ),
                format!(
                    "what in front of the host of {} blocks its proxy's inbound port (firewall rules, a NAT or published port)? Or its Workload's address and inboundPort are not where the proxy listens",
                    p.callee.workload
                ),
            )
        } else {
            (
                format!(
                    "{} cannot be reached by any caller ({class})",
                    named(&p.callee)
                ),
                format!(
                    "is the host of {} up, and its proxy (trellis join) running and listening?",
                    p.callee.workload
                ),
            )
        };
        (
            Place::Workload {
                at: p.callee.clone(),
            },
            problem,
            next,
        )
    } else if up.is_some() {
        ev.push(format!(
            "no other caller of {} to compare with; its host is up, so the path from {} fails",
            p.callee.workload, p.caller.workload
        ));
        (
            Place::Link {
                from: p.caller.clone(),
                to: p.callee.clone(),
            },
            format!(
                "the network from {} to {} fails ({class})",
                named(&p.caller),
                named(&p.callee)
            ),
            format!(
                "check the path from the host of {} to the host of {} (firewall rules, routes, MTU), and that {}'s Workload address and inboundPort are where its proxy listens",
                p.caller.workload, p.callee.workload, p.callee.workload
            ),
        )
    } else {
        ev.push(format!(
            "no other caller of {} to compare with, and its proxy did not report: the link or its host",
            p.callee.workload
        ));
        (
            Place::Link {
                from: p.caller.clone(),
                to: p.callee.clone(),
            },
            format!(
                "{} cannot reach {} ({class})",
                named(&p.caller),
                named(&p.callee)
            ),
            format!(
                "is the host of {} up and its proxy running? If so, check the path from the host of {}",
                p.callee.workload, p.caller.workload
            ),
        )
    };
    let kind = if matches!(place, Place::Link { .. }) {
        "link"
    } else {
        "host"
    };
    found.add(
        Cause::Network,
        kind,
        place,
        svc,
        problem,
        n,
        &only(&p.classes, &[class]),
        seen.classes,
        ev,
        next,
    )
}

/// Whether the callee's proxy saw most of the caller's failed attempts of `class`: by their
/// ids when the caller listed them, else by counts (`seen_n` requests seen for `n` failed).
fn arrived(j: Option<&Joined>, seen_n: u64, n: u64) -> bool {
    match j {
        Some(j) if j.listed > 0 => j.arrived * 2 >= j.listed,
        _ => seen_n * 2 >= n,
    }
}

/// Which proxy refused requests.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Refuser {
    /// The caller's, before any endpoint was tried.
    Caller,
    /// The callee's (it recorded the refusals).
    Callee,
    /// The caller's or the callee's (only the caller recorded them).
    Either,
    /// The callee's, for callers without a proxy.
    Own,
}

impl Refuser {
    fn text(self) -> &'static str {
        match self {
            Refuser::Caller => "the caller's proxy",
            Refuser::Callee => "the callee's proxy",
            Refuser::Either => "the caller's or the callee's proxy",
            Refuser::Own => "its own proxy",
        }
    }
}

/// The verdict on an application that resets its connections before it answers (`n` of its
/// failures, counted once: from the callee's side; a caller joins with 0).
fn app_resets(
    found: &mut Found,
    svc: &str,
    callee: &End,
    n: u64,
    caller_saw: &BTreeMap<FailureClass, u64>,
    callee_saw: &BTreeMap<FailureClass, u64>,
    evidence: String,
) {
    found.add(
        Cause::Application,
        "app_resets",
        Place::Workload { at: callee.clone() },
        svc,
        format!(
            "the application of {} resets its connections before it answers",
            callee.workload
        ),
        n,
        caller_saw,
        callee_saw,
        vec![evidence],
        format!(
            "see the logs of the application of {} (a crash, a restart, or a limit on its connections)",
            callee.workload
        ),
    );
}

/// Requests of `class` (`denied`, `overloaded`, `rate_limited`) refused by the mesh's policy.
/// `caller_saw`: the callers' counts the verdict rests on (as they recorded them: a TCP
/// stream refused at the callee is a reset at its caller); `callee_saw` is cut to `class`.
#[allow(clippy::too_many_arguments)]
fn policy(
    found: &mut Found,
    facts: &Facts,
    svc: &str,
    callee: &End,
    class: FailureClass,
    n: u64,
    caller_saw: &BTreeMap<FailureClass, u64>,
    callee_saw: &BTreeMap<FailureClass, u64>,
    refuser: Refuser,
) {
    let whose = refuser.text();
    let (problem, ev, next) = if class == FailureClass::Denied {
        let policies = facts.policies.get(svc).cloned().unwrap_or_default();
        (
            format!("requests to {svc} are denied by authorization policy"),
            if policies.is_empty() {
                vec![format!("{n} requests denied by {whose}; no AuthorizationPolicy targets {svc} (a STRICT port refused plaintext?)")]
            } else {
                vec![
                    format!("{n} requests denied by {whose}"),
                    format!("policies targeting {svc}: {}", policies.join(", ")),
                ]
            },
            format!(
                "trellis get authorizationpolicies -n {}",
                svc.split('/').next().unwrap_or_default()
            ),
        )
    } else if class == FailureClass::RateLimited {
        (
            format!("requests to {svc} are over its RateLimitPolicy"),
            vec![format!(
                "{n} requests refused as rate_limited (429) by {whose}: a caller over its share, or all of them over the total"
            )],
            format!(
                "trellis get ratelimitpolicies -n {}: raise the limits, or find the caller that sends too much (trellis top)",
                svc.split('/').next().unwrap_or_default()
            ),
        )
    } else if refuser == Refuser::Caller {
        // No endpoint was tried: the caller's own circuit breaker refused.
        (
            format!("requests to {svc} are refused by the callers' circuit breaker"),
            vec![format!(
                "{n} requests refused as overloaded by {whose} before any endpoint was tried: its connection pool for {svc} was full (maxRequests, maxPendingRequests)"
            )],
            format!("raise {svc}'s connectionPool limits (BackendTrafficPolicy) or add capacity"),
        )
    } else if matches!(refuser, Refuser::Callee | Refuser::Own) {
        let at = if callee.workload.is_empty() {
            svc.to_string()
        } else {
            callee.workload.clone()
        };
        (
            format!("requests to {at} are shed by its adaptive concurrency limit"),
            vec![format!(
                "{n} requests shed as overloaded by {whose}: more were in flight than its limit, which follows its application's latency"
            )],
            format!(
                "add capacity for {svc} (its application slows under this load: trellis_adaptive_concurrency_limit on {at}'s proxy), or bound it with BackendTrafficPolicy adaptiveConcurrency"
            ),
        )
    } else {
        (
            format!("requests to {svc} are shed by the mesh's limits"),
            vec![format!(
                "{n} requests refused as overloaded by {whose} (a circuit breaker or the adaptive concurrency limit)"
            )],
            format!("raise {svc}'s limits (BackendTrafficPolicy connectionPool, adaptiveConcurrency) or add capacity"),
        )
    };
    let place = if callee.workload.is_empty() {
        Place::Service { name: svc.into() }
    } else {
        Place::Workload { at: callee.clone() }
    };
    found.add(
        Cause::MeshPolicy,
        class.as_str(),
        place,
        svc,
        problem,
        n,
        caller_saw,
        &only(callee_saw, &[class]),
        ev,
        next,
    );
}

/// Requests that found no endpoint, no route or no limit room at the caller.
fn no_endpoint(found: &mut Found, facts: &Facts, svc: &str, p: &Pair) {
    use FailureClass as F;
    let empty = BTreeMap::new();
    for (class, n) in &p.classes {
        let n = *n;
        if n == 0 || !counts_against(*class) {
            continue;
        }
        if n < MIN_FAILED && *class != F::NoHealthyUpstream {
            continue;
        }
        match class {
            F::NoHealthyUpstream => {
                let selected = facts.selects.get(svc).cloned().unwrap_or_default();
                let departed = facts.departed.get(svc).cloned().unwrap_or_default();
                let (cause, problem, ev, next) = if selected.is_empty() && !departed.is_empty() {
                    let left: Vec<String> = departed
                        .iter()
                        .map(|(w, at)| {
                            format!("{w} left {} ago", ago(facts.now_ms.saturating_sub(*at)))
                        })
                        .collect();
                    (
                        Cause::Application,
                        format!("every workload of {svc} has left"),
                        format!(
                            "{n} requests from {} found no endpoint; {}",
                            p.caller.workload,
                            left.join(", ")
                        ),
                        format!(
                            "why did {} stop (a stopped container, a host shut down)? Start it again, or point {svc} elsewhere",
                            departed.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    )
                } else if selected.is_empty() {
                    (
                        Cause::Configuration,
                        format!("{svc} selects no workload"),
                        format!("{n} requests from {} found no endpoint", p.caller.workload),
                        format!("does {svc}'s selector match the labels of the workloads meant to serve it?"),
                    )
                } else {
                    let down: Vec<String> = selected
                        .iter()
                        .filter(|(_, h)| *h == Some(false))
                        .map(|(w, _)| w.clone())
                        .collect();
                    let names: Vec<String> = selected.iter().map(|(w, _)| w.clone()).collect();
                    if down.len() == selected.len() {
                        (
                            Cause::Application,
                            format!("every workload of {svc} is down"),
                            format!(
                                "{n} requests from {} found no endpoint; unhealthy: {}",
                                p.caller.workload,
                                down.join(", ")
                            ),
                            format!(
                                "why did {} stop (its health checks, trellis get workload)?",
                                down.join(", ")
                            ),
                        )
                    } else {
                        (
                            Cause::Network,
                            format!("no endpoint of {svc} is usable"),
                            format!("{n} requests from {} found no endpoint; {svc} selects {} (ejected by outlier detection after failures?)", p.caller.workload, names.join(", ")),
                            format!("trellis diagnose svc/{} over a longer window shows why they were ejected", svc.split('/').nth(1).unwrap_or(svc)),
                        )
                    }
                };
                found.add(
                    cause,
                    "no_endpoint",
                    Place::Service { name: svc.into() },
                    svc,
                    problem,
                    n,
                    &only(&p.classes, &[*class]),
                    &empty,
                    vec![ev],
                    next,
                );
            }
            F::NoRoute if facts.dangling.contains_key(svc) => {
                let mut evidence = vec![format!(
                    "{n} requests from {} to {svc} were answered no_route by the caller's proxy",
                    p.caller.workload
                )];
                evidence.extend(facts.dangling[svc].iter().cloned());
                found.add(
                    Cause::Configuration,
                    "unresolved_backend",
                    Place::Service { name: svc.into() },
                    svc,
                    format!(
                        "a route of {svc} sends a share of its requests to a backend that does not resolve: they are answered 500"
                    ),
                    n,
                    &only(&p.classes, &[*class]),
                    &empty,
                    evidence,
                    "create the Service the route names, or take that backend out of the route (trellis describe on the route shows its conditions)".into(),
                );
            }
            F::NoRoute => {
                found.add(
                Cause::Configuration,
                "no_route",
                Place::Workload {
                    at: p.caller.clone(),
                },
                svc,
                format!(
                    "{} calls a name no Service or route answers",
                    p.caller.workload
                ),
                n,
                &only(&p.classes, &[*class]),
                &empty,
                vec![format!(
                    "{n} requests from {} matched no service or route",
                    p.caller.workload
                )],
                "trellis tap workload/NAME --failure-class no_route shows the names it asks for"
                    .into(),
                );
            }
            F::Overloaded | F::Denied | F::RateLimited => {
                policy(
                    found,
                    facts,
                    svc,
                    &End::default(),
                    *class,
                    n,
                    &only(&p.classes, &[*class]),
                    &empty,
                    Refuser::Caller,
                );
            }
            _ => {}
        }
    }
}

/// The names a selector keeps, as a predicate over `namespace/name` strings.
pub fn selector<'a>(
    namespace: Option<&'a str>,
    name: Option<&'a str>,
) -> impl Fn(&str) -> bool + 'a {
    move |n: &str| {
        let ns_ok = namespace.is_none_or(|ns| n.split('/').next() == Some(ns));
        let name_ok = name.is_none_or(|want| {
            n == want || n.split('/').nth(1) == Some(want) || n.ends_with(&format!(" {want}"))
        });
        !n.is_empty() && ns_ok && name_ok
    }
}

/// The distinct causes in `v` (for a summary line).
pub fn causes(v: &[Verdict]) -> BTreeSet<Cause> {
    v.iter().map(|x| x.cause).collect()
}

#[cfg(test)]
mod tests;
