//! Reading stored events for clients that start behind the live head: a few dedicated
//! connections, each with the shared position statements prepared once, shared by all such
//! clients under a semaphore (`--catch-up-concurrency`). A crowd of clients reconnecting at once
//! therefore queues here instead of opening a connection each; a client holds a permit for one
//! fetch at a time, never while it waits for its own (possibly slow) connection.
//!
//! Each fetch is the shared fetch step ([`ReadState`]: row and byte bounds, the adaptation to
//! compressed payloads, the watermark read after the fetch). [`CatchUp::read_ahead`] runs the
//! fetches on a task of their own, one batch ahead of the client's session, so the next fetch
//! overlaps sending the current batch.

use std::sync::{Arc, Mutex};

use event_store::follow::{ReadState, Round};
use event_store::position::{Limits, Reader, Watermark};
use event_store::{db, Position};
use tokio::sync::{mpsc, Semaphore};
use tokio_postgres::Client;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::wire::Encoded;

/// One catch-up fetch.
#[derive(Debug, Default)]
pub struct Step {
    pub events: Vec<Arc<Encoded>>,
    /// Last row scanned (wanted or not).
    pub end: Option<Position>,
    pub scanned: usize,
    /// More rows were ready when the batch was cut (by rows or bytes): fetch again at once.
    pub more: bool,
    /// Read after the fetch, in the same pipeline: a purge that took rows this fetch would have
    /// returned shows here.
    pub watermark: Option<Watermark>,
}

struct Conn {
    client: Client,
    reader: Reader,
}

pub struct CatchUp {
    pg: event_store::db::Database,
    permits: Semaphore,
    idle: Mutex<Vec<Conn>>,
    limits: Limits,
    metrics: Metrics,
}

impl Step {
    fn encode(round: Round) -> Step {
        Step {
            scanned: round.batch.scanned,
            more: round.batch.more,
            end: round.batch.end,
            events: round.batch.events.into_iter().map(Encoded::new).collect(),
            watermark: round.watermark,
        }
    }
}

impl CatchUp {
    pub fn new(
        pg: event_store::db::Database,
        concurrency: usize,
        limits: Limits,
        metrics: Metrics,
    ) -> CatchUp {
        CatchUp {
            pg,
            permits: Semaphore::new(concurrency.max(1)),
            idle: Mutex::new(Vec::new()),
            limits,
            metrics,
        }
    }

    async fn take(&self) -> Result<Conn> {
        let idle = self.idle.lock().unwrap().pop();
        if let Some(conn) = idle.filter(|c| !c.client.is_closed()) {
            return Ok(conn);
        }
        let client = db::connect_spawned(&self.pg).await?;
        let reader = Reader::prepare(&client).await?;
        Ok(Conn { client, reader })
    }

    fn give_back(&self, conn: Conn) {
        if !conn.client.is_closed() {
            self.idle.lock().unwrap().push(conn);
        }
    }

    /// Up to a batch of events past `after` (`topics`: `None` for all), and the watermark.
    pub async fn fetch(&self, after: Position, topics: Option<&[String]>) -> Result<Step> {
        self.fetch_from(&mut ReadState::new(after), topics).await
    }

    /// The next batch of `state` (which keeps the row limit adapted across fetches).
    async fn fetch_from(&self, state: &mut ReadState, topics: Option<&[String]>) -> Result<Step> {
        Ok(Step::encode(self.fetch_round(state, topics).await?))
    }

    /// The next batch of `state`, read but not yet encoded.
    async fn fetch_round(&self, state: &mut ReadState, topics: Option<&[String]>) -> Result<Round> {
        let _permit = self.permits.acquire().await.expect("never closed");
        let conn = self.take().await?;
        let fetched = state
            .fetch(&conn.client, &conn.reader, self.limits, topics)
            .await;
        self.metrics.fetch(false);
        // A failed connection is not given back; the next fetch makes a new one.
        let round = fetched?;
        self.give_back(conn);
        Ok(round)
    }

    /// Reads stored events past `after` ahead of the caller, until a batch comes back short (or
    /// fails, or the caller drops the receiver).
    ///
    /// Two tasks make a pipeline: one fetches (PostgreSQL's scan and the rows' decoding), the
    /// other encodes, so the next batch is read while this one is encoded and the one before is
    /// sent. Doing both on one task left decoding and encoding in series, and the catch-up ran
    /// at the speed of their sum. At most four batches are in flight for a client (fetching,
    /// queued, encoding, queued for sending), each bounded by the catch-up limits.
    pub fn read_ahead(
        self: &Arc<Self>,
        after: Position,
        topics: Option<Vec<String>>,
    ) -> mpsc::Receiver<Result<Step>> {
        let (rounds_tx, mut rounds) = mpsc::channel::<Result<Round>>(1);
        let catch_up = self.clone();
        tokio::spawn(async move {
            let mut state = ReadState::new(after);
            let topics = topics.as_deref();
            loop {
                let fetched = catch_up.fetch_round(&mut state, topics).await;
                let last = !matches!(&fetched, Ok(round) if round.batch.more);
                if rounds_tx.send(fetched).await.is_err() || last {
                    return;
                }
            }
        });
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            while let Some(fetched) = rounds.recv().await {
                if tx.send(fetched.map(Step::encode)).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// The newest stored position of `topics` at or before `head` (the start, when they have
    /// none): what a `reset` names, so a client learns nothing of topics it did not ask for.
    /// Resuming after it is the same as resuming after `head` for this client, since every event
    /// up to the hub's head is final. Costs at most one backward index scan, under the same
    /// permits as catch-up reads (no more than a client asking for `from=earliest`).
    pub async fn newest_of(&self, topics: &[String], head: Position) -> Result<Position> {
        let _permit = self.permits.acquire().await.expect("never closed");
        let conn = self.take().await?;
        let newest = event_store::position::newest_of_topics(&conn.client, topics, head).await?;
        self.give_back(conn);
        Ok(newest.unwrap_or(Position::START))
    }

    /// Why `position` cannot be resumed from, if it cannot: it is ahead of this cluster's
    /// transaction counter (a position from another cluster, or from before a restore).
    pub async fn ahead_of_cluster(&self, position: Position) -> Result<Option<String>> {
        let _permit = self.permits.acquire().await.expect("never closed");
        let conn = self.take().await?;
        let checked =
            event_store::divergence::check_not_ahead(&conn.client, "gateway", position).await;
        self.give_back(conn);
        match checked {
            Ok(()) => Ok(None),
            Err(event_store::Error::Integrity(_)) => Ok(Some(format!(
                "position {position} is ahead of this database's transaction counter (a \
                 position from another database, or from before a restore)"
            ))),
            Err(e) => Err(e.into()),
        }
    }
}
