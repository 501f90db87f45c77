//! Timed events per workload: joined, left, healthy, unhealthy. Read off the store's changes
//! as the follower applies them, so every replica keeps the same events whoever wrote the
//! change (an agent's heartbeat through another replica, an operator's delete, a container
//! that stopped). Kept in memory, the newest [`KEPT`]; `diagnose` cites them.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
};

use serde::Serialize;
use serde_json::Value;
use trellis_store::{Change, Event as StoreEvent};

use crate::{
    catalog::{workload_key, Catalog, HEALTH_KIND},
    fleet::now_ms,
};

/// Events kept at most.
pub(crate) const KEPT: usize = 10_000;

/// What happened to a workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Event {
    /// When this replica saw it (Unix ms).
    pub(crate) at_ms: u64,
    /// `namespace/name`.
    pub(crate) workload: String,
    /// `joined`, `left`, `healthy` or `unhealthy`.
    pub(crate) kind: &'static str,
    /// Its labels (a service that selected it can be found after it left).
    pub(crate) labels: BTreeMap<String, String>,
}

/// The events, shared by the follower and the API.
#[derive(Clone, Default)]
pub(crate) struct Events(Arc<Mutex<VecDeque<Event>>>);

fn labels(doc: &Value) -> BTreeMap<String, String> {
    doc["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

impl Events {
    fn push(&self, workload: String, kind: &'static str, doc: &Value) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == KEPT {
            q.pop_front();
        }
        q.push_back(Event {
            at_ms: now_ms(),
            workload,
            kind,
            labels: labels(doc),
        });
    }

    /// Note what `change` does to workloads, before `catalog` applies it.
    pub(crate) fn observe(&self, catalog: &Catalog, change: &Change) {
        for e in &change.events {
            let (key, after) = match e {
                StoreEvent::Put(o) => (&o.key, Some(&o.doc)),
                StoreEvent::Delete(k) => (k, None),
            };
            let name = format!("{}/{}", key.namespace, key.name);
            if key.kind == HEALTH_KIND {
                // A health record of a Workload already here: its health changes.
                let workload = workload_key(key);
                let Some(w) = catalog.entries.get(&workload) else {
                    continue;
                };
                let now = after.and_then(|a| a["healthy"].as_bool());
                if now.is_some() && now != w.healthy() {
                    let kind = if now == Some(false) {
                        "unhealthy"
                    } else {
                        "healthy"
                    };
                    self.push(name, kind, &w.object.doc);
                }
                continue;
            }
            if key.kind != "Workload" {
                continue;
            }
            let before = catalog.entries.get(key);
            // Health written in the Workload itself (a static one), or its record.
            let record = catalog.health.get(key).map(|h| h.healthy);
            let health = |d: &Value| record.or_else(|| d["spec"]["healthy"].as_bool());
            match (before, after) {
                (None, Some(a)) => {
                    self.push(name.clone(), "joined", a);
                    if health(a) == Some(false) {
                        self.push(name, "unhealthy", a);
                    }
                }
                (Some(b), None) => self.push(name, "left", &b.object.doc),
                (Some(b), Some(a)) if b.healthy() != health(a) => match health(a) {
                    Some(false) => self.push(name, "unhealthy", a),
                    _ => self.push(name, "healthy", a),
                },
                _ => {}
            }
        }
    }

    /// The events since `from_ms`, oldest first.
    pub(crate) fn since(&self, from_ms: u64) -> Vec<Event> {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<Event> = q
            .iter()
            .rev()
            .take_while(|e| e.at_ms >= from_ms)
            .cloned()
            .collect();
        v.reverse();
        v
    }
}
