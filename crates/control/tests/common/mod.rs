//! A control plane started in this test process (embedded store, ephemeral loopback ports),
//! and calls to its API as a user makes them.

use std::path::PathBuf;

use trellis_control::{Control, Options};

pub(crate) struct InProcess {
    pub(crate) control: Control,
    dir: PathBuf,
    token: String,
}

impl InProcess {
    /// Start on a fresh data dir named after `test`.
    #[allow(dead_code)]
    pub(crate) async fn start(test: &str) -> Self {
        Self::start_on(test, "embedded").await
    }

    /// Start on a fresh data dir named after `test`, on `store` (`embedded`, or an etcd
    /// URL). A replica that joins a store where another made the admin token has none of
    /// its own: give it that one ([`InProcess::with_token_of`]).
    pub(crate) async fn start_on(test: &str, store: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("trellis-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let control = Control::start(Options {
            data_dir: dir.clone(),
            api: "127.0.0.1:0".parse().unwrap(),
            xds: "127.0.0.1:0".parse().unwrap(),
            store: store.into(),
            max_body_bytes: 4 << 20,
            trust_domain: "trellis.local".into(),
            svid_ttl: std::time::Duration::from_secs(3600),
            ca_files: None,
            telemetry: Default::default(),
            advertise: None,
        })
        .await
        .unwrap();
        let token = std::fs::read_to_string(dir.join("admin.token"))
            .unwrap_or_default()
            .trim()
            .to_string();
        Self {
            control,
            dir,
            token,
        }
    }

    /// The admin token.
    #[allow(dead_code)]
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// This replica, calling the API with `other`'s admin token.
    #[allow(dead_code)]
    pub(crate) fn with_token_of(mut self, other: &InProcess) -> Self {
        self.token.clone_from(&other.token);
        self
    }

    /// `POST path` with `body` (JSON) and, if given, `bearer` instead of the admin token:
    /// the status and the JSON answer.
    #[allow(dead_code)]
    pub(crate) async fn post_as(
        &self,
        path: &str,
        body: &serde_json::Value,
        bearer: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut req = http::Request::post(path).header("host", "cp");
        if let Some(b) = bearer {
            req = req.header("authorization", format!("Bearer {b}"));
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap();
        let r = trellis_test_support::client::send1(self.control.api_addr, req)
            .await
            .unwrap();
        let v = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
        (r.status.as_u16(), v)
    }

    /// One API call with the admin token; it must succeed. Its JSON answer.
    pub(crate) async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: &str,
    ) -> serde_json::Value {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "cp")
            .header("authorization", format!("Bearer {}", self.token))
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap();
        let r = trellis_test_support::client::send1(self.control.api_addr, req)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null)
    }

    /// `http://` URL of the xDS server.
    pub(crate) fn xds_url(&self) -> String {
        format!("http://{}", self.control.xds_addr)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
