use tokio::net::TcpListener;

use super::*;
use crate::test_util::shared;

const MESH: &str = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: db, namespace: shop }\nspec:\n  selector: { app: db }\n  ports: [{ name: sql, port: 5432, protocol: TCP }]\n";

async fn accepted() -> TcpStream {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    l.accept().await.unwrap().0
}

#[tokio::test]
async fn a_bind_whose_cluster_is_gone_still_records_its_connection() {
    let (shared, sink) = shared(MESH, None);
    // A connection accepted on a bind that a reload is closing: its cluster is gone.
    serve_bind(shared.clone(), "shop/old:5432".into(), accepted().await).await;
    // A service without endpoints: the connection is recorded with why.
    serve_bind(shared.clone(), "shop/db:5432".into(), accepted().await).await;
    shared.telemetry.log.close();
    let lines = sink.lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["kind"], "tcp");
    assert_eq!(lines[0]["failure_class"], "no_route", "{}", lines[0]);
    assert!(
        lines[0]["detail"]
            .as_str()
            .unwrap()
            .contains("shop/old:5432 is no longer configured"),
        "{}",
        lines[0]
    );
    assert_eq!(
        lines[1]["failure_class"], "no_healthy_upstream",
        "{}",
        lines[1]
    );
    assert_eq!(lines[1]["dst_service"], "db.shop");
    let m = &shared.telemetry.metrics;
    let open = m.tcp_open.get_or_create(&crate::metrics::ServiceLabels {
        direction: Direction::outbound,
        dst_service: Label::from("db.shop"),
    });
    assert_eq!(open.get(), 0, "counted closed again");
}

/// Two ends of a loopback TCP connection: (the end the proxy holds, the far end).
async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let far = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    (l.accept().await.unwrap().0, far)
}

/// Reset `s` (close with SO_LINGER 0).
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

#[tokio::test]
async fn a_splice_tells_whose_side_reset_it() {
    use tokio::io::AsyncWriteExt;
    let (shared, sink) = shared(MESH, None);
    for client_resets in [true, false] {
        let (mut client, client_far) = pair().await;
        let (mut up, mut up_far) = pair().await;
        let rec = ConnRecord::new(
            shared.telemetry.clone(),
            Direction::inbound,
            Label::from("db.shop"),
        );
        let task = tokio::spawn(async move {
            let mut rec = rec;
            splice(&mut client, &mut up, &mut rec, COPY_BUF).await;
        });
        if client_resets {
            reset(client_far);
        } else {
            // The application sends a little, then resets.
            up_far.write_all(b"partial").await.unwrap();
            reset(up_far);
        }
        task.await.unwrap();
    }
    shared.telemetry.log.close();
    let lines = sink.lines();
    let classes: Vec<&str> = lines
        .iter()
        .map(|l| l["failure_class"].as_str().unwrap())
        .collect();
    // The client's reset is its leaving; the application's is the connection's reset.
    assert_eq!(
        classes,
        ["client_disconnect", "connection_reset"],
        "{lines:?}"
    );
    assert_eq!(lines[0]["failure_side"], "downstream", "{}", lines[0]);
    assert_eq!(lines[1]["failure_side"], "upstream", "{}", lines[1]);
}
