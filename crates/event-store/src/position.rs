//! The position model and **all** SQL that reads or deletes events by position.
//!
//! A position is the pair `(tx_id, id)` of the last event a reader has passed. Events are read in
//! `(tx_id, id)` order and only when `tx_id` is below the visibility horizon
//! `pg_snapshot_xmin(pg_current_snapshot())`. (Following `id` alone skips events: ids are taken
//! at INSERT, rows appear at COMMIT.)
//!
//! # The sort key, and why the order is causal
//!
//! `tx_id` is not simply the writer's transaction id. Since migration V8 its default is
//! `events_sort_key()`:
//!
//! ```text
//! key = greatest(own, latest)
//!   own    = pg_current_xact_id()                          the writer's id, assigned now if needed
//!   latest = pg_snapshot_xmax(pg_current_snapshot()) - 1   from a snapshot taken as the row is written
//! ```
//!
//! `xmax - 1` is PostgreSQL's `latestCompletedXid` when the snapshot was taken: the newest
//! transaction id known to have finished. It never decreases. The function is VOLATILE plpgsql, so
//! in READ COMMITTED its expression runs with a fresh snapshot for each row, taken when the row is
//! written. In REPEATABLE READ and SERIALIZABLE that snapshot is the transaction's, taken at its
//! first statement.
//!
//! **Causal.** Say transaction B committed before A wrote a row, and B's commit was visible to A
//! then (always so in READ COMMITTED; in the stricter levels when A's snapshot came after B's
//! commit). Then `latestCompletedXid` was already at least B's own id, and at least every `latest`
//! of B's rows (it only grows). So the row's key is at least every key of B's. On a tie, the row's
//! `id` comes from the sequence after B's rows took theirs. So it sorts after all of B's events.
//! This also holds when the row's statement began before B committed: a statement whose UPDATE
//! waited for B's row lock and then built on B's version still writes its events after B's.
//! Capture triggers write their events from their own statement, after the captured one.
//!
//! **Within one transaction** keys never decrease and ids increase, so a transaction's events
//! keep the order they were written in. They are not necessarily adjacent: another transaction
//! that committed between two of its statements sorts between them. Unrelated transactions (none
//! could see the other) are in no promised order; this is not commit order. True commit order
//! would need commit-time serialisation (one lock for every writer) or WAL decoding.
//!
//! **Nothing is skipped.** This is the round-1 horizon argument; the new key keeps it because it
//! is never below `own`. The horizon `xmin` is at most the id of every transaction still running
//! when the reader takes its snapshot. A transaction with no id yet gets one at or above the next
//! unassigned id, which is also at or above `xmin`. So every row that is not yet visible to the
//! reader, written now or later, has `key >= own >= xmin`. The reader takes only rows with
//! `key < xmin`. Those were written by finished transactions, and the reader's snapshot sees all
//! of them. Once a reader has passed a position, no row can appear behind it. The larger key only
//! means a row may wait until transactions older than `latest` finish. They could still write
//! rows that sort before it, so it has to.
//!
//! **Rejected alternatives** (measured or argued in the issue 20 note):
//! - The same expression inline in the column default uses the *statement's* snapshot. A statement
//!   that waited for a row lock, and then built on the commit it waited for, would sort before
//!   that commit (the test `a_statement_that_waited_for_a_commit_sorts_after_it` fails with it).
//!   A SQL-language function can be inlined, which gives the same result.
//! - `greatest(own, xmax)` without the `- 1` is causal too. But `xmax` may become the id of the
//!   *next* transaction, so a row would wait for a writer that started after it.
//! - A commit sequence taken under a lock serialises every writer's commit, which is the cost the
//!   NOTIFY design avoids.
//! - A row trigger that computes the key costs a trigger call per row, and a producer could bypass
//!   a session setting. The column default needs neither, and producers still cannot set `tx_id`
//!   (column grants).
//!
//! Upgrading (V8) changes only the default. Stored rows keep their keys, and their relative order
//! is unchanged. A row written after the upgrade still has `key >= own`, so a consumer running
//! across the upgrade is covered by the same argument.
//!
//! tokio-postgres has no Rust type for `xid8`, so `tx_id` travels as text (`tx_id::text` out,
//! `$1::text::xid8` in). Ordering and comparisons always use the `xid8` column itself, never its
//! text form, where `'999' > '1000'`.
//!
//! After a dump/restore into a new cluster transaction ids start again from a small number, below
//! every stored position; see [`REBASE_HINT`]. Keys are still below the new cluster's next
//! transaction id (`latest` has finished, `own` is assigned), so the restore check is unchanged.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, Row, Statement};

use crate::error::{Error, Result};
use futures_util::StreamExt;

use crate::event::{Event, RawJson};

/// Where a reader stands: it has seen every event at or before `(tx_id, id)`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    /// The event's sort key `events.tx_id` (`xid8`, epoch-extended, never wraps): its writing
    /// transaction's id or the newest one its statement saw finished, see the module docs.
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

/// Why a text is not a position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a position: expected TX_ID/ID, two non-negative integers such as 1234/56")]
pub struct BadPosition {
    pub text: String,
}

impl Position {
    /// Parses the `tx_id/id` text that [`Position`]'s `Display` prints (the form services log
    /// and clients send back to resume). Strict: two plain non-negative integers.
    pub fn parse(text: &str) -> std::result::Result<Position, BadPosition> {
        let bad = || BadPosition {
            text: text.chars().take(64).collect(),
        };
        let (tx, id) = text.trim().split_once('/').ok_or_else(bad)?;
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(tx) || !all_digits(id) {
            return Err(bad());
        }
        Ok(Position {
            tx_id: tx.parse().map_err(|_| bad())?,
            id: id.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tx_id, self.id)
    }
}

/// What an operator does when a stored position is ahead of the cluster's transaction counter
/// (documented in docs/consumer.md).
pub const REBASE_HINT: &str = "a stored position is ahead of this cluster's transaction counter, \
     which happens after a dump/restore into a new cluster (transaction ids restart there); \
     see \"Restoring into a new cluster\" in docs/consumer.md to re-base positions";

/// One fetch: the wanted events in order, and the last position scanned, which may be past the
/// last wanted event when a topic filter skipped rows (the reader advances over those too).
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    /// Rows whose columns could not be decoded (see [`Undecodable`]); the sink records them as dead
    /// letters instead of stopping the stream.
    pub undecodable: Vec<Undecodable>,
    /// Last row scanned (wanted or not); `None` when nothing was past the position.
    pub end: Option<Position>,
    /// Rows scanned, wanted or not.
    pub scanned: usize,
    /// More rows were ready past `end` when this batch was cut (by rows or by bytes): fetch again
    /// at once rather than wait for a wake-up.
    pub more: bool,
    /// The reader cut this batch on the text it received: the stored sizes the server bounded it
    /// by were compressed, and more rows came than the byte bound holds (the rest were dropped
    /// unread). A reader should ask for about `scanned` rows next time.
    pub cut_on_text: bool,
    /// Bytes of payload and headers text in the batch.
    pub bytes: usize,
    /// The `event_id` of the row at `end` (wanted or not): a checkpoint records it, so a reader
    /// can later tell that the row at its position is still the same event.
    pub end_event_id: Option<uuid::Uuid>,
}

/// How much one fetch may return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Rows scanned (wanted or not).
    pub rows: usize,
    /// Bytes of payload and headers text. A single larger event is still returned alone, so the
    /// stream never stalls on it.
    pub bytes: usize,
}

impl Limits {
    /// The consumer's defaults: 1000 rows, 4 MiB.
    pub const DEFAULT: Limits = Limits {
        rows: 1000,
        bytes: 4 << 20,
    };

    pub fn rows(rows: usize) -> Limits {
        Limits {
            rows,
            ..Limits::DEFAULT
        }
    }
}

/// A row that PostgreSQL stored but this reader cannot turn into an [`Event`] (a column of an
/// unexpected type or value). Whatever could be read is kept for the dead-letter record.
#[derive(Debug, Clone)]
pub struct Undecodable {
    pub position: Position,
    pub event_id: Option<uuid::Uuid>,
    pub topic: Option<String>,
    pub key: Option<String>,
    pub event_type: Option<String>,
    pub payload: Option<String>,
    pub reason: String,
}

/// The statements a reader uses, prepared once per connection.
pub struct Reader {
    fetch: Statement,
    beyond_horizon: Statement,
    watermark: Statement,
}

/// Rows past `$1/$2`, below the horizon, in position order, at most `$3` rows and about `$5` bytes.
/// Rows of topics outside `$4` (NULL = all topics) come back without payload and headers: the
/// reader only needs their position to pass them.
///
/// Payload and headers travel as text: a jsonb value may hold numbers no double holds (`1e400`)
/// and nesting deeper than JSON parsers allow, and the reader must never fail on data. The sink
/// decides what it can store.
///
/// The byte bound is applied in two places. Here, on the *stored* sizes (`pg_column_size`, which
/// reads no TOAST data): rows are kept while the running total before them is under `$5`, so the
/// first row always comes back, and the text of rows past the cut is never built. Stored sizes can
/// be compressed, so [`Reader::fetch`] also cuts on the text it actually receives.
///
/// `more`: the page had a row after the last one returned (lead over the page, so the window
/// never needs the whole page in memory).
///
/// The ORDER BYs name `page.tx_id`/`sized.tx_id`, qualified: a bare `tx_id` resolves to the
/// *output* column `tx_id::text` (output names win in ORDER BY) and sorts `'999' > '1000'`, which
/// once put the wrong row last and moved readers backwards at every digit-count boundary of the
/// xid.
const FETCH_SQL: &str = "
SELECT sized.id, sized.tx_id::text, sized.event_id, sized.topic, sized.key, sized.type,
       sized.created_at,
       CASE WHEN sized.wanted THEN sized.payload::text END,
       CASE WHEN sized.wanted THEN sized.headers::text END,
       sized.wanted, sized.more
  FROM (SELECT page.*,
               sum(page.stored) OVER w - page.stored AS before,
               lead(page.id) OVER w IS NOT NULL AS more
          FROM (SELECT e.*, wanted,
                       CASE WHEN wanted
                            THEN pg_column_size(e.payload) + pg_column_size(e.headers)
                            ELSE 0 END AS stored
                  FROM events e,
                       LATERAL (SELECT ($4::text[] IS NULL OR e.topic = ANY($4::text[]))) AS f(wanted)
                 WHERE (e.tx_id, e.id) > ($1::text::xid8, $2::bigint)
                   AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
                 ORDER BY e.tx_id, e.id
                 LIMIT $3) AS page
        WINDOW w AS (ORDER BY page.tx_id, page.id ROWS UNBOUNDED PRECEDING)) AS sized
 WHERE sized.before < $5
 ORDER BY sized.tx_id, sized.id";

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

    /// Up to `limit` rows past `after`, with the default byte bound. `topics`: `None` for all.
    pub async fn fetch(
        &self,
        client: &Client,
        after: Position,
        limit: usize,
        topics: Option<&[String]>,
    ) -> Result<Batch> {
        self.fetch_bounded(client, after, Limits::rows(limit), topics)
            .await
    }

    /// Rows past `after` within `limits`. `topics`: `None` for all.
    ///
    /// Never fails on the *contents* of a row: a row whose columns cannot be decoded comes back in
    /// [`Batch::undecodable`]. Only a position that cannot be read fails the fetch (the schema
    /// makes both columns NOT NULL and typed, so that means the schema is not ours).
    pub async fn fetch_bounded(
        &self,
        client: &Client,
        after: Position,
        limits: Limits,
        topics: Option<&[String]>,
    ) -> Result<Batch> {
        let rows = i64::try_from(limits.rows.max(1)).unwrap_or(i64::MAX);
        let bytes = i64::try_from(limits.bytes.max(1)).unwrap_or(i64::MAX);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&after.tx_text(), &after.id, &rows, &topics, &bytes];
        let stream = client
            .query_raw(&self.fetch, params)
            .await
            .map_err(|e| Error::database(format!("fetch events after {after}"), e))?;
        futures_util::pin_mut!(stream);
        let mut batch = Batch::default();
        let mut last_more = false;
        while let Some(row) = stream.next().await {
            let row = row.map_err(|e| Error::database(format!("fetch events after {after}"), e))?;
            if batch.scanned > 0 && batch.bytes >= limits.bytes {
                // Cut on the text actually received (stored sizes may be compressed); the rest of
                // the rows still arrive and are dropped unread, so memory stays bounded.
                batch.more = true;
                batch.cut_on_text = true;
                continue;
            }
            let position = row
                .try_get::<_, &str>(1)
                .map_err(|e| Error::Schema(format!("events.tx_id cannot be read: {e}")))
                .and_then(|tx| {
                    let id = row
                        .try_get::<_, i64>(0)
                        .map_err(|e| Error::Schema(format!("events.id cannot be read: {e}")))?;
                    Position::from_text(tx, id)
                })?;
            batch.scanned += 1;
            batch.end = Some(position);
            batch.end_event_id = row.try_get(2).ok();
            last_more = row.try_get::<_, bool>(10).unwrap_or(false);
            if row.try_get::<_, bool>(9).unwrap_or(true) {
                match event_from_row(position, &row) {
                    Ok(event) => {
                        batch.bytes += event.payload.len() + event.headers.len();
                        batch.events.push(event);
                    }
                    Err(bad) => {
                        batch.bytes += bad.payload.as_ref().map_or(0, |p| p.len());
                        batch.undecodable.push(*bad);
                    }
                }
            }
        }
        batch.more |= last_more || batch.scanned >= limits.rows;
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
        row.try_get(0)
            .map_err(|e| Error::database("check for events beyond the visibility horizon", e))
    }
}

/// An event from a fetched row, or what could be read of it and why the rest could not.
fn event_from_row(position: Position, row: &Row) -> std::result::Result<Event, Box<Undecodable>> {
    let event_id = row.try_get(2);
    let topic = row.try_get(3);
    let key = row.try_get(4);
    let event_type = row.try_get(5);
    let created_at = row.try_get(6);
    let payload = row.try_get::<_, Option<String>>(7);
    let headers = row.try_get::<_, Option<String>>(8);
    match (
        event_id, topic, key, event_type, created_at, payload, headers,
    ) {
        (
            Ok(event_id),
            Ok(topic),
            Ok(key),
            Ok(event_type),
            Ok(created_at),
            Ok(Some(payload)),
            Ok(headers),
        ) => Ok(Event {
            position,
            event_id,
            topic,
            key,
            event_type,
            created_at,
            payload: RawJson::from(payload),
            headers: RawJson::from(headers.unwrap_or_else(|| "{}".into())),
        }),
        (event_id, topic, key, event_type, created_at, payload, headers) => {
            let reason = [
                event_id.as_ref().err().map(|e| format!("event_id: {e}")),
                topic.as_ref().err().map(|e| format!("topic: {e}")),
                key.as_ref().err().map(|e| format!("key: {e}")),
                event_type.as_ref().err().map(|e| format!("type: {e}")),
                created_at
                    .as_ref()
                    .err()
                    .map(|e| format!("created_at: {e}")),
                match &payload {
                    Err(e) => Some(format!("payload: {e}")),
                    Ok(None) => Some("payload: NULL".into()),
                    Ok(Some(_)) => None,
                },
                headers.as_ref().err().map(|e| format!("headers: {e}")),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("; ");
            Err(Box::new(Undecodable {
                position,
                event_id: event_id.ok(),
                topic: topic.ok(),
                key: key.ok().flatten(),
                event_type: event_type.ok().flatten(),
                payload: payload.ok().flatten(),
                reason: format!("undecodable column: {reason}"),
            }))
        }
    }
}

/// The position of the newest event below the visibility horizon, or [`Position::START`] when
/// there is none: a reader starting here sees every event that becomes readable from now on and
/// none from before. Every transaction below the horizon has ended, so no row can still appear
/// behind it. (A backward scan of the position index from the top, skipping the few rows of
/// transactions still at or above the horizon.)
pub async fn latest(client: &Client) -> Result<Position> {
    let row = client
        .query_opt(
            // Qualified: a bare `tx_id` would sort by the text output column of the same name.
            "SELECT e.tx_id::text, e.id FROM events e
              WHERE e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
              ORDER BY e.tx_id DESC, e.id DESC
              LIMIT 1",
            &[],
        )
        .await
        .map_err(|e| Error::database("find the newest readable event", e))?;
    match row {
        Some(row) => Position::from_text(row.get(0), row.get(1)),
        None => Ok(Position::START),
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

/// The backend whose open *writing* transaction holds delivery back, if any. Asked through
/// migration V4's `events_horizon_blocker()`, a narrow `SECURITY DEFINER` function that the
/// consumer role may execute, instead of granting it `pg_read_all_stats` (every session's query).
pub async fn horizon_blocker(client: &Client) -> Result<Option<HorizonBlocker>> {
    let row = client
        .query_opt(
            "SELECT pid, usename, application_name, state, open_for FROM events_horizon_blocker()",
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
///
/// A row belongs to the login that first wrote it (`owner`, row-level security since V4): another
/// login publishing under the same name fails with SQLSTATE 42501 instead of moving someone
/// else's position. A row from before V4 (no owner) is claimed by the first login to publish.
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
                SET tx_id = EXCLUDED.tx_id, id = EXCLUDED.id, updated_at = now(),
                    owner = current_user
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

/// Which database a reader reads: the cluster's system identifier (new with every `initdb`, kept
/// by physical replicas) and the database's name. A checkpoint records it, so a consumer pointed
/// at another database, or at a new cluster, notices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub system_id: String,
    pub database: String,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "database {:?} of cluster {}",
            self.database, self.system_id
        )
    }
}

/// The [`Origin`] of `client`'s database (`pg_control_system()` is readable by every role).
pub async fn origin(client: &Client) -> Result<Origin> {
    let row = client
        .query_one(
            "SELECT system_identifier::text, current_database()::text FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(|e| Error::database("read the cluster's system identifier", e))?;
    let read = |i: usize| {
        row.try_get::<_, String>(i)
            .map_err(|e| Error::database("read the cluster's system identifier", e))
    };
    Ok(Origin {
        system_id: read(0)?,
        database: read(1)?,
    })
}

/// The `event_id` of the event stored at `position`, if any.
pub async fn event_at(client: &Client, position: Position) -> Result<Option<uuid::Uuid>> {
    let row = client
        .query_opt(
            "SELECT event_id FROM events WHERE id = $2 AND tx_id = $1::text::xid8",
            &[&position.tx_text(), &position.id],
        )
        .await
        .map_err(|e| Error::database(format!("look up the event at {position}"), e))?;
    row.map(|row| row.try_get(0))
        .transpose()
        .map_err(|e| Error::database(format!("look up the event at {position}"), e))
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

// ---------------------------------------------------------------------------------------------
// Where to start reading, and how much lies between two positions (operator tools: `eventsctl
// reset --to …`, `tail --from …`, `status`).

/// The position just before the first event (in position order) created at or after `time`, or
/// `None` when no event is that recent. A reader placed there reads every event created since
/// `time` — and possibly a few older ones, because `created_at` (the writing transaction's start)
/// does not follow commit order: re-reading is safe, skipping is not.
pub async fn before_time(client: &Client, time: SystemTime) -> Result<Option<Position>> {
    let row = client
        .query_opt(
            "SELECT e.tx_id::text, e.id FROM events e
              WHERE e.created_at >= $1
              ORDER BY e.tx_id, e.id
              LIMIT 1",
            &[&time],
        )
        .await
        .map_err(|e| Error::database("find the first event created after a time", e))?;
    row.map(|row| {
        let first = Position::from_text(row.get(0), row.get(1))?;
        // Nothing lies between (tx, id - 1) and (tx, id): ids are integers, and no event of an
        // earlier position was created after `time` (this one is the first).
        Ok(Position::new(first.tx_id, first.id - 1))
    })
    .transpose()
}

/// Events after `after` up to and including `up_to`, counted along the position index and
/// stopping at `cap` (so the answer is exact below `cap`, and "at least `cap`" at it).
pub async fn count_between(
    client: &Client,
    after: Position,
    up_to: Position,
    cap: i64,
) -> Result<i64> {
    let row = client
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM events
                WHERE (tx_id, id) > ($1::text::xid8, $2::bigint)
                  AND (tx_id, id) <= ($3::text::xid8, $4::bigint)
                ORDER BY tx_id, id LIMIT $5) AS page",
            &[
                &after.tx_text(),
                &after.id,
                &up_to.tx_text(),
                &up_to.id,
                &cap.max(0),
            ],
        )
        .await
        .map_err(|e| Error::database("count the events between two positions", e))?;
    Ok(row.get(0))
}

/// The first and the last event by position, each with its `created_at`; `None` when the table
/// is empty. Two index probes, however large the table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ends {
    pub oldest: (Position, SystemTime),
    pub newest: (Position, SystemTime),
}

pub async fn ends(client: &Client) -> Result<Option<Ends>> {
    let rows = client
        .query(
            "(SELECT e.tx_id::text, e.id, e.created_at FROM events e ORDER BY e.tx_id, e.id LIMIT 1)
             UNION ALL
             (SELECT e.tx_id::text, e.id, e.created_at FROM events e
               ORDER BY e.tx_id DESC, e.id DESC LIMIT 1)",
            &[],
        )
        .await
        .map_err(|e| Error::database("read the first and last event", e))?;
    if rows.len() < 2 {
        return Ok(None);
    }
    let end = |row: &Row| -> Result<(Position, SystemTime)> {
        Ok((Position::from_text(row.get(0), row.get(1))?, row.get(2)))
    };
    Ok(Some(Ends {
        oldest: end(&rows[0])?,
        newest: end(&rows[1])?,
    }))
}

/// The visibility horizon (`pg_snapshot_xmin`: the oldest transaction still open, or the next
/// one) and the next transaction id to be assigned (`pg_snapshot_xmax`).
pub async fn horizon(client: &Client) -> Result<(u64, u64)> {
    let row = client
        .query_one(
            "SELECT pg_snapshot_xmin(s)::text, pg_snapshot_xmax(s)::text
               FROM pg_current_snapshot() AS s",
            &[],
        )
        .await
        .map_err(|e| Error::database("read the visibility horizon", e))?;
    let parse = |i: usize| -> Result<u64> {
        let text: &str = row.get(i);
        text.parse()
            .map_err(|_| Error::Schema(format!("unexpected xid8 text {text:?} from the server")))
    };
    Ok((parse(0)?, parse(1)?))
}

impl std::str::FromStr for Position {
    type Err = BadPosition;

    /// [`Position::parse`]: `<tx_id>/<id>`, as [`Position`] displays itself.
    fn from_str(text: &str) -> std::result::Result<Position, BadPosition> {
        Position::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_through_their_text() {
        let p = Position::new(1_000_000, 42);
        assert_eq!(Position::parse(&p.to_string()).unwrap(), p);
        assert_eq!(Position::parse(" 7/8 ").unwrap(), Position::new(7, 8));
        for bad in [
            "",
            "7",
            "7/",
            "/8",
            "a/b",
            "-1/2",
            "1/-2",
            "1/2/3",
            "1.5/2",
            "99999999999999999999/1",
        ] {
            let err = Position::parse(bad).unwrap_err();
            assert!(err.to_string().contains("TX_ID/ID"), "{bad:?}: {err}");
        }
    }
}
