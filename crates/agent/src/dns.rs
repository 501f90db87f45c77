//! The agent's resolver: `NAME.NAMESPACE.mesh` is answered from the proxy's config with the
//! service's virtual IP; any other name is forwarded to the host's resolver and its answer
//! relayed unchanged. Over UDP and over TCP (RFC 7766): a client falls back to TCP when a
//! forwarded answer comes back truncated, and some are set to use TCP only.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
};
use trellis_model::resource::NamespacedName;
use trellis_proxy::Services;

/// Time-to-live of a mesh answer: virtual IPs are stable, but a deleted service should not
/// linger long in callers' caches.
const TTL: u32 = 30;
const TYPE_A: u16 = 1;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const RCODE_FORMERR: u8 = 1;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NOTIMP: u8 = 4;
const RCODE_NXDOMAIN: u8 = 3;
/// A DNS header's length: anything shorter is no message, and is dropped unanswered.
const HEADER: usize = 12;
/// Most forwarded queries waiting for the host's resolver at once.
const MAX_FORWARDS: usize = 256;
/// Most TCP clients at once; one more is closed at once (it retries, or uses UDP).
const MAX_TCP_CLIENTS: usize = 128;
/// A TCP client that sends no query for this long is closed (RFC 7766 suggests seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// How long the host's resolver has to answer a forwarded query.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

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

/// What the resolver does with a message.
#[derive(Debug, PartialEq)]
enum Reply {
    /// Answer it with this message.
    Answer(Vec<u8>),
    /// Ask the host's resolver.
    Forward,
    /// Say nothing: shorter than a header, or a response (answering a response could bounce
    /// it between two resolvers for ever).
    Drop,
}

/// What to do with `query`: mesh names are answered here, other plain queries forwarded, and
/// what is not one plain query answered FORMERR (or NOTIMP for other opcodes) with the bare
/// header, so that nothing the resolver sends is larger than what it was sent but for one
/// A record: it cannot serve as an amplifier.
fn decide(query: &[u8], lookup: impl Fn(&NamespacedName) -> Option<Option<Ipv4Addr>>) -> Reply {
    if query.len() < HEADER || query[2] & 0x80 != 0 {
        return Reply::Drop;
    }
    if query[2] & 0x78 != 0 {
        return Reply::Answer(bare(query, RCODE_NOTIMP));
    }
    let Some(q) = question(query) else {
        return Reply::Answer(bare(query, RCODE_FORMERR));
    };
    let Some(svc) = mesh_service(&q.name) else {
        return Reply::Forward;
    };
    let found = svc.as_ref().and_then(&lookup);
    Reply::Answer(match found {
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

/// A reply of the header alone: the query's id, opcode and RD, and `rcode`.
fn bare(query: &[u8], rcode: u8) -> Vec<u8> {
    let mut r = query[..HEADER].to_vec();
    r[2] = 0x80 | (query[2] & 0x79);
    r[3] = rcode;
    r[4..].fill(0);
    r
}

/// Where the agent's resolver listens and forwards.
#[derive(Clone, Debug)]
pub struct DnsOptions {
    /// Listen address (UDP and TCP).
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

/// The UDP socket and TCP listener of one address. With port 0 both get the same free port
/// (a few tries: the UDP port may be taken for TCP).
pub async fn bind(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let mut tries = if addr.port() == 0 { 8 } else { 1 };
    loop {
        let udp = UdpSocket::bind(addr).await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if tries == 1 => return Err(e),
            Err(_) => tries -= 1,
        }
    }
}

/// The virtual IP of a service in the proxy's live config: `None` when there is no such
/// service, `Some(None)` when it has no virtual IP.
fn lookup(services: &Services, id: &NamespacedName) -> Option<Option<Ipv4Addr>> {
    services.virtual_ip(id)
}

/// The mesh Service `query` asks for, when the proxy does not hold it and asks for such on
/// demand (what the answer then waits for).
fn not_held(query: &[u8], services: &Services) -> Option<NamespacedName> {
    if !services.on_demand() || query.len() < HEADER || query[2] & 0xF8 != 0 {
        return None;
    }
    let id = mesh_service(&question(query)?.name)??;
    services.virtual_ip(&id).is_none().then_some(id)
}

/// SERVFAIL for `query`, if it is a query at all.
fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let q = question(query)?;
    Some(answer(query, &q, RCODE_SERVFAIL, None))
}

/// The host's resolver, unless it is this resolver itself (which would loop).
fn upstream(opts: &DnsOptions) -> Option<SocketAddr> {
    opts.upstream.filter(|up| *up != opts.listen)
}

/// Answer queries on `sock` until the task is dropped.
pub async fn serve(sock: UdpSocket, opts: DnsOptions, services: Services) {
    let sock = Arc::new(sock);
    // Forwarded queries in flight; beyond this (a flood, a dead upstream) SERVFAIL at once.
    let inflight = Arc::new(Semaphore::new(MAX_FORWARDS));
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
        // A mesh name the proxy does not hold is asked for on demand, off this loop, as a
        // forwarded query is.
        let ask = not_held(&query, &services);
        if ask.is_none() {
            match decide(&query, |id| lookup(&services, id)) {
                Reply::Drop => continue,
                Reply::Answer(reply) => {
                    let _ = sock.send_to(&reply, from).await;
                    continue;
                }
                Reply::Forward => {}
            }
        }
        let Ok(permit) = inflight.clone().try_acquire_owned() else {
            if let Some(r) = servfail(&query) {
                let _ = sock.send_to(&r, from).await;
            }
            continue;
        };
        let (sock, opts, services) = (sock.clone(), opts.clone(), services.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let reply = match (ask, upstream(&opts)) {
                (Some(id), _) => {
                    let found = services.find(&id).await;
                    match decide(&query, |_| found) {
                        Reply::Answer(r) => Some(r),
                        Reply::Drop | Reply::Forward => None,
                    }
                }
                (None, Some(up)) => forward(&query, up, opts.mark).await,
                (None, None) => None,
            };
            if let Some(r) = reply.or_else(|| servfail(&query)) {
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
    let read = tokio::time::timeout(FORWARD_TIMEOUT, sock.recv(&mut buf));
    let n = read.await.ok()?.ok()?;
    // Only the answer to this query (same id).
    (n >= 2 && buf[..2] == query[..2]).then(|| buf[..n].to_vec())
}

/// Answer DNS over TCP on `listener` until the task is dropped: each message has a two-byte
/// length before it, and a client may send several queries on one connection.
pub async fn serve_tcp(listener: TcpListener, opts: DnsOptions, services: Services) {
    let clients = Arc::new(Semaphore::new(MAX_TCP_CLIENTS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "dns accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = clients.clone().try_acquire_owned() else {
            continue;
        };
        let (opts, services) = (opts.clone(), services.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = tcp_client(stream, &opts, &services).await {
                tracing::debug!(error = %e, "dns tcp client");
            }
        });
    }
}

/// One TCP client: its queries in turn, until it closes or idles.
async fn tcp_client(mut s: TcpStream, opts: &DnsOptions, services: &Services) -> io::Result<()> {
    loop {
        let Ok(read) = tokio::time::timeout(TCP_IDLE, read_message(&mut s)).await else {
            return Ok(());
        };
        let Some(query) = read?.filter(|q| q.len() >= HEADER) else {
            return Ok(());
        };
        // A mesh name the proxy does not hold is asked for on demand first.
        let found = match not_held(&query, services) {
            Some(id) => Some(services.find(&id).await),
            None => None,
        };
        let reply = match decide(&query, |id| found.unwrap_or_else(|| lookup(services, id))) {
            Reply::Answer(r) => Some(r),
            Reply::Drop => None,
            Reply::Forward => match upstream(opts) {
                Some(up) => forward_tcp(&query, up, opts.mark).await,
                None => None,
            },
        };
        // Not a query: nothing sensible to say, so the connection ends.
        let Some(reply) = reply.or_else(|| servfail(&query)) else {
            return Ok(());
        };
        write_message(&mut s, &reply).await?;
    }
}

/// One length-prefixed message, or `None` at a clean end of the stream.
async fn read_message(r: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut m = vec![0u8; usize::from(u16::from_be_bytes(len))];
    r.read_exact(&mut m).await?;
    Ok(Some(m))
}

async fn write_message(w: &mut (impl AsyncWrite + Unpin), m: &[u8]) -> io::Result<()> {
    let len = u16::try_from(m.len()).map_err(|_| io::ErrorKind::InvalidData)?;
    let mut b = Vec::with_capacity(m.len() + 2);
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(m);
    w.write_all(&b).await
}

/// Ask the host's resolver over TCP, from a marked socket (as the proxy's own upstream
/// connections are made).
async fn forward_tcp(query: &[u8], upstream: SocketAddr, mark: Option<u32>) -> Option<Vec<u8>> {
    let ask = async {
        let mut s = trellis_proxy::net::connect(upstream, mark).await.ok()?;
        write_message(&mut s, query).await.ok()?;
        read_message(&mut s).await.ok()?
    };
    let reply = tokio::time::timeout(FORWARD_TIMEOUT, ask).await.ok()??;
    (reply.len() >= 2 && reply[..2] == query[..2]).then_some(reply)
}

/// The resolver's decision on any message (the fuzz target): never a reply to a response,
/// never a reply larger than the query but for one A record, always the query's id and the
/// response bit, and mesh names never forwarded.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn check_decide(query: &[u8]) {
    let lookup = |id: &NamespacedName| match id.name.len() % 3 {
        0 => Some(Some(Ipv4Addr::new(10, 96, 0, 1))),
        1 => Some(None),
        _ => None,
    };
    match decide(query, lookup) {
        Reply::Drop => assert!(query.len() < HEADER || query[2] & 0x80 != 0),
        Reply::Forward => {
            let q = question(query).expect("only a plain query is forwarded");
            assert!(mesh_service(&q.name).is_none(), "a mesh name forwarded");
            assert!(servfail(query).is_some());
        }
        Reply::Answer(r) => {
            assert!(query[2] & 0x80 == 0, "a response answered");
            assert!(
                r.len() >= HEADER && r.len() <= query.len() + 16,
                "amplified"
            );
            assert_eq!(r[..2], query[..2], "another id");
            assert!(r[2] & 0x80 != 0, "not a response");
            let count = |i: usize| u16::from_be_bytes([r[i], r[i + 1]]);
            assert!(count(4) <= 1 && count(6) <= 1 && count(8) == 0 && count(10) == 0);
        }
    }
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

    fn answered(q: &[u8]) -> Vec<u8> {
        match decide(q, lookup) {
            Reply::Answer(r) => r,
            other => panic!("{other:?} for {q:?}"),
        }
    }

    #[test]
    fn mesh_names_are_answered_and_others_forwarded() {
        let r = answered(&query("Catalog.shop.mesh", TYPE_A));
        assert_eq!(&r[..2], &[0x12, 0x34], "same id");
        assert_eq!(r[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one answer");
        assert_eq!(&r[r.len() - 4..], &[10, 96, 1, 2]);
        // An unknown service in .mesh: NXDOMAIN, authoritative.
        let r = answered(&query("nope.shop.mesh", TYPE_A));
        assert_eq!(r[3] & 0x0f, RCODE_NXDOMAIN);
        assert_ne!(r[2] & 0x04, 0);
        // AAAA of a service: no data, no error.
        let r = answered(&query("catalog.shop.mesh", 28));
        assert_eq!((r[3] & 0x0f, r[7]), (0, 0));
        // Any other name goes to the host's resolver.
        assert_eq!(
            decide(&query("example.org", TYPE_A), lookup),
            Reply::Forward
        );
    }

    #[test]
    fn what_is_not_one_plain_query_is_not_forwarded() {
        // Shorter than a header: silence.
        assert_eq!(decide(&[1, 2, 3], lookup), Reply::Drop);
        // A response (QR set), say reflected at the resolver: silence, never a reply.
        let mut resp = query("example.org", TYPE_A);
        resp[2] |= 0x80;
        assert_eq!(decide(&resp, lookup), Reply::Drop);
        // A question cut short: FORMERR, the header alone (never more than was sent).
        let mut truncated = query("catalog.shop.mesh", TYPE_A);
        truncated.truncate(20);
        let r = answered(&truncated);
        assert_eq!(
            (r.len(), &r[..2], r[2] & 0x80, r[3] & 0x0f),
            (12, &[0x12, 0x34][..], 0x80, RCODE_FORMERR)
        );
        // Two questions: FORMERR too.
        let mut two = query("catalog.shop.mesh", TYPE_A);
        two[5] = 2;
        assert_eq!(answered(&two)[3] & 0x0f, RCODE_FORMERR);
        // Another opcode (here UPDATE): NOTIMP.
        let mut update = query("catalog.shop.mesh", TYPE_A);
        update[2] = 5 << 3;
        assert_eq!(answered(&update)[3] & 0x0f, RCODE_NOTIMP);
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
