//! The failure taxonomy: every request and connection ends with exactly one class.
//!
//! Errors are classified once, here, by walking their source chain; the class then decides
//! the status of a proxy-made response, the metric label and the access-log field.

use std::{error::Error as StdError, io};

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// How a request or connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// Success.
    Ok,
    /// The upstream answered 5xx.
    AppError,
    /// The upstream answered a gRPC status that signals a server fault.
    AppGrpcError,
    /// Connection refused (or host unreachable).
    ConnectRefused,
    /// TCP connect did not complete in time.
    ConnectTimeout,
    /// The upstream reset or closed the connection mid-exchange.
    ConnectionReset,
    /// TLS handshake or verification failed.
    TlsError,
    /// No endpoint to send to (none configured or all ejected).
    NoHealthyUpstream,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The upstream spoke something other than the expected protocol.
    ProtocolError,
    /// Circuit open, concurrency or rate limit.
    Overloaded,
    /// Refused by authorization policy.
    Denied,
    /// No service or route matched.
    NoRoute,
    /// The upstream answered 4xx (or the client sent a bad request).
    ClientError,
    /// The client went away before the exchange completed.
    ClientDisconnect,
}

impl FailureClass {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::AppError => "app_error",
            Self::AppGrpcError => "app_grpc_error",
            Self::ConnectRefused => "connect_refused",
            Self::ConnectTimeout => "connect_timeout",
            Self::ConnectionReset => "connection_reset",
            Self::TlsError => "tls_error",
            Self::NoHealthyUpstream => "no_healthy_upstream",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::ProtocolError => "protocol_error",
            Self::Overloaded => "overloaded",
            Self::Denied => "denied",
            Self::NoRoute => "no_route",
            Self::ClientError => "client_error",
            Self::ClientDisconnect => "client_disconnect",
        }
    }

    /// The category of design.md's taxonomy.
    pub fn category(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::AppError | Self::AppGrpcError => "application",
            Self::Overloaded | Self::Denied | Self::NoRoute => "policy",
            Self::ClientError | Self::ClientDisconnect => "client",
            _ => "network",
        }
    }

    /// Status of a response the proxy makes up itself for this class.
    pub fn status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Self::ConnectRefused | Self::ConnectionReset | Self::ProtocolError | Self::TlsError => {
                S::BAD_GATEWAY
            }
            Self::NoHealthyUpstream | Self::Overloaded => S::SERVICE_UNAVAILABLE,
            Self::ConnectTimeout | Self::UpstreamTimeout => S::GATEWAY_TIMEOUT,
            Self::Denied => S::FORBIDDEN,
            Self::NoRoute => S::NOT_FOUND,
            Self::ClientError | Self::ClientDisconnect => S::BAD_REQUEST,
            Self::Ok | Self::AppError | Self::AppGrpcError => S::BAD_GATEWAY,
        }
    }

    /// gRPC status of a proxy-made trailers-only response.
    pub fn grpc_status(self) -> u32 {
        match self {
            Self::ConnectTimeout | Self::UpstreamTimeout => 4, // DEADLINE_EXCEEDED
            Self::Denied => 7,                                 // PERMISSION_DENIED
            Self::NoRoute => 12,                               // UNIMPLEMENTED
            Self::Overloaded => 14,                            // UNAVAILABLE
            Self::ClientError | Self::ClientDisconnect => 3,   // INVALID_ARGUMENT
            _ => 14,                                           // UNAVAILABLE
        }
    }

    /// Whether another try may help: the failure was in reaching or hearing from one
    /// endpoint. (`NoHealthyUpstream` is not: another pick would find none either.)
    pub fn retriable(self) -> bool {
        matches!(
            self,
            Self::ConnectRefused
                | Self::ConnectTimeout
                | Self::ConnectionReset
                | Self::UpstreamTimeout
        )
    }

    /// Class of an upstream HTTP status.
    pub fn from_status(status: u16) -> Self {
        match status {
            500..=599 => Self::AppError,
            400..=499 => Self::ClientError,
            _ => Self::Ok,
        }
    }

    /// Class of a gRPC status code seen in a response.
    pub fn from_grpc(code: u32) -> Self {
        match code {
            0 => Self::Ok,
            // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS
            2 | 4 | 12 | 13 | 14 | 15 => Self::AppGrpcError,
            _ => Self::ClientError,
        }
    }
}

impl EncodeLabelValue for FailureClass {
    fn encode(&self, e: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(e, self.as_str())
    }
}

/// The `grpc-status` in response headers or trailers, if any.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers
        .get(&crate::http::GRPC_STATUS)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Classify an error from talking to an upstream (send, or reading the response body).
pub fn classify(err: &(dyn StdError + 'static)) -> FailureClass {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return classify_io(io);
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_parse_status() {
                return FailureClass::ProtocolError;
            }
            if h.is_timeout() {
                return FailureClass::UpstreamTimeout;
            }
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return FailureClass::ConnectionReset;
            }
        }
        cur = e.source();
    }
    // hyper's h2 errors (RST_STREAM, GOAWAY) land here: the stream was torn down.
    FailureClass::ConnectionReset
}

/// Classify an I/O error.
pub fn classify_io(e: &io::Error) -> FailureClass {
    use io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused | K::HostUnreachable | K::NetworkUnreachable | K::AddrNotAvailable => {
            FailureClass::ConnectRefused
        }
        K::TimedOut => FailureClass::ConnectTimeout,
        K::InvalidData => FailureClass::ProtocolError,
        _ => FailureClass::ConnectionReset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_classify() {
        let e = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(classify(&e), FailureClass::ConnectRefused);
        let e = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(classify(&e), FailureClass::ConnectionReset);
        assert_eq!(FailureClass::from_grpc(14), FailureClass::AppGrpcError);
        assert_eq!(FailureClass::from_grpc(5), FailureClass::ClientError);
        assert_eq!(FailureClass::UpstreamTimeout.status(), 504);
    }
}
