//! The live configuration: an immutable snapshot swapped atomically on reload. Requests hold
//! the snapshot they started with, so a reload never changes a request midway.

use std::sync::Arc;

use trellis_model::{
    proxy::{BackendPolicy, ClusterConfig, EndpointConfig},
    resource::{MtlsMode, NamespacedName, Protocol},
    ProxyConfig,
};

use crate::{
    cluster::Cluster,
    fasthash::FastMap,
    metrics::{Label, Metrics},
};

/// One inbound port: the local application behind a single-endpoint cluster.
#[derive(Clone)]
pub(crate) struct InboundTarget {
    /// Service port.
    pub(crate) port: u16,
    /// Protocol.
    pub(crate) protocol: Protocol,
    /// Cluster whose one endpoint is the application.
    pub(crate) cluster: Arc<Cluster>,
    /// The service callers reach through this port (authorization policies guard it).
    pub(crate) service: NamespacedName,
    /// Whether it accepts plaintext.
    pub(crate) mtls: MtlsMode,
    /// The application's own port, which captured inbound connections were addressed to.
    pub(crate) target_port: u16,
    /// The adaptive concurrency limit its service's policy sets.
    pub(crate) adaptive: trellis_model::proxy::AdaptiveLimit,
    /// The rate limits on its requests (the first whose matches a request meets holds it;
    /// each kept across configs while its policy stays the same).
    pub(crate) rate_limits: Vec<Arc<crate::ratelimit::RateLimiter>>,
}

/// A translated config plus the runtime state built from it.
pub(crate) struct Snapshot {
    /// The config.
    pub(crate) cfg: Arc<ProxyConfig>,
    /// Outbound clusters by key.
    pub(crate) clusters: FastMap<String, Arc<Cluster>>,
    /// Service by the host names callers use: `NAME.NAMESPACE`, and bare `NAME` for the
    /// local workload's namespace.
    pub(crate) hosts: FastMap<Box<str>, NamespacedName>,
    /// Service ports by virtual IP and port, for captured connections: (cluster key, protocol).
    pub(crate) vips: FastMap<std::net::SocketAddr, (String, Protocol)>,
    /// Inbound targets.
    pub(crate) inbound: Vec<InboundTarget>,
    /// Source service label of outbound traffic.
    pub(crate) src_service: Label,
    /// The local workload (`namespace/name`), as a label.
    pub(crate) src_workload: Label,
    /// What this proxy tells peers' proxies about itself (`x-trellis-peer`).
    pub(crate) peer_header: Option<http::HeaderValue>,
    /// Generation, incremented by each reload.
    pub(crate) version: u64,
}

impl Snapshot {
    /// `prev` with the clusters `redone` rebuilt from `cfg` (an update of endpoints only:
    /// see [`trellis_model::update_workloads`]); the others are shared as they are, with their
    /// pools, estimates and ejections.
    pub(crate) fn with_clusters(
        prev: &Snapshot,
        cfg: ProxyConfig,
        redone: &[String],
        metrics: &Metrics,
        meshed: bool,
    ) -> Self {
        let here = cfg.local.as_ref().map(|l| &l.locality);
        let mut clusters = prev.clusters.clone();
        for k in redone {
            let (Some(c), old) = (cfg.clusters.get(k), prev.clusters.get(k)) else {
                continue;
            };
            let c = Cluster::new(
                k.clone(),
                c.clone(),
                old.map(|c| &**c),
                metrics,
                here,
                meshed,
            );
            clusters.insert(k.clone(), Arc::new(c));
        }
        Self {
            cfg: Arc::new(cfg),
            clusters,
            hosts: prev.hosts.clone(),
            vips: prev.vips.clone(),
            inbound: prev.inbound.clone(),
            src_service: prev.src_service.clone(),
            src_workload: prev.src_workload.clone(),
            peer_header: prev.peer_header.clone(),
            version: prev.version + 1,
        }
    }

    /// Build from `cfg`, carrying endpoint state over from `prev`. `meshed`: this proxy has
    /// an identity, so it reaches meshed endpoints at their proxies.
    pub(crate) fn build(
        cfg: ProxyConfig,
        prev: Option<&Snapshot>,
        metrics: &Metrics,
        meshed: bool,
    ) -> Self {
        let here = cfg.local.as_ref().map(|l| &l.locality);
        let clusters = cfg
            .clusters
            .iter()
            .map(|(k, c)| {
                let old = prev.and_then(|p| p.clusters.get(k)).map(|c| c.as_ref());
                (
                    k.clone(),
                    Arc::new(Cluster::new(
                        k.clone(),
                        c.clone(),
                        old,
                        metrics,
                        here,
                        meshed,
                    )),
                )
            })
            .collect();
        let mut inbound = Vec::new();
        if let Some(local) = &cfg.local {
            for ip in &local.inbound_ports {
                let key = format!("inbound|{}", ip.port);
                let cc = Arc::new(ClusterConfig {
                    service: ip.service.clone(),
                    port: ip.port,
                    protocol: ip.protocol,
                    endpoints: vec![EndpointConfig {
                        addr: ip.target,
                        weight: 1,
                        workload: local.id.clone(),
                        environment: local.environment,
                        locality: local.locality.clone(),
                        mesh: None,
                        recoveries: 0,
                    }],
                    // The local application is the only endpoint: never eject it.
                    policy: BackendPolicy {
                        consecutive_failures: 0,
                        ..Default::default()
                    },
                    mtls: ip.mtls,
                });
                let was = prev.and_then(|p| p.inbound.iter().find(|t| t.port == ip.port));
                let old = was.map(|t| t.cluster.as_ref());
                let cluster = Arc::new(Cluster::new(key.clone(), cc, old, metrics, None, false));
                inbound.push(InboundTarget {
                    port: ip.port,
                    protocol: ip.protocol,
                    cluster,
                    service: ip.service.clone(),
                    mtls: ip.mtls,
                    target_port: ip.target.port(),
                    adaptive: ip.adaptive,
                    rate_limits: ip
                        .rate_limits
                        .iter()
                        .map(|cfg| {
                            // A limiter whose policy is unchanged keeps its buckets.
                            was.and_then(|t| t.rate_limits.iter().find(|l| l.cfg == *cfg))
                                .cloned()
                                .unwrap_or_else(|| {
                                    Arc::new(crate::ratelimit::RateLimiter::new(cfg.clone()))
                                })
                        })
                        .collect(),
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
        let src_workload = cfg
            .local
            .as_ref()
            .map(|l| Label::from(l.id.to_string().as_str()))
            .unwrap_or_default();
        let peer_header = peer_header(&cfg);
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
            src_workload,
            peer_header,
            version: prev.map_or(1, |p| p.version + 1),
        }
    }
}

/// The value of `x-trellis-peer` this proxy sends to peers' proxies: who is calling
/// (`SERVICE,NAMESPACE/WORKLOAD,ENVIRONMENT,REGION/ZONE`), so that the callee records its
/// source. Peers believe it only over mutual TLS.
fn peer_header(cfg: &ProxyConfig) -> Option<http::HeaderValue> {
    let local = cfg.local.as_ref()?;
    let service = local
        .service
        .as_ref()
        .and_then(|s| cfg.services.get(s))
        .map_or("", |s| &*s.host);
    let l = &local.locality;
    let v = format!(
        "{service},{},{},{}/{}",
        local.id,
        local.environment.as_str(),
        l.region.as_deref().unwrap_or_default(),
        l.zone.as_deref().unwrap_or_default(),
    );
    http::HeaderValue::from_str(&v).ok()
}
