//! What a pass did and why it left what it left: logged after every pass, recorded as metrics,
//! returned to callers (tests, `--once`).

use std::fmt;
use std::time::{Duration, SystemTime};

use event_store::position::{Position, PublishedPosition};
use tracing::field::display;
use tracing::{info, warn};

/// One pass.
#[derive(Debug, Clone, PartialEq)]
pub struct PassReport {
    /// Events created before this (database clock) were eligible.
    pub cutoff: SystemTime,
    /// Events deleted, in total.
    pub deleted: u64,
    /// Of those, deleted past an active consumer's position (`--force` only).
    pub deleted_past_consumers: u64,
    /// `--dry-run`: what the pass would have deleted (nothing was).
    pub would_delete: Option<u64>,
    /// DELETE statements run.
    pub batches: u32,
    /// Stopped early because of a shutdown request (between batches).
    pub interrupted: bool,
    /// The oldest event left, by position (the first one a new consumer would read).
    pub oldest: Option<Oldest>,
    /// Why events older than the retention are still there, if any are.
    pub held_back: Option<HeldBack>,
    /// Consumers past `--consumer-expiry`, and what they lose (or would, in a dry run).
    pub expired: Vec<Affected>,
    /// `--force`: active consumers that lose unread events (or would, in a dry run).
    pub overridden: Vec<Affected>,
    pub duration: Duration,
}

/// The oldest event left in the table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Oldest {
    pub position: Position,
    pub created_at: SystemTime,
    /// Its age by the database clock at the end of the pass.
    pub age: Duration,
}

/// Why old events stay.
#[derive(Debug, Clone, PartialEq)]
pub enum HeldBack {
    /// The slowest active consumer has not read them yet.
    Consumer {
        consumer: PublishedPosition,
        /// How long ago it last published its position.
        idle: Duration,
        /// The oldest event kept for it.
        first_kept: Position,
    },
    /// An older transaction is still open, so nobody can have read them yet (the visibility
    /// horizon); they go once it ends.
    OpenTransaction { first_kept: Position },
}

/// A consumer that loses unread events in this pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Affected {
    pub consumer: PublishedPosition,
    /// How long ago it last published its position.
    pub idle: Duration,
    /// Events past its position that the pass deletes (counted just before deleting).
    pub events: u64,
}

impl PassReport {
    /// The pass summary line (warnings about affected consumers are logged as the pass starts).
    pub fn log(&self) {
        let oldest = self.oldest.map(|o| display(o.position));
        let oldest_age = self.oldest.map(|o| display(short(o.age)));
        let held_back_by = self.held_back.as_ref().map(display);
        let duration_ms = self.duration.as_millis() as u64;
        if let Some(would) = self.would_delete {
            info!(
                would_delete = would,
                oldest, oldest_age, held_back_by, duration_ms, "Dry run: nothing deleted."
            );
        } else if self.interrupted {
            info!(
                deleted = self.deleted,
                batches = self.batches,
                duration_ms,
                "Purge pass stopped early for shutdown."
            );
        } else {
            info!(
                deleted = self.deleted,
                deleted_past_consumers = self.deleted_past_consumers,
                batches = self.batches,
                oldest,
                oldest_age,
                held_back_by,
                duration_ms,
                "Purge pass finished."
            );
        }
        if let Some(held) = &self.held_back {
            if matches!(held, HeldBack::Consumer { .. }) {
                warn!(
                    held_back_by = %held,
                    "Events older than the retention are kept because a consumer has not read \
                     them yet."
                );
            }
        }
    }
}

impl fmt::Display for HeldBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeldBack::Consumer {
                consumer,
                idle,
                first_kept,
            } => write!(
                f,
                "consumer {:?} at position {} (published {} ago; first kept event {})",
                consumer.consumer,
                consumer.position,
                short(*idle),
                first_kept
            ),
            HeldBack::OpenTransaction { first_kept } => write!(
                f,
                "an open transaction holding the visibility horizon (first kept event {first_kept})"
            ),
        }
    }
}

/// Whole seconds: `3days 2h 5m 1s`, not nanoseconds.
pub(crate) fn short(duration: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(duration.as_secs()))
}
