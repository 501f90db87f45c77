//! Fleet telemetry benchmark: many simulated proxies reporting to one `trellis control`.
//!
//! ```text
//! cargo run --release -p trellis-control --example telemetry_load -- \
//!     --bin target/release/trellis --proxies 1000 --series 50 --rounds 6
//! ```
//!
//! It starts the control plane (the real binary) on loopback and opens one HTTP/2 connection
//! per simulated proxy to its xDS address. Each proxy first sends the 90 periods of the last
//! 15 minutes (backdated, in batches of 30, as a proxy that reconnects does), so the fine ring
//! is full; then, every 10 s for `--rounds` rounds, all of them send one report of `--series`
//! series each (spread over the 10 s). It prints the control plane's CPU per round (as an
//! average of vCPU), its RSS, and how long `GET /api/v1/stat` and `/api/v1/edges` over the
//! whole mesh take.

mod common;

use common::proc_stat;
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use http_body_util::BodyExt;
use prost::Message;
use trellis_telemetry::{
    hist::Histogram,
    report::{Batch, Histogram as Wire, Latency, Report, Series},
};

struct Args {
    bin: String,
    proxies: usize,
    series: usize,
    rounds: usize,
    memory: Option<String>,
}

/// The control plane, killed when the benchmark ends (or panics).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn args() -> Args {
    let mut a = Args {
        bin: "target/release/trellis".into(),
        proxies: 1000,
        series: 50,
        rounds: 6,
        memory: None,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for w in v.chunks(2) {
        match (w[0].as_str(), w.get(1)) {
            ("--bin", Some(x)) => a.bin = x.clone(),
            ("--proxies", Some(x)) => a.proxies = x.parse().expect("--proxies N"),
            ("--series", Some(x)) => a.series = x.parse().expect("--series N"),
            ("--rounds", Some(x)) => a.rounds = x.parse().expect("--rounds N"),
            ("--memory", Some(x)) => a.memory = Some(x.clone()),
            _ => panic!("usage: telemetry_load [--bin PATH] [--proxies N] [--series N] [--rounds N] [--memory MIB]"),
        }
    }
    a
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A latency histogram of `n` requests around `ms` milliseconds (log-uniform over 0.5×–4×).
fn latency(n: u64, ms: f64, seed: u64) -> Wire {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut h = Histogram::default();
    for _ in 0..n {
        h.record(ms / 1000.0 * 0.5 * 8f64.powf(rng.f64()));
    }
    Wire::from(&h)
}

/// Proxy `i`'s series: half outbound to services it calls, half inbound from callers; a few
/// failure classes among them.
fn series(i: usize, count: usize) -> Vec<Series> {
    let classes = [
        "ok",
        "ok",
        "ok",
        "ok",
        "ok",
        "ok",
        "ok",
        "app_error",
        "connect_refused",
        "upstream_timeout",
    ];
    (0..count)
        .map(|s| {
            let class = classes[s % classes.len()];
            let requests = if class == "ok" { 500 } else { 5 };
            Series {
                direction: (s % 2) as u32,
                protocol: 0,
                service: format!("bench/svc-{}", (i + s / 10) % 100),
                route: "default".into(),
                peer_workload: format!("bench/wl-{}", (i * 7 + s / 10) % 1000),
                peer_identity: format!("bench/id-{}", (i * 7 + s / 10) % 100),
                peer_environment: ["vm", "container", "bare-metal"][s % 3].into(),
                peer_locality: format!("r1/z{}", s % 4),
                endpoint: format!("10.0.{}.{}:15006", (i / 250) % 256, i % 250),
                mtls: true,
                class: class.into(),
                status_class: if class == "app_error" {
                    5
                } else if class == "ok" {
                    2
                } else {
                    0
                },
                requests,
                attempts: requests,
                ..Default::default()
            }
        })
        .collect()
}

/// The latency groups of `series`: one per direction, service and peer workload.
fn latencies(series: &[Series], templates: &[Wire]) -> Vec<Latency> {
    let mut seen = std::collections::BTreeSet::new();
    series
        .iter()
        .filter(|s| seen.insert((s.direction, s.service.clone(), s.peer_workload.clone())))
        .enumerate()
        .map(|(k, s)| Latency {
            direction: s.direction,
            service: s.service.clone(),
            peer_workload: s.peer_workload.clone(),
            histogram: Some(templates[k % templates.len()].clone()),
        })
        .collect()
}

fn report(
    i: usize,
    seq: u64,
    start_ms: u64,
    series: Vec<Series>,
    latencies: Vec<Latency>,
) -> Report {
    Report {
        latencies,
        workload: format!("bench/wl-{i}"),
        node: format!("wl-{i}@sim"),
        environment: ["vm", "container", "bare-metal"][i % 3].into(),
        locality: format!("r1/z{}", i % 4),
        run: i as u64 + 1,
        seq,
        start_ms,
        period_ms: 10_000,
        series,
        folded: 0,
        ..Default::default()
    }
}

type Sender = hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>;

async fn connect(addr: std::net::SocketAddr) -> Sender {
    let mut tries = 0;
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => {
                let (send, conn) = hyper::client::conn::http2::handshake(
                    hyper_util::rt::TokioExecutor::new(),
                    hyper_util::rt::TokioIo::new(s),
                )
                .await
                .unwrap();
                tokio::spawn(conn);
                return send;
            }
            Err(e) if tries < 50 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20 * tries)).await;
            }
            Err(e) => panic!("connect: {e}"),
        }
    }
}

async fn post(send: &mut Sender, addr: std::net::SocketAddr, batch: &Batch) {
    let req = http::Request::post(format!("http://{addr}/v1/telemetry"))
        .header("content-type", "application/x-protobuf")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            batch.encode_to_vec(),
        )))
        .unwrap();
    let r = send.send_request(req).await.unwrap();
    let st = r.status();
    let b = r.into_body().collect().await.unwrap().to_bytes();
    assert!(st.is_success(), "{st}: {}", String::from_utf8_lossy(&b));
}

async fn get(
    api: std::net::SocketAddr,
    token: &str,
    path: &str,
) -> Result<(Duration, usize), String> {
    let s = tokio::net::TcpStream::connect(api).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "cp")
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let t = Instant::now();
    let r = send.send_request(req).await.unwrap();
    let st = r.status();
    let b = r.into_body().collect().await.unwrap().to_bytes();
    let took = t.elapsed();
    if !st.is_success() {
        return Err(format!("{st}: {}", String::from_utf8_lossy(&b)));
    }
    let rows = serde_json::from_slice::<serde_json::Value>(&b)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0);
    Ok((took, rows))
}

#[tokio::main]
async fn main() {
    let a = args();
    let dir = std::env::temp_dir().join(format!("trellis-telemetry-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = Command::new(&a.bin);
    cmd.args([
        "control",
        "--api",
        "127.0.0.1:0",
        "--xds",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(&dir);
    if let Some(m) = &a.memory {
        cmd.args(["--telemetry-memory", m]);
    }
    let mut child = Child(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start control"),
    );
    let pid = child.0.id();
    let (api, xds) = {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(child.0.stderr.take().unwrap()).lines();
        loop {
            let l = lines.next().expect("control plane log").unwrap();
            if l.contains("control plane ready") {
                let v: serde_json::Value = serde_json::from_str(&l).unwrap();
                let addr = |k: &str| {
                    v[k].as_str()
                        .unwrap()
                        .parse::<std::net::SocketAddr>()
                        .unwrap()
                };
                std::thread::spawn(move || for _ in lines {});
                break (addr("api"), addr("xds"));
            }
        }
    };
    let token = std::fs::read_to_string(dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let templates: Vec<Wire> = (0..8).map(|k| latency(500, 2.0 + k as f64, k)).collect();
    let (cpu0, rss0, _) = proc_stat(pid);
    println!("control plane idle: RSS {} MiB", rss0 / 1024);

    // Fill: 90 backdated periods per proxy.
    let t = Instant::now();
    let now = now_ms();
    let mut tasks = tokio::task::JoinSet::new();
    // Connections open as the fill goes, a few at a time (the listener drops one that says
    // nothing for a while, and a thousand connects at once overflow its backlog).
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    for i in 0..a.proxies {
        let ser = series(i, a.series);
        let lat = latencies(&ser, &templates);
        let gate = gate.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let mut s = connect(xds).await;
            for chunk in 0..3u64 {
                let reports = (0..30u64)
                    .map(|k| {
                        let p = chunk * 30 + k; // 0 = oldest
                        report(i, p + 1, now - (90 - p) * 10_000, ser.clone(), lat.clone())
                    })
                    .collect();
                post(&mut s, xds, &Batch { reports }).await;
            }
            s
        });
    }
    let mut senders = Vec::new();
    while let Some(s) = tasks.join_next().await {
        senders.push(s.unwrap());
    }
    let (cpu1, rss1, hwm1) = proc_stat(pid);
    println!(
        "fill: {} proxies x 90 periods x {} series in {:.1} s, {:.1} s of control-plane CPU; RSS {} MiB (peak {} MiB)",
        a.proxies,
        a.series,
        t.elapsed().as_secs_f64(),
        cpu1 - cpu0,
        rss1 / 1024,
        hwm1 / 1024
    );
    let _ = senders.len();

    // Steady state: one report per proxy per 10 s, spread over the 10 s.
    for (seq, round) in (91u64..).zip(0..a.rounds) {
        let (c0, _, _) = proc_stat(pid);
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let n = senders.len();
        for (i, mut s) in std::mem::take(&mut senders).into_iter().enumerate() {
            let ser = series(i, a.series);
            let lat = latencies(&ser, &templates);
            let delay = Duration::from_millis((10_000 * i / n) as u64);
            let r = report(i, seq, now_ms() - 10_000, ser, lat);
            tasks.spawn(async move {
                tokio::time::sleep(delay).await;
                post(&mut s, xds, &Batch { reports: vec![r] }).await;
                (i, s)
            });
        }
        let mut back: Vec<(usize, Sender)> = Vec::new();
        while let Some(s) = tasks.join_next().await {
            back.push(s.unwrap());
        }
        back.sort_by_key(|(i, _)| *i);
        senders = back.into_iter().map(|(_, s)| s).collect();
        let left = Duration::from_secs(10).saturating_sub(start.elapsed());
        tokio::time::sleep(left).await;
        let (c1, rss, _) = proc_stat(pid);
        println!(
            "round {round}: {:.3} vCPU (control plane CPU / 10 s), RSS {} MiB",
            (c1 - c0) / start.elapsed().as_secs_f64(),
            rss / 1024
        );
    }
    for (what, path) in [
        ("stat services, 1m", "/api/v1/stat?window=1m"),
        ("stat workloads, 1m", "/api/v1/stat?kind=workload&window=1m"),
        ("stat services, 15m", "/api/v1/stat?window=15m"),
        ("edges, 1m", "/api/v1/edges?window=1m"),
    ] {
        let mut times = Vec::new();
        let mut rows = 0;
        for _ in 0..5 {
            match get(api, &token, path).await {
                Ok((t, r)) => {
                    times.push(t.as_secs_f64() * 1000.0);
                    rows = r;
                }
                Err(e) => {
                    println!("{what}: {e}");
                    break;
                }
            }
        }
        if times.len() < 5 {
            continue;
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{what}: {rows} rows, median {:.1} ms, max {:.1} ms",
            times[2], times[4]
        );
    }
    let (_, rss, hwm) = proc_stat(pid);
    println!("end: RSS {} MiB (peak {} MiB)", rss / 1024, hwm / 1024);
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}
