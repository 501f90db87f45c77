//! Live tap sessions: `trellis tap` opens one through the API; the control plane tells the
//! proxies concerned (over the `GET /v1/tap` stream each holds on its xDS connection) which
//! records to copy and at what rate, and relays what they send back to the session.
//!
//! The session's bound (`max_rps`) holds twice: each proxy gets a share of it (a service's
//! tap is split evenly over the proxies following taps, a workload's goes to its own proxy),
//! and the control plane drops what would exceed it, whatever a proxy sends.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Instant,
};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

/// What a session taps.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Target {
    /// Requests to a service, as its callers' proxies (or, for unmeshed callers, its own)
    /// record them.
    Service,
    /// Everything a workload's proxy records.
    Workload,
}

/// A session's filter and bound.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Spec {
    /// Service or workload.
    pub(crate) target: Target,
    /// `namespace/name`.
    pub(crate) name: String,
    /// Only this method.
    pub(crate) method: Option<String>,
    /// Only paths starting so.
    pub(crate) path_prefix: Option<String>,
    /// Only this authority.
    pub(crate) authority: Option<String>,
    /// Only this failure class.
    pub(crate) failure_class: Option<String>,
    /// Events a second, over every proxy.
    pub(crate) max_rps: f64,
    /// Show header values (the proxies withhold credentials').
    pub(crate) headers: bool,
}

struct Session {
    spec: Spec,
    tx: mpsc::Sender<Bytes>,
    /// Tokens and when they were last topped up.
    bucket: (f64, Instant),
}

#[derive(Default)]
struct Inner {
    next: u64,
    sessions: HashMap<u64, Session>,
    /// Proxies following taps, by workload.
    watchers: HashMap<String, usize>,
}

impl Session {
    /// One event's token from the session's bucket, if it has one.
    fn take(&mut self, now: Instant) -> bool {
        let burst = self.spec.max_rps.max(1.0);
        self.bucket.0 = (self.bucket.0
            + now.duration_since(self.bucket.1).as_secs_f64() * self.spec.max_rps)
            .min(burst);
        self.bucket.1 = now;
        if self.bucket.0 < 1.0 {
            return false;
        }
        self.bucket.0 -= 1.0;
        true
    }
}

/// An open session, for what relays other replicas' events into it.
#[derive(Clone)]
pub(crate) struct Opened {
    /// Its id.
    pub(crate) id: u64,
    /// A handle on its queue, whose `closed()` says when the session's reader left.
    pub(crate) ended: mpsc::Sender<Bytes>,
}

/// Every tap session of this replica.
pub(crate) struct Taps {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

impl Default for Taps {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            changed: watch::channel(0).0,
        }
    }
}

/// Ends a session, or a proxy's following, when dropped.
struct Guard(Arc<Taps>, GuardKind);

enum GuardKind {
    Session(u64),
    Watcher(String),
}

impl Drop for Guard {
    fn drop(&mut self) {
        {
            let mut i = self.0.lock();
            match &self.1 {
                GuardKind::Session(id) => drop(i.sessions.remove(id)),
                GuardKind::Watcher(w) => {
                    if let Some(n) = i.watchers.get_mut(w) {
                        *n -= 1;
                        if *n == 0 {
                            i.watchers.remove(w);
                        }
                    }
                }
            }
        }
        self.0.changed.send_modify(|v| *v += 1);
    }
}

/// The longest event line another replica may send.
const MAX_LINE: usize = 1 << 20;

/// Events a session may hold unread; beyond, they are dropped.
const SESSION_QUEUE: usize = 4096;

impl Taps {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open a session: its events, one JSON object a line, until the stream is dropped.
    pub(crate) fn open(
        self: &Arc<Self>,
        spec: Spec,
    ) -> (Opened, impl Stream<Item = Result<Bytes, Infallible>>) {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let ended = tx.clone();
        let id = {
            let mut i = self.lock();
            i.next += 1;
            let id = i.next;
            let burst = spec.max_rps.max(1.0);
            i.sessions.insert(
                id,
                Session {
                    spec,
                    tx,
                    bucket: (burst, Instant::now()),
                },
            );
            id
        };
        self.changed.send_modify(|v| *v += 1);
        let guard = Guard(self.clone(), GuardKind::Session(id));
        let stream = futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
            let e = rx.recv().await?;
            Some((Ok(e), (rx, guard)))
        });
        (Opened { id, ended }, stream)
    }

    /// How many proxies connected here would copy `spec`'s requests: every proxy following
    /// taps for a service's (any of them may be a caller), the workload's own for a
    /// workload's.
    pub(crate) fn reach(&self, spec: &Spec) -> usize {
        let i = self.lock();
        match spec.target {
            Target::Service => i.watchers.values().sum(),
            Target::Workload => i.watchers.get(&spec.name).copied().unwrap_or(0),
        }
    }

    /// Lines another replica's part of session `id` sent (its own proxies' events, bounded
    /// there): into the session within its bound. False once the session has ended.
    pub(crate) fn relay(&self, id: u64, line: Bytes) -> bool {
        let mut i = self.lock();
        let Some(s) = i.sessions.get_mut(&id) else {
            return false;
        };
        if s.take(Instant::now()) {
            let _ = s.tx.try_send(line);
        }
        true
    }

    /// The taps `workload`'s proxy is to apply, as one JSON line.
    fn set_for(&self, workload: &str) -> Bytes {
        let i = self.lock();
        let all: usize = i.watchers.values().sum::<usize>().max(1);
        let own = i.watchers.get(workload).copied().unwrap_or(1).max(1);
        let taps: Vec<serde_json::Value> = i
            .sessions
            .iter()
            .filter_map(|(id, s)| {
                let sp = &s.spec;
                let (service, rate) = match sp.target {
                    Target::Workload if sp.name == workload => (None, sp.max_rps / own as f64),
                    Target::Workload => return None,
                    Target::Service => {
                        let (ns, name) = sp.name.split_once('/')?;
                        (Some(format!("{name}.{ns}")), sp.max_rps / all as f64)
                    }
                };
                Some(serde_json::json!({
                    "id": id,
                    "service": service,
                    "method": sp.method,
                    "path_prefix": sp.path_prefix,
                    "authority": sp.authority,
                    "failure_class": sp.failure_class,
                    "rate": rate,
                    "headers": sp.headers,
                }))
            })
            .collect();
        let mut line = serde_json::to_vec(&serde_json::json!({ "taps": taps })).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    }

    /// A proxy of `workload` follows its taps: the whole set now, then at every change.
    pub(crate) fn follow(
        self: &Arc<Self>,
        workload: String,
    ) -> impl Stream<Item = Result<Bytes, Infallible>> {
        *self.lock().watchers.entry(workload.clone()).or_default() += 1;
        // Every proxy's share changes with the number of proxies.
        self.changed.send_modify(|v| *v += 1);
        let guard = Guard(self.clone(), GuardKind::Watcher(workload));
        let rx = self.changed.subscribe();
        futures_util::stream::unfold((rx, guard, true), |(mut rx, guard, first)| async move {
            if !first {
                rx.changed().await.ok()?;
            } else {
                rx.borrow_and_update();
            }
            let GuardKind::Watcher(w) = &guard.1 else {
                return None;
            };
            let line = guard.0.set_for(w);
            Some((Ok(line), (rx, guard, false)))
        })
    }

    /// Another replica's part of session `opened`: its lines into the session, until the
    /// session's reader leaves (the part's answer is then dropped, which ends the session
    /// there) or the other replica ends it.
    pub(crate) async fn relay_from(self: Arc<Self>, opened: Opened, mut part: Incoming) {
        use http_body_util::BodyExt;
        let mut buf = BytesMut::new();
        loop {
            let frame = tokio::select! {
                () = opened.ended.closed() => return,
                f = part.frame() => f,
            };
            let Some(Ok(frame)) = frame else { return };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(n) = buf.iter().position(|&b| b == b'\n') {
                let line = buf.split_to(n + 1).freeze();
                if !self.relay(opened.id, line) {
                    return;
                }
            }
            if buf.len() > MAX_LINE {
                tracing::warn!(
                    "another replica sent a tap line longer than {MAX_LINE} bytes; its part of the session ends"
                );
                return;
            }
        }
    }

    /// Events a proxy of `workload` sent: to their sessions, within each session's bound.
    /// Returns how many were relayed.
    pub(crate) fn deliver(&self, workload: &str, events: Vec<serde_json::Value>) -> usize {
        let mut i = self.lock();
        let now = Instant::now();
        let mut relayed = 0;
        for e in events {
            let Some(id) = e.get("tap").and_then(serde_json::Value::as_u64) else {
                continue;
            };
            let Some(s) = i.sessions.get_mut(&id) else {
                continue;
            };
            // A workload's tap takes only that workload's events.
            if s.spec.target == Target::Workload && s.spec.name != workload {
                continue;
            }
            if !s.take(now) {
                continue;
            }
            let mut line = serde_json::to_vec(&e).unwrap_or_default();
            line.push(b'\n');
            if s.tx.try_send(Bytes::from(line)).is_ok() {
                relayed += 1;
            }
        }
        relayed
    }
}
