//! `trellis demo`: the whole mesh on this machine, on loopback, and a tour of what an
//! operator sees.
//!
//! A control plane; a `catalog` service whose three instances are joined by agents as a VM,
//! a container and a bare-metal host (environments and localities labelled: this demo runs
//! no real VM or container), and a `catalog-v2` canary; a shopper whose proxy calls the
//! catalog by mutual TLS. Traffic runs until Ctrl-C (or `--duration`) while a story plays,
//! one step every `--step`: steady traffic; the VM's application fails and traffic fails
//! over (application, on that host); the link from the shopper's host to the container's is
//! cut (network, that link); both mend; a canary weight is shifted. Each step prints what
//! `trellis diagnose` or `trellis stat` says, and the single pane shows it live (the demo
//! prints a sign-in link).

mod link;
mod traffic;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::Full;
use hyper::{body::Bytes, Method, Request, Response};
use tokio::sync::watch;
use trellis_model::value::DurationValue;

use crate::client::{Api, Conn};

#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// How long the traffic runs; until Ctrl-C without it.
    #[arg(long)]
    duration: Option<DurationValue>,
    /// How long each step of the story lasts (shorter when --duration is too short for
    /// the five steps).
    #[arg(long, default_value = "20s")]
    step: DurationValue,
    /// Requests per second.
    #[arg(long, default_value_t = 50)]
    rate: u32,
}

/// One instance of the sample application: answers its name, and 503 while `down`.
async fn app(name: &'static str, down: Arc<AtomicBool>) -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    // Requests refused since the application went down: its health check fails once it
    // has refused a few (a broken application's check notices at its next round; were it
    // to fail first, the agent could take the workload out before any request saw the
    // fault, and there would be nothing for diagnose to show).
    let refused = Arc::new(std::sync::atomic::AtomicU32::new(0));
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (down, refused) = (down.clone(), refused.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let failing = if !down.load(Ordering::Relaxed) {
                        refused.store(0, Ordering::Relaxed);
                        false
                    } else if req.uri().path() == "/healthz" {
                        refused.load(Ordering::Relaxed) >= HEALTH_LAGS
                    } else {
                        refused.fetch_add(1, Ordering::Relaxed);
                        true
                    };
                    async move {
                        let mut r = Response::new(Full::new(Bytes::from(name)));
                        if failing {
                            *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Requests a failed application refuses before its health check fails too.
const HEALTH_LAGS: u32 = 3;

const MESH: &str = r#"apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: catalog, namespace: shop }
spec:
  selector: { app: catalog }
  ports: [{ name: http, port: 80, targetPort: 8080, protocol: HTTP }]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: catalog-v2, namespace: shop }
spec:
  selector: { app: catalog-v2 }
  ports: [{ name: http, port: 80, targetPort: 8080, protocol: HTTP }]
---
apiVersion: trellis.dev/v1alpha1
kind: BackendTrafficPolicy
metadata: { name: catalog, namespace: shop }
spec:
  targetRefs: [{ kind: Service, name: catalog }, { kind: Service, name: catalog-v2 }]
  outlierDetection: { consecutiveFailures: 3, baseEjectionTime: 5s }
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: shopper, namespace: shop }
spec:
  address: 127.0.0.1
  identity: shopper
  locality: { region: eu-west, zone: eu-west-1a }
"#;

/// The catalog's route, with `canary` percent to catalog-v2.
fn route(canary: u32) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: catalog, namespace: shop }}
spec:
  parentRefs: [{{ kind: Service, name: catalog, port: 80 }}]
  rules:
    - backendRefs:
        - {{ name: catalog, port: 80, weight: {} }}
        - {{ name: catalog-v2, port: 80, weight: {canary} }}
      retry: {{ attempts: 2, codes: [503], backoff: 5ms }}
"#,
        100 - canary
    )
}

pub(crate) fn demo(a: DemoArgs) -> ExitCode {
    let Some(rt) = crate::runtime(2, "demo") else {
        return ExitCode::FAILURE;
    };
    match rt.block_on(run(a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(a: DemoArgs) -> Result<()> {
    let tmp = std::env::temp_dir();
    remove_stale(&tmp);
    let dir = tmp.join(format!("trellis-demo-{}", std::process::id()));
    let result = scenario(&a, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Remove the state dirs (`trellis-demo-PID`: a control plane's store and admin token) of
/// earlier demos whose process is gone: one stopped before its story began (a Ctrl-C while
/// it starts, a SIGTERM) could not remove its own. Only where `/proc` says which processes
/// live (Linux); a dir whose process still runs is kept.
fn remove_stale(tmp: &std::path::Path) {
    let proc = std::path::Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("trellis-demo-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !proc.join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Wait until every Workload `names` of namespace shop is registered and healthy: each
/// agent registers and passes its first health check on its own, and a request sent before
/// one of them has would be answered `no_healthy_upstream` (right for the mesh, but a
/// failure in the story's tables). Polled every 50 ms, for 30 s at most; then it says which
/// are not.
async fn until_healthy(api: &Api, names: &[&str]) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        // One list of the namespace's Workloads a poll, not one call per name.
        let listed = api
            .call(Method::GET, "/api/v1/resources/Workload/shop", None)
            .await
            .ok();
        let healthy = |n: &str| {
            listed
                .as_ref()
                .and_then(|l| l["items"].as_array())
                .is_some_and(|items| {
                    items.iter().any(|w| {
                        w["metadata"]["name"] == n && w["status"]["health"]["healthy"] == true
                    })
                })
        };
        let waiting: Vec<&str> = names.iter().copied().filter(|n| !healthy(n)).collect();
        if waiting.is_empty() {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "not registered and healthy after 30 s: {}",
                waiting.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A port free a moment ago, for a listener that must be known before it is bound (the
/// container's proxy, behind the link).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn scenario(a: &DemoArgs, dir: &std::path::Path) -> Result<()> {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let control = trellis_control::Control::start(trellis_control::Options {
        data_dir: dir.join("control"),
        api: loopback,
        xds: loopback,
        store: "embedded".into(),
        max_body_bytes: 1 << 20,
        trust_domain: "trellis.local".into(),
        svid_ttl: Duration::from_secs(3600),
        ca_files: None,
        // One-second slots: each step of the story is a window of its own.
        telemetry: trellis_telemetry::store::Limits {
            fine_ms: 1_000,
            fine_slots: 900,
            coarse_ms: 60_000,
            coarse_slots: 60,
            ..Default::default()
        },
        advertise: None,
    })
    .await?;
    let token = control
        .new_token
        .clone()
        .context("the demo's control plane made no admin token")?;
    let api = Api::new(&Conn {
        server: Some(format!("http://{}", control.api_addr)),
        token: Some(token),
        ca_hash: None,
    })?;
    let xds = vec![format!("http://{}", control.xds_addr)];
    println!(
        "control plane: API http://{}  xDS {}",
        control.api_addr, xds[0]
    );
    api.call(Method::POST, "/api/v1/apply?file=demo", Some(MESH.into()))
        .await?;
    api.call(Method::POST, "/api/v1/apply?file=demo", Some(route(0)))
        .await?;
    let join_token = |identity: &'static str, uses: u32| {
        let api = &api;
        async move {
            let body = serde_json::json!({ "namespace": "shop", "identity": identity, "ttlSeconds": 600, "uses": uses });
            let v = api
                .call(Method::POST, "/api/v1/tokens", Some(body.to_string()))
                .await?;
            v["token"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("no token in {v}"))
        }
    };

    // Four instances, each joined by an agent; the container's proxy sits behind a link
    // that the story cuts.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let catalog_token = join_token("catalog", 4).await?;
    let vm_down = Arc::new(AtomicBool::new(false));
    let container_inbound = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let link = link::Link::start(container_inbound).await?;
    let places = [
        ("catalog-vm", "catalog", "vm", "eu-west", "eu-west-1a"),
        (
            "catalog-container",
            "catalog",
            "container",
            "eu-west",
            "eu-west-1b",
        ),
        (
            "catalog-bare-metal",
            "catalog",
            "bare-metal",
            "us-east",
            "us-east-1a",
        ),
        (
            "catalog-v2",
            "catalog-v2",
            "container",
            "eu-west",
            "eu-west-1a",
        ),
    ];
    let mut agents = Vec::new();
    for (name, app_label, env, region, zone) in places {
        let down = if name == "catalog-vm" {
            vm_down.clone()
        } else {
            Arc::default()
        };
        let port = app(name, down).await?.port();
        // The agent fills in source, workload and identity.
        let mut proxy = proxy_options(trellis_proxy::Source::File(Default::default()), None, None);
        let mut spec = serde_json::json!({
            "address": "127.0.0.1",
            "environment": env,
            "locality": { "region": region, "zone": zone },
            "ports": { "http": port },
        });
        if name == "catalog-container" {
            proxy.inbound = container_inbound;
            spec["inboundPort"] = link.port.into();
        }
        let opts = trellis_agent::AgentOptions {
            servers: xds.clone(),
            name: name.into(),
            labels: BTreeMap::from([("app".into(), app_label.into())]),
            spec,
            identity: trellis_proxy::identity::IdentityOptions {
                state_dir: dir.join(name),
                join_token: Some(catalog_token.clone()),
                ca_hash: None,
            },
            proxy,
            health: trellis_agent::Health {
                check: trellis_agent::Check::Http {
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    path: "/healthz".into(),
                },
                interval: Duration::from_millis(300),
                timeout: Duration::from_secs(1),
                healthy_threshold: 1,
                unhealthy_threshold: 1,
            },
            capture: None,
            dns: None,
        };
        agents.push(tokio::spawn(trellis_agent::run_until(
            opts,
            stop(stop_rx.clone()),
        )));
        println!("joined {name:<19} as {env:<10} in {region}/{zone}");
    }

    // The shopper's proxy: the catalog through its local bind, by mutual TLS.
    let source = trellis_proxy::Source::Xds(trellis_proxy::xds::XdsOptions {
        servers: xds.clone(),
        node_id: "shop/shopper@demo".into(),
        workload: Some("shop/shopper".into()),
        identity: None,
    });
    let identity = trellis_proxy::identity::IdentityOptions {
        state_dir: dir.join("shopper"),
        join_token: Some(join_token("shopper", 1).await?),
        ca_hash: None,
    };
    let workload = "shop/shopper".parse().map_err(|e| anyhow!("{e}"))?;
    let opts = proxy_options(source, Some(workload), Some(identity));
    let loaded = trellis_proxy::load(&opts)?;
    let shopper = trellis_proxy::Proxy::start(opts, loaded).await?;
    let bind = shopper.addrs.1;
    let shopper_task = tokio::spawn(shopper.run_until(stop(stop_rx.clone())));
    println!("shopper (eu-west-1a) -> catalog.shop through its proxy at http://{bind}/ (mTLS between proxies)");

    let pane = api
        .call(Method::POST, "/api/v1/ui/links", None)
        .await
        .ok()
        .and_then(|v| v["path"].as_str().map(|p| format!("{}{p}", api.server())));
    if let Some(url) = &pane {
        println!("\nthe single pane (this link signs you in once): {url}\n");
    }

    // Every catalog workload registered and healthy before the first request.
    let names = places.map(|p| p.0);
    let warm = match until_healthy(&api, &names).await {
        Ok(()) => traffic::warm_up(bind, "catalog-vm").await,
        Err(e) => Err(e),
    };
    let result = match warm {
        Ok(warm) => {
            let story = Story {
                api: &api,
                vm_down: &vm_down,
                link: &link,
                pane: pane.as_deref(),
            };
            let out = story.play(a, bind).await;
            out.map(|t| (t, warm))
        }
        Err(e) => Err(e),
    };
    if let Ok((t, (warm, warm_failed))) = &result {
        fleet_view(&api, t.sent, t.start).await;
        let not_ok = match warm_failed {
            0 => String::new(),
            n => format!(", {n} of them not answered"),
        };
        println!(
            "{} requests, {} failed ({warm} more before the story{not_ok}, while the caller's zone came up: the table above counts them too)",
            t.sent, t.failed
        );
    }
    let _ = stop_tx.send(true);
    for a in agents {
        let _ = a.await;
    }
    let _ = shopper_task.await;
    println!("agents deregistered; stopped");
    result.map(drop)
}

/// What the story did.
struct Told {
    sent: u64,
    failed: u64,
    start: Instant,
}

/// The story's levers.
struct Story<'a> {
    api: &'a Api,
    vm_down: &'a AtomicBool,
    link: &'a link::Link,
    pane: Option<&'a str>,
}

impl Story<'_> {
    /// Run the traffic and tell the story, until Ctrl-C or `--duration`.
    async fn play(&self, a: &DemoArgs, bind: SocketAddr) -> Result<Told> {
        let start = Instant::now();
        let deadline = a.duration.as_ref().map(|d| start + d.0);
        let step = match &a.duration {
            Some(d) => a.step.0.min(d.0 / 5),
            None => a.step.0,
        }
        .max(Duration::from_secs(1));
        let (end_tx, mut end) = watch::channel(false);
        let every = Arc::new(AtomicU64::new(1_000));
        let totals = Arc::new(Mutex::new(traffic::Totals::default()));
        let load = tokio::spawn(traffic::run(
            bind,
            a.rate,
            start,
            every.clone(),
            totals.clone(),
            end.clone(),
        ));
        let ending = tokio::spawn(async move {
            let limit = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = limit => {}
                _ = tokio::signal::ctrl_c() => {
                    println!("\n(Ctrl-C at t={:.1}s)", start.elapsed().as_secs_f64());
                }
            }
            let _ = end_tx.send(true);
        });
        // A step's window reaches a little before it: a report is filed by the start of its
        // period, so what failed in the step's first second may be filed a second earlier.
        let secs = step.as_secs().max(1) + 2;
        let steps: [(&str, Lever); 5] = [
            ("steady traffic: the shopper's own zone (eu-west-1a) serves it, from the VM; the container (eu-west-1b) and the bare-metal host (us-east) stand by", Lever::None),
            ("the VM's application fails (503, and its health check): retries and the agent's health check move the traffic to the container in the next zone", Lever::VmDown(true)),
            ("the link from the shopper's host to the container's host is cut (connections refused): outlier detection ejects the container, traffic fails over to the bare-metal host in us-east", Lever::Link(false)),
            ("the link is mended and the VM's application recovers: traffic comes back to the caller's zone", Lever::Mend),
            ("a canary: 20 % of the catalog's traffic shifts to catalog-v2 with one weight change, pushed to every proxy", Lever::Canary(20)),
        ];
        for (i, (what, lever)) in steps.into_iter().enumerate() {
            if *end.borrow() {
                break;
            }
            println!(
                "--- t={:>5.1}s  step {}/5: {what}",
                start.elapsed().as_secs_f64(),
                i + 1
            );
            self.pull(&lever).await;
            let whole = pause(&mut end, step).await;
            // What the step shows, even when the demo ends during it.
            match lever {
                Lever::VmDown(_) | Lever::Link(_) => self.diagnose(secs).await,
                Lever::Canary(_) => self.stat_workloads(secs).await,
                _ => {}
            }
            if !whole {
                break;
            }
        }
        if !*end.borrow() {
            every.store(10_000, Ordering::Relaxed);
            match (deadline, self.pane) {
                (None, Some(url)) => println!(
                    "--- the story is over; the traffic goes on (a line every 10 s) until Ctrl-C. Watch it in the pane: {url}"
                ),
                (None, None) => println!("--- the story is over; the traffic goes on until Ctrl-C"),
                (Some(_), _) => println!("--- the story is over; the traffic goes on until --duration ends"),
            }
        }
        let _ = end.wait_for(|e| *e).await;
        let _ = load.await;
        ending.abort();
        let t = totals.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Told {
            sent: t.sent,
            failed: t.failed,
            start,
        })
    }

    async fn pull(&self, lever: &Lever) {
        match lever {
            Lever::None => {}
            Lever::VmDown(down) => self.vm_down.store(*down, Ordering::Relaxed),
            Lever::Link(up) => self.link.set(*up),
            Lever::Mend => {
                self.link.set(true);
                self.vm_down.store(false, Ordering::Relaxed);
            }
            Lever::Canary(percent) => {
                if let Err(e) = self
                    .api
                    .call(
                        Method::POST,
                        "/api/v1/apply?file=demo",
                        Some(route(*percent)),
                    )
                    .await
                {
                    eprintln!("demo: shifting the canary: {e:#}");
                }
            }
        }
    }

    /// What `trellis diagnose -n shop --since Ns` says now.
    async fn diagnose(&self, secs: u64) {
        println!("\n$ trellis diagnose -n shop --since {secs}s");
        let v = self
            .api
            .call(
                Method::GET,
                &format!("/api/v1/diagnose?namespace=shop&window={secs}s"),
                None,
            )
            .await
            .ok()
            .and_then(|v| {
                serde_json::from_value::<Vec<trellis_telemetry::diagnose::Verdict>>(
                    v["verdicts"].clone(),
                )
                .ok()
            })
            .unwrap_or_default();
        if v.is_empty() {
            println!("No problem found.\n");
        }
        for x in &v {
            println!("{}", crate::diagnose::block(x));
        }
    }

    /// What `trellis stat workloads -n shop --window Ns` says now.
    async fn stat_workloads(&self, secs: u64) {
        println!("\n$ trellis stat workloads -n shop --window {secs}s");
        let rows = self
            .api
            .call(
                Method::GET,
                &format!("/api/v1/stat?namespace=shop&kind=workload&window={secs}s"),
                None,
            )
            .await
            .ok()
            .and_then(|v| serde_json::from_value::<Vec<trellis_telemetry::view::StatRow>>(v).ok())
            .unwrap_or_default();
        crate::fleet::print_stat(&rows, false);
        println!();
    }
}

/// What a step of the story changes.
enum Lever {
    None,
    VmDown(bool),
    Link(bool),
    Mend,
    Canary(u32),
}

/// Wait `d`, or less if the demo ends: whether it did not.
async fn pause(end: &mut watch::Receiver<bool>, d: Duration) -> bool {
    let slept = tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = end.wait_for(|e| *e) => false,
    };
    slept && !*end.borrow()
}

/// What the control plane saw, from the proxies' reports: `trellis stat` and `trellis edges`
/// for the namespace since the traffic started at `start`, once the catalog's row counts at
/// least the `sent` requests of the story and no more come in for longer than a report
/// period (or after 10 s).
async fn fleet_view(api: &Api, sent: u64, start: Instant) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = (0, Instant::now());
    let window = || start.elapsed().as_secs() + 2;
    let stat = loop {
        let window_s = window();
        let v = api
            .call(
                Method::GET,
                &format!("/api/v1/stat?namespace=shop&window={window_s}s"),
                None,
            )
            .await
            .ok()
            .and_then(|v| serde_json::from_value::<Vec<trellis_telemetry::view::StatRow>>(v).ok())
            .unwrap_or_default();
        let counted = v
            .iter()
            .find(|r| r.name == "shop/catalog")
            .map_or(0, |r| r.figures.requests);
        if counted != last.0 {
            last = (counted, Instant::now());
        }
        let settled = counted >= sent && last.1.elapsed() > Duration::from_millis(1500);
        if settled || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let edges = api
        .call(
            Method::GET,
            &format!("/api/v1/edges?namespace=shop&window={}s", window()),
            None,
        )
        .await
        .ok()
        .and_then(|v| serde_json::from_value::<Vec<trellis_telemetry::view::EdgeRow>>(v).ok())
        .unwrap_or_default();
    println!(
        "
what the control plane saw, from the proxies' reports (trellis stat -n shop -o wide):"
    );
    crate::fleet::print_stat(&stat, true);
    println!(
        "
caller -> callee (trellis edges -n shop):"
    );
    crate::fleet::print_edges(&edges, false);
    println!();
}

/// A proxy on ephemeral loopback ports, quiet, with a short drain.
fn proxy_options(
    source: trellis_proxy::Source,
    workload: Option<trellis_model::resource::NamespacedName>,
    identity: Option<trellis_proxy::identity::IdentityOptions>,
) -> trellis_proxy::Options {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    trellis_proxy::Options {
        source,
        workload,
        admin: loopback,
        outbound: loopback,
        inbound: loopback,
        drain_timeout: Duration::from_secs(2),
        watch_interval: Duration::from_secs(1),
        limits: trellis_proxy::ServerLimits {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 << 10,
            idle_timeout: Duration::from_secs(60),
        },
        access_log: false,
        identity,
        mtls_mode: None,
        socket_mark: None,
        ipv6_capture: false,
        // Every second rather than every ten: each step of the story is short.
        report_every: Duration::from_secs(1),
        otlp_endpoint: None,
        otlp_ca: None,
        otlp_client_cert: None,
        otlp_client_key: None,
        otlp_headers: Vec::new(),
        trace_sampling: trellis_proxy::options::DEFAULT_TRACE_SAMPLING,
        on_demand_idle: trellis_proxy::options::DEFAULT_ON_DEMAND_IDLE,
        handoff: None,
        upgrade_on_usr2: false,
        // Ctrl-C is the demo's: its traffic stops first, then its proxies, so that none
        // is drained under a request in flight.
        stop_on_interrupt: false,
    }
}

#[cfg(test)]
mod tests {
    /// A dir of a demo whose process is gone is removed; one of a process that runs, and
    /// anything not named as a demo's, are kept.
    #[test]
    fn stale_demo_dirs_go_and_live_ones_stay() {
        let tmp = std::env::temp_dir().join(format!("trellis-test-stale-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let dead = tmp.join(format!("trellis-demo-{gone}"));
        let live = tmp.join(format!("trellis-demo-{}", std::process::id()));
        let other = tmp.join("trellis-demo-notapid");
        for d in [&dead, &live, &other] {
            std::fs::create_dir_all(d.join("control")).unwrap();
            std::fs::write(d.join("control/admin.token"), "t").unwrap();
        }
        super::remove_stale(&tmp);
        let (dead_kept, live_kept, other_kept) = (dead.exists(), live.exists(), other.exists());
        std::fs::remove_dir_all(&tmp).unwrap();
        assert!(!dead_kept, "a gone process's dir is removed");
        assert!(live_kept, "a running process's dir is kept");
        assert!(other_kept, "a dir not named by a pid is kept");
    }
}
