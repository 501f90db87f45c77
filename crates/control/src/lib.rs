//! Trellis control plane: one place where the fleet's services, workloads and routes live,
//! and from which every proxy is reconfigured live.
//!
//! - [`catalog`]: the store's contents, followed through its watch and compiled into what
//!   proxies get (with Gateway API status conditions for what was left out).
//! - [`apply`]: validation of a set of documents and its atomic write.
//! - [`api`]: the HTTP API under `/api/v1/` (its handlers, over the domain modules below).
//! - [`identity`]: the mesh's CA, its rotation, join tokens and certificates.
//! - [`agent`]: agents' registrations and heartbeats.
//! - [`xds`]: the ADS server (xDS v3); [`registry`]: every proxy's ACK/NACK state.
//! - [`envoy`]: the translation into Envoy's standard resource types.
//! - [`fleet`]: the fleet's telemetry; [`replicas`]: replicas on a shared store, which answer
//!   fleet queries together.

pub(crate) mod agent;
pub(crate) mod api;
pub(crate) mod apply;
pub(crate) mod catalog;
pub(crate) mod check;
pub(crate) mod control;
mod delta;
pub(crate) mod diagnose;
pub(crate) mod envoy;
pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod fleet;
pub(crate) mod identity;
pub(crate) mod pane;
pub(crate) mod registry;
pub(crate) mod replicas;
pub(crate) mod rollout;
pub(crate) mod service_view;
pub(crate) mod spill;
pub(crate) mod state;
pub(crate) mod tap;
pub(crate) mod tls;
pub(crate) mod token;
pub(crate) mod vips;
pub(crate) mod xds;

pub use apply::VIRTUAL_IP_RANGE;
pub use control::{Control, Options};
pub use error::ControlError;
pub use identity::CaFiles;
pub use trellis_telemetry::store::Limits as TelemetryLimits;
