use std::sync::Arc;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::Semaphore,
};

use super::*;

/// A server that accepts connections and keeps them open until the returned sender says
/// `true`.
async fn server() -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (close, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut rx = rx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                tokio::select! {
                    _ = s.read(&mut buf) => {}
                    _ = rx.wait_for(|c| *c) => {}
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, close)
}

fn ctx<'a>(slots: &'a Arc<Semaphore>, metrics: &'a Metrics) -> ConnectCtx<'a> {
    ConnectCtx {
        timeout: Duration::from_secs(5),
        slots,
        cluster: "shop/up:80",
        metrics,
        tls: None,
        mtls: MtlsMode::Permissive,
        port: 80,
        mark: None,
    }
}

fn h1(s: Sender) -> Box<Conn> {
    match s {
        Sender::H1(c) => c,
        Sender::H2(_) => panic!("asked for HTTP/1.1"),
    }
}

#[tokio::test]
async fn a_checked_in_connection_is_checked_out_again_while_alive_and_fresh() {
    let (addr, close) = server().await;
    let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
    let slots = Arc::new(Semaphore::new(2));
    let pool = Pool::new(addr, "shop/up-1".into(), None, Duration::from_secs(60));
    let c = ctx(&slots, &metrics);
    let now = Instant::now();
    // Nothing idle: a new connection, which takes a slot.
    let (s, connect) = pool.checkout(false, &c, now, None).await.unwrap();
    assert!(connect > Duration::ZERO);
    assert_eq!(slots.available_permits(), 1);
    let mut conn = h1(s);
    conn.mark_reused();
    pool.idle().checkin(conn, now);
    // Checked in: the same connection comes back, no connect.
    let (s, connect) = pool.checkout(false, &c, now, None).await.unwrap();
    assert_eq!(connect, Duration::ZERO);
    assert!(h1(s).is_reused());
    let connects = metrics.pool_connects.get_or_create(&EndpointLabels {
        cluster: "shop/up:80".into(),
        endpoint: addr.to_string(),
    });
    assert_eq!(connects.get(), 1, "one connection made");
    // (Dropped above: its slot is free again.)
    assert_eq!(slots.available_permits(), 2);

    // A connection the server closed while it sat idle is not handed out.
    let (s, _) = pool.checkout(false, &c, now, None).await.unwrap();
    pool.idle().checkin(h1(s), now);
    close.send_replace(true);
    crate::test_util::eventually_async(|| {
        let pool = &pool;
        async move { pool.idle().pop(Instant::now()).is_none() }
    })
    .await;
    // One idle longer than the pool's idle timeout is not either.
    let short = Pool::new(addr, "shop/up-1".into(), None, Duration::from_millis(1));
    let (s, _) = short.checkout(false, &c, now, None).await.unwrap();
    short.idle().checkin(h1(s), now);
    assert!(short.idle().pop(now + Duration::from_millis(5)).is_none());
}

#[tokio::test]
async fn the_connection_limit_is_the_clusters() {
    let (addr, _close) = server().await;
    let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
    let slots = Arc::new(Semaphore::new(1));
    let pool = Pool::new(addr, "shop/up-1".into(), None, Duration::from_secs(60));
    let c = ctx(&slots, &metrics);
    let (held, _) = pool
        .checkout(false, &c, Instant::now(), None)
        .await
        .unwrap();
    let e = pool
        .checkout(false, &c, Instant::now(), None)
        .await
        .err()
        .unwrap();
    assert_eq!(e.class(), crate::error::FailureClass::Overloaded);
    assert!(e.to_string().contains("max connections"), "{e}");
    drop(held);
    assert!(pool.checkout(false, &c, Instant::now(), None).await.is_ok());
}

#[tokio::test]
async fn connect_failures_name_the_workload_and_the_address() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
    let slots = Arc::new(Semaphore::new(1));
    let pool = Pool::new(closed, "shop/up-1".into(), None, Duration::from_secs(60));
    let e = pool
        .checkout(false, &ctx(&slots, &metrics), Instant::now(), None)
        .await
        .err()
        .unwrap();
    assert_eq!(e.class(), crate::error::FailureClass::ConnectRefused);
    assert!(
        e.to_string().contains(&format!("shop/up-1 at {closed}")),
        "{e}"
    );
    assert_eq!(
        slots.available_permits(),
        1,
        "a failed connect gives its slot back"
    );
}

/// An HTTP/2 server that serves connections until their clients close them.
async fn h2_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let _ = respond.send_response(http::Response::new(()), true);
                }
            });
        }
    });
    addr
}

/// The shared HTTP/2 connection is closed once no request has taken it for the idle timeout
/// (its slot comes back, so the cluster is no longer busy and a name asked for on demand
/// can be released), and the next request opens a new one.
#[tokio::test]
async fn an_http2_connection_unused_for_the_idle_timeout_is_closed() {
    let addr = h2_server().await;
    let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
    let slots = Arc::new(Semaphore::new(2));
    let pool = Pool::new(addr, "shop/up-1".into(), None, Duration::from_secs(60));
    let c = ctx(&slots, &metrics);
    let t0 = Instant::now();
    let (s, connect) = pool.checkout(true, &c, t0, None).await.unwrap();
    assert!(connect > Duration::ZERO);
    drop(s);
    assert_eq!(slots.available_permits(), 1);
    // Used again within the idle time: kept.
    let (_s, connect) = pool
        .checkout(true, &c, t0 + Duration::from_secs(30), None)
        .await
        .unwrap();
    assert_eq!(connect, Duration::ZERO);
    drop(_s);
    pool.prune(t0 + Duration::from_secs(80));
    assert_eq!(slots.available_permits(), 1, "used 50 s ago: kept");
    // Unused for the idle time: closed, and its slot given back.
    pool.prune(t0 + Duration::from_secs(91));
    wait_until(|| slots.available_permits() == 2).await;
    let (_s, connect) = pool
        .checkout(true, &c, t0 + Duration::from_secs(92), None)
        .await
        .unwrap();
    assert!(connect > Duration::ZERO, "a new connection");
}

/// Wait (5 s at most) until `done` holds.
async fn wait_until(done: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("within 5 s");
}
