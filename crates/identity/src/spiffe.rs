//! SPIFFE IDs of mesh workloads.

use std::{fmt, str::FromStr};

/// `spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/IDENTITY`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// Trust domain (`trellis.local` by default).
    pub trust_domain: String,
    /// Namespace.
    pub namespace: String,
    /// Identity (a service account, in Kubernetes' words).
    pub identity: String,
}

/// Why a string is not a mesh SPIFFE ID.
#[derive(Debug, thiserror::Error)]
#[error(
    "{given:?} is not a mesh SPIFFE ID (spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/IDENTITY): {why}"
)]
pub struct BadSpiffeId {
    given: String,
    why: &'static str,
}

/// A trust domain: lowercase letters, digits, `.`, `-`, `_` (SPIFFE ID spec, section 2.1).
pub fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// A path segment: letters, digits, `.`, `-`, `_`; not `.` or `..` (section 2.2).
pub fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl SpiffeId {
    /// A checked ID.
    pub fn new(trust_domain: &str, namespace: &str, identity: &str) -> Result<Self, BadSpiffeId> {
        let s = Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            identity: identity.into(),
        };
        let bad = |why| BadSpiffeId {
            given: s.to_string(),
            why,
        };
        if !valid_trust_domain(trust_domain) {
            return Err(bad("the trust domain allows only a-z, 0-9, '.', '-', '_'"));
        }
        if !valid_segment(namespace) || !valid_segment(identity) {
            return Err(bad(
                "namespace and identity allow only letters, digits, '.', '-', '_'",
            ));
        }
        Ok(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.identity
        )
    }
}

impl FromStr for SpiffeId {
    type Err = BadSpiffeId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| BadSpiffeId {
            given: s.into(),
            why,
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("no spiffe:// scheme"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| bad("no path"))?;
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["ns", ns, "sa", id] => Self::new(td, ns, id),
            _ => Err(bad("the path is not /ns/NAMESPACE/sa/IDENTITY")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let id: SpiffeId = "spiffe://trellis.local/ns/shop/sa/catalog".parse().unwrap();
        assert_eq!(id.namespace, "shop");
        assert_eq!(id.identity, "catalog");
        assert_eq!(id.to_string(), "spiffe://trellis.local/ns/shop/sa/catalog");
        for bad in [
            "https://trellis.local/ns/shop/sa/catalog",
            "spiffe://Trellis.local/ns/shop/sa/catalog",
            "spiffe://trellis.local/ns/shop/sa/",
            "spiffe://trellis.local/ns/shop/sa/a/b",
            "spiffe://trellis.local/ns/../sa/x",
            "spiffe://trellis.local/sa/x/ns/y",
            "spiffe://trellis.local",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
