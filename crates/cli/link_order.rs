// Shared by `build.rs` and `tests/link_order.rs` (through `include!`): whether a release link
// is rustc's own lld, the only linker here that takes `--symbol-ordering-file`.

/// `flags` is `CARGO_ENCODED_RUSTFLAGS`; `linker_set` is whether Cargo was given a linker (by
/// `.cargo/config.toml` or the environment, which it passes on as `RUSTC_LINKER`). GNU ld and
/// gold refuse lld's flag ("unrecognized option"), so any sign of a linker the user chose
/// leaves the link alone: flags naming a linker or its features, `-fuse-ld`, or a set linker.
fn rustc_lld_links(flags: &str, linker_set: bool) -> bool {
    !linker_set
        && !flags.contains("linker")
        && !flags.contains("link-self-contained")
        && !flags.contains("fuse-ld")
}
