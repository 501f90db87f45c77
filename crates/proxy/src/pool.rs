//! Per-endpoint upstream connection pool: a list of idle HTTP/1.1 connections and one shared,
//! multiplexed HTTP/2 connection.
//!
//! HTTP/1.1 connections are the proxy's own ([`crate::h1`]), driven by the request task;
//! HTTP/2 connections use hyper's low-level connection API. Either way the pool enforces the
//! cluster's connection limit and classifies connect failures itself.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::metrics::gauge::Gauge;
use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};

use trellis_model::{proxy::MeshPeer, resource::MtlsMode};

use crate::{
    h1::Conn,
    http::body::UpBody,
    metrics::{ClusterLabels, EndpointLabels, Metrics},
    mtls::{MeshTls, Purpose, UpStream},
    FailureClass,
};

// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE: usize = 256;

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP connect failed.
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// Endpoint.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// TCP connect timed out.
    #[error("connect to {addr} timed out after {timeout:?} (is a firewall dropping SYNs, or is the listen backlog full?)")]
    ConnectTimeout {
        /// Endpoint.
        addr: SocketAddr,
        /// Timeout.
        timeout: Duration,
    },
    /// The cluster's connection limit is reached.
    #[error("cluster {0}: max connections reached")]
    MaxConnections(String),
    /// HTTP handshake failed.
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        /// Endpoint.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: hyper::Error,
    },
    /// The mutual TLS handshake with a peer's proxy failed.
    #[error("{detail}")]
    Tls {
        /// The peer's inbound listener.
        addr: SocketAddr,
        /// What went wrong.
        detail: String,
    },
    /// The service requires mutual TLS and this proxy has no identity.
    #[error("{cluster}: the service requires mutual TLS (STRICT) and this proxy has no identity (start it with --state-dir and --join-token)")]
    NoIdentity {
        /// Cluster.
        cluster: String,
    },
    /// An HTTP/1.1 upgrade to a meshed endpoint (not carried over mutual TLS yet).
    #[error("{0}: HTTP/1.1 upgrades (WebSocket) to an endpoint behind a peer proxy are not supported yet")]
    MeshUpgrade(String),
    /// Sending the request or receiving response headers failed.
    #[error("request to {addr} failed: {source}")]
    Send {
        /// Endpoint.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// The failure class.
    pub fn class(&self) -> FailureClass {
        match self {
            Self::Connect { source, .. } => crate::failure::classify_io(source),
            Self::ConnectTimeout { .. } => FailureClass::ConnectTimeout,
            Self::MaxConnections(_) => FailureClass::Overloaded,
            Self::Tls { .. } | Self::NoIdentity { .. } => FailureClass::TlsError,
            Self::MeshUpgrade(_) => FailureClass::ProtocolError,
            Self::Handshake { source, .. } | Self::Send { source, .. } => {
                crate::failure::classify(source)
            }
        }
    }
}

/// A connection ready to carry one request.
pub enum Sender {
    /// HTTP/1.1; returned to the pool when the response body ends. Boxed once per
    /// connection, so that requests move a pointer rather than the connection's buffers.
    H1(Box<Conn>),
    /// HTTP/2; shared.
    H2(http2::SendRequest<UpBody>),
}

/// What the pool needs from the cluster to open a connection.
pub struct ConnectCtx<'a> {
    /// Connect timeout.
    pub timeout: Duration,
    /// Cluster-wide connection slots.
    pub slots: &'a Arc<Semaphore>,
    /// Cluster key, for errors and metrics.
    pub cluster: &'a str,
    /// Metrics.
    pub metrics: &'a Metrics,
    /// This proxy's client TLS, when it has an identity.
    pub tls: Option<&'a MeshTls>,
    /// The service's mutual TLS mode.
    pub mtls: MtlsMode,
    /// The service port (callee proxies learn it from the TLS server name).
    pub port: u16,
    /// `SO_MARK` for upstream sockets, so that capture rules let them pass.
    pub mark: Option<u32>,
}

/// The pool of one endpoint.
pub struct Pool {
    addr: SocketAddr,
    mesh: Option<MeshPeer>,
    idle_timeout: Duration,
    idle: Mutex<Vec<(Instant, Box<Conn>)>>,
    h2: Mutex<Option<http2::SendRequest<UpBody>>>,
}

impl Pool {
    pub(crate) fn new(addr: SocketAddr, mesh: Option<MeshPeer>, idle_timeout: Duration) -> Self {
        Self {
            addr,
            mesh,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
        }
    }

    /// Get a connection: a pooled one if any is alive, else a new one. Returns the sender and
    /// the time spent connecting (zero when reused).
    /// `now` is the caller's reading of the clock.
    pub async fn checkout(
        &self,
        h2: bool,
        ctx: &ConnectCtx<'_>,
        now: Instant,
    ) -> Result<(Sender, Duration), UpstreamError> {
        if h2 {
            if let Some(s) = self
                .h2
                .lock()
                .expect("pool lock")
                .as_ref()
                .filter(|s| !s.is_closed())
            {
                return Ok((Sender::H2(s.clone()), Duration::ZERO));
            }
        } else {
            if let Some(c) = self.pop_idle(now) {
                return Ok((Sender::H1(c), Duration::ZERO));
            }
        }
        let start = Instant::now();
        // Boxed: the handshake futures are large, and every request's future would carry
        // (and hyper would copy) their space although few requests open a connection.
        let s = Box::pin(self.connect(h2, ctx)).await?;
        Ok((s, start.elapsed()))
    }

    fn pop_idle(&self, now: Instant) -> Option<Box<Conn>> {
        let mut idle = self.idle.lock().expect("pool lock");
        while let Some((since, c)) = idle.pop() {
            if now.saturating_duration_since(since) < self.idle_timeout && c.is_alive() {
                return Some(c);
            }
        }
        None
    }

    /// Return an HTTP/1.1 connection whose exchange completed. `since` is when that exchange
    /// began: counting its duration as idle time errs towards closing sooner, and saves a
    /// clock read.
    pub fn checkin(&self, c: Box<Conn>, since: Instant) {
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < MAX_IDLE {
            idle.push((since, c));
        }
    }

    /// The peer proxy to reach by mutual TLS, if any: an endpoint with an identity is
    /// reached at its proxy when this proxy has one too; without one, a STRICT service cannot
    /// be called, and a PERMISSIVE one is called in plaintext at the application's address.
    fn via_mesh<'a>(&'a self, ctx: &ConnectCtx<'_>) -> Result<Option<&'a MeshPeer>, UpstreamError> {
        match (&self.mesh, ctx.tls, ctx.mtls) {
            (None, _, _) => Ok(None),
            (Some(peer), Some(_), _) => Ok(Some(peer)),
            (Some(_), None, MtlsMode::Strict) => Err(UpstreamError::NoIdentity {
                cluster: ctx.cluster.to_string(),
            }),
            (Some(_), None, MtlsMode::Permissive) => Ok(None),
        }
    }

    /// Whether requests go out as HTTP/2: those of an HTTP/2 cluster, and all those to a peer
    /// proxy, which carries any HTTP over one multiplexed connection.
    pub fn uses_h2(&self, cluster_h2: bool, ctx: &ConnectCtx<'_>) -> bool {
        cluster_h2 || (self.mesh.is_some() && ctx.tls.is_some())
    }

    /// An opaque stream (TCP binds and CONNECT tunnels): plain, or mutual TLS to the peer.
    pub async fn open(&self, ctx: &ConnectCtx<'_>) -> Result<UpStream, UpstreamError> {
        let via = self.via_mesh(ctx)?;
        let addr = via.map_or(self.addr, |p| p.inbound);
        let stream = connect_tcp(addr, ctx.timeout, ctx.mark).await?;
        match (via, ctx.tls) {
            (Some(peer), Some(tls)) => {
                let s = tls
                    .connect(stream, peer, ctx.port, Purpose::Tcp)
                    .await
                    .map_err(|detail| UpstreamError::Tls { addr, detail })?;
                Ok(UpStream::Tls(Box::new(s)))
            }
            _ => Ok(UpStream::Plain(stream)),
        }
    }

    /// Open a new connection (not pooled until checked in).
    pub async fn connect(&self, h2: bool, ctx: &ConnectCtx<'_>) -> Result<Sender, UpstreamError> {
        let via = self.via_mesh(ctx)?;
        let permit = ctx
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| UpstreamError::MaxConnections(ctx.cluster.to_string()))?;
        let addr = via.map_or(self.addr, |p| p.inbound);
        let stream = connect_tcp(addr, ctx.timeout, ctx.mark).await?;
        let labels = EndpointLabels {
            cluster: ctx.cluster.to_string(),
            endpoint: addr.to_string(),
        };
        ctx.metrics.pool_connects.get_or_create(&labels).inc();
        let open = ctx
            .metrics
            .pool_open
            .get_or_create(&ClusterLabels {
                cluster: ctx.cluster.to_string(),
            })
            .clone();
        open.inc();
        let slot = Slot {
            _permit: permit,
            open,
        };
        if let (Some(peer), Some(tls)) = (via, ctx.tls) {
            let tls = tls
                .connect(stream, peer, ctx.port, Purpose::Http2)
                .await
                .map_err(|detail| UpstreamError::Tls { addr, detail })?;
            let (s, conn) = http2::Builder::new(TokioExecutor::new())
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|source| UpstreamError::Handshake { addr, source })?;
            tokio::spawn(async move {
                let _ = conn.await;
                drop(slot);
            });
            *self.h2.lock().expect("pool lock") = Some(s.clone());
            return Ok(Sender::H2(s));
        }
        if !h2 {
            return Ok(Sender::H1(Box::new(Conn::new(stream, slot))));
        }
        let (s, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
        *self.h2.lock().expect("pool lock") = Some(s.clone());
        Ok(Sender::H2(s))
    }

    /// Open a new HTTP/1.1 connection (not pooled until checked in).
    pub async fn connect_h1(&self, ctx: &ConnectCtx<'_>) -> Result<Box<Conn>, UpstreamError> {
        if self.via_mesh(ctx)?.is_some() {
            return Err(UpstreamError::MeshUpgrade(ctx.cluster.to_string()));
        }
        match self.connect(false, ctx).await? {
            Sender::H1(c) => Ok(c),
            Sender::H2(_) => unreachable!("asked for HTTP/1.1"),
        }
    }
}

/// A connection's claim on the cluster's connection limit, counted in the open-connections
/// gauge; both are given back when the connection closes.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Connect with a timeout, Nagle off, and the socket marked with `mark` when given.
pub async fn connect_tcp(
    addr: SocketAddr,
    timeout: Duration,
    mark: Option<u32>,
) -> Result<TcpStream, UpstreamError> {
    match tokio::time::timeout(timeout, crate::capture::connect(addr, mark)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(source)) => Err(UpstreamError::Connect { addr, source }),
        Err(_) => Err(UpstreamError::ConnectTimeout { addr, timeout }),
    }
}
