//! Release builds lay out the functions a proxy runs next to each other: `link-order.txt`
//! (written by `bench/link-order.sh`) is the linker's symbol order. A proxy then keeps
//! resident the code it runs, not the 64 KiB around each of its functions scattered over the
//! whole binary (docs/benchmarks.md, "Resident memory").

use std::env;
use std::process::Command;

include!("link_order.rs");

fn main() {
    println!("cargo:rerun-if-changed=link-order.txt");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    // A linker set in `.cargo/config.toml` or by `CARGO_TARGET_<triple>_LINKER`: Cargo hands
    // either to this script as `RUSTC_LINKER`, and runs it again when it changes.
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let release = env::var("PROFILE").as_deref() == Ok("release");
    let target = env::var("TARGET").unwrap_or_default();
    // The flag is lld's: rustc links with its own lld on this target since 1.90, unless told
    // to use another linker.
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let own_linker = rustc_lld_links(&flags, env::var_os("RUSTC_LINKER").is_some());
    let order = concat!(env!("CARGO_MANIFEST_DIR"), "/link-order.txt");
    let lld = target == "x86_64-unknown-linux-gnu" && own_linker && rustc_minor() >= 90;
    if release && lld && std::path::Path::new(order).exists() {
        println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={order}");
        // A function renamed since the file was written is laid out where it would have been.
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}

/// The minor version of the compiler building this crate ("rustc 1.95.0 (...)" → 95).
fn rustc_minor() -> u32 {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let v = String::from_utf8(o.stdout).ok()?;
            v.split_whitespace().nth(1)?.split('.').nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}
