//! Following the stream: the one loop that every reader of live events runs (the consumer, the
//! gateway's live reader, `eventsctl tail`).
//!
//! A [`Follower`] owns a dedicated connection ([`Listener`]) and walks the stream from a position:
//!
//! 1. **LISTEN before the first read.** An event that commits between the LISTEN and the read is
//!    either read or announced by a wake-up that arrives afterwards.
//! 2. **Fetch.** It reads past its position with the shared position SQL ([`Reader`]: `(tx_id,
//!    id)` order, only below the visibility horizon), bounded by rows and bytes ([`Limits`]). The
//!    purge watermark is read in the same pipeline, *after* the fetch. A purge that removed rows
//!    this fetch would have returned committed before it, so the watermark shows it. A watermark
//!    past the position the fetch started from is a gap, passed to the caller with the batch.
//! 3. **Adapt.** The server bounds bytes by *stored* sizes, which are compressed for large values.
//!    When more text came than the byte bound holds, the next fetch asks for as many rows as fitted.
//!    The row limit grows back (doubling per full batch) once payloads shrink again.
//! 4. **Caught up?** A batch cut by rows or bytes (`more`) is followed at once by the next. After
//!    a short one, the next fetch is pipelined with the question "are committed rows past my
//!    position held back by an older open transaction?". The question is asked *before* the fetch
//!    in the same round trip, so a row is either counted there or commits later and its wake-up
//!    arrives later.
//! 5. **Wait.** If rows are held back, it polls again with a short back-off ([`HORIZON_POLL`]),
//!    because no wake-up will come for them. After [`HELD_BACK_REPORT_AFTER`] it names the
//!    blocking backend. Otherwise it waits for a wake-up, the fallback poll, or the connection's
//!    end.
//! 6. **Reconnect.** Failures are retried with the one retry policy ([`crate::retry`]). A
//!    [`Error::Integrity`] from the caller's check on a new connection stops the follower.
//!
//! The follower runs on a task of its own and hands batches over through a bounded queue, so the
//! next fetch (and the caller's encoding of it, see [`Follower::spawn`]) overlaps the caller's
//! handling of the current one. What is the caller's own stays with the caller, through
//! [`Observer`]: leases and divergence checks on each new connection, health and metrics, what to
//! do about a gap. A caller may also [rewind](Rewind) it: read again from a position it names.
//!
//! [`Reader`] and [`ReadState`] are the fetch step alone, for readers that share pooled
//! connections instead of owning one (the gateway's catch-up readers).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{try_join, try_join3};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::db::Database;
use crate::error::{Error, Result};
use crate::listener::Listener;
use crate::position::{
    self, Batch, HorizonBlocker, Limits, Partition, Position, Reader, Watermark,
};
use crate::retry::{sleep_or_stop, Policy, Retry, HORIZON_POLL};

/// How long committed events may wait behind an open transaction before the blocker is named.
pub const HELD_BACK_REPORT_AFTER: Duration = Duration::from_secs(5);
/// How often a continuing hold-back is reported again.
const HELD_BACK_REPORT_EVERY: Duration = Duration::from_secs(60);
/// While held back, never poll faster than this, even when wake-ups keep coming.
const HELD_BACK_MIN_POLL: Duration = Duration::from_millis(20);

/// What to follow, and how.
#[derive(Clone)]
pub struct Follow {
    /// The dedicated connection's settings (LISTEN needs a direct connection, not a
    /// transaction-pooling proxy).
    pub pg: Database,
    /// The NOTIFY channel wake-ups arrive on.
    pub channel: String,
    /// Rows and bytes per fetch.
    pub limits: Limits,
    /// Only these topics (`None`: all). The position still moves over the rows skipped.
    pub topics: Option<Vec<String>>,
    /// Only this partition of a consumer group (`None`: every event), likewise.
    pub partition: Option<Partition>,
    /// How long a lost wake-up can delay a read.
    pub poll_interval: Duration,
    /// Stop the first time nothing more is readable, after sending [`Step::CaughtUp`] (a reader
    /// that prints what is stored and exits).
    pub until_caught_up: bool,
    /// Batches fetched ahead of the one the caller is handling.
    pub prefetch: usize,
    /// Wake-ups (notifications, and the connection's end) land here.
    pub wake: Arc<Notify>,
}

impl Follow {
    /// Defaults: [`Limits::DEFAULT`], all topics, a 1 s fallback poll, one batch of prefetch.
    pub fn new(pg: Database, channel: impl Into<String>) -> Follow {
        Follow {
            pg,
            channel: channel.into(),
            limits: Limits::DEFAULT,
            topics: None,
            partition: None,
            poll_interval: Duration::from_secs(1),
            until_caught_up: false,
            prefetch: 1,
            wake: Arc::new(Notify::new()),
        }
    }
}

/// Where reading resumes on a new connection: the follower's position and the event stored
/// there when it was read (for a divergence check), `None` before the first batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    pub position: Position,
    pub event_id: Option<uuid::Uuid>,
}

/// What the caller adds to the loop. Every method has a default that does nothing.
pub trait Observer: Send + Sync + 'static {
    /// A new connection is LISTENing, before its first read (also after a reconnect): take
    /// leases, check that this is still the database `resume` was read from. An
    /// [`Error::Integrity`] stops the follower; any other error is retried.
    fn connected<'a>(
        &'a self,
        client: &'a Client,
        resume: Resume,
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        let _ = (client, resume);
        async { Ok(()) }
    }

    /// A fetch succeeded.
    fn postgres_ok(&self) {}

    /// A connection or a fetch failed; the follower pauses and reconnects.
    fn postgres_failing(&self, error: &Error) {
        let _ = error;
    }

    /// A connection was made again after failures.
    fn reconnected(&self) {}

    /// Committed rows wait behind an open transaction, for `held` so far (`None`: no longer).
    /// `blocker` is set when it was looked up (after [`HELD_BACK_REPORT_AFTER`], then every
    /// minute).
    fn held_back(&self, held: Option<Duration>, blocker: Option<&HorizonBlocker>) {
        let _ = (held, blocker);
    }

    /// A wake-up ended a wait.
    fn wakeup(&self) {}

    /// One fetch round trip was made.
    fn fetched(&self) {}
}

/// An observer that adds nothing.
pub struct Quiet;

impl Observer for Quiet {}

/// "Read again from `position`". Batches carry the generation they were fetched in, so a caller
/// can drop those fetched before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rewind {
    pub generation: u64,
    pub position: Position,
}

/// One batch, as the caller's encoder made it.
#[derive(Debug)]
pub struct Fetched<T> {
    /// The position the fetch started from (exclusive).
    pub after: Position,
    /// The last row scanned, wanted or not: the new position. Equal to `after` only for a
    /// [`gap`](Fetched::gap) with nothing stored past it (the batch is empty).
    pub end: Position,
    /// The `event_id` of the row at `end`.
    pub end_event_id: Option<uuid::Uuid>,
    /// The [`Rewind`] generation the batch was fetched in.
    pub generation: u64,
    /// A purge removed events past `after` before they were read: the watermark. Reported once
    /// per watermark; reading goes on from the oldest event still stored.
    pub gap: Option<Watermark>,
    pub item: T,
}

/// What a follower hands over.
#[derive(Debug)]
pub enum Step<T> {
    Batch(Fetched<T>),
    /// Only with [`Follow::until_caught_up`], last: nothing more is readable at `at`.
    /// `held_back`: committed rows past it wait for an older open transaction.
    CaughtUp {
        at: Position,
        held_back: bool,
    },
}

/// A running follower: its steps, and its task (which ends with the error that stopped it, if
/// any).
pub struct Follower<T> {
    pub steps: mpsc::Receiver<Step<T>>,
    pub task: JoinHandle<Result<()>>,
}

impl<T: Send + 'static> Follower<T> {
    /// Starts following from `start`. `first` is a connection the caller already made and checked
    /// (LISTENing on `follow.channel`), used before any new one. `encode` turns each batch into
    /// the caller's item on the follower's task, ahead of the caller. `rewinds`: where the caller
    /// asks to read again (the follower stops when its sender is dropped).
    pub fn spawn<O, E>(
        follow: Follow,
        observer: Arc<O>,
        start: Position,
        first: Option<(Listener, Reader)>,
        rewinds: Option<watch::Receiver<Rewind>>,
        encode: E,
        shutdown: CancellationToken,
    ) -> Follower<T>
    where
        O: Observer,
        E: FnMut(Batch, Position) -> T + Send + 'static,
    {
        let (tx, steps) = mpsc::channel(follow.prefetch.max(1));
        let run = Run {
            follow,
            observer,
            out: tx,
            encode,
            rewinds,
            shutdown,
            state: ReadState::new(start),
            after_event_id: None,
            generation: 0,
            retry: Retry::new(Policy::default()),
            failures: 0,
            next_pause: Duration::ZERO,
            horizon: Retry::new(HORIZON_POLL),
            held_since: None,
            blocker_reported: None,
        };
        let task = tokio::spawn(run.run(first));
        Follower { steps, task }
    }
}

/// The fetch step on its own: position, adaptive row limit, gap bookkeeping, and whether the last
/// fetch found the reader caught up.
#[derive(Debug, Clone)]
pub struct ReadState {
    /// The position: the end of the last batch returned.
    pub after: Position,
    rows: Option<usize>,
    caught_up: bool,
    gap_reported_to: Option<Position>,
}

/// One fetch round trip's results.
#[derive(Debug)]
pub struct Round {
    pub batch: Batch,
    /// The position the fetch started from.
    pub after: Position,
    /// The purge watermark, read after the fetch.
    pub watermark: Option<Watermark>,
    /// See [`Fetched::gap`].
    pub gap: Option<Watermark>,
    /// Asked only when the previous fetch came back short: committed rows past the position
    /// that the horizon holds back.
    pub held_back: Option<bool>,
}

impl Round {
    /// Nothing more is readable right now: this fetch came back short and asked the horizon
    /// question (a reader that stops when caught up stops here).
    pub fn caught_up(&self) -> bool {
        !self.batch.more && self.held_back.is_some()
    }
}

impl ReadState {
    pub fn new(after: Position) -> ReadState {
        ReadState {
            after,
            rows: None,
            caught_up: false,
            gap_reported_to: None,
        }
    }

    /// Reads the next batch: fetch and watermark, plus the horizon question when the previous
    /// fetch came back short. Moves the position to the batch's end.
    pub async fn fetch(
        &mut self,
        client: &Client,
        reader: &Reader,
        limits: Limits,
        topics: Option<&[String]>,
    ) -> Result<Round> {
        let limits = Limits {
            rows: self.rows.unwrap_or(limits.rows).min(limits.rows),
            ..limits
        };
        let after = self.after;
        let fetch = reader.fetch_bounded(client, after, limits, topics);
        let (held_back, batch, watermark) = if self.caught_up {
            let (beyond, batch, watermark) = try_join3(
                reader.pending_beyond_horizon(client, after),
                fetch,
                reader.watermark(client),
            )
            .await?;
            (Some(beyond), batch, watermark)
        } else {
            let (batch, watermark) = try_join(fetch, reader.watermark(client)).await?;
            (None, batch, watermark)
        };
        self.adapt(&batch, limits.rows);
        let gap = watermark.filter(|w| self.is_new_gap(w));
        if let Some(w) = &gap {
            self.gap_reported_to = Some(w.position);
        }
        if let Some(end) = batch.end {
            self.after = end;
        }
        self.caught_up = !batch.more;
        Ok(Round {
            batch,
            after,
            watermark,
            gap,
            held_back,
        })
    }

    /// Read again from `position` (the next fetch does not ask the horizon question).
    pub fn rewind(&mut self, position: Position) {
        self.after = position;
        self.caught_up = false;
    }

    /// After a reconnect: the first fetch reads without asking about the horizon.
    fn reconnected(&mut self) {
        self.caught_up = false;
    }

    fn adapt(&mut self, batch: &Batch, asked: usize) {
        if batch.cut_on_text {
            self.rows = Some((batch.scanned / batch.scan_factor.max(1)).max(1));
        } else if let Some(rows) = self.rows {
            if batch.scanned >= asked {
                self.rows = Some(rows.saturating_mul(2));
            }
        }
    }

    /// A watermark past the position is a gap, once per watermark. A reader that starts before
    /// every event (no position yet) takes the first watermark as given: what was purged before it
    /// started is no gap, now or later (purges go by age, so a few rows below that watermark can
    /// still be stored and read after it).
    fn is_new_gap(&mut self, watermark: &Watermark) -> bool {
        if self.after == Position::START && self.gap_reported_to.is_none() {
            self.gap_reported_to = Some(watermark.position);
            return false;
        }
        self.after != Position::START
            && watermark.position > self.after
            && self
                .gap_reported_to
                .is_none_or(|reported| watermark.position > reported)
    }
}

/// The follower's task.
struct Run<O, E, T> {
    follow: Follow,
    observer: Arc<O>,
    out: mpsc::Sender<Step<T>>,
    encode: E,
    rewinds: Option<watch::Receiver<Rewind>>,
    shutdown: CancellationToken,
    state: ReadState,
    after_event_id: Option<uuid::Uuid>,
    generation: u64,
    retry: Retry,
    failures: u32,
    next_pause: Duration,
    horizon: Retry,
    held_since: Option<Instant>,
    blocker_reported: Option<Instant>,
}

/// Whether the loop goes on.
enum Flow {
    Continue,
    Stop,
}

impl<O, E, T> Run<O, E, T>
where
    O: Observer,
    E: FnMut(Batch, Position) -> T + Send + 'static,
    T: Send + 'static,
{
    async fn run(mut self, first: Option<(Listener, Reader)>) -> Result<()> {
        let mut live = first;
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            self.apply_rewind();
            let (conn, reader) = match live.take() {
                Some(live) if !live.0.is_closed() => live,
                _ => match self.reconnect().await? {
                    Some(fresh) => fresh,
                    None if self.shutdown.is_cancelled() => return Ok(()),
                    None => continue,
                },
            };
            let limits = self.follow.limits;
            let topics = self.follow.topics.clone();
            let round = self
                .state
                .fetch(conn.client(), &reader, limits, topics.as_deref())
                .await;
            self.observer.fetched();
            let round = match round {
                Ok(round) => round,
                Err(e) => {
                    self.failed(&e, "Fetching events failed");
                    drop(conn);
                    if let Flow::Stop = self.pause().await {
                        return Ok(());
                    }
                    continue;
                }
            };
            self.observer.postgres_ok();
            let caught_up = round.caught_up();
            let held_back = round.held_back == Some(true);
            if let Flow::Stop = self.hand_over(round).await {
                return Ok(());
            }
            if caught_up {
                if self.follow.until_caught_up {
                    let at = self.state.after;
                    let _ = self.out.send(Step::CaughtUp { at, held_back }).await;
                    return Ok(());
                }
                if let Flow::Stop = self.wait(&conn, held_back).await {
                    return Ok(());
                }
            }
            live = Some((conn, reader));
        }
    }

    /// Sends the batch (if the fetch scanned anything) to the caller.
    async fn hand_over(&mut self, round: Round) -> Flow {
        // A gap is handed over even when nothing is stored past it (a forced purge took every
        // unread event): as an empty batch that ends where it started.
        let (end, end_event_id) = match round.batch.end {
            Some(end) => (end, round.batch.end_event_id),
            None if round.gap.is_some() => (round.after, self.after_event_id),
            None => return Flow::Continue,
        };
        let item = (self.encode)(round.batch, round.after);
        let step = Step::Batch(Fetched {
            after: round.after,
            end,
            end_event_id,
            generation: self.generation,
            gap: round.gap,
            item,
        });
        tokio::select! {
            sent = self.out.send(step) => if sent.is_err() { return Flow::Stop },
            _ = self.shutdown.cancelled() => return Flow::Stop,
        }
        self.after_event_id = end_event_id;
        Flow::Continue
    }

    fn apply_rewind(&mut self) {
        let Some(rewinds) = &mut self.rewinds else {
            return;
        };
        // By generation, not `has_changed`: waiting on `changed()` marks the value seen.
        let rewind = *rewinds.borrow_and_update();
        if rewind.generation != self.generation {
            info!(from = %self.state.after, to = %rewind.position, "Reading again from the position asked for.");
            self.state.rewind(rewind.position);
            self.generation = rewind.generation;
            self.after_event_id = None;
        }
    }

    /// A new connection, LISTENing and checked by the observer; `None` after a failed attempt
    /// (already paused).
    async fn reconnect(&mut self) -> Result<Option<(Listener, Reader)>> {
        let resume = Resume {
            position: self.state.after,
            event_id: self.after_event_id,
        };
        let connected = async {
            let listener = Listener::connect(
                &self.follow.pg,
                &self.follow.channel,
                self.follow.wake.clone(),
            )
            .await?;
            self.observer.connected(listener.client(), resume).await?;
            let reader = Reader::prepare(listener.client())
                .await?
                .for_partition(self.follow.partition);
            Ok::<_, Error>((listener, reader))
        }
        .await;
        match connected {
            Ok(fresh) => {
                info!(
                    attempts = self.failures + 1,
                    position = %self.state.after,
                    "Connected to PostgreSQL; reading on."
                );
                if self.failures > 0 {
                    self.observer.reconnected();
                }
                self.failures = 0;
                self.retry.succeeded();
                self.observer.postgres_ok();
                self.state.reconnected();
                Ok(Some(fresh))
            }
            Err(e @ Error::Integrity(_)) => Err(e),
            Err(e) => {
                self.failed(&e, "Cannot connect to PostgreSQL");
                self.pause().await;
                Ok(None)
            }
        }
    }

    /// Logs a failure (attempt count and next pause, by the one retry policy) and tells the
    /// observer; the pause comes next. Errors an operator must fix (a revoked privilege, a
    /// dropped table) are retried at the slowest pace while they fix it.
    fn failed(&mut self, e: &Error, message: &'static str) {
        self.failures += 1;
        self.next_pause = self.retry.failed(message, e, e.is_permanent());
        self.observer.postgres_failing(e);
    }

    async fn pause(&mut self) -> Flow {
        if sleep_or_stop(self.next_pause, &self.shutdown).await {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    /// Caught up: waits for a wake-up, the fallback poll or the connection's end; or, while an
    /// open transaction holds committed rows back, polls again with a short back-off.
    async fn wait(&mut self, conn: &Listener, held_back: bool) -> Flow {
        let wake = self.follow.wake.clone();
        let rewound = async {
            match &mut self.rewinds {
                Some(rewinds) => rewinds.changed().await.is_err(),
                None => std::future::pending().await,
            }
        };
        if held_back {
            let since = *self.held_since.get_or_insert_with(Instant::now);
            let held = since.elapsed();
            let mut blocker = None;
            if held >= HELD_BACK_REPORT_AFTER
                && self
                    .blocker_reported
                    .is_none_or(|at| at.elapsed() >= HELD_BACK_REPORT_EVERY)
            {
                self.blocker_reported = Some(Instant::now());
                blocker = lookup_blocker(conn.client(), held).await;
            }
            self.observer.held_back(Some(held), blocker.as_ref());
            let pause = self.horizon.next_pause(false);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                // A wake-up may mean the blocker committed; but never poll faster than the
                // back-off's first step while held back.
                _ = async {
                    tokio::time::sleep(HELD_BACK_MIN_POLL).await;
                    wake.notified().await
                } => self.observer.wakeup(),
                _ = conn.closed() => {}
                gone = rewound => if gone { return Flow::Stop },
                _ = self.shutdown.cancelled() => return Flow::Stop,
            }
            return Flow::Continue;
        }
        if self.held_since.take().is_some() {
            self.horizon = Retry::new(HORIZON_POLL);
            self.blocker_reported = None;
            self.observer.held_back(None, None);
        }
        tokio::select! {
            _ = wake.notified() => self.observer.wakeup(),
            _ = tokio::time::sleep(self.follow.poll_interval) => {}
            _ = conn.closed() => {}
            // The caller stopped asking (its rewind sender is gone): stop rather than read for
            // nobody.
            gone = rewound => if gone { return Flow::Stop },
            _ = self.shutdown.cancelled() => return Flow::Stop,
        }
        Flow::Continue
    }
}

/// Names the transaction holding delivery back, in a warning.
async fn lookup_blocker(client: &Client, held: Duration) -> Option<HorizonBlocker> {
    match position::horizon_blocker(client).await {
        Ok(Some(blocker)) => {
            warn!(
                blocker = %blocker,
                pid = blocker.pid,
                held_back_for = %humantime::format_duration(Duration::from_secs(held.as_secs())),
                "Delivery is held back by an open transaction: committed events wait until it ends."
            );
            Some(blocker)
        }
        Ok(None) => None,
        Err(e) => {
            debug!(error = %e, "Cannot name the transaction holding delivery back.");
            None
        }
    }
}
