//! Logging set-up: human-readable lines on stderr, filtered by `--log-level` / `LOG_LEVEL`.

use anyhow::Context;
use tracing_subscriber::EnvFilter;

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Installs the global subscriber. A bad filter is a start-up error.
pub fn init(filter: &str) -> anyhow::Result<()> {
    let filter = parse(filter)?;
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

/// Parses a log filter strictly. `tracing`'s own parser takes any bare word as a module name,
/// so a typo such as `LOG_LEVEL=inof` would silently switch logging off; here every directive
/// must be a level (`info`) or `module=level` (`consumer=debug`).
pub fn parse(filter: &str) -> anyhow::Result<EnvFilter> {
    let bad = |directive: &str| {
        anyhow::anyhow!(
            "invalid --log-level / LOG_LEVEL {filter:?}: {directive:?} is not a level; use one \
             of {} or module=level directives such as \"info,consumer=debug\"",
            LEVELS.join(", ")
        )
    };
    for directive in filter.split(',').map(str::trim) {
        let level = match directive.rsplit_once('=') {
            Some((module, level)) if !module.is_empty() => level,
            Some(_) => return Err(bad(directive)),
            None => directive,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(bad(directive));
        }
    }
    EnvFilter::try_new(filter)
        .with_context(|| format!("invalid --log-level / LOG_LEVEL {filter:?}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn levels_and_module_directives_parse_and_typos_are_refused() {
        for good in [
            "info",
            "WARN",
            "info,consumer=debug",
            "off",
            "event_store=trace",
        ] {
            assert!(super::parse(good).is_ok(), "{good}");
        }
        for bad in ["inof", "", "info,", "consumer", "consumer=loud", "=info"] {
            let err = super::parse(bad).unwrap_err().to_string();
            assert!(
                err.contains("LOG_LEVEL") && err.contains("not a level"),
                "{bad}: {err}"
            );
        }
    }
}
