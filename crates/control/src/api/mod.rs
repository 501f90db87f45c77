//! The HTTP API under `/api/v1/`: JSON in and out, a bearer token on every call. The handlers
//! are thin: they parse the request and call the domain modules ([`crate::apply`],
//! [`crate::identity`], [`crate::agent`]), whose typed errors become statuses here.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | POST | `/api/v1/apply?file=NAME` | apply multi-document YAML (or JSON) atomically; each applied document's `warning` says what of it does not resolve and what that leaves out |
//! | GET | `/api/v1/resources` | every resource, with status |
//! | GET | `/api/v1/resources/KIND[/NAMESPACE]` | the resources of a kind (in a namespace) |
//! | GET | `/api/v1/resources/KIND/NAMESPACE/NAME` | one resource, with status and the proxies that use it |
//! | DELETE | `/api/v1/resources/KIND/NAMESPACE/NAME[?resourceVersion=N]` | delete |
//! | GET | `/api/v1/watch[?kind=KIND]` | server-sent events, one per change |
//! | GET | `/api/v1/proxies` | every connected proxy and its ACK/NACK state |
//! | POST | `/api/v1/tokens` | a join token (shown once) |
//! | GET | `/api/v1/tokens` | every join token's grant |
//! | DELETE | `/api/v1/tokens/ID` | revoke a join token |
//! | GET | `/api/v1/ca` | the CA: roots, the signing one, rotation phase, `caHash` |
//! | POST | `/api/v1/ca/rotate` | one phase of a root rotation |
//! | POST | `/api/v1/certificates` (also `/v1/certificates` on the xDS address) | a certificate, for a join token or a proof of the current one (no admin token) |
//! | POST | `/api/v1/agent` (also `/v1/agent` on the xDS address) | an agent's signed register, heartbeat or deregister (no admin token) |
//! | POST | `/v1/telemetry` (xDS address only) | a proxy's reports (protobuf `Batch`, answered by an `Ack`); its certificate must be the workload's identity |
//! | GET | `/api/v1/stat?kind=service\|workload&namespace=NS&name=NAME&window=1m` | rate, success, latency, TCP and failures by category, per service or workload; for the whole fleet (other replicas' parts merged in; `x-trellis-partial` names a replica that did not answer) |
//! | GET | `/api/v1/edges?namespace=NS&name=NAME&window=1m` | caller → callee workload pairs with their identities, mTLS and figures (whole fleet, as `stat`) |
//! | GET | `/api/v1/diagnose?namespace=NS&name=NAME&window=5m` | verdicts: network, application, mesh policy or configuration, where, the evidence of both ends of each hop, and what to check next |
//! | GET | `/api/v1/mirrors?namespace=NS&name=NAME&window=1m` | routes' mirrors: copies sent and skipped, how often the mirror's status class agreed with the primary's, its latency against the primary's, its failures by class |
//! | GET | `/api/v1/rollouts?namespace=NS&name=NAME` | rollouts (`kind: Rollout`): phase, step, the canary's weight, the last analysis (the canary's and the stable's figures, the verdict and why), what happened |
//! | POST | `/api/v1/rollouts/{ns}/{name}/{pause,resume,abort,promote}` | move a rollout by hand (409 when its phase does not allow it) |
//! | GET | `/api/v1/spill?namespace=NS&name=NAME` | services with a spill-over policy: each pool's load, the share it spills to the next and since when, what moved lately |
//! | POST | `/v1/load` (xDS address only) | a proxy's load (JSON `Beacon`); answers the spill-over shares and when to come back |
//! | GET | `/api/v1/fleet/stream?namespace=NS&window=5m&every=5` | server-sent events `fleet`: stat, edges, diagnose and proxies at once, now and every few seconds (the pane's feed) |
//! | GET | `/api/v1/services/{ns}/{name}/view?window=15m` | the pane's service view: a timeline slot by slot (requests, failed, p50/p99, requests by serving workload; this replica's reports), the workloads it selects with health and events, the routes and policies that name it, its mTLS mode |
//! | POST, GET | `/api/v1/viewer-tokens` | make a read-only token (`{"name"}`; the token is in the answer, once), list them (admin only) |
//! | DELETE | `/api/v1/viewer-tokens/{id}` | revoke one; sessions opened with it end |
//! | GET | `/api/v1/check` | the mesh's own health: store, proxies in sync, references, certificates, root rotation, workloads, agents, clocks; each pass, warn or fail with a hint |
//! | GET | `/v1/fleet/shard?kind=&namespace=&name=&window=&at=` (xDS address only) | this replica's part of a window (protobuf `Shard`), for another replica: its certificate must be the control plane's |
//! | GET | `/v1/fleet/behind?rev=&workload=&waitMs=` (xDS address only) | answered once the proxies connected to this replica have applied store revision `rev` (the workload's own aside) or the wait (at most 10 s) passed: `{"behind": N}`, for another replica's deregistration; the control plane's certificate only |
//! | GET | `/v1/fleet/loads` (xDS address only) | the proxies' loads this replica heard itself lately (JSON `Heard` list), for another replica's spill-over decisions; the control plane's certificate only |
//! | GET | `/api/v1/tap?kind=service\|workload&namespace=NS&name=NAME&method=M&path_prefix=P&authority=A&failure_class=C&max_rps=N&headers=true` | live requests, one JSON object a line, until the client leaves, from the proxies of every replica; `x-trellis-tap-proxies` says how many proxies it reaches (`x-trellis-partial` names a replica that did not answer); header values only with `headers=true`, never those of credentials |
//! | GET | `/v1/fleet/tap?…` (xDS address only) | this replica's part of a tap session opened on another (same query as `/api/v1/tap`), for the proxies connected here; `x-trellis-tap-proxies` says how many it reaches; the control plane's certificate only |
//! | GET | `/v1/tap?workload=NS/NAME` (xDS address only) | a proxy follows its taps: one JSON line `{taps: [...]}` now and at each change |
//! | POST | `/v1/tap/events?workload=NS/NAME` (xDS address only) | a proxy's tapped records, a JSON array |
//! | GET | `/metrics` | the fleet's counters and latency in Prometheus's text format (admin token) |
//! | GET | `/healthz` | liveness, no token |
//! | GET | `/ui/` (and `/`) | the single pane: the fleet's topology, problems, services and traffic shifts (embedded page; `POST /ui/session` with the admin token gives an HttpOnly, SameSite=Strict session cookie that the API accepts from this listener's own host names); `POST /api/v1/ui/links` gives a sign-in link, `GET /ui/enter?code=…`, that opens one session once within 15 minutes) |

mod agent;
mod fleet;
mod identity;
mod pane;
mod resources;
mod rollouts;

use std::sync::Arc;

use axum::{
    extract::{DefaultBodyLimit, Request, State as AxState},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};
use trellis_store::{Store, StoreError};

use crate::{
    agent::{AgentError, Agents},
    apply::{ApplyError, Writer},
    error::ControlError,
    events::Events,
    fleet::{Fleet, FleetError},
    identity::{CaRequestError, Identity},
    registry::Registry,
    replicas::Replicas,
    rollout::RolloutError,
    state::State,
    tls::TlsListener,
    token,
};

/// The API's shared state.
#[derive(Clone)]
pub(crate) struct Api {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Arc<Writer>,
    proxies: Registry,
    token: token::AdminToken,
    identity: Arc<Identity>,
    max_body: usize,
    /// Agents heard from by this replica.
    agents: Agents,
    /// The fleet's telemetry.
    fleet: Arc<Fleet>,
    /// Live tap sessions.
    taps: Arc<crate::tap::Taps>,
    /// The other replicas on a shared store, asked for their part of fleet queries.
    replicas: Option<Arc<Replicas>>,
    /// Workloads' timed events.
    events: Events,
    /// The page's sessions.
    pane: crate::pane::Pane,
    /// Read-only tokens.
    viewers: token::Viewers,
    /// Spill-over decisions.
    spill: Arc<crate::spill::Spill>,
    /// Progressive delivery.
    rollouts: Arc<crate::rollout::Rollouts>,
}

/// Why an API call failed; each becomes a status and `{"error": ..., "code": ...}`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// The request is malformed (400).
    #[error("{0}")]
    BadRequest(String),
    /// No valid token (401).
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// A read-only token (or session) asked to change something, or to read tokens (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such resource, kind or route (404).
    #[error("{0}")]
    NotFound(String),
    /// An apply was refused, or a stale version given.
    #[error(transparent)]
    Apply(Box<ApplyError>),
    /// The store failed, or refused a write.
    #[error(transparent)]
    Store(Box<StoreError>),
    /// The CA refused.
    #[error(transparent)]
    Ca(Box<CaRequestError>),
    /// An agent's request was refused.
    #[error(transparent)]
    Agent(Box<AgentError>),
    /// The control plane's own setup (its CA record) failed.
    #[error(transparent)]
    Setup(Box<ControlError>),
    /// A proxy's reports were refused.
    #[error(transparent)]
    Fleet(Box<FleetError>),
    /// A rollout could not be moved.
    #[error(transparent)]
    Rollout(Box<RolloutError>),
}

// Boxed: an error travels through every handler's `Result`, which should stay small.
macro_rules! boxed_from {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for ApiError {
            fn from(e: $t) -> Self {
                Self::$v(Box::new(e))
            }
        }
    )*};
}

boxed_from!(
    FleetError => Fleet,
    ApplyError => Apply,
    StoreError => Store,
    CaRequestError => Ca,
    AgentError => Agent,
    ControlError => Setup,
    RolloutError => Rollout
);

impl ApiError {
    fn status(&self) -> StatusCode {
        fn store(e: &StoreError) -> StatusCode {
            match e {
                StoreError::Conflict { .. } => StatusCode::CONFLICT,
                StoreError::NotFound(_) => StatusCode::NOT_FOUND,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            }
        }
        fn setup(e: &ControlError) -> StatusCode {
            match e {
                ControlError::Store(e) => store(e),
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            }
        }
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Apply(e) => match &**e {
                ApplyError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
                ApplyError::Store(e) => store(e),
            },
            Self::Store(e) => store(e),
            Self::Ca(e) => match &**e {
                CaRequestError::BadRequest(_) => StatusCode::BAD_REQUEST,
                CaRequestError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
                CaRequestError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
                CaRequestError::Forbidden(_) => StatusCode::FORBIDDEN,
                CaRequestError::Conflict(_) => StatusCode::CONFLICT,
                CaRequestError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
                CaRequestError::Store(e) => store(e),
                CaRequestError::Setup(e) => setup(e),
            },
            Self::Agent(e) => match &**e {
                AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
                AgentError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
                AgentError::Forbidden(_) => StatusCode::FORBIDDEN,
                AgentError::NotRegistered(_) => StatusCode::NOT_FOUND,
                AgentError::Invalid(ApplyError::Invalid(_)) => StatusCode::UNPROCESSABLE_ENTITY,
                AgentError::Invalid(ApplyError::Store(e)) | AgentError::Store(e) => store(e),
                AgentError::Setup(e) => setup(e),
            },
            Self::Setup(e) => setup(e),
            Self::Fleet(e) => match &**e {
                FleetError::BadReport(_) => StatusCode::BAD_REQUEST,
                FleetError::Forbidden(_) => StatusCode::FORBIDDEN,
            },
            Self::Rollout(e) => match &**e {
                RolloutError::NotFound(_) => StatusCode::NOT_FOUND,
                RolloutError::NotNow(_) => StatusCode::CONFLICT,
                RolloutError::Apply(ApplyError::Invalid(_)) => StatusCode::UNPROCESSABLE_ENTITY,
                RolloutError::Apply(ApplyError::Store(e)) | RolloutError::Store(e) => store(e),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = Json(json!({ "error": self.to_string(), "code": status.as_u16() }));
        let mut r = (status, body).into_response();
        if matches!(self, Self::Unauthorized) {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The largest batch of reports taken: 30 periods of 500 series with full histograms.
const TELEMETRY_MAX_BODY: usize = 16 << 20;

/// A JSON body, whatever its content type says (the CLI, agents and proxies send JSON).
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))
}

impl Api {
    /// The API over `store` and the followed `state`.
    // Each is one part of the API's state, built once at start by `Control::start`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        store: Store,
        state: watch::Receiver<Arc<State>>,
        proxies: Registry,
        token: token::AdminToken,
        identity: Arc<Identity>,
        max_body: usize,
        fleet: Arc<Fleet>,
        replicas: Option<Arc<Replicas>>,
        events: Events,
        pane: crate::pane::Pane,
    ) -> Self {
        let writer = Arc::new(Writer::new(store, state));
        let rollouts =
            crate::rollout::Rollouts::new(writer.clone(), fleet.clone(), replicas.clone());
        Self {
            inner: Arc::new(Inner {
                writer,
                rollouts,
                proxies,
                token,
                identity,
                max_body,
                agents: Agents::default(),
                fleet,
                taps: Arc::default(),
                replicas,
                events,
                pane,
                viewers: token::Viewers::default(),
                spill: Arc::default(),
            }),
        }
    }

    /// The router (also used by tests in-process).
    pub(crate) fn router(self) -> Router {
        let v1 = resources::routes()
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
            .route("/stat", get(fleet::stat))
            .route("/tap", get(fleet::tap))
            .route("/edges", get(fleet::edges))
            .route("/diagnose", get(fleet::diagnose))
            .route("/check", get(fleet::check))
            .route("/fleet/stream", get(fleet::stream))
            .route("/spill", get(fleet::spill))
            .route("/mirrors", get(fleet::mirrors))
            .route("/rollouts", get(rollouts::list))
            .route("/rollouts/{ns}/{name}/{action}", post(rollouts::act))
            .route("/ui/links", post(pane::new_link))
            .route(
                "/viewer-tokens",
                post(identity::create_viewer).get(identity::list_viewers),
            )
            .route(
                "/viewer-tokens/{id}",
                axum::routing::delete(identity::revoke_viewer),
            )
            .route("/services/{ns}/{name}/view", get(fleet::service_view))
            .layer(middleware::from_fn_with_state(self.clone(), auth))
            .layer(DefaultBodyLimit::max(self.inner.max_body));
        // Proxies and agents authenticate with a join token or their certificate here, not
        // the admin token.
        let ca = Router::new()
            .route("/certificates", post(identity::sign))
            .route("/agent", post(agent::handle))
            .layer(DefaultBodyLimit::max(64 << 10));
        let scrape = Router::new()
            .route("/metrics", get(fleet::metrics))
            .layer(middleware::from_fn_with_state(self.clone(), auth));
        let ui = Router::new()
            .route("/", get(pane::root))
            .route("/ui", get(pane::root))
            .route("/ui/", get(pane::index))
            .route("/ui/pane.js", get(pane::js))
            .route("/ui/pane.css", get(pane::css))
            .route(
                "/ui/session",
                post(pane::sign_in).get(pane::whoami).delete(pane::sign_out),
            )
            .route("/ui/enter", get(pane::enter))
            .layer(DefaultBodyLimit::max(4 << 10));
        Router::new()
            .nest("/api/v1", v1.merge(ca))
            .merge(scrape)
            .merge(ui)
            .route("/healthz", get(|| async { "ok\n" }))
            .with_state(self)
    }

    /// The certificate endpoint alone, for the xDS address: a proxy reaches its CA at the
    /// address it already has.
    pub(crate) fn certificate_router(&self) -> Router {
        Router::new()
            .route("/v1/certificates", post(identity::sign))
            .route("/v1/agent", post(agent::handle))
            .layer(DefaultBodyLimit::max(64 << 10))
            .merge(
                Router::new()
                    .route("/v1/telemetry", post(fleet::report))
                    .route("/v1/tap", get(fleet::follow_taps))
                    .route("/v1/tap/events", post(fleet::tap_events))
                    .route("/v1/load", post(fleet::load))
                    .route("/v1/fleet/shard", get(fleet::shard))
                    .route("/v1/fleet/loads", get(fleet::loads))
                    .route("/v1/fleet/tap", get(fleet::tap_part))
                    .route("/v1/fleet/behind", get(fleet::behind))
                    .layer(DefaultBodyLimit::max(TELEMETRY_MAX_BODY)),
            )
            .with_state(self.clone())
    }

    /// The CA and certificate lifetime.
    pub(crate) fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// The same, shared.
    pub(crate) fn identity_arc(&self) -> Arc<Identity> {
        self.inner.identity.clone()
    }

    /// Agents heard from by this replica.
    pub(crate) fn agents(&self) -> &Agents {
        &self.inner.agents
    }

    /// The fleet's telemetry.
    pub(crate) fn fleet(&self) -> &Fleet {
        &self.inner.fleet
    }

    /// The same, shared.
    pub(crate) fn fleet_arc(&self) -> Arc<Fleet> {
        self.inner.fleet.clone()
    }

    /// The read-only tokens.
    pub(crate) fn viewers(&self) -> &token::Viewers {
        &self.inner.viewers
    }

    /// The page's sessions.
    pub(crate) fn pane(&self) -> &crate::pane::Pane {
        &self.inner.pane
    }

    /// Whether `given` is the admin token.
    pub(crate) fn token_accepts(&self, given: &str) -> bool {
        self.inner.token.accepts(given)
    }

    /// Workloads' timed events.
    pub(crate) fn events(&self) -> &Events {
        &self.inner.events
    }

    /// The other replicas, when the store is shared.
    pub(crate) fn replicas(&self) -> Option<&Replicas> {
        self.inner.replicas.as_deref()
    }

    /// Spill-over decisions.
    pub(crate) fn spill(&self) -> &Arc<crate::spill::Spill> {
        &self.inner.spill
    }

    /// Progressive delivery.
    pub(crate) fn rollouts(&self) -> &Arc<crate::rollout::Rollouts> {
        &self.inner.rollouts
    }

    /// Live tap sessions.
    pub(crate) fn taps(&self) -> &Arc<crate::tap::Taps> {
        &self.inner.taps
    }

    /// Every proxy connected to this replica.
    pub(crate) fn proxies(&self) -> &Registry {
        &self.inner.proxies
    }

    /// Writes through this replica.
    pub(crate) fn writer(&self) -> &Writer {
        &self.inner.writer
    }

    /// The store.
    pub(crate) fn store(&self) -> &Store {
        self.inner.writer.store()
    }

    /// Serve until the process ends.
    pub(crate) async fn serve(self, l: TcpListener) {
        if let Err(e) = axum::serve(l, self.router()).await {
            tracing::error!(error = %e, "api server failed");
        }
    }

    /// Serve on `l` with TLS only (an address beyond loopback): the admin token must not
    /// cross a network in the clear.
    pub(crate) async fn serve_tls(self, l: TlsListener) {
        if let Err(e) = axum::serve(l, self.router()).await {
            tracing::error!(error = %e, "api server failed");
        }
    }
}

async fn auth(AxState(api): AxState<Api>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let read_only = match given {
        Some(t) if api.inner.token.accepts(t) => false,
        Some(t) => match api.inner.viewers.which(api.store(), t).await {
            Some(_) => true,
            None => return ApiError::Unauthorized.into_response(),
        },
        // The page's session cookie, to this listener by name; one opened with a
        // read-only token ends when the token is revoked.
        None => match api.inner.pane.session(req.headers()) {
            Some(None) => false,
            Some(Some(id)) if api.inner.viewers.stands(api.store(), &id).await => true,
            _ => return ApiError::Unauthorized.into_response(),
        },
    };
    if read_only && !readable(&req) {
        return ApiError::Forbidden(
            "a read-only token reads the mesh (not its tokens) and changes nothing".into(),
        )
        .into_response();
    }
    next.run(req).await
}

/// What a read-only token may do: read, but not the tokens. (The middleware runs inside
/// the `/api/v1` nest: it sees the path without that prefix.)
fn readable(req: &Request) -> bool {
    let path = req.uri().path();
    let tokens = ["/tokens", "/viewer-tokens"]
        .iter()
        .any(|p| path.starts_with(p));
    matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    ) && !tokens
}
