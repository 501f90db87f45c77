//! What the Trellis control plane and proxy share over xDS v3 (ADS, state of the world).
//!
//! The control plane serves two families of resources on one ADS stream:
//! - Envoy's standard types (Listener, RouteConfiguration, Cluster, ClusterLoadAssignment),
//!   for Envoy and proxyless gRPC clients (gRFC A27);
//! - [`ProxyBundle`], for Trellis proxies: the stored resources themselves, so that a proxy fed
//!   by xDS runs the very translation (`trellis_model::translate`) that a proxy fed by a file
//!   runs, and can refuse (NACK) a bundle with the same file:line:field error.
//!
//! A node names the workload it serves in its metadata under [`WORKLOAD_KEY`]
//! (`NAMESPACE/NAME`).

pub use envoy_types;
use envoy_types::pb::{
    envoy::config::core::v3::Node,
    google::protobuf::{value::Kind, Struct, Value},
};

/// `type_url` of [`ProxyBundle`].
pub const BUNDLE_TYPE: &str = "type.googleapis.com/trellis.v1alpha1.ProxyBundle";
/// Envoy's Listener.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Envoy's RouteConfiguration.
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Envoy's Cluster.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Envoy's ClusterLoadAssignment.
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// Node metadata key naming the workload a proxy serves.
pub const WORKLOAD_KEY: &str = "trellis.dev/workload";
/// `filter_metadata` namespace of endpoint facts (environment, workload).
pub const METADATA_NAMESPACE: &str = "trellis.dev";

/// The resource set a Trellis proxy translates, as multi-document YAML (the same language as
/// a static config file), at one store revision.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProxyBundle {
    /// Store revision the bundle reflects.
    #[prost(uint64, tag = "1")]
    pub revision: u64,
    /// The resources, multi-document YAML.
    #[prost(string, tag = "2")]
    pub resources_yaml: String,
}

impl prost::Name for ProxyBundle {
    const NAME: &'static str = "ProxyBundle";
    const PACKAGE: &'static str = "trellis.v1alpha1";
    fn type_url() -> String {
        BUNDLE_TYPE.into()
    }
}

/// The node a Trellis proxy announces.
pub fn node(id: &str, workload: Option<&str>) -> Node {
    let mut metadata = Struct::default();
    if let Some(w) = workload {
        metadata.fields.insert(
            WORKLOAD_KEY.into(),
            Value {
                kind: Some(Kind::StringValue(w.into())),
            },
        );
    }
    Node {
        id: id.into(),
        user_agent_name: "trellis".into(),
        metadata: Some(metadata),
        ..Default::default()
    }
}

/// The workload a node names, if any.
pub fn node_workload(node: &Node) -> Option<&str> {
    match node
        .metadata
        .as_ref()?
        .fields
        .get(WORKLOAD_KEY)?
        .kind
        .as_ref()?
    {
        Kind::StringValue(s) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn bundle_round_trips_and_names_its_type() {
        let b = ProxyBundle {
            revision: 7,
            resources_yaml: "kind: Service".into(),
        };
        let any = envoy_types::util::pack_any(b.clone());
        assert_eq!(any.type_url, BUNDLE_TYPE);
        assert_eq!(ProxyBundle::decode(any.value.as_slice()).unwrap(), b);
    }

    #[test]
    fn node_carries_its_workload() {
        let n = node("p1", Some("shop/catalog-1"));
        assert_eq!(node_workload(&n), Some("shop/catalog-1"));
        assert_eq!(node_workload(&node("p2", None)), None);
    }
}
