//! Every proxy connected to this replica, and what it did with what it was sent: versions
//! sent and acknowledged, the last rejection.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use trellis_store::Key;
use trellis_xds::node_workload;

/// ACK/NACK state of one resource type at one proxy.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TypeStatus {
    /// Version last sent.
    pub(crate) sent: String,
    /// Version last acknowledged.
    pub(crate) acked: String,
    /// The last rejection, if the proxy has rejected anything since connecting.
    pub(crate) rejected: Option<Rejection>,
    /// Resources sent in the last response.
    pub(crate) resources: usize,
}

/// A NACK.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Rejection {
    /// The version the proxy refused.
    pub(crate) version: String,
    /// Its reason, as the proxy gave it.
    pub(crate) message: String,
    /// When (seconds since the epoch).
    pub(crate) at: u64,
}

/// One connected proxy.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ProxyStatus {
    /// Node id.
    pub(crate) node: String,
    /// `NAMESPACE/NAME` of the workload it serves, if it said.
    pub(crate) workload: Option<String>,
    /// Its address as the control plane sees it.
    pub(crate) peer: Option<String>,
    /// When it connected (seconds since the epoch).
    pub(crate) connected_at: u64,
    /// Per resource type (short name: `document`, `listener`, `route`, `cluster`, `endpoint`).
    pub(crate) types: BTreeMap<String, TypeStatus>,
    /// Since when (seconds since the epoch) it has left an update unanswered past the time a
    /// proxy takes to answer (a second): stuck, or not a proxy at all. Trellis documents only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) silent_since: Option<u64>,
}

/// Every connected proxy. Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Registry {
    inner: Arc<Mutex<BTreeMap<u64, ProxyStatus>>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn short(type_url: &str) -> String {
    let t = type_url.rsplit('.').next().unwrap_or(type_url);
    match t {
        "Document" => "document",
        "Listener" => "listener",
        "RouteConfiguration" => "route",
        "Cluster" => "cluster",
        "ClusterLoadAssignment" => "endpoint",
        other => other,
    }
    .to_string()
}

impl Registry {
    pub(crate) fn connect(&self, id: u64, peer: Option<SocketAddr>) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(
            id,
            ProxyStatus {
                node: String::new(),
                workload: None,
                peer: peer.map(|p| p.to_string()),
                connected_at: now(),
                types: BTreeMap::new(),
                silent_since: None,
            },
        );
    }

    pub(crate) fn disconnect(&self, id: u64) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&id);
    }

    /// Note what a request says about its node.
    pub(crate) fn node(
        &self,
        id: u64,
        node: &trellis_xds::envoy_types::pb::envoy::config::core::v3::Node,
    ) {
        let (nid, wl) = (node.id.clone(), node_workload(node).map(str::to_string));
        self.update(id, |p| {
            p.node = nid;
            if wl.is_some() {
                p.workload = wl;
            }
        });
    }

    /// Record an ACK (`error` is `None`) or a NACK of `version` of `type_url`.
    pub(crate) fn answer(&self, id: u64, type_url: &str, version: String, error: Option<String>) {
        let t = short(type_url);
        match error {
            Some(message) => {
                tracing::warn!(stream = id, r#type = %t, %version, reason = %message, "proxy rejected config");
                let rejected = Rejection {
                    version,
                    message,
                    at: now(),
                };
                self.update(id, |p| {
                    p.types.entry(t).or_default().rejected = Some(rejected);
                });
            }
            None => self.update(id, |p| p.types.entry(t).or_default().acked = version),
        }
    }

    /// Record that the proxy, with nothing outstanding, needs nothing of `version` (a scoped
    /// proxy untouched by a change): it is in step with it as if it had ACKed it.
    pub(crate) fn current(&self, id: u64, type_url: &str, version: String) {
        self.update(id, |p| {
            let ts = p.types.entry(short(type_url)).or_default();
            if ts.sent == ts.acked {
                ts.sent.clone_from(&version);
                ts.acked = version;
            }
        });
    }

    /// Record a response sent.
    pub(crate) fn sent(&self, id: u64, type_url: &str, version: String, count: usize) {
        self.update(id, |p| {
            let ts = p.types.entry(short(type_url)).or_default();
            ts.sent = version;
            ts.resources = count;
        });
    }

    /// Record that the proxy stopped answering its updates (`true`), or answered again.
    pub(crate) fn silent(&self, id: u64, silent: bool) {
        if silent {
            tracing::warn!(
                stream = id,
                "a proxy left its update unanswered; its updates now wait apart"
            );
        }
        self.update(id, |p| p.silent_since = silent.then(now));
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut ProxyStatus)) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = m.get_mut(&id) {
            f(p);
        }
    }

    /// Every connected proxy, ordered by connection.
    pub(crate) fn snapshot(&self) -> Vec<ProxyStatus> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.values().cloned().collect()
    }

    /// How many proxies taking Trellis documents have not applied revision `rev` (an update
    /// still in parts is not applied), those serving Workload `except` aside, and those that
    /// stopped answering: waiting for them cannot make them take it.
    pub(crate) fn behind(&self, rev: u64, except: &str) -> usize {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.values()
            .filter(|p| p.workload.as_deref() != Some(except) && p.silent_since.is_none())
            .filter_map(|p| p.types.get("document"))
            .filter(|t| t.acked.parse::<u64>().map_or(true, |v| v < rev))
            .count()
    }

    /// Node ids of the proxies that use `key`: for a Workload, those serving it; for any
    /// other kind, every proxy that takes Trellis documents (each gets the whole mesh).
    pub(crate) fn using(&self, key: &Key) -> Vec<String> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let wl = format!("{}/{}", key.namespace, key.name);
        m.values()
            .filter(|p| {
                if key.kind == "Workload" {
                    p.workload.as_deref() == Some(wl.as_str())
                } else {
                    p.types.contains_key("document")
                }
            })
            .map(|p| p.node.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deregistration waits for the proxies behind a revision, but not for one that
    /// stopped answering: waiting cannot make it take the change.
    #[test]
    fn a_proxy_that_stopped_answering_is_not_waited_for() {
        let r = Registry::default();
        let doc = trellis_xds::DOCUMENT_TYPE;
        for id in [1, 2] {
            r.connect(id, None);
            r.answer(id, doc, "4".into(), None);
            r.sent(id, doc, "5".into(), 1);
        }
        assert_eq!(r.behind(5, "d/leaving"), 2);
        r.silent(2, true);
        assert_eq!(r.behind(5, "d/leaving"), 1);
        r.silent(2, false);
        assert_eq!(r.behind(5, "d/leaving"), 2);
        r.answer(1, doc, "5".into(), None);
        assert_eq!(r.behind(5, "d/leaving"), 1);
    }
}
