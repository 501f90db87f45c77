//! Handlers of the fleet's telemetry: proxies' reports in (`POST /v1/telemetry`, on the xDS
//! address), `stat` and `edges` out, and the fleet for Prometheus.

use axum::{
    body::Bytes,
    extract::{Query, RawQuery, State as AxState},
    http::header,
    response::{IntoResponse, Response},
    Extension, Json,
};
use prost::Message;
use serde::Deserialize;
use trellis_telemetry::{
    report::Batch,
    shard::Shard,
    view::{EdgeRow, Kind, Selector, StatRow},
};

use super::{Api, ApiError, ApiResult};
use crate::{
    fleet::{now_ms, FleetError},
    tls::Peer,
};

/// `POST /v1/telemetry`: a batch of one proxy's reports (protobuf); answers an `Ack`.
pub(crate) async fn report(
    AxState(api): AxState<Api>,
    peer: Option<Extension<Peer>>,
    body: Bytes,
) -> ApiResult<Response> {
    let batch = Batch::decode(body).map_err(|e| ApiError::BadRequest(format!("report: {e}")))?;
    let id = peer.as_ref().and_then(|p| p.id.as_ref());
    let ack = api.fleet().ingest(api.writer(), batch, id)?;
    Ok((
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ack.encode_to_vec(),
    )
        .into_response())
}

/// What `stat` and `edges` take.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ViewQuery {
    /// `service` (default) or `workload`.
    kind: Option<String>,
    /// Namespace.
    namespace: Option<String>,
    /// Name (`namespace/name`, or a name in `namespace`).
    name: Option<String>,
    /// `1m` by default: 10s to 24h.
    window: Option<String>,
    /// Where the window ends, Unix ms (default: now; never later than now). Replicas ask
    /// each other with the asking one's `at`, so that every part covers the same slots.
    at: Option<u64>,
    /// For the stream: seconds between two pushes (default 5, 1 to 60).
    every: Option<u64>,
}

impl ViewQuery {
    fn parse(self, api: &Api) -> ApiResult<(Selector, u64, u64)> {
        let kind = match self.kind.as_deref() {
            None | Some("service" | "services" | "svc") => Some(Kind::Service),
            Some("workload" | "workloads" | "wl") => Some(Kind::Workload),
            Some(k) => {
                return Err(ApiError::BadRequest(format!(
                    "kind {k:?}: service or workload"
                )))
            }
        };
        let window = match self.window.as_deref() {
            None => 60_000,
            Some(w) => {
                let d: trellis_model::value::DurationValue = w
                    .parse()
                    .map_err(|e| ApiError::BadRequest(format!("window: {e}")))?;
                d.0.as_millis() as u64
            }
        };
        let max = api.fleet().max_window_ms();
        if !(1_000..=max).contains(&window) {
            return Err(ApiError::BadRequest(format!(
                "window: between 1s and {}h",
                max / 3_600_000
            )));
        }
        let now = now_ms();
        let at = self.at.map_or(now, |a| a.min(now));
        Ok((
            Selector {
                kind,
                namespace: self.namespace,
                name: self.name,
            },
            window,
            at,
        ))
    }
}

/// The query another replica is asked for its part of the same window.
fn shard_query(sel: &Selector, window_ms: u64, at_ms: u64) -> String {
    let mut q = format!("window={window_ms}ms&at={at_ms}");
    if let Some(k) = sel.kind {
        q.push_str(match k {
            Kind::Service => "&kind=service",
            Kind::Workload => "&kind=workload",
        });
    }
    for (k, v) in [("namespace", &sel.namespace), ("name", &sel.name)] {
        if let Some(v) = v {
            q.push_str(&format!("&{k}={}", escape(v)));
        }
    }
    q
}

fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// The other replicas' parts of a window (none with a single replica), and a header naming
/// those that did not answer.
async fn others(
    api: &Api,
    sel: &Selector,
    window_ms: u64,
    at_ms: u64,
) -> (Vec<Shard>, Option<String>) {
    let Some(r) = api.replicas() else {
        return (Vec::new(), None);
    };
    let (shards, missing) = r.gather(&shard_query(sel, window_ms, at_ms)).await;
    let partial = lacking(&missing, |n| {
        format!("this answer lacks what {n} other replica(s) hold")
    });
    (shards, partial)
}

/// What an answer lacks (`lacks`, given how many replicas did not answer) and why each
/// replica in `missing` did not; None when none is missing.
fn lacking(
    missing: &[crate::replicas::Unreachable],
    lacks: impl FnOnce(usize) -> String,
) -> Option<String> {
    (!missing.is_empty()).then(|| {
        let why: Vec<String> = missing.iter().map(ToString::to_string).collect();
        format!("{}: {}", lacks(missing.len()), why.join("; "))
    })
}

/// `r` with `x-trellis-partial` when part of the fleet is missing.
fn mark_partial(mut r: Response, partial: Option<String>) -> Response {
    if let Some(p) = partial.and_then(|p| axum::http::HeaderValue::try_from(p).ok()) {
        r.headers_mut().insert(PARTIAL, p);
    }
    r
}

/// `rows` as JSON, with `x-trellis-partial` when part of the fleet is missing.
fn answer<T: serde::Serialize>(rows: T, partial: Option<String>) -> Response {
    mark_partial(Json(rows).into_response(), partial)
}

/// Names the replicas an answer lacks.
const PARTIAL: &str = "x-trellis-partial";

/// `GET /api/v1/stat`: rate, success and latency per service or workload, for the whole
/// fleet (other replicas' parts merged in).
pub(crate) async fn stat(
    AxState(api): AxState<Api>,
    Query(q): Query<ViewQuery>,
) -> ApiResult<Response> {
    let (sel, window, at) = q.parse(&api)?;
    let (shards, partial) = others(&api, &sel, window, at).await;
    let fleet = api.fleet_arc();
    let rows: Vec<StatRow> =
        tokio::task::spawn_blocking(move || fleet.stat(&sel, window, at, shards))
            .await
            .map_err(|e| ApiError::BadRequest(format!("stat: {e}")))??;
    Ok(answer(rows, partial))
}

/// `GET /api/v1/mirrors`: routes' mirrors and how their answers compared with the
/// primary's, for the whole fleet.
pub(crate) async fn mirrors(
    AxState(api): AxState<Api>,
    Query(q): Query<ViewQuery>,
) -> ApiResult<Response> {
    let (sel, window, at) = q.parse(&api)?;
    let (shards, partial) = others(&api, &Selector::default(), window, at).await;
    let fleet = api.fleet_arc();
    let rows = tokio::task::spawn_blocking(move || fleet.mirrors(&sel, window, at, shards))
        .await
        .map_err(|e| ApiError::BadRequest(format!("mirrors: {e}")))??;
    Ok(answer(rows, partial))
}

/// `GET /api/v1/edges`: caller → callee pairs, for the whole fleet.
pub(crate) async fn edges(
    AxState(api): AxState<Api>,
    Query(q): Query<ViewQuery>,
) -> ApiResult<Response> {
    let (mut sel, window, at) = q.parse(&api)?;
    sel.kind = Some(Kind::Workload);
    let (shards, partial) = others(&api, &sel, window, at).await;
    let fleet = api.fleet_arc();
    let rows: Vec<EdgeRow> =
        tokio::task::spawn_blocking(move || fleet.edges(&sel, window, at, shards))
            .await
            .map_err(|e| ApiError::BadRequest(format!("edges: {e}")))??;
    Ok(answer(rows, partial))
}

/// What diagnose reads besides the traffic, for the window of `window_ms` before `at_ms`.
fn facts(api: &Api, window_ms: u64, at_ms: u64) -> trellis_telemetry::diagnose::Facts {
    let events = api.events().since(at_ms.saturating_sub(window_ms));
    crate::diagnose::facts(
        &api.writer().state(),
        &api.proxies().snapshot(),
        &events,
        at_ms,
    )
}

/// How many proxies connected to this replica serve a workload `sel` selects (diagnose's
/// rule): with no report from them yet, "nothing to judge" is said with them counted.
fn connected(api: &Api, sel: &Selector) -> usize {
    let pick = trellis_telemetry::diagnose::selector(sel.namespace.as_deref(), sel.name.as_deref());
    api.proxies()
        .snapshot()
        .iter()
        .filter(|p| p.workload.as_deref().is_some_and(&pick))
        .count()
}

/// `GET /api/v1/diagnose`: what is failing, where, why, with the evidence of both ends of
/// each hop (the whole fleet, as `stat`).
pub(crate) async fn diagnose(
    AxState(api): AxState<Api>,
    Query(q): Query<ViewQuery>,
) -> ApiResult<Response> {
    let (sel, window, at) = q.parse(&api)?;
    let (shards, partial) = others(&api, &Selector::default(), window, at).await;
    let facts = facts(&api, window, at);
    let connected = connected(&api, &sel);
    let fleet = api.fleet_arc();
    let (verdicts, judged) =
        tokio::task::spawn_blocking(move || fleet.diagnose(&sel, window, at, shards, &facts))
            .await
            .map_err(|e| ApiError::BadRequest(format!("diagnose: {e}")))??;
    Ok(answer(
        serde_json::json!({ "window_ms": window, "verdicts": verdicts, "judged": judged, "connected": connected }),
        partial,
    ))
}

/// `GET /api/v1/services/{ns}/{name}/view`: the pane's service view: its figures over the
/// window slot by slot (from the reports this replica received; `x-trellis-partial` when
/// other replicas hold some), the workloads it selects with their health and events, the
/// routes and policies that name it, its mutual-TLS mode.
pub(crate) async fn service_view(
    AxState(api): AxState<Api>,
    axum::extract::Path((ns, name)): axum::extract::Path<(String, String)>,
    Query(q): Query<ViewQuery>,
) -> ApiResult<Response> {
    let (_, window, at) = q.parse(&api)?;
    let events = api.events().since(at.saturating_sub(3_600_000));
    let mut v = crate::service_view::view(&api.writer().state(), &events, &ns, &name)
        .ok_or_else(|| ApiError::NotFound(format!("Service {ns}/{name} not found")))?;
    v["timeline"] = serde_json::to_value(api.fleet().timeline(&format!("{ns}/{name}"), window, at))
        .unwrap_or_default();
    v["window_ms"] = window.into();
    let partial = match api.replicas() {
        Some(r) if !r.peers().await.is_empty() => {
            Some("the timeline holds only the reports this replica received".to_string())
        }
        _ => None,
    };
    Ok(answer(v, partial))
}

/// What the pane shows, computed once for one window: stat, edges, diagnose (the other
/// replicas asked once for all three) and the proxies.
async fn pane_figures(api: &Api, sel: &Selector, window: u64) -> ApiResult<serde_json::Value> {
    let at = now_ms();
    let (shards, partial) = others(api, &Selector::default(), window, at).await;
    let facts = facts(api, window, at);
    let connected = connected(api, sel);
    let fleet = api.fleet_arc();
    let sel = sel.clone();
    let (stat, edges, (verdicts, judged), mirrors) =
        tokio::task::spawn_blocking(move || fleet.figures(&sel, window, at, shards, &facts))
            .await
            .map_err(|e| ApiError::BadRequest(format!("figures: {e}")))??;
    Ok(serde_json::json!({
        "stat": stat,
        "edges": edges,
        "diagnose": { "window_ms": window, "verdicts": verdicts, "judged": judged, "connected": connected },
        "proxies": super::resources::proxies_value(api)["proxies"],
        "spill": api.spill().states(),
        "mirrors": mirrors,
        "rollouts": api.rollouts().statuses(None, None).await.unwrap_or_default(),
        "partial": partial,
    }))
}

/// `GET /api/v1/fleet/stream`: the pane's figures pushed as server-sent events (`fleet`),
/// now and every few seconds, until the client leaves.
pub(crate) async fn stream(
    AxState(api): AxState<Api>,
    Query(q): Query<ViewQuery>,
) -> ApiResult<Response> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let every = std::time::Duration::from_secs(q.every.unwrap_or(5).clamp(1, 60));
    let (sel, window, _) = q.parse(&api)?;
    let stream = super::resources::async_stream(move |tx| async move {
        loop {
            let ev = match pane_figures(&api, &sel, window).await {
                Ok(v) => Event::default().event("fleet").json_data(v),
                Err(e) => Event::default()
                    .event("problem")
                    .json_data(serde_json::json!({ "error": e.to_string() })),
            };
            if tx.send(ev).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
        .into_response())
}

/// `GET /api/v1/check`: the mesh's own health, check by check.
pub(crate) async fn check(AxState(api): AxState<Api>) -> Json<serde_json::Value> {
    let checks = crate::check::run(&api).await;
    Json(serde_json::json!({ "checks": checks }))
}

/// `GET /v1/fleet/shard` (xDS address, another replica only): this replica's part of a
/// window, protobuf.
pub(crate) async fn shard(
    AxState(api): AxState<Api>,
    peer: Option<Extension<Peer>>,
    Query(q): Query<ViewQuery>,
) -> ApiResult<Response> {
    only_replicas(&api, peer.as_ref())?;
    let (sel, window, at) = q.parse(&api)?;
    let fleet = api.fleet_arc();
    let shard = tokio::task::spawn_blocking(move || fleet.shard(&sel, window, at))
        .await
        .map_err(|e| ApiError::BadRequest(format!("shard: {e}")))??;
    Ok((
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        shard.encode_to_vec(),
    )
        .into_response())
}

/// `GET /metrics`: the fleet, in Prometheus's text format.
pub(crate) async fn metrics(AxState(api): AxState<Api>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        api.fleet().prometheus(),
    )
        .into_response()
}

/// Who a proxy says it is, for its taps.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WorkloadQuery {
    /// `namespace/name`.
    #[serde(default)]
    workload: String,
}

/// `GET /v1/tap`: a proxy follows the taps it is to apply.
pub(crate) async fn follow_taps(
    AxState(api): AxState<Api>,
    peer: Option<Extension<Peer>>,
    Query(q): Query<WorkloadQuery>,
) -> ApiResult<Response> {
    if let Some(id) = peer.as_ref().and_then(|p| p.id.as_ref()) {
        api.fleet().check_owner(api.writer(), &q.workload, id)?;
    }
    let body = axum::body::Body::from_stream(api.taps().follow(q.workload));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// `POST /v1/tap/events`: what a proxy's taps copied.
pub(crate) async fn tap_events(
    AxState(api): AxState<Api>,
    peer: Option<Extension<Peer>>,
    Query(q): Query<WorkloadQuery>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    if let Some(id) = peer.as_ref().and_then(|p| p.id.as_ref()) {
        api.fleet().check_owner(api.writer(), &q.workload, id)?;
    }
    let events: Vec<serde_json::Value> =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("events: {e}")))?;
    let relayed = api.taps().deliver(&q.workload, events);
    Ok(Json(serde_json::json!({ "relayed": relayed })))
}

/// `GET /v1/fleet/loads` (xDS address, another replica only): the beacons this replica
/// heard itself lately, JSON, so that every replica decides spill-over from the whole
/// fleet's loads.
pub(crate) async fn loads(
    AxState(api): AxState<Api>,
    peer: Option<Extension<Peer>>,
) -> ApiResult<Json<Vec<trellis_telemetry::load::Heard>>> {
    only_replicas(&api, peer.as_ref())?;
    Ok(Json(api.spill().own(std::time::Instant::now())))
}

/// What another replica asks while a deregistration waits.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct BehindQuery {
    /// The store revision that removed the workload.
    rev: u64,
    /// `NAMESPACE/NAME` of the leaving workload (its own proxy is not waited for).
    workload: String,
    /// How long to wait for this replica's proxies, in milliseconds.
    #[serde(default)]
    wait_ms: u64,
}

/// `GET /v1/fleet/behind` (xDS address, another replica only): answered once the proxies
/// connected here have applied revision `rev` (or the wait passed), with how many had not.
pub(crate) async fn behind(
    AxState(api): AxState<Api>,
    peer: Option<Extension<Peer>>,
    Query(q): Query<BehindQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    only_replicas(&api, peer.as_ref())?;
    let wait = std::time::Duration::from_millis(q.wait_ms);
    let n = crate::agent::until_applied(api.proxies(), q.rev, &q.workload, wait).await;
    Ok(Json(serde_json::json!({ "behind": n })))
}

/// Refuse a caller that is not another control-plane replica (by its certificate).
fn only_replicas(api: &Api, peer: Option<&Extension<Peer>>) -> ApiResult<()> {
    let me = trellis_identity::tls::control_plane_id(&api.identity().trust_domain);
    if peer.and_then(|p| p.id.as_ref()) != Some(&me) {
        return Err(FleetError::Forbidden(
            "only another control-plane replica (by its certificate) may ask for this".into(),
        )
        .into());
    }
    Ok(())
}

/// `POST /v1/load`: a proxy's load; answers the spill-over shares.
pub(crate) async fn load(
    AxState(api): AxState<Api>,
    peer: Option<Extension<Peer>>,
    body: Bytes,
) -> ApiResult<Json<trellis_telemetry::load::Answer>> {
    let b: trellis_telemetry::load::Beacon =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("load: {e}")))?;
    if let Some(id) = peer.as_ref().and_then(|p| p.id.as_ref()) {
        api.fleet().check_owner(api.writer(), &b.workload, id)?;
    }
    Ok(Json(api.spill().beacon(&b, std::time::Instant::now())))
}

/// What `GET /api/v1/spill` takes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SpillQuery {
    namespace: Option<String>,
    /// `name` or `namespace/name`.
    name: Option<String>,
}

/// `GET /api/v1/spill`: where services spill over (this replica's decisions, from the whole
/// fleet's loads).
pub(crate) async fn spill(
    AxState(api): AxState<Api>,
    Query(q): Query<SpillQuery>,
) -> Json<Vec<trellis_telemetry::load::SpillState>> {
    let full = q
        .name
        .as_ref()
        .map(|n| match (n.contains('/'), &q.namespace) {
            (true, _) => n.clone(),
            (false, ns) => format!("{}/{n}", ns.as_deref().unwrap_or("default")),
        });
    let mut states = api.spill().states();
    states.retain(|s| {
        full.as_ref().is_none_or(|f| &s.service == f)
            && q.namespace
                .as_ref()
                .is_none_or(|ns| s.service.split('/').next() == Some(ns))
    });
    Json(states)
}

/// What `trellis tap` asks for.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TapQuery {
    /// `service` (default) or `workload`.
    kind: Option<String>,
    /// Namespace of `name` (default `default`).
    namespace: Option<String>,
    /// `name` or `namespace/name`.
    name: String,
    method: Option<String>,
    path_prefix: Option<String>,
    authority: Option<String>,
    failure_class: Option<String>,
    /// Events a second over the whole mesh (default 100, at most 10,000).
    max_rps: Option<f64>,
    /// Show header values (never those of credentials). Off by default.
    #[serde(default)]
    headers: bool,
}

impl TapQuery {
    /// The session it asks for.
    fn spec(self) -> ApiResult<crate::tap::Spec> {
        use crate::tap::{Spec, Target};
        let q = self;
        let target = match q.kind.as_deref() {
            None | Some("service" | "svc") => Target::Service,
            Some("workload" | "wl") => Target::Workload,
            Some(k) => {
                return Err(ApiError::BadRequest(format!(
                    "kind {k:?}: service or workload"
                )))
            }
        };
        let name = if q.name.contains('/') {
            q.name
        } else {
            format!("{}/{}", q.namespace.as_deref().unwrap_or("default"), q.name)
        };
        if let Some(c) = &q.failure_class {
            c.parse::<trellis_taxonomy::FailureClass>().map_err(|_| {
                ApiError::BadRequest(format!("failure_class {c:?} is not a failure class"))
            })?;
        }
        let max_rps = q.max_rps.unwrap_or(100.0);
        if !(max_rps > 0.0 && max_rps <= 10_000.0) {
            return Err(ApiError::BadRequest(
                "max_rps: more than 0, at most 10000".into(),
            ));
        }
        Ok(Spec {
            target,
            name,
            method: q.method,
            path_prefix: q.path_prefix,
            authority: q.authority,
            failure_class: q.failure_class,
            max_rps,
            headers: q.headers,
        })
    }
}

/// `GET /api/v1/tap`: live requests, one JSON object a line, from the proxies connected to
/// every replica (each other replica opens the same session for its own proxies and this one
/// relays their events within the session's bound). `x-trellis-tap-proxies` says how many
/// proxies the session reaches; `x-trellis-partial` names a replica that did not answer.
pub(crate) async fn tap(
    AxState(api): AxState<Api>,
    RawQuery(raw): RawQuery,
    Query(q): Query<TapQuery>,
) -> ApiResult<Response> {
    let spec = q.spec()?;
    let mut reach = api.taps().reach(&spec);
    let (opened, events) = api.taps().open(spec);
    let mut partial = None;
    if let Some(r) = api.replicas() {
        let (parts, missing) = r.taps(raw.as_deref().unwrap_or_default()).await;
        for (n, part) in parts {
            reach += n;
            tokio::spawn(api.taps().clone().relay_from(opened.clone(), part));
        }
        partial = lacking(&missing, |n| {
            format!("this tap lacks the proxies of {n} other replica(s)")
        });
    }
    tap_answer(events, reach, partial)
}

/// `GET /v1/fleet/tap` (xDS address, another replica only): this replica's part of a tap
/// session opened on another, for the proxies connected here.
pub(crate) async fn tap_part(
    AxState(api): AxState<Api>,
    peer: Option<Extension<Peer>>,
    Query(q): Query<TapQuery>,
) -> ApiResult<Response> {
    only_replicas(&api, peer.as_ref())?;
    let spec = q.spec()?;
    let reach = api.taps().reach(&spec);
    let (_, events) = api.taps().open(spec);
    tap_answer(events, reach, None)
}

/// A tap session's events as an answer, with how many proxies it reaches.
fn tap_answer(
    events: impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
    reach: usize,
    partial: Option<String>,
) -> ApiResult<Response> {
    let r = (
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_string()),
            (
                header::HeaderName::from_static(crate::replicas::TAP_REACH),
                reach.to_string(),
            ),
        ],
        axum::body::Body::from_stream(events),
    )
        .into_response();
    Ok(mark_partial(r, partial))
}
