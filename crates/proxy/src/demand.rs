//! On-demand discovery. A proxy fed by xDS for a workload holds what that workload needs:
//! the Services it declares as upstreams and what they name (see `trellis_model::scope`).
//! A request for a mesh name it does not hold (by authority, or a `.mesh` query to the
//! agent's resolver) asks the control plane for that Service by subscribing to
//! `Service/NAMESPACE/NAME` on the open xDS stream, and waits at most [`WAIT`] for a config
//! that holds it, as Envoy's on-demand discovery does. The control plane answers a name it
//! does not have with its removal, so an unknown name is answered `no_route` after one round
//! trip, and is then answered so without asking for [`ABSENT_FOR`].
//!
//! A name asked for is released (unsubscribed, and the control plane removes what it
//! brought) once it has been seen unused for the idle time: no request to any of its clusters
//! in the retry budget's window and no connection open to them. Nothing on the request path
//! counts for this; the sweep reads what the clusters keep anyway.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use serde::Deserialize as _;
use tokio::sync::{mpsc, watch};
use trellis_model::NamespacedName;

use crate::{
    handoff::{Offer, Offered},
    snapshot::Snapshot,
};

/// How long a request for a name the proxy does not hold waits for it.
pub const WAIT: Duration = Duration::from_secs(2);
/// How long a name the control plane does not have is answered absent without asking again.
const ABSENT_FOR: Duration = Duration::from_secs(5);
/// Most names asked for and kept at once: an application asking for random names cannot make
/// the proxy (or its control plane) hold more.
const MAX_NAMES: usize = 1024;

/// What the xDS client is asked to do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ask {
    /// Subscribe to a Service.
    Subscribe(NamespacedName),
    /// Release it.
    Unsubscribe(NamespacedName),
}

/// The xDS resource name of a Service.
pub(crate) fn resource_name(id: &NamespacedName) -> String {
    format!("Service/{}/{}", id.namespace, id.name)
}

/// The Service a resource name means.
pub(crate) fn service_of(name: &str) -> Option<NamespacedName> {
    name.strip_prefix("Service/")?.parse().ok()
}

/// How a lookup on demand ended: `found`, `absent` (the control plane has no such Service),
/// `timeout`, or `refused` (too many names held).
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct Outcome {
    outcome: &'static str,
}

#[derive(Debug)]
enum Name {
    /// Asked for; held once a config holds it. Seen unused since then, if it was.
    Asked { unused_since: Option<Instant> },
    /// The control plane has no such Service (as of then). Tokio's clock, so that tests can
    /// move it.
    Absent(tokio::time::Instant),
}

/// The names asked for on demand, shared by the request path, the resolver and the xDS client.
pub(crate) struct Demand {
    asks: mpsc::UnboundedSender<Ask>,
    names: Mutex<HashMap<NamespacedName, Name>>,
    /// Bumped when a config is swapped in or a name is found absent: what waiters wait on.
    changed: watch::Sender<u64>,
    /// A name unused for this long is released.
    pub(crate) idle: Duration,
    /// Lookups that waited, by outcome (`trellis_on_demand_lookups_total`).
    pub(crate) lookups: Family<Outcome, Counter>,
}

impl Demand {
    pub(crate) fn new(idle: Duration) -> (Self, mpsc::UnboundedReceiver<Ask>) {
        let (asks, rx) = mpsc::unbounded_channel();
        let d = Self {
            asks,
            names: Mutex::default(),
            changed: watch::Sender::new(0),
            idle,
            lookups: Family::default(),
        };
        (d, rx)
    }

    fn names(&self) -> std::sync::MutexGuard<'_, HashMap<NamespacedName, Name>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new config is live.
    pub(crate) fn config_changed(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The control plane has no Service `id` (or no longer has it).
    pub(crate) fn absent(&self, id: &NamespacedName) {
        if let Some(n) = self.names().get_mut(id) {
            *n = Name::Absent(tokio::time::Instant::now());
        }
        self.config_changed();
    }

    /// Wait (at most [`WAIT`]) until `holds` says the live config holds `id`, asking the
    /// control plane for it; false when there is no such Service or it did not come in time.
    pub(crate) async fn fetch(&self, id: &NamespacedName, holds: impl Fn() -> bool) -> bool {
        if holds() {
            return true;
        }
        let outcome = self.wait(id, holds).await;
        self.lookups.get_or_create(&Outcome { outcome }).inc();
        outcome == "found"
    }

    async fn wait(&self, id: &NamespacedName, holds: impl Fn() -> bool) -> &'static str {
        let mut changed = self.changed.subscribe();
        {
            let mut names = self.names();
            match names.get(id) {
                Some(Name::Absent(at)) if at.elapsed() < ABSENT_FOR => return "absent",
                Some(Name::Asked { .. }) => {}
                expired => {
                    // An expired absent name is still subscribed, and the control plane tells a
                    // subscription once that a name is absent: release it and ask afresh.
                    if expired.is_some() {
                        names.remove(id);
                        let _ = self.asks.send(Ask::Unsubscribe(id.clone()));
                    }
                    if names.len() >= MAX_NAMES {
                        // Expired absent names make room (and are unsubscribed).
                        names.retain(|id, n| {
                            let expired =
                                matches!(n, Name::Absent(at) if at.elapsed() >= ABSENT_FOR);
                            if expired {
                                let _ = self.asks.send(Ask::Unsubscribe(id.clone()));
                            }
                            !expired
                        });
                        if names.len() >= MAX_NAMES {
                            tracing::warn!(service = %id, max = MAX_NAMES, "too many names asked for on demand; not asking");
                            return "refused";
                        }
                    }
                    names.insert(id.clone(), Name::Asked { unused_since: None });
                    tracing::debug!(service = %id, "asking the control plane on demand");
                    if self.asks.send(Ask::Subscribe(id.clone())).is_err() {
                        return "refused";
                    }
                }
            }
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if holds() {
                return "found";
            }
            if matches!(self.names().get(id), Some(Name::Absent(_))) {
                return "absent";
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ if holds() => return "found",
                _ => return "timeout",
            }
        }
    }

    /// Release the names seen unused for the idle time (`in_use` says whether one is in use
    /// now), and forget absent names that have expired (unsubscribing them too).
    pub(crate) fn sweep(&self, now: Instant, in_use: impl Fn(&NamespacedName) -> bool) {
        let mut release = Vec::new();
        self.names().retain(|id, n| {
            let keep = match n {
                Name::Absent(at) => at.elapsed() < ABSENT_FOR,
                Name::Asked { unused_since } => {
                    if in_use(id) {
                        *unused_since = None;
                        true
                    } else {
                        let since = *unused_since.get_or_insert(now);
                        now.duration_since(since) < self.idle
                    }
                }
            };
            if !keep {
                release.push(id.clone());
            }
            keep
        });
        for id in release {
            tracing::info!(service = %id, "releasing a name asked for on demand: unused");
            let _ = self.asks.send(Ask::Unsubscribe(id));
        }
    }

    /// Ask for the names a predecessor passed on in its `offer` (see [`pass_on`]).
    pub(crate) fn take_over(&self, offer: &Offer) {
        let Some(names) = offer.extra.get(HANDED_OVER) else {
            return;
        };
        let parse = |v: &serde_json::Value| -> Result<Vec<NamespacedName>, String> {
            let names = Vec::<String>::deserialize(v).map_err(|e| e.to_string())?;
            names.iter().map(|n| n.parse()).collect()
        };
        match parse(names) {
            Ok(ids) => {
                tracing::info!(
                    names = ids.len(),
                    "asking for the names the predecessor asked for on demand"
                );
                self.adopt(ids);
            }
            Err(e) => {
                tracing::warn!(error = %e, "the predecessor's on-demand names are unreadable; not asked for")
            }
        }
    }

    /// Take over names a predecessor had asked for (an upgrade in place), before the first
    /// xDS request, which subscribes them: the new process holds from its first config what
    /// the old one served, and a client that resolved a name through the old one's DNS and
    /// connects to the new one is served, not taken for traffic to an unknown address.
    fn adopt(&self, ids: impl IntoIterator<Item = NamespacedName>) {
        let mut names = self.names();
        for id in ids {
            if names.len() >= MAX_NAMES {
                break;
            }
            names
                .entry(id)
                .or_insert(Name::Asked { unused_since: None });
        }
    }

    /// The names asked for and not found absent (to subscribe again on a new stream).
    pub(crate) fn asked(&self) -> Vec<NamespacedName> {
        self.names()
            .iter()
            .filter(|(_, n)| matches!(n, Name::Asked { .. }))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// Under what the names asked for are passed on to a successor.
const HANDED_OVER: &str = "on_demand";
/// The most bytes of names passed on (a whole offer may be 64 KiB).
const HANDED_OVER_BUDGET: usize = 32 * 1024;

/// Pass the names asked for on to a successor (an upgrade in place), as they are when it
/// takes over: at most [`HANDED_OVER_BUDGET`] bytes of them (1,024 long names would not fit
/// in an offer); the successor asks for the rest on first use.
pub(crate) fn pass_on(demand: &Arc<Demand>, offered: &Offered) {
    let d = demand.clone();
    offered.pass_on_live(HANDED_OVER, move || {
        let mut room = HANDED_OVER_BUDGET;
        let names: Vec<String> = d
            .asked()
            .iter()
            .map(|n| n.to_string())
            .take_while(|n| {
                let fits = n.len() + 3 <= room;
                room = room.saturating_sub(n.len() + 3);
                fits
            })
            .collect();
        serde_json::json!(names)
    });
}

/// Whether Service `id` is in use in `snap`: a request to one of the clusters its routes send
/// to within the retry budget's window, or a connection open to one.
pub(crate) fn in_use(snap: &Snapshot, id: &NamespacedName, now: Instant) -> bool {
    let Some(svc) = snap.cfg.services.get(id) else {
        return false;
    };
    let own = svc
        .ports
        .iter()
        .map(|p| trellis_model::proxy::cluster_key(id, p.port));
    let routed = svc
        .ports
        .iter()
        .flat_map(|p| p.routes.iter())
        .flat_map(|r| r.backends.iter().map(|b| b.cluster.clone()));
    own.chain(routed)
        .filter_map(|k| snap.clusters.get(&k))
        .any(|c| c.busy(now))
}

/// Sweep `demand` every so often (a quarter of its idle time, at least a second) against the
/// live config (`live` loads it), until the proxy stops.
pub(crate) async fn sweep_every(
    demand: std::sync::Arc<Demand>,
    live: impl Fn() -> std::sync::Arc<Snapshot>,
) {
    let every = (demand.idle / 4).max(Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snap = live();
        let now = Instant::now();
        demand.sweep(now, |id| in_use(&snap, id, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NamespacedName {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_is_asked_once_held_when_the_config_has_it_and_released_when_unused() {
        let (d, mut asks) = Demand::new(Duration::from_secs(60));
        let d = std::sync::Arc::new(d);
        let held = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waiter = {
            let (d, held) = (d.clone(), held.clone());
            tokio::spawn(async move {
                d.fetch(&id("shop/catalog"), || {
                    held.load(std::sync::atomic::Ordering::SeqCst)
                })
                .await
            })
        };
        assert_eq!(asks.recv().await, Some(Ask::Subscribe(id("shop/catalog"))));
        // A second request for it waits on the same question.
        let second = {
            let d = d.clone();
            let held = held.clone();
            tokio::spawn(async move {
                d.fetch(&id("shop/catalog"), || {
                    held.load(std::sync::atomic::Ordering::SeqCst)
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        held.store(true, std::sync::atomic::Ordering::SeqCst);
        d.config_changed();
        assert!(waiter.await.unwrap());
        assert!(second.await.unwrap());
        assert!(asks.try_recv().is_err(), "asked once");
        // In use: kept; unused for the idle time: released.
        let t0 = Instant::now();
        d.sweep(t0, |_| true);
        d.sweep(t0 + Duration::from_secs(30), |_| false);
        d.sweep(t0 + Duration::from_secs(60), |_| true);
        d.sweep(t0 + Duration::from_secs(100), |_| false);
        assert!(asks.try_recv().is_err(), "used again within the idle time");
        d.sweep(t0 + Duration::from_secs(160), |_| false);
        assert_eq!(
            asks.try_recv().ok(),
            Some(Ask::Unsubscribe(id("shop/catalog")))
        );
        assert!(d.asked().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_absent_name_ends_the_wait_and_is_not_asked_again_for_a_while() {
        let (d, mut asks) = Demand::new(Duration::from_secs(60));
        let d = std::sync::Arc::new(d);
        let waiter = {
            let d = d.clone();
            tokio::spawn(async move { d.fetch(&id("shop/nope"), || false).await })
        };
        assert_eq!(asks.recv().await, Some(Ask::Subscribe(id("shop/nope"))));
        d.absent(&id("shop/nope"));
        assert!(!waiter.await.unwrap());
        assert!(!d.fetch(&id("shop/nope"), || false).await);
        assert!(asks.try_recv().is_err(), "not asked again");
        // Once the answer has expired it is asked afresh: released first, since the control
        // plane tells a subscription once that a name is absent.
        tokio::time::advance(ABSENT_FOR).await;
        let again = {
            let d = d.clone();
            tokio::spawn(async move { d.fetch(&id("shop/nope"), || false).await })
        };
        assert_eq!(asks.recv().await, Some(Ask::Unsubscribe(id("shop/nope"))));
        assert_eq!(asks.recv().await, Some(Ask::Subscribe(id("shop/nope"))));
        d.absent(&id("shop/nope"));
        assert!(!again.await.unwrap());
        // Never answered: the wait ends at its bound.
        let start = tokio::time::Instant::now();
        assert!(!d.fetch(&id("shop/silent"), || false).await);
        assert_eq!(start.elapsed(), WAIT);
    }
}
