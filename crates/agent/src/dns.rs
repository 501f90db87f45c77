//! The agent's resolver: `NAME.NAMESPACE.mesh` is answered from the proxy's config with the
//! service's virtual IP; any other name is forwarded to the host's resolver and its answer
//! relayed unchanged. UDP only (mesh answers are a few dozen bytes).

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::net::UdpSocket;
use trellis_model::resource::NamespacedName;
use trellis_proxy::Shared;

/// Time-to-live of a mesh answer: virtual IPs are stable, but a deleted service should not
/// linger long in callers' caches.
const TTL: u32 = 30;
const TYPE_A: u16 = 1;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;
/// Most forwarded queries waiting for the host's resolver at once.
const MAX_FORWARDS: usize = 256;

/// A parsed question: the name (lower case, no trailing dot), its type, and where the
/// question section ends.
#[derive(Debug, PartialEq)]
struct Question {
    name: String,
    qtype: u16,
    qclass: u16,
    end: usize,
}

fn question(q: &[u8]) -> Option<Question> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 || q[2] & 0x80 != 0 {
        return None;
    }
    let mut labels = Vec::new();
    let mut i = 12;
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        // A question never uses compression; longer labels are malformed.
        if len > 63 {
            return None;
        }
        labels.push(
            std::str::from_utf8(q.get(i..i + len)?)
                .ok()?
                .to_ascii_lowercase(),
        );
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let qclass = u16::from_be_bytes([*q.get(i + 2)?, *q.get(i + 3)?]);
    Some(Question {
        name: labels.join("."),
        qtype,
        qclass,
        end: i + 4,
    })
}

/// The service a mesh name means: `NAME.NAMESPACE.mesh`.
fn mesh_service(name: &str) -> Option<Option<NamespacedName>> {
    let rest = name.strip_suffix(".mesh")?;
    let parsed = rest
        .split_once('.')
        .filter(|(_, ns)| !ns.contains('.'))
        .map(|(n, ns)| NamespacedName {
            namespace: ns.to_string(),
            name: n.to_string(),
        });
    Some(parsed)
}

/// The answer to `query` (the header and question copied) with `rcode` and an optional A
/// record. Authoritative: the agent owns `.mesh`.
fn answer(query: &[u8], q: &Question, rcode: u8, a: Option<Ipv4Addr>) -> Vec<u8> {
    let mut r = query[..q.end].to_vec();
    // QR, opcode kept, AA, RD kept; RA; rcode.
    r[2] = 0x80 | (query[2] & 0x79) | 0x04;
    r[3] = 0x80 | rcode;
    let ancount: u16 = a.is_some().into();
    r[6..8].copy_from_slice(&ancount.to_be_bytes());
    r[8..12].fill(0);
    if let Some(ip) = a {
        r.extend_from_slice(&[0xc0, 0x0c]);
        r.extend_from_slice(&TYPE_A.to_be_bytes());
        r.extend_from_slice(&CLASS_IN.to_be_bytes());
        r.extend_from_slice(&TTL.to_be_bytes());
        r.extend_from_slice(&4u16.to_be_bytes());
        r.extend_from_slice(&ip.octets());
    }
    r
}

/// What to answer locally, or `None` to forward.
fn local_answer(
    query: &[u8],
    lookup: impl Fn(&NamespacedName) -> Option<Option<Ipv4Addr>>,
) -> Option<Vec<u8>> {
    let Some(q) = question(query) else {
        // Not one plain query: forwarded, for the host's resolver to judge.
        return None;
    };
    let svc = mesh_service(&q.name)?;
    let found = svc.as_ref().and_then(&lookup);
    Some(match found {
        None => answer(query, &q, RCODE_NXDOMAIN, None),
        Some(ip) if q.qclass == CLASS_IN && (q.qtype == TYPE_A || q.qtype == TYPE_ANY) => {
            match ip {
                Some(ip) => answer(query, &q, 0, Some(ip)),
                // A service without a virtual IP exists but has no address to give.
                None => answer(query, &q, 0, None),
            }
        }
        // AAAA and other types of an existing name: no data.
        Some(_) => answer(query, &q, 0, None),
    })
}

/// Where the agent's resolver listens and forwards.
#[derive(Clone, Debug)]
pub struct DnsOptions {
    /// Listen address (UDP).
    pub listen: SocketAddr,
    /// The resolver other names go to; `None` answers them SERVFAIL.
    pub upstream: Option<SocketAddr>,
    /// `SO_MARK` of forwarded queries, so that capture lets them out.
    pub mark: Option<u32>,
}

/// The first `nameserver` of a resolv.conf text.
pub fn resolv_conf_upstream(text: &str) -> Option<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
}

/// Answer queries on `sock` until the task is dropped.
pub async fn serve(sock: UdpSocket, opts: DnsOptions, shared: Arc<Shared>) {
    let sock = Arc::new(sock);
    // Forwarded queries in flight; beyond this (a flood, a dead upstream) SERVFAIL at once.
    let inflight = Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDS));
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "dns receive failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let lookup = |id: &NamespacedName| {
            let snap = shared.state.load();
            snap.cfg.services.get(id).map(|s| s.virtual_ip)
        };
        if let Some(reply) = local_answer(&query, lookup) {
            let _ = sock.send_to(&reply, from).await;
            continue;
        }
        let Ok(permit) = inflight.clone().try_acquire_owned() else {
            if let Some(q) = question(&query) {
                let _ = sock
                    .send_to(&answer(&query, &q, RCODE_SERVFAIL, None), from)
                    .await;
            }
            continue;
        };
        let (sock, opts) = (sock.clone(), opts.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let reply = match opts.upstream {
                Some(up) if up != opts.listen => forward(&query, up, opts.mark).await,
                _ => None,
            };
            let reply = reply.or_else(|| {
                let q = question(&query)?;
                Some(answer(&query, &q, RCODE_SERVFAIL, None))
            });
            if let Some(r) = reply {
                let _ = sock.send_to(&r, from).await;
            }
        });
    }
}

async fn forward(query: &[u8], upstream: SocketAddr, mark: Option<u32>) -> Option<Vec<u8>> {
    let any: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = std::net::UdpSocket::bind(any).ok()?;
    if let Some(m) = mark {
        if let Err(e) = socket2::SockRef::from(&sock).set_mark(m) {
            tracing::warn!(error = %e, "cannot mark the forwarded DNS query");
        }
    }
    sock.set_nonblocking(true).ok()?;
    let sock = UdpSocket::from_std(sock).ok()?;
    sock.connect(upstream).await.ok()?;
    sock.send(query).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf));
    let n = read.await.ok()?.ok()?;
    // Only the answer to this query (same id).
    (n >= 2 && buf[..2] == query[..2]).then(|| buf[..n].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    fn lookup(id: &NamespacedName) -> Option<Option<Ipv4Addr>> {
        (id.namespace == "shop" && id.name == "catalog")
            .then_some(Some(Ipv4Addr::new(10, 96, 1, 2)))
    }

    #[test]
    fn mesh_names_are_answered_and_others_forwarded() {
        let q = query("Catalog.shop.mesh", TYPE_A);
        let r = local_answer(&q, lookup).expect("a mesh name is answered here");
        assert_eq!(&r[..2], &[0x12, 0x34], "same id");
        assert_eq!(r[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one answer");
        assert_eq!(&r[r.len() - 4..], &[10, 96, 1, 2]);
        // An unknown service in .mesh: NXDOMAIN, authoritative.
        let r = local_answer(&query("nope.shop.mesh", TYPE_A), lookup).unwrap();
        assert_eq!(r[3] & 0x0f, RCODE_NXDOMAIN);
        assert_ne!(r[2] & 0x04, 0);
        // AAAA of a service: no data, no error.
        let r = local_answer(&query("catalog.shop.mesh", 28), lookup).unwrap();
        assert_eq!((r[3] & 0x0f, r[7]), (0, 0));
        // Anything else goes to the host's resolver; so does what does not parse.
        assert!(local_answer(&query("example.org", TYPE_A), lookup).is_none());
        assert!(local_answer(&[1, 2, 3], lookup).is_none());
        let mut truncated = query("catalog.shop.mesh", TYPE_A);
        truncated.truncate(20);
        assert!(local_answer(&truncated, lookup).is_none());
    }

    #[test]
    fn the_first_nameserver_of_resolv_conf_is_the_upstream() {
        let t = "# generated\nsearch example\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n";
        assert_eq!(
            resolv_conf_upstream(t),
            Some("10.0.0.2:53".parse().unwrap())
        );
        assert_eq!(resolv_conf_upstream("search x\n"), None);
    }
}
