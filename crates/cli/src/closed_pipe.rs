//! Output piped into a reader that stops early (`trellis get svc | head -1`) ends the command
//! quietly, as a closed pipe ends other command-line tools. Rust ignores SIGPIPE, so the write
//! fails and `println!` panics; that panic prints nothing here, and `main` gives status 141
//! once it has unwound. Any other panic is reported as before.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set when `println!` panicked because stdout is a pipe whose reader has gone.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Install the panic hook that keeps that one panic quiet.
pub(crate) fn quiet() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            return;
        }
        default(info);
    }));
}

/// Whether a write to stdout failed because its reader had gone.
pub(crate) fn happened() -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
}
