//! The inbound side: what peers (their proxies, over mutual TLS) and plaintext callers send to
//! the local workload. The target is one of the local workload's ports: the one the caller's
//! proxy named in its TLS server name, else the one a captured connection was addressed to,
//! else the authority's port, else the only HTTP port. Stage `policy` admits it (STRICT and
//! authorization, one check for HTTP, CONNECT and TCP), then it goes to the application.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use trellis_model::{proxy::PeerIdentity, resource::Protocol};

use crate::{
    error::{io_class, Error, Kind},
    h1::codec::{visible, Noted},
    http::{
        authority::RequestAuthority,
        body::{ClientBody, ProxyBody},
        headers::strip_hop_by_hop,
    },
    metrics::{Direction, Label},
    peer_stream,
    shared::Shared,
    snapshot::{InboundTarget, Snapshot},
    stages::{
        attempt::Plan,
        policy::{self, Inbound},
        record::{ConnRecord, Record},
        respond::local_reply,
        Next,
    },
    tcp,
};

/// The caller's identity, learned from its certificate, carried to each of its requests.
#[derive(Clone)]
pub(crate) struct PeerId {
    /// The service port, from the TLS server name.
    pub(crate) port: Option<u16>,
    /// Parsed, for authorization.
    pub(crate) id: Arc<PeerIdentity>,
    /// As a SPIFFE ID, for logs and metrics (interned: one value per identity).
    pub(crate) uri: Label,
    /// The caller's `x-trellis-peer` last seen on this connection, parsed: a caller's proxy
    /// sends the same value on every request.
    meta: Arc<Mutex<Option<PeerMeta>>>,
}

struct PeerMeta {
    raw: Bytes,
    source: Source,
}

/// Who calls, from its proxy's `x-trellis-peer`.
#[derive(Clone, Default)]
pub(crate) struct Source {
    pub(crate) service: Label,
    pub(crate) workload: Label,
    pub(crate) environment: Label,
    pub(crate) locality: Label,
}

impl PeerId {
    /// The identity of a caller on a new connection.
    pub(crate) fn new(port: Option<u16>, id: PeerIdentity, uri: Label) -> Self {
        Self {
            port,
            id: Arc::new(id),
            uri,
            meta: Arc::default(),
        }
    }

    /// The caller's service, workload, environment and locality from its proxy's
    /// `x-trellis-peer` (`SERVICE,NAMESPACE/WORKLOAD,ENVIRONMENT,REGION/ZONE`). Believed only
    /// for a workload of the namespace the caller's certificate was issued for: a proxy names
    /// its own workload, which is in that namespace, so a workload of another namespace is a
    /// claim its certificate does not back, and none of it is recorded (the caller's SPIFFE
    /// ID still is).
    pub(crate) fn source(&self, v: &[u8]) -> Source {
        let mut m = self.meta.lock().expect("peer meta lock");
        if let Some(p) = m.as_ref().filter(|p| p.raw == v) {
            return p.source.clone();
        }
        // Visible ASCII only (always UTF-8), as `HeaderValue::to_str` reads a value: anything
        // else names nobody.
        let text = if visible(v) {
            std::str::from_utf8(v).unwrap_or_default()
        } else {
            ""
        };
        let mut parts = text.split(',');
        let label = |s: Option<&str>| {
            s.filter(|s| !s.is_empty())
                .map(Label::from)
                .unwrap_or_default()
        };
        let mut source = Source {
            service: label(parts.next()),
            workload: label(parts.next()),
            environment: label(parts.next()),
            locality: label(parts.next().filter(|l| *l != "/")),
        };
        let backed = source
            .workload
            .as_str()
            .split_once('/')
            .is_some_and(|(ns, _)| ns == self.id.namespace);
        if !backed {
            tracing::warn!(
                claimed = %source.workload.as_str(),
                identity = %self.uri.as_str(),
                "a caller's proxy named a workload its certificate does not back; not recorded"
            );
            source = Source::default();
        }
        *m = Some(PeerMeta {
            raw: Bytes::copy_from_slice(v),
            source: source.clone(),
        });
        source
    }
}

thread_local! {
    // The route label of inbound requests, shared rather than allocated per request.
    static INBOUND_ROUTE: Label = Label::from("inbound");
}

fn strict(shared: &Shared, target: &InboundTarget) -> bool {
    policy::strict(shared.identity.is_some(), shared.mtls_mode, target)
}

/// What a request's connection knows of its caller, handed to each of its requests with
/// the request (not in its extensions: a map allocated, hashed into and freed per request).
#[derive(Clone)]
pub(crate) struct Caller {
    /// The connection's peer address.
    pub(crate) addr: std::net::SocketAddr,
    /// Its identity, from its certificate (mutual TLS).
    pub(crate) identity: Option<PeerId>,
    /// The local port a captured inbound connection was addressed to.
    pub(crate) captured: Option<u16>,
}

/// Route an inbound HTTP request to the local workload: a reply, or where it goes next.
pub(crate) fn route(
    shared: &Shared,
    snap: &Snapshot,
    req: &mut Request<ClientBody>,
    mut rec: Box<Record>,
    grpc: bool,
    from: &Caller,
    noted: &mut Noted,
) -> Next<'static> {
    let (source, peer) = (from.identity.as_ref(), from.addr);
    // Who calls: its proxy says, and is believed only over mutual TLS. The header never
    // reaches the application: noting the head took it out of the headers.
    if let Some(v) = noted.peer.take() {
        if let Some(p) = source {
            let s = p.source(v.as_bytes());
            (rec.src_service, rec.src_workload) = (s.service, s.workload);
            (rec.src_environment, rec.src_locality) = (s.environment, s.locality);
        }
    }
    // The port the caller's proxy named in the TLS server name, else the port a captured
    // connection was addressed to, else the port of the authority; with one HTTP port, that.
    let port = source
        .and_then(|p| p.port)
        .or(from.captured)
        .or_else(|| rec.authority.as_ref().and_then(|a| a.host_port().1));
    let caller = source;
    let source = source.map(|p| p.id.as_ref());
    if req.method() == Method::CONNECT {
        return tunnel(shared, snap, port, rec, source);
    }
    let target = http_target(snap, port, rec.authority.as_ref());
    let Some(target) = target else {
        let e = Error::new(
            Kind::NoRoute,
            "this proxy has no local workload with an HTTP port (start it with --workload)",
        );
        return Next::Reply(local_reply(rec, &e, grpc));
    };
    rec.dst_service = target.cluster.service.clone();
    rec.route = INBOUND_ROUTE.with(Clone::clone);
    let ask = Inbound {
        source,
        http: Some((req.method().as_str(), req.uri().path())),
    };
    if let Err(e) = policy::admit(snap, target, ask, strict(shared, target)) {
        if e.kind() == Kind::PlaintextRefused {
            shared.telemetry.metrics.count_tls_refusal();
        }
        return Next::Reply(local_reply(rec, &e, grpc));
    }
    if noted.upgrade {
        return Next::Upgrade(target.cluster.clone(), rec);
    }
    // The rate limits (a route's, else the service's), before a place under the
    // concurrency limit is taken.
    let limit = target.rate_limits.iter().find(|l| {
        l.cfg.matches.is_empty()
            || l.cfg
                .matches
                .iter()
                .any(|m| crate::stages::route::matches(m, req))
    });
    if let Some(l) = limit {
        if let Some((e, headers)) = rate_limited(shared, l, caller.and_then(|p| p.uri.get()), peer)
        {
            let mut r = local_reply(rec, &e, grpc);
            r.headers_mut().extend(headers);
            return Next::Reply(r);
        }
    }
    // The workload's adaptive concurrency limit: over it, shed now rather than queue.
    if target.adaptive.enabled {
        let a = &shared.adaptive;
        a.bound(target.adaptive.min, target.adaptive.max);
        match a.admit() {
            Some(p) => rec.adaptive = Some(p),
            None => {
                let (limit, ..) = a.figures();
                let e = Error::new(
                    Kind::Overloaded,
                    format!(
                        "the workload's adaptive concurrency limit is reached ({limit} in flight)"
                    ),
                );
                return Next::Reply(local_reply(rec, &e, grpc));
            }
        }
    }
    strip_hop_by_hop(req.headers_mut());
    let plan = Plan {
        cluster: target.cluster.clone(),
        timeout: None,
        idle: None,
        retry: None,
        response_headers: None,
        peer_header: None,
        faults: &[],
        mirror_to: Vec::new(),
    };
    Next::Forward(plan, rec)
}

/// Whether `l` refuses this request of `source` (else of the address `peer`): the error and
/// the `RateLimit-Policy`, `RateLimit` and `Retry-After` headers of the 429. In shadow mode
/// what would be refused is counted and let through.
fn rate_limited(
    shared: &Shared,
    l: &crate::ratelimit::RateLimiter,
    source: Option<&str>,
    peer: std::net::SocketAddr,
) -> Option<(Error, http::HeaderMap)> {
    use crate::ratelimit::{Caller, Decision, Over};
    let caller = match source {
        Some(uri) => Caller::Id(uri),
        None => Caller::Ip(peer.ip()),
    };
    let Decision::Limited {
        scope,
        rate,
        retry_after_ns,
    } = l.check(caller)
    else {
        return None;
    };
    let scope = match scope {
        Over::Caller => "caller",
        Over::Total => "total",
    };
    shared
        .telemetry
        .metrics
        .count_rate_limited(&l.cfg.policy, scope, l.cfg.shadow);
    if l.cfg.shadow {
        return None;
    }
    let secs = retry_after_ns.div_ceil(1_000_000_000).max(1);
    let window = rate.per.as_secs().max(1);
    let mut h = http::HeaderMap::new();
    // draft-ietf-httpapi-ratelimit-headers: the policy that refused, and when it frees.
    let policy = format!("\"{scope}\";q={};w={window}", rate.requests);
    let now = format!("\"{scope}\";r=0;t={secs}");
    for (k, v) in [
        ("ratelimit-policy", policy),
        ("ratelimit", now),
        ("retry-after", secs.to_string()),
    ] {
        if let Ok(v) = http::HeaderValue::from_str(&v) {
            h.insert(http::HeaderName::from_static(k), v);
        }
    }
    let e = Error::new(
        Kind::RateLimited,
        format!(
            "over the {scope} limit of {} ({} per {:?}) for {caller}",
            l.cfg.policy, rate.requests, rate.per
        ),
    );
    Some((e, h))
}

/// Opaque TCP to the local workload: `CONNECT host:PORT` on the inbound listener reaches the
/// workload's port PORT (any protocol; TCP ports are reachable only this way). This is how a
/// peer's proxy carries TCP to a workload behind its sidecar; with mutual TLS the same
/// tunnel runs inside the peers' TLS connection.
fn tunnel(
    shared: &Shared,
    snap: &Snapshot,
    port: Option<u16>,
    mut rec: Box<Record>,
    source: Option<&PeerIdentity>,
) -> Next<'static> {
    let Some(target) = snap.inbound.iter().find(|t| Some(t.port) == port) else {
        let e = Error::new(Kind::NoRoute, no_such_port("CONNECT to port", port, snap));
        return Next::Reply(local_reply(rec, &e, false));
    };
    rec.dst_service = target.cluster.service.clone();
    rec.route = INBOUND_ROUTE.with(Clone::clone);
    let ask = Inbound { source, http: None };
    if let Err(e) = policy::admit(snap, target, ask, strict(shared, target)) {
        if e.kind() == Kind::PlaintextRefused {
            shared.telemetry.metrics.count_tls_refusal();
        }
        // The HTTP/1.1 server closes a connection whose CONNECT it refused.
        return Next::Reply(local_reply(rec, &e, false));
    }
    Next::Tunnel(target.cluster.clone(), rec)
}

/// The local HTTP port a request is for: the one numbered `port`, and when several services
/// of the workload share that number, the one its authority names; else the only HTTP port.
fn http_target<'a>(
    snap: &'a Snapshot,
    port: Option<u16>,
    authority: Option<&RequestAuthority>,
) -> Option<&'a InboundTarget> {
    let http = |t: &&InboundTarget| t.protocol != Protocol::Tcp;
    let mut on_port = snap
        .inbound
        .iter()
        .filter(http)
        .filter(|t| Some(t.port) == port);
    let first = on_port.next();
    let Some(first) = first else {
        return snap.inbound.iter().find(http);
    };
    let named = |t: &InboundTarget| {
        let Some(a) = authority else { return false };
        let host = a.host_port().0;
        let host = host.strip_suffix(".mesh").unwrap_or(host);
        host == t.cluster.service.as_str() || Some(host) == Some(t.service.name.as_str())
    };
    if named(first) {
        return Some(first);
    }
    Some(on_port.find(|t| named(t)).unwrap_or(first))
}

fn no_such_port(what: &str, port: Option<u16>, snap: &Snapshot) -> String {
    let ports: Vec<u16> = snap.inbound.iter().map(|t| t.port).collect();
    format!(
        "{what} {}: the local workload has no such port (ports: {ports:?})",
        port.map_or_else(|| "(none)".to_string(), |p| p.to_string())
    )
}

/// An opaque TCP stream from a peer's proxy carried as a stream of its HTTP/2 connection
/// (`crate::h2_stream`), for the service port that connection is for: taken at once (the
/// hello and the answer follow in the bodies, as on a connection of its own), and served
/// like one in a task of its own, which the proxy's drain waits for.
pub(crate) fn serve_stream(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
    source: PeerId,
) -> Response<ProxyBody> {
    let (out, body) = crate::pipe::pipe();
    let stream = crate::pipe::Duplex::new(req.into_body(), out);
    let active = shared.drain.track();
    tokio::spawn(async move {
        let _active = active;
        let port = source.port;
        serve_tcp(
            shared,
            stream,
            port,
            Some(source),
            true,
            tcp::STREAM_COPY_BUF,
        )
        .await;
    });
    Response::new(ProxyBody::pipe(body))
}

/// An opaque TCP stream for the local workload's service port `port`: from a peer's proxy
/// over mutual TLS (the port from the TLS server name), or captured in plaintext when the
/// port accepts it. Admitted like a CONNECT tunnel, then spliced to the application. With
/// `hello` (ALPN `trellis-tcp/2`) the caller's proxy first says who calls, and is answered
/// whether the application took the connection ([`crate::peer_stream`]).
pub(crate) async fn serve_tcp<S: AsyncRead + AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut stream: S,
    port: Option<u16>,
    source: Option<PeerId>,
    hello: bool,
    buf: usize,
) {
    let snap = shared.state.load_full();
    let target = snap.inbound.iter().find(|t| Some(t.port) == port);
    let service = target
        .map(|t| t.cluster.service.clone())
        .unwrap_or_default();
    let mut rec = ConnRecord::new(shared.telemetry.clone(), Direction::inbound, service);
    if let Some(p) = &source {
        rec.source = p.uri.clone();
    }
    if hello {
        match peer_stream::read_hello(&mut stream).await {
            // Believed over mutual TLS only, as `x-trellis-peer` is.
            Ok(h) => {
                if let (Some(p), Some(v)) = (&source, h.peer) {
                    let s = p.source(v.as_bytes());
                    rec.src_workload = s.workload;
                    (rec.src_environment, rec.src_locality) = (s.environment, s.locality);
                }
                // This side's span of the stream joins the caller's trace.
                if let Some(t) = h.trace {
                    rec.trace = crate::trace::ConnTrace::child_of(t);
                }
            }
            Err(e) => return rec.fail(&e),
        }
    }
    let up = match target {
        None => Err(Error::new(
            Kind::NoRoute,
            no_such_port("TCP stream for port", port, &snap),
        )),
        Some(target) => {
            let ask = Inbound {
                source: source.as_ref().map(|p| p.id.as_ref()),
                http: None,
            };
            match policy::admit(&snap, target, ask, strict(&shared, target)) {
                Err(e) => {
                    if e.kind() == Kind::PlaintextRefused {
                        shared.telemetry.metrics.count_tls_refusal();
                    }
                    Err(e)
                }
                Ok(()) => tcp::connect_for(&shared.dialer, &target.cluster, &mut rec, None).await,
            }
        }
    };
    match up {
        Ok(mut up) => {
            if hello {
                if let Err(e) = peer_stream::write_answer(&mut stream, None).await {
                    return rec.end_with(io_class(&e), format!("the answer to the caller: {e}"));
                }
            }
            tcp::splice(&mut stream, &mut up, &mut rec, buf).await;
        }
        Err(e) => {
            // The caller's proxy is told why, then the stream ends.
            if hello {
                let _ = peer_stream::write_answer(&mut stream, Some(&e)).await;
                let _ = stream.shutdown().await;
            }
            rec.fail(&e);
        }
    }
}

#[cfg(test)]
mod tests;
