//! The `producer` command line. Every option has an environment twin (the names compose and the
//! scenarios use); the doc comments are the `--help` text.

use std::time::Duration;

use event_store::Topic;
use services::config::{parse_duration, ChannelArgs, HttpArgs, LogArgs, PostgresArgs};

use crate::append::{NotifyMode, DEFAULT_MAX_PAYLOAD_BYTES};

/// Appends generated events to the `events` table: the demo workload and a load generator.
///
/// Events are spread round-robin over the topics, each with a JSON payload of about
/// --payload-bytes. An event counts as produced once its transaction has committed; a COMMIT whose
/// outcome is unknown (the connection broke) is checked after reconnecting, never guessed. On
/// SIGTERM/SIGINT the in-flight transactions finish, `produced <N> events` is printed on stdout and
/// the exit code is 0.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "producer", version)]
pub struct Args {
    #[command(flatten)]
    pub postgres: PostgresArgs,

    /// Comma-separated topics to spread the events over (letters, digits, '_', '.', '-').
    #[arg(
        long,
        env = "PRODUCER_TOPICS",
        value_delimiter = ',',
        default_value = "courses,policies"
    )]
    pub topics: Vec<Topic>,

    /// Events per second, across all tasks; 0 appends as fast as possible.
    #[arg(long, env = "PRODUCER_RATE", default_value_t = 100.0, value_parser = parse_rate)]
    pub rate: f64,

    /// Stop after this many events have committed, then exit 0. Unset: run until SIGTERM/SIGINT.
    #[arg(long, env = "PRODUCER_COUNT")]
    pub count: Option<u64>,

    /// Events per transaction (one multi-row INSERT).
    #[arg(long, env = "PRODUCER_BATCH_SIZE", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// Concurrent tasks, each appending over its own PostgreSQL connection.
    #[arg(long, env = "PRODUCER_CONCURRENCY", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub concurrency: u32,

    /// Approximate size in bytes of each generated JSON payload.
    #[arg(long, env = "PRODUCER_PAYLOAD_BYTES", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(0..=DEFAULT_MAX_PAYLOAD_BYTES as u64))]
    pub payload_bytes: u64,

    /// How consumers are woken: after-commit (one NOTIFY per --notify-interval from a side
    /// connection, after commits; the faster) or in-transaction (pg_notify in every appending
    /// transaction, which PostgreSQL serialises).
    #[arg(long, env = "PRODUCER_NOTIFY_MODE", value_enum, default_value_t = NotifyMode::AfterCommit)]
    pub notify_mode: NotifyMode,

    #[command(flatten)]
    pub channel: ChannelArgs,

    /// after-commit mode: at most one NOTIFY per this interval; bursts of commits share it.
    #[arg(long, env = "PRODUCER_NOTIFY_INTERVAL", default_value = "1ms", value_parser = parse_duration)]
    pub notify_interval: Duration,

    /// How often to log a progress line (events appended, rate).
    #[arg(long, env = "PRODUCER_PROGRESS_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub progress_interval: Duration,

    #[command(flatten)]
    pub http: HttpArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Ok(rate),
        _ => Err("expected events per second: a number ≥ 0 (0 = as fast as possible)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_follow_the_contract() {
        let args =
            Args::try_parse_from(["producer", "--database-url", "postgres://x@h/db"]).unwrap();
        let topics: Vec<&str> = args.topics.iter().map(Topic::as_str).collect();
        assert_eq!(topics, ["courses", "policies"]);
        assert_eq!(args.rate, 100.0);
        assert_eq!(args.count, None);
        assert_eq!(args.batch_size, 1);
        assert_eq!(args.concurrency, 1);
        assert_eq!(args.notify_mode, NotifyMode::AfterCommit);
        assert_eq!(args.channel.notify_channel.as_str(), "events");
        assert_eq!(args.notify_interval, Duration::from_millis(1));
    }

    #[test]
    fn options_parse_and_bad_values_are_refused() {
        let args = Args::try_parse_from([
            "producer",
            "--database-url=postgres://x@h/db",
            "--topics=a,b.c",
            "--rate=0",
            "--count=7",
            "--batch-size=100",
            "--concurrency=8",
            "--payload-bytes=1000",
            "--notify-mode=in-transaction",
            "--notify-channel=wake",
        ])
        .unwrap();
        assert_eq!(args.topics.len(), 2);
        assert_eq!(args.rate, 0.0);
        assert_eq!(args.count, Some(7));
        assert_eq!((args.batch_size, args.concurrency), (100, 8));
        assert_eq!(args.notify_mode, NotifyMode::InTransaction);
        for bad in [
            "--topics=bad topic",
            "--rate=-1",
            "--rate=fast",
            "--batch-size=0",
            "--concurrency=0",
            "--notify-mode=sometimes",
            "--payload-bytes=99999999",
        ] {
            let parsed =
                Args::try_parse_from(["producer", "--database-url=postgres://x@h/db", bad]);
            assert!(parsed.is_err(), "{bad} should be refused");
        }
    }
}
