//! Entry points for the fuzz targets (`fuzz/`), each asserting properties of what it reads.
//! Built for `cargo fuzz` with the `fuzzing` feature, and in the unit tests, which replay the
//! committed corpus (`fuzz/corpus/TARGET`) on every `cargo test`.

/// A datagram or TCP message to the mesh resolver.
pub fn dns_message(data: &[u8]) {
    crate::dns::check_decide(data);
}

/// Bytes of a container engine's event stream (the first byte picks where it is cut).
pub fn engine_events(data: &[u8]) {
    crate::containers::check_events(data);
}

#[cfg(test)]
mod tests {
    fn replay(target: &str, f: fn(&[u8])) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus")
            .join(target);
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.expect("corpus entry").path();
            let data = std::fs::read(&p).expect("corpus file");
            if std::panic::catch_unwind(|| f(&data)).is_err() {
                panic!("{} breaks a property", p.display());
            }
            n += 1;
        }
        assert!(n > 0, "no corpus in {}", dir.display());
    }

    #[test]
    fn the_committed_corpora_hold_their_properties() {
        replay("dns_message", super::dns_message);
        replay("engine_events", super::engine_events);
    }
}
