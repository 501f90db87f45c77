//! The proxy's compact, validated model. Everything here is already checked: the proxy never
//! has to handle a dangling reference or a zero weight.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use serde::Serialize;

use crate::{
    resource::{Environment, LbKind, Locality, MtlsMode, NamespacedName, Protocol},
    value::RegexValue,
};

/// The whole configuration of one proxy.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProxyConfig {
    /// The workload this proxy serves, if any.
    pub local: Option<LocalWorkload>,
    /// Every service, by `namespace/name`.
    pub services: BTreeMap<NamespacedName, ServiceConfig>,
    /// Clusters (a service port and its endpoints), by key `namespace/name:port`. Shared: an
    /// update of some endpoints replaces their clusters and keeps the others.
    pub clusters: BTreeMap<String, Arc<ClusterConfig>>,
    /// Explicit-mode local listeners.
    pub tcp_binds: Vec<BindConfig>,
    /// Authorization policies, for the inbound side.
    pub authz: Vec<AuthzPolicy>,
    /// The roots to trust (PEM, every TrustBundle of `trellis-system`), when the mesh
    /// publishes them; a proxy with an identity trusts these rather than those it was given
    /// with its certificate.
    #[serde(skip)]
    pub trust_bundle: Option<String>,
}

/// The workload served by this proxy.
#[derive(Clone, Debug, Serialize)]
pub struct LocalWorkload {
    /// Its id.
    pub id: NamespacedName,
    /// The first service that selects it (the "source service" of its outbound traffic).
    pub service: Option<NamespacedName>,
    /// Environment.
    pub environment: Environment,
    /// Where the inbound listener forwards, by service port.
    pub inbound_ports: Vec<InboundPort>,
    /// Where it runs: its callers prefer endpoints near it.
    pub locality: Locality,
}

/// One inbound forwarding target.
#[derive(Clone, Debug, Serialize)]
pub struct InboundPort {
    /// Service port callers used.
    pub port: u16,
    /// Local address of the application.
    pub target: SocketAddr,
    /// Protocol.
    pub protocol: Protocol,
    /// The service.
    pub service: NamespacedName,
    /// Mutual TLS mode of the service.
    pub mtls: MtlsMode,
    /// The adaptive concurrency limit the service's policy sets.
    pub adaptive: AdaptiveLimit,
    /// The rate limits that apply to the service's requests: those of the RateLimitPolicies
    /// that target a route of it (each with the route's matches), then that of the first
    /// policy that targets the service itself. A request is held to the first whose matches
    /// it meets (the most specific target wins).
    pub rate_limits: Vec<RateLimit>,
}

/// A service's rate limits, as its workloads' proxies enforce them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    /// The policy, `namespace/name`.
    pub policy: String,
    /// The route it targets (`namespace/name`), if it targets a route.
    pub route: Option<String>,
    /// The requests it holds: those meeting one of these (a route's matches), or all when
    /// empty.
    pub matches: Vec<MatchConfig>,
    /// Count what would be refused, refuse nothing.
    pub shadow: bool,
    /// On all requests together.
    pub total: Vec<Rate>,
    /// On each caller's.
    pub per_caller: Vec<Rate>,
    /// Per-caller limits of their own, by caller (`namespace/identity`).
    pub overrides: BTreeMap<String, Vec<Rate>>,
}

/// `requests` per `per`, up to `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Rate {
    /// Requests...
    pub requests: u32,
    /// ... per this long.
    pub per: Duration,
    /// At once, at most.
    pub burst: u32,
}

/// A service and its ports.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceConfig {
    /// `NAME.NAMESPACE`, as callers name it (shared: it labels every request).
    pub host: Arc<str>,
    /// Ports in declaration order.
    pub ports: Vec<PortConfig>,
    /// The virtual IP that captured traffic to this service is addressed to.
    pub virtual_ip: Option<std::net::Ipv4Addr>,
    /// The probability (0 to 1) that a trace started by a request to this service is
    /// sampled; the proxy's own when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_sampling: Option<f64>,
}

/// A service port with its routes.
#[derive(Clone, Debug, Serialize)]
pub struct PortConfig {
    /// Port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Routes in precedence order; the last one is the default route to the service itself
    /// unless an HTTPRoute took over the port.
    pub routes: Vec<RouteConfig>,
}

/// One route rule.
#[derive(Clone, Debug, Serialize)]
pub struct RouteConfig {
    /// `namespace/route[.rule]` or `default` (shared: it labels every request).
    pub name: Arc<str>,
    /// Any match selects the route; empty means all.
    pub matches: Vec<MatchConfig>,
    /// Weighted clusters (never empty; weights never all zero).
    pub backends: Vec<WeightedCluster>,
    /// Request header edits.
    pub request_headers: HeaderEdits,
    /// Response header edits.
    pub response_headers: HeaderEdits,
    /// Deadline of the whole exchange (retries and the response body included).
    pub timeout: Option<Duration>,
    /// Longest silence from the upstream (waiting for the head, or between parts of the
    /// body) when no deadline is set: [`DEFAULT_IDLE_TIMEOUT`] unless `timeouts.request` says
    /// otherwise.
    pub idle_timeout: Option<Duration>,
    /// Retry policy.
    pub retry: Option<RetryConfig>,
    /// Faults injected into each try, in order (a `trellis.dev/Fault` filter).
    pub faults: Vec<FaultConfig>,
    /// Where copies of a share of the requests go (`RequestMirror` filters).
    pub mirrors: Vec<MirrorConfig>,
}

/// A mirror of a route's requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MirrorConfig {
    /// Its cluster.
    pub cluster: String,
    /// Requests mirrored, per million.
    pub per_million: u32,
}

/// One injected fault, on `per_million` of the tries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum FaultConfig {
    /// Hold the try this long before it is sent.
    Delay {
        /// Tries, per million.
        per_million: u32,
        /// How long.
        duration: Duration,
    },
    /// Answer the try without sending it.
    Abort {
        /// Tries, per million.
        per_million: u32,
        /// An HTTP request's status.
        status: u16,
        /// A gRPC request's status.
        grpc_status: u32,
    },
}

/// The idle timeout of a route without `timeouts.request`: Envoy's default route timeout,
/// applied to silence rather than to the whole exchange, so that a long stream that keeps
/// sending lives while a dead peer is noticed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// A match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MatchConfig {
    /// Path.
    pub path: Option<PathMatchConfig>,
    /// Method (upper-case).
    pub method: Option<String>,
    /// Headers (lower-case names).
    pub headers: Vec<(String, ValueMatcher)>,
    /// Query parameters.
    pub query: Vec<(String, ValueMatcher)>,
}

/// Path matchers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PathMatchConfig {
    /// Equal.
    Exact(String),
    /// Segment prefix (stored without trailing slash, `/` matches everything).
    Prefix(String),
    /// Regex.
    Regex(RegexValue),
}

/// Value matchers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum ValueMatcher {
    /// Equal.
    Exact(String),
    /// Regex.
    Regex(RegexValue),
}

/// A cluster with a weight.
#[derive(Clone, Debug, Serialize)]
pub struct WeightedCluster {
    /// Cluster key.
    pub cluster: String,
    /// Weight.
    pub weight: u32,
    /// The backend does not resolve (no such Service or port): why. The proxy answers the
    /// requests it picks this backend for with 500, naming the reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unresolved: Option<Arc<str>>,
}

/// Header edits.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HeaderEdits {
    /// Overwrite.
    pub set: Vec<(String, String)>,
    /// Append.
    pub add: Vec<(String, String)>,
    /// Remove.
    pub remove: Vec<String>,
}

impl HeaderEdits {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// Retry policy.
#[derive(Clone, Debug, Serialize)]
pub struct RetryConfig {
    /// Retries after the first try.
    pub attempts: u32,
    /// Retried HTTP status codes.
    pub codes: Vec<u16>,
    /// Retried gRPC status codes (numeric).
    pub grpc_codes: Vec<u32>,
    /// Base back-off.
    pub backoff: Duration,
    /// Timeout of each try.
    pub per_try_timeout: Option<Duration>,
}

/// A service port and its endpoints, with the backend policy that applies.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterConfig {
    /// The service.
    pub service: NamespacedName,
    /// The service port.
    pub port: u16,
    /// Upstream protocol.
    pub protocol: Protocol,
    /// Endpoints.
    pub endpoints: Vec<EndpointConfig>,
    /// Policy.
    pub policy: BackendPolicy,
    /// Mutual TLS mode of the service.
    pub mtls: MtlsMode,
}

/// One endpoint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EndpointConfig {
    /// Address to connect to.
    pub addr: SocketAddr,
    /// Weight (>= 1).
    pub weight: u32,
    /// Workload.
    pub workload: NamespacedName,
    /// Environment.
    pub environment: Environment,
    /// Locality.
    pub locality: Locality,
    /// The workload's proxy, when it has one (an identity): callers with an identity reach
    /// it there by mutual TLS rather than `addr`.
    pub mesh: Option<MeshPeer>,
    /// How many times its health check passed again after failing (its agent counts): a
    /// rise lifts an ejection.
    pub recoveries: u64,
}

impl EndpointConfig {
    /// The same endpoint, whatever its health-check history: its connections and load
    /// estimates carry over.
    pub fn same_endpoint(&self, o: &Self) -> bool {
        self.addr == o.addr
            && self.weight == o.weight
            && self.workload == o.workload
            && self.environment == o.environment
            && self.locality == o.locality
            && self.mesh == o.mesh
    }
}

/// How callers reach a meshed endpoint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MeshPeer {
    /// Its proxy's inbound listener.
    pub inbound: SocketAddr,
    /// The identity its certificate must name (`namespace/identity`).
    pub identity: NamespacedName,
}

/// Effective backend policy with defaults filled in.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendPolicy {
    /// Algorithm.
    pub lb: LbKind,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Idle pooled connection lifetime.
    pub idle_timeout: Duration,
    /// Max connections (all endpoints).
    pub max_connections: u32,
    /// Max requests waiting for admission.
    pub max_pending: u32,
    /// Max requests in flight.
    pub max_requests: u32,
    /// Consecutive failures that eject (0 = outlier detection off).
    pub consecutive_failures: u32,
    /// First ejection time.
    pub base_ejection: Duration,
    /// Ejection cap.
    pub max_ejection: Duration,
    /// Max share of endpoints ejected.
    pub max_ejection_percent: u32,
    /// Retry budget: percent of requests.
    pub retry_budget_percent: u32,
    /// Retry budget floor per second.
    pub retry_min_per_second: u32,
    /// Locality-aware load balancing.
    pub locality: LocalityLb,
    /// The adaptive concurrency limit of the service's workloads' inbound side.
    pub adaptive: AdaptiveLimit,
    /// Spill-over by load between pools of endpoints (none by default).
    pub spillover: Option<Spillover>,
}

/// Pools a spill-over policy may name (endpoints matching none form one more).
pub const MAX_POOLS: usize = 8;

/// Spill-over by load: endpoints in ordered pools; the control plane says, from the pools'
/// load across the fleet, which share of each pool's traffic goes on to the next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Spillover {
    /// The pools, most preferred first (endpoints matching none form one more, last).
    pub pools: Vec<crate::resource::PoolSpec>,
    /// Percent of a pool's capacity in flight above which its share grows.
    pub high: u32,
    /// ... below which it shrinks.
    pub low: u32,
    /// How long the load stays past a mark before the share moves.
    pub hold: Duration,
}

impl Spillover {
    /// The pool of an endpoint in `env` at `l`: an index into `pools`, or `pools.len()`.
    pub fn pool_of(&self, env: Environment, l: &Locality) -> usize {
        self.pools
            .iter()
            .position(|p| p.matches(env, l))
            .unwrap_or(self.pools.len())
    }

    /// A pool's name, for people ("vm", "container z1", "other").
    pub fn pool_name(&self, i: usize) -> String {
        self.pools
            .get(i)
            .map_or_else(|| "other".to_string(), ToString::to_string)
    }
}

/// A workload's adaptive concurrency limit (Gradient2-style: it follows latency).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AdaptiveLimit {
    /// On (the default).
    pub enabled: bool,
    /// The lowest the limit goes.
    pub min: u32,
    /// The highest.
    pub max: u32,
}

impl Default for AdaptiveLimit {
    fn default() -> Self {
        Self {
            enabled: true,
            min: 20,
            max: 1000,
        }
    }
}

/// Locality-aware load balancing, with defaults filled in.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LocalityLb {
    /// Mode.
    pub mode: crate::resource::LocalityMode,
    /// Overprovisioning factor, percent.
    pub overprovisioning: u32,
    /// `Weighted`: shares.
    pub weights: Vec<crate::resource::LocalityWeight>,
}

impl Default for LocalityLb {
    fn default() -> Self {
        Self {
            mode: crate::resource::LocalityMode::Failover,
            overprovisioning: 140,
            weights: Vec::new(),
        }
    }
}

impl Default for BackendPolicy {
    fn default() -> Self {
        Self {
            lb: LbKind::PeakEWMA,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_pending: 1024,
            max_requests: 1024,
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
            retry_budget_percent: 20,
            retry_min_per_second: 10,
            locality: LocalityLb::default(),
            adaptive: AdaptiveLimit::default(),
            spillover: None,
        }
    }
}

/// An explicit-mode listener.
#[derive(Clone, Debug, Serialize)]
pub struct BindConfig {
    /// Where to listen.
    pub bind: SocketAddr,
    /// The service.
    pub service: NamespacedName,
    /// The service port.
    pub port: u16,
    /// Cluster key.
    pub cluster: String,
    /// Protocol of the service port.
    pub protocol: Protocol,
}

/// The cluster key of a service port.
pub fn cluster_key(service: &NamespacedName, port: u16) -> String {
    format!("{}/{}:{}", service.namespace, service.name, port)
}

/// The namespace whose namespace-wide authorization policies apply to the whole mesh.
pub const MESH_NAMESPACE: &str = "trellis-system";

/// An authorization policy, compiled.
#[derive(Clone, Debug, Serialize)]
pub struct AuthzPolicy {
    /// The policy's `namespace/name`.
    pub name: NamespacedName,
    /// Allow or deny.
    pub action: crate::resource::AuthzAction,
    /// Which services it guards.
    pub scope: AuthzScope,
    /// Any matching rule makes the policy match.
    pub rules: Vec<AuthzRuleConfig>,
}

/// Which services a policy guards.
#[derive(Clone, Debug, Serialize)]
pub enum AuthzScope {
    /// Every service.
    Mesh,
    /// Every service of a namespace.
    Namespace(String),
    /// These services.
    Services(Vec<NamespacedName>),
}

/// A compiled rule.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuthzRuleConfig {
    /// Any of these callers (none: any caller, even without an identity).
    pub from: Vec<AuthzSourceConfig>,
    /// Any of these destinations (none: anything).
    pub to: Vec<AuthzDestinationConfig>,
}

/// A compiled caller match.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuthzSourceConfig {
    /// Identities (none: any).
    pub identities: Vec<IdentityMatch>,
    /// Namespaces (none: any).
    pub namespaces: Vec<String>,
}

/// One identity pattern.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdentityMatch {
    /// Trust domain, when the pattern was a full SPIFFE ID.
    pub trust_domain: Option<String>,
    /// Namespace.
    pub namespace: String,
    /// Identity; `None` for `NAMESPACE/*`.
    pub name: Option<String>,
}

/// A compiled destination match.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuthzDestinationConfig {
    /// Ports (none: any).
    pub ports: Vec<u16>,
    /// Methods (none: any).
    pub methods: Vec<String>,
    /// Paths (none: any).
    pub paths: Vec<PathMatchConfig>,
}

/// A caller's authenticated identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Trust domain.
    pub trust_domain: String,
    /// Namespace.
    pub namespace: String,
    /// Identity.
    pub name: String,
}

/// What an authorization decision looks at.
#[derive(Clone, Copy, Debug)]
pub struct AuthzRequest<'a> {
    /// The caller, if it presented a mesh certificate.
    pub source: Option<&'a PeerIdentity>,
    /// The called service.
    pub service: &'a NamespacedName,
    /// Its port.
    pub port: u16,
    /// Method and path, for HTTP and gRPC; `None` for a TCP connection.
    pub http: Option<(&'a str, &'a str)>,
}

/// The outcome, and the policy that decided it (none: no policy applied, or no ALLOW
/// policy matched).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthzDecision {
    /// Let it through.
    pub allowed: bool,
    /// The deciding policy.
    pub policy: Option<NamespacedName>,
}

impl AuthzScope {
    fn covers(&self, s: &NamespacedName) -> bool {
        match self {
            AuthzScope::Mesh => true,
            AuthzScope::Namespace(ns) => *ns == s.namespace,
            AuthzScope::Services(v) => v.contains(s),
        }
    }
}

impl IdentityMatch {
    fn matches(&self, p: &PeerIdentity) -> bool {
        self.trust_domain
            .as_ref()
            .is_none_or(|t| *t == p.trust_domain)
            && self.namespace == p.namespace
            && self.name.as_ref().is_none_or(|n| *n == p.name)
    }
}

fn path_matches(m: &PathMatchConfig, path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    match m {
        PathMatchConfig::Exact(p) => p == path,
        PathMatchConfig::Prefix(p) if p == "/" => true,
        PathMatchConfig::Prefix(p) => path
            .strip_prefix(p.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        PathMatchConfig::Regex(r) => r.0.is_match(path),
    }
}

impl AuthzRuleConfig {
    /// Whether `req` matches. A TCP connection cannot be checked against methods or paths:
    /// such a field never lets an ALLOW rule match it and always lets a DENY rule match it,
    /// so a policy meant for HTTP fails closed on TCP.
    fn matches(&self, req: &AuthzRequest<'_>, deny: bool) -> bool {
        let from = self.from.is_empty()
            || self.from.iter().any(|f| {
                let Some(p) = req.source else {
                    return f.identities.is_empty() && f.namespaces.is_empty();
                };
                (f.identities.is_empty() || f.identities.iter().any(|i| i.matches(p)))
                    && (f.namespaces.is_empty() || f.namespaces.contains(&p.namespace))
            });
        let to = self.to.is_empty()
            || self.to.iter().any(|t| {
                let port = t.ports.is_empty() || t.ports.contains(&req.port);
                let l7 = match req.http {
                    Some((method, path)) => {
                        (t.methods.is_empty() || t.methods.iter().any(|m| m == method))
                            && (t.paths.is_empty() || t.paths.iter().any(|m| path_matches(m, path)))
                    }
                    None => (t.methods.is_empty() && t.paths.is_empty()) || deny,
                };
                port && l7
            });
        from && to
    }
}

/// Decide `req` under `policies`: a matching DENY denies; otherwise, if any ALLOW policy
/// guards the service, one of them must match; otherwise the request is allowed.
pub fn authorize(policies: &[AuthzPolicy], req: &AuthzRequest<'_>) -> AuthzDecision {
    use crate::resource::AuthzAction;
    let guarding = || policies.iter().filter(|p| p.scope.covers(req.service));
    let matched = |p: &AuthzPolicy| {
        let deny = p.action == AuthzAction::Deny;
        p.rules.iter().any(|r| r.matches(req, deny))
    };
    if let Some(p) = guarding().find(|p| p.action == AuthzAction::Deny && matched(p)) {
        return AuthzDecision {
            allowed: false,
            policy: Some(p.name.clone()),
        };
    }
    let mut allows = guarding()
        .filter(|p| p.action == AuthzAction::Allow)
        .peekable();
    if allows.peek().is_none() {
        return AuthzDecision {
            allowed: true,
            policy: None,
        };
    }
    match allows.find(|p| matched(p)) {
        Some(p) => AuthzDecision {
            allowed: true,
            policy: Some(p.name.clone()),
        },
        None => AuthzDecision {
            allowed: false,
            policy: None,
        },
    }
}
