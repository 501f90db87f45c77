//! A real etcd (Debian's `etcd-server`) on loopback ports, for the store's conformance suite
//! and the control plane's high-availability tests. Killed, and its data removed, on drop.

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

/// A running etcd.
pub struct Etcd {
    child: Child,
    dir: PathBuf,
    /// Client address (`127.0.0.1:PORT`).
    pub addr: SocketAddr,
}

fn free_port() -> u16 {
    // The port is free when this returns; etcd binds it a moment later. A clash fails the
    // start loudly rather than silently.
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("ephemeral port")
}

impl Etcd {
    /// Start etcd and wait until it accepts connections. Panics with the reason when the
    /// `etcd` binary is missing (`.ci/run` installs it).
    pub async fn start() -> Self {
        let dir = crate::temp_path("etcd");
        let (client, peer) = (free_port(), free_port());
        let c = format!("http://127.0.0.1:{client}");
        let p = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(&dir)
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args([
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args(["--initial-cluster", &format!("t={p}")])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run `etcd`: install Debian's etcd-server (.ci/run does)");
        let addr: SocketAddr = ([127, 0, 0, 1], client).into();
        let etcd = Self { child, dir, addr };
        crate::eventually(
            "etcd accepting connections",
            Duration::from_secs(20),
            async || tokio::net::TcpStream::connect(addr).await.ok(),
        )
        .await;
        etcd
    }

    /// The `--store` URL for `trellis control`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.addr)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
