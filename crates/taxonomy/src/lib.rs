//! The failure taxonomy of design.md: every request (L7) and every connection (L4) ends with
//! exactly one [`FailureClass`]; each class belongs to one [`Category`] (the answer to
//! "network or application?"), and each failure to one [`Side`] (who caused it).
//!
//! The proxy labels its records with these; the control plane and the CLI aggregate and
//! diagnose by them, so the names here are a wire contract: they appear in access logs,
//! metric labels, the `x-trellis-failure` header and reports.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// How a request or connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// Success.
    Ok,
    /// The application answered 5xx.
    AppError,
    /// The application answered a gRPC status that signals a server fault.
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
    /// The upstream did not answer (or went silent) in time.
    UpstreamTimeout,
    /// The upstream spoke something other than the expected protocol.
    ProtocolError,
    /// Circuit open, or a concurrency limit.
    Overloaded,
    /// Over a rate limit (its caller's share, or the total).
    RateLimited,
    /// Refused by authorization policy (or plaintext refused under STRICT mutual TLS).
    Denied,
    /// No service or route matched.
    NoRoute,
    /// The upstream answered 4xx, or the client sent a bad request.
    ClientError,
    /// The client went away before the exchange completed.
    ClientDisconnect,
    /// A fault the mesh injected on purpose (a route's `trellis.dev/Fault` filter): neither
    /// the network's nor the application's.
    Injected,
}

/// The categories of the taxonomy: what an operator asks first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Success.
    Ok,
    /// The application answered with an error.
    Application,
    /// The network (or a peer's transport) failed: refused, reset, timed out, TLS.
    Network,
    /// The mesh's own policy refused: overload, authorization, no route.
    Policy,
    /// The client erred or went away.
    Client,
}

/// Who caused a failure, seen from the proxy that records it (pingora's error source).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The client side: the caller, or the proxy in front of it.
    Downstream,
    /// The upstream side: the endpoint, its proxy, or the network towards them.
    Upstream,
    /// This proxy: its policy (route, authorization, limits) or its own setup.
    Proxy,
}

impl FailureClass {
    /// Every class, in declaration order.
    pub const ALL: [FailureClass; 17] = [
        Self::Ok,
        Self::AppError,
        Self::AppGrpcError,
        Self::ConnectRefused,
        Self::ConnectTimeout,
        Self::ConnectionReset,
        Self::TlsError,
        Self::NoHealthyUpstream,
        Self::UpstreamTimeout,
        Self::ProtocolError,
        Self::Overloaded,
        Self::RateLimited,
        Self::Denied,
        Self::NoRoute,
        Self::ClientError,
        Self::ClientDisconnect,
        Self::Injected,
    ];

    /// The name used in logs, labels and headers.
    pub const fn as_str(self) -> &'static str {
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
            Self::RateLimited => "rate_limited",
            Self::Denied => "denied",
            Self::NoRoute => "no_route",
            Self::ClientError => "client_error",
            Self::ClientDisconnect => "client_disconnect",
            Self::Injected => "injected",
        }
    }

    /// The category of design.md's taxonomy.
    pub const fn category(self) -> Category {
        match self {
            Self::Ok => Category::Ok,
            Self::AppError | Self::AppGrpcError => Category::Application,
            Self::Overloaded
            | Self::RateLimited
            | Self::Denied
            | Self::NoRoute
            | Self::Injected => Category::Policy,
            Self::ClientError | Self::ClientDisconnect => Category::Client,
            Self::ConnectRefused
            | Self::ConnectTimeout
            | Self::ConnectionReset
            | Self::TlsError
            | Self::NoHealthyUpstream
            | Self::UpstreamTimeout
            | Self::ProtocolError => Category::Network,
        }
    }

    /// The side a failure of this class usually comes from. (A proxy that lacks its own
    /// identity fails with `tls_error` on its own side; the proxy's error type says so.)
    pub const fn side(self) -> Option<Side> {
        match self.category() {
            Category::Ok => None,
            Category::Client => Some(Side::Downstream),
            Category::Policy => Some(Side::Proxy),
            Category::Application | Category::Network => Some(Side::Upstream),
        }
    }

    /// Status of a response the proxy makes up itself for this class.
    pub const fn status(self) -> u16 {
        match self {
            Self::ConnectRefused | Self::ConnectionReset | Self::ProtocolError | Self::TlsError => {
                502
            }
            Self::NoHealthyUpstream | Self::Overloaded | Self::Injected => 503,
            Self::ConnectTimeout | Self::UpstreamTimeout => 504,
            Self::Denied => 403,
            Self::NoRoute => 404,
            Self::RateLimited => 429,
            Self::ClientError | Self::ClientDisconnect => 400,
            Self::Ok | Self::AppError | Self::AppGrpcError => 502,
        }
    }

    /// gRPC status of a proxy-made trailers-only response.
    pub const fn grpc_status(self) -> u32 {
        match self {
            Self::ConnectTimeout | Self::UpstreamTimeout => 4, // DEADLINE_EXCEEDED
            Self::Denied => 7,                                 // PERMISSION_DENIED
            Self::RateLimited => 8,                            // RESOURCE_EXHAUSTED
            Self::NoRoute => 12,                               // UNIMPLEMENTED
            Self::ClientError | Self::ClientDisconnect => 3,   // INVALID_ARGUMENT
            _ => 14,                                           // UNAVAILABLE
        }
    }

    /// Whether another try (on another endpoint) may help: the failure was in reaching or
    /// hearing from one endpoint. (`no_healthy_upstream` is not: another pick would find none
    /// either.)
    pub const fn retriable(self) -> bool {
        matches!(
            self,
            Self::ConnectRefused
                | Self::ConnectTimeout
                | Self::ConnectionReset
                | Self::UpstreamTimeout
        )
    }

    /// Class of an HTTP status the application answered.
    pub const fn from_status(status: u16) -> Self {
        match status {
            500..=599 => Self::AppError,
            400..=499 => Self::ClientError,
            _ => Self::Ok,
        }
    }

    /// Class of a gRPC status the application answered.
    pub const fn from_grpc(code: u32) -> Self {
        match code {
            0 => Self::Ok,
            // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS
            2 | 4 | 12 | 13 | 14 | 15 => Self::AppGrpcError,
            _ => Self::ClientError,
        }
    }
}

impl Category {
    /// The name used in logs and reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Application => "application",
            Self::Network => "network",
            Self::Policy => "policy",
            Self::Client => "client",
        }
    }
}

impl Side {
    /// The name used in logs and reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Downstream => "downstream",
            Self::Upstream => "upstream",
            Self::Proxy => "proxy",
        }
    }
}

/// A name that is no class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownClass(pub String);

impl fmt::Display for UnknownClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not a failure class", self.0)
    }
}

impl std::error::Error for UnknownClass {}

impl FromStr for FailureClass {
    type Err = UnknownClass;
    fn from_str(s: &str) -> Result<Self, UnknownClass> {
        Self::from_bytes(s.as_bytes()).ok_or_else(|| UnknownClass(s.to_string()))
    }
}

impl FailureClass {
    /// The class named by `b` (a header value), if any. No allocation.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str().as_bytes() == b)
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(feature = "prometheus")]
mod prometheus {
    use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

    impl EncodeLabelValue for super::FailureClass {
        fn encode(&self, e: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
            std::fmt::Write::write_str(e, self.as_str())
        }
    }

    impl EncodeLabelValue for super::Side {
        fn encode(&self, e: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
            std::fmt::Write::write_str(e, self.as_str())
        }
    }
}

#[cfg(test)]
mod tests;
