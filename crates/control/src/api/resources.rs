//! Handlers of the resources: apply, list, get, delete, watch, and the proxies' state.

use std::time::Duration;

use axum::{
    body::Bytes,
    extract::{Path, Query, State as AxState},
    response::{
        sse::{Event as SseEvent, KeepAlive, Sse},
        IntoResponse, Response,
    },
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};
use trellis_store::{Expect, Key};

use super::{Api, ApiError, ApiResult};
use crate::{apply::canonical_kind, catalog::Entry, state::State};

/// The resource routes, relative to `/api/v1`.
pub(super) fn routes() -> Router<Api> {
    Router::new()
        .route("/apply", post(apply_h))
        .route("/resources", get(list_all))
        .route("/resources/{kind}", get(list_kind))
        .route("/resources/{kind}/{ns}", get(list_ns))
        .route(
            "/resources/{kind}/{ns}/{name}",
            get(get_one).delete(delete_one),
        )
        .route("/watch", get(watch_h))
        .route("/proxies", get(proxies_h))
}

/// A resource as the API returns it: the stored document, its version and status.
pub(crate) fn render(e: &Entry, state: &State) -> Value {
    let mut doc = e.object.doc();
    if let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".into(),
            Value::String(e.object.version.to_string()),
        );
    }
    if let Some(c) = state.compiled.conditions.get(&e.object.key) {
        doc["status"] = json!({ "conditions": c });
    }
    // A Workload's health is status, reported by its agent: no part of what was applied.
    if let Some(h) = e.health {
        doc["status"]["health"] = json!(h);
    }
    doc
}

#[derive(Deserialize)]
struct ApplyQuery {
    file: Option<String>,
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(rename = "resourceVersion")]
    resource_version: Option<u64>,
}

#[derive(Deserialize)]
struct WatchQuery {
    kind: Option<String>,
}

fn kind_or_404(k: &str) -> ApiResult<&'static str> {
    canonical_kind(k).ok_or_else(|| {
        ApiError::NotFound(format!(
            "unknown kind {k:?}: the kinds are {}",
            crate::apply::kind_names()
        ))
    })
}

async fn apply_h(
    AxState(api): AxState<Api>,
    Query(q): Query<ApplyQuery>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::BadRequest("body is not UTF-8".into()))?;
    let file = q.file.unwrap_or_else(|| "request".into());
    let applied = api.writer().apply_text(&file, text).await?;
    // The state has caught up with the apply: say what of it does not resolve, so that a
    // typo in a name is seen at once rather than as 500s.
    let state = api.writer().state();
    let applied: Vec<Value> = applied
        .into_iter()
        .map(|a| {
            let key = Key::new(&a.kind, &a.namespace, &a.name);
            let mut v = json!(a);
            if let Some(w) = unresolved_warning(&state, &key) {
                v["warning"] = w.into();
            }
            v
        })
        .collect();
    Ok(Json(json!({ "applied": applied })))
}

/// What of `key` does not resolve, and what that leaves out, if anything.
fn unresolved_warning(state: &State, key: &Key) -> Option<String> {
    let conds = state.compiled.conditions.get(key)?;
    let refs = conds
        .iter()
        .find(|c| c.kind == "ResolvedRefs" && c.status == "False")?;
    let accepted = conds.iter().find(|c| c.kind == "Accepted");
    Some(match accepted {
        Some(a) if !a.message.is_empty() => format!("{} ({})", refs.message, a.message),
        _ => refs.message.clone(),
    })
}

fn list(state: &State, kind: Option<&str>, ns: Option<&str>) -> Value {
    let items: Vec<Value> = state
        .catalog
        .entries
        .values()
        .filter(|e| kind.is_none_or(|k| e.object.key.kind == k))
        .filter(|e| ns.is_none_or(|n| e.object.key.namespace == n))
        .map(|e| render(e, state))
        .collect();
    json!({ "items": items, "revision": state.catalog.revision.to_string() })
}

async fn list_all(AxState(api): AxState<Api>) -> Json<Value> {
    let s = api.writer().state();
    Json(list(&s, None, None))
}

async fn list_kind(AxState(api): AxState<Api>, Path(kind): Path<String>) -> ApiResult<Json<Value>> {
    let k = kind_or_404(&kind)?;
    let s = api.writer().state();
    Ok(Json(list(&s, Some(k), None)))
}

async fn list_ns(
    AxState(api): AxState<Api>,
    Path((kind, ns)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let k = kind_or_404(&kind)?;
    let s = api.writer().state();
    Ok(Json(list(&s, Some(k), Some(&ns))))
}

async fn get_one(
    AxState(api): AxState<Api>,
    Path((kind, ns, name)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let k = kind_or_404(&kind)?;
    let s = api.writer().state();
    let key = Key::new(k, &ns, &name);
    let e = s
        .catalog
        .entries
        .get(&key)
        .ok_or_else(|| ApiError::NotFound(format!("{key} not found")))?;
    let mut doc = render(e, &s);
    // Which connected proxies use it: for a Workload, the proxies serving it.
    let used_by = api.proxies().using(&key);
    doc["usedBy"] = json!(used_by);
    // A Rollout's progress; a Service's rollouts.
    if k == "Rollout" || k == "Service" {
        let all = api.rollouts().statuses(Some(&ns), None).await?;
        let mine: Vec<_> = all
            .into_iter()
            .filter(|r| {
                if k == "Rollout" {
                    r.name() == name
                } else {
                    r.service() == name
                }
            })
            .collect();
        if !mine.is_empty() {
            doc["rollouts"] = json!(mine);
        }
    }
    if k == "Workload" {
        // What this replica saw happen to it (the newest events, the last hour at most).
        let me = format!("{ns}/{name}");
        let since = crate::fleet::now_ms().saturating_sub(3_600_000);
        let mut events: Vec<(u64, Value)> = api
            .events()
            .since(since)
            .into_iter()
            .filter(|e| e.workload == me)
            .map(|e| (e.at_ms, json!({ "atMs": e.at_ms, "event": e.kind })))
            .collect();
        // The callers' outlier detection, as the proxies reporting here told it.
        events.extend(api.fleet().ejections_of(&me, since).into_iter().map(|e| {
            let x = &e.ejection;
            let v = if x.seconds == 0 {
                json!({ "atMs": x.at_ms, "event": "let back in", "by": &*e.reporter, "endpoint": x.endpoint })
            } else {
                json!({ "atMs": x.at_ms, "event": "ejected", "by": &*e.reporter, "endpoint": x.endpoint,
                        "seconds": x.seconds, "failures": x.failures, "class": x.class })
            };
            (x.at_ms, v)
        }));
        events.sort_by_key(|(at, _)| *at);
        doc["events"] = json!(events.into_iter().map(|(_, v)| v).collect::<Vec<_>>());
    }
    Ok(Json(doc))
}

async fn delete_one(
    AxState(api): AxState<Api>,
    Path((kind, ns, name)): Path<(String, String, String)>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<Json<Value>> {
    let k = kind_or_404(&kind)?;
    let key = Key::new(k, &ns, &name);
    let expect = q.resource_version.map_or(Expect::Any, Expect::Version);
    let rev = api.writer().delete(key, expect).await?;
    Ok(Json(
        json!({ "deleted": { "kind": k, "namespace": ns, "name": name }, "revision": rev.to_string() }),
    ))
}

async fn watch_h(AxState(api): AxState<Api>, Query(q): Query<WatchQuery>) -> ApiResult<Response> {
    let kind = match q.kind.as_deref() {
        Some(k) => Some(kind_or_404(k)?),
        None => None,
    };
    let mut rx = api.writer().watch();
    let stream = async_stream(move |tx| async move {
        let mut last = rx.borrow_and_update().clone();
        let first = SseEvent::default()
            .event("snapshot")
            .json_data(list(&last, kind, None));
        if tx.send(first).await.is_err() {
            return;
        }
        while rx.changed().await.is_ok() {
            let now = rx.borrow_and_update().clone();
            for ev in diff(&last, &now, kind) {
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            last = now;
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// The events that take `a` to `b`: `put` with the resource, `delete` with its key.
fn diff(a: &State, b: &State, kind: Option<&str>) -> Vec<SseEvent> {
    let mut out = Vec::new();
    let want = |k: &Key| kind.is_none_or(|x| k.kind == x);
    for (k, e) in &b.catalog.entries {
        let changed = a
            .catalog
            .entries
            .get(k)
            .is_none_or(|o| o.object.version != e.object.version);
        if want(k) && changed {
            out.push(
                SseEvent::default()
                    .event("put")
                    .id(e.object.version.to_string())
                    .json_data(render(e, b))
                    .expect("json"),
            );
        }
    }
    for k in a.catalog.entries.keys() {
        if want(k) && !b.catalog.entries.contains_key(k) {
            out.push(
                SseEvent::default()
                    .event("delete")
                    .id(b.catalog.revision.to_string())
                    .json_data(json!({"kind": k.kind, "namespace": k.namespace, "name": k.name}))
                    .expect("json"),
            );
        }
    }
    out
}

/// A stream fed by a task (axum's SSE wants a `Stream`).
pub(crate) fn async_stream<F, Fut>(
    f: F,
) -> tokio_stream::wrappers::ReceiverStream<Result<SseEvent, axum::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<SseEvent, axum::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn proxies_h(AxState(api): AxState<Api>) -> Json<Value> {
    Json(proxies_value(&api))
}

/// Every proxy connected to this replica, with what it last reported of its certificate.
pub(crate) fn proxies_value(api: &Api) -> Value {
    let s = api.writer().state();
    // What each proxy last reported of its certificate (the registry knows only its xDS).
    let certs: std::collections::HashMap<String, u64> = api
        .fleet()
        .reporters()
        .into_iter()
        .filter(|r| r.cert_not_after_ms > 0)
        .map(|r| (r.name, r.cert_not_after_ms))
        .collect();
    let proxies: Vec<Value> = api
        .proxies()
        .snapshot()
        .into_iter()
        .map(|p| {
            let cert = p.workload.as_ref().and_then(|w| certs.get(w)).copied();
            let mut v = json!(p);
            if let Some(ms) = cert {
                v["certNotAfterMs"] = json!(ms);
            }
            v
        })
        .collect();
    json!({
        "revision": s.catalog.revision.to_string(),
        "proxies": proxies,
    })
}
