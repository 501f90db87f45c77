//! A control plane started in this test process (embedded store, ephemeral loopback ports),
//! and calls to its API as a user makes them.

use std::path::PathBuf;

use trellis_control::{Control, Options};
use trellis_xds::envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
};

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
        self.send(http::Method::POST, path, body.to_string(), bearer)
            .await
    }

    /// One API call with the admin token; it must succeed. Its JSON answer.
    pub(crate) async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: &str,
    ) -> serde_json::Value {
        let (status, v) = self
            .send(method, path, body.to_string(), Some(&self.token))
            .await;
        assert_eq!(status, 200, "{v}");
        v
    }

    /// One API call with `bearer` (or none): the status and the JSON answer (`null` if the
    /// body is not JSON).
    async fn send(
        &self,
        method: http::Method,
        path: &str,
        body: String,
        bearer: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "cp");
        if let Some(b) = bearer {
            req = req.header("authorization", format!("Bearer {b}"));
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let r = trellis_test_support::client::send1(self.control.api_addr, req)
            .await
            .unwrap();
        let v = serde_json::from_slice(&r.body)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&r.body).into()));
        (r.status.as_u16(), v)
    }

    /// A delta ADS stream to this control plane, opened with `first`: the sender of the
    /// stream's next requests and its responses.
    #[allow(dead_code)]
    pub(crate) async fn delta_stream(
        &self,
        first: DeltaDiscoveryRequest,
    ) -> Result<
        (
            tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
            tonic::Streaming<DeltaDiscoveryResponse>,
        ),
        tonic::Status,
    > {
        let mut c = AggregatedDiscoveryServiceClient::connect(self.xds_url())
            .await
            .unwrap()
            .max_encoding_message_size(64 << 20);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(first).await.unwrap();
        let stream = c
            .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok((tx, stream))
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
