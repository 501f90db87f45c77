//! `trellis join`: one host or VM joins the mesh.
//!
//! 1. Identity: a stored, still-valid certificate in the state dir, else a new one for the
//!    join token (the proxy's own flow: its key never leaves the host). A restarted agent
//!    rejoins with what it stored and needs no token.
//! 2. The proxy starts in this process, for `NAMESPACE/NAME` (the namespace is the
//!    identity's), with its listeners bound.
//! 3. The Workload is registered (`/v1/agent`, signed with the certificate's key) with the
//!    proxy's real inbound port and `healthy: false`.
//! 4. Every interval the application is checked (HTTP GET or TCP connect) and a heartbeat
//!    carries the verdict: healthy after `healthy_threshold` passes in a row, unhealthy after
//!    `unhealthy_threshold` failures. The control plane marks the Workload unhealthy if
//!    heartbeats stop.
//! 5. On SIGTERM or SIGINT the Workload is deregistered; the control plane answers once the
//!    proxies connected to it, and to the other replicas on its store, have applied that (5 s
//!    at most), and only then does the proxy
//!    drain, so that no caller sends it a request after it stopped taking them.
//! 6. Upgrade in place: the same command started again (a new binary) takes over through the
//!    proxy's handoff socket (`STATE_DIR/handoff.sock`): the listeners, the resolver's
//!    sockets, the health verdict and the capture rules pass to it, and this agent drains
//!    and exits without deregistering.
//!
//! With capture ([`capture`]), iptables rules in the agent's network namespace send the
//! workload's traffic through the proxy, and the agent answers DNS for `NAME.NAMESPACE.mesh`
//! ([`dns`]) with each service's virtual IP. The rules go when the agent stops, and a restart
//! replaces whatever a crash left.

pub mod capture;
pub mod containers;
pub mod dns;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use trellis_proxy::{
    identity::{self, Credentials, IdentityError, IdentityOptions},
    Options as ProxyOptions, Proxy, ProxyError, Stopped,
};

/// How the application is checked.
#[derive(Clone, Debug)]
pub enum Check {
    /// `GET path` answered with 2xx or 3xx.
    Http {
        /// Address.
        addr: SocketAddr,
        /// Path.
        path: String,
    },
    /// A TCP connection is accepted.
    Tcp(SocketAddr),
    /// The gRPC health protocol (`grpc.health.v1.Health/Check`) answers SERVING for
    /// `service` (empty: the server as a whole).
    Grpc {
        /// Address.
        addr: SocketAddr,
        /// Service name.
        service: String,
    },
    /// None: healthy while the agent runs.
    None,
}

/// Health checking.
#[derive(Clone, Debug)]
pub struct Health {
    /// What to check.
    pub check: Check,
    /// How often (and how often a heartbeat goes).
    pub interval: Duration,
    /// Time allowed for one check.
    pub timeout: Duration,
    /// Passes in a row to become healthy.
    pub healthy_threshold: u32,
    /// Failures in a row to become unhealthy.
    pub unhealthy_threshold: u32,
}

/// What `trellis join` was given.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Control planes' xDS URLs.
    pub servers: Vec<String>,
    /// Workload name.
    pub name: String,
    /// Workload labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Workload spec, as JSON (address, environment, locality, ports, upstreams…); the
    /// agent sets `identity`, `healthy`, and `inboundPort` unless the spec has one (a port
    /// in front of the proxy's inbound listener that forwards to it: a NAT rule, a
    /// container engine's published port).
    pub spec: serde_json::Value,
    /// State dir, join token, CA hash.
    pub identity: IdentityOptions,
    /// The proxy's options; `source`, `workload` and `identity` are filled in here.
    pub proxy: ProxyOptions,
    /// Health checking.
    pub health: Health,
    /// Transparent capture; the listener ports are filled in once the proxy has bound them.
    pub capture: Option<capture::CaptureOptions>,
    /// The mesh resolver.
    pub dns: Option<dns::DnsOptions>,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No identity.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The proxy could not start.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// The workload could not be registered.
    #[error("registering the workload: {0}")]
    Register(String),
    /// Signal handling.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Capture rules could not be installed.
    #[error("traffic capture: {0}")]
    Capture(#[from] capture::CaptureError),
    /// The resolver could not bind.
    #[error("dns on {addr}: {source}")]
    Dns {
        /// Listen address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Run until SIGTERM or SIGINT.
pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
    run_until(opts, std::future::pending()).await
}

/// Resolves when this process's parent exits (it is re-parented): an agent started by
/// `trellis containers` stops, and deregisters, with it rather than lingering unmanaged.
pub async fn parent_exited() {
    let parent = std::os::unix::process::parent_id();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if std::os::unix::process::parent_id() != parent {
            tracing::warn!(parent, "the parent process exited; stopping");
            return;
        }
    }
}

/// Run until SIGTERM, SIGINT or `stop` (several agents in one process, as `trellis demo`).
pub async fn run_until(
    opts: AgentOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let creds = identity::bootstrap(&opts.identity, &opts.servers).await?;
    let namespace = creds.info.id.namespace.clone();
    let workload: trellis_model::resource::NamespacedName = format!("{namespace}/{}", opts.name)
        .parse()
        .map_err(|e| AgentError::Register(format!("workload name {:?}: {e}", opts.name)))?;
    let mut popts = opts.proxy.clone();
    popts.workload = Some(workload.clone());
    popts.identity = Some(opts.identity.clone());
    popts.source = trellis_proxy::Source::Xds(trellis_proxy::xds::XdsOptions {
        servers: opts.servers.clone(),
        node_id: format!("{workload}@agent"),
        workload: Some(workload.to_string()),
        identity: None,
    });
    let loaded = trellis_proxy::load(&popts).map_err(|e| AgentError::Register(e.to_string()))?;
    let mut proxy = Proxy::start(popts, loaded).await?;
    let (admin, outbound, inbound) = proxy.addrs;
    tracing::info!(%admin, %outbound, %inbound, %workload, "listening");
    // An upgrade in place: the predecessor (another `trellis join` with this state dir)
    // handed its listeners over, and passed on its health verdict and capture.
    let handed = proxy.inherited().map(|i| i.offer.extra.clone());
    // Rules a crashed run left would send traffic to a proxy that is not there yet; a
    // predecessor's stay, for the same listeners.
    if opts.capture.is_some() && handed.is_none() {
        capture::remove()?;
    }
    let mut resolver = None;
    if let Some(d) = &opts.dns {
        let (udp, tcp) = resolver_sockets(&mut proxy, d.listen).await?;
        let listen = udp.local_addr()?;
        tracing::info!(%listen, upstream = ?d.upstream, "answering DNS for .mesh");
        let services = proxy.services();
        let mut tasks = Vec::new();
        let mut serve = |udp, tcp, listen| {
            let d = dns::DnsOptions {
                listen,
                ..d.clone()
            };
            tasks.push(tokio::spawn(dns::serve(udp, d.clone(), services.clone())));
            tasks.push(tokio::spawn(dns::serve_tcp(tcp, d, services.clone())));
        };
        serve(udp, tcp, listen);
        // IPv6 capture sends queries to `[::1]` at the same port.
        if opts.capture.as_ref().is_some_and(|c| c.ipv6) {
            let listen6 = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), listen.port());
            let (udp, tcp) = resolver_sockets(&mut proxy, listen6).await?;
            serve(udp, tcp, listen6);
        }
        resolver = Some((tasks, listen));
    }
    // Dropped at the end of this function, also on an error: the rules go with the agent.
    let mut host = serde_json::json!({
        "resolver": resolver.as_ref().map(|(_, a)| a.to_string()),
    });
    let mut captured = match &opts.capture {
        Some(c) => {
            let mut c = c.clone();
            c.outbound_port = outbound.port();
            c.inbound_port = inbound.port();
            c.dns_port = resolver.as_ref().map(|(_, a)| a.port());
            let predecessor = handed.as_ref().and_then(|h| h.get("capture"));
            let installed = match predecessor {
                Some(p) => capture::Installed::adopt(serde_json::from_value(p.clone()).ok()),
                None => c.install()?,
            };
            if let Some(o) = proxy.offered() {
                o.pass_on("capture", serde_json::json!(installed.route()));
            }
            host["capture"] = serde_json::json!({
                "chains": capture::CHAINS,
                "outboundPort": c.outbound_port,
                "inboundPort": c.inbound_port,
                "appPorts": c.app_ports,
                "dnsPort": c.dns_port,
                "ipv6": c.ipv6,
            });
            Some(installed)
        }
        None => None,
    };
    // What `trellis check --proxy` on this host checks.
    proxy.describe_host(host);
    let current = proxy
        .identity()
        .ok_or_else(|| AgentError::Register("the proxy has no identity".into()))?;
    let mut spec = opts.spec.clone();
    if let Some(o) = spec.as_object_mut() {
        o.entry("inboundPort").or_insert(inbound.port().into());
    }
    let register = serde_json::json!({
        "op": "register",
        "name": opts.name,
        "labels": opts.labels,
        "spec": spec,
        "intervalMs": opts.health.interval.as_millis() as u64,
    });
    send(&opts.servers, &current.load(), register.clone())
        .await
        .map_err(|e| AgentError::Register(e.to_string()))?;
    tracing::info!(%workload, spiffe = %creds.info.id, "workload registered");
    let mut verdict = Verdict::new(&opts.health);
    if let Some(h) = &handed {
        verdict.healthy = h["healthy"].as_bool().unwrap_or(false);
        verdict.recoveries = h["recoveries"].as_u64().unwrap_or(0);
    }
    let beats = tokio::spawn(heartbeats(
        opts.servers.clone(),
        opts.name.clone(),
        (opts.health.clone(), verdict),
        current.clone(),
        register,
        proxy.offered().cloned(),
    ));
    // The proxy serves until a signal; then the workload leaves the mesh, the callers learn
    // it, and only then does the proxy drain (it serves on meanwhile).
    let leave = async {
        beats.abort();
        match deregister(&opts.servers, &current.load(), &opts.name, LEAVE_WAIT).await {
            Ok(0) => {
                tracing::info!(%workload, "workload deregistered; every caller has the change")
            }
            Ok(behind) => {
                tracing::warn!(%workload, behind, "workload deregistered; some proxies did not take the change in time")
            }
            Err(e) => tracing::warn!(%workload, error = %e, "could not deregister"),
        }
    };
    let served = proxy.run_leaving(stop, leave).await;
    beats.abort();
    for task in resolver.into_iter().flat_map(|(tasks, _)| tasks) {
        task.abort();
    }
    if let Ok(Stopped::HandedOver(successor)) = served {
        // The workload stays in the mesh, served by the successor, with these rules.
        if let Some(c) = captured.take() {
            c.keep();
        }
        tracing::info!(successor, %workload, "a new agent took over; the workload stays registered");
    }
    drop(captured);
    served?;
    Ok(())
}

/// The resolver's sockets at `listen`: the ones a predecessor handed over, or bound now; and
/// offered to a successor.
async fn resolver_sockets(
    proxy: &mut Proxy,
    listen: SocketAddr,
) -> Result<(tokio::net::UdpSocket, tokio::net::TcpListener), AgentError> {
    let names = (format!("dns udp {listen}"), format!("dns tcp {listen}"));
    let err = |source| AgentError::Dns {
        addr: listen,
        source,
    };
    let handed = proxy.inherited().and_then(|i| {
        let udp = i.take_bound(&names.0, listen, std::net::UdpSocket::local_addr)?;
        let tcp = i.take_bound(&names.1, listen, std::net::TcpListener::local_addr)?;
        Some((udp, tcp))
    });
    let (udp, tcp) = match handed {
        Some((u, t)) => {
            u.set_nonblocking(true).map_err(err)?;
            t.set_nonblocking(true).map_err(err)?;
            let udp = tokio::net::UdpSocket::from_std(u).map_err(err)?;
            (udp, tokio::net::TcpListener::from_std(t).map_err(err)?)
        }
        None => dns::bind(listen).await.map_err(err)?,
    };
    if let Some(o) = proxy.offered() {
        o.add(&names.0, &udp).map_err(err)?;
        o.add(&names.1, &tcp).map_err(err)?;
    }
    Ok((udp, tcp))
}

async fn send(
    servers: &[String],
    creds: &Credentials,
    mut request: serde_json::Value,
) -> Result<serde_json::Value, IdentityError> {
    let ts = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    request["ts"] = ts.into();
    identity::signed_call(servers, "/v1/agent", creds, &request).await
}

/// How long the control plane waits, at most, for the proxies to take a deregistration.
const LEAVE_WAIT: Duration = Duration::from_secs(5);

/// Take Workload `name` out of the mesh, signed with `creds`: the control plane answers once
/// the proxies connected to it and to the other replicas have applied the change (or `wait`
/// passed), with how many had not. Gives up after that wait and 5 s more.
async fn deregister(
    servers: &[String],
    creds: &Credentials,
    name: &str,
    wait: Duration,
) -> Result<u64, String> {
    let bye = serde_json::json!({
        "op": "deregister",
        "name": name,
        "waitMs": wait.as_millis() as u64,
    });
    let limit = wait + Duration::from_secs(5);
    match tokio::time::timeout(limit, send(servers, creds, bye)).await {
        Ok(Ok(v)) => Ok(v["behind"].as_u64().unwrap_or(0)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Check every interval; send the verdict with each heartbeat, and pass it on to a
/// successor (an upgrade in place starts from it, not from unhealthy).
async fn heartbeats(
    servers: Vec<String>,
    name: String,
    (health, mut verdict): (Health, Verdict),
    creds: Arc<ArcSwap<Credentials>>,
    register: serde_json::Value,
    offered: Option<trellis_proxy::handoff::Offered>,
) {
    let mut tick = tokio::time::interval(health.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let passed = check(&health.check, health.timeout).await;
        if let Some(now) = verdict.observe(passed.is_ok()) {
            match &passed {
                Ok(()) => tracing::info!(workload = %name, "application healthy"),
                Err(e) => tracing::warn!(workload = %name, error = %e, "application unhealthy"),
            }
            let _ = now;
        }
        if let Some(o) = &offered {
            o.pass_on("healthy", verdict.healthy.into());
            o.pass_on("recoveries", verdict.recoveries.into());
        }
        let beat = serde_json::json!({
            "op": "heartbeat",
            "name": name,
            "healthy": verdict.healthy,
            "recoveries": verdict.recoveries,
            "intervalMs": health.interval.as_millis() as u64,
        });
        match send(&servers, &creds.load(), beat).await {
            Ok(_) => {}
            // The control plane lost the Workload (deleted by hand, a store restored from
            // an older backup): register it again; the next heartbeat reports health.
            Err(e) if e.to_string().contains("HTTP 404") => {
                tracing::warn!(workload = %name, "the control plane lost this workload; registering it again");
                if let Err(e) = send(&servers, &creds.load(), register.clone()).await {
                    tracing::warn!(workload = %name, error = %e, "registration failed");
                }
            }
            Err(e) => tracing::warn!(workload = %name, error = %e, "heartbeat failed"),
        }
    }
}

/// Consecutive passes and failures against the thresholds.
struct Verdict {
    healthy: bool,
    passes: u32,
    failures: u32,
    up: u32,
    down: u32,
    /// Checks that passed after one or more failed (below the threshold or not): callers
    /// lift an outlier ejection of this workload when the count grows.
    recoveries: u64,
}

impl Verdict {
    fn new(h: &Health) -> Self {
        Self {
            healthy: false,
            passes: 0,
            failures: 0,
            up: h.healthy_threshold.max(1),
            down: h.unhealthy_threshold.max(1),
            recoveries: 0,
        }
    }

    /// Record one check; `Some(new)` when the verdict changes.
    fn observe(&mut self, passed: bool) -> Option<bool> {
        if passed {
            if self.failures > 0 {
                self.recoveries += 1;
            }
            self.passes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.passes = 0;
        }
        let next = if self.healthy {
            self.failures < self.down
        } else {
            self.passes >= self.up
        };
        (next != self.healthy).then(|| {
            self.healthy = next;
            next
        })
    }
}

/// One check.
async fn check(c: &Check, timeout: Duration) -> Result<(), String> {
    let run = async {
        match c {
            Check::None => Ok(()),
            Check::Tcp(addr) => tokio::net::TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| format!("TCP connect to {addr}: {e}")),
            Check::Http { addr, path } => http_check(*addr, path).await,
            Check::Grpc { addr, service } => grpc_check(*addr, service).await,
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

async fn grpc_check(addr: SocketAddr, service: &str) -> Result<(), String> {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| format!("grpc.health.v1 Check: {:?}: {}", s.code(), s.message()))?;
    match r.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("grpc.health.v1 says {}", other.as_str_name())),
    }
}

async fn http_check(addr: SocketAddr, path: &str) -> Result<(), String> {
    use http_body_util::{BodyExt, Empty};
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", addr.to_string())
        .header("user-agent", "trellis-agent")
        .body(Empty::<hyper::body::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let r = send.send_request(req).await.map_err(|e| e.to_string())?;
    let st = r.status();
    let _ = r.into_body().collect().await;
    if st.is_success() || st.is_redirection() {
        Ok(())
    } else {
        Err(format!("GET {path} answered {st}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(up: u32, down: u32) -> Health {
        Health {
            check: Check::None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: up,
            unhealthy_threshold: down,
        }
    }

    #[tokio::test]
    async fn the_grpc_check_speaks_the_grpc_health_protocol() {
        let (reporter, service) = tonic_health::server::health_reporter();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        let t = Duration::from_secs(5);
        let grpc = |service: &str| Check::Grpc {
            addr,
            service: service.into(),
        };
        // The server as a whole is SERVING from the start.
        assert_eq!(check(&grpc(""), t).await, Ok(()));
        reporter
            .set_service_status("catalog", tonic_health::ServingStatus::NotServing)
            .await;
        let e = check(&grpc("catalog"), t).await.unwrap_err();
        assert!(e.contains("NOT_SERVING"), "{e}");
        reporter
            .set_service_status("catalog", tonic_health::ServingStatus::Serving)
            .await;
        assert_eq!(check(&grpc("catalog"), t).await, Ok(()));
        // An unknown service is NOT_FOUND; nothing listening is a connect error.
        assert!(check(&grpc("nope"), t)
            .await
            .unwrap_err()
            .contains("NotFound"));
        let closed = Check::Grpc {
            addr: "127.0.0.1:1".parse().unwrap(),
            service: String::new(),
        };
        assert!(check(&closed, t).await.unwrap_err().contains("connect"));
    }

    #[test]
    fn thresholds_count_consecutive_results() {
        let mut v = Verdict::new(&health(2, 3));
        assert_eq!(v.observe(true), None, "one pass is not enough");
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(true), None, "passes must be consecutive");
        assert_eq!(v.observe(true), Some(true));
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(true), None, "a pass resets the failures");
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(false), Some(false));
    }

    #[test]
    fn a_pass_after_a_failure_is_a_recovery_even_below_the_threshold() {
        let mut v = Verdict::new(&health(1, 3));
        v.observe(true);
        v.observe(true);
        assert_eq!(v.recoveries, 0, "passing all along is no recovery");
        v.observe(false);
        assert!(v.healthy, "one failure of three does not make it unhealthy");
        v.observe(true);
        assert_eq!(
            v.recoveries, 1,
            "but its callers may have ejected it meanwhile"
        );
        v.observe(false);
        v.observe(false);
        v.observe(false);
        assert!(!v.healthy);
        v.observe(true);
        assert_eq!(v.recoveries, 2);
    }
}
