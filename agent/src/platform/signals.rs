//! Waiting for the signals that ask a long-running subcommand to stop (SIGTERM, SIGINT).

use tokio::signal::unix::{signal, SignalKind};

/// A future that resolves on the first SIGTERM or SIGINT; the handlers are installed now, so a
/// signal arriving before the future is awaited is not lost.
pub fn stop_requested() -> std::io::Result<impl std::future::Future<Output = ()> + Send> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}
