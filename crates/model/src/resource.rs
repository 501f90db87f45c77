//! The resource kinds of design.md, as they are written in YAML.
//!
//! Every struct refuses unknown fields, so a typo is an error with a line number rather than a
//! silently ignored setting.

use std::collections::BTreeMap;

use serde::{de, Deserialize, Deserializer, Serialize};
use serde_saphyr::Spanned;

use crate::value::{DurationValue, HeaderName, RegexValue};

/// `namespace/name` of a resource.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName {
    /// Namespace (`default` when the YAML leaves it out).
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// As `namespace/name`: it is a map key in the proxy's config dump, and JSON keys are strings.
impl Serialize for NamespacedName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl NamespacedName {
    /// The name callers use for a service: `NAME.NAMESPACE`.
    pub fn host(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }
}

impl std::str::FromStr for NamespacedName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, n)) if !ns.is_empty() && !n.is_empty() && !n.contains('/') => Ok(Self {
                namespace: ns.into(),
                name: n.into(),
            }),
            _ => Err(format!("expected NAMESPACE/NAME, got {s:?}")),
        }
    }
}

/// `metadata` of every resource.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Name, a DNS label.
    pub name: String,
    /// Namespace, `default` when absent.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations (free-form).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The store's version of the resource, as the control plane returned it. A write that
    /// carries one is refused when the stored resource has changed since (optimistic
    /// concurrency); a static file ignores it.
    #[serde(
        default,
        rename = "resourceVersion",
        skip_serializing_if = "Option::is_none"
    )]
    pub resource_version: Option<String>,
}

fn default_namespace() -> String {
    "default".into()
}

/// One document: header plus a typed spec. `line` is where the document starts.
#[derive(Clone, Debug)]
pub struct Resource {
    /// `apiVersion` as written.
    pub api_version: String,
    /// Metadata.
    pub metadata: Metadata,
    /// The kind-specific part.
    pub spec: Spec,
    /// Line of the document's `kind:` key, for errors that concern the whole document.
    pub line: u64,
}

/// The kind-specific part of a resource.
#[derive(Clone, Debug)]
pub enum Spec {
    /// `kind: Service`.
    Service(ServiceSpec),
    /// `kind: Workload`.
    Workload(WorkloadSpec),
    /// `kind: HTTPRoute`.
    HttpRoute(HttpRouteSpec),
    /// `kind: GRPCRoute`.
    GrpcRoute(GrpcRouteSpec),
    /// `kind: BackendTrafficPolicy`.
    BackendPolicy(BackendPolicySpec),
    /// `AuthorizationPolicy`.
    AuthorizationPolicy(AuthorizationPolicySpec),
    /// `PeerAuthentication`.
    PeerAuthentication(PeerAuthenticationSpec),
    /// `TrustBundle`.
    TrustBundle(TrustBundleSpec),
    /// `RateLimitPolicy`.
    RateLimitPolicy(RateLimitPolicySpec),
    /// `Rollout`.
    Rollout(RolloutSpec),
}

impl Resource {
    /// The kind as written in YAML.
    pub fn kind(&self) -> &'static str {
        match self.spec {
            Spec::Service(_) => "Service",
            Spec::Workload(_) => "Workload",
            Spec::HttpRoute(_) => "HTTPRoute",
            Spec::GrpcRoute(_) => "GRPCRoute",
            Spec::BackendPolicy(_) => "BackendTrafficPolicy",
            Spec::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Spec::PeerAuthentication(_) => "PeerAuthentication",
            Spec::TrustBundle(_) => "TrustBundle",
            Spec::RateLimitPolicy(_) => "RateLimitPolicy",
            Spec::Rollout(_) => "Rollout",
        }
    }

    /// `namespace/name`.
    pub fn id(&self) -> NamespacedName {
        NamespacedName {
            namespace: self.metadata.namespace.clone(),
            name: self.metadata.name.clone(),
        }
    }
}

/// The kind `kind` names, as [`Resource::kind`] spells it, if it is one.
pub(crate) fn known_kind(kind: &str) -> Option<&'static str> {
    KINDS.iter().map(|(k, _)| *k).find(|k| *k == kind)
}

const KINDS: &[(&str, &str)] = &[
    ("Service", "trellis.dev/v1alpha1"),
    ("Workload", "trellis.dev/v1alpha1"),
    ("HTTPRoute", "gateway.networking.k8s.io/v1"),
    ("GRPCRoute", "gateway.networking.k8s.io/v1"),
    ("BackendTrafficPolicy", "trellis.dev/v1alpha1"),
    ("AuthorizationPolicy", "trellis.dev/v1alpha1"),
    ("PeerAuthentication", "trellis.dev/v1alpha1"),
    ("TrustBundle", "trellis.dev/v1alpha1"),
    ("RateLimitPolicy", "trellis.dev/v1alpha1"),
    ("Rollout", "trellis.dev/v1alpha1"),
];

impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ResourceVisitor)
    }
}

struct ResourceVisitor;

impl<'de> de::Visitor<'de> for ResourceVisitor {
    type Value = Resource;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a resource with apiVersion, kind, metadata and spec")
    }

    // `spec` is read with the type that `kind` names, so `kind` must come first. Reading it
    // in one pass keeps the source locations of every nested error.
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Resource, A::Error> {
        let (mut api_version, mut kind, mut metadata, mut spec) = (None, None, None, None);
        let mut line = 0;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                // Whichever of the two comes second is checked against the other as it is
                // read, so that the error is located at it (one raised after the mapping has
                // no location, and a file of many documents would not say which).
                "apiVersion" => {
                    let v = map.next_value_seed(Checked(|v: &str| match kind.as_deref() {
                        Some(k) => api_version_of(k, v),
                        None => Ok(()),
                    }))?;
                    api_version = Some(v);
                }
                "kind" => {
                    let k = map.next_value_seed(Checked(|k: &str| {
                        known_kind_version(k).ok_or_else(|| unknown_kind_message(k))?;
                        match &api_version {
                            Some(v) => api_version_of(k, &v.value)
                                .map_err(|e| format!("{e} (line {})", v.referenced.line())),
                            None => Ok(()),
                        }
                    }))?;
                    line = k.referenced.line();
                    kind = Some(k.value);
                }
                "metadata" => metadata = Some(map.next_value::<Metadata>()?),
                "status" => {
                    map.next_value::<de::IgnoredAny>()?;
                }
                "spec" => {
                    let Some(k) = kind.as_deref() else {
                        // Refused as the value is read: located at `spec`.
                        const NO_KIND: &str =
                            "no `kind` before `spec`: a document names its kind first";
                        return Err(match map.next_value_seed(Refuse(NO_KIND)) {
                            Err(e) => e,
                            Ok(never) => match never {},
                        });
                    };
                    spec = Some(match k {
                        "Service" => Spec::Service(map.next_value()?),
                        "Workload" => Spec::Workload(map.next_value()?),
                        "HTTPRoute" => Spec::HttpRoute(map.next_value()?),
                        "GRPCRoute" => Spec::GrpcRoute(map.next_value()?),
                        "BackendTrafficPolicy" => Spec::BackendPolicy(map.next_value()?),
                        "AuthorizationPolicy" => Spec::AuthorizationPolicy(map.next_value()?),
                        "PeerAuthentication" => Spec::PeerAuthentication(map.next_value()?),
                        "TrustBundle" => Spec::TrustBundle(map.next_value()?),
                        "RateLimitPolicy" => Spec::RateLimitPolicy(map.next_value()?),
                        "Rollout" => Spec::Rollout(map.next_value()?),
                        other => return Err(de::Error::custom(unknown_kind_message(other))),
                    });
                }
                other => {
                    return Err(de::Error::unknown_field(
                        other,
                        &["apiVersion", "kind", "metadata", "spec", "status"],
                    ))
                }
            }
        }
        // Both present were checked against each other as the second was read.
        kind.ok_or_else(|| de::Error::missing_field("kind"))?;
        let api_version = api_version
            .ok_or_else(|| de::Error::missing_field("apiVersion"))?
            .value;
        Ok(Resource {
            api_version,
            metadata: metadata.ok_or_else(|| de::Error::missing_field("metadata"))?,
            spec: spec.ok_or_else(|| de::Error::missing_field("spec"))?,
            line,
        })
    }
}

fn unknown_kind_message(kind: &str) -> String {
    let known: Vec<&str> = KINDS.iter().map(|(k, _)| *k).collect();
    format!("unknown kind {kind:?}, expected one of {known:?}")
}

/// The apiVersion resources of `kind` have, if it is a kind.
fn known_kind_version(kind: &str) -> Option<&'static str> {
    KINDS.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
}

/// Whether `version` is the apiVersion of `kind` (checked when the kind is known).
fn api_version_of(kind: &str, version: &str) -> Result<(), String> {
    match known_kind_version(kind) {
        Some(expected) if expected != version => Err(wrong_api_version(kind, expected, version)),
        _ => Ok(()),
    }
}

/// What a document whose `kind` is not of `version` is told.
fn wrong_api_version(kind: &str, expected: &str, version: &str) -> String {
    format!("{kind} resources have apiVersion {expected:?}, not {version:?}")
}

/// A string read with its location and checked by `F` where it stands: an error then
/// carries the location of the value.
struct Checked<F>(F);

impl<'de, F: FnOnce(&str) -> Result<(), String>> de::DeserializeSeed<'de> for Checked<F> {
    type Value = Spanned<String>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Spanned<String>, D::Error> {
        let v = Spanned::<String>::deserialize(d)?;
        (self.0)(&v.value).map_err(de::Error::custom)?;
        Ok(v)
    }
}

/// A value refused with a message before it is read, so that the error carries its location.
struct Refuse(&'static str);

impl<'de> de::DeserializeSeed<'de> for Refuse {
    type Value = std::convert::Infallible;

    fn deserialize<D: Deserializer<'de>>(self, _: D) -> Result<Self::Value, D::Error> {
        Err(de::Error::custom(self.0))
    }
}

// === Service ===

/// `kind: Service`: a logical service reachable as `NAME.NAMESPACE`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Picks workloads by label.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Ports the service exposes.
    pub ports: Vec<ServicePort>,
    /// The stable virtual IPv4 address that `NAME.NAMESPACE.mesh` resolves to, for
    /// applications whose traffic is captured. The control plane assigns one from its
    /// reserved range when it is absent and keeps it across updates.
    #[serde(
        default,
        rename = "virtualIP",
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::value::addr::opt_ipv4"
    )]
    pub virtual_ip: Option<std::net::Ipv4Addr>,
    /// Tracing of requests to this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSpec>,
}

/// How requests to a service are traced.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingSpec {
    /// The share of the traces that start at this service's callers' proxies (requests that
    /// came without a trace context) that are sampled, in percent (0 to 100, fractions
    /// allowed); the proxy's `--trace-sampling` when absent. A failed request's spans are
    /// exported whatever this says.
    #[serde(default, deserialize_with = "crate::value::num::opt_percent")]
    pub sampling_percent: Option<f64>,
}

/// A port of a service.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    /// Optional name.
    #[serde(default)]
    pub name: Option<String>,
    /// The port callers use.
    #[serde(deserialize_with = "crate::value::num::port")]
    pub port: u16,
    /// The port the workload listens on; `port` when absent.
    #[serde(default, deserialize_with = "crate::value::num::opt_port")]
    pub target_port: Option<u16>,
    /// Application protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// Application protocol of a service port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum Protocol {
    /// HTTP/1.1 upstream.
    #[default]
    #[serde(rename = "HTTP")]
    Http,
    /// HTTP/2 (prior knowledge) upstream.
    #[serde(rename = "HTTP2")]
    Http2,
    /// gRPC (HTTP/2) upstream.
    #[serde(rename = "GRPC")]
    Grpc,
    /// Opaque TCP.
    #[serde(rename = "TCP")]
    Tcp,
}

// === Workload ===

/// `kind: Workload`: one instance of an application.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Address at which peers reach the workload.
    #[serde(deserialize_with = "crate::value::addr::ip")]
    pub address: std::net::IpAddr,
    /// `bare-metal`, `vm`, `container` or `kubernetes`.
    #[serde(default)]
    pub environment: Environment,
    /// Region / zone / host.
    #[serde(default)]
    pub locality: Locality,
    /// Identity name (service account).
    #[serde(default)]
    pub identity: Option<String>,
    /// Per service-port-name overrides of the target port (as Istio's WorkloadEntry), for
    /// workloads that listen elsewhere than the service's `targetPort`.
    #[serde(default, deserialize_with = "crate::value::num::port_map")]
    pub ports: BTreeMap<String, u16>,
    /// Load-balancing weight of this endpoint (default 1).
    #[serde(default, deserialize_with = "crate::value::num::opt_count")]
    pub weight: Option<u32>,
    /// Explicit-mode local ports that reach a service.
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    /// Where peers reach this workload's proxy (its inbound listener), on `address`; only
    /// for a workload with an `identity`. Default 15006.
    #[serde(
        default,
        rename = "inboundPort",
        deserialize_with = "crate::value::num::opt_port"
    )]
    pub inbound_port: Option<u16>,
    /// Set by the workload's agent (`trellis join`) from its health checks and heartbeats:
    /// `false` keeps the Workload registered but out of every proxy's endpoints. Absent
    /// (static Workloads): healthy.
    #[serde(default)]
    pub healthy: Option<bool>,
    /// Set by the workload's agent: how many times its health check passed again after
    /// failing. A caller that ejected the endpoint (outlier detection) takes it back when
    /// this grows, as Envoy does when an active health check passes.
    #[serde(
        default,
        rename = "healthRecoveries",
        skip_serializing_if = "Option::is_none"
    )]
    pub health_recoveries: Option<u64>,
}

/// The inbound listener's port when a Workload names none.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;

/// Where a workload runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Environment {
    /// A process on a physical host.
    #[default]
    BareMetal,
    /// A virtual machine.
    Vm,
    /// A container.
    Container,
    /// A Kubernetes pod.
    Kubernetes,
}

impl Environment {
    /// The name used in YAML, labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BareMetal => "bare-metal",
            Self::Vm => "vm",
            Self::Container => "container",
            Self::Kubernetes => "kubernetes",
        }
    }
}

/// Locality of a workload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Locality {
    /// Region.
    #[serde(default)]
    pub region: Option<String>,
    /// Zone.
    #[serde(default)]
    pub zone: Option<String>,
    /// Host.
    #[serde(default)]
    pub host: Option<String>,
}

/// A local bind address that reaches a service port (opaque TCP or HTTP).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `NAME.NAMESPACE` of the service.
    pub service: Spanned<String>,
    /// Service port.
    #[serde(deserialize_with = "crate::value::num::port")]
    pub port: u16,
    /// Local address to listen on.
    #[serde(deserialize_with = "crate::value::addr::socket")]
    pub bind: std::net::SocketAddr,
}

// === HTTPRoute ===

/// A route's spec (Gateway API, GAMMA style): HTTPRoute and GRPCRoute differ only in what a
/// rule matches on (`M`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteSpec<M = RouteMatch> {
    /// The services this route attaches to.
    pub parent_refs: Vec<ParentRef>,
    /// Rules, matched in order of Gateway API precedence.
    #[serde(default)]
    pub rules: Vec<RouteRule<M>>,
    /// Hostnames (accepted for compatibility; GAMMA routes match by parent).
    #[serde(default)]
    pub hostnames: Vec<String>,
}

/// A reference to a parent Service.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ParentRef {
    /// Must be `Service`.
    #[serde(default = "service_kind")]
    pub kind: String,
    /// Service name.
    pub name: Spanned<String>,
    /// Service namespace; the route's when absent.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Service port; every port when absent.
    #[serde(default, deserialize_with = "crate::value::num::opt_port")]
    pub port: Option<u16>,
}

fn service_kind() -> String {
    "Service".into()
}

/// `kind: HTTPRoute`.
pub type HttpRouteSpec = RouteSpec<RouteMatch>;

/// One rule of a route.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRule<M = RouteMatch> {
    /// Optional rule name.
    #[serde(default)]
    pub name: Option<String>,
    /// Any of these matches selects the rule; none means "everything".
    #[serde(default)]
    pub matches: Vec<M>,
    /// Filters: header modifiers.
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Option<RouteTimeouts>,
    /// Retry policy.
    #[serde(default)]
    pub retry: Option<RouteRetry>,
}

/// A match: all given conditions must hold.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMatch {
    /// Path match.
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// Method.
    #[serde(default)]
    pub method: Option<String>,
    /// Header matches.
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    /// Query parameter matches.
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
}

/// Path match.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, tag = "type", content = "value")]
pub enum PathMatch {
    /// Whole path equals.
    Exact(String),
    /// Path starts with, on segment boundaries.
    PathPrefix(String),
    /// Whole path matches the expression.
    RegularExpression(RegexValue),
}

/// Header or query parameter match.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: ValueMatchKind,
    /// Header or parameter name.
    pub name: String,
    /// Value or pattern.
    pub value: String,
}

/// Kinds of value match.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum ValueMatchKind {
    /// Equal.
    #[default]
    Exact,
    /// Whole value matches the expression.
    RegularExpression,
}

/// Filters (Gateway API names).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all_fields = "camelCase")]
pub enum RouteFilter {
    /// Modify request headers.
    RequestHeaderModifier {
        /// The modification.
        #[serde(rename = "requestHeaderModifier")]
        modifier: HeaderModifier,
    },
    /// Modify response headers.
    ResponseHeaderModifier {
        /// The modification.
        #[serde(rename = "responseHeaderModifier")]
        modifier: HeaderModifier,
    },
    /// Send a copy of a share of the requests to another backend; its answers are
    /// discarded (and compared with the primary's).
    RequestMirror {
        /// The mirror.
        #[serde(rename = "requestMirror")]
        mirror: RequestMirrorSpec,
    },
    /// Fault injection, a Trellis extension (Gateway API has none): delays and aborts,
    /// applied in order to each try of a request, inside its retries and timeouts.
    #[serde(rename = "trellis.dev/Fault")]
    Fault {
        /// The faults, in order (as Kuma's MeshFaultInjection lists them).
        fault: Vec<FaultSpec>,
    },
}

/// Gateway API's `requestMirror`: a backend and the share mirrored (`percent` or
/// `fraction`, only one of the two, GEP-3171; all requests without either).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestMirrorSpec {
    /// The Service copies go to.
    pub backend_ref: MirrorBackendRef,
    /// Percent of the requests, 0 to 100.
    #[serde(default)]
    pub percent: Option<u32>,
    /// Or numerator over denominator of them.
    #[serde(default)]
    pub fraction: Option<Fraction>,
}

/// The Service a mirror sends to.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorBackendRef {
    /// Must be `Service`.
    #[serde(default = "service_kind")]
    pub kind: String,
    /// Service name.
    pub name: Spanned<String>,
    /// Service namespace; the route's when absent.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Service port.
    #[serde(deserialize_with = "crate::value::num::port")]
    pub port: u16,
}

/// `numerator` / `denominator` (default 100).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fraction {
    /// Of ...
    pub numerator: u32,
    /// ... this many.
    #[serde(default = "hundred")]
    pub denominator: u32,
}

fn hundred() -> u32 {
    100
}

/// One fault of a `trellis.dev/Fault` filter: a delay or an abort.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultSpec {
    /// Hold the try before it is sent.
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    /// Answer the try without sending it.
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

/// A delay, on `percent` of the tries.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    /// Of the tries, 0 to 100 (fractions allowed).
    pub percent: f64,
    /// How long.
    pub duration: DurationValue,
}

/// An abort, on `percent` of the tries.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    /// Of the tries, 0 to 100 (fractions allowed).
    pub percent: f64,
    /// The status an HTTP request gets (default 503).
    #[serde(default)]
    pub http_status: Option<u16>,
    /// The status a gRPC request gets (default 14, UNAVAILABLE).
    #[serde(default)]
    pub grpc_status: Option<u32>,
}

/// Header modifier.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifier {
    /// Overwrite.
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    /// Append.
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    /// Remove.
    #[serde(default)]
    pub remove: Vec<HeaderName>,
}

/// Header name and value.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    /// Name.
    pub name: HeaderName,
    /// Value.
    pub value: String,
}

/// A weighted backend.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRef {
    /// Must be `Service`.
    #[serde(default = "service_kind")]
    pub kind: String,
    /// Service name.
    pub name: Spanned<String>,
    /// Service namespace; the route's when absent.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Service port.
    #[serde(deserialize_with = "crate::value::num::port")]
    pub port: u16,
    /// Weight (default 1).
    #[serde(default = "one", deserialize_with = "crate::value::num::count")]
    pub weight: u32,
    /// Written by the control plane, never by a user (its API refuses it): why this
    /// reference does not resolve. The route is served, and the requests its weight would
    /// send here are answered 500 by the proxy (the Gateway API's rule for an invalid
    /// backend), instead of the whole route being withdrawn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unresolved: Option<String>,
}

fn one() -> u32 {
    1
}

/// Timeouts.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteTimeouts {
    /// The whole exchange, retries and the response body included; `0s` for none.
    #[serde(default)]
    pub request: Option<DurationValue>,
    /// One try.
    #[serde(default)]
    pub backend_request: Option<DurationValue>,
}

/// Retry policy (Gateway API GEP-1731 plus Trellis extensions).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRetry {
    /// Retries after the first try.
    #[serde(default, deserialize_with = "crate::value::num::opt_count")]
    pub attempts: Option<u32>,
    /// HTTP status codes that are retried.
    #[serde(default, deserialize_with = "crate::value::num::statuses")]
    pub codes: Vec<u16>,
    /// gRPC status names (e.g. UNAVAILABLE) that are retried.
    #[serde(default)]
    pub grpc_codes: Vec<String>,
    /// Base back-off; grows exponentially with full jitter.
    #[serde(default)]
    pub backoff: Option<DurationValue>,
    /// Timeout of each try.
    #[serde(default)]
    pub per_try_timeout: Option<DurationValue>,
}

// === GRPCRoute ===

/// `kind: GRPCRoute`: gRPC calls routed by service and method. A gRPC call is a POST to
/// `/SERVICE/METHOD`, so the route is carried out as the equivalent HTTPRoute
/// ([`GrpcRouteSpec::to_http`]): one routing engine, one precedence order. `timeouts` and
/// `retry` are Trellis extensions, as on HTTPRoute.
pub type GrpcRouteSpec = RouteSpec<GrpcRouteMatch>;

/// A gRPC match: all given conditions must hold.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcRouteMatch {
    /// Service and method.
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    /// Header (metadata) matches.
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

/// Service and method match; at least one of the two.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcMethodMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: ValueMatchKind,
    /// Fully qualified service, e.g. `shop.Catalog`.
    #[serde(default)]
    pub service: Option<String>,
    /// Method, e.g. `GetItem`.
    #[serde(default)]
    pub method: Option<String>,
}

fn is_grpc_name(s: &str, dots: bool) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (dots && c == '.'))
}

impl GrpcRouteSpec {
    /// The equivalent HTTPRoute. Errors name the field (relative to the resource) and say
    /// what is wrong.
    pub fn to_http(&self) -> Result<HttpRouteSpec, (String, String)> {
        let mut rules = Vec::with_capacity(self.rules.len());
        for (ri, r) in self.rules.iter().enumerate() {
            let mut matches = Vec::with_capacity(r.matches.len());
            for (mi, m) in r.matches.iter().enumerate() {
                let field = |f: &str| format!("spec.rules[{ri}].matches[{mi}].method.{f}");
                let path = match &m.method {
                    None => None,
                    Some(mm) => Some(grpc_path(mm).map_err(|(f, msg)| (field(f), msg))?),
                };
                matches.push(RouteMatch {
                    path,
                    method: None,
                    headers: m.headers.clone(),
                    query_params: Vec::new(),
                });
            }
            rules.push(RouteRule {
                name: r.name.clone(),
                matches,
                filters: r.filters.clone(),
                backend_refs: r.backend_refs.clone(),
                timeouts: r.timeouts.clone(),
                retry: r.retry.clone(),
            });
        }
        Ok(HttpRouteSpec {
            parent_refs: self.parent_refs.clone(),
            rules,
            hostnames: self.hostnames.clone(),
        })
    }
}

/// The path match for a service/method match: `/SERVICE/METHOD`.
fn grpc_path(m: &GrpcMethodMatch) -> Result<PathMatch, (&'static str, String)> {
    let (service, method) = (m.service.as_deref(), m.method.as_deref());
    if service.is_none() && method.is_none() {
        return Err((
            "service",
            "a method match needs a service, a method or both".into(),
        ));
    }
    match m.kind {
        ValueMatchKind::Exact => {
            if let Some(s) = service.filter(|s| !is_grpc_name(s, true)) {
                return Err(("service", format!("{s:?} is not a gRPC service name")));
            }
            if let Some(x) = method.filter(|x| !is_grpc_name(x, false)) {
                return Err(("method", format!("{x:?} is not a gRPC method name")));
            }
            Ok(match (service, method) {
                (Some(s), Some(x)) => PathMatch::Exact(format!("/{s}/{x}")),
                (Some(s), None) => PathMatch::PathPrefix(format!("/{s}")),
                // Names are checked above, so they are literal in the pattern.
                (None, Some(x)) => PathMatch::RegularExpression(
                    anchored(&format!("/[^/]+/{}", regex::escape(x))).map_err(|e| ("method", e))?,
                ),
                (None, None) => unreachable!("checked above"),
            })
        }
        ValueMatchKind::RegularExpression => {
            for (f, p) in [("service", service), ("method", method)] {
                if let Some(p) = p {
                    regex::Regex::new(p)
                        .map_err(|e| (f, format!("invalid regular expression {p:?}: {e}")))?;
                }
            }
            let pattern = format!(
                "/(?:{})/(?:{})",
                service.unwrap_or("[^/]+"),
                method.unwrap_or("[^/]+")
            );
            Ok(PathMatch::RegularExpression(
                anchored(&pattern).map_err(|e| ("service", e))?,
            ))
        }
    }
}

fn anchored(pattern: &str) -> Result<RegexValue, String> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
        .map(RegexValue)
        .map_err(|e| format!("invalid regular expression {pattern:?}: {e}"))
}

// === BackendTrafficPolicy ===

/// `kind: BackendTrafficPolicy`: how callers treat a service's endpoints.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendPolicySpec {
    /// Services this policy applies to.
    pub target_refs: Vec<PolicyTargetRef>,
    /// Load balancing.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    /// Connection pool and circuit breaking.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    /// Passive outlier detection.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Retry budget.
    #[serde(default)]
    pub retry_budget: Option<RetryBudget>,
    /// Locality-aware load balancing.
    #[serde(default)]
    pub locality: Option<LocalityLbSpec>,
    /// The adaptive concurrency limit on the service's workloads' inbound side (on by
    /// default).
    #[serde(default)]
    pub adaptive_concurrency: Option<AdaptiveConcurrencySpec>,
    /// Spill-over by load: an ordered preference of endpoint pools, and the load band that
    /// moves traffic from one to the next.
    #[serde(default)]
    pub spillover: Option<SpilloverSpec>,
}

/// `spec.spillover` of a BackendTrafficPolicy.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SpilloverSpec {
    /// The pools, most preferred first; an endpoint belongs to the first that matches it,
    /// and endpoints matching none form a last pool.
    pub pools: Vec<PoolSpec>,
    /// Percent of a pool's capacity (its workloads' adaptive concurrency limits) in flight
    /// above which a growing share of its traffic goes to the next pool (default 80).
    #[serde(default, deserialize_with = "crate::value::num::opt_count")]
    pub high_load: Option<u32>,
    /// ... and below which the share comes back (default 50).
    #[serde(default, deserialize_with = "crate::value::num::opt_count")]
    pub low_load: Option<u32>,
    /// How long the load stays past a mark before the share moves (default 3s).
    #[serde(default)]
    pub hold: Option<crate::value::DurationValue>,
}

/// One pool of `spec.spillover.pools`: endpoints by environment and locality.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// Environment.
    #[serde(default)]
    pub environment: Option<Environment>,
    /// Region.
    #[serde(default)]
    pub region: Option<String>,
    /// Zone.
    #[serde(default)]
    pub zone: Option<String>,
}

impl PoolSpec {
    /// Whether an endpoint in `env` at `l` belongs to this pool.
    pub fn matches(&self, env: Environment, l: &Locality) -> bool {
        self.environment.is_none_or(|e| e == env)
            && self
                .region
                .as_ref()
                .is_none_or(|r| l.region.as_ref() == Some(r))
            && self
                .zone
                .as_ref()
                .is_none_or(|z| l.zone.as_ref() == Some(z))
    }
}

impl std::fmt::Display for PoolSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<&str> = [
            self.environment.map(Environment::as_str),
            self.region.as_deref(),
            self.zone.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect();
        if parts.is_empty() {
            return f.write_str("any");
        }
        f.write_str(&parts.join(" "))
    }
}

/// `spec.adaptiveConcurrency` of a BackendTrafficPolicy.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdaptiveConcurrencySpec {
    /// `false` turns it off.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// The limit never falls below this.
    #[serde(default, deserialize_with = "crate::value::num::opt_count")]
    pub min_limit: Option<u32>,
    /// ... nor rises above this.
    #[serde(default, deserialize_with = "crate::value::num::opt_count")]
    pub max_limit: Option<u32>,
}

/// `spec.locality` of a BackendTrafficPolicy.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalityLbSpec {
    /// `Failover` (the default: the caller's zone, then its region, then anywhere),
    /// `Weighted` (by `weights`), or `Disabled`.
    #[serde(default)]
    pub mode: Option<LocalityMode>,
    /// Percent (Envoy's overprovisioning factor, default 140): a nearer set keeps all
    /// traffic while its healthy share × this factor is at least 100 %, and spills the rest
    /// to the next set below that.
    #[serde(default, deserialize_with = "crate::value::num::opt_count")]
    pub overprovisioning_factor: Option<u32>,
    /// `Weighted`: the share of each locality (the first entry that matches an endpoint's
    /// zone or region counts; an endpoint matching none gets no traffic).
    #[serde(default)]
    pub weights: Vec<LocalityWeight>,
}

/// How endpoints' localities shape load balancing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum LocalityMode {
    /// Nearest healthy set first.
    #[default]
    Failover,
    /// Fixed shares per locality.
    Weighted,
    /// Ignore localities.
    Disabled,
}

/// One locality's weight.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalityWeight {
    /// Region.
    #[serde(default)]
    pub region: Option<String>,
    /// Zone (within `region`, if given).
    #[serde(default)]
    pub zone: Option<String>,
    /// Weight (>= 1).
    #[serde(deserialize_with = "crate::value::num::count")]
    pub weight: u32,
}

/// Reference to a target service.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTargetRef {
    /// Must be `Service`.
    #[serde(default = "service_kind")]
    pub kind: String,
    /// Service name (same namespace as the policy).
    pub name: Spanned<String>,
}

/// Load balancer.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancer {
    /// Algorithm.
    #[serde(rename = "type")]
    pub kind: LbKind,
}

/// Load-balancing algorithms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum LbKind {
    /// Power of two choices over peak-EWMA latency times outstanding requests.
    #[default]
    PeakEWMA,
    /// Weighted round robin.
    RoundRobin,
    /// Power of two choices over outstanding requests.
    LeastRequest,
}

/// Connection pool and circuit-breaker limits.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPool {
    /// Connections to all endpoints together.
    #[serde(default, deserialize_with = "crate::value::num::opt_count")]
    pub max_connections: Option<u32>,
    /// Requests waiting for an in-flight slot.
    #[serde(default, deserialize_with = "crate::value::num::opt_count")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight.
    #[serde(default, deserialize_with = "crate::value::num::opt_count")]
    pub max_requests: Option<u32>,
    /// TCP connect timeout.
    #[serde(default)]
    pub connect_timeout: Option<DurationValue>,
    /// How long an idle pooled connection is kept.
    #[serde(default)]
    pub idle_timeout: Option<DurationValue>,
}

/// Passive outlier detection.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive failures that eject an endpoint.
    #[serde(default, deserialize_with = "crate::value::num::opt_count")]
    pub consecutive_failures: Option<u32>,
    /// First ejection time; doubles with each ejection of the same endpoint.
    #[serde(default)]
    pub base_ejection_time: Option<DurationValue>,
    /// Ejection time cap.
    #[serde(default)]
    pub max_ejection_time: Option<DurationValue>,
    /// Largest share of endpoints ejected at once (at least one may always be ejected).
    #[serde(default, deserialize_with = "crate::value::num::opt_count")]
    pub max_ejection_percent: Option<u32>,
}

/// Retry budget: retries allowed as a share of requests, plus a floor.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries as a percentage of requests over the last 10 s.
    #[serde(default, deserialize_with = "crate::value::num::opt_count")]
    pub percent: Option<u32>,
    /// Retries per second always allowed.
    #[serde(default, deserialize_with = "crate::value::num::opt_count")]
    pub min_retries_per_second: Option<u32>,
}

/// `AuthorizationPolicy`: who may call what, enforced by the callee's proxy.
///
/// DENY wins over ALLOW. Once any ALLOW policy applies to a Service, a request must match one
/// of them. A policy without `targetRefs` applies to every Service of its namespace, and one
/// in the `trellis-system` namespace to every Service of the mesh; an ALLOW policy without
/// rules allows nothing, which makes such a scope default to deny.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Services (of the policy's namespace); none: the whole namespace.
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetRef>,
    /// `ALLOW` or `DENY`.
    pub action: AuthzAction,
    /// A request matches the policy if it matches any rule.
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
}

/// What a matching policy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum AuthzAction {
    /// Allow.
    #[serde(rename = "ALLOW")]
    Allow,
    /// Deny.
    #[serde(rename = "DENY")]
    Deny,
}

/// A rule: some source (any of `from`) and some destination (any of `to`); an empty list
/// matches everything.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzRule {
    /// Callers.
    #[serde(default)]
    pub from: Vec<AuthzSource>,
    /// What they call.
    #[serde(default)]
    pub to: Vec<AuthzDestination>,
}

/// Callers: every given field must match.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzSource {
    /// `NAMESPACE/IDENTITY`, `NAMESPACE/*`, or a full SPIFFE ID.
    #[serde(default)]
    pub identities: Vec<Spanned<String>>,
    /// Namespaces of the callers' identities.
    #[serde(default)]
    pub namespaces: Vec<String>,
}

/// Destinations: every given field must match.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzDestination {
    /// Service ports.
    #[serde(default, deserialize_with = "crate::value::num::ports")]
    pub ports: Vec<u16>,
    /// HTTP methods (HTTP and gRPC only).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Paths (HTTP and gRPC only).
    #[serde(default)]
    pub paths: Vec<AuthzPath>,
}

/// A path: exactly one of `exact` and `prefix`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzPath {
    /// Equal.
    #[serde(default)]
    pub exact: Option<String>,
    /// Starts with (whole segments: `/api` matches `/api` and `/api/x`, not `/apix`).
    #[serde(default)]
    pub prefix: Option<String>,
}

// === RateLimitPolicy ===

/// `kind: RateLimitPolicy` (shaped after Gateway API's GEP-5160 and Envoy's local rate
/// limit): requests to a Service, limited by each of its workloads' proxies, in total and
/// per caller (by SPIFFE identity; unmeshed callers by source address). A caller's own
/// share is checked before the total, and a request takes from either only if both allow,
/// so a caller over its share drains no one else's.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicySpec {
    /// Services, HTTPRoutes or GRPCRoutes (of the policy's namespace): a route's policy holds
    /// the requests that meet the route's matches, on the workloads of its parent and
    /// backend Services, instead of a policy on the Service.
    pub target_refs: Vec<PolicyTargetRef>,
    /// `Enforce` (the default) or `Shadow` (counts what it would refuse, refuses nothing).
    #[serde(default)]
    pub mode: RateLimitMode,
    /// Limits on all requests together, per workload.
    #[serde(default)]
    pub total: Vec<RateSpec>,
    /// Limits on each caller's requests, per workload.
    #[serde(default)]
    pub per_caller: Vec<RateSpec>,
    /// Other per-caller limits for some identities.
    #[serde(default)]
    pub overrides: Vec<RateOverride>,
}

/// Enforce or only count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum RateLimitMode {
    /// Refuse over the limit (429).
    #[default]
    Enforce,
    /// Count what would be refused.
    Shadow,
}

/// `requests` per `per`, with up to `burst` at once.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateSpec {
    /// Requests...
    #[serde(deserialize_with = "crate::value::num::count")]
    pub requests: u32,
    /// ... per this long (`1s`, `1m`, up to `1h`).
    pub per: DurationValue,
    /// At once, at most (default: `requests`).
    #[serde(default, deserialize_with = "crate::value::num::opt_count")]
    pub burst: Option<u32>,
}

/// Per-caller limits of their own for one identity.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateOverride {
    /// `namespace/identity`, as AuthorizationPolicy names callers.
    pub identity: String,
    /// Its limits (instead of `perCaller`).
    pub per_caller: Vec<RateSpec>,
}

// === Rollout ===

/// `kind: Rollout`: progressive delivery of a Service's traffic from a stable backend to a
/// canary, step by step, each step held while the control plane compares the canary with the
/// stable version over the same window, rolled back at once on a clear regression. The
/// control plane keeps it (its progress survives the CLI and restarts) and writes the
/// weights of the routes that send the Service's traffic to the stable backend.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    /// The Service whose traffic shifts (of the rollout's namespace).
    pub service: String,
    /// The backend Service now serving it.
    pub stable: String,
    /// The backend Service taking its place.
    pub canary: String,
    /// The routes to shift (HTTPRoute or GRPCRoute names); default: every route with the
    /// Service as a parent and the stable backend among its backends.
    #[serde(default)]
    pub routes: Vec<String>,
    /// The canary's percent of the stable backend's traffic at each step, rising (in a rule
    /// with other backends too, they keep their share); the last step passed, the canary
    /// takes all of the stable's.
    #[serde(default = "default_steps")]
    pub steps: Vec<u32>,
    /// How long each step holds at least.
    #[serde(default = "default_interval")]
    pub interval: DurationValue,
    /// A dark stage before the first step: a share of the requests copied to the canary
    /// (its answers discarded), judged as a step is, so that the canary answers no user
    /// until it has passed.
    #[serde(default)]
    pub mirror: Option<RolloutMirror>,
    /// How the canary is judged.
    #[serde(default)]
    pub analysis: RolloutAnalysis,
    /// `Rollback` (the default) or `Pause` on a failed analysis.
    #[serde(default)]
    pub on_failure: OnFailure,
}

fn default_steps() -> Vec<u32> {
    vec![5, 25, 50, 100]
}

fn default_interval() -> DurationValue {
    DurationValue(std::time::Duration::from_secs(30))
}

/// A rollout's dark stage.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutMirror {
    /// Percent of the requests through the rollout's rules copied to the canary, 1 to 100.
    pub percent: u32,
}

/// The analysis of a step: the canary against the stable version over the step's window.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutAnalysis {
    /// Requests the canary must have answered in a step before it can pass (fewer: the step
    /// holds, "not enough traffic").
    #[serde(
        default = "default_min_requests",
        deserialize_with = "crate::value::num::count"
    )]
    pub min_requests: u32,
    /// How far the canary's rate of application failures may be above the stable
    /// version's, in percentage points.
    #[serde(default = "default_error_margin")]
    pub max_error_rate_increase: f64,
    /// Which latency percentile is compared (50 to 99.9).
    #[serde(default = "default_percentile")]
    pub latency_percentile: f64,
    /// How many times the stable version's latency (at that percentile) the canary's may
    /// be, plus 5 ms.
    #[serde(default = "default_latency_ratio")]
    pub max_latency_ratio: f64,
}

impl Default for RolloutAnalysis {
    fn default() -> Self {
        Self {
            min_requests: default_min_requests(),
            max_error_rate_increase: default_error_margin(),
            latency_percentile: default_percentile(),
            max_latency_ratio: default_latency_ratio(),
        }
    }
}

fn default_min_requests() -> u32 {
    100
}

fn default_error_margin() -> f64 {
    1.0
}

fn default_percentile() -> f64 {
    99.0
}

fn default_latency_ratio() -> f64 {
    1.5
}

/// What a failed analysis does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum OnFailure {
    /// Every route back to the stable backend, at once.
    #[default]
    Rollback,
    /// Hold the weights where they are, for an operator to decide.
    Pause,
}

// === PeerAuthentication ===

/// `kind: PeerAuthentication`: whether the proxies of a scope accept plaintext.
///
/// The most specific policy wins: one with `targetRefs` for its Services, else one without
/// for its namespace, else one in `trellis-system` for the mesh; at one level STRICT wins.
/// With none, the mesh is STRICT.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Services (of the policy's namespace); none: the whole namespace.
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetRef>,
    /// Mutual TLS.
    pub mtls: MtlsSpec,
}

/// `spec.mtls` of a PeerAuthentication.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsSpec {
    /// `STRICT` or `PERMISSIVE`.
    pub mode: MtlsMode,
}

/// What a proxy with an identity accepts on its inbound listener, and what a caller may send.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize,
)]
pub enum MtlsMode {
    /// Mutual TLS only: plaintext is refused, and a caller without an identity cannot call.
    #[default]
    #[serde(rename = "STRICT")]
    Strict,
    /// Both, for migration.
    #[serde(rename = "PERMISSIVE")]
    Permissive,
}

impl MtlsMode {
    /// The name used in YAML and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "STRICT",
            Self::Permissive => "PERMISSIVE",
        }
    }
}

// === TrustBundle ===

/// `kind: TrustBundle` (namespace `trellis-system`): the root certificates every proxy
/// trusts. The control plane keeps `trellis-system/mesh` equal to its CA's roots (both roots
/// during a rotation); an operator may add others (say, a federated mesh's).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrustBundleSpec {
    /// PEM certificates.
    pub roots: Vec<String>,
}
