//! Stage `policy`: what the mesh's rules say about a request or connection before it goes
//! anywhere. For now: mutual TLS required (STRICT) and authorization; rate and concurrency
//! limits will join here. One check serves HTTP requests, CONNECT tunnels and TCP streams
//! alike, so the three cannot drift apart.

use trellis_model::{
    proxy::{authorize, AuthzRequest, PeerIdentity},
    resource::MtlsMode,
};

use crate::{
    error::{Error, Kind},
    snapshot::{InboundTarget, Snapshot},
};

/// What is asked of the local workload.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Inbound<'a> {
    /// The caller, when it came over mutual TLS.
    pub(crate) source: Option<&'a PeerIdentity>,
    /// Method and path of an HTTP request; `None` for a TCP stream or tunnel.
    pub(crate) http: Option<(&'a str, &'a str)>,
}

/// Whether `target` refuses plaintext: this proxy has an identity, and the target's service
/// is STRICT (or `mode` says so for every port).
pub(crate) fn strict(has_identity: bool, mode: Option<MtlsMode>, target: &InboundTarget) -> bool {
    has_identity && mode.unwrap_or(target.mtls) == MtlsMode::Strict
}

/// Admit `req` to `target`, or say why not: plaintext to a STRICT port, then the
/// authorization policies (a plaintext caller has no identity, so policies that name
/// identities or namespaces deny it).
pub(crate) fn admit(
    snap: &Snapshot,
    target: &InboundTarget,
    req: Inbound<'_>,
    strict: bool,
) -> Result<(), Error> {
    if req.source.is_none() && strict {
        return Err(Error::new(
            Kind::PlaintextRefused,
            format!(
                "plaintext refused: Service {} requires mutual TLS (STRICT)",
                target.service
            ),
        ));
    }
    let policies = &snap.cfg.authz;
    if policies.is_empty() {
        return Ok(());
    }
    let d = authorize(
        policies,
        &AuthzRequest {
            source: req.source,
            service: &target.service,
            port: target.port,
            http: req.http,
        },
    );
    if d.allowed {
        return Ok(());
    }
    Err(Error::new(
        Kind::Denied,
        match d.policy {
            Some(p) => format!("denied by AuthorizationPolicy {p}"),
            None => format!(
                "no AuthorizationPolicy allows this request to {}",
                target.service
            ),
        },
    ))
}

#[cfg(test)]
mod tests;
