//! Per-endpoint upstream connection pool: a list of idle HTTP/1.1 connections and one shared,
//! multiplexed HTTP/2 connection.
//!
//! hyper's low-level connection API is used instead of hyper-util's pooled `Client`: it saves
//! a spawned task, a locked hash lookup and a URI rebuild per request (see
//! `../shared/notes/benchmark-baseline.md`), and it lets the pool enforce the cluster's
//! connection limit and classify connect failures itself.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, sync::Semaphore};

use crate::{
    http::body::UpBody,
    metrics::{ClusterLabels, EndpointLabels, Metrics},
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
            Self::Handshake { source, .. } | Self::Send { source, .. } => {
                crate::failure::classify(source)
            }
        }
    }
}

/// A connection ready to carry one request.
pub enum Sender {
    /// HTTP/1.1; returned to the pool when the response body ends.
    H1(http1::SendRequest<UpBody>),
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
}

/// The pool of one endpoint.
pub struct Pool {
    addr: SocketAddr,
    idle_timeout: Duration,
    idle: Mutex<Vec<(Instant, http1::SendRequest<UpBody>)>>,
    h2: Mutex<Option<http2::SendRequest<UpBody>>>,
}

impl Pool {
    pub(crate) fn new(addr: SocketAddr, idle_timeout: Duration) -> Self {
        Self {
            addr,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
        }
    }

    /// Get a connection: a pooled one if any is alive, else a new one. Returns the sender and
    /// the time spent connecting (zero when reused).
    pub async fn checkout(
        &self,
        h2: bool,
        ctx: &ConnectCtx<'_>,
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
            while let Some(mut s) = self.pop_idle() {
                if s.ready().await.is_ok() {
                    return Ok((Sender::H1(s), Duration::ZERO));
                }
            }
        }
        let start = Instant::now();
        // Boxed: the handshake futures are large, and every request's future would carry
        // (and hyper would copy) their space although few requests open a connection.
        let s = Box::pin(self.connect(h2, ctx)).await?;
        Ok((s, start.elapsed()))
    }

    fn pop_idle(&self) -> Option<http1::SendRequest<UpBody>> {
        let mut idle = self.idle.lock().expect("pool lock");
        while let Some((since, s)) = idle.pop() {
            if !s.is_closed() && since.elapsed() < self.idle_timeout {
                return Some(s);
            }
        }
        None
    }

    /// Return an HTTP/1.1 connection whose exchange completed.
    pub fn checkin(&self, s: http1::SendRequest<UpBody>) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < MAX_IDLE {
            idle.push((Instant::now(), s));
        }
    }

    /// Open a new connection (not pooled until checked in).
    pub async fn connect(&self, h2: bool, ctx: &ConnectCtx<'_>) -> Result<Sender, UpstreamError> {
        let permit = ctx
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| UpstreamError::MaxConnections(ctx.cluster.to_string()))?;
        let stream = connect_tcp(self.addr, ctx.timeout).await?;
        let labels = EndpointLabels {
            cluster: ctx.cluster.to_string(),
            endpoint: self.addr.to_string(),
        };
        ctx.metrics.pool_connects.get_or_create(&labels).inc();
        let open = ctx
            .metrics
            .pool_open
            .get_or_create(&ClusterLabels {
                cluster: ctx.cluster.to_string(),
            })
            .clone();
        let io = TokioIo::new(stream);
        let addr = self.addr;
        if h2 {
            let (s, conn) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(|source| UpstreamError::Handshake { addr, source })?;
            open.inc();
            tokio::spawn(async move {
                let _ = conn.await;
                open.dec();
                drop(permit);
            });
            *self.h2.lock().expect("pool lock") = Some(s.clone());
            Ok(Sender::H2(s))
        } else {
            let (s, conn) = http1::handshake(io)
                .await
                .map_err(|source| UpstreamError::Handshake { addr, source })?;
            open.inc();
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
                open.dec();
                drop(permit);
            });
            Ok(Sender::H1(s))
        }
    }
}

/// Connect with a timeout, Nagle off.
pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(source)) => Err(UpstreamError::Connect { addr, source }),
        Err(_) => Err(UpstreamError::ConnectTimeout { addr, timeout }),
    }
}
