//! The release build's symbol order goes to the linker only when that linker is rustc's own
//! lld: a linker the user chose (GNU ld, gold) would stop the link on lld's flag.

include!("../link_order.rs");

/// RUSTFLAGS as Cargo hands them to a build script: separated by 0x1f.
fn encoded(flags: &[&str]) -> String {
    flags.join("\u{1f}")
}

#[test]
fn the_default_link_takes_the_order() {
    assert!(rustc_lld_links("", false));
    assert!(rustc_lld_links(&encoded(&["-Ctarget-cpu=native"]), false));
}

#[test]
fn a_linker_the_user_chose_does_not() {
    // `linker = "..."` in .cargo/config.toml, or CARGO_TARGET_<triple>_LINKER.
    assert!(!rustc_lld_links("", true));
    // GNU ld or gold through the C compiler driver.
    assert!(!rustc_lld_links(
        &encoded(&["-C", "link-arg=-fuse-ld=bfd"]),
        false
    ));
    assert!(!rustc_lld_links(
        &encoded(&["-Clink-args=-fuse-ld=gold"]),
        false
    ));
    // rustc told to use another linker or not its own lld.
    assert!(!rustc_lld_links(&encoded(&["-Clinker=clang"]), false));
    assert!(!rustc_lld_links(
        &encoded(&["-Clinker-features=-lld"]),
        false
    ));
    assert!(!rustc_lld_links(
        &encoded(&["-Clink-self-contained=-linker"]),
        false
    ));
}
