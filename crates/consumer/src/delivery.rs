//! The delivery loop: a fetcher reading batches from PostgreSQL and a writer storing them in the
//! sink, joined by a one-slot queue so the next fetch overlaps the current write.
//!
//! **Fetcher.** Reads batches past its read position with the shared position SQL (only below the
//! visibility horizon, so nothing can ever appear behind a position once passed) on the dedicated
//! LISTEN connection. A full batch is followed at once by the next. A short batch means it is
//! caught up; from then on each fetch is pipelined, in one round trip, with the question "are
//! there committed rows past my position that an open transaction still holds back?" — asked
//! *before* the fetch in the same pipeline, so a row either is counted there, or commits later and
//! its wake-up arrives later. If yes, it re-polls with a short backoff (20 ms → 1 s) instead of
//! waiting for a wake-up that already came, and after a while names the blocking backend. If no,
//! it waits for a wake-up, the fallback poll interval, or the connection's end.
//!
//! Every fetch also reads the purge watermark, *after* the fetch in the same pipeline (PostgreSQL
//! runs them in order): a purge that removed rows this fetch would have returned committed before
//! the fetch, so the watermark read after it shows it. A watermark past the position the fetch
//! started from means events were purged before delivery: a gap, reported loudly; delivery goes
//! on from the oldest event still stored (which is what the fetch returned).
//!
//! **Writer.** Stores each batch with its end position (the checkpoint) in the sink, retrying the
//! same batch with capped backoff until it succeeds, then publishes the committed position for
//! the purger (on a pool connection, by another task: never blocking delivery).
//!
//! **Shutdown.** The fetcher stops at once; the writer finishes the write in flight (up to a
//! grace period) and stops between batches. Queued batches are simply fetched again on restart,
//! from the checkpoint — nothing is lost, and `_id` = event id means nothing is doubled.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use event_store::ops::Health;
use event_store::position::{self, Batch, Position, Reader, Watermark};
use futures_util::future::{try_join, try_join3};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::sink::{Delivery, Encoder, Sink};

/// How long committed events may wait behind an open transaction before the blocker is named.
const HELD_BACK_REPORT_AFTER: Duration = Duration::from_secs(5);
/// How often a continuing hold-back is reported again.
const HELD_BACK_REPORT_EVERY: Duration = Duration::from_secs(60);
/// How long a write in flight may finish after shutdown was requested.
const WRITE_GRACE: Duration = Duration::from_secs(10);

/// Health check names.
pub const POSTGRES: &str = "postgres";
pub const MONGODB: &str = "mongodb";
pub const DELIVERY: &str = "delivery";
pub const GAP: &str = "gap";

/// What the fetcher, the writer and the monitor share.
pub struct Context {
    pub name: String,
    pub pg: event_store::db::Database,
    pub channel: String,
    pub topics: Option<Vec<String>>,
    pub batch_size: usize,
    pub poll_interval: Duration,
    pub health: Arc<Health>,
    pub metrics: Metrics,
    pub status: Status,
    pub wake: Arc<Notify>,
    /// The check name the sink reports under (`mongodb`, also for the null sink).
    pub sink_check: &'static str,
    /// Prepares batches in the sink's format before they are queued.
    pub encoder: Encoder,
}

/// Observations the monitor turns into health.
#[derive(Default)]
pub struct Status {
    last_commit: Mutex<Option<Instant>>,
    held_back_by: Mutex<Option<String>>,
    postgres_error: Mutex<Option<String>>,
    sink_error: Mutex<Option<String>>,
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

    fn postgres_failing(&self, error: &Error) {
        let reason = error.to_string();
        self.health.failing(POSTGRES, reason.clone());
        *self.status.postgres_error.lock().unwrap() = Some(reason);
    }

    fn postgres_ok(&self) {
        if self.status.postgres_error.lock().unwrap().take().is_some() {
            self.health.ok(POSTGRES);
        }
    }
}

/// Fails when `position` is ahead of the cluster's transaction counter: the events database was
/// restored into a new cluster, where transaction ids restart; delivering from there would skip
/// every new event.
pub async fn check_not_ahead(
    client: &tokio_postgres::Client,
    name: &str,
    position: Position,
) -> Result<()> {
    let row = client
        .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await
        .map_err(|e| event_store::Error::database("read the cluster's transaction counter", e))?;
    let next: u64 = row.get::<_, &str>(0).parse().map_err(|_| {
        Error::Store(event_store::Error::Schema(
            "unexpected xid8 text from the server".into(),
        ))
    })?;
    if position.tx_id >= next {
        return Err(Error::Integrity(format!(
            "consumer {name:?} is at position {position}, but this PostgreSQL cluster's next \
             transaction id is {next}: {}",
            position::REBASE_HINT
        )));
    }
    Ok(())
}

/// The fetcher. `listener` is the connection made (and checked) at start-up, if still usable.
pub async fn fetch_loop(
    ctx: Arc<Context>,
    mut listener: Option<(Listener, Reader)>,
    start: Position,
    out: mpsc::Sender<Delivery>,
    shutdown: CancellationToken,
) -> Result<()> {
    let limit = ctx.batch_size;
    let topics = ctx.topics.clone();
    let mut after = start;
    let mut caught_up = false;
    let mut reconnect = Backoff::reconnect();
    let mut failures = 0u32;
    let mut horizon = Backoff::horizon();
    let mut held_since: Option<Instant> = None;
    let mut blocker_reported: Option<Instant> = None;
    let mut gap_reported_to: Option<Position> = None;

    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        // (Re)connect: LISTEN first, then the checks, then fetch from where we are.
        let (conn, reader) = match listener.take() {
            Some(live) if !live.0.is_closed() => live,
            _ => match connect(&ctx, after).await {
                Ok(live) => {
                    info!(
                        attempts = failures + 1,
                        "Reconnected to PostgreSQL; catching up."
                    );
                    ctx.metrics.reconnects_postgres.increment(1);
                    failures = 0;
                    reconnect.reset();
                    ctx.postgres_ok();
                    caught_up = false;
                    live
                }
                Err(e @ Error::Integrity(_)) => return Err(e),
                Err(e) => {
                    failures += 1;
                    log_postgres_failure(&e, failures, "Cannot connect to PostgreSQL; retrying.");
                    ctx.postgres_failing(&e);
                    if pause(reconnect.next_pause(), &shutdown).await.is_break() {
                        return Ok(());
                    }
                    continue;
                }
            },
        };
        let client = conn.client();

        let fetched = if caught_up {
            try_join3(
                reader.pending_beyond_horizon(client, after),
                reader.fetch(client, after, limit, topics.as_deref()),
                reader.watermark(client),
            )
            .await
            .map(|(beyond, batch, watermark)| (Some(beyond), batch, watermark))
        } else {
            try_join(
                reader.fetch(client, after, limit, topics.as_deref()),
                reader.watermark(client),
            )
            .await
            .map(|(batch, watermark)| (None, batch, watermark))
        };
        let (beyond, batch, watermark): (Option<bool>, Batch, Option<Watermark>) = match fetched {
            Ok(fetched) => fetched,
            Err(e) => {
                let e = Error::Store(e);
                failures += 1;
                log_postgres_failure(&e, failures, "Fetching events failed; reconnecting.");
                ctx.postgres_failing(&e);
                drop(conn);
                if pause(reconnect.next_pause(), &shutdown).await.is_break() {
                    return Ok(());
                }
                continue;
            }
        };
        ctx.postgres_ok();

        if let Some(watermark) = watermark {
            // No checkpoint yet (START): a new consumer starts at the oldest event, no gap — and
            // what was purged before it started is no gap later in this run either (purges go by
            // age, so a few rows below that watermark can still be stored and read after it).
            if after == Position::START && gap_reported_to.is_none() {
                gap_reported_to = Some(watermark.position);
            }
            if after != Position::START
                && watermark.position > after
                && gap_reported_to.is_none_or(|reported| watermark.position > reported)
            {
                report_gap(&ctx, after, &watermark, &batch);
                gap_reported_to = Some(watermark.position);
            }
        }

        let scanned = batch.scanned;
        if let Some(end) = batch.end {
            let delivery = ctx.encoder.delivery(batch.events, end);
            tokio::select! {
                sent = out.send(delivery) => if sent.is_err() { return Ok(()) },
                _ = shutdown.cancelled() => return Ok(()),
            }
            after = end;
        }

        if scanned >= limit {
            caught_up = false;
            listener = Some((conn, reader));
            continue;
        }
        if !caught_up {
            // Just caught up: fetch once more, this time asking about the horizon as well.
            caught_up = true;
            listener = Some((conn, reader));
            continue;
        }

        if beyond == Some(true) {
            let since = *held_since.get_or_insert_with(Instant::now);
            ctx.metrics.held_back(since.elapsed());
            if since.elapsed() >= HELD_BACK_REPORT_AFTER
                && blocker_reported.is_none_or(|at| at.elapsed() >= HELD_BACK_REPORT_EVERY)
            {
                blocker_reported = Some(Instant::now());
                report_blocker(&ctx, client, since.elapsed()).await;
            }
            let wait = horizon.next_pause();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // A wake-up may mean the blocker committed; but never poll faster than the
                // backoff's first step while held back.
                _ = async {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    ctx.wake.notified().await
                } => ctx.metrics.wakeups.increment(1),
                _ = conn.closed() => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
            listener = Some((conn, reader));
            continue;
        }
        if held_since.take().is_some() {
            horizon.reset();
            blocker_reported = None;
            ctx.metrics.held_back(Duration::ZERO);
            *ctx.status.held_back_by.lock().unwrap() = None;
        }

        tokio::select! {
            _ = ctx.wake.notified() => ctx.metrics.wakeups.increment(1),
            _ = tokio::time::sleep(ctx.poll_interval) => {}
            _ = conn.closed() => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        listener = Some((conn, reader));
    }
}

/// A new dedicated connection, LISTENing, checked against the position, statements prepared.
pub async fn connect(ctx: &Context, after: Position) -> Result<(Listener, Reader)> {
    let listener = Listener::connect(&ctx.pg, &ctx.channel, ctx.wake.clone()).await?;
    check_not_ahead(listener.client(), &ctx.name, after).await?;
    let reader = Reader::prepare(listener.client()).await?;
    Ok((listener, reader))
}

fn log_postgres_failure(e: &Error, attempt: u32, message: &'static str) {
    if e.is_transient() {
        warn!(error = %e, attempt, "{message}");
    } else {
        // Not fixed by waiting (a revoked privilege, a dropped table), but an operator can fix it
        // while we keep trying.
        error!(error = %e, attempt, "{message}");
    }
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

/// The writer: stores each batch, retrying it until it sticks, then publishes the position.
pub async fn write_loop(
    ctx: Arc<Context>,
    mut sink: Sink,
    mut input: mpsc::Receiver<Delivery>,
    committed: watch::Sender<Position>,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut backoff = Backoff::reconnect();
    loop {
        let delivery = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            next = input.recv() => match next {
                Some(delivery) => delivery,
                None => return Ok(()),
            },
        };
        let mut failures = 0u32;
        let written = loop {
            let result = tokio::select! {
                result = sink.write(&delivery) => result,
                _ = async { shutdown.cancelled().await; tokio::time::sleep(WRITE_GRACE).await } => {
                    warn!("Stopping with a batch write still in flight; it is written again on restart.");
                    return Ok(());
                }
            };
            match result {
                Ok(written) => break written,
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, attempt = failures, events = delivery.events.len(),
                          "Writing a batch failed; retrying.");
                    ctx.sink_failing(e.to_string(), true);
                    if pause(backoff.next_pause(), &shutdown).await.is_break() {
                        return Ok(());
                    }
                }
            }
        };
        if failures > 0 {
            info!(
                attempts = failures,
                "Writes succeed again; delivery resumed."
            );
            ctx.metrics.reconnects_mongodb.increment(1);
            backoff.reset();
        }
        if ctx.status.sink_error.lock().unwrap().take().is_some() {
            ctx.health.ok(ctx.sink_check);
        }
        let count = delivery.events.len() as u64;
        ctx.metrics.delivered.increment(count);
        ctx.metrics
            .redelivered
            .increment(written.already_present as u64);
        ctx.metrics.batches.increment(1);
        ctx.metrics.position(delivery.end);
        *ctx.status.last_commit.lock().unwrap() = Some(Instant::now());
        committed.send_replace(delivery.end);
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

/// Sleeps, or breaks early on shutdown.
async fn pause(duration: Duration, shutdown: &CancellationToken) -> std::ops::ControlFlow<()> {
    tokio::select! {
        _ = tokio::time::sleep(duration) => std::ops::ControlFlow::Continue(()),
        _ = shutdown.cancelled() => std::ops::ControlFlow::Break(()),
    }
}
