//! Logging set-up: human-readable lines on stderr, filtered by `--log-level` / `LOG_LEVEL`.

use anyhow::Context;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. A bad filter is a configuration error.
pub fn init(filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)
        .with_context(|| format!("invalid --log-level / LOG_LEVEL {filter:?}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: log files and `docker logs` stay plain text.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .with_target(false)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}
