//! One client's stream: where it starts, catching up on stored events, joining the live
//! broadcast, and every way it ends. Transport-neutral: it fills a bounded queue of [`Frame`]s
//! that the SSE or WebSocket side drains.
//!
//! `after` is the heart of it: the position through which everything this client should get has
//! been queued. It moves per queued event (and over events of other topics, by whole batches), so
//! whenever the session ends — shutdown, a full queue, the stream's age — the `goodbye` it queues
//! last names exactly where to resume: nothing queued is after it, nothing before it is missing.
//!
//! Joining live without a gap or a duplicate: catch up with the pooled reader until a fetch comes
//! back short, then take a broadcast receiver *and* the hub's head together ([`Live::subscribe`]);
//! read stored events up to that head if the hub is ahead, and from then on take batches from the
//! receiver, skipping every position at or before `after`. Both readers walk the same no-skip
//! order, so the union is exact.
//!
//! Slow clients: each session takes live batches from the broadcast on its own task and queues
//! them for its client. A queue that stays full for `--slow-client-timeout` (or a session that
//! falls `BROADCAST_BATCHES` behind the broadcast) ends the session with a `goodbye` (reason
//! `slow_client`) carrying its resume position, queued behind what the client has not read yet.
//! The broadcast never waits for anyone, so a slow client slows nobody else; a burst larger than
//! the queue does not drop a client that keeps reading.

use std::sync::Arc;
use std::time::Duration;

use event_store::Position;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::catch_up::{CatchUp, Step};
use crate::hub::{Live, LiveBatch};
use crate::limits::Slot;
use crate::metrics::Metrics;
use crate::wire::{Control, Encoded, Frame};

/// Where a stream starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Only events that become readable from now on (`from=latest`, the default).
    Latest,
    /// Every stored event (`from=earliest`).
    Earliest,
    /// Events past this position (`Last-Event-ID` or `from=POSITION`).
    After(Position),
    /// A `Last-Event-ID` that is not a position: start from now, and say so first (EventSource
    /// gives up for good on any non-200 answer, so refusing would lose the client).
    Malformed(String),
}

/// What a client asked for.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// `None`: every topic.
    pub topics: Option<Vec<String>>,
    pub key: Option<String>,
    pub start: Start,
    /// SSE only: name each event after its type (`false`: every event is a plain `message`).
    pub typed: bool,
}

impl Subscription {
    fn wants(&self, event: &Encoded) -> bool {
        self.topics
            .as_ref()
            .is_none_or(|topics| topics.contains(&event.topic))
            && self
                .key
                .as_ref()
                .is_none_or(|key| event.key.as_deref() == Some(key.as_str()))
    }
}

/// What every session shares.
pub struct Shared {
    pub live: Arc<Live>,
    pub catch_up: Arc<CatchUp>,
    pub metrics: Metrics,
    pub heartbeat: Duration,
    pub max_age: Duration,
    pub shutdown: CancellationToken,
    /// How long a goodbye may wait for room in a full queue.
    pub goodbye_wait: Duration,
    /// How long a live event may wait for room in a client's queue before the client is dropped.
    pub slow_client_timeout: Duration,
}

/// How a session ended.
enum End {
    /// The client went away: nothing to say.
    Gone,
    /// Say goodbye with this reason.
    Goodbye(&'static str),
}

/// Runs one client's session, filling `tx`, until the client goes or the session ends.
pub async fn run(shared: Arc<Shared>, sub: Subscription, tx: mpsc::Sender<Frame>, slot: Slot) {
    let mut state = State {
        after: Position::START,
        gap_reported_to: None,
    };
    let deadline = Instant::now() + shared.max_age;
    let end = tokio::select! {
        end = state.stream(&shared, &sub, &tx) => end,
        _ = shared.shutdown.cancelled() => End::Goodbye("shutdown"),
        _ = tokio::time::sleep_until(deadline) => End::Goodbye("max_age"),
        _ = tx.closed() => End::Gone,
    };
    if let End::Goodbye(reason) = end {
        shared.metrics.closed(reason);
        debug!(reason, resume = %state.after, "Closing a stream.");
        let goodbye = Frame::Control(Control::goodbye(reason, state.after));
        let _ = tokio::time::timeout(shared.goodbye_wait, tx.send(goodbye)).await;
    }
    drop(slot);
}

struct Fetched {
    scanned: usize,
    more: bool,
}

struct State {
    after: Position,
    /// The highest watermark already reported (or, for `earliest`, already there at the start).
    gap_reported_to: Option<Position>,
}

impl State {
    /// Starts from now and says so first, naming the newest position of the client's topics (not
    /// the hub's head, which would tell it how much happens on topics it cannot read). If that
    /// position cannot be read the stream is closed without a word: the client comes back with
    /// the same `Last-Event-ID` and is answered again.
    async fn reset(
        &mut self,
        shared: &Shared,
        sub: &Subscription,
        tx: &mpsc::Sender<Frame>,
        reason: &str,
    ) -> Result<(), End> {
        let (_, head) = shared.live.subscribe();
        self.after = head;
        let named = match &sub.topics {
            None => head,
            Some(topics) => match shared.catch_up.newest_of(topics, head).await {
                Ok(position) => position,
                Err(e) => {
                    warn!(error = %e, "Cannot read where a reset stream starts; closing it.");
                    return Err(End::Gone);
                }
            },
        };
        let reset = Control::reset(format!("{reason}; streaming from now on"), named);
        if tx.send(Frame::Control(reset)).await.is_err() {
            return Err(End::Gone);
        }
        Ok(())
    }

    async fn stream(
        &mut self,
        shared: &Shared,
        sub: &Subscription,
        tx: &mpsc::Sender<Frame>,
    ) -> End {
        let live = &shared.live;
        let mut start_live = false;
        match &sub.start {
            Start::Latest => start_live = true,
            Start::Malformed(reason) => {
                if let Err(end) = self.reset(shared, sub, tx, reason).await {
                    return end;
                }
                start_live = true;
            }
            Start::Earliest => self.after = Position::START,
            Start::After(position) => match shared.catch_up.ahead_of_cluster(*position).await {
                Ok(None) => self.after = *position,
                Ok(Some(reason)) => {
                    if let Err(end) = self.reset(shared, sub, tx, &reason).await {
                        return end;
                    }
                    start_live = true;
                }
                Err(e) => {
                    warn!(error = %e, "Cannot check a resume position; closing the stream.");
                    self.after = *position;
                    return End::Goodbye("database_unavailable");
                }
            },
        }
        if sub.start == Start::Earliest {
            // What was purged before this client started is not a gap for it.
            self.gap_reported_to = Some(Position::START);
        }

        loop {
            // Catch up on stored events until a fetch comes back short.
            // The next fetch runs while this one's events are queued (read-ahead).
            if !start_live {
                let mut ahead = shared.catch_up.read_ahead(self.after, sub.topics.clone());
                while let Some(step) = ahead.recv().await {
                    match self.take(shared, sub, tx, step).await {
                        Ok(step) if step.more => continue,
                        Ok(_) => break,
                        Err(end) => return end,
                    }
                }
            }
            let (mut rx, head) = live.subscribe();
            if start_live {
                self.after = self.after.max(head);
                start_live = false;
            }
            // The hub may be ahead of what the stored reads reached: read up to its head.
            while self.after < head {
                match self.fetch(shared, sub, tx).await {
                    Ok(step) if step.scanned == 0 => break, // purged meanwhile (reported as a gap)
                    Ok(_) => {}
                    Err(end) => return end,
                }
            }
            let mut heartbeat =
                tokio::time::interval_at(Instant::now() + shared.heartbeat, shared.heartbeat);
            let mut received_any = false;
            loop {
                tokio::select! {
                    batch = rx.recv() => match batch {
                        Ok(batch) => {
                            received_any = true;
                            if let Err(end) = self.offer(shared, sub, tx, &batch).await {
                                return end;
                            }
                        }
                        // Fell behind while reading stored events up to the head: catch up again.
                        Err(RecvError::Lagged(_)) if !received_any => break,
                        Err(RecvError::Lagged(_)) => return End::Goodbye("slow_client"),
                        Err(RecvError::Closed) => return End::Goodbye("shutdown"),
                    },
                    _ = heartbeat.tick() => {
                        // A full queue needs no heartbeat: data is flowing (or the client is slow,
                        // which the next event finds out).
                        let _ = tx.try_send(Frame::Heartbeat);
                    }
                }
            }
        }
    }

    /// One stored-events fetch, queued (waiting for room: a catching-up client paces itself).
    /// Returns how much was scanned and whether more is ready.
    async fn fetch(
        &mut self,
        shared: &Shared,
        sub: &Subscription,
        tx: &mpsc::Sender<Frame>,
    ) -> Result<Fetched, End> {
        let step = shared
            .catch_up
            .fetch(self.after, sub.topics.as_deref())
            .await;
        self.take(shared, sub, tx, step).await
    }

    /// Queues one stored-events fetch's events (waiting for room: a catching-up client paces
    /// itself), reporting a gap first when the watermark shows one.
    async fn take(
        &mut self,
        shared: &Shared,
        sub: &Subscription,
        tx: &mpsc::Sender<Frame>,
        step: crate::Result<Step>,
    ) -> Result<Fetched, End> {
        let step: Step = match step {
            Ok(step) => step,
            Err(e) => {
                warn!(error = %e, after = %self.after,
                      "Reading stored events failed; closing the stream with its resume position.");
                return Err(End::Goodbye("database_unavailable"));
            }
        };
        if let Some(watermark) = step.watermark {
            let w = watermark.position;
            match self.gap_reported_to {
                // `earliest`: the first watermark seen is the baseline, no gap.
                Some(Position::START) if self.after == Position::START => {
                    self.gap_reported_to = Some(w)
                }
                reported if w > self.after && reported.is_none_or(|r| w > r) => {
                    let resumed_at = step.events.first().map(|e| e.position).or(step.end);
                    self.gap(shared, tx, w, resumed_at).await?;
                }
                _ => {}
            }
        }
        for event in &step.events {
            if sub.wants(event) && tx.send(Frame::Stored(event.clone())).await.is_err() {
                return Err(End::Gone);
            }
            self.after = event.position;
        }
        if let Some(end) = step.end {
            self.after = self.after.max(end);
        }
        Ok(Fetched {
            scanned: step.scanned,
            more: step.more,
        })
    }

    async fn gap(
        &mut self,
        shared: &Shared,
        tx: &mpsc::Sender<Frame>,
        up_to: Position,
        resumed_at: Option<Position>,
    ) -> Result<(), End> {
        shared.metrics.gap();
        let gap = Control::gap(self.after, up_to, resumed_at);
        self.gap_reported_to = Some(up_to);
        tx.send(Frame::Control(gap)).await.map_err(|_| End::Gone)
    }

    /// Queues a live batch, waiting at most `--slow-client-timeout` per event for room.
    async fn offer(
        &mut self,
        shared: &Shared,
        sub: &Subscription,
        tx: &mpsc::Sender<Frame>,
        batch: &LiveBatch,
    ) -> Result<(), End> {
        let new_gap = batch.gap.filter(|w| *w > self.after);
        // A gap comes even in an empty batch (a purge took every unread event).
        if batch.end <= self.after && new_gap.is_none() {
            return Ok(());
        }
        if let Some(up_to) = new_gap {
            if self.gap_reported_to.is_none_or(|r| up_to > r) {
                shared.metrics.gap();
                let resumed_at = batch.events.first().map(|e| e.position).or(
                    // Nothing stored past the gap yet: no position to name.
                    (batch.end > batch.after).then_some(batch.end),
                );
                let gap = Control::gap(self.after, up_to, resumed_at);
                self.gap_reported_to = Some(up_to);
                queue(tx, Frame::Control(gap), shared.slow_client_timeout).await?;
            }
        }
        for event in &batch.events {
            if event.position <= self.after {
                continue;
            }
            if sub.wants(event) {
                queue(tx, Frame::Event(event.clone()), shared.slow_client_timeout).await?;
            }
            self.after = event.position;
        }
        self.after = self.after.max(batch.end);
        Ok(())
    }
}

async fn queue(tx: &mpsc::Sender<Frame>, frame: Frame, patience: Duration) -> Result<(), End> {
    tx.send_timeout(frame, patience).await.map_err(|e| match e {
        mpsc::error::SendTimeoutError::Timeout(_) => End::Goodbye("slow_client"),
        mpsc::error::SendTimeoutError::Closed(_) => End::Gone,
    })
}
