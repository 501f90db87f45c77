//! Reference resolution for a store that must accept resources in any order.
//!
//! A static file is refused whole when a route names a missing Service. The control plane
//! instead stores such a route and reports it (Gateway API's `ResolvedRefs=False`), and serves
//! proxies what resolves: [`resolve`] finds those references, and [`Partial`] says which part
//! of its resource each one takes out (a backend marked, a parent, target, upstream or
//! mirror dropped), or that the whole resource waits until the Service exists.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    resource::{
        AuthorizationPolicySpec, BackendPolicySpec, NamespacedName, PeerAuthenticationSpec,
        Resource, RouteFilter, Spec,
    },
    translate::parse_authority_name,
};

/// One reference that does not resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unresolved {
    /// Index of the resource in the slice given to [`resolve`].
    pub index: usize,
    /// Dotted path of the reference, e.g. `spec.rules[0].backendRefs[1]`.
    pub field: String,
    /// What is missing.
    pub message: String,
    /// The part the control plane can serve the resource without (or mark); `None` when
    /// the whole resource must be left out.
    pub partial: Option<Partial>,
}

/// A part of a resource that can fail to resolve without the whole resource being withdrawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partial {
    /// A Workload's upstream, by index: dropped (the workload is still an endpoint).
    Upstream(usize),
    /// A route's backend: kept, marked `unresolved`, so that the proxy answers its share of
    /// the requests 500 (the Gateway API's rule) and the route's other backends are served.
    Backend {
        /// Index of the rule.
        rule: usize,
        /// Index of the backend in the rule.
        backend: usize,
    },
    /// A route's parent Service, by index: dropped while another parent resolves, so that
    /// the route keeps routing for the others. A route with no parent left is left out.
    Parent(usize),
    /// A policy's target, by index: dropped while another target resolves, so that the
    /// policy keeps holding its other Services (leaving an ALLOW policy out would open them
    /// to every caller). A policy with no target left is left out: it holds nothing.
    Target(usize),
    /// A route's mirror filter, by rule and filter index: dropped (a copy is not an answer).
    Mirror {
        /// Index of the rule.
        rule: usize,
        /// Index of the filter in the rule.
        filter: usize,
    },
}

/// Every reference among `resources` that names a missing Service or Service port.
pub fn resolve<R: std::borrow::Borrow<Resource>>(resources: &[R]) -> Vec<Unresolved> {
    let mut ports: BTreeMap<NamespacedName, BTreeSet<u16>> = BTreeMap::new();
    for r in resources.iter().map(|r| r.borrow()) {
        if let Spec::Service(s) = &r.spec {
            ports
                .entry(r.id())
                .or_default()
                .extend(s.ports.iter().map(|p| p.port));
        }
    }
    let route_ids: BTreeSet<(&str, NamespacedName)> = resources
        .iter()
        .map(|r| r.borrow())
        .filter(|r| matches!(r.spec, Spec::HttpRoute(_) | Spec::GrpcRoute(_)))
        .map(|r| (r.kind(), r.id()))
        .collect();
    let check = |kind: &str, ns: &NamespacedName, port: Option<u16>| -> Option<String> {
        if kind != "Service" {
            return Some(format!("{kind} is not a kind a mesh route can name"));
        }
        match (ports.get(ns), port) {
            (None, _) => Some(format!("Service {ns} not found")),
            (Some(p), Some(port)) if !p.contains(&port) => {
                Some(format!("Service {ns} has no port {port}"))
            }
            _ => None,
        }
    };
    let mut out = Vec::new();
    for (index, r) in resources.iter().map(|r| r.borrow()).enumerate() {
        let ns = &r.metadata.namespace;
        let id = |name: &str, explicit: &Option<String>| NamespacedName {
            namespace: explicit.clone().unwrap_or_else(|| ns.clone()),
            name: name.to_string(),
        };
        // The field's path is written only for a reference that does not resolve (most do).
        let mut push =
            |field: &dyn Fn() -> String, message: Option<String>, partial: Option<Partial>| {
                if let Some(message) = message {
                    out.push(Unresolved {
                        index,
                        field: field(),
                        message,
                        partial,
                    });
                }
            };
        let routes = match &r.spec {
            Spec::HttpRoute(h) => Some((
                &h.parent_refs,
                h.rules
                    .iter()
                    .map(|r| (&r.backend_refs, &r.filters))
                    .collect::<Vec<_>>(),
            )),
            Spec::GrpcRoute(g) => Some((
                &g.parent_refs,
                g.rules
                    .iter()
                    .map(|r| (&r.backend_refs, &r.filters))
                    .collect(),
            )),
            _ => None,
        };
        if let Some((parents, rules)) = routes {
            for (i, p) in parents.iter().enumerate() {
                let target = id(&p.name.value, &p.namespace);
                push(
                    &|| format!("spec.parentRefs[{i}]"),
                    check(&p.kind, &target, p.port),
                    Some(Partial::Parent(i)),
                );
            }
            for (ri, (backends, filters)) in rules.iter().enumerate() {
                for (bi, b) in backends.iter().enumerate() {
                    let target = id(&b.name.value, &b.namespace);
                    push(
                        &|| format!("spec.rules[{ri}].backendRefs[{bi}]"),
                        check(&b.kind, &target, Some(b.port)),
                        Some(Partial::Backend {
                            rule: ri,
                            backend: bi,
                        }),
                    );
                }
                for (fi, f) in filters.iter().enumerate() {
                    if let RouteFilter::RequestMirror { mirror } = f {
                        let b = &mirror.backend_ref;
                        push(
                            &|| format!("spec.rules[{ri}].filters[{fi}].requestMirror.backendRef"),
                            check(&b.kind, &id(&b.name.value, &b.namespace), Some(b.port)),
                            Some(Partial::Mirror {
                                rule: ri,
                                filter: fi,
                            }),
                        );
                    }
                }
            }
        }
        match &r.spec {
            Spec::RateLimitPolicy(crate::resource::RateLimitPolicySpec { target_refs, .. }) => {
                for (i, t) in target_refs.iter().enumerate() {
                    let target = id(&t.name.value, &None);
                    let message = match t.kind.as_str() {
                        "HTTPRoute" | "GRPCRoute" => (!route_ids
                            .contains(&(t.kind.as_str(), target.clone())))
                        .then(|| format!("{} {target} not found", t.kind)),
                        _ => check(&t.kind, &target, None),
                    };
                    push(
                        &|| format!("spec.targetRefs[{i}]"),
                        message,
                        Some(Partial::Target(i)),
                    );
                }
            }
            Spec::AuthorizationPolicy(AuthorizationPolicySpec { target_refs, .. })
            | Spec::PeerAuthentication(PeerAuthenticationSpec { target_refs, .. })
            | Spec::BackendPolicy(BackendPolicySpec { target_refs, .. }) => {
                for (i, t) in target_refs.iter().enumerate() {
                    let target = id(&t.name.value, &None);
                    push(
                        &|| format!("spec.targetRefs[{i}]"),
                        check(&t.kind, &target, None),
                        Some(Partial::Target(i)),
                    );
                }
            }
            Spec::Rollout(p) => {
                for (f, name) in [
                    ("spec.service", &p.service),
                    ("spec.stable", &p.stable),
                    ("spec.canary", &p.canary),
                ] {
                    push(&|| f.into(), check("Service", &id(name, &None), None), None);
                }
                for (i, route) in p.routes.iter().enumerate() {
                    let target = id(route, &None);
                    let found = route_ids.contains(&("HTTPRoute", target.clone()))
                        || route_ids.contains(&("GRPCRoute", target.clone()));
                    push(
                        &|| format!("spec.routes[{i}]"),
                        (!found).then(|| format!("no HTTPRoute or GRPCRoute {target}")),
                        None,
                    );
                }
            }
            Spec::Workload(w) => {
                for (i, u) in w.upstreams.iter().enumerate() {
                    let target = parse_authority_name(&u.service.value, ns);
                    push(
                        &|| format!("spec.upstreams[{i}]"),
                        check("Service", &target, Some(u.port)),
                        Some(Partial::Upstream(i)),
                    );
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_missing_services_ports_and_upstreams() {
        let text = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: a, namespace: shop }
spec: { ports: [{ port: 80 }] }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: r, namespace: shop }
spec:
  parentRefs: [{ name: a, port: 80 }]
  rules:
    - backendRefs: [{ name: a, port: 80 }, { name: b, port: 80 }, { name: a, port: 81 }]
    - matches: [{ path: { type: PathPrefix, value: /copy } }]
      filters:
        - type: RequestMirror
          requestMirror: { backendRef: { name: shadow, port: 80 } }
      backendRefs: [{ name: a, port: 80 }]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: w, namespace: shop }
spec:
  address: 127.0.0.1
  upstreams:
    - { service: a.shop, port: 80, bind: "127.0.0.1:0" }
    - { service: gone.shop, port: 80, bind: "127.0.0.1:0" }
---
apiVersion: trellis.dev/v1alpha1
kind: BackendTrafficPolicy
metadata: { name: p, namespace: shop }
spec: { targetRefs: [{ name: a }] }
"#;
        let rs = crate::parse_documents("t.yaml", text).unwrap();
        let got: Vec<(usize, String, String, Option<Partial>)> = resolve(&rs)
            .into_iter()
            .map(|u| (u.index, u.field, u.message, u.partial))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    1,
                    "spec.rules[0].backendRefs[1]".into(),
                    "Service shop/b not found".into(),
                    Some(Partial::Backend {
                        rule: 0,
                        backend: 1
                    })
                ),
                (
                    1,
                    "spec.rules[0].backendRefs[2]".into(),
                    "Service shop/a has no port 81".into(),
                    Some(Partial::Backend {
                        rule: 0,
                        backend: 2
                    })
                ),
                (
                    1,
                    "spec.rules[1].filters[0].requestMirror.backendRef".into(),
                    "Service shop/shadow not found".into(),
                    Some(Partial::Mirror { rule: 1, filter: 0 })
                ),
                (
                    2,
                    "spec.upstreams[1]".into(),
                    "Service shop/gone not found".into(),
                    Some(Partial::Upstream(1))
                ),
            ]
        );
    }
}
