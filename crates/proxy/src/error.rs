//! The data plane's one error type, in the spirit of pingora's: what the proxy was doing
//! ([`Kind`]), the cause chain, and, decided once when the error is made, its failure class,
//! the side that caused it and whether another try may help.
//!
//! Errors are made where a failure happens, with the addresses an operator needs; nothing
//! downstream of that re-classifies them. [`classify`] is the only place that reads causes:
//! it walks the source chain through hyper, h2, rustls, I/O and the proxy's own HTTP/1.1
//! errors, so that a nested cause is classified by what really happened (a timeout inside
//! hyper inside a body error is still a timeout).

use std::{borrow::Cow, error::Error as StdError, fmt, io};

pub(crate) use trellis_taxonomy::{FailureClass, Side};

use crate::h1::{server::BodyError, H1Error};

/// A boxed cause.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

/// What the proxy was doing when it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The client's request is malformed (bad head, framing or size).
    BadRequest,
    /// The client did not finish its request head in time.
    HeadTimeout,
    /// The client went away.
    ClientGone,
    /// No service or route for the request.
    NoRoute,
    /// The route picked a backend that does not resolve (no such Service or port): answered
    /// 500, or UNAVAILABLE for gRPC, as the Gateway API asks for its share of the requests.
    UnresolvedBackend,
    /// An authorization policy refused it.
    Denied,
    /// Plaintext to a port that requires mutual TLS.
    PlaintextRefused,
    /// The inbound mutual-TLS handshake failed (the caller's certificate, or no TLS at all).
    InboundTls,
    /// A circuit breaker or the cluster's connection limit refused it.
    Overloaded,
    /// Over a rate limit of the service's RateLimitPolicy.
    RateLimited,
    /// No endpoint to send to.
    NoEndpoint,
    /// TCP connect to the upstream failed.
    Connect,
    /// TCP connect to the upstream timed out.
    ConnectTimeout,
    /// The mutual-TLS handshake with a peer's proxy failed.
    Tls,
    /// This proxy has no identity, and the upstream requires mutual TLS.
    NoIdentity,
    /// The HTTP/2 handshake with the upstream failed.
    Handshake,
    /// Sending the request or reading the response head failed.
    Exchange,
    /// Reading the response body failed.
    ResponseBody,
    /// The route's deadline passed.
    Timeout,
    /// The upstream sent nothing for the idle timeout.
    Idle,
    /// The upstream broke the protocol (an unasked-for protocol switch).
    Protocol,
    /// The peer's proxy answered for its side with this class (`x-trellis-failure`).
    PeerProxy(FailureClass),
    /// A fault injected by the route (`trellis.dev/Fault`): this HTTP status, or this gRPC
    /// status for a gRPC request.
    Injected {
        /// HTTP status.
        status: u16,
        /// gRPC status.
        grpc: u32,
        /// An injected delay outlasted the try's time limit: retried as a timeout is.
        timeout: bool,
    },
}

/// A failure on the request path.
#[derive(Debug)]
pub(crate) struct Error {
    kind: Kind,
    class: FailureClass,
    side: Side,
    retryable: bool,
    status: Option<u16>,
    context: Cow<'static, str>,
    cause: Option<BoxError>,
}

impl Error {
    /// A failure of `kind`; `context` says where (addresses, names), for the operator.
    pub(crate) fn new(kind: Kind, context: impl Into<Cow<'static, str>>) -> Self {
        Self::build(kind, context.into(), None)
    }

    /// A failure of `kind` caused by `cause`.
    pub(crate) fn with_cause(
        kind: Kind,
        context: impl Into<Cow<'static, str>>,
        cause: impl Into<BoxError>,
    ) -> Self {
        Self::build(kind, context.into(), Some(cause.into()))
    }

    fn build(kind: Kind, context: Cow<'static, str>, cause: Option<BoxError>) -> Self {
        let class = classify(
            kind,
            cause.as_deref().map(|c| c as &(dyn StdError + 'static)),
        );
        let side = match (kind, class.side()) {
            (Kind::NoIdentity, _) => Side::Proxy,
            // The caller's certificate (or its lack of TLS) failed the handshake.
            (Kind::InboundTls, _) => Side::Downstream,
            (_, Some(s)) => s,
            (_, None) => Side::Proxy,
        };
        let retryable = match kind {
            Kind::PeerProxy(c) => peer_retryable(c),
            Kind::Injected { timeout, .. } => timeout,
            _ => side == Side::Upstream && class.retriable(),
        };
        let status = match kind {
            Kind::Injected { status, .. } => Some(status),
            Kind::UnresolvedBackend => Some(500),
            _ => None,
        };
        Self {
            kind,
            class,
            side,
            retryable,
            status,
            context,
            cause,
        }
    }

    /// The status of the proxy's answer, when not the class's usual one (431, 501, 408).
    pub(crate) fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// What the proxy was doing.
    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    /// The failure class.
    pub(crate) fn class(&self) -> FailureClass {
        self.class
    }

    /// Who caused it.
    pub(crate) fn side(&self) -> Side {
        self.side
    }

    /// Whether another try, on another endpoint, may succeed.
    pub(crate) fn retryable(&self) -> bool {
        self.retryable
    }

    /// The status of a response the proxy makes for this failure.
    pub(crate) fn status(&self) -> u16 {
        self.status.unwrap_or_else(|| self.class.status())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)?;
        if let Some(c) = &self.cause {
            write!(f, ": {c}")?;
            // The deepest cause often says what really happened (os error, TLS alert).
            let mut cur = c.source();
            let mut last = None;
            while let Some(e) = cur {
                last = Some(e);
                cur = e.source();
            }
            if let Some(e) = last {
                let (outer, inner) = (c.to_string(), e.to_string());
                if !outer.contains(&inner) {
                    write!(f, " ({inner})")?;
                }
            }
        }
        Ok(())
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.cause
            .as_deref()
            .map(|c| c as &(dyn StdError + 'static))
    }
}

/// Whether an answer a peer's proxy made for its side, with class `c`, may be retried on
/// another endpoint: the far hop failed before the application saw the request, or refused
/// it for reasons of its own host (overload, no local endpoint, a port it lacks).
pub(crate) fn peer_retryable(c: FailureClass) -> bool {
    c.retriable()
        || matches!(
            c,
            FailureClass::Overloaded | FailureClass::NoHealthyUpstream | FailureClass::NoRoute
        )
}

/// The class of a failure of `kind` caused by `cause`: the one place causes are read.
pub(crate) fn classify(kind: Kind, cause: Option<&(dyn StdError + 'static)>) -> FailureClass {
    use FailureClass as F;
    match kind {
        Kind::BadRequest | Kind::HeadTimeout => F::ClientError,
        Kind::ClientGone => F::ClientDisconnect,
        Kind::NoRoute | Kind::UnresolvedBackend => F::NoRoute,
        Kind::Denied | Kind::PlaintextRefused => F::Denied,
        Kind::InboundTls | Kind::Tls | Kind::NoIdentity => F::TlsError,
        Kind::Overloaded => F::Overloaded,
        Kind::RateLimited => F::RateLimited,
        Kind::NoEndpoint => F::NoHealthyUpstream,
        Kind::ConnectTimeout => F::ConnectTimeout,
        Kind::Timeout | Kind::Idle => F::UpstreamTimeout,
        Kind::Protocol => F::ProtocolError,
        Kind::PeerProxy(c) => c,
        Kind::Injected { .. } => F::Injected,
        Kind::Connect | Kind::Handshake | Kind::Exchange | Kind::ResponseBody => cause
            .and_then(|c| from_chain(kind, c))
            .unwrap_or(match kind {
                Kind::Connect => F::ConnectRefused,
                _ => F::ConnectionReset,
            }),
    }
}

/// The most specific class found along the source chain. hyper's own predicates are a
/// fallback: its errors usually wrap the cause that tells more.
fn from_chain(kind: Kind, err: &(dyn StdError + 'static)) -> Option<FailureClass> {
    use FailureClass as F;
    let mut fallback = None;
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(e) = e.downcast_ref::<Error>() {
            return Some(e.class);
        }
        if let Some(e) = e.downcast_ref::<H1Error>() {
            match e {
                H1Error::Io(io) => return Some(from_io(kind, io)),
                H1Error::Closed(_) => return Some(F::ConnectionReset),
                H1Error::TimedOut => return Some(F::UpstreamTimeout),
                H1Error::Parse(_) => return Some(F::ProtocolError),
                // The client's body, read while sending it upstream: the client's failure.
                H1Error::Body(inner) => {
                    return Some(from_chain(kind, inner.as_ref()).unwrap_or(F::ClientDisconnect))
                }
            }
        }
        if e.downcast_ref::<BodyError>().is_some() {
            return Some(F::ClientDisconnect);
        }
        if e.downcast_ref::<rustls::Error>().is_some() {
            return Some(F::TlsError);
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            // rustls reports through I/O errors that carry its own.
            if let Some(inner) = io.get_ref() {
                if inner.downcast_ref::<rustls::Error>().is_some() {
                    return Some(F::TlsError);
                }
                if let Some(c) = from_chain(kind, inner) {
                    return Some(c);
                }
            }
            return Some(from_io(kind, io));
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if !h2.is_io() {
                let protocol = matches!(
                    h2.reason(),
                    Some(
                        h2::Reason::PROTOCOL_ERROR
                            | h2::Reason::COMPRESSION_ERROR
                            | h2::Reason::FRAME_SIZE_ERROR
                            | h2::Reason::HTTP_1_1_REQUIRED
                    )
                );
                return Some(if protocol && !h2.is_remote() {
                    F::ProtocolError
                } else {
                    // RST_STREAM and GOAWAY: the stream was torn down by the peer.
                    F::ConnectionReset
                });
            }
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if fallback.is_none() {
                fallback = if h.is_parse() || h.is_parse_status() {
                    Some(F::ProtocolError)
                } else if h.is_timeout() {
                    Some(F::UpstreamTimeout)
                } else if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                    Some(F::ConnectionReset)
                } else {
                    None
                };
            }
        }
        cur = e.source();
    }
    fallback
}

/// The class of an I/O error met while doing `kind`.
fn from_io(kind: Kind, e: &io::Error) -> FailureClass {
    use io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused | K::HostUnreachable | K::NetworkUnreachable | K::AddrNotAvailable => {
            FailureClass::ConnectRefused
        }
        K::TimedOut if kind == Kind::Connect => FailureClass::ConnectTimeout,
        K::TimedOut => FailureClass::UpstreamTimeout,
        K::InvalidData => FailureClass::ProtocolError,
        _ => FailureClass::ConnectionReset,
    }
}

/// The class of an I/O error on a spliced TCP connection.
pub(crate) fn io_class(e: &io::Error) -> FailureClass {
    from_io(Kind::Exchange, e)
}

#[cfg(test)]
mod tests;
