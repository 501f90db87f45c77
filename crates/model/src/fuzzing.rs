//! Entry point for the resource loader's fuzz target (`fuzz/`): any text as a resource file.
//! Built for `cargo fuzz` with the `fuzzing` feature, and in the unit tests, which replay the
//! committed corpus (`fuzz/corpus/resources`) on every `cargo test`.

use crate::ConfigError;

const FILE: &str = "fuzz.yaml";

/// An error names the file, and a line that exists in it (or 0: unknown).
fn check_error(e: &ConfigError, lines: u64) {
    let (file, line) = match e {
        ConfigError::Io { file, .. } => (file, 0),
        ConfigError::Syntax { file, line, .. } | ConfigError::Invalid { file, line, .. } => {
            (file, *line)
        }
    };
    assert_eq!(file, FILE, "an error names another file: {e}");
    assert!(line <= lines + 1, "an error at line {line} of {lines}: {e}");
}

/// Parse `data` as resource YAML and translate it for the mesh and for its first Workload:
/// refused with a located error or accepted, never a panic; the control plane's two readings
/// (plain values then each checked, and typed resources) agree on what they accept.
pub fn resources(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // Lines as YAML counts them: CR LF, CR and LF each end one.
    let lines = text
        .replace("\r\n", "\n")
        .bytes()
        .filter(|b| matches!(b, b'\n' | b'\r'))
        .count() as u64
        + 1;
    let typed = crate::parse_documents(FILE, &text);
    let values = crate::parse_values(FILE, &text);
    if let Err(e) = &typed {
        check_error(e, lines);
    }
    if let Err(e) = &values {
        check_error(e, lines);
    }
    let Ok(resources) = typed else {
        if let Ok(values) = values {
            // Values that parse but do not make resources: each refusal names a field.
            for v in values.iter().filter(|v| !v.is_null()) {
                if let Err(e) = crate::resource_from_json(FILE, v) {
                    check_error(&e, lines);
                }
            }
        }
        return;
    };
    let values = values.expect("typed resources parse as plain values too");
    let from_json: Vec<_> = values
        .iter()
        .filter(|v| !v.is_null())
        .map(|v| crate::resource_from_json(FILE, v))
        .collect();
    assert_eq!(
        from_json.len(),
        resources.len(),
        "the two readings see a different number of documents"
    );
    let whole = crate::translate(FILE, &resources, None);
    for (r, j) in resources.iter().zip(&from_json) {
        match j {
            // What is stored reads back as what was checked, field for field.
            Ok(j) => assert_eq!(
                described(r),
                described(j),
                "{} {} is stored as another resource",
                r.kind(),
                r.id()
            ),
            // A value that does not read back is never accepted.
            Err(e) => assert!(
                whole.is_err(),
                "{} {} was accepted, and stored it does not read back: {e}",
                r.kind(),
                r.id()
            ),
        }
    }
    if let Err(e) = &whole {
        check_error(e, lines);
    }
    if let Some(w) = resources.iter().find(|r| r.kind() == "Workload") {
        if let Err(e) = crate::translate(FILE, &resources, Some(&w.id())) {
            check_error(&e, lines);
        }
    }
    scope(&resources);
    checked_change(&resources);
}

/// A resource as the checks see it (its source locations aside).
fn described(r: &crate::Resource) -> serde_json::Value {
    use crate::resource::Spec;
    let spec = match &r.spec {
        Spec::Service(s) => json(s),
        Spec::Workload(s) => json(s),
        Spec::HttpRoute(s) => json(s),
        Spec::GrpcRoute(s) => json(s),
        Spec::BackendPolicy(s) => json(s),
        Spec::AuthorizationPolicy(s) => json(s),
        Spec::PeerAuthentication(s) => json(s),
        Spec::TrustBundle(s) => json(s),
        Spec::RateLimitPolicy(s) => json(s),
        Spec::Rollout(s) => json(s),
    };
    serde_json::json!([r.api_version, r.kind(), json(&r.metadata), spec])
}

/// For (up to three of) the resources X of `resources`: when the set without X translates,
/// translating what [`crate::scope::to_check`] picks for X added (or changed) refuses exactly
/// when translating the whole set does.
pub fn checked_change(resources: &[crate::Resource]) {
    for x in 0..resources.len().min(3) {
        let before: Vec<&crate::Resource> = resources
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != x)
            .map(|(_, r)| r)
            .collect();
        if crate::translate(FILE, &before, None).is_err() {
            continue;
        }
        let whole = crate::translate(FILE, resources, None);
        let part: Vec<&crate::Resource> = crate::scope::to_check(resources, &[x])
            .into_iter()
            .map(|i| &resources[i])
            .collect();
        let checked = crate::translate(FILE, &part, None);
        assert_eq!(
            checked.is_ok(),
            whole.is_ok(),
            "{} {} changed: checked {:?}, whole {:?}",
            resources[x].kind(),
            resources[x].id(),
            checked.err().map(|e| e.to_string()),
            whole.err().map(|e| e.to_string()),
        );
    }
}

/// For (up to three of) the Workloads of `resources`: what [`crate::scope::ScopeIndex`] says
/// its proxy needs translates as the whole set does for that proxy, Service for Service; and
/// an index kept up to date as a Workload comes, goes or is relabelled says what an index
/// made anew says.
pub fn scope(resources: &[crate::Resource]) {
    let ix = crate::scope::ScopeIndex::new(resources);
    kept_up_to_date(resources, &ix);
    for w in resources.iter().filter(|r| r.kind() == "Workload").take(3) {
        let local = w.id();
        let Ok(full) = crate::translate(FILE, resources, Some(&local)) else {
            continue;
        };
        let needed = ix.needs(resources, &local, []);
        let subset: Vec<&crate::Resource> = needed.iter().map(|&i| &resources[i]).collect();
        let part = crate::translate(FILE, &subset, Some(&local))
            .unwrap_or_else(|e| panic!("{local}: its scope does not translate: {e}"));
        assert_eq!(json(&part.local), json(&full.local), "{local}: local side");
        assert_eq!(
            json(&part.tcp_binds),
            json(&full.tcp_binds),
            "{local}: binds"
        );
        assert_eq!(part.trust_bundle, full.trust_bundle, "{local}: bundle");
        for (id, s) in &part.services {
            assert_eq!(json(s), json(&full.services[id]), "{local}: Service {id}");
        }
        for (k, c) in &part.clusters {
            assert_eq!(json(c), json(&full.clusters[k]), "{local}: cluster {k}");
        }
        for b in &full.tcp_binds {
            assert!(
                part.clusters.contains_key(&b.cluster),
                "{local}: {} missing",
                b.cluster
            );
        }
        // The authorization its inbound side applies.
        let inbound: Vec<_> = full
            .local
            .iter()
            .flat_map(|l| l.inbound_ports.iter().map(|p| p.service.clone()))
            .collect();
        let applies = |c: &crate::ProxyConfig| -> Vec<serde_json::Value> {
            c.authz
                .iter()
                .filter(|a| match &a.scope {
                    crate::proxy::AuthzScope::Mesh => true,
                    crate::proxy::AuthzScope::Namespace(ns) => *ns == local.namespace,
                    crate::proxy::AuthzScope::Services(s) => s.iter().any(|s| inbound.contains(s)),
                })
                .map(json)
                .collect()
        };
        assert_eq!(applies(&part), applies(&full), "{local}: authorization");
        unconcerned(resources, &ix, &local);
    }
}

/// For the first Workload X of `resources` (at `at`): the index of the set without X with X
/// inserted, the index of the set with X removed, and the index with X relabelled, each
/// says for every Workload (up to five) what the index made anew of that set says.
fn kept_up_to_date(resources: &[crate::Resource], ix: &crate::scope::ScopeIndex) {
    use crate::scope::ScopeIndex;
    let Some(at) = resources.iter().position(|r| r.kind() == "Workload") else {
        return;
    };
    let x = &resources[at];
    let same = |rs: &[crate::Resource], kept: &ScopeIndex, what: &str| {
        let anew = ScopeIndex::new(rs);
        for w in rs.iter().filter(|r| r.kind() == "Workload").take(5) {
            let local = w.id();
            assert_eq!(
                kept.needs(rs, &local, []),
                anew.needs(rs, &local, []),
                "{local}'s scope after {} {} {what}",
                x.kind(),
                x.id()
            );
        }
    };
    let mut without = resources.to_vec();
    without.remove(at);
    let mut inserted = ScopeIndex::new(&without);
    inserted.insert_workload(at, x);
    same(resources, &inserted, "came");
    let mut removed = ix.clone();
    removed.remove_workload(at, x);
    same(&without, &removed, "went");
    let mut relabelled = resources.to_vec();
    let y = &mut relabelled[at];
    let labels = std::mem::take(&mut y.metadata.labels);
    y.metadata.labels = labels
        .into_iter()
        .skip(1)
        .chain([("fuzz".to_string(), "relabelled".to_string())])
        .collect();
    let mut replaced = ix.clone();
    replaced.replace_workload(at, x, &relabelled[at]);
    same(&relabelled, &replaced, "was relabelled");
}

/// What a control plane skips is safe to skip. For each resource X but `local`'s Workload,
/// as a change from the set without X to the set with it (X added or changed): when X was
/// out of the old scope and [`crate::scope::ScopeIndex::may_concern`] says, on the new set,
/// that it cannot concern the proxy, the scope is the same; and as a removal, X out of the
/// scope, the scope is the same without it.
fn unconcerned(
    resources: &[crate::Resource],
    ix: &crate::scope::ScopeIndex,
    local: &crate::NamespacedName,
) {
    type Names = std::collections::BTreeSet<(&'static str, crate::NamespacedName)>;
    let scope = |rs: &[crate::Resource], ix: &crate::scope::ScopeIndex| -> Names {
        ix.needs(rs, local, [])
            .iter()
            .map(|&i| (rs[i].kind(), rs[i].id()))
            .collect()
    };
    let with = scope(resources, ix);
    for (x, r) in resources.iter().enumerate() {
        let key = (r.kind(), r.id());
        if r.kind() == "Workload" && r.id() == *local {
            continue;
        }
        let rest: Vec<crate::Resource> = resources
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != x)
            .map(|(_, r)| r.clone())
            .collect();
        let without = scope(&rest, &crate::scope::ScopeIndex::new(&rest));
        let services: Vec<crate::NamespacedName> = without
            .iter()
            .filter(|(k, _)| *k == "Service")
            .map(|(_, id)| id.clone())
            .collect();
        if !without.contains(&key)
            && !ix.may_concern(resources, r.kind(), &r.id(), &services, local)
        {
            assert_eq!(
                with, without,
                "{local}: {key:?} added was skipped but changes the scope"
            );
        }
        if !with.contains(&key) {
            assert_eq!(with, without, "{local}: {key:?} removed changes the scope");
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("serializes")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_committed_corpus_holds_its_properties() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/resources");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.expect("corpus entry").path();
            let data = std::fs::read(&p).expect("corpus file");
            if std::panic::catch_unwind(|| super::resources(&data)).is_err() {
                panic!("{} breaks a property", p.display());
            }
            n += 1;
        }
        assert!(n > 0);
    }
}
