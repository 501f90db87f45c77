//! Serving one client connection: HTTP/1.1 and HTTP/2 (prior knowledge) detected on the same
//! listener from the first bytes, mutual TLS on the inbound listener, and every request
//! handed to the inbound or outbound side. Endings that come before any request (a
//! malformed head, a head that never finished, plaintext refused under STRICT, a failed
//! inbound handshake) are recorded here.

use std::{convert::Infallible, net::SocketAddr, pin::pin, sync::Arc, time::Duration};

use http::{Request, Response, Version};
use hyper::{body::Incoming, server::conn::http2, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpStream;
use trellis_model::resource::{MtlsMode, Protocol};

use super::{
    body::{ClientBody, ProxyBody},
    Listener,
};
use crate::{
    error::{Error, Kind},
    h1::{
        codec::{Noted, PeerValue},
        server::{Incoming as H1Incoming, Limits, ServerConn},
    },
    inbound::{self, Caller, PeerId},
    metrics::{Direction, Label},
    mux, outbound, peer_stream,
    pool::MESH_KEEPALIVE,
    shared::Shared,
    stages::{
        attempt,
        record::{ConnRecord, Record},
        respond::local_reply,
        Next,
    },
    tcp,
};

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
pub(crate) struct Builders {
    h1: Limits,
    h2: http2::Builder<TokioExecutor>,
    /// For peers' proxies over mutual TLS.
    mesh: http2::Builder<TokioExecutor>,
    /// For peers' proxies' connections for opaque streams.
    streams: http2::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
}

/// Build the connection builders once per proxy.
pub(crate) fn builder(limits: ServerLimits) -> Builders {
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
    // Peers' proxies are checked with PINGs as they check this one: a caller cut off is
    // noticed, and its requests to the application cancelled.
    let mut mesh = h2.clone();
    mesh.keep_alive_interval(MESH_KEEPALIVE)
        .keep_alive_timeout(MESH_KEEPALIVE);
    let streams = for_streams(mesh.clone());
    Builders {
        h1,
        h2,
        mesh,
        streams,
        auto,
    }
}

/// `b` set up for peers' connections for opaque streams: the windows of the callers' side
/// of such a connection (`h2_client::STREAMS`), so that no number of stalled streams holds up
/// the others, and room above the callers' cap for streams still closing.
pub(crate) fn for_streams(mut b: http2::Builder<TokioExecutor>) -> http2::Builder<TokioExecutor> {
    b.initial_stream_window_size(peer_stream::STREAM_WINDOW)
        .initial_connection_window_size(peer_stream::STREAMS_CONNECTION_WINDOW)
        .max_concurrent_streams(peer_stream::MAX_STREAMS as u32 + 28);
    b
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
/// local workload's port, and an opaque TCP port is spliced rather than served as HTTP. The
/// accept loop counted the connection for the drain ([`crate::drain::Drain::track`]).
pub(crate) async fn serve(
    shared: Arc<Shared>,
    builders: Arc<Builders>,
    listener: Listener,
    stream: TcpStream,
    peer: SocketAddr,
    captured: Option<u16>,
) {
    let _ = stream.set_nodelay(true);
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
                shared.telemetry.metrics.count_tls_refusal();
                let mut rec = ConnRecord::new(
                    shared.telemetry.clone(),
                    Direction::inbound,
                    Label::default(),
                );
                rec.fail(&Error::new(
                    Kind::PlaintextRefused,
                    format!(
                        "plaintext connection from {peer} refused: every port of the local \
                         workload requires mutual TLS (STRICT)"
                    ),
                ));
                return;
            }
            Ok(Ok(1)) => {}
            _ => return,
        }
    }
    if let Some((port, Protocol::Tcp)) = captured {
        return inbound::serve_tcp(shared, stream, Some(port), None, false, tcp::COPY_BUF).await;
    }
    let caller = Caller {
        addr: peer,
        identity: None,
        captured: captured.map(|(port, _)| port),
    };
    let Some(kind) = sniff(&stream, builders.h1.header_read_timeout).await else {
        return;
    };
    if let Sniff::Http1 = kind {
        let drained = Box::pin(shared.drain.idle_ends());
        let conn = ServerConn::new(stream, builders.h1, drained);
        return serve_h1(&shared, &builders, &listener, conn, &caller).await;
    }
    let svc = hyper_service(shared.clone(), listener, caller);
    let io = TokioIo::new(stream);
    let mut drain = shared.drain.signal();
    match kind {
        Sniff::Http2 => drive!(builders.h2.serve_connection(io, svc), drain),
        _ => drive!(builders.auto.serve_connection_with_upgrades(io, svc), drain),
    }
}

/// Serve an HTTP/1.1 connection with the proxy's own server: a client's socket, or a stream
/// of a peer proxy's connection ([`mux`]).
async fn serve_h1(
    shared: &Arc<Shared>,
    builders: &Builders,
    listener: &Listener,
    mut conn: ServerConn,
    caller: &Caller,
) {
    let peer = caller.addr;
    // What the server notes of each request's head, lent to the request path (a reference
    // in the request's future, not a copy).
    let mut noted = Noted::default();
    loop {
        let req = match conn.next_request(&mut noted).await {
            H1Incoming::Request(req) => req,
            H1Incoming::Done => break,
            // Boxed: rare, and their futures would grow every request's.
            H1Incoming::Malformed(e) => {
                let status = e.status().as_u16();
                let e = Error::with_cause(Kind::BadRequest, format!("request from {peer}"), e)
                    .with_status(status);
                Box::pin(conn.reject(refusal(shared, listener, e))).await;
                break;
            }
            H1Incoming::HeadTimeout => {
                let e = Error::new(
                    Kind::HeadTimeout,
                    format!(
                        "the request head from {peer} did not end within {:?}",
                        builders.h1.header_read_timeout
                    ),
                )
                .with_status(408);
                Box::pin(conn.reject(refusal(shared, listener, e))).await;
                break;
            }
        };
        let req = req.map(|b| b.map_or(ClientBody::Empty, ClientBody::H1));
        let resp = if conn.is_stream() {
            let f = pin!(handle(shared, listener, req, caller, &mut noted));
            match conn.while_connected(f).await {
                Some(r) => r,
                None => break,
            }
        } else {
            handle(shared, listener, req, caller, &mut noted).await
        };
        if !conn.respond(resp, shared.drain.draining()).await {
            break;
        }
    }
    conn.finish();
}

/// How long an idle stream of a peer's connection for HTTP/1.1 streams is kept at least:
/// longer than a caller's pool keeps one (a cluster's idle timeout, 60 s unless set).
const STREAM_IDLE: Duration = Duration::from_secs(600);

/// A peer proxy's connection for HTTP/1.1 streams ([`mux`]): each stream is served as an
/// HTTP/1.1 connection of its own, in a task of its own, with what the connection knows of
/// its caller. As the proxy drains, the caller is told to open no more streams; the
/// connection ends once the last one does.
async fn serve_mux<T>(
    shared: Arc<Shared>,
    builders: Arc<Builders>,
    listener: Listener,
    io: T,
    caller: Caller,
    mut drain: tokio::sync::watch::Receiver<bool>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut acceptor, conn) = mux::Acceptor::server(io);
    tokio::pin!(conn);
    // The caller's pool decides when an idle stream closes (its cluster's idle timeout): a
    // stream this side closed first would meet the request the caller sent on it meanwhile.
    let limits = Limits {
        idle_timeout: builders.h1.idle_timeout.max(STREAM_IDLE),
        ..builders.h1
    };
    let mut draining = *drain.borrow();
    if draining {
        acceptor.go_away();
    }
    loop {
        tokio::select! {
            biased;
            _ = conn.as_mut() => return,
            s = acceptor.accept() => {
                let Some(s) = s else { break };
                let (shared, builders, listener, caller) =
                    (shared.clone(), builders.clone(), listener.clone(), caller.clone());
                // Counted on its own: a stream's task may outlive the connection's.
                let active = shared.drain.track();
                tokio::spawn(async move {
                    let _active = active;
                    let drained = Box::pin(shared.drain.idle_ends());
                    let conn = ServerConn::over_mux(s, limits, drained);
                    serve_h1(&shared, &builders, &listener, conn, &caller).await;
                });
            }
            _ = drain.changed(), if !draining => {
                draining = true;
                acceptor.go_away();
            }
        }
    }
    let _ = conn.await;
}

/// The answer to a request that ends its connection before it could be handled, recorded.
fn refusal(shared: &Shared, listener: &Listener, e: Error) -> Response<ProxyBody> {
    let rec = Record::new(
        shared.telemetry.clone(),
        direction(listener),
        "HTTP/1.1",
        Label::default(),
    );
    local_reply(rec, &e, false)
}

fn direction(listener: &Listener) -> Direction {
    if matches!(listener, Listener::Inbound) {
        Direction::inbound
    } else {
        Direction::outbound
    }
}

/// The first byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

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
        // A caller's choice among these is the first of this list it offers.
        let alpn: [&[u8]; 6] = [
            mux::ALPN_MUX,
            b"h2",
            peer_stream::ALPN_TCP_STREAMS,
            b"http/1.1",
            peer_stream::ALPN_TCP_HELLO,
            trellis_identity::tls::ALPN_TCP,
        ];
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
/// (by ALPN) with every request carrying the caller's identity, or an opaque TCP stream.
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
    let refused = |e: Error| {
        shared.telemetry.metrics.count_tls_refusal();
        let mut rec = ConnRecord::new(
            shared.telemetry.clone(),
            Direction::inbound,
            Label::default(),
        );
        rec.fail(&e);
    };
    let tls = match tokio::time::timeout(builders.h1.header_read_timeout, accept).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "mTLS handshake refused");
            let ctx = format!("mutual TLS handshake with {peer}");
            return refused(Error::with_cause(Kind::InboundTls, ctx, e));
        }
        Err(_) => {
            let ctx = format!(
                "mutual TLS handshake with {peer} did not finish within {:?}",
                builders.h1.header_read_timeout
            );
            return refused(Error::new(Kind::InboundTls, ctx));
        }
    };
    let conn = tls.get_ref().1;
    let id = conn
        .peer_certificates()
        .and_then(trellis_identity::tls::peer_id);
    // The service port the caller meant, from the server name it gave.
    let port = conn
        .server_name()
        .and_then(trellis_identity::tls::inbound_port);
    let hello = conn.alpn_protocol() == Some(peer_stream::ALPN_TCP_HELLO);
    let opaque = hello || conn.alpn_protocol() == Some(trellis_identity::tls::ALPN_TCP);
    let h2 = conn.alpn_protocol() == Some(b"h2".as_slice());
    let streams = conn.alpn_protocol() == Some(peer_stream::ALPN_TCP_STREAMS);
    let h1_streams = conn.alpn_protocol() == Some(mux::ALPN_MUX);
    let identity = id.map(|id| {
        let uri = shared.peer_label(&id.to_string());
        PeerId::new(
            port,
            trellis_model::proxy::PeerIdentity {
                trust_domain: id.trust_domain,
                namespace: id.namespace,
                name: id.identity,
            },
            uri,
        )
    });
    if opaque {
        return inbound::serve_tcp(shared, tls, port, identity, hello, tcp::COPY_BUF).await;
    }
    let mut drain = shared.drain.signal();
    if streams {
        // Streams are admitted by the caller's identity; a certificate without one names no
        // caller (the handshake checked its chain), so its connection carries nothing.
        let Some(id) = identity else {
            tracing::info!(%peer, "a connection for streams without a SPIFFE ID; closed");
            return;
        };
        let svc = streams_service(shared.clone(), id);
        drive!(
            builders.streams.serve_connection(TokioIo::new(tls), svc),
            drain
        );
        return;
    }
    let caller = Caller {
        addr: peer,
        identity,
        captured: None,
    };
    if h1_streams {
        return serve_mux(shared, builders, listener, tls, caller, drain).await;
    }
    let svc = hyper_service(shared.clone(), listener, caller);
    let io = TokioIo::new(tls);
    // ALPN already said which protocol: a peer proxy always says h2.
    if h2 {
        drive!(builders.mesh.serve_connection(io, svc), drain);
    } else {
        drive!(builders.auto.serve_connection_with_upgrades(io, svc), drain);
    }
}

/// The service of a peer's connection for opaque streams: each request of the stream method
/// is a stream for the service port the connection is for; anything else is refused (400).
fn streams_service(
    shared: Arc<Shared>,
    caller: PeerId,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ProxyBody>,
    Error = Infallible,
    Future: Send,
> {
    service_fn(move |req: Request<Incoming>| {
        let resp = if req.method().as_str() == peer_stream::STREAM_METHOD {
            inbound::serve_stream(shared.clone(), req, caller.clone())
        } else {
            let mut r = Response::new(ProxyBody::full(
                "trellis: this connection carries opaque TCP streams only\n",
            ));
            *r.status_mut() = http::StatusCode::BAD_REQUEST;
            r
        };
        std::future::ready(Ok(resp))
    })
}

/// The service hyper serves a connection's requests with (HTTP/2, and HTTP/1.1 over TLS):
/// each goes to the request path with what the connection knows of its caller, its future
/// boxed: hyper keeps the future in each stream's task and moves that task as it spawns and
/// finishes it, and the request path's future is several kilobytes. One allocation instead
/// of those copies.
fn hyper_service(
    shared: Arc<Shared>,
    listener: Listener,
    caller: Caller,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ProxyBody>,
    Error = Infallible,
    Future: Send,
> {
    service_fn(move |req: Request<Incoming>| {
        let (shared, listener, caller) = (shared.clone(), listener.clone(), caller.clone());
        Box::pin(async move {
            let mut req = req.map(|b| ClientBody::Hyper(Box::new(b)));
            let mut noted = looked_up(&mut req);
            let mut resp = handle(&shared, &listener, req, &caller, &mut noted).await;
            // hyper writes the map alone.
            crate::h1::raw::complete(&mut resp);
            Ok(resp)
        })
    })
}

/// What the request path reads of a request hyper parsed, looked up in its headers (the
/// proxy's own HTTP/1.1 server notes it while parsing): as [`Noted`] says, `x-trellis-peer`
/// is taken out.
fn looked_up(req: &mut Request<ClientBody>) -> Noted {
    let grpc = crate::http::headers::is_grpc(req);
    let upgrade = outbound::is_upgrade(req);
    let h = req.headers_mut();
    Noted {
        host: h.get(http::header::HOST).cloned(),
        request_id: h.get(&super::X_REQUEST_ID).cloned(),
        grpc,
        upgrade,
        peer: h.remove(&super::X_TRELLIS_PEER).map(PeerValue::Header),
        // Read where it is, in the map, by `trace::prepare_with`.
        traceparent: None,
    }
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// One request: its record begun, the trace continued, routed by the side it came in on,
/// and what routing decided awaited.
async fn handle(
    shared: &Arc<Shared>,
    listener: &Listener,
    mut req: Request<ClientBody>,
    caller: &Caller,
    noted: &mut Noted,
) -> Response<ProxyBody> {
    let peer = caller.addr;
    let snap = shared.state.load_full();
    let inbound = matches!(listener, Listener::Inbound);
    // Outbound requests come from the local workload; an inbound caller says who it is.
    let src = if inbound {
        Label::default()
    } else {
        snap.src_service.clone()
    };
    let mut rec = Record::new(
        shared.telemetry.clone(),
        direction(listener),
        protocol(req.version()),
        src,
    );
    if let Some(p) = &caller.identity {
        rec.source_identity = p.uri.clone();
    }
    if shared.telemetry.taps.want_headers() {
        let mut seen = req.headers().clone();
        // The traceparent as it came, which the parser kept out of the map.
        if let Some(v) = noted
            .traceparent
            .clone()
            .and_then(|v| http::HeaderValue::from_maybe_shared(v).ok())
        {
            seen.insert(&super::TRACEPARENT, v);
        }
        rec.tap_headers = Some(Box::new([seen, Default::default()]));
    }
    // The traceparent is taken, as the other noted values are (and dropped with this
    // statement): left in `noted`, it would hold the head's buffer until the next head is
    // parsed, and the connection could not reuse that buffer.
    let ids = crate::trace::prepare_with(
        req.headers_mut(),
        shared.telemetry.trace_sampling,
        noted.request_id.take(),
        noted.traceparent.take().as_deref(),
    );
    rec.trace_id = ids.trace_id;
    rec.spans = ids.spans;
    rec.request_id = Some(ids.request_id);
    rec.method = req.method().clone();
    rec.uri = req.uri().clone();
    rec.authority = super::authority::authority(&req, noted.host.take());
    let grpc = noted.grpc;
    // The config that holds a Service asked for on demand, when one was.
    let fetched;
    let next = if inbound {
        inbound::route(shared, &snap, &mut req, rec, grpc, caller, noted)
    } else {
        let ask = shared.demand.is_some();
        match outbound::route(&snap, listener, &mut req, rec, noted, peer, ask) {
            Next::Discover(id, rec) => {
                fetched = Box::pin(discover(shared, &id)).await;
                outbound::route(&fetched, listener, &mut req, rec, noted, peer, false)
            }
            next => next,
        }
    };
    match next {
        Next::Reply(r) => r,
        Next::Forward(plan, rec) => {
            attempt::forward(&shared.dialer, plan, &mut req, rec, grpc).await
        }
        // Rare paths are boxed so that they do not grow every request's future.
        Next::Upgrade(c, rec) => Box::pin(attempt::upgrade(&shared.dialer, c, req, rec)).await,
        Next::Tunnel(c, rec) => Box::pin(tcp::connect_tunnel(shared, c, req, rec)).await,
        // Routed again without asking: not handed back; answered as the miss it is.
        Next::Discover(id, rec) => {
            let e = Error::new(Kind::NoRoute, format!("no service {id}"));
            local_reply(rec, &e, grpc)
        }
    }
}

/// Ask the control plane for Service `id`, which the config does not hold, and wait a
/// bounded time for a config that holds it: the config to route on again (which may still
/// not hold it: `no_route`).
async fn discover(
    shared: &Shared,
    id: &trellis_model::NamespacedName,
) -> Arc<crate::snapshot::Snapshot> {
    if let Some(d) = &shared.demand {
        d.fetch(id, || shared.state.load().cfg.services.contains_key(id))
            .await;
    }
    shared.state.load_full()
}

/// A plain response for admin endpoints.
pub(crate) fn text(status: http::StatusCode, body: impl Into<bytes::Bytes>) -> Response<ProxyBody> {
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
