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
use std::time::{Duration, Instant};

use event_store::Position;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::Result;
use crate::fetcher::report_gap;
use crate::health::Context;
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
            retry: Retry::new(Policy::default()),
            generation: 0,
        }
    }

    pub async fn run(mut self) -> Result<()> {
        loop {
            let fetched = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(()),
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
                let pause =
                    self.retry
                        .failed("Writing a batch failed", &error, error.decision().is_slow());
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
                self.rewind(delivery.start, checkpoint);
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

    fn rewind(&mut self, expected: Position, checkpoint: Option<Checkpoint>) {
        let checkpoint = checkpoint.unwrap_or_default();
        let position = checkpoint.position;
        warn!(
            expected = %expected,
            checkpoint = %position,
            "The sink's checkpoint is not where this consumer's last write left it (the sink lost \
             acknowledged writes, or an operator moved it); delivering again from the checkpoint."
        );
        self.generation += 1;
        self.ctx.metrics.rewinds.increment(1);
        self.rewinds.send_replace(Rewind {
            generation: self.generation,
            position,
        });
        let rewinds = self.committed.borrow().rewinds + 1;
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
