//! The command line (every option has an environment twin) and the settings a pass runs with.

use std::time::Duration;

use services::config::{parse_duration, HttpArgs, LogArgs, PostgresArgs};

/// Deletes events older than the retention from the events table, in small batches, never past
/// the position of a consumer that still needs them.
///
/// Consumers publish the position they have delivered up to; by default the purger keeps every
/// event after the slowest of them, however old. `--consumer-expiry` lets a consumer that stopped
/// publishing stop holding purging back, and `--force` purges by age alone; either way the purge
/// watermark records what went, and the affected consumers report the gap.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "purger", version)]
pub struct Config {
    #[command(flatten)]
    pub postgres: PostgresArgs,

    /// Delete events whose created_at is older than this, e.g. 7d, 36h, 30m. Age is measured
    /// with the database server's clock.
    #[arg(long, env = "PURGER_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub retention: Duration,

    /// Time between the end of one pass and the start of the next (ignored with --once).
    #[arg(long, env = "PURGER_INTERVAL", default_value = "1m", value_parser = parse_positive_duration)]
    pub interval: Duration,

    /// Events deleted per statement. Each batch is its own short transaction; larger batches
    /// purge faster but hold their row locks longer and delay concurrent appends more.
    #[arg(
        long,
        env = "PURGER_BATCH_SIZE",
        default_value_t = DEFAULT_BATCH_SIZE,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    pub batch_size: u32,

    /// Pause between batches, leaving the database to the producers during a large purge
    /// (0s: none, purge as fast as possible).
    #[arg(long, env = "PURGER_BATCH_PAUSE", default_value = "3ms", value_parser = parse_duration)]
    pub batch_pause: Duration,

    /// Run one pass, then exit (for cron jobs and Kubernetes CronJobs).
    #[arg(long, env = "PURGER_ONCE")]
    pub once: bool,

    /// With --once: how long to keep retrying an unreachable or failing database before exiting
    /// non-zero (a cron job must end).
    #[arg(long, env = "PURGER_GIVE_UP_AFTER", default_value = "5m", value_parser = parse_positive_duration)]
    pub give_up_after: Duration,

    /// Report what a pass would delete, and whom it would affect, but delete nothing.
    #[arg(long, env = "PURGER_DRY_RUN")]
    pub dry_run: bool,

    /// A consumer whose `consumer_positions` row has not been refreshed for this long (e.g. 3d;
    /// running consumers refresh it every heartbeat interval, also when idle) stops holding
    /// purging back; the purger warns, naming it and what it loses, and the consumer reports the
    /// gap if it returns. Unset: consumers hold purging back until they move or an operator
    /// removes them from consumer_positions.
    #[arg(long, env = "PURGER_CONSUMER_EXPIRY", value_parser = parse_positive_duration)]
    pub consumer_expiry: Option<Duration>,

    /// Purge by age alone, even events that active consumers have not read yet. The purge
    /// watermark records the purge as forced, the purger logs each consumer and what it loses,
    /// and those consumers report the gap.
    #[arg(long, env = "PURGER_FORCE")]
    pub force: bool,

    #[command(flatten)]
    pub http: HttpArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

impl Config {
    /// What a pass needs from the command line.
    pub fn settings(&self) -> Settings {
        Settings {
            retention: self.retention,
            batch_size: self.batch_size,
            batch_pause: self.batch_pause,
            dry_run: self.dry_run,
            consumer_expiry: self.consumer_expiry,
            force: self.force,
        }
    }
}

/// How a pass purges.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Events created longer ago than this may go.
    pub retention: Duration,
    /// Events per DELETE statement (at least 1).
    pub batch_size: u32,
    /// Pause between batches.
    pub batch_pause: Duration,
    /// Count, don't delete.
    pub dry_run: bool,
    /// Consumers idle longer than this stop holding purging back.
    pub consumer_expiry: Option<Duration>,
    /// Purge by age alone, past active consumers.
    pub force: bool,
}

impl Settings {
    /// The command line's defaults with this retention: safe mode, no expiry.
    pub fn with_retention(retention: Duration) -> Settings {
        Settings {
            retention,
            batch_size: DEFAULT_BATCH_SIZE,
            batch_pause: DEFAULT_BATCH_PAUSE,
            dry_run: false,
            consumer_expiry: None,
            force: false,
        }
    }
}

/// Measured (docs/benchmarks.md, "Purger"): with a producer appending beside it on 2 cores,
/// batches of 1000 with a 3 ms pause purge 146k–172k events/s and raise the producer's p99 by
/// 3–17%; bigger batches or no pause purge faster but stall appends for longer.
pub const DEFAULT_BATCH_SIZE: u32 = 1000;
pub const DEFAULT_BATCH_PAUSE: Duration = Duration::from_millis(3);

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let mut argv = vec!["purger", "--database-url", "postgres://u@h/db"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv)
    }

    #[test]
    fn defaults_are_safe_and_documented() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(config.interval, Duration::from_secs(60));
        assert_eq!(config.batch_size, DEFAULT_BATCH_SIZE);
        assert_eq!(config.batch_pause, DEFAULT_BATCH_PAUSE);
        assert_eq!(
            config.settings(),
            Settings::with_retention(config.retention),
            "the library's defaults are the command line's"
        );
        assert!(!config.once && !config.dry_run && !config.force);
        assert_eq!(config.give_up_after, Duration::from_secs(300));
        assert_eq!(config.consumer_expiry, None);
        assert_eq!(config.http.http_addr, None);
    }

    #[test]
    fn options_parse() {
        let config = parse(&[
            "--retention",
            "36h",
            "--interval",
            "30s",
            "--batch-size",
            "100",
            "--batch-pause",
            "5ms",
            "--once",
            "--dry-run",
            "--consumer-expiry",
            "3d",
            "--force",
        ])
        .unwrap();
        let settings = config.settings();
        assert_eq!(settings.retention, Duration::from_secs(36 * 3600));
        assert_eq!(config.interval, Duration::from_secs(30));
        assert_eq!(settings.batch_size, 100);
        assert_eq!(settings.batch_pause, Duration::from_millis(5));
        assert!(config.once && settings.dry_run && settings.force);
        assert_eq!(
            settings.consumer_expiry,
            Some(Duration::from_secs(3 * 86_400))
        );
    }

    #[test]
    fn bad_values_are_rejected_with_a_reason() {
        let err = parse(&["--retention", "seven days"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--retention") && err.contains("expected a duration"),
            "{err}"
        );
        let err = parse(&["--retention", "10"]).unwrap_err().to_string();
        assert!(
            err.contains("--retention"),
            "a bare number has no unit: {err}"
        );
        let err = parse(&["--batch-size", "0"]).unwrap_err().to_string();
        assert!(err.contains("--batch-size"), "{err}");
        let err = parse(&["--interval", "0s"]).unwrap_err().to_string();
        assert!(err.contains("longer than zero"), "{err}");
        let err = parse(&["--consumer-expiry", "0s"]).unwrap_err().to_string();
        assert!(err.contains("longer than zero"), "{err}");
        // Zero retention is allowed: purge everything every consumer has read.
        assert_eq!(
            parse(&["--retention", "0s"]).unwrap().retention,
            Duration::ZERO
        );
    }
}
