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
//! [`run`] is the service: start-up check, passes on a timer, retries with the shared policy
//! ([`event_store::retry`]), and a clean stop between batches on SIGTERM.

pub mod config;
pub mod metrics;
pub mod pass;
pub mod plan;
pub mod report;

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use event_store::{db, retry};
use services::ops;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{Config, Settings};
pub use pass::Purger;
pub use report::{HeldBack, PassReport};

/// How the purger retries: 250 ms doubling to 30 s; a permanent error (a revoked grant) waits
/// the 30 s at once, so it shows as a line or two a minute, not a storm.
const RETRY: retry::Policy = retry::Policy {
    first: Duration::from_millis(250),
    cap: Duration::from_secs(30),
    healthy_after: Duration::from_secs(60),
};

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
/// Errors (non-zero exit) at start-up for what retrying cannot fix: an unparseable URL or TLS
/// setting, a port that cannot be bound, a missing schema or privilege, a failed login, a
/// certificate that fails verification. Transient database errors are retried with
/// [`event_store::retry`]; errors that appear after a good start-up are retried at the longest
/// pause, and `/healthz` says why. With `--once`, the purger gives up after `--give-up-after`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<Summary> {
    let pg = db::config(&config.postgres.database_url, "events-purger")?;
    let target = db::describe(&pg);
    let settings = config.settings();
    let health = ops::Health::new();
    health.failing("postgres", "not connected yet");
    ops::spawn(config.http.http_addr, health.clone(), shutdown.clone()).await?;
    info!(
        database = %target,
        tls = %pg.tls().describe(),
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
    let started = tokio::time::Instant::now();
    let mut checked = false;
    let mut retry = retry::Retry::new(RETRY);
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
                if retry.succeeded() {
                    info!(
                        attempts = retry.attempt(),
                        "Purging again after failed passes."
                    );
                }
                health.ok("postgres");
                report.log();
                summary.passes += 1;
                summary.would_purge = report.would_delete;
                if config.once || report.interrupted {
                    break;
                }
                config.interval
            }
            // Start-up: what retrying cannot fix ends the run, with the report and what to do.
            Err(e) if !e.is_transient() && !checked => {
                return Err(e).with_context(|| format!("purging {target}"));
            }
            Err(e) => {
                metrics::pass_failed();
                let error = e.to_string();
                health.failing("postgres", error.clone());
                if config.once && started.elapsed() >= config.give_up_after {
                    return Err(e).with_context(|| {
                        format!(
                            "purging {target}: gave up after {} of failed attempts \
                             (--give-up-after)",
                            humantime::format_duration(config.give_up_after)
                        )
                    });
                }
                // After a good start-up a grant or the schema changed under a running purger:
                // keep trying, loudly but rarely, rather than exit.
                let permanent = !e.is_transient();
                let pause = retry.failed("Purge pass failed", &error, permanent);
                if config.once {
                    let left = config.give_up_after.saturating_sub(started.elapsed());
                    pause.min(left.max(Duration::from_millis(10)))
                } else {
                    pause
                }
            }
        };
        if retry::sleep_or_stop(wait, &shutdown).await {
            break;
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

#[cfg(test)]
mod tests {
    use super::*;

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
