//! SIGTERM / SIGINT handling. The first signal cancels the token, and services stop at their next
//! safe point (between batches, never inside a transaction); a second signal exits at once.

use tokio_util::sync::CancellationToken;

/// A token cancelled by the first SIGTERM or SIGINT.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::warn!("Cannot install signal handlers; SIGTERM will kill the process.");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; finishing in-flight work."),
            _ = int.recv() => tracing::info!("SIGINT received; finishing in-flight work."),
        }
        trigger.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("Second signal received; exiting immediately.");
        std::process::exit(130);
    });
    token
}
