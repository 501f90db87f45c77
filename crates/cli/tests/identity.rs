//! The mesh's CA end to end: join tokens from the real CLI, CSRs and checks made with the
//! real `openssl` command, against a real `trellis control`.

mod common;

use std::{path::Path, process::Command, time::Duration};

use common::*;
use http::Method;
use trellis_test_support::{control::ControlProcess, temp_path, Temp};

/// A fresh key and CSR made by openssl in a new directory (removed with the guard),
/// optionally asking for `san`.
fn csr(san: Option<&str>) -> (trellis_test_support::Temp, String) {
    let dir = trellis_test_support::Temp::dir("csr");
    let mut args = vec!["req", "-new"];
    args.extend(EC_KEY);
    args.extend(["-keyout", "key.pem", "-out", "csr.pem", "-subj", "/O=test"]);
    let ext;
    if let Some(s) = san {
        ext = format!("subjectAltName={s}");
        args.extend(["-addext", &ext]);
    }
    openssl(&dir, &args);
    let pem = std::fs::read_to_string(dir.join("csr.pem")).unwrap();
    (dir, pem)
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
        .output()
        .unwrap();
    assert!(!late.status.success(), "valid beyond its lifetime");
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
    // The last secret digit changed (to one it is not).
    let last = if t3.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &t3[..t3.len() - 1]);
    assert_eq!(sign(&cp, &forged, &pem).await.0, 401);
    assert_eq!(sign(&cp, "trellis-join.00.00", &pem).await.0, 401);
    let (st, v) = sign(&cp, &cp.token, &pem).await;
    assert_eq!(st, 401, "the admin token is not a join token");
    // Said so, not "a join token is required", which reads as if none was sent.
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("not a join token: join tokens read trellis-join.<id>.<secret>"),
        "{v}"
    );
    // The CLI says the same before it starts anything, without repeating the value.
    let state = Temp::dir("bad-token");
    for args in [
        &[
            "join",
            "--control-plane",
            &cp.xds_url(),
            "--token",
            "bogus-value",
            "--address",
            "127.0.0.1",
            "--name",
            "w",
            "--port",
            "http=8080",
        ][..],
        &[
            "proxy",
            "--xds",
            &cp.xds_url(),
            "--workload",
            "shop/catalog",
            "--join-token",
            "bogus-value",
        ],
    ] {
        let out = Command::new(BIN)
            .args(args)
            .arg("--state-dir")
            .arg(state.join("state"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains("is not a join token: join tokens read trellis-join.<id>.<secret>, as `trellis token create` prints them"), "{err}");
        assert!(!err.contains("bogus-value"), "{err}");
    }
    assert_eq!(sign(&cp, &t3, "not a csr").await.0, 400);

    // Tokens can be listed (scope, uses, state; never a secret) and revoked.
    let listed = ok(cli(&cp, &["token", "list"]));
    let first_id = t.split('.').nth(1).unwrap();
    let row = listed
        .lines()
        .find(|l| l.starts_with(first_id))
        .expect("listed");
    assert!(
        row.contains("shop/catalog") && row.contains("used"),
        "{listed}"
    );
    assert!(
        !listed.contains(t.split('.').nth(2).unwrap()),
        "no secret: {listed}"
    );
    let t4 = token(&cp, "shop", "catalog", "10m", "3");
    ok(cli(&cp, &["token", "revoke", &t4]));
    let (st, v) = sign(&cp, &t4, &pem).await;
    assert_eq!(st, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("unknown"), "{v}");

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

async fn identity_of(p: &ProxyProcess) -> serde_json::Value {
    let (_, body) = client::get(p.admin, "admin", "/config_dump", &[])
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["identity"].clone()
}

fn mode(p: &Path) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o777
}

#[tokio::test]
async fn a_proxy_joins_with_a_token_reuses_its_certificate_and_renews_it() {
    // Certificates live 20 s here, so that renewal (at half) happens within the test.
    let cp = ControlProcess::start(BIN, &["--svid-ttl", "20s"]);
    let (st, v) = cp
        .call(Method::POST, "/api/v1/apply", &client_workload(&[]), None)
        .await;
    assert_eq!(st, 200, "{v}");
    let state = Temp::path("proxy-state");
    let state_s = state.to_str().unwrap().to_string();

    // No stored certificate and no token: the proxy refuses to start, and says why.
    let out = Command::new(BIN)
        .args(["proxy", "--xds", &cp.xds_url(), "--workload", "test/client"])
        .args(["--state-dir", &state_s, "--admin", "127.0.0.1:0"])
        .args(["--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0"])
        .env_remove("TRELLIS_JOIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no valid certificate") && err.contains("--join-token"),
        "{err}"
    );

    // With a single-use token it gets a certificate for its identity; key and certificate
    // are stored with mode 0600, and the certificate is for the key the proxy made.
    let t = token(&cp, "test", "client", "10m", "1");
    let p = ProxyProcess::start_xds(
        BIN,
        &[cp.xds_url()],
        "test/client",
        &["--state-dir", &state_s, "--join-token", &t],
    );
    p.wait_ready().await;
    let first = identity_of(&p).await;
    assert_eq!(
        first["spiffeId"],
        "spiffe://trellis.local/ns/test/sa/client"
    );
    assert_eq!(mode(&state), 0o700);
    for f in ["key.pem", "cert.pem", "bundle.pem"] {
        assert_eq!(mode(&state.join(f)), 0o600, "{f}");
    }
    let out = openssl(&state, &["verify", "-CAfile", "bundle.pem", "cert.pem"]);
    assert!(out.contains("cert.pem: OK"), "{out}");
    let key1 = std::fs::read_to_string(state.join("key.pem")).unwrap();
    assert_eq!(
        openssl(&state, &["x509", "-in", "cert.pem", "-noout", "-pubkey"]),
        openssl(&state, &["pkey", "-in", "key.pem", "-pubout"])
    );

    // At half its lifetime it renews, without a token (the one it had is used up): a new
    // certificate for a new key, proven with the old one.
    let renewed = eventually("certificate renewed", Duration::from_secs(40), async || {
        let now = identity_of(&p).await;
        (now["serial"] != first["serial"]).then_some(now)
    })
    .await;
    assert_eq!(renewed["spiffeId"], first["spiffeId"]);
    let key2 = std::fs::read_to_string(state.join("key.pem")).unwrap();
    assert_ne!(key1, key2, "a new key at each renewal");
    let out = openssl(&state, &["verify", "-CAfile", "bundle.pem", "cert.pem"]);
    assert!(out.contains("cert.pem: OK"), "{out}");
    drop(p);

    // A restart reuses the stored certificate: no token needed.
    let p = ProxyProcess::start_xds(
        BIN,
        &[cp.xds_url()],
        "test/client",
        &["--state-dir", &state_s],
    );
    p.wait_ready().await;
    let again = identity_of(&p).await;
    let stored = openssl(&state, &["x509", "-in", "cert.pem", "-noout", "-serial"]);
    let serial = again["serial"]
        .as_str()
        .unwrap()
        .replace(':', "")
        .to_uppercase();
    assert!(
        stored.to_uppercase().contains(&serial),
        "{stored} vs {serial}"
    );
}

#[tokio::test]
async fn an_operators_intermediate_signs_and_the_chain_verifies_to_its_root() {
    // The operator's PKI, made with openssl: a root and an intermediate under it.
    let pki = Temp::path("operator-pki");
    std::fs::create_dir_all(&pki).unwrap();
    let ec = EC_KEY;
    let mut root = vec!["req", "-x509"];
    root.extend(ec);
    root.extend([
        "-keyout",
        "root.key",
        "-out",
        "root.pem",
        "-days",
        "30",
        "-subj",
        "/CN=operator root",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&pki, &root);
    let mut inter = vec!["req", "-new"];
    inter.extend(ec);
    inter.extend([
        "-keyout",
        "inter.key",
        "-out",
        "inter.csr",
        "-subj",
        "/CN=operator intermediate",
    ]);
    openssl(&pki, &inter);
    std::fs::write(
        pki.join("ext.cnf"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .unwrap();
    openssl(
        &pki,
        &[
            "x509",
            "-req",
            "-in",
            "inter.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-out",
            "inter.pem",
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
        ],
    );
    let p = |f: &str| pki.join(f).to_str().unwrap().to_string();

    // A key that is not the certificate's: refused at start, naming the files.
    let out = Command::new(BIN)
        .args([
            "control",
            "--data-dir",
            &p("bad-data"),
            "--api",
            "127.0.0.1:0",
            "--xds",
            "127.0.0.1:0",
        ])
        .args(["--ca-cert", &p("inter.pem"), "--ca-key", &p("root.key")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("inter.pem") && err.contains("does not belong"),
        "{err}"
    );

    let cp = ControlProcess::start(
        BIN,
        &[
            "--ca-cert",
            &p("inter.pem"),
            "--ca-key",
            &p("inter.key"),
            "--ca-bundle",
            &p("root.pem"),
        ],
    );
    let t = token(&cp, "shop", "catalog", "10m", "1");
    let (dir, pem) = csr(None);
    let (st, v) = sign(&cp, &t, &pem).await;
    assert_eq!(st, 200, "{v}");
    let chain = v["certificate"].as_str().unwrap();
    assert_eq!(
        chain.matches("BEGIN CERTIFICATE").count(),
        2,
        "leaf and intermediate"
    );
    assert_eq!(
        v["trustBundle"].as_str().unwrap(),
        std::fs::read_to_string(pki.join("root.pem")).unwrap()
    );
    std::fs::write(dir.join("chain.pem"), chain).unwrap();
    std::fs::write(dir.join("root.pem"), v["trustBundle"].as_str().unwrap()).unwrap();
    let out = openssl(
        &dir,
        &[
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "chain.pem",
            "chain.pem",
        ],
    );
    assert!(out.contains("chain.pem: OK"), "{out}");
    let issuer = openssl(&dir, &["x509", "-in", "chain.pem", "-noout", "-issuer"]);
    assert!(issuer.contains("operator intermediate"), "{issuer}");
}

/// Credentials for `ns/id` as a peer proxy holds them: key by openssl, certificate from the
/// control plane with a fresh token.
async fn peer_credentials(
    cp: &ControlProcess,
    ns: &str,
    id: &str,
) -> trellis_identity::tls::TlsCredentials {
    let t = token(cp, ns, id, "10m", "1");
    let (dir, pem) = csr(None);
    let (st, v) = sign(cp, &t, &pem).await;
    assert_eq!(st, 200, "{v}");
    let key = std::fs::read_to_string(dir.join("key.pem")).unwrap();
    trellis_identity::tls::TlsCredentials::from_pem(
        v["certificate"].as_str().unwrap(),
        &key,
        v["trustBundle"].as_str().unwrap(),
    )
    .unwrap()
}

/// GET `/` from `alpha.test` over mutual TLS as `me`, expecting the server to be `server_id`.
async fn get_over_mtls(
    addr: std::net::SocketAddr,
    me: &trellis_identity::tls::TlsCredentials,
    server_id: &str,
) -> Result<(u16, String), String> {
    let cfg =
        trellis_identity::tls::client_config(me, vec![server_id.parse().unwrap()], &[b"http/1.1"])
            .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(trellis_identity::tls::mesh_server_name(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", "alpha.test")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let r = send.send_request(req).await.map_err(|e| e.to_string())?;
    let st = r.status().as_u16();
    let body = http_body_util::BodyExt::collect(r.into_body())
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((st, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test]
async fn the_inbound_listener_names_mtls_callers_and_authorizes_them_by_identity() {
    let app = upstream::named("local-app").await;
    let cp = ControlProcess::start(BIN, &[]);
    let policy = "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: clients-only, namespace: test }\nspec:\n  targetRefs: [{ name: alpha }]\n  action: ALLOW\n  rules:\n    - from: [{ identities: [test/client] }]\n";
    let mesh = [service("alpha", "HTTP", &[app]), policy.to_string()].join("---\n");
    let (st, v) = cp.call(Method::POST, "/api/v1/apply", &mesh, None).await;
    assert_eq!(st, 200, "{v}");
    let state = Temp::path("alpha-state");
    let state_s = state.to_str().unwrap().to_string();
    let t = token(&cp, "test", "alpha", "10m", "1");
    let p = ProxyProcess::start_xds(
        BIN,
        &[cp.xds_url()],
        "test/alpha-0",
        &[
            "--state-dir",
            &state_s,
            "--join-token",
            &t,
            "--mtls-mode",
            "permissive",
        ],
    );
    p.wait_ready().await;
    let alpha = "spiffe://trellis.local/ns/test/sa/alpha";
    let client = peer_credentials(&cp, "test", "client").await;
    let evil = peer_credentials(&cp, "test", "evil").await;

    // The allowed identity gets through, and the access log names it.
    assert_eq!(
        get_over_mtls(p.inbound, &client, alpha).await.unwrap(),
        (200, "local-app".to_string())
    );
    let line = p
        .wait_log("mtls inbound line", |l| {
            l["direction"] == "inbound" && l["status"] == 200
        })
        .await;
    assert_eq!(
        line["source_identity"],
        "spiffe://trellis.local/ns/test/sa/client"
    );
    // Another identity of the same mesh: 403, class denied.
    let (st, body) = get_over_mtls(p.inbound, &evil, alpha).await.unwrap();
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("denied"), "{body}");
    // Metrics carry the caller's identity.
    let by = |who: &'static str, class: &'static str| {
        let p = &p;
        async move {
            p.metric(
                "trellis_http_requests_total",
                &[("source_identity", who), ("failure_class", class)],
            )
            .await
        }
    };
    eventually(
        "requests counted by identity",
        Duration::from_secs(10),
        async || {
            (by("spiffe://trellis.local/ns/test/sa/client", "ok").await == 1.0
                && by("spiffe://trellis.local/ns/test/sa/evil", "denied").await == 1.0)
                .then_some(())
        },
    )
    .await;
    // The policy on a second Service too, which is then deleted: alpha's proxy keeps the
    // policy on alpha. Before, the whole policy was left out with the deleted Service, and
    // alpha was open to every caller.
    let annex = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: annex, namespace: test }\nspec:\n  ports: [{ port: 80 }]\n";
    let both = policy.replace("[{ name: alpha }]", "[{ name: annex }, { name: alpha }]");
    let (st, v) = cp
        .call(
            Method::POST,
            "/api/v1/apply",
            &[annex, &both].join("---\n"),
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let scope = async || {
        let (_, body) = client::get(p.admin, "admin", "/config_dump", &[])
            .await
            .ok()?;
        let dump: serde_json::Value = serde_json::from_slice(&body).ok()?;
        Some(dump["config"]["authz"].to_string())
    };
    eventually("the policy on both", Duration::from_secs(10), async || {
        scope().await.filter(|s| s.contains("annex"))
    })
    .await;
    let (st, v) = cp
        .call(
            Method::DELETE,
            "/api/v1/resources/Service/test/annex",
            "",
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    eventually(
        "the policy on alpha alone",
        Duration::from_secs(10),
        async || {
            scope()
                .await
                .filter(|s| s.contains("alpha") && !s.contains("annex"))
        },
    )
    .await;
    let (st, body) = get_over_mtls(p.inbound, &evil, alpha).await.unwrap();
    assert_eq!(st, 403, "{body}");
    // A caller that expects another server identity refuses the proxy.
    let e = get_over_mtls(p.inbound, &client, "spiffe://trellis.local/ns/test/sa/beta")
        .await
        .unwrap_err();
    assert!(
        e.contains("peer is spiffe://trellis.local/ns/test/sa/alpha"),
        "{e}"
    );
    // Permissive mode (forced by the flag): plaintext is served, but has no identity, so the
    // policy denies it.
    let (st, _) = client::get(p.inbound, "alpha.test", "/", &[])
        .await
        .unwrap();
    assert_eq!(st.as_u16(), 403);
    drop(p);

    // Without --mtls-mode and with no PeerAuthentication, the mesh is STRICT (same state
    // dir: the stored certificate is reused): plaintext is refused at the connection and
    // counted; mutual TLS still works.
    let p = ProxyProcess::start_xds(
        BIN,
        &[cp.xds_url()],
        "test/alpha-0",
        &["--state-dir", &state_s],
    );
    p.wait_ready().await;
    assert!(client::get(p.inbound, "alpha.test", "/", &[])
        .await
        .is_err());
    assert_eq!(
        p.metric("trellis_inbound_tls_refusals_total", &[]).await,
        1.0
    );
    assert_eq!(
        get_over_mtls(p.inbound, &client, alpha).await.unwrap().0,
        200
    );
}

/// The connections `caller`'s proxy made to `callee`'s inbound listener (its mutual-TLS
/// connections to that peer).
async fn connects_made(caller: &ProxyProcess, callee: &ProxyProcess) -> f64 {
    let endpoint = callee.inbound.to_string();
    caller
        .metric(
            "trellis_upstream_connects_total",
            &[("endpoint", &endpoint)],
        )
        .await
}

/// The peer's mesh: Services `b` (HTTP) and `t` (TCP) on one Workload `peer` (identity
/// `IDENTITY`, its proxy's inbound at `INBOUND`), Service `f` whose Workload claims an identity
/// but whose "proxy" is a plain HTTP server, and the caller `client` (identity `client`).
fn peer_mesh(
    app: std::net::SocketAddr,
    echo: std::net::SocketAddr,
    plain: std::net::SocketAddr,
    identity: &str,
    inbound: u16,
) -> String {
    let svc = |name: &str, sel: &str, port: u16, proto: &str| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {name}, namespace: test }}\nspec:\n  selector: {{ app: {sel} }}\n  ports: [{{ name: {name}, port: {port}, targetPort: 1, protocol: {proto} }}]\n")
    };
    let wl = |name: &str, app: &str, id: &str, inbound: u16, ports: String| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: test, labels: {{ app: {app} }} }}\nspec:\n  address: 127.0.0.1\n  identity: {id}\n  inboundPort: {inbound}\n  ports: {{ {ports} }}\n")
    };
    [
        svc("b", "peer", 80, "HTTP"),
        svc("t", "peer", 5000, "TCP"),
        svc("f", "fake", 80, "HTTP"),
        wl("peer", "peer", identity, inbound, format!("b: {}, t: {}", app.port(), echo.port())),
        wl("fake", "fake", "fake", plain.port(), format!("f: {}", plain.port())),
        "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: client, namespace: test, labels: { app: client } }\nspec: { address: 127.0.0.1, identity: client }\n".to_string(),
    ]
    .join("---\n")
}

/// The callee (`test/peer`, identity beta) and the caller (`test/client`), each joined with
/// a token, the callee's inbound port published in its Workload.
async fn start_pair(
    cp: &ControlProcess,
    app: std::net::SocketAddr,
    echo: std::net::SocketAddr,
    plain: std::net::SocketAddr,
) -> (ProxyProcess, ProxyProcess) {
    mtls_pair(cp, |inbound| peer_mesh(app, echo, plain, "beta", inbound)).await
}

#[tokio::test]
async fn callers_reach_peer_proxies_by_mtls_and_tell_tls_failures_apart() {
    // "peer-app"; to a POST, how many bytes its body had. The mesh's own `x-trellis-peer`
    // never reaches it: if it did, it answers 500.
    let app = upstream::http(|req: http::Request<hyper::body::Incoming>| async move {
        if req.headers().contains_key("x-trellis-peer") {
            let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(
                "the application saw x-trellis-peer",
            )));
            *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            return r;
        }
        let post = req.method() == Method::POST;
        let body = http_body_util::BodyExt::collect(req.into_body())
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = match post {
            true => format!("peer-app got {} bytes", body.len()),
            false => "peer-app".to_string(),
        };
        http::Response::new(http_body_util::Full::new(bytes::Bytes::from(text)))
    })
    .await;
    let echo = upstream::tcp_echo().await;
    let plain = upstream::named("not-a-proxy").await;
    let cp = ControlProcess::start(BIN, &[]);
    let apply = |yaml: String| apply_ok(&cp, yaml);
    let (callee, caller) = start_pair(&cp, app, echo, plain).await;
    let inbound = callee.inbound.port();

    // HTTP/1.1 from the application, HTTP/1.1 on a stream of the one mutual-TLS connection
    // between the proxies (`trellis-mux/1`): the callee names the caller.
    eventually("HTTP over mTLS", Duration::from_secs(10), async || {
        let (st, _, body) = via(&caller, "b.test").await;
        (st == 200 && body == "peer-app").then_some(())
    })
    .await;
    let client_id = "spiffe://trellis.local/ns/test/sa/client";
    let line = callee
        .wait_log("inbound request from the caller", |l| {
            l["direction"] == "inbound" && l["status"] == 200
        })
        .await;
    assert_eq!(line["source_identity"], client_id, "{line}");
    assert_eq!(line["protocol"], "HTTP/1.1", "{line}");
    assert_eq!(line["src_workload"], "test/client", "{line}");
    // An application's own `x-trellis-peer` names nobody: the caller's proxy sends its own,
    // the callee names the caller from it and keeps it from the application.
    let r = client::get_full(
        caller.outbound,
        "b.test",
        "/forged",
        &[("x-trellis-peer", "test/someone-else")],
    )
    .await
    .unwrap();
    assert_eq!(
        (r.status.as_u16(), String::from_utf8_lossy(&r.body).as_ref()),
        (200, "peer-app")
    );
    let line = callee
        .wait_log("the forged request at the callee", |l| {
            l["direction"] == "inbound" && l["path"] == "/forged"
        })
        .await;
    assert_eq!(line["src_workload"], "test/client", "{line}");
    assert_eq!(line["source_identity"], client_id, "{line}");
    // Several HTTP/1.1 requests at once, streams of the one connection: each names the caller.
    let many = (0..6).map(|_| async {
        let r = client::get_full(caller.outbound, "b.test", "/many", &[])
            .await
            .unwrap();
        (
            r.status.as_u16(),
            String::from_utf8_lossy(&r.body).into_owned(),
        )
    });
    for (st, body) in futures_util::future::join_all(many).await {
        assert_eq!((st, body.as_str()), (200, "peer-app"));
    }
    let lines = eventually(
        "the six requests at the callee",
        Duration::from_secs(10),
        async || {
            let l: Vec<_> = callee
                .logs()
                .into_iter()
                .filter(|l| l["direction"] == "inbound" && l["path"] == "/many")
                .collect();
            (l.len() == 6).then_some(l)
        },
    )
    .await;
    for l in &lines {
        assert_eq!(l["source_identity"], client_id, "{l}");
        assert_eq!(l["protocol"], "HTTP/1.1", "{l}");
    }
    // A request body larger than a TLS record and a stream's window, and
    // requests after it on the same client connection.
    let mut c = client::Conn::h1(caller.outbound).await;
    for _ in 0..2 {
        let r = c
            .post("b.test", "/upload", bytes::Bytes::from(vec![7u8; 300_000]))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "peer-app got 300000 bytes");
        let r = c.get("b.test", "/after").await.unwrap();
        assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"peer-app"[..]));
    }
    // An HTTP/2 client's requests to this HTTP/1.1 service ride the same way.
    let mut h2 = client::Conn::h2(caller.outbound).await;
    let r = h2.get("b.test", "/h2").await.unwrap();
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"peer-app"[..]));
    let line = callee
        .wait_log("the HTTP/2 request at the callee", |l| {
            l["direction"] == "inbound" && l["path"] == "/h2"
        })
        .await;
    assert_eq!(line["source_identity"], client_id, "{line}");
    assert_eq!(line["protocol"], "HTTP/1.1", "{line}");
    // All of it on one connection to the callee's proxy: concurrent requests, bodies past a
    // stream's window (256 KiB), both clients.
    let connects = connects_made(&caller, &callee).await;
    assert_eq!(connects, 1.0, "connections made to the callee's proxy");
    // Opaque TCP (a CONNECT tunnel at the caller) rides mutual TLS too.
    assert_eq!(
        echo_through(caller.outbound, "t.test:5000", b"over mtls")
            .await
            .unwrap(),
        b"over mtls"
    );
    let line = callee
        .wait_log("inbound TCP from the caller", |l| {
            l["kind"] == "tcp" && l["direction"] == "inbound"
        })
        .await;
    assert_eq!(line["source_identity"], client_id, "{line}");
    assert_eq!(line["dst_service"], "t.test", "{line}");
    // Plaintext to the callee is refused (STRICT by default); the caller never sent any.
    assert!(client::get(callee.inbound, "b.test", "/", &[])
        .await
        .is_err());
    assert_eq!(
        callee
            .metric("trellis_inbound_tls_refusals_total", &[])
            .await,
        1.0
    );

    // A "peer" that answers in plaintext: tls_error at the caller, which says why.
    let (st, class, body) = via(&caller, "f.test").await;
    assert_eq!((st, class.as_str()), (502, "tls_error"), "{body}");
    assert!(body.contains("plaintext"), "{body}");

    // The Workload now says the peer is `gamma`, but its certificate names `beta`: refused.
    apply(peer_mesh(app, echo, plain, "gamma", inbound)).await;
    let body = eventually(
        "wrong identity refused",
        Duration::from_secs(10),
        async || {
            let (st, class, body) = via(&caller, "b.test").await;
            (st == 502 && class == "tls_error").then_some(body)
        },
    )
    .await;
    assert!(
        body.contains("spiffe://trellis.local/ns/test/sa/beta"),
        "{body}"
    );
    assert!(body.contains("certificate was refused"), "{body}");
    apply(peer_mesh(app, echo, plain, "beta", inbound)).await;

    // A caller with no identity cannot reach a STRICT service...
    let anon = ProxyProcess::start_xds(BIN, &[cp.xds_url()], "test/client", &[]);
    anon.wait_ready().await;
    let (st, class, body) = via(&anon, "b.test").await;
    assert_eq!((st, class.as_str()), (502, "tls_error"), "{body}");
    assert!(body.contains("requires mutual TLS"), "{body}");
    // ...until the service is made PERMISSIVE, for migration: then it is called in
    // plaintext, at the application's own address.
    apply("apiVersion: trellis.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: { name: b, namespace: test }\nspec:\n  targetRefs: [{ name: b }]\n  mtls: { mode: PERMISSIVE }\n".to_string()).await;
    eventually(
        "permissive reached in plaintext",
        Duration::from_secs(10),
        async || {
            let (st, _, body) = via(&anon, "b.test").await;
            (st == 200 && body == "peer-app").then_some(())
        },
    )
    .await;
    // The metrics of both sides carry the class and the identity.
    assert!(
        caller
            .metric(
                "trellis_http_requests_total",
                &[("failure_class", "tls_error")]
            )
            .await
            >= 2.0
    );
    assert!(
        callee
            .metric(
                "trellis_http_requests_total",
                &[("direction", "inbound"), ("source_identity", client_id)]
            )
            .await
            >= 1.0
    );
}

/// A WebSocket application (tungstenite): each message echoed back; an upgrade to
/// `/refused` is answered 403 with a body; a plain request gets 200 "plain".
async fn websocket_app() -> std::net::SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    upstream::tcp(|mut s| async move {
        let mut peek = [0u8; 2048];
        let Ok(n) = s.peek(&mut peek).await else {
            return;
        };
        let head = String::from_utf8_lossy(&peek[..n]).to_ascii_lowercase();
        if !head.contains("upgrade: websocket") {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain")
                .await;
            return;
        }
        // tungstenite's callback type: its error is the whole response.
        #[allow(clippy::result_large_err)]
        let refuse = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            if req.uri().path() == "/refused" {
                let mut e = ErrorResponse::new(Some("not for you.".into()));
                *e.status_mut() = http::StatusCode::FORBIDDEN;
                return Err(e);
            }
            Ok(resp)
        };
        let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, refuse).await else {
            return;
        };
        while let Some(Ok(m)) = ws.next().await {
            if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn websocket_upgrades_cross_peer_proxies_over_mutual_tls() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Error, Message};
    let app = websocket_app().await;
    let echo = upstream::tcp_echo().await;
    let plain = upstream::named("not-a-proxy").await;
    let cp = ControlProcess::start(BIN, &[]);
    let (callee, caller) = start_pair(&cp, app, echo, plain).await;
    eventually("HTTP over mTLS", Duration::from_secs(10), async || {
        let (st, _, body) = via(&caller, "b.test").await;
        (st == 200 && body == "plain").then_some(())
    })
    .await;
    let request = |path: &str| {
        let mut req = format!("ws://{}{path}", caller.outbound)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("host", "b.test".parse().unwrap());
        req
    };

    // A real WebSocket client and server: the handshake (the server's accept key checked by
    // the client) and the frames both ways cross both proxies and the mutual TLS between.
    let (mut ws, resp) = tokio_tungstenite::connect_async(request("/chat"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let m = ws.next().await.unwrap().unwrap();
        assert_eq!(m.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    // Larger than a TLS record, and than the socket buffers' first fill.
    let big = vec![7u8; 300_000];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let m = ws.next().await.unwrap().unwrap();
    assert!(m.into_data() == big);
    ws.close(None).await.unwrap();

    // The callee served it from the caller's identity, over its own mutual TLS connection.
    let line = callee
        .wait_log("the upgrade at the callee", |l| {
            l["direction"] == "inbound" && l["path"] == "/chat"
        })
        .await;
    assert_eq!(line["status"], 101, "{line}");
    assert_eq!(
        line["source_identity"], "spiffe://trellis.local/ns/test/sa/client",
        "{line}"
    );
    assert_eq!(line["protocol"], "HTTP/1.1", "{line}");

    // An upgrade the application refuses: its answer comes back, status and body.
    match tokio_tungstenite::connect_async(request("/refused")).await {
        Err(Error::Http(r)) => {
            assert_eq!(r.status(), 403);
            // tungstenite reads the body as it comes, without undoing the chunked framing
            // the proxies put on a body of unknown length (the application gave none).
            let body = String::from_utf8_lossy(r.body().as_deref().unwrap_or_default());
            assert!(body.contains("not for you."), "{body:?}");
        }
        other => panic!("expected the application's 403: {other:?}"),
    }
    let line = caller
        .wait_log("the refused upgrade at the caller", |l| {
            l["direction"] == "outbound" && l["path"] == "/refused"
        })
        .await;
    assert_eq!(line["status"], 403, "{line}");
    assert_eq!(line["failure_class"], "client_error", "{line}");

    // One the callee's proxy refuses (its authorization): the caller keeps the class that
    // proxy gave, as for any request between the proxies.
    apply_ok(&cp, "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: no-admin, namespace: test }\nspec:\n  targetRefs: [{ name: b }]\n  action: DENY\n  rules:\n    - to: [{ paths: [{ prefix: /admin }] }]\n".to_string()).await;
    let status = eventually("the policy applied", Duration::from_secs(10), async || {
        match tokio_tungstenite::connect_async(request("/admin")).await {
            Err(Error::Http(r)) => (r.status() == 403).then_some(r.status()),
            _ => None,
        }
    })
    .await;
    assert_eq!(status, 403);
    let line = caller
        .wait_log("the denied upgrade at the caller", |l| {
            l["direction"] == "outbound" && l["path"] == "/admin" && l["status"] == 403
        })
        .await;
    assert_eq!(line["failure_class"], "denied", "{line}");
}

/// The identity section of a proxy's `/config_dump`.
async fn dump_identity(p: &ProxyProcess) -> serde_json::Value {
    let (_, body) = client::get(p.admin, "admin", "/config_dump", &[])
        .await
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&body).unwrap()["identity"].clone()
}

/// Wait until every proxy's identity satisfies `pred`.
async fn wait_all(what: &str, ps: [&ProxyProcess; 2], pred: impl Fn(&serde_json::Value) -> bool) {
    eventually(what, Duration::from_secs(30), async || {
        for p in ps {
            if !pred(&dump_identity(p).await) {
                return None;
            }
        }
        Some(())
    })
    .await;
}

#[tokio::test]
async fn a_root_rotation_and_leaf_renewals_under_steady_load_fail_no_request() {
    use std::sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    };
    let app = upstream::named("peer-app").await;
    let echo = upstream::tcp_echo().await;
    let plain = upstream::named("not-a-proxy").await;
    // Certificates live 20 s: each proxy renews every 10 s or so while the load runs.
    let cp = ControlProcess::start(BIN, &["--svid-ttl", "20s"]);
    let (callee, caller) = start_pair(&cp, app, echo, plain).await;
    eventually("mTLS up", Duration::from_secs(10), async || {
        (via(&caller, "b.test").await.0 == 200).then_some(())
    })
    .await;

    // Steady load: HTTP requests over the proxies' pooled HTTP/2 connection, and TCP
    // tunnels that each make a new mutual TLS handshake.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let load = {
        let (stop, ok, failed, out) = (stop.clone(), ok.clone(), failed.clone(), caller.outbound);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client::get(out, "b.test", "/", &[]).await {
                    Ok((st, body)) if st == 200 && &body[..] == b"peer-app" => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    r => failed.lock().unwrap().push(format!("http: {r:?}")),
                }
                match echo_through(out, "t.test:5000", b"ping").await {
                    Ok(b) if b == b"ping" => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    r => failed.lock().unwrap().push(format!("tcp: {r:?}")),
                }
            }
        })
    };
    let serials = async || {
        [
            dump_identity(&callee).await["serial"].clone(),
            dump_identity(&caller).await["serial"].clone(),
        ]
    };

    // 1. A new root is trusted everywhere; the old one still signs.
    let out = ok_cli(&cp, &["ca", "rotate", "begin"]);
    assert!(out.contains("begun"), "{out}");
    wait_all("both roots trusted", [&callee, &caller], |i| {
        i["trustedRoots"] == 2
    })
    .await;
    // 2. The new root signs: each proxy moves to it at its next renewal.
    let before = serials().await;
    ok_cli(&cp, &["ca", "rotate", "activate"]);
    eventually(
        "both proxies renewed on the new root",
        Duration::from_secs(30),
        async || {
            let now = serials().await;
            (now[0] != before[0] && now[1] != before[1]).then_some(())
        },
    )
    .await;
    // 3. The old root may not leave while certificates it signed may still be valid...
    let refused = cli(&cp, &["ca", "rotate", "finish"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--force"),
        "{refused:?}"
    );
    // ...but both proxies have renewed onto the new root, so it may go now.
    let out = ok_cli(&cp, &["ca", "rotate", "finish", "--force"]);
    assert!(out.contains("steady"), "{out}");
    wait_all("the old root dropped", [&callee, &caller], |i| {
        i["trustedRoots"] == 1
    })
    .await;
    // New handshakes (the tunnels) go on under the new root alone, through one more renewal.
    let after = serials().await;
    eventually("one more renewal", Duration::from_secs(30), async || {
        let now = serials().await;
        (now[0] != after[0] && now[1] != after[1]).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        ok.load(Ordering::Relaxed) > 100,
        "the load ran: {}",
        ok.load(Ordering::Relaxed)
    );
    // Both proxies' own records agree: no request or connection failed on either side.
    for p in [&callee, &caller] {
        let m = p.metrics().await;
        for line in m.lines().filter(|l| {
            l.starts_with("trellis_http_requests_total")
                || l.starts_with("trellis_tcp_connections_total")
        }) {
            assert!(line.contains("failure_class=\"ok\""), "{line}");
        }
    }
}

fn ok_cli(cp: &ControlProcess, args: &[&str]) -> String {
    ok(cli(cp, args))
}

/// A TLS connection to a control plane's xDS port as a proxy without a certificate makes
/// it (the root pinned by `hash`), carrying HTTP/2.
async fn control_h2(
    addr: std::net::SocketAddr,
    hash: &str,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>> {
    let pin = trellis_identity::tls::parse_ca_hash(hash).unwrap();
    let cfg = trellis_identity::tls::bootstrap_client_config(pin, &[b"h2"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(trellis_identity::tls::mesh_server_name(), tcp)
        .await
        .unwrap();
    h2_over(tls).await
}

#[tokio::test]
async fn proxies_reach_the_control_plane_over_tls_and_pin_its_root() {
    let app = upstream::named("local-app").await;
    let cp = ControlProcess::start(BIN, &[]);
    apply_ok(&cp, service("alpha", "HTTP", &[app])).await;
    let body = r#"{"namespace":"test","identity":"alpha","ttlSeconds":600}"#;
    let (st, v) = cp.call(Method::POST, "/api/v1/tokens", body, None).await;
    assert_eq!(st, 200, "{v}");
    let (tok, hash) = (v["token"].as_str().unwrap(), v["caHash"].as_str().unwrap());
    assert!(hash.starts_with("sha256:") && hash.len() == 71, "{hash}");
    let https = cp.xds_url().replace("http://", "https://");
    let state = Temp::path("tls-state");
    let state_s = state.to_str().unwrap();

    // A control plane whose root is not the pinned one (a man in the middle, say) is refused
    // before the token is sent: the single-use token is still good afterwards.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let out = Command::new(BIN)
        .args(["proxy", "--xds", &https, "--workload", "test/alpha-0"])
        .args([
            "--state-dir",
            state_s,
            "--join-token",
            tok,
            "--ca-hash",
            &wrong,
        ])
        .args(["--admin", "127.0.0.1:0", "--outbound", "127.0.0.1:0"])
        .args(["--inbound", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("expected hash"), "{err}");
    // With the right hash: certificate over TLS, then xDS over mutual TLS.
    let p = ProxyProcess::start_xds(
        BIN,
        std::slice::from_ref(&https),
        "test/alpha-0",
        &[
            "--state-dir",
            state_s,
            "--join-token",
            tok,
            "--ca-hash",
            hash,
        ],
    );
    p.wait_ready().await;
    assert_eq!(
        dump_identity(&p).await["spiffeId"],
        "spiffe://trellis.local/ns/test/sa/alpha"
    );
    let (st, v) = cp.call(Method::GET, "/api/v1/proxies", "", None).await;
    assert_eq!(st, 200);
    assert!(v.to_string().contains("test/alpha-0"), "{v}");

    // Over TLS without a certificate, a client may ask for one but not open an ADS stream.
    let mut h2 = control_h2(cp.xds, hash).await;
    let req = http::Request::post(format!(
        "http://{}/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
        cp.xds
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(http_body_util::Full::new(bytes::Bytes::new()))
    .unwrap();
    let r = h2.send_request(req).await.unwrap();
    let status = r
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string());
    let msg = r
        .headers()
        .get("grpc-message")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(status.as_deref(), Some("16"), "UNAUTHENTICATED: {msg:?}");
    let req = http::Request::post(format!("http://{}/v1/certificates", cp.xds))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            r#"{"csr":"x"}"#,
        )))
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 401);
    drop(p);

    // A control plane whose xDS listener is not on loopback takes TLS only.
    let cp2 = ControlProcess::start_in(BIN, temp_path("cp-any"), &[], "127.0.0.1:0", "0.0.0.0:0");
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], cp2.xds.port()));
    let plain = tokio::net::TcpStream::connect(local).await.unwrap();
    let r = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(plain),
    )
    .await;
    let refused = match r {
        Err(_) => true,
        Ok((mut send, conn)) => {
            tokio::spawn(conn);
            let req = http::Request::post(format!("http://{local}/v1/certificates"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            send.send_request(req).await.is_err()
        }
    };
    assert!(refused, "plaintext served on a non-loopback listener");
    let mut h2 = control_h2(local, &cp2.ca_hash).await;
    let req = http::Request::post(format!("http://{local}/v1/certificates"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            r#"{"csr":"x"}"#,
        )))
        .unwrap();
    assert_eq!(
        h2.send_request(req).await.unwrap().status(),
        401,
        "TLS is served"
    );
}

#[tokio::test]
async fn an_api_beyond_loopback_is_served_over_tls_only() {
    let data = temp_path("cp-api");
    let cp = ControlProcess::start_in(BIN, data.clone(), &[], "0.0.0.0:0", "127.0.0.1:0");
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], cp.api.port()));
    // Plaintext: no answer (the admin token would cross the network in the clear).
    assert!(client::get(local, "api", "/healthz", &[]).await.is_err());
    let run = |args: &[&str], server: &str| {
        Command::new(BIN)
            .args(args)
            .args(["--server", server, "--token", &cp.token])
            .env("XDG_CONFIG_HOME", "/nonexistent")
            .output()
            .unwrap()
    };
    let https = format!("https://{local}");
    // The CLI over TLS, the control plane checked against the pinned root.
    let out = run(&["ca", "status", "--api-ca-hash", &cp.ca_hash], &https);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&cp.ca_hash),
        "{out:?}"
    );
    // Another hash: refused before the token is sent.
    let wrong = format!("sha256:{}", "1".repeat(64));
    let out = run(&["ca", "status", "--api-ca-hash", &wrong], &https);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected hash"),
        "{out:?}"
    );
    // No hash: the CLI says what it needs, and where to find it (not `trellis ca status`,
    // which would need it).
    let out = run(&["ca", "status"], &https);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--api-ca-hash"), "{out:?}");
    assert!(
        err.contains("DATA_DIR/ca-hash") && err.contains("control plane ready"),
        "{err}"
    );
    // ...where it is: in the data directory, and said at start.
    let kept = std::fs::read_to_string(data.join("ca-hash")).unwrap();
    assert_eq!(kept.trim(), cp.ca_hash);
    assert!(
        cp.stderr().iter().any(|l| l.contains(&format!(
            "clients of the API pass --api-ca-hash {}",
            cp.ca_hash
        ))),
        "{:?}",
        cp.stderr()
    );
}

/// An opaque TCP stream between two proxies starts with a hello and an answer: the callee's
/// proxy learns which workload calls, and the caller learns whether the callee's application
/// took the connection. Service `db` has two replicas behind their proxies, one with its
/// application down: every connection through the caller reaches the other (no ejection
/// helps: outlier detection is off), and the down replica's proxy names the caller it refused.
/// Service `vault` (on the up replica) denies the caller by AuthorizationPolicy: its CONNECT
/// is refused 403, not answered 200 and then closed.
#[tokio::test]
async fn a_tcp_stream_names_its_caller_and_a_refusal_reaches_the_caller() {
    let echo = upstream::tcp_echo().await;
    let (down, _down) = upstream::refusing();
    let cp = ControlProcess::start(BIN, &[]);
    // A callee whose proxy is older than the hello: it offers only the bare stream.
    let old = old_callee(peer_credentials(&cp, "test", "db-old").await, echo).await;
    let mesh = |up_in: u16, down_in: u16| {
        let svc = |name: &str, app: &str, port: u16| {
            format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {name}, namespace: test }}\nspec:\n  selector: {{ app: {app} }}\n  ports: [{{ name: {name}, port: {port}, targetPort: 1, protocol: TCP }}]\n")
        };
        let wl = |name: &str, app: &str, inbound: u16, ports: String| {
            format!("apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: test, labels: {{ app: {app} }} }}\nspec:\n  address: 127.0.0.1\n  identity: {name}\n  inboundPort: {inbound}\n  ports: {{ {ports} }}\n")
        };
        [
            svc("db", "db", 5432),
            svc("vault", "db", 8200),
            svc("legacy", "legacy", 6000),
            wl("db-up", "db", up_in, format!("db: {0}, vault: {0}", echo.port())),
            wl("db-down", "db", down_in, format!("db: {}", down.port())),
            wl("db-old", "legacy", old.port(), format!("legacy: {}", echo.port())),
            "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: client, namespace: test, labels: { app: client } }\nspec: { address: 127.0.0.1, identity: client }\n".to_string(),
            policy("db", "  outlierDetection: { consecutiveFailures: 0 }\n"),
            "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: sealed, namespace: test }\nspec:\n  targetRefs: [{ name: vault }]\n  action: DENY\n  rules: [{ from: [{ identities: [test/client] }] }]\n".to_string(),
        ]
        .join("---\n")
    };
    apply_ok(&cp, mesh(1, 1)).await;
    let up = join_reporting(&cp, "db-up", "test/db-up");
    let dn = join_reporting(&cp, "db-down", "test/db-down");
    up.wait_ready().await;
    dn.wait_ready().await;
    apply_ok(&cp, mesh(up.inbound.port(), dn.inbound.port())).await;
    let caller = join_reporting(&cp, "client", "test/client");
    caller.wait_ready().await;
    until_echoed(caller.outbound, "db.test:5432").await;
    for i in 0..12 {
        let msg = format!("select {i}");
        let got = echo_through(caller.outbound, "db.test:5432", msg.as_bytes()).await;
        assert_eq!(got.as_deref(), Ok(msg.as_bytes()), "connection {i}");
    }
    // Each replica's streams rode one HTTP/2 connection to its proxy: one mutual-TLS
    // handshake each, not one per stream.
    for (replica, p) in [("db-up", &up), ("db-down", &dn)] {
        let connects = connects_made(&caller, p).await;
        assert_eq!(connects, 1.0, "connections made to {replica}'s proxy");
    }
    // One connection carries at most 100 streams: held open together, those past it have a
    // connection each, and every one echoes. (The streams above have ended first: none of
    // the caller's TCP connections is open.)
    trellis_test_support::eventually(
        "the earlier streams ended",
        Duration::from_secs(10),
        async || {
            let open = caller.metric("trellis_tcp_connections_open", &[]).await;
            (open == 0.0).then_some(())
        },
    )
    .await;
    let before = connects_made(&caller, &up).await;
    let mut held = Vec::new();
    for i in 0..102 {
        let mut s = tunnel(caller.outbound, "db.test:5432").await;
        let msg = format!("held {i:03}");
        assert_eq!(echo_on(&mut s, msg.as_bytes()).await, msg.as_bytes());
        held.push(s);
    }
    let after = connects_made(&caller, &up).await;
    assert_eq!(after - before, 2.0, "connections past the cap on streams");
    drop(held);
    // The replica whose application is down refused the caller's streams, and says whose.
    let line = dn
        .wait_log("the down replica's refusal", |l| {
            l["kind"] == "tcp" && l["direction"] == "inbound"
        })
        .await;
    assert_eq!(line["failure_class"], "connect_refused", "{line}");
    assert_eq!(line["src_workload"], "test/client", "{line}");
    // The replica that took them names the caller too.
    let line = up
        .wait_log("the up replica's stream", |l| {
            l["kind"] == "tcp" && l["direction"] == "inbound" && l["bytes_sent"] == 8
        })
        .await;
    assert_eq!(line["failure_class"], "ok", "{line}");
    assert_eq!(line["src_workload"], "test/client", "{line}");
    // The caller knew each of those streams was refused, and tried the other replica: as
    // many retries as the down replica refused (each endpoint is tried once per connection).
    // (The access log is written off the request path: waited for.)
    let retried = caller
        .metric("trellis_retries_total", &[("outcome", "sent")])
        .await;
    trellis_test_support::eventually_explained(
        "a retry for each refusal",
        Duration::from_secs(10),
        async || {
            let refusals = dn
                .logs()
                .iter()
                .filter(|l| l["kind"] == "tcp" && l["failure_class"] == "connect_refused")
                .count();
            match refusals as f64 == retried {
                true => Ok(()),
                false => Err(format!("{refusals} refusals, {retried} retries")),
            }
        },
    )
    .await;

    // Denied by the callee's policy: the CONNECT is refused, with the callee's class.
    let denied = echo_through(caller.outbound, "vault.test:8200", b"unseal").await;
    let head = denied.expect_err("the CONNECT refused");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(head.contains("x-trellis-failure: denied"), "{head}");

    // Proxies of both ages work together: this caller with the old callee (it agrees to the
    // bare stream, and no hello is sent)...
    let got = echo_through(caller.outbound, "legacy.test:6000", b"to old").await;
    assert_eq!(got.as_deref(), Ok(&b"to old"[..]));
    // ...and an old caller (it offers only the bare stream) with the new callee.
    let me = peer_credentials(&cp, "test", "client").await;
    let up_id = "spiffe://trellis.local/ns/test/sa/db-up".parse().unwrap();
    let alpn: &[&[u8]] = &[trellis_identity::tls::ALPN_TCP];
    let cfg = trellis_identity::tls::client_config(&me, vec![up_id], alpn).unwrap();
    let tcp = tokio::net::TcpStream::connect(up.inbound).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(trellis_identity::tls::inbound_server_name(5432), tcp)
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"from old").await.unwrap();
    let mut back = [0u8; 8];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"from old");

    // A connection for streams carries streams only: an ordinary request on it is refused
    // (400), not carried to the application, and the stream after it still works.
    let alpn: &[&[u8]] = &[b"trellis-tcp/h2"];
    let up_id = "spiffe://trellis.local/ns/test/sa/db-up".parse().unwrap();
    let cfg = trellis_identity::tls::client_config(&me, vec![up_id], alpn).unwrap();
    let tcp = tokio::net::TcpStream::connect(up.inbound).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(trellis_identity::tls::inbound_server_name(5432), tcp)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"trellis-tcp/h2"[..])
    );
    let mut send = h2_over(tls).await;
    let req = http::Request::get("http://db.test:5432/")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    let got = echo_through(caller.outbound, "db.test:5432", b"still").await;
    assert_eq!(got.as_deref(), Ok(&b"still"[..]));
}

/// A TCP application that answers each read with `name`, a colon and what it read.
async fn named_echo(name: &'static str) -> std::net::SocketAddr {
    upstream::tcp(move |mut s| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            let mut out = format!("{name}:").into_bytes();
            out.extend_from_slice(&buf[..n]);
            if s.write_all(&out).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// A callee's proxy drained (SIGTERM) while streams to it are open on the caller's
/// connection for streams: those streams go on until their clients close them, every new
/// stream reaches the other replica (none fails), and the proxy exits once its streams have
/// ended.
#[tokio::test]
async fn a_drained_callee_keeps_its_streams_and_new_ones_go_to_the_other_replica() {
    let apps = [named_echo("a").await, named_echo("b").await];
    let (_cp, mut a, _b, caller) = two_replicas("db", 5432, "TCP", apps).await;
    trellis_test_support::eventually("an answer from db", Duration::from_secs(15), async || {
        let v = echo_through(caller.outbound, "db.test:5432", b"up?").await;
        v.ok().filter(|v| v.len() >= 3)
    })
    .await;
    // Streams held open until at least two reached each replica.
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for i in 0..200 {
        if on_a.len() >= 2 && on_b.len() >= 2 {
            break;
        }
        let mut s = tunnel(caller.outbound, "db.test:5432").await;
        let msg = format!("open {i}");
        match ask(&mut s, &msg).await {
            r if r == format!("a:{msg}") => on_a.push(s),
            r if r == format!("b:{msg}") => on_b.push(s),
            r => panic!("unexpected answer {r:?}"),
        }
    }
    assert!(
        on_a.len() >= 2 && on_b.len() >= 2,
        "streams on both replicas"
    );

    a.signal("TERM");
    // The streams open to the draining replica go on...
    for (i, s) in on_a.iter_mut().enumerate() {
        let msg = format!("still {i}");
        assert_eq!(ask(s, &msg).await, format!("a:{msg}"));
    }
    // ...and every new stream reaches the other replica, none failing.
    for i in 0..30 {
        let mut s = tunnel(caller.outbound, "db.test:5432").await;
        let msg = format!("new {i}");
        assert_eq!(
            ask(&mut s, &msg).await,
            format!("b:{msg}"),
            "new stream {i}"
        );
    }
    // The draining proxy exits once its streams have ended.
    drop(on_a);
    assert_eq!(a.wait_exit(Duration::from_secs(20)).await, Some(0));
    drop(on_b);
}

/// A control plane, Service `svc` (port `port` of `protocol`) with two replicas `SVC-a` and
/// `SVC-b` whose applications are `apps`, each behind its joined proxy, and a joined caller
/// (`test/client`); all ready.
async fn two_replicas(
    svc: &str,
    port: u16,
    protocol: &str,
    apps: [std::net::SocketAddr; 2],
) -> (
    ControlProcess,
    trellis_test_support::ProxyProcess,
    trellis_test_support::ProxyProcess,
    trellis_test_support::ProxyProcess,
) {
    let cp = ControlProcess::start(BIN, &[]);
    let names = [format!("{svc}-a"), format!("{svc}-b")];
    let mesh = |inbound: [u16; 2]| {
        let wl = |name: &str, inbound: u16, app: std::net::SocketAddr| {
            format!("apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: test, labels: {{ app: {svc} }} }}\nspec:\n  address: 127.0.0.1\n  identity: {name}\n  inboundPort: {inbound}\n  ports: {{ {svc}: {} }}\n", app.port())
        };
        [
            format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: {svc}, namespace: test }}\nspec:\n  selector: {{ app: {svc} }}\n  ports: [{{ name: {svc}, port: {port}, targetPort: 1, protocol: {protocol} }}]\n"),
            wl(&names[0], inbound[0], apps[0]),
            wl(&names[1], inbound[1], apps[1]),
            "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: client, namespace: test }\nspec: { address: 127.0.0.1, identity: client }\n".to_string(),
        ]
        .join("---\n")
    };
    apply_ok(&cp, mesh([1, 1])).await;
    let a = join_reporting(&cp, &names[0], &format!("test/{}", names[0]));
    let b = join_reporting(&cp, &names[1], &format!("test/{}", names[1]));
    a.wait_ready().await;
    b.wait_ready().await;
    apply_ok(&cp, mesh([a.inbound.port(), b.inbound.port()])).await;
    let caller = join_reporting(&cp, "client", "test/client");
    caller.wait_ready().await;
    (cp, a, b, caller)
}

/// `msg` sent on `s` to a [`named_echo`]: its answer.
async fn ask(s: &mut tokio::net::TcpStream, msg: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(msg.as_bytes()).await.unwrap();
    let mut back = vec![0u8; msg.len() + 2];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    String::from_utf8_lossy(&back).into_owned()
}

/// A tunnel to `authority` through `proxy` (CONNECT), open.
async fn tunnel(proxy: std::net::SocketAddr, authority: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await.expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(buf.is_empty(), "bytes after the head: {buf:?}");
    s
}

/// `msg` sent on `s` and as many bytes read back.
async fn echo_on(s: &mut tokio::net::TcpStream, msg: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("an echo within 10 s")
        .unwrap();
    back
}

/// A callee's proxy older than the stream's hello: mutual TLS as `creds`, offering only
/// `trellis-tcp`, then the bare stream to `app`.
async fn old_callee(
    creds: trellis_identity::tls::TlsCredentials,
    app: std::net::SocketAddr,
) -> std::net::SocketAddr {
    let alpn: &[&[u8]] = &[trellis_identity::tls::ALPN_TCP];
    let cfg = trellis_identity::tls::server_config(&creds, alpn).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let accept = tokio_rustls::TlsAcceptor::from(cfg.clone()).accept(s);
            tokio::spawn(async move {
                let Ok(mut tls) = accept.await else { return };
                let Ok(mut up) = tokio::net::TcpStream::connect(app).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    addr
}

/// A callee's proxy older than HTTP/1.1 streams: it agrees to `h2` only (ALPN). An HTTP/1.1
/// client's request to its HTTP/1.1 service still reaches it, as HTTP/2 with the `Host` as
/// the authority, and goes on doing so (the caller asks for streams again only later).
#[tokio::test]
async fn a_callee_older_than_http1_streams_gets_requests_as_http2() {
    let cp = ControlProcess::start(BIN, &[]);
    let old = old_h2_callee(peer_credentials(&cp, "test", "web-old").await).await;
    let mesh = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{ name: web, namespace: test }}\nspec:\n  selector: {{ app: web }}\n  ports: [{{ name: http, port: 80, targetPort: 1, protocol: HTTP }}]\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: web-old, namespace: test, labels: {{ app: web }} }}\nspec:\n  address: 127.0.0.1\n  identity: web-old\n  inboundPort: {}\n  ports: {{ http: 1 }}\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: client, namespace: test }}\nspec: {{ address: 127.0.0.1, identity: client }}\n",
        old.port()
    );
    apply_ok(&cp, mesh).await;
    let caller = join_reporting(&cp, "client", "test/client");
    caller.wait_ready().await;
    let mut c = client::Conn::h1(caller.outbound).await;
    for i in 0..3 {
        let r = c.get("web.test", &format!("/old/{i}")).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            format!("HTTP/2.0 web.test /old/{i}")
        );
    }
}

/// A callee's proxy older than HTTP/1.1 streams: mutual TLS as `creds`, agreeing to `h2`
/// only, answering each request with its version, authority and path.
async fn old_h2_callee(creds: trellis_identity::tls::TlsCredentials) -> std::net::SocketAddr {
    let alpn: &[&[u8]] = &[b"h2"];
    let cfg = trellis_identity::tls::server_config(&creds, alpn).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let accept = tokio_rustls::TlsAcceptor::from(cfg.clone()).accept(s);
            tokio::spawn(async move {
                let Ok(tls) = accept.await else { return };
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let said = format!(
                            "{:?} {} {}",
                            req.version(),
                            req.uri().authority().map_or("-", |a| a.as_str()),
                            req.uri().path()
                        );
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(said)),
                        ))
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
            });
        }
    });
    addr
}

/// A callee's proxy drained (SIGTERM) under a steady load of HTTP/1.1 requests that ride
/// streams of the caller's one connection to it: no request fails, the other replica takes
/// the new ones, and the drained proxy exits 0. This is the whole under load; the
/// mechanisms it rests on (the callee's GOAWAY answered before it closes, a stream's reset
/// read after its bytes) are shown one by one in `mux`'s unit tests, and the races they
/// close are too narrow for this test to hit every run.
#[tokio::test]
async fn a_drained_callee_fails_no_http_request_on_its_streams() {
    let app = |name: &'static str| {
        upstream::http(move |_| async move {
            // Slow enough that requests are in flight when the drain begins.
            tokio::time::sleep(Duration::from_millis(20)).await;
            http::Response::new(http_body_util::Full::new(bytes::Bytes::from(name)))
        })
    };
    let apps = [app("a").await, app("b").await];
    let (_cp, mut a, b, caller) = two_replicas("web", 80, "HTTP", apps).await;
    // Eight clients, each on its own kept-alive connection, until told to stop; each
    // request's outcome kept (status, body).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outcomes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, outcomes, to) = (stop.clone(), outcomes.clone(), caller.outbound);
        clients.push(tokio::spawn(async move {
            let mut c = client::Conn::h1(to).await;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let got = match c.get("web.test", "/").await {
                    Ok(r) => (
                        r.status.as_u16(),
                        String::from_utf8_lossy(&r.body).into_owned(),
                    ),
                    Err(e) => (0, e.to_string()),
                };
                outcomes.lock().unwrap().push(got);
            }
        }));
    }
    let count = |of: &str| {
        outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|(st, body)| *st == 200 && body == of)
            .count()
    };
    trellis_test_support::eventually(
        "both replicas answer",
        Duration::from_secs(15),
        async || (count("a") >= 20 && count("b") >= 20).then_some(()),
    )
    .await;
    // The eight clients' first requests came at once, with no connection to either replica
    // yet: one was made to each, the others waited for it.
    for p in [&a, &b] {
        let connects = connects_made(&caller, p).await;
        assert_eq!(connects, 1.0, "connections made to {}", p.inbound);
    }
    a.signal("TERM");
    assert_eq!(
        a.wait_exit(Duration::from_secs(20)).await,
        Some(0),
        "the drained proxy exits 0"
    );
    // Requests go on after the exit: all to the other replica.
    let after_exit = outcomes.lock().unwrap().len();
    trellis_test_support::eventually(
        "requests after the exit",
        Duration::from_secs(15),
        async || (outcomes.lock().unwrap().len() >= after_exit + 50).then_some(()),
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let all = outcomes.lock().unwrap().clone();
    let failed: Vec<_> = all.iter().filter(|(st, _)| *st != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        all.len()
    );
    assert!(
        all[after_exit..].iter().all(|(_, body)| body == "b"),
        "after the exit only the other replica answers"
    );
}
