//! Live tap: the control plane asks a proxy, over the connection it holds for xDS, to copy
//! the records that match a filter, at most so many a second; the proxy sends them back in
//! small batches on the same connection. No port opens on the host for it, and nothing costs
//! a request while no tap is on (one atomic load).
//!
//! The proxy follows `GET /v1/tap?workload=W` (a stream of JSON lines, each the whole set of
//! taps for this proxy) and pushes matches to `POST /v1/tap/events`. A tap shows method,
//! authority, path, outcome and who called whom; header values only when the tap asks for
//! them (`trellis tap --headers`), and never those of `authorization`, `proxy-authorization`,
//! `cookie` or `set-cookie`. Only while such a tap is on does a request keep a copy of its
//! headers (one atomic load decides).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::{
    access_log::{workload_id, HttpLine},
    metrics::Direction,
};

/// Events queued for sending; beyond, they are dropped (a tap is best effort).
const QUEUE: usize = 1024;

/// One tap as the control plane sends it to this proxy.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct TapSpec {
    /// The session's id.
    pub(crate) id: u64,
    /// Only requests to this service (`name.namespace`, as records name it): outbound ones,
    /// and inbound ones from unmeshed callers. `None`: every record of this proxy.
    #[serde(default)]
    pub(crate) service: Option<String>,
    /// Only this method.
    #[serde(default)]
    pub(crate) method: Option<String>,
    /// Only paths starting so.
    #[serde(default)]
    pub(crate) path_prefix: Option<String>,
    /// Only this authority.
    #[serde(default)]
    pub(crate) authority: Option<String>,
    /// Only this failure class.
    #[serde(default)]
    pub(crate) failure_class: Option<String>,
    /// Events a second this proxy may send for it (its share of the session's bound).
    pub(crate) rate: f64,
    /// Show header values (but never credentials).
    #[serde(default)]
    pub(crate) headers: bool,
}

/// Headers whose values a tap never shows.
const SECRET: [&str; 4] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

/// Headers as a tap shows them: names with their values (several joined by `, `), and the
/// credentials' values withheld.
fn shown(h: &http::HeaderMap) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::<String, String>::new();
    for (name, value) in h {
        let v = if SECRET.contains(&name.as_str()) {
            "<withheld>".into()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        out.entry(name.as_str().to_string())
            .and_modify(|e| {
                if !SECRET.contains(&name.as_str()) {
                    e.push_str(", ");
                    e.push_str(&v);
                }
            })
            .or_insert(v);
    }
    out
}

struct Tap {
    spec: TapSpec,
    /// Tokens and when they were last topped up.
    bucket: Mutex<(f64, Instant)>,
}

impl Tap {
    fn matches(&self, l: &HttpLine) -> bool {
        let s = &self.spec;
        if let Some(svc) = &s.service {
            let to_it = l.dst_service.get() == Some(svc.as_str());
            let seen_here = match l.direction {
                Direction::outbound => true,
                // A meshed caller's own proxy shows the request; the callee's only for
                // callers without one.
                Direction::inbound => l.src_workload.get().is_none(),
            };
            if !(to_it && seen_here) {
                return false;
            }
        }
        s.method.as_deref().is_none_or(|m| l.method.as_str() == m)
            && s.path_prefix
                .as_deref()
                .is_none_or(|p| l.uri.path().starts_with(p))
            && s.authority.as_deref().is_none_or(|a| {
                l.authority
                    .as_ref()
                    .is_some_and(|x| x.as_str().eq_ignore_ascii_case(a))
            })
            && s.failure_class
                .as_deref()
                .is_none_or(|c| l.class.as_str() == c)
    }

    /// A token, if the tap's rate allows one now (bursts of up to a second's worth).
    fn allow(&self) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let burst = self.spec.rate.max(1.0);
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * self.spec.rate).min(burst);
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One copied record.
#[derive(Serialize)]
struct Event<'a> {
    tap: u64,
    ts_ms: u64,
    direction: &'static str,
    method: &'a str,
    authority: Option<&'a str>,
    path: &'a str,
    status: u16,
    grpc_status: Option<u32>,
    latency_ms: f64,
    class: &'static str,
    category: &'static str,
    attempts: u32,
    endpoint: Option<String>,
    src_workload: Option<&'a str>,
    src_identity: Option<&'a str>,
    dst_service: Option<&'a str>,
    /// `namespace/name`, as the caller's is and as `stat` and `edges` name workloads.
    dst_workload: Option<String>,
    dst_environment: &'static str,
    dst_locality: Option<&'a str>,
    trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_headers: Option<std::collections::BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_headers: Option<std::collections::BTreeMap<String, String>>,
}

/// The taps on now, and the queue of what they copied.
pub(crate) struct Taps {
    set: ArcSwapOption<Vec<Tap>>,
    /// Some tap shows headers: requests keep a copy of theirs.
    headers: std::sync::atomic::AtomicBool,
    tx: mpsc::Sender<Bytes>,
    /// Taken by the task that sends (`tap_link`).
    pub(crate) rx: Mutex<Option<mpsc::Receiver<Bytes>>>,
}

impl Default for Taps {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            set: ArcSwapOption::empty(),
            headers: Default::default(),
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl Taps {
    /// Whether a request should keep its headers for a tap.
    #[inline]
    pub(crate) fn want_headers(&self) -> bool {
        self.headers.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Copy `l` (which took `total`) to every tap it matches, within their rates.
    #[inline]
    pub(crate) fn offer(&self, l: &HttpLine, total: Duration) {
        let guard = self.set.load();
        let Some(set) = guard.as_ref() else {
            return;
        };
        for t in set.iter() {
            if t.matches(l) && t.allow() {
                let _ = self.tx.try_send(event(t.spec.id, l, total, t.spec.headers));
            }
        }
    }

    /// Replace the taps (an empty list turns tapping off).
    pub(crate) fn replace(&self, specs: Vec<TapSpec>) {
        let old = self.set.load_full();
        let taps: Vec<Tap> = specs
            .into_iter()
            .map(|spec| {
                // A tap that stays keeps its bucket.
                let kept = old
                    .as_ref()
                    .and_then(|o| o.iter().find(|t| t.spec.id == spec.id))
                    .map(|t| *t.bucket.lock().unwrap_or_else(|p| p.into_inner()));
                let bucket = kept.unwrap_or((spec.rate.max(1.0), Instant::now()));
                Tap {
                    spec,
                    bucket: Mutex::new(bucket),
                }
            })
            .collect();
        let headers = taps.iter().any(|t| t.spec.headers);
        self.headers
            .store(headers, std::sync::atomic::Ordering::Relaxed);
        self.set.store((!taps.is_empty()).then(|| Arc::new(taps)));
    }

    /// The specs on now (for the admin page).
    pub(crate) fn specs(&self) -> Vec<serde_json::Value> {
        self.set
            .load()
            .as_ref()
            .map(|s| {
                s.iter()
                    .map(|t| serde_json::json!({ "id": t.spec.id, "rate": t.spec.rate, "service": t.spec.service, "headers": t.spec.headers }))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn event(tap: u64, l: &HttpLine, total: Duration, headers: bool) -> Bytes {
    let h = l.tap_headers.as_deref().filter(|_| headers);
    let e = Event {
        tap,
        ts_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        direction: l.direction.as_str(),
        method: l.method.as_str(),
        authority: l.authority.as_ref().map(|a| a.as_str()),
        path: l.uri.path(),
        status: l.status,
        grpc_status: l.grpc_status,
        latency_ms: total.as_secs_f64() * 1000.0,
        class: l.class.as_str(),
        category: l.class.category().as_str(),
        attempts: l.attempts,
        endpoint: l.upstream.map(|a| a.to_string()),
        src_workload: l.src_workload.get(),
        src_identity: l.source_identity.get(),
        dst_service: l.dst_service.get(),
        dst_workload: workload_id(&l.dst_service, &l.dst_workload),
        dst_environment: l.dst_environment,
        dst_locality: l.dst_locality.get(),
        trace_id: (l.trace_id != 0).then(|| format!("{:032x}", l.trace_id)),
        request_headers: h.map(|h| shown(&h[0])),
        response_headers: h.map(|h| shown(&h[1])),
    };
    Bytes::from(serde_json::to_vec(&e).unwrap_or_default())
}
