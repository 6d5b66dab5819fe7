//! Reading events past a position, below the visibility horizon, and what holds it back.

use std::fmt;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use tokio_postgres::{Client, Row, Statement};
use uuid::Uuid;

use super::Partition;
use super::Position;
use crate::error::{Error, Result};
use crate::event::RawJson;

/// An event as read back from the `events` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub position: Position,
    pub event_id: Uuid,
    pub topic: String,
    pub key: Option<String>,
    pub event_type: Option<String>,
    /// The payload as PostgreSQL prints it (`jsonb::text`): exact, whatever it holds.
    pub payload: RawJson,
    /// The headers object, likewise.
    pub headers: RawJson,
    pub created_at: SystemTime,
}

impl Event {
    /// The event as one line of JSON, the shape every reader prints (`eventsctl tail`, the
    /// gateway): `{position, id, event_id, topic, key, type, created_at, payload, headers}`, with
    /// payload and headers spliced in exactly as PostgreSQL printed them (no parse, no rounding).
    pub fn to_json(&self) -> String {
        // One buffer, written in place: readers print hundreds of thousands of these a second.
        let mut out = String::with_capacity(self.json_len_hint());
        self.write_json(&mut out);
        out
    }

    /// [`Event::to_json`] appended to `out` (the gateway writes it straight into an SSE frame).
    pub fn write_json(&self, out: &mut String) {
        use std::fmt::Write;
        let headers = if self.headers.is_empty() {
            "{}"
        } else {
            self.headers.as_str()
        };
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            r#"{{"position":"{}","id":{},"event_id":"{}","topic":"#,
            self.position, self.position.id, self.event_id
        );
        json_string(out, Some(&self.topic));
        out.push_str(r#","key":"#);
        json_string(out, self.key.as_deref());
        out.push_str(r#","type":"#);
        json_string(out, self.event_type.as_deref());
        let _ = write!(
            out,
            r#","created_at":"{}","payload":"#,
            humantime::format_rfc3339_micros(self.created_at)
        );
        out.push_str(self.payload.as_str());
        out.push_str(r#","headers":"#);
        out.push_str(headers);
        out.push('}');
    }

    /// About how long [`Event::to_json`] is: enough to write it without growing the buffer.
    pub fn json_len_hint(&self) -> usize {
        200 + self.payload.len()
            + self.headers.len()
            + self.topic.len()
            + self.key.as_ref().map_or(0, String::len)
            + self.event_type.as_ref().map_or(0, String::len)
    }

    /// The event's `id` column (its place in the commit-independent sequence).
    pub fn id(&self) -> i64 {
        self.position.id
    }
}

/// `text` as a JSON string (or `null`), escaped as serde_json escapes it.
fn json_string(out: &mut String, text: Option<&str>) {
    match text {
        None => out.push_str("null"),
        // Most keys, topics and types need no escaping.
        Some(t) if !t.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) => {
            out.push('"');
            out.push_str(t);
            out.push('"');
        }
        Some(t) => out.push_str(&serde_json::to_string(t).expect("a string serialises")),
    }
}

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
    /// Rows scanned per row asked for (a partition's reader scans more: see
    /// [`Reader::for_partition`]); 1 otherwise.
    pub scan_factor: usize,
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
    /// Only the events of this partition of a consumer group are wanted (`None`: all).
    partition: Option<Partition>,
}

/// Rows past `$1/$2`, below the horizon, in position order, at most `$3` rows and about `$5` bytes.
/// Rows of topics outside `$4` (NULL = all topics), and rows outside partition `$7` of `$6`
/// (NULL = no partitions; see [`crate::group`] for the hash), come back without payload and
/// headers: the reader only needs their position to pass them.
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
                       LATERAL (SELECT ($4::text[] IS NULL OR e.topic = ANY($4::text[]))
                                   AND ($6::bigint IS NULL
                                        OR ((hashtextextended(coalesce(e.key, e.event_id::text), 0) % $6::bigint)
                                            + $6::bigint) % $6::bigint = $7::bigint)) AS f(wanted)
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
            partition: None,
        })
    }

    /// This reader wants only the events of `partition` (a consumer group's member reading one
    /// of its partitions); the position still moves over every row.
    pub fn for_partition(mut self, partition: Option<Partition>) -> Reader {
        self.partition = partition;
        self
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
        // A partition wants about one row in `count`: scan that many more, so that its batches
        // hold about `limits.rows` events (not `rows / count`, which would multiply the sink's
        // writes by the partition count). Unwanted rows come without payload, so this costs
        // little memory; the byte bound applies to the wanted rows as always.
        let scan = match self.partition {
            Some(p) => limits
                .rows
                .max(1)
                .saturating_mul(p.count.clamp(1, 64) as usize),
            None => limits.rows.max(1),
        };
        let rows = i64::try_from(scan).unwrap_or(i64::MAX);
        let bytes = i64::try_from(limits.bytes.max(1)).unwrap_or(i64::MAX);
        let count = self.partition.map(|p| i64::from(p.count));
        let index = self.partition.map(|p| i64::from(p.index));
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
            &after.tx_text(),
            &after.id,
            &rows,
            &topics,
            &bytes,
            &count,
            &index,
        ];
        let stream = client
            .query_raw(&self.fetch, params)
            .await
            .map_err(|e| Error::database(format!("fetch events after {after}"), e))?;
        futures_util::pin_mut!(stream);
        let mut batch = Batch {
            scan_factor: scan / limits.rows.max(1),
            ..Batch::default()
        };
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
        batch.more |= last_more || batch.scanned >= scan;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        for text in [
            "plain",
            "",
            "quo\"te",
            "back\\slash",
            "tab\tnew\nline",
            "\u{1}",
            "é €",
            "\u{7f}",
        ] {
            let mut out = String::new();
            json_string(&mut out, Some(text));
            assert_eq!(out, serde_json::to_string(text).unwrap(), "{text:?}");
        }
        let mut out = String::new();
        json_string(&mut out, None);
        assert_eq!(out, "null");
    }

    #[test]
    fn events_print_as_exact_json() {
        let event = Event {
            position: Position::new(7, 42),
            event_id: Uuid::nil(),
            topic: "orders".into(),
            key: Some("k\"1".into()),
            event_type: None,
            payload: RawJson::from(r#"{"n": 1e400, "d": [1, 2]}"#.to_string()),
            headers: RawJson::default(),
            created_at: SystemTime::UNIX_EPOCH,
        };
        let line = event.to_json();
        assert!(
            line.contains(r#""payload":{"n": 1e400, "d": [1, 2]}"#),
            "{line}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&line.replace("1e400", "1")).unwrap();
        assert_eq!(parsed["position"], "7/42");
        assert_eq!(parsed["id"], 42);
        assert_eq!(parsed["key"], "k\"1");
        assert_eq!(parsed["type"], serde_json::Value::Null);
        assert_eq!(parsed["created_at"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(parsed["headers"], serde_json::json!({}));
    }
}
