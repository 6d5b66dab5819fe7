//! The purger: retention for the events table that never silently drops an unread event.
//!
//! Every `--interval` it runs a pass ([`Purger::pass`]): events older than `--retention` (by the
//! database clock) go in batches of `--batch-size`, each one short autocommit DELETE along the
//! `created_at` index, never past the position of the slowest consumer that still publishes one,
//! and never above the visibility horizon (rows of transactions newer than the oldest open one,
//! which no consumer can have read yet). Each batch raises the purge watermark in the same
//! statement, so a consumer whose position falls behind it (after `--consumer-expiry` or
//! `--force`) learns it missed events instead of carrying on.
//!
//! - [`config`]: the command line and the [`Settings`] a pass runs with;
//! - [`plan`]: which consumers hold purging back;
//! - [`pass`]: one pass;
//! - [`report`]: what a pass did, logged after each one;
//! - [`mod@metrics`]: what `/metrics` shows.
//!
//! [`run`] is the service: start-up check, passes on a timer, retries with capped backoff on
//! transient database errors, and a clean stop between batches on SIGTERM.

pub mod config;
pub mod metrics;
pub mod pass;
pub mod plan;
pub mod report;

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use event_store::{db, ops};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use config::{Config, Settings};
pub use pass::Purger;
pub use report::{HeldBack, PassReport};

/// The longest wait between retries after transient errors.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// What a run did, printed on stdout at exit (`purged <N> events`; `would purge <N> events` for
/// a dry run's last pass) for scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub passes: u64,
    pub purged: u64,
    pub would_purge: Option<u64>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.would_purge {
            Some(n) => write!(f, "would purge {n} events"),
            None => write!(f, "purged {} events", self.purged),
        }
    }
}

/// Runs the purger until `shutdown` is cancelled (or after one pass with `--once`).
///
/// Errors (non-zero exit) only for bad configuration: an unparseable URL, a port that cannot be
/// bound, a missing schema or privilege, a failed login. Transient database errors are logged and
/// retried with capped exponential backoff, forever.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<Summary> {
    let pg = db::config(&config.postgres.database_url, "events-purger")?;
    let target = db::describe(&pg);
    let settings = config.settings();
    let health = ops::Health::new();
    health.failing("postgres", "not connected yet");
    ops::spawn(config.http.http_addr, health.clone(), shutdown.clone()).await?;
    info!(
        database = %target,
        retention = %report::short(settings.retention),
        interval = %report::short(config.interval),
        batch_size = settings.batch_size,
        batch_pause = %humantime::format_duration(settings.batch_pause),
        consumer_expiry = settings.consumer_expiry.map(|d| report::short(d).to_string()),
        force = settings.force,
        dry_run = settings.dry_run,
        once = config.once,
        "Purger starting."
    );
    if settings.force {
        warn!("--force: events older than the retention go even if consumers have not read them.");
    }
    let mut purger = Purger::new(pg, settings)?;
    let mut summary = Summary {
        passes: 0,
        purged: 0,
        would_purge: None,
    };
    let mut checked = false;
    let mut attempt: u32 = 0;
    while !shutdown.is_cancelled() {
        let result = async {
            if !checked {
                purger.check().await?;
                checked = true;
                health.ok("postgres");
            }
            purger.pass(&shutdown).await
        }
        .await;
        let wait = match result {
            Ok(report) => {
                attempt = 0;
                health.ok("postgres");
                report.log();
                summary.passes += 1;
                summary.would_purge = report.would_delete;
                if config.once || report.interrupted {
                    break;
                }
                config.interval
            }
            Err(e) if e.is_transient() => {
                attempt += 1;
                metrics::pass_failed();
                let error = chain(&e);
                health.failing("postgres", error.clone());
                let cap = if config.once {
                    MAX_BACKOFF
                } else {
                    config.interval.min(MAX_BACKOFF)
                };
                let delay = backoff(attempt, cap);
                warn!(
                    error = %error,
                    attempt,
                    retry_in = %humantime::format_duration(delay),
                    "Purge pass failed; retrying."
                );
                delay
            }
            Err(e) if !checked || config.once => {
                return Err(e).with_context(|| format!("purging {target}"));
            }
            Err(e) => {
                // The start-up check passed, so this is most likely a grant or the schema changed
                // under a running purger: keep trying, loudly, rather than exit.
                metrics::pass_failed();
                let error = chain(&e);
                health.failing("postgres", error.clone());
                error!(error = %error, "Purge pass failed; retrying at the next interval.");
                config.interval
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    summary.purged = purger.purged();
    info!(
        passes = summary.passes,
        purged = summary.purged,
        "Purger stopped."
    );
    Ok(summary)
}

/// The error and its causes, `what: cause: cause`, each said once (drivers often repeat their
/// source in their own message).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// `FIRST_BACKOFF` doubled per attempt, at most `cap`.
fn backoff(attempt: u32, cap: Duration) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(16);
    FIRST_BACKOFF.saturating_mul(factor).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let cap = Duration::from_secs(5);
        let delays: Vec<_> = (1..=7).map(|a| backoff(a, cap).as_millis()).collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 5000, 5000]);
        assert_eq!(backoff(1000, MAX_BACKOFF), MAX_BACKOFF);
        assert_eq!(
            backoff(3, Duration::from_millis(10)),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn the_summary_line_is_what_scripts_parse() {
        let mut s = Summary {
            passes: 1,
            purged: 42,
            would_purge: None,
        };
        assert_eq!(s.to_string(), "purged 42 events");
        s.would_purge = Some(7);
        assert_eq!(s.to_string(), "would purge 7 events");
    }
}
