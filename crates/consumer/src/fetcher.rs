//! The fetcher: reads batches from PostgreSQL and queues them for the writer, so the next fetch
//! overlaps the current write.
//!
//! It reads past its read position with the shared position SQL (only below the visibility
//! horizon, so nothing can ever appear behind a position once passed) on the dedicated LISTEN
//! connection. A full batch (by rows or by bytes) is followed at once by the next. A short batch
//! means it is caught up; from then on each fetch is pipelined, in one round trip, with the
//! question "are there committed rows past my position that an open transaction still holds
//! back?" — asked *before* the fetch in the same pipeline, so a row either is counted there, or
//! commits later and its wake-up arrives later. If yes, it re-polls with a short backoff
//! (20 ms → 1 s) instead of waiting for a wake-up that already came, and after a while names the
//! blocking backend. If no, it waits for a wake-up, the fallback poll interval, or the
//! connection's end.
//!
//! Every fetch also reads the purge watermark, *after* the fetch in the same pipeline (PostgreSQL
//! runs them in order): a purge that removed rows this fetch would have returned committed before
//! the fetch, so the watermark read after it shows it. A watermark past the position the fetch
//! started from means events were purged before delivery: a gap, reported loudly; delivery goes
//! on from the oldest event still stored (which is what the fetch returned).
//!
//! **Rewinds.** The read position is only the fetcher's guess; the sink's checkpoint is the truth.
//! When the writer finds the checkpoint elsewhere (a sink that lost acknowledged writes), it
//! sends a [`Rewind`]; the fetcher then reads again from there, tagging its batches with the new
//! generation so the writer drops the ones fetched before.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use event_store::position::{self, Batch, Limits, Origin, Position, Reader, Watermark};
use futures_util::future::{try_join, try_join3};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::divergence::{self, Expected};
use crate::error::{Error, Result};
use crate::health::{Context, GAP};
use crate::listener::Listener;
use crate::sink::Delivery;
use crate::writer::Committed;
use event_store::retry::{sleep_or_stop, Policy, Retry, HORIZON_POLL};

/// How long committed events may wait behind an open transaction before the blocker is named.
const HELD_BACK_REPORT_AFTER: Duration = Duration::from_secs(5);
/// How often a continuing hold-back is reported again.
const HELD_BACK_REPORT_EVERY: Duration = Duration::from_secs(60);

/// "Read again from `position`": sent by the writer when the sink's checkpoint is not where the
/// fetcher's batches assumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rewind {
    pub generation: u64,
    pub position: Position,
}

/// One fetch's results.
struct Fetched {
    batch: Batch,
    watermark: Option<Watermark>,
    /// Asked only once caught up: rows past the position that the horizon holds back.
    beyond_horizon: Option<bool>,
}

/// The fetcher's state between fetches.
pub struct Fetcher {
    ctx: Arc<Context>,
    out: mpsc::Sender<Delivery>,
    rewinds: watch::Receiver<Rewind>,
    /// What the writer committed: the checkpoint a reconnect checks the database against.
    committed: watch::Receiver<Committed>,
    /// The database the batches are read from, recorded with each checkpoint.
    origin: Option<Arc<Origin>>,
    shutdown: CancellationToken,
    /// The read position: the end of the last batch queued, and the event there.
    after: Position,
    after_event_id: Option<uuid::Uuid>,
    generation: u64,
    caught_up: bool,
    retry: Retry,
    failures: u32,
    horizon: Retry,
    held_since: Option<Instant>,
    blocker_reported: Option<Instant>,
    gap_reported_to: Option<Position>,
    /// The pause the retry policy chose after the last failure.
    next_pause: Duration,
    /// Rows asked for per fetch: `--batch-size`, lowered while the byte bound is met by fewer
    /// rows than the server expected (see [`Fetcher::adapt`]).
    rows: usize,
}

impl Fetcher {
    pub fn new(
        ctx: Arc<Context>,
        start: Position,
        out: mpsc::Sender<Delivery>,
        rewinds: watch::Receiver<Rewind>,
        committed: watch::Receiver<Committed>,
        origin: Option<Origin>,
        shutdown: CancellationToken,
    ) -> Fetcher {
        let ctx_rows = ctx.limits.rows;
        Fetcher {
            ctx,
            out,
            rewinds,
            committed,
            origin: origin.map(Arc::new),
            shutdown,
            after: start,
            after_event_id: None,
            generation: 0,
            caught_up: false,
            retry: Retry::new(Policy::default()),
            failures: 0,
            horizon: Retry::new(HORIZON_POLL),
            held_since: None,
            blocker_reported: None,
            gap_reported_to: None,
            next_pause: Duration::ZERO,
            rows: ctx_rows,
        }
    }

    /// Runs until shutdown, or an error that waiting cannot fix. `first` is the connection made
    /// (and checked) at start-up, if still usable.
    pub async fn run(mut self, first: Option<(Listener, Reader)>) -> Result<()> {
        let mut live = first;
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            self.apply_rewind();
            let (conn, reader) = match live.take() {
                Some(live) if !live.0.is_closed() => live,
                _ => match self.reconnect().await? {
                    ControlFlow::Continue(Some(fresh)) => fresh,
                    ControlFlow::Continue(None) => continue,
                    ControlFlow::Break(()) => return Ok(()),
                },
            };
            let fetched = match self.fetch(&conn, &reader).await {
                Ok(fetched) => fetched,
                Err(e) => {
                    self.failed(&e, "Fetching events failed");
                    drop(conn);
                    if self.pause().await.is_break() {
                        return Ok(());
                    }
                    continue;
                }
            };
            self.ctx.postgres_ok();
            self.adapt(&fetched.batch);
            let more = fetched.batch.more;
            if self
                .queue(fetched.batch, fetched.watermark)
                .await
                .is_break()
            {
                return Ok(());
            }
            if more {
                self.caught_up = false;
            } else if !self.caught_up {
                // Just caught up: fetch once more, this time asking about the horizon as well.
                self.caught_up = true;
            } else if self
                .wait(&conn, fetched.beyond_horizon == Some(true))
                .await
                .is_break()
            {
                return Ok(());
            }
            live = Some((conn, reader));
        }
    }

    /// Adapts the rows asked for. The server bounds a batch's bytes by *stored* sizes, which are
    /// compressed for large values; a run of highly compressible payloads (a 1 MiB repeated
    /// string stores in a few KB) then sends far more text than the byte bound, which the reader
    /// drops unread. Asking for as many rows as fitted stops that waste at once; the limit grows
    /// back (doubling per full batch) to `--batch-size` when payloads shrink again.
    fn adapt(&mut self, batch: &Batch) {
        if batch.cut_on_text {
            self.rows = batch.scanned.max(1);
        } else if batch.scanned >= self.rows {
            self.rows = (self.rows * 2).min(self.ctx.limits.rows);
        }
    }

    /// Takes a rewind the writer sent, if any.
    fn apply_rewind(&mut self) {
        // By generation, not `has_changed`: waiting on `changed()` marks the value seen.
        let rewind = *self.rewinds.borrow_and_update();
        if rewind.generation != self.generation {
            info!(from = %self.after, to = %rewind.position,
                  "Reading again from the sink's checkpoint.");
            self.after = rewind.position;
            self.generation = rewind.generation;
            self.caught_up = false;
        }
    }

    /// A new connection; `Continue(None)` after a failed attempt (already paused).
    async fn reconnect(&mut self) -> Result<ControlFlow<(), Option<(Listener, Reader)>>> {
        let committed = *self.committed.borrow();
        let expected = Expected {
            position: committed.position,
            event_id: committed.event_id,
            origin: self.origin.as_deref().cloned(),
        };
        // The read position may be up to two batches past the checkpoint (queued, being
        // written): it is checked too, or a failover that lost the commits in between would let
        // those batches carry the checkpoint onto history the database no longer has.
        let read = (self.after != committed.position).then(|| Expected {
            position: self.after,
            event_id: self.after_event_id,
            origin: self.origin.as_deref().cloned(),
        });
        match connect(&self.ctx, &expected, read.as_ref()).await {
            Ok((listener, reader, origin)) => {
                self.origin = Some(Arc::new(origin));
                info!(
                    attempts = self.failures + 1,
                    "Connected to PostgreSQL; catching up."
                );
                if self.failures > 0 {
                    self.ctx.metrics.reconnects_postgres.increment(1);
                }
                self.failures = 0;
                self.retry.succeeded();
                self.ctx.postgres_ok();
                self.caught_up = false;
                Ok(ControlFlow::Continue(Some((listener, reader))))
            }
            Err(e @ Error::Integrity(_)) => Err(e),
            Err(e) => {
                self.failed(&e, "Cannot connect to PostgreSQL");
                if self.pause().await.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
                Ok(ControlFlow::Continue(None))
            }
        }
    }

    /// Logs a failure (attempt count and next pause, by the one retry policy) and marks
    /// PostgreSQL failing; the pause comes next.
    fn failed(&mut self, e: &Error, message: &'static str) {
        self.failures += 1;
        // Not fixed by waiting (a revoked privilege, a dropped table), but an operator can fix
        // it while we keep trying, at the slowest pace.
        let permanent = e.is_permanent();
        self.next_pause = self.retry.failed(message, e, permanent);
        self.ctx.postgres_failing(e);
    }

    async fn pause(&mut self) -> ControlFlow<()> {
        if sleep_or_stop(self.next_pause, &self.shutdown).await {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    /// One batch, the watermark, and (once caught up) the horizon question, in one round trip.
    async fn fetch(&self, conn: &Listener, reader: &Reader) -> Result<Fetched> {
        let client = conn.client();
        let topics = self.ctx.topics.as_deref();
        let limits = Limits {
            rows: self.rows,
            ..self.ctx.limits
        };
        let fetch = reader.fetch_bounded(client, self.after, limits, topics);
        let (beyond_horizon, batch, watermark) = if self.caught_up {
            let (beyond, batch, watermark) = try_join3(
                reader.pending_beyond_horizon(client, self.after),
                fetch,
                reader.watermark(client),
            )
            .await?;
            (Some(beyond), batch, watermark)
        } else {
            let (batch, watermark) = try_join(fetch, reader.watermark(client)).await?;
            (None, batch, watermark)
        };
        Ok(Fetched {
            batch,
            watermark,
            beyond_horizon,
        })
    }

    /// Checks the watermark for a gap, then queues the batch for the writer.
    async fn queue(&mut self, batch: Batch, watermark: Option<Watermark>) -> ControlFlow<()> {
        if let Some(watermark) = watermark {
            // No checkpoint yet (START): a new consumer starts at the oldest event, no gap — and
            // what was purged before it started is no gap later in this run either (purges go by
            // age, so a few rows below that watermark can still be stored and read after it).
            if self.after == Position::START && self.gap_reported_to.is_none() {
                self.gap_reported_to = Some(watermark.position);
            }
            if self.after != Position::START
                && watermark.position > self.after
                && self
                    .gap_reported_to
                    .is_none_or(|reported| watermark.position > reported)
            {
                report_gap(&self.ctx, self.after, &watermark, &batch);
                self.gap_reported_to = Some(watermark.position);
            }
        }
        let Some(end) = batch.end else {
            return ControlFlow::Continue(());
        };
        let end_event_id = batch.end_event_id;
        let mut delivery = (self.ctx.encoder)(batch, self.after, end);
        delivery.generation = self.generation;
        delivery.origin = self.origin.clone();
        tokio::select! {
            sent = self.out.send(delivery) => if sent.is_err() { return ControlFlow::Break(()) },
            _ = self.shutdown.cancelled() => return ControlFlow::Break(()),
        }
        self.after = end;
        self.after_event_id = end_event_id;
        ControlFlow::Continue(())
    }

    /// Caught up: waits for a wake-up, the fallback poll or the connection's end; or, while an
    /// open transaction holds committed rows back, re-polls with a short backoff.
    async fn wait(&mut self, conn: &Listener, held_back: bool) -> ControlFlow<()> {
        if held_back {
            let since = *self.held_since.get_or_insert_with(Instant::now);
            self.ctx.metrics.held_back(since.elapsed());
            if since.elapsed() >= HELD_BACK_REPORT_AFTER
                && self
                    .blocker_reported
                    .is_none_or(|at| at.elapsed() >= HELD_BACK_REPORT_EVERY)
            {
                self.blocker_reported = Some(Instant::now());
                report_blocker(&self.ctx, conn.client(), since.elapsed()).await;
            }
            let wait = self.horizon.next_pause(false);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // A wake-up may mean the blocker committed; but never poll faster than the
                // backoff's first step while held back.
                _ = async {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    self.ctx.wake.notified().await
                } => self.ctx.metrics.wakeups.increment(1),
                _ = conn.closed() => {}
                changed = self.rewinds.changed() => if changed.is_err() { return ControlFlow::Break(()) },
                _ = self.shutdown.cancelled() => return ControlFlow::Break(()),
            }
            return ControlFlow::Continue(());
        }
        if self.held_since.take().is_some() {
            self.horizon = Retry::new(HORIZON_POLL);
            self.blocker_reported = None;
            self.ctx.metrics.held_back(Duration::ZERO);
            *self.ctx.status.held_back_by.lock().unwrap() = None;
        }
        tokio::select! {
            _ = self.ctx.wake.notified() => self.ctx.metrics.wakeups.increment(1),
            _ = tokio::time::sleep(self.ctx.poll_interval) => {}
            _ = conn.closed() => {}
            // The writer is gone (it failed): stop rather than fetch for nobody.
            changed = self.rewinds.changed() => if changed.is_err() { return ControlFlow::Break(()) },
            _ = self.shutdown.cancelled() => return ControlFlow::Break(()),
        }
        ControlFlow::Continue(())
    }
}

/// A new dedicated connection, LISTENing, holding the consumer's lease, checked against the
/// checkpoint ([`divergence`]), statements prepared.
pub async fn connect(
    ctx: &Context,
    expected: &Expected,
    read: Option<&Expected>,
) -> Result<(Listener, Reader, Origin)> {
    let listener = Listener::connect(&ctx.pg, &ctx.channel, ctx.wake.clone()).await?;
    take_lease(listener.client(), &ctx.name).await?;
    let client = listener.client();
    let origin = divergence::check(client, &ctx.name, expected, ctx.accept_divergence).await?;
    if let Some(read) = read {
        divergence::check(client, &ctx.name, read, ctx.accept_divergence).await?;
    }
    let reader = Reader::prepare(listener.client()).await?;
    Ok((listener, reader, origin))
}

/// Takes the consumer's lease on this connection (see [`event_store::lease`]): while it is held,
/// `eventsctl reset` refuses to move the checkpoint, and a second process with the same name
/// waits instead of writing beside this one. The lease ends with the connection; should an
/// operator move the checkpoint while it is lost, the writer finds the checkpoint moved and
/// rewinds, so nothing is skipped either way.
pub async fn take_lease(client: &tokio_postgres::Client, name: &str) -> Result<()> {
    if event_store::lease::try_acquire(client, name).await? {
        return Ok(());
    }
    let holder = event_store::lease::holder(client, name)
        .await
        .ok()
        .flatten();
    Err(Error::LeaseHeld(format!(
        "another session holds the lease of consumer {name:?} ({}): another consumer with this \
         name is running, or `eventsctl reset` is moving its checkpoint; waiting for it to end",
        holder.map_or("holder not visible".into(), |h| h.to_string())
    )))
}

fn report_gap(ctx: &Context, after: Position, watermark: &Watermark, batch: &Batch) {
    let resumed_at = batch
        .events
        .first()
        .map(|e| e.position.to_string())
        .or_else(|| batch.end.map(|p| p.to_string()))
        .unwrap_or_else(|| "(nothing stored yet)".into());
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

async fn report_blocker(ctx: &Context, client: &tokio_postgres::Client, held: Duration) {
    match position::horizon_blocker(client).await {
        Ok(Some(blocker)) => {
            warn!(
                blocker = %blocker,
                pid = blocker.pid,
                held_back_for = %humantime::format_duration(Duration::from_secs(held.as_secs())),
                "Delivery is held back by an open transaction: committed events wait until it ends."
            );
            *ctx.status.held_back_by.lock().unwrap() = Some(blocker.to_string());
        }
        Ok(None) => {}
        Err(e) => debug!(error = %e, "Cannot name the transaction holding delivery back."),
    }
}
