//! The pane's service view, beside its figures over time (`Fleet::timeline`): the workloads
//! the service selects, by environment, with their health and latest events; the routes that
//! name it as parent or backend, with their backends' weights; the policies that target it;
//! its mutual-TLS mode.

use serde_json::{json, Value};

use crate::{events::Event, state::State};

fn ns_name(doc: &Value, fallback_ns: &str) -> String {
    format!(
        "{}/{}",
        doc["metadata"]["namespace"].as_str().unwrap_or(fallback_ns),
        doc["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// Whether `doc`'s `targetRefs` (or, for a route, `parentRefs` and its rules' `backendRefs`)
/// name `name`.
fn names(refs: &Value, name: &str) -> bool {
    refs.as_array()
        .into_iter()
        .flatten()
        .any(|r| r["name"].as_str() == Some(name))
}

/// What the pane shows of service `ns/name`, or `None` when there is no such Service.
pub(crate) fn view(state: &State, events: &[Event], ns: &str, name: &str) -> Option<Value> {
    let entries = &state.catalog.entries;
    let svc = entries
        .iter()
        .find(|(k, _)| k.kind == "Service" && k.namespace == ns && k.name == name)
        .map(|(_, e)| e.object.doc())?;
    let selector = svc["spec"]["selector"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let mut endpoints = Vec::new();
    let mut routes = Vec::new();
    let mut policies = Vec::new();
    // The most specific PeerAuthentication wins: the service's, its namespace's, the mesh's.
    let mut mtls: [Option<String>; 3] = [None, None, None];
    for (key, e) in entries {
        let doc = &e.object.doc();
        let spec = &doc["spec"];
        let same_ns = key.namespace == ns;
        match key.kind.as_str() {
            "Workload" if same_ns && !selector.is_empty() => {
                let labels = &doc["metadata"]["labels"];
                if !selector.iter().all(|(k, v)| labels[k] == *v) {
                    continue;
                }
                let me = ns_name(doc, ns);
                let mut latest: Vec<Value> = events
                    .iter()
                    .rev()
                    .filter(|e| e.workload == me)
                    .take(5)
                    .map(|e| json!({ "atMs": e.at_ms, "event": e.kind }))
                    .collect();
                latest.reverse();
                endpoints.push(json!({
                    "workload": me,
                    "environment": spec["environment"].as_str().unwrap_or("bare-metal"),
                    "locality": spec["locality"],
                    "address": spec["address"],
                    "healthy": e.healthy(),
                    "events": latest,
                }));
            }
            "HTTPRoute" | "GRPCRoute" | "TCPRoute" if same_ns => {
                let rules = spec["rules"].as_array().cloned().unwrap_or_default();
                let parent = names(&spec["parentRefs"], name);
                let backend = rules.iter().any(|r| names(&r["backendRefs"], name));
                if !(parent || backend) {
                    continue;
                }
                let rules: Vec<Value> = rules
                    .iter()
                    .map(|r| {
                        let backends: Vec<Value> = r["backendRefs"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|b| json!({ "name": b["name"], "weight": b["weight"].as_u64().unwrap_or(1) }))
                            .collect();
                        json!({
                            "matches": r["matches"],
                            "backends": backends,
                            "timeouts": r["timeouts"],
                            "retry": r["retry"],
                        })
                    })
                    .collect();
                routes.push(json!({
                    "kind": key.kind,
                    "name": ns_name(doc, ns),
                    "as": if parent { "parent" } else { "backend" },
                    "rules": rules,
                }));
            }
            "AuthorizationPolicy" | "BackendTrafficPolicy"
                if same_ns
                    && (names(&spec["targetRefs"], name)
                        || (key.kind == "AuthorizationPolicy" && spec["targetRefs"].is_null())) =>
            {
                policies.push(json!({
                    "kind": key.kind,
                    "name": ns_name(doc, ns),
                    "action": spec["action"],
                }));
            }
            "PeerAuthentication" => {
                let mode = spec["mtls"]["mode"].as_str().map(str::to_string);
                let refs = &spec["targetRefs"];
                let level = if same_ns && names(refs, name) {
                    0
                } else if same_ns && refs.as_array().is_none_or(|r| r.is_empty()) {
                    1
                } else if key.namespace == "trellis-system"
                    && refs.as_array().is_none_or(|r| r.is_empty())
                {
                    2
                } else {
                    continue;
                };
                // At one level STRICT wins.
                let slot = &mut mtls[level];
                if slot.as_deref() != Some("STRICT") {
                    *slot = mode;
                }
            }
            _ => {}
        }
    }
    let mtls = mtls.into_iter().flatten().next().unwrap_or("STRICT".into());
    Some(json!({
        "service": format!("{ns}/{name}"),
        "selector": selector,
        "mtls": mtls,
        "endpoints": endpoints,
        "routes": routes,
        "policies": policies,
    }))
}
