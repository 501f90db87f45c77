//! Spans over OTLP/gRPC (`--otlp-endpoint`), in plaintext to a collector on the host
//! (`http://`) or over TLS (`https://`, the collector verified against `--otlp-ca` or the
//! system's roots; a client certificate, `--otlp-client-cert` and `--otlp-client-key`, for a
//! collector that asks for one).
//!
//! A request's record hands its finished line to [`Spans::offer`] when the trace is sampled
//! or the request failed (a failed request's spans are exported whatever the sampling said).
//! `offer` only queues: the queue is bounded, and when the exporter falls behind (a slow or
//! unreachable collector) spans are dropped and counted, never waited for. One task turns
//! the queued records into OTLP spans, off the request path, and sends them in batches.
//!
//! Each request gives one span for this proxy (kind SERVER: it received the request; its
//! parent is the caller's span) and one child span per try (kind CLIENT: it called an
//! endpoint), whose id is the parent the next hop sees. What no other mesh puts on a span is
//! on these: the failure class and the side that failed, both SPIFFE identities, the
//! endpoint, and both ends' environment and locality.
//!
//! An opaque TCP connection gives one span per proxy (kind CLIENT outbound, SERVER inbound)
//! from accept to close, with the bytes each way, how it ended and the same names. Its bytes
//! carry no trace context, so the caller's proxy starts a trace, sampled at its rate, and
//! tells the callee's proxy in the stream's hello: the callee's span is the caller's
//! span's child, with the caller's decision. A failed connection is exported whatever the
//! decision, as a failed request is.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{trace_service_client::TraceServiceClient, ExportTraceServiceRequest},
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    resource::v1::Resource,
    trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::mpsc;

use crate::{
    access_log::{workload_id, HttpLine, TcpLine},
    error::{BoxError, FailureClass},
    labels::{Direction, Label},
    trace::ConnTrace,
};

/// Spans queued at most; beyond, they are dropped and counted.
const QUEUE_CAP: usize = 4096;
/// Requests sent in one export at most.
const BATCH: usize = 512;
/// How long a span may wait for its batch to fill.
const LINGER: Duration = Duration::from_millis(200);
/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// A try that was retried: its own span, under the request's.
#[derive(Clone, Debug)]
pub(crate) struct TrySpan {
    /// Its span id (the parent its endpoint's proxy saw).
    pub(crate) span: u64,
    /// When it began, from the request's start.
    pub(crate) start: Duration,
    /// How long it took.
    pub(crate) took: Duration,
    /// The address it went to.
    pub(crate) endpoint: Option<SocketAddr>,
    /// The endpoint's workload.
    pub(crate) workload: Label,
    /// The identity the endpoint's proxy proved.
    pub(crate) identity: Label,
    /// How it ended.
    pub(crate) class: FailureClass,
    /// The status it got, 0 for none.
    pub(crate) status: u16,
}

/// A finished request, as its spans need it.
pub(crate) struct Finished {
    /// Its line.
    pub(crate) line: HttpLine,
    /// When it began (wall clock).
    pub(crate) at: SystemTime,
    /// How long it took.
    pub(crate) total: Duration,
    /// Tries before the last one.
    pub(crate) earlier: Vec<TrySpan>,
}

/// A finished opaque TCP connection, as its span needs it: its access log line, and what
/// the line does not say.
#[derive(Debug)]
pub(crate) struct ConnFinished {
    pub(crate) line: TcpLine,
    /// The identity the endpoint's proxy proved, `namespace/identity` (outbound).
    pub(crate) dst_identity: Label,
    /// Its span, and whether its trace was sampled (a failure is exported either way).
    pub(crate) trace: ConnTrace,
}

/// What the exporter is handed. A request is queued by value as before (boxing it would
/// cost each exported request an allocation to spare the rarer connections some bytes).
#[allow(clippy::large_enum_variant)]
pub(crate) enum Queued {
    Request(Finished),
    Connection(ConnFinished),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Counts of spans by what became of them.
#[derive(Clone, Default)]
pub(crate) struct SpanMetrics {
    spans: Family<OutcomeLabels, Counter>,
}

impl SpanMetrics {
    /// Registered as `trellis_trace_spans_total{outcome}`.
    pub(crate) fn register(reg: &mut Registry) -> Self {
        let m = Self::default();
        reg.register(
            "trace_spans",
            "Spans by outcome: exported, dropped (queue full), failed (the collector refused or was unreachable) (unstable)",
            m.spans.clone(),
        );
        m
    }

    fn count(&self, outcome: &'static str, n: usize) {
        self.spans
            .get_or_create(&OutcomeLabels { outcome })
            .inc_by(n as u64);
    }
}

/// The queue into the exporter.
pub(crate) struct Spans {
    tx: mpsc::Sender<Queued>,
    metrics: SpanMetrics,
    origin: Arc<ArcSwap<Origin>>,
}

impl Spans {
    /// Who is exporting, once a config says it (the environment and locality come with the
    /// local workload's config).
    pub(crate) fn set_origin(&self, o: Origin) {
        self.origin.store(Arc::new(o));
    }

    /// Queue a request's spans; drop and count them when the queue is full.
    pub(crate) fn offer(&self, f: Finished) {
        self.queue(Queued::Request(f));
    }

    /// Queue a TCP connection's span, as [`Spans::offer`] does a request's.
    pub(crate) fn offer_conn(&self, c: ConnFinished) {
        self.queue(Queued::Connection(c));
    }

    fn queue(&self, q: Queued) {
        if self.tx.try_send(q).is_err() {
            self.metrics.count("dropped", 1);
        }
    }
}

#[cfg(test)]
impl Spans {
    /// A queue of `cap` whose other end the test reads.
    pub(crate) fn for_test(cap: usize) -> (Self, mpsc::Receiver<Queued>, SpanMetrics) {
        let (tx, rx) = mpsc::channel(cap);
        let metrics = SpanMetrics::default();
        let s = Self {
            tx,
            metrics: metrics.clone(),
            origin: Default::default(),
        };
        (s, rx, metrics)
    }
}

#[cfg(test)]
impl Queued {
    /// The request it is (a test's expectation).
    pub(crate) fn request(self) -> Finished {
        match self {
            Self::Request(f) => f,
            Self::Connection(c) => panic!("a connection's span, not a request's: {c:?}"),
        }
    }
}

/// Who is exporting: the resource of every span.
#[derive(Clone, Debug, Default)]
pub(crate) struct Origin {
    /// The local workload, `namespace/name`.
    pub(crate) workload: String,
    /// This proxy's SPIFFE ID, if it has an identity.
    pub(crate) identity: Option<String>,
    /// The local workload's environment.
    pub(crate) environment: String,
    /// The local workload's locality.
    pub(crate) locality: String,
}

impl Origin {
    /// Who called whom, as SPIFFE IDs: the caller proved its own on the inbound side
    /// (`source`); the outbound side knows the identity its endpoint's proxy had to prove
    /// (`dst`, `namespace/identity`).
    fn ends(
        &self,
        direction: Direction,
        source: &Label,
        dst: &Label,
    ) -> (Option<String>, Option<String>) {
        match direction {
            Direction::inbound => (source.get().map(str::to_string), self.identity.clone()),
            Direction::outbound => (
                self.identity.clone(),
                dst.get().and_then(|i| self.spiffe(i)),
            ),
        }
    }

    /// A peer's identity (`namespace/identity`) as a SPIFFE ID in this proxy's trust domain.
    fn spiffe(&self, ns_id: &str) -> Option<String> {
        let td = self
            .identity
            .as_deref()?
            .strip_prefix("spiffe://")?
            .split('/')
            .next()?;
        let (ns, id) = ns_id.split_once('/')?;
        Some(format!("spiffe://{td}/ns/{ns}/sa/{id}"))
    }
}

/// Why an OTLP endpoint is refused.
#[derive(Debug, thiserror::Error)]
#[error("--otlp-endpoint {given:?}: {why}")]
pub struct BadEndpoint {
    given: String,
    why: &'static str,
}

/// Check an endpoint given on the command line: `http://HOST:PORT` or `https://HOST:PORT`
/// (OTLP/gRPC, usually port 4317).
pub fn check_endpoint(given: &str) -> Result<(), BadEndpoint> {
    let bad = |why| BadEndpoint {
        given: given.into(),
        why,
    };
    if !given.starts_with("http://") && !given.starts_with("https://") {
        return Err(bad("expected http://HOST:PORT or https://HOST:PORT"));
    }
    let uri: http::Uri = given.parse().map_err(|_| bad("not a valid URI"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    tonic::transport::Endpoint::from_shared(given.to_string())
        .map(|_| ())
        .map_err(|_| bad("not a valid URI"))
}

/// Where the roots that verify a collector's certificate are looked for when no file is
/// given: the system's bundle (Debian and Ubuntu, Fedora and RHEL, Alpine and others).
const SYSTEM_ROOTS: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Why the connection to the collector cannot be set up as asked: the flag, what it named
/// (a file, a header's name), why.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {what}: {why}")]
pub struct CollectorError {
    flag: &'static str,
    what: String,
    why: String,
}

impl CollectorError {
    /// What `flag` named, the file at `path`, cannot be used, and why.
    fn file(flag: &'static str, path: &std::path::Path, why: impl Into<String>) -> Self {
        Self {
            flag,
            what: path.display().to_string(),
            why: why.into(),
        }
    }
}

/// What TLS to an `https://` collector uses: the roots that verify its certificate (PEM;
/// the system's bundle without them), and the certificate chain and key (PEM) this proxy
/// shows a collector that asks for one (an OpenTelemetry Collector with
/// `tls.client_ca_file`, say).
#[derive(Debug, Clone, Copy, Default)]
pub struct CollectorTls<'a> {
    pub ca: Option<&'a std::path::Path>,
    pub client_cert: Option<&'a std::path::Path>,
    pub client_key: Option<&'a std::path::Path>,
}

/// The TLS client for an `https://` collector: its certificate verified against `tls.ca`,
/// else the system's bundle; `tls`'s client certificate shown when the collector asks; ALPN
/// `h2`. None for `http://`, which refuses TLS settings rather than ignore them.
pub(crate) fn collector_tls(
    endpoint: &str,
    tls: CollectorTls<'_>,
) -> Result<Option<Arc<rustls::ClientConfig>>, CollectorError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    if !endpoint.starts_with("https://") {
        let given = [
            ("--otlp-ca", tls.ca),
            ("--otlp-client-cert", tls.client_cert),
            ("--otlp-client-key", tls.client_key),
        ];
        if let Some((flag, Some(path))) = given.into_iter().find(|(_, p)| p.is_some()) {
            return Err(CollectorError::file(
                flag,
                path,
                format!("the collector {endpoint} is plaintext: TLS settings need https://"),
            ));
        }
        return Ok(None);
    }
    let path = match tls.ca {
        Some(p) => p.to_path_buf(),
        None => SYSTEM_ROOTS
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| CollectorError {
                flag: "--otlp-ca",
                what: "(none given)".into(),
                why: format!(
                    "no system bundle of roots at {}; give the collector's CA with --otlp-ca",
                    SYSTEM_ROOTS.join(", ")
                ),
            })?,
    };
    let err = |why: String| CollectorError::file("--otlp-ca", &path, why);
    let pem = std::fs::read(&path).map_err(|e| err(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| err(format!("not PEM certificates: {e}")))?;
        roots
            .add(c)
            .map_err(|e| err(format!("a certificate refused as a root: {e}")))?;
    }
    if roots.is_empty() {
        return Err(err("no certificate in it".into()));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| err(e.to_string()))?
    .with_root_certificates(roots);
    let mut cfg = match (tls.client_cert, tls.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key_file)) => {
            let (chain, key) = client_identity(cert, key_file)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                let why = format!("not the key of {}: {e}", cert.display());
                CollectorError::file("--otlp-client-key", key_file, why)
            })?
        }
        (Some(cert), None) => {
            let why = "needs its key, --otlp-client-key";
            return Err(CollectorError::file("--otlp-client-cert", cert, why));
        }
        (None, Some(key)) => {
            let why = "needs its certificate, --otlp-client-cert";
            return Err(CollectorError::file("--otlp-client-key", key, why));
        }
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(Arc::new(cfg)))
}

/// A certificate chain, leaf first, and its private key.
type ClientIdentity = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// The certificate chain and the private key (PKCS#8, PKCS#1 or SEC1) a proxy shows its
/// collector, read from their PEM files.
fn client_identity(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<ClientIdentity, CollectorError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let cert_err = |why: String| CollectorError::file("--otlp-client-cert", cert, why);
    let pem = std::fs::read(cert).map_err(|e| cert_err(e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(cert_err("no certificate in it".into()));
    }
    let key_err = |why: String| CollectorError::file("--otlp-client-key", key, why);
    let pem = std::fs::read(key).map_err(|e| key_err(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| key_err(format!("no PEM private key in it: {e}")))?;
    Ok((chain, key))
}

/// Headers sent with every export (an API key, a tenant: `NAME=VALUE` each), as gRPC
/// metadata. A value is never repeated in an error: it may be a secret.
pub(crate) fn collector_headers(
    given: &[String],
) -> Result<tonic::metadata::MetadataMap, CollectorError> {
    use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
    let mut map = tonic::metadata::MetadataMap::new();
    for g in given {
        let err = |what: &str, why: &str| CollectorError {
            flag: "--otlp-header",
            what: what.to_string(),
            why: why.to_string(),
        };
        let Some((name, value)) = g.split_once('=') else {
            return Err(err("(a header)", "expected NAME=VALUE"));
        };
        let name = name.trim().to_ascii_lowercase();
        if name.ends_with("-bin") || name.starts_with(':') || name.starts_with("grpc-") {
            return Err(err(&name, "reserved for gRPC or binary values"));
        }
        let key = AsciiMetadataKey::from_bytes(name.as_bytes())
            .map_err(|_| err(&name, "not a header name"))?;
        let value = value.trim();
        let value = AsciiMetadataValue::try_from(value)
            .ok()
            .filter(|_| value.bytes().all(|b| (b' '..=b'~').contains(&b)))
            .ok_or_else(|| err(&name, "its value is not visible ASCII"))?;
        map.append(key, value);
    }
    Ok(map)
}

/// Whether the connection to `endpoint` can be set up with `tls` and `headers` (checked
/// before the proxy starts).
pub fn check_collector(
    endpoint: &str,
    tls: CollectorTls<'_>,
    headers: &[String],
) -> Result<(), CollectorError> {
    collector_tls(endpoint, tls)?;
    collector_headers(headers).map(|_| ())
}

/// A connection to an `https://` collector: TCP to its host and port, then TLS for its host
/// name (or IP address).
async fn connect_tls(
    uri: http::Uri,
    tls: Arc<rustls::ClientConfig>,
) -> Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>, BoxError>
{
    let host = uri.host().ok_or("no host")?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(host)?;
    let s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    Ok(hyper_util::rt::TokioIo::new(s))
}

/// Start the exporter to `endpoint` (checked by [`check_endpoint`]); spans go through the
/// returned queue.
/// With `tls` (from [`collector_tls`]) the connection is TLS.
pub(crate) fn start(
    endpoint: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    headers: tonic::metadata::MetadataMap,
    origin: Origin,
    metrics: SpanMetrics,
) -> Spans {
    let (tx, rx) = mpsc::channel(QUEUE_CAP);
    let origin = Arc::new(ArcSwap::from_pointee(origin));
    let ep = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .expect("checked at start-up")
        .connect_timeout(Duration::from_secs(5));
    let channel = match tls {
        None => ep.connect_lazy(),
        Some(tls) => ep.connect_with_connector_lazy(tower::service_fn(move |uri: http::Uri| {
            connect_tls(uri, tls.clone())
        })),
    };
    tokio::spawn(export(
        TraceServiceClient::new(channel),
        headers,
        rx,
        origin.clone(),
        metrics.clone(),
    ));
    Spans {
        tx,
        metrics,
        origin,
    }
}

async fn export(
    mut client: TraceServiceClient<tonic::transport::Channel>,
    headers: tonic::metadata::MetadataMap,
    mut rx: mpsc::Receiver<Queued>,
    origin: Arc<ArcSwap<Origin>>,
    metrics: SpanMetrics,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < BATCH {
            tokio::select! {
                f = rx.recv() => match f {
                    Some(f) => batch.push(f),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        let origin = origin.load_full();
        let resource = resource(&origin);
        let spans: Vec<Span> = batch
            .iter()
            .flat_map(|q| match q {
                Queued::Request(f) => spans(f, &origin),
                Queued::Connection(c) => vec![conn_span(c, &origin)],
            })
            .collect();
        let n = spans.len();
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "trellis-proxy".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let mut req = tonic::Request::new(req);
        *req.metadata_mut() = headers.clone();
        match tokio::time::timeout(EXPORT_TIMEOUT, client.export(req)).await {
            Ok(Ok(_)) => metrics.count("exported", n),
            Ok(Err(e)) => {
                metrics.count("failed", n);
                tracing::debug!(error = %e, spans = n, "OTLP export refused");
            }
            Err(_) => {
                metrics.count("failed", n);
                tracing::debug!(spans = n, "OTLP export timed out");
            }
        }
    }
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
    }
}

fn text(key: &str, v: impl Into<String>) -> KeyValue {
    kv(key, any_value::Value::StringValue(v.into()))
}

fn int(key: &str, v: i64) -> KeyValue {
    kv(key, any_value::Value::IntValue(v))
}

fn resource(o: &Origin) -> Resource {
    let (ns, name) = o.workload.split_once('/').unwrap_or(("", &o.workload));
    let mut attributes = vec![
        text("service.name", name),
        text("service.namespace", ns),
        text("trellis.workload", o.workload.as_str()),
        text("trellis.environment", o.environment.as_str()),
        text("trellis.locality", o.locality.as_str()),
    ];
    if let Some(id) = &o.identity {
        attributes.push(text("trellis.identity", id.as_str()));
    }
    Resource {
        attributes,
        ..Default::default()
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Whether a request that ended with `class` is exported whatever the sampling said: every
/// failure but a client's own error (a 4xx is the caller's business, and a flood of them
/// must not flood the collector).
pub(crate) fn always_exported(class: FailureClass) -> bool {
    !matches!(class, FailureClass::Ok | FailureClass::ClientError)
}

fn status(class: FailureClass, detail: Option<&str>) -> Option<Status> {
    always_exported(class).then(|| Status {
        message: match detail {
            Some(d) => format!("{}: {d}", class.as_str()),
            None => class.as_str().into(),
        },
        code: status::StatusCode::Error as i32,
    })
}

fn some_label(out: &mut Vec<KeyValue>, key: &str, l: &Label) {
    if let Some(v) = l.get() {
        out.push(text(key, v));
    }
}

/// The spans of one finished request: this proxy's, then one per try.
fn spans(f: &Finished, origin: &Origin) -> Vec<Span> {
    let l = &f.line;
    let trace_id = l.trace_id.to_be_bytes().to_vec();
    let start = nanos(f.at);
    let end = start + f.total.as_nanos() as u64;
    let service = l.dst_service.get().unwrap_or("unknown");
    let (src_id, dst_id) = origin.ends(l.direction, &l.source_identity, &l.dst_identity);
    let mut attributes = vec![
        text("trellis.direction", l.direction.as_str()),
        text("http.request.method", l.method.as_str()),
        text("url.path", l.uri.path()),
        text("trellis.failure_class", l.class.as_str()),
        text("trellis.destination.service", service),
        text("trellis.destination.environment", l.dst_environment),
        int("trellis.attempts", i64::from(l.attempts)),
        kv(
            "trellis.sampled",
            any_value::Value::BoolValue(l.spans.sampled),
        ),
    ];
    if l.status != 0 {
        attributes.push(int("http.response.status_code", i64::from(l.status)));
    }
    if let Some(g) = l.grpc_status {
        attributes.push(int("rpc.grpc.status_code", i64::from(g)));
    }
    if let Some(a) = &l.authority {
        attributes.push(text("server.address", a.as_str()));
    }
    if let Some(side) = l.side {
        attributes.push(text("trellis.failure_side", side.as_str()));
    }
    if let Some(d) = &l.detail {
        attributes.push(text("trellis.failure_detail", d.as_str()));
    }
    if let Some(id) = src_id {
        attributes.push(text("trellis.source.identity", id));
    }
    if let Some(id) = dst_id {
        attributes.push(text("trellis.destination.identity", id));
    }
    if let Some(r) = l.request_id.as_ref().and_then(|r| r.to_str().ok()) {
        attributes.push(text("trellis.request_id", r));
    }
    some_label(&mut attributes, "trellis.route", &l.route);
    some_label(&mut attributes, "trellis.source.workload", &l.src_workload);
    some_label(
        &mut attributes,
        "trellis.source.environment",
        &l.src_environment,
    );
    some_label(&mut attributes, "trellis.source.locality", &l.src_locality);
    if let Some(w) = workload_id(&l.dst_service, &l.dst_workload) {
        attributes.push(text("trellis.destination.workload", w));
    }
    some_label(
        &mut attributes,
        "trellis.destination.locality",
        &l.dst_locality,
    );
    if let Some(u) = l.upstream {
        attributes.push(text("trellis.endpoint", u.to_string()));
    }
    let request = Span {
        trace_id: trace_id.clone(),
        span_id: l.spans.span.to_be_bytes().to_vec(),
        parent_span_id: if l.spans.parent == 0 {
            Vec::new()
        } else {
            l.spans.parent.to_be_bytes().to_vec()
        },
        name: format!("{} {} {service}", l.direction.as_str(), l.method),
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: end,
        attributes,
        status: status(l.class, l.detail.as_deref()),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(1 + f.earlier.len() + 1);
    out.push(request);
    let mut n = 0;
    let mut try_span = |t: &TrySpan, end: u64, detail: Option<&str>| {
        n += 1;
        let mut attributes = vec![
            int("trellis.attempt", n),
            text("trellis.failure_class", t.class.as_str()),
        ];
        if let Some(ep) = t.endpoint {
            attributes.push(text("network.peer.address", ep.ip().to_string()));
            attributes.push(int("network.peer.port", i64::from(ep.port())));
        }
        if t.status != 0 {
            attributes.push(int("http.response.status_code", i64::from(t.status)));
        }
        if let Some(w) = workload_id(&l.dst_service, &t.workload) {
            attributes.push(text("trellis.destination.workload", w));
        }
        if let Some(id) = t.identity.get().and_then(|i| origin.spiffe(i)) {
            attributes.push(text("trellis.destination.identity", id));
        }
        Span {
            trace_id: trace_id.clone(),
            span_id: t.span.to_be_bytes().to_vec(),
            parent_span_id: l.spans.span.to_be_bytes().to_vec(),
            name: format!("attempt {n} {service}"),
            kind: span::SpanKind::Client as i32,
            start_time_unix_nano: start + t.start.as_nanos() as u64,
            end_time_unix_nano: end,
            attributes,
            status: status(t.class, detail),
            ..Default::default()
        }
    };
    for t in &f.earlier {
        let end = start + (t.start + t.took).as_nanos() as u64;
        out.push(try_span(t, end, None));
    }
    if l.attempts > 0 {
        // The last try lasts until the response ends.
        let last = TrySpan {
            span: l.spans.attempt,
            start: l.try_start,
            took: f.total.saturating_sub(l.try_start),
            endpoint: l.upstream,
            workload: l.dst_workload.clone(),
            identity: l.dst_identity.clone(),
            class: l.class,
            // A status only if the endpoint answered (not the proxy's own reply).
            status: if l.first_byte.is_some() { l.status } else { 0 },
        };
        out.push(try_span(&last, end, l.detail.as_deref()));
    }
    out
}

/// The span of one finished TCP connection, where its record's trace puts it.
fn conn_span(c: &ConnFinished, origin: &Origin) -> Span {
    let l = &c.line;
    let start = nanos(l.at);
    let service = l.dst_service.get().unwrap_or("unknown");
    let (src_id, dst_id) = origin.ends(l.direction, &l.source_identity, &c.dst_identity);
    let mut attributes = vec![
        text("trellis.direction", l.direction.as_str()),
        text("network.transport", "tcp"),
        text("trellis.failure_class", l.class.as_str()),
        text("trellis.destination.service", service),
        int("trellis.tcp.bytes_from_client", l.sent as i64),
        int("trellis.tcp.bytes_to_client", l.received as i64),
        kv(
            "trellis.sampled",
            any_value::Value::BoolValue(c.trace.ctx.sampled),
        ),
    ];
    if let Some(side) = l.side {
        attributes.push(text("trellis.failure_side", side.as_str()));
    }
    if let Some(d) = &l.detail {
        attributes.push(text("trellis.failure_detail", d.as_str()));
    }
    if let Some(id) = src_id {
        attributes.push(text("trellis.source.identity", id));
    }
    if let Some(id) = dst_id {
        attributes.push(text("trellis.destination.identity", id));
    }
    if let Some(w) = workload_id(&l.dst_service, &l.dst_workload) {
        attributes.push(text("trellis.destination.workload", w));
    }
    if let Some(w) = l.src_workload.get() {
        attributes.push(text("trellis.source.workload", w));
    }
    if let Some(u) = l.upstream {
        attributes.push(text("network.peer.address", u.ip().to_string()));
        attributes.push(int("network.peer.port", i64::from(u.port())));
    }
    let t = &c.trace;
    Span {
        trace_id: t.ctx.trace_id.to_be_bytes().to_vec(),
        span_id: t.ctx.span.to_be_bytes().to_vec(),
        parent_span_id: match t.parent {
            0 => Vec::new(),
            p => p.to_be_bytes().to_vec(),
        },
        name: format!("{} tcp {service}", l.direction.as_str()),
        kind: match l.direction {
            Direction::inbound => span::SpanKind::Server,
            Direction::outbound => span::SpanKind::Client,
        } as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: start + l.total.as_nanos() as u64,
        attributes,
        status: status(l.class, l.detail.as_deref()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
