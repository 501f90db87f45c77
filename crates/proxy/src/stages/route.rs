//! Stage `route`: the service port a request's authority names, the first route (in the
//! Gateway API's precedence order) whose matches it meets, and a backend by weight. Pure
//! functions over the snapshot: no I/O, no allocation.

use http::Request;
use trellis_model::{
    proxy::{
        MatchConfig, PathMatchConfig, PortConfig, RouteConfig, ServiceConfig, ValueMatcher,
        WeightedCluster,
    },
    resource::NamespacedName,
};

use crate::{http::authority::RequestAuthority, snapshot::Snapshot};

/// The service port that `authority` names, if any (`NAME.NAMESPACE`, a `.mesh` suffix, or a
/// bare `NAME` in the local namespace). A missing port means port 80, or the service's only
/// port. No allocation: hosts are looked up in the snapshot's map.
pub(crate) fn service_port<'a>(
    snap: &'a Snapshot,
    authority: &RequestAuthority,
) -> Option<(&'a NamespacedName, &'a ServiceConfig, &'a PortConfig)> {
    let (host, port) = authority.host_port();
    let host = host.strip_suffix(".mesh").unwrap_or(host);
    let (id, svc) = snap.cfg.services.get_key_value(snap.hosts.get(host)?)?;
    let port = match port {
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
pub(crate) fn find<'a, B>(port: &'a PortConfig, req: &Request<B>) -> Option<&'a RouteConfig> {
    port.routes
        .iter()
        .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| matches(m, req)))
}

/// Whether `req` meets `m` (also asked by the inbound side for a route's rate limits).
pub(crate) fn matches<B>(m: &MatchConfig, req: &Request<B>) -> bool {
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
pub(crate) fn pick_backend(backends: &[WeightedCluster]) -> &WeightedCluster {
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

#[cfg(test)]
mod tests;
