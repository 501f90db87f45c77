use std::net::{SocketAddr, TcpListener, TcpStream};

use trellis_test_support::Temp;

use super::*;

/// A handoff socket's path, unique to the test, removed when the test ends (failed or not).
fn path(name: &str) -> Temp {
    Temp(trellis_test_support::temp_path(&format!(
        "handoff-{name}.sock"
    )))
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A running side: `listener` offered as `outbound`, answering at `at`.
fn running(
    at: &Path,
    listener: &TcpListener,
) -> (Offered, tokio::task::JoinHandle<std::io::Result<u32>>) {
    let offered = Offered::default();
    offered.add("outbound", listener).unwrap();
    offered.pass_on("healthy", serde_json::json!(true));
    let l = bind(at).unwrap();
    let serving = tokio::spawn(serve(l, offered.clone()));
    (offered, serving)
}

#[tokio::test]
async fn a_successor_serves_the_same_socket_and_the_predecessor_learns_when_it_is_ready() {
    let at = path("takeover");
    let old = TcpListener::bind(any_port()).unwrap();
    let addr = old.local_addr().unwrap();
    let (offered, serving) = running(&at, &old);
    let mut inherited = take_over(&at)
        .await
        .unwrap()
        .expect("a running process answers");
    assert_eq!(inherited.offer.pid, std::process::id());
    assert_eq!(inherited.offer.extra["healthy"], true);
    let new = inherited
        .take_tcp("outbound", any_port())
        .expect("handed over");
    assert_eq!(new.local_addr().unwrap(), addr);
    // The predecessor closes its copies: the socket lives on in the successor, and a
    // connection made now waits in its backlog instead of being refused.
    drop(old);
    offered.remove("outbound");
    let _client = TcpStream::connect(addr).expect("not refused");
    new.set_nonblocking(false).unwrap();
    new.accept().expect("accepted by the successor");
    assert!(
        !serving.is_finished(),
        "the predecessor stops only once told"
    );
    inherited.finish().unwrap();
    let pid = tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("the predecessor learns")
        .unwrap()
        .unwrap();
    assert_eq!(pid, std::process::id());
}

#[tokio::test]
async fn nothing_to_take_over_from_a_missing_or_stale_socket() {
    let at = path("missing");
    assert!(take_over(&at).await.unwrap().is_none());
    // A socket file whose process is gone: connections to it are refused.
    drop(std::os::unix::net::UnixListener::bind(&at).unwrap());
    assert!(at.exists());
    assert!(take_over(&at).await.unwrap().is_none());
    // And it is replaced by the next one to answer there.
    let l = bind(&at).unwrap();
    drop(l);
}

#[tokio::test]
async fn a_successor_that_goes_away_before_it_is_ready_leaves_the_predecessor_serving() {
    let at = path("gone");
    let old = TcpListener::bind(any_port()).unwrap();
    let (_offered, serving) = running(&at, &old);
    let first = take_over(&at).await.unwrap().expect("answers");
    drop(first);
    // Still offering: a second successor takes over.
    let mut second = take_over(&at).await.unwrap().expect("still answers");
    assert!(second.take_tcp("outbound", any_port()).is_some());
    second.finish().unwrap();
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("the predecessor learns")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_listener_configured_elsewhere_is_not_taken() {
    let at = path("moved");
    let old = TcpListener::bind(any_port()).unwrap();
    let other = TcpListener::bind(any_port()).unwrap().local_addr().unwrap();
    let (_offered, _serving) = running(&at, &old);
    let mut inherited = take_over(&at).await.unwrap().expect("answers");
    assert!(inherited.take_tcp("outbound", other).is_none());
    assert!(
        inherited.take_tcp("inbound", any_port()).is_none(),
        "never offered"
    );
}

/// A process on its way out may accept and close without an offer: the new one asks again,
/// and starts afresh once nothing answers (it failed to start before).
#[tokio::test]
async fn a_predecessor_that_closes_without_an_offer_is_asked_again() {
    let at = path("exiting");
    let l = std::os::unix::net::UnixListener::bind(&at).unwrap();
    let exiting = std::thread::spawn(move || {
        let (conn, _) = l.accept().unwrap();
        drop(conn);
        // Then gone: the file stays, connections are refused.
        drop(l);
    });
    assert!(take_over(&at).await.unwrap().is_none());
    exiting.join().unwrap();
}

/// Sockets are taken only from a process of the same user: one of another user's answering
/// at the path is refused, named (needs root to run a process as `nobody`; skipped without).
#[tokio::test]
async fn a_process_of_another_user_is_not_taken_over_from() {
    use std::os::unix::process::CommandExt;
    if !rustix::process::getuid().is_root() {
        eprintln!("skipped: not root");
        return;
    }
    let at = path("other-user");
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.bind({:?})\ns.listen()\nprint('up', flush=True)\nc,_=s.accept()\nsys.stdin.read()",
        at.to_str().unwrap()
    );
    let mut other = std::process::Command::new("python3")
        .args(["-c", &script])
        .uid(65534)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut up = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(other.stdout.take().unwrap()),
        &mut up,
    )
    .unwrap();
    let refused = take_over(&at).await;
    let _ = other.kill();
    let _ = other.wait();
    let err = refused.err().expect("refused").to_string();
    assert!(err.contains("another user"), "{err}");
}

/// State passed on live that would make the offer too large for the successor is left out,
/// and the sockets and the fixed state are handed over all the same.
#[tokio::test]
async fn an_offer_too_large_with_its_live_state_is_made_without_it() {
    let at = path("large");
    let old = TcpListener::bind(any_port()).unwrap();
    let (offered, _serving) = running(&at, &old);
    offered.pass_on_live("names", || serde_json::json!(["x".repeat(100)]));
    offered.pass_on_live("huge", || serde_json::json!("y".repeat(MAX_OFFER)));
    let mut inherited = take_over(&at)
        .await
        .unwrap()
        .expect("a running process answers");
    assert_eq!(inherited.offer.extra["healthy"], true);
    assert!(inherited.offer.extra.get("huge").is_none());
    assert!(inherited.offer.extra.get("names").is_none());
    assert!(inherited.take_tcp("outbound", any_port()).is_some());
    inherited.finish().unwrap();
}

/// What is passed on live is read when the offer is made.
#[tokio::test]
async fn live_state_is_read_when_the_offer_is_made() {
    let at = path("live");
    let old = TcpListener::bind(any_port()).unwrap();
    let (offered, _serving) = running(&at, &old);
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(1));
    let read = n.clone();
    offered.pass_on_live("n", move || {
        read.load(std::sync::atomic::Ordering::Relaxed).into()
    });
    n.store(7, std::sync::atomic::Ordering::Relaxed);
    let inherited = take_over(&at)
        .await
        .unwrap()
        .expect("a running process answers");
    assert_eq!(inherited.offer.extra["n"], 7);
    assert_eq!(inherited.offer.extra["healthy"], true);
    inherited.finish().unwrap();
}
