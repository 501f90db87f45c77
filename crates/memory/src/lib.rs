//! Giving back to the system the memory the allocator holds free.
//!
//! glibc's allocator returns freed memory to the system only from the top of each arena, so
//! a process whose heap once peaked (the control plane compiling a mesh of 11,000
//! resources, a thousand proxies syncing) stays resident at that peak with most of it free:
//! measured, 311 MiB resident for a heap of about 90 MiB, and 135 MiB after one
//! `malloc_trim(0)` (docs/benchmarks.md). [`release`] asks for it back.

/// Ask the allocator to give the memory it holds free back to the system; whether it gave
/// any. It walks every arena under its lock: call it off the request path, after a burst.
/// Elsewhere than glibc it does nothing (other allocators give memory back themselves).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release() -> bool {
    // SAFETY: `malloc_trim` takes no pointer and touches only the allocator's own state,
    // under the locks every allocation takes; any thread may call it at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Elsewhere than glibc: nothing to do.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release() -> bool {
    false
}

#[cfg(test)]
mod tests {
    /// A peak of small blocks (below the threshold above which glibc maps blocks of their
    /// own), all freed but the last, which pins the top of the heap: the freed memory stays
    /// resident until it is asked for back.
    #[test]
    fn memory_freed_below_a_live_block_goes_back_to_the_system() {
        let blocks: Vec<Vec<u8>> = (0..100_000).map(|i| vec![i as u8; 1024]).collect();
        let pin = vec![1u8; 1024];
        drop(blocks);
        let before = trellis_test_support::rss_kib(std::process::id());
        assert!(super::release(), "nothing given back");
        let after = trellis_test_support::rss_kib(std::process::id());
        assert!(
            after + 50_000 < before,
            "resident {before} KiB before, {after} KiB after"
        );
        drop(pin);
    }
}
