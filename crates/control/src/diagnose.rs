//! The facts `trellis diagnose` reads besides the traffic: which policies target a service,
//! which workloads a service selects and their health, the routes' timeouts, the proxies
//! that refused their config, and the references that do not resolve. The rules themselves
//! are in [`trellis_telemetry::diagnose`].

use std::collections::BTreeSet;

use serde_json::Value;
use trellis_telemetry::diagnose::Facts;

use crate::{events::Event, registry::ProxyStatus, state::State};

fn ns_name(doc: &Value, fallback_ns: &str) -> String {
    format!(
        "{}/{}",
        doc["metadata"]["namespace"].as_str().unwrap_or(fallback_ns),
        doc["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// The shortest request timeout of a route's rules, milliseconds.
fn route_timeout_ms(doc: &Value) -> Option<u64> {
    doc["spec"]["rules"]
        .as_array()?
        .iter()
        .filter_map(|r| r["timeouts"]["request"].as_str())
        .filter_map(|t| t.parse::<trellis_model::value::DurationValue>().ok())
        .map(|d| d.0.as_millis() as u64)
        .filter(|ms| *ms > 0)
        .min()
}

/// The facts of `state`, of the proxies connected to this replica, and of the workloads'
/// `events` in the window.
pub(crate) fn facts(
    state: &State,
    proxies: &[ProxyStatus],
    events: &[Event],
    now_ms: u64,
) -> Facts {
    let mut f = Facts {
        now_ms,
        events: events
            .iter()
            .map(|e| (e.at_ms, e.workload.clone(), e.kind.to_string()))
            .collect(),
        ..Facts::default()
    };
    let mut services: Vec<(String, Value)> = Vec::new();
    let mut workloads: Vec<(Value, Option<bool>)> = Vec::new();
    for (key, entry) in &state.catalog.entries {
        if !matches!(
            key.kind.as_str(),
            "Service" | "Workload" | "AuthorizationPolicy" | "HTTPRoute" | "GRPCRoute"
        ) {
            continue;
        }
        let doc = entry.object.doc();
        let ns = key.namespace.as_str();
        match key.kind.as_str() {
            "Service" => services.push((format!("{ns}/{}", key.name), doc)),
            "Workload" => workloads.push((doc, entry.healthy())),
            "AuthorizationPolicy" => {
                let action = doc["spec"]["action"].as_str().unwrap_or("ALLOW");
                let me = format!("{} ({action})", ns_name(&doc, ns));
                for t in doc["spec"]["targetRefs"].as_array().into_iter().flatten() {
                    if let Some(name) = t["name"].as_str() {
                        f.policies
                            .entry(format!("{ns}/{name}"))
                            .or_default()
                            .push(me.clone());
                    }
                }
            }
            "HTTPRoute" | "GRPCRoute" => {
                if let Some(ms) = route_timeout_ms(&doc) {
                    for p in doc["spec"]["parentRefs"].as_array().into_iter().flatten() {
                        if let Some(name) = p["name"].as_str() {
                            let svc = format!("{ns}/{name}");
                            let t = f.timeouts_ms.entry(svc).or_insert(ms);
                            *t = (*t).min(ms);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    for (svc, doc) in services {
        let ns = svc.split('/').next().unwrap_or_default();
        let selector = doc["spec"]["selector"].as_object();
        // Workloads that left in the window and that this service selected.
        if let Some(sel) = selector.filter(|s| !s.is_empty()) {
            let left: Vec<(String, u64)> = events
                .iter()
                .filter(|e| e.kind == "left" && e.workload.split('/').next() == Some(ns))
                .filter(|e| {
                    sel.iter()
                        .all(|(k, v)| v.as_str() == e.labels.get(k).map(String::as_str))
                })
                .map(|e| (e.workload.clone(), e.at_ms))
                .collect();
            if !left.is_empty() {
                f.departed.insert(svc.clone(), left);
            }
        }
        let Some(selector) = selector.filter(|s| !s.is_empty()) else {
            f.selects.insert(svc, Vec::new());
            continue;
        };
        let chosen = workloads
            .iter()
            .filter(|(w, _)| w["metadata"]["namespace"].as_str().unwrap_or("default") == ns)
            .filter(|(w, _)| {
                selector
                    .iter()
                    .all(|(k, v)| w["metadata"]["labels"][k] == *v)
            })
            .map(|(w, healthy)| (ns_name(w, ns), *healthy))
            .collect();
        f.selects.insert(svc, chosen);
    }
    // What the proxies answer 500 for: the served routes' backends marked unresolved.
    for d in state.compiled.dangling() {
        let r = d.route;
        let line = format!(
            "{} {}: rule {} sends {} of {} by weight to {}, which does not resolve ({})",
            r.kind(),
            r.id(),
            d.rule,
            d.weight.0,
            d.weight.1,
            d.backend,
            d.why
        );
        for svc in trellis_model::scope::route_parents(r) {
            f.dangling
                .entry(svc.to_string())
                .or_default()
                .push(line.clone());
        }
    }
    for (key, conds) in state.compiled.conditions.iter() {
        for c in conds.iter().filter(|c| c.status == "False") {
            f.unresolved.push((
                format!("{} {}/{}", key.kind, key.namespace, key.name),
                format!("{}: {}", c.reason, c.message),
            ));
        }
    }
    let registered: BTreeSet<String> = workloads
        .iter()
        .map(|(w, _)| ns_name(w, "default"))
        .collect();
    let gone: BTreeSet<&str> = events
        .iter()
        .filter(|e| e.kind == "left" && !registered.contains(&e.workload))
        .map(|e| e.workload.as_str())
        .collect();
    f.refused = refusals(proxies, &gone);
    f.unresolved.sort();
    f.refused.sort();
    f
}

/// The configurations proxies refused, as (who, why). The proxy of a workload that left
/// (its agent deregistered it, and it is not registered again: `gone`) refuses every
/// configuration without it until it has drained and stopped: that is how it leaves, not a
/// problem.
fn refusals(proxies: &[ProxyStatus], gone: &BTreeSet<&str>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in proxies {
        if p.workload.as_deref().is_some_and(|w| gone.contains(w)) {
            continue;
        }
        for (ty, st) in &p.types {
            if let Some(r) = st.rejected.as_ref().filter(|_| st.acked != st.sent) {
                let who = p.workload.clone().unwrap_or_else(|| p.node.clone());
                out.push((who, format!("{ty} version {}: {}", r.version, r.message)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Rejection, TypeStatus};

    fn refusing(workload: &str) -> ProxyStatus {
        let st = TypeStatus {
            sent: "9".into(),
            acked: "8".into(),
            rejected: Some(Rejection {
                version: "9".into(),
                message: format!("--workload: Workload {workload} is not defined in the config"),
                at: 0,
            }),
            resources: 1,
        };
        ProxyStatus {
            node: format!("{workload}@agent"),
            workload: Some(workload.into()),
            peer: None,
            connected_at: 0,
            types: [("document".to_string(), st)].into(),
            silent_since: None,
        }
    }

    #[test]
    fn a_leaving_workloads_proxy_refusing_configurations_without_it_is_no_problem() {
        let proxies = [refusing("shop/gone"), refusing("shop/deleted")];
        // `shop/deleted` was removed by an operator (no `left` event): its proxy serves a
        // stale configuration, which is a problem; `shop/gone`'s agent deregistered it.
        let gone = BTreeSet::from(["shop/gone"]);
        let found = refusals(&proxies, &gone);
        let who: Vec<_> = found.iter().map(|(w, _)| w.as_str()).collect();
        assert_eq!(who, ["shop/deleted"]);
        assert!(
            found[0].1.starts_with("document version 9: --workload"),
            "{found:?}"
        );
        assert_eq!(refusals(&proxies, &BTreeSet::new()).len(), 2);
    }
}
