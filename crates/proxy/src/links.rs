//! The kernel's TCP figures of this proxy's upstream links: round-trip time and
//! retransmissions of its open connections to each endpoint, read once a report period with
//! `ss -tin` (iproute2, which reads `TCP_INFO` through netlink; no unsafe code here). Off the
//! request path: the reporter runs it on a blocking thread. A host without `ss` reports no
//! links, and says so once.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use trellis_telemetry::report::Link;

/// What the sockets to one peer add up to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Figures {
    pub(crate) sockets: u32,
    pub(crate) rtt_us_sum: u64,
    pub(crate) segs_out: u64,
    pub(crate) retrans: u64,
}

fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.split_whitespace()
        .find_map(|w| w.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
}

/// Parse `ss -tinH state established`: a line with the addresses, then a line of figures,
/// for each socket; the figures of every socket whose peer is in `wanted`, by peer.
pub(crate) fn parse(
    out: &str,
    wanted: &dyn Fn(&SocketAddr) -> bool,
) -> HashMap<SocketAddr, Figures> {
    let mut m: HashMap<SocketAddr, Figures> = HashMap::new();
    let mut peer: Option<SocketAddr> = None;
    for line in out.lines() {
        if !line.starts_with(char::is_whitespace) {
            // Recv-Q Send-Q Local Peer
            peer = line
                .split_whitespace()
                .nth(3)
                .and_then(|p| p.parse().ok())
                .filter(|p| wanted(p));
            continue;
        }
        let Some(p) = peer.take() else {
            continue;
        };
        let f = m.entry(p).or_default();
        f.sockets += 1;
        if let Some(rtt) = field(line, "rtt").and_then(|r| r.split('/').next()?.parse::<f64>().ok())
        {
            f.rtt_us_sum += (rtt * 1000.0) as u64;
        }
        f.segs_out += field(line, "segs_out")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // `retrans:NOW/TOTAL`, only once a socket has retransmitted.
        f.retrans += field(line, "retrans")
            .and_then(|r| r.split('/').nth(1)?.parse().ok())
            .unwrap_or(0);
    }
    m
}

static WARNED: AtomicBool = AtomicBool::new(false);

/// Endpoints named to `ss` at most; with more, it prints every socket.
const FILTERED: usize = 64;

/// The figures of the links to `peers` (address → workload) now.
pub(crate) fn sample(peers: &HashMap<SocketAddr, String>) -> Vec<Link> {
    if peers.is_empty() {
        return Vec::new();
    }
    // The kernel filters by destination (a host with many sockets prints only ours), up to
    // a bound on the expression's length; beyond, everything is read and filtered here.
    let mut cmd = Command::new("ss");
    cmd.args(["-tinH", "state", "established"]);
    if peers.len() <= FILTERED {
        let mut expr: Vec<String> = vec!["(".into()];
        for (i, a) in peers.keys().enumerate() {
            if i > 0 {
                expr.push("or".into());
            }
            expr.push("dst".into());
            expr.push(a.to_string());
        }
        expr.push(")".into());
        cmd.args(expr);
    }
    let out = match cmd.output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            warn_once(&String::from_utf8_lossy(&o.stderr));
            return Vec::new();
        }
        Err(e) => {
            warn_once(&e.to_string());
            return Vec::new();
        }
    };
    let mut links: Vec<Link> = parse(&out, &|p| peers.contains_key(p))
        .into_iter()
        .map(|(addr, f)| Link {
            endpoint: addr.to_string(),
            peer_workload: peers.get(&addr).cloned().unwrap_or_default(),
            sockets: f.sockets,
            rtt_us: (f.rtt_us_sum / u64::from(f.sockets.max(1))).min(u64::from(u32::MAX)) as u32,
            segs_out: f.segs_out,
            retrans: f.retrans,
        })
        .collect();
    links.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    links
}

fn warn_once(why: &str) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            error = why.trim(),
            "cannot read the kernel's TCP figures (ss, from iproute2): links are not reported"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SS: &str = "0      0      127.0.0.1:54702 127.0.0.1:18083
\t bbr wscale:10,10 rto:204 rtt:1.885/0.046 ato:40 mss:32768 cwnd:18 bytes_sent:29488 segs_out:391 segs_in:400 retrans:0/7 lastsnd:12
76     0      127.0.0.1:18083 127.0.0.1:54746
\t bbr wscale:10,10 rto:204 rtt:0.116/0.107 ato:40 segs_out:395 segs_in:387
0      0      127.0.0.1:54714 127.0.0.1:18083
\t cubic wscale:7,7 rto:208 rtt:2.115/0.5 segs_out:609 segs_in:600 retrans:1/3
";

    #[test]
    fn figures_of_the_wanted_peers_add_up_by_peer() {
        let want: SocketAddr = "127.0.0.1:18083".parse().unwrap();
        let m = parse(SS, &|p| *p == want);
        assert_eq!(m.len(), 1, "{m:?}");
        let f = m[&want];
        assert_eq!(f.sockets, 2);
        assert_eq!((f.segs_out, f.retrans), (1000, 10));
        assert_eq!(f.rtt_us_sum, 1885 + 2115);
    }

    #[test]
    fn a_host_with_ss_reports_real_sockets() {
        // A real connection on loopback, read back through the real `ss`.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let _s = l.accept().unwrap();
        if Command::new("ss").arg("-V").output().is_err() {
            eprintln!("no ss here: skipped");
            return;
        }
        let links = sample(&HashMap::from([(addr, "test/peer".to_string())]));
        assert_eq!(links.len(), 1, "{links:?}");
        assert_eq!(
            (links[0].sockets, links[0].peer_workload.as_str()),
            (1, "test/peer")
        );
    }
}
