//! The one live reader: a single LISTEN connection and a single fetch per wake-up, whatever the
//! number of clients, fanned out through a broadcast channel.
//!
//! The hub walks the stream from the position it started at (the newest readable event) with the
//! shared no-skip reading ([`event_store::position::Reader`]: `(tx_id, id)` order, only below the
//! visibility horizon), exactly as the consumer does: a wake-up (a hint, never trusted) or the
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

use consumer::listener::Listener;
use event_store::migrations::{self, Role};
use event_store::position::{self, Reader};
use event_store::retry::{sleep_or_stop, Policy, Retry, HORIZON_POLL};
use event_store::Position;
use futures_util::future::{try_join, try_join3};
use services::ops::Health;
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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
    pub batch_size: usize,
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

    /// Reads live events past `live`'s head and broadcasts them until `shutdown`.
    pub async fn run(
        self,
        live: Arc<Live>,
        wake: Arc<Notify>,
        mut connection: Option<(Listener, Reader)>,
        shutdown: CancellationToken,
    ) {
        let mut after = live.head();
        let mut caught_up = false;
        let mut reconnect = Retry::new(Policy::default());
        let mut horizon = Retry::new(HORIZON_POLL);
        let mut failures = 0u32;
        let mut gap_reported_to = after;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let (conn, reader) = match connection.take() {
                Some(live) if !live.0.is_closed() => live,
                _ => {
                    let connected = async {
                        let listener =
                            Listener::connect(&self.pg, &self.channel, wake.clone()).await?;
                        let reader = Reader::prepare(listener.client()).await?;
                        Ok::<_, crate::Error>((listener, reader))
                    }
                    .await;
                    match connected {
                        Ok(live) => {
                            info!(attempts = failures + 1, "Reconnected to PostgreSQL.");
                            self.health.ok(POSTGRES);
                            failures = 0;
                            reconnect.succeeded();
                            caught_up = false;
                            live
                        }
                        Err(e) => {
                            failures += 1;
                            warn!(error = %e, attempt = failures,
                                  "Cannot connect to PostgreSQL; live streams wait.");
                            self.health.failing(POSTGRES, e.to_string());
                            if sleep_or_stop(reconnect.next_pause(e.is_permanent()), &shutdown)
                                .await
                            {
                                return;
                            }
                            continue;
                        }
                    }
                }
            };
            let client = conn.client();
            let limit = self.batch_size;
            let fetched = if caught_up {
                try_join3(
                    reader.pending_beyond_horizon(client, after),
                    reader.fetch(client, after, limit, None),
                    reader.watermark(client),
                )
                .await
            } else {
                try_join(
                    reader.fetch(client, after, limit, None),
                    reader.watermark(client),
                )
                .await
                .map(|(batch, watermark)| (false, batch, watermark))
            };
            self.metrics.fetch(true);
            let (beyond, batch, watermark) = match fetched {
                Ok(fetched) => fetched,
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, attempt = failures, "Fetching live events failed; reconnecting.");
                    self.health.failing(POSTGRES, e.to_string());
                    drop(conn);
                    if sleep_or_stop(reconnect.next_pause(e.is_permanent()), &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            let gap = watermark
                .map(|w| w.position)
                .filter(|w| *w > after && *w > gap_reported_to);
            if let Some(w) = gap {
                warn!(missing_after = %after, missing_up_to = %w,
                      "Events were purged before the gateway could read them; live clients are told.");
                gap_reported_to = w;
            }
            let more = batch.more;
            if !batch.undecodable.is_empty() {
                // Passed over, as the consumer does (it records them as dead letters).
                warn!(rows = batch.undecodable.len(), first = %batch.undecodable[0].position,
                      reason = %batch.undecodable[0].reason,
                      "Rows that cannot be decoded are not sent to live clients.");
            }
            if let Some(end) = batch.end {
                let events = batch.events.into_iter().map(Encoded::new).collect();
                live.publish(LiveBatch {
                    after,
                    end,
                    events,
                    gap,
                });
                after = end;
                self.metrics.head(end);
            }
            if more {
                caught_up = false;
                connection = Some((conn, reader));
                continue;
            }
            if !caught_up {
                caught_up = true;
                connection = Some((conn, reader));
                continue;
            }
            if beyond {
                let wait = horizon.next_pause(false);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = async {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        wake.notified().await
                    } => self.metrics.wakeup(),
                    _ = conn.closed() => {}
                    _ = shutdown.cancelled() => return,
                }
                connection = Some((conn, reader));
                continue;
            }
            horizon = Retry::new(HORIZON_POLL);
            tokio::select! {
                _ = wake.notified() => self.metrics.wakeup(),
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = conn.closed() => {}
                _ = shutdown.cancelled() => return,
            }
            connection = Some((conn, reader));
        }
    }
}
