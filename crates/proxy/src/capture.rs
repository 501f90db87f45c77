//! Transparent capture. The agent's iptables rules REDIRECT an application's outbound TCP to
//! the outbound listener and connections to its ports to the inbound listener; the address the
//! application (or its caller) meant is read back with `SO_ORIGINAL_DST`. The proxy's own
//! upstream sockets carry `SO_MARK`, which the rules let pass.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpSocket, TcpStream};
use trellis_model::resource::Protocol;

use crate::{
    http::server::{self, Builders, Listener},
    tcp, Shared,
};

/// The destination a REDIRECTed connection was addressed to; `None` when it was not
/// redirected (it came to the listener's own address, or conntrack does not know it).
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let sock = socket2::SockRef::from(stream);
    let dst = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    let dst = dst.ok()?.as_socket()?;
    (dst != local).then_some(dst)
}

/// Connect to `addr`, with `SO_MARK` set first when `mark` is given.
pub async fn connect(addr: SocketAddr, mark: Option<u32>) -> std::io::Result<TcpStream> {
    let Some(mark) = mark else {
        return TcpStream::connect(addr).await;
    };
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket2::SockRef::from(&sock).set_mark(mark)?;
    sock.connect(addr).await
}

/// Serve a connection accepted on an HTTP listener: a captured outbound connection goes to
/// the service whose virtual IP it was addressed to (as an explicit bind of that service port
/// would), or through as addressed; a captured inbound one to the local port it was meant
/// for; anything else is served as the listener's own.
pub(crate) async fn accept(
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
            server::serve(
                shared,
                builders,
                Listener::Inbound,
                stream,
                peer,
                Some(dst.port()),
            )
            .await
        }
        (listener, _) => server::serve(shared, builders, listener, stream, peer, None).await,
    }
}
