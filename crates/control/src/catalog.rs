//! The control plane's view of the store: every resource, parsed once, kept current from the
//! store's watch, and compiled into what proxies get.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use serde::Serialize;
use serde_json::Value;
use trellis_model::{
    proxy::cluster_key,
    refs::{resolve, Partial, Unresolved},
    resource::{NamespacedName, PolicyTargetRef, Spec},
    scope::ScopeIndex,
    ConfigError, ProxyConfig, Resource,
};
use trellis_store::{Change, Event, Key, Listing, Object};

/// The store kind of health records: one per Workload whose agent reports its health
/// (`_Health/NAMESPACE/NAME`), kept out of the Workload itself so that a health change is no
/// change of the resource (no new `resourceVersion`, nothing to conflict with an apply).
pub(crate) const HEALTH_KIND: &str = "_Health";

/// What a Workload's agent last said of its health (or the control plane, for a silent one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub(crate) struct Health {
    /// Its checks pass.
    pub(crate) healthy: bool,
    /// Checks that passed after failing, counted by its agent (only grows).
    #[serde(default)]
    pub(crate) recoveries: u64,
}

/// The health record's key of Workload `key`.
pub(crate) fn health_key(key: &Key) -> Key {
    Key::new(HEALTH_KIND, &key.namespace, &key.name)
}

/// The key of the Workload whose health record is `health`.
pub(crate) fn workload_key(health: &Key) -> Key {
    Key::new("Workload", &health.namespace, &health.name)
}

/// A stored object, kept compact: its document as JSON text, parsed again when read (rarely:
/// the API, views and diagnostics read it; proxies get the parsed resource and its YAML). A
/// parsed `Value` of a Workload costs ~4.7 KB of heap, ten times its text, and the catalog
/// holds one for every resource of the mesh.
#[derive(Clone, Debug)]
pub(crate) struct Stored {
    /// Where it lives.
    pub(crate) key: Key,
    /// Resource version: the store revision of its last write.
    pub(crate) version: u64,
    doc: StoredDoc,
}

#[derive(Clone, Debug)]
enum StoredDoc {
    /// Serialized (`serde_json` reads it back as the same value).
    Text(Box<str>),
    /// Kept parsed: nested deeper than `serde_json` reads back.
    Value(Box<Value>),
}

/// Nesting `serde_json` reads back (its parser stops at 128 levels).
const READ_BACK_DEPTH: usize = 100;

fn deeper_than(v: &Value, depth: usize) -> bool {
    if depth == 0 {
        return true;
    }
    match v {
        Value::Array(a) => a.iter().any(|v| deeper_than(v, depth - 1)),
        Value::Object(m) => m.values().any(|v| deeper_than(v, depth - 1)),
        _ => false,
    }
}

impl Stored {
    pub(crate) fn new(o: Object) -> Self {
        let doc = match serde_json::to_string(&o.doc) {
            Ok(text) if !deeper_than(&o.doc, READ_BACK_DEPTH) => StoredDoc::Text(text.into()),
            _ => StoredDoc::Value(Box::new(o.doc)),
        };
        Self {
            key: o.key,
            version: o.version,
            doc,
        }
    }

    /// The document, as stored.
    pub(crate) fn doc(&self) -> Value {
        match &self.doc {
            StoredDoc::Text(t) => serde_json::from_str(t).unwrap_or_else(|e| {
                // Not reached: the text was written from a value of bounded depth.
                tracing::error!(key = %self.key, error = %e, "stored document does not read back");
                Value::Null
            }),
            StoredDoc::Value(v) => Value::clone(v),
        }
    }

    /// Whether the stored document is `doc`.
    pub(crate) fn is(&self, doc: &Value) -> bool {
        match &self.doc {
            StoredDoc::Text(t) => serde_json::to_string(doc).is_ok_and(|d| *d == **t),
            StoredDoc::Value(v) => **v == *doc,
        }
    }
}

/// One stored resource.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// As stored.
    pub(crate) object: Stored,
    /// A Workload's health record, if it has one.
    pub(crate) health: Option<Health>,
    /// Parsed, as proxies get it (a Workload with its health).
    pub(crate) resource: Arc<Resource>,
    /// Its YAML as proxies get it, rendered once.
    pub(crate) yaml: Arc<str>,
    /// Hash of the YAML: the document's xDS version.
    pub(crate) version: Arc<str>,
    /// Its xDS name, `KIND/NAMESPACE/NAME`, made once (a compile names every resource).
    pub(crate) name: Arc<str>,
}

/// Stored document `doc` of `key` as proxies get it, parsed and as YAML: a Workload's with
/// its health record in `spec`.
fn served(key: &Key, doc: &Value, health: Option<Health>) -> Result<(Resource, String), String> {
    let served = match health {
        Some(h) if key.kind == "Workload" => {
            let mut doc = doc.clone();
            let spec = &mut doc["spec"];
            spec["healthy"] = h.healthy.into();
            let written = spec["healthRecoveries"].as_u64().unwrap_or(0);
            if h.recoveries > written {
                spec["healthRecoveries"] = h.recoveries.into();
            }
            std::borrow::Cow::Owned(doc)
        }
        _ => std::borrow::Cow::Borrowed(doc),
    };
    let resource: Resource = serde_json::from_value(served.clone().into_owned())
        .map_err(|e| format!("{key}: stored document does not parse: {e}"))?;
    let yaml =
        serde_saphyr::to_string(&*served).map_err(|e| format!("{key}: cannot render: {e}"))?;
    Ok((resource, yaml))
}

impl Entry {
    /// Parse a stored object (stored objects were validated on the way in; one that no
    /// longer parses, a newer schema wrote it, is reported and left out); a Workload with
    /// its health record, if it has one: proxies get the health in
    /// the Workload's `spec.healthy` and `spec.healthRecoveries` (the proxy's model; a static
    /// file writes them there), while the stored object is left as it was written.
    pub(crate) fn with_health(object: Object, health: Option<Health>) -> Result<Self, String> {
        let (resource, yaml) = served(&object.key, &object.doc, health)?;
        Ok(Self::new(Stored::new(object), health, resource, yaml))
    }

    /// The same stored object with `health` instead (its document read back, kept as it
    /// was stored).
    fn rehealthed(&self, health: Option<Health>) -> Result<Self, String> {
        let (resource, yaml) = served(&self.object.key, &self.object.doc(), health)?;
        Ok(Self::new(self.object.clone(), health, resource, yaml))
    }

    fn new(object: Stored, health: Option<Health>, resource: Resource, yaml: String) -> Self {
        Self {
            name: doc_name(&object.key).into(),
            object,
            health,
            resource: Arc::new(resource),
            version: content_version(&yaml),
            yaml: yaml.into(),
        }
    }

    /// Whether it is healthy, as far as anyone said: its health record, else what its
    /// `spec.healthy` says (a Workload applied with it).
    pub(crate) fn healthy(&self) -> Option<bool> {
        self.health
            .map(|h| h.healthy)
            .or_else(|| match &self.resource.spec {
                // Without a record the resource was read from the stored document itself.
                Spec::Workload(w) => w.healthy,
                _ => None,
            })
    }
}

/// Resources by key: a persistent map, so that a state's copy of the catalog shares every
/// entry and node a later change does not touch (a copy costs nothing, a change the path to
/// what it changed).
pub(crate) type Entries = imbl::OrdMap<Arc<Key>, Arc<Entry>>;

/// Every resource at one store revision.
#[derive(Clone, Debug, Default)]
pub(crate) struct Catalog {
    /// Store revision.
    pub(crate) revision: u64,
    /// Resources by key (shared keys: a state's copy of the catalog costs no key copies).
    pub(crate) entries: Entries,
    /// Health records, by the key of their Workload.
    pub(crate) health: imbl::OrdMap<Arc<Key>, Health>,
    /// What changed since the last compile, for the next one to redo only that.
    since: Since,
}

/// What changed in a catalog since it was last compiled.
#[derive(Clone, Debug, Default)]
enum Since {
    /// Nothing proxies get.
    #[default]
    Nothing,
    /// Only these Workloads: written, removed or given a health record (an agent's
    /// heartbeat, a check that flaps, containers coming and going). Whether that can be
    /// compiled without the rest is [`Compiled::with_workloads`]'s to say.
    Workloads(Vec<Arc<Key>>),
    /// Anything else (a resource written or removed, a new listing): compile it all.
    Anything,
}

impl Since {
    fn workload(&mut self, key: &Arc<Key>) {
        match self {
            Since::Nothing => *self = Since::Workloads(vec![key.clone()]),
            Since::Workloads(keys) => keys.push(key.clone()),
            Since::Anything => {}
        }
    }
}

/// Whether Workloads `a` and `b` (one key) refer to and are selected by the same: the same
/// labels and upstreams. What the compile works out of references (which Services select
/// which Workloads, what resolves) then holds for both.
fn same_references(a: &Resource, b: &Resource) -> bool {
    let (Spec::Workload(wa), Spec::Workload(wb)) = (&a.spec, &b.spec) else {
        return false;
    };
    let ups = |w: &trellis_model::resource::WorkloadSpec| {
        w.upstreams
            .iter()
            .map(|u| (u.service.value.clone(), u.port, u.bind))
            .collect::<Vec<_>>()
    };
    a.metadata.labels == b.metadata.labels && ups(wa) == ups(wb)
}

/// Whether `r` is a Workload without upstreams: one that refers to nothing.
fn refers_to_nothing(r: &Resource) -> bool {
    matches!(&r.spec, Spec::Workload(w) if w.upstreams.is_empty())
}

/// Set `key`'s value in `map`, the key copied only when it is new: an update or a health flap
/// replaces the value of a key the map holds.
fn put<V: Clone>(map: &mut imbl::OrdMap<Arc<Key>, V>, key: &Key, v: V) {
    match map.get_mut(key) {
        Some(slot) => *slot = v,
        None => drop(map.insert(Arc::new(key.clone()), v)),
    }
}

impl Catalog {
    /// Take a stored object in.
    fn insert(&mut self, o: Object) {
        if o.key.kind == HEALTH_KIND {
            let workload = workload_key(&o.key);
            match serde_json::from_value::<Health>(o.doc) {
                Ok(h) => put(&mut self.health, &workload, h),
                Err(e) => tracing::error!(key = %o.key, error = %e, "skipping health record"),
            }
            self.rehealth(&workload);
            return;
        }
        // The control plane's own records (the admin token's digest) are not resources.
        if o.key.kind.starts_with('_') {
            return;
        }
        let health = self.health.get(&o.key).copied();
        match Entry::with_health(o, health) {
            Ok(e) => {
                let e = Arc::new(e);
                put(&mut self.entries, &e.object.key, e.clone());
                self.changed(&e.object.key);
            }
            Err(e) => {
                self.since = Since::Anything;
                tracing::error!(error = %e, "skipping stored resource");
            }
        }
    }

    fn remove(&mut self, k: &Key) {
        if k.kind == HEALTH_KIND {
            let workload = workload_key(k);
            self.health.remove(&workload);
            self.rehealth(&workload);
        } else if !k.kind.starts_with('_') && self.entries.remove(k).is_some() {
            self.changed(k);
        }
    }

    /// Note that resource `key` was written or removed: a Workload is noted by key, any
    /// other change means compiling it all.
    fn changed(&mut self, key: &Key) {
        if key.kind != "Workload" {
            self.since = Since::Anything;
            return;
        }
        let key = match self.entries.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => Arc::new(key.clone()),
        };
        self.since.workload(&key);
    }

    /// Build Workload `key`'s entry again with its health record (or without).
    fn rehealth(&mut self, key: &Key) {
        let Some((key, e)) = self.entries.get_key_value(key) else {
            return;
        };
        let health = self.health.get(&**key).copied();
        if e.health == health {
            return;
        }
        match e.rehealthed(health) {
            Ok(e) => {
                let key = key.clone();
                self.entries.insert(key.clone(), Arc::new(e));
                self.since.workload(&key);
            }
            // Left as it was served (not reached: it was parsed with a record before).
            Err(e) => tracing::error!(error = %e, "skipping stored resource"),
        }
    }

    /// From a full listing.
    pub(crate) fn from_listing(l: Listing) -> Self {
        let mut c = Self {
            revision: l.revision,
            since: Since::Anything,
            ..Self::default()
        };
        for o in l.objects {
            c.insert(o);
        }
        c
    }

    /// Apply one committed batch; whether it changed a resource (a batch of the control
    /// plane's own records only, a replica's heartbeat say, changes nothing proxies get).
    pub(crate) fn apply(&mut self, c: Change) -> bool {
        let mut changed = false;
        for e in c.events {
            let key = match &e {
                Event::Put(o) => &o.key,
                Event::Delete(k) => k,
            };
            changed |= !key.kind.starts_with('_') || key.kind == HEALTH_KIND;
            match e {
                Event::Put(o) => self.insert(o),
                Event::Delete(k) => self.remove(&k),
            }
        }
        self.revision = c.revision;
        changed
    }
}

/// A status condition, in Gateway API's shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Condition {
    /// `Accepted` or `ResolvedRefs`.
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    /// `True` or `False`.
    pub(crate) status: &'static str,
    /// CamelCase reason.
    pub(crate) reason: &'static str,
    /// Human-readable detail.
    pub(crate) message: String,
}

/// What proxies get at one revision, and each resource's status.
pub(crate) struct Compiled {
    /// Store revision.
    pub(crate) revision: u64,
    /// Conditions per resource (routes, policies, workloads with references).
    pub(crate) conditions: Arc<HashMap<Key, Vec<Condition>>>,
    /// The resources proxies get, in the catalog's order of keys, without what does not
    /// resolve (see [`serve_partly`]; a resource with nothing left to serve is left out).
    pub(crate) effective: Vec<Item>,
    /// The same, one YAML document each, by xDS name (`KIND/NAMESPACE/NAME`), with a version
    /// that changes exactly when the document does (Trellis proxies get these by delta xDS).
    /// A persistent map: the state after a change shares what the change did not touch.
    pub(crate) docs: imbl::OrdMap<Arc<str>, Doc>,
    /// The previous compiled revision and the document names that changed since (added,
    /// changed or removed), so that a stream in step only looks at those.
    pub(crate) delta: Option<(u64, Vec<Arc<str>>)>,
    /// The mesh-wide translation (no local workload), for Envoy's resource types; made on
    /// first use, so a fleet of Trellis proxies only never pays for it.
    mesh: std::sync::OnceLock<Result<ProxyConfig, ConfigError>>,
    /// The Workloads served, to check a node's claim; made on first use (Envoy's listeners
    /// for a workload ask), not by every compile. Shared by the states made from this one
    /// when no Workload came or went (`with_workloads`).
    workloads: Arc<std::sync::OnceLock<std::collections::HashSet<NamespacedName>>>,
    /// What refers to what among `effective`, to work out each proxy's scope; made on first
    /// use (a state no scoped stream looks at never pays for it). Shared like `workloads`,
    /// or kept up to date when Workloads came, went or were relabelled.
    scope: Arc<std::sync::OnceLock<ScopeIndex>>,
}

/// A resource proxies get: its key, the parsed resource, its YAML, the YAML's version and its
/// xDS name.
pub(crate) type Served<'a> = (&'a Arc<Key>, Arc<Resource>, Arc<str>, Arc<str>, Arc<str>);

/// A resource proxies get, with its key and its xDS name: one pointer, so that a state made
/// from the one before copies one pointer per resource.
#[derive(Clone, Debug)]
pub(crate) struct Item(Arc<ItemParts>);

#[derive(Debug)]
struct ItemParts {
    key: Arc<Key>,
    name: Arc<str>,
    resource: Arc<Resource>,
}

impl Item {
    fn new(key: Arc<Key>, name: Arc<str>, resource: Arc<Resource>) -> Self {
        Self(Arc::new(ItemParts {
            key,
            name,
            resource,
        }))
    }

    /// Its xDS name.
    fn name(&self) -> &Arc<str> {
        &self.0.name
    }

    /// Its key in the catalog.
    fn key(&self) -> &Arc<Key> {
        &self.0.key
    }
}

impl std::ops::Deref for Item {
    type Target = Resource;
    fn deref(&self) -> &Resource {
        &self.0.resource
    }
}

impl std::borrow::Borrow<Resource> for Item {
    fn borrow(&self) -> &Resource {
        &self.0.resource
    }
}

/// The resources proxies get, and the conditions that explain what was left out.
pub(crate) fn effective(entries: &Entries) -> (Vec<Served<'_>>, HashMap<Key, Vec<Condition>>) {
    let list: Vec<(&Arc<Key>, &Arc<Entry>)> = entries.iter().collect();
    let resources: Vec<&Resource> = list.iter().map(|(_, e)| e.resource.as_ref()).collect();
    let mut problems: HashMap<usize, Vec<Unresolved>> = HashMap::new();
    for u in resolve(&resources) {
        problems.entry(u.index).or_default().push(u);
    }
    let mut out = Vec::with_capacity(list.len());
    let mut conditions = HashMap::new();
    for (i, (key, e)) in list.into_iter().enumerate() {
        let r = &e.resource;
        let has_refs = matches!(
            r.spec,
            Spec::HttpRoute(_) | Spec::GrpcRoute(_) | Spec::BackendPolicy(_)
        ) || matches!(&r.spec, Spec::Workload(w) if !w.upstreams.is_empty())
            || matches!(&r.spec, Spec::AuthorizationPolicy(a) if !a.target_refs.is_empty())
            || matches!(&r.spec, Spec::PeerAuthentication(a) if !a.target_refs.is_empty())
            || matches!(&r.spec, Spec::RateLimitPolicy(_));
        match problems.remove(&i) {
            None => {
                if has_refs {
                    conditions.insert(Key::clone(key), resolved_ok());
                }
                out.push((
                    key,
                    r.clone(),
                    e.yaml.clone(),
                    e.version.clone(),
                    e.name.clone(),
                ));
            }
            Some(ps) => {
                let message = ps
                    .iter()
                    .map(|p| format!("{}: {}", p.field, p.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                // A policy none of whose targets resolves holds nothing, and a route none of
                // whose parents does routes nothing: left out.
                let lost = |f: fn(&Partial) -> bool| {
                    ps.iter()
                        .filter(|p| p.partial.as_ref().is_some_and(f))
                        .count()
                };
                let (targets, parents) = (
                    lost(|p| matches!(p, Partial::Target(_))),
                    lost(|p| matches!(p, Partial::Parent(_))),
                );
                let partial = ps.iter().all(|p| p.partial.is_some())
                    && (targets == 0 || targets < targets_of(&r.spec).map_or(0, Vec::len))
                    && (parents == 0 || parents < parents_of(&r.spec).map_or(0, Vec::len));
                conditions.insert(
                    Key::clone(key),
                    unresolved(message, partial.then(|| served_without(&ps))),
                );
                if partial {
                    let (r, doc) = serve_partly(r, e.object.doc(), &ps);
                    let yaml = serde_saphyr::to_string(&doc).unwrap_or_default();
                    let version = content_version(&yaml);
                    out.push((key, Arc::new(r), yaml.into(), version, e.name.clone()));
                }
            }
        }
    }
    (out, conditions)
}

fn resolved_ok() -> Vec<Condition> {
    vec![
        Condition {
            kind: "Accepted",
            status: "True",
            reason: "Accepted",
            message: String::new(),
        },
        Condition {
            kind: "ResolvedRefs",
            status: "True",
            reason: "ResolvedRefs",
            message: String::new(),
        },
    ]
}

/// `r` as served while the parts `ps` name do not resolve (each has a [`Partial`]), and its
/// document to match: a Workload without those upstreams, a policy without those targets, a
/// route without those parents and mirrors and with those backends marked `unresolved`
/// (their share is answered 500).
fn serve_partly(r: &Resource, mut doc: Value, ps: &[Unresolved]) -> (Resource, Value) {
    let mut r = Resource::clone(r);
    let (mut upstreams, mut targets, mut parents) = (Vec::new(), Vec::new(), Vec::new());
    let mut mirrors: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for p in ps {
        match p.partial {
            Some(Partial::Upstream(j)) => upstreams.push(j),
            Some(Partial::Target(j)) => targets.push(j),
            Some(Partial::Parent(j)) => parents.push(j),
            Some(Partial::Mirror { rule, filter }) => mirrors.entry(rule).or_default().push(filter),
            Some(Partial::Backend { rule, backend }) => {
                if let Some(b) = rule_parts(&mut r.spec, rule).and_then(|(b, _)| b.get_mut(backend))
                {
                    b.unresolved = Some(p.message.clone());
                }
                let at = format!("/spec/rules/{rule}/backendRefs/{backend}");
                if let Some(Value::Object(b)) = doc.pointer_mut(&at) {
                    b.insert("unresolved".into(), Value::String(p.message.clone()));
                }
            }
            None => {}
        }
    }
    let ups = match &mut r.spec {
        Spec::Workload(w) => Some(&mut w.upstreams),
        _ => None,
    };
    drop_at(ups, &mut doc, "/spec/upstreams", upstreams);
    drop_at(
        targets_of_mut(&mut r.spec),
        &mut doc,
        "/spec/targetRefs",
        targets,
    );
    let refs = match &mut r.spec {
        Spec::HttpRoute(h) => Some(&mut h.parent_refs),
        Spec::GrpcRoute(g) => Some(&mut g.parent_refs),
        _ => None,
    };
    drop_at(refs, &mut doc, "/spec/parentRefs", parents);
    for (rule, filters) in mirrors {
        let list = rule_parts(&mut r.spec, rule).map(|(_, f)| f);
        drop_at(
            list,
            &mut doc,
            &format!("/spec/rules/{rule}/filters"),
            filters,
        );
    }
    (r, doc)
}

/// Remove the items at `at` from the parsed `list` and from the document's array at `path`
/// (the same items: the document is what was parsed).
fn drop_at<T>(list: Option<&mut Vec<T>>, doc: &mut Value, path: &str, mut at: Vec<usize>) {
    at.sort_unstable();
    at.dedup();
    // From the last, so that the indices of those before stay right.
    if let Some(list) = list {
        for &j in at.iter().rev() {
            if j < list.len() {
                list.remove(j);
            }
        }
    }
    if let Some(Value::Array(a)) = doc.pointer_mut(path) {
        for &j in at.iter().rev() {
            if j < a.len() {
                a.remove(j);
            }
        }
    }
}

/// A route's parents.
fn parents_of(spec: &Spec) -> Option<&Vec<trellis_model::resource::ParentRef>> {
    match spec {
        Spec::HttpRoute(h) => Some(&h.parent_refs),
        Spec::GrpcRoute(g) => Some(&g.parent_refs),
        _ => None,
    }
}

/// A policy's targets.
fn targets_of(spec: &Spec) -> Option<&Vec<PolicyTargetRef>> {
    match spec {
        Spec::AuthorizationPolicy(p) => Some(&p.target_refs),
        Spec::PeerAuthentication(p) => Some(&p.target_refs),
        Spec::BackendPolicy(p) => Some(&p.target_refs),
        Spec::RateLimitPolicy(p) => Some(&p.target_refs),
        _ => None,
    }
}

fn targets_of_mut(spec: &mut Spec) -> Option<&mut Vec<PolicyTargetRef>> {
    match spec {
        Spec::AuthorizationPolicy(p) => Some(&mut p.target_refs),
        Spec::PeerAuthentication(p) => Some(&mut p.target_refs),
        Spec::BackendPolicy(p) => Some(&mut p.target_refs),
        Spec::RateLimitPolicy(p) => Some(&mut p.target_refs),
        _ => None,
    }
}

/// A route's rule `i`: its backends and its filters.
fn rule_parts(
    spec: &mut Spec,
    i: usize,
) -> Option<(
    &mut Vec<trellis_model::resource::BackendRef>,
    &mut Vec<trellis_model::resource::RouteFilter>,
)> {
    match spec {
        Spec::HttpRoute(h) => h
            .rules
            .get_mut(i)
            .map(|x| (&mut x.backend_refs, &mut x.filters)),
        Spec::GrpcRoute(g) => g
            .rules
            .get_mut(i)
            .map(|x| (&mut x.backend_refs, &mut x.filters)),
        _ => None,
    }
}

/// What a resource served in part goes without, for its `Accepted` condition.
fn served_without(ps: &[Unresolved]) -> String {
    let has = |f: fn(&Partial) -> bool| ps.iter().any(|p| p.partial.as_ref().is_some_and(f));
    let mut parts = Vec::new();
    if has(|p| matches!(p, Partial::Upstream(_))) {
        parts.push("served without its unresolved upstreams");
    }
    if has(|p| matches!(p, Partial::Backend { .. })) {
        parts.push("served; the requests its rules send to an unresolved backend are answered 500");
    }
    if has(|p| matches!(p, Partial::Mirror { .. })) {
        parts.push("served without its mirrors to unresolved backends");
    }
    if has(|p| matches!(p, Partial::Target(_))) {
        parts.push("holds its targets that resolve");
    }
    if has(|p| matches!(p, Partial::Parent(_))) {
        parts.push("routes for its parents that resolve");
    }
    parts.join("; ")
}

/// The conditions of a resource with references that do not resolve: served in part (with
/// what it goes without), or not served.
fn unresolved(message: String, served: Option<String>) -> Vec<Condition> {
    let partial = served.is_some();
    vec![
        Condition {
            kind: "Accepted",
            status: if partial { "True" } else { "False" },
            reason: if partial {
                "Accepted"
            } else {
                "BackendNotFound"
            },
            message: served.unwrap_or_else(|| "not served until its references resolve".into()),
        },
        Condition {
            kind: "ResolvedRefs",
            status: "False",
            reason: "BackendNotFound",
            message,
        },
    ]
}

/// A served route's backend with a weight that does not resolve: the proxies answer its
/// share of the route's requests 500.
pub(crate) struct Dangling<'a> {
    /// The route.
    pub(crate) route: &'a Resource,
    /// Its rule's index.
    pub(crate) rule: usize,
    /// The backend's weight, and the rule's whole.
    pub(crate) weight: (u32, u64),
    /// `NAMESPACE/NAME:PORT`.
    pub(crate) backend: String,
    /// Why it does not resolve.
    pub(crate) why: &'a str,
}

impl Compiled {
    /// Every served route's backend that does not resolve and has a weight.
    pub(crate) fn dangling(&self) -> Vec<Dangling<'_>> {
        let mut out = Vec::new();
        for r in &self.effective {
            let rules: Vec<_> = match &r.spec {
                Spec::HttpRoute(h) => h.rules.iter().map(|x| &x.backend_refs).collect(),
                Spec::GrpcRoute(g) => g.rules.iter().map(|x| &x.backend_refs).collect(),
                _ => continue,
            };
            let ns = &r.metadata.namespace;
            for (rule, backends) in rules.into_iter().enumerate() {
                let whole: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
                for b in backends.iter().filter(|b| b.weight > 0) {
                    if let Some(why) = &b.unresolved {
                        out.push(Dangling {
                            route: r,
                            rule,
                            weight: (b.weight, whole),
                            backend: cluster_key(
                                &NamespacedName {
                                    namespace: b.namespace.clone().unwrap_or_else(|| ns.clone()),
                                    name: b.name.value.clone(),
                                },
                                b.port,
                            ),
                            why,
                        });
                    }
                }
            }
        }
        out
    }

    /// The xDS names of what the proxy serving `local` needs, calling also the Services
    /// `also` (asked for on demand): see [`trellis_model::scope`].
    pub(crate) fn scope(
        &self,
        local: &NamespacedName,
        also: impl IntoIterator<Item = NamespacedName>,
    ) -> std::collections::HashSet<Arc<str>> {
        let ix = self.scope_index();
        ix.needs(&self.effective, local, also)
            .into_iter()
            .map(|i| self.effective[i].name().clone())
            .collect()
    }

    /// Whether a change of the document named `name` (`KIND/NAMESPACE/NAME`), as it is now,
    /// can concern the proxy of `local` whose scope holds `services` and not that document
    /// (see [`ScopeIndex::may_concern`]); true for a name it cannot read.
    pub(crate) fn may_concern(
        &self,
        name: &str,
        services: &[NamespacedName],
        local: &NamespacedName,
    ) -> bool {
        let Some((kind, id)) = name.split_once('/') else {
            return true;
        };
        let Ok(id) = id.parse::<NamespacedName>() else {
            return true;
        };
        let ix = self.scope_index();
        ix.may_concern(&self.effective, kind, &id, services, local)
    }

    fn scope_index(&self) -> &ScopeIndex {
        self.scope.get_or_init(|| ScopeIndex::new(&self.effective))
    }

    /// The state of `catalog` after only Workloads `keys` changed since this state was
    /// compiled from it ([`Since::Workloads`]), when nothing another resource resolves
    /// against changed with them: their health, a rewrite that keeps their labels and
    /// upstreams (a new address, a new weight), or a Workload without upstreams added,
    /// removed or relabelled. It is this state with their documents replaced, added or
    /// removed, what it worked out of references shared (the conditions) or kept up to date
    /// (the scope index, when it was made), and the changed names known without comparing
    /// every document. Costs a copy of the list of resources (a pointer each), a path of the
    /// document map per Workload and, when one comes, goes or is relabelled, a pass over the
    /// scope index's numbers: not a compile of the mesh. `None` otherwise — a Workload with
    /// upstreams that comes, goes or changes them (what its conditions say resolves), or one
    /// served otherwise than stored (without an unresolved upstream): compile it all then.
    fn with_workloads(&self, catalog: &Catalog, mut keys: Vec<Arc<Key>>) -> Option<Compiled> {
        keys.sort_unstable();
        keys.dedup();
        let mut effective = self.effective.clone();
        let mut docs = self.docs.clone();
        // Once one comes, goes or is relabelled: this state's index to keep up to date, or
        // none (made anew on first use) when this state had none.
        let mut index: Option<Option<ScopeIndex>> = None;
        fn kept<'a>(
            index: &'a mut Option<Option<ScopeIndex>>,
            built: Option<&ScopeIndex>,
        ) -> Option<&'a mut ScopeIndex> {
            index.get_or_insert_with(|| built.cloned()).as_mut()
        }
        let mut changed = Vec::with_capacity(keys.len());
        for key in &keys {
            let partial = self.conditions.get(&**key).is_some_and(|c| {
                c.iter()
                    .any(|c| c.kind == "ResolvedRefs" && c.status == "False")
            });
            if partial {
                return None;
            }
            let at = effective.binary_search_by(|it| it.key().as_ref().cmp(key.as_ref()));
            let name = match (at, catalog.entries.get(&**key)) {
                (Ok(i), Some(e)) => {
                    // Changed back within one batch: not a change.
                    if docs.get(&e.name).is_some_and(|d| d.version == e.version) {
                        continue;
                    }
                    let was = effective[i].clone();
                    if !same_references(&was, &e.resource) {
                        if !(refers_to_nothing(&was) && refers_to_nothing(&e.resource)) {
                            return None;
                        }
                        if let Some(ix) = kept(&mut index, self.scope.get()) {
                            ix.replace_workload(i, &was, &e.resource);
                        }
                    }
                    effective[i] = Item::new(key.clone(), e.name.clone(), e.resource.clone());
                    docs.insert(e.name.clone(), Doc::of(e));
                    e.name.clone()
                }
                (Err(i), Some(e)) => {
                    if !refers_to_nothing(&e.resource) {
                        return None;
                    }
                    if let Some(ix) = kept(&mut index, self.scope.get()) {
                        ix.insert_workload(i, &e.resource);
                    }
                    let item = Item::new(key.clone(), e.name.clone(), e.resource.clone());
                    effective.insert(i, item);
                    docs.insert(e.name.clone(), Doc::of(e));
                    e.name.clone()
                }
                (Ok(i), None) => {
                    let was = effective.remove(i);
                    if !refers_to_nothing(&was) {
                        return None;
                    }
                    if let Some(ix) = kept(&mut index, self.scope.get()) {
                        ix.remove_workload(i, &was);
                    }
                    docs.remove(was.name());
                    was.name().clone()
                }
                (Err(_), None) => continue,
            };
            changed.push(name);
        }
        changed.sort_unstable();
        changed.dedup();
        let (scope, workloads) = match index {
            Some(index) => {
                let scope = std::sync::OnceLock::new();
                if let Some(ix) = index {
                    let _ = scope.set(ix);
                }
                // The served Workloads are made again when Envoy's listeners ask.
                (Arc::new(scope), Arc::default())
            }
            None => (self.scope.clone(), self.workloads.clone()),
        };
        Some(Compiled {
            revision: catalog.revision,
            conditions: self.conditions.clone(),
            effective,
            docs,
            delta: Some((self.revision, changed)),
            mesh: Default::default(),
            workloads,
            scope,
        })
    }

    /// The mesh-wide translation, made once.
    pub(crate) fn mesh(&self) -> &Result<ProxyConfig, ConfigError> {
        self.mesh.get_or_init(|| {
            let m = trellis_model::translate("store", &self.effective, None);
            if let Err(e) = &m {
                tracing::error!(revision = self.revision, error = %e, "stored resources do not translate");
            }
            m
        })
    }

    /// Whether `w` is a Workload proxies are served.
    pub(crate) fn serves_workload(&self, w: &NamespacedName) -> bool {
        self.workloads
            .get_or_init(|| {
                self.effective
                    .iter()
                    .filter(|r| matches!(r.spec, Spec::Workload(_)))
                    .map(|r| r.id())
                    .collect()
            })
            .contains(w)
    }

    /// Whether the mesh-wide translation was made.
    #[cfg(test)]
    pub(crate) fn mesh_made(&self) -> bool {
        self.mesh.get().is_some()
    }

    /// Note what changed since `prev`.
    pub(crate) fn diff_from(&mut self, prev: &Compiled) {
        let mut names = Vec::new();
        let (mut a, mut b) = (prev.docs.iter().peekable(), self.docs.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some((n, _)), None) => {
                    names.push((*n).clone());
                    a.next();
                }
                (None, Some((n, _))) => {
                    names.push((*n).clone());
                    b.next();
                }
                (Some((na, da)), Some((nb, db))) => match na.cmp(nb) {
                    std::cmp::Ordering::Less => {
                        names.push((*na).clone());
                        a.next();
                    }
                    std::cmp::Ordering::Greater => {
                        names.push((*nb).clone());
                        b.next();
                    }
                    std::cmp::Ordering::Equal => {
                        // Mostly the same shared version, not only an equal one.
                        if !Arc::ptr_eq(&da.version, &db.version) && da.version != db.version {
                            names.push((*nb).clone());
                        }
                        a.next();
                        b.next();
                    }
                },
            }
        }
        self.delta = Some((prev.revision, names));
    }
}

/// One document as proxies get it.
#[derive(Clone, Debug)]
pub(crate) struct Doc {
    /// Content hash, as the xDS resource version.
    pub(crate) version: Arc<str>,
    /// The YAML.
    pub(crate) yaml: Arc<str>,
}

impl Doc {
    fn of(e: &Entry) -> Self {
        Self {
            version: e.version.clone(),
            yaml: e.yaml.clone(),
        }
    }
}

fn content_version(yaml: &str) -> Arc<str> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    yaml.hash(&mut h);
    format!("{:016x}", h.finish()).into()
}

/// The xDS name of a stored resource.
pub(crate) fn doc_name(k: &Key) -> String {
    format!("{}/{}/{}", k.kind, k.namespace, k.name)
}

impl Catalog {
    /// Compile what proxies get, as the state after `prev` (the last compile of this
    /// catalog): only what changed since when that was only Workloads and
    /// [`Compiled::with_workloads`] can, else everything; the changed names noted either
    /// way.
    pub(crate) fn compile_after(&mut self, prev: &Compiled) -> Compiled {
        let alone = match std::mem::take(&mut self.since) {
            Since::Nothing => prev.with_workloads(self, Vec::new()),
            Since::Workloads(keys) => prev.with_workloads(self, keys),
            Since::Anything => None,
        };
        alone.unwrap_or_else(|| {
            let mut c = self.compile();
            c.diff_from(prev);
            c
        })
    }

    /// Compile what proxies get.
    pub(crate) fn compile(&self) -> Compiled {
        let (eff, conditions) = effective(&self.entries);
        let docs = eff
            .iter()
            .map(|(_, _, y, v, n)| {
                let d = Doc {
                    version: v.clone(),
                    yaml: y.clone(),
                };
                (n.clone(), d)
            })
            .collect();
        let effective: Vec<Item> = eff
            .into_iter()
            .map(|(k, r, _, _, n)| Item::new(k.clone(), n, r))
            .collect();
        Compiled {
            revision: self.revision,
            conditions: Arc::new(conditions),
            effective,
            docs,
            delta: None,
            mesh: Default::default(),
            workloads: Default::default(),
            scope: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A stored document is kept as text and reads back as it was written, numbers, strings
    /// and nesting alike; one nested deeper than `serde_json` reads back stays a value.
    #[test]
    fn a_stored_document_reads_back_as_written() {
        let doc = json!({
            "kind": "Workload",
            "metadata": { "name": "w", "namespace": "test", "labels": { "a": "1", "é": "\u{1F600}" } },
            "spec": { "address": "127.0.0.1", "weight": 0.25, "port": 18446744073709551615u64, "n": -3 },
        });
        let key = Key::new("Workload", "test", "w");
        let s = Stored::new(Object {
            key: key.clone(),
            version: 3,
            doc: doc.clone(),
        });
        assert!(matches!(s.doc, StoredDoc::Text(_)));
        assert_eq!(s.doc(), doc);
        assert!(s.is(&doc));
        assert!(!s.is(&json!({ "kind": "Workload" })));
        assert_eq!((s.key.clone(), s.version, s.doc()), (key.clone(), 3, doc));
        let mut deep = json!(1);
        for _ in 0..200 {
            deep = json!([deep]);
        }
        let s = Stored::new(Object {
            key,
            version: 4,
            doc: deep.clone(),
        });
        assert!(matches!(s.doc, StoredDoc::Value(_)));
        assert_eq!(s.doc(), deep);
        assert!(s.is(&deep));
    }

    /// The state compiled from `mesh` (namespace `t`) as the store's first revision.
    fn compiled_from(mesh: &str) -> Compiled {
        let events = trellis_model::parse_values("t.yaml", mesh)
            .unwrap()
            .into_iter()
            .map(|doc: Value| {
                let key = Key::new(
                    doc["kind"].as_str().unwrap(),
                    "t",
                    doc["metadata"]["name"].as_str().unwrap(),
                );
                Event::Put(Object {
                    key,
                    version: 1,
                    doc,
                })
            })
            .collect();
        let mut c = Catalog::default();
        c.apply(Change {
            revision: 1,
            events,
        });
        c.compile()
    }

    /// A route with a backend, a mirror or one of its parents that does not resolve is
    /// served (its backend marked, its mirror and that parent left out) and says so; one
    /// none of whose parents resolves is not served. Before, the first and third were
    /// withdrawn whole and the second failed the translation of every proxy's set (each
    /// refused every update after it).
    #[test]
    fn a_route_is_served_without_what_does_not_resolve() {
        let mesh = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: a, namespace: t }
spec: { selector: { app: a }, ports: [{ name: http, port: 80, targetPort: 8080 }] }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: split, namespace: t }
spec:
  parentRefs: [{ name: a, kind: Service }]
  rules:
    - matches: [{ path: { type: PathPrefix, value: /copy } }]
      filters:
        - type: RequestMirror
          requestMirror: { backendRef: { name: shadow, port: 80 } }
        - type: RequestHeaderModifier
          requestHeaderModifier: { set: [{ name: x-kept, value: "1" }] }
      backendRefs: [{ name: a, port: 80 }]
    - backendRefs: [{ name: a, port: 80, weight: 3 }, { name: gone, port: 80 }, { name: a, port: 81 }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: orphan, namespace: t }
spec:
  parentRefs: [{ name: nothing, kind: Service }]
  rules: [{ backendRefs: [{ name: a, port: 80 }] }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: two-parents, namespace: t }
spec:
  parentRefs: [{ name: nothing, kind: Service }, { name: a, kind: Service, port: 80 }]
  rules: [{ matches: [{ path: { type: PathPrefix, value: /two } }], backendRefs: [{ name: a, port: 80 }] }]
"#;
        let compiled = compiled_from(mesh);
        let split = &compiled.conditions[&Key::new("HTTPRoute", "t", "split")];
        let brief: Vec<_> = split.iter().map(|c| (c.kind, c.status, c.reason)).collect();
        assert_eq!(
            brief,
            [
                ("Accepted", "True", "Accepted"),
                ("ResolvedRefs", "False", "BackendNotFound")
            ]
        );
        assert_eq!(
            split[1].message,
            "spec.rules[0].filters[0].requestMirror.backendRef: Service t/shadow not found; spec.rules[1].backendRefs[1]: Service t/gone not found; spec.rules[1].backendRefs[2]: Service t/a has no port 81"
        );
        assert!(
            split[0].message.contains("answered 500") && split[0].message.contains("mirrors"),
            "{}",
            split[0].message
        );
        let orphan = &compiled.conditions[&Key::new("HTTPRoute", "t", "orphan")];
        assert_eq!(
            (orphan[0].status, orphan[0].reason),
            ("False", "BackendNotFound")
        );
        assert!(!compiled.docs.contains_key("HTTPRoute/t/orphan"));
        let two = &compiled.conditions[&Key::new("HTTPRoute", "t", "two-parents")];
        assert_eq!((two[0].status, two[1].status), ("True", "False"));
        assert!(
            two[0].message.contains("its parents that resolve")
                && two[1].message == "spec.parentRefs[0]: Service t/nothing not found",
            "{two:?}"
        );
        let served: Value =
            serde_saphyr::from_str(&compiled.docs["HTTPRoute/t/two-parents"].yaml).unwrap();
        assert_eq!(
            served["spec"]["parentRefs"],
            json!([{ "name": "a", "kind": "Service", "port": 80 }])
        );
        // What proxies get: the same document marked, which translates as it is.
        let served: Value =
            serde_saphyr::from_str(&compiled.docs["HTTPRoute/t/split"].yaml).unwrap();
        assert_eq!(
            served["spec"]["rules"][0]["filters"],
            json!([{ "type": "RequestHeaderModifier", "requestHeaderModifier": { "set": [{ "name": "x-kept", "value": "1" }] } }])
        );
        assert_eq!(
            served["spec"]["rules"][1]["backendRefs"],
            json!([
                { "name": "a", "port": 80, "weight": 3 },
                { "name": "gone", "port": 80, "unresolved": "Service t/gone not found" },
                { "name": "a", "port": 81, "unresolved": "Service t/a has no port 81" },
            ])
        );
        let mesh = compiled.mesh().as_ref().expect("the served set translates");
        let port = &mesh.services[&"t/a".parse().unwrap()].ports[0];
        // By precedence: /copy, then /two (the route with two parents, on a), then split's
        // catch-all rule.
        let names: Vec<String> = port.routes.iter().map(|r| r.name.to_string()).collect();
        assert!(names[1].contains("two-parents"), "{names:?}");
        let copy = &port.routes[0];
        assert!(copy.mirrors.is_empty() && copy.request_headers.set.len() == 1);
        let weights: Vec<_> = port.routes[2]
            .backends
            .iter()
            .map(|b| (b.cluster.as_str(), b.weight, b.unresolved.is_some()))
            .collect();
        assert_eq!(
            weights,
            [
                ("t/a:80", 3, false),
                ("t/gone:80", 1, true),
                ("t/a:81", 1, true)
            ]
        );
    }

    /// No deletion can leave proxies a set that does not translate: from a mesh that uses
    /// every kind of reference (two parents, weighted backends, a mirror, a GRPCRoute,
    /// every policy on Services and on a route, a rollout, upstreams), each resource and
    /// each pair of resources deleted, the served set translates for the whole mesh and for
    /// each caller's scope (what its proxy gets and translates itself). A mirror to a
    /// deleted Service failed this before: every proxy refused every update after it.
    #[test]
    fn no_deletion_leaves_proxies_a_set_they_cannot_translate() {
        let svc = |name: &str, protocol: &str| {
            format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {name}, namespace: t }}\nspec: {{ selector: {{ app: {name} }}, ports: [{{ name: p, port: 80, targetPort: 8080, protocol: {protocol} }}] }}\n")
        };
        let docs = [
            svc("a", "HTTP"),
            svc("b", "HTTP"),
            svc("c", "HTTP"),
            svc("shadow", "HTTP"),
            svc("rpc", "GRPC"),
            svc("rpc-v2", "GRPC"),
            "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: a-1, namespace: t, labels: { app: a } }\nspec: { address: 127.0.0.2, identity: a }\n".into(),
            "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: b-1, namespace: t, labels: { app: b } }\nspec: { address: 127.0.0.3 }\n".into(),
            "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: caller, namespace: t, labels: { app: caller } }\nspec:\n  address: 127.0.0.4\n  identity: caller\n  upstreams: [{ service: a.t, port: 80, bind: 127.0.0.1:9001 }, { service: rpc.t, port: 80, bind: 127.0.0.1:9002 }, { service: c.t, port: 80, bind: 127.0.0.1:9003 }]\n".into(),
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: { name: split, namespace: t }\nspec:\n  parentRefs: [{ name: a, port: 80 }, { name: c }]\n  rules:\n    - matches: [{ path: { type: PathPrefix, value: /copy } }]\n      filters: [{ type: RequestMirror, requestMirror: { backendRef: { name: shadow, port: 80 }, percent: 50 } }]\n      backendRefs: [{ name: a, port: 80 }]\n    - backendRefs: [{ name: a, port: 80, weight: 3 }, { name: b, port: 80, weight: 1 }]\n".into(),
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: { name: rpc, namespace: t }\nspec:\n  parentRefs: [{ name: rpc, port: 80 }]\n  rules: [{ backendRefs: [{ name: rpc, port: 80, weight: 9 }, { name: rpc-v2, port: 80, weight: 1 }] }]\n".into(),
            "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: readers, namespace: t }\nspec:\n  targetRefs: [{ name: a }, { name: b }]\n  action: ALLOW\n  rules: [{ from: [{ identities: [t/caller] }] }]\n".into(),
            "apiVersion: trellis.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: { name: loose, namespace: t }\nspec:\n  targetRefs: [{ name: b }, { name: c }]\n  mtls: { mode: PERMISSIVE }\n".into(),
            "apiVersion: trellis.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: { name: limits, namespace: t }\nspec:\n  targetRefs: [{ name: a }, { name: rpc }]\n  connectionPool: { maxRequests: 50 }\n".into(),
            "apiVersion: trellis.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: { name: calm, namespace: t }\nspec:\n  targetRefs: [{ name: b }, { kind: HTTPRoute, name: split }]\n  perCaller: [{ requests: 5, per: 1m }]\n".into(),
            "apiVersion: trellis.dev/v1alpha1\nkind: Rollout\nmetadata: { name: rpc, namespace: t }\nspec: { service: rpc, stable: rpc, canary: rpc-v2 }\n".into(),
        ];
        let whole = compiled_from(&docs.join("---\n"));
        let whole_mesh = whole.mesh().as_ref().expect("the whole mesh translates");
        assert_eq!(whole.effective.len(), docs.len(), "{:?}", whole.conditions);
        assert!(!whole_mesh.authz.is_empty() && !whole_mesh.clusters.is_empty());
        let caller: NamespacedName = "t/caller".parse().unwrap();
        let mut sets = 0;
        for i in 0..docs.len() {
            for j in i..docs.len() {
                let kept: Vec<&str> = (0..docs.len())
                    .filter(|&k| k != i && k != j)
                    .map(|k| docs[k].as_str())
                    .collect();
                let c = compiled_from(&kept.join("---\n"));
                let gone = format!("without documents {i} and {j}");
                if let Err(e) = c.mesh() {
                    panic!("{gone}: the served set does not translate: {e}");
                }
                if c.serves_workload(&caller) {
                    let scope = c.scope(&caller, []);
                    let scoped: Vec<&Resource> = c
                        .effective
                        .iter()
                        .filter(|r| scope.contains(r.name()))
                        .map(|r| &**r)
                        .collect();
                    if let Err(e) = trellis_model::translate("xds", &scoped, Some(&caller)) {
                        panic!("{gone}: the caller's set does not translate: {e}");
                    }
                }
                sets += 1;
            }
        }
        assert_eq!(sets, docs.len() * (docs.len() + 1) / 2);
    }

    /// A policy with a target that does not resolve keeps holding the targets that do: an
    /// ALLOW policy on Services a and gone (deleted) still lets only its callers reach a.
    /// Before, the whole policy was left out, and a was open to every caller. A policy with
    /// no target left holds nothing and is left out (served with no targets, an
    /// AuthorizationPolicy would hold its whole namespace).
    #[test]
    fn a_policy_keeps_holding_its_targets_that_resolve() {
        let mesh = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: a, namespace: t }
spec: { selector: { app: a }, ports: [{ name: http, port: 80, targetPort: 8080 }] }
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: readers, namespace: t }
spec:
  targetRefs: [{ name: gone }, { name: a }]
  action: ALLOW
  rules: [{ from: [{ identities: [t/reader] }] }]
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: nothing-left, namespace: t }
spec:
  targetRefs: [{ name: gone }]
  action: DENY
  rules: [{}]
"#;
        let compiled = compiled_from(mesh);
        let readers = &compiled.conditions[&Key::new("AuthorizationPolicy", "t", "readers")];
        assert_eq!((readers[0].status, readers[1].status), ("True", "False"));
        assert!(
            readers[0]
                .message
                .contains("holds its targets that resolve")
                && readers[1].message == "spec.targetRefs[0]: Service t/gone not found",
            "{readers:?}"
        );
        let left = &compiled.conditions[&Key::new("AuthorizationPolicy", "t", "nothing-left")];
        assert_eq!(left[0].status, "False");
        assert!(!compiled
            .docs
            .contains_key("AuthorizationPolicy/t/nothing-left"));
        let served: Value =
            serde_saphyr::from_str(&compiled.docs["AuthorizationPolicy/t/readers"].yaml).unwrap();
        assert_eq!(served["spec"]["targetRefs"], json!([{ "name": "a" }]));
        // As the proxies of a decide: only t/reader gets in.
        let mesh = compiled.mesh().as_ref().expect("the served set translates");
        let a: NamespacedName = "t/a".parse().unwrap();
        let caller = |name: &str| trellis_model::proxy::PeerIdentity {
            trust_domain: "trellis.local".into(),
            namespace: "t".into(),
            name: name.into(),
        };
        let allowed = |who: &trellis_model::proxy::PeerIdentity| {
            trellis_model::proxy::authorize(
                &mesh.authz,
                &trellis_model::proxy::AuthzRequest {
                    source: Some(who),
                    service: &a,
                    port: 80,
                    http: Some(("GET", "/")),
                },
            )
            .allowed
        };
        assert!(allowed(&caller("reader")));
        assert!(!allowed(&caller("stranger")));
    }

    /// Everything proxies and the API read of a compiled state, to compare two.
    fn seen(c: &Compiled) -> String {
        let docs: Vec<_> = c
            .docs
            .iter()
            .map(|(n, d)| format!("{n} {} {}", d.version, d.yaml))
            .collect();
        let mut conditions: Vec<_> = c.conditions.iter().map(|c| format!("{c:?}")).collect();
        conditions.sort();
        format!(
            "{} {:?} {docs:?} {conditions:?} {:?}",
            c.revision, c.delta, c.effective
        )
    }

    /// After a change of Workloads only (their health, their address, or one without
    /// upstreams added, removed or relabelled), the control plane redoes only their documents
    /// and shares the rest or keeps it up to date (the conditions, the scope index); what it
    /// makes is what a whole compile and comparison make, and every Workload's scope is the
    /// same, at every step of a run of health records written and removed among Workloads
    /// rewritten (with their labels and upstreams or others), added and removed, callers
    /// removed and back with their upstreams (compiled whole), a Workload with an unresolved
    /// upstream (served without it: compiled whole) and records of Workloads that do not
    /// exist.
    #[test]
    fn a_change_of_workloads_compiles_to_what_a_whole_compile_makes() {
        let mesh = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: a, namespace: t }
spec: { selector: { app: a }, ports: [{ name: http, port: 80, targetPort: 8080 }] }
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: b, namespace: t }
spec: { selector: { app: b }, ports: [{ name: http, port: 80, targetPort: 8080 }] }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: split, namespace: t }
spec:
  parentRefs: [{ name: a, kind: Service }]
  rules: [{ backendRefs: [{ name: a, port: 80, weight: 9 }, { name: b, port: 80, weight: 1 }] }]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: caller, namespace: t }
spec: { address: 127.0.0.9, upstreams: [{ service: a.t, port: 80, bind: 127.0.0.1:9001 }] }
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: dangling, namespace: t, labels: { app: b } }
spec:
  address: 127.0.0.8
  upstreams: [{ service: b.t, port: 80, bind: 127.0.0.1:9002 }, { service: gone.t, port: 80, bind: 127.0.0.1:9003 }]
"#;
        let workload = |name: &str, app: &str, n: u64| {
            json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "Workload",
              "metadata": {"name": name, "namespace": "t", "labels": {"app": app}},
              "spec": {"address": format!("127.0.1.{}", n % 200), "weight": n % 7 + 1}})
        };
        let docs: Vec<Value> = trellis_model::parse_values("t.yaml", mesh)
            .unwrap()
            .into_iter()
            .filter(|v| !v.is_null())
            .collect();
        // A Workload as first written, at another address: the same references.
        let moved = |name: &str, n: u64| {
            let mut doc = docs
                .iter()
                .find(|d| d["metadata"]["name"] == name)
                .unwrap()
                .clone();
            doc["spec"]["address"] = format!("127.0.2.{}", n % 200).into();
            doc
        };
        let mut events: Vec<Event> = docs
            .iter()
            .cloned()
            .map(|doc| {
                let key = Key::new(
                    doc["kind"].as_str().unwrap(),
                    "t",
                    doc["metadata"]["name"].as_str().unwrap(),
                );
                Event::Put(Object {
                    key,
                    version: 1,
                    doc,
                })
            })
            .collect();
        let names = ["a-1", "a-2", "b-1", "caller", "dangling", "nobody"];
        for (i, n) in names[..3].iter().enumerate() {
            let doc = workload(n, &n[..1], i as u64);
            events.push(Event::Put(Object {
                key: Key::new("Workload", "t", n),
                version: 1,
                doc,
            }));
        }
        let mut c = Catalog::default();
        c.apply(Change {
            revision: 1,
            events,
        });
        let mut prev = c.compile();
        let (mut shared, mut whole, mut rewrites_shared, mut reindexed) = (0, 0, 0, 0);
        let scopes = |c: &Compiled| -> Vec<Vec<Arc<str>>> {
            names
                .iter()
                .map(|n| {
                    let local = NamespacedName {
                        namespace: "t".into(),
                        name: n.to_string(),
                    };
                    let mut scope: Vec<_> = c.scope(&local, []).into_iter().collect();
                    scope.sort();
                    scope
                })
                .collect()
        };
        // A fixed pseudo-random walk (xorshift), so that a failure replays.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for step in 0..400u64 {
            let mut batch = Vec::new();
            for _ in 0..1 + step % 3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let name = names[(x % names.len() as u64) as usize];
                let key = Key::new("Workload", "t", name);
                batch.push(match (x >> 8) % 16 {
                    0 => Event::Put(Object {
                        doc: workload(name, if x & 1 == 0 { "a" } else { "b" }, x >> 20),
                        key,
                        version: step + 2,
                    }),
                    1 if name == "caller" || name == "dangling" => Event::Put(Object {
                        doc: moved(name, x >> 20),
                        key,
                        version: step + 2,
                    }),
                    1 => Event::Delete(key),
                    // A caller goes (and comes back with its upstreams, above).
                    6 if name == "caller" || name == "dangling" => Event::Delete(key),
                    // A new address or weight, its labels as first written.
                    4 | 5 => Event::Put(Object {
                        doc: if name == "caller" || name == "dangling" {
                            moved(name, x >> 20)
                        } else {
                            workload(name, &name[..1], x >> 20)
                        },
                        key,
                        version: step + 2,
                    }),
                    2 | 3 => Event::Delete(health_key(&key)),
                    _ => Event::Put(Object {
                        key: health_key(&key),
                        version: step + 2,
                        doc: json!(Health {
                            healthy: (x >> 30) & 1 == 0,
                            recoveries: (x >> 31) % 3,
                        }),
                    }),
                });
            }
            let rewrite = batch
                .iter()
                .any(|e| matches!(e, Event::Put(o) if o.key.kind == "Workload"));
            c.apply(Change {
                revision: step + 2,
                events: batch,
            });
            let mut expected = c.compile();
            expected.diff_from(&prev);
            let next = c.compile_after(&prev);
            assert_eq!(seen(&next), seen(&expected), "step {step}");
            // The scope index kept up to date says what one made anew says.
            assert_eq!(scopes(&next), scopes(&expected), "step {step}");
            if Arc::ptr_eq(&next.conditions, &prev.conditions) {
                shared += 1;
                rewrites_shared += usize::from(rewrite);
                reindexed += usize::from(!Arc::ptr_eq(&next.scope, &prev.scope));
            } else {
                whole += 1;
            }
            prev = next;
        }
        // Both ways were taken, often.
        assert!(
            shared > 250 && whole > 40 && rewrites_shared > 60 && reindexed > 30,
            "{shared} shared ({rewrites_shared} with a Workload written, {reindexed} with one added, removed or relabelled), {whole} whole"
        );
    }

    #[test]
    fn a_health_record_changes_what_proxies_get_and_not_the_resource() {
        let key = Key::new("Workload", "test", "w");
        let doc = json!({
            "apiVersion": "trellis.dev/v1alpha1",
            "kind": "Workload",
            "metadata": { "name": "w", "namespace": "test" },
            "spec": { "address": "127.0.0.1" },
        });
        let mut c = Catalog::default();
        let put = |key: Key, version, doc| Change {
            revision: version,
            events: vec![Event::Put(Object { key, version, doc })],
        };
        assert!(c.apply(put(key.clone(), 5, doc.clone())));
        let healthy = c.entries[&key].clone();
        assert_eq!(healthy.healthy(), None);
        // The agent says it is down: a record of its own.
        let down = json!(Health {
            healthy: false,
            recoveries: 2
        });
        assert!(c.apply(put(health_key(&key), 6, down)), "proxies are told");
        let e = c.entries[&key].clone();
        assert_eq!(e.object.version, 5, "the resource did not change");
        assert!(e.object.is(&doc), "nor its stored document");
        assert_ne!(e.version, healthy.version, "what proxies get did");
        assert_eq!(e.healthy(), Some(false));
        let Spec::Workload(w) = &e.resource.spec else {
            panic!("a workload")
        };
        assert_eq!((w.healthy, w.health_recoveries), (Some(false), Some(2)));
        // A new apply of the Workload keeps its health; the record's removal ends it.
        assert!(c.apply(put(key.clone(), 7, doc.clone())));
        assert_eq!(c.entries[&key].healthy(), Some(false));
        let gone = Change {
            revision: 8,
            events: vec![Event::Delete(health_key(&key))],
        };
        assert!(c.apply(gone));
        assert_eq!(c.entries[&key].healthy(), None);
        assert_eq!(c.entries[&key].version, healthy.version);
    }
}

/// What a compile costs at fleet size (not a check: run it by hand, in release,
/// `cargo test --release -p trellis-control --lib compile_cost -- --ignored --nocapture`):
/// 1,000 Services, 10,000 endpoint Workloads, 1,000 callers of 5 Services each, one health
/// record changed per round, as the control plane compiles after each change (`FULL=1`: the
/// whole compile and comparison it does after any other change; `CHURN=1`: a Workload
/// without upstreams added or removed per round instead, a container coming and going).
#[cfg(test)]
mod cost {
    use super::*;
    use serde_json::json;

    #[test]
    #[ignore]
    fn compile_cost() {
        let mut c = Catalog::default();
        let mut events = Vec::new();
        let mut v = 0;
        let mut put = |key: Key, doc: Value, events: &mut Vec<Event>| {
            v += 1;
            events.push(Event::Put(Object {
                key,
                version: v,
                doc,
            }));
        };
        for s in 0..1000 {
            put(
                Key::new("Service", "bench", &format!("svc-{s}")),
                json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "Service",
                  "metadata": {"name": format!("svc-{s}"), "namespace": "bench"},
                  "spec": {"selector": {"app": format!("svc-{s}")}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
                &mut events,
            );
        }
        for w in 0..10_000usize {
            put(
                Key::new("Workload", "bench", &format!("wl-{w}")),
                json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "Workload",
                  "metadata": {"name": format!("wl-{w}"), "namespace": "bench", "labels": {"app": format!("svc-{}", w % 1000)}},
                  "spec": {"address": format!("10.{}.{}.{}", (w >> 16) & 255, (w >> 8) & 255, w & 255),
                           "environment": "vm", "locality": {"region": "r1", "zone": format!("z{}", w % 4)}}}),
                &mut events,
            );
        }
        for i in 0..1000usize {
            let ups: Vec<Value> = (0..5)
                .map(|k| json!({"service": format!("svc-{}.bench", (i * 7 + k * 131) % 1000), "port": 80, "bind": "127.0.0.1:0"}))
                .collect();
            put(
                Key::new("Workload", "bench", &format!("client-{i}")),
                json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "Workload",
                  "metadata": {"name": format!("client-{i}"), "namespace": "bench"},
                  "spec": {"address": "10.200.0.1", "upstreams": ups}}),
                &mut events,
            );
        }
        c.apply(Change {
            revision: v,
            events,
        });
        let full = std::env::var_os("FULL").is_some();
        let churn = std::env::var_os("CHURN").is_some();
        let mut prev = Arc::new(c.compile());
        let caller = NamespacedName {
            namespace: "bench".into(),
            name: "client-0".into(),
        };
        prev.scope(&caller, []);
        let rounds: u32 = std::env::var("ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(20);
        let mut parts = [std::time::Duration::ZERO; 5];
        let began = std::time::Instant::now();
        for r in 0..rounds {
            let key = Key::new("Workload", "bench", &format!("wl-{r}"));
            let revision = v + 1 + u64::from(r);
            let event = if churn {
                // A container comes (even rounds) and goes (odd rounds).
                let key = Key::new("Workload", "bench", &format!("ctr-{}", r / 2));
                if r % 2 == 0 {
                    Event::Put(Object {
                        key,
                        version: revision,
                        doc: json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "Workload",
                          "metadata": {"name": format!("ctr-{}", r / 2), "namespace": "bench", "labels": {"app": format!("svc-{}", r % 1000)}},
                          "spec": {"address": "10.250.0.1", "environment": "container"}}),
                    })
                } else {
                    Event::Delete(key)
                }
            } else {
                Event::Put(Object {
                    key: health_key(&key),
                    version: revision,
                    doc: json!(Health {
                        healthy: r % 2 == 0,
                        recoveries: 0
                    }),
                })
            };
            c.apply(Change {
                revision,
                events: vec![event],
            });
            let t = std::time::Instant::now();
            let next = if full {
                let mut next = c.compile();
                parts[0] += t.elapsed();
                let t = std::time::Instant::now();
                next.diff_from(&prev);
                parts[1] += t.elapsed();
                next
            } else {
                let next = c.compile_after(&prev);
                parts[0] += t.elapsed();
                next
            };
            // What a scoped stream works out of it (the index is made once per state).
            let t = std::time::Instant::now();
            next.scope(&caller, []);
            parts[4] += t.elapsed();
            let t = std::time::Instant::now();
            let state = crate::state::State {
                catalog: c.clone(),
                compiled: Arc::new(next),
            };
            parts[2] += t.elapsed();
            let t = std::time::Instant::now();
            prev = state.compiled.clone();
            drop(state);
            parts[3] += t.elapsed();
        }
        eprintln!(
            "{} after {}, {} resources: {:?} each (compile {:?}, diff {:?}, clone {:?}, drop {:?}, a scope {:?})",
            if full { "whole compile" } else { "compile_after" },
            if churn { "a Workload came or went" } else { "a health change" },
            c.entries.len(),
            began.elapsed() / rounds,
            parts[0] / rounds,
            parts[1] / rounds,
            parts[2] / rounds,
            parts[3] / rounds,
            parts[4] / rounds,
        );
    }
}
