//! What one proxy needs of the mesh: its own Workload, what its inbound side reads (the
//! Services that select it, their policies, the namespace's and the mesh's peer
//! authentication and authorization, the trust bundles) and, for its outbound side, the
//! Services it calls, each complete: its routes, its policies, the Workloads it selects, and
//! every Service those name in turn (a route's backends and mirrors, a policy's other targets).
//!
//! The set is closed under references, so it translates exactly as the whole mesh does for
//! this proxy (`fuzzing::scope` checks that on every corpus input): every Service the
//! subset's translation holds has the same config and clusters as in the whole mesh's.
//!
//! [`ScopeIndex`] is built once per state of the mesh (linear in its size); [`ScopeIndex::needs`]
//! then costs what the proxy needs, not what the mesh holds, so a control plane can work it
//! out for each of a thousand proxies on every change.

use std::{
    borrow::Borrow,
    collections::{hash_map::RandomState, BTreeSet, HashMap, HashSet, VecDeque},
    hash::{BuildHasher, BuildHasherDefault, Hash, Hasher},
};

use crate::{
    proxy::MESH_NAMESPACE,
    resource::{PolicyTargetRef, RouteSpec, Spec},
    NamespacedName, Resource,
};

/// The resources of one state of the mesh, indexed by what refers to what.
///
/// Its tables are keyed by a hash of the names looked up, not by copies of them: building
/// the index of 12,000 resources then allocates a table entry per resource instead of two or
/// three strings, and every lookup checks the resources it finds against the names (two
/// names of one hash are both kept; the hash is keyed at random per index, so names cannot
/// be chosen to collide).
#[derive(Clone, Debug, Default)]
pub struct ScopeIndex {
    /// Services by id.
    services: Table,
    /// Services by namespace (a workload's inbound Services are in its namespace).
    services_in: Table,
    /// Workloads by id.
    workloads: Table,
    /// Workloads by (namespace, label key, label value).
    by_label: Table,
    /// Routes by each of their parents, policies by each of their targets.
    naming: Table,
    /// PeerAuthentications and AuthorizationPolicies without targets, by namespace.
    namespace_wide: Table,
    /// RateLimitPolicies by namespace (they limit their namespace's inbound requests).
    rate_limits: Table,
    /// What every proxy gets: the trust bundles.
    everyone: Vec<usize>,
    /// Every resource by (kind, id).
    by_key: Table,
    /// The key of the tables' hash.
    hasher: RandomState,
}

/// Indices of resources by the hash of a name: most hashes have one, kept inline.
#[derive(Clone, Debug, Default)]
struct Table {
    first: HashMap<u64, usize, BuildHasherDefault<Hashed>>,
    more: HashMap<u64, Vec<usize>, BuildHasherDefault<Hashed>>,
}

impl Table {
    fn insert(&mut self, h: u64, i: usize) {
        match self.first.entry(h) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(i);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.more.entry(h).or_default().push(i)
            }
        }
    }

    fn remove(&mut self, h: u64, i: usize) {
        if self.first.get(&h) == Some(&i) {
            match self.more.get_mut(&h) {
                Some(l) => {
                    let next = l.remove(0);
                    if l.is_empty() {
                        self.more.remove(&h);
                    }
                    self.first.insert(h, next);
                }
                None => {
                    self.first.remove(&h);
                }
            }
        } else if let Some(l) = self.more.get_mut(&h) {
            l.retain(|&x| x != i);
            if l.is_empty() {
                self.more.remove(&h);
            }
        }
    }

    /// Every index from `from` on one up (`up`) or down.
    fn shift(&mut self, from: usize, up: bool) {
        let moved = |i: &mut usize| shift(i, from, up);
        self.first.values_mut().for_each(moved);
        self.more.values_mut().flatten().for_each(moved);
    }

    /// Every index kept under hash `h`, in the order they were kept.
    fn get(&self, h: u64) -> impl Iterator<Item = usize> + '_ {
        self.first
            .get(&h)
            .copied()
            .into_iter()
            .chain(self.more.get(&h).into_iter().flatten().copied())
    }
}

/// Index `i` one up (`up`) or down if it is `from` or after.
fn shift(i: &mut usize, from: usize, up: bool) {
    if *i >= from {
        *i = if up { *i + 1 } else { *i - 1 };
    }
}

/// [`ScopeIndex`]'s key of `parts`, with its hash's key `hasher`.
fn hash_of(hasher: &RandomState, parts: &[&str]) -> u64 {
    let mut h = hasher.build_hasher();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

/// A hasher for keys that are hashes already.
#[derive(Default)]
struct Hashed(u64);

impl Hasher for Hashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Every Service that `r` names, in `r`'s terms (a route's parents, backends and mirrors; a
/// policy's targets; a Workload's upstreams).
pub fn services_named(r: &Resource) -> Vec<NamespacedName> {
    let ns = &r.metadata.namespace;
    let id = |name: &str, explicit: &Option<String>| NamespacedName {
        namespace: explicit.clone().unwrap_or_else(|| ns.clone()),
        name: name.to_string(),
    };
    let targets = |t: &[PolicyTargetRef]| {
        t.iter()
            .filter(|t| t.kind == "Service")
            .map(|t| id(&t.name.value, &None))
            .collect()
    };
    /// Parents, then each rule's backends and mirrors.
    fn route<M>(h: &RouteSpec<M>, ns: &str) -> Vec<NamespacedName> {
        let id = |name: &str, explicit: &Option<String>| NamespacedName {
            namespace: explicit.clone().unwrap_or_else(|| ns.to_string()),
            name: name.to_string(),
        };
        let mut out = parents(h, ns);
        for rule in &h.rules {
            out.extend(
                rule.backend_refs
                    .iter()
                    .map(|b| id(&b.name.value, &b.namespace)),
            );
            for f in &rule.filters {
                if let crate::resource::RouteFilter::RequestMirror { mirror } = f {
                    let b = &mirror.backend_ref;
                    out.push(id(&b.name.value, &b.namespace));
                }
            }
        }
        out
    }
    match &r.spec {
        Spec::HttpRoute(h) => route(h, ns),
        Spec::GrpcRoute(g) => route(g, ns),
        Spec::BackendPolicy(p) => targets(&p.target_refs),
        Spec::AuthorizationPolicy(p) => targets(&p.target_refs),
        Spec::PeerAuthentication(p) => targets(&p.target_refs),
        Spec::RateLimitPolicy(p) => targets(&p.target_refs),
        Spec::Workload(w) => w
            .upstreams
            .iter()
            .map(|u| crate::parse_authority_name(&u.service.value, ns))
            .collect(),
        Spec::Service(_) | Spec::TrustBundle(_) | Spec::Rollout(_) => Vec::new(),
    }
}

/// A route's parent Services (none for another kind).
pub fn route_parents(r: &Resource) -> Vec<NamespacedName> {
    match &r.spec {
        Spec::HttpRoute(h) => parents(h, &r.metadata.namespace),
        Spec::GrpcRoute(g) => parents(g, &r.metadata.namespace),
        _ => Vec::new(),
    }
}

fn parents<M>(h: &RouteSpec<M>, ns: &str) -> Vec<NamespacedName> {
    h.parent_refs
        .iter()
        .map(|p| NamespacedName {
            namespace: p.namespace.clone().unwrap_or_else(|| ns.to_string()),
            name: p.name.value.clone(),
        })
        .collect()
}

fn selects(
    selector: &std::collections::BTreeMap<String, String>,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// What to translate to check the set `resources` after a change of the resources at
/// `changed` (indices), when the set before the change translated: every resource but the
/// Workloads, the changed Workloads (and any other of the same name: defined twice), and the
/// Workloads a changed Service selects. A
/// Workload's checks, its own and as an endpoint of the Services that select it, read no
/// other Workload, and the rest of a mesh is small next to its Workloads: a change checked
/// this way costs what the mesh's Services and policies cost, not its fleet
/// (`fuzzing::resources` checks that this refuses exactly what translating the whole set
/// refuses).
pub fn to_check<R: Borrow<Resource>>(resources: &[R], changed: &[usize]) -> Vec<usize> {
    let changed: HashSet<usize> = changed.iter().copied().collect();
    let names: HashSet<(&str, &str)> = changed
        .iter()
        .filter_map(|&i| {
            let r: &Resource = resources.get(i)?.borrow();
            let m = &r.metadata;
            matches!(r.spec, Spec::Workload(_)).then_some((m.namespace.as_str(), m.name.as_str()))
        })
        .collect();
    let services: Vec<(&str, &std::collections::BTreeMap<String, String>)> = changed
        .iter()
        .filter_map(|&i| {
            let r: &Resource = resources.get(i)?.borrow();
            match &r.spec {
                Spec::Service(s) => Some((r.metadata.namespace.as_str(), &s.selector)),
                _ => None,
            }
        })
        .collect();
    resources
        .iter()
        .enumerate()
        .filter(|(i, r)| {
            let r: &Resource = (*r).borrow();
            !matches!(r.spec, Spec::Workload(_))
                || changed.contains(i)
                || names.contains(&(r.metadata.namespace.as_str(), r.metadata.name.as_str()))
                || services.iter().any(|(ns, sel)| {
                    *ns == r.metadata.namespace
                        && !sel.is_empty()
                        && selects(sel, &r.metadata.labels)
                })
        })
        .map(|(i, _)| i)
        .collect()
}

/// What resource `r` is kept under in [`ScopeIndex`]'s `naming`: a route's parents (a route
/// shapes its parents' traffic, not its backends': a caller of a canary backend does not
/// need the routes that split to it), a policy's targets; nothing for a Workload or a
/// RateLimitPolicy.
fn naming_of(r: &Resource) -> Vec<NamespacedName> {
    let ns = &r.metadata.namespace;
    let mut named = match &r.spec {
        Spec::Workload(_) | Spec::RateLimitPolicy(_) => return Vec::new(),
        Spec::HttpRoute(h) => parents(h, ns),
        Spec::GrpcRoute(g) => parents(g, ns),
        _ => services_named(r),
    };
    named.sort();
    named.dedup();
    named
}

fn is(r: &Resource, id: &NamespacedName) -> bool {
    r.metadata.namespace == id.namespace && r.metadata.name == id.name
}

impl ScopeIndex {
    /// Index `resources` (one pass).
    pub fn new<R: Borrow<Resource>>(resources: &[R]) -> Self {
        let mut ix = Self::default();
        for (i, r) in resources.iter().enumerate() {
            let r: &Resource = r.borrow();
            if let Spec::Workload(_) = &r.spec {
                // Workloads name nothing the index keeps (their upstreams are read from them).
                ix.workload(i, r, true);
                continue;
            }
            let ns = r.metadata.namespace.as_str();
            ix.by_key
                .insert(ix.hash(&[r.kind(), ns, &r.metadata.name]), i);
            match &r.spec {
                Spec::Service(_) => {
                    ix.services.insert(ix.hash(&[ns, &r.metadata.name]), i);
                    ix.services_in.insert(ix.hash(&[ns]), i);
                }
                Spec::TrustBundle(_) => ix.everyone.push(i),
                Spec::RateLimitPolicy(_) => ix.rate_limits.insert(ix.hash(&[ns]), i),
                // Workloads were kept above.
                Spec::Workload(_) | Spec::Rollout(_) => {}
                Spec::HttpRoute(_) | Spec::GrpcRoute(_) | Spec::BackendPolicy(_) => {}
                Spec::AuthorizationPolicy(_) | Spec::PeerAuthentication(_) => {}
            }
            if matches!(
                &r.spec,
                Spec::AuthorizationPolicy(p) if p.target_refs.is_empty()
            ) || matches!(&r.spec, Spec::PeerAuthentication(p) if p.target_refs.is_empty())
            {
                ix.namespace_wide.insert(ix.hash(&[ns]), i);
            }
            for s in naming_of(r) {
                ix.naming.insert(ix.hash(&[&s.namespace, &s.name]), i);
            }
        }
        ix
    }

    /// Keep (`keep`) or forget Workload `r` at index `at`.
    fn workload(&mut self, at: usize, r: &Resource, keep: bool) {
        let (ns, name) = (r.metadata.namespace.as_str(), r.metadata.name.as_str());
        let Self {
            by_key,
            workloads,
            by_label,
            hasher,
            ..
        } = self;
        let hash = |parts: &[&str]| hash_of(hasher, parts);
        let put = |t: &mut Table, h: u64| {
            if keep {
                t.insert(h, at)
            } else {
                t.remove(h, at)
            }
        };
        put(by_key, hash(&[r.kind(), ns, name]));
        put(workloads, hash(&[ns, name]));
        for (k, v) in &r.metadata.labels {
            put(by_label, hash(&[ns, k, v]));
        }
    }

    /// The index of the resources after Workload `r` was inserted at `at` (those from `at`
    /// on moved up one): what [`ScopeIndex::new`] makes of them, at the cost of moving the
    /// indices kept rather than hashing every name again.
    pub fn insert_workload(&mut self, at: usize, r: &Resource) {
        self.shift(at, true);
        self.workload(at, r, true);
    }

    /// The index of the resources after Workload `r`, at `at`, was removed (those after it
    /// moved down one).
    pub fn remove_workload(&mut self, at: usize, r: &Resource) {
        self.workload(at, r, false);
        self.shift(at + 1, false);
    }

    /// The index of the resources after Workload `was` at `at` was replaced by `now` (new
    /// labels, say).
    pub fn replace_workload(&mut self, at: usize, was: &Resource, now: &Resource) {
        self.workload(at, was, false);
        self.workload(at, now, true);
    }

    fn shift(&mut self, from: usize, up: bool) {
        for t in [
            &mut self.services,
            &mut self.services_in,
            &mut self.workloads,
            &mut self.by_label,
            &mut self.naming,
            &mut self.namespace_wide,
            &mut self.rate_limits,
            &mut self.by_key,
        ] {
            t.shift(from, up);
        }
        for i in &mut self.everyone {
            shift(i, from, up);
        }
    }

    /// The tables' key of `parts`.
    fn hash(&self, parts: &[&str]) -> u64 {
        hash_of(&self.hasher, parts)
    }

    /// The index of `id` kept in `table` (Services or Workloads by id).
    fn by_id<R: Borrow<Resource>>(
        &self,
        table: &Table,
        resources: &[R],
        id: &NamespacedName,
    ) -> Option<usize> {
        table
            .get(self.hash(&[&id.namespace, &id.name]))
            .filter(|&i| is(resources[i].borrow(), id))
            // Defined twice (a file can): the later, as a map by id keeps it.
            .max()
    }

    /// The resource of kind `kind` (as [`Resource::kind`] names it) and id `id`.
    fn by_key<R: Borrow<Resource>>(
        &self,
        resources: &[R],
        kind: &str,
        id: &NamespacedName,
    ) -> Option<usize> {
        self.by_key
            .get(self.hash(&[kind, &id.namespace, &id.name]))
            .filter(|&i| {
                let r: &Resource = resources[i].borrow();
                r.kind() == kind && is(r, id)
            })
            .max()
    }

    /// What `table` keeps of namespace `ns` (Services, namespace-wide policies, rate limits).
    fn in_namespace<'a, R: Borrow<Resource>>(
        &self,
        table: &'a Table,
        resources: &'a [R],
        ns: &'a str,
    ) -> impl Iterator<Item = usize> + 'a {
        table
            .get(self.hash(&[ns]))
            .filter(move |&i| resources[i].borrow().metadata.namespace == ns)
    }

    /// The indices (into the slice given to [`ScopeIndex::new`]) of what the proxy serving
    /// `local` needs, calling the Services it declares as upstreams and `also` (names it asked
    /// for on demand). Empty when `local` is not a Workload of this mesh.
    pub fn needs<R: Borrow<Resource>>(
        &self,
        resources: &[R],
        local: &NamespacedName,
        also: impl IntoIterator<Item = NamespacedName>,
    ) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        let Some(me) = self.by_id(&self.workloads, resources, local) else {
            return out;
        };
        let res = |i: usize| -> &Resource { resources[i].borrow() };
        out.insert(me);
        out.extend(&self.everyone);
        let mine = res(me);
        let mut queue: VecDeque<NamespacedName> = services_named(mine).into();
        // Inbound: the Services of its namespace that select it, and the namespace's rate
        // limits (with what they name).
        let mut inbound = Vec::new();
        for s in self.in_namespace(&self.services_in, resources, &local.namespace) {
            if let Spec::Service(svc) = &res(s).spec {
                if selects(&svc.selector, &mine.metadata.labels) {
                    inbound.push(res(s).id());
                }
            }
        }
        for p in self.in_namespace(&self.rate_limits, resources, &local.namespace) {
            out.insert(p);
            // A policy on a route limits the workloads of the route's parents and backends
            // with the route's matches: such a route comes along, with what it names (the
            // translation checks its references).
            for r in self.limited_routes(resources, res(p)) {
                let named = services_named(res(r));
                if named.iter().any(|s| inbound.contains(s)) && out.insert(r) {
                    queue.extend(named);
                }
            }
        }
        queue.extend(inbound);
        queue.extend(also);
        let mut namespaces: HashSet<&str> = HashSet::from([local.namespace.as_str()]);
        let mut seen = HashSet::new();
        while let Some(s) = queue.pop_front() {
            if !seen.insert(s.clone()) {
                continue;
            }
            let Some(si) = self.by_id(&self.services, resources, &s) else {
                continue;
            };
            out.insert(si);
            let r = res(si);
            namespaces.insert(r.metadata.namespace.as_str());
            if let Spec::Service(svc) = &r.spec {
                out.extend(self.selected(&r.metadata.namespace, &svc.selector, resources));
            }
            for a in self.naming.get(self.hash(&[&s.namespace, &s.name])) {
                if !out.contains(&a) && naming_of(res(a)).contains(&s) {
                    out.insert(a);
                    queue.extend(services_named(res(a)));
                }
            }
        }
        for ns in namespaces.into_iter().chain([MESH_NAMESPACE]) {
            out.extend(self.in_namespace(&self.namespace_wide, resources, ns));
        }
        out
    }

    /// Whether a change of resource `kind` `id` (as it is now; false when it is gone) can
    /// concern the proxy of `local` whose scope holds `services` and not that resource:
    /// whether it may now belong in that scope.
    pub fn may_concern<R: Borrow<Resource>>(
        &self,
        resources: &[R],
        kind: &str,
        id: &NamespacedName,
        services: &[NamespacedName],
        local: &NamespacedName,
    ) -> bool {
        let Some(kind) = crate::resource::known_kind(kind) else {
            return true;
        };
        let Some(i) = self.by_key(resources, kind, id) else {
            return false;
        };
        let r: &Resource = resources[i].borrow();
        let names_one = |named: Vec<NamespacedName>| named.iter().any(|s| services.contains(s));
        match &r.spec {
            // A Service may be what something in the scope names, or select the proxy's
            // workload: Services change seldom, so any is worked out.
            Spec::Service(_) => true,
            Spec::Rollout(_) => false,
            Spec::Workload(_) => self.selects_any(resources, services, id),
            Spec::HttpRoute(h) => {
                names_one(parents(h, &r.metadata.namespace))
                    || self.limits_route(resources, i, local)
            }
            Spec::GrpcRoute(g) => {
                names_one(parents(g, &r.metadata.namespace))
                    || self.limits_route(resources, i, local)
            }
            Spec::AuthorizationPolicy(p) if p.target_refs.is_empty() => true,
            Spec::PeerAuthentication(p) if p.target_refs.is_empty() => true,
            Spec::RateLimitPolicy(_) => r.metadata.namespace == local.namespace,
            Spec::TrustBundle(_) => true,
            Spec::BackendPolicy(_) | Spec::AuthorizationPolicy(_) | Spec::PeerAuthentication(_) => {
                names_one(services_named(r))
            }
        }
    }

    /// The routes (indices) that RateLimitPolicy `policy` targets, in its namespace.
    fn limited_routes<'a, R: Borrow<Resource>>(
        &'a self,
        resources: &'a [R],
        policy: &'a Resource,
    ) -> impl Iterator<Item = usize> + 'a {
        let targets = match &policy.spec {
            Spec::RateLimitPolicy(p) => p.target_refs.as_slice(),
            _ => &[],
        };
        targets.iter().filter_map(move |t| {
            let kind = crate::resource::known_kind(&t.kind)?;
            let id = NamespacedName {
                namespace: policy.metadata.namespace.clone(),
                name: t.name.value.clone(),
            };
            (kind != "Service")
                .then(|| self.by_key(resources, kind, &id))
                .flatten()
        })
    }

    /// Whether a RateLimitPolicy of `local`'s namespace targets route `route` (an index): its
    /// scope then holds the route.
    fn limits_route<R: Borrow<Resource>>(
        &self,
        resources: &[R],
        route: usize,
        local: &NamespacedName,
    ) -> bool {
        resources[route].borrow().metadata.namespace == local.namespace
            && self
                .in_namespace(&self.rate_limits, resources, &local.namespace)
                .any(|p| {
                    self.limited_routes(resources, resources[p].borrow())
                        .any(|r| r == route)
                })
    }

    /// Whether any of `services` selects Workload `workload` (false when there is no such
    /// Workload): whether a change of that Workload can concern a proxy calling them.
    pub fn selects_any<R: Borrow<Resource>>(
        &self,
        resources: &[R],
        services: &[NamespacedName],
        workload: &NamespacedName,
    ) -> bool {
        let Some(w) = self.by_id(&self.workloads, resources, workload) else {
            return false;
        };
        let labels = &resources[w].borrow().metadata.labels;
        services.iter().any(|s| {
            s.namespace == workload.namespace
                && self.by_id(&self.services, resources, s).is_some_and(|i| {
                    matches!(&resources[i].borrow().spec, Spec::Service(svc)
                        if !svc.selector.is_empty() && selects(&svc.selector, labels))
                })
        })
    }

    /// The workloads `selector` selects in `namespace`, as the translation selects them (an
    /// empty selector selects none).
    fn selected<'a, R: Borrow<Resource>>(
        &'a self,
        namespace: &'a str,
        selector: &'a std::collections::BTreeMap<String, String>,
        resources: &'a [R],
    ) -> impl Iterator<Item = usize> + 'a {
        // The Workloads kept under the selector's rarest label.
        let rarest = selector
            .iter()
            .map(|(k, v)| self.hash(&[namespace, k, v]))
            .min_by_key(|&h| self.by_label.get(h).count());
        rarest
            .into_iter()
            .flat_map(move |h| self.by_label.get(h))
            .filter(move |&i| {
                let r: &Resource = resources[i].borrow();
                r.metadata.namespace == namespace && selects(selector, &r.metadata.labels)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_documents;

    const EXAMPLE: &str = include_str!("../../../examples/quickstart.yaml");

    /// The quick start plus a namespace the frontend never calls, with its own route,
    /// policies and a namespace-wide authorization.
    fn mesh() -> Vec<Resource> {
        let other = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: billing, namespace: pay }
spec:
  selector: { app: billing }
  ports: [{ name: http, port: 80, protocol: HTTP }]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: billing-1, namespace: pay, labels: { app: billing } }
spec: { address: 127.0.0.9 }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: billing, namespace: pay }
spec:
  parentRefs: [{ kind: Service, name: billing }]
  rules: [{ backendRefs: [{ name: billing, port: 80 }] }]
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: pay-only, namespace: pay }
spec:
  action: ALLOW
  rules: [{ from: [{ identities: ["pay/*"] }] }]
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: shop-all, namespace: shop }
spec:
  action: ALLOW
  rules: [{ from: [{ identities: ["shop/*"] }] }]
"#;
        parse_documents("t.yaml", &format!("{EXAMPLE}\n---\n{other}")).expect("parses")
    }

    fn names(rs: &[Resource], set: &BTreeSet<usize>) -> Vec<String> {
        set.iter()
            .map(|&i| format!("{}/{}", rs[i].kind(), rs[i].id()))
            .collect()
    }

    #[test]
    fn a_proxy_needs_what_it_calls_and_serves_and_nothing_else() {
        let rs = mesh();
        let ix = ScopeIndex::new(&rs);
        let front = "shop/frontend-1".parse().unwrap();
        let got = names(&rs, &ix.needs(&rs, &front, []));
        // The frontend calls catalog: its route's backends (v1, v2), their policy and
        // workloads come along; its namespace's authorization too. Nothing of `pay`.
        assert_eq!(
            got,
            [
                "Service/shop/catalog",
                "Service/shop/catalog-v1",
                "Service/shop/catalog-v2",
                "Workload/shop/catalog-vm-1",
                "Workload/shop/catalog-ctr-1",
                "Workload/shop/frontend-1",
                "HTTPRoute/shop/catalog",
                "BackendTrafficPolicy/shop/catalog",
                "AuthorizationPolicy/shop/shop-all",
            ]
        );
        // Asked for on demand, billing comes with its route and workload (and the
        // namespace-wide policies of `pay`: peer authentication there sets billing's mTLS).
        let got = names(
            &rs,
            &ix.needs(&rs, &front, ["pay/billing".parse().unwrap()]),
        );
        for n in [
            "Service/pay/billing",
            "Workload/pay/billing-1",
            "HTTPRoute/pay/billing",
        ] {
            assert!(got.contains(&n.to_string()), "{n} in {got:?}");
        }
        // The billing workload serves billing and calls nothing.
        let got = names(&rs, &ix.needs(&rs, &"pay/billing-1".parse().unwrap(), []));
        assert_eq!(
            got,
            [
                "Service/pay/billing",
                "Workload/pay/billing-1",
                "HTTPRoute/pay/billing",
                "AuthorizationPolicy/pay/pay-only",
            ]
        );
        // A caller of a route's backend alone does not get the route, nor its parent.
        let v1 = ["shop/catalog-v1".parse().unwrap()];
        let got = names(&rs, &ix.needs(&rs, &"pay/billing-1".parse().unwrap(), v1));
        assert!(
            got.contains(&"Service/shop/catalog-v1".to_string()),
            "{got:?}"
        );
        assert!(
            !got.contains(&"HTTPRoute/shop/catalog".to_string()),
            "{got:?}"
        );
        assert!(
            !got.contains(&"Service/shop/catalog".to_string()),
            "{got:?}"
        );
        // Not a workload of this mesh: nothing.
        assert!(ix.needs(&rs, &"x/y".parse().unwrap(), []).is_empty());
        // And each translates as the whole mesh does for that proxy.
        for w in ["shop/frontend-1", "pay/billing-1", "shop/catalog-vm-1"] {
            crate::translate("t.yaml", &rs, Some(&w.parse().unwrap())).expect("translates");
        }
        crate::fuzzing::scope(&rs);
    }

    /// A change is checked with the Workloads it can break: itself, or those a changed
    /// Service selects; and what that refuses is what the whole set refuses.
    #[test]
    fn a_change_is_checked_with_the_workloads_it_can_break() {
        let rs = mesh();
        let at = |kind: &str, id: &str| {
            rs.iter()
                .position(|r| r.kind() == kind && r.id().to_string() == id)
                .unwrap()
        };
        let workloads = |picked: Vec<usize>| -> Vec<String> {
            picked
                .into_iter()
                .filter(|&i| rs[i].kind() == "Workload")
                .map(|i| rs[i].id().to_string())
                .collect()
        };
        let front = at("Workload", "shop/frontend-1");
        assert_eq!(workloads(to_check(&rs, &[front])), ["shop/frontend-1"]);
        let v1 = at("Service", "shop/catalog-v1");
        assert_eq!(workloads(to_check(&rs, &[v1])), ["shop/catalog-vm-1"]);
        let route = at("HTTPRoute", "shop/catalog");
        assert!(workloads(to_check(&rs, &[route])).is_empty());
        // Every other kind is always checked.
        let picked = to_check(&rs, &[front]);
        for (i, r) in rs.iter().enumerate() {
            if r.kind() != "Workload" {
                assert!(picked.contains(&i), "{}", r.id());
            }
        }
        // A Service added that selects a Workload of weight 0: refused, checked either way.
        let extra = "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: idle-1, namespace: pay, labels: { app: idle } }\nspec: { address: 127.0.0.7, weight: 0 }\n---\napiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: idle, namespace: pay }\nspec:\n  selector: { app: idle }\n  ports: [{ name: http, port: 80, protocol: HTTP }]\n";
        let mut more = rs.clone();
        more.extend(parse_documents("t.yaml", extra).expect("parses"));
        let svc = more.len() - 1;
        let before: Vec<&Resource> = more[..svc].iter().collect();
        crate::translate("t.yaml", &before, None).expect("unselected, it is not checked");
        assert!(crate::translate("t.yaml", &more, None).is_err());
        let part: Vec<&Resource> = to_check(&more, &[svc])
            .into_iter()
            .map(|i| &more[i])
            .collect();
        let e = crate::translate("t.yaml", &part, None).expect_err("refused");
        assert!(e.to_string().contains("spec.weight"), "{e}");
        crate::fuzzing::checked_change(&more);
    }

    /// Found by the `resources` fuzz target: a RateLimitPolicy on a route limits the
    /// workloads of the route's backends too, so a backend's proxy needs that route although
    /// it neither calls nor serves the route's parent.
    #[test]
    fn a_backends_proxy_needs_the_route_its_rate_limit_targets() {
        let policy = "apiVersion: trellis.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: { name: a-route, namespace: shop }\nspec:\n  targetRefs: [{ kind: HTTPRoute, name: catalog }]\n  total: [{ requests: 7, per: 1s }]\n";
        // `catalog` (the route's parent) selects other workloads: catalog-vm-1 serves only
        // catalog-v1, a backend of the route.
        let example = EXAMPLE.replacen("selector: { app: catalog }", "selector: { app: other }", 1);
        assert_ne!(example, EXAMPLE);
        let rs = parse_documents("t.yaml", &format!("{example}\n---\n{policy}")).expect("parses");
        let ix = ScopeIndex::new(&rs);
        let vm = "shop/catalog-vm-1".parse().unwrap();
        let got = names(&rs, &ix.needs(&rs, &vm, []));
        for n in ["HTTPRoute/shop/catalog", "RateLimitPolicy/shop/a-route"] {
            assert!(got.contains(&n.to_string()), "{n} in {got:?}");
        }
        let full = crate::translate("t.yaml", &rs, Some(&vm)).expect("translates");
        let limits = |c: &crate::ProxyConfig| -> Vec<String> {
            let local = c.local.as_ref().expect("a local side");
            local
                .inbound_ports
                .iter()
                .flat_map(|p| p.rate_limits.iter().map(|l| l.policy.clone()))
                .collect()
        };
        assert!(limits(&full).contains(&"shop/a-route".to_string()));
        let subset: Vec<&Resource> = ix.needs(&rs, &vm, []).iter().map(|&i| &rs[i]).collect();
        let part = crate::translate("t.yaml", &subset, Some(&vm)).expect("translates");
        assert_eq!(limits(&part), limits(&full));
        // A proxy of another namespace is not concerned by that route's changes.
        let billing = "pay/billing-1".parse().unwrap();
        assert!(!ix.may_concern(
            &rs,
            "HTTPRoute",
            &"shop/catalog".parse().unwrap(),
            &[],
            &billing
        ));
        assert!(ix.may_concern(&rs, "HTTPRoute", &"shop/catalog".parse().unwrap(), &[], &vm));
        crate::fuzzing::scope(&rs);
    }
}
