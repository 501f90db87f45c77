//! The network between the shopper's host and the container's: a TCP hop in front of the
//! container's proxy (its Workload's `inboundPort` names this hop), which the story cuts.
//! Cut, nothing listens on its port, so connections are refused as a firewall's REJECT
//! rule would refuse them, and the connections it carried are closed. On loopback and
//! without root: the demo needs neither network namespaces nor iptables.

use std::{net::SocketAddr, time::Duration};

use tokio::{net::TcpListener, sync::watch, task::JoinSet};

/// A link that can be cut and mended.
pub(super) struct Link {
    /// Its port on 127.0.0.1.
    pub(super) port: u16,
    up: watch::Sender<bool>,
}

impl Link {
    /// A link to `target`, up.
    pub(super) async fn start(target: SocketAddr) -> std::io::Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (up, rx) = watch::channel(true);
        tokio::spawn(serve(listener, port, target, rx));
        Ok(Link { port, up })
    }

    /// Cut it (`false`) or mend it (`true`).
    pub(super) fn set(&self, up: bool) {
        self.up.send_replace(up);
    }
}

async fn serve(first: TcpListener, port: u16, target: SocketAddr, mut up: watch::Receiver<bool>) {
    let mut listener = Some(first);
    loop {
        let l = match listener.take() {
            Some(l) => l,
            None => match rebind(port).await {
                Some(l) => l,
                None => return,
            },
        };
        // Dropping the set closes every connection the link carried.
        let mut carried = JoinSet::new();
        loop {
            tokio::select! {
                accepted = l.accept() => {
                    if let Ok((mut from, _)) = accepted {
                        carried.spawn(async move {
                            if let Ok(mut to) = tokio::net::TcpStream::connect(target).await {
                                let _ = tokio::io::copy_bidirectional(&mut from, &mut to).await;
                            }
                        });
                    }
                }
                changed = up.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if !*up.borrow() {
                        break;
                    }
                }
                Some(_) = carried.join_next() => {}
            }
        }
        drop(l);
        drop(carried);
        if up.wait_for(|u| *u).await.is_err() {
            return;
        }
    }
}

/// The same port again (it was ours a moment ago; a few tries cover a slow release).
async fn rebind(port: u16) -> Option<TcpListener> {
    for _ in 0..50 {
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)).await {
            return Some(l);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("demo: could not listen on 127.0.0.1:{port} again; the link stays cut");
    None
}
