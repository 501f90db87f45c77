//! Sockets: connecting upstream (with a timeout, Nagle off, and `SO_MARK` so that capture
//! rules let the proxy's own connections pass), reading a captured connection's original
//! destination (`SO_ORIGINAL_DST`, set by the agent's iptables REDIRECT), and handing bytes
//! already read to a stream's reader.

use std::{io, net::SocketAddr, time::Duration};

use bytes::{Buf, Bytes};
use tokio::{
    io::ReadBuf,
    net::{TcpSocket, TcpStream},
};

/// Move as much of `held` (bytes a stream has read and not yet handed on) into `out` as fits:
/// how many.
pub(crate) fn read_held(held: &mut Bytes, out: &mut ReadBuf<'_>) -> usize {
    let n = held.len().min(out.remaining());
    out.put_slice(&held[..n]);
    held.advance(n);
    n
}

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
pub async fn connect(addr: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
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

/// Why a connect failed.
#[derive(Debug)]
pub enum ConnectFailure {
    /// The kernel said no (refused, unreachable, ...).
    Io(io::Error),
    /// No answer within the timeout.
    TimedOut(Duration),
}

/// Connect with a timeout, Nagle off, and the socket marked with `mark` when given.
pub async fn connect_timeout(
    addr: SocketAddr,
    timeout: Duration,
    mark: Option<u32>,
) -> Result<TcpStream, ConnectFailure> {
    match tokio::time::timeout(timeout, connect(addr, mark)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(ConnectFailure::Io(e)),
        Err(_) => Err(ConnectFailure::TimedOut(timeout)),
    }
}
