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

/// A connection string fit to print: the password (in `user:password@`, or a `password` /
/// `sslpassword` parameter, URL or key=value form) replaced by `***`. Works for `postgres://`,
/// `mongodb://` and `mongodb+srv://` URLs alike. The one function that prints connection strings.
pub fn redact(url: &str) -> String {
    const SECRET_KEYS: [&str; 2] = ["password", "sslpassword"];
    if let Some(scheme_end) = url.find("://") {
        let (scheme, rest) = url.split_at(scheme_end + 3);
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let authority = match authority.rfind('@') {
            Some(at) => {
                let (userinfo, host) = authority.split_at(at);
                match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***{host}"),
                    None => authority.to_string(),
                }
            }
            None => authority.to_string(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let query: Vec<String> = query
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some((key, _)) if SECRET_KEYS.contains(&key) => format!("{key}=***"),
                        _ => pair.to_string(),
                    })
                    .collect();
                format!("{path}?{}", query.join("&"))
            }
            None => tail.to_string(),
        };
        return format!("{scheme}{authority}{tail}");
    }
    let mut out = String::with_capacity(url.len());
    let mut kept_from = 0;
    for (start, end, key, _) in event_store::tls::key_value_pairs(url) {
        if SECRET_KEYS.contains(&key.as_str()) {
            out.push_str(&url[kept_from..start]);
            out.push_str(&format!("{key}=***"));
            kept_from = end;
        }
    }
    out.push_str(&url[kept_from..]);
    out
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
                "postgres://app:***@db:5432/events?sslmode=verify-full",
            ),
            (
                "mongodb://consumer:p@ss:w0rd@m1,m2/?replicaSet=rs0&authSource=consumer",
                "mongodb://consumer:***@m1,m2/?replicaSet=rs0&authSource=consumer",
            ),
            (
                "postgresql://db/events?user=app&password=s3cret",
                "postgresql://db/events?user=app&password=***",
            ),
            ("postgres://app@db/events", "postgres://app@db/events"),
            (
                "host=db user=app password='s3 cret' dbname=events",
                "host=db user=app password=*** dbname=events",
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
