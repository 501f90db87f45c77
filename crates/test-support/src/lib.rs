//! Test support: run the real `trellis` binary on ephemeral loopback ports, fake upstreams
//! that misbehave on purpose, and bounded polling instead of sleeps.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub mod browser;
pub mod client;
pub mod control;
pub mod ecdsa;
pub mod etcd;
pub mod netbed;
pub mod podman;
pub mod upstream;
pub mod vm;

/// Poll `f` until it returns `Some`, or panic with `what` after `timeout`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Like [`eventually`], but `f` says what is still missing (`Err`), and the last of those
/// reasons is in the panic: a wait on several conditions then names the one that never held.
pub async fn eventually_explained<T>(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(why) => assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for: {what}; last seen: {why}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `trellis proxy` child process. Killed on drop.
pub struct ProxyProcess {
    child: Option<Child>,
    /// Config file (rewrite it to trigger a reload).
    pub config: PathBuf,
    /// Admin address.
    pub admin: SocketAddr,
    /// Outbound listener.
    pub outbound: SocketAddr,
    /// Inbound listener.
    pub inbound: SocketAddr,
    /// `service:port` → bound address of explicit-mode upstreams.
    pub upstreams: Vec<(String, SocketAddr)>,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Paths removed once the proxy has stopped (its state dir).
    owned: Vec<Temp>,
}

/// Collect `child`'s stderr lines (JSON logs) in the background, and wait for the log line
/// whose `message` is `message`. Kills the child and panics with its stderr when none comes.
pub(crate) fn wait_for_log(
    child: &mut Child,
    message: &'static str,
    timeout: Duration,
) -> (Arc<Mutex<Vec<String>>>, serde_json::Value) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["message"] == message {
                    let _ = tx.send(v);
                }
            }
            l.lock().unwrap().push(line);
        }
    });
    let Ok(v) = rx.recv_timeout(timeout) else {
        let _ = child.kill();
        panic!("no {message:?} log line: {:?}", lines.lock().unwrap());
    };
    (lines, v)
}

/// A fresh temporary path (nothing is created there).
pub fn temp_path(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // The time too: process ids are reused, and a path left behind by an earlier run with
    // the same id (a proxy's state dir, with a certificate from another CA) would be taken
    // for this one's.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    std::env::temp_dir().join(format!(
        "trellis-test-{}-{t}-{n}-{name}",
        std::process::id()
    ))
}

/// Write `text` to a fresh temporary file, removed when the returned guard drops (also
/// when a test fails).
pub fn write_temp(name: &str, text: &str) -> Temp {
    let p = temp_path(name);
    std::fs::write(&p, text).expect("write temp file");
    Temp(p)
}

/// Where `tool` is on the PATH; panics naming the Debian package to install when it is not.
pub fn need(tool: &str, package: &str) -> PathBuf {
    let out = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output();
    let path = out
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match path {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "this test needs {tool} (Debian: apt-get install {package}); .ci/run installs it"
        ),
    }
}

/// A directory for the logs of the processes a test starts: removed on drop, and when the
/// test fails, the last lines of each file are printed first.
#[derive(Debug)]
pub struct Logs(pub Temp);

impl Logs {
    /// A fresh log directory.
    pub fn new(name: &str) -> Self {
        Self(Temp::dir(name))
    }

    /// The path of log `name` in it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// What log `name` holds so far.
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for e in std::fs::read_dir(&self.0 .0)
            .into_iter()
            .flatten()
            .flatten()
        {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("==== {} (last lines)", e.path().display());
            for l in &lines[lines.len().saturating_sub(200)..] {
                eprintln!("{l}");
            }
        }
    }
}

/// A temporary file or directory, removed on drop.
#[derive(Debug)]
pub struct Temp(pub PathBuf);

impl Temp {
    /// A fresh path, nothing created there yet (a proxy's `--state-dir`, say): whatever is
    /// made there is removed on drop.
    pub fn path(name: &str) -> Self {
        Self(temp_path(name))
    }

    /// A fresh directory.
    pub fn dir(name: &str) -> Self {
        let p = temp_path(name);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
}

impl std::ops::Deref for Temp {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for Temp {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Temp {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

impl ProxyProcess {
    /// Start `bin proxy` with `config` and `args`, on ephemeral ports, and wait for it to
    /// report its addresses.
    pub fn start(bin: &str, config: &str, args: &[&str]) -> Self {
        // Removed by the process handle's drop, which may rewrite it meanwhile.
        let path = temp_path("config.yaml");
        std::fs::write(&path, config).expect("write temp file");
        let head = vec!["--config".to_string(), path.display().to_string()];
        Self::launch(bin, head, path, args, &[])
    }

    /// As [`Self::start`], with these environment variables set for the process.
    pub fn start_with_env(bin: &str, config: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let path = temp_path("config.yaml");
        std::fs::write(&path, config).expect("write temp file");
        let head = vec!["--config".to_string(), path.display().to_string()];
        Self::launch(bin, head, path, args, env)
    }

    /// Start `bin proxy` fed by the control planes at `xds` (URLs), serving `workload`.
    /// Returns once it listens; it may not have its config yet (see [`Self::wait_ready`]).
    pub fn start_xds(bin: &str, xds: &[String], workload: &str, args: &[&str]) -> Self {
        let head = vec![
            "--xds".to_string(),
            xds.join(","),
            "--workload".to_string(),
            workload.to_string(),
        ];
        Self::launch(bin, head, PathBuf::new(), args, &[])
    }

    /// Wait until `/ready` answers 200 (for xDS: the first config is applied).
    pub async fn wait_ready(&self) {
        eventually("proxy ready", Duration::from_secs(20), async || {
            let (st, _) = client::get(self.admin, "admin", "/ready", &[]).await.ok()?;
            (st == 200).then_some(())
        })
        .await
    }

    fn launch(
        bin: &str,
        head: Vec<String>,
        path: PathBuf,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut child = Command::new(bin)
            .envs(env.iter().copied())
            .arg("proxy")
            .args(&head)
            .args([
                "--admin",
                "127.0.0.1:0",
                "--outbound",
                "127.0.0.1:0",
                "--inbound",
                "127.0.0.1:0",
                "--watch-interval",
                "50ms",
            ])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn trellis");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let l = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    l.lock().unwrap().push(v);
                }
            }
        });
        let (stderr_lines, v) = wait_for_log(&mut child, "listening", Duration::from_secs(20));
        let addr = |k: &str| v[k].as_str().unwrap().parse().unwrap();
        let upstreams = v["upstreams"]
            .as_str()
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                let (k, a) = s.split_once('=').unwrap();
                (k.to_string(), a.parse().unwrap())
            })
            .collect();
        Self {
            child: Some(child),
            config: path,
            admin: addr("admin"),
            outbound: addr("outbound"),
            inbound: addr("inbound"),
            upstreams,
            logs,
            stderr: stderr_lines,
            owned: Vec::new(),
        }
    }

    /// Remove `path` (the proxy's state dir, say) when this handle drops, after the proxy
    /// has stopped: also when the test fails.
    pub fn owning(mut self, path: Temp) -> Self {
        self.owned.push(path);
        self
    }

    /// The bound address of the explicit-mode upstream `service:port`.
    pub fn upstream(&self, key: &str) -> SocketAddr {
        self.upstreams
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("no upstream {key}"))
            .1
    }

    /// Access-log lines so far.
    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.logs.lock().unwrap().clone()
    }

    /// Stderr lines so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Wait for an access-log line that satisfies `pred`.
    pub async fn wait_log(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        eventually(what, Duration::from_secs(10), async || {
            self.logs().into_iter().find(|l| pred(l))
        })
        .await
    }

    /// Scrape `/metrics`.
    pub async fn metrics(&self) -> String {
        let (_, body) = client::get(self.admin, "admin", "/metrics", &[])
            .await
            .expect("scrape metrics");
        String::from_utf8_lossy(&body).into_owned()
    }

    /// Sum of the samples of `name` whose labels contain every `key="value"` in `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum_metric(&self.metrics().await, name, labels)
    }

    /// Send a signal.
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let ok = Command::new("kill")
            .args(["-s", sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {sig} {pid}");
    }

    /// Wait for the process to exit; its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut().unwrap();
        eventually("proxy exit", timeout, async || {
            child.try_wait().unwrap().map(|s| s.code())
        })
        .await
    }

    /// Rewrite the config file (the proxy picks it up by itself).
    pub fn rewrite_config(&self, text: &str) {
        // Write then rename, as editors and config managers do, so the proxy never reads a
        // half-written file.
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        // A failing test shows what the proxy said, which is usually the lead.
        if std::thread::panicking() {
            for l in self.stderr() {
                eprintln!("proxy stderr: {l}");
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Sum matching samples in a Prometheus text exposition.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Resident memory of process `pid` in KiB (`VmRSS`), or 0 when it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
