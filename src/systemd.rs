//! The systemd notification protocol (`sd_notify`), written with std alone: one datagram of
//! `KEY=value` lines to the socket named by `$NOTIFY_SOCKET` (a path, or an abstract socket
//! when it starts with `@`). Without `$NOTIFY_SOCKET` (not started by systemd with
//! `Type=notify`), nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`) to the service manager, if there is one. Failures are
/// logged, never fatal: the server works the same without a manager listening.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let target = target.to_string_lossy();
        match target.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            None => socket.send_to(state.as_bytes(), &*target),
        }
    });
    if let Err(e) = sent {
        log::warn!("could not notify the service manager ({state:?}): {e}");
    }
}
