//! Incremental xDS for Trellis documents: a change sends only what changed, a delete sends a
//! name, and a reconnecting client that says what it has gets nothing it already has.

use std::{collections::HashMap, time::Duration};

mod common;

use common::InProcess;
use tokio_stream::wrappers::ReceiverStream;
use trellis_xds::{
    envoy_types::pb::envoy::service::discovery::v3::{
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    },
    Document, DOCUMENT_TYPE, PARTIAL_SUFFIX,
};

fn mesh(port: u16) -> String {
    let mut y = format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: s, namespace: d }}\nspec:\n  selector: {{ app: s }}\n  ports: [{{ port: {port} }}]\n");
    for i in 0..5 {
        y.push_str(&format!("---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: w{i}, namespace: d, labels: {{ app: s }} }}\nspec:\n  address: 127.0.0.{}\n", i + 1));
    }
    y
}

struct Stream {
    tx: tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Stream {
    async fn open(cp: &InProcess, initial: HashMap<String, String>) -> Self {
        let mut c = AggregatedDiscoveryServiceClient::connect(cp.xds_url())
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(DeltaDiscoveryRequest {
            node: Some(trellis_xds::node("delta-test", None)),
            type_url: DOCUMENT_TYPE.into(),
            initial_resource_versions: initial,
            ..Default::default()
        })
        .await
        .unwrap();
        let rx = c
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }

    /// The next response, ACKed.
    async fn next(&mut self) -> DeltaDiscoveryResponse {
        let r = tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("a response in time")
            .unwrap()
            .unwrap();
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: DOCUMENT_TYPE.into(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        r
    }
}

#[tokio::test]
async fn delta_sends_only_what_changed() {
    let api = InProcess::start("delta").await;
    api.call(http::Method::POST, "/api/v1/apply", &mesh(80))
        .await;

    let mut s = Stream::open(&api, HashMap::new()).await;
    let first = s.next().await;
    // Every applied document, and the control plane's TrustBundle.
    assert_eq!(first.resources.len(), 6 + 1, "everything at first");
    let have: HashMap<String, String> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    assert!(have.contains_key("Workload/d/w3"));

    // One workload changes: one document is sent.
    let w3 = "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: w3, namespace: d, labels: { app: s } }\nspec:\n  address: 127.0.0.99\n";
    api.call(http::Method::POST, "/api/v1/apply", w3).await;
    let r = s.next().await;
    let names: Vec<&str> = r.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["Workload/d/w3"]);
    assert!(r.removed_resources.is_empty());

    // A delete sends only the name.
    api.call(http::Method::DELETE, "/api/v1/resources/workload/d/w1", "")
        .await;
    let r = s.next().await;
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, ["Workload/d/w1"]);

    // A client that reconnects with what it has gets only the difference: here, w3 changed
    // and w1 went away since it last heard.
    let mut s2 = Stream::open(&api, have).await;
    let r = s2.next().await;
    let names: Vec<&str> = r.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["Workload/d/w3"]);
    assert_eq!(r.removed_resources, ["Workload/d/w1"]);
}

#[tokio::test]
async fn a_large_update_goes_in_small_parts() {
    let api = InProcess::start("delta-parts").await;
    let mut y = mesh(80);
    for i in 0..1000 {
        y.push_str(&format!("---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: x{i}, namespace: d, labels: {{ app: s }} }}\nspec:\n  address: 127.0.2.{}\n", i % 250 + 1));
    }
    api.call(http::Method::POST, "/api/v1/apply", &y).await;

    let mut s = Stream::open(&api, HashMap::new()).await;
    let mut names = std::collections::BTreeSet::new();
    let mut parts = 0;
    loop {
        let r = s.next().await;
        parts += 1;
        let yaml: usize = r
            .resources
            .iter()
            .map(|x| {
                let any = x.resource.as_ref().unwrap();
                <Document as prost::Message>::decode(any.value.as_slice())
                    .unwrap()
                    .yaml
                    .len()
            })
            .sum();
        assert!(
            yaml <= 15 << 10,
            "part {parts} carries {yaml} bytes of YAML"
        );
        // Encoded with gRPC's 5-byte prefix, it fits a 16 KiB buffer (tonic's 8 KiB doubled
        // once), which the stream then keeps.
        let encoded = prost::Message::encoded_len(&r) + 5;
        assert!(
            encoded <= 16 << 10,
            "part {parts} is {encoded} bytes encoded"
        );
        for x in &r.resources {
            assert!(names.insert(x.name.clone()), "{} sent twice", x.name);
        }
        if !r.system_version_info.ends_with(PARTIAL_SUFFIX) {
            break;
        }
    }
    assert!(parts >= 3, "{parts} parts");
    // And the control plane's TrustBundle.
    assert_eq!(names.len(), 1006 + 1, "every document, once");
}
