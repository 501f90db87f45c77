//! Applying a file: parse every document, check the set that would result, then write all
//! documents in one store transaction, or none.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;
use trellis_model::{resource::Spec, ConfigError, Resource};
use trellis_store::{Expect, Key, Store, StoreError, Write};

use crate::{
    catalog::{effective, Catalog, Entry, Stored},
    state::State,
    vips::Allocations,
};

/// Why an apply was refused. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    /// A document is malformed, or the resulting set does not make sense.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// A stale `resourceVersion`, or a concurrent change.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What happened to one document.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Applied {
    /// Kind.
    pub(crate) kind: String,
    /// Namespace.
    pub(crate) namespace: String,
    /// Name.
    pub(crate) name: String,
    /// `created`, `configured` or `unchanged`.
    pub(crate) action: &'static str,
    /// The stored version after the apply.
    pub(crate) resource_version: String,
}

/// Kinds the API knows, with the short names `trellis get` accepts.
pub(crate) const KINDS: &[(&str, &[&str])] = &[
    ("Service", &["service", "services", "svc"]),
    ("Workload", &["workload", "workloads", "wl"]),
    ("HTTPRoute", &["httproute", "httproutes", "route", "routes"]),
    ("GRPCRoute", &["grpcroute", "grpcroutes"]),
    (
        "BackendTrafficPolicy",
        &[
            "backendtrafficpolicy",
            "backendtrafficpolicies",
            "btp",
            "policy",
        ],
    ),
    (
        "AuthorizationPolicy",
        &["authorizationpolicy", "authorizationpolicies", "authz"],
    ),
    (
        "PeerAuthentication",
        &["peerauthentication", "peerauthentications", "pa", "mtls"],
    ),
    ("TrustBundle", &["trustbundle", "trustbundles", "bundle"]),
    (
        "RateLimitPolicy",
        &["ratelimitpolicy", "ratelimitpolicies", "ratelimit", "rl"],
    ),
    ("Rollout", &["rollout", "rollouts", "ro"]),
];

/// The kinds as `trellis get` takes them, with their shortest name: what an unknown kind's
/// answer lists (`services (svc), workloads (wl), …`).
pub(crate) fn kind_names() -> String {
    KINDS
        .iter()
        .map(|(_, names)| {
            let plural = names.get(1).copied().unwrap_or(names[0]);
            match names.iter().skip(2).min_by_key(|n| n.len()) {
                Some(short) => format!("{plural} ({short})"),
                None => plural.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The canonical kind for a name as a user types it.
pub(crate) fn canonical_kind(s: &str) -> Option<&'static str> {
    let l = s.to_ascii_lowercase();
    KINDS
        .iter()
        .find(|(k, aliases)| k.eq_ignore_ascii_case(&l) || aliases.contains(&l.as_str()))
        .map(|(k, _)| *k)
}

/// The range virtual IPs are assigned from: 10.96.0.0/16 (Kubernetes' default service
/// range, so that the host route operators already keep for it serves here too).
pub const VIRTUAL_IP_RANGE: (std::net::Ipv4Addr, u8) = (std::net::Ipv4Addr::new(10, 96, 0, 0), 16);

fn set_virtual_ip(doc: &mut Value, ip: Option<std::net::Ipv4Addr>) {
    let (Some(ip), Some(spec)) = (ip, doc.get_mut("spec").and_then(Value::as_object_mut)) else {
        return;
    };
    spec.insert("virtualIP".into(), Value::String(ip.to_string()));
}

/// FNV-1a of `namespace/name`: where the search for a Service's address starts (offsets 0
/// and size-1, network and broadcast, are skipped).
fn name_hash(namespace: &str, name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in format!("{namespace}/{name}").bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h
}

/// Give every planned Service without a virtual IP a free one from [`VIRTUAL_IP_RANGE`]. The
/// search starts at a hash of the service's name, so replicas choose alike and a service
/// deleted and made again usually gets its old address back.
fn assign_virtual_ips(
    candidate: &mut crate::catalog::Entries,
    planned: &mut [(Key, Value, Expect, &Resource)],
    alloc: &mut Allocations,
) {
    let used = |c: &crate::catalog::Entries| -> std::collections::HashSet<u32> {
        c.values()
            .filter_map(|e| match &e.resource.spec {
                Spec::Service(s) => s.virtual_ip.map(u32::from),
                _ => None,
            })
            .collect()
    };
    let mut taken = used(candidate);
    let (base, bits) = VIRTUAL_IP_RANGE;
    let size = 1u32 << (32 - bits);
    for (key, doc, _, _) in planned.iter_mut() {
        let Some(entry) = candidate.get(key) else {
            continue;
        };
        if !matches!(&entry.resource.spec, Spec::Service(s) if s.virtual_ip.is_none()) {
            continue;
        }
        let h = name_hash(&key.namespace, &key.name);
        let me = format!("{}/{}", key.namespace, key.name);
        let free = (0..size - 2)
            .map(|i| u32::from(base) + 1 + (h.wrapping_add(i) % (size - 2)))
            .find(|ip| !taken.contains(ip) && alloc.free_for(std::net::Ipv4Addr::from(*ip), &me));
        let Some(ip) = free else {
            // A full range: the service stays without a virtual IP (explicit mode still works).
            tracing::warn!(service = %key.name, "no free virtual IP left");
            continue;
        };
        taken.insert(ip);
        let ip = std::net::Ipv4Addr::from(ip);
        alloc.claim(ip, &me);
        set_virtual_ip(doc, Some(ip));
        let mut resource = (*entry.resource).clone();
        if let Spec::Service(s) = &mut resource.spec {
            s.virtual_ip = Some(ip);
        }
        let mut e = (**entry).clone();
        e.object = Stored::new(trellis_store::Object {
            key: key.clone(),
            version: e.object.version,
            doc: doc.clone(),
        });
        e.resource = Arc::new(resource);
        candidate.insert(Arc::new(key.clone()), Arc::new(e));
    }
}

fn key_of(r: &Resource) -> Key {
    Key::new(r.kind(), &r.metadata.namespace, &r.metadata.name)
}

/// The document as stored: namespace filled in, server-owned fields removed.
fn normalize(mut doc: Value, r: &Resource) -> Value {
    if let Some(obj) = doc.as_object_mut() {
        obj.remove("status");
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
            meta.insert(
                "namespace".into(),
                Value::String(r.metadata.namespace.clone()),
            );
        }
    }
    doc
}

fn expect_of(file: &str, r: &Resource) -> Result<Expect, ConfigError> {
    match r.metadata.resource_version.as_deref() {
        None | Some("") => Ok(Expect::Any),
        Some(v) => v
            .parse()
            .map(Expect::Version)
            .map_err(|_| ConfigError::Invalid {
                file: file.into(),
                line: r.line,
                field: format!("{} {}: metadata.resourceVersion", r.kind(), r.id()),
                message: format!("{v:?} is not a resource version"),
            }),
    }
}

/// Check `text` (from `file`) against `current` and write it.
pub(crate) async fn apply(
    store: &Store,
    current: &Catalog,
    file: &str,
    text: &str,
) -> Result<Vec<Applied>, ApplyError> {
    let resources = trellis_model::parse_documents(file, text)?;
    // The same documents as plain JSON, to store them as written.
    let docs: Vec<Value> = trellis_model::parse_values(file, text)?;
    if docs.len() != resources.len() {
        return Err(ConfigError::Syntax {
            file: file.into(),
            line: 0,
            column: 0,
            message: "empty documents are not allowed".into(),
        }
        .into());
    }
    // What is stored must read back (the typed reading checked the file; the store keeps
    // the plain values).
    for (r, d) in resources.iter().zip(&docs) {
        if let Err(ConfigError::Invalid { field, message, .. }) =
            trellis_model::resource_from_json(file, d)
        {
            return Err(ConfigError::Invalid {
                file: file.into(),
                line: r.line,
                field: format!("{} {}: {field}", r.kind(), r.id()),
                message,
            }
            .into());
        }
    }
    apply_documents(
        store,
        current,
        file,
        resources.into_iter().zip(docs).collect(),
    )
    .await
}

/// Check typed documents (each with the JSON it is stored as) against `current` and write
/// them, as [`apply`] does for a file.
pub(crate) async fn apply_documents(
    store: &Store,
    current: &Catalog,
    file: &str,
    documents: Vec<(Resource, Value)>,
) -> Result<Vec<Applied>, ApplyError> {
    apply_with(store, current, file, documents, Vec::new()).await
}

/// As [`apply_documents`], committing `extra` (the control plane's own records, each with
/// its precondition) in the same batch: all of it is written, or none. An empty list of
/// documents writes only `extra`.
async fn apply_with(
    store: &Store,
    current: &Catalog,
    file: &str,
    documents: Vec<(Resource, Value)>,
    extra: Vec<Write>,
) -> Result<Vec<Applied>, ApplyError> {
    if documents.is_empty() && !extra.is_empty() {
        store.write(extra).await?;
        return Ok(Vec::new());
    }
    let (resources, docs): (Vec<Resource>, Vec<Value>) = documents.into_iter().unzip();
    if resources.is_empty() {
        return Err(ConfigError::Syntax {
            file: file.into(),
            line: 0,
            column: 0,
            message: "no documents".into(),
        }
        .into());
    }
    // The set as it would be, checked as a whole.
    let mut candidate = current.entries.clone();
    let mut planned: Vec<(Key, Value, Expect, &Resource)> = Vec::new();
    let mut seen = BTreeMap::new();
    for (r, doc) in resources.iter().zip(docs) {
        let key = key_of(r);
        if let Some(first) = seen.insert(key.clone(), r.line) {
            return Err(ConfigError::Invalid {
                file: file.into(),
                line: r.line,
                field: format!("{} {}: metadata.name", r.kind(), r.id()),
                message: format!("defined twice in this apply (first at line {first})"),
            }
            .into());
        }
        trellis_model::check_standalone(file, r)?;
        let expect = expect_of(file, r)?;
        let mut doc = normalize(doc, r);
        let mut resource = r.clone();
        resource.metadata.resource_version = None;
        if let Spec::Service(s) = &mut resource.spec {
            // An update that does not name the virtual IP keeps the one assigned before.
            if s.virtual_ip.is_none() {
                s.virtual_ip = current
                    .entries
                    .get(&key)
                    .and_then(|e| match &e.resource.spec {
                        Spec::Service(old) => old.virtual_ip,
                        _ => None,
                    });
                set_virtual_ip(&mut doc, s.virtual_ip);
            }
        }
        let entry = Entry {
            object: Stored::new(trellis_store::Object {
                key: key.clone(),
                version: 0,
                doc: doc.clone(),
            }),
            health: None,
            resource: Arc::new(resource),
            yaml: Arc::from(""),
            version: Arc::from(""),
            name: Arc::from(""),
        };
        candidate.insert(Arc::new(key.clone()), Arc::new(entry));
        planned.push((key, doc, expect, r));
    }
    // Addresses this apply keeps or asks for must not be held by another Service, including
    // one made on another replica that this one does not follow yet.
    let mut alloc = Allocations::read(store, current).await?;
    for (key, _, _, r) in &planned {
        let Some(Spec::Service(s)) = candidate.get(key).map(|e| &e.resource.spec) else {
            continue;
        };
        let Some(ip) = s.virtual_ip else { continue };
        let me = format!("{}/{}", key.namespace, key.name);
        match alloc.owner(ip) {
            Some(other) if other != me => {
                return Err(ConfigError::Invalid {
                    file: file.into(),
                    line: r.line,
                    field: format!("Service {}: spec.virtualIP", r.id()),
                    message: format!("{ip} is already the virtual IP of Service {other}"),
                }
                .into())
            }
            _ => alloc.claim(ip, &me),
        }
    }
    assign_virtual_ips(&mut candidate, &mut planned, &mut alloc);
    let (eff, _) = effective(&candidate);
    // The set as it was translated (it was checked as this one is): what this apply changes
    // is checked with what it can break, not with every Workload of the fleet.
    let planned_keys: std::collections::HashSet<&Key> = planned.iter().map(|p| &p.0).collect();
    let changed: Vec<usize> = eff
        .iter()
        .enumerate()
        .filter(|(_, (k, ..))| planned_keys.contains(&***k))
        .map(|(i, _)| i)
        .collect();
    let resources_eff: Vec<Arc<Resource>> = eff.into_iter().map(|s| s.1).collect();
    let check: Vec<&Resource> = trellis_model::scope::to_check(&resources_eff, &changed)
        .into_iter()
        .map(|i| &*resources_eff[i])
        .collect();
    trellis_model::translate(file, &check, None)?;
    // A workload with explicit upstreams is also checked as its own proxy would see it: on
    // what its proxy gets (its scope, which translates for it as the whole set does), so
    // that an apply of a thousand such workloads does not translate the mesh a thousand
    // times.
    let mut scope = None;
    for (_, _, _, r) in &planned {
        if matches!(&r.spec, Spec::Workload(w) if !w.upstreams.is_empty()) {
            let ix =
                scope.get_or_insert_with(|| trellis_model::scope::ScopeIndex::new(&resources_eff));
            let subset: Vec<&Resource> = ix
                .needs(&resources_eff, &r.id(), [])
                .into_iter()
                .map(|i| &*resources_eff[i])
                .collect();
            trellis_model::translate(file, &subset, Some(&r.id()))?;
        }
    }
    let mut writes = Vec::new();
    let mut results = Vec::new();
    for (key, doc, expect, _) in planned {
        let old = current.entries.get(&key);
        let action = match old {
            None => "created",
            Some(o) if o.object.is(&doc) => "unchanged",
            Some(_) => "configured",
        };
        if let (Some(o), Expect::Version(v)) = (old, expect) {
            if o.object.version != v {
                return Err(StoreError::Conflict {
                    key,
                    expected: format!("version {v}"),
                    found: format!("version {}", o.object.version),
                }
                .into());
            }
        }
        results.push(Applied {
            kind: key.kind.clone(),
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            action,
            resource_version: old
                .map(|o| o.object.version.to_string())
                .unwrap_or_default(),
        });
        if action != "unchanged" {
            writes.push(Write {
                key,
                doc: Some(doc),
                // Without a version, the write still must not overwrite a change made since
                // this apply was checked.
                expect: match (expect, old) {
                    (Expect::Any, Some(o)) => Expect::Version(o.object.version),
                    (Expect::Any, None) => Expect::Absent,
                    (e, _) => e,
                },
            });
        }
    }
    if !writes.is_empty() || !extra.is_empty() {
        // The allocation record goes with the Services that changed it, or nothing does.
        if !writes.is_empty() {
            writes.extend(alloc.write());
        }
        writes.extend(extra);
        let rev = store.write(writes).await?;
        for r in &mut results {
            if r.action != "unchanged" {
                r.resource_version = rev.to_string();
            }
        }
    }
    Ok(results)
}

/// Writes to the store through this replica: one at a time, each checked against the state
/// its predecessor left, and answered once this replica follows it (read-your-writes).
pub(crate) struct Writer {
    store: Store,
    state: watch::Receiver<Arc<State>>,
    lock: tokio::sync::Mutex<()>,
}

impl Writer {
    /// Writes to `store`, whose followed state is `state`.
    pub(crate) fn new(store: Store, state: watch::Receiver<Arc<State>>) -> Self {
        Self {
            store,
            state,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The store.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The state this replica follows now.
    pub(crate) fn state(&self) -> Arc<State> {
        self.state.borrow().clone()
    }

    /// The followed state, to watch.
    pub(crate) fn watch(&self) -> watch::Receiver<Arc<State>> {
        self.state.clone()
    }

    /// A stored document as this replica follows it (no store read).
    pub(crate) fn followed_health(&self, key: &Key) -> Option<crate::catalog::Health> {
        self.state.borrow().catalog.health.get(key).copied()
    }

    /// The stored document of `key`, as this replica follows the store.
    pub(crate) fn followed(&self, key: &Key) -> Option<Value> {
        self.state
            .borrow()
            .catalog
            .entries
            .get(key)
            .map(|e| e.object.doc())
    }

    /// Apply `text` as `file` says, and wait until it is followed.
    pub(crate) async fn apply_text(
        &self,
        file: &str,
        text: &str,
    ) -> Result<Vec<Applied>, ApplyError> {
        let _one = self.lock.lock().await;
        let current = self.state();
        let applied = apply(&self.store, &current.catalog, file, text).await?;
        self.caught_up(max_version(&applied)).await;
        Ok(applied)
    }

    /// Apply typed documents, and wait until they are followed.
    pub(crate) async fn apply_documents(
        &self,
        file: &str,
        documents: Vec<(Resource, Value)>,
    ) -> Result<Vec<Applied>, ApplyError> {
        let _one = self.lock.lock().await;
        let current = self.state();
        let applied = apply_documents(&self.store, &current.catalog, file, documents).await?;
        self.caught_up(max_version(&applied)).await;
        Ok(applied)
    }

    /// Apply typed documents with `extra` records in the same batch ([`apply_with`]), and
    /// wait until they are followed.
    pub(crate) async fn apply_with(
        &self,
        file: &str,
        documents: Vec<(Resource, Value)>,
        extra: Vec<Write>,
    ) -> Result<Vec<Applied>, ApplyError> {
        let _one = self.lock.lock().await;
        let current = self.state();
        let applied = apply_with(&self.store, &current.catalog, file, documents, extra).await?;
        self.caught_up(max_version(&applied)).await;
        Ok(applied)
    }

    /// Delete `key` (at version `expect`); a deleted Service's virtual IP is freed in the same
    /// batch. The revision of the write.
    pub(crate) async fn delete(&self, key: Key, expect: Expect) -> Result<u64, StoreError> {
        let _one = self.lock.lock().await;
        let mut writes = vec![Write {
            key: key.clone(),
            doc: None,
            expect,
        }];
        if key.kind == "Service" {
            let current = self.state();
            let mut alloc = Allocations::read(&self.store, &current.catalog).await?;
            alloc.release(&format!("{}/{}", key.namespace, key.name));
            writes.extend(alloc.write());
        }
        let rev = self.store.write(writes).await?;
        self.caught_up(rev).await;
        Ok(rev)
    }

    /// Wait (up to 5 s) until the followed state has caught up with `revision`.
    pub(crate) async fn caught_up(&self, revision: u64) -> Arc<State> {
        let mut rx = self.state.clone();
        let wait = async move {
            rx.wait_for(|s| s.catalog.revision >= revision)
                .await
                .map(|s| s.clone())
        };
        match tokio::time::timeout(Duration::from_secs(5), wait).await {
            Ok(Ok(s)) => s,
            _ => self.state(),
        }
    }
}

fn max_version(applied: &[Applied]) -> u64 {
    applied
        .iter()
        .filter_map(|a| a.resource_version.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an unknown kind's answer lists is what `get` takes: every kind once, each name
    /// listed resolving to it.
    #[test]
    fn the_kinds_an_unknown_kinds_answer_lists_are_taken() {
        let listed = kind_names();
        let entries: Vec<&str> = listed.split(", ").collect();
        assert_eq!(entries.len(), KINDS.len(), "{listed}");
        for ((kind, _), entry) in KINDS.iter().zip(&entries) {
            for name in entry.split([' ', '(', ')']).filter(|n| !n.is_empty()) {
                assert_eq!(canonical_kind(name), Some(*kind), "{name} in {listed}");
            }
        }
        assert!(
            listed.starts_with("services (svc), workloads (wl), httproutes (route)"),
            "{listed}"
        );
    }

    fn service(name: &str, extra: &str) -> String {
        format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {name}, namespace: test }}\nspec:\n  selector: {{ app: {name} }}\n  ports: [{{ port: 80 }}]\n{extra}"
        )
    }

    async fn catalog(store: &Store) -> Catalog {
        Catalog::from_listing(store.list().await.unwrap())
    }

    fn vip(c: &Catalog, name: &str) -> std::net::Ipv4Addr {
        let e = &c.entries[&Key::new("Service", "test", name)];
        match &e.resource.spec {
            Spec::Service(s) => s.virtual_ip.expect("assigned"),
            _ => unreachable!(),
        }
    }

    /// A replica whose followed catalog lags behind another's write still never gives out
    /// an address the other just gave out: the allocation record is read from the store and
    /// written under a precondition.
    #[tokio::test]
    async fn a_replica_behind_the_store_does_not_reuse_a_virtual_ip() {
        let dir = trellis_test_support::Temp::dir("vips");
        let store = Store::open("embedded", &dir).await.unwrap();
        let stale = catalog(&store).await;

        apply(&store, &stale, "a.yaml", &service("a", ""))
            .await
            .unwrap();
        let a = vip(&catalog(&store).await, "a");

        // The stale replica asks for the same address explicitly: refused, nothing written.
        let taken = service("b", &format!("  virtualIP: {a}\n"));
        let err = apply(&store, &stale, "b.yaml", &taken).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("b.yaml:2") && msg.contains("spec.virtualIP"),
            "{msg}"
        );
        assert!(msg.contains("test/a"), "{msg}");
        assert!(!catalog(&store)
            .await
            .entries
            .contains_key(&Key::new("Service", "test", "b")));

        // It assigns one to a Service whose search starts at `a`'s address (found by trying
        // names): the record, not the stale catalog, says that one is taken.
        let (base, bits) = VIRTUAL_IP_RANGE;
        let size = 1u32 << (32 - bits);
        let start = |n: &str| u32::from(base) + 1 + (name_hash("test", n) % (size - 2));
        let twin = (0..10_000_000)
            .map(|i| format!("c{i}"))
            .find(|n| start(n) == u32::from(a))
            .expect("a name that hashes to a's address");
        apply(&store, &stale, "c.yaml", &service(&twin, ""))
            .await
            .unwrap();
        assert_ne!(vip(&catalog(&store).await, &twin), a);

        // Two applies that read the record at the same version: the second write conflicts.
        let now = catalog(&store).await;
        let mut first = Allocations::read(&store, &now).await.unwrap();
        let mut second = Allocations::read(&store, &now).await.unwrap();
        first.claim("10.96.200.1".parse().unwrap(), "test/x");
        second.claim("10.96.200.1".parse().unwrap(), "test/y");
        store
            .write(first.write().into_iter().collect())
            .await
            .unwrap();
        let conflict = store.write(second.write().into_iter().collect()).await;
        assert!(
            matches!(conflict, Err(StoreError::Conflict { .. })),
            "{conflict:?}"
        );
    }
}
