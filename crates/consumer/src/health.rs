//! What the fetcher, the writer and the monitor share, and how their observations become
//! health (`/healthz`) and metrics.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_store::position::Limits;
use services::ops::Health;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::sink::{DeadLetter, Encoder};

/// Health check names.
pub const POSTGRES: &str = "postgres";
pub const DELIVERY: &str = "delivery";
pub const GAP: &str = "gap";
pub const DEAD_LETTERS: &str = "dead_letters";

/// What the fetcher, the writer and the monitor share.
pub struct Context {
    pub name: String,
    pub pg: event_store::db::Database,
    pub channel: String,
    pub topics: Option<Vec<String>>,
    pub limits: Limits,
    pub poll_interval: Duration,
    pub health: Arc<Health>,
    pub metrics: Metrics,
    pub status: Status,
    pub wake: Arc<Notify>,
    /// The check name the sink reports under (`mongodb`, also for the null sink).
    pub sink_check: &'static str,
    /// Prepares batches in the sink's format before they are queued.
    pub encoder: Encoder,
    /// `--accept-divergence`.
    pub accept_divergence: bool,
    /// Dead letters recorded by this run, for `/healthz`.
    pub dead_letters: std::sync::atomic::AtomicU64,
    /// The consumer group partition this is (`None`: a consumer of its own). A partition's
    /// ownership is the group's lease, not the advisory one.
    pub partition: Option<event_store::group::Partition>,
    /// When a write last succeeded, for the group member: a busy sink that answers writes but
    /// is slow to answer probes is still reachable.
    pub sink_reached: Option<Reached>,
}

/// When the sink was last reached (shared by a group member's partitions).
pub type Reached = Arc<Mutex<Option<Instant>>>;

/// Observations the monitor turns into health.
#[derive(Default)]
pub struct Status {
    pub(crate) last_commit: Mutex<Option<Instant>>,
    pub(crate) held_back_by: Mutex<Option<String>>,
    postgres_error: Mutex<Option<String>>,
    pub(crate) sink_error: Mutex<Option<String>>,
    /// A write or a probe found the sink unreachable, and nothing has succeeded since.
    sink_down: std::sync::atomic::AtomicBool,
}

impl Status {
    pub fn since_last_commit(&self, started: Instant) -> Duration {
        self.last_commit
            .lock()
            .unwrap()
            .unwrap_or(started)
            .elapsed()
    }
    pub fn held_back_by(&self) -> Option<String> {
        self.held_back_by.lock().unwrap().clone()
    }
    pub fn postgres_error(&self) -> Option<String> {
        self.postgres_error.lock().unwrap().clone()
    }
    pub fn sink_error(&self) -> Option<String> {
        self.sink_error.lock().unwrap().clone()
    }
}

impl Context {
    /// A sink write (`write_error`) or probe failed.
    pub fn sink_failing(&self, reason: String, write_error: bool) {
        self.health.failing(self.sink_check, reason.clone());
        if !self.status.sink_down.swap(true, Ordering::Relaxed) {
            // Said once per outage; the recovery is logged by `sink_ok`.
            warn!(sink = self.sink_check, error = %reason, "The sink is unreachable; delivery waits for it.");
        }
        if write_error {
            *self.status.sink_error.lock().unwrap() = Some(reason);
        }
    }

    /// A sink write (`write_ok`) or probe succeeded. Counts a recovery when the sink had been
    /// found unreachable; a probe cannot clear a failing write.
    pub fn sink_ok(&self, write_ok: bool) {
        if let (true, Some(reached)) = (write_ok, &self.sink_reached) {
            *reached.lock().unwrap() = Some(Instant::now());
        }
        if write_ok {
            self.status.sink_error.lock().unwrap().take();
        } else if self.status.sink_error.lock().unwrap().is_some() {
            return;
        }
        if self.status.sink_down.swap(false, Ordering::Relaxed) {
            info!(sink = self.sink_check, "The sink is reachable again.");
            self.metrics.reconnects_mongodb.increment(1);
            self.health.ok(self.sink_check);
        }
    }

    /// A dead letter was recorded: said loudly, counted, shown on `/healthz` (without failing it:
    /// the stream goes on, and the event is kept in `deadLetters` for an operator).
    pub fn dead_lettered(&self, letter: &DeadLetter) {
        warn!(
            event = %letter.position,
            id = letter.id(),
            event_id = ?letter.event_id,
            topic = letter.topic.as_deref().unwrap_or("?"),
            reason = letter.code,
            detail = %letter.detail,
            "An event cannot be stored; recorded it in deadLetters and went on."
        );
        self.metrics.dead_letter(letter.code);
        let total = self.dead_letters.fetch_add(1, Ordering::Relaxed) + 1;
        self.health.note(
            DEAD_LETTERS,
            format!(
                "{total} since start, the last event {} ({}); see the deadLetters collection",
                letter.position, letter.code
            ),
        );
    }

    pub fn postgres_failing(&self, error: &dyn std::fmt::Display) {
        let reason = error.to_string();
        self.health.failing(POSTGRES, reason.clone());
        *self.status.postgres_error.lock().unwrap() = Some(reason);
    }

    pub fn postgres_ok(&self) {
        if self.status.postgres_error.lock().unwrap().take().is_some() {
            self.health.ok(POSTGRES);
        }
    }
}
