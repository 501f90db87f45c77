//! A real proxyless gRPC client (grpcio's xDS resolver, gRFC A27) resolves
//! `xds:///catalog.shop:80` through the control plane and calls a real gRPC server; a
//! route's `trellis.dev/Fault` reaches it as the fault filter's override (gRFC A33).
//!
//! Needs a Python with `grpcio` and `grpcio-health-checking`: `$TRELLIS_GRPC_PYTHON`, or the
//! virtualenv that `.ci/run` makes in `target/grpc-venv`.

mod common;

use std::{path::PathBuf, process::Command};

use common::*;
use trellis_test_support::{control::ControlProcess, write_temp};

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("TRELLIS_GRPC_PYTHON") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/grpc-venv/bin/python");
    assert!(
        p.exists(),
        "no Python with grpcio: run `python3 -m venv target/grpc-venv && target/grpc-venv/bin/pip install grpcio grpcio-health-checking` (.ci/run does), or set TRELLIS_GRPC_PYTHON"
    );
    p
}

async fn health_server() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (reporter, svc) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    addr
}

#[tokio::test]
async fn grpc_python_client_resolves_and_calls_through_xds() {
    let py = python();
    let server = health_server().await;
    let cp = ControlProcess::start(BIN, &[]);
    let mesh = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: catalog, namespace: shop }}\nspec:\n  selector: {{ app: catalog }}\n  ports: [{{ name: grpc, port: 80, protocol: GRPC }}]\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: catalog-1, namespace: shop, labels: {{ app: catalog }} }}\nspec:\n  address: 127.0.0.1\n  ports: {{ grpc: {} }}\n  environment: container\n  locality: {{ region: eu-west, zone: eu-west-1a }}\n",
        server.port()
    );
    let (st, v) = cp
        .call(http::Method::POST, "/api/v1/apply", &mesh, None)
        .await;
    assert_eq!(st, 200, "{v}");
    let bootstrap = serde_json::json!({
        "xds_servers": [{
            "server_uri": cp.xds.to_string(),
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"]
        }],
        "node": {"id": "grpc-python", "locality": {"zone": "eu-west-1a"}}
    });
    let b = write_temp("bootstrap.json", &bootstrap.to_string());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/grpc_xds_client.py");
    // One call by a new client process: whether it succeeded, what it printed, its stderr.
    let call = || {
        let (py, script, b) = (py.clone(), script.clone(), b.to_path_buf());
        async move {
            let out = tokio::task::spawn_blocking(move || {
                Command::new(py)
                    .arg(script)
                    .arg("catalog.shop:80")
                    .env("GRPC_XDS_BOOTSTRAP", b.as_os_str())
                    .output()
                    .unwrap()
            })
            .await
            .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let (ok, so, se) = call().await;
    assert!(ok, "grpc client failed:\n{so}\n{se}");
    assert_eq!(so, "SERVING");
    // The control plane recorded the client's ACKs of all four types.
    let (_, v) = cp
        .call(http::Method::GET, "/api/v1/proxies", "", None)
        .await;
    let p = v["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == "grpc-python");
    // The client may have closed its stream already; when it is still there, it acked.
    if let Some(p) = p {
        for t in ["listener", "route", "cluster", "endpoint"] {
            assert_eq!(p["types"][t]["acked"], p["types"][t]["sent"], "{t}: {p}");
        }
    }

    // A fault on the route: the client aborts every call itself, with the status asked for
    // (ABORTED, which neither the server nor a broken connection would give).
    let faulty = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: { name: catalog, namespace: shop }\nspec:\n  parentRefs: [{ kind: Service, name: catalog, port: 80 }]\n  rules:\n    - backendRefs: [{ name: catalog, port: 80 }]\n      filters:\n        - type: trellis.dev/Fault\n          fault:\n            - abort: { percent: 100, grpcStatus: 10 }\n";
    let (st, v) = cp
        .call(http::Method::POST, "/api/v1/apply", faulty, None)
        .await;
    assert_eq!(st, 200, "{v}");
    let (ok, so, se) = call().await;
    assert!(!ok && so == "ABORTED", "{so}\n{se}");
    // Gone with the route: served again.
    let (st, v) = cp
        .call(
            http::Method::DELETE,
            "/api/v1/resources/GRPCRoute/shop/catalog",
            "",
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (ok, so, se) = call().await;
    assert!(ok && so == "SERVING", "{so}\n{se}");
}
