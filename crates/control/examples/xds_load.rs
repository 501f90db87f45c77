//! xDS push benchmark: many simulated proxies against one `trellis control` process.
//!
//! ```text
//! cargo run --release -p trellis-control --example xds_load -- \
//!     --bin target/release/trellis --clients 1000 --workloads 10000 --rounds 10
//! ```
//!
//! It starts the control plane (the real binary, embedded store) on loopback, applies
//! `--workloads` Workloads spread over 100 Services, and opens `--clients` ADS streams, one TCP
//! connection each, subscribed to the Trellis documents (delta xDS, as `trellis proxy`). Each
//! client ACKs every response at once. Then, per round, it applies one change (a route's
//! weights) and measures, for every client, the time from sending the apply to that client's
//! ACK of the change (the apply's own validation and store write included). It prints p50/p99/max over clients per round and overall, the
//! control plane's RSS (current and peak) and the CPU it used per round.
//!
//! With `--calls K` each client is a proxy for a Workload of its own that calls K Services
//! (scoped delivery: it gets what it calls); the route change then concerns only the callers
//! of `svc-0`, whose ACKs are measured, and each round also changes one Workload of another
//! Service and counts the clients sent anything (its callers alone should be). `--services`
//! sets how many Services the Workloads are spread over.
//!
//! With `--proxy --steady SECONDS` a real proxy (CPU 0, with `wrk`) serves paced load while
//! Workloads elsewhere change 10 times a second, the control plane on CPU 1. Run this program
//! itself on CPU 0 (`taskset -c 0 target/release/examples/xds_load ...`): it is the upstream
//! application the proxy calls, and left free it shares CPU 1 with the control plane, whose
//! bursts then show in the proxy's p99 (measured: 1.3 → 3.4-4.5 ms) though the proxy does
//! nothing. `--unpinned` leaves the control plane and the proxy free too.

mod common;

use common::proc_stat;
use std::{
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use trellis_xds::{
    envoy_types::pb::envoy::service::discovery::v3::{
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        DeltaDiscoveryRequest,
    },
    DOCUMENT_TYPE, PARTIAL_SUFFIX,
};

struct Args {
    bin: String,
    clients: usize,
    workloads: usize,
    rounds: usize,
    services: usize,
    calls: usize,
    /// Also run a real `trellis proxy` for client 0's workload (with `--calls`).
    proxy: bool,
    /// With `--proxy`: seconds of paced load (`wrk`, ~2,000 requests/s) through the real
    /// proxy, once quiet and once while Workloads across the mesh change 10 times a second.
    steady: u64,
    /// With `--steady`: the control plane and the proxy left to share both cores (else each
    /// has one of its own).
    unpinned: bool,
}

/// The Services client `i` calls (none: it gets the whole mesh).
fn calls(a: &Args, i: usize) -> Vec<usize> {
    (0..a.calls)
        .map(|k| (i * 7 + k * 131) % a.services)
        .collect()
}

fn args() -> Args {
    let mut a = Args {
        bin: "target/release/trellis".into(),
        clients: 1000,
        workloads: 10_000,
        rounds: 10,
        services: 100,
        calls: 0,
        proxy: false,
        steady: 0,
        unpinned: false,
    };
    let mut v = std::env::args().skip(1);
    let usage = "usage: xds_load [--bin PATH] [--clients N] [--workloads N] [--rounds N] [--services N] [--calls K] [--proxy] [--steady SECONDS] [--unpinned]";
    while let Some(flag) = v.next() {
        if flag == "--proxy" {
            a.proxy = true;
            continue;
        }
        if flag == "--unpinned" {
            a.unpinned = true;
            continue;
        }
        let x = v.next().expect(usage);
        match flag.as_str() {
            "--bin" => a.bin = x,
            "--clients" => a.clients = x.parse().expect("--clients N"),
            "--workloads" => a.workloads = x.parse().expect("--workloads N"),
            "--rounds" => a.rounds = x.parse().expect("--rounds N"),
            "--services" => a.services = x.parse().expect("--services N"),
            "--calls" => a.calls = x.parse().expect("--calls K"),
            "--steady" => a.steady = x.parse().expect("--steady SECONDS"),
            _ => panic!("{usage}"),
        }
    }
    a
}

/// With `--proxy`: Services `held` (called by client 0) and `probe-0` … `probe-19` (asked
/// for on demand), each with one Workload at the local HTTP server on `port`.
const PROBES: usize = 20;

fn probes(port: u16) -> String {
    let mut y = String::new();
    let names =
        std::iter::once("held".to_string()).chain((0..PROBES).map(|k| format!("probe-{k}")));
    for n in names {
        y.push_str(&format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {n}, namespace: bench }}\nspec:\n  selector: {{ app: {n} }}\n  ports: [{{ name: http, port: 80, targetPort: {port} }}]\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {n}-w, namespace: bench, labels: {{ app: {n} }} }}\nspec:\n  address: 127.0.0.1\n---\n"
        ));
    }
    y
}

fn mesh(a: &Args, probe: Option<u16>) -> String {
    let (services, workloads) = (a.services, a.workloads);
    let mut y = probe.map(probes).unwrap_or_default();
    for s in 0..services {
        y.push_str(&format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: svc-{s}, namespace: bench }}\nspec:\n  selector: {{ app: svc-{s} }}\n  ports: [{{ name: http, port: 80, targetPort: 8080 }}]\n---\n"
        ));
    }
    for w in 0..workloads {
        y.push_str(&workload(services, w, 1));
        y.push_str("---\n");
    }
    if a.calls > 0 {
        for i in 0..a.clients {
            y.push_str(&format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: client-{i}, namespace: bench, labels: {{ app: client }} }}\nspec:\n  address: 10.200.{}.{}\n  upstreams:\n",
                i >> 8,
                i & 255
            ));
            for s in calls(a, i) {
                y.push_str(&format!(
                    "    - {{ service: svc-{s}.bench, port: 80, bind: 127.0.0.1:0 }}\n"
                ));
            }
            if i == 0 && probe.is_some() {
                y.push_str("    - { service: held.bench, port: 80, bind: 127.0.0.1:0 }\n");
            }
            y.push_str("---\n");
        }
    }
    y.push_str(&route(50));
    y
}

/// Workload `w` (of Service `w % services`) with weight `weight`.
fn workload(services: usize, w: usize, weight: u32) -> String {
    let s = w % services;
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: wl-{w}, namespace: bench, labels: {{ app: svc-{s} }} }}\nspec:\n  address: 10.{}.{}.{}\n  environment: {}\n  locality: {{ region: r1, zone: z{} }}\n  weight: {weight}\n",
        (w >> 16) & 255,
        (w >> 8) & 255,
        w & 255,
        ["vm", "container", "bare-metal"][w % 3],
        w % 4
    )
}

fn route(weight: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: split, namespace: bench }}\nspec:\n  parentRefs: [{{ name: svc-0, port: 80 }}]\n  rules:\n    - backendRefs: [{{ name: svc-1, port: 80, weight: {weight} }}, {{ name: svc-2, port: 80, weight: {} }}]\n",
        100 - weight
    )
}

async fn api(addr: &str, token: &str, body: String) -> u64 {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/api/v1/apply?file=bench.yaml")
        .header("host", "cp")
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let r = s.send_request(req).await.unwrap();
    let st = r.status();
    let b = r.into_body().collect().await.unwrap().to_bytes();
    assert!(
        st.is_success(),
        "apply: {st} {}",
        String::from_utf8_lossy(&b)
    );
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    v["applied"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["resourceVersion"].as_str()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Per client: the highest document version it has ACKed, when, and how many responses it
/// was sent.
type Acks = Arc<Mutex<Vec<(u64, Instant, u64)>>>;

async fn client(
    i: usize,
    xds: String,
    workload: Option<String>,
    acks: Acks,
    ready: mpsc::Sender<()>,
) {
    // A thousand connects at once can overflow the listen backlog, which resets a
    // connection before or after its stream opens: retry both, as a proxy does.
    let mut tries = 0u64;
    let (tx, mut inbound) = loop {
        let opened = async {
            let mut c = AggregatedDiscoveryServiceClient::connect(xds.clone())
                .await
                .map_err(|e| e.to_string())?
                .max_decoding_message_size(256 << 20);
            let (tx, rx) = mpsc::channel(4);
            tx.send(DeltaDiscoveryRequest {
                node: Some(trellis_xds::node(&format!("sim-{i}"), workload.as_deref())),
                type_url: DOCUMENT_TYPE.into(),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
            let s = c
                .delta_aggregated_resources(ReceiverStream::new(rx))
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((tx, s.into_inner()))
        };
        match opened.await {
            Ok(x) => break x,
            Err(e) if tries < 50 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20 * tries)).await;
            }
            Err(e) => panic!("client {i}: cannot open a stream: {e}"),
        }
    };
    let mut first = true;
    while let Ok(Some(r)) = inbound.message().await {
        let now = Instant::now();
        // Parts of a large update are acknowledged as they come; the client is synced at the
        // last one.
        let partial = r.system_version_info.ends_with(PARTIAL_SUFFIX);
        let v: u64 = r.system_version_info.parse().unwrap_or(0);
        tx.send(DeltaDiscoveryRequest {
            type_url: DOCUMENT_TYPE.into(),
            response_nonce: r.nonce,
            ..Default::default()
        })
        .await
        .unwrap();
        let mut a = acks.lock().await;
        a[i] = (v, now, a[i].2 + 1);
        drop(a);
        if first && !partial {
            first = false;
            let _ = ready.send(()).await;
        }
    }
}

/// `program` (with `--steady`: on CPU `cpu` alone, so that the control plane's work and
/// the proxy's do not share a core: what the steady run measures is the proxy).
fn on_cpu(pin: bool, cpu: &str, program: &str) -> Command {
    if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", cpu, program]);
        c
    } else {
        Command::new(program)
    }
}

/// Whether the proxy's admin `/ready` on `s` answers 200.
async fn ready(s: tokio::net::TcpStream) -> bool {
    let Ok((mut c, conn)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await
    else {
        return false;
    };
    tokio::spawn(conn);
    let req = http::Request::get("/ready")
        .header("host", "admin")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    matches!(c.send_request(req).await, Ok(r) if r.status() == 200)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

#[tokio::main]
async fn main() {
    let a = args();
    let dir = std::env::temp_dir().join(format!("trellis-xds-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut child = on_cpu(a.steady > 0 && !a.unpinned, "1", &a.bin)
        .args(["control", "--data-dir"])
        .arg(&dir)
        .args(["--api", "127.0.0.1:17070", "--xds", "127.0.0.1:17071"])
        .args(["--max-body-bytes", "67108864"])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("run trellis control");
    let pid = child.id();
    let token = loop {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("{} control exited with {st}: is it a current build?", a.bin);
        }
        if let Ok(t) = std::fs::read_to_string(dir.join("admin.token")) {
            if tokio::net::TcpStream::connect("127.0.0.1:17070")
                .await
                .is_ok()
            {
                break t.trim().to_string();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let t0 = Instant::now();
    // What the real proxy's requests reach (with --proxy).
    let probe = if a.proxy && a.calls > 0 {
        Some(trellis_test_support::upstream::named("ok").await)
    } else {
        None
    };
    api("127.0.0.1:17070", &token, mesh(&a, probe.map(|p| p.port()))).await;
    println!(
        "applied {} workloads + {} services (+ {} client workloads calling {} services each) in {:?}",
        a.workloads,
        a.services,
        if a.calls > 0 { a.clients } else { 0 },
        a.calls,
        t0.elapsed()
    );
    let acks: Acks = Arc::new(Mutex::new(vec![(0, Instant::now(), 0); a.clients]));
    // The clients the route change (on svc-0) concerns.
    let affected: Vec<bool> = (0..a.clients)
        .map(|i| a.calls == 0 || calls(&a, i).contains(&0))
        .collect();
    let (rtx, mut rrx) = mpsc::channel(a.clients);
    let (cpu_sync, _, _) = proc_stat(pid);
    let t0 = Instant::now();
    for i in 0..a.clients {
        tokio::spawn(client(
            i,
            "http://127.0.0.1:17071".into(),
            (a.calls > 0).then(|| format!("bench/client-{i}")),
            acks.clone(),
            rtx.clone(),
        ));
    }
    for _ in 0..a.clients {
        rrx.recv().await.unwrap();
    }
    let (cpu, rss0, _) = proc_stat(pid);
    println!(
        "{} clients connected and synced in {:?}; control plane CPU {:.1} s, RSS {} MiB",
        a.clients,
        t0.elapsed(),
        cpu - cpu_sync,
        rss0 / 1024
    );
    // A real proxy for client 0's workload (the simulated client 0 stays; two streams for one
    // workload are fine): how long until its first config is applied, and its memory.
    let proxy = if a.proxy && a.calls > 0 {
        let t = Instant::now();
        let p = on_cpu(a.steady > 0 && !a.unpinned, "0", &a.bin)
            .args(["proxy", "--xds", "http://127.0.0.1:17071"])
            .args(["--workload", "bench/client-0"])
            .args([
                "--admin",
                "127.0.0.1:17072",
                "--outbound",
                "127.0.0.1:17073",
            ])
            .args(["--inbound", "127.0.0.1:17074", "--no-access-log"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run trellis proxy");
        loop {
            if let Ok(s) = tokio::net::TcpStream::connect("127.0.0.1:17072").await {
                if ready(s).await {
                    break;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the proxy never got ready"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (_, rss, _) = proc_stat(p.id());
        println!(
            "a real proxy for bench/client-0 (calls {} services): first config applied {:.0} ms after it started; RSS {:.1} MiB",
            a.calls,
            t.elapsed().as_secs_f64() * 1000.0,
            rss as f64 / 1024.0
        );
        // A request to a Service it holds, against the first one to a Service it must ask
        // for (each probe once: the first request is the lookup's).
        let out: std::net::SocketAddr = "127.0.0.1:17073".parse().expect("address");
        let timed = async |host: &str| {
            let t = Instant::now();
            let r = trellis_test_support::client::get_full(out, host, "/", &[])
                .await
                .expect("the proxy answers");
            assert_eq!(r.status, 200, "{host}: {:?}", r.headers);
            t.elapsed().as_secs_f64() * 1000.0
        };
        let mut held = Vec::new();
        for _ in 0..PROBES {
            held.push(timed("held.bench").await);
        }
        let mut asked = Vec::new();
        for k in 0..PROBES {
            asked.push(timed(&format!("probe-{k}.bench")).await);
        }
        let (h50, a50) = (pct(&mut held, 0.5), pct(&mut asked, 0.5));
        println!(
            "requests through it, new connection each: to a held Service p50 {h50:.2} ms, max {:.2} ms; the first to a Service asked for on demand p50 {a50:.2} ms, max {:.2} ms (+{:.2} ms at the median)",
            pct(&mut held, 1.0),
            pct(&mut asked, 1.0),
            a50 - h50
        );
        Some(p)
    } else {
        None
    };
    let mut all = Vec::new();
    let mut maxes = Vec::new();
    let mut cpu_per_round = Vec::new();
    let mut workload_cpu = Vec::new();
    for round in 0..a.rounds {
        let (cpu0, _, _) = proc_stat(pid);
        let start = Instant::now();
        let rev = api(
            "127.0.0.1:17070",
            &token,
            route(10 + (round as u32 % 2) * 80),
        )
        .await;
        let applied = Instant::now();
        let times = loop {
            let v: Vec<_> = acks
                .lock()
                .await
                .iter()
                .zip(&affected)
                .filter(|(_, a)| **a)
                .map(|(x, _)| *x)
                .collect();
            if v.iter().all(|(r, _, _)| *r >= rev) {
                break v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "clients did not ack"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let (cpu1, _, _) = proc_stat(pid);
        let mut lat: Vec<f64> = times
            .iter()
            .map(|(_, t, _)| t.saturating_duration_since(start).as_secs_f64() * 1000.0)
            .collect();
        let (p50, p99, max) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99), pct(&mut lat, 1.0));
        println!(
            "round {round}: apply answered in {:.1} ms; ACK after the apply was sent ({} clients concerned): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; control plane CPU {:.2} s",
            (applied - start).as_secs_f64() * 1000.0,
            times.len(),
            cpu1 - cpu0
        );
        if a.calls > 0 {
            // One Workload of another Service changes (as a health flap would): who is sent it?
            let w = (round * 37 + 5) % a.workloads;
            let svc = w % a.services;
            let callers = (0..a.clients)
                .filter(|&i| calls(&a, i).contains(&svc))
                .count();
            let sent_before: Vec<u64> = acks.lock().await.iter().map(|x| x.2).collect();
            let (wcpu0, _, _) = proc_stat(pid);
            let rev = api(
                "127.0.0.1:17070",
                &token,
                workload(a.services, w, 2 + round as u32),
            )
            .await;
            let t = Instant::now();
            // Its callers ACK it; then give the others time to be sent it, if they were.
            loop {
                let v = acks.lock().await.clone();
                let done = (0..a.clients)
                    .filter(|&i| calls(&a, i).contains(&svc))
                    .all(|i| v[i].0 >= rev);
                if done || t.elapsed() > Duration::from_secs(10) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (wcpu1, _, _) = proc_stat(pid);
            workload_cpu.push(wcpu1 - wcpu0);
            let v = acks.lock().await.clone();
            let sent = (0..a.clients).filter(|&i| v[i].2 > sent_before[i]).count();
            println!(
                "  workload wl-{w} of svc-{svc} changed: {sent} clients were sent something, {callers} call svc-{svc}"
            );
        }
        all.extend(lat);
        maxes.push(max);
        cpu_per_round.push(cpu1 - cpu0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, rss, hwm) = proc_stat(pid);
    println!(
        "overall over {} rounds x {} clients: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; CPU per change {:.2} s; RSS {} MiB (peak {} MiB)",
        a.rounds,
        a.clients,
        pct(&mut all, 0.5),
        pct(&mut all, 0.99),
        pct(&mut all, 1.0),
        cpu_per_round.iter().sum::<f64>() / cpu_per_round.len() as f64,
        rss / 1024,
        hwm / 1024
    );
    if !workload_cpu.is_empty() {
        println!(
            "a Workload rewritten (new weight, same labels): control plane CPU {:.3} s per change (the apply, its compile, its pushes; clock ticks of 10 ms, mean of {})",
            workload_cpu.iter().sum::<f64>() / workload_cpu.len() as f64,
            workload_cpu.len()
        );
    }
    // Once changes have settled, the control plane gives the memory its heap no longer uses
    // back to the system (2 s of quiet): its resident size then, the clients still connected.
    let settled = std::time::Instant::now();
    let mut rss_settled = rss;
    while settled.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        rss_settled = rss_settled.min(proc_stat(pid).1);
    }
    println!(
        "RSS once settled (the least over the 5 s after the last round): {} MiB ({} clients connected)",
        rss_settled / 1024,
        a.clients
    );
    if let Some(p) = &proxy {
        // The real proxy's CPU per change of an endpoint of a Service it calls: 50 changes
        // 200 ms apart, less its CPU over as long without changes (CPU is read in 10-ms
        // ticks: 0.2 ms per change).
        let svc = calls(&a, 0)[0];
        let w0 = svc; // wl-{svc} is a Workload of svc-{svc}
        let pause = Duration::from_millis(200);
        let (idle0, _, _) = proc_stat(p.id());
        tokio::time::sleep(pause * 50).await;
        let (idle1, _, _) = proc_stat(p.id());
        for k in 0..50u32 {
            let w = w0 + a.services * (k as usize % 4);
            api("127.0.0.1:17070", &token, workload(a.services, w, 50 + k)).await;
            tokio::time::sleep(pause).await;
        }
        let (busy1, _, _) = proc_stat(p.id());
        println!(
            "the real proxy, 50 endpoint changes of svc-{svc} (which it calls): {:.2} ms of CPU per change ({:.3} s in all, {:.3} s over as long without changes)",
            ((busy1 - idle1) - (idle1 - idle0)) / 50.0 * 1000.0,
            busy1 - idle1,
            idle1 - idle0
        );
    }
    if proxy.is_some() && a.steady > 0 {
        // p99 of a steady ~2,000 requests/s through the real proxy (16 connections, one
        // request per 8 ms each: bench/pace.lua), quiet and then with 10 Workload changes a
        // second across the mesh (Workloads of Services client 0 does not call, as most
        // flaps in a fleet are: its proxy is sent none of them).
        let steady = async |label: &str| {
            let secs = a.steady;
            let out = tokio::task::spawn_blocking(move || {
                on_cpu(true, "0", "wrk")
                    .args(["-t1", "-c16", "--latency", "-s", "bench/pace.lua"])
                    .arg(format!("-d{secs}s"))
                    .args(["-H", "Host: held.bench", "http://127.0.0.1:17073/"])
                    .output()
            })
            .await
            .expect("wrk's thread")
            .expect("run wrk (apt-get install wrk)");
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let field = |key: &str| {
                text.lines()
                    .find(|l| l.trim_start().starts_with(key))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .unwrap_or("?")
                    .to_string()
            };
            println!(
                "steady load through the real proxy, {label}: p50 {}, p99 {}, {} requests/s",
                field("50%"),
                field("99%"),
                field("Requests/sec:")
            );
        };
        let reloads = async || {
            let admin: std::net::SocketAddr = "127.0.0.1:17072".parse().expect("address");
            let (_, body) = trellis_test_support::client::get(admin, "admin", "/metrics", &[])
                .await
                .expect("metrics");
            String::from_utf8_lossy(&body)
                .lines()
                .filter(|l| l.starts_with("trellis_config_reloads_total"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .sum::<f64>()
        };
        steady("quiet").await;
        let before = reloads().await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flapper = {
            let (stop, token) = (stop.clone(), token.clone());
            let mine = calls(&a, 0);
            let (services, workloads) = (a.services, a.workloads);
            tokio::spawn(async move {
                let mut n = 0usize;
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tick.tick().await;
                    n += 1;
                    let w = (n * 7919) % workloads;
                    if mine.contains(&(w % services)) {
                        continue;
                    }
                    let y = workload(services, w, 100 + (n % 50) as u32);
                    api("127.0.0.1:17070", &token, y).await;
                }
                n
            })
        };
        steady("while 10 Workloads a second change elsewhere").await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let n = flapper.await.unwrap_or(0);
        println!(
            "  ({n} changes applied meanwhile; the proxy applied {} configs in that time)",
            reloads().await - before
        );
    }
    if let Some(mut p) = proxy {
        let (cpu, rss, hwm) = proc_stat(p.id());
        println!(
            "the real proxy after the rounds: CPU {cpu:.2} s in all, RSS {:.1} MiB (peak {:.1} MiB)",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
        let _ = p.kill();
        let _ = p.wait();
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
