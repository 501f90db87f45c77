//! Choosing a service port from the request's authority, and a route by its matches.

use http::{uri::Authority, HeaderValue, Request};
use trellis_model::{
    proxy::{
        MatchConfig, PathMatchConfig, PortConfig, RouteConfig, ServiceConfig, ValueMatcher,
        WeightedCluster,
    },
    resource::NamespacedName,
};

use crate::state::Snapshot;

/// The authority a request names: the URI's (CONNECT target, absolute URI, HTTP/2
/// `:authority`), else `Host`. Both forms clone by reference count.
#[derive(Clone, Debug)]
pub enum RequestAuthority {
    /// From the URI.
    Uri(Authority),
    /// From the `Host` header.
    Host(HeaderValue),
}

impl RequestAuthority {
    /// As text (empty if `Host` is not valid text).
    pub fn as_str(&self) -> &str {
        match self {
            Self::Uri(a) => a.as_str(),
            Self::Host(h) => h.to_str().unwrap_or(""),
        }
    }

    /// `(host, port)`; the port only when it is a number.
    pub fn host_port(&self) -> (&str, Option<u16>) {
        let s = self.as_str();
        match s
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse().ok()?)))
        {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    }
}

/// The authority `req` names, if any.
pub fn authority<B>(req: &Request<B>) -> Option<RequestAuthority> {
    if let Some(a) = req.uri().authority() {
        return Some(RequestAuthority::Uri(a.clone()));
    }
    req.headers()
        .get(http::header::HOST)
        .map(|h| RequestAuthority::Host(h.clone()))
}

/// The service port that `authority` names, if any (`NAME.NAMESPACE`, a `.mesh` suffix, or a
/// bare `NAME` in the local namespace). A missing port means port 80, or the service's only
/// port. No allocation: hosts are looked up in the snapshot's map.
pub fn service_port<'a>(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port() {
        let a = |s: &'static str| RequestAuthority::Host(HeaderValue::from_static(s));
        assert_eq!(a("web.shop:8080").host_port(), ("web.shop", Some(8080)));
        assert_eq!(a("web.shop").host_port(), ("web.shop", None));
        assert_eq!(a("[::1]:80").host_port(), ("[::1]", Some(80)));
        assert_eq!(a("[::1]").host_port(), ("[::1]", None));
        assert_eq!(a("web.shop:http").host_port(), ("web.shop:http", None));
    }
}
