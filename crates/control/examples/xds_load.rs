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
}

fn args() -> Args {
    let mut a = Args {
        bin: "target/release/trellis".into(),
        clients: 1000,
        workloads: 10_000,
        rounds: 10,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for w in v.chunks(2) {
        match (w[0].as_str(), w.get(1)) {
            ("--bin", Some(x)) => a.bin = x.clone(),
            ("--clients", Some(x)) => a.clients = x.parse().expect("--clients N"),
            ("--workloads", Some(x)) => a.workloads = x.parse().expect("--workloads N"),
            ("--rounds", Some(x)) => a.rounds = x.parse().expect("--rounds N"),
            _ => panic!("usage: xds_load [--bin PATH] [--clients N] [--workloads N] [--rounds N]"),
        }
    }
    a
}

fn mesh(workloads: usize) -> String {
    let services = 100;
    let mut y = String::new();
    for s in 0..services {
        y.push_str(&format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: svc-{s}, namespace: bench }}\nspec:\n  selector: {{ app: svc-{s} }}\n  ports: [{{ name: http, port: 80, targetPort: 8080 }}]\n---\n"
        ));
    }
    for w in 0..workloads {
        let s = w % services;
        y.push_str(&format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: wl-{w}, namespace: bench, labels: {{ app: svc-{s} }} }}\nspec:\n  address: 10.{}.{}.{}\n  environment: {}\n  locality: {{ region: r1, zone: z{} }}\n---\n",
            (w >> 16) & 255,
            (w >> 8) & 255,
            w & 255,
            ["vm", "container", "bare-metal"][w % 3],
            w % 4
        ));
    }
    y.push_str(&route(50));
    y
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

/// Per client: the highest document version it has ACKed, and when.
type Acks = Arc<Mutex<Vec<(u64, Instant)>>>;

async fn client(i: usize, xds: String, acks: Acks, ready: mpsc::Sender<()>) {
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
                node: Some(trellis_xds::node(&format!("sim-{i}"), None)),
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
        acks.lock().await[i] = (v, now);
        if first && !partial {
            first = false;
            let _ = ready.send(()).await;
        }
    }
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
    let mut child = Command::new(&a.bin)
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
    api("127.0.0.1:17070", &token, mesh(a.workloads)).await;
    println!(
        "applied {} workloads + 100 services in {:?}",
        a.workloads,
        t0.elapsed()
    );
    let acks: Acks = Arc::new(Mutex::new(vec![(0, Instant::now()); a.clients]));
    let (rtx, mut rrx) = mpsc::channel(a.clients);
    let (cpu_sync, _, _) = proc_stat(pid);
    let t0 = Instant::now();
    for i in 0..a.clients {
        tokio::spawn(client(
            i,
            "http://127.0.0.1:17071".into(),
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
    let mut all = Vec::new();
    let mut maxes = Vec::new();
    let mut cpu_per_round = Vec::new();
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
            let v = acks.lock().await.clone();
            if v.iter().all(|(r, _)| *r >= rev) {
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
            .map(|(_, t)| t.saturating_duration_since(start).as_secs_f64() * 1000.0)
            .collect();
        let (p50, p99, max) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99), pct(&mut lat, 1.0));
        println!(
            "round {round}: apply answered in {:.1} ms; ACK after the apply was sent: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; control plane CPU {:.2} s",
            (applied - start).as_secs_f64() * 1000.0,
            cpu1 - cpu0
        );
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
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
