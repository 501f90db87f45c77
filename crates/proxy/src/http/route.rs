//! Choosing a service port from the request's authority, and a route by its matches.

use http::{uri::Authority, Request};
use trellis_model::{
    parse_authority_name,
    proxy::{
        MatchConfig, PathMatchConfig, PortConfig, RouteConfig, ServiceConfig, ValueMatcher,
        WeightedCluster,
    },
    resource::NamespacedName,
    ProxyConfig,
};

/// The authority a request names: CONNECT target or absolute URI first, then `Host`.
pub fn authority<B>(req: &Request<B>) -> Option<Authority> {
    if let Some(a) = req.uri().authority() {
        return Some(a.clone());
    }
    req.headers()
        .get(http::header::HOST)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The service port that `authority` names, if any. A missing port means port 80, or the
/// service's only port.
pub fn service_port<'a>(
    cfg: &'a ProxyConfig,
    authority: &Authority,
    default_ns: &str,
) -> Option<(NamespacedName, &'a ServiceConfig, &'a PortConfig)> {
    let id = parse_authority_name(authority.host(), default_ns);
    let svc = cfg.services.get(&id)?;
    let port = match authority.port_u16() {
        Some(p) => svc.ports.iter().find(|sp| sp.port == p)?,
        None => svc
            .ports
            .iter()
            .find(|sp| sp.port == 80)
            .or_else(|| (svc.ports.len() == 1).then(|| &svc.ports[0]))?,
    };
    Some((id, svc, port))
}

/// The first route (in precedence order) that matches.
pub fn find<'a, B>(port: &'a PortConfig, req: &Request<B>) -> Option<&'a RouteConfig> {
    port.routes
        .iter()
        .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| matches(m, req)))
}

fn matches<B>(m: &MatchConfig, req: &Request<B>) -> bool {
    let path = req.uri().path();
    let path_ok = match &m.path {
        None => true,
        Some(PathMatchConfig::Exact(p)) => path == p,
        Some(PathMatchConfig::Prefix(p)) => {
            p.is_empty()
                || (path.starts_with(p.as_str())
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
        }
        Some(PathMatchConfig::Regex(r)) => r.0.is_match(path),
    };
    path_ok
        && m.method
            .as_deref()
            .is_none_or(|meth| req.method().as_str() == meth)
        && m.headers.iter().all(|(name, vm)| {
            req.headers()
                .get_all(name.as_str())
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| value_ok(vm, v)))
        })
        && m.query.iter().all(|(name, vm)| {
            req.uri()
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .any(|(k, v)| k == name && value_ok(vm, v))
        })
}

fn value_ok(m: &ValueMatcher, v: &str) -> bool {
    match m {
        ValueMatcher::Exact(e) => e == v,
        ValueMatcher::Regex(r) => r.0.is_match(v),
    }
}

/// Pick a backend by weight.
pub fn pick_backend(backends: &[WeightedCluster]) -> &WeightedCluster {
    if backends.len() == 1 {
        return &backends[0];
    }
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    let mut n = fastrand::u64(..total.max(1));
    for b in backends {
        if n < u64::from(b.weight) {
            return b;
        }
        n -= u64::from(b.weight);
    }
    &backends[0]
}
