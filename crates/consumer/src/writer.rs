//! The writer: stores each queued batch in the sink, then publishes the committed position.
//!
//! A failed write is retried with capped backoff, but never blindly: after any failure the writer
//! reads the sink's checkpoint again (the sink may have lost writes it had acknowledged, or an
//! operator moved it). When the checkpoint is where the batch starts, the same batch is written
//! again; otherwise the fetcher is rewound to the checkpoint and the batches fetched before are
//! dropped. Re-delivery is harmless (`_id` = event id), so nothing is lost and nothing doubled.
//!
//! **Shutdown.** The writer finishes the write in flight (up to a grace period) and stops between
//! batches. Queued batches are simply fetched again on restart, from the checkpoint.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use event_store::position::Watermark;
use event_store::Position;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::error::Result;
use crate::health::{Context, GAP};
use crate::sink::{Checkpoint, Delivery, Sink, SinkError, Written};
use event_store::follow::{Rewind, Step};
use event_store::retry::Decision;
use event_store::retry::{sleep_or_stop, Policy, Retry};

/// How long a write in flight may finish after shutdown was requested.
const WRITE_GRACE: Duration = Duration::from_secs(10);

/// The position the writer has committed to the sink, for the publisher and the monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Committed {
    pub position: Position,
    /// The event at `position` (for the divergence check after a reconnect).
    pub event_id: Option<uuid::Uuid>,
    /// Bumped when the position moved back (a rewind): the publisher then lets the published
    /// position move back too, so the purger keeps what will be delivered again.
    pub rewinds: u64,
}

pub struct Writer<S: Sink> {
    ctx: Arc<Context>,
    sink: S,
    input: mpsc::Receiver<Step<Delivery>>,
    rewinds: watch::Sender<Rewind>,
    committed: watch::Sender<Committed>,
    shutdown: CancellationToken,
    retry: Retry,
    generation: u64,
}

impl<S: Sink> Writer<S> {
    pub fn new(
        ctx: Arc<Context>,
        sink: S,
        input: mpsc::Receiver<Step<Delivery>>,
        rewinds: watch::Sender<Rewind>,
        committed: watch::Sender<Committed>,
        shutdown: CancellationToken,
    ) -> Writer<S> {
        Writer {
            ctx,
            sink,
            input,
            rewinds,
            committed,
            shutdown,
            // A stored batch is progress, not a reconnect that may fail again at once: the count
            // starts again after each one, so a receiver failing one request in three slows
            // delivery by a retry, not by the policy's cap.
            retry: Retry::new(Policy {
                healthy_after: Duration::ZERO,
                ..Policy::default()
            }),
            generation: 0,
        }
    }

    pub async fn run(mut self) -> Result<()> {
        // Between batches and while the stream is idle, the sink gets to do its own work.
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let fetched = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = housekeeping.tick() => {
                    self.housekeeping().await;
                    continue;
                }
                next = self.input.recv() => match next {
                    Some(Step::Batch(fetched)) => fetched,
                    Some(Step::CaughtUp { .. }) => continue,
                    None => return Ok(()),
                },
            };
            if let Some(watermark) = &fetched.gap {
                report_gap(&self.ctx, fetched.after, watermark, &fetched.item);
            }
            if fetched.end == fetched.after {
                continue; // a gap with nothing stored past it: nothing to write
            }
            let mut delivery = fetched.item;
            delivery.generation = fetched.generation;
            if delivery.generation != self.generation {
                continue; // fetched before a rewind
            }
            match self.deliver(&delivery).await? {
                ControlFlow::Break(()) => return Ok(()),
                ControlFlow::Continue(Some(written)) => self.delivered(&delivery, written),
                ControlFlow::Continue(None) => {} // rewound
            }
        }
    }

    /// Writes one delivery until it sticks. `Continue(None)`: the fetcher was rewound instead.
    async fn deliver(&mut self, delivery: &Delivery) -> Result<ControlFlow<(), Option<Written>>> {
        let mut failures = 0u32;
        loop {
            let result = tokio::select! {
                result = self.sink.write(delivery) => result,
                _ = async { self.shutdown.cancelled().await; tokio::time::sleep(WRITE_GRACE).await } => {
                    warn!("Stopping with a batch write still in flight; it is written again on restart.");
                    return Ok(ControlFlow::Break(()));
                }
            };
            let error = match result {
                Ok(written) => {
                    if self.retry.succeeded() {
                        info!(
                            attempts = failures + 1,
                            "Writes succeed again; delivery resumed."
                        );
                    }
                    self.ctx.sink_ok(true);
                    return Ok(ControlFlow::Continue(Some(written)));
                }
                Err(e) if e.decision() == Decision::Never => return Err(e.into()),
                Err(e) => e,
            };
            failures += 1;
            if let SinkError::CheckpointMoved { .. } = error {
                warn!(error = %error, "The sink's checkpoint moved under this consumer.");
            } else {
                // Credentials or privileges are not fixed by waiting, but an operator can fix them
                // while we keep trying, at the slowest pace.
                let pause = self
                    .retry
                    .failed("Writing a batch failed", &error, error.decision().is_slow())
                    .max(error.retry_after().unwrap_or_default());
                self.ctx.sink_failing(error.to_string(), true);
                if sleep_or_stop(pause, &self.shutdown).await {
                    return Ok(ControlFlow::Break(()));
                }
            }
            // The checkpoint is the truth: read it before writing anything again.
            let checkpoint = match self.reopen().await? {
                ControlFlow::Continue(checkpoint) => checkpoint,
                ControlFlow::Break(()) => return Ok(ControlFlow::Break(())),
            };
            if checkpoint.as_ref().map_or(Position::START, |c| c.position) != delivery.start {
                self.rewind(delivery, checkpoint);
                return Ok(ControlFlow::Continue(None));
            }
            if matches!(error, SinkError::CheckpointMoved { .. }) {
                // Reported moved, read back where expected (a concurrent change in between):
                // never a tight loop.
                if sleep_or_stop(self.retry.next_pause(false), &self.shutdown).await {
                    return Ok(ControlFlow::Break(()));
                }
            }
        }
    }

    async fn housekeeping(&mut self) {
        let work = self.sink.housekeeping();
        let result = tokio::select! {
            result = work => result,
            _ = self.shutdown.cancelled() => Ok(()),
        };
        if let Err(e) = result {
            warn!(error = %e, "The sink's housekeeping failed; trying again later.");
        }
    }

    /// Reads the checkpoint, retrying until the sink answers.
    async fn reopen(&mut self) -> Result<ControlFlow<(), Option<Checkpoint>>> {
        let mut attempt = 0u32;
        loop {
            match self.sink.open().await {
                Ok(checkpoint) => return Ok(ControlFlow::Continue(checkpoint)),
                Err(e) if e.decision() == Decision::Never => return Err(e.into()),
                Err(e) => {
                    attempt += 1;
                    debug!(error = %e, attempt, "Cannot read the checkpoint yet; retrying.");
                    self.ctx.sink_failing(e.to_string(), true);
                    let pause = self.retry.next_pause(e.decision().is_slow());
                    if sleep_or_stop(pause, &self.shutdown).await {
                        return Ok(ControlFlow::Break(()));
                    }
                }
            }
        }
    }

    fn rewind(&mut self, delivery: &Delivery, checkpoint: Option<Checkpoint>) {
        let checkpoint = checkpoint.unwrap_or_default();
        let position = checkpoint.position;
        let partly = position > delivery.start && position <= delivery.end;
        if partly {
            // A sink that stores a batch in several steps (webhook requests) got this far before
            // failing: progress, and nothing is delivered twice by going on from there.
            info!(stored_up_to = %position, end = %delivery.end,
                  "The sink stored part of the batch before failing; going on after that part.");
            self.retry.succeeded();
        } else {
            warn!(
                expected = %delivery.start,
                checkpoint = %position,
                "The sink's checkpoint is not where this consumer's last write left it (the sink \
                 lost acknowledged writes, or an operator moved it); delivering again from the \
                 checkpoint."
            );
            self.ctx.metrics.rewinds.increment(1);
        }
        self.generation += 1;
        self.rewinds.send_replace(Rewind {
            generation: self.generation,
            position,
        });
        // Only a move back lets the published position move back (the purger must keep what
        // will be delivered again).
        let rewinds = self.committed.borrow().rewinds + u64::from(!partly);
        self.committed.send_replace(Committed {
            position,
            event_id: checkpoint.event_id,
            rewinds,
        });
        self.ctx.metrics.position(position);
    }

    fn delivered(&mut self, delivery: &Delivery, written: Written) {
        let count = delivery.events.len() as u64;
        let metrics = &self.ctx.metrics;
        metrics.delivered.increment(written.inserted as u64);
        metrics
            .redelivered
            .increment(written.already_present as u64);
        metrics.batches.increment(1);
        metrics.position(delivery.end);
        for letter in &written.dead_letters {
            self.ctx.dead_lettered(letter);
        }
        *self.ctx.status.last_commit.lock().unwrap() = Some(Instant::now());
        self.committed.send_modify(|c| {
            c.position = delivery.end;
            c.event_id = delivery.end_event_id;
        });
        if written.already_present > 0 {
            info!(
                already_present = written.already_present,
                inserted = written.inserted,
                "Some events of a batch were already stored (a re-delivery); not duplicated."
            );
        }
        debug!(events = count, position = %delivery.end, "Batch delivered.");
    }
}

/// Events this consumer had not delivered were purged (a forced purge, or it was idle longer than
/// the purger's consumer expiry): said loudly in the log, the metrics and `/healthz`.
pub fn report_gap(ctx: &Context, after: Position, watermark: &Watermark, delivery: &Delivery) {
    let resumed_at = match delivery.events.first() {
        Some(first) => first.position.to_string(),
        // Nothing stored past the gap yet (every unread event was purged).
        None if delivery.end == after => "the next event written".to_string(),
        None => delivery.end.to_string(),
    };
    let cause = if watermark.forced {
        "a forced purge"
    } else {
        "a purge past this consumer (it was idle longer than the purger's consumer expiry)"
    };
    error!(
        consumer = %ctx.name,
        missing_after = %after,
        missing_up_to = %watermark.position,
        resumed_at = %resumed_at,
        forced = watermark.forced,
        "Events this consumer had not delivered were purged: events after {after} up to and \
         including {} may be missing. Continuing from the oldest event still stored.",
        watermark.position
    );
    ctx.metrics.gaps.increment(1);
    let when = humantime::format_rfc3339_seconds(SystemTime::now());
    ctx.health.failing(
        GAP,
        format!(
            "events after {after} up to {} were purged before delivery ({cause}), detected \
             {when}; delivery continued at {resumed_at}. Restart the consumer to clear this \
             once the gap is dealt with",
            watermark.position
        ),
    );
}
