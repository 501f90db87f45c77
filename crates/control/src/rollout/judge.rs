//! A rollout step's analysis: the canary's figures against the stable version's over the
//! same window, both read where the application answers (the inbound side of their own
//! proxies), so that what a network between caller and callee does, or a fault a caller's
//! proxy injects, never counts against the canary's code.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use trellis_model::resource::RolloutAnalysis;
use trellis_taxonomy::{Category, FailureClass};
use trellis_telemetry::{
    hist::Histogram,
    key::{Direction, Key},
    store::{Window, COARSE_SCALE},
};

/// How sure a "clear" regression must be: z for 99 % on each side.
const Z: f64 = 2.576;
/// A canary needs at least this many failures before its error rate is a clear regression.
const CLEAR_FAILURES: u64 = 3;
/// Requests on each side before a latency regression can be clear.
const CLEAR_LATENCY_REQUESTS: u64 = 20;
/// Latency allowed over the stable version's × the ratio, ms (jitter of fast services).
pub(crate) const LATENCY_SLACK_MS: f64 = 5.0;
/// A canary's tail is slower only with at least this many requests over the latency allowed:
/// one pause of its process (a collection, a busy host) stalls every request it has in
/// flight at once, so a few slow ones can be one event.
const CLEAR_SLOW: u64 = 5;

/// One side's figures over the window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(crate) struct Side {
    /// Requests its workloads answered (or failed).
    pub(crate) requests: u64,
    /// Of them, failures of its own: the application's errors, and its local application
    /// refusing or dropping its proxy's connections.
    pub(crate) failures: u64,
    /// Latency at the analysis's percentile, ms.
    pub(crate) latency_ms: Option<f64>,
    /// Median latency, ms.
    pub(crate) median_ms: Option<f64>,
    /// Requests over the latency allowed (the stable's at the percentile × the ratio + the
    /// slack); counted on the canary's side only.
    pub(crate) slower: u64,
}

impl Side {
    /// Failures over requests, as a fraction.
    pub(crate) fn error_rate(&self) -> f64 {
        self.failures as f64 / self.requests.max(1) as f64
    }
}

/// What a step's analysis says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Verdict {
    /// Not yet: too early, or not enough traffic.
    Hold,
    /// The step passed.
    Pass,
    /// The canary regressed.
    Fail,
}

/// The latency a canary's requests may take, ms: the stable version's at the percentile ×
/// the ratio + the slack.
pub(crate) fn allowed_ms(a: &RolloutAnalysis, stable_ms: f64) -> f64 {
    stable_ms * a.max_latency_ratio + LATENCY_SLACK_MS
}

/// The figures of the workloads in `of` over `w`, at `percentile`; `over_ms`: count the
/// requests slower than this ([`Side::slower`]).
pub(crate) fn side(
    w: &Window,
    of: &HashSet<String>,
    percentile: f64,
    over_ms: Option<f64>,
) -> Side {
    let mut s = Side::default();
    for (k, c) in &w.series {
        if k.direction != Direction::Inbound || !of.contains(&*k.workload) {
            continue;
        }
        s.requests += c.requests;
        if own_failure(k.class) {
            s.failures += c.requests;
        }
    }
    let mut h = Histogram::new(COARSE_SCALE);
    for (k, l) in &w.latency {
        if k.direction == Direction::Inbound && of.contains(&*k.workload) {
            h.merge(l);
        }
    }
    if h.count() > 0 {
        // The histograms hold seconds.
        s.latency_ms = h.quantile(percentile / 100.0).map(|v| v * 1000.0);
        s.median_ms = h.quantile(0.5).map(|v| v * 1000.0);
        s.slower = over_ms.map_or(0, |ms| h.count_over(ms / 1000.0));
    }
    s
}

/// What the callers sent through the rollout's weighted rules over the window, as their own
/// proxies reported it: how many requests, and how those meant for the canary failed
/// before its application answered (by class).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Routed {
    /// Requests through the rules, whichever backend they went to.
    pub(crate) requests: u64,
    /// Of them, the share the stable backend and the canary have between them (all of
    /// them, but for rules with other backends too), which the canary's weight divides.
    pub(crate) pool: f64,
    /// Of those sent toward the canary's workloads (or to no endpoint at all), the failures
    /// on the way there (refused, timed out, reset, TLS, no healthy endpoint).
    pub(crate) unreached: std::collections::BTreeMap<FailureClass, u64>,
}

/// The callers' side of rules `rules` (their compiled names, `NS/ROUTE` or
/// `NS/ROUTE.RULE`, each with the share of its requests the stable and the canary have)
/// over `w`; `canary`: the canary's workloads (`NS/NAME`).
pub(crate) fn routed(w: &Window, rules: &HashMap<String, f64>, canary: &HashSet<String>) -> Routed {
    let mut r = Routed::default();
    for (k, c) in &w.series {
        if k.direction != Direction::Outbound {
            continue;
        }
        let Some(share) = rules.get(&*k.route) else {
            continue;
        };
        r.requests += c.requests;
        r.pool += c.requests as f64 * share;
        let peer = &*k.peer_workload;
        let to_canary = peer.is_empty()
            || canary.contains(peer)
            || (!peer.contains('/')
                && canary.contains(&format!("{}/{peer}", Key::namespace_of(&k.service))));
        if to_canary && k.class.category() == Category::Network {
            *r.unreached.entry(k.class).or_default() += c.requests;
        }
    }
    r
}

/// A failure recorded on the callee's inbound side that is the callee's own: its
/// application's error, or its application (on the same host as the proxy) refusing,
/// dropping or not answering the connection. The mesh's own refusals (overload, rate
/// limits, authorization) and the client's are not.
fn own_failure(c: FailureClass) -> bool {
    matches!(c.category(), Category::Application | Category::Network)
}

/// The canary's share of a step: its weight, and what the callers sent through the
/// rollout's rules.
#[derive(Clone, Debug, Default)]
pub(crate) struct Share {
    /// The canary's percent of the rules' traffic.
    pub(crate) weight: u32,
    /// The percent is of copies (the dark stage's mirror), not of requests answered.
    pub(crate) copies: bool,
    /// The callers' side of the rules.
    pub(crate) routed: Routed,
}

/// Below this fraction of the requests its weight sent it, a canary is not reached.
const UNREACHED_FRACTION: f64 = 0.25;

/// Judge a step. `held`: its interval has passed.
pub(crate) fn judge(
    a: &RolloutAnalysis,
    canary: &Side,
    stable: &Side,
    share: &Share,
    held: bool,
) -> (Verdict, String) {
    let margin = a.max_error_rate_increase / 100.0;
    let pct = |x: f64| format!("{:.1} %", 100.0 * x);
    let rates = format!(
        "canary {} of {} failed ({}), stable {} of {} ({})",
        canary.failures,
        canary.requests,
        pct(canary.error_rate()),
        stable.failures,
        stable.requests,
        pct(stable.error_rate())
    );
    // A clear regression fails at once, before the interval is over or the sample full.
    if canary.failures >= CLEAR_FAILURES
        && wilson(canary.failures, canary.requests).0
            > wilson(stable.failures, stable.requests).1 + margin
    {
        return (Verdict::Fail, format!("error rate clearly higher: {rates}"));
    }
    let allowed = |stable_ms: f64| allowed_ms(a, stable_ms);
    let p = a.latency_percentile;
    if let (Some(c50), Some(sp)) = (canary.median_ms, stable.latency_ms) {
        if canary.requests >= CLEAR_LATENCY_REQUESTS
            && stable.requests >= CLEAR_LATENCY_REQUESTS
            && c50 > allowed(sp)
        {
            return (
                Verdict::Fail,
                format!("clearly slower: the canary's median {c50:.1} ms is over the stable p{p}'s {sp:.1} ms × {} + {LATENCY_SLACK_MS} ms", a.max_latency_ratio),
            );
        }
    }
    if !held {
        return (
            Verdict::Hold,
            format!("the step holds for its interval; {rates}"),
        );
    }
    // The callers sent the canary its share but it answered a small part of it: it is not
    // reached (its proxy down, its host cut off, its endpoints ejected). Without its share
    // (no traffic, or the weights not yet applied), the step holds below.
    // Copies are of every request through the rules; a weight divides the stable's share.
    let base = if share.copies {
        share.routed.requests as f64
    } else {
        share.routed.pool
    };
    let sent = base * f64::from(share.weight) / 100.0;
    if canary.requests < u64::from(a.min_requests)
        && sent >= f64::from(a.min_requests)
        && (canary.requests as f64) < sent * UNREACHED_FRACTION
    {
        let how: Vec<String> = share
            .routed
            .unreached
            .iter()
            .map(|(c, n)| format!("{} {n}", c.as_str()))
            .collect();
        let how = if how.is_empty() {
            String::new()
        } else {
            format!(
                "; the callers' requests toward it failed: {}",
                how.join(", ")
            )
        };
        let of = if base + 0.5 < share.routed.requests as f64 {
            format!(
                "the ~{base:.0} of the callers' {} requests that the stable and the canary share",
                share.routed.requests
            )
        } else {
            format!("the callers' {}", share.routed.requests)
        };
        return (
            Verdict::Fail,
            format!(
                "the canary is not reached: it answered {} requests where {} {} % of {of} sent it ~{sent:.0}{how}",
                canary.requests,
                if share.copies { "copies of" } else { "its weight of" },
                share.weight,
            ),
        );
    }
    if canary.requests < u64::from(a.min_requests) {
        return (
            Verdict::Hold,
            format!(
                "not enough traffic: the canary answered {} of the {} requests a step needs",
                canary.requests, a.min_requests
            ),
        );
    }
    if canary.error_rate() > stable.error_rate() + margin {
        return (
            Verdict::Fail,
            format!(
                "error rate over the stable's by more than {} points: {rates}",
                a.max_error_rate_increase
            ),
        );
    }
    // The tail: the canary's percentile over the allowed latency means more than (100 - p) %
    // of its requests are over it. With a few dozen requests a step, its p99 is its slowest
    // request, so that fraction is judged as the error rate is, with 99 % confidence, and
    // from `CLEAR_SLOW` requests up.
    let tail = 1.0 - p / 100.0;
    let latency = match (canary.latency_ms, stable.latency_ms) {
        (Some(c), Some(s))
            if canary.slower >= CLEAR_SLOW && wilson(canary.slower, canary.requests).0 > tail =>
        {
            return (
                Verdict::Fail,
                format!(
                    "slower: {} of the canary's {} requests took over {:.1} ms (the stable's p{p} {s:.1} ms × {} + {LATENCY_SLACK_MS} ms), clearly more than the {} % its p{p} allows; its p{p} {c:.1} ms",
                    canary.slower,
                    canary.requests,
                    allowed(s),
                    a.max_latency_ratio,
                    round(100.0 * tail)
                ),
            )
        }
        (Some(c), Some(s)) if canary.slower > 0 => format!(
            "p{p} {c:.1} ms against {s:.1} ms ({} of {} requests over {:.1} ms: too few to be slower)",
            canary.slower,
            canary.requests,
            allowed(s)
        ),
        (Some(c), Some(s)) => format!("p{p} {c:.1} ms against {s:.1} ms"),
        (Some(c), None) => format!("p{p} {c:.1} ms (no stable traffic to compare)"),
        _ => "no latency recorded".to_string(),
    };
    (Verdict::Pass, format!("{rates}; {latency}"))
}

/// `x` with at most two decimals, and none that are zero.
fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Wilson's score interval of `k` successes in `n`, at [`Z`]: (low, high).
fn wilson(k: u64, n: u64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (n, p) = (n as f64, k as f64 / n as f64);
    let z2 = Z * Z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[cfg(test)]
mod tests;
