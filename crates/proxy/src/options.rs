//! How the proxy runs: built once from flags at the edge (the CLI, the agent, the demo).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use trellis_model::resource::{MtlsMode, NamespacedName};

use crate::{http::server::ServerLimits, identity, xds};

/// Where the config comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A resource file, watched for changes.
    File(PathBuf),
    /// The control plane, over xDS.
    Xds(xds::XdsOptions),
}

impl Source {
    pub(crate) fn describe(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Xds(x) => format!("xds:{}", x.servers.join(",")),
        }
    }
}

/// How the proxy runs. Built once from flags at the edge.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the config comes from.
    pub source: Source,
    /// The workload this proxy serves.
    pub workload: Option<NamespacedName>,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Outbound listener.
    pub outbound: SocketAddr,
    /// Inbound listener.
    pub inbound: SocketAddr,
    /// How long SIGTERM waits for connections to finish.
    pub drain_timeout: Duration,
    /// How often the config file is checked for changes.
    pub watch_interval: Duration,
    /// Client header limits.
    pub limits: ServerLimits,
    /// Write access-log lines to stdout.
    pub access_log: bool,
    /// Get and keep a certificate from the mesh's CA (with xDS only).
    pub identity: Option<identity::IdentityOptions>,
    /// With an identity: what the inbound listener accepts, for every port, whatever the
    /// PeerAuthentications say (`None`: as they say; STRICT without any).
    pub mtls_mode: Option<MtlsMode>,
    /// `SO_MARK` on every upstream socket, which capture rules exclude (needs CAP_NET_ADMIN).
    pub socket_mark: Option<u32>,
    /// For IPv6 capture: also accept on `[::1]` at the outbound listener's port and on `[::]`
    /// at the inbound listener's (IPv6 only; where ip6tables REDIRECTs to).
    pub ipv6_capture: bool,
    /// With xDS: how often to report to the control plane what was recorded (zero: never).
    pub report_every: Duration,
    /// Export spans over OTLP/gRPC to this collector (`http://HOST:PORT`, or
    /// `https://HOST:PORT` over TLS).
    pub otlp_endpoint: Option<String>,
    /// The roots (PEM) that verify an `https://` collector; the system's bundle without it.
    pub otlp_ca: Option<std::path::PathBuf>,
    /// The certificate chain (PEM) shown to an `https://` collector that asks for one.
    pub otlp_client_cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    pub otlp_client_key: Option<std::path::PathBuf>,
    /// Headers sent to the collector with every export, `NAME=VALUE` each (an API key).
    pub otlp_headers: Vec<String>,
    /// The probability (0 to 1) that a trace this proxy starts is sampled; a Service's
    /// `spec.tracing.samplingPercent` overrides it for requests to that service.
    pub trace_sampling: f64,
    /// With xDS for a workload: a Service asked for on demand (not among the workload's
    /// upstreams) is released once unused for this long.
    pub on_demand_idle: Duration,
    /// Upgrades in place: take over the listeners of the proxy answering at this Unix
    /// socket, if one does, and answer there for the next one ([`crate::handoff`]).
    pub handoff: Option<std::path::PathBuf>,
    /// With `handoff`: on SIGUSR2, start this binary again with the same arguments, to take
    /// over (off for an agent that must stop with its parent).
    pub upgrade_on_usr2: bool,
    /// SIGINT stops the proxy as SIGTERM does. Off where the process handles Ctrl-C itself
    /// and stops its proxies after (the demo stops its traffic first).
    pub stop_on_interrupt: bool,
}

impl Options {
    /// What TLS to the span collector uses (none of it for an `http://` one).
    pub fn collector_tls(&self) -> crate::otlp::CollectorTls<'_> {
        crate::otlp::CollectorTls {
            ca: self.otlp_ca.as_deref(),
            client_cert: self.otlp_client_cert.as_deref(),
            client_key: self.otlp_client_key.as_deref(),
        }
    }
}

/// How long a Service asked for on demand stays held unused, by default.
pub const DEFAULT_ON_DEMAND_IDLE: Duration = Duration::from_secs(300);

/// The share of the traces a proxy starts that are sampled, by default.
pub const DEFAULT_TRACE_SAMPLING: f64 = 0.01;

/// How often a proxy reports to its control plane by default.
pub const DEFAULT_REPORT_EVERY: Duration = Duration::from_secs(10);
