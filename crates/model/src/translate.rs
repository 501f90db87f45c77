//! Translation of stored resources into one proxy's [`ProxyConfig`].

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use crate::{
    proxy::*,
    resource::{
        BackendPolicySpec, HttpRouteSpec, MtlsMode, NamespacedName, PathMatch,
        PeerAuthenticationSpec, Resource, RouteMatch, RouteRule, ServiceSpec, Spec, ValueMatchKind,
        WorkloadSpec, DEFAULT_INBOUND_PORT,
    },
    value::RegexValue,
    ConfigError,
};

type Result<T> = std::result::Result<T, ConfigError>;

/// A workload as the index holds it.
type WorkloadRef<'a> = (&'a Resource, &'a WorkloadSpec);

struct Index<'a> {
    file: &'a str,
    services: BTreeMap<NamespacedName, (&'a Resource, &'a ServiceSpec)>,
    workloads: BTreeMap<NamespacedName, (&'a Resource, &'a WorkloadSpec)>,
    /// Workloads by (namespace, label key, label value), each list in the order of
    /// `workloads`: a selector looks at the workloads with one of its labels, not at the
    /// fleet (100 services × 10,000 workloads would be a million comparisons per translate).
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<WorkloadRef<'a>>>,
    /// HTTPRoutes as written, GRPCRoutes as their equivalent HTTPRoute.
    routes: Vec<(&'a Resource, Cow<'a, HttpRouteSpec>)>,
    policies: Vec<(&'a Resource, &'a BackendPolicySpec)>,
    authz: Vec<(&'a Resource, &'a crate::resource::AuthorizationPolicySpec)>,
    peer_auth: Vec<(&'a Resource, &'a PeerAuthenticationSpec)>,
    bundles: Vec<(&'a Resource, &'a crate::resource::TrustBundleSpec)>,
    /// RateLimitPolicies, checked and converted once.
    rate_limits: Vec<(
        &'a Resource,
        &'a crate::resource::RateLimitPolicySpec,
        RateLimit,
    )>,
}

/// Translate `resources` (read from `file`) into the config of the proxy serving `local`.
///
/// Refuses the whole set on the first problem, naming file, line and field.
pub fn translate<R: std::borrow::Borrow<Resource>>(
    file: &str,
    resources: &[R],
    local: Option<&NamespacedName>,
) -> Result<ProxyConfig> {
    let ix = index(file, resources)?;
    let policies = policies(&ix)?;
    let modes = MtlsModes::new(&ix)?;
    let mut clusters = BTreeMap::new();
    let mut services = BTreeMap::new();
    let mut vips = BTreeMap::new();
    for (id, (res, svc)) in &ix.services {
        validate_service(&ix, res, svc)?;
        for p in &svc.ports {
            let key = cluster_key(id, p.port);
            let policy = policies.get(id).cloned().unwrap_or_default();
            let mtls = modes.of(id);
            clusters.insert(key, Arc::new(cluster(&ix, id, svc, p.port, policy, mtls)?));
        }
        let ports = svc
            .ports
            .iter()
            .map(|p| PortConfig {
                port: p.port,
                protocol: p.protocol,
                routes: Vec::new(),
            })
            .collect();
        let host = id.host().into();
        let virtual_ip = svc.virtual_ip;
        if let Some(ip) = virtual_ip {
            if let Some(other) = vips.insert(ip, id) {
                return Err(ConfigError::invalid(
                    ix.file,
                    res.line,
                    format!("Service {}: spec.virtualIP", res.id()),
                    format!("{ip} is already the virtual IP of Service {other}"),
                ));
            }
        }
        services.insert(
            id.clone(),
            ServiceConfig {
                host,
                ports,
                virtual_ip,
                trace_sampling: svc
                    .tracing
                    .as_ref()
                    .and_then(|t| t.sampling_percent)
                    .map(|p| p / 100.0),
            },
        );
    }
    attach_routes(&ix, &mut services)?;
    for (id, svc) in services.iter_mut() {
        for port in &mut svc.ports {
            port.routes.push(default_route(id, port.port));
        }
    }
    let mut cfg = ProxyConfig {
        local: None,
        services,
        clusters,
        tcp_binds: Vec::new(),
        authz: authz_policies(&ix)?,
        trust_bundle: (!ix.bundles.is_empty()).then(|| {
            ix.bundles
                .iter()
                .flat_map(|(_, b)| b.roots.iter())
                .map(|r| format!("{}\n", r.trim()))
                .collect()
        }),
    };
    if let Some(local) = local {
        local_workload(&ix, local, &mut cfg)?;
    }
    Ok(cfg)
}

fn index<'a, R: std::borrow::Borrow<Resource>>(
    file: &'a str,
    resources: &'a [R],
) -> Result<Index<'a>> {
    let mut ix = Index {
        file,
        services: BTreeMap::new(),
        workloads: BTreeMap::new(),
        by_label: HashMap::new(),
        routes: Vec::new(),
        policies: Vec::new(),
        authz: Vec::new(),
        peer_auth: Vec::new(),
        bundles: Vec::new(),
        rate_limits: Vec::new(),
    };
    let mut seen = HashSet::new();
    for r in resources {
        let r: &'a Resource = r.borrow();
        if !is_dns_label(&r.metadata.name) || !is_dns_label(&r.metadata.namespace) {
            return Err(ConfigError::invalid(
                file,
                r.line,
                format!("{} {}: metadata.name", r.kind(), r.id()),
                "names and namespaces must be DNS labels (a-z, 0-9, '-')",
            ));
        }
        if !seen.insert((r.kind(), r.id())) {
            return Err(ConfigError::invalid(
                file,
                r.line,
                format!("{} {}: metadata.name", r.kind(), r.id()),
                "defined twice",
            ));
        }
        match &r.spec {
            Spec::Service(s) => drop(ix.services.insert(r.id(), (r, s))),
            Spec::Workload(w) => drop(ix.workloads.insert(r.id(), (r, w))),
            Spec::HttpRoute(h) => ix.routes.push((r, Cow::Borrowed(h))),
            Spec::GrpcRoute(g) => {
                let h = g.to_http().map_err(|(f, m)| {
                    ConfigError::invalid(file, r.line, format!("GRPCRoute {}: {f}", r.id()), m)
                })?;
                ix.routes.push((r, Cow::Owned(h)));
            }
            Spec::BackendPolicy(p) => ix.policies.push((r, p)),
            Spec::AuthorizationPolicy(a) => ix.authz.push((r, a)),
            Spec::PeerAuthentication(p) => ix.peer_auth.push((r, p)),
            Spec::TrustBundle(b) => {
                check_bundle(file, r, b)?;
                ix.bundles.push((r, b));
            }
            Spec::RateLimitPolicy(p) => {
                let limits = rate_limit(file, r, p)?;
                ix.rate_limits.push((r, p, limits));
            }
            // The control plane's to run; nothing of it reaches a proxy.
            Spec::Rollout(p) => rollout(file, r, p)?,
        }
    }
    ix.index_labels();
    Ok(ix)
}

impl<'a> Index<'a> {
    /// Fill `by_label` from `workloads`.
    fn index_labels(&mut self) {
        for &(r, w) in self.workloads.values() {
            for (k, v) in &r.metadata.labels {
                self.by_label
                    .entry((r.metadata.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push((r, w));
            }
        }
    }

    /// The workloads in `namespace` that `selector` selects, in name order.
    fn selected<'s>(
        &'s self,
        namespace: &'s str,
        selector: &'s BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'s WorkloadRef<'a>> {
        // The rarest of the selector's labels narrows the search most.
        let narrowest = selector
            .iter()
            .filter_map(|(k, v)| self.by_label.get(&(namespace, k.as_str(), v.as_str())))
            .min_by_key(|l| l.len());
        let all_present = selector.iter().all(|(k, v)| {
            self.by_label
                .contains_key(&(namespace, k.as_str(), v.as_str()))
        });
        narrowest
            .filter(|_| all_present)
            .into_iter()
            .flatten()
            .filter(move |(r, _)| selects(selector, &r.metadata.labels))
    }
}

/// Whether `s` is a DNS label as names and namespaces must be (a-z, 0-9, '-'; at most 63).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn validate_service(ix: &Index<'_>, res: &Resource, svc: &ServiceSpec) -> Result<()> {
    let field = |f: &str| format!("Service {}: {f}", res.id());
    if svc.ports.is_empty() {
        return Err(ConfigError::invalid(
            ix.file,
            res.line,
            field("spec.ports"),
            "a service needs at least one port",
        ));
    }
    let mut seen = HashSet::new();
    for (i, p) in svc.ports.iter().enumerate() {
        if p.port == 0 || p.target_port == Some(0) {
            return Err(ConfigError::invalid(
                ix.file,
                res.line,
                field(&format!("spec.ports[{i}].port")),
                "port 0 is not a port",
            ));
        }
        if !seen.insert(p.port) {
            return Err(ConfigError::invalid(
                ix.file,
                res.line,
                field(&format!("spec.ports[{i}].port")),
                format!("port {} listed twice", p.port),
            ));
        }
    }
    if let Some(ip) = svc.virtual_ip {
        if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
            return Err(ConfigError::invalid(
                ix.file,
                res.line,
                field("spec.virtualIP"),
                format!(
                    "{ip} cannot be a virtual IP (loopback, unspecified, multicast or broadcast)"
                ),
            ));
        }
    }
    Ok(())
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn cluster(
    ix: &Index<'_>,
    id: &NamespacedName,
    svc: &ServiceSpec,
    port: u16,
    policy: BackendPolicy,
    mtls: MtlsMode,
) -> Result<ClusterConfig> {
    let sp = svc
        .ports
        .iter()
        .find(|p| p.port == port)
        .expect("port exists");
    let mut endpoints = Vec::new();
    for &(res, w) in ix.selected(&id.namespace, &svc.selector) {
        endpoints.extend(endpoint(ix.file, res, w, sp)?);
    }
    Ok(ClusterConfig {
        service: id.clone(),
        port,
        protocol: sp.protocol,
        endpoints,
        policy,
        mtls,
    })
}

/// The endpoint a selected workload is for service port `sp`; `None` while its agent says
/// it is down (or fell silent): out of the endpoints, still registered.
fn endpoint(
    file: &str,
    res: &Resource,
    w: &WorkloadSpec,
    sp: &crate::resource::ServicePort,
) -> Result<Option<EndpointConfig>> {
    if w.healthy == Some(false) {
        return Ok(None);
    }
    let wid = res.id();
    let weight = w.weight.unwrap_or(1);
    if weight == 0 {
        return Err(ConfigError::invalid(
            file,
            res.line,
            format!("Workload {wid}: spec.weight"),
            "weight must be at least 1",
        ));
    }
    Ok(Some(EndpointConfig {
        addr: SocketAddr::new(w.address, workload_port(w, sp)),
        weight,
        workload: wid,
        environment: w.environment,
        locality: w.locality.clone(),
        mesh: mesh_peer(&res.metadata.namespace, w),
        recoveries: w.health_recoveries.unwrap_or(0),
    }))
}

/// `prev` (translated from an earlier set) after a change of the Workloads `changed` only
/// (none of them the proxy's own): the endpoints of the clusters whose services selected a
/// changed Workload, or select it now, are worked out again; everything else is shared with
/// `prev`. `resources` is the whole set after the change. Returns the keys of the clusters
/// that changed. What a full [`translate`] of `resources` would give, in a fraction of its
/// time: a large mesh is not translated again because one endpoint's health flapped.
pub fn update_workloads<R: std::borrow::Borrow<Resource>>(
    file: &str,
    prev: &ProxyConfig,
    resources: &[R],
    changed: &HashSet<NamespacedName>,
) -> Result<(ProxyConfig, Vec<String>)> {
    let mut services = HashMap::new();
    let mut workloads: Vec<(&Resource, &WorkloadSpec)> = Vec::new();
    for r in resources {
        let r: &Resource = r.borrow();
        match &r.spec {
            Spec::Service(s) => drop(services.insert(r.id(), s)),
            Spec::Workload(w) if changed.contains(&r.id()) => {
                if !is_dns_label(&r.metadata.name) || !is_dns_label(&r.metadata.namespace) {
                    return Err(ConfigError::invalid(
                        file,
                        r.line,
                        format!("Workload {}: metadata.name", r.id()),
                        "names and namespaces must be DNS labels (a-z, 0-9, '-')",
                    ));
                }
                // As a full translation refuses it: two documents of one Workload.
                if workloads.iter().any(|(o, _)| o.id() == r.id()) {
                    return Err(ConfigError::invalid(
                        file,
                        r.line,
                        format!("Workload {}: metadata.name", r.id()),
                        "defined twice",
                    ));
                }
                workloads.push((r, w));
            }
            _ => {}
        }
    }
    let mut cfg = prev.clone();
    let mut redone = Vec::new();
    for (key, old) in &prev.clusters {
        let Some(svc) = services.get(&old.service) else {
            continue;
        };
        let had = old.endpoints.iter().any(|e| changed.contains(&e.workload));
        let selected: Vec<_> = workloads
            .iter()
            .filter(|(r, _)| {
                r.metadata.namespace == old.service.namespace
                    && selects(&svc.selector, &r.metadata.labels)
            })
            .collect();
        if !had && selected.is_empty() {
            continue;
        }
        let sp = svc
            .ports
            .iter()
            .find(|p| p.port == old.port)
            .expect("the cluster's port is the service's");
        let mut endpoints: Vec<EndpointConfig> = old
            .endpoints
            .iter()
            .filter(|e| !changed.contains(&e.workload))
            .cloned()
            .collect();
        for (r, w) in selected {
            endpoints.extend(endpoint(file, r, w, sp)?);
        }
        // The order a full translation gives: by workload.
        endpoints.sort_by(|a, b| a.workload.cmp(&b.workload));
        let mut c = (**old).clone();
        c.endpoints = endpoints;
        cfg.clusters.insert(key.clone(), Arc::new(c));
        redone.push(key.clone());
    }
    Ok((cfg, redone))
}

/// The port a workload serves a service port on: its own override by port name, else the
/// service's `targetPort`, else the service port.
fn workload_port(w: &WorkloadSpec, sp: &crate::resource::ServicePort) -> u16 {
    sp.name
        .as_ref()
        .and_then(|n| w.ports.get(n))
        .copied()
        .unwrap_or(sp.target_port.unwrap_or(sp.port))
}

fn policies(ix: &Index<'_>) -> Result<BTreeMap<NamespacedName, BackendPolicy>> {
    let mut out = BTreeMap::new();
    for (res, p) in &ix.policies {
        let field = |f: &str| format!("BackendTrafficPolicy {}: {f}", res.id());
        let bad = |f: &str, m: &str| Err(ConfigError::invalid(ix.file, res.line, field(f), m));
        let mut bp = BackendPolicy::default();
        if let Some(lb) = &p.load_balancer {
            bp.lb = lb.kind;
        }
        if let Some(cp) = &p.connection_pool {
            for (v, name) in [
                (cp.max_connections, "maxConnections"),
                (cp.max_pending_requests, "maxPendingRequests"),
                (cp.max_requests, "maxRequests"),
            ] {
                if v == Some(0) {
                    return bad(&format!("spec.connectionPool.{name}"), "must be at least 1");
                }
            }
            bp.max_connections = cp.max_connections.unwrap_or(bp.max_connections);
            bp.max_pending = cp.max_pending_requests.unwrap_or(bp.max_pending);
            bp.max_requests = cp.max_requests.unwrap_or(bp.max_requests);
            bp.connect_timeout = cp.connect_timeout.map_or(bp.connect_timeout, |d| d.0);
            bp.idle_timeout = cp.idle_timeout.map_or(bp.idle_timeout, |d| d.0);
            if bp.connect_timeout.is_zero() {
                return bad("spec.connectionPool.connectTimeout", "must be positive");
            }
        }
        if let Some(od) = &p.outlier_detection {
            bp.consecutive_failures = od.consecutive_failures.unwrap_or(bp.consecutive_failures);
            bp.base_ejection = od.base_ejection_time.map_or(bp.base_ejection, |d| d.0);
            bp.max_ejection = od.max_ejection_time.map_or(bp.max_ejection, |d| d.0);
            bp.max_ejection_percent = od.max_ejection_percent.unwrap_or(bp.max_ejection_percent);
            if bp.max_ejection_percent > 100 {
                return bad(
                    "spec.outlierDetection.maxEjectionPercent",
                    "must be between 0 and 100",
                );
            }
            if bp.max_ejection < bp.base_ejection {
                return bad(
                    "spec.outlierDetection.maxEjectionTime",
                    "must not be shorter than baseEjectionTime",
                );
            }
        }
        if let Some(ac) = &p.adaptive_concurrency {
            let a = &mut bp.adaptive;
            a.enabled = ac.enabled.unwrap_or(a.enabled);
            a.min = ac.min_limit.unwrap_or(a.min);
            a.max = ac.max_limit.unwrap_or(a.max.max(a.min));
            if a.min == 0 {
                return bad("spec.adaptiveConcurrency.minLimit", "must be at least 1");
            }
            if a.max < a.min {
                return bad(
                    "spec.adaptiveConcurrency.maxLimit",
                    "must not be below minLimit",
                );
            }
        }
        if let Some(sp) = &p.spillover {
            let high = sp.high_load.unwrap_or(80);
            let low = sp.low_load.unwrap_or(50);
            let hold = sp.hold.map_or(Duration::from_secs(3), |d| d.0);
            if sp.pools.is_empty() || sp.pools.len() > crate::proxy::MAX_POOLS {
                return bad(
                    "spec.spillover.pools",
                    &format!("from 1 to {} pools", crate::proxy::MAX_POOLS),
                );
            }
            for (i, pool) in sp.pools.iter().enumerate() {
                if *pool == crate::resource::PoolSpec::default() {
                    return bad(
                        &format!("spec.spillover.pools[{i}]"),
                        "needs an environment, a region or a zone",
                    );
                }
            }
            if !(1..=100).contains(&high) {
                return bad("spec.spillover.highLoad", "a percentage from 1 to 100");
            }
            if low >= high {
                return bad("spec.spillover.lowLoad", "must be below highLoad");
            }
            if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&hold) {
                return bad("spec.spillover.hold", "from 1s to 5m");
            }
            bp.spillover = Some(crate::proxy::Spillover {
                pools: sp.pools.clone(),
                high,
                low,
                hold,
            });
        }
        if let Some(rb) = &p.retry_budget {
            bp.retry_budget_percent = rb.percent.unwrap_or(bp.retry_budget_percent);
            bp.retry_min_per_second = rb.min_retries_per_second.unwrap_or(bp.retry_min_per_second);
        }
        if let Some(l) = &p.locality {
            use crate::resource::LocalityMode;
            bp.locality.mode = l.mode.unwrap_or_default();
            bp.locality.overprovisioning = l.overprovisioning_factor.unwrap_or(140);
            if !(100..=1000).contains(&bp.locality.overprovisioning) {
                return bad(
                    "spec.locality.overprovisioningFactor",
                    "a percentage from 100 to 1000",
                );
            }
            for (i, w) in l.weights.iter().enumerate() {
                if w.weight == 0 || (w.region.is_none() && w.zone.is_none()) {
                    return bad(
                        &format!("spec.locality.weights[{i}]"),
                        "needs a region or a zone, and a weight of at least 1",
                    );
                }
            }
            match (bp.locality.mode, l.weights.is_empty()) {
                (LocalityMode::Weighted, true) => {
                    return bad("spec.locality.weights", "Weighted needs weights")
                }
                (LocalityMode::Failover | LocalityMode::Disabled, false) => {
                    return bad(
                        "spec.locality.weights",
                        "weights apply only to mode Weighted",
                    )
                }
                _ => {}
            }
            bp.locality.weights = l.weights.clone();
        }
        if p.target_refs.is_empty() {
            return bad("spec.targetRefs", "needs at least one target");
        }
        for (i, t) in p.target_refs.iter().enumerate() {
            let line = t.name.referenced.line();
            let f = field(&format!("spec.targetRefs[{i}].name"));
            let id = NamespacedName {
                namespace: res.metadata.namespace.clone(),
                name: t.name.value.clone(),
            };
            if t.kind != "Service" || !ix.services.contains_key(&id) {
                let msg = format!("Service {id} not found");
                return Err(ConfigError::invalid(ix.file, line, f, msg));
            }
            if out.insert(id.clone(), bp.clone()).is_some() {
                let msg = format!("Service {id} already has a BackendTrafficPolicy");
                return Err(ConfigError::invalid(ix.file, line, f, msg));
            }
        }
    }
    Ok(out)
}

fn default_route(id: &NamespacedName, port: u16) -> RouteConfig {
    RouteConfig {
        name: "default".into(),
        matches: Vec::new(),
        backends: vec![WeightedCluster {
            cluster: cluster_key(id, port),
            weight: 1,
            unresolved: None,
        }],
        request_headers: HeaderEdits::default(),
        response_headers: HeaderEdits::default(),
        timeout: None,
        idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
        retry: None,
        faults: Vec::new(),
        mirrors: Vec::new(),
    }
}

fn attach_routes(
    ix: &Index<'_>,
    services: &mut BTreeMap<NamespacedName, ServiceConfig>,
) -> Result<()> {
    // (service, port) -> (precedence key, route)
    let mut attached: BTreeMap<(NamespacedName, u16), Vec<(PrecedenceKey, RouteConfig)>> =
        BTreeMap::new();
    for (order, (res, route)) in ix.routes.iter().enumerate() {
        let field = |f: &str| format!("{} {}: {f}", res.kind(), res.id());
        if route.parent_refs.is_empty() {
            return Err(ConfigError::invalid(
                ix.file,
                res.line,
                field("spec.parentRefs"),
                "a mesh route needs a Service parent",
            ));
        }
        for (pi, parent) in route.parent_refs.iter().enumerate() {
            let line = parent.name.referenced.line();
            let pid = ref_id(
                &parent.namespace,
                &parent.name.value,
                &res.metadata.namespace,
            );
            let f = field(&format!("spec.parentRefs[{pi}].name"));
            let Some(svc) = services.get(&pid).filter(|_| parent.kind == "Service") else {
                return Err(ConfigError::invalid(
                    ix.file,
                    line,
                    f,
                    format!("Service {pid} not found"),
                ));
            };
            let ports: Vec<u16> = match parent.port {
                Some(p) if svc.ports.iter().any(|sp| sp.port == p) => vec![p],
                Some(p) => {
                    let msg = format!("Service {pid} has no port {p}");
                    return Err(ConfigError::invalid(
                        ix.file,
                        line,
                        field(&format!("spec.parentRefs[{pi}].port")),
                        msg,
                    ));
                }
                None => svc.ports.iter().map(|p| p.port).collect(),
            };
            for port in ports {
                for (ri, rule) in route.rules.iter().enumerate() {
                    let rname = rule_name(&res.id(), rule.name.as_deref(), ri, route.rules.len());
                    let base = rule_config(ix, res, ri, rule, &pid, port, rname)?;
                    let matches: Vec<RouteMatch> = if rule.matches.is_empty() {
                        vec![RouteMatch::default()]
                    } else {
                        rule.matches.clone()
                    };
                    for (mi, m) in matches.iter().enumerate() {
                        let mc = match_config(ix, res, ri, mi, m)?;
                        let key = PrecedenceKey::new(&mc, order, ri);
                        let mut r = base.clone();
                        r.matches = vec![mc];
                        attached
                            .entry((pid.clone(), port))
                            .or_default()
                            .push((key, r));
                    }
                }
            }
        }
    }
    for ((sid, port), mut routes) in attached {
        routes.sort_by(|a, b| a.0.cmp(&b.0));
        let svc = services.get_mut(&sid).expect("checked");
        let pc = svc
            .ports
            .iter_mut()
            .find(|p| p.port == port)
            .expect("checked");
        pc.routes = routes.into_iter().map(|(_, r)| r).collect();
    }
    Ok(())
}

/// Gateway API precedence: exact path, then longest prefix, then regex; then method; then more
/// header matches; then more query matches; then declaration order.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct PrecedenceKey(
    u8,
    std::cmp::Reverse<usize>,
    u8,
    std::cmp::Reverse<usize>,
    std::cmp::Reverse<usize>,
    usize,
    usize,
);

impl PrecedenceKey {
    fn new(m: &MatchConfig, order: usize, rule: usize) -> Self {
        let (rank, len) = match &m.path {
            Some(PathMatchConfig::Exact(p)) => (0, p.len()),
            Some(PathMatchConfig::Prefix(p)) => (1, p.len() + 1),
            Some(PathMatchConfig::Regex(_)) => (2, 0),
            None => (1, 0),
        };
        Self(
            rank,
            std::cmp::Reverse(len),
            u8::from(m.method.is_none()),
            std::cmp::Reverse(m.headers.len()),
            std::cmp::Reverse(m.query.len()),
            order,
            rule,
        )
    }
}

fn match_config(
    ix: &Index<'_>,
    res: &Resource,
    ri: usize,
    mi: usize,
    m: &RouteMatch,
) -> Result<MatchConfig> {
    let field = |f: &str| {
        format!(
            "{} {}: spec.rules[{ri}].matches[{mi}].{f}",
            res.kind(),
            res.id()
        )
    };
    let path = match &m.path {
        None => None,
        Some(PathMatch::Exact(p)) | Some(PathMatch::PathPrefix(p)) if !p.starts_with('/') => {
            return Err(ConfigError::invalid(
                ix.file,
                res.line,
                field("path.value"),
                "a path must start with '/'",
            ));
        }
        Some(PathMatch::Exact(p)) => Some(PathMatchConfig::Exact(p.clone())),
        Some(PathMatch::PathPrefix(p)) => {
            Some(PathMatchConfig::Prefix(p.trim_end_matches('/').to_string()))
        }
        Some(PathMatch::RegularExpression(r)) => Some(PathMatchConfig::Regex(r.clone())),
    };
    let values = |list: &[crate::resource::ValueMatch],
                  what: &str,
                  lower: bool|
     -> Result<Vec<(String, ValueMatcher)>> {
        list.iter()
            .enumerate()
            .map(|(i, v)| {
                let name = if lower {
                    v.name.to_ascii_lowercase()
                } else {
                    v.name.clone()
                };
                let matcher = match v.kind {
                    ValueMatchKind::Exact => ValueMatcher::Exact(v.value.clone()),
                    ValueMatchKind::RegularExpression => {
                        let re = regex::Regex::new(&format!("^(?:{})$", v.value)).map_err(|e| {
                            ConfigError::invalid(
                                ix.file,
                                res.line,
                                field(&format!("{what}[{i}].value")),
                                format!("invalid regular expression: {e}"),
                            )
                        })?;
                        ValueMatcher::Regex(RegexValue(re))
                    }
                };
                Ok((name, matcher))
            })
            .collect()
    };
    let method = match &m.method {
        Some(meth) if meth.is_empty() || !meth.bytes().all(|b| b.is_ascii_uppercase()) => {
            return Err(ConfigError::invalid(
                ix.file,
                res.line,
                field("method"),
                format!("invalid method {meth:?} (use upper case, e.g. GET)"),
            ));
        }
        other => other.clone(),
    };
    Ok(MatchConfig {
        path,
        method,
        headers: values(&m.headers, "headers", true)?,
        query: values(&m.query_params, "queryParams", false)?,
    })
}

/// What a reference names: `name` in `namespace`, the referring resource's by default.
fn ref_id(namespace: &Option<String>, name: &str, default: &str) -> NamespacedName {
    NamespacedName {
        namespace: namespace.clone().unwrap_or_else(|| default.to_string()),
        name: name.to_string(),
    }
}

fn rule_config(
    ix: &Index<'_>,
    res: &Resource,
    ri: usize,
    rule: &RouteRule,
    parent: &NamespacedName,
    port: u16,
    name: String,
) -> Result<RouteConfig> {
    let field = |f: &str| format!("{} {}: spec.rules[{ri}].{f}", res.kind(), res.id());
    let mut backends = Vec::new();
    for (bi, b) in rule.backend_refs.iter().enumerate() {
        let line = b.name.referenced.line();
        let id = ref_id(&b.namespace, &b.name.value, &res.metadata.namespace);
        if let Some(why) = &b.unresolved {
            backends.push(WeightedCluster {
                cluster: cluster_key(&id, b.port),
                weight: b.weight,
                unresolved: Some(why.as_str().into()),
            });
            continue;
        }
        let f = field(&format!("backendRefs[{bi}].name"));
        let Some((_, svc)) = ix.services.get(&id).filter(|_| b.kind == "Service") else {
            return Err(ConfigError::invalid(
                ix.file,
                line,
                f,
                format!("Service {id} not found"),
            ));
        };
        if !svc.ports.iter().any(|p| p.port == b.port) {
            let f = field(&format!("backendRefs[{bi}].port"));
            return Err(ConfigError::invalid(
                ix.file,
                line,
                f,
                format!("Service {id} has no port {}", b.port),
            ));
        }
        backends.push(WeightedCluster {
            cluster: cluster_key(&id, b.port),
            weight: b.weight,
            unresolved: None,
        });
    }
    if backends.is_empty() {
        backends.push(WeightedCluster {
            cluster: cluster_key(parent, port),
            weight: 1,
            unresolved: None,
        });
    }
    if backends.iter().all(|b| b.weight == 0) {
        return Err(ConfigError::invalid(
            ix.file,
            res.line,
            field("backendRefs"),
            "at least one backend needs a weight above 0",
        ));
    }
    let mut request_headers = HeaderEdits::default();
    let mut response_headers = HeaderEdits::default();
    let mut faults = Vec::new();
    let mut mirrors = Vec::new();
    for (fi, f) in rule.filters.iter().enumerate() {
        let (edits, m) = match f {
            crate::resource::RouteFilter::RequestHeaderModifier { modifier } => {
                (&mut request_headers, modifier)
            }
            crate::resource::RouteFilter::ResponseHeaderModifier { modifier } => {
                (&mut response_headers, modifier)
            }
            crate::resource::RouteFilter::RequestMirror { mirror } => {
                let f = |x: &str| field(&format!("filters[{fi}].requestMirror{x}"));
                let bad = |x: &str, m: String| ConfigError::invalid(ix.file, res.line, f(x), m);
                let b = &mirror.backend_ref;
                let id = ref_id(&b.namespace, &b.name.value, &res.metadata.namespace);
                let Some((_, svc)) = ix.services.get(&id).filter(|_| b.kind == "Service") else {
                    return Err(bad(".backendRef.name", format!("Service {id} not found")));
                };
                if !svc.ports.iter().any(|p| p.port == b.port) {
                    return Err(bad(
                        ".backendRef.port",
                        format!("Service {id} has no port {}", b.port),
                    ));
                }
                let per_million = match (mirror.percent, &mirror.fraction) {
                    (Some(_), Some(_)) => {
                        return Err(bad("", "give percent or fraction, not both".into()))
                    }
                    (Some(p), None) if p <= 100 => p * 10_000,
                    (Some(_), None) => return Err(bad(".percent", "from 0 to 100".into())),
                    (None, Some(fr)) if fr.denominator > 0 && fr.numerator <= fr.denominator => {
                        (u64::from(fr.numerator) * 1_000_000 / u64::from(fr.denominator)) as u32
                    }
                    (None, Some(_)) => {
                        return Err(bad(
                            ".fraction",
                            "a numerator from 0 to its denominator, which is above 0".into(),
                        ))
                    }
                    (None, None) => 1_000_000,
                };
                if mirrors.len() >= 4 {
                    return Err(bad("", "at most 4 mirrors a rule".into()));
                }
                mirrors.push(crate::proxy::MirrorConfig {
                    cluster: cluster_key(&id, b.port),
                    per_million,
                });
                continue;
            }
            crate::resource::RouteFilter::Fault { fault } => {
                let at = |i: usize, f: &str| field(&format!("filters[{fi}].fault[{i}]{f}"));
                let bad = |i: usize, f: &str, m: &str| {
                    ConfigError::invalid(ix.file, res.line, at(i, f), m)
                };
                if fault.is_empty() || fault.len() > 8 {
                    return Err(ConfigError::invalid(
                        ix.file,
                        res.line,
                        field(&format!("filters[{fi}].fault")),
                        "from 1 to 8 faults",
                    ));
                }
                for (i, x) in fault.iter().enumerate() {
                    let per_million = |p: f64, f: &str| {
                        if (0.0..=100.0).contains(&p) {
                            Ok((p * 10_000.0).round() as u32)
                        } else {
                            Err(bad(i, f, "from 0 to 100"))
                        }
                    };
                    faults.push(match (&x.delay, &x.abort) {
                        (Some(d), None) => {
                            if d.duration.0 > Duration::from_secs(3600) {
                                return Err(bad(i, ".delay.duration", "at most 1h"));
                            }
                            crate::proxy::FaultConfig::Delay {
                                per_million: per_million(d.percent, ".delay.percent")?,
                                duration: d.duration.0,
                            }
                        }
                        (None, Some(a)) => {
                            let status = a.http_status.unwrap_or(503);
                            if !(200..=599).contains(&status) {
                                return Err(bad(i, ".abort.httpStatus", "from 200 to 599"));
                            }
                            let grpc_status = a.grpc_status.unwrap_or(14);
                            if !(1..=16).contains(&grpc_status) {
                                return Err(bad(i, ".abort.grpcStatus", "from 1 to 16"));
                            }
                            crate::proxy::FaultConfig::Abort {
                                per_million: per_million(a.percent, ".abort.percent")?,
                                status,
                                grpc_status,
                            }
                        }
                        _ => return Err(bad(i, "", "give either delay or abort")),
                    });
                }
                continue;
            }
        };
        edits
            .set
            .extend(m.set.iter().map(|h| (h.name.0.clone(), h.value.clone())));
        edits
            .add
            .extend(m.add.iter().map(|h| (h.name.0.clone(), h.value.clone())));
        edits.remove.extend(m.remove.iter().map(|h| h.0.clone()));
    }
    for (n, v) in request_headers
        .set
        .iter()
        .chain(&request_headers.add)
        .chain(&response_headers.set)
        .chain(&response_headers.add)
    {
        if v.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
            return Err(ConfigError::invalid(
                ix.file,
                res.line,
                field("filters"),
                format!("header {n} has an invalid value"),
            ));
        }
    }
    let timeouts = rule.timeouts.clone().unwrap_or_default();
    // `request` bounds the whole exchange, the response body included; "0s" turns it off
    // (Gateway API). Without one, a try that hears nothing for the idle timeout fails, so
    // that a dead peer never holds a request for good.
    let (timeout, idle_timeout) = match timeouts.request.map(|d| d.0) {
        Some(d) if d.is_zero() => (None, None),
        Some(d) => (Some(d), None),
        None => (None, Some(DEFAULT_IDLE_TIMEOUT)),
    };
    let retry = match &rule.retry {
        None => None,
        Some(r) => {
            for c in &r.codes {
                if !(400..=599).contains(c) {
                    return Err(ConfigError::invalid(
                        ix.file,
                        res.line,
                        field("retry.codes"),
                        format!("{c} is not a 4xx or 5xx status"),
                    ));
                }
            }
            let grpc_codes = r
                .grpc_codes
                .iter()
                .map(|n| {
                    grpc_code(n).ok_or_else(|| {
                        ConfigError::invalid(
                            ix.file,
                            res.line,
                            field("retry.grpcCodes"),
                            format!("unknown gRPC status {n:?}"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Some(RetryConfig {
                attempts: r.attempts.unwrap_or(1),
                codes: r.codes.clone(),
                grpc_codes,
                backoff: r.backoff.map_or(Duration::from_millis(25), |d| d.0),
                per_try_timeout: r
                    .per_try_timeout
                    .or(timeouts.backend_request)
                    .map(|d| d.0)
                    .filter(|d| !d.is_zero()),
            })
        }
    };
    Ok(RouteConfig {
        name: name.into(),
        matches: Vec::new(),
        backends,
        request_headers,
        response_headers,
        timeout,
        idle_timeout,
        retry,
        faults,
        mirrors,
    })
}

/// Numeric gRPC status for a canonical name.
pub(crate) fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| i as u32)
}

fn local_workload(ix: &Index<'_>, local: &NamespacedName, cfg: &mut ProxyConfig) -> Result<()> {
    let Some((res, w)) = ix.workloads.get(local) else {
        return Err(ConfigError::invalid(
            ix.file,
            0,
            "--workload",
            format!("Workload {local} is not defined in the config"),
        ));
    };
    // The application usually listens on loopback next to its proxy; a workload whose address
    // is itself a loopback address (tests, explicit mode on one host) is reached there.
    let app_ip = if w.address.is_loopback() {
        w.address
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    };
    let mut inbound_ports = Vec::new();
    let mut service = None;
    for (sid, (_, svc)) in &ix.services {
        if sid.namespace != local.namespace || !selects(&svc.selector, &res.metadata.labels) {
            continue;
        }
        service.get_or_insert_with(|| sid.clone());
        for p in &svc.ports {
            let cluster = cfg.clusters.get(&cluster_key(sid, p.port));
            let mtls = cluster.map_or_else(MtlsMode::default, |c| c.mtls);
            inbound_ports.push(InboundPort {
                port: p.port,
                target: SocketAddr::new(app_ip, workload_port(w, p)),
                protocol: p.protocol,
                service: sid.clone(),
                mtls,
                adaptive: cluster.map(|c| c.policy.adaptive).unwrap_or_default(),
                rate_limits: rate_limits_for(ix, sid)?,
            });
        }
    }
    for (i, u) in w.upstreams.iter().enumerate() {
        let line = u.service.referenced.line();
        let f = format!("Workload {local}: spec.upstreams[{i}].service");
        let id = parse_authority_name(&u.service.value, &local.namespace);
        let Some(sc) = cfg.services.get(&id) else {
            return Err(ConfigError::invalid(
                ix.file,
                line,
                f,
                format!("Service {id} not found"),
            ));
        };
        let Some(pc) = sc.ports.iter().find(|p| p.port == u.port) else {
            return Err(ConfigError::invalid(
                ix.file,
                line,
                format!("Workload {local}: spec.upstreams[{i}].port"),
                format!("Service {id} has no port {}", u.port),
            ));
        };
        if cfg
            .tcp_binds
            .iter()
            .any(|b| b.bind == u.bind && u.bind.port() != 0)
        {
            return Err(ConfigError::invalid(
                ix.file,
                line,
                format!("Workload {local}: spec.upstreams[{i}].bind"),
                format!("{} is bound twice", u.bind),
            ));
        }
        cfg.tcp_binds.push(BindConfig {
            bind: u.bind,
            cluster: cluster_key(&id, u.port),
            service: id,
            port: u.port,
            protocol: pc.protocol,
        });
    }
    cfg.local = Some(LocalWorkload {
        id: local.clone(),
        service,
        environment: w.environment,
        inbound_ports,
        locality: w.locality.clone(),
    });
    Ok(())
}

/// The name a route's rule is compiled (and its traffic reported) under: `NS/ROUTE.RULE`
/// for a named rule, `NS/ROUTE` for a route's only rule, `NS/ROUTE.INDEX` otherwise
/// (`index` of `count` rules).
pub fn rule_name(route: &NamespacedName, name: Option<&str>, index: usize, count: usize) -> String {
    match name {
        Some(n) => format!("{route}.{n}"),
        None if count == 1 => route.to_string(),
        None => format!("{route}.{index}"),
    }
}

/// `name.namespace` (optionally with a `.mesh` suffix) or a bare `name` in `default_ns`.
pub fn parse_authority_name(host: &str, default_ns: &str) -> NamespacedName {
    let host = host.strip_suffix(".mesh").unwrap_or(host);
    match host.split_once('.') {
        Some((name, ns)) => NamespacedName {
            namespace: ns.to_string(),
            name: name.to_string(),
        },
        None => NamespacedName {
            namespace: default_ns.to_string(),
            name: host.to_string(),
        },
    }
}

/// Compile every AuthorizationPolicy, refusing bad identities, methods and paths by line.
fn authz_policies(ix: &Index<'_>) -> Result<Vec<AuthzPolicy>> {
    let mut out = Vec::new();
    for (res, p) in &ix.authz {
        let field = |f: &str| format!("AuthorizationPolicy {}: {f}", res.id());
        let bad =
            |line: u64, f: &str, m: String| Err(ConfigError::invalid(ix.file, line, field(f), m));
        let ns = &res.metadata.namespace;
        let scope = if p.target_refs.is_empty() {
            if ns == MESH_NAMESPACE {
                AuthzScope::Mesh
            } else {
                AuthzScope::Namespace(ns.clone())
            }
        } else {
            let mut v = Vec::new();
            for (i, t) in p.target_refs.iter().enumerate() {
                let id = NamespacedName {
                    namespace: ns.clone(),
                    name: t.name.value.clone(),
                };
                if t.kind != "Service" || !ix.services.contains_key(&id) {
                    let f = format!("spec.targetRefs[{i}].name");
                    return bad(
                        t.name.referenced.line(),
                        &f,
                        format!("Service {id} not found"),
                    );
                }
                v.push(id);
            }
            AuthzScope::Services(v)
        };
        let rules = authz_rules(ix.file, res, p)?;
        out.push(AuthzPolicy {
            name: res.id(),
            action: p.action,
            scope,
            rules,
        });
    }
    Ok(out)
}

/// `NAMESPACE/IDENTITY`, `NAMESPACE/*` or a full SPIFFE ID.
fn identity_match(s: &str) -> Option<IdentityMatch> {
    let seg = |x: &str| {
        !x.is_empty()
            && x.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    if let Some(rest) = s.strip_prefix("spiffe://") {
        let (td, path) = rest.split_once('/')?;
        let parts: Vec<&str> = path.split('/').collect();
        return match parts.as_slice() {
            ["ns", ns, "sa", name] if seg(td) && seg(ns) && seg(name) => Some(IdentityMatch {
                trust_domain: Some(td.to_string()),
                namespace: ns.to_string(),
                name: Some(name.to_string()),
            }),
            _ => None,
        };
    }
    let (ns, name) = s.split_once('/')?;
    if !seg(ns) {
        return None;
    }
    match name {
        "*" => Some(IdentityMatch {
            trust_domain: None,
            namespace: ns.into(),
            name: None,
        }),
        n if seg(n) => Some(IdentityMatch {
            trust_domain: None,
            namespace: ns.into(),
            name: Some(n.into()),
        }),
        _ => None,
    }
}

/// The rules of an AuthorizationPolicy, checked on their own (they need no other resource,
/// so an apply checks them even while the policy's targets are missing).
fn authz_rules(
    file: &str,
    res: &Resource,
    p: &crate::resource::AuthorizationPolicySpec,
) -> Result<Vec<AuthzRuleConfig>> {
    use crate::resource::AuthzPath;
    let field = |f: &str| format!("AuthorizationPolicy {}: {f}", res.id());
    let bad = |line: u64, f: &str, m: String| Err(ConfigError::invalid(file, line, field(f), m));
    let mut rules = Vec::new();
    for (ri, r) in p.rules.iter().enumerate() {
        let mut from = Vec::new();
        for (fi, f) in r.from.iter().enumerate() {
            let mut identities = Vec::new();
            for (ii, i) in f.identities.iter().enumerate() {
                let fname = format!("spec.rules[{ri}].from[{fi}].identities[{ii}]");
                match identity_match(&i.value) {
                        Some(m) => identities.push(m),
                        None => {
                            return bad(
                                i.referenced.line(),
                                &fname,
                                format!("{:?} is not NAMESPACE/IDENTITY, NAMESPACE/* or spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/IDENTITY", i.value),
                            )
                        }
                    }
            }
            from.push(AuthzSourceConfig {
                identities,
                namespaces: f.namespaces.clone(),
            });
        }
        let mut to = Vec::new();
        for (ti, t) in r.to.iter().enumerate() {
            let at = |f: &str| format!("spec.rules[{ri}].to[{ti}].{f}");
            if t.ports.contains(&0) {
                return bad(res.line, &at("ports"), "ports are 1 to 65535".into());
            }
            for m in &t.methods {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                    return bad(
                        res.line,
                        &at("methods"),
                        format!("{m:?} is not an HTTP method (GET, POST, ...)"),
                    );
                }
            }
            let mut paths = Vec::new();
            for (pi, AuthzPath { exact, prefix }) in t.paths.iter().enumerate() {
                let f = at(&format!("paths[{pi}]"));
                let m = match (exact, prefix) {
                    (Some(e), None) => PathMatchConfig::Exact(e.clone()),
                    (None, Some(p)) => {
                        let trimmed = p.trim_end_matches('/');
                        PathMatchConfig::Prefix(if trimmed.is_empty() {
                            "/".into()
                        } else {
                            trimmed.into()
                        })
                    }
                    _ => return bad(res.line, &f, "exactly one of exact and prefix".into()),
                };
                let (PathMatchConfig::Exact(v) | PathMatchConfig::Prefix(v)) = &m else {
                    unreachable!("built above")
                };
                if !v.starts_with('/') {
                    return bad(res.line, &f, format!("{v:?} does not start with /"));
                }
                paths.push(m);
            }
            to.push(AuthzDestinationConfig {
                ports: t.ports.clone(),
                methods: t.methods.clone(),
                paths,
            });
        }
        rules.push(AuthzRuleConfig { from, to });
    }
    Ok(rules)
}

/// A workload with an identity runs a proxy, which peers reach at its inbound port.
fn mesh_peer(namespace: &str, w: &WorkloadSpec) -> Option<MeshPeer> {
    let identity = w.identity.as_ref()?;
    Some(MeshPeer {
        inbound: SocketAddr::new(w.address, w.inbound_port.unwrap_or(DEFAULT_INBOUND_PORT)),
        identity: NamespacedName {
            namespace: namespace.to_string(),
            name: identity.clone(),
        },
    })
}

/// The mutual TLS mode of every Service, from the PeerAuthentications: by Service, else by
/// namespace, else for the mesh, else STRICT; at one level STRICT wins.
struct MtlsModes {
    services: HashMap<NamespacedName, MtlsMode>,
    namespaces: HashMap<String, MtlsMode>,
    mesh: Option<MtlsMode>,
}

impl MtlsModes {
    fn new(ix: &Index<'_>) -> Result<Self> {
        let mut m = Self {
            services: HashMap::new(),
            namespaces: HashMap::new(),
            mesh: None,
        };
        // STRICT sorts first, so the lesser of two modes is the stricter.
        let merge = |slot: &mut Option<MtlsMode>, mode: MtlsMode| {
            *slot = Some(slot.map_or(mode, |old: MtlsMode| old.min(mode)));
        };
        for (res, p) in &ix.peer_auth {
            let ns = &res.metadata.namespace;
            let mode = p.mtls.mode;
            if p.target_refs.is_empty() {
                if ns == MESH_NAMESPACE {
                    merge(&mut m.mesh, mode);
                } else {
                    let mut slot = m.namespaces.get(ns).copied();
                    merge(&mut slot, mode);
                    m.namespaces.insert(ns.clone(), slot.expect("set"));
                }
                continue;
            }
            for (i, t) in p.target_refs.iter().enumerate() {
                let id = NamespacedName {
                    namespace: ns.clone(),
                    name: t.name.value.clone(),
                };
                if t.kind != "Service" || !ix.services.contains_key(&id) {
                    return Err(ConfigError::invalid(
                        ix.file,
                        t.name.referenced.line(),
                        format!("PeerAuthentication {}: spec.targetRefs[{i}].name", res.id()),
                        format!("Service {id} not found"),
                    ));
                }
                let mut slot = m.services.get(&id).copied();
                merge(&mut slot, mode);
                m.services.insert(id, slot.expect("set"));
            }
        }
        Ok(m)
    }

    fn of(&self, svc: &NamespacedName) -> MtlsMode {
        self.services
            .get(svc)
            .or_else(|| self.namespaces.get(&svc.namespace))
            .copied()
            .or(self.mesh)
            .unwrap_or_default()
    }
}

/// A TrustBundle lives in `trellis-system` and holds PEM certificates (their contents are
/// checked by the proxies, which refuse a bundle that would not trust their own certificate).
fn check_bundle(file: &str, r: &Resource, b: &crate::resource::TrustBundleSpec) -> Result<()> {
    let bad = |f: String, m: &str| {
        Err(ConfigError::invalid(
            file,
            r.line,
            format!("TrustBundle {}: {f}", r.id()),
            m,
        ))
    };
    if r.metadata.namespace != MESH_NAMESPACE {
        return bad(
            "metadata.namespace".into(),
            "a TrustBundle belongs in the trellis-system namespace",
        );
    }
    if b.roots.is_empty() {
        return bad(
            "spec.roots".into(),
            "at least one root certificate is needed",
        );
    }
    for (i, root) in b.roots.iter().enumerate() {
        let t = root.trim();
        if !t.starts_with("-----BEGIN CERTIFICATE-----")
            || !t.ends_with("-----END CERTIFICATE-----")
            || t.matches("-----BEGIN").count() != 1
        {
            return bad(
                format!("spec.roots[{i}]"),
                "one PEM certificate (-----BEGIN CERTIFICATE----- … -----END CERTIFICATE-----)",
            );
        }
    }
    Ok(())
}

/// The rate limits on the requests of `sid`'s workloads (see `InboundPort::rate_limits`):
/// the policies (by name) that target a route with `sid` as a parent or a backend, each with
/// the route's matches (none when a rule of it matches everything), then the first that
/// targets `sid` itself.
fn rate_limits_for(ix: &Index<'_>, sid: &NamespacedName) -> Result<Vec<RateLimit>> {
    let mut policies: Vec<_> = ix
        .rate_limits
        .iter()
        .filter(|(r, _, _)| r.metadata.namespace == sid.namespace)
        .collect();
    policies.sort_by(|a, b| a.0.metadata.name.cmp(&b.0.metadata.name));
    let mut out = Vec::new();
    for (_, p, limits) in &policies {
        for t in p.target_refs.iter().filter(|t| t.kind != "Service") {
            let Some((rr, route)) = ix.routes.iter().find(|(rr, _)| {
                rr.kind() == t.kind
                    && rr.metadata.namespace == sid.namespace
                    && rr.metadata.name == t.name.value
            }) else {
                continue;
            };
            let named = |name: &str, ns: &Option<String>| {
                name == sid.name && ns.as_ref().is_none_or(|n| *n == sid.namespace)
            };
            let concerns = route
                .parent_refs
                .iter()
                .any(|p| named(&p.name.value, &p.namespace))
                || route.rules.iter().any(|rule| {
                    rule.backend_refs
                        .iter()
                        .any(|b| named(&b.name.value, &b.namespace))
                });
            if !concerns {
                continue;
            }
            let mut matches = Vec::new();
            let mut all = false;
            for (ri, rule) in route.rules.iter().enumerate() {
                all |= rule.matches.is_empty();
                for (mi, m) in rule.matches.iter().enumerate() {
                    matches.push(match_config(ix, rr, ri, mi, m)?);
                }
            }
            if all {
                matches.clear();
            }
            out.push(RateLimit {
                route: Some(rr.id().to_string()),
                matches,
                ..limits.clone()
            });
        }
    }
    let whole = policies.iter().find(|(_, p, _)| {
        p.target_refs
            .iter()
            .any(|t| t.kind == "Service" && t.name.value == sid.name)
    });
    out.extend(whole.map(|(_, _, limits)| limits.clone()));
    Ok(out)
}

/// A RateLimitPolicy's limits, checked and filled in (they need no other resource).
fn rate_limit(
    file: &str,
    r: &Resource,
    p: &crate::resource::RateLimitPolicySpec,
) -> Result<RateLimit> {
    let field = |f: &str| format!("RateLimitPolicy {}: {f}", r.id());
    let bad = |f: String, m: &str| ConfigError::invalid(file, r.line, field(&f), m);
    let rates = |at: &str, list: &[crate::resource::RateSpec]| -> Result<Vec<crate::proxy::Rate>> {
        let mut out: Vec<crate::proxy::Rate> = Vec::new();
        for (i, x) in list.iter().enumerate() {
            let f = format!("{at}[{i}]");
            if x.requests == 0 {
                return Err(bad(format!("{f}.requests"), "must be at least 1"));
            }
            if x.per.0.is_zero() || x.per.0 > Duration::from_secs(3600) {
                return Err(bad(format!("{f}.per"), "from 1ms to 1h"));
            }
            if x.burst == Some(0) {
                return Err(bad(format!("{f}.burst"), "must be at least 1"));
            }
            if out.iter().any(|o| o.per == x.per.0) {
                return Err(bad(format!("{f}.per"), "another limit has this window"));
            }
            out.push(crate::proxy::Rate {
                requests: x.requests,
                per: x.per.0,
                burst: x.burst.unwrap_or(x.requests),
            });
        }
        Ok(out)
    };
    let total = rates("spec.total", &p.total)?;
    let per_caller = rates("spec.perCaller", &p.per_caller)?;
    let mut overrides = BTreeMap::new();
    for (i, o) in p.overrides.iter().enumerate() {
        let f = format!("spec.overrides[{i}]");
        let ok = o
            .identity
            .split_once('/')
            .is_some_and(|(ns, id)| !ns.is_empty() && !id.is_empty() && !id.contains('/'));
        if !ok {
            return Err(bad(
                format!("{f}.identity"),
                "namespace/identity, as in AuthorizationPolicy",
            ));
        }
        if overrides
            .insert(
                o.identity.clone(),
                rates(&format!("{f}.perCaller"), &o.per_caller)?,
            )
            .is_some()
        {
            return Err(bad(format!("{f}.identity"), "named twice"));
        }
    }
    if total.is_empty() && per_caller.is_empty() && overrides.is_empty() {
        return Err(bad(
            "spec".into(),
            "give total, perCaller or overrides limits",
        ));
    }
    Ok(RateLimit {
        policy: r.id().to_string(),
        route: None,
        matches: Vec::new(),
        shadow: p.mode == crate::resource::RateLimitMode::Shadow,
        total,
        per_caller,
        overrides,
    })
}

/// A Rollout's own fields.
fn rollout(file: &str, r: &Resource, p: &crate::resource::RolloutSpec) -> Result<()> {
    let bad = |f: &str, m: &str| {
        ConfigError::invalid(file, r.line, format!("Rollout {}: {f}", r.id()), m)
    };
    for (f, v) in [
        ("spec.service", &p.service),
        ("spec.stable", &p.stable),
        ("spec.canary", &p.canary),
    ] {
        if v.is_empty() || v.contains('/') {
            return Err(bad(f, "a Service name of the rollout's namespace"));
        }
    }
    if p.stable == p.canary {
        return Err(bad("spec.canary", "the same Service as spec.stable"));
    }
    if p.steps.is_empty() || p.steps.len() > 20 {
        return Err(bad("spec.steps", "from 1 to 20 steps"));
    }
    for (i, w) in p.steps.iter().enumerate() {
        if *w == 0 || *w > 100 || (i > 0 && *w <= p.steps[i - 1]) {
            return Err(bad(
                &format!("spec.steps[{i}]"),
                "percentages from 1 to 100, each above the one before",
            ));
        }
    }
    if p.interval.0 < Duration::from_secs(1) || p.interval.0 > Duration::from_secs(86_400) {
        return Err(bad("spec.interval", "from 1s to 24h"));
    }
    if p.mirror
        .as_ref()
        .is_some_and(|m| !(1..=100).contains(&m.percent))
    {
        return Err(bad("spec.mirror.percent", "from 1 to 100"));
    }
    let a = &p.analysis;
    if !(0.0..=100.0).contains(&a.max_error_rate_increase) {
        return Err(bad(
            "spec.analysis.maxErrorRateIncrease",
            "percentage points, from 0 to 100",
        ));
    }
    if !(50.0..=99.9).contains(&a.latency_percentile) {
        return Err(bad("spec.analysis.latencyPercentile", "from 50 to 99.9"));
    }
    if !(1.0..=100.0).contains(&a.max_latency_ratio) {
        return Err(bad("spec.analysis.maxLatencyRatio", "from 1 to 100"));
    }
    Ok(())
}

/// Check what can be checked of `r` without the other resources. An apply runs this on every
/// document, so that a policy whose targets do not exist yet is still checked.
pub fn check_standalone(file: &str, r: &Resource) -> Result<()> {
    match &r.spec {
        Spec::AuthorizationPolicy(p) => authz_rules(file, r, p).map(drop),
        Spec::TrustBundle(b) => check_bundle(file, r, b),
        Spec::RateLimitPolicy(p) => rate_limit(file, r, p).map(drop),
        Spec::Rollout(p) => rollout(file, r, p),
        Spec::HttpRoute(h) => no_unresolved(file, r, h.rules.iter().map(|x| &x.backend_refs)),
        Spec::GrpcRoute(g) => no_unresolved(file, r, g.rules.iter().map(|x| &x.backend_refs)),
        _ => Ok(()),
    }
}

/// A backend's `unresolved` is the control plane's to write (see [`crate::refs`]): one in
/// an applied route would answer its share of the requests 500 whatever the Service.
fn no_unresolved<'a>(
    file: &str,
    r: &Resource,
    rules: impl Iterator<Item = &'a Vec<crate::resource::BackendRef>>,
) -> Result<()> {
    for (ri, backends) in rules.enumerate() {
        if let Some(bi) = backends.iter().position(|b| b.unresolved.is_some()) {
            return Err(ConfigError::invalid(
                file,
                backends[bi].name.referenced.line(),
                format!(
                    "{} {}: spec.rules[{ri}].backendRefs[{bi}].unresolved",
                    r.kind(),
                    r.id()
                ),
                "written by the control plane for a backend that does not resolve; leave it out",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
