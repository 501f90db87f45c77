//! A running proxy: its listeners bound, its config applied and reapplied, until it drains.
//!
//! New config (a changed file, or what the control plane sent) is translated and built into
//! a snapshot on a blocking thread, not on the request thread; the snapshot is then swapped in
//! atomically, after the explicit-mode listeners it adds are bound (all or nothing).

use std::{
    collections::HashMap,
    net::{Ipv6Addr, SocketAddr},
    sync::Arc,
};

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use trellis_model::{
    resource::{NamespacedName, Protocol},
    ConfigError, ProxyConfig,
};

use crate::{
    access_log::AccessLog,
    admin,
    drain::Drain,
    handoff::{self, HandoffError, Inherited, Offered},
    http::{server, Listener},
    identity,
    listen::{bind_as, spawn_accept, BindError, Serve},
    metrics::{Metrics, ReloadLabels},
    mtls,
    options::{Options, Source},
    otlp,
    pool::Dialer,
    shared::{Services, Shared},
    snapshot::Snapshot,
    telemetry::Telemetry,
    xds,
};

/// Why the proxy could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Bad config.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not bind.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// No certificate could be had.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The signal handlers could not be installed.
    #[error("cannot catch signals: {0}")]
    Signals(std::io::Error),
    /// Taking over from the running proxy failed, or the handoff socket could not be bound.
    #[error(transparent)]
    Handoff(#[from] HandoffError),
    /// The connection to the span collector cannot be set up as asked.
    #[error(transparent)]
    Collector(#[from] otlp::CollectorError),
}

/// Why a proxy stopped serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// A signal, or its owner, stopped it.
    Asked,
    /// A new process (this process id) took its listeners over: an upgrade in place.
    HandedOver(u32),
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
    workload: Option<&trellis_model::NamespacedName>,
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

/// The snapshot a blocking thread built.
fn joined(
    built: Result<Result<Snapshot, ConfigError>, tokio::task::JoinError>,
) -> Result<Snapshot, ProxyError> {
    match built {
        Ok(r) => Ok(r?),
        // The translation panicked: a bug, but never one that takes the proxy down.
        Err(e) => Err(ProxyError::Config(ConfigError::Io {
            file: "translation".into(),
            source: std::io::Error::other(e.to_string()),
        })),
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn catch() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
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
    builder: Arc<server::Builders>,
    /// The live config is the translation of the last update the control plane sent (none
    /// was refused since): the next one may be applied as a difference.
    in_sync: bool,
    /// What on-demand discovery asks of the xDS client, until it starts.
    asks: Option<tokio::sync::mpsc::UnboundedReceiver<crate::demand::Ask>>,
    /// SIGTERM, SIGINT and SIGHUP, caught from the start: a signal sent as soon as the
    /// proxy says it listens must not find the default action (which would end it).
    signals: Signals,
    /// Bound addresses: admin, outbound, inbound.
    pub addrs: (SocketAddr, SocketAddr, SocketAddr),
    /// What the process this one takes over from handed over, until this one is ready.
    inherited: Option<Inherited>,
    /// With `--handoff`: the listeners offered to a successor.
    offered: Option<Offered>,
    /// With `--handoff`, once bound: where a successor asks for them.
    successor: Option<tokio::net::UnixListener>,
}

/// The name a listener is offered to a successor under.
fn bind_name(key: &str) -> String {
    format!("upstream {key}")
}

fn bind_key(cfg: &ProxyConfig, i: usize) -> String {
    let b = &cfg.tcp_binds[i];
    if b.bind.port() == 0 {
        format!("{}#{i}", b.bind)
    } else {
        b.bind.to_string()
    }
}

impl Proxy {
    /// Bind every listener and start serving `cfg`.
    pub async fn start(opts: Options, loaded: Loaded) -> Result<Self, ProxyError> {
        let Loaded { config: cfg, text } = loaded;
        let signals = Signals::catch().map_err(ProxyError::Signals)?;
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
        let mut metrics = Metrics::register(registry.sub_registry_with_prefix("trellis"));
        // Periods are summed up only for a control plane to take them.
        metrics.summaries = matches!(opts.source, Source::Xds(_)) && !opts.report_every.is_zero();
        let snap = Snapshot::build(cfg, None, &metrics, creds.is_some());
        let log = AccessLog::new(opts.access_log, metrics.access_log_dropped.clone());
        let spans = match opts.otlp_endpoint.as_deref() {
            None => None,
            Some(e) => {
                let tls = otlp::collector_tls(e, opts.collector_tls())?;
                let headers = otlp::collector_headers(&opts.otlp_headers)?;
                let m = otlp::SpanMetrics::register(registry.sub_registry_with_prefix("trellis"));
                Some(otlp::start(
                    e,
                    tls,
                    headers,
                    span_origin(&snap.cfg, creds.as_ref(), opts.workload.as_ref()),
                    m,
                ))
            }
        };
        // A proxy fed by xDS for a workload holds what the workload needs, and asks for
        // other Services on demand.
        let (demand, asks) = match (&opts.source, &opts.workload) {
            (Source::Xds(_), Some(_)) => {
                let (d, rx) = crate::demand::Demand::new(opts.on_demand_idle);
                registry.sub_registry_with_prefix("trellis").register(
                    "on_demand_lookups",
                    "Requests and mesh DNS queries for a Service the proxy did not hold, which waited for the control plane, by outcome",
                    d.lookups.clone(),
                );
                (Some(Arc::new(d)), Some(rx))
            }
            _ => (None, None),
        };
        let shared = Arc::new(Shared {
            state: ArcSwap::from_pointee(snap),
            telemetry: Arc::new(Telemetry {
                metrics: metrics.clone(),
                log,
                taps: Default::default(),
                spans,
                trace_sampling: opts.trace_sampling,
            }),
            dialer: Arc::new(Dialer {
                metrics,
                tls: creds.clone().map(mtls::MeshTls::new),
                mark: opts.socket_mark,
            }),
            registry,
            drain: Drain::default(),
            source: opts.source.describe(),
            synced: tokio::sync::watch::Sender::new(matches!(opts.source, Source::File(_))),
            xds_status: Default::default(),
            identity: creds,
            inbound_tls: Default::default(),
            mtls_mode: opts.mtls_mode,
            peer_labels: Default::default(),
            host: Default::default(),
            adaptive: Default::default(),
            demand,
        });
        // An upgrade: the running proxy's listeners, taken over before anything is bound.
        let mut inherited = match &opts.handoff {
            Some(path) => handoff::take_over(path).await?,
            None => None,
        };
        let offered = opts.handoff.as_ref().map(|_| Offered::default());
        // The names asked for on demand go to a successor, which asks for them in its first
        // request.
        if let (Some(o), Some(d)) = (&offered, &shared.demand) {
            crate::demand::pass_on(d, o);
        }
        if let (Some(i), Some(d)) = (&inherited, &shared.demand) {
            d.take_over(&i.offer);
        }
        let successor = match (&opts.handoff, &inherited) {
            (Some(path), None) => Some(handoff::bind(path)?),
            _ => None,
        };
        let mut bind = |name: &'static str, addr, v6_only| {
            bind_as(
                inherited.as_mut(),
                offered.as_ref(),
                (name, name),
                addr,
                v6_only,
            )
        };
        let (admin, admin_addr) = bind("admin", opts.admin, false)?;
        let (outbound, outbound_addr) = bind("outbound", opts.outbound, false)?;
        let (inbound, inbound_addr) = bind("inbound", opts.inbound, false)?;
        let v6 = if opts.ipv6_capture {
            let at = |ip: Ipv6Addr, port| SocketAddr::new(ip.into(), port);
            let out6 = at(Ipv6Addr::LOCALHOST, outbound_addr.port());
            let in6 = at(Ipv6Addr::UNSPECIFIED, inbound_addr.port());
            Some((
                bind("outbound (IPv6)", out6, true)?.0,
                bind("inbound (IPv6)", in6, true)?.0,
            ))
        } else {
            None
        };
        let mut proxy = Self {
            shared: shared.clone(),
            builder: Arc::new(server::builder(opts.limits)),
            opts,
            binds: HashMap::new(),
            seen: text,
            in_sync: false,
            asks,
            signals,
            addrs: (admin_addr, outbound_addr, inbound_addr),
            inherited,
            offered,
            successor,
        };
        let snap = shared.state.load_full();
        proxy.binds = proxy.bind_all(&snap.cfg)?;
        // A successor takes the admin listener over too.
        let handed = shared.drain.handed_over();
        tokio::spawn(admin::serve(shared.clone(), admin, handed));
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
    fn bind_all(
        &mut self,
        cfg: &ProxyConfig,
    ) -> Result<HashMap<String, (SocketAddr, JoinHandle<()>)>, ProxyError> {
        let mut out: HashMap<String, (SocketAddr, JoinHandle<()>)> = HashMap::new();
        for (i, b) in cfg.tcp_binds.iter().enumerate() {
            let key = bind_key(cfg, i);
            if self.binds.contains_key(&key) {
                continue;
            }
            let what = format!("upstream {}:{}", b.service.host(), b.port);
            let name = bind_name(&key);
            let from = self.inherited.as_mut();
            let (l, addr) =
                match bind_as(from, self.offered.as_ref(), (&name, &what), b.bind, false) {
                    Ok(bound) => bound,
                    Err(e) => {
                        for (k, (_, h)) in &out {
                            h.abort();
                            self.offered.iter().for_each(|o| o.remove(&bind_name(k)));
                        }
                        return Err(e.into());
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

    /// Describe what the agent set up on this host beside the proxy (capture rules, the
    /// mesh resolver): `/config_dump` shows it as `host`, and `trellis check --proxy`
    /// checks it.
    pub fn describe_host(&self, host: serde_json::Value) {
        *self.shared.host.lock().unwrap_or_else(|p| p.into_inner()) = host;
    }

    /// The services of the live config (for the agent's resolver).
    pub fn services(&self) -> Services {
        Services(self.shared.clone())
    }

    /// Load the file again and swap the config in, or keep the old one and say why.
    pub async fn reload(&mut self) -> Result<(), ProxyError> {
        let res = self.try_reload().await;
        self.count_reload(&res, "full");
        res
    }

    fn count_reload(&self, res: &Result<(), ProxyError>, scope: &'static str) {
        let result = if res.is_ok() { "ok" } else { "error" };
        self.shared
            .telemetry
            .metrics
            .reloads
            .get_or_create(&ReloadLabels { result, scope })
            .inc();
    }

    async fn try_reload(&mut self) -> Result<(), ProxyError> {
        let Source::File(path) = &self.opts.source else {
            return Ok(());
        };
        self.seen = read_config(path)?;
        let file = path.display().to_string();
        let (workload, text) = (self.opts.workload.clone(), self.seen.clone());
        let snap = self
            .build_off_thread(move || translate_text(&file, workload.as_ref(), &text))
            .await?;
        self.swap(snap)
    }

    /// Translate what the control plane sent and swap it in, or refuse it whole. When only
    /// other Workloads changed, only the clusters that hold them are worked out again.
    async fn apply_update(&mut self, u: &xds::Update) -> (Result<(), ProxyError>, &'static str) {
        let file = format!("xds:{}@{}", u.server, u.version);
        let resources = u.resources.clone();
        let workload = self.opts.workload.clone();
        let endpoints_only = u
            .workloads_only
            .clone()
            .filter(|w| self.in_sync && workload.as_ref().is_none_or(|l| !w.contains(l)));
        let scope = if endpoints_only.is_some() {
            "endpoints"
        } else {
            "full"
        };
        let snap = match endpoints_only {
            Some(changed) => {
                let old = self.shared.state.load_full();
                let metrics = self.shared.telemetry.metrics.clone();
                let meshed = self.shared.identity.is_some();
                let built = tokio::task::spawn_blocking(move || {
                    let (cfg, redone) =
                        trellis_model::update_workloads(&file, &old.cfg, &resources, &changed)?;
                    let snap = Snapshot::with_clusters(&old, cfg, &redone, &metrics, meshed);
                    Ok::<_, ConfigError>(snap)
                })
                .await;
                joined(built)
            }
            None => {
                self.build_off_thread(move || {
                    trellis_model::translate(&file, &resources, workload.as_ref())
                })
                .await
            }
        };
        (snap.and_then(|s| self.swap(s)), scope)
    }

    /// Run `translate` and build its snapshot on a blocking thread: a large mesh takes
    /// milliseconds to translate, which the request thread must not spend.
    async fn build_off_thread(
        &self,
        translate: impl FnOnce() -> Result<ProxyConfig, ConfigError> + Send + 'static,
    ) -> Result<Snapshot, ProxyError> {
        let old = self.shared.state.load_full();
        let metrics = self.shared.telemetry.metrics.clone();
        let meshed = self.shared.identity.is_some();
        let built = tokio::task::spawn_blocking(move || {
            let cfg = translate()?;
            Ok::<_, ConfigError>(Snapshot::build(cfg, Some(&old), &metrics, meshed))
        })
        .await;
        joined(built)
    }

    /// Bind what `snap` adds, swap it in, and close what it dropped; all or nothing.
    fn swap(&mut self, snap: Snapshot) -> Result<(), ProxyError> {
        let new_binds = self.bind_all(&snap.cfg)?;
        if let (Some(bundle), Some(current), Some(id)) = (
            &snap.cfg.trust_bundle,
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
        let keep: Vec<String> = (0..snap.cfg.tcp_binds.len())
            .map(|i| bind_key(&snap.cfg, i))
            .collect();
        if let Some(spans) = &self.shared.telemetry.spans {
            let workload = self.opts.workload.as_ref();
            spans.set_origin(span_origin(
                &snap.cfg,
                self.shared.identity.as_ref(),
                workload,
            ));
        }
        self.shared.state.store(Arc::new(snap));
        if let Some(d) = &self.shared.demand {
            d.config_changed();
        }
        self.shared.telemetry.metrics.clear_request_cache();
        let offered = self.offered.as_ref();
        self.binds.retain(|k, (_, h)| {
            let keep = keep.contains(k);
            if !keep {
                h.abort();
                offered.iter().for_each(|o| o.remove(&bind_name(k)));
            }
            keep
        });
        self.binds.extend(new_binds);
        Ok(())
    }

    async fn on_update(&mut self, u: xds::Update) {
        let (res, scope) = self.apply_update(&u).await;
        self.in_sync = res.is_ok();
        self.count_reload(&res, scope);
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
                    // A later config taken: an earlier refusal is history.
                    st.rejected = None;
                    self.shared.synced.send_replace(true);
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
    pub fn identity(&self) -> Option<Arc<ArcSwap<crate::credentials::Credentials>>> {
        self.shared.identity.clone()
    }

    /// Serve until SIGTERM or SIGINT, or until a successor took the listeners over; reload
    /// on SIGHUP and when the file changes. Then drain.
    pub async fn run(self) -> std::io::Result<Stopped> {
        self.run_until(std::future::pending()).await
    }

    /// As [`Proxy::run`], stopping also when `stop` completes (several proxies in one
    /// process, as `trellis demo` runs them).
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<Stopped> {
        self.run_leaving(stop, async {}).await
    }

    /// The listeners and sockets offered to a successor (with `--handoff`): an agent adds its
    /// resolver's sockets and what it passes on.
    pub fn offered(&self) -> Option<&Offered> {
        self.offered.as_ref()
    }

    /// What the process this one takes over from handed over and the proxy did not take (an
    /// agent's resolver's sockets, what it passed on); its listeners are the proxy's.
    pub fn inherited(&mut self) -> Option<&mut Inherited> {
        self.inherited.as_mut()
    }

    /// As [`Proxy::run_until`], and once stopped, `leave` runs before the drain while the proxy
    /// serves on and applies updates: an agent takes its Workload out of the mesh there and
    /// waits until callers have the change, so that none sends it a request it would refuse.
    /// A proxy whose listeners a successor took over drains without `leave`: the workload
    /// stays in the mesh, served by the new process.
    pub async fn run_leaving(
        mut self,
        stop: impl std::future::Future<Output = ()>,
        leave: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<Stopped> {
        tokio::pin!(stop);
        // Taking over: the predecessor stops accepting once this proxy has its first config
        // (bounded), and this one answers at the handoff path from then on.
        let ready = {
            let mut synced = self.shared.synced.subscribe();
            async move {
                let _ = tokio::time::timeout(handoff::READY_WAIT, synced.wait_for(|s| *s)).await;
            }
        };
        tokio::pin!(ready);
        let mut ready_said = false;
        let (successor_tx, mut successor) = tokio::sync::oneshot::channel();
        let mut successor_tx = Some(successor_tx);
        if let Some(l) = self.successor.take() {
            self.serve_successor(l, &mut successor_tx);
        }
        let mut stopped = Stopped::Asked;
        let mut tick = tokio::time::interval(self.opts.watch_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut flush = None;
        let (file, mut updates) = match &self.opts.source {
            Source::File(p) => (Some(p.clone()), None),
            Source::Xds(x) => {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let (link, linked) = tokio::sync::watch::channel(None);
                tokio::spawn(crate::tap_link::run(
                    self.shared.clone(),
                    x.workload.clone().unwrap_or_default(),
                    linked.clone(),
                ));
                tokio::spawn(crate::spill_link::run(
                    self.shared.clone(),
                    x.workload.clone().unwrap_or_default(),
                    linked.clone(),
                ));
                if !self.opts.report_every.is_zero() {
                    let (ftx, frx) = tokio::sync::mpsc::channel(1);
                    flush = Some(ftx);
                    tokio::spawn(crate::reporter::run(
                        self.shared.clone(),
                        self.opts.report_every,
                        x.node_id.clone(),
                        linked,
                        frx,
                    ));
                }
                let x = xds::XdsOptions {
                    identity: self.shared.identity.clone(),
                    ..x.clone()
                };
                let demand = match (self.shared.demand.clone(), self.asks.take()) {
                    (Some(d), Some(asks)) => {
                        let shared = self.shared.clone();
                        let live = move || shared.state.load_full();
                        tokio::spawn(crate::demand::sweep_every(d.clone(), live));
                        Some((d, asks))
                    }
                    _ => None,
                };
                tokio::spawn(xds::run(x, tx, link, demand));
                (None, Some(rx))
            }
        };
        loop {
            let why = tokio::select! {
                _ = self.signals.term.recv() => break,
                _ = self.signals.int.recv(), if self.opts.stop_on_interrupt => break,
                _ = &mut stop => break,
                () = &mut ready, if !ready_said => {
                    ready_said = true;
                    if self.inherited.is_some() {
                        self.took_over(&mut successor_tx);
                        crate::notify::notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
                    } else {
                        crate::notify::notify("READY=1");
                    }
                    continue;
                }
                _ = self.signals.usr2.recv() => {
                    self.start_successor();
                    continue;
                }
                r = &mut successor, if successor_tx.is_none() && !successor.is_terminated() => {
                    match r {
                        Ok(Ok(pid)) => {
                            tracing::info!(successor = pid, "a new process took the listeners over; draining");
                            stopped = Stopped::HandedOver(pid);
                            self.shared.drain.hand_over();
                            break;
                        }
                        Ok(Err(e)) => tracing::error!(error = %e, "the handoff socket failed; upgrades in place are off"),
                        Err(_) => {}
                    }
                    continue;
                }
                _ = self.signals.hup.recv(), if file.is_some() => "SIGHUP",
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
        tokio::pin!(leave);
        if stopped == Stopped::Asked {
            loop {
                tokio::select! {
                    () = &mut leave => break,
                    Some(u) = async { updates.as_mut()?.recv().await }, if updates.is_some() => {
                        self.on_update(u).await;
                    }
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
        // What was recorded since the last report reaches the control plane (bounded: a
        // control plane that is away does not hold up the exit).
        if let Some(f) = flush {
            let (done, wait) = tokio::sync::oneshot::channel();
            if f.send(done).await.is_ok() {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(3), wait).await;
            }
        }
        // Every record made so far reaches the log before the process ends.
        let log = self.shared.telemetry.log.clone();
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
        Ok(stopped)
    }

    /// SIGUSR2: start this binary again (the file at its path: the new one, after an
    /// upgrade) with the same arguments; it takes the listeners over.
    fn start_successor(&self) {
        if self.opts.handoff.is_none() || !self.opts.upgrade_on_usr2 {
            tracing::warn!("SIGUSR2: no upgrade in place without --handoff (or for an agent started by a discovery)");
            return;
        }
        match crate::notify::same_command().and_then(|mut c| c.spawn()) {
            Ok(mut child) => {
                tracing::info!(pid = child.id(), "SIGUSR2: started again to take over");
                // Reaped if it fails; a thread of its own, which the process's exit ends (a
                // blocking task would hold the runtime's shutdown until the successor ends).
                std::thread::spawn(move || child.wait());
            }
            Err(e) => tracing::error!(error = %e, "SIGUSR2: could not start a successor"),
        }
    }

    /// Tell the predecessor to stop accepting, and answer at the handoff path from now on.
    fn took_over(&mut self, tx: &mut Option<tokio::sync::oneshot::Sender<std::io::Result<u32>>>) {
        let Some(inherited) = self.inherited.take() else {
            return;
        };
        let from = inherited.offer.pid;
        if let Err(e) = inherited.finish() {
            tracing::warn!(error = %e, "the predecessor went away before it was told to stop");
        }
        tracing::info!(
            predecessor = from,
            synced = *self.shared.synced.borrow(),
            "took over; the predecessor drains"
        );
        match self.opts.handoff.as_deref().map(handoff::bind) {
            Some(Ok(l)) => self.serve_successor(l, tx),
            Some(Err(e)) => {
                tracing::error!(error = %e, "the handoff socket could not be bound; upgrades in place are off")
            }
            None => {}
        }
    }

    /// Offer the listeners to a successor on `l`; `tx` learns when one took them.
    fn serve_successor(
        &self,
        l: tokio::net::UnixListener,
        tx: &mut Option<tokio::sync::oneshot::Sender<std::io::Result<u32>>>,
    ) {
        let (Some(offered), Some(tx)) = (self.offered.clone(), tx.take()) else {
            return;
        };
        tokio::spawn(async move {
            let _ = tx.send(handoff::serve(l, offered).await);
        });
    }
}

/// Who exports this proxy's spans: its workload, identity, environment and locality.
fn span_origin(
    cfg: &ProxyConfig,
    creds: Option<&Arc<ArcSwap<crate::credentials::Credentials>>>,
    workload: Option<&NamespacedName>,
) -> otlp::Origin {
    let local = cfg.local.as_ref();
    otlp::Origin {
        workload: local
            .map(|l| l.id.to_string())
            .or_else(|| workload.map(ToString::to_string))
            .unwrap_or_default(),
        identity: creds.map(|c| c.load().info.id.to_string()),
        environment: local
            .map(|l| l.environment.as_str().to_string())
            .unwrap_or_default(),
        locality: local
            .map(|l| crate::cluster::locality_label(&l.locality))
            .unwrap_or_default(),
    }
}
