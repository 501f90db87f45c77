//! Hostile and broken input against real processes: each attack is refused or cut off, the
//! process stays up with bounded memory, and serves the next ordinary request.
//!
//! HTTP/2 frames are written by hand (a client library would not send them): rapid reset
//! (CVE-2023-44487), a CONTINUATION flood, SETTINGS and PING floods. HTTP/1.1: slow heads
//! (slowloris) and pipelined garbage. The control plane: deep and huge YAML, a replayed agent
//! request, and a gRPC message over the limit.

mod common;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use trellis_test_support::rss_kib;

/// An HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

/// `GET /` to `authority`, HPACK-encoded with static-table names and no indexing.
fn get_block(authority: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84, 0x01, authority.len() as u8];
    b.extend_from_slice(authority.as_bytes());
    b
}

/// A connection that has sent the preface and an empty SETTINGS frame.
async fn h2c(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    s.write_all(&hello).await.unwrap();
    s
}

/// Read frames until the peer closes (or `limit` passes): the frame types seen, and whether
/// it closed.
async fn frames_until_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    let mut kinds = Vec::new();
    let deadline = Instant::now() + limit;
    loop {
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            kinds.push(buf[3]);
            buf.drain(..9 + len);
        }
        let mut chunk = [0u8; 16384];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Err(_) => return (kinds, false),
            Ok(Ok(0) | Err(_)) => return (kinds, true),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Write `bytes` until done or the peer stops taking them; whether all went.
async fn write_what_goes(s: &mut TcpStream, bytes: &[u8]) -> bool {
    for piece in bytes.chunks(64 << 10) {
        match tokio::time::timeout(Duration::from_secs(5), s.write_all(piece)).await {
            Ok(Ok(())) => {}
            _ => return false,
        }
    }
    true
}

/// An upstream counting the requests it gets.
async fn counting_upstream() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let n = Arc::new(AtomicU64::new(0));
    let c = n.clone();
    let up = upstream::http(move |_req| {
        c.fetch_add(1, Ordering::Relaxed);
        async { http::Response::new(http_body_util::Full::new(bytes::Bytes::from("ok"))) }
    })
    .await;
    (up, n)
}

fn proxy_for(up: std::net::SocketAddr, extra: &[&str]) -> ProxyProcess {
    let mut args = vec!["--workload", "test/client"];
    args.extend_from_slice(extra);
    ProxyProcess::start(
        BIN,
        &docs(&[service("alpha", "HTTP", &[up]), client_workload(&[])]),
        &args,
    )
}

/// After an attack: the proxy is up, below `max_kib` of memory, and serves.
async fn still_serving(p: &ProxyProcess, max_kib: u64, what: &str) {
    let rss = rss_kib(p.pid());
    println!("{what}: proxy RSS {rss} KiB");
    assert!(rss > 0, "{what}: the proxy is gone");
    assert!(rss < max_kib, "{what}: RSS {rss} KiB");
    let (st, _, body) = via(p, "alpha.test").await;
    assert_eq!((st, body.as_str()), (200, "ok"), "{what}: the next request");
}

#[tokio::test]
async fn http2_rapid_reset_is_cut_off() {
    let (up, seen) = counting_upstream().await;
    let p = proxy_for(up, &[]);
    p.wait_ready().await;
    let base = rss_kib(p.pid());
    let mut s = h2c(p.outbound).await;
    // Ten thousand streams opened and cancelled at once, as CVE-2023-44487 does.
    let block = get_block("alpha.test");
    let mut attack = Vec::new();
    for i in 0..10_000u32 {
        let id = 2 * i + 1;
        attack.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
        attack.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let writer = tokio::spawn(async move {
        let all = write_what_goes(&mut s, &attack).await;
        (s, all)
    });
    let (mut s, _) = writer.await.unwrap();
    let (kinds, closed) = frames_until_close(&mut s, Duration::from_secs(10)).await;
    let sent_on = seen.load(Ordering::Relaxed);
    println!(
        "rapid reset: GOAWAY {}, closed {closed}, {sent_on} of 10000 streams reached the upstream",
        kinds.contains(&GOAWAY)
    );
    assert!(
        kinds.contains(&GOAWAY) && closed,
        "the connection is cut off: {kinds:?}"
    );
    assert!(sent_on < 1_000, "{sent_on} cancelled streams went upstream");
    still_serving(&p, base + 64 * 1024, "rapid reset").await;
}

#[tokio::test]
async fn an_http2_continuation_flood_is_cut_off_at_the_header_limit() {
    let (up, _) = counting_upstream().await;
    let p = proxy_for(up, &["--max-header-bytes", "16384"]);
    p.wait_ready().await;
    let base = rss_kib(p.pid());
    let mut s = h2c(p.outbound).await;
    // A HEADERS frame without END_HEADERS, then CONTINUATION frames for ever (64 MiB).
    let mut first = get_block("alpha.test");
    first.extend_from_slice(&[0x00, 0x01, b'x', 0x7f, 0x81, 0x7f]); // x: 16 KiB value follows
    let mut attack = frame(HEADERS, END_STREAM, 1, &first);
    let filler = vec![b'a'; 16 << 10];
    for _ in 0..4096 {
        attack.extend(frame(CONTINUATION, 0, 1, &filler));
    }
    let writer = tokio::spawn(async move {
        let all = write_what_goes(&mut s, &attack).await;
        (s, all)
    });
    let (mut s, all) = writer.await.unwrap();
    let (kinds, closed) = frames_until_close(&mut s, Duration::from_secs(10)).await;
    println!("continuation flood: all 64 MiB written {all}, closed {closed}, frames {kinds:?}");
    assert!(closed, "the connection is cut off");
    still_serving(&p, base + 64 * 1024, "continuation flood").await;
}

#[tokio::test]
async fn http2_settings_and_ping_floods_leave_memory_bounded() {
    let (up, _) = counting_upstream().await;
    let p = proxy_for(up, &[]);
    p.wait_ready().await;
    let base = rss_kib(p.pid());
    for (name, f) in [
        ("SETTINGS", frame(SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0])),
        ("PING", frame(PING, 0, 0, &[7; 8])),
    ] {
        // 200,000 frames written and none of the answers read: what the proxy queues for a
        // peer that does not read must not grow with the flood.
        let mut s = h2c(p.outbound).await;
        let attack: Vec<u8> = f.iter().copied().cycle().take(f.len() * 200_000).collect();
        let all = write_what_goes(&mut s, &attack).await;
        let rss = rss_kib(p.pid());
        println!("{name} flood: all written {all}, RSS {rss} KiB (was {base})");
        assert!(rss < base + 64 * 1024, "{name} flood: RSS {rss} KiB");
        drop(s);
        still_serving(&p, base + 64 * 1024, name).await;
    }
    // A DATA frame on a stream never opened is a connection error, not a crash.
    let mut s = h2c(p.outbound).await;
    s.write_all(&frame(DATA, END_STREAM, 99, b"x"))
        .await
        .unwrap();
    let (kinds, closed) = frames_until_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed && kinds.contains(&GOAWAY), "{kinds:?}");
    still_serving(&p, base + 64 * 1024, "stray DATA").await;
}

#[tokio::test]
async fn slow_http1_heads_are_closed_at_the_header_read_timeout() {
    let (up, _) = counting_upstream().await;
    let p = proxy_for(up, &["--header-read-timeout", "1s"]);
    p.wait_ready().await;
    // Fifty clients each sending a head a byte at a time, never ending it.
    let began = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..50 {
        let addr = p.outbound;
        slow.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nhost: alpha.test\r\n")
                .await
                .unwrap();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut answer = Vec::new();
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if s.write_all(b"x").await.is_err() {
                            break;
                        }
                    }
                    r = s.read_buf(&mut answer) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                if began.elapsed() > Duration::from_secs(20) {
                    panic!("a slow head was kept open for 20 s");
                }
            }
            String::from_utf8_lossy(&answer).into_owned()
        }));
    }
    // Meanwhile the proxy serves others.
    let (st, _, _) = via(&p, "alpha.test").await;
    assert_eq!(st, 200);
    for s in slow {
        let answer = s.await.unwrap();
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );
    }
    println!(
        "slowloris: 50 slow heads closed after {:?}",
        began.elapsed()
    );
    // Pipelined garbage after a good request: the good one is answered, the garbage gets a
    // 400, and the connection closes.
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: alpha.test\r\n\r\n\x00\x01garbage \xff\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("HTTP/1.1 400"), "{out}");
    still_serving(&p, 256 * 1024, "garbage").await;
}

/// The control plane: deeply nested and huge YAML are refused with a located error, and a
/// signed agent request sent a second time as it was (a replay) is refused.
#[tokio::test]
async fn the_control_plane_refuses_deep_yaml_and_replayed_agent_requests() {
    use trellis_test_support::control::ControlProcess;
    let cp = ControlProcess::start(BIN, &[]);
    let base = rss_kib(cp.pid());
    // 100,000 levels of flow sequences, and as many of block mappings.
    let deep = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: s, namespace: test }}\nstatus: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let mut block = String::from("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: s, namespace: test }\nstatus:\n");
    for i in 1..1_000 {
        block.push_str(&" ".repeat(2 * i));
        block.push_str("x:\n");
    }
    for (what, text) in [("flow", deep), ("block", block)] {
        let (st, v) = cp
            .call(http::Method::POST, "/api/v1/apply", &text, None)
            .await;
        println!("{what} nesting: {st} {v}");
        assert!(st == 400 || st == 422, "{what}: {st} {v}");
        // Located: the request's line 5 (or below), where the nesting is.
        let e = v["error"].as_str().unwrap_or_default();
        assert!(
            e.starts_with("request:") && !e.starts_with("request:1:"),
            "{what}: {e}"
        );
    }
    let (st, _) = cp
        .call(http::Method::GET, "/api/v1/resources", "", None)
        .await;
    assert_eq!(st, 200, "the control plane is up");
    println!("control plane RSS {} KiB (was {base})", rss_kib(cp.pid()));

    // An agent's signed request, taken once; the same bytes again are refused.
    apply_ok(&cp, client_workload(&[])).await;
    let state = trellis_test_support::Temp::path("replay-state");
    let t = token(&cp, "test", "client", "10m", "1");
    let p = ProxyProcess::start_xds(
        BIN,
        &[cp.xds_url()],
        "test/client",
        &["--state-dir", state.to_str().unwrap(), "--join-token", &t],
    );
    p.wait_ready().await;
    let key = std::fs::read_to_string(state.join("key.pem")).unwrap();
    let cert = std::fs::read_to_string(state.join("cert.pem")).unwrap();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let request = serde_json::json!({
        "op": "register", "name": "replayed", "ts": ts,
        "spec": { "address": "127.0.0.1" },
    })
    .to_string();
    let proof = trellis_identity::ca::prove(&key, &request).unwrap();
    let body = serde_json::json!({
        "certificate": cert,
        "proof": trellis_identity::join::hex(&proof),
        "request": request,
    })
    .to_string();
    let (st, v) = cp
        .call(http::Method::POST, "/api/v1/agent", &body, None)
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = cp
        .call(http::Method::POST, "/api/v1/agent", &body, None)
        .await;
    assert_eq!(st, 401, "{v}");
    assert!(
        v["error"].as_str().unwrap_or_default().contains("replayed"),
        "{v}"
    );
    // The same request with the signature's `s` replaced by `n − s`: another signature of
    // the same bytes that verifies as well (ECDSA is malleable), and a replay all the same.
    let other = serde_json::json!({
        "certificate": cert,
        "proof": trellis_identity::join::hex(&trellis_test_support::ecdsa::malleated(&proof)),
        "request": request,
    })
    .to_string();
    let (st, v) = cp
        .call(http::Method::POST, "/api/v1/agent", &other, None)
        .await;
    assert_eq!(st, 401, "{v}");
    assert!(
        v["error"].as_str().unwrap_or_default().contains("replayed"),
        "{v}"
    );
}
