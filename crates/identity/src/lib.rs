//! Trellis identities.
//!
//! - [`spiffe`]: SPIFFE IDs, `spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/IDENTITY`.
//! - [`ca`]: the mesh's certificate authority: a root made on first start (kept by the
//!   control plane in its store), X.509 SVIDs signed from a proxy's CSR for exactly the
//!   identity its credential allows. The proxy's key never leaves the proxy.
//! - [`join`]: join tokens, the first credential of a proxy: scoped to one namespace and
//!   identity, short-lived, limited in uses, and stored only as a digest.
//! - [`tls`]: rustls configurations for mTLS between proxies (TLS 1.3, SPIFFE IDs).

pub mod ca;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod join;
pub mod spiffe;
pub mod tls;

pub use ca::{chains_to, inspect, key_and_csr, proof_id, prove, Ca, CaError, CertInfo, Svid};
pub use spiffe::SpiffeId;
