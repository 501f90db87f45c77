//! Trellis data plane: an L4/L7 proxy with routing, load balancing, resilience, and a failure
//! class on every request and connection.
//!
//! [`Proxy::start`] binds every listener and returns a handle; [`Proxy::run`] serves until
//! SIGTERM, reloading on SIGHUP or when the config file changes.

use std::{
    collections::HashMap,
    net::{Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, task::JoinHandle};
use trellis_model::{
    resource::{NamespacedName, Protocol},
    ConfigError, ProxyConfig,
};

pub mod admin;
pub mod capture;
pub mod cluster;
pub mod drain;
pub mod failure;
pub mod fasthash;
pub mod h1;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod mtls;
pub mod pool;
pub mod record;
pub mod state;
pub mod tcp;
pub mod trace;
pub mod xds;

pub use failure::FailureClass;

use crate::{
    http::server::{Listener, ServerLimits},
    metrics::{Metrics, ResultLabels},
    state::Snapshot,
};

/// Where the config comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A resource file, watched for changes.
    File(PathBuf),
    /// The control plane, over xDS.
    Xds(xds::XdsOptions),
}

impl Source {
    fn describe(&self) -> String {
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
    pub mtls_mode: Option<trellis_model::resource::MtlsMode>,
    /// `SO_MARK` on every upstream socket, which capture rules exclude (needs CAP_NET_ADMIN).
    pub socket_mark: Option<u32>,
    /// For IPv6 capture: also accept on `[::1]` at the outbound listener's port and on `[::]`
    /// at the inbound listener's (IPv6 only; where ip6tables REDIRECTs to).
    pub ipv6_capture: bool,
}

/// State shared by every task.
pub struct Shared {
    /// Live config.
    pub state: ArcSwap<Snapshot>,
    /// Metrics.
    pub metrics: Metrics,
    /// Registry, for `/metrics`.
    pub registry: Registry,
    /// Access log.
    pub access_log: record::AccessLog,
    /// Drain signal and connection count.
    pub drain: drain::Drain,
    /// Where the config came from.
    pub source: String,
    /// A config has been applied (always, for a file; after the first bundle, for xDS).
    pub synced: std::sync::atomic::AtomicBool,
    /// The xDS version last applied, and the last refusal.
    pub xds_status: std::sync::Mutex<XdsStatus>,
    /// The proxy's certificate and key, when it has an identity (renewed in place).
    pub identity: Option<Arc<ArcSwap<identity::Credentials>>>,
    /// The inbound TLS configuration, with the credentials it was built from.
    pub inbound_tls:
        arc_swap::ArcSwapOption<(Arc<identity::Credentials>, Arc<rustls::ServerConfig>)>,
    /// The client side of `identity`.
    pub mesh_tls: Option<mtls::MeshTls>,
    /// The inbound listener's mode for every port, overriding the config's.
    pub mtls_mode: Option<trellis_model::resource::MtlsMode>,
    /// `SO_MARK` for upstream sockets.
    pub socket_mark: Option<u32>,
    /// Callers' SPIFFE IDs as metric labels, one shared value each (the request-metric cache
    /// compares labels by identity).
    peer_labels: std::sync::Mutex<HashMap<String, metrics::Label>>,
}

impl Shared {
    /// The label of a caller's SPIFFE ID.
    pub fn peer_label(&self, id: &str) -> metrics::Label {
        let mut m = self.peer_labels.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(id.to_string())
            .or_insert_with(|| metrics::Label::from(id))
            .clone()
    }
}

/// What the proxy last did with what the control plane sent.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct XdsStatus {
    /// Control plane that sent the current config.
    pub server: Option<String>,
    /// Version applied.
    pub applied: Option<String>,
    /// The last refusal: version and reason.
    pub rejected: Option<(String, String)>,
}

/// Why the proxy could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Bad config.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Which listener.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No certificate could be had.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
}

/// A translated config and the text it came from.
pub struct Loaded {
    /// The translated config.
    pub config: ProxyConfig,
    /// The file's text, so that the watcher compares against what was really loaded (a
    /// change between loading and watching must not be missed).
    text: String,
}

fn read_config(path: &std::path::Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        file: path.display().to_string(),
        source,
    })
}

fn translate_text(
    file: &str,
    workload: Option<&NamespacedName>,
    text: &str,
) -> Result<ProxyConfig, ConfigError> {
    let resources = trellis_model::parse_documents(file, text)?;
    trellis_model::translate(file, &resources, workload)
}

/// Read and translate the config file. A proxy fed by xDS starts empty (and not ready) until
/// the first bundle arrives.
pub fn load(opts: &Options) -> Result<Loaded, ConfigError> {
    match &opts.source {
        Source::File(path) => {
            let text = read_config(path)?;
            let file = path.display().to_string();
            let config = translate_text(&file, opts.workload.as_ref(), &text)?;
            Ok(Loaded { config, text })
        }
        Source::Xds(_) => Ok(Loaded {
            config: ProxyConfig::default(),
            text: String::new(),
        }),
    }
}

/// A running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    opts: Options,
    binds: HashMap<String, (SocketAddr, JoinHandle<()>)>,
    /// The config text last tried (loaded, or refused): the watcher reloads when the file
    /// differs from it.
    seen: String,
    /// One HTTP connection builder (limits from `opts`) for every listener.
    builder: Arc<http::server::Builders>,
    /// Bound addresses: admin, outbound, inbound.
    pub addrs: (SocketAddr, SocketAddr, SocketAddr),
}

/// Bind a listener; returns it with its bound address (the port when `addr` asked for 0).
fn bind(addr: SocketAddr, what: &str) -> Result<(TcpListener, SocketAddr), ProxyError> {
    bind_socket(addr, what, false)
}

/// `bind`, and with `v6_only` an IPv6 socket that leaves IPv4 to the IPv4 listener at the
/// same port.
fn bind_socket(
    addr: SocketAddr,
    what: &str,
    v6_only: bool,
) -> Result<(TcpListener, SocketAddr), ProxyError> {
    let sock = if addr.is_ipv4() {
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
    } else {
        socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
    };
    let err = |source| ProxyError::Bind {
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

/// What an accepted connection is served as.
enum Serve {
    /// HTTP (auto-detected version) on a listener of this kind.
    Http(Listener),
    /// Opaque TCP to this cluster.
    Tcp(String),
}

fn bind_key(cfg: &ProxyConfig, i: usize) -> String {
    let b = &cfg.tcp_binds[i];
    if b.bind.port() == 0 {
        format!("{}#{i}", b.bind)
    } else {
        b.bind.to_string()
    }
}

fn spawn_accept(
    shared: Arc<Shared>,
    builder: Arc<http::server::Builders>,
    listener: TcpListener,
    serve: Serve,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut drain = shared.drain.signal();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        let shared = shared.clone();
                        match &serve {
                            Serve::Tcp(cluster) => tokio::spawn(tcp::serve_bind(shared, cluster.clone(), stream)),
                            Serve::Http(kind) => tokio::spawn(capture::accept(shared, builder.clone(), kind.clone(), stream, peer)),
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

impl Proxy {
    /// Bind every listener and start serving `cfg`.
    pub async fn start(opts: Options, loaded: Loaded) -> Result<Self, ProxyError> {
        let Loaded { config: cfg, text } = loaded;
        // The identity first: without one, a proxy that needs it must not start serving.
        let creds = match (&opts.identity, &opts.source) {
            (Some(id), Source::Xds(x)) => {
                let c = identity::bootstrap(id, &x.servers).await?;
                let current = Arc::new(ArcSwap::from_pointee(c));
                tokio::spawn(identity::keep_renewed(
                    id.clone(),
                    x.servers.clone(),
                    current.clone(),
                ));
                Some(current)
            }
            _ => None,
        };
        let mut registry = Registry::default();
        let metrics = Metrics::register(registry.sub_registry_with_prefix("trellis"));
        let snap = Snapshot::build(cfg, None, &metrics);
        let shared = Arc::new(Shared {
            state: ArcSwap::from_pointee(snap),
            metrics,
            registry,
            access_log: record::AccessLog::new(opts.access_log),
            drain: drain::Drain::default(),
            source: opts.source.describe(),
            synced: std::sync::atomic::AtomicBool::new(matches!(opts.source, Source::File(_))),
            xds_status: Default::default(),
            mesh_tls: creds.clone().map(mtls::MeshTls::new),
            identity: creds,
            inbound_tls: Default::default(),
            mtls_mode: opts.mtls_mode,
            socket_mark: opts.socket_mark,
            peer_labels: Default::default(),
        });
        let (admin, admin_addr) = bind(opts.admin, "admin")?;
        let (outbound, outbound_addr) = bind(opts.outbound, "outbound")?;
        let (inbound, inbound_addr) = bind(opts.inbound, "inbound")?;
        let v6 = if opts.ipv6_capture {
            let at = |ip: Ipv6Addr, port| SocketAddr::new(ip.into(), port);
            let out6 = at(Ipv6Addr::LOCALHOST, outbound_addr.port());
            let in6 = at(Ipv6Addr::UNSPECIFIED, inbound_addr.port());
            Some((
                bind_socket(out6, "outbound (IPv6)", true)?.0,
                bind_socket(in6, "inbound (IPv6)", true)?.0,
            ))
        } else {
            None
        };
        let mut proxy = Self {
            shared: shared.clone(),
            builder: Arc::new(http::server::builder(opts.limits)),
            opts,
            binds: HashMap::new(),
            seen: text,
            addrs: (admin_addr, outbound_addr, inbound_addr),
        };
        let snap = shared.state.load_full();
        proxy.binds = proxy.bind_all(&snap.cfg).await?;
        tokio::spawn(admin::serve(shared.clone(), admin));
        let http =
            |l, kind| spawn_accept(shared.clone(), proxy.builder.clone(), l, Serve::Http(kind));
        http(outbound, Listener::Outbound);
        http(inbound, Listener::Inbound);
        if let Some((out6, in6)) = v6 {
            http(out6, Listener::Outbound);
            http(in6, Listener::Inbound);
        }
        Ok(proxy)
    }

    /// Bind the explicit-mode listeners of `cfg` that are not bound yet; all or nothing.
    async fn bind_all(
        &self,
        cfg: &ProxyConfig,
    ) -> Result<HashMap<String, (SocketAddr, JoinHandle<()>)>, ProxyError> {
        let mut out: HashMap<String, (SocketAddr, JoinHandle<()>)> = HashMap::new();
        for (i, b) in cfg.tcp_binds.iter().enumerate() {
            let key = bind_key(cfg, i);
            if self.binds.contains_key(&key) {
                continue;
            }
            let what = format!("upstream {}:{}", b.service.host(), b.port);
            let (l, addr) = match bind(b.bind, &what) {
                Ok(bound) => bound,
                Err(e) => {
                    out.values().for_each(|(_, h)| h.abort());
                    return Err(e);
                }
            };
            let serve = if b.protocol == Protocol::Tcp {
                Serve::Tcp(b.cluster.clone())
            } else {
                Serve::Http(Listener::Bind {
                    cluster: b.cluster.clone(),
                })
            };
            let h = spawn_accept(self.shared.clone(), self.builder.clone(), l, serve);
            out.insert(key, (addr, h));
        }
        Ok(out)
    }

    /// The bound explicit-mode listeners: (service, port, address).
    pub fn bound_upstreams(&self) -> Vec<(String, u16, SocketAddr)> {
        let snap = self.shared.state.load_full();
        let cfg = &snap.cfg;
        (0..cfg.tcp_binds.len())
            .filter_map(|i| {
                let b = &cfg.tcp_binds[i];
                let (addr, _) = self.binds.get(&bind_key(cfg, i))?;
                Some((b.service.host(), b.port, *addr))
            })
            .collect()
    }

    /// Shared state (for tests and the admin server).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Load the file again and swap the config in, or keep the old one and say why.
    pub async fn reload(&mut self) -> Result<(), ProxyError> {
        let res = self.try_reload().await;
        self.count_reload(&res);
        res
    }

    fn count_reload(&self, res: &Result<(), ProxyError>) {
        let result = if res.is_ok() { "ok" } else { "error" };
        self.shared
            .metrics
            .reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    async fn try_reload(&mut self) -> Result<(), ProxyError> {
        let Source::File(path) = &self.opts.source else {
            return Ok(());
        };
        self.seen = read_config(path)?;
        let file = path.display().to_string();
        let cfg = translate_text(&file, self.opts.workload.as_ref(), &self.seen)?;
        self.swap(cfg).await
    }

    /// Translate what the control plane sent and swap it in, or refuse it whole.
    async fn apply_update(&mut self, u: &xds::Update) -> Result<(), ProxyError> {
        let file = format!("xds:{}@{}", u.server, u.version);
        let cfg = trellis_model::translate(&file, &u.resources, self.opts.workload.as_ref())?;
        self.swap(cfg).await
    }

    /// Bind what `cfg` adds, swap it in, and close what it dropped; all or nothing.
    async fn swap(&mut self, cfg: ProxyConfig) -> Result<(), ProxyError> {
        let new_binds = self.bind_all(&cfg).await?;
        if let (Some(bundle), Some(current), Some(id)) = (
            &cfg.trust_bundle,
            &self.shared.identity,
            &self.opts.identity,
        ) {
            match identity::adopt_bundle(&id.state_dir, current, bundle) {
                Ok(true) => tracing::info!(
                    roots = bundle.matches("BEGIN CERTIFICATE").count(),
                    "trust bundle updated"
                ),
                Ok(false) => {}
                Err(e) => tracing::error!(error = %e, "trust bundle refused"),
            }
        }
        let old = self.shared.state.load_full();
        let snap = Snapshot::build(cfg, Some(&old), &self.shared.metrics);
        let keep: Vec<String> = (0..snap.cfg.tcp_binds.len())
            .map(|i| bind_key(&snap.cfg, i))
            .collect();
        self.shared.state.store(Arc::new(snap));
        self.shared.metrics.clear_request_cache();
        self.binds.retain(|k, (_, h)| {
            let keep = keep.contains(k);
            if !keep {
                h.abort();
            }
            keep
        });
        self.binds.extend(new_binds);
        Ok(())
    }

    async fn on_update(&mut self, u: xds::Update) {
        let res = self.apply_update(&u).await;
        self.count_reload(&res);
        let answer = {
            let mut st = self
                .shared
                .xds_status
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match res {
                Ok(()) => {
                    st.server = Some(u.server.clone());
                    st.applied = Some(u.version.clone());
                    self.shared
                        .synced
                        .store(true, std::sync::atomic::Ordering::Release);
                    tracing::info!(server = %u.server, version = %u.version, "config from control plane applied");
                    Ok(())
                }
                Err(e) => {
                    let reason = e.to_string();
                    st.rejected = Some((u.version.clone(), reason.clone()));
                    Err(reason)
                }
            }
        };
        let _ = u.done.send(answer);
    }

    /// The proxy's credentials (renewed in place), when it has an identity.
    pub fn identity(&self) -> Option<Arc<ArcSwap<identity::Credentials>>> {
        self.shared.identity.clone()
    }

    /// Serve until SIGTERM or SIGINT; reload on SIGHUP and when the file changes. Then drain.
    pub async fn run(self) -> std::io::Result<()> {
        self.run_until(std::future::pending()).await
    }

    /// As [`Proxy::run`], stopping also when `stop` completes (several proxies in one
    /// process, as `trellis demo` runs them).
    pub async fn run_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        tokio::pin!(stop);
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut tick = tokio::time::interval(self.opts.watch_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let (file, mut updates) = match &self.opts.source {
            Source::File(p) => (Some(p.clone()), None),
            Source::Xds(x) => {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let x = xds::XdsOptions {
                    identity: self.shared.identity.clone(),
                    ..x.clone()
                };
                tokio::spawn(xds::run(x, tx));
                (None, Some(rx))
            }
        };
        loop {
            let why = tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = &mut stop => break,
                _ = hup.recv(), if file.is_some() => "SIGHUP",
                _ = tick.tick(), if file.is_some() => {
                    match file.as_ref().map(std::fs::read_to_string) {
                        Some(Ok(now)) if now != self.seen => "file changed",
                        _ => continue,
                    }
                }
                Some(u) = async { updates.as_mut()?.recv().await }, if updates.is_some() => {
                    self.on_update(u).await;
                    continue;
                }
            };
            match self.reload().await {
                Ok(()) => tracing::info!(
                    trigger = why,
                    version = self.shared.state.load().version,
                    "config reloaded"
                ),
                Err(e) => {
                    tracing::error!(trigger = why, error = %e, "config refused; still serving the previous one")
                }
            }
        }
        let active = self.shared.drain.active();
        tracing::info!(
            active,
            timeout_secs = self.opts.drain_timeout.as_secs_f64(),
            "draining"
        );
        match tokio::time::timeout(self.opts.drain_timeout, self.shared.drain.drain()).await {
            Ok(()) => tracing::info!("drained"),
            Err(_) => tracing::warn!(
                still_open = self.shared.drain.active(),
                "drain timeout; closing remaining connections"
            ),
        }
        Ok(())
    }
}
