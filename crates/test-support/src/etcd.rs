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

/// A real etcd cluster of several members on loopback ports; members are killed, and their
/// data removed, on drop.
pub struct EtcdCluster {
    members: Vec<Option<Etcd>>,
}

impl EtcdCluster {
    /// Start `n` members as one cluster and wait until each accepts connections and the
    /// cluster has a leader (a member answers `/health` with `"health":"true"`).
    pub async fn start(n: usize) -> Self {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let peer = |p: u16| format!("http://127.0.0.1:{p}");
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}={}", peer(*p)))
            .collect();
        let initial = initial.join(",");
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, (client, p))| {
                let dir = crate::temp_path(&format!("etcd-m{i}"));
                let c = format!("http://127.0.0.1:{client}");
                let child = Command::new("etcd")
                    .args(["--name", &format!("m{i}"), "--data-dir"])
                    .arg(&dir)
                    .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
                    .args(["--listen-peer-urls", &peer(*p)])
                    .args(["--initial-advertise-peer-urls", &peer(*p)])
                    .args(["--initial-cluster", &initial])
                    .args(["--initial-cluster-state", "new"])
                    .args(["--log-level", "error"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("cannot run `etcd`: install Debian's etcd-server (.ci/run does)");
                let addr: SocketAddr = ([127, 0, 0, 1], *client).into();
                Some(Etcd { child, dir, addr })
            })
            .collect();
        let cluster = Self { members };
        for m in cluster.members.iter().flatten() {
            let addr = m.addr;
            crate::eventually(
                "etcd member healthy (the cluster has a leader)",
                Duration::from_secs(30),
                async || {
                    tokio::net::TcpStream::connect(addr).await.ok()?;
                    let (st, body) = crate::client::get(addr, "etcd", "/health", &[])
                        .await
                        .ok()?;
                    (st == 200 && String::from_utf8_lossy(&body).contains("\"true\"")).then_some(())
                },
            )
            .await;
        }
        cluster
    }

    /// The `--store` URL for `trellis control`: every member still running.
    pub fn url(&self) -> String {
        let addrs: Vec<String> = self
            .members
            .iter()
            .flatten()
            .map(|m| m.addr.to_string())
            .collect();
        format!("etcd://{}", addrs.join(","))
    }

    /// Member `i`'s client address.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.members[i].as_ref().expect("running").addr
    }

    /// Kill member `i` (SIGKILL) and remove its data.
    pub fn kill(&mut self, i: usize) {
        drop(self.members[i].take());
    }
}
