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
    /// Its labels when it left (a service that selected it can be found after it left);
    /// other events keep none (10,000 events of a fleet of workloads would hold ~6 MB).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
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
    /// Keep an event; `labels` only for a workload that left.
    fn push(&self, workload: String, kind: &'static str, labels: BTreeMap<String, String>) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == KEPT {
            q.pop_front();
        }
        q.push_back(Event {
            at_ms: now_ms(),
            workload,
            kind,
            labels,
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
                    self.push(name, kind, BTreeMap::new());
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
                    self.push(name.clone(), "joined", BTreeMap::new());
                    if health(a) == Some(false) {
                        self.push(name, "unhealthy", BTreeMap::new());
                    }
                }
                (Some(b), None) => self.push(name, "left", labels(&b.object.doc())),
                (Some(b), Some(a)) if b.healthy() != health(a) => match health(a) {
                    Some(false) => self.push(name, "unhealthy", BTreeMap::new()),
                    _ => self.push(name, "healthy", BTreeMap::new()),
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

#[cfg(test)]
mod tests {
    use serde_json::json;
    use trellis_store::{Key, Object};

    use super::*;

    /// A workload's events: joined and left; only the departure keeps its labels (a service
    /// that selected it is found from them).
    #[test]
    fn a_departure_keeps_the_labels_of_the_workload_that_left() {
        let key = Key::new("Workload", "shop", "w-1");
        let doc = json!({
            "apiVersion": "trellis.dev/v1alpha1",
            "kind": "Workload",
            "metadata": { "name": "w-1", "namespace": "shop", "labels": { "app": "catalog" } },
            "spec": { "address": "127.0.0.1" },
        });
        let events = Events::default();
        let mut catalog = Catalog::default();
        let put = Change {
            revision: 1,
            events: vec![StoreEvent::Put(Object {
                key: key.clone(),
                version: 1,
                doc,
            })],
        };
        events.observe(&catalog, &put);
        assert!(catalog.apply(put));
        let gone = Change {
            revision: 2,
            events: vec![StoreEvent::Delete(key)],
        };
        events.observe(&catalog, &gone);
        let got: Vec<_> = events
            .since(0)
            .into_iter()
            .map(|e| (e.kind, e.labels))
            .collect();
        let catalog_labels = BTreeMap::from([("app".to_string(), "catalog".to_string())]);
        assert_eq!(got, [("joined", BTreeMap::new()), ("left", catalog_labels)]);
    }
}
