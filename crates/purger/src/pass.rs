//! One purge pass: decide what may go, warn whom it affects, delete in batches, report.
//!
//! Every batch is a single autocommit statement ([`position::purge_step`]): it picks up to
//! `batch_size` events along the `created_at` index that are older than the cut-off, below the
//! visibility horizon and at or before the slowest active consumer's position, deletes them, and
//! raises the purge watermark in the same statement. Nothing is held between batches, so the pass
//! can stop cleanly between any two of them, and no lock outlives a batch.
//!
//! The cut-off and the consumers' idle times use the database clock, because the database stamps
//! `created_at` and `updated_at`.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::Pool;
use event_store::db;
use event_store::db::Database;
use event_store::error::{Error, Result};
use event_store::migrations::{self, Role};
use event_store::position::{self, Position};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Settings;
use crate::metrics;
use crate::plan::{idle, Plan};
use crate::report::{short, Affected, HeldBack, Oldest, PassReport};

/// The purger: a connection (re-made after failures) and what it remembers between passes.
pub struct Purger {
    pool: Pool,
    target: String,
    settings: Settings,
    /// Expired consumers already warned about (warned again only when they lose events).
    warned_expired: HashSet<String>,
    /// Consumers that ever held purging back (for their metric).
    holders: BTreeSet<String>,
    purged: u64,
}

impl Purger {
    /// No connection is made yet: the first pass (or [`Purger::check`]) makes it.
    pub fn new(config: Database, settings: Settings) -> Result<Purger> {
        let target = db::describe(&config);
        Ok(Purger {
            pool: db::pool(config, 1)?,
            target,
            settings,
            warned_expired: HashSet::new(),
            holders: BTreeSet::new(),
            purged: 0,
        })
    }

    /// Connects to `url` (for tests and embedding).
    pub fn connect(url: &str, settings: Settings) -> Result<Purger> {
        Purger::new(db::config(url, "events-purger")?, settings)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Events deleted by this purger since it was made.
    pub fn purged(&self) -> u64 {
        self.purged
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|source| Error::Pool {
            context: format!(
                "cannot connect to PostgreSQL at {} — is it running? check DATABASE_URL",
                self.target
            ),
            source,
        })
    }

    /// The start-up check: the schema exists and the connected role may purge.
    pub async fn check(&self) -> Result<()> {
        let client = self.client().await?;
        migrations::check(&client, Role::Purger).await
    }

    /// One pass. Stops between batches once `shutdown` is cancelled (the report says so).
    pub async fn pass(&mut self, shutdown: &CancellationToken) -> Result<PassReport> {
        let started = Instant::now();
        let client = self.client().await?;
        let now = db::now(&client).await?;
        let cutoff = now
            .checked_sub(self.settings.retention)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let positions = position::published_positions(&client).await?;
        let plan = Plan::decide(
            &positions,
            now,
            self.settings.consumer_expiry,
            self.settings.force,
        );
        let expired = self.warn_expired(&client, &plan, cutoff, now).await?;
        let overridden = self.warn_overridden(&client, &plan, cutoff, now).await?;

        let mut report = PassReport {
            cutoff,
            deleted: 0,
            deleted_past_consumers: 0,
            would_delete: None,
            batches: 0,
            interrupted: false,
            oldest: None,
            held_back: None,
            expired,
            overridden,
            duration: Duration::ZERO,
        };
        // What stays for consumers after the pass: nothing with --force.
        let kept_after = if self.settings.force {
            None
        } else {
            plan.keep_after
        };
        if self.settings.dry_run {
            report.would_delete = Some(position::purgeable(&client, cutoff, kept_after).await?);
        } else {
            // A forced pass first purges what is safe, so that only events past a consumer are
            // recorded as a forced purge, then the rest.
            self.purge(
                &client,
                &mut report,
                cutoff,
                plan.keep_after,
                false,
                shutdown,
            )
            .await?;
            if self.settings.force && !report.interrupted {
                self.purge(&client, &mut report, cutoff, None, true, shutdown)
                    .await?;
            }
        }

        let kept = position::kept(&client, cutoff, kept_after).await?;
        report.held_back = match (kept.by_position, kept.by_horizon, &plan.slowest) {
            (Some((first_kept, _)), _, Some(slowest)) => Some(HeldBack::Consumer {
                consumer: slowest.clone(),
                idle: idle(slowest, now),
                first_kept,
            }),
            (_, Some((first_kept, _)), _) => Some(HeldBack::OpenTransaction { first_kept }),
            _ => None,
        };
        let end = now + started.elapsed();
        report.oldest = position::oldest(&client)
            .await?
            .map(|(position, created_at)| Oldest {
                position,
                created_at,
                age: end.duration_since(created_at).unwrap_or_default(),
            });
        report.duration = started.elapsed();
        metrics::pass_finished(&report, &mut self.holders);
        Ok(report)
    }

    /// Batches until fewer than a full batch goes, or shutdown. `keep_after` None + `forced`: the
    /// second half of a forced pass.
    async fn purge(
        &mut self,
        client: &Client,
        report: &mut PassReport,
        cutoff: SystemTime,
        keep_after: Option<Position>,
        forced: bool,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let limit = i64::from(self.settings.batch_size.max(1));
        if let Some(keep) = keep_after {
            // Nothing at or before the slowest consumer is left (it has not moved since the last
            // pass): skip the scan, which would only walk the old events kept for it.
            let first = position::oldest(client).await?;
            if first.is_none_or(|(first, _)| first > keep) {
                return Ok(());
            }
        }
        let mut resume_from = None;
        loop {
            let step = position::purge_step(client, cutoff, keep_after, resume_from, limit, forced)
                .await?;
            report.batches += 1;
            report.deleted += step.deleted;
            if forced {
                report.deleted_past_consumers += step.deleted;
            }
            self.purged += step.deleted;
            metrics::purged(step.deleted, forced);
            debug!(deleted = step.deleted, highest = ?step.highest, forced, "Purged a batch.");
            if (step.deleted as i64) < limit {
                return Ok(());
            }
            resume_from = step.resume_from;
            if shutdown.is_cancelled() {
                report.interrupted = true;
                return Ok(());
            }
            if !self.settings.batch_pause.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        report.interrupted = true;
                        return Ok(());
                    }
                    _ = tokio::time::sleep(self.settings.batch_pause) => {}
                }
            }
        }
    }

    /// Expired consumers no longer hold purging back: say so loudly, with what they lose. Warned
    /// once per consumer, and again whenever a pass takes events from it.
    async fn warn_expired(
        &mut self,
        client: &Client,
        plan: &Plan,
        cutoff: SystemTime,
        now: SystemTime,
    ) -> Result<Vec<Affected>> {
        let limit = if self.settings.force {
            None
        } else {
            plan.keep_after
        };
        let mut affected = Vec::new();
        for consumer in &plan.expired {
            let events = position::purgeable_past(client, cutoff, consumer.position, limit).await?;
            let idle = idle(consumer, now);
            let first_time = self.warned_expired.insert(consumer.consumer.clone());
            if events > 0 || first_time {
                warn!(
                    consumer = %consumer.consumer,
                    position = %consumer.position,
                    idle = %short(idle),
                    events,
                    dry_run = self.settings.dry_run,
                    "Consumer {:?} has not published its position for {} (longer than \
                     --consumer-expiry) and no longer holds purging back: {} unread events past \
                     its position {} {} in this pass, and it will report the gap if it returns.",
                    consumer.consumer,
                    short(idle),
                    events,
                    consumer.position,
                    if self.settings.dry_run { "would go" } else { "go" }
                );
            } else {
                info!(consumer = %consumer.consumer, "Consumer still expired; ignored.");
            }
            affected.push(Affected {
                consumer: consumer.clone(),
                idle,
                events,
            });
        }
        Ok(affected)
    }

    /// `--force`: name every active consumer that loses unread events, and how many.
    async fn warn_overridden(
        &self,
        client: &Client,
        plan: &Plan,
        cutoff: SystemTime,
        now: SystemTime,
    ) -> Result<Vec<Affected>> {
        let mut affected = Vec::new();
        for consumer in &plan.overridden {
            let events = position::purgeable_past(client, cutoff, consumer.position, None).await?;
            if events == 0 {
                continue;
            }
            let idle = idle(consumer, now);
            warn!(
                consumer = %consumer.consumer,
                position = %consumer.position,
                idle = %short(idle),
                events,
                dry_run = self.settings.dry_run,
                "Forced purge: consumer {:?} {} {} unread events past its position {}; the \
                 watermark records the purge as forced and the consumer will report the gap.",
                consumer.consumer,
                if self.settings.dry_run { "would lose" } else { "loses" },
                events,
                consumer.position
            );
            affected.push(Affected {
                consumer: consumer.clone(),
                idle,
                events,
            });
        }
        Ok(affected)
    }
}
