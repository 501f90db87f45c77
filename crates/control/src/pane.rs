//! The single pane: a page served by the control plane on its API listener (`/ui/`), over
//! the same API as the CLI. Assets are embedded in the binary (no CDN, nothing fetched at run
//! time, no npm). Sign-in takes the admin token once and gives a session cookie (HttpOnly,
//! SameSite=Strict, Secure over TLS); a request that rides on the cookie must name this
//! listener in its `Host` (a page of another site resolved to this address — DNS rebinding —
//! gets nothing). Every write goes through `/api/v1/apply`, as `trellis apply`, after the
//! page asks the operator to confirm.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::http::{header, HeaderMap};

/// How long a session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most (the oldest go first).
const SESSIONS: usize = 1000;
/// How long a sign-in link lasts (it works once).
const LINK_TTL: Duration = Duration::from_secs(15 * 60);
/// Unused sign-in links kept at most.
const LINKS: usize = 100;
/// The session cookie's name.
pub(crate) const COOKIE: &str = "trellis_session";

/// The page's assets.
pub(crate) const INDEX: &str = include_str!("pane/index.html");
pub(crate) const JS: &str = include_str!("pane/pane.js");
pub(crate) const CSS: &str = include_str!("pane/pane.css");

/// Who a session or link is for: the admin (`None`) or a read-only token (its id).
pub(crate) type Holder = Option<String>;

/// Random ids that expire, each with its holder: sessions, sign-in links.
#[derive(Default)]
struct Expiring(Mutex<HashMap<String, (Instant, Holder)>>);

impl Expiring {
    /// A new id, good for `ttl`; beyond `cap` live ids the oldest goes.
    fn mint(&self, ttl: Duration, cap: usize, holder: Holder) -> Option<String> {
        let id = crate::token::generate().ok()?;
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        s.retain(|_, (until, _)| *until > now);
        if s.len() >= cap {
            let oldest = s.iter().min_by_key(|(_, u)| u.0).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                s.remove(&k);
            }
        }
        s.insert(id.clone(), (now + ttl, holder));
        Some(id)
    }

    /// `Some(holder)` while `id` lives.
    fn live(&self, id: &str) -> Option<Holder> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .filter(|(until, _)| *until > Instant::now())
            .map(|(_, h)| h.clone())
    }

    /// `Some(holder)` if `id` was live; it is not any more.
    fn take(&self, id: &str) -> Option<Holder> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .filter(|(until, _)| *until > Instant::now())
            .map(|(_, h)| h)
    }
}

/// Sessions, sign-in links, and the names this listener answers to.
pub(crate) struct Pane {
    sessions: Expiring,
    links: Expiring,
    hosts: Vec<String>,
    /// The listener is TLS (beyond loopback): cookies are `Secure`.
    pub(crate) secure: bool,
}

impl Pane {
    /// For the API listener bound at `addr`.
    pub(crate) fn new(addr: SocketAddr) -> Self {
        let port = addr.port();
        let mut hosts = vec![addr.to_string()];
        if addr.ip().is_loopback() {
            hosts.extend([
                format!("localhost:{port}"),
                format!("127.0.0.1:{port}"),
                format!("[::1]:{port}"),
            ]);
        } else if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            hosts.push(format!("{}:{port}", h.trim()));
        }
        Self {
            sessions: Expiring::default(),
            links: Expiring::default(),
            hosts,
            secure: !addr.ip().is_loopback(),
        }
    }

    /// Whether the request names this listener in `Host`.
    pub(crate) fn host_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|h| self.hosts.iter().any(|x| x.eq_ignore_ascii_case(h)))
    }

    /// A new session for `holder` (the admin, or a read-only token by id).
    pub(crate) fn open(&self, holder: Holder) -> Option<String> {
        self.sessions.mint(SESSION_TTL, SESSIONS, holder)
    }

    /// A sign-in link's code: it opens one session, once, within [`LINK_TTL`] (what
    /// `trellis dashboard` and the demo print, so that nobody pastes the admin token).
    pub(crate) fn link(&self) -> Option<String> {
        self.links.mint(LINK_TTL, LINKS, None)
    }

    /// A session for a link's code, which is then spent.
    pub(crate) fn enter(&self, code: &str) -> Option<String> {
        let holder = self.links.take(code)?;
        self.open(holder)
    }

    /// End the request's session.
    pub(crate) fn close(&self, headers: &HeaderMap) {
        if let Some(id) = session_of(headers) {
            self.sessions.take(&id);
        }
    }

    /// `Some(holder)` when the request rides on a live session, to this listener by name.
    pub(crate) fn session(&self, headers: &HeaderMap) -> Option<Holder> {
        let id = session_of(headers)?;
        self.sessions.live(&id).filter(|_| self.host_ok(headers))
    }

    /// The `Set-Cookie` of session `id` (an empty id clears it).
    pub(crate) fn cookie(&self, id: &str) -> String {
        let age = if id.is_empty() {
            0
        } else {
            SESSION_TTL.as_secs()
        };
        let secure = if self.secure { "; Secure" } else { "" };
        format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={age}{secure}")
    }
}

fn session_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == COOKIE && !v.is_empty()).then(|| v.to_string())
        })
}

/// The value of `key` in a form body (`application/x-www-form-urlencoded`).
pub(crate) fn form_value(body: &[u8], key: &str) -> Option<String> {
    let body = std::str::from_utf8(body).ok()?;
    body.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| decode(v))
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(s.get(i + 1..i + 3).unwrap_or(""), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_session_counts_only_for_this_listener_by_name() {
        let p = Pane::new("127.0.0.1:7070".parse().unwrap());
        let id = p.open(None).unwrap();
        let cookie = format!("a=b; {COOKIE}={id}");
        assert!(p
            .session(&headers(&[("host", "127.0.0.1:7070"), ("cookie", &cookie)]))
            .is_some());
        assert!(p
            .session(&headers(&[("host", "localhost:7070"), ("cookie", &cookie)]))
            .is_some());
        // DNS rebinding: another name for this address.
        assert!(p
            .session(&headers(&[
                ("host", "evil.example:7070"),
                ("cookie", &cookie)
            ]))
            .is_none());
        assert!(p
            .session(&headers(&[
                ("host", "127.0.0.1:7070"),
                ("cookie", "trellis_session=forged")
            ]))
            .is_none());
        assert_eq!(
            p.session(&headers(&[("host", "127.0.0.1:7070"), ("cookie", &cookie)])),
            Some(None)
        );
        let ro = p.open(Some("ro1".into())).unwrap();
        let ro_cookie = format!("{COOKIE}={ro}");
        assert_eq!(
            p.session(&headers(&[
                ("host", "127.0.0.1:7070"),
                ("cookie", &ro_cookie)
            ])),
            Some(Some("ro1".into()))
        );
        p.close(&headers(&[("cookie", &cookie)]));
        assert!(p
            .session(&headers(&[("host", "127.0.0.1:7070"), ("cookie", &cookie)]))
            .is_none());
        let c = p.cookie(&id);
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure"),
            "{c}"
        );
        let tls = Pane::new("10.0.0.5:7070".parse().unwrap());
        assert!(tls.cookie(&id).ends_with("; Secure"));
    }

    #[test]
    fn a_sign_in_link_opens_one_session_once() {
        let p = Pane::new("127.0.0.1:7070".parse().unwrap());
        let code = p.link().unwrap();
        assert!(p.enter("forged").is_none());
        let id = p.enter(&code).expect("a session");
        let cookie = format!("{COOKIE}={id}");
        assert!(p
            .session(&headers(&[("host", "127.0.0.1:7070"), ("cookie", &cookie)]))
            .is_some());
        assert!(p.enter(&code).is_none(), "a link works once");
        // A session id is not a link's code.
        assert!(p.enter(&id).is_none());
    }

    #[test]
    fn form_values_are_decoded() {
        assert_eq!(
            form_value(b"a=1&token=ab%2Bc+d%3D", "token").as_deref(),
            Some("ab+c d=")
        );
        assert_eq!(form_value(b"token=%zz", "token").as_deref(), Some("%zz"));
        assert_eq!(form_value(b"x=1", "token"), None);
    }
}
