//! Reload, drain, and bad input.

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_test_support::Temp;

fn split(wa: u32, wb: u32, a: std::net::SocketAddr, b: std::net::SocketAddr) -> String {
    docs(&[
        service("web", "HTTP", &[]),
        service("web-a", "HTTP", &[a]),
        service("web-b", "HTTP", &[b]),
        route("web", "web", &format!("    - backendRefs: [{{ name: web-a, port: 80, weight: {wa} }}, {{ name: web-b, port: 80, weight: {wb} }}]\n")),
        client_workload(&[]),
    ])
}

#[tokio::test]
async fn reload_under_load_fails_no_request_and_bad_config_is_refused() {
    let a = upstream::named("a").await;
    let b = upstream::named("b").await;
    let p = start(&split(100, 0, a, b));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, addr) = (stop.clone(), ok.clone(), failed.clone(), p.outbound);
        load.push(tokio::spawn(async move {
            let mut c = client::Conn::h1(addr).await;
            while !stop.load(Ordering::Relaxed) {
                match c.get("web.test", "/").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    // Flip the split several times; each flip must show up in traffic.
    for (i, (wa, wb, want)) in [(0, 100, "b"), (100, 0, "a"), (0, 100, "b"), (100, 0, "a")]
        .into_iter()
        .enumerate()
    {
        p.rewrite_config(&split(wa, wb, a, b));
        eventually(
            &format!("flip {i} to {want}"),
            Duration::from_secs(10),
            async || {
                let (_, body) = client::get(p.outbound, "web.test", "/", &[]).await.ok()?;
                (body == want).then_some(())
            },
        )
        .await;
    }
    // An invalid config is refused; the old one keeps serving.
    p.rewrite_config("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: web }\nspec: { portz: [] }\n");
    eventually("reload refused", Duration::from_secs(10), async || {
        (p.metric("trellis_config_reloads_total", &[("result", "error")])
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
    let (st, body) = client::get(p.outbound, "web.test", "/", &[]).await.unwrap();
    assert_eq!((st.as_u16(), &body[..]), (200, &b"a"[..]));
    // The refusal is logged with its reason (the line may follow the counter by a moment).
    eventually("refusal logged", Duration::from_secs(10), async || {
        p.stderr()
            .iter()
            .any(|l| l.contains("config refused") && l.contains("portz"))
            .then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert!(ok.load(Ordering::Relaxed) > 100);
    assert_eq!(failed.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn sighup_reloads() {
    let a = upstream::named("a").await;
    let b = upstream::named("b").await;
    let p = ProxyProcess::start(
        BIN,
        &split(100, 0, a, b),
        &["--workload", "test/client", "--watch-interval", "1h"],
    );
    std::fs::write(&p.config, split(0, 100, a, b)).unwrap();
    p.signal("HUP");
    eventually("SIGHUP reload", Duration::from_secs(10), async || {
        let (_, body) = client::get(p.outbound, "web.test", "/", &[]).await.ok()?;
        (body == "b").then_some(())
    })
    .await;
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests() {
    let slow = upstream::slow(Duration::from_millis(400)).await;
    let mut p = ProxyProcess::start(
        BIN,
        &docs(&[service("slow", "HTTP", &[slow]), client_workload(&[])]),
        &["--workload", "test/client", "--drain-timeout", "10s"],
    );
    let addr = p.outbound;
    let calls: Vec<_> = (0..20)
        .map(|_| tokio::spawn(async move { client::get(addr, "slow.test", "/", &[]).await }))
        .collect();
    // Wait until every request is in flight upstream-side (the proxy has them all).
    eventually("20 in flight", Duration::from_secs(5), async || {
        (p.metric("trellis_upstream_connects_total", &[]).await >= 20.0).then_some(())
    })
    .await;
    p.signal("TERM");
    for c in calls {
        let (st, _) = c.await.unwrap().expect("in-flight request completed");
        assert_eq!(st, 200);
    }
    assert_eq!(p.wait_exit(Duration::from_secs(10)).await, Some(0));
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn invalid_config_exits_64_before_binding() {
    let port = upstream::closed_port().await;
    let path = trellis_test_support::write_temp("bad.yaml", "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: web }\nspec:\n  ports: [{ port: 80 }]\n  selectr: { app: web }\n");
    let out = std::process::Command::new(BIN)
        .args([
            "proxy",
            "--config",
            path.to_str().unwrap(),
            "--admin",
            &port.to_string(),
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:6:", path.display())) && err.contains("selectr"),
        "{err}"
    );
    assert!(!err.contains("listening"), "{err}");
}

async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut out))
        .await
        .unwrap()
        .unwrap_or(0);
    String::from_utf8_lossy(&out[..n]).into_owned()
}

#[tokio::test]
async fn bad_requests_get_4xx_and_slow_clients_are_cut_off() {
    let a = upstream::named("a").await;
    let p = ProxyProcess::start(
        BIN,
        &docs(&[service("web", "HTTP", &[a]), client_workload(&[])]),
        &[
            "--workload",
            "test/client",
            "--header-read-timeout",
            "300ms",
            "--max-header-bytes",
            "16384",
        ],
    );
    // A silent client sends nothing at all; a slow one stops mid-headers.
    let mut silent = tokio::net::TcpStream::connect(p.outbound).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(p.outbound).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: web.te")
        .await
        .unwrap();
    assert!(raw(p.outbound, b"GARBAGE\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 400"));
    let big = format!(
        "GET / HTTP/1.1\r\nHost: web.test\r\nx-big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let r = raw(p.outbound, big.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    // Others are served meanwhile.
    let (st, _) = client::get(p.outbound, "web.test", "/", &[]).await.unwrap();
    assert_eq!(st, 200);
    // The slow client is cut off by the header-read timeout.
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("cut off within the deadline");
    let text = String::from_utf8_lossy(&buf[..n.unwrap_or(0)]).into_owned();
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("the silent client is cut off within the deadline");
    assert_eq!(n.unwrap_or(0), 0, "closed without a response");
    let (st, _) = client::get(p.outbound, "web.test", "/", &[]).await.unwrap();
    assert_eq!(st, 200, "the proxy is still up");
}

/// One request on a new connection, closed after it: `Ok` with the body when answered 200,
/// else what went wrong (a refused connection included).
async fn once(addr: std::net::SocketAddr, host: &str) -> Result<String, String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let req = format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&out);
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(format!("answer: {:?}", text.lines().next())),
    }
}

/// One client per address of `addrs`, each in a loop of requests to `web.test` (answered
/// `a`) on a new connection each ([`once`]) until `stop`: answers counted in `ok`, anything
/// else named in `failed`.
fn new_connection_load(
    addrs: &[std::net::SocketAddr],
    stop: &Arc<AtomicBool>,
    ok: &Arc<AtomicUsize>,
    failed: &Arc<std::sync::Mutex<Vec<String>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    addrs
        .iter()
        .map(|&addr| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match once(addr, "web.test").await {
                        Ok(body) if body == "a" => drop(ok.fetch_add(1, Ordering::Relaxed)),
                        other => failed.lock().unwrap().push(format!("{addr}: {other:?}")),
                    }
                }
            })
        })
        .collect()
}

/// Upgrade in place: a second process started with the same flags and `--handoff` takes the
/// listeners over (the same sockets: the kernel's accept queue is shared), then the first
/// finishes its in-flight requests and exits. Under a load of new connections to the
/// outbound listener and to an explicit bind, and of kept-alive clients, none is refused and
/// no request fails, through two upgrades in a row (the second from the process that took
/// over).
#[tokio::test]
async fn an_upgrade_in_place_refuses_no_connection_and_fails_no_request() {
    let app = upstream::named("a").await;
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let slow = upstream::http(move |_| {
        s.fetch_add(1, Ordering::Relaxed);
        async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            http::Response::new(http_body_util::Full::new(bytes::Bytes::from("slow")))
        }
    })
    .await;
    let config = docs(&[
        service("web", "HTTP", &[app]),
        service("slow", "HTTP", &[slow]),
        client_workload(&["web"]),
    ]);
    let sock = Temp(trellis_test_support::temp_path("handoff.sock"));
    let args = [
        "--workload",
        "test/client",
        "--drain-timeout",
        "10s",
        "--handoff",
        sock.to_str().unwrap(),
    ];
    let mut old = ProxyProcess::start(BIN, &config, &args);
    let (outbound, bind, admin) = (old.outbound, old.upstream("web.test:80"), old.admin);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::new())),
    );
    let mut load = new_connection_load(&[outbound, bind, outbound, bind], &stop, &ok, &failed);
    // And four kept-alive HTTP/1.1 clients, idle 20 ms between requests, that open a new
    // connection when an answer says `connection: close` (and never resend): the old
    // process answers their next request with it rather than closing them while idle.
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let mut c = client::Conn::h1(outbound).await;
            while !stop.load(Ordering::Relaxed) {
                match c.get("web.test", "/").await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if r.headers.get("connection").is_some_and(|v| v == "close") {
                            c = client::Conn::h1(outbound).await;
                        }
                    }
                    other => {
                        let what = other.map_or_else(|e| e.to_string(), |r| r.status.to_string());
                        failed.lock().unwrap().push(format!("kept-alive: {what}"));
                        c = client::Conn::h1(outbound).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    for round in 0..2 {
        let before = ok.load(Ordering::Relaxed);
        // A request in flight on the old process when the new one takes over.
        let n = started.load(Ordering::Relaxed);
        let in_flight = tokio::spawn(async move { once(outbound, "slow.test").await });
        eventually(
            "the slow request upstream",
            Duration::from_secs(10),
            async || (started.load(Ordering::Relaxed) > n).then_some(()),
        )
        .await;
        let new = ProxyProcess::start(BIN, &config, &args);
        assert_eq!(
            (new.outbound, new.upstream("web.test:80"), new.admin),
            (outbound, bind, admin),
            "round {round}: the same listeners"
        );
        assert_eq!(
            old.wait_exit(Duration::from_secs(20)).await,
            Some(0),
            "round {round}: the old process drains and exits"
        );
        assert_eq!(
            in_flight.await.unwrap().as_deref(),
            Ok("slow"),
            "round {round}: the in-flight request finished on the old process"
        );
        assert!(
            old.stderr()
                .iter()
                .any(|l| l.contains("took the listeners over")),
            "round {round}: {:?}",
            old.stderr()
        );
        // The new process serves on alone.
        let after = ok.load(Ordering::Relaxed);
        eventually(
            "answers after the old one left",
            Duration::from_secs(10),
            async || (ok.load(Ordering::Relaxed) > after + 20).then_some(()),
        )
        .await;
        let (st, _) = client::get(admin, "admin", "/ready", &[]).await.unwrap();
        assert_eq!(
            st, 200,
            "round {round}: the admin listener is the new process's"
        );
        println!(
            "round {round}: {} requests answered during the upgrade, {} failed",
            ok.load(Ordering::Relaxed) - before,
            failed.lock().unwrap().len()
        );
        old = new;
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
}

/// SIGUSR2 with `--handoff`: the proxy starts its binary again with the same arguments, and
/// the new process takes the listeners over as in an upgrade; under a service manager
/// (`NOTIFY_SOCKET`, systemd's protocol; here a datagram socket the test reads) the first
/// says `READY=1` once it serves, the new one `MAINPID=` its own id with `READY=1`, so that a
/// `Type=notify` unit follows it. No connection is refused meanwhile.
#[tokio::test]
async fn sigusr2_starts_a_successor_that_takes_over_and_tells_the_service_manager() {
    let app = upstream::named("a").await;
    let config = docs(&[service("web", "HTTP", &[app]), client_workload(&[])]);
    // Removed when the test ends, failed or not.
    let sock = Temp(trellis_test_support::temp_path("usr2-handoff.sock"));
    let notify = Temp(trellis_test_support::temp_path("notify.sock"));
    let manager = tokio::net::UnixDatagram::bind(&notify).unwrap();
    let said = async || {
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(20), manager.recv(&mut buf))
            .await
            .expect("the service manager is told")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let args = [
        "--workload",
        "test/client",
        "--handoff",
        sock.to_str().unwrap(),
    ];
    let mut old = ProxyProcess::start_with_env(
        BIN,
        &config,
        &args,
        &[("NOTIFY_SOCKET", notify.to_str().unwrap())],
    );
    assert_eq!(said().await, "READY=1");
    let outbound = old.outbound;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::new())),
    );
    let load = new_connection_load(&[outbound, outbound], &stop, &ok, &failed);
    old.signal("USR2");
    let told = said().await;
    let pid: u32 = told
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID: {told:?}"));
    assert!(told.lines().any(|l| l == "READY=1"), "{told:?}");
    assert_ne!(pid, old.pid(), "a new process");
    assert_eq!(old.wait_exit(Duration::from_secs(20)).await, Some(0));
    let after = ok.load(Ordering::Relaxed);
    eventually(
        "the successor serves",
        Duration::from_secs(10),
        async || (ok.load(Ordering::Relaxed) > after + 20).then_some(()),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    // The successor is no child of this test: ended by its id.
    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status();
    let failed = failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
}
