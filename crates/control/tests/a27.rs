//! The standard resources, read the way a proxyless gRPC client (gRFC A27) reads them: a real
//! tonic ADS client against a control plane started in-process.

use std::time::Duration;

use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
mod common;

use common::InProcess;
use trellis_xds::{
    envoy_types::pb::envoy::{
        config::{
            cluster::v3::{cluster::ClusterDiscoveryType, cluster::DiscoveryType, Cluster},
            core::v3::config_source::ConfigSourceSpecifier,
            endpoint::v3::{lb_endpoint::HostIdentifier, ClusterLoadAssignment},
            listener::{self, v3::Listener},
            route::v3::{
                route::Action,
                route_action::{ClusterNotFoundResponseCode, ClusterSpecifier},
                RouteConfiguration,
            },
        },
        extensions::{
            filters::network::{
                http_connection_manager::v3::{
                    http_connection_manager::RouteSpecifier, HttpConnectionManager,
                },
                tcp_proxy::v3::{tcp_proxy, TcpProxy},
            },
            upstreams::http::v3::{
                http_protocol_options::{
                    explicit_http_config::ProtocolConfig, ExplicitHttpConfig,
                    UpstreamProtocolOptions,
                },
                HttpProtocolOptions,
            },
        },
        service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            DiscoveryRequest, DiscoveryResponse,
        },
    },
    CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE,
};

const MESH: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: catalog, namespace: shop }
spec:
  selector: { app: catalog }
  ports: [{ name: grpc, port: 80, targetPort: 9000, protocol: GRPC }]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: catalog-v2, namespace: shop }
spec:
  selector: { app: catalog, version: v2 }
  ports: [{ name: grpc, port: 80, targetPort: 9000, protocol: GRPC }]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: vm-1, namespace: shop, labels: { app: catalog, version: v1 } }
spec:
  address: 127.0.0.2
  environment: vm
  locality: { region: eu-west, zone: eu-west-1a }
  weight: 3
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: ctr-1, namespace: shop, labels: { app: catalog, version: v2 } }
spec:
  address: 127.0.0.3
  environment: container
  locality: { region: eu-west, zone: eu-west-1b }
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: { name: catalog, namespace: shop }
spec:
  parentRefs: [{ name: catalog, port: 80 }]
  rules:
    - matches: [{ method: { service: shop.Catalog, method: Get } }]
      backendRefs: [{ name: catalog, port: 80, weight: 90 }, { name: catalog-v2, port: 80, weight: 10 }]
"#;

async fn fetch(
    tx: &tokio::sync::mpsc::Sender<DiscoveryRequest>,
    rx: &mut tonic::Streaming<DiscoveryResponse>,
    type_url: &str,
    names: &[&str],
    node: bool,
) -> DiscoveryResponse {
    tx.send(DiscoveryRequest {
        node: node.then(|| trellis_xds::node("grpc-client", None)),
        type_url: type_url.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .expect("response in time")
        .unwrap()
        .unwrap();
    assert_eq!(r.type_url, type_url);
    // ACK, as a client must.
    tx.send(DiscoveryRequest {
        type_url: type_url.into(),
        version_info: r.version_info.clone(),
        response_nonce: r.nonce.clone(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    r
}

/// An ADS stream to `cp`: where to send requests, and the responses.
async fn open_ads(
    cp: &InProcess,
) -> (
    tokio::sync::mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<DiscoveryResponse>,
) {
    let mut client = AggregatedDiscoveryServiceClient::connect(cp.xds_url())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, inbound)
}

/// The next response of `type_url` (others are skipped), within 10 s.
async fn next_of(
    rx: &mut tonic::Streaming<DiscoveryResponse>,
    type_url: &str,
) -> DiscoveryResponse {
    loop {
        let r = tokio::time::timeout(Duration::from_secs(10), rx.message())
            .await
            .expect("a response in time")
            .unwrap()
            .unwrap();
        if r.type_url == type_url {
            return r;
        }
    }
}

#[tokio::test]
async fn a_proxyless_grpc_client_gets_a27_resources() {
    // Apply through the API, as a user would.
    let cp = InProcess::start("a27").await;
    cp.call(http::Method::POST, "/api/v1/apply?file=mesh.yaml", MESH)
        .await;

    let (tx, mut inbound) = open_ads(&cp).await;

    // LDS: the listener of the dialled target, with an api_listener HCM using RDS over ADS,
    // whose filters end with the router.
    let target = "catalog.shop:80";
    let r = fetch(&tx, &mut inbound, LISTENER_TYPE, &[target], true).await;
    assert_eq!(r.resources.len(), 1);
    let l = Listener::decode(r.resources[0].value.as_slice()).unwrap();
    assert_eq!(l.name, target);
    let api = l.api_listener.unwrap().api_listener.unwrap();
    assert!(api.type_url.ends_with("HttpConnectionManager"));
    let hcm = HttpConnectionManager::decode(api.value.as_slice()).unwrap();
    let last = hcm.http_filters.last().expect("filters");
    assert_eq!(last.name, "envoy.filters.http.router");
    let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier else {
        panic!("expected RDS");
    };
    assert!(matches!(
        rds.config_source.unwrap().config_source_specifier,
        Some(ConfigSourceSpecifier::Ads(_))
    ));

    // RDS: a virtual host for the target, the gRPC method route with weighted clusters, then
    // the default route.
    let r = fetch(
        &tx,
        &mut inbound,
        ROUTE_TYPE,
        &[&rds.route_config_name],
        false,
    )
    .await;
    let rc = RouteConfiguration::decode(r.resources[0].value.as_slice()).unwrap();
    let vh = &rc.virtual_hosts[0];
    assert!(vh.domains.iter().any(|d| d == target));
    let first = &vh.routes[0];
    let Some(Action::Route(ra)) = &first.action else {
        panic!("route action")
    };
    let Some(ClusterSpecifier::WeightedClusters(wc)) = &ra.cluster_specifier else {
        panic!("weighted clusters: {ra:?}")
    };
    let weights: Vec<(String, u32)> = wc
        .clusters
        .iter()
        .map(|c| (c.name.clone(), c.weight.unwrap().value))
        .collect();
    assert_eq!(
        weights,
        [
            ("shop/catalog:80".into(), 90),
            ("shop/catalog-v2:80".into(), 10)
        ]
    );

    // CDS: EDS clusters over ADS.
    let r = fetch(&tx, &mut inbound, CLUSTER_TYPE, &["shop/catalog:80"], false).await;
    let cl = Cluster::decode(r.resources[0].value.as_slice()).unwrap();
    assert_eq!(
        cl.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
    );
    let eds = cl.eds_cluster_config.unwrap();
    assert!(matches!(
        eds.eds_config.unwrap().config_source_specifier,
        Some(ConfigSourceSpecifier::Ads(_))
    ));

    // EDS: localities with weights; environment and workload in filter_metadata.
    let r = fetch(
        &tx,
        &mut inbound,
        ENDPOINT_TYPE,
        &[&eds.service_name],
        false,
    )
    .await;
    let cla = ClusterLoadAssignment::decode(r.resources[0].value.as_slice()).unwrap();
    let mut seen = Vec::new();
    for loc in &cla.endpoints {
        let l = loc.locality.as_ref().unwrap();
        let w = loc.load_balancing_weight.unwrap().value;
        for e in &loc.lb_endpoints {
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!()
            };
            let md = &e.metadata.as_ref().unwrap().filter_metadata["trellis.dev"].fields;
            let env = format!("{:?}", md["environment"].kind);
            seen.push((l.zone.clone(), w, format!("{:?}", ep.address), env));
        }
    }
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].0, "eu-west-1a");
    assert_eq!(seen[0].1, 3, "locality weight is the sum of its endpoints'");
    assert!(seen[0].2.contains("127.0.0.2") && seen[0].2.contains("9000"));
    assert!(seen[0].3.contains("vm") && seen[1].3.contains("container"));

    // A change is pushed on the open stream: remove v2's workload and EDS follows.
    cp.call(
        http::Method::DELETE,
        "/api/v1/resources/workload/shop/ctr-1",
        "",
    )
    .await;
    let pushed = next_of(&mut inbound, ENDPOINT_TYPE).await;
    let cla = ClusterLoadAssignment::decode(pushed.resources[0].value.as_slice()).unwrap();
    let n: usize = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
    assert_eq!(n, 1);

    // The canary's Service deleted: the route stays, with both weights, and the share of the
    // backend with no cluster is answered 500 (the Gateway API's rule; Envoy's default 503).
    assert_eq!(ra.cluster_not_found_response_code, 0);
    cp.call(
        http::Method::DELETE,
        "/api/v1/resources/service/shop/catalog-v2",
        "",
    )
    .await;
    let pushed = next_of(&mut inbound, ROUTE_TYPE).await;
    let rc = RouteConfiguration::decode(pushed.resources[0].value.as_slice()).unwrap();
    let Some(Action::Route(ra)) = &rc.virtual_hosts[0].routes[0].action else {
        panic!("route action")
    };
    let Some(ClusterSpecifier::WeightedClusters(wc)) = &ra.cluster_specifier else {
        panic!("weighted clusters: {ra:?}")
    };
    let names: Vec<&str> = wc.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["shop/catalog:80", "shop/catalog-v2:80"]);
    assert_eq!(
        ra.cluster_not_found_response_code,
        ClusterNotFoundResponseCode::InternalServerError as i32
    );
}

const SIDECAR: &str = r#"
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: db, namespace: shop }
spec:
  selector: { app: db }
  ports: [{ name: pg, port: 5432, protocol: TCP }]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: db-1, namespace: shop, labels: { app: db } }
spec:
  address: 127.0.0.5
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: frontend, namespace: shop, labels: { app: frontend } }
spec:
  address: 127.0.0.4
  upstreams:
    - { service: catalog.shop, port: 80, bind: 127.0.0.1:15080 }
    - { service: db.shop, port: 5432, bind: 127.0.0.1:15432 }
"#;

#[tokio::test]
async fn an_envoy_sidecar_gets_socket_listeners_for_its_upstreams() {
    let cp = InProcess::start("a27-sidecar").await;
    cp.call(
        http::Method::POST,
        "/api/v1/apply?file=mesh.yaml",
        &format!("{MESH}{SIDECAR}"),
    )
    .await;
    let (tx, mut inbound) = open_ads(&cp).await;
    // Envoy asks for every listener (wildcard), naming its workload in the node metadata.
    tx.send(DiscoveryRequest {
        node: Some(trellis_xds::node("envoy-sidecar", Some("shop/frontend"))),
        type_url: LISTENER_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = next_of(&mut inbound, LISTENER_TYPE).await;
    let listeners: std::collections::BTreeMap<String, Listener> = r
        .resources
        .iter()
        .map(|a| {
            let l = Listener::decode(a.value.as_slice()).unwrap();
            (l.name.clone(), l)
        })
        .collect();
    assert!(
        listeners.contains_key("catalog.shop:80"),
        "the A27 ones too"
    );

    let socket = |l: &Listener| format!("{:?}", l.address.as_ref().expect("a socket address"));
    let http = &listeners["outbound|127.0.0.1:15080"];
    assert!(socket(http).contains("127.0.0.1") && socket(http).contains("15080"));
    let f = &http.filter_chains[0].filters[0];
    assert_eq!(f.name, "envoy.filters.network.http_connection_manager");
    let Some(listener::v3::filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        panic!("typed config")
    };
    let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
    let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier else {
        panic!("RDS")
    };
    assert_eq!(
        rds.route_config_name, "catalog.shop:80",
        "the route RDS serves"
    );
    assert_eq!(
        hcm.http_filters.last().unwrap().name,
        "envoy.filters.http.router"
    );

    let tcp = &listeners["outbound|127.0.0.1:15432"];
    let f = &tcp.filter_chains[0].filters[0];
    assert_eq!(f.name, "envoy.filters.network.tcp_proxy");
    let Some(listener::v3::filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        panic!("typed config")
    };
    let tp = TcpProxy::decode(any.value.as_slice()).unwrap();
    assert_eq!(
        tp.cluster_specifier,
        Some(tcp_proxy::ClusterSpecifier::Cluster("shop/db:5432".into()))
    );

    // The gRPC service's cluster tells Envoy to speak HTTP/2 upstream.
    tx.send(DiscoveryRequest {
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = next_of(&mut inbound, CLUSTER_TYPE).await;
    let clusters: std::collections::BTreeMap<String, Cluster> = r
        .resources
        .iter()
        .map(|a| {
            let c = Cluster::decode(a.value.as_slice()).unwrap();
            (c.name.clone(), c)
        })
        .collect();
    let opts = &clusters["shop/catalog:80"].typed_extension_protocol_options
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    let opts = HttpProtocolOptions::decode(opts.value.as_slice()).unwrap();
    assert!(matches!(
        opts.upstream_protocol_options,
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(_))
            }
        ))
    ));
    assert!(clusters["shop/db:5432"]
        .typed_extension_protocol_options
        .is_empty());
}

#[tokio::test]
async fn a_routes_faults_and_mirror_reach_envoy_as_the_fault_filter_and_a_mirror_policy() {
    use trellis_xds::envoy_types::pb::envoy::{
        extensions::filters::{
            common::fault::v3::fault_delay::FaultDelaySecifier,
            http::fault::v3::{fault_abort::ErrorType, HttpFault},
        },
        r#type::v3::fractional_percent::DenominatorType,
    };
    let cp = InProcess::start("a27-faults").await;
    let http_mesh = MESH
        .replace("protocol: GRPC", "protocol: HTTP")
        .replace(
            "kind: GRPCRoute",
            "kind: HTTPRoute",
        )
        .replace(
            "    - matches: [{ method: { service: shop.Catalog, method: Get } }]\n      backendRefs: [{ name: catalog, port: 80, weight: 90 }, { name: catalog-v2, port: 80, weight: 10 }]\n",
            "    - backendRefs: [{ name: catalog, port: 80 }]\n      filters:\n        - type: trellis.dev/Fault\n          fault:\n            - abort: { percent: 2.5, httpStatus: 418 }\n            - delay: { percent: 50, duration: 100ms }\n            - abort: { percent: 99, httpStatus: 500 }\n        - type: RequestMirror\n          requestMirror: { backendRef: { name: catalog-v2, port: 80 }, percent: 25 }\n",
        );
    assert!(http_mesh.contains("RequestMirror"), "{http_mesh}");
    cp.call(
        http::Method::POST,
        "/api/v1/apply?file=mesh.yaml",
        &http_mesh,
    )
    .await;
    let (tx, mut inbound) = open_ads(&cp).await;
    let target = "catalog.shop:80";
    let r = fetch(&tx, &mut inbound, LISTENER_TYPE, &[target], true).await;
    let l = Listener::decode(r.resources[0].value.as_slice()).unwrap();
    let hcm = HttpConnectionManager::decode(
        l.api_listener
            .unwrap()
            .api_listener
            .unwrap()
            .value
            .as_slice(),
    )
    .unwrap();
    let names: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["envoy.filters.http.fault", "envoy.filters.http.router"]
    );

    let r = fetch(&tx, &mut inbound, ROUTE_TYPE, &[target], false).await;
    let rc = RouteConfiguration::decode(r.resources[0].value.as_slice()).unwrap();
    let route = &rc.virtual_hosts[0].routes[0];
    // The filter holds one delay and one abort: the route's first of each.
    let any = &route.typed_per_filter_config["envoy.filters.http.fault"];
    let f = HttpFault::decode(any.value.as_slice()).unwrap();
    let abort = f.abort.unwrap();
    assert_eq!(abort.error_type, Some(ErrorType::HttpStatus(418)));
    let pct = abort.percentage.unwrap();
    assert_eq!(
        (pct.numerator, pct.denominator),
        (25_000, DenominatorType::Million as i32)
    );
    let delay = f.delay.unwrap();
    assert_eq!(delay.percentage.unwrap().numerator, 500_000);
    let Some(FaultDelaySecifier::FixedDelay(d)) = delay.fault_delay_secifier else {
        panic!("a fixed delay")
    };
    assert_eq!((d.seconds, d.nanos), (0, 100_000_000));
    // A quarter of the requests mirrored to catalog-v2's cluster.
    let Some(Action::Route(ra)) = &route.action else {
        panic!("route action")
    };
    let m: Vec<(String, u32)> = ra
        .request_mirror_policies
        .iter()
        .map(|m| {
            let p = m.runtime_fraction.as_ref().unwrap().default_value.unwrap();
            (m.cluster.clone(), p.numerator)
        })
        .collect();
    assert_eq!(m, [("shop/catalog-v2:80".to_string(), 250_000)]);
    // The default route of catalog-v2's own port has neither.
    let r = fetch(
        &tx,
        &mut inbound,
        ROUTE_TYPE,
        &["catalog-v2.shop:80"],
        false,
    )
    .await;
    let rc = RouteConfiguration::decode(r.resources[0].value.as_slice()).unwrap();
    let route = &rc.virtual_hosts[0].routes[0];
    assert!(route.typed_per_filter_config.is_empty());
    let Some(Action::Route(ra)) = &route.action else {
        panic!("route action")
    };
    assert!(ra.request_mirror_policies.is_empty());
}
