//! `trellis demo`: the whole mesh on this machine, on loopback.
//!
//! A control plane; a `catalog` service whose three instances are joined by agents as a VM,
//! a container and a bare-metal host (environments and localities labelled: this demo runs
//! no real VM or container); a shopper whose proxy calls the catalog by mutual TLS. Traffic
//! runs for `--duration`; a third of the way in the VM's application starts failing its
//! health check, and the traffic moves to the container in the same region; later it
//! recovers. Every second one line shows who served what.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Method, Request, Response};
use trellis_model::value::DurationValue;

use crate::client::{Api, Conn};

#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// How long the traffic runs.
    #[arg(long, default_value = "30s")]
    duration: DurationValue,
    /// Requests per second.
    #[arg(long, default_value_t = 50)]
    rate: u32,
}

/// One instance of the sample application: answers its name, and 503 while `down`.
async fn app(name: &'static str, down: Arc<AtomicBool>) -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let down = down.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let down = down.load(Ordering::Relaxed);
                        async move {
                            let mut r = Response::new(Full::new(Bytes::from(name)));
                            if down {
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

const MESH: &str = r#"apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: catalog, namespace: shop }
spec:
  selector: { app: catalog }
  ports: [{ name: http, port: 80, targetPort: 8080, protocol: HTTP }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: catalog, namespace: shop }
spec:
  parentRefs: [{ kind: Service, name: catalog, port: 80 }]
  rules:
    - retry: { attempts: 2, codes: [503], backoff: 5ms }
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: shopper, namespace: shop }
spec:
  address: 127.0.0.1
  identity: shopper
  locality: { region: eu-west, zone: eu-west-1a }
"#;

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
    let dir = std::env::temp_dir().join(format!("trellis-demo-{}", std::process::id()));
    let result = scenario(&a, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
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
        telemetry: Default::default(),
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

    // Three instances of the catalog, each joined by an agent.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let catalog_token = join_token("catalog", 3).await?;
    let vm_down = Arc::new(AtomicBool::new(false));
    let places = [
        ("catalog-vm", "vm", "eu-west", "eu-west-1a", vm_down.clone()),
        (
            "catalog-container",
            "container",
            "eu-west",
            "eu-west-1b",
            Arc::default(),
        ),
        (
            "catalog-bare-metal",
            "bare-metal",
            "us-east",
            "us-east-1a",
            Arc::default(),
        ),
    ];
    let mut agents = Vec::new();
    for (name, env, region, zone, down) in places {
        let port = app(name, down).await?.port();
        // The agent fills in source, workload and identity.
        let proxy = proxy_options(trellis_proxy::Source::File(Default::default()), None, None);
        let opts = trellis_agent::AgentOptions {
            servers: xds.clone(),
            name: name.into(),
            labels: BTreeMap::from([("app".into(), "catalog".into())]),
            spec: serde_json::json!({
                "address": "127.0.0.1",
                "environment": env,
                "locality": { "region": region, "zone": zone },
                "ports": { "http": port },
            }),
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
    let shopper_dir = dir.join("shopper");
    let source = trellis_proxy::Source::Xds(trellis_proxy::xds::XdsOptions {
        servers: xds.clone(),
        node_id: "shop/shopper@demo".into(),
        workload: Some("shop/shopper".into()),
        identity: None,
    });
    let identity = trellis_proxy::identity::IdentityOptions {
        state_dir: shopper_dir,
        join_token: Some(join_token("shopper", 1).await?),
        ca_hash: None,
    };
    let workload = "shop/shopper".parse().map_err(|e| anyhow!("{e}"))?;
    let opts = proxy_options(source, Some(workload), Some(identity));
    let loaded = trellis_proxy::load(&opts)?;
    let shopper = trellis_proxy::Proxy::start(opts, loaded).await?;
    let bind = shopper.addrs.1;
    let shopper_task = tokio::spawn(shopper.run_until(stop(stop_rx.clone())));
    println!(
        "shopper -> catalog.shop through its proxy at http://{bind}/ (mTLS between proxies)\n"
    );

    let result = traffic(a, bind, &vm_down).await;
    if let Ok(sent) = &result {
        // A window a little longer than the story, so that its rates are about the story's.
        let window = a.duration.0.as_secs() + 10;
        fleet_view(&api, *sent, window).await;
    }
    let _ = stop_tx.send(true);
    for a in agents {
        let _ = a.await;
    }
    let _ = shopper_task.await;
    println!("agents deregistered; stopped");
    result.map(drop)
}

/// What the control plane saw, from the proxies' reports: `trellis stat` and `trellis edges`
/// for the namespace, once the catalog's row counts at least the `sent` requests of the story
/// and no more come in for longer than a report period (or after 10 s).
async fn fleet_view(api: &Api, sent: u32, window_s: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = (0, Instant::now());
    let stat = loop {
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
        let settled = counted >= u64::from(sent) && last.1.elapsed() > Duration::from_millis(1500);
        if settled || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let edges = api
        .call(
            Method::GET,
            &format!("/api/v1/edges?namespace=shop&window={window_s}s"),
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
        // Every second rather than every ten: the demo is short, and its last table shows
        // what the control plane saw.
        report_every: Duration::from_secs(1),
        otlp_endpoint: None,
        trace_sampling: trellis_proxy::options::DEFAULT_TRACE_SAMPLING,
    }
}

async fn get(bind: SocketAddr) -> Result<(u16, String)> {
    let s = tokio::net::TcpStream::connect(bind).await?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await?;
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "catalog.shop")
        .body(Full::new(Bytes::new()))?;
    let r = send.send_request(req).await?;
    let st = r.status().as_u16();
    let body = r.into_body().collect().await?.to_bytes();
    Ok((st, String::from_utf8_lossy(&body).into_owned()))
}

/// Send `rate` requests a second for `duration`, break the VM's app a third of the way
/// in and mend it at two thirds; print one line a second. Fails if a request failed.
async fn traffic(a: &DemoArgs, bind: SocketAddr, vm_down: &AtomicBool) -> Result<u32> {
    // Wait until the caller's own zone answers: every agent registers on its own, and a
    // request sent while only the container had joined would be served from the next
    // zone, which is right but not the story the demo tells.
    let ready = Instant::now();
    let mut warm = 0u32;
    loop {
        warm += 1;
        if matches!(get(bind).await, Ok((200, who)) if who == "catalog-vm") {
            break;
        }
        if ready.elapsed() > Duration::from_secs(30) {
            return Err(anyhow!(
                "the catalog did not answer from the caller's zone within 30 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = a.duration.0;
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / a.rate.max(1));
    let (mut second, mut failed, mut sent) = (BTreeMap::<String, u32>::new(), 0u32, 0u32);
    let mut last_print = Instant::now();
    let (mut broke, mut mended) = (false, false);
    while start.elapsed() < total {
        tick.tick().await;
        let t = start.elapsed();
        if !broke && t >= total / 3 {
            broke = true;
            vm_down.store(true, Ordering::Relaxed);
            println!("--- t={:>4.1}s  the VM's application fails its health check: failover to the nearest healthy locality", t.as_secs_f64());
        }
        if !mended && t >= total * 2 / 3 {
            mended = true;
            vm_down.store(false, Ordering::Relaxed);
            println!(
                "--- t={:>4.1}s  the VM's application recovers",
                t.as_secs_f64()
            );
        }
        sent += 1;
        match get(bind).await {
            Ok((200, who)) => *second.entry(who).or_default() += 1,
            Ok((st, body)) => {
                failed += 1;
                eprintln!("request failed: {st} {body}");
            }
            Err(e) => {
                failed += 1;
                eprintln!("request failed: {e}");
            }
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let who: Vec<String> = second.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("t={:>4.1}s  served by: {}", t.as_secs_f64(), who.join(", "));
            second.clear();
        }
    }
    println!(
        "\n{sent} requests, {failed} failed ({warm} more before: waiting for the caller's zone)"
    );
    if failed > 0 {
        return Err(anyhow!("{failed} of {sent} requests failed"));
    }
    Ok(sent)
}
