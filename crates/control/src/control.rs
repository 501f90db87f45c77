//! A running control plane: the store opened, the CA established, the API and xDS listeners
//! bound, and the task that follows the store.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use trellis_store::Store;

use crate::{
    agent, api, catalog::Catalog, error::ControlError, events::Events, identity, registry,
    replicas, state::State, tls, token, xds,
};

/// How the control plane runs. Built once from flags at the edge.
#[derive(Clone, Debug)]
pub struct Options {
    /// Data directory (embedded store, admin token).
    pub data_dir: PathBuf,
    /// HTTP API address.
    pub api: SocketAddr,
    /// xDS (gRPC) address.
    pub xds: SocketAddr,
    /// `embedded` or `etcd://HOST:PORT[,HOST:PORT...]`.
    pub store: String,
    /// Largest request body the API accepts.
    pub max_body_bytes: usize,
    /// SPIFFE trust domain of the mesh's identities.
    pub trust_domain: String,
    /// Lifetime of the certificates the CA issues.
    pub svid_ttl: Duration,
    /// The operator's CA (a root, or an intermediate with its root as the bundle), instead
    /// of a root the control plane makes.
    pub ca_files: Option<identity::CaFiles>,
    /// How much of the fleet's telemetry is kept: slots and series caps.
    pub telemetry: trellis_telemetry::store::Limits,
    /// The xDS address other replicas reach this one at (on a shared store); the bound xDS
    /// address when absent.
    pub advertise: Option<SocketAddr>,
}

/// A running control plane.
pub struct Control {
    /// Bound API address.
    pub api_addr: SocketAddr,
    /// Bound xDS address.
    pub xds_addr: SocketAddr,
    /// The admin token, when this start created it (printed once).
    pub new_token: Option<String>,
    /// `sha256:HEX` of the signing root: what proxies (`--ca-hash`) and the CLI
    /// (`--api-ca-hash`) pin to reach this control plane over TLS.
    pub ca_hash: String,
}

/// Listen backlog: a fleet reconnecting at once (after a control-plane restart) must not
/// overflow it; tokio's default of 1,024 resets connections of a thousand proxies. The kernel
/// caps it at `net.core.somaxconn`.
const BACKLOG: u32 = 8192;

fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, ControlError> {
    let listen = || {
        let s = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        s.set_reuseaddr(true)?;
        s.bind(addr)?;
        s.listen(BACKLOG)
    };
    listen().map_err(|source| ControlError::Bind { addr, what, source })
}

/// Follow the store from `catalog` (the listing `w` starts after): apply every change; list
/// again when the watch is lost.
async fn follow(
    store: Store,
    tx: watch::Sender<Arc<State>>,
    mut catalog: Catalog,
    mut w: trellis_store::Watch,
    events: Events,
) {
    loop {
        loop {
            let change = match w.next().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "store watch ended; listing again");
                    break;
                }
            };
            events.observe(&catalog, &change);
            let mut changed = catalog.apply(change);
            // Coalesce a burst: compile once for every batch already waiting.
            let mut lost = false;
            while let Some(next) = w.try_next() {
                match next {
                    Ok(c) => {
                        events.observe(&catalog, &c);
                        changed |= catalog.apply(c);
                    }
                    Err(_) => {
                        lost = true;
                        break;
                    }
                }
            }
            // The control plane's own records (heartbeats of replicas, join tokens) change
            // nothing proxies get: no compile, no push.
            if changed {
                publish(&tx, &mut catalog);
            }
            if lost {
                break;
            }
        }
        let mut backoff = Duration::from_millis(100);
        (catalog, w) = loop {
            match store.list_and_watch().await {
                Ok((listing, w)) => break (Catalog::from_listing(listing), w),
                Err(e) => {
                    tracing::warn!(error = %e, "store unavailable; serving the last state");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        publish(&tx, &mut catalog);
    }
}

/// How long the mesh must stay unchanged before the memory its last compile freed is given
/// back, and how often it is given back anyway (streams' syncs free memory too).
const QUIET: Duration = Duration::from_secs(2);
const RELEASE_EVERY: Duration = Duration::from_secs(60);

/// Give the memory the allocator holds free back to the system once changes settle, and
/// every minute: a compile of a large mesh, or a thousand proxies syncing, peaks the heap, and
/// glibc keeps what was freed (311 MiB resident for a 90 MiB heap, 135 MiB after; see
/// `trellis_memory`). On a blocking thread: it walks every arena under its lock.
async fn give_memory_back(mut state: watch::Receiver<Arc<State>>) {
    let mut every = tokio::time::interval(RELEASE_EVERY);
    every.tick().await;
    loop {
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                // Until the changes settle.
                while let Ok(Ok(())) = tokio::time::timeout(QUIET, state.changed()).await {}
            }
            _ = every.tick() => {}
        }
        let _ = tokio::task::spawn_blocking(trellis_memory::release).await;
    }
}

fn publish(tx: &watch::Sender<Arc<State>>, catalog: &mut Catalog) {
    let prev = tx.borrow().compiled.clone();
    let compiled = Arc::new(catalog.compile_after(&prev));
    tx.send_replace(Arc::new(State {
        catalog: catalog.clone(),
        compiled,
    }));
}

impl Control {
    /// Open the store, bind both listeners and start serving.
    pub async fn start(opts: Options) -> Result<Self, ControlError> {
        // The data dir holds the admin token, and the embedded store holds the CA's key:
        // only the control plane's user may read it.
        let dir_io = |source| ControlError::Io {
            path: opts.data_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&opts.data_dir).map_err(dir_io)?;
        std::fs::set_permissions(
            &opts.data_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(dir_io)?;
        let store = Store::open(&opts.store, &opts.data_dir).await?;
        let (token, new_token) = token::establish(&store, &opts.data_dir).await?;
        let ttl_range = Duration::from_secs(10)..=Duration::from_secs(365 * 24 * 3600);
        if !ttl_range.contains(&opts.svid_ttl) {
            return Err(ControlError::Identity(format!(
                "--svid-ttl {:?} is out of range (10s to 8760h)",
                opts.svid_ttl
            )));
        }
        let identity = Arc::new(
            identity::Identity::new(
                &store,
                opts.ca_files.as_ref(),
                &opts.trust_domain,
                opts.svid_ttl,
            )
            .await?,
        );
        let api_l = bind(opts.api, "api")?;
        let xds_l = bind(opts.xds, "xds")?;
        let api_addr = api_l.local_addr().map_err(|source| ControlError::Bind {
            addr: opts.api,
            what: "api",
            source,
        })?;
        let xds_addr = xds_l.local_addr().map_err(|source| ControlError::Bind {
            addr: opts.xds,
            what: "xds",
            source,
        })?;
        // The first state is read before serving, so that no proxy ever gets an empty config
        // for a store that has resources.
        let (listing, w) = store.list_and_watch().await?;
        let catalog = Catalog::from_listing(listing);
        let compiled = Arc::new(catalog.compile());
        let (tx, rx) = watch::channel(Arc::new(State {
            catalog: catalog.clone(),
            compiled,
        }));
        let events = Events::default();
        tokio::spawn(follow(store.clone(), tx, catalog, w, events.clone()));
        tokio::spawn(give_memory_back(rx.clone()));
        let proxies = registry::Registry::default();
        // Replicas on a shared store find each other, to answer fleet queries for the whole
        // fleet; with the embedded store there is only this one.
        let replicas = (store.describe() == "etcd").then(|| {
            let at = opts.advertise.unwrap_or(xds_addr);
            if at.ip().is_unspecified() {
                tracing::warn!(%at, "the xDS listener is bound to every address: other replicas cannot reach this one for fleet queries until --advertise names an address they can");
            }
            let r = replicas::Replicas::new(store.clone(), identity.clone(), at);
            tokio::spawn(r.clone().beat());
            r
        });
        let api = api::Api::new(
            store,
            rx.clone(),
            proxies.clone(),
            token,
            identity,
            opts.max_body_bytes,
            Arc::new(crate::fleet::Fleet::new(
                opts.telemetry.clone(),
                &opts.trust_domain,
            )),
            replicas.clone(),
            events,
            crate::pane::Pane::new(api_addr),
        );
        let certificates = api.certificate_router();
        tokio::spawn(agent::sweep(api.agents().clone(), api.store().clone()));
        tokio::spawn(api.rollouts().clone().run());
        tokio::spawn(crate::spill::run(api.spill().clone(), rx.clone(), replicas));
        let ca_hash = api
            .identity()
            .ca(api.store())
            .await
            .ok()
            .and_then(|c| trellis_identity::tls::ca_hash(c.cert_pem()))
            .unwrap_or_default();
        let serving = tls::serving(api.identity_arc(), api.store().clone(), &[b"h2"]).await?;
        if api_addr.ip().is_loopback() {
            tokio::spawn(api.serve(api_l));
        } else {
            let alpn: &[&[u8]] = &[b"h2", b"http/1.1"];
            let tls = tls::serving(api.identity_arc(), api.store().clone(), alpn).await?;
            let l = tls::TlsListener::new(api_l, tls).map_err(|source| ControlError::Bind {
                addr: api_addr,
                what: "api",
                source,
            })?;
            tracing::info!(%api_addr, "the API is served over TLS only (not on loopback)");
            tokio::spawn(api.serve_tls(l));
        }
        tokio::spawn(xds::serve(rx, proxies, xds_l, certificates, serving));
        tracing::info!(%api_addr, %xds_addr, store = %opts.store, "control plane listening");
        Ok(Self {
            api_addr,
            xds_addr,
            new_token,
            ca_hash,
        })
    }
}
