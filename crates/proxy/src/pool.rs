//! Per-endpoint upstream connections: a list of idle HTTP/1.1 connections and one shared,
//! multiplexed HTTP/2 connection; for an endpoint behind a peer's proxy, the HTTP/1.1
//! connections are streams of one connection to that proxy ([`crate::mux`]).
//!
//! HTTP/1.1 connections are the proxy's own ([`crate::h1`]), driven by the request task;
//! HTTP/2 connections are the proxy's own client over `h2` ([`crate::h2_client`]). Either
//! way the pool enforces the cluster's connection limit and makes the connect failures'
//! errors, naming both the address it connected to (a peer's proxy, for a meshed endpoint)
//! and the workload.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use http::Request;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::Semaphore,
};

use trellis_model::{proxy::MeshPeer, resource::MtlsMode};

use crate::{
    error::{Error, Kind},
    h1::{Conn, Idle},
    h2_client::{self, H2Sender},
    h2_stream::{OpenCount, Outgoing},
    metrics::{ClusterLabels, EndpointLabels, Metrics},
    mtls::{MeshTls, Purpose, TlsFailed, UpStream},
    mux::{Mux, MuxStream},
    net::{connect_timeout, ConnectFailure},
    peer_stream::{self, Answer, ALPN_TCP_HELLO},
    slot::Slot,
};

/// How often an HTTP/2 connection to a peer's proxy is checked with a PING, and how long the
/// answer may take: a peer cut off (a dropped link, a dead host) fails the requests on the
/// connection within both, rather than when the kernel gives up after many minutes.
pub(crate) const MESH_KEEPALIVE: Duration = Duration::from_secs(10);

/// TCP keep-alive on the connection for HTTP/1.1 streams to a peer's proxy, in place of
/// HTTP/2's PINGs: probes after [`MESH_KEEPALIVE`] of silence, the connection closed when one
/// is not answered within as long, and unacknowledged data (a request sent into a cut link)
/// fails after twice that. A request waiting on a peer cut off thus fails within about 20 s,
/// as over HTTP/2, rather than after the kernel's two hours.
fn mesh_keepalive(stream: &TcpStream) {
    let sock = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new()
        .with_time(MESH_KEEPALIVE)
        .with_interval(MESH_KEEPALIVE)
        .with_retries(1);
    let _ = sock.set_tcp_keepalive(&ka);
    let _ = sock.set_tcp_user_timeout(Some(2 * MESH_KEEPALIVE));
}

/// What every connection of this proxy is made with: its metrics, its client TLS (when it
/// has an identity) and the socket mark.
pub(crate) struct Dialer {
    /// Metrics.
    pub(crate) metrics: Metrics,
    /// This proxy's client TLS, when it has an identity.
    pub(crate) tls: Option<MeshTls>,
    /// `SO_MARK` for upstream sockets.
    pub(crate) mark: Option<u32>,
}

/// A connection ready to carry one request.
pub(crate) enum Sender {
    /// HTTP/1.1; returned to the pool when the response body ends. Boxed once per
    /// connection, so that requests move a pointer rather than the connection's buffers.
    H1(Box<Conn>),
    /// HTTP/2; shared.
    H2(H2Sender),
}

/// What the pool needs from the cluster to open a connection.
pub(crate) struct ConnectCtx<'a> {
    /// Connect timeout.
    pub(crate) timeout: Duration,
    /// Cluster-wide connection slots.
    pub(crate) slots: &'a Arc<Semaphore>,
    /// Cluster key, for errors and metrics.
    pub(crate) cluster: &'a str,
    /// Metrics.
    pub(crate) metrics: &'a Metrics,
    /// This proxy's client TLS, when it has an identity.
    pub(crate) tls: Option<&'a MeshTls>,
    /// The service's mutual TLS mode.
    pub(crate) mtls: MtlsMode,
    /// The service port (callee proxies learn it from the TLS server name).
    pub(crate) port: u16,
    /// `SO_MARK` for upstream sockets, so that capture rules let them pass.
    pub(crate) mark: Option<u32>,
}

/// The connections of one endpoint.
pub(crate) struct Pool {
    /// The application's address.
    addr: SocketAddr,
    /// Its workload, for errors.
    workload: Arc<str>,
    mesh: Option<MeshPeer>,
    idle: Arc<Idle>,
    /// The shared HTTP/2 connection and when a request last took it.
    h2: Mutex<Option<(H2Sender, Instant)>>,
    /// The HTTP/2 connection for opaque streams to the peer's proxy.
    streams: Mutex<Streams>,
    /// The connection whose streams carry HTTP/1.1 to the peer's proxy.
    mux: Mutex<MuxConn>,
    /// Held while that connection is made: requests that need it meanwhile wait for it
    /// rather than each making one (their streams would keep every one of them open).
    mux_dial: tokio::sync::Mutex<()>,
}

/// The connection for HTTP/1.1 streams to a peer's proxy, if any, and whether that proxy
/// refused one.
#[derive(Default)]
struct MuxConn {
    conn: Option<(Mux, Instant)>,
    /// The peer's proxy agreed to no such connection: HTTP/2 until then.
    refused_until: Option<Instant>,
}

/// How long a peer's proxy that took no streams is not asked again: a connection per stream
/// meanwhile.
const STREAMS_ASK_AGAIN: Duration = Duration::from_secs(60);

/// The connection for opaque streams, if any, and whether the peer's proxy refused one.
#[derive(Default)]
struct Streams {
    conn: Option<StreamsConn>,
    /// The peer's proxy agreed to no connection for streams: not asked again until then.
    refused_until: Option<Instant>,
}

struct StreamsConn {
    send: H2Sender,
    /// The streams open on it.
    open: Arc<AtomicUsize>,
    /// When a stream last opened on it.
    used: Instant,
}

impl Pool {
    pub(crate) fn new(
        addr: SocketAddr,
        workload: Arc<str>,
        mesh: Option<MeshPeer>,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            addr,
            workload,
            mesh,
            idle: Arc::new(Idle::new(idle_timeout)),
            h2: Mutex::new(None),
            streams: Mutex::default(),
            mux: Mutex::default(),
            mux_dial: tokio::sync::Mutex::new(()),
        }
    }

    /// Where HTTP/1.1 connections of this endpoint go back when their exchange is done.
    pub(crate) fn idle(&self) -> &Arc<Idle> {
        &self.idle
    }

    /// Close the connections unused for the idle timeout: idle HTTP/1.1 ones, the HTTP/2
    /// one when no request has taken it for as long (it closes once the requests still on it
    /// finish; the next request opens a new one), and the one for streams once none is open
    /// on it and none opened for as long.
    pub(crate) fn prune(&self, now: Instant) {
        self.idle.prune(now);
        let mut h2 = self.h2.lock().expect("pool lock");
        if h2.as_ref().is_some_and(|(s, used)| {
            s.is_closed() || now.saturating_duration_since(*used) >= self.idle.timeout()
        }) {
            *h2 = None;
        }
        drop(h2);
        let mut st = self.streams.lock().expect("pool lock");
        if st.conn.as_ref().is_some_and(|c| {
            c.send.is_closed()
                || (c.open.load(Ordering::Acquire) == 0
                    && now.saturating_duration_since(c.used) >= self.idle.timeout())
        }) {
            st.conn = None;
        }
        drop(st);
        let mut mux = self.mux.lock().expect("pool lock");
        if mux.conn.as_ref().is_some_and(|(m, used)| {
            !m.is_usable()
                || (m.open_streams() == 0
                    && now.saturating_duration_since(*used) >= self.idle.timeout())
        }) {
            mux.conn = None;
        }
    }

    /// Get a connection: a pooled one if any is alive, else a new one, made `within` the
    /// time given (the handshakes included). Returns the sender and the time spent
    /// connecting (zero when reused). `now` is the caller's reading of the clock.
    pub(crate) async fn checkout(
        &self,
        h2: bool,
        ctx: &ConnectCtx<'_>,
        now: Instant,
        within: Option<Duration>,
    ) -> Result<(Sender, Duration), Error> {
        if h2 {
            if let Some(s) = self.pooled_h2(now) {
                return Ok((Sender::H2(s), Duration::ZERO));
            }
        } else if let Some(c) = self.idle.pop(now) {
            return Ok((Sender::H1(c), Duration::ZERO));
        }
        let start = Instant::now();
        // Boxed: the handshake futures are large, and every request's future would carry
        // (and hyper would copy) their space although few requests open a connection.
        let connect = Box::pin(self.connect(h2, ctx));
        let s = match within {
            Some(t) => tokio::time::timeout(t, connect).await.unwrap_or_else(|_| {
                Err(Error::new(
                    Kind::Timeout,
                    format!("no connection to {} within {t:?}", self.describe(self.addr)),
                ))
            })?,
            None => connect.await?,
        };
        Ok((s, start.elapsed()))
    }

    /// The HTTP/2 connection in the pool, if it is still open; taken at `now`.
    fn pooled_h2(&self, now: Instant) -> Option<H2Sender> {
        let mut h2 = self.h2.lock().expect("pool lock");
        let (s, used) = h2.as_mut().filter(|(s, _)| !s.is_closed())?;
        *used = now;
        Some(s.clone())
    }

    /// The peer proxy to reach by mutual TLS, if any: an endpoint with an identity is
    /// reached at its proxy when this proxy has one too; without one, a STRICT service cannot
    /// be called, and a PERMISSIVE one is called in plaintext at the application's address.
    fn via_mesh<'a>(&'a self, ctx: &ConnectCtx<'_>) -> Result<Option<&'a MeshPeer>, Error> {
        match (&self.mesh, ctx.tls, ctx.mtls) {
            (None, _, _) => Ok(None),
            (Some(peer), Some(_), _) => Ok(Some(peer)),
            (Some(_), None, MtlsMode::Strict) => Err(Error::new(
                Kind::NoIdentity,
                format!(
                    "{}: the service requires mutual TLS (STRICT) and this proxy has no \
                     identity (start it with --state-dir and --join-token)",
                    ctx.cluster
                ),
            )),
            (Some(_), None, MtlsMode::Permissive) => Ok(None),
        }
    }

    /// Who `addr` is, for an error: "the proxy of shop/catalog-1 (app 10.0.0.5:8080) at
    /// 10.0.0.5:15006" or "shop/catalog-1 at 10.0.0.5:8080".
    pub(crate) fn describe(&self, addr: SocketAddr) -> String {
        if addr == self.addr {
            format!("{} at {addr}", self.workload)
        } else {
            format!(
                "the proxy of {} (app {}) at {addr}",
                self.workload, self.addr
            )
        }
    }

    async fn tcp(&self, addr: SocketAddr, ctx: &ConnectCtx<'_>) -> Result<TcpStream, Error> {
        connect_timeout(addr, ctx.timeout, ctx.mark)
            .await
            .map_err(|f| match f {
                ConnectFailure::Io(e) => Error::with_cause(
                    Kind::Connect,
                    format!("connect to {}", self.describe(addr)),
                    e,
                ),
                ConnectFailure::TimedOut(t) => Error::new(
                    Kind::ConnectTimeout,
                    format!(
                        "connect to {} timed out after {t:?} (is a firewall dropping SYNs, \
                         or is the listen backlog full?)",
                        self.describe(addr)
                    ),
                ),
            })
    }

    fn tls_failed(&self, addr: SocketAddr, f: TlsFailed) -> Error {
        Error::new(Kind::Tls, format!("{} ({})", f.detail, self.describe(addr)))
    }

    /// An opaque stream (TCP binds and CONNECT tunnels): plain, or to the peer's proxy, as a
    /// stream of an HTTP/2 connection for streams to it when it takes them, else by mutual
    /// TLS on a connection of its own; either way opening with `hello` (who calls, the
    /// stream's span) when the peer's proxy speaks it.
    pub(crate) async fn open(
        &self,
        ctx: &ConnectCtx<'_>,
        hello: &peer_stream::Hello,
    ) -> Result<UpStream, Error> {
        let via = self.via_mesh(ctx)?;
        if let (Some(peer), Some(tls)) = (via, ctx.tls) {
            if let Some(s) = self.open_on_h2(ctx, peer, tls, hello).await? {
                return Ok(UpStream::OnH2(Box::new(s)));
            }
        }
        let addr = via.map_or(self.addr, |p| p.inbound);
        let stream = self.tcp(addr, ctx).await?;
        self.count_connect(ctx, addr);
        match (via, ctx.tls) {
            (Some(peer), Some(tls)) => {
                let mut s = tls
                    .connect(stream, peer, ctx.port, Purpose::Tcp)
                    .await
                    .map_err(|f| self.tls_failed(addr, f))?;
                if s.get_ref().1.alpn_protocol() == Some(ALPN_TCP_HELLO) {
                    self.hello(&mut s, addr, hello).await?;
                }
                Ok(UpStream::Tls(Box::new(s)))
            }
            _ => Ok(UpStream::Plain(stream)),
        }
    }

    /// An opaque stream as a stream of the HTTP/2 connection for streams to the peer's proxy
    /// (pooled, else made now), opened with `hello` and answered. `None` when the stream is to
    /// have a connection of its own: the peer's proxy takes no streams (it is older than this;
    /// asked again after [`STREAMS_ASK_AGAIN`]), or the connection carries
    /// [`peer_stream::MAX_STREAMS`] already. A stream the peer did not process (its GOAWAY as it drains) is
    /// opened again on a new connection, once.
    async fn open_on_h2(
        &self,
        ctx: &ConnectCtx<'_>,
        peer: &MeshPeer,
        tls: &MeshTls,
        hello: &peer_stream::Hello,
    ) -> Result<Option<Outgoing>, Error> {
        let addr = peer.inbound;
        let mut pooled = {
            let now = Instant::now();
            let mut st = self.streams.lock().expect("pool lock");
            if st.refused_until.is_some_and(|t| now < t) {
                return Ok(None);
            }
            match st.conn.as_mut().filter(|c| !c.send.is_closed()) {
                Some(c) if c.open.load(Ordering::Acquire) >= peer_stream::MAX_STREAMS => {
                    return Ok(None)
                }
                Some(c) => {
                    c.used = now;
                    Some((c.send.clone(), c.open.clone()))
                }
                None => None,
            }
        };
        loop {
            let again = pooled.is_some();
            let (sender, open) = match pooled.take() {
                Some(p) => p,
                None => match self.dial_streams(ctx, peer, tls).await {
                    Ok(p) => p,
                    Err(f) if f.no_protocol => {
                        let until = Instant::now() + STREAMS_ASK_AGAIN;
                        self.streams.lock().expect("pool lock").refused_until = Some(until);
                        return Ok(None);
                    }
                    Err(f) => return Err(f.error),
                },
            };
            let head = Request::builder()
                .method(peer_stream::STREAM_METHOD)
                .uri(format!("http://{}/", self.addr))
                .body(())
                .expect("a valid request head");
            let mut s = match sender.open(head).await {
                Ok((response, send)) => Outgoing::new(response, send, OpenCount::new(open)),
                Err((_, true)) if again => continue,
                Err((e, _)) => return Err(self.stream_failed(addr, e)),
            };
            // The hello goes with the request's head; the head of the response comes back at
            // once (the answer once the peer's proxy has connected to its application), and
            // is waited for as long as the answer would be.
            if let Err(e) = peer_stream::write_hello(&mut s, hello).await {
                return Err(self.stream_failed(addr, e));
            }
            match tokio::time::timeout(peer_stream::FRAME_TIMEOUT, s.head()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if again && e.unprocessed() => continue,
                Ok(Err(e)) => return Err(self.stream_failed(addr, e)),
                Err(_) => {
                    let waited = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {:?}", peer_stream::FRAME_TIMEOUT),
                    );
                    return Err(self.stream_failed(addr, waited));
                }
            }
            self.answer(&mut s, addr, Ok(())).await?;
            return Ok(Some(s));
        }
    }

    /// A new HTTP/2 connection for opaque streams to `peer`'s proxy, pooled: its sender and
    /// the count of the streams open on it.
    async fn dial_streams(
        &self,
        ctx: &ConnectCtx<'_>,
        peer: &MeshPeer,
        tls: &MeshTls,
    ) -> Result<(H2Sender, Arc<AtomicUsize>), Dialed> {
        let permit = ctx.slot()?;
        let addr = peer.inbound;
        let stream = self.tcp(addr, ctx).await?;
        self.count_connect(ctx, addr);
        let slot = Slot::new(permit, ctx.open_gauge());
        let tls = tls
            .connect(stream, peer, ctx.port, Purpose::TcpStreams)
            .await
            .map_err(|f| Dialed {
                no_protocol: f.no_protocol,
                error: self.tls_failed(addr, f),
            })?;
        let send = h2_client::handshake_with(tls, Some(MESH_KEEPALIVE), slot, h2_client::STREAMS)
            .await
            .map_err(|e| {
                Error::with_cause(
                    Kind::Handshake,
                    format!("HTTP/2 handshake for streams with {}", self.describe(addr)),
                    e,
                )
            })?;
        let open = Arc::new(AtomicUsize::new(0));
        self.streams.lock().expect("pool lock").conn = Some(StreamsConn {
            send: send.clone(),
            open: open.clone(),
            used: Instant::now(),
        });
        Ok((send, open))
    }

    /// A connection made to `addr`, counted (`trellis_upstream_connects_total`).
    fn count_connect(&self, ctx: &ConnectCtx<'_>, addr: SocketAddr) {
        let labels = EndpointLabels {
            cluster: ctx.cluster.to_string(),
            endpoint: addr.to_string(),
        };
        ctx.metrics.pool_connects.get_or_create(&labels).inc();
    }

    /// A stream on the connection for streams to `addr` that failed with `cause` (classed by
    /// it: a reset, a timeout).
    fn stream_failed(&self, addr: SocketAddr, cause: impl Into<crate::error::BoxError>) -> Error {
        Error::with_cause(
            Kind::Exchange,
            format!(
                "a stream on the HTTP/2 connection for streams to {}",
                self.describe(addr)
            ),
            cause,
        )
    }

    /// An opaque stream's hello to the peer's proxy at `addr`, and its answer: the stream
    /// follows, or the failure the peer's proxy had reaching its application (or its policy's
    /// refusal), recorded as that proxy's class.
    async fn hello<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: &mut S,
        addr: SocketAddr,
        hello: &peer_stream::Hello,
    ) -> Result<(), Error> {
        let written = peer_stream::write_hello(s, hello).await;
        self.answer(s, addr, written).await
    }

    /// The answer to a hello (`written`, when writing it did not fail) from the peer's proxy
    /// at `addr`.
    async fn answer<S: AsyncRead + Unpin>(
        &self,
        s: &mut S,
        addr: SocketAddr,
        written: std::io::Result<()>,
    ) -> Result<(), Error> {
        let answer = match written {
            Ok(()) => peer_stream::read_answer(s).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(Answer::Connected) => Ok(()),
            Ok(Answer::Refused { class, detail }) => Err(Error::new(
                Kind::PeerProxy(class),
                format!("{} refused the stream: {detail}", self.describe(addr)),
            )),
            Err(e) => Err(Error::with_cause(
                Kind::Exchange,
                format!(
                    "no answer to the stream's hello from {}",
                    self.describe(addr)
                ),
                e,
            )),
        }
    }

    /// Open a new connection (not pooled until checked in). An HTTP/1.1 one to an endpoint
    /// behind a peer's proxy is a stream of the connection to that proxy; if the proxy takes
    /// no such streams, the HTTP/2 connection to it is handed out instead.
    pub(crate) async fn connect(&self, h2: bool, ctx: &ConnectCtx<'_>) -> Result<Sender, Error> {
        let via = self.via_mesh(ctx)?;
        if let (false, Some(peer), Some(tls)) = (h2, via, ctx.tls) {
            if let Some(s) = self.mux_stream(ctx, peer, tls).await? {
                return Ok(Sender::H1(Box::new(Conn::over_mux(s))));
            }
            if let Some(s) = self.pooled_h2(Instant::now()) {
                return Ok(Sender::H2(s));
            }
        }
        let permit = ctx.slot()?;
        let addr = via.map_or(self.addr, |p| p.inbound);
        let stream = self.tcp(addr, ctx).await?;
        self.count_connect(ctx, addr);
        let slot = Slot::new(permit, ctx.open_gauge());
        let handshake = |source| {
            Error::with_cause(
                Kind::Handshake,
                format!("HTTP/2 handshake with {}", self.describe(addr)),
                source,
            )
        };
        let s = match (via, ctx.tls) {
            (Some(peer), Some(tls)) => {
                let tls = tls
                    .connect(stream, peer, ctx.port, Purpose::Http2)
                    .await
                    .map_err(|f| self.tls_failed(addr, f))?;
                // A peer's proxy is checked with PINGs: requests on a connection to a peer
                // cut off fail within the keep-alive's interval and timeout.
                h2_client::handshake(tls, Some(MESH_KEEPALIVE), slot)
                    .await
                    .map_err(handshake)?
            }
            _ if !h2 => return Ok(Sender::H1(Box::new(Conn::new(stream, slot)))),
            _ => h2_client::handshake(stream, None, slot)
                .await
                .map_err(handshake)?,
        };
        *self.h2.lock().expect("pool lock") = Some((s.clone(), Instant::now()));
        Ok(Sender::H2(s))
    }

    /// Open a new HTTP/1.1 connection (not pooled until checked in): to an endpoint reached
    /// in plaintext, or a stream to its proxy.
    pub(crate) async fn connect_h1(&self, ctx: &ConnectCtx<'_>) -> Result<Box<Conn>, Error> {
        match self.connect(false, ctx).await? {
            Sender::H1(c) => Ok(c),
            Sender::H2(_) => Err(Error::new(
                Kind::Protocol,
                format!(
                    "{}: the proxy of {} takes no HTTP/1.1 streams (it is older than this one)",
                    ctx.cluster, self.workload
                ),
            )),
        }
    }

    /// A new stream for HTTP/1.1 on the connection to `peer`'s proxy (pooled, else made
    /// now). `None` when that proxy takes no such streams (it is older than this; asked
    /// again after [`STREAMS_ASK_AGAIN`]).
    async fn mux_stream(
        &self,
        ctx: &ConnectCtx<'_>,
        peer: &MeshPeer,
        tls: &MeshTls,
    ) -> Result<Option<MuxStream>, Error> {
        if let Some(pooled) = self.pooled_mux() {
            return Ok(pooled);
        }
        // One dial at a time; whoever waited takes a stream of the connection it made.
        let _dialing = self.mux_dial.lock().await;
        if let Some(pooled) = self.pooled_mux() {
            return Ok(pooled);
        }
        let permit = ctx.slot()?;
        let addr = peer.inbound;
        let stream = self.tcp(addr, ctx).await?;
        self.count_connect(ctx, addr);
        mesh_keepalive(&stream);
        let slot = Slot::new(permit, ctx.open_gauge());
        let tls = match tls
            .connect(stream, peer, ctx.port, Purpose::Http1Streams)
            .await
        {
            Ok(t) => t,
            Err(f) if f.no_protocol => {
                let until = Instant::now() + STREAMS_ASK_AGAIN;
                self.mux.lock().expect("pool lock").refused_until = Some(until);
                return Ok(None);
            }
            Err(f) => return Err(self.tls_failed(addr, f)),
        };
        let (mux, conn) = Mux::client(tls);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "a connection for HTTP/1.1 streams ended");
            }
        });
        let s = mux.open();
        self.mux.lock().expect("pool lock").conn = Some((mux, Instant::now()));
        Ok(s)
    }

    /// A stream of the pooled connection for HTTP/1.1 streams (`Some(Some)`), or `Some(None)`
    /// while the peer's proxy is known to take none; `None` when a connection is to be made.
    fn pooled_mux(&self) -> Option<Option<MuxStream>> {
        let now = Instant::now();
        let mut st = self.mux.lock().expect("pool lock");
        if st.refused_until.is_some_and(|t| now < t) {
            return Some(None);
        }
        let (m, used) = st.conn.as_mut()?;
        let s = m.open()?;
        *used = now;
        Some(Some(s))
    }

    /// A connection of its own for a request that asks to switch protocols (WebSocket): to
    /// the endpoint in plaintext, or by mutual TLS (ALPN `http/1.1`) to its proxy, which
    /// carries the request to its application as it came.
    pub(crate) async fn connect_upgrade(&self, ctx: &ConnectCtx<'_>) -> Result<ForUpgrade, Error> {
        let (Some(peer), Some(tls)) = (self.via_mesh(ctx)?, ctx.tls) else {
            return Ok(ForUpgrade::Plain(self.connect_h1(ctx).await?));
        };
        let permit = ctx.slot()?;
        let stream = self.tcp(peer.inbound, ctx).await?;
        let s = tls
            .connect(stream, peer, ctx.port, Purpose::Http1Upgrade)
            .await
            .map_err(|f| self.tls_failed(peer.inbound, f))?;
        Ok(ForUpgrade::Peer(Box::new(s), permit))
    }
}

/// A connection that could not be made.
struct Dialed {
    error: Error,
    /// A peer's proxy agreed to none of the protocols offered.
    no_protocol: bool,
}

impl From<Error> for Dialed {
    fn from(error: Error) -> Self {
        Self {
            error,
            no_protocol: false,
        }
    }
}

impl ConnectCtx<'_> {
    /// The gauge of the cluster's open pooled connections.
    fn open_gauge(&self) -> prometheus_client::metrics::gauge::Gauge {
        self.metrics
            .pool_open
            .get_or_create(&ClusterLabels {
                cluster: self.cluster.to_string(),
            })
            .clone()
    }

    /// A place for one more connection within the cluster's bound.
    fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Error> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            Error::new(
                Kind::Overloaded,
                format!("cluster {}: max connections reached", self.cluster),
            )
        })
    }
}

/// A connection for a protocol switch.
pub(crate) enum ForUpgrade {
    /// HTTP/1.1 to the endpoint itself.
    Plain(Box<Conn>),
    /// Mutual TLS to the endpoint's proxy, and the connection's place in the cluster's bound.
    Peer(
        Box<tokio_rustls::client::TlsStream<TcpStream>>,
        tokio::sync::OwnedSemaphorePermit,
    ),
}

#[cfg(test)]
mod tests;
