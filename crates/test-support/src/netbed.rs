//! A private network on this machine for tests that need real hosts: network namespaces as
//! hosts on one bridge, each with its own address, and nothing routed beyond the bridge (no
//! default route, no forwarding, no NAT). Everything it makes — namespaces, the bridge, the
//! processes started in them — goes when the [`NetBed`] drops, also when a test fails; a bed a
//! killed test left behind is removed by the next one.
//!
//! Needs root. The address plan follows ../shared/notes/testbed-facts.md: the bridge is
//! `10.78.N.1/24` (N differs per bed in one run), hosts `.2` up; every host routes the
//! service virtual IP range `10.96.0.0/16` onto the bridge, so that captured connections to
//! a virtual IP reach the capture rules.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU8, Ordering},
};

/// A bridge and its namespaces.
pub struct NetBed {
    prefix: String,
    bridge: String,
    subnet: u8,
    hosts: Vec<String>,
    /// Links on the bridge (host veths and VM taps), deleted explicitly: a namespace that a
    /// closing socket still pins would otherwise keep its veth pair for minutes.
    taps: Vec<String>,
    children: Vec<Child>,
}

/// Whether this process may make namespaces (root).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Run a command that must succeed; its stderr in the panic otherwise.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Remove beds whose test process is gone (namespaces `tb<PID>-…`, bridges `tb<PID>…`).
fn sweep_orphans() {
    let alive = |pid: &str| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let pid_of = |name: &str| -> Option<String> {
        let rest = name.strip_prefix("tb")?;
        Some(rest.chars().take_while(char::is_ascii_digit).collect())
    };
    let netns = Command::new("ip").args(["netns", "list"]).output();
    for line in netns
        .map(|o| o.stdout)
        .unwrap_or_default()
        .split(|b| *b == b'\n')
    {
        let line = String::from_utf8_lossy(line);
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if pid_of(name).is_some_and(|p| !p.is_empty() && !alive(&p)) {
            quiet(&["ip", "netns", "pids", name]);
            kill_in(name);
            quiet(&["ip", "netns", "del", name]);
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(name));
        }
    }
    let links = Command::new("ip")
        .args(["-o", "link", "show", "type", "bridge"])
        .output();
    for line in links
        .map(|o| o.stdout)
        .unwrap_or_default()
        .split(|b| *b == b'\n')
    {
        let line = String::from_utf8_lossy(line);
        let Some(name) = line.split(": ").nth(1).map(|n| n.trim().to_string()) else {
            continue;
        };
        if pid_of(&name).is_some_and(|p| !p.is_empty() && !alive(&p)) {
            quiet(&["ip", "link", "del", &name]);
        }
    }
}

/// Kill every process left in namespace `ns`.
fn kill_in(ns: &str) {
    let out = Command::new("ip").args(["netns", "pids", ns]).output();
    let pids = out.map(|o| o.stdout).unwrap_or_default();
    for pid in String::from_utf8_lossy(&pids).split_whitespace() {
        quiet(&["kill", "-9", pid]);
    }
}

impl NetBed {
    /// A new bed; `None` when not root.
    pub fn new() -> Option<Self> {
        if !is_root() {
            return None;
        }
        static N: AtomicU8 = AtomicU8::new(0);
        sweep_orphans();
        let pid = std::process::id();
        let n = N.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("tb{pid}{}", (b'a' + n) as char);
        // Interface names are at most 15 bytes.
        let bridge = prefix.clone();
        assert!(bridge.len() <= 15, "{bridge}");
        let subnet = 100 + (pid % 100) as u8 + n;
        let bed = Self {
            prefix,
            bridge,
            subnet,
            hosts: Vec::new(),
            taps: Vec::new(),
            children: Vec::new(),
        };
        sh(&["ip", "link", "add", &bed.bridge, "type", "bridge"]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", bed.gateway()),
            "dev",
            &bed.bridge,
        ]);
        // Dual stack, as most hosts are: a unique local IPv6 prefix beside the IPv4 one
        // (`nodad`: usable at once, no duplicate address detection to wait for).
        let gw6 = format!("{}/64", bed.addr6(1));
        sh(&["ip", "addr", "add", &gw6, "dev", &bed.bridge, "nodad"]);
        sh(&["ip", "link", "set", &bed.bridge, "up"]);
        Some(bed)
    }

    /// The bridge's interface name (for a container network on it).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The bridge's own address (the root namespace's, on this network).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 78, self.subnet, 1)
    }

    /// Add host number `n` (2..=254): a namespace with `eth0` at `10.78.S.n` and
    /// `fd78:0:0:S::n`. Returns its
    /// namespace name.
    pub fn host(&mut self, n: u8) -> String {
        let ns = format!("{}-h{n}", self.prefix);
        let veth = format!("{}v{n}", self.prefix);
        sh(&["ip", "netns", "add", &ns]);
        self.hosts.push(ns.clone());
        sh(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        self.taps.push(veth.clone());
        sh(&["ip", "link", "set", &veth, "master", &self.bridge, "up"]);
        let addr = format!("{}/24", self.addr(n));
        sh(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
        let addr6 = format!("{}/64", self.addr6(n));
        sh(&[
            "ip", "-n", &ns, "addr", "add", &addr6, "dev", "eth0", "nodad",
        ]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "10.96.0.0/16",
            "dev",
            "eth0",
        ]);
        // The host's resolver is the gateway (a routable address, as on a real host; nothing
        // answers there unless a test starts something). `ip netns exec` mounts this file
        // over /etc/resolv.conf.
        let etc = PathBuf::from("/etc/netns").join(&ns);
        std::fs::create_dir_all(&etc).expect("create /etc/netns/NS");
        let resolv = format!("nameserver {}\n", self.gateway());
        std::fs::write(etc.join("resolv.conf"), resolv).expect("write resolv.conf");
        ns
    }

    /// A tap device on the bridge, for a VM that will be host `n`; returns its name.
    pub fn tap(&mut self, n: u8) -> String {
        let tap = format!("{}t{n}", self.prefix);
        sh(&["ip", "tuntap", "add", "dev", &tap, "mode", "tap"]);
        self.taps.push(tap.clone());
        sh(&["ip", "link", "set", &tap, "master", &self.bridge, "up"]);
        tap
    }

    /// Host `n`'s address.
    pub fn addr(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 78, self.subnet, n)
    }

    /// Host `n`'s IPv6 address, `fd78:0:0:S::n` (1 is the bridge's).
    pub fn addr6(&self, n: u8) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::new(0xfd78, 0, 0, self.subnet.into(), 0, 0, 0, n.into())
    }

    /// A command that runs `args` inside namespace `ns`.
    pub fn cmd(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).args(args);
        c
    }

    /// Run `args` in `ns`: (success, stdout, stderr).
    pub fn run(&self, ns: &str, args: &[&str]) -> (bool, String, String) {
        let out = self.cmd(ns, args).output().expect("ip netns exec");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Start `c` (made by [`NetBed::cmd`]) with stdout and stderr going to `log`; it is
    /// killed when the bed drops. Returns its index for [`NetBed::signal`].
    pub fn spawn(&mut self, mut c: Command, log: &PathBuf) -> usize {
        let f = std::fs::File::create(log).expect("log file");
        let child = c
            .stdout(f.try_clone().expect("log file"))
            .stderr(f)
            .spawn()
            .expect("spawn in namespace");
        self.children.push(child);
        self.children.len() - 1
    }

    /// Send `sig` (`-TERM`, `-KILL`) to process `i`.
    pub fn signal(&self, i: usize, sig: &str) {
        quiet(&["kill", sig, &self.children[i].id().to_string()]);
    }

    /// Whether process `i` has exited (without waiting).
    pub fn exited(&mut self, i: usize) -> bool {
        matches!(self.children[i].try_wait(), Ok(Some(_)))
    }

    /// Wait until process `i` exits, for at most `timeout`; its exit code (`None`: still
    /// running, or killed by a signal).
    pub async fn wait_exit(&mut self, i: usize, timeout: std::time::Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(st)) = self.children[i].try_wait() {
                return st.code();
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for NetBed {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.hosts {
            kill_in(ns);
            quiet(&["ip", "netns", "del", ns]);
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
        }
        for t in &self.taps {
            quiet(&["ip", "link", "del", t]);
        }
        quiet(&["ip", "link", "del", &self.bridge]);
    }
}
