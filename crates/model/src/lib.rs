//! Trellis resource model: the Kubernetes-style YAML that users, tests and the CLI share,
//! parsed with source locations, validated, and translated into the proxy's compact model.
//!
//! The translation lives here (not in the proxy) so that the control plane can reuse it: a
//! proxy fed by a static file and a proxy fed by xDS end up with the same [`ProxyConfig`].

mod error;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod load;
pub mod proxy;
pub mod refs;
pub mod resource;
pub mod scope;
mod translate;
pub mod value;

pub use error::ConfigError;
pub use load::{load_file, parse_documents, parse_values, resource_from_json};
pub use proxy::ProxyConfig;
pub use resource::{NamespacedName, Resource};
pub use translate::{
    check_standalone, is_dns_label, parse_authority_name, rule_name, translate, update_workloads,
};
