//! A service's figures over time, slot by slot: what its callers got (requests, failures,
//! latency) and which workloads served them, for the pane's service view.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use trellis_taxonomy::Category;

use super::{Ring, Store};
use crate::{hist::Histogram, key::Direction};

/// One slot of a service's timeline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// The slot's start (Unix ms).
    pub at_ms: u64,
    /// Requests its callers made (effective: after retries).
    pub requests: u64,
    /// Of those, failed (the client's own errors aside).
    pub failed: u64,
    /// Median latency, ms, as the callers' proxies timed it.
    pub p50_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
    /// Requests by the workload that served them (the last try's endpoint).
    pub by_workload: BTreeMap<String, u64>,
}

/// A service's timeline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// The length of a slot, ms.
    pub step_ms: u64,
    /// The slots with traffic, oldest first.
    pub points: Vec<Point>,
}

/// The slots of `ring` (each `slot_ms` long) that end after `from`, by their start in
/// steps of `step` ms.
fn slots<T>(ring: &Ring<T>, slot_ms: u64, step: u64, from: u64) -> impl Iterator<Item = (u64, &T)> {
    ring.iter().filter_map(move |(slot, v)| {
        let at = u64::from(*slot) * slot_ms;
        (at + slot_ms > from).then_some((at / step * step, v))
    })
}

impl Store {
    /// `service`'s timeline over the `window_ms` before `now_ms`, from its callers'
    /// proxies: one point per fine slot when the window fits the fine slots, else per
    /// coarse slot.
    pub fn timeline(&self, now_ms: u64, window_ms: u64, service: &str) -> Timeline {
        let l = &self.limits;
        let fine_only = window_ms <= l.fine_ms * l.fine_slots as u64;
        let step = if fine_only { l.fine_ms } else { l.coarse_ms };
        let from = now_ms.saturating_sub(window_ms);
        let mut points: BTreeMap<u64, Point> = BTreeMap::new();
        for (k, s) in &self.series {
            if k.direction != Direction::Outbound || &*k.service != service {
                continue;
            }
            let failed = !matches!(k.class.category(), Category::Client | Category::Ok);
            let fine = slots(&s.fine, l.fine_ms, step, from);
            let coarse = slots(&s.coarse, l.coarse_ms, step, from).filter(|_| !fine_only);
            for (at, c) in fine.chain(coarse) {
                let p = points.entry(at).or_default();
                p.requests += c.requests;
                if failed {
                    p.failed += c.requests;
                }
                if c.requests > 0 {
                    *p.by_workload
                        .entry(k.peer_workload.to_string())
                        .or_default() += c.requests;
                }
            }
        }
        let mut latency: BTreeMap<u64, Histogram> = BTreeMap::new();
        for (k, s) in &self.latency {
            if k.direction != Direction::Outbound || &*k.service != service {
                continue;
            }
            let fine = slots(&s.fine, l.fine_ms, step, from);
            let coarse = slots(&s.coarse, l.coarse_ms, step, from).filter(|_| !fine_only);
            for (at, h) in fine.chain(coarse) {
                match latency.get_mut(&at) {
                    Some(t) => t.merge(h),
                    None => {
                        latency.insert(at, h.clone());
                    }
                }
            }
        }
        for (at, h) in latency {
            if let Some(p) = points.get_mut(&at) {
                p.p50_ms = h.quantile(0.5).map(|s| s * 1000.0);
                p.p99_ms = h.quantile(0.99).map(|s| s * 1000.0);
            }
        }
        Timeline {
            step_ms: step,
            points: points
                .into_iter()
                .filter(|(_, p)| p.requests > 0)
                .map(|(at, mut p)| {
                    p.at_ms = at;
                    p
                })
                .collect(),
        }
    }
}
