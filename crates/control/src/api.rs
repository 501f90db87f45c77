//! The HTTP API under `/api/v1/`: JSON in and out, a bearer token on every call.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | POST | `/api/v1/apply?file=NAME` | apply multi-document YAML (or JSON) atomically |
//! | GET | `/api/v1/resources[/KIND[/NAMESPACE[/NAME]]]` | list or get, with status |
//! | DELETE | `/api/v1/resources/KIND/NAMESPACE/NAME[?resourceVersion=N]` | delete |
//! | GET | `/api/v1/watch[?kind=KIND]` | server-sent events, one per change |
//! | GET | `/api/v1/proxies` | every connected proxy and its ACK/NACK state |
//! | GET | `/healthz` | liveness, no token |

use std::{sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, Request, State as AxState},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{
        sse::{Event as SseEvent, KeepAlive, Sse},
        IntoResponse, Response,
    },
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::watch};
use trellis_store::{Expect, Key, Store, StoreError, Write};

use crate::{
    apply::{apply, canonical_kind, ApplyError},
    catalog::Entry,
    identity, token, xds, State,
};

/// The API's shared state.
#[derive(Clone)]
pub struct Api {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    state: watch::Receiver<Arc<State>>,
    proxies: xds::Registry,
    token: token::AdminToken,
    identity: identity::Shared,
    max_body: usize,
    /// One apply at a time, each checked against the state its predecessor left.
    apply_lock: tokio::sync::Mutex<()>,
    /// Agents heard from by this replica.
    agents: crate::agent::Agents,
}

/// An API error: a status and a message, as `{"error": ..., "code": ...}`.
pub struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.1, "code": self.0.as_u16() }));
        (self.0, body).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let code = match e {
            StoreError::Conflict { .. } => StatusCode::CONFLICT,
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self(code, e.to_string())
    }
}

impl From<crate::ControlError> for ApiError {
    fn from(e: crate::ControlError) -> Self {
        match e {
            crate::ControlError::Store(e) => e.into(),
            e => Self(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Invalid(e) => Self(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
            ApplyError::Store(e) => e.into(),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// A resource as the API returns it: the stored document, its version and status.
pub fn render(e: &Entry, state: &State) -> Value {
    let mut doc = e.object.doc.clone();
    if let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".into(),
            Value::String(e.object.version.to_string()),
        );
    }
    if let Some(c) = state.compiled.conditions.get(&e.object.key) {
        doc["status"] = json!({ "conditions": c });
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
    canonical_kind(k).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("unknown kind {k:?}")))
}

impl Api {
    /// The API over `store` and the followed `state`.
    pub fn new(
        store: Store,
        state: watch::Receiver<Arc<State>>,
        proxies: xds::Registry,
        token: token::AdminToken,
        identity: identity::Shared,
        max_body: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                state,
                proxies,
                token,
                identity,
                max_body,
                apply_lock: tokio::sync::Mutex::new(()),
                agents: Default::default(),
            }),
        }
    }

    /// The router (also used by tests in-process).
    pub fn router(self) -> Router {
        let v1 = Router::new()
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
            .route(
                "/tokens",
                post(identity::create_token).get(identity::list_tokens),
            )
            .route(
                "/tokens/{id}",
                axum::routing::delete(identity::revoke_token),
            )
            .route("/ca", get(identity::ca_status))
            .route("/ca/rotate", post(identity::rotate))
            .layer(middleware::from_fn_with_state(self.clone(), auth))
            .layer(DefaultBodyLimit::max(self.inner.max_body));
        // Proxies authenticate with a join token here, not the admin token.
        let ca = Router::new()
            .route("/certificates", post(identity::sign))
            .route("/agent", post(crate::agent::handle))
            .layer(DefaultBodyLimit::max(64 << 10));
        Router::new()
            .nest("/api/v1", v1.merge(ca))
            .route("/healthz", get(|| async { "ok\n" }))
            .with_state(self)
    }

    /// The certificate endpoint alone, for the xDS address: a proxy reaches its CA at the
    /// address it already has.
    pub fn certificate_router(&self) -> Router {
        Router::new()
            .route("/v1/certificates", post(identity::sign))
            .route("/v1/agent", post(crate::agent::handle))
            .layer(DefaultBodyLimit::max(64 << 10))
            .with_state(self.clone())
    }

    /// The CA and certificate lifetime.
    pub(crate) fn identity(&self) -> &identity::Identity {
        &self.inner.identity
    }

    /// The same, shared.
    pub(crate) fn identity_arc(&self) -> identity::Shared {
        self.inner.identity.clone()
    }

    /// Agents heard from by this replica.
    pub(crate) fn agents(&self) -> &crate::agent::Agents {
        &self.inner.agents
    }

    /// Apply `text` as `file` says, like `POST /apply`, and wait until it is followed.
    pub(crate) async fn apply_text(
        &self,
        file: &str,
        text: &str,
    ) -> ApiResult<Vec<crate::apply::Applied>> {
        let _one = self.inner.apply_lock.lock().await;
        let current = self.inner.state.borrow().clone();
        let applied = apply(&self.inner.store, &current.catalog, file, text).await?;
        let rev = applied
            .iter()
            .filter_map(|a| a.resource_version.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        self.caught_up(rev).await;
        Ok(applied)
    }

    /// A stored document as this replica follows it (no store read).
    pub(crate) fn followed(&self, key: &Key) -> Option<Value> {
        self.inner
            .state
            .borrow()
            .catalog
            .entries
            .get(key)
            .map(|e| e.object.doc.clone())
    }

    /// The store.
    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Serve until the process ends.
    pub async fn serve(self, l: TcpListener) {
        if let Err(e) = axum::serve(l, self.router()).await {
            tracing::error!(error = %e, "api server failed");
        }
    }

    /// Serve on `l` with TLS only (an address beyond loopback): the admin token must not
    /// cross a network in the clear.
    pub async fn serve_tls(self, l: crate::tls::TlsListener) {
        if let Err(e) = axum::serve(l, self.router()).await {
            tracing::error!(error = %e, "api server failed");
        }
    }

    /// Wait until the followed state has caught up with `revision` (read-your-writes).
    async fn caught_up(&self, revision: u64) -> Arc<State> {
        let mut rx = self.inner.state.clone();
        let wait = async move {
            rx.wait_for(|s| s.catalog.revision >= revision)
                .await
                .map(|s| s.clone())
        };
        match tokio::time::timeout(Duration::from_secs(5), wait).await {
            Ok(Ok(s)) => s,
            _ => self.inner.state.borrow().clone(),
        }
    }
}

async fn auth(AxState(api): AxState<Api>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if api.inner.token.accepts(t) => next.run(req).await,
        _ => {
            let mut r = ApiError(
                StatusCode::UNAUTHORIZED,
                "a valid bearer token is required".into(),
            )
            .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
            r
        }
    }
}

async fn apply_h(
    AxState(api): AxState<Api>,
    Query(q): Query<ApplyQuery>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError(StatusCode::BAD_REQUEST, "body is not UTF-8".into()))?;
    let file = q.file.unwrap_or_else(|| "request".into());
    let applied = api.apply_text(&file, text).await?;
    Ok(Json(json!({ "applied": applied })))
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
    let s = api.inner.state.borrow().clone();
    Json(list(&s, None, None))
}

async fn list_kind(AxState(api): AxState<Api>, Path(kind): Path<String>) -> ApiResult<Json<Value>> {
    let k = kind_or_404(&kind)?;
    let s = api.inner.state.borrow().clone();
    Ok(Json(list(&s, Some(k), None)))
}

async fn list_ns(
    AxState(api): AxState<Api>,
    Path((kind, ns)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let k = kind_or_404(&kind)?;
    let s = api.inner.state.borrow().clone();
    Ok(Json(list(&s, Some(k), Some(&ns))))
}

async fn get_one(
    AxState(api): AxState<Api>,
    Path((kind, ns, name)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let k = kind_or_404(&kind)?;
    let s = api.inner.state.borrow().clone();
    let key = Key::new(k, &ns, &name);
    let e = s
        .catalog
        .entries
        .get(&key)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("{key} not found")))?;
    let mut doc = render(e, &s);
    // Which connected proxies use it: for a Workload, the proxies serving it.
    let used_by = api.inner.proxies.using(&key);
    doc["usedBy"] = json!(used_by);
    Ok(Json(doc))
}

async fn delete_one(
    AxState(api): AxState<Api>,
    Path((kind, ns, name)): Path<(String, String, String)>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<Json<Value>> {
    let k = kind_or_404(&kind)?;
    let key = Key::new(k, &ns, &name);
    let _one = api.inner.apply_lock.lock().await;
    let expect = q.resource_version.map_or(Expect::Any, Expect::Version);
    let mut writes = vec![Write {
        key: key.clone(),
        doc: None,
        expect,
    }];
    // A deleted Service's virtual IP is free again, in the same batch.
    if k == "Service" {
        let current = api.inner.state.borrow().clone();
        let mut alloc = crate::vips::Allocations::read(&api.inner.store, &current.catalog).await?;
        alloc.release(&format!("{ns}/{name}"));
        writes.extend(alloc.write());
    }
    let rev = api.inner.store.write(writes).await?;
    api.caught_up(rev).await;
    Ok(Json(
        json!({ "deleted": { "kind": k, "namespace": ns, "name": name }, "revision": rev.to_string() }),
    ))
}

async fn watch_h(AxState(api): AxState<Api>, Query(q): Query<WatchQuery>) -> ApiResult<Response> {
    let kind = match q.kind.as_deref() {
        Some(k) => Some(kind_or_404(k)?),
        None => None,
    };
    let mut rx = api.inner.state.clone();
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
fn async_stream<F, Fut>(
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
    let s = api.inner.state.borrow().clone();
    Json(json!({
        "revision": s.catalog.revision.to_string(),
        "proxies": api.inner.proxies.snapshot(),
    }))
}
