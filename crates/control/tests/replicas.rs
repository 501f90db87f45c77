//! Control-plane replicas on one etcd: an agent's deregistration through one replica waits
//! for the proxies connected to the others too, and a replay of it to another replica is
//! refused (needs Debian's etcd-server: `.ci/run` installs it).

use std::time::{Duration, Instant, SystemTime};

mod common;

use common::InProcess;
use serde_json::json;
use trellis_xds::{
    envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest, DOCUMENT_TYPE,
};

const MESH: &str = "apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: catalog, namespace: test }
spec:
  selector: { app: catalog }
  ports: [{ port: 80 }]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: catalog-1, namespace: test, labels: { app: catalog } }
spec: { address: 127.0.0.1, identity: catalog }
";

/// How long the slow client takes to acknowledge a response: well over what a replica
/// takes to answer a deregistration whose own proxies are in step (milliseconds), well
/// under the second after which a client that has not answered counts as stuck.
const ACK_DELAY: Duration = Duration::from_millis(600);

/// A delta xDS client of `cp` that subscribes to every document and acknowledges each
/// response [`ACK_DELAY`] after it came; resolves to when it acknowledged the response that
/// removed `gone`.
async fn slow_client(cp: &InProcess, gone: &'static str) -> tokio::task::JoinHandle<Instant> {
    let (tx, mut stream) = cp
        .delta_stream(DeltaDiscoveryRequest {
            node: Some(trellis_xds::node("slow", None)),
            type_url: DOCUMENT_TYPE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::spawn(async move {
        loop {
            let m = stream
                .message()
                .await
                .unwrap()
                .expect("the stream stays open");
            tokio::time::sleep(ACK_DELAY).await;
            tx.send(DeltaDiscoveryRequest {
                type_url: DOCUMENT_TYPE.into(),
                response_nonce: m.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
            if m.removed_resources.iter().any(|r| r == gone) {
                return Instant::now();
            }
        }
    })
}

/// A deregistration taken by replica A answers only once a proxy connected to replica B has
/// applied it: callers connected to B would otherwise keep sending to the leaving workload
/// while it drains. The same request replayed to B is refused. The agent's request is signed as `trellis join` signs it, with a
/// certificate of the workload's identity got with a join token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistration_waits_for_every_replicas_proxies_and_no_replica_takes_it_twice() {
    let etcd = trellis_test_support::etcd::Etcd::start().await;
    let a = InProcess::start_on("replicas-a", &etcd.url()).await;
    let b = InProcess::start_on("replicas-b", &etcd.url())
        .await
        .with_token_of(&a);
    a.call(http::Method::POST, "/api/v1/apply", MESH).await;

    // A caller's proxy on B that takes 600 ms to acknowledge, and is in step with the mesh.
    let acked = slow_client(&b, "Workload/test/catalog-1").await;
    trellis_test_support::eventually(
        "the slow client in step",
        Duration::from_secs(20),
        async || {
            let v = b.call(http::Method::GET, "/api/v1/proxies", "").await;
            let p = v["proxies"]
                .as_array()?
                .iter()
                .find(|p| p["node"] == "slow")?
                .clone();
            let d = &p["types"]["document"];
            (d["acked"] == d["sent"] && d["acked"] != "").then_some(())
        },
    )
    .await;

    // The workload's credentials, as `trellis join` gets them.
    let (st, t) = a
        .post_as(
            "/api/v1/tokens",
            &json!({ "namespace": "test", "identity": "catalog", "ttlSeconds": 600 }),
            Some(a.token()),
        )
        .await;
    assert_eq!(st, 200, "{t}");
    let (key, csr) = trellis_identity::key_and_csr().unwrap();
    let (st, cert) = a
        .post_as(
            "/api/v1/certificates",
            &json!({ "csr": csr }),
            t["token"].as_str(),
        )
        .await;
    assert_eq!(st, 200, "{cert}");
    let ts = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let request =
        json!({ "op": "deregister", "name": "catalog-1", "waitMs": 5000, "ts": ts }).to_string();
    let proof = trellis_identity::join::hex(&trellis_identity::prove(&key, &request).unwrap());
    let envelope = json!({
        "certificate": cert["certificate"],
        "proof": proof,
        "request": request,
    });

    let (st, v) = a.post_as("/api/v1/agent", &envelope, None).await;
    let answered = Instant::now();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["behind"], 0, "{v}");
    let acked = acked.await.unwrap();
    assert!(
        acked <= answered,
        "A answered the deregistration {:?} before B's proxy had applied it",
        acked - answered
    );

    // The same signed request replayed to B, which never saw it: refused all the same.
    let (st, v) = b.post_as("/api/v1/agent", &envelope, None).await;
    assert_eq!(st, 401, "{v}");
    assert!(
        v["error"].as_str().unwrap_or_default().contains("replayed"),
        "{v}"
    );
}
