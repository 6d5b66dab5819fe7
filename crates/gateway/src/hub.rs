//! The one live reader: a single LISTEN connection and a single fetch per wake-up, whatever the
//! number of clients, fanned out through a broadcast channel.
//!
//! The hub walks the stream from the position it started at (the newest readable event) with the
//! shared [`Follower`], the same loop as the consumer's: a wake-up (a hint, never trusted) or the
//! fallback poll triggers one pipelined round trip — "is anything held back by an open
//! transaction?", the fetch, the purge watermark — and a full batch is followed at once by the
//! next. Each batch is encoded once and broadcast as an `Arc`, so a thousand clients cost a
//! thousand pointer copies, not a thousand queries or encodings.
//!
//! [`Live`] pairs the broadcast sender with the hub's head (the position through which everything
//! has been broadcast) under one lock, so a client that joins gets a receiver and a head that fit
//! together: every batch past that head reaches its receiver. Clients filter topics and keys in
//! memory, and skip what they already had (positions at or before their own).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_store::follow::{Follow, Follower, Observer, Step};
use event_store::listener::Listener;
use event_store::migrations::{self, Role};
use event_store::position::{self, Batch, Limits, Reader};
use event_store::retry::{sleep_or_stop, Policy, Retry};
use event_store::Position;
use services::ops::Health;
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::wire::Encoded;

/// The health check the hub reports under.
pub const POSTGRES: &str = "postgres";

/// Batches the broadcast keeps for clients that have not taken them yet. A client that falls this
/// far behind is dropped as slow (its own queue, `--client-buffer`, is the usual limit).
const BROADCAST_BATCHES: usize = 4096;

/// One fetch's worth of live events, shared by every client.
#[derive(Debug)]
pub struct LiveBatch {
    /// The hub's head before this batch.
    pub after: Position,
    /// The last position scanned: the new head.
    pub end: Position,
    /// Every event of the batch, all topics, in position order.
    pub events: Vec<Arc<Encoded>>,
    /// A purge took events past `after` before the hub could read them (after an outage longer
    /// than the retention): the watermark.
    pub gap: Option<Position>,
}

/// The broadcast and the head it has reached, kept consistent under one lock.
pub struct Live {
    state: Mutex<(Position, broadcast::Sender<Arc<LiveBatch>>)>,
}

impl Live {
    pub fn new(head: Position) -> Arc<Live> {
        let (tx, _) = broadcast::channel(BROADCAST_BATCHES);
        Arc::new(Live {
            state: Mutex::new((head, tx)),
        })
    }

    /// A receiver and the head: every batch past the head arrives on the receiver.
    pub fn subscribe(&self) -> (broadcast::Receiver<Arc<LiveBatch>>, Position) {
        let state = self.state.lock().unwrap();
        (state.1.subscribe(), state.0)
    }

    pub fn head(&self) -> Position {
        self.state.lock().unwrap().0
    }

    fn publish(&self, batch: LiveBatch) {
        let mut state = self.state.lock().unwrap();
        state.0 = batch.end;
        // No receiver is fine: nobody is listening right now.
        let _ = state.1.send(Arc::new(batch));
    }
}

/// What the hub needs.
pub struct Hub {
    pub pg: event_store::db::Database,
    pub channel: String,
    pub limits: Limits,
    pub poll_interval: Duration,
    pub health: Arc<Health>,
    pub metrics: Metrics,
}

impl Hub {
    /// Connects, LISTENs, checks the role, and finds where live streams start. Retries transient
    /// failures until `shutdown`; `Ok(None)` when stopped first.
    pub async fn start(
        &self,
        wake: Arc<Notify>,
        shutdown: &CancellationToken,
    ) -> Result<Option<(Listener, Reader, Position)>> {
        let mut retry = Retry::new(Policy::default());
        loop {
            let connected = async {
                let listener = Listener::connect(&self.pg, &self.channel, wake.clone()).await?;
                migrations::check(listener.client(), Role::Gateway).await?;
                let reader = Reader::prepare(listener.client()).await?;
                let head = position::latest(listener.client()).await?;
                Ok::<_, crate::Error>((listener, reader, head))
            }
            .await;
            match connected {
                Ok(started) => {
                    self.health.ok(POSTGRES);
                    return Ok(Some(started));
                }
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => {
                    let pause = retry.failed("Cannot reach PostgreSQL at start-up", &e, false);
                    self.health.failing(POSTGRES, e.to_string());
                    if sleep_or_stop(pause, shutdown).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Reads live events past `live`'s head and broadcasts them until `shutdown`, with the shared
    /// [`Follower`] (the consumer's and `eventsctl tail`'s loop): each batch is encoded on the
    /// follower's task while the previous one is broadcast.
    pub async fn run(
        self,
        live: Arc<Live>,
        wake: Arc<Notify>,
        connection: Option<(Listener, Reader)>,
        shutdown: CancellationToken,
    ) {
        let follow = Follow {
            pg: self.pg.clone(),
            channel: self.channel.clone(),
            limits: self.limits,
            topics: None,
            partition: None,
            poll_interval: self.poll_interval,
            until_caught_up: false,
            prefetch: 1,
            wake,
        };
        let encode = |batch: Batch, _after: Position| -> Vec<Arc<Encoded>> {
            if !batch.undecodable.is_empty() {
                // Passed over, as the consumer does (it records them as dead letters).
                warn!(rows = batch.undecodable.len(), first = %batch.undecodable[0].position,
                      reason = %batch.undecodable[0].reason,
                      "Rows that cannot be decoded are not sent to live clients.");
            }
            batch.events.into_iter().map(Encoded::new).collect()
        };
        let observer = Arc::new(HubObserver {
            health: self.health.clone(),
            metrics: self.metrics.clone(),
        });
        let mut follower = Follower::spawn(
            follow,
            observer,
            live.head(),
            connection,
            None,
            encode,
            shutdown.clone(),
        );
        while let Some(step) = follower.steps.recv().await {
            let Step::Batch(fetched) = step else { continue };
            let gap = fetched.gap.map(|w| w.position);
            if let Some(w) = gap {
                warn!(missing_after = %fetched.after, missing_up_to = %w,
                      "Events were purged before the gateway could read them; live clients are told.");
            }
            live.publish(LiveBatch {
                after: fetched.after,
                end: fetched.end,
                events: fetched.item,
                gap,
            });
            self.metrics.head(fetched.end);
        }
        match follower.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "The live reader stopped."),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// The hub's health and metrics, as the follower observes them.
struct HubObserver {
    health: Arc<Health>,
    metrics: Metrics,
}

impl Observer for HubObserver {
    fn postgres_ok(&self) {
        self.health.ok(POSTGRES);
    }

    fn postgres_failing(&self, error: &event_store::Error) {
        self.health.failing(POSTGRES, error.to_string());
    }

    fn wakeup(&self) {
        self.metrics.wakeup();
    }

    fn fetched(&self) {
        self.metrics.fetch(true);
    }
}
