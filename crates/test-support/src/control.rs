//! A `trellis control` child process on ephemeral loopback ports. Killed, and its data dir
//! removed, on drop.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;

/// A running control plane.
pub struct ControlProcess {
    child: Option<Child>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// API address.
    pub api: SocketAddr,
    /// xDS address.
    pub xds: SocketAddr,
    /// Admin token: this data dir's; empty when another replica on the same store created
    /// the mesh's token (set it to that one).
    pub token: String,
    /// `sha256:HEX` of the mesh's signing root, from the ready line.
    pub ca_hash: String,
    stderr: Arc<Mutex<Vec<String>>>,
    keep_dir: bool,
}

impl ControlProcess {
    /// Start with a fresh data dir and the embedded store, listening on a random
    /// `127.0.0.X` (X from 2 to 254; the same for both listeners): a test that stops it and
    /// starts it again on the same ports finds them free, as no other test's connection
    /// takes an ephemeral port there (theirs are on 127.0.0.1).
    pub fn start(bin: &str, args: &[&str]) -> Self {
        let any = format!("{}:0", crate::upstream::spare_ip());
        Self::start_in(bin, crate::temp_path("control"), args, &any, &any)
    }

    /// Start on `data_dir` (kept when this handle drops, so that a restart finds it), binding
    /// the given API and xDS addresses.
    pub fn start_in(bin: &str, data_dir: PathBuf, args: &[&str], api: &str, xds: &str) -> Self {
        let mut child = Command::new(bin)
            .arg("control")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--api", api, "--xds", xds])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn trellis control");
        let (lines, v) =
            crate::wait_for_log(&mut child, "control plane ready", Duration::from_secs(30));
        let addr = |k: &str| v[k].as_str().unwrap().parse().unwrap();
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .unwrap_or_default()
            .trim()
            .to_string();
        Self {
            child: Some(child),
            api: addr("api"),
            xds: addr("xds"),
            data_dir,
            token,
            ca_hash: v["ca_hash"].as_str().unwrap_or_default().to_string(),
            stderr: lines,
            keep_dir: false,
        }
    }

    /// The xDS URL.
    pub fn xds_url(&self) -> String {
        format!("http://{}", self.xds)
    }

    /// The API URL.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Stderr lines so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Kill the process (SIGKILL), keeping the data dir for a restart.
    pub fn kill(&mut self) -> PathBuf {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.keep_dir = true;
        self.data_dir.clone()
    }

    /// One API call with the admin token (or `token`), body as YAML; status and JSON.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: &str,
        token: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "control");
        if let Some(t) = token.or(Some(&self.token)).filter(|t| !t.is_empty()) {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let r = crate::client::send1(self.api, req).await.expect("api call");
        let v = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
        (r.status.as_u16(), v)
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}
