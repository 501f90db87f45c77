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

/// An idle connection's wait, polled before the drain (the second time only a flag's load),
/// is woken when the drain starts (the watch kept the task's waker), and then ends.
#[test]
fn an_idle_wait_polled_before_the_drain_is_woken_by_it() {
    struct Flag(std::sync::atomic::AtomicBool);
    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let flag = Arc::new(Flag(false.into()));
    let waker = std::task::Waker::from(flag.clone());
    let mut cx = std::task::Context::from_waker(&waker);
    let d = Drain::default();
    let mut ends = pin!(d.idle_ends());
    for _ in 0..2 {
        assert!(ends.as_mut().poll(&mut cx).is_pending(), "no drain yet");
    }
    assert!(!flag.0.load(Ordering::SeqCst) && !d.draining());
    assert!(done(pin!(d.drain())), "nothing open");
    assert!(
        flag.0.load(Ordering::SeqCst),
        "the drain woke the idle connection"
    );
    assert!(ends.as_mut().poll(&mut cx).is_ready());
}
