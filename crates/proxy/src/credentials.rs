//! The proxy's credentials: its key, its certificate from the mesh's CA and the roots it
//! trusts. Kept by [`crate::identity`], used by mutual TLS to peers ([`crate::mtls`]) and to
//! the control plane ([`crate::control_link`]).

use std::time::SystemTime;

use trellis_identity::CertInfo;

/// The proxy's current key, certificate and trust bundle.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// What the certificate says.
    pub info: CertInfo,
    /// Certificate chain, PEM.
    pub chain_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
    /// Roots to trust, PEM.
    pub bundle_pem: String,
    /// When this proxy got it (or, for a stored one, started with it). Renewal counts from
    /// here, not from `not_before`, which the CA backdates for clock skew.
    pub obtained: SystemTime,
}
