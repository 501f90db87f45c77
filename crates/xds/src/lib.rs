//! What the Trellis control plane and proxy share over xDS v3 (ADS, state of the world).
//!
//! The control plane serves two families of resources on one ADS stream:
//! - Envoy's standard types (Listener, RouteConfiguration, Cluster, ClusterLoadAssignment),
//!   for Envoy and proxyless gRPC clients (gRFC A27);
//! - [`Document`], for Trellis proxies: the stored resources themselves, one xDS resource per
//!   document named `KIND/NAMESPACE/NAME`, sent incrementally (delta xDS), so that a proxy fed
//!   by xDS runs the very translation (`trellis_model::translate`) that a proxy fed by a file
//!   runs, and can refuse (NACK) a change with the same file:line:field error. A change to one
//!   workload sends one document, not the mesh.
//!
//! A node names the workload it serves in its metadata under [`WORKLOAD_KEY`]
//! (`NAMESPACE/NAME`).

pub use envoy_types;
use envoy_types::pb::{
    envoy::config::core::v3::Node,
    google::protobuf::{value::Kind, Struct, Value},
};

/// `type_url` of [`Document`].
pub const DOCUMENT_TYPE: &str = "type.googleapis.com/trellis.v1alpha1.Document";
/// Envoy's Listener.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Envoy's RouteConfiguration.
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Envoy's Cluster.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Envoy's ClusterLoadAssignment.
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// Marks a delta response of Trellis documents as one part of a larger update: its
/// `system_version_info` is the update's version followed by this suffix. The client keeps the
/// part's documents and acknowledges it, but applies the set only when the last part (the
/// version alone) arrives. Parts keep every message small, and so the encode buffer that each
/// stream keeps for as long as it lives (a thousand streams × a full mesh would not be).
pub const PARTIAL_SUFFIX: &str = "+more";

/// Node metadata key naming the workload a proxy serves.
pub const WORKLOAD_KEY: &str = "trellis.dev/workload";
/// `filter_metadata` namespace of endpoint facts (environment, workload).
pub const METADATA_NAMESPACE: &str = "trellis.dev";

/// One stored resource as a Trellis proxy gets it: YAML, the language of a static config file.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Document {
    /// The resource, one YAML document.
    #[prost(string, tag = "1")]
    pub yaml: String,
}

impl prost::Name for Document {
    const NAME: &'static str = "Document";
    const PACKAGE: &'static str = "trellis.v1alpha1";
    fn type_url() -> String {
        DOCUMENT_TYPE.into()
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
    fn document_round_trips_and_names_its_type() {
        let d = Document {
            yaml: "kind: Service".into(),
        };
        let any = envoy_types::util::pack_any(d.clone());
        assert_eq!(any.type_url, DOCUMENT_TYPE);
        assert_eq!(Document::decode(any.value.as_slice()).unwrap(), d);
    }

    #[test]
    fn node_carries_its_workload() {
        let n = node("p1", Some("shop/catalog-1"));
        assert_eq!(node_workload(&n), Some("shop/catalog-1"));
        assert_eq!(node_workload(&node("p2", None)), None);
    }
}
