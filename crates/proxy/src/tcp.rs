//! Opaque TCP: explicit-mode binds, captured connections to no service, and HTTP CONNECT
//! tunnels. Plain async byte copying; each connection ends in one record
//! ([`ConnRecord`]), counted by a drop guard.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, Request, Response, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use crate::{
    cluster::{Cluster, Endpoint},
    error::{io_class, Error, Kind},
    http::{
        body::{ClientBody, ProxyBody},
        upgrade,
    },
    metrics::{Direction, Label, RetryLabels},
    mtls::UpStream,
    net::{connect_timeout, ConnectFailure},
    peer_stream::Hello,
    pool::Dialer,
    shared::Shared,
    stages::{
        balance,
        record::{ConnRecord, Record},
        respond::local_reply,
    },
    trace::{ConnTrace, SpanContext},
};

/// Why no endpoint could be connected to: the last failure, and the endpoint it came from
/// (none when no endpoint was picked), so that the connection is recorded against it.
pub(crate) struct NotConnected {
    pub(crate) error: Error,
    pub(crate) endpoint: Option<Arc<Endpoint>>,
}

/// Pick an endpoint and connect (by mutual TLS to a peer proxy, opening with `hello`, or
/// plain), trying another endpoint after a connect failure (at most one try
/// per endpoint), unless a peer's proxy refused in a way another endpoint will not change (its
/// policy denied the caller). The last failure when none could be reached. A failure another
/// endpoint made good is counted as a failed try of its own endpoint, as an HTTP request's
/// is, and as a retry.
pub(crate) async fn connect(
    dialer: &Dialer,
    cluster: &Cluster,
    direction: Direction,
    hello: &Hello,
) -> Result<(UpStream, Arc<Endpoint>), NotConnected> {
    let ctx = cluster.connect_ctx(dialer);
    let mut avoid: Option<Arc<Endpoint>> = None;
    let mut last: Option<NotConnected> = None;
    for _ in 0..cluster.endpoints.len().max(1) {
        let ep = match balance::pick(cluster, std::time::Instant::now(), avoid.as_ref()) {
            Ok(ep) => ep,
            Err(error) => {
                return Err(last.unwrap_or(NotConnected {
                    error,
                    endpoint: None,
                }))
            }
        };
        // Every endpoint tried: pick_avoiding falls back to the same one.
        if avoid.as_ref().is_some_and(|a| Arc::ptr_eq(a, &ep)) {
            break;
        }
        if let Some(failed) = last.take() {
            failed_try(dialer, cluster, direction, failed);
        }
        match ep.pool.open(&ctx, hello).await {
            Ok(s) => {
                cluster.report(&ep, crate::error::FailureClass::Ok);
                return Ok((s, ep));
            }
            Err(error) => {
                cluster.report(&ep, error.class());
                let settled = matches!(error.kind(), Kind::PeerProxy(_)) && !error.retryable();
                last = Some(NotConnected {
                    error,
                    endpoint: Some(ep.clone()),
                });
                if settled {
                    break;
                }
            }
        }
        avoid = Some(ep);
    }
    Err(last.unwrap_or_else(|| NotConnected {
        error: Error::new(
            Kind::NoEndpoint,
            format!("cluster {} has no healthy endpoint", cluster.key),
        ),
        endpoint: None,
    }))
}

/// A try that failed before another endpoint was tried: counted by its endpoint and class in
/// the summary the control plane gets, and as a retry sent.
fn failed_try(dialer: &Dialer, cluster: &Cluster, direction: Direction, failed: NotConnected) {
    let m = &dialer.metrics;
    let labels = RetryLabels {
        cluster: cluster.key.clone(),
        outcome: "sent",
    };
    m.retries.get_or_create(&labels).inc();
    if let (true, Some(ep)) = (m.summaries, &failed.endpoint) {
        m.tcp_summary.lock().expect("tcp summary lock").failed_try(
            direction,
            &cluster.service,
            failed.error.class(),
            ep.peer_key(),
        );
    }
}

/// Connect for the connection `rec` records (saying who calls with `peer_header`, and the
/// record's span, to a peer's proxy): the endpoint connected to, or the one that failed
/// last, noted in `rec`; the failure is the caller's to record (and, on a callee, to answer).
pub(crate) async fn connect_for(
    dialer: &Dialer,
    cluster: &Cluster,
    rec: &mut ConnRecord,
    peer_header: Option<&HeaderValue>,
) -> Result<UpStream, Error> {
    let hello = Hello {
        peer: peer_header.cloned(),
        trace: Some(rec.trace.ctx),
    };
    match connect(dialer, cluster, rec.direction(), &hello).await {
        Ok((s, ep)) => {
            rec.set_endpoint(ep);
            Ok(s)
        }
        Err(NotConnected { error, endpoint }) => {
            if let Some(ep) = endpoint {
                rec.set_endpoint(ep);
            }
            Err(error)
        }
    }
}

/// Copy both ways until both sides close; the record gets the bytes and how it ended. A
/// failure on the client's side `a` (a caller's application, or on the callee's proxy the
/// caller's proxy) is the client's leaving, `client_disconnect`; one on the upstream's side
/// `b` is classed by its error (on the callee's proxy, the application's reset), so that the
/// two ends of a stream tell who cut it.
///
/// `buf` bytes are read at a time each way ([`COPY_BUF`], or [`STREAM_COPY_BUF`] when a side
/// is a stream on an HTTP/2 connection).
pub(crate) async fn splice<A, B>(a: &mut A, b: &mut B, rec: &mut ConnRecord, buf: usize)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // Count bytes as they flow, so that a reset still reports what went through.
    let mut a = Counted::new(a);
    match tokio::io::copy_bidirectional_with_sizes(&mut a, b, buf, buf).await {
        Ok(_) => rec.class = crate::error::FailureClass::Ok,
        Err(e) if a.failed => rec.end_with(
            crate::error::FailureClass::ClientDisconnect,
            format!("the client's side: {e}"),
        ),
        Err(e) => rec.end_with(io_class(&e), e.to_string()),
    }
    (rec.sent, rec.received) = (a.read, a.written);
}

/// What a splice reads at a time each way: tokio's default, a small buffer for connections
/// that mostly sit idle.
pub(crate) const COPY_BUF: usize = 8 * 1024;

/// What a splice reads at a time each way when a side is a stream on an HTTP/2 connection
/// between proxies: every read is a DATA frame, a wake-up of the connection's task and of the
/// stream's reader, so larger reads cut the cost per byte. Measured (bench/tcp-connect.sh,
/// benchmarks.md): at 8 KiB such a stream cost 17-20 % more CPU per MiB than a connection
/// of its own with mutual TLS, at 16 KiB the same within the bench's noise, for 8 KiB more
/// memory per open connection (32 KiB: the same CPU, 20 KiB more).
pub(crate) const STREAM_COPY_BUF: usize = 16 * 1024;

/// What a splice with `up` reads at a time each way.
fn copy_buf(up: &UpStream) -> usize {
    match up {
        UpStream::OnH2(_) => STREAM_COPY_BUF,
        _ => COPY_BUF,
    }
}

/// Proxy one accepted connection on an explicit-mode TCP bind (or captured on a TCP
/// service's virtual IP).
pub(crate) async fn serve_bind(shared: Arc<Shared>, cluster_key: String, mut client: TcpStream) {
    let snap = shared.state.load_full();
    let Some(cluster) = snap.clusters.get(&cluster_key).cloned() else {
        // The bind outlived its service (a reload is closing it): the connection is still
        // recorded.
        let mut rec = ConnRecord::new(
            shared.telemetry.clone(),
            Direction::outbound,
            Label::default(),
        );
        rec.fail(&Error::new(
            Kind::NoRoute,
            format!("cluster {cluster_key} is no longer configured"),
        ));
        return;
    };
    let mut rec = ConnRecord::new(
        shared.telemetry.clone(),
        Direction::outbound,
        cluster.service.clone(),
    );
    // The Service's own sampling rate, when it sets one, as for its HTTP requests.
    let rate = snap
        .hosts
        .get(cluster.service.as_str())
        .and_then(|id| snap.cfg.services.get(id))
        .and_then(|s| s.trace_sampling);
    if let Some(p) = rate {
        rec.trace = ConnTrace::start(p);
    }
    let _ = client.set_nodelay(true);
    let peer_header = snap.peer_header.as_ref();
    match connect_for(&shared.dialer, &cluster, &mut rec, peer_header).await {
        Ok(mut up) => {
            let buf = copy_buf(&up);
            splice(&mut client, &mut up, &mut rec, buf).await
        }
        Err(e) => rec.fail(&e),
    }
}

thread_local! {
    static PASSTHROUGH: Label = Label::from("passthrough");
}

/// How long a passthrough connection may take to connect.
const PASSTHROUGH_CONNECT: Duration = Duration::from_secs(10);

/// A captured connection to an address that is no service's virtual IP: connected to as
/// addressed (marked, so that capture lets it out), and counted as service `passthrough`.
pub(crate) async fn passthrough(shared: Arc<Shared>, mut client: TcpStream, dst: SocketAddr) {
    let mut rec = ConnRecord::new(
        shared.telemetry.clone(),
        Direction::outbound,
        PASSTHROUGH.with(Clone::clone),
    );
    rec.upstream = Some(dst);
    let _ = client.set_nodelay(true);
    match connect_timeout(dst, PASSTHROUGH_CONNECT, shared.dialer.mark).await {
        Ok(mut up) => splice(&mut client, &mut up, &mut rec, COPY_BUF).await,
        Err(ConnectFailure::Io(e)) => rec.fail(&Error::with_cause(
            Kind::Connect,
            format!("connect to {dst} (passthrough)"),
            e,
        )),
        Err(ConnectFailure::TimedOut(t)) => rec.fail(&Error::new(
            Kind::ConnectTimeout,
            format!("connect to {dst} (passthrough) timed out after {t:?}"),
        )),
    }
}

/// Answer `CONNECT` with 200 and tunnel bytes to an endpoint of `cluster`.
pub(crate) async fn connect_tunnel(
    shared: &Arc<Shared>,
    cluster: Arc<Cluster>,
    mut req: Request<ClientBody>,
    mut rec: Box<Record>,
) -> Response<ProxyBody> {
    // The CONNECT request has its record; the tunnel, once open, has one of its own.
    // The CONNECT's try is the parent of both proxies' spans of the tunnel: it is exported
    // when the tunnel fails to open, which the tunnel's own span then is not.
    let connect_try = SpanContext {
        trace_id: rec.trace_id,
        span: rec.spans.attempt,
        sampled: rec.spans.sampled,
    };
    let hello = Hello {
        peer: shared.state.load().peer_header.clone(),
        trace: Some(connect_try),
    };
    let (mut up, ep) = match connect(&shared.dialer, &cluster, rec.direction, &hello).await {
        Ok(c) => c,
        Err(NotConnected { error, endpoint }) => {
            // Recorded against the endpoint that failed last (as a request's try is).
            if let Some(ep) = &endpoint {
                rec.set_endpoint(ep);
                rec.attempts = 1;
            }
            return local_reply(rec, &error, false);
        }
    };
    rec.set_endpoint(&ep);
    // Outbound, or inbound to the local workload: the record knows which listener it came on.
    let mut conn = ConnRecord::new(
        shared.telemetry.clone(),
        rec.direction,
        cluster.service.clone(),
    );
    conn.source = rec.source_identity.clone();
    conn.trace = ConnTrace::child_of(connect_try);
    conn.set_endpoint(ep.clone());
    rec.status = 200;
    rec.attempts = 1;
    let on_upgrade = upgrade::on(&mut req);
    let active = shared.drain.track();
    tokio::spawn(async move {
        let _active = active;
        match on_upgrade.wait().await {
            Ok(mut client) => {
                let buf = copy_buf(&up);
                splice(&mut client, &mut up, &mut conn, buf).await
            }
            Err(e) => conn.fail(&Error::with_cause(
                Kind::ClientGone,
                "the client left before the tunnel opened",
                e,
            )),
        }
    });
    let mut r = Response::new(ProxyBody::full(bytes::Bytes::new()));
    *r.status_mut() = StatusCode::OK;
    r.map(|b| b.with_on_end(rec))
}

/// Counts bytes read from and written to the client side, and notes whether an I/O error
/// came from it.
pub(crate) struct Counted<'a, T> {
    inner: &'a mut T,
    read: u64,
    written: u64,
    failed: bool,
}

impl<'a, T> Counted<'a, T> {
    fn new(inner: &'a mut T) -> Self {
        Self {
            inner,
            read: 0,
            written: 0,
            failed: false,
        }
    }

    fn note<R>(&mut self, r: Poll<std::io::Result<R>>) -> Poll<std::io::Result<R>> {
        self.failed |= matches!(r, Poll::Ready(Err(_)));
        r
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.inner).poll_read(cx, buf);
        this.read += (buf.filled().len() - before) as u64;
        this.note(r)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut *this.inner).poll_write(cx, b);
        if let Poll::Ready(Ok(n)) = &r {
            this.written += *n as u64;
        }
        this.note(r)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut *this.inner).poll_flush(cx);
        this.note(r)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut *this.inner).poll_shutdown(cx);
        this.note(r)
    }
}

#[cfg(test)]
mod tests;
