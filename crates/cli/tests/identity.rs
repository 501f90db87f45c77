//! The mesh's CA end to end: join tokens from the real CLI, CSRs and checks made with the
//! real `openssl` command, against a real `trellis control`.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::*;
use http::Method;
use trellis_test_support::{control::ControlProcess, temp_path};

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (installed by .ci/setup)");
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "openssl {args:?} failed:\n{so}\n{se}");
    so + &se
}

/// A fresh key and CSR made by openssl in a new directory, optionally asking for `san`.
fn csr(san: Option<&str>) -> (PathBuf, String) {
    let dir = temp_path("csr");
    std::fs::create_dir_all(&dir).unwrap();
    let mut args = vec![
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "key.pem",
        "-out",
        "csr.pem",
        "-subj",
        "/O=test",
    ];
    let ext;
    if let Some(s) = san {
        ext = format!("subjectAltName={s}");
        args.extend(["-addext", &ext]);
    }
    openssl(&dir, &args);
    let pem = std::fs::read_to_string(dir.join("csr.pem")).unwrap();
    (dir, pem)
}

fn token(cp: &ControlProcess, ns: &str, id: &str, ttl: &str, uses: &str) -> String {
    let out = Command::new(BIN)
        .args([
            "token",
            "create",
            "-n",
            ns,
            "--identity",
            id,
            "--ttl",
            ttl,
            "--uses",
            uses,
        ])
        .args(["--server", &cp.api_url(), "--token", &cp.token])
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

async fn sign(cp: &ControlProcess, token: &str, csr: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({ "csr": csr }).to_string();
    cp.call(Method::POST, "/api/v1/certificates", &body, Some(token))
        .await
}

#[tokio::test]
async fn the_ca_issues_svids_that_openssl_accepts_and_only_what_a_token_allows() {
    let cp = ControlProcess::start(BIN, &["--svid-ttl", "2h"]);
    let t = token(&cp, "shop", "catalog", "10m", "1");
    assert!(t.starts_with("trellis-join."), "{t}");

    // A CSR without names: the CA puts the identity in.
    let (dir, pem) = csr(None);
    let (st, v) = sign(&cp, &t, &pem).await;
    assert_eq!(st, 200, "{v}");
    std::fs::write(dir.join("cert.pem"), v["certificate"].as_str().unwrap()).unwrap();
    std::fs::write(dir.join("root.pem"), v["trustBundle"].as_str().unwrap()).unwrap();
    let id = "spiffe://trellis.local/ns/shop/sa/catalog";
    assert_eq!(v["spiffeId"], id);

    // openssl: the chain verifies to the root, for TLS clients and servers alike.
    let out = openssl(
        &dir,
        &[
            "verify",
            "-CAfile",
            "root.pem",
            "-purpose",
            "sslclient",
            "cert.pem",
        ],
    );
    assert!(out.contains("cert.pem: OK"), "{out}");
    let out = openssl(
        &dir,
        &[
            "verify",
            "-CAfile",
            "root.pem",
            "-purpose",
            "sslserver",
            "cert.pem",
        ],
    );
    assert!(out.contains("cert.pem: OK"), "{out}");
    let text = openssl(&dir, &["x509", "-in", "cert.pem", "-noout", "-text"]);
    assert!(text.contains(&format!("URI:{id}")), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    // The key is the proxy's own: the certificate's public key is the CSR's.
    let cert_pub = openssl(&dir, &["x509", "-in", "cert.pem", "-noout", "-pubkey"]);
    let key_pub = openssl(&dir, &["pkey", "-in", "key.pem", "-pubout"]);
    assert_eq!(cert_pub, key_pub);
    // Valid now, and for the configured 2 h (not 24 h): fine in 1 h 50 m, over in 2 h 10 m.
    openssl(
        &dir,
        &["x509", "-in", "cert.pem", "-noout", "-checkend", "6600"],
    );
    let late = Command::new("openssl")
        .args(["x509", "-in", "cert.pem", "-noout", "-checkend", "7800"])
        .current_dir(&dir)
        .status()
        .unwrap();
    assert!(!late.success(), "valid beyond its lifetime");
    // The root is a CA that may sign only leaves.
    let root = openssl(&dir, &["x509", "-in", "root.pem", "-noout", "-text"]);
    assert!(
        root.contains("CA:TRUE, pathlen:0") && root.contains("Certificate Sign"),
        "{root}"
    );

    // The token was single-use.
    let (_, again) = csr(None);
    let (st, v) = sign(&cp, &t, &again).await;
    assert_eq!(st, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("used up"), "{v}");

    // A CSR for another identity than the token's is refused, and does not use the token.
    let t2 = token(&cp, "shop", "catalog", "10m", "1");
    let (_, other) = csr(Some("URI:spiffe://trellis.local/ns/shop/sa/admin"));
    let (st, v) = sign(&cp, &t2, &other).await;
    assert_eq!(st, 403, "{v}");
    let (_, dns) = csr(Some("DNS:catalog.shop"));
    assert_eq!(sign(&cp, &t2, &dns).await.0, 403);
    let (_, own) = csr(Some(&format!("URI:{id}")));
    assert_eq!(sign(&cp, &t2, &own).await.0, 200, "still usable");

    // Unknown, forged and missing tokens; garbage CSRs.
    let t3 = token(&cp, "shop", "catalog", "10m", "2");
    let forged = format!("{}0", &t3[..t3.len() - 1]);
    assert_eq!(sign(&cp, &forged, &pem).await.0, 401);
    assert_eq!(sign(&cp, "trellis-join.00.00", &pem).await.0, 401);
    assert_eq!(
        sign(&cp, &cp.token, &pem).await.0,
        401,
        "the admin token is not a join token"
    );
    assert_eq!(sign(&cp, &t3, "not a csr").await.0, 400);

    // An expired token: made to live 1 s, refused once that has passed.
    let short = token(&cp, "shop", "catalog", "1s", "5");
    eventually("token expires", Duration::from_secs(10), async || {
        let (st, v) = sign(&cp, &short, &pem).await;
        (st == 401 && v["error"].as_str().unwrap_or_default().contains("expired")).then_some(())
    })
    .await;

    // Tokens are scoped and short-lived by construction.
    let (st, _) = cp
        .call(
            Method::POST,
            "/api/v1/tokens",
            r#"{"namespace":"shop","identity":"catalog","ttlSeconds":604800}"#,
            None,
        )
        .await;
    assert_eq!(st, 422, "a week-long token");
    let (st, _) = cp
        .call(
            Method::POST,
            "/api/v1/tokens",
            r#"{"namespace":"shop","identity":"catalog","ttlSeconds":60}"#,
            Some("wrong"),
        )
        .await;
    assert_eq!(st, 401, "only the admin makes tokens");

    // The CA's key is in the store inside the data dir, which only the owner may enter.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&cp.data_dir).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700);
}
