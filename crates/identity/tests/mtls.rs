//! mTLS between two mesh identities over loopback TCP, with the rustls configurations the
//! proxies use: who may talk to whom, and what each side learns about the other.

use std::{sync::Arc, time::Duration};

use rcgen::{CertificateParams, KeyPair};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_identity::{
    tls::{client_config, mesh_server_name, peer_id, server_config, TlsCredentials},
    Ca, SpiffeId,
};

fn id(ns: &str, name: &str) -> SpiffeId {
    SpiffeId::new("trellis.local", ns, name).unwrap()
}

/// Key and certificate for `who` from `ca`, valid from `from` to `to` (seconds from now),
/// trusting `bundle`.
fn creds_between(ca: &Ca, who: &SpiffeId, bundle: &str, from: i64, to: i64) -> TlsCredentials {
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let svid = ca
        .sign_between(
            &csr,
            who,
            now + time::Duration::seconds(from),
            now + time::Duration::seconds(to),
        )
        .unwrap();
    TlsCredentials::from_pem(&svid.chain_pem, &key.serialize_pem(), bundle).unwrap()
}

/// Key and certificate for `who` from `ca`, as a proxy holds them.
fn creds(ca: &Ca, who: &SpiffeId) -> TlsCredentials {
    creds_between(ca, who, ca.trust_bundle(), -60, 600)
}

/// One connection: the server's view of the caller, or the failure on either side.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Result<(Option<SpiffeId>, Option<Vec<u8>>), String> {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(server)
            .accept(s)
            .await
            .map_err(|e| format!("server: {e}"))?;
        let caller = peer_id(tls.get_ref().1.peer_certificates().unwrap_or_default());
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .await
            .map_err(|e| format!("server read: {e}"))?;
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.ok();
        Ok::<_, String>(caller)
    });
    let s = TcpStream::connect(addr).await.unwrap();
    let client_side = async {
        let mut tls = TlsConnector::from(client)
            .connect(mesh_server_name(), s)
            .await
            .map_err(|e| format!("client: {e}"))?;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        tls.write_all(b"ping")
            .await
            .map_err(|e| format!("client write: {e}"))?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .await
            .map_err(|e| format!("client read: {e}"))?;
        assert_eq!(&buf, b"pong");
        Ok::<_, String>(alpn)
    };
    let c = client_side.await;
    let s = srv.await.unwrap();
    // In TLS 1.3 the client finishes before the server has checked its certificate, so a
    // refusal by the server shows at the client only as an alert: report both sides.
    match (c, s) {
        (Ok(alpn), Ok(caller)) => Ok((caller, alpn)),
        (c, s) => Err(format!(
            "{} | {}",
            c.err().unwrap_or_default(),
            s.err().unwrap_or_default()
        )),
    }
}

#[tokio::test]
async fn peers_authenticate_each_other_by_spiffe_id() {
    let ca = Ca::generate("trellis.local", Duration::from_secs(3600)).unwrap();
    let (frontend, catalog) = (id("shop", "frontend"), id("shop", "catalog"));
    let (fe, cat) = (creds(&ca, &frontend), creds(&ca, &catalog));
    let h2: &[&[u8]] = &[b"h2", b"http/1.1"];
    let server = server_config(&cat, h2).unwrap();

    // The caller expects catalog and gets it; the callee learns the caller is frontend; ALPN
    // is negotiated.
    let ok = client_config(&fe, vec![catalog.clone()], h2).unwrap();
    let (caller, alpn) = handshake(server.clone(), ok).await.unwrap();
    assert_eq!(caller, Some(frontend.clone()));
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));

    // The caller expected another identity: refused by the caller, naming both.
    let wrong = client_config(&fe, vec![id("shop", "payments")], h2).unwrap();
    let e = handshake(server.clone(), wrong).await.unwrap_err();
    assert!(
        e.contains("client: invalid peer certificate")
            && e.contains("peer is spiffe://trellis.local/ns/shop/sa/catalog")
            && e.contains("payments"),
        "{e}"
    );

    // A caller whose certificate comes from another CA (another mesh, the same trust-domain
    // name): refused by the callee.
    let other = Ca::generate("trellis.local", Duration::from_secs(3600)).unwrap();
    let stranger = creds_between(&other, &frontend, ca.trust_bundle(), -60, 600);
    let c = client_config(&stranger, vec![catalog.clone()], h2).unwrap();
    let e = handshake(server.clone(), c).await.unwrap_err();
    assert!(
        e.contains("server: invalid peer certificate"),
        "refused by the callee: {e}"
    );

    // A server from another CA: refused by the caller, whatever identity it claims.
    let fake_catalog = creds_between(&other, &catalog, ca.trust_bundle(), -60, 600);
    let fake_server = server_config(&fake_catalog, h2).unwrap();
    let c = client_config(&fe, vec![catalog.clone()], h2).unwrap();
    let e = handshake(fake_server, c).await.unwrap_err();
    assert!(
        e.contains("client: invalid peer certificate"),
        "refused by the caller: {e}"
    );

    // Expired certificates, on either side.
    let old_fe = creds_between(&ca, &frontend, ca.trust_bundle(), -7200, -3600);
    let c = client_config(&old_fe, vec![catalog.clone()], h2).unwrap();
    let e = handshake(server.clone(), c).await.unwrap_err();
    assert!(
        e.contains("server: invalid peer certificate: certificate expired"),
        "{e}"
    );
    let old_cat = creds_between(&ca, &catalog, ca.trust_bundle(), -7200, -3600);
    let c = client_config(&fe, vec![catalog.clone()], h2).unwrap();
    let e = handshake(server_config(&old_cat, h2).unwrap(), c)
        .await
        .unwrap_err();
    assert!(
        e.contains("client: invalid peer certificate: certificate expired"),
        "{e}"
    );

    // Another trust domain is another CA's: refused like any stranger.
    let td = Ca::generate("other.example", Duration::from_secs(3600)).unwrap();
    let foreign = creds_between(
        &td,
        &SpiffeId::new("other.example", "shop", "frontend").unwrap(),
        ca.trust_bundle(),
        -60,
        600,
    );
    let c = client_config(&foreign, vec![catalog.clone()], h2).unwrap();
    let e = handshake(server.clone(), c).await.unwrap_err();
    assert!(e.contains("server: invalid peer certificate"), "{e}");
}

#[tokio::test]
async fn plaintext_to_an_mtls_listener_is_refused() {
    let ca = Ca::generate("trellis.local", Duration::from_secs(3600)).unwrap();
    let server = server_config(&creds(&ca, &id("shop", "catalog")), &[b"h2"]).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        TlsAcceptor::from(server).accept(s).await.map(|_| ())
    });
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: catalog.shop\r\n\r\n")
        .await
        .unwrap();
    let e = srv.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
}
