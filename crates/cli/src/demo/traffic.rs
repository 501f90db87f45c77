//! The shopper's traffic: `rate` requests a second through its proxy, and a line every so
//! often of who served them.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request};
use tokio::sync::watch;

/// What the traffic has done so far.
#[derive(Default)]
pub(super) struct Totals {
    pub(super) sent: u64,
    pub(super) failed: u64,
}

/// Failures shown one by one before they are only counted.
const SHOWN: u64 = 5;

/// "NAME COUNT" for each who answered, in name order.
fn tally(answered: &BTreeMap<String, u32>) -> Vec<String> {
    answered.iter().map(|(k, v)| format!("{k} {v}")).collect()
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

/// Wait until `who` answers (every agent registers on its own: a request sent while only
/// some had joined would be served elsewhere, which is right but not the story). Returns
/// the requests it took, and how many of them were not answered 200.
pub(super) async fn warm_up(bind: SocketAddr, who: &str) -> Result<(u32, u32)> {
    let start = Instant::now();
    let (mut sent, mut failed) = (0, 0);
    // What answered instead, and the last failure: said if `who` never answers.
    let mut others = BTreeMap::<String, u32>::new();
    let mut last_failure = None;
    loop {
        sent += 1;
        match get(bind).await {
            Ok((200, w)) if w == who => return Ok((sent, failed)),
            Ok((200, w)) => *others.entry(w).or_default() += 1,
            Ok((st, body)) => {
                failed += 1;
                last_failure = Some(format!("{st} {}", body.trim()));
            }
            Err(e) => {
                failed += 1;
                last_failure = Some(e.to_string());
            }
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(anyhow!(
                "{who} did not answer within 30 s ({sent} requests: answered by {}; {failed} \
                 failed, the last with {})",
                if others.is_empty() {
                    "none".to_string()
                } else {
                    tally(&others).join(", ")
                },
                last_failure.as_deref().unwrap_or("-"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Send `rate` requests a second until `stop`; every `every_ms` (changeable as it runs) a
/// line of who served them since the last one. Requests go one after another: when the mesh
/// is slow, fewer are sent, as a real caller waiting on its answers would.
pub(super) async fn run(
    bind: SocketAddr,
    rate: u32,
    start: Instant,
    every_ms: Arc<AtomicU64>,
    totals: Arc<Mutex<Totals>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut served = BTreeMap::<String, u32>::new();
    let mut failed_now = 0u32;
    let mut last_line = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let outcome = get(bind).await;
        let failed = {
            let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
            t.sent += 1;
            if !matches!(outcome, Ok((200, _))) {
                t.failed += 1;
                Some(t.failed)
            } else {
                None
            }
        };
        match (outcome, failed) {
            (Ok((200, who)), _) => *served.entry(who).or_default() += 1,
            (other, Some(n)) => {
                failed_now += 1;
                if n <= SHOWN {
                    let what = match other {
                        Ok((st, body)) => format!("{st} {}", body.trim()),
                        Err(e) => e.to_string(),
                    };
                    eprintln!(
                        "t={:>5.1}s  request failed: {what}",
                        start.elapsed().as_secs_f64()
                    );
                    if n == SHOWN {
                        eprintln!("(further failed requests are only counted)");
                    }
                }
            }
            _ => {}
        }
        if last_line.elapsed() >= Duration::from_millis(every_ms.load(Ordering::Relaxed)) {
            last_line = Instant::now();
            let mut parts = tally(&served);
            if failed_now > 0 {
                parts.push(format!("FAILED {failed_now}"));
            }
            println!(
                "t={:>5.1}s  served by: {}",
                start.elapsed().as_secs_f64(),
                parts.join(", ")
            );
            served.clear();
            failed_now = 0;
        }
    }
}
