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
    pub(crate) async fn start(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("trellis-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let control = Control::start(Options {
            data_dir: dir.clone(),
            api: "127.0.0.1:0".parse().unwrap(),
            xds: "127.0.0.1:0".parse().unwrap(),
            store: "embedded".into(),
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
            .unwrap()
            .trim()
            .to_string();
        Self {
            control,
            dir,
            token,
        }
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
