use std::{future::Future, pin::pin};

use super::*;

/// Whether `f` is done after one poll.
fn done<F: Future>(f: std::pin::Pin<&mut F>) -> bool {
    let waker = std::task::Waker::noop();
    f.poll(&mut std::task::Context::from_waker(waker))
        .is_ready()
}

/// An accept loop that took a connection hands it to a task that may run after the drain
/// began: the drain waits for the loop to stop, and so for the connection it counted.
#[test]
fn a_drain_waits_for_accept_loops_and_the_connections_they_counted() {
    let d = Drain::default();
    let accepting = d.accepting();
    let mut drain = pin!(d.drain());
    assert!(!done(drain.as_mut()), "an accept loop still runs");
    assert_eq!(d.active(), 0, "an accept loop is no connection");
    let conn = d.track();
    drop(accepting);
    assert!(!done(drain.as_mut()), "the loop's connection is open");
    drop(conn);
    assert!(done(drain.as_mut()));
}

#[test]
fn a_drain_with_nothing_open_ends_at_once() {
    let d = Drain::default();
    drop(d.track());
    drop(d.accepting());
    assert!(done(pin!(d.drain())));
}
