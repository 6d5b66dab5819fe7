//! Command-line pieces the services share. Every option has an environment twin (the names the
//! compose file uses), a doc comment (which becomes `--help`) and, where one makes sense, a default.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

/// Where the events database is.
#[derive(Debug, Clone, clap::Args)]
pub struct PostgresArgs {
    /// PostgreSQL connection string of the events database, e.g.
    /// postgres://user:password@host:5432/dbname?sslmode=verify-full&sslrootcert=/etc/pg/ca.pem
    /// (key=value form works too). sslmode: disable, prefer (default), require, verify-ca,
    /// verify-full, as in libpq; sslrootcert: the CA file, or "system".
    #[arg(long = "database-url", env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

/// Logging.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log filter: a level (error, warn, info, debug, trace, off) or module=level directives such
    /// as "info,consumer=debug"; anything else is refused at start-up.
    #[arg(long = "log-level", env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Wake-ups.
#[derive(Debug, Clone, clap::Args)]
pub struct ChannelArgs {
    /// The PostgreSQL NOTIFY channel of wake-ups: producers and the capture watcher send on it;
    /// consumers, the gateway and eventsctl tail --follow listen on it. The same for every service
    /// of one stream; 1 to 63 bytes.
    #[arg(long = "notify-channel", env = "NOTIFY_CHANNEL", default_value = event_store::DEFAULT_CHANNEL)]
    pub notify_channel: event_store::channel::Channel,
}

/// The operations endpoint.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    /// Address for the HTTP endpoint serving /healthz and /metrics (Prometheus), e.g. 0.0.0.0:9100.
    /// Off when unset.
    #[arg(long = "http-addr", env = "HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
}

/// A PostgreSQL connection string fit to print: where it points (`host:port/dbname as user`),
/// as the connection's own parser reads it, never the password. See [`event_store::redact`].
pub fn redact(url: &str) -> String {
    event_store::redact::postgres(url)
}

/// Parses a byte size: `4194304`, `512KiB`, `4MiB` (also `KB`/`MB`, taken as powers of 1024).
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size; expected e.g. 4MiB, 512KiB or 1048576"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        other => return Err(format!("unknown size unit {other:?}; use B, KiB or MiB")),
    };
    match number.checked_mul(scale) {
        Some(0) | None => Err(format!("{text:?} must be between 1 byte and a few GiB")),
        Some(bytes) => Ok(bytes),
    }
}

/// Parses durations such as `250ms`, `30s`, `5m`, `7d` (clap value parser).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e} (expected a duration such as 250ms, 30s, 5m, 1h or 7d)"))
}

/// Ends `main`: prints the error report once ([`event_store::error::report`]: each cause once, a
/// PostgreSQL error with its SQLSTATE and what to do), and picks the exit code.
pub fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let report = event_store::error::report(error.as_ref());
            tracing::error!(error = %report, "Exiting on an unrecoverable error.");
            eprintln!("error: {report}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_survive_redaction() {
        for (url, shown) in [
            (
                "postgres://app:s3cr%40t@db:5432/events?sslmode=verify-full",
                "db:5432/events as app",
            ),
            (
                "postgres://prod:Zm9v/YmFy+PgSecret6=@127.0.0.1:5432/db",
                "127.0.0.1:5432/db as prod",
            ),
            (
                "postgresql://db/events?user=app&password=s3cret",
                "db:5432/events as app",
            ),
            ("postgres://app@db/events", "db:5432/events as app"),
            (
                "host=db user=app password='s3 cret' dbname=events",
                "db:5432/events as app",
            ),
        ] {
            assert_eq!(redact(url), shown);
        }
    }

    #[test]
    fn durations_parse_with_units_and_explain_bad_input() {
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        let err = parse_duration("seven days").unwrap_err();
        assert!(err.contains("expected a duration"), "{err}");
        assert!(parse_duration("10").is_err(), "a bare number has no unit");
    }
}
