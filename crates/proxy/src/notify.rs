//! The service manager's readiness protocol (systemd's `sd_notify`): when `NOTIFY_SOCKET` is
//! set, the proxy says `READY=1` once it serves, and a process that took over in an upgrade
//! says `MAINPID=` too, so that a unit with `Type=notify` and `NotifyAccess=all` follows the
//! new process rather than taking the old one's exit for the service's end.

use std::os::unix::net::UnixDatagram;

/// Send `state` (`KEY=VALUE` lines) to the service manager, when there is one. Failures are
/// logged, never fatal: a proxy runs the same without a manager.
pub(crate) fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|sock| {
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        match bytes.strip_prefix(b"@") {
            // An abstract socket (systemd's usual choice).
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)
            }
            None => sock.send_to(state.as_bytes(), &path),
        }
    });
    match sent {
        Ok(_) => tracing::debug!(state, "service manager notified"),
        Err(e) => tracing::warn!(error = %e, state, "could not notify the service manager"),
    }
}

/// The command that started this process, for a successor: this binary's path as the
/// process started it (the new file, when an upgrade replaced it: `/proc/self/exe` then
/// names the old one, "(deleted)") and the same arguments.
pub(crate) fn same_command() -> std::io::Result<std::process::Command> {
    use std::os::unix::process::CommandExt;
    let exe = std::fs::read_link("/proc/self/exe")?;
    let exe = exe.to_string_lossy();
    let exe = exe.strip_suffix(" (deleted)").unwrap_or(&exe).to_string();
    let mut c = std::process::Command::new(exe);
    c.args(std::env::args_os().skip(1))
        .stdin(std::process::Stdio::null())
        // Not in this process's group: a signal meant for it (a terminal's ^C) does not
        // reach the successor.
        .process_group(0);
    Ok(c)
}
