//! Entry point for the CA's fuzz target (`fuzz/`): certificate requests as an agent or a
//! proxy sends them. Built for `cargo fuzz` with the `fuzzing` feature, and in the unit tests,
//! which replay the committed corpus (`fuzz/corpus/csr`) on every `cargo test`.

use std::{sync::OnceLock, time::Duration};

use crate::{ca::Ca, spiffe::SpiffeId};

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| Ca::generate("fuzz.local", Duration::from_secs(3600)).expect("a CA"))
}

/// A request (PEM text, or DER when it does not start as PEM) signed for one identity: it is
/// refused, or the certificate names that identity alone, is no CA, and chains to the mesh.
pub fn csr(data: &[u8]) {
    let pem = if data.starts_with(b"-----") {
        String::from_utf8_lossy(data).into_owned()
    } else {
        pem_of(data)
    };
    let allowed: SpiffeId = "spiffe://fuzz.local/ns/shop/sa/catalog"
        .parse()
        .expect("an id");
    let Ok(svid) = ca().sign(&pem, &allowed, Duration::from_secs(600)) else {
        return;
    };
    assert_eq!(svid.id, allowed);
    let info = crate::ca::inspect(&svid.chain_pem).expect("an issued chain reads back");
    assert_eq!(info.id, allowed, "issued for another identity");
    assert!(
        crate::ca::chains_to(&svid.chain_pem, ca().trust_bundle()),
        "an issued chain does not chain to the mesh's root"
    );
    let der = x509_pem_der(&svid.chain_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("an issued leaf parses");
    assert!(!cert.is_ca(), "a CA certificate issued to a workload");
}

fn pem_of(der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for (i, c) in der.chunks(3).enumerate() {
        let n = c.iter().fold(0u32, |a, b| a << 8 | u32::from(*b)) << (8 * (3 - c.len()));
        for k in 0..4 {
            s.push(if k <= c.len() {
                B64[(n >> (18 - 6 * k) & 63) as usize] as char
            } else {
                '='
            });
        }
        if i % 16 == 15 {
            s.push('\n');
        }
    }
    s.push_str("\n-----END CERTIFICATE REQUEST-----\n");
    s
}

/// The DER of the first certificate of a PEM chain.
fn x509_pem_der(pem: &str) -> Vec<u8> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
    p.contents
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_committed_corpus_holds_its_properties() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/csr");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.expect("corpus entry").path();
            let data = std::fs::read(&p).expect("corpus file");
            if std::panic::catch_unwind(|| super::csr(&data)).is_err() {
                panic!("{} breaks a property", p.display());
            }
            n += 1;
        }
        assert!(n > 0);
    }

    /// Seeds of `csr`: requests naming nothing, the allowed id, another id, a DNS name, an IP,
    /// several names, and asking to be a CA. Run by hand (`cargo test -p trellis-identity
    /// --lib write_csr_seeds -- --ignored`).
    #[test]
    #[ignore = "writes the seed corpus"]
    fn write_csr_seeds() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/csr");
        let uri = |u: &str| SanType::URI(u.try_into().unwrap());
        let cases: Vec<(&str, Vec<SanType>, bool)> = vec![
            ("none", vec![], false),
            (
                "allowed",
                vec![uri("spiffe://fuzz.local/ns/shop/sa/catalog")],
                false,
            ),
            (
                "other",
                vec![uri("spiffe://fuzz.local/ns/shop/sa/payments")],
                false,
            ),
            (
                "dns",
                vec![SanType::DnsName("catalog.shop".try_into().unwrap())],
                false,
            ),
            ("ip", vec![SanType::IpAddress([127, 0, 0, 1].into())], false),
            (
                "two",
                vec![
                    uri("spiffe://fuzz.local/ns/shop/sa/catalog"),
                    uri("spiffe://other/ns/a/sa/b"),
                ],
                false,
            ),
            ("ca", vec![], true),
        ];
        for (name, sans, ca) in cases {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::default();
            p.subject_alt_names = sans;
            if ca {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            }
            let csr = p.serialize_request(&key).unwrap();
            std::fs::write(out.join(format!("{name}.der")), csr.der().as_ref()).unwrap();
            std::fs::write(out.join(format!("{name}.pem")), csr.pem().unwrap()).unwrap();
        }
    }
}
