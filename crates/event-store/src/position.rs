//! The position model and **all** SQL that reads or deletes events by position.
//!
//! A position is the pair `(tx_id, id)` of the last event a reader has passed. Events are read in
//! `(tx_id, id)` order and only when `tx_id` is below the visibility horizon
//! `pg_snapshot_xmin(pg_current_snapshot())`: every transaction with a smaller id has finished, so
//! no new row can ever appear behind a position once it has been passed, however late a
//! transaction commits. (Following `id` alone skips events: ids are taken at INSERT, rows appear at
//! COMMIT.)
//!
//! tokio-postgres has no Rust type for `xid8`, so `tx_id` travels as text (`tx_id::text` out,
//! `$1::text::xid8` in). Ordering and comparisons always use the `xid8` column itself, never its
//! text form, where `'999' > '1000'`.
//!
//! After a dump/restore into a new cluster transaction ids start again from a small number, below
//! every stored position; see [`REBASE_HINT`].

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, Row, Statement};

use crate::error::{Error, Result};
use crate::event::Event;

/// Where a reader stands: it has seen every event at or before `(tx_id, id)`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    /// The writing transaction's id (`xid8`, epoch-extended, never wraps).
    pub tx_id: u64,
    /// The event's `id`.
    pub id: i64,
}

impl Position {
    /// Before every event.
    pub const START: Position = Position { tx_id: 0, id: 0 };

    pub fn new(tx_id: u64, id: i64) -> Position {
        Position { tx_id, id }
    }

    fn tx_text(&self) -> String {
        self.tx_id.to_string()
    }

    fn from_text(tx_id: &str, id: i64) -> Result<Position> {
        let tx_id = tx_id.parse().map_err(|_| {
            Error::Schema(format!("unexpected xid8 text {tx_id:?} from the server"))
        })?;
        Ok(Position { tx_id, id })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tx_id, self.id)
    }
}

/// What an operator does when a stored position is ahead of the cluster's transaction counter
/// (documented in the README).
pub const REBASE_HINT: &str = "a stored position is ahead of this cluster's transaction counter, \
     which happens after a dump/restore into a new cluster (transaction ids restart there); \
     see the README section \"Restoring into a new cluster\" to re-base positions";

/// One fetch: the wanted events in order, and the last position scanned, which may be past the
/// last wanted event when a topic filter skipped rows (the reader advances over those too).
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    /// Last row scanned (wanted or not); `None` when nothing was past the position.
    pub end: Option<Position>,
    /// Rows scanned, wanted or not; `scanned == limit` means more may be ready right away.
    pub scanned: usize,
}

/// The statements a reader uses, prepared once per connection.
pub struct Reader {
    fetch: Statement,
    beyond_horizon: Statement,
}

/// Rows past `$1/$2`, below the horizon, in position order. Rows of topics outside `$4` (NULL = all
/// topics) come back without payload and headers: the reader only needs their position to pass them.
const FETCH_SQL: &str = "
SELECT id, tx_id::text, event_id, topic, key, type, created_at,
       CASE WHEN wanted THEN payload END,
       CASE WHEN wanted THEN headers END,
       wanted
  FROM (SELECT e.*, ($4::text[] IS NULL OR e.topic = ANY($4::text[])) AS wanted
          FROM events e
         WHERE (e.tx_id, e.id) > ($1::text::xid8, $2::bigint)
           AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY e.tx_id, e.id
         LIMIT $3) AS page
 ORDER BY tx_id, id";

/// Committed rows past `$1/$2` that the horizon still holds back: an older transaction is open.
const BEYOND_HORIZON_SQL: &str = "
SELECT EXISTS (SELECT 1 FROM events
                WHERE (tx_id, id) > ($1::text::xid8, $2::bigint)
                  AND tx_id >= pg_snapshot_xmin(pg_current_snapshot()))";

impl Reader {
    pub async fn prepare(client: &Client) -> Result<Reader> {
        let fetch = client
            .prepare(FETCH_SQL)
            .await
            .map_err(|e| Error::database("prepare the event fetch", e))?;
        let beyond_horizon = client
            .prepare(BEYOND_HORIZON_SQL)
            .await
            .map_err(|e| Error::database("prepare the horizon check", e))?;
        Ok(Reader {
            fetch,
            beyond_horizon,
        })
    }

    /// Up to `limit` rows past `after`. `topics`: `None` for all.
    pub async fn fetch(
        &self,
        client: &Client,
        after: Position,
        limit: usize,
        topics: Option<&[String]>,
    ) -> Result<Batch> {
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        let rows = client
            .query(&self.fetch, &[&after.tx_text(), &after.id, &limit, &topics])
            .await
            .map_err(|e| Error::database(format!("fetch events after {after}"), e))?;
        let mut batch = Batch {
            scanned: rows.len(),
            ..Batch::default()
        };
        for row in &rows {
            let position = Position::from_text(row.get(1), row.get(0))?;
            batch.end = Some(position);
            if row.get::<_, bool>(9) {
                batch.events.push(event_from_row(position, row));
            }
        }
        Ok(batch)
    }

    /// Are there committed rows past `after` that the visibility horizon still holds back? Then an
    /// older transaction is open and the reader should poll again shortly rather than wait for a
    /// wake-up that already came.
    pub async fn pending_beyond_horizon(&self, client: &Client, after: Position) -> Result<bool> {
        let row = client
            .query_one(&self.beyond_horizon, &[&after.tx_text(), &after.id])
            .await
            .map_err(|e| Error::database("check for events beyond the visibility horizon", e))?;
        Ok(row.get(0))
    }
}

fn event_from_row(position: Position, row: &Row) -> Event {
    Event {
        position,
        event_id: row.get(2),
        topic: row.get(3),
        key: row.get(4),
        event_type: row.get(5),
        created_at: row.get(6),
        payload: row.get(7),
        headers: row.get(8),
    }
}

/// The open transaction with the oldest id: the one holding the visibility horizon back.
#[derive(Debug, Clone)]
pub struct HorizonBlocker {
    pub pid: i32,
    pub user: Option<String>,
    pub application_name: String,
    pub state: Option<String>,
    /// How long its transaction has been open.
    pub open_for: Duration,
}

impl fmt::Display for HorizonBlocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backend pid {} (user {}, application {:?}, state {}) has had a transaction open for {}",
            self.pid,
            self.user.as_deref().unwrap_or("?"),
            self.application_name,
            self.state.as_deref().unwrap_or("?"),
            humantime::format_duration(Duration::from_secs(self.open_for.as_secs())),
        )
    }
}

/// The backend whose open *writing* transaction holds delivery back, if any (needs
/// `pg_read_all_stats` to see other users' sessions; the consumer role has it).
pub async fn horizon_blocker(client: &Client) -> Result<Option<HorizonBlocker>> {
    let row = client
        .query_opt(
            "SELECT pid, usename::text, coalesce(application_name, ''), state,
                    extract(epoch FROM now() - xact_start)::float8
               FROM pg_stat_activity
              WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
              ORDER BY age(backend_xid) DESC
              LIMIT 1",
            &[],
        )
        .await
        .map_err(|e| Error::database("look up the oldest open transaction", e))?;
    Ok(row.map(|row| HorizonBlocker {
        pid: row.get(0),
        user: row.get(1),
        application_name: row.get(2),
        state: row.get(3),
        open_for: Duration::from_secs_f64(row.get::<_, Option<f64>>(4).unwrap_or(0.0).max(0.0)),
    }))
}

/// How far behind a reader is: events past `after` (counted up to `cap`, to stay cheap) and the
/// age of the oldest of them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    pub events: i64,
    pub oldest: Option<SystemTime>,
}

pub async fn backlog(client: &Client, after: Position, cap: i64) -> Result<Backlog> {
    let row = client
        .query_one(
            "SELECT count(*), min(created_at)
               FROM (SELECT created_at FROM events
                      WHERE (tx_id, id) > ($1::text::xid8, $2::bigint)
                      ORDER BY tx_id, id LIMIT $3) AS pending",
            &[&after.tx_text(), &after.id, &cap],
        )
        .await
        .map_err(|e| Error::database("measure the backlog", e))?;
    Ok(Backlog {
        events: row.get(0),
        oldest: row.get(1),
    })
}

// ---------------------------------------------------------------------------------------------
// Positions published for the purger, and the purge watermark.

/// Records `consumer`'s delivered position so the purger keeps what it still needs. Positions only
/// move forward here, even if an older write arrives late.
pub async fn publish(client: &Client, consumer: &str, position: Position) -> Result<()> {
    client
        .execute(
            "INSERT INTO consumer_positions AS p (consumer, tx_id, id, updated_at)
             VALUES ($1, $2::text::xid8, $3, now())
             ON CONFLICT (consumer) DO UPDATE
                SET tx_id = EXCLUDED.tx_id, id = EXCLUDED.id, updated_at = now()
              WHERE (p.tx_id, p.id) <= (EXCLUDED.tx_id, EXCLUDED.id)",
            &[&consumer, &position.tx_text(), &position.id],
        )
        .await
        .map_err(|e| {
            Error::database(format!("publish the position of consumer {consumer:?}"), e)
        })?;
    Ok(())
}

/// A consumer's published position.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedPosition {
    pub consumer: String,
    pub position: Position,
    pub updated_at: SystemTime,
}

/// Every published position, slowest first.
pub async fn published_positions(client: &Client) -> Result<Vec<PublishedPosition>> {
    let rows = client
        .query(
            "SELECT consumer, tx_id::text, id, updated_at FROM consumer_positions ORDER BY tx_id, id",
            &[],
        )
        .await
        .map_err(|e| Error::database("read consumer positions", e))?;
    rows.iter()
        .map(|row| {
            Ok(PublishedPosition {
                consumer: row.get(0),
                position: Position::from_text(row.get(1), row.get(2))?,
                updated_at: row.get(3),
            })
        })
        .collect()
}

/// The highest position ever purged, and whether a forced purge put it there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Watermark {
    pub position: Position,
    pub forced: bool,
    pub updated_at: SystemTime,
}

pub async fn watermark(client: &Client) -> Result<Option<Watermark>> {
    let row = client
        .query_opt(
            "SELECT tx_id::text, id, forced, updated_at FROM purge_watermark",
            &[],
        )
        .await
        .map_err(|e| Error::database("read the purge watermark", e))?;
    row.map(|row| {
        Ok(Watermark {
            position: Position::from_text(row.get(0), row.get(1))?,
            forced: row.get(2),
            updated_at: row.get(3),
        })
    })
    .transpose()
}

/// The oldest event still in the table, if any.
pub async fn oldest(client: &Client) -> Result<Option<(Position, SystemTime)>> {
    let row = client
        .query_opt(
            "SELECT tx_id::text, id, created_at FROM events ORDER BY tx_id, id LIMIT 1",
            &[],
        )
        .await
        .map_err(|e| Error::database("find the oldest event", e))?;
    row.map(|row| Ok((Position::from_text(row.get(0), row.get(1))?, row.get(2))))
        .transpose()
}

/// What one purge batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Purged {
    pub deleted: u64,
    /// The highest position deleted.
    pub highest: Option<Position>,
}

/// Deletes up to `limit` events created before `cutoff`, below the visibility horizon, and — when
/// `keep_after` is given — at or before that position (the slowest consumer's). Runs in the
/// caller's connection as one short statement, and raises the watermark in the same statement so
/// a consumer can never miss the fact that rows past its position went.
pub async fn purge_batch(
    client: &Client,
    cutoff: SystemTime,
    keep_after: Option<Position>,
    limit: i64,
    forced: bool,
) -> Result<Purged> {
    let (keep_tx, keep_id) = match keep_after {
        Some(p) => (Some(p.tx_text()), Some(p.id)),
        None => (None, None),
    };
    let row = client
        .query_one(
            "WITH doomed AS (
                 SELECT id FROM events
                  WHERE created_at < $1
                    AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
                    AND ($2::text IS NULL OR (tx_id, id) <= ($2::text::xid8, $3::bigint))
                  ORDER BY created_at
                  LIMIT $4
             ), deleted AS (
                 DELETE FROM events e USING doomed d WHERE e.id = d.id RETURNING e.tx_id, e.id
             ), highest AS (
                 SELECT tx_id, id FROM deleted ORDER BY tx_id DESC, id DESC LIMIT 1
             ), raised AS (
                 INSERT INTO purge_watermark AS w (tx_id, id, forced, updated_at)
                 SELECT tx_id, id, $5, now() FROM highest
                 ON CONFLICT (singleton) DO UPDATE
                    SET tx_id = EXCLUDED.tx_id, id = EXCLUDED.id,
                        forced = EXCLUDED.forced, updated_at = now()
                  WHERE (w.tx_id, w.id) < (EXCLUDED.tx_id, EXCLUDED.id)
             )
             SELECT (SELECT count(*) FROM deleted),
                    (SELECT tx_id::text FROM highest), (SELECT id FROM highest)",
            &[&cutoff, &keep_tx, &keep_id, &limit, &forced],
        )
        .await
        .map_err(|e| Error::database("delete a batch of old events", e))?;
    let deleted: i64 = row.get(0);
    let highest = match (row.get::<_, Option<&str>>(1), row.get::<_, Option<i64>>(2)) {
        (Some(tx), Some(id)) => Some(Position::from_text(tx, id)?),
        _ => None,
    };
    Ok(Purged {
        deleted: deleted as u64,
        highest,
    })
}

/// Counts what [`purge_batch`] would delete in total (for `--dry-run`).
pub async fn purgeable(
    client: &Client,
    cutoff: SystemTime,
    keep_after: Option<Position>,
) -> Result<u64> {
    let (keep_tx, keep_id) = match keep_after {
        Some(p) => (Some(p.tx_text()), Some(p.id)),
        None => (None, None),
    };
    let row = client
        .query_one(
            "SELECT count(*) FROM events
              WHERE created_at < $1
                AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
                AND ($2::text IS NULL OR (tx_id, id) <= ($2::text::xid8, $3::bigint))",
            &[&cutoff, &keep_tx, &keep_id],
        )
        .await
        .map_err(|e| Error::database("count purgeable events", e))?;
    Ok(row.get::<_, i64>(0) as u64)
}
