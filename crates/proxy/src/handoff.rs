//! Upgrading the proxy in place: a new process (a new binary) takes over the listening
//! sockets of the running one, passed over a Unix socket (`SCM_RIGHTS`), as HAProxy's
//! `expose-fd listeners` and Envoy's hot restart do. The kernel keeps one accept queue per
//! socket, so no connection is refused and none waiting in a backlog is lost: both processes
//! accept from the same sockets until the new one has its config, then the old one stops
//! accepting and drains what it holds.
//!
//! The exchange, on a stream socket at the path both processes are given (`--handoff`):
//! 1. the new process connects; the running one sends a length (`u32`, big-endian) and a JSON
//!    [`Offer`], with every socket it offers attached, in the offer's order;
//! 2. the new process binds what it was not handed, takes its first config (or waits
//!    [`READY_WAIT`]), and sends one byte, [`READY`];
//! 3. the old process stops accepting and drains; the new one answers at the path from then
//!    on, for the next upgrade.
//!
//! A new process that fails, or goes away before step 2, leaves the old one serving as before.
//! Only a process of the same user may connect (the socket is `0600` and the peer's
//! credentials are checked), and a new process takes sockets only from one of its own user.
//! SIGUSR2 makes a running proxy start its successor itself (`run`), for service managers.

use std::{
    collections::BTreeMap,
    io::{IoSlice, IoSliceMut, Read, Write},
    mem::MaybeUninit,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

/// The byte the new process sends once it serves.
const READY: u8 = b'R';

/// How long the new process waits for its first config before it tells the old one to stop
/// (the same bound as a fresh proxy's listeners wait for it).
pub(crate) const READY_WAIT: Duration = Duration::from_secs(10);

/// How long the running process waits for a new one to be ready before it gives up on it.
const TAKEOVER_WAIT: Duration = Duration::from_secs(60);

/// The most sockets one offer carries.
const MAX_SOCKETS: usize = 64;

/// The largest offer, in bytes.
const MAX_OFFER: usize = 64 * 1024;

/// An upgrade could not be made.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The exchange failed.
    #[error("handoff at {}: {what}: {source}", path.display())]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// The step.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The running process sent something else than an offer.
    #[error("handoff at {}: {source}", path.display())]
    Protocol {
        /// The socket's path.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: std::io::Error,
    },
}

/// What the running process hands over: the sockets' names (with their descriptors attached
/// in this order) and what its owner adds (an agent's health verdict).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Offer {
    /// The running process's id.
    pub pid: u32,
    /// Names of the attached sockets, in order.
    pub sockets: Vec<String>,
    /// What the process's owner passes on.
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// The sockets a running process offers to its successor, by name: duplicates of the
/// listeners' descriptors, added as they are bound and removed as they close (a closed
/// listener's socket must not live on here).
#[derive(Clone, Default)]
pub struct Offered {
    sockets: Arc<Mutex<BTreeMap<String, OwnedFd>>>,
    extra: Arc<Mutex<serde_json::Value>>,
    /// What is passed on as read when the offer is made (state that changes all the time).
    live: Arc<Mutex<Vec<(String, Provider)>>>,
}

/// Set `key` of what is passed on (an object, made one if it is not yet).
fn put(extra: &mut serde_json::Value, key: &str, value: serde_json::Value) {
    if !extra.is_object() {
        *extra = serde_json::json!({});
    }
    extra[key] = value;
}

/// Reads a value to pass on when an offer is made.
type Provider = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

impl Offered {
    /// Offer `socket` as `name` (a duplicate of its descriptor is kept).
    pub fn add(&self, name: &str, socket: impl AsFd) -> std::io::Result<()> {
        let fd = socket.as_fd().try_clone_to_owned()?;
        self.lock().insert(name.to_string(), fd);
        Ok(())
    }

    /// Stop offering `name`.
    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    /// Pass `value` on as `key` with the sockets (replacing what was passed as `key`).
    pub fn pass_on(&self, key: &str, value: serde_json::Value) {
        put(
            &mut self.extra.lock().unwrap_or_else(|p| p.into_inner()),
            key,
            value,
        );
    }

    /// Pass on what `read` says when the offer is made, as `key`.
    pub(crate) fn pass_on_live(
        &self,
        key: &str,
        read: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|(k, _)| k != key);
        live.push((key.to_string(), Box::new(read)));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, OwnedFd>> {
        self.sockets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Send the offer on `conn`.
    fn send(&self, conn: &UnixStream) -> std::io::Result<usize> {
        let sockets = self.lock();
        let (names, fds): (Vec<String>, Vec<_>) = sockets
            .iter()
            .take(MAX_SOCKETS)
            .map(|(n, fd)| (n.clone(), fd.as_fd()))
            .unzip();
        let fixed = self.extra.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut extra = fixed.clone();
        for (key, read) in self.live.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            put(&mut extra, key, read());
        }
        let mut offer = Offer {
            pid: std::process::id(),
            sockets: names,
            extra,
        };
        let mut body = serde_json::to_vec(&offer).map_err(std::io::Error::other)?;
        if body.len() > MAX_OFFER {
            // The successor would refuse the whole offer: the upgrade goes on without what
            // is passed on live (state it can rebuild), not without the sockets.
            tracing::warn!(
                bytes = body.len(),
                max = MAX_OFFER,
                "the offer is too large with its live state; handing over without it"
            );
            offer.extra = fixed;
            body = serde_json::to_vec(&offer).map_err(std::io::Error::other)?;
        }
        let len = (body.len() as u32).to_be_bytes();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !cmsg.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(std::io::Error::other("too many sockets to hand over"));
        }
        let iov = [IoSlice::new(&len), IoSlice::new(&body)];
        let mut sent = rustix::net::sendmsg(conn, &iov, &mut cmsg, SendFlags::NOSIGNAL)?;
        // The descriptors went with the first byte; the rest is plain data.
        let all = [&len[..], &body[..]].concat();
        while sent < all.len() {
            sent += (&*conn).write(&all[sent..])?;
        }
        Ok(fds.len())
    }
}

/// What a new process took over from the running one.
pub struct Inherited {
    path: PathBuf,
    conn: UnixStream,
    sockets: BTreeMap<String, OwnedFd>,
    /// The offer (the old process's id, what its owner passed on).
    pub offer: Offer,
}

impl Inherited {
    /// The TCP listener handed over as `name`, if it listens where `addr` asks (the same
    /// address, or the same IP with any port when `addr`'s port is 0). One that listens
    /// elsewhere is closed: the new process was configured to move it.
    pub(crate) fn take_tcp(
        &mut self,
        name: &str,
        addr: SocketAddr,
    ) -> Option<std::net::TcpListener> {
        let l = self.take_bound(name, addr, std::net::TcpListener::local_addr)?;
        l.set_nonblocking(true).ok()?;
        Some(l)
    }

    /// The socket handed over as `name`, as an `S` (a listener, a UDP socket), if it is bound
    /// where `addr` asks, as [`Inherited::take_tcp`] says; `local_addr` reads where it is.
    pub fn take_bound<S: From<OwnedFd>>(
        &mut self,
        name: &str,
        addr: SocketAddr,
        local_addr: impl Fn(&S) -> std::io::Result<SocketAddr>,
    ) -> Option<S> {
        let s = S::from(self.sockets.remove(name)?);
        let at = local_addr(&s).ok()?;
        let fits = at.ip() == addr.ip() && (addr.port() == 0 || addr.port() == at.port());
        if !fits {
            tracing::info!(name, was = %at, now = %addr, "a handed-over socket moved; binding anew");
        }
        fits.then_some(s)
    }

    /// Tell the old process to stop accepting, and close what was handed over and not
    /// taken (listeners the new config does not have).
    pub fn finish(self) -> Result<(), HandoffError> {
        let mut conn = &self.conn;
        conn.write_all(&[READY])
            .map_err(|source| HandoffError::Io {
                path: self.path.clone(),
                what: "telling the running process to stop",
                source,
            })?;
        if !self.sockets.is_empty() {
            tracing::info!(closed = ?self.sockets.keys().collect::<Vec<_>>(), "handed-over sockets the new config does not use closed");
        }
        Ok(())
    }
}

/// Take over from the process answering at `path`, if one does: `None` when none does (no
/// socket there, or a stale one).
pub async fn take_over(path: &Path) -> Result<Option<Inherited>, HandoffError> {
    let path = path.to_path_buf();
    let mut tries = 0;
    loop {
        let p = path.clone();
        let got = tokio::task::spawn_blocking(move || take_over_blocking(p))
            .await
            .map_err(|e| HandoffError::Io {
                path: path.clone(),
                what: RECEIVING,
                source: std::io::Error::other(e.to_string()),
            })?;
        match got {
            // A process that is exiting may still accept and then close without an offer:
            // asked again a moment later, it is gone (refused) or answers.
            Err(HandoffError::Io {
                what: RECEIVING,
                source,
                ..
            }) if tries < EXITING_TRIES && closed_early(&source) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            done => return done,
        }
    }
}

const RECEIVING: &str = "receiving the sockets";

fn take_over_blocking(path: PathBuf) -> Result<Option<Inherited>, HandoffError> {
    let io = |what: &'static str| {
        let path = path.clone();
        move |source| HandoffError::Io { path, what, source }
    };
    let conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io("connecting")(e)),
    };
    // Sockets are taken only from a process of this user.
    let peer =
        rustix::net::sockopt::socket_peercred(&conn).map_err(|e| io("connecting")(e.into()))?;
    if peer.uid != rustix::process::getuid() {
        let e = std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "the process answering is another user's (uid {})",
                peer.uid.as_raw()
            ),
        );
        return Err(io("connecting")(e));
    }
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io("connecting"))?;
    let (body, fds) = receive(&conn).map_err(io(RECEIVING))?;
    let offer: Offer = serde_json::from_slice(&body).map_err(|e| HandoffError::Protocol {
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    if offer.sockets.len() != fds.len() {
        return Err(HandoffError::Protocol {
            path,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} names for {} sockets", offer.sockets.len(), fds.len()),
            ),
        });
    }
    let sockets = offer.sockets.iter().cloned().zip(fds).collect();
    tracing::info!(from = offer.pid, sockets = ?offer.sockets, "taking over from the running proxy");
    Ok(Some(Inherited {
        path,
        conn,
        sockets,
        offer,
    }))
}

/// How many times a process that closed without an offer is asked again (100 ms apart).
const EXITING_TRIES: u32 = 50;

/// The other end closed before it sent an offer (it was exiting).
fn closed_early(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::BrokenPipe
    )
}

/// Read one offer: its bytes and the descriptors that came with them.
fn receive(conn: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut fds = Vec::new();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
        let mut cmsg = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let r = rustix::net::recvmsg(conn, &mut iov, &mut cmsg, RecvFlags::CMSG_CLOEXEC)?;
        for m in cmsg.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds.extend(received);
            }
        }
        if r.bytes == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..r.bytes]);
        if got.len() >= 4 {
            let len = u32::from_be_bytes([got[0], got[1], got[2], got[3]]) as usize;
            if len > MAX_OFFER {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("an offer of {len} bytes"),
                ));
            }
            if got.len() >= 4 + len {
                got.drain(..4);
                got.truncate(len);
                return Ok((got, fds));
            }
        }
    }
}

/// Listen at `path` for a successor (only this user may connect). A socket file left there
/// (a stale one, or the predecessor's) is replaced.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, HandoffError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |what: &'static str| {
        let path = path.to_path_buf();
        move |source| HandoffError::Io { path, what, source }
    };
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).map_err(io("binding"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("restricting"))?;
    Ok(listener)
}

/// Answer on `listener` until a new process has taken over (its process id), offering what
/// `offered` holds.
pub async fn serve(listener: tokio::net::UnixListener, offered: Offered) -> std::io::Result<u32> {
    let uid = rustix::process::getuid();
    loop {
        let (conn, _) = listener.accept().await?;
        match rustix::net::sockopt::socket_peercred(&conn) {
            Ok(c) if c.uid == uid => {}
            other => {
                tracing::warn!(peer = ?other.map(|c| (c.pid, c.uid)), "handoff refused: another user");
                continue;
            }
        }
        let conn = conn.into_std()?;
        let offered = offered.clone();
        let done = tokio::task::spawn_blocking(move || hand_over(conn, &offered)).await;
        match done {
            Ok(Ok(pid)) => return Ok(pid),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "a new process did not take over; serving on")
            }
            Err(e) => tracing::warn!(error = %e, "handoff failed; serving on"),
        }
    }
}

/// Offer the sockets on `conn` and wait for the new process to be ready: its process id.
fn hand_over(conn: UnixStream, offered: &Offered) -> std::io::Result<u32> {
    conn.set_nonblocking(false)?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let peer = rustix::net::sockopt::socket_peercred(&conn)
        .map(|c| c.pid.as_raw_nonzero().get() as u32)
        .unwrap_or(0);
    let n = offered.send(&conn)?;
    tracing::info!(
        to = peer,
        sockets = n,
        "sockets handed to a new process; waiting for it to be ready"
    );
    conn.set_read_timeout(Some(TAKEOVER_WAIT))?;
    let mut b = [0u8; 1];
    match (&conn).read(&mut b)? {
        1 if b[0] == READY => Ok(peer),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "it went away before it was ready",
        )),
    }
}

#[cfg(test)]
mod tests;
