//! Listeners: binding, the accept loops, and where an accepted connection goes. A captured
//! outbound connection (the agent's iptables REDIRECT; its original destination read back
//! with `SO_ORIGINAL_DST`) goes to the service whose virtual IP it was addressed to, as an
//! explicit bind of that service port would, or through as addressed; a captured inbound one
//! to the local port it was meant for; anything else is served as the listener's own.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, net::TcpStream, task::JoinHandle};
use trellis_model::resource::Protocol;

use crate::{
    handoff::{Inherited, Offered},
    http::{
        server::{self, Builders},
        Listener,
    },
    net::original_dst,
    shared::Shared,
    tcp,
};

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {source}")]
pub struct BindError {
    /// Address.
    pub addr: SocketAddr,
    /// Which listener.
    pub what: String,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

/// Bind a listener; returns it with its bound address (the port when `addr` asked for 0).
/// With `v6_only`, an IPv6 socket leaves IPv4 to the IPv4 listener at the same port.
pub(crate) fn bind(
    addr: SocketAddr,
    what: &str,
    v6_only: bool,
) -> Result<(TcpListener, SocketAddr), BindError> {
    let sock = if addr.is_ipv4() {
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
    } else {
        socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
    };
    let err = |source| BindError {
        addr,
        what: what.to_string(),
        source,
    };
    let sock = sock.map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    if v6_only {
        sock.set_only_v6(true).map_err(err)?;
    }
    sock.set_nonblocking(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    sock.listen(1024).map_err(err)?;
    let l = TcpListener::from_std(sock.into()).map_err(err)?;
    let bound = l.local_addr().map_err(err)?;
    Ok((l, bound))
}

/// Bind a listener as [`bind`] does, or take the one `from` handed over as `name` when it
/// listens where `addr` asks; either way offer it to a successor when `offered` is given.
pub(crate) fn bind_as(
    from: Option<&mut Inherited>,
    offered: Option<&Offered>,
    (name, what): (&str, &str),
    addr: SocketAddr,
    v6_only: bool,
) -> Result<(TcpListener, SocketAddr), BindError> {
    let err = |source| BindError {
        addr,
        what: what.to_string(),
        source,
    };
    let (l, bound) = match from.and_then(|f| f.take_tcp(name, addr)) {
        Some(l) => {
            let l = TcpListener::from_std(l).map_err(err)?;
            let bound = l.local_addr().map_err(err)?;
            (l, bound)
        }
        None => bind(addr, what, v6_only)?,
    };
    if let Some(o) = offered {
        o.add(name, &l).map_err(err)?;
    }
    Ok((l, bound))
}

/// What an accepted connection is served as.
pub(crate) enum Serve {
    /// HTTP (auto-detected version) on a listener of this kind.
    Http(Listener),
    /// Opaque TCP to this cluster.
    Tcp(String),
}

/// How long a proxy fed by xDS holds new connections waiting for its first config.
const FIRST_CONFIG_WAIT: Duration = Duration::from_secs(10);

/// Accept on `listener` until the proxy drains.
pub(crate) fn spawn_accept(
    shared: Arc<Shared>,
    builders: Arc<Builders>,
    listener: TcpListener,
    serve: Serve,
) -> JoinHandle<()> {
    // Counted from before the task runs: a drain that starts first sees the loop, and the
    // loop sees the drain (the signal's value, not only its changes).
    let accepting = shared.drain.accepting();
    let mut drain = shared.drain.signal();
    tokio::spawn(async move {
        let _accepting = accepting;
        if *drain.borrow_and_update() {
            return;
        }
        // A proxy fed by xDS takes connections once its first config is in: until then they
        // wait in the kernel's backlog, rather than meet a proxy that knows no route (a
        // restarted callee's callers reconnect at once). Bounded: a control plane out of
        // reach leaves the proxy answering as it can.
        let mut synced = shared.synced.subscribe();
        if !*synced.borrow() {
            tokio::select! {
                _ = tokio::time::timeout(FIRST_CONFIG_WAIT, synced.wait_for(|s| *s)) => {}
                _ = drain.changed() => return,
            }
        }
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        // Counted here, not in its task: a drain that starts before that
                        // task runs waits for it.
                        let active = shared.drain.track();
                        let shared = shared.clone();
                        match &serve {
                            Serve::Tcp(cluster) => {
                                let cluster = cluster.clone();
                                tokio::spawn(async move {
                                    let _active = active;
                                    tcp::serve_bind(shared, cluster, stream).await;
                                })
                            }
                            Serve::Http(kind) => {
                                let (builders, kind) = (builders.clone(), kind.clone());
                                tokio::spawn(async move {
                                    let _active = active;
                                    accept(shared, builders, kind, stream, peer).await;
                                })
                            }
                        };
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = drain.changed() => break,
            }
        }
    })
}

/// Serve a connection accepted on an HTTP listener (see the module's doc).
async fn accept(
    shared: Arc<Shared>,
    builders: Arc<Builders>,
    listener: Listener,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let dst = match listener {
        Listener::Outbound | Listener::Inbound => original_dst(&stream),
        Listener::Bind { .. } => None,
    };
    match (listener, dst) {
        (Listener::Outbound, Some(dst)) => {
            let target = shared.state.load().vips.get(&dst).cloned();
            match target {
                Some((cluster, Protocol::Tcp)) => tcp::serve_bind(shared, cluster, stream).await,
                Some((cluster, _)) => {
                    let bind = Listener::Bind { cluster };
                    server::serve(shared, builders, bind, stream, peer, None).await
                }
                None => tcp::passthrough(shared, stream, dst).await,
            }
        }
        (Listener::Inbound, Some(dst)) => {
            let port = Some(dst.port());
            server::serve(shared, builders, Listener::Inbound, stream, peer, port).await
        }
        (listener, _) => server::serve(shared, builders, listener, stream, peer, None).await,
    }
}
