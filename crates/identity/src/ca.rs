//! The mesh's certificate authority.
//!
//! The root is an ECDSA P-256 key and a self-signed certificate that may sign leaf
//! certificates only (path length 0). Leaves are X.509 SVIDs: one URI SAN, the workload's
//! SPIFFE ID; `CA:FALSE`; digital signature and key encipherment; server and client
//! authentication; valid from five minutes ago (clock skew) for the requested lifetime. The
//! CSR contributes its public key and nothing else: a CSR that asks for any other name than
//! the allowed identity is refused.

use std::time::{Duration, SystemTime};

use rcgen::{
    string::Ia5String, BasicConstraints, CertificateParams, CertificateSigningRequestParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use time::OffsetDateTime;

use crate::SpiffeId;

/// Why the CA did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A certificate or key could not be made, parsed or signed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// The CSR is not a valid, self-signed PKCS#10 request.
    #[error("the CSR is not valid: {0}")]
    BadCsr(rcgen::Error),
    /// The CSR asks for an identity the credential does not allow.
    #[error("the CSR asks for {requested}, but the credential allows only {allowed}")]
    Refused {
        /// What the CSR asked for.
        requested: String,
        /// What the credential allows.
        allowed: String,
    },
    /// A lifetime out of range.
    #[error("lifetime {0:?} is out of range (10 s to 1 year)")]
    Lifetime(Duration),
    /// The operator's CA certificate does not belong to the trust domain's bundle.
    #[error("{0}")]
    Config(String),
    /// A presented certificate is not a valid SVID of this CA, or the proof of its key fails.
    #[error("the presented certificate is not accepted: {0}")]
    Untrusted(String),
}

/// What a certificate says.
#[derive(Clone, Debug)]
pub struct CertInfo {
    /// Its SPIFFE ID (URI SAN).
    pub id: SpiffeId,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Serial number, hex.
    pub serial: String,
}

fn untrusted(m: impl Into<String>) -> CaError {
    CaError::Untrusted(m.into())
}

fn system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let s = t.timestamp();
    if s >= 0 {
        std::time::UNIX_EPOCH + Duration::from_secs(s as u64)
    } else {
        std::time::UNIX_EPOCH
    }
}

/// The leaf (first certificate) of `chain_pem`, read.
pub fn inspect(chain_pem: &str) -> Result<CertInfo, CaError> {
    with_leaf(chain_pem, |c| {
        let id = leaf_id(c)?;
        Ok(CertInfo {
            id,
            not_before: system_time(c.validity().not_before),
            not_after: system_time(c.validity().not_after),
            serial: c.raw_serial_as_string(),
        })
    })
}

/// A CA certificate's subject, end of validity (UNIX seconds) and SHA-256 fingerprint (hex),
/// for status pages; empty values for what does not parse.
pub fn describe_ca(pem: &str) -> (String, u64, String) {
    with_leaf(pem, |c| {
        let not_after = crate::join::unix(system_time(c.validity().not_after));
        let der = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .map(|(_, p)| p.contents)
            .unwrap_or_default();
        let fp = crate::join::hex(ring::digest::digest(&ring::digest::SHA256, &der).as_ref());
        Ok((c.subject().to_string(), not_after, fp))
    })
    .unwrap_or_default()
}

fn with_leaf<T>(
    chain_pem: &str,
    f: impl FnOnce(&x509_parser::certificate::X509Certificate<'_>) -> Result<T, CaError>,
) -> Result<T, CaError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes())
        .map_err(|e| untrusted(format!("not a PEM certificate: {e}")))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| untrusted(format!("not an X.509 certificate: {e}")))?;
    f(&cert)
}

/// Whether `leaf` is signed by one of the certificates in `issuers_pem`.
fn signed_by_any(leaf: &x509_parser::certificate::X509Certificate<'_>, issuers_pem: &str) -> bool {
    x509_parser::pem::Pem::iter_from_buffer(issuers_pem.as_bytes())
        .filter_map(Result::ok)
        .any(|pem| {
            pem.parse_x509()
                .is_ok_and(|ca| leaf.verify_signature(Some(ca.public_key())).is_ok())
        })
}

/// Whether the first certificate of `chain_pem` is signed by a certificate of `chain_pem`'s
/// rest or of `bundle_pem`: a proxy checks a new trust bundle with this before taking it, so
/// that a bundle which would not trust its own certificate is refused.
pub fn chains_to(chain_pem: &str, bundle_pem: &str) -> bool {
    let issuers = format!("{chain_pem}\n{bundle_pem}");
    with_leaf(chain_pem, |leaf| {
        Ok(signed_by_any(leaf, &issuers) && leaf.issuer() != leaf.subject())
    })
    .unwrap_or(false)
}

pub(crate) fn leaf_id(
    c: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<SpiffeId, CaError> {
    let san = c
        .subject_alternative_name()
        .map_err(|e| untrusted(format!("subjectAltName: {e}")))?
        .ok_or_else(|| untrusted("no subjectAltName"))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => one
            .parse()
            .map_err(|e: crate::spiffe::BadSpiffeId| untrusted(e.to_string())),
        _ => Err(untrusted("an SVID has exactly one URI SAN")),
    }
}

/// A new P-256 key and a CSR for it that names nothing (the CA puts the identity in): key
/// PEM, CSR PEM.
pub fn key_and_csr() -> Result<(String, String), CaError> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default()
        .serialize_request(&key)?
        .pem()?;
    Ok((key.serialize_pem(), csr))
}

/// Proof that the holder of `key_pem` (the current certificate's key) asks for `csr_pem`:
/// its signature over the CSR's text (ECDSA P-256, SHA-256, ASN.1).
pub fn prove(key_pem: &str, csr_pem: &str) -> Result<Vec<u8>, CaError> {
    use rcgen::SigningKey;
    Ok(KeyPair::from_pem(key_pem)?.sign(csr_pem.as_bytes())?)
}

/// What tells one [`prove`] signature from another, for refusing a replay: its `r`. An
/// ECDSA signature is malleable — `(r, n − s)` verifies wherever `(r, s)` does — so a
/// replayed request can carry other signature bytes than the first; `r` comes from the
/// signer's random nonce and is the same in both. `None` if `proof` is not a DER
/// `SEQUENCE { INTEGER, INTEGER }` (it never verifies then).
pub fn proof_id(proof: &[u8]) -> Option<&[u8]> {
    // SEQUENCE, its length (short form: a P-256 signature is at most 72 bytes), INTEGER r.
    let (&[0x30, len], rest) = proof.split_first_chunk::<2>()? else {
        return None;
    };
    if usize::from(len) != rest.len() {
        return None;
    }
    let (&[0x02, rlen], rest) = rest.split_first_chunk::<2>()? else {
        return None;
    };
    let r = rest.get(..usize::from(rlen))?;
    // Without the zero byte DER puts before an integer whose top bit is set.
    Some(match r {
        [0, tail @ ..] => tail,
        _ => r,
    })
}

/// An issued certificate.
#[derive(Clone, Debug)]
pub struct Svid {
    /// The leaf, then any intermediate, PEM.
    pub chain_pem: String,
    /// Whose.
    pub id: SpiffeId,
    /// End of validity.
    pub not_after: SystemTime,
}

/// The mesh's CA: a signing certificate, its key, and the roots proxies trust.
pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
    bundle_pem: String,
}

const LEAF_MIN: Duration = Duration::from_secs(10);
const LEAF_MAX: Duration = Duration::from_secs(365 * 24 * 3600);
const SKEW: time::Duration = time::Duration::minutes(5);

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| CaError::Config("no randomness".into()))?;
    // Positive, as RFC 5280 asks.
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

impl Ca {
    /// A new root for `trust_domain`, valid for `lifetime`.
    pub fn generate(trust_domain: &str, lifetime: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        dn.push(
            DnType::CommonName,
            // Unique per root, so that the old and the new root of a rotation differ by name.
            format!(
                "Trellis root CA {trust_domain} {}",
                crate::join::hex(&random_serial()?.to_bytes()[..4])
            ),
        );
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - SKEW;
        p.not_after =
            now + time::Duration::try_from(lifetime).map_err(|_| CaError::Lifetime(lifetime))?;
        p.serial_number = Some(random_serial()?);
        let cert = p.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(Self {
            trust_domain: trust_domain.into(),
            issuer: Issuer::new(p, key),
            bundle_pem: cert_pem.clone(),
            cert_pem,
            key_pem,
        })
    }

    /// A CA from stored PEM: its certificate and key, and the roots to trust (its own
    /// certificate when it is a root; the operator's root when it is an intermediate).
    pub fn from_pem(
        trust_domain: &str,
        cert_pem: &str,
        key_pem: &str,
        bundle_pem: Option<&str>,
    ) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        with_leaf(cert_pem, |c| {
            if !c.is_ca() {
                return Err(CaError::Config(
                    "the CA certificate is not a CA (basicConstraints CA:TRUE)".into(),
                ));
            }
            if c.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(CaError::Config(
                    "the CA key does not belong to the CA certificate".into(),
                ));
            }
            Ok(())
        })
        .map_err(|e| match e {
            CaError::Untrusted(m) => CaError::Config(format!("the CA certificate: {m}")),
            e => e,
        })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            trust_domain: trust_domain.into(),
            issuer,
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            bundle_pem: bundle_pem.unwrap_or(cert_pem).into(),
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The signing certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The signing key, PEM: only for the control plane's store.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The roots that proxies trust, PEM.
    pub fn trust_bundle(&self) -> &str {
        &self.bundle_pem
    }

    /// Renew: `chain_pem` must be a currently valid SVID of this CA and `proof` its key's
    /// signature over `csr_pem` ([`prove`]); the new certificate is for the same identity
    /// (and the CSR's new key).
    pub fn renew(
        &self,
        csr_pem: &str,
        chain_pem: &str,
        proof: &[u8],
        ttl: Duration,
    ) -> Result<Svid, CaError> {
        let id = self.verify_holder(chain_pem, csr_pem.as_bytes(), proof)?;
        self.sign(csr_pem, &id, ttl)
    }

    /// The identity of whoever holds the key of `chain_pem`: the certificate must be a
    /// currently valid SVID of this CA (or of a root still trusted during a rotation), and
    /// `proof` its key's signature over `message` ([`prove`]). Agents authenticate their
    /// requests this way, over plaintext and TLS alike.
    pub fn verify_holder(
        &self,
        chain_pem: &str,
        message: &[u8],
        proof: &[u8],
    ) -> Result<SpiffeId, CaError> {
        // During a root rotation the bundle holds the roots being retired: certificates
        // they signed are still good.
        let issuers = format!("{}\n{}", self.cert_pem, self.bundle_pem);
        with_leaf(chain_pem, |leaf| {
            if !signed_by_any(leaf, &issuers) {
                return Err(untrusted("not signed by this mesh's CA"));
            }
            if !leaf.validity().is_valid() {
                return Err(untrusted("expired or not yet valid"));
            }
            let id = leaf_id(leaf)?;
            let key = ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_ASN1,
                leaf.public_key().subject_public_key.data.as_ref(),
            );
            key.verify(message, proof).map_err(|_| {
                untrusted("the proof is not the certificate key's signature of the request")
            })?;
            Ok(id)
        })
    }

    /// Sign `csr_pem` for `allowed`, valid for `ttl`. The CSR's signature is checked; any name
    /// it asks for other than `allowed` is refused.
    pub fn sign(&self, csr_pem: &str, allowed: &SpiffeId, ttl: Duration) -> Result<Svid, CaError> {
        if !(LEAF_MIN..=LEAF_MAX).contains(&ttl) {
            return Err(CaError::Lifetime(ttl));
        }
        let now = OffsetDateTime::now_utc();
        let ttl_t = time::Duration::try_from(ttl).map_err(|_| CaError::Lifetime(ttl))?;
        let mut svid = self.sign_between(csr_pem, allowed, now - SKEW, now + ttl_t)?;
        svid.not_after = SystemTime::now() + ttl;
        Ok(svid)
    }

    /// Sign for an explicit validity (`sign` backdates by five minutes and adds the
    /// lifetime; tests make expired certificates with this).
    pub fn sign_between(
        &self,
        csr_pem: &str,
        allowed: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Svid, CaError> {
        if allowed.trust_domain != self.trust_domain {
            return Err(CaError::Refused {
                requested: allowed.to_string(),
                allowed: format!("identities in trust domain {}", self.trust_domain),
            });
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadCsr)?;
        let want = allowed.to_string();
        for san in &csr.params.subject_alt_names {
            let requested = match san {
                SanType::URI(u) if u.as_str() == want => continue,
                SanType::URI(u) => u.as_str().to_string(),
                SanType::DnsName(n) => format!("DNS name {}", n.as_str()),
                SanType::IpAddress(ip) => format!("IP address {ip}"),
                SanType::Rfc822Name(m) => format!("email {}", m.as_str()),
                _ => "a name of another kind".to_string(),
            };
            return Err(CaError::Refused {
                requested,
                allowed: want,
            });
        }
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::URI(Ia5String::try_from(want.as_str())?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before;
        p.not_after = not_after;
        p.serial_number = Some(random_serial()?);
        let leaf = p.signed_by(&csr.public_key, &self.issuer)?;
        let mut chain_pem = leaf.pem();
        if self.bundle_pem != self.cert_pem {
            chain_pem.push_str(&self.cert_pem);
        }
        let secs = not_after.unix_timestamp().max(0) as u64;
        Ok(Svid {
            chain_pem,
            id: allowed.clone(),
            not_after: std::time::UNIX_EPOCH + Duration::from_secs(secs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request's signature with `s` replaced by `n − s` verifies too (ring, as ECDSA
    /// allows): a replay check on the signature's bytes would take it as new. `proof_id`
    /// gives both the same id, and different signings of one request different ids.
    #[test]
    fn a_malleated_proof_verifies_and_has_the_same_id() {
        let ca = Ca::generate("trellis.local", Duration::from_secs(3600)).unwrap();
        let id = SpiffeId::new("trellis.local", "shop", "catalog").unwrap();
        let (key, csr) = key_and_csr().unwrap();
        let svid = ca.sign(&csr, &id, Duration::from_secs(600)).unwrap();
        let msg = r#"{"op":"deregister","name":"catalog-1","ts":1}"#;
        let proof = prove(&key, msg).unwrap();
        let other = trellis_test_support::ecdsa::malleated(&proof);
        assert_ne!(other, proof);
        assert_eq!(
            ca.verify_holder(&svid.chain_pem, msg.as_bytes(), &proof)
                .unwrap(),
            id
        );
        assert_eq!(
            ca.verify_holder(&svid.chain_pem, msg.as_bytes(), &other)
                .unwrap(),
            id
        );
        assert_eq!(proof_id(&proof), proof_id(&other));
        // r, at most 32 bytes (the DER zero byte taken off).
        assert!(proof_id(&proof).is_some_and(|r| !r.is_empty() && r.len() <= 32));
        let again = prove(&key, msg).unwrap();
        assert_ne!(
            proof_id(&again),
            proof_id(&proof),
            "a new signing, a new id"
        );
        assert_eq!(proof_id(b"\x30\x02\x05\x00"), None);
        assert_eq!(proof_id(b""), None);
    }

    fn csr(sans: &[&str]) -> String {
        let key = KeyPair::generate().unwrap();
        let p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn signs_only_the_allowed_identity() {
        let ca = Ca::generate("trellis.local", Duration::from_secs(3600)).unwrap();
        let id = SpiffeId::new("trellis.local", "shop", "catalog").unwrap();
        let svid = ca.sign(&csr(&[]), &id, Duration::from_secs(600)).unwrap();
        assert!(svid.chain_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        // A CSR that names the identity itself is fine too.
        let uri = id.to_string();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(Ia5String::try_from(uri.as_str()).unwrap())];
        let key = KeyPair::generate().unwrap();
        let own = p.serialize_request(&key).unwrap().pem().unwrap();
        ca.sign(&own, &id, Duration::from_secs(600)).unwrap();
        // Anything else is refused.
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(
            Ia5String::try_from("spiffe://trellis.local/ns/shop/sa/admin").unwrap(),
        )];
        let other = p.serialize_request(&key).unwrap().pem().unwrap();
        let e = ca.sign(&other, &id, Duration::from_secs(600)).unwrap_err();
        assert!(matches!(e, CaError::Refused { .. }), "{e}");
        let e = ca
            .sign(&csr(&["catalog.shop"]), &id, Duration::from_secs(600))
            .unwrap_err();
        assert!(e.to_string().contains("DNS name catalog.shop"), "{e}");
        // Another trust domain, a lifetime out of range, garbage.
        let foreign = SpiffeId::new("other.example", "shop", "catalog").unwrap();
        assert!(ca
            .sign(&csr(&[]), &foreign, Duration::from_secs(600))
            .is_err());
        assert!(ca.sign(&csr(&[]), &id, Duration::from_secs(1)).is_err());
        assert!(matches!(
            ca.sign("not a csr", &id, Duration::from_secs(600)),
            Err(CaError::BadCsr(_))
        ));
    }

    #[test]
    fn renewal_needs_a_valid_certificate_of_this_ca_and_its_key() {
        let ca = Ca::generate("trellis.local", Duration::from_secs(3600)).unwrap();
        let id = SpiffeId::new("trellis.local", "shop", "catalog").unwrap();
        let (old_key, old_csr) = key_and_csr().unwrap();
        let old = ca.sign(&old_csr, &id, Duration::from_secs(600)).unwrap();
        let info = inspect(&old.chain_pem).unwrap();
        assert_eq!(info.id, id);

        let new_csr = csr(&[]);
        let proof = prove(&old_key, &new_csr).unwrap();
        let new = ca
            .renew(&new_csr, &old.chain_pem, &proof, Duration::from_secs(600))
            .unwrap();
        let new_info = inspect(&new.chain_pem).unwrap();
        assert_eq!(new_info.id, id);
        assert_ne!(new_info.serial, info.serial);

        // The proof of another key, a proof of another CSR, another CA's certificate.
        let stranger = KeyPair::generate().unwrap();
        let bad = prove(&stranger.serialize_pem(), &new_csr).unwrap();
        assert!(ca
            .renew(&new_csr, &old.chain_pem, &bad, Duration::from_secs(600))
            .is_err());
        let other_csr = csr(&[]);
        assert!(ca
            .renew(&other_csr, &old.chain_pem, &proof, Duration::from_secs(600))
            .is_err());
        let other_ca = Ca::generate("trellis.local", Duration::from_secs(3600)).unwrap();
        let foreign = other_ca
            .sign(&old_csr, &id, Duration::from_secs(600))
            .unwrap();
        let e = ca
            .renew(
                &new_csr,
                &foreign.chain_pem,
                &proof,
                Duration::from_secs(600),
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("not signed by this mesh's CA"),
            "{e}"
        );
    }

    #[test]
    fn an_operator_ca_must_be_a_ca_with_its_own_key() {
        let ca = Ca::generate("trellis.local", Duration::from_secs(3600)).unwrap();
        let other = KeyPair::generate().unwrap().serialize_pem();
        let e = Ca::from_pem("trellis.local", ca.cert_pem(), &other, None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("does not belong"), "{e}");
        let id = SpiffeId::new("trellis.local", "a", "b").unwrap();
        let (leaf_key, leaf_csr) = key_and_csr().unwrap();
        let leaf = ca.sign(&leaf_csr, &id, Duration::from_secs(60)).unwrap();
        let e = Ca::from_pem("trellis.local", &leaf.chain_pem, &leaf_key, None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("is not a CA"), "{e}");
    }

    #[test]
    fn reloads_from_pem() {
        let ca = Ca::generate("trellis.local", Duration::from_secs(3600)).unwrap();
        let again = Ca::from_pem("trellis.local", ca.cert_pem(), ca.key_pem(), None).unwrap();
        assert_eq!(again.trust_bundle(), ca.cert_pem());
        let id = SpiffeId::new("trellis.local", "a", "b").unwrap();
        again.sign(&csr(&[]), &id, Duration::from_secs(60)).unwrap();
    }
}
