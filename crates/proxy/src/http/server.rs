//! Serving one client connection: HTTP/1.1 and HTTP/2 (prior knowledge) detected on the same
//! listener, each request resolved to a service port, a route and a cluster.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http::{header, Method, Request, Response, StatusCode, Version};
use hyper::{body::Incoming, server::conn::http2, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpStream;
use trellis_model::resource::{MtlsMode, Protocol};

use super::{
    body::{ClientBody, ProxyBody},
    forward::{self, edit_headers, is_grpc, local_reply, strip_hop_by_hop, Plan},
    route,
};
use crate::{
    cluster::Cluster,
    h1::server::{Limits, ServerConn},
    metrics::{Direction, Label},
    record::Record,
    state::Snapshot,
    tcp, FailureClass, Shared,
};

/// Which listener a connection came in on.
#[derive(Clone, Debug)]
pub enum Listener {
    /// The outbound listener: the service is named by the authority.
    Outbound,
    /// The inbound listener: the local workload is the destination.
    Inbound,
    /// An explicit-mode bind for one service port.
    Bind {
        /// Cluster key.
        cluster: String,
    },
}

/// Limits applied to every client connection.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Time allowed for a client to send a request's headers.
    pub header_read_timeout: Duration,
    /// Largest request head accepted (HTTP/1.1 buffer; HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Time a kept-alive HTTP/1.1 connection may wait for its next request.
    pub idle_timeout: Duration,
}

/// The connection settings, made once: the proxy's own HTTP/1.1 server's limits, hyper's
/// HTTP/2 builder, and hyper-util's auto-detecting builder for the rare connection whose
/// first bytes do not decide.
pub struct Builders {
    h1: Limits,
    h2: http2::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
}

/// Build the connection builders once per proxy.
pub fn builder(limits: ServerLimits) -> Builders {
    let max_buf = limits.max_header_bytes.max(8192);
    let mut auto = auto::Builder::new(TokioExecutor::new());
    auto.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(max_buf)
        .keep_alive(true);
    auto.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32);
    let h1 = Limits {
        header_read_timeout: limits.header_read_timeout,
        max_head: limits.max_header_bytes,
        idle_timeout: limits.idle_timeout,
    };
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32);
    Builders { h1, h2, auto }
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection's first bytes say, read with `MSG_PEEK` so that nothing is consumed.
enum Sniff {
    Http1,
    Http2,
    /// A prefix of the HTTP/2 preface, not yet complete: let hyper-util decide.
    Undecided,
}

async fn sniff(stream: &TcpStream, timeout: Duration) -> Option<Sniff> {
    let mut buf = [0u8; 24];
    // A client that sends nothing within the header-read timeout is cut off, as one that
    // sends its headers too slowly is.
    let n = tokio::time::timeout(timeout, stream.peek(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(match n {
        0 => return None,
        _ if buf[..n] != H2_PREFACE[..n] => Sniff::Http1,
        24 => Sniff::Http2,
        _ => Sniff::Undecided,
    })
}

/// Drive a connection until it ends, or shut it down gracefully when the proxy drains.
/// (A macro: hyper's three connection types share the method but no trait.)
macro_rules! drive {
    ($conn:expr, $drain:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        tokio::select! {
            // Polled in order: the connection first, and no random number per wake-up.
            biased;
            _ = conn.as_mut() => {}
            _ = $drain.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }};
}

/// Serve one connection until it closes or the proxy drains. The protocol is chosen from
/// the first bytes rather than by hyper-util's auto builder on every connection: HTTP/1.1
/// goes to the proxy's own server, HTTP/2 to hyper's.
///
/// `captured` is the local port a captured inbound connection was addressed to: it picks the
/// local workload's port, and an opaque TCP port is spliced rather than served as HTTP.
pub async fn serve(
    shared: Arc<Shared>,
    builders: Arc<Builders>,
    listener: Listener,
    stream: TcpStream,
    peer: SocketAddr,
    captured: Option<u16>,
) {
    let _ = stream.set_nodelay(true);
    let _active = shared.drain.track();
    let captured = captured.and_then(|p| {
        let snap = shared.state.load();
        let t = snap.inbound.iter().find(|t| t.target_port == p)?;
        Some((t.port, t.protocol))
    });
    if matches!(listener, Listener::Inbound) && shared.identity.is_some() {
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout(builders.h1.header_read_timeout, stream.peek(&mut first));
        match peeked.await {
            Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {
                return serve_mtls(shared, builders, listener, stream, peer).await;
            }
            Ok(Ok(1)) if refuses_plaintext(&shared) => {
                tracing::debug!(%peer, "plaintext refused on the inbound listener (mTLS strict)");
                shared.metrics.count_tls_refusal();
                return;
            }
            Ok(Ok(1)) => {}
            _ => return,
        }
    }
    if let Some((port, Protocol::Tcp)) = captured {
        return tcp::serve_inbound(shared, stream, Some(port), None).await;
    }
    let captured = captured.map(|(port, _)| CapturedPort(port));
    let Some(kind) = sniff(&stream, builders.h1.header_read_timeout).await else {
        return;
    };
    let mut drain = shared.drain.signal();
    if let Sniff::Http1 = kind {
        let drained = Box::pin(async move {
            let _ = drain.changed().await;
        });
        let mut conn = ServerConn::new(stream, builders.h1, drained);
        while let Some(mut req) = conn.next_request().await {
            if let Some(c) = captured {
                req.extensions_mut().insert(c);
            }
            let resp = handle(&shared, &listener, req, peer).await;
            if !conn.respond(resp, shared.drain.draining()).await {
                break;
            }
        }
        conn.finish();
        return;
    }
    let svc = {
        let shared = shared.clone();
        service_fn(move |req: Request<Incoming>| {
            let (shared, listener) = (shared.clone(), listener.clone());
            let mut req = req.map(ClientBody::Hyper);
            if let Some(c) = captured {
                req.extensions_mut().insert(c);
            }
            async move { Ok::<_, Infallible>(handle(&shared, &listener, req, peer).await) }
        })
    };
    let io = TokioIo::new(stream);
    match kind {
        Sniff::Http2 => drive!(builders.h2.serve_connection(io, svc), drain),
        _ => drive!(builders.auto.serve_connection_with_upgrades(io, svc), drain),
    }
}

/// The service port of the local workload that a captured inbound connection was meant for.
#[derive(Clone, Copy)]
struct CapturedPort(u16);

/// The first byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// Whether `target` refuses plaintext: this proxy has an identity, and the target's service
/// is STRICT (or `--mtls-mode` says so for every port).
pub(crate) fn strict(shared: &Shared, target: &crate::state::InboundTarget) -> bool {
    shared.identity.is_some() && shared.mtls_mode.unwrap_or(target.mtls) == MtlsMode::Strict
}

/// Whether a plaintext connection is refused outright: every inbound port is STRICT. With
/// a PERMISSIVE port among them, each request is checked against its own port.
fn refuses_plaintext(shared: &Shared) -> bool {
    match shared.mtls_mode {
        Some(m) => m == MtlsMode::Strict,
        None => shared
            .state
            .load()
            .inbound
            .iter()
            .all(|t| t.mtls == MtlsMode::Strict),
    }
}

/// The caller's identity, learned from its certificate, carried to `handle` on each request.
#[derive(Clone)]
pub struct PeerId {
    /// The service port, from the TLS server name.
    pub port: Option<u16>,
    /// Parsed, for authorization.
    pub id: Arc<trellis_model::proxy::PeerIdentity>,
    /// As a SPIFFE ID, for logs and metrics (interned: one value per identity).
    pub uri: Label,
}

/// The inbound TLS configuration for the current certificate; rebuilt when it is renewed.
fn inbound_tls(shared: &Shared) -> Option<Arc<rustls::ServerConfig>> {
    let creds = shared.identity.as_ref()?.load_full();
    if let Some(c) = shared.inbound_tls.load().as_ref() {
        if Arc::ptr_eq(&c.0, &creds) {
            return Some(c.1.clone());
        }
    }
    let built = trellis_identity::tls::TlsCredentials::from_pem(
        &creds.chain_pem,
        &creds.key_pem,
        &creds.bundle_pem,
    )
    .and_then(|c| {
        let alpn: [&[u8]; 3] = [b"h2", b"http/1.1", trellis_identity::tls::ALPN_TCP];
        trellis_identity::tls::server_config(&c, &alpn)
    });
    match built {
        Ok(cfg) => {
            shared
                .inbound_tls
                .store(Some(Arc::new((creds.clone(), cfg.clone()))));
            Some(cfg)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot build the inbound TLS configuration");
            None
        }
    }
}

/// A mutual-TLS connection on the inbound listener: the handshake, then HTTP/1.1 or HTTP/2
/// (by ALPN) with every request carrying the caller's identity.
async fn serve_mtls(
    shared: Arc<Shared>,
    builders: Arc<Builders>,
    listener: Listener,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let Some(cfg) = inbound_tls(&shared) else {
        return;
    };
    let accept = tokio_rustls::TlsAcceptor::from(cfg).accept(stream);
    let tls = match tokio::time::timeout(builders.h1.header_read_timeout, accept).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "mTLS handshake refused");
            shared.metrics.count_tls_refusal();
            return;
        }
        Err(_) => return,
    };
    let conn = tls.get_ref().1;
    let id = conn
        .peer_certificates()
        .and_then(trellis_identity::tls::peer_id);
    // The service port the caller meant, from the server name it gave.
    let port = conn
        .server_name()
        .and_then(trellis_identity::tls::inbound_port);
    let opaque = conn.alpn_protocol() == Some(trellis_identity::tls::ALPN_TCP);
    let h2 = conn.alpn_protocol() == Some(b"h2".as_slice());
    let peer_id = id.map(|id| PeerId {
        port,
        uri: shared.peer_label(&id.to_string()),
        id: Arc::new(trellis_model::proxy::PeerIdentity {
            trust_domain: id.trust_domain,
            namespace: id.namespace,
            name: id.identity,
        }),
    });
    if opaque {
        return crate::tcp::serve_inbound(shared, tls, port, peer_id).await;
    }
    let mut drain = shared.drain.signal();
    let svc = {
        let shared = shared.clone();
        service_fn(move |req: Request<Incoming>| {
            let (shared, listener) = (shared.clone(), listener.clone());
            let mut req = req.map(ClientBody::Hyper);
            if let Some(p) = &peer_id {
                req.extensions_mut().insert(p.clone());
            }
            async move { Ok::<_, Infallible>(handle(&shared, &listener, req, peer).await) }
        })
    };
    let io = TokioIo::new(tls);
    // ALPN already said which protocol: a peer proxy always says h2.
    if h2 {
        drive!(builders.h2.serve_connection(io, svc), drain);
    } else {
        drive!(builders.auto.serve_connection_with_upgrades(io, svc), drain);
    }
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// What to do with a request once it is routed. Routing is synchronous; exactly one of these
/// is awaited, so the per-request future is the size of one forward, not of every branch.
enum Next<'a> {
    /// The proxy answers itself.
    Reply(Response<ProxyBody>),
    /// Forward to a cluster.
    Forward(Plan<'a>, Request<ClientBody>, Box<Record>),
    /// HTTP/1.1 Upgrade to a cluster.
    Upgrade(Arc<Cluster>, Request<ClientBody>, Box<Record>),
    /// CONNECT tunnel to a cluster.
    Tunnel(Arc<Cluster>, Request<ClientBody>, Box<Record>),
}

async fn handle(
    shared: &Arc<Shared>,
    listener: &Listener,
    mut req: Request<ClientBody>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let snap = shared.state.load_full();
    let direction = if matches!(listener, Listener::Inbound) {
        Direction::inbound
    } else {
        Direction::outbound
    };
    let mut rec = Record::new(
        direction,
        protocol(req.version()),
        shared.metrics.clone(),
        shared.access_log.clone(),
        snap.src_service.clone(),
    );
    let source = req.extensions().get::<PeerId>().cloned();
    if let Some(p) = &source {
        rec.source_identity = p.uri.clone();
    }
    let ids = crate::trace::prepare(req.headers_mut());
    rec.trace_id = ids.trace_id;
    rec.request_id = Some(ids.request_id);
    rec.method = req.method().clone();
    rec.uri = req.uri().clone();
    let grpc = is_grpc(&req);
    let next = match listener {
        Listener::Inbound => inbound(shared, &snap, req, rec, grpc, source.as_ref()),
        _ => outbound(&snap, listener, req, rec, grpc, peer),
    };
    match next {
        Next::Reply(r) => r,
        Next::Forward(plan, req, rec) => forward::forward(shared, plan, req, rec, grpc).await,
        // Rare paths are boxed so that they do not grow every request's future.
        Next::Upgrade(c, req, rec) => Box::pin(forward::upgrade(shared, c, req, rec)).await,
        Next::Tunnel(c, req, rec) => Box::pin(tcp::connect_tunnel(shared, c, req, rec)).await,
    }
}

fn outbound<'a>(
    snap: &'a Snapshot,
    listener: &Listener,
    mut req: Request<ClientBody>,
    mut rec: Box<Record>,
    grpc: bool,
    peer: SocketAddr,
) -> Next<'a> {
    let authority = route::authority(&req);
    rec.authority = authority.clone();
    let target = match listener {
        Listener::Bind { cluster } => snap.clusters.get(cluster).and_then(|c| {
            let (id, svc) = snap.cfg.services.get_key_value(&c.cfg.service)?;
            let port = svc.ports.iter().find(|p| p.port == c.cfg.port)?;
            Some((id, svc, port))
        }),
        _ => authority
            .as_ref()
            .and_then(|a| route::service_port(snap, a)),
    };
    let Some((svc_id, svc, port)) = target else {
        let detail = match &authority {
            Some(a) => format!(
                "no service matches authority {:?} (expected NAME.NAMESPACE[:PORT]); peer {peer}",
                a.as_str()
            ),
            None => "request has no Host header or absolute URI".to_string(),
        };
        return Next::Reply(local_reply(rec, FailureClass::NoRoute, detail, grpc));
    };
    rec.dst_service = svc.host.clone().into();
    if req.method() == Method::CONNECT {
        let key = trellis_model::proxy::cluster_key(svc_id, port.port);
        return match snap.clusters.get(&key) {
            Some(c) => Next::Tunnel(c.clone(), req, rec),
            None => Next::Reply(local_reply(
                rec,
                FailureClass::NoRoute,
                format!("no cluster {key}"),
                false,
            )),
        };
    }
    let Some(r) = route::find(port, &req) else {
        let detail = format!(
            "no route of {} matches {} {}",
            svc.host,
            rec.method,
            rec.uri.path()
        );
        return Next::Reply(local_reply(rec, FailureClass::NoRoute, detail, grpc));
    };
    rec.route = r.name.clone().into();
    let backend = route::pick_backend(&r.backends);
    let Some(cluster) = snap.clusters.get(&backend.cluster).cloned() else {
        let detail = format!("no cluster {}", backend.cluster);
        return Next::Reply(local_reply(rec, FailureClass::NoRoute, detail, grpc));
    };
    if !r.request_headers.is_empty() {
        edit_headers(req.headers_mut(), &r.request_headers);
    }
    if is_upgrade(&req) {
        return Next::Upgrade(cluster, req, rec);
    }
    strip_hop_by_hop(req.headers_mut());
    let plan = Plan {
        cluster,
        timeout: r.timeout,
        retry: r.retry.as_ref(),
        response_headers: Some(&r.response_headers),
    };
    Next::Forward(plan, req, rec)
}

thread_local! {
    // The route label of inbound requests, shared rather than allocated per request.
    static INBOUND_ROUTE: Label = Label::from("inbound");
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

fn inbound(
    shared: &Shared,
    snap: &Snapshot,
    mut req: Request<ClientBody>,
    mut rec: Box<Record>,
    grpc: bool,
    source: Option<&PeerId>,
) -> Next<'static> {
    rec.authority = route::authority(&req);
    // The port the caller's proxy named in the TLS server name, else the port of the
    // authority, picks the target; with one HTTP port, that one.
    let port = source
        .and_then(|p| p.port)
        .or_else(|| req.extensions().get::<CapturedPort>().map(|c| c.0))
        .or_else(|| rec.authority.as_ref().and_then(|a| a.host_port().1));
    let source = source.map(|p| p.id.as_ref());
    if req.method() == Method::CONNECT {
        return inbound_tunnel(shared, snap, port, req, rec, source);
    }
    let http = |t: &&crate::state::InboundTarget| t.protocol != Protocol::Tcp;
    let target = snap
        .inbound
        .iter()
        .filter(http)
        .find(|t| Some(t.port) == port)
        .or_else(|| snap.inbound.iter().find(http));
    let Some(target) = target else {
        let detail =
            "this proxy has no local workload with an HTTP port (start it with --workload)"
                .to_string();
        return Next::Reply(local_reply(rec, FailureClass::NoRoute, detail, grpc));
    };
    rec.dst_service = target.cluster.service.clone();
    rec.route = INBOUND_ROUTE.with(Clone::clone);
    if source.is_none() && strict(shared, target) {
        shared.metrics.count_tls_refusal();
        return Next::Reply(local_reply(
            rec,
            FailureClass::Denied,
            plaintext(target),
            grpc,
        ));
    }
    let http = Some((req.method().as_str(), req.uri().path()));
    if let Some(detail) = denied(snap, target, http, source) {
        return Next::Reply(local_reply(rec, FailureClass::Denied, detail, grpc));
    }
    if is_upgrade(&req) {
        return Next::Upgrade(target.cluster.clone(), req, rec);
    }
    strip_hop_by_hop(req.headers_mut());
    let plan = Plan {
        cluster: target.cluster.clone(),
        timeout: None,
        retry: None,
        response_headers: None,
    };
    Next::Forward(plan, req, rec)
}

/// Opaque TCP to the local workload: `CONNECT host:PORT` on the inbound listener reaches the
/// workload's port PORT (any protocol; TCP ports are reachable only this way). This is how a
/// peer's proxy carries TCP to a workload behind its sidecar; with mutual TLS the same
/// tunnel runs inside the peers' TLS connection.
fn inbound_tunnel(
    shared: &Shared,
    snap: &Snapshot,
    port: Option<u16>,
    req: Request<ClientBody>,
    mut rec: Box<Record>,
    source: Option<&trellis_model::proxy::PeerIdentity>,
) -> Next<'static> {
    let Some(target) = snap.inbound.iter().find(|t| Some(t.port) == port) else {
        let ports: Vec<u16> = snap.inbound.iter().map(|t| t.port).collect();
        let detail = format!(
            "CONNECT to port {}: the local workload has no such port (ports: {ports:?})",
            port.map_or_else(|| "(none)".to_string(), |p| p.to_string())
        );
        return Next::Reply(local_reply(rec, FailureClass::NoRoute, detail, false));
    };
    rec.dst_service = target.cluster.service.clone();
    rec.route = INBOUND_ROUTE.with(Clone::clone);
    if source.is_none() && strict(shared, target) {
        shared.metrics.count_tls_refusal();
        return Next::Reply(local_reply(
            rec,
            FailureClass::Denied,
            plaintext(target),
            false,
        ));
    }
    if let Some(detail) = denied(snap, target, None, source) {
        // The HTTP/1.1 server closes a connection whose CONNECT it refused.
        return Next::Reply(local_reply(rec, FailureClass::Denied, detail, false));
    }
    Next::Tunnel(target.cluster.clone(), req, rec)
}

fn plaintext(target: &crate::state::InboundTarget) -> String {
    format!(
        "plaintext refused: Service {} requires mutual TLS (STRICT)",
        target.service
    )
}

/// The authorization policies' verdict on a request (`http`: method and path) or a TCP
/// tunnel (`None`) to `target` from `source` (a caller that came over mutual TLS);
/// `Some(why)` when denied. A plaintext caller has no identity, so policies that name
/// identities or namespaces deny it.
pub(crate) fn denied(
    snap: &Snapshot,
    target: &crate::state::InboundTarget,
    http: Option<(&str, &str)>,
    source: Option<&trellis_model::proxy::PeerIdentity>,
) -> Option<String> {
    let policies = &snap.cfg.authz;
    if policies.is_empty() {
        return None;
    }
    let req = trellis_model::proxy::AuthzRequest {
        source,
        service: &target.service,
        port: target.port,
        http,
    };
    let d = trellis_model::proxy::authorize(policies, &req);
    (!d.allowed).then(|| match d.policy {
        Some(p) => format!("denied by AuthorizationPolicy {p}"),
        None => format!(
            "no AuthorizationPolicy allows this request to {}",
            target.service
        ),
    })
}

/// A plain response for admin endpoints.
pub fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{io::AsyncWriteExt, net::TcpListener};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn first_bytes_choose_the_protocol_without_consuming_them() {
        let t = Duration::from_secs(5);
        let (mut c, s) = pair().await;
        c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(matches!(sniff(&s, t).await, Some(Sniff::Http1)));
        let mut buf = [0u8; 3];
        s.peek(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET", "nothing consumed");

        let (mut c, s) = pair().await;
        c.write_all(H2_PREFACE).await.unwrap();
        assert!(matches!(sniff(&s, t).await, Some(Sniff::Http2)));

        // Part of the preface only: hyper-util's auto builder reads on and decides.
        let (mut c, s) = pair().await;
        c.write_all(&H2_PREFACE[..9]).await.unwrap();
        assert!(matches!(sniff(&s, t).await, Some(Sniff::Undecided)));
        // "PRI" followed by something else is not HTTP/2.
        let (mut c, s) = pair().await;
        c.write_all(b"PRIX").await.unwrap();
        assert!(matches!(sniff(&s, t).await, Some(Sniff::Http1)));

        // Closed, or silent past the timeout: nothing to serve.
        let (c, s) = pair().await;
        drop(c);
        assert!(sniff(&s, t).await.is_none());
        let (_c, s) = pair().await;
        assert!(sniff(&s, Duration::from_millis(50)).await.is_none());
    }
}
