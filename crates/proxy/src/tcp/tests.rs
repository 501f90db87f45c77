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
