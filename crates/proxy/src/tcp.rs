//! Opaque TCP: explicit-mode binds and HTTP CONNECT tunnels. Plain async byte copying; each
//! connection ends with one failure class, counted by a drop guard.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use crate::{
    cluster::Cluster,
    http::{body::ProxyBody, forward::local_reply},
    metrics::{Direction, Label, ServiceLabels, TcpLabels},
    mtls::UpStream,
    record::{rfc3339, Record},
    FailureClass, Shared,
};

/// Counts a TCP connection as open while alive, and records its outcome when dropped.
struct ConnGuard {
    shared: Arc<Shared>,
    direction: Direction,
    service: Label,
    workload: Label,
    upstream: Option<std::net::SocketAddr>,
    /// The caller's SPIFFE ID, on the inbound side of mutual TLS.
    source: Label,
    class: FailureClass,
    detail: Option<String>,
    sent: u64,
    received: u64,
    start: std::time::Instant,
    wall: std::time::SystemTime,
}

impl ConnGuard {
    fn new(shared: Arc<Shared>, direction: Direction, service: Label) -> Self {
        let labels = ServiceLabels {
            direction,
            dst_service: service.clone(),
        };
        shared.metrics.tcp_open.get_or_create(&labels).inc();
        Self {
            shared,
            direction,
            service,
            workload: Label::default(),
            upstream: None,
            source: Label::default(),
            class: FailureClass::Ok,
            detail: None,
            sent: 0,
            received: 0,
            start: std::time::Instant::now(),
            wall: std::time::SystemTime::now(),
        }
    }
}

impl ConnGuard {
    fn fail(&mut self, class: FailureClass, detail: String) {
        self.class = class;
        self.detail = Some(detail);
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let m = &self.shared.metrics;
        let sl = ServiceLabels {
            direction: self.direction,
            dst_service: self.service.clone(),
        };
        m.tcp_open.get_or_create(&sl).dec();
        m.tcp_sent.get_or_create(&sl).inc_by(self.sent);
        m.tcp_received.get_or_create(&sl).inc_by(self.received);
        let tl = TcpLabels {
            direction: self.direction,
            dst_service: self.service.clone(),
            dst_workload: self.workload.clone(),
            failure_class: self.class,
        };
        m.tcp_connections.get_or_create(&tl).inc();
        self.shared.access_log.write(&serde_json::json!({
            "ts": rfc3339(self.wall),
            "kind": "tcp",
            "direction": self.direction.as_str(),
            "dst_service": self.service,
            "dst_workload": self.workload,
            "upstream": self.upstream.map(|a| a.to_string()),
            "source_identity": self.source,
            "failure_class": self.class.as_str(),
            "failure_category": self.class.category(),
            "detail": self.detail,
            "bytes_sent": self.sent,
            "bytes_received": self.received,
            "total_ms": self.start.elapsed().as_secs_f64() * 1e3,
        }));
    }
}

/// Pick an endpoint and connect (by mutual TLS to a peer proxy, or plain), trying another
/// endpoint after a connect failure (at most one per endpoint).
async fn connect(cluster: &Cluster, g: &mut ConnGuard) -> Option<UpStream> {
    let shared = g.shared.clone();
    let ctx = cluster.connect_ctx(&shared);
    for _ in 0..cluster.endpoints.len().max(1) {
        let Some(ep) = cluster.pick(std::time::Instant::now()) else {
            g.class = FailureClass::NoHealthyUpstream;
            g.detail = Some(format!("cluster {} has no healthy endpoint", cluster.key));
            return None;
        };
        g.upstream = Some(ep.cfg.addr);
        g.workload = ep.workload.clone();
        match ep.pool.open(&ctx).await {
            Ok(s) => {
                cluster.report(&ep, FailureClass::Ok);
                return Some(s);
            }
            Err(e) => {
                g.class = e.class();
                g.detail = Some(e.to_string());
                cluster.report(&ep, g.class);
            }
        }
    }
    None
}

async fn splice<A, B>(a: &mut A, b: &mut B, g: &mut ConnGuard)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // Count bytes as they flow, so that a reset still reports what went through.
    let mut a = Counted::new(a);
    match tokio::io::copy_bidirectional(&mut a, b).await {
        Ok(_) => g.class = FailureClass::Ok,
        Err(e) => g.fail(crate::failure::classify_io(&e), e.to_string()),
    }
    (g.sent, g.received) = (a.read, a.written);
}

/// Proxy one accepted connection on an explicit-mode TCP bind.
pub async fn serve_bind(shared: Arc<Shared>, cluster_key: String, mut client: TcpStream) {
    let _active = shared.drain.track();
    let snap = shared.state.load_full();
    let Some(cluster) = snap.clusters.get(&cluster_key).cloned() else {
        return;
    };
    let mut g = ConnGuard::new(shared.clone(), Direction::outbound, cluster.service.clone());
    let _ = client.set_nodelay(true);
    if let Some(mut up) = connect(&cluster, &mut g).await {
        splice(&mut client, &mut up, &mut g).await;
    }
}

/// A captured connection to an address that is no service's virtual IP: connected to as
/// addressed (marked, so that capture lets it out), and counted as service `passthrough`.
pub(crate) async fn passthrough(shared: Arc<Shared>, mut client: TcpStream, dst: SocketAddr) {
    let _active = shared.drain.track();
    let mut g = ConnGuard::new(
        shared.clone(),
        Direction::outbound,
        PASSTHROUGH.with(Clone::clone),
    );
    g.upstream = Some(dst);
    let _ = client.set_nodelay(true);
    let timeout = std::time::Duration::from_secs(10);
    match crate::pool::connect_tcp(dst, timeout, shared.socket_mark).await {
        Ok(mut up) => splice(&mut client, &mut up, &mut g).await,
        Err(e) => g.fail(e.class(), e.to_string()),
    }
}

thread_local! {
    static PASSTHROUGH: Label = Label::from("passthrough");
}

/// An opaque TCP stream for the local workload's service port `port`: from a peer's proxy
/// over mutual TLS (the port from the TLS server name), or captured in plaintext when the
/// port accepts it. Authorized like a CONNECT tunnel, then spliced to the application.
pub(crate) async fn serve_inbound<S: AsyncRead + AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut tls: S,
    port: Option<u16>,
    source: Option<crate::http::server::PeerId>,
) {
    let snap = shared.state.load_full();
    let Some(target) = snap.inbound.iter().find(|t| Some(t.port) == port) else {
        let mut g = ConnGuard::new(shared.clone(), Direction::inbound, Label::default());
        let ports: Vec<u16> = snap.inbound.iter().map(|t| t.port).collect();
        g.fail(
            FailureClass::NoRoute,
            format!("mTLS stream for port {port:?}: the local workload has no such port (ports: {ports:?})"),
        );
        return;
    };
    let mut g = ConnGuard::new(
        shared.clone(),
        Direction::inbound,
        target.cluster.service.clone(),
    );
    if let Some(p) = &source {
        g.source = p.uri.clone();
    }
    let id = source.as_ref().map(|p| p.id.as_ref());
    if id.is_none() && crate::http::server::strict(&shared, target) {
        shared.metrics.count_tls_refusal();
        g.fail(
            FailureClass::Denied,
            format!(
                "plaintext refused: port {} requires mutual TLS",
                target.port
            ),
        );
        return;
    }
    if let Some(detail) = crate::http::server::denied(&snap, target, None, id) {
        g.fail(FailureClass::Denied, detail);
        return;
    }
    if let Some(mut up) = connect(&target.cluster, &mut g).await {
        splice(&mut tls, &mut up, &mut g).await;
    }
}

/// Answer `CONNECT` with 200 and tunnel bytes to an endpoint of `cluster`.
pub async fn connect_tunnel(
    shared: &Arc<Shared>,
    cluster: Arc<Cluster>,
    mut req: Request<crate::http::body::ClientBody>,
    mut rec: Box<Record>,
) -> Response<ProxyBody> {
    // Outbound, or inbound to the local workload: the record knows which listener it came on.
    let mut g = ConnGuard::new(shared.clone(), rec.direction, cluster.service.clone());
    let up = connect(&cluster, &mut g).await;
    rec.upstream = g.upstream;
    let Some(mut up) = up else {
        let (class, detail) = (g.class, g.detail.clone().unwrap_or_default());
        return local_reply(rec, class, detail, false);
    };
    rec.dst_workload = g.workload.clone();
    rec.status = 200;
    rec.attempts = 1;
    let on_upgrade = crate::http::upgrade::on(&mut req);
    let active = shared.drain.track();
    tokio::spawn(async move {
        let _active = active;
        match on_upgrade.wait().await {
            Ok(mut client) => splice(&mut client, &mut up, &mut g).await,
            Err(e) => g.fail(FailureClass::ClientDisconnect, e.to_string()),
        }
    });
    let mut r = Response::new(ProxyBody::full(bytes::Bytes::new()));
    *r.status_mut() = StatusCode::OK;
    r.map(|b| b.with_on_end(rec))
}

/// Counts bytes read from and written to the client side.
pub(crate) struct Counted<'a, T> {
    inner: &'a mut T,
    read: u64,
    written: u64,
}

impl<'a, T> Counted<'a, T> {
    fn new(inner: &'a mut T) -> Self {
        Self {
            inner,
            read: 0,
            written: 0,
        }
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
        r
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
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}
