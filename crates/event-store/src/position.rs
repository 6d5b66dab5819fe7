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
    watermark: Statement,
}

/// Rows past `$1/$2`, below the horizon, in position order. Rows of topics outside `$4` (NULL = all
/// topics) come back without payload and headers: the reader only needs their position to pass them.
///
/// The outer ORDER BY names `page.tx_id`, qualified: a bare `tx_id` there resolves to the *output*
/// column `tx_id::text` (output names win in ORDER BY) and sorts `'999' > '1000'`, which once put
/// the wrong row last and moved readers backwards at every digit-count boundary of the xid.
const FETCH_SQL: &str = "
SELECT page.id, page.tx_id::text, page.event_id, page.topic, page.key, page.type, page.created_at,
       CASE WHEN page.wanted THEN page.payload END,
       CASE WHEN page.wanted THEN page.headers END,
       page.wanted
  FROM (SELECT e.*, ($4::text[] IS NULL OR e.topic = ANY($4::text[])) AS wanted
          FROM events e
         WHERE (e.tx_id, e.id) > ($1::text::xid8, $2::bigint)
           AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY e.tx_id, e.id
         LIMIT $3) AS page
 ORDER BY page.tx_id, page.id";

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
        let watermark = client
            .prepare(WATERMARK_SQL)
            .await
            .map_err(|e| Error::database("prepare the watermark read", e))?;
        Ok(Reader {
            fetch,
            beyond_horizon,
            watermark,
        })
    }

    /// [`watermark`] with the prepared statement: readers check it on every fetch.
    pub async fn watermark(&self, client: &Client) -> Result<Option<Watermark>> {
        let row = client
            .query_opt(&self.watermark, &[])
            .await
            .map_err(|e| Error::database("read the purge watermark", e))?;
        row.map(|row| watermark_from_row(&row)).transpose()
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
    upsert_position(client, consumer, position, false).await
}

/// Records where `consumer` starts, even behind what it published before: a consumer whose
/// checkpoint was reset or restored from an older backup needs the purger to keep everything
/// after *that* position, not after the one it had reached before.
pub async fn register(client: &Client, consumer: &str, position: Position) -> Result<()> {
    upsert_position(client, consumer, position, true).await
}

async fn upsert_position(
    client: &Client,
    consumer: &str,
    position: Position,
    may_move_back: bool,
) -> Result<()> {
    client
        .execute(
            "INSERT INTO consumer_positions AS p (consumer, tx_id, id, updated_at)
             VALUES ($1, $2::text::xid8, $3, now())
             ON CONFLICT (consumer) DO UPDATE
                SET tx_id = EXCLUDED.tx_id, id = EXCLUDED.id, updated_at = now()
              WHERE $4 OR (p.tx_id, p.id) <= (EXCLUDED.tx_id, EXCLUDED.id)",
            &[&consumer, &position.tx_text(), &position.id, &may_move_back],
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
            // Qualified: a bare `tx_id` would sort by the text output column of the same name.
            "SELECT consumer, tx_id::text, id, updated_at FROM consumer_positions p
              ORDER BY p.tx_id, p.id",
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
        .query_opt(WATERMARK_SQL, &[])
        .await
        .map_err(|e| Error::database("read the purge watermark", e))?;
    row.map(|row| watermark_from_row(&row)).transpose()
}

const WATERMARK_SQL: &str = "SELECT tx_id::text, id, forced, updated_at FROM purge_watermark";

fn watermark_from_row(row: &Row) -> Result<Watermark> {
    Ok(Watermark {
        position: Position::from_text(row.get(0), row.get(1))?,
        forced: row.get(2),
        updated_at: row.get(3),
    })
}

/// The newest event a reader could read right now: below the visibility horizon, highest position.
/// One backward probe of the `(tx_id, id)` index, cheap enough to repeat every millisecond or so.
///
/// It only ever moves forward, and it moves exactly when new rows become readable: rows with an
/// id below the horizon belong to finished transactions, so every row that becomes readable later
/// sorts after everything readable now. A watcher that compares it with the last value it saw
/// therefore learns "something new is readable" without any NOTIFY on the writers' commits (which
/// is how table-change capture's triggers write) and without ever missing a late commit.
pub struct NewestReadable(Statement);

/// Qualified `e.tx_id` in ORDER BY: a bare name would sort by the text output column.
const NEWEST_READABLE_SQL: &str = "
SELECT e.tx_id::text, e.id, e.topic
  FROM events e
 WHERE e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
 ORDER BY e.tx_id DESC, e.id DESC
 LIMIT 1";

impl NewestReadable {
    pub async fn prepare(client: &Client) -> Result<NewestReadable> {
        client
            .prepare(NEWEST_READABLE_SQL)
            .await
            .map(NewestReadable)
            .map_err(|e| Error::database("prepare the newest-readable probe", e))
    }

    /// The newest readable event's position and topic; `None` when the table is empty (or
    /// nothing is below the horizon yet).
    pub async fn read(&self, client: &Client) -> Result<Option<(Position, String)>> {
        let row = client
            .query_opt(&self.0, &[])
            .await
            .map_err(|e| Error::database("probe for the newest readable event", e))?;
        row.map(|row| Ok((Position::from_text(row.get(0), row.get(1))?, row.get(2))))
            .transpose()
    }
}

/// The oldest event still in the table, if any.
pub async fn oldest(client: &Client) -> Result<Option<(Position, SystemTime)>> {
    let row = client
        .query_opt(
            // Qualified: a bare `tx_id` would sort by the text output column of the same name
            // (wrong across a digit-count boundary, and a full sort instead of the index).
            "SELECT e.tx_id::text, e.id, e.created_at FROM events e ORDER BY e.tx_id, e.id LIMIT 1",
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

/// An optional position as two nullable parameters (`$n::text::xid8`, `$m::bigint`).
fn optional_binds(position: Option<Position>) -> (Option<String>, Option<i64>) {
    match position {
        Some(p) => (Some(p.tx_text()), Some(p.id)),
        None => (None, None),
    }
}

/// What one batch of a purge pass did, and where the next batch of the same pass may start.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PurgeStep {
    pub deleted: u64,
    /// The highest position deleted.
    pub highest: Option<Position>,
    /// The newest `created_at` deleted. Every event the batch passed over before it stays
    /// ineligible for the rest of the pass (it is held back by a position or the horizon), so the
    /// next batch may start its index scan here instead of at the oldest entry; see
    /// [`purge_step`].
    pub resume_from: Option<SystemTime>,
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
    let step = purge_step(client, cutoff, keep_after, None, limit, forced).await?;
    Ok(Purged {
        deleted: step.deleted,
        highest: step.highest,
    })
}

/// [`purge_batch`] for one batch of a pass: the scan along the `created_at` index starts at
/// `resume_from` (the previous batch's [`PurgeStep::resume_from`]; `None` for the first batch).
///
/// Why resume: a deleted row stays in the index until vacuum, and while any snapshot older than
/// the delete is open (a long report, a `pg_dump`) the scan cannot even mark it dead, so a pass
/// that always started at the oldest entry would walk every row it already deleted again on each
/// batch — quadratic in the backlog. Starting at the last deleted `created_at` (inclusive, since
/// rows of one transaction share it) keeps each batch's scan proportional to its size.
///
/// The rows are picked by `ctid` in a materialised CTE and deleted with a TID scan: the same
/// tuples, in the same statement, without a second trip through the primary key. Events are
/// never updated, and a row deleted or moved concurrently is skipped, never mistaken.
///
/// The horizon is computed once per statement, as a sub-select: written inline it is a per-row
/// filter on the `created_at` index scan, taking a fresh snapshot for every row it looks at (a
/// cost that grows with the number of open transactions).
pub async fn purge_step(
    client: &Client,
    cutoff: SystemTime,
    keep_after: Option<Position>,
    resume_from: Option<SystemTime>,
    limit: i64,
    forced: bool,
) -> Result<PurgeStep> {
    let (keep_tx, keep_id) = optional_binds(keep_after);
    let row = client
        .query_one(
            "WITH doomed AS MATERIALIZED (
                 SELECT ctid FROM events
                  WHERE created_at < $1
                    AND created_at >= coalesce($6::timestamptz, '-infinity')
                    AND tx_id < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
                    AND ($2::text IS NULL OR (tx_id, id) <= ($2::text::xid8, $3::bigint))
                  ORDER BY created_at
                  LIMIT $4
             ), deleted AS (
                 DELETE FROM events WHERE ctid = ANY (ARRAY(SELECT ctid FROM doomed))
                 RETURNING tx_id, id, created_at
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
                    (SELECT tx_id::text FROM highest), (SELECT id FROM highest),
                    (SELECT max(created_at) FROM deleted)",
            &[
                &cutoff,
                &keep_tx,
                &keep_id,
                &limit.max(1),
                &forced,
                &resume_from,
            ],
        )
        .await
        .map_err(|e| Error::database("delete a batch of old events", e))?;
    let deleted: i64 = row.get(0);
    let highest = match (row.get::<_, Option<&str>>(1), row.get::<_, Option<i64>>(2)) {
        (Some(tx), Some(id)) => Some(Position::from_text(tx, id)?),
        _ => None,
    };
    Ok(PurgeStep {
        deleted: deleted as u64,
        highest,
        resume_from: row.get(3),
    })
}

/// Counts what [`purge_batch`] would delete in total (for `--dry-run`).
pub async fn purgeable(
    client: &Client,
    cutoff: SystemTime,
    keep_after: Option<Position>,
) -> Result<u64> {
    purgeable_past(client, cutoff, Position::START, keep_after).await
}

/// Counts the events a purge with `cutoff` and `keep_after` would delete that lie past `after`:
/// what a consumer standing at `after` would lose (for the warnings about expired consumers and
/// forced purges).
pub async fn purgeable_past(
    client: &Client,
    cutoff: SystemTime,
    after: Position,
    keep_after: Option<Position>,
) -> Result<u64> {
    let (keep_tx, keep_id) = optional_binds(keep_after);
    let row = client
        .query_one(
            "SELECT count(*) FROM events
              WHERE created_at < $1
                AND tx_id < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
                AND (tx_id, id) > ($4::text::xid8, $5::bigint)
                AND ($2::text IS NULL OR (tx_id, id) <= ($2::text::xid8, $3::bigint))",
            &[&cutoff, &keep_tx, &keep_id, &after.tx_text(), &after.id],
        )
        .await
        .map_err(|e| Error::database("count the events a purge would take from a consumer", e))?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// Why events older than the retention are still in the table after a purge: the first such
/// event (by age) that consumers still need, and the first that the visibility horizon holds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Kept {
    /// An old event past `keep_after`: the slowest consumer has not read it yet.
    pub by_position: Option<(Position, SystemTime)>,
    /// An old event at or above the visibility horizon: an older transaction is still open, so
    /// no consumer can have read it yet.
    pub by_horizon: Option<(Position, SystemTime)>,
}

/// What [`purge_step`] with `cutoff` and `keep_after` leaves behind, and why (for the pass
/// report). Both lookups stop at the first hit: the first walks the `created_at` index (old rows
/// past the slowest consumer are the oldest left), the second the position index from the horizon
/// up (only transactions newer than the oldest open one are there).
pub async fn kept(
    client: &Client,
    cutoff: SystemTime,
    keep_after: Option<Position>,
) -> Result<Kept> {
    let by_position = match keep_after {
        None => None,
        Some(keep) => client
            .query_opt(
                "SELECT tx_id::text, id, created_at FROM events
                  WHERE created_at < $1
                    AND tx_id < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
                    AND (tx_id, id) > ($2::text::xid8, $3::bigint)
                  ORDER BY created_at
                  LIMIT 1",
                &[&cutoff, &keep.tx_text(), &keep.id],
            )
            .await
            .map_err(|e| Error::database("look for old events a consumer still needs", e))?
            .map(|row| Ok::<_, Error>((Position::from_text(row.get(0), row.get(1))?, row.get(2))))
            .transpose()?,
    };
    let by_horizon = client
        .query_opt(
            "SELECT e.tx_id::text, e.id, e.created_at FROM events e
              WHERE e.tx_id >= pg_snapshot_xmin(pg_current_snapshot())
                AND e.created_at < $1
              ORDER BY e.tx_id, e.id
              LIMIT 1",
            &[&cutoff],
        )
        .await
        .map_err(|e| Error::database("look for old events beyond the visibility horizon", e))?
        .map(|row| Ok::<_, Error>((Position::from_text(row.get(0), row.get(1))?, row.get(2))))
        .transpose()?;
    Ok(Kept {
        by_position,
        by_horizon,
    })
}
