//! State shared by every task of one proxy: the live config, telemetry, how it dials, its
//! identity, drain. Only the proxy itself holds it; outside code gets narrow handles
//! ([`Services`]).

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use arc_swap::{ArcSwap, ArcSwapOption};
use prometheus_client::registry::Registry;
use trellis_model::resource::{MtlsMode, NamespacedName};

use crate::{
    credentials::Credentials, drain::Drain, metrics::Label, pool::Dialer, snapshot::Snapshot,
    telemetry::Telemetry,
};

/// State shared by every task.
pub(crate) struct Shared {
    /// Live config.
    pub(crate) state: ArcSwap<Snapshot>,
    /// Where records go.
    pub(crate) telemetry: Arc<Telemetry>,
    /// How upstream connections are made.
    pub(crate) dialer: Arc<Dialer>,
    /// Registry, for `/metrics`.
    pub(crate) registry: Registry,
    /// Drain signal and connection count.
    pub(crate) drain: Drain,
    /// Where the config came from.
    pub(crate) source: String,
    /// A config has been applied (always, for a file; after the first bundle, for xDS). The
    /// listeners take connections once it is (see `listen::spawn_accept`).
    pub(crate) synced: tokio::sync::watch::Sender<bool>,
    /// The xDS version last applied, and the last refusal.
    pub(crate) xds_status: Mutex<XdsStatus>,
    /// The proxy's certificate and key, when it has an identity (renewed in place).
    pub(crate) identity: Option<Arc<ArcSwap<Credentials>>>,
    /// The inbound TLS configuration, with the credentials it was built from.
    pub(crate) inbound_tls: ArcSwapOption<(Arc<Credentials>, Arc<rustls::ServerConfig>)>,
    /// The inbound listener's mode for every port, overriding the config's.
    pub(crate) mtls_mode: Option<MtlsMode>,
    /// Callers' SPIFFE IDs as metric labels, one shared value each (the request-metric cache
    /// compares labels by identity).
    pub(crate) peer_labels: Mutex<HashMap<String, Label>>,
    /// What the agent set up on this host beside the proxy (capture, the mesh resolver),
    /// for `/config_dump` and `trellis check --proxy`; null without an agent.
    pub(crate) host: Mutex<serde_json::Value>,
    /// The workload's adaptive concurrency limit (inbound).
    pub(crate) adaptive: Arc<crate::adaptive::Adaptive>,
    /// Services asked for on demand (xDS for a workload only).
    pub(crate) demand: Option<Arc<crate::demand::Demand>>,
}

impl Shared {
    /// The label of a caller's SPIFFE ID.
    pub(crate) fn peer_label(&self, id: &str) -> Label {
        let mut m = self.peer_labels.lock().unwrap_or_else(|p| p.into_inner());
        // Callers come and go: a bound on the table, cleared rather than tracked.
        if m.len() >= 65_536 {
            m.clear();
        }
        m.entry(id.to_string())
            .or_insert_with(|| Label::from(id))
            .clone()
    }
}

/// What the proxy last did with what the control plane sent.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub(crate) struct XdsStatus {
    /// Control plane that sent the current config.
    pub(crate) server: Option<String>,
    /// Version applied.
    pub(crate) applied: Option<String>,
    /// The last refusal: version and reason.
    pub(crate) rejected: Option<(String, String)>,
}

/// The services of the proxy's live config, for the agent's resolver.
#[derive(Clone)]
pub struct Services(pub(crate) Arc<Shared>);

impl Services {
    /// The virtual IP of service `id`: `None` when the mesh has no such service, `Some(None)`
    /// when it has no virtual IP.
    pub fn virtual_ip(&self, id: &NamespacedName) -> Option<Option<Ipv4Addr>> {
        self.0
            .state
            .load()
            .cfg
            .services
            .get(id)
            .map(|s| s.virtual_ip)
    }

    /// Whether services not held are asked for on demand.
    pub fn on_demand(&self) -> bool {
        self.0.demand.is_some()
    }

    /// [`Services::virtual_ip`], asking the control plane for a service the proxy does not
    /// hold and waiting a bounded time for it (see [`crate::demand`]).
    pub async fn find(&self, id: &NamespacedName) -> Option<Option<Ipv4Addr>> {
        if let Some(d) = &self.0.demand {
            d.fetch(id, || self.virtual_ip(id).is_some()).await;
        }
        self.virtual_ip(id)
    }
}
