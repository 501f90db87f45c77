//! Request header maps kept for reuse on their thread.
//!
//! A request's header map is two allocations (its index and its entries), made when its head
//! is parsed and freed once the request has gone upstream. With many requests in flight,
//! glibc's per-thread cache of freed blocks (seven of each size) overflows, and each of those
//! allocations and frees takes the allocator's slow path (callgrind, two mTLS proxies: 200-430
//! instructions to make a request's map, ~180 to free it). A map that has done its work is
//! emptied and kept here for the next head this thread parses. The list's helpers ([`take`],
//! [`put`]) serve `h1::raw`'s boxes of response lines too.

use std::{cell::RefCell, thread::LocalKey};

use http::HeaderMap;

/// A thread's list of things kept for reuse (here, and `h1::raw`'s boxes of lines).
pub(crate) type List<T> = LocalKey<RefCell<Vec<T>>>;

/// The last thing `list` keeps, if any (none once the thread's list is gone, at its end).
pub(crate) fn take<T: 'static>(list: &'static List<T>) -> Option<T> {
    list.try_with(|s| s.borrow_mut().pop()).ok().flatten()
}

/// Keep `item` in `list` unless it holds `most` already; else, or once the thread's list is
/// gone (at its end), `item` is dropped.
pub(crate) fn put<T: 'static>(list: &'static List<T>, item: T, most: usize) {
    let _ = list.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < most {
            s.push(item);
        }
    });
}

/// How many things `list` keeps on this thread.
#[cfg(test)]
pub(crate) fn count<T: 'static>(list: &'static List<T>) -> usize {
    list.with(|s| s.borrow().len())
}

/// How many maps a thread keeps: about as many requests as a busy proxy's thread has in
/// flight. Beyond that, a map is freed as before.
const KEEP: usize = 64;

/// A map with room for more headers than this is freed, not kept: one large request does
/// not pin its memory.
const LARGEST: usize = 48;

thread_local! {
    static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty map with room for `n` headers: a kept one when this thread has one.
pub(crate) fn map(n: usize) -> HeaderMap {
    match take(&SPARE) {
        Some(mut m) => {
            if m.capacity() < n {
                m.reserve(n);
            }
            m
        }
        None => HeaderMap::with_capacity(n),
    }
}

/// Keep `map`'s memory, emptied, for a later [`map`], leaving `map` empty (holding no
/// memory). A map with nothing allocated, or with room for more than [`LARGEST`] headers, is
/// left as it is, for its owner to drop; one more than the thread keeps is freed here.
pub(crate) fn keep(map: &mut HeaderMap) {
    let room = map.capacity();
    if room == 0 || room > LARGEST {
        return;
    }
    let mut m = std::mem::take(map);
    // Its values are dropped here, as they would have been with the map.
    m.clear();
    put(&SPARE, m, KEEP);
}

/// How many maps this thread keeps now.
#[cfg(test)]
pub(crate) fn kept() -> usize {
    count(&SPARE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{header, HeaderValue};

    #[test]
    fn a_kept_map_comes_back_empty_with_its_room() {
        let mut m = map(6);
        let room = m.capacity();
        assert!(room >= 6, "room for {room}");
        m.insert(header::HOST, HeaderValue::from_static("a"));
        m.append("x-a", HeaderValue::from_static("1"));
        m.append("x-a", HeaderValue::from_static("2"));
        let before = kept();
        keep(&mut m);
        assert!(
            m.is_empty() && m.capacity() == 0,
            "the caller's map is left empty"
        );
        assert_eq!(kept(), before + 1);
        let again = map(6);
        assert_eq!(kept(), before);
        assert!(again.is_empty(), "a kept map is emptied: {again:?}");
        assert_eq!(again.capacity(), room, "and keeps its room");
        assert!(again.get(header::HOST).is_none() && again.get("x-a").is_none());
    }

    #[test]
    fn a_map_too_small_is_given_room_and_a_large_one_is_freed() {
        let mut small = map(2);
        keep(&mut small);
        let m = map(20);
        assert!(m.capacity() >= 20, "room for {}", m.capacity());
        let before = kept();
        let mut large = HeaderMap::with_capacity(200);
        keep(&mut large);
        assert_eq!(kept(), before, "a map for 200 headers is not kept");
        let mut none = HeaderMap::new();
        keep(&mut none);
        assert_eq!(kept(), before, "nor one with no room");
    }

    #[test]
    fn a_thread_keeps_no_more_than_its_share() {
        for _ in 0..KEEP + 10 {
            let mut m = HeaderMap::with_capacity(4);
            keep(&mut m);
        }
        assert_eq!(kept(), KEEP);
    }
}
