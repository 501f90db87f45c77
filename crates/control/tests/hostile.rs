//! Hostile xDS clients: a message over the size limit ends only its own stream, with
//! RESOURCE_EXHAUSTED, and the control plane serves the next client.

use std::time::Duration;

mod common;

use common::InProcess;
use tokio_stream::wrappers::ReceiverStream;
use trellis_xds::{
    envoy_types::pb::envoy::service::discovery::v3::{
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        DeltaDiscoveryRequest,
    },
    DOCUMENT_TYPE,
};

async fn first_answer(cp: &InProcess, req: DeltaDiscoveryRequest) -> Result<usize, tonic::Status> {
    let (_tx, mut rx) = cp.delta_stream(req).await?;
    let m = tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .expect("an answer in time")?;
    Ok(m.map_or(0, |m| m.resources.len()))
}

/// A control plane holding one Service, `d/s`.
async fn with_a_service(test: &str) -> InProcess {
    let cp = InProcess::start(test).await;
    cp.call(
        http::Method::POST,
        "/api/v1/apply",
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: s, namespace: d }\nspec:\n  selector: { app: s }\n  ports: [{ port: 80 }]\n",
    )
    .await;
    cp
}

/// A first delta request of node `id` (no workload): everything.
fn hello(id: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(trellis_xds::node(id, None)),
        type_url: DOCUMENT_TYPE.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn an_xds_message_over_the_limit_ends_only_its_stream() {
    let cp = with_a_service("hostile-xds").await;
    // 17 MiB of subscribed names: over the 16 MiB a message may have.
    let mut big = hello("hostile");
    big.resource_names_subscribe = (0..17 * 1024).map(|i| format!("{i:01024}")).collect();
    let err = first_answer(&cp, big).await.expect_err("refused");
    assert!(
        matches!(
            err.code(),
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
        ),
        "{err:?}"
    );
    assert!(err.message().contains("message"), "{err:?}");
    // The next client is served as ever.
    let got = first_answer(&cp, hello("hostile")).await.expect("served");
    assert!(got >= 1, "{got}");
}

/// A client (a proxy of a workload) subscribing to many names that do not exist is told they
/// do not, at most 4,096 of them: the control plane does not hold more for it.
#[tokio::test]
async fn names_subscribed_beyond_the_bound_are_not_held() {
    let cp = InProcess::start("hostile-names").await;
    cp.call(
        http::Method::POST,
        "/api/v1/apply",
        "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: w, namespace: d }\nspec: { address: 127.0.0.1 }\n",
    )
    .await;
    let (_tx, mut rx) = cp
        .delta_stream(DeltaDiscoveryRequest {
            node: Some(trellis_xds::node("greedy", Some("d/w"))),
            type_url: DOCUMENT_TYPE.into(),
            resource_names_subscribe: (0..6000).map(|i| format!("Service/d/n{i}")).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .expect("an answer in time")
        .unwrap()
        .expect("a response");
    // Its own Workload and the trust bundle, and the names it asked for told absent, as far
    // as the bound.
    let mut names: Vec<&str> = m.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["TrustBundle/trellis-system/mesh", "Workload/d/w"]);
    assert_eq!(m.removed_resources.len(), 4096);
}

/// Clients that subscribe and never answer cannot hold up the others' updates: 130 streams
/// (more than the 128 updates that may be in flight) subscribe and never acknowledge their
/// first response; a client that subscribes after them gets its first config once they give
/// their permits up (1 s), not when their answers time out (10 s: it did before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_answer_do_not_hold_up_the_others() {
    let cp = with_a_service("hostile-silent").await;
    let mut silent = Vec::new();
    for i in 0..130 {
        // A connection per 40 streams (a server admits a bounded number per connection).
        if i % 40 == 0 {
            let ch = tonic::transport::Channel::from_shared(cp.xds_url())
                .unwrap()
                .connect()
                .await
                .unwrap();
            silent.push((ch, Vec::new()));
        }
        let (ch, streams) = silent.last_mut().unwrap();
        let mut c = AggregatedDiscoveryServiceClient::new(ch.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(hello(&format!("silent-{i}"))).await.unwrap();
        let stream = c
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        // Kept open, never read, never answered.
        streams.push((tx, stream));
    }
    let began = std::time::Instant::now();
    let got = first_answer(&cp, hello("patient")).await.expect("served");
    let waited = began.elapsed();
    eprintln!("the client after 130 silent ones was answered after {waited:?}");
    assert!(got >= 1, "{got}");
    assert!(
        waited < Duration::from_secs(5),
        "held up by clients that never answer: {waited:?}"
    );
    // `check` names them: they neither acknowledge nor refuse what they are sent.
    let line = trellis_test_support::eventually(
        "check names the clients that do not answer",
        Duration::from_secs(10),
        async || {
            let v = cp.call(http::Method::GET, "/api/v1/check", "").await;
            let c = v["checks"]
                .as_array()?
                .iter()
                .find(|c| c["name"] == "proxies in sync")?
                .clone();
            c["message"]
                .as_str()?
                .starts_with("130 do not answer")
                .then_some(c)
        },
    )
    .await;
    assert_eq!(line["outcome"], "fail", "{line}");
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .contains("silent-0 at 127.0.0.1:"),
        "{line}"
    );
}
