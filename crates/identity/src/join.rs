//! Join tokens: a proxy's first credential, `trellis-join.ID.SECRET`.
//!
//! A token allows one identity in one namespace, until it expires, a limited number of
//! times. The control plane keeps a [`Grant`] under ID holding the SHA-256 of SECRET, never
//! SECRET itself, so a copy of the store does not let anyone join.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "trellis-join";

/// A freshly made token and what to store for it.
pub struct NewToken {
    /// Shown once to the operator.
    pub token: String,
    /// The grant's key.
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub sha256: String,
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of lowercase or uppercase hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Equal, compared without an early exit on the first difference (for secrets' digests).
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the kernel's random source");
    hex(&b)
}

/// SHA-256 of `secret`, hex (of a join token's secret, or the admin token).
pub fn digest(secret: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

/// A new token: 8 random bytes of ID, 32 of secret.
pub fn generate() -> NewToken {
    let (id, secret) = (random_hex(8), random_hex(32));
    NewToken {
        token: format!("{PREFIX}.{id}.{secret}"),
        sha256: digest(&secret),
        id,
    }
}

/// What a token looks like, for whoever is told a value is not one ([`parse`]).
pub const SHAPE: &str =
    "join tokens read trellis-join.<id>.<secret>, as `trellis token create` prints them";

/// `(id, secret)` of a token, if it has the shape of one.
pub fn parse(token: &str) -> Option<(&str, &str)> {
    let mut it = token.trim().splitn(3, '.');
    match (it.next(), it.next(), it.next()) {
        (Some(PREFIX), Some(id), Some(secret))
            if !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Some((id, secret))
        }
        _ => None,
    }
}

/// What a token allows, as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Grant {
    /// Namespace of the identity.
    pub namespace: String,
    /// The identity.
    pub identity: String,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
    /// Uses left.
    pub uses_left: u32,
    /// SHA-256 of the secret, hex.
    pub sha256: String,
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    /// Not a token, unknown, or a wrong secret (not told apart, on purpose).
    #[error("unknown join token")]
    Unknown,
    /// Past its expiry.
    #[error("the join token expired")]
    Expired,
    /// No uses left.
    #[error("the join token is used up")]
    UsedUp,
}

/// Seconds since the Unix epoch.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Grant {
    /// A grant for a new token, valid for `ttl` from `now`.
    pub fn new(
        t: &NewToken,
        namespace: &str,
        identity: &str,
        ttl: Duration,
        uses: u32,
        now: SystemTime,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            identity: identity.into(),
            expires_at: unix(now + ttl),
            uses_left: uses,
            sha256: t.sha256.clone(),
        }
    }

    /// Whether `secret` may use this grant at `now`.
    pub fn check(&self, secret: &str, now: SystemTime) -> Result<(), Refusal> {
        if !same(&digest(secret), &self.sha256) {
            return Err(Refusal::Unknown);
        }
        if unix(now) >= self.expires_at {
            return Err(Refusal::Expired);
        }
        if self.uses_left == 0 {
            return Err(Refusal::UsedUp);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_scoped_short_lived_and_counted() {
        let now = SystemTime::now();
        let t = generate();
        let (id, secret) = parse(&t.token).unwrap();
        assert_eq!(id, t.id);
        let g = Grant::new(&t, "shop", "catalog", Duration::from_secs(60), 1, now);
        assert!(!serde_json::to_string(&g).unwrap().contains(secret));
        assert_eq!(g.check(secret, now), Ok(()));
        assert_eq!(g.check("wrong", now), Err(Refusal::Unknown));
        assert_eq!(
            g.check(secret, now + Duration::from_secs(61)),
            Err(Refusal::Expired)
        );
        let used = Grant { uses_left: 0, ..g };
        assert_eq!(used.check(secret, now), Err(Refusal::UsedUp));
        assert!(parse("trellis-join.zz.x").is_none());
        assert!(parse("bearer-token").is_none());
    }
}
