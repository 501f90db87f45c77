use std::{error::Error as _, io, time::Duration};

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::h1::{codec::ParseError, server::BodyError};

fn class_of(kind: Kind, cause: impl Into<BoxError>) -> Error {
    Error::with_cause(kind, "test", cause)
}

/// A wrapper with a source, as library errors nest theirs.
#[derive(Debug)]
struct Wrap(BoxError);

impl fmt::Display for Wrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("wrapped")
    }
}

impl StdError for Wrap {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(self.0.as_ref())
    }
}

#[test]
fn io_errors_by_what_was_being_done() {
    use io::ErrorKind as K;
    let e = |k: K| io::Error::from(k);
    assert_eq!(
        class_of(Kind::Connect, e(K::ConnectionRefused)).class(),
        FailureClass::ConnectRefused
    );
    assert_eq!(
        class_of(Kind::Connect, e(K::HostUnreachable)).class(),
        FailureClass::ConnectRefused
    );
    assert_eq!(
        class_of(Kind::Connect, e(K::TimedOut)).class(),
        FailureClass::ConnectTimeout
    );
    // A timeout on an established connection (keep-alive probes, retransmissions) is not
    // a connect timeout.
    assert_eq!(
        class_of(Kind::Exchange, e(K::TimedOut)).class(),
        FailureClass::UpstreamTimeout
    );
    assert_eq!(
        class_of(Kind::Exchange, e(K::ConnectionReset)).class(),
        FailureClass::ConnectionReset
    );
    assert_eq!(
        class_of(Kind::Exchange, e(K::BrokenPipe)).class(),
        FailureClass::ConnectionReset
    );
    assert_eq!(
        class_of(Kind::ResponseBody, e(K::InvalidData)).class(),
        FailureClass::ProtocolError
    );
    // Nested two deep.
    let nested = Wrap(Box::new(Wrap(Box::new(e(K::ConnectionRefused)))));
    assert_eq!(
        class_of(Kind::Connect, nested).class(),
        FailureClass::ConnectRefused
    );
}

#[test]
fn rustls_errors_are_tls_even_inside_io_errors() {
    let tls = || rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
    assert_eq!(
        class_of(Kind::Exchange, tls()).class(),
        FailureClass::TlsError
    );
    // tokio-rustls reports through an I/O error of kind InvalidData, which alone would
    // read as a protocol error.
    let io = io::Error::new(io::ErrorKind::InvalidData, tls());
    assert_eq!(class_of(Kind::Exchange, io).class(), FailureClass::TlsError);
    let e = Error::new(Kind::InboundTls, "handshake with 10.0.0.9:40000");
    assert_eq!(
        (e.class(), e.side()),
        (FailureClass::TlsError, Side::Downstream)
    );
    let e = Error::new(Kind::NoIdentity, "no identity");
    assert_eq!((e.class(), e.side()), (FailureClass::TlsError, Side::Proxy));
}

#[test]
fn the_proxys_own_http1_errors() {
    let closed = H1Error::Closed(true);
    assert_eq!(
        class_of(Kind::Exchange, closed).class(),
        FailureClass::ConnectionReset
    );
    let parse = H1Error::Parse(ParseError::ContentLength);
    assert_eq!(
        class_of(Kind::Exchange, parse).class(),
        FailureClass::ProtocolError
    );
    // The client's body failed while it was being sent upstream: the client's doing.
    let body = H1Error::Body(Box::new(BodyError::Closed));
    let e = class_of(Kind::Exchange, body);
    assert_eq!(e.class(), FailureClass::ClientDisconnect);
    assert_eq!(e.side(), Side::Downstream);
    assert!(!e.retryable(), "a client that left is not retried");
    // A body error of our own (a timeout cut the stream) keeps its class when nested.
    let inner = Error::new(Kind::Timeout, "route timeout");
    let e = class_of(Kind::ResponseBody, Wrap(Box::new(inner)));
    assert_eq!(e.class(), FailureClass::UpstreamTimeout);
}

#[test]
fn h2_resets_and_protocol_errors() {
    let refused = h2::Error::from(h2::Reason::REFUSED_STREAM);
    let e = class_of(Kind::Exchange, Wrap(Box::new(refused)));
    assert_eq!(e.class(), FailureClass::ConnectionReset);
    assert!(e.retryable(), "a refused stream was never processed");
    let protocol = h2::Error::from(h2::Reason::PROTOCOL_ERROR);
    assert_eq!(
        class_of(Kind::Exchange, protocol).class(),
        FailureClass::ProtocolError
    );
}

#[test]
fn kinds_without_cause_and_their_sides() {
    let cases = [
        (
            Kind::BadRequest,
            FailureClass::ClientError,
            Side::Downstream,
            false,
        ),
        (
            Kind::HeadTimeout,
            FailureClass::ClientError,
            Side::Downstream,
            false,
        ),
        (
            Kind::ClientGone,
            FailureClass::ClientDisconnect,
            Side::Downstream,
            false,
        ),
        (Kind::NoRoute, FailureClass::NoRoute, Side::Proxy, false),
        (Kind::Denied, FailureClass::Denied, Side::Proxy, false),
        (
            Kind::PlaintextRefused,
            FailureClass::Denied,
            Side::Proxy,
            false,
        ),
        (
            Kind::Overloaded,
            FailureClass::Overloaded,
            Side::Proxy,
            false,
        ),
        (
            Kind::NoEndpoint,
            FailureClass::NoHealthyUpstream,
            Side::Upstream,
            false,
        ),
        (
            Kind::ConnectTimeout,
            FailureClass::ConnectTimeout,
            Side::Upstream,
            true,
        ),
        (
            Kind::Timeout,
            FailureClass::UpstreamTimeout,
            Side::Upstream,
            true,
        ),
        (
            Kind::Idle,
            FailureClass::UpstreamTimeout,
            Side::Upstream,
            true,
        ),
        (
            Kind::Protocol,
            FailureClass::ProtocolError,
            Side::Upstream,
            false,
        ),
        (
            Kind::Connect,
            FailureClass::ConnectRefused,
            Side::Upstream,
            true,
        ),
    ];
    for (kind, class, side, retryable) in cases {
        let e = Error::new(kind, "x");
        assert_eq!(
            (e.class(), e.side(), e.retryable()),
            (class, side, retryable),
            "{kind:?}"
        );
    }
}

#[test]
fn a_peer_proxys_answer_keeps_its_class() {
    let e = Error::new(Kind::PeerProxy(FailureClass::ConnectRefused), "peer");
    assert_eq!(
        (e.class(), e.side()),
        (FailureClass::ConnectRefused, Side::Upstream)
    );
    assert!(
        e.retryable(),
        "the far app was never reached: another endpoint may serve"
    );
    for c in [
        FailureClass::Overloaded,
        FailureClass::NoHealthyUpstream,
        FailureClass::NoRoute,
    ] {
        assert!(peer_retryable(c), "{c}");
    }
    for c in [
        FailureClass::Denied,
        FailureClass::AppError,
        FailureClass::ClientError,
    ] {
        assert!(!peer_retryable(c), "{c}");
    }
}

#[test]
fn messages_name_the_place_and_the_root_cause() {
    let e = class_of(
        Kind::Connect,
        Wrap(Box::new(io::Error::from(io::ErrorKind::ConnectionRefused))),
    );
    let s = e.to_string();
    assert!(s.starts_with("test: wrapped"), "{s}");
    assert!(s.contains("refused"), "the root cause is said: {s}");
    assert!(e.source().is_some());
    assert_eq!(
        Error::new(Kind::HeadTimeout, "slow")
            .with_status(408)
            .status(),
        408
    );
    assert_eq!(Error::new(Kind::Denied, "no").status(), 403);
}

/// Send one request with hyper's HTTP/1.1 client to a "server" that answers `reply` and
/// closes; the error hyper gives.
async fn hyper_h1_error(reply: &'static [u8]) -> hyper::Error {
    let (client, mut server) = tokio::io::duplex(4096);
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(client))
            .await
            .unwrap();
    tokio::spawn(conn);
    tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        let _ = server.read(&mut buf).await;
        let _ = server.write_all(reply).await;
    });
    send.send_request(Request::new(Empty::new()))
        .await
        .unwrap_err()
}

#[tokio::test]
async fn hyper_errors_from_a_real_exchange() {
    let garbage = hyper_h1_error(b"SMTP ready\r\n\r\n").await;
    assert!(garbage.is_parse());
    assert_eq!(
        class_of(Kind::Exchange, garbage).class(),
        FailureClass::ProtocolError
    );
    let closed = hyper_h1_error(b"").await;
    assert_eq!(
        class_of(Kind::Exchange, closed).class(),
        FailureClass::ConnectionReset
    );
}

/// The proxy's own HTTP/2 client over `io`.
async fn h2_sender(
    io: tokio::io::DuplexStream,
    keepalive: Option<Duration>,
) -> crate::h2_client::H2Sender {
    crate::h2_client::handshake(io, keepalive, crate::test_util::slot())
        .await
        .unwrap()
}

fn h2_request() -> Request<crate::http::body::UpBody> {
    let mut req = Request::new(crate::http::body::UpBody::Empty);
    *req.uri_mut() = "http://peer/".parse().unwrap();
    req
}

#[tokio::test]
async fn a_stream_reset_by_a_real_h2_peer_is_a_connection_reset() {
    let (client, server) = tokio::io::duplex(64 << 10);
    tokio::spawn(async move {
        let mut conn = h2::server::handshake(server).await.unwrap();
        while let Some(Ok((_req, mut respond))) = conn.accept().await {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
        }
    });
    let send = h2_sender(client, None).await;
    let Err(err) = send.send(h2_request()).await else {
        panic!("the stream was reset")
    };
    assert!(err.unsent.is_none(), "the request went out");
    let e = class_of(Kind::Exchange, err.error);
    assert_eq!(e.class(), FailureClass::ConnectionReset, "{e}");
    assert!(e.retryable());
}

#[tokio::test(start_paused = true)]
async fn a_keepalive_that_goes_unanswered_closes_the_connection_and_fails_its_requests() {
    // A peer that completes the handshake, then never answers again (a cut link).
    let (client, server) = tokio::io::duplex(64 << 10);
    let _server = tokio::spawn(async move {
        let _conn = h2::server::handshake(server).await.unwrap();
        std::future::pending::<()>().await;
    });
    let send = h2_sender(client, Some(Duration::from_secs(10))).await;
    let start = tokio::time::Instant::now();
    let Err(err) = send.clone().send(h2_request()).await else {
        panic!("the peer never answers")
    };
    // One interval to the PING, one for its answer.
    assert_eq!(start.elapsed(), Duration::from_secs(20));
    let e = class_of(Kind::Exchange, err.error);
    assert_eq!(
        e.class().category(),
        trellis_taxonomy::Category::Network,
        "{e}"
    );
    assert!(send.is_closed());
    // A request on the closed connection comes back unsent, for a try elsewhere.
    let Err(err) = send.send(h2_request()).await else {
        panic!("the connection is closed")
    };
    assert!(err.unsent.is_some(), "{}", err.error);
}
