//! Appending events: inside the caller's transaction, or in a transaction of their own.
//!
//! Every append is **one statement and one round trip**, however many events it carries: one
//! event is a plain `INSERT … VALUES`, a batch a single `INSERT … SELECT FROM unnest(…)` of column
//! arrays (inserted in input order). In the in-transaction wake-up mode the same statement also
//! calls `pg_notify`, so waking costs no extra round trip either.
//!
//! Statements go out unnamed with their parameter types given (no separate prepare round trip,
//! nothing tied to a connection), which suits appends inside anyone's transaction. A long-lived
//! connection does better with [`Producer::prepare`]: the server then skips parsing and planning,
//! which on a busy 2-core machine is the difference between ~0.5× and ~0.85× of a raw prepared
//! INSERT (see the benchmark). The pooled path uses deadpool's per-connection statement cache.
//!
//! Event ids (`event_id`, a UUID) are generated here when the caller gives none, so a caller who
//! loses the connection during COMMIT can look the events up afterwards and never has to guess.

use std::collections::HashMap;

use deadpool_postgres::Pool;
use event_store::event::InvalidEvent;
use event_store::{NewEvent, Topic};
use serde_json::Value;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, GenericClient, Row, Transaction};
use uuid::Uuid;

use crate::error::AppendError;
use crate::notifier::Notifier;
use event_store::channel::Channel;

/// Payloads larger than this (as JSON text) are refused unless configured otherwise.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// What the database assigned to one appended event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Receipt {
    /// The `id` column: the event's place in the sequence (within a batch, ids ascend in input
    /// order; across transactions they do not follow commit order).
    pub id: i64,
    /// The event's unique id: the caller's, or one generated for it.
    pub event_id: Uuid,
}

/// How consumers are woken when events commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum NotifyMode {
    /// After a successful commit, ask the background notifier for a wake-up: at most one NOTIFY
    /// per short interval from a side connection, off the commit path. Much faster when many
    /// small transactions commit concurrently; the wake-up leaves ~1 round trip after the commit.
    #[default]
    AfterCommit,
    /// `pg_notify` inside the appending transaction: the wake-up commits with the events, but
    /// PostgreSQL serialises the commits of all notifying transactions.
    InTransaction,
}

impl std::fmt::Display for NotifyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NotifyMode::AfterCommit => "after-commit",
            NotifyMode::InTransaction => "in-transaction",
        })
    }
}

#[derive(Debug, Clone)]
enum Wake {
    InTransaction(Channel),
    AfterCommit(Notifier),
}

/// Appends events to the `events` table and wakes consumers. Cheap to clone; share one per
/// process.
#[derive(Debug, Clone)]
pub struct Producer {
    wake: Wake,
    max_payload_bytes: usize,
}

/// Events appended inside a transaction that has not committed yet.
///
/// In the after-commit wake-up mode the consumers are woken only when you say the transaction
/// committed: call [`Appended::committed`] after your COMMIT succeeds, or let
/// [`Producer::commit`] do both. Dropping it (say, after a rollback) sends no wake-up. In the
/// in-transaction mode the wake-up is part of the transaction and `committed` just returns the
/// receipts.
#[must_use = "call `.committed()` after your transaction commits (or use `Producer::commit`) so consumers wake up at once"]
#[derive(Debug)]
pub struct Appended<T> {
    receipts: T,
    wake: Option<(Notifier, Vec<Topic>)>,
}

impl<T> Appended<T> {
    /// The receipts, before the commit.
    pub fn receipts(&self) -> &T {
        &self.receipts
    }

    /// Says the transaction committed: wakes consumers (after-commit mode) and returns the
    /// receipts.
    pub fn committed(self) -> T {
        if let Some((notifier, topics)) = self.wake {
            notifier.wake(topics.iter().map(Topic::as_str));
        }
        self.receipts
    }
}

impl Producer {
    /// Wakes consumers with `pg_notify(channel, topic)` inside each appending transaction.
    pub fn in_transaction(channel: Channel) -> Producer {
        Producer {
            wake: Wake::InTransaction(channel),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }

    /// Wakes consumers after commit through `notifier` (see [`Notifier::spawn`]).
    pub fn after_commit(notifier: Notifier) -> Producer {
        Producer {
            wake: Wake::AfterCommit(notifier),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }

    /// Refuses payloads whose JSON text is longer than `bytes`.
    pub fn with_max_payload_bytes(mut self, bytes: usize) -> Producer {
        self.max_payload_bytes = bytes;
        self
    }

    pub fn max_payload_bytes(&self) -> usize {
        self.max_payload_bytes
    }

    pub fn notify_mode(&self) -> NotifyMode {
        match self.wake {
            Wake::InTransaction(_) => NotifyMode::InTransaction,
            Wake::AfterCommit(_) => NotifyMode::AfterCommit,
        }
    }

    /// Appends one event inside the caller's transaction (or, given a `Client`, as a statement of
    /// its own). Validation happens before anything is sent.
    pub async fn append_in<C>(
        &self,
        client: &C,
        event: &NewEvent,
    ) -> Result<Appended<Receipt>, AppendError>
    where
        C: GenericClient + Sync,
    {
        let appended = self
            .append_batch_in(client, std::slice::from_ref(event))
            .await?;
        Ok(appended.map(|mut receipts| receipts.pop().expect("one receipt per event")))
    }

    /// Appends a batch inside the caller's transaction with one statement. Receipts come back in
    /// input order. An empty batch sends nothing.
    ///
    /// The statement is sent unnamed, so the server parses and plans it each time; on a
    /// long-lived connection [`Producer::prepare`] saves that work.
    pub async fn append_batch_in<C>(
        &self,
        client: &C,
        events: &[NewEvent],
    ) -> Result<Appended<Vec<Receipt>>, AppendError>
    where
        C: GenericClient + Sync,
    {
        let mut json = Vec::new();
        let columns = Columns::encode(events, self.max_payload_bytes, &mut json)?;
        let receipts = self.insert(client, Statement::Unnamed, &columns).await?;
        Ok(self.appended(receipts, events))
    }

    /// Commits the caller's transaction, then wakes consumers (after-commit mode).
    ///
    /// If the COMMIT fails with [`AppendError::outcome_unknown`] the events may or may not be
    /// stored: look them up by `event_id` before appending them again.
    pub async fn commit<T>(
        &self,
        transaction: Transaction<'_>,
        appended: Appended<T>,
    ) -> Result<T, AppendError> {
        transaction
            .commit()
            .await
            .map_err(|e| AppendError::database("commit the transaction holding the events", e))?;
        Ok(appended.committed())
    }

    /// Appends a batch in a transaction of its own — one statement, which PostgreSQL runs as its
    /// own transaction — and wakes consumers once it has committed. `client` must not be inside
    /// an open transaction (use [`Producer::append_batch_in`] for that).
    pub async fn append(
        &self,
        client: &Client,
        events: &[NewEvent],
    ) -> Result<Vec<Receipt>, AppendError> {
        Ok(self.append_batch_in(client, events).await?.committed())
    }

    /// [`Producer::append`] on a connection taken from `pool`, with the statement prepared once
    /// per pooled connection (deadpool's statement cache).
    pub async fn append_pooled(
        &self,
        pool: &Pool,
        events: &[NewEvent],
    ) -> Result<Vec<Receipt>, AppendError> {
        let mut json = Vec::new();
        let columns = Columns::encode(events, self.max_payload_bytes, &mut json)?;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let client = pool.get().await.map_err(AppendError::Pool)?;
        let (sql, types) = self.statement(Shape::of(events.len()));
        let statement = client
            .prepare_typed_cached(sql, types)
            .await
            .map_err(|e| AppendError::database("prepare the append statement", e))?;
        let pg: &Client = &client;
        let receipts = self
            .insert(pg, Statement::Prepared(&statement), &columns)
            .await?;
        Ok(self.appended(receipts, events).committed())
    }

    /// Prepares this producer's statements on one connection (a single round trip), for
    /// appending over it without the server parsing and planning every statement again. Use the
    /// result with that connection — or transactions on it — only, and prepare again after
    /// reconnecting.
    pub async fn prepare<C>(&self, client: &C) -> Result<Prepared, AppendError>
    where
        C: GenericClient + Sync,
    {
        let (one_sql, one_types) = self.statement(Shape::One);
        let (many_sql, many_types) = self.statement(Shape::Many);
        // Both requests go out before either answer is awaited: one round trip.
        let (one, many) = tokio::try_join!(
            client.prepare_typed(one_sql, one_types),
            client.prepare_typed(many_sql, many_types),
        )
        .map_err(|e| AppendError::database("prepare the append statements", e))?;
        Ok(Prepared {
            producer: self.clone(),
            one,
            many,
        })
    }

    /// Wakes consumers for events that committed without going through this producer's own
    /// commit path (for instance, events found committed after a COMMIT of unknown outcome).
    /// Does nothing in the in-transaction mode, whose wake-ups commit with the events.
    pub fn wake_committed<'a>(&self, topics: impl IntoIterator<Item = &'a Topic>) {
        if let Wake::AfterCommit(notifier) = &self.wake {
            notifier.wake(topics.into_iter().map(Topic::as_str));
        }
    }

    fn appended<T>(&self, receipts: T, events: &[NewEvent]) -> Appended<T> {
        let wake = match &self.wake {
            Wake::AfterCommit(notifier) if !events.is_empty() => Some((
                notifier.clone(),
                distinct_topics(events).into_iter().cloned().collect(),
            )),
            _ => None,
        };
        Appended { receipts, wake }
    }

    /// The SQL and parameter types for a batch of this shape in this producer's wake-up mode.
    fn statement(&self, shape: Shape) -> (&'static str, &'static [Type]) {
        match (&self.wake, shape) {
            (Wake::AfterCommit(_), Shape::One) => (sql::INSERT_ONE, &ONE_TYPES[..6]),
            (Wake::AfterCommit(_), Shape::Many) => (sql::INSERT_MANY, &MANY_TYPES[..6]),
            (Wake::InTransaction(_), Shape::One) => (sql::INSERT_ONE_NOTIFY, &ONE_TYPES),
            (Wake::InTransaction(_), Shape::Many) => (sql::INSERT_MANY_NOTIFY, &MANY_TYPES),
        }
    }

    async fn insert<C>(
        &self,
        client: &C,
        statement: Statement<'_>,
        columns: &Columns<'_>,
    ) -> Result<Vec<Receipt>, AppendError>
    where
        C: GenericClient + Sync,
    {
        if columns.event_ids.is_empty() {
            return Ok(Vec::new());
        }
        let shape = Shape::of(columns.event_ids.len());
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(8);
        match shape {
            Shape::One => params.extend([
                &columns.event_ids[0] as &(dyn ToSql + Sync),
                &columns.topics[0],
                &columns.keys[0],
                &columns.types[0],
                &columns.payloads[0],
                &columns.headers[0],
            ]),
            Shape::Many => params.extend([
                &columns.event_ids as &(dyn ToSql + Sync),
                &columns.topics,
                &columns.keys,
                &columns.types,
                &columns.payloads,
                &columns.headers,
            ]),
        }
        let wake_topics;
        if let Wake::InTransaction(channel) = &self.wake {
            params.push(channel.as_string());
            // One event wakes with its own topic parameter ($2); a batch passes its topics.
            if let Shape::Many = shape {
                wake_topics = columns.distinct_topics();
                params.push(&wake_topics);
            }
        }
        let rows = match statement {
            Statement::Prepared(statement) => client.query(statement, &params).await,
            Statement::Unnamed => {
                let (sql, types) = self.statement(shape);
                let typed: Vec<(&(dyn ToSql + Sync), Type)> =
                    params.iter().copied().zip(types.iter().cloned()).collect();
                client.query_typed(sql, &typed).await
            }
        }
        .map_err(|e| AppendError::database("append events", e))?;
        receipts_in_input_order(&columns.event_ids, rows)
    }
}

impl<T> Appended<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Appended<U> {
        Appended {
            receipts: f(self.receipts),
            wake: self.wake,
        }
    }
}

/// A [`Producer`] with its statements prepared on one connection: the same appends, without the
/// server parsing and planning each statement. Made by [`Producer::prepare`]; valid for that
/// connection (and transactions on it) only.
#[derive(Debug, Clone)]
pub struct Prepared {
    producer: Producer,
    one: tokio_postgres::Statement,
    many: tokio_postgres::Statement,
}

impl Prepared {
    /// [`Producer::append_batch_in`] with the prepared statements.
    pub async fn append_batch_in<C>(
        &self,
        client: &C,
        events: &[NewEvent],
    ) -> Result<Appended<Vec<Receipt>>, AppendError>
    where
        C: GenericClient + Sync,
    {
        let mut json = Vec::new();
        let columns = Columns::encode(events, self.producer.max_payload_bytes, &mut json)?;
        let statement = match Shape::of(events.len()) {
            Shape::One => &self.one,
            Shape::Many => &self.many,
        };
        let receipts = self
            .producer
            .insert(client, Statement::Prepared(statement), &columns)
            .await?;
        Ok(self.producer.appended(receipts, events))
    }

    /// [`Producer::append_in`] with the prepared statements.
    pub async fn append_in<C>(
        &self,
        client: &C,
        event: &NewEvent,
    ) -> Result<Appended<Receipt>, AppendError>
    where
        C: GenericClient + Sync,
    {
        let appended = self
            .append_batch_in(client, std::slice::from_ref(event))
            .await?;
        Ok(appended.map(|mut receipts| receipts.pop().expect("one receipt per event")))
    }

    /// [`Producer::append`] with the prepared statements.
    pub async fn append(
        &self,
        client: &Client,
        events: &[NewEvent],
    ) -> Result<Vec<Receipt>, AppendError> {
        Ok(self.append_batch_in(client, events).await?.committed())
    }

    /// The producer these statements belong to.
    pub fn producer(&self) -> &Producer {
        &self.producer
    }
}

#[derive(Debug, Clone, Copy)]
enum Shape {
    /// One event: a plain `VALUES` row.
    One,
    /// Several: column arrays through `unnest`.
    Many,
}

impl Shape {
    fn of(events: usize) -> Shape {
        if events == 1 {
            Shape::One
        } else {
            Shape::Many
        }
    }
}

enum Statement<'a> {
    Unnamed,
    Prepared(&'a tokio_postgres::Statement),
}

/// `event_id, topic, key, type, payload, headers` and, in the in-transaction mode, the channel
/// (and for a batch the distinct topics to wake). JSON travels as text, cast on the server.
const ONE_TYPES: [Type; 7] = [
    Type::UUID,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
];
const MANY_TYPES: [Type; 8] = [
    Type::UUID_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT,
    Type::TEXT_ARRAY,
];

mod sql {
    // `WITH ORDINALITY … ORDER BY ord` makes the INSERT take rows, and so draw ids, in input
    // order. The receipts are matched back to the input by event_id regardless, so nothing relies
    // on the order of RETURNING.
    macro_rules! insert_many {
        () => {
            "INSERT INTO events (event_id, topic, key, type, payload, headers)
             SELECT e.event_id, e.topic, e.key, e.type, e.payload::jsonb,
                    coalesce(e.headers::jsonb, '{}')
               FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
                    WITH ORDINALITY AS e(event_id, topic, key, type, payload, headers, ord)
              ORDER BY e.ord
             RETURNING id, event_id"
        };
    }
    macro_rules! insert_one {
        () => {
            "INSERT INTO events (event_id, topic, key, type, payload, headers)
             VALUES ($1, $2, $3, $4, $5::jsonb, coalesce($6::jsonb, '{}'))
             RETURNING id, event_id"
        };
    }

    pub const INSERT_ONE: &str = insert_one!();
    pub const INSERT_MANY: &str = insert_many!();
    // The wake-up rides in the same statement (no extra round trip).
    // One event: the wake-up is computed in RETURNING (once per inserted row, so exactly once),
    // from the topic parameter — the producer role may not read the topic column back.
    pub const INSERT_ONE_NOTIFY: &str = concat!(insert_one!(), ", pg_notify($7, $2)");
    // A batch: `woken` is referenced, and volatile CTEs are never inlined or skipped, so
    // pg_notify runs exactly once per distinct topic; the count() keeps it to one row for the
    // join.
    pub const INSERT_MANY_NOTIFY: &str = concat!(
        "WITH appended AS (",
        insert_many!(),
        "), woken AS (SELECT count(pg_notify($7, topic)) AS n FROM unnest($8::text[]) AS topic)
         SELECT appended.id, appended.event_id FROM appended CROSS JOIN woken"
    );
}

/// The batch as column arrays, validated and serialised once. The JSON texts of all events share
/// one buffer (one allocation per batch, not two per event); empty headers travel as NULL and
/// become `'{}'` on the server without being parsed.
struct Columns<'a> {
    event_ids: Vec<Uuid>,
    topics: Vec<&'a str>,
    keys: Vec<Option<&'a str>>,
    types: Vec<Option<&'a str>>,
    payloads: Vec<&'a str>,
    headers: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    /// `json` is scratch space that the returned columns borrow.
    fn encode(
        events: &'a [NewEvent],
        max_payload_bytes: usize,
        json: &'a mut Vec<u8>,
    ) -> Result<Columns<'a>, AppendError> {
        let n = events.len();
        json.clear();
        let mut spans: Vec<(std::ops::Range<usize>, Option<std::ops::Range<usize>>)> =
            Vec::with_capacity(n);
        for (index, event) in events.iter().enumerate() {
            let invalid = |source| AppendError::Invalid { index, source };
            let start = json.len();
            serde_json::to_writer(&mut *json, &event.payload)
                .map_err(|e| invalid(InvalidEvent::PayloadNotJson(e.to_string())))?;
            let payload = start..json.len();
            if payload.len() > max_payload_bytes {
                return Err(invalid(InvalidEvent::PayloadTooLarge {
                    size: payload.len(),
                    limit: max_payload_bytes,
                }));
            }
            let headers = match &event.headers {
                Value::Object(map) if map.is_empty() => None,
                headers @ Value::Object(_) => {
                    let start = json.len();
                    serde_json::to_writer(&mut *json, headers)
                        .map_err(|_| invalid(InvalidEvent::HeadersNotObject))?;
                    Some(start..json.len())
                }
                _ => return Err(invalid(InvalidEvent::HeadersNotObject)),
            };
            spans.push((payload, headers));
        }
        let json: &'a str = std::str::from_utf8(json).expect("serde_json writes UTF-8");
        let columns = Columns {
            event_ids: events
                .iter()
                .map(|e| e.event_id.unwrap_or_else(Uuid::new_v4))
                .collect(),
            topics: events.iter().map(|e| e.topic.as_str()).collect(),
            keys: events.iter().map(|e| e.key.as_deref()).collect(),
            types: events.iter().map(|e| e.event_type.as_deref()).collect(),
            payloads: spans.iter().map(|(p, _)| &json[p.clone()]).collect(),
            headers: spans
                .iter()
                .map(|(_, h)| h.clone().map(|h| &json[h]))
                .collect(),
        };
        // Caller-chosen ids could repeat within the batch; generated ones never do.
        if events
            .iter()
            .filter(|e| e.event_id.is_some())
            .nth(1)
            .is_some()
        {
            let mut seen = HashMap::with_capacity(n);
            for (index, id) in columns.event_ids.iter().enumerate() {
                if seen.insert(*id, index).is_some() {
                    return Err(AppendError::DuplicateEventId {
                        index,
                        event_id: *id,
                    });
                }
            }
        }
        Ok(columns)
    }

    fn distinct_topics(&self) -> Vec<&'a str> {
        let mut topics: Vec<&str> = Vec::new();
        for topic in &self.topics {
            if !topics.contains(topic) {
                topics.push(topic);
            }
        }
        topics
    }
}

fn distinct_topics(events: &[NewEvent]) -> Vec<&Topic> {
    let mut topics: Vec<&Topic> = Vec::new();
    for event in events {
        if !topics.contains(&&event.topic) {
            topics.push(&event.topic);
        }
    }
    topics
}

fn receipts_in_input_order(
    event_ids: &[Uuid],
    rows: Vec<Row>,
) -> Result<Vec<Receipt>, AppendError> {
    let receipts: Vec<Receipt> = rows
        .iter()
        .map(|row| Receipt {
            id: row.get(0),
            event_id: row.get(1),
        })
        .collect();
    assert_eq!(
        receipts.len(),
        event_ids.len(),
        "INSERT … RETURNING returned one row per event"
    );
    if receipts
        .iter()
        .zip(event_ids)
        .all(|(r, id)| r.event_id == *id)
    {
        return Ok(receipts);
    }
    let by_id: HashMap<Uuid, Receipt> = receipts.into_iter().map(|r| (r.event_id, r)).collect();
    Ok(event_ids.iter().map(|id| by_id[id]).collect())
}
