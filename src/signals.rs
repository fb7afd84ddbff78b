//! The one way a paygate process learns it should stop: SIGTERM (systemd, `kill`) or
//! SIGINT (Ctrl-C), whichever comes first. Workers and the supervisor both use it.

use std::future::Future;

use tokio::signal::unix::{signal, SignalKind};

/// Installs the SIGTERM and SIGINT handlers now (so a signal that arrives before the
/// future is polled already means "stop", not the default "die"); the future resolves on
/// the first of them. Needs a running tokio runtime.
pub fn stop() -> std::io::Result<impl Future<Output = ()>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}
