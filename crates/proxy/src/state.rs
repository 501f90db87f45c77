//! The live configuration: an immutable snapshot swapped atomically on reload. Requests hold
//! the snapshot they started with, so a reload never changes a request midway.

use std::sync::Arc;

use trellis_model::{
    proxy::{BackendPolicy, ClusterConfig, EndpointConfig},
    resource::{Locality, MtlsMode, NamespacedName, Protocol},
    ProxyConfig,
};

use crate::{
    cluster::Cluster,
    fasthash::FastMap,
    metrics::{Label, Metrics},
};

/// One inbound port: the local application behind a single-endpoint cluster.
pub struct InboundTarget {
    /// Service port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Cluster whose one endpoint is the application.
    pub cluster: Arc<Cluster>,
    /// The service callers reach through this port (authorization policies guard it).
    pub service: NamespacedName,
    /// Whether it accepts plaintext.
    pub mtls: MtlsMode,
    /// The application's own port, which captured inbound connections were addressed to.
    pub target_port: u16,
}

/// A translated config plus the runtime state built from it.
pub struct Snapshot {
    /// The config.
    pub cfg: Arc<ProxyConfig>,
    /// Outbound clusters by key.
    pub clusters: FastMap<String, Arc<Cluster>>,
    /// Service by the host names callers use: `NAME.NAMESPACE`, and bare `NAME` for the
    /// local workload's namespace.
    pub hosts: FastMap<Box<str>, NamespacedName>,
    /// Service ports by virtual IP and port, for captured connections: (cluster key, protocol).
    pub vips: FastMap<std::net::SocketAddr, (String, Protocol)>,
    /// Inbound targets.
    pub inbound: Vec<InboundTarget>,
    /// Source service label of outbound traffic.
    pub src_service: Label,
    /// Generation, incremented by each reload.
    pub version: u64,
}

impl Snapshot {
    /// Build from `cfg`, carrying endpoint state over from `prev`.
    pub fn build(cfg: ProxyConfig, prev: Option<&Snapshot>, metrics: &Metrics) -> Self {
        let here = cfg.local.as_ref().map(|l| &l.locality);
        let clusters = cfg
            .clusters
            .iter()
            .map(|(k, c)| {
                let old = prev.and_then(|p| p.clusters.get(k)).map(|c| c.as_ref());
                (
                    k.clone(),
                    Arc::new(Cluster::new(k.clone(), c.clone(), old, metrics, here)),
                )
            })
            .collect();
        let mut inbound = Vec::new();
        if let Some(local) = &cfg.local {
            for ip in &local.inbound_ports {
                let key = format!("inbound|{}", ip.port);
                let cc = ClusterConfig {
                    service: ip.service.clone(),
                    port: ip.port,
                    protocol: ip.protocol,
                    endpoints: vec![EndpointConfig {
                        addr: ip.target,
                        weight: 1,
                        workload: local.id.clone(),
                        environment: local.environment,
                        locality: Locality::default(),
                        mesh: None,
                    }],
                    // The local application is the only endpoint: never eject it.
                    policy: BackendPolicy {
                        consecutive_failures: 0,
                        ..Default::default()
                    },
                    mtls: ip.mtls,
                };
                let old = prev
                    .and_then(|p| p.inbound.iter().find(|t| t.port == ip.port))
                    .map(|t| t.cluster.as_ref());
                let cluster = Arc::new(Cluster::new(key.clone(), cc, old, metrics, None));
                inbound.push(InboundTarget {
                    port: ip.port,
                    protocol: ip.protocol,
                    cluster,
                    service: ip.service.clone(),
                    mtls: ip.mtls,
                    target_port: ip.target.port(),
                });
            }
        }
        let src_service = cfg
            .local
            .as_ref()
            .and_then(|l| l.service.as_ref())
            .and_then(|s| cfg.services.get(s))
            .map(|s| Label::from(s.host.clone()))
            .unwrap_or_default();
        let local_ns = cfg
            .local
            .as_ref()
            .map_or("default", |l| l.id.namespace.as_str());
        let mut hosts = FastMap::default();
        let mut vips = FastMap::default();
        for (id, svc) in &cfg.services {
            hosts.insert(Box::from(&*svc.host), id.clone());
            hosts.insert(format!("{}.mesh", svc.host).into_boxed_str(), id.clone());
            if let Some(ip) = svc.virtual_ip {
                for p in &svc.ports {
                    let key = trellis_model::proxy::cluster_key(id, p.port);
                    vips.insert(std::net::SocketAddr::from((ip, p.port)), (key, p.protocol));
                }
            }
            if id.namespace == local_ns {
                hosts.insert(Box::from(id.name.as_str()), id.clone());
            }
        }
        Self {
            hosts,
            vips,
            cfg: Arc::new(cfg),
            clusters,
            inbound,
            src_service,
            version: prev.map_or(1, |p| p.version + 1),
        }
    }
}
