//! MongoDB: the only module that talks to it.
//!
//! Each event becomes one document in `<database>.<collection>`:
//!
//! ```text
//! { _id: <events.id, Int64>, event_id: <UUID>, topic, key, type,
//!   payload: <BSON value>, headers: <BSON document>, created_at: <date>, received_at: <date> }
//! ```
//!
//! `payload` and `headers` are converted from JSON value by value (objects become documents, so
//! they can be queried); no extended-JSON interpretation, so a payload such as `{"$oid": "x"}`
//! stays a plain document. Integers become Int32 when they fit, else Int64; integers beyond
//! `i64` and all other numbers become doubles. Dates have millisecond precision in BSON, so the
//! microseconds of `created_at` are truncated.
//!
//! The consumer's checkpoint is `{ _id: <name>, tx_id, id, updated_at }` in `checkpoints` of the
//! same database. `tx_id` is stored as Int64 (an xid8 only exceeds it after 2^31 wraparound
//! epochs) and as a decimal string should one ever not fit; both read back as the same `u64`.
//!
//! How a batch is written depends on the deployment, detected with `hello`:
//! - **Transactions** (a replica set, single-node included, or a sharded cluster): the documents
//!   and the checkpoint are written in one transaction. A crash leaves either both or neither.
//! - **Standalone server**: the documents first (unordered inserts; duplicates of already-stored
//!   events are recognised and skipped), then the checkpoint. A crash in between leaves documents
//!   past the checkpoint, which the restarted consumer writes again — recognised as present.
//!
//! Either way `_id` is the event's id, so a re-delivery can never create a second document. When
//! an insert meets an `_id` that is already taken, the stored document must hold the *same*
//! event (`event_id`); if it holds another one, the collection is shared with a different event
//! store, and the consumer stops rather than skip or overwrite an event.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use event_store::{Event, Position};
use mongodb::bson::{doc, spec::BinarySubtype, Binary, Bson, DateTime, Document, RawDocumentBuf};
use mongodb::error::{ErrorKind, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::options::ClientOptions;
use mongodb::{Client, ClientSession, Collection};

use super::{Delivery, Written};
use crate::config::Transactions;
use crate::error::{compact, Error, Result};

/// The checkpoints collection, next to the events collection.
pub const CHECKPOINTS: &str = "checkpoints";

const DUPLICATE_KEY: i32 = 11000;
/// Retries of a transaction the server asks us to retry (write conflicts), before backing off.
const TRANSACTION_ATTEMPTS: usize = 3;

pub struct MongoSink {
    client: Client,
    events: Collection<Document>,
    /// The same collection, for writing documents encoded ahead of time.
    raw_events: Collection<RawDocumentBuf>,
    checkpoints: Collection<Document>,
    name: String,
    where_: String,
    /// `--mongodb-transactions auto`.
    allow_transactions: bool,
    /// The mode last logged, to log changes only.
    logged_mode: Option<bool>,
    /// `None` until detected, and again after any failure (the deployment may have changed).
    transactions: Option<bool>,
    session: Option<ClientSession>,
}

impl MongoSink {
    /// Parses the URI (an unparseable one is a configuration error) and prepares a client; no
    /// connection is made until [`MongoSink::open`].
    pub async fn new(
        uri: &str,
        database: &str,
        collection: &str,
        name: &str,
        transactions: Transactions,
    ) -> Result<MongoSink> {
        let mut options = ClientOptions::parse(uri).await.map_err(|e| match *e.kind {
            ErrorKind::InvalidArgument { .. } => Error::Config(format!(
                "MONGODB_URI is not a valid MongoDB connection string ({e}); expected e.g. \
                 mongodb://host:27017/?replicaSet=rs0"
            )),
            _ => Error::mongo("resolve MONGODB_URI", e),
        })?;
        if options.app_name.is_none() {
            options.app_name = Some(format!("events-consumer:{name}"));
        }
        // The driver's 30 s default would hold a write (and a health probe) that long while the
        // server is down; our own retry loop is the patient one.
        if options.server_selection_timeout.is_none() {
            options.server_selection_timeout = Some(Duration::from_secs(10));
        }
        if options.connect_timeout.is_none() {
            options.connect_timeout = Some(Duration::from_secs(10));
        }
        let hosts: Vec<String> = options.hosts.iter().map(|h| h.to_string()).collect();
        let where_ = format!(
            "MongoDB at {} (collection {database}.{collection})",
            hosts.join(",")
        );
        let client = Client::with_options(options)
            .map_err(|e| Error::Config(format!("MONGODB_URI cannot be used: {e}")))?;
        let db = client.database(database);
        Ok(MongoSink {
            events: db.collection(collection),
            raw_events: db.collection(collection),
            checkpoints: db.collection(CHECKPOINTS),
            client,
            name: name.to_string(),
            where_,
            allow_transactions: transactions == Transactions::Auto,
            transactions: None,
            logged_mode: None,
            session: None,
        })
    }

    pub fn describe(&self) -> String {
        self.where_.clone()
    }

    pub fn prober(&self) -> MongoProber {
        MongoProber {
            client: self.client.clone(),
            where_: self.where_.clone(),
        }
    }

    /// Detects whether transactions are available and reads the checkpoint.
    pub async fn open(&mut self) -> Result<Option<Position>> {
        self.detect().await?;
        let found = self
            .checkpoints
            .find_one(doc! {"_id": &self.name})
            .await
            .map_err(|e| self.error("read the checkpoint", e))?;
        let Some(found) = found else { return Ok(None) };
        if let Ok(session) = found.get_document("session") {
            self.end_orphaned_transaction(session).await;
        }
        checkpoint_position(&found, &self.name).map(Some)
    }

    /// A consumer killed mid-transaction leaves that transaction open on the server, holding
    /// write locks on the checkpoint and on the batch's documents until the server's transaction
    /// lifetime limit (60 s by default) aborts it; until then every write of ours would fail with
    /// a write conflict. Each checkpoint records the session that wrote it, and the previous
    /// process's last transaction almost always ran on that session: ending the session aborts
    /// the orphan now. Users may kill their own sessions; a failure only costs the wait.
    async fn end_orphaned_transaction(&self, session: &Document) {
        let killed = self
            .client
            .database("admin")
            .run_command(doc! {"killSessions": [session.clone()]})
            .await;
        match killed {
            Ok(_) => tracing::debug!("Ended the previous run's MongoDB session."),
            Err(e) => tracing::debug!(
                error = %compact(&e),
                "Cannot end the previous run's MongoDB session; a transaction it left open may \
                 delay the first write until the server aborts it."
            ),
        }
    }

    async fn detect(&mut self) -> Result<bool> {
        if let Some(known) = self.transactions {
            return Ok(known);
        }
        let transactions = self.allow_transactions && {
            let hello = self
                .client
                .database("admin")
                .run_command(doc! {"hello": 1})
                .await
                .map_err(|e| self.error("ask the server what it is (hello)", e))?;
            let replica_set = hello.get_str("setName").is_ok();
            let router = hello.get_str("msg") == Ok("isdbgrid");
            let sessions = hello.contains_key("logicalSessionTimeoutMinutes");
            (replica_set || router) && sessions
        };
        if self.logged_mode != Some(transactions) {
            self.logged_mode = Some(transactions);
            if transactions {
                tracing::info!(server = %self.where_,
                    "Writing each batch and the checkpoint in one MongoDB transaction.");
            } else {
                tracing::info!(server = %self.where_, allowed = self.allow_transactions,
                    "No MongoDB transactions: writing batches idempotently, then the checkpoint.");
            }
        }
        self.transactions = Some(transactions);
        Ok(transactions)
    }

    pub async fn write(&mut self, delivery: &Delivery) -> Result<Written> {
        let result = self.try_write(delivery).await;
        if result.is_err() {
            // Start clean next time: a new session, and a fresh look at the deployment.
            self.session = None;
            self.transactions = None;
        }
        result
    }

    async fn try_write(&mut self, delivery: &Delivery) -> Result<Written> {
        let transactions = self.detect().await?;
        let encoded;
        let docs: &[RawDocumentBuf] = if delivery.documents.len() == delivery.events.len() {
            &delivery.documents
        } else {
            encoded = encode(&delivery.events)?;
            &encoded
        };
        if docs.is_empty() {
            // Only the position moved (a topic filter skipped every row): one atomic upsert.
            self.write_checkpoint(delivery.end).await?;
            return Ok(Written::default());
        }
        if transactions {
            match self.transaction(docs, delivery.end).await {
                Ok(()) => Ok(Written {
                    inserted: docs.len(),
                    already_present: 0,
                }),
                Err(e) if is_duplicate_key(&e) => {
                    // A re-delivery (the previous commit's acknowledgement was lost, or another
                    // consumer writes the same collection): store only what is missing.
                    let present = self.already_present(&delivery.events).await?;
                    let missing: Vec<RawDocumentBuf> = docs
                        .iter()
                        .zip(&delivery.events)
                        .filter(|(_, e)| !present.contains(&e.id()))
                        .map(|(d, _)| d.clone())
                        .collect();
                    let inserted = missing.len();
                    if missing.is_empty() {
                        self.write_checkpoint(delivery.end).await?;
                    } else {
                        self.transaction(&missing, delivery.end)
                            .await
                            .map_err(|e| self.error("write the rest of a re-delivered batch", e))?;
                    }
                    Ok(Written {
                        inserted,
                        already_present: present.len(),
                    })
                }
                Err(e) => Err(self.error(
                    format!(
                        "write {} events and the checkpoint in a transaction",
                        docs.len()
                    ),
                    e,
                )),
            }
        } else {
            let written = self.insert_idempotently(docs, &delivery.events).await?;
            self.write_checkpoint(delivery.end).await?;
            Ok(written)
        }
    }

    /// The documents and the checkpoint in one transaction, retried when the server labels the
    /// failure transient (a write conflict).
    async fn transaction(
        &mut self,
        docs: &[RawDocumentBuf],
        end: Position,
    ) -> std::result::Result<(), mongodb::error::Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.transaction_once(docs, end).await {
                Err(e)
                    if e.contains_label(TRANSIENT_TRANSACTION_ERROR)
                        && !is_duplicate_key(&e)
                        && attempt < TRANSACTION_ATTEMPTS =>
                {
                    tracing::debug!(error = %compact(&e), attempt, "Retrying a MongoDB transaction.");
                    self.session = None;
                }
                other => return other,
            }
        }
    }

    async fn transaction_once(
        &mut self,
        docs: &[RawDocumentBuf],
        end: Position,
    ) -> std::result::Result<(), mongodb::error::Error> {
        if self.session.is_none() {
            self.session = Some(self.client.start_session().await?);
        }
        let session = self.session.as_mut().expect("just set");
        session.start_transaction().await?;
        let writes = async {
            self.raw_events
                .insert_many(docs)
                .session(&mut *session)
                .await?;
            let mut update = checkpoint_update(end, DateTime::now());
            update
                .get_document_mut("$set")
                .expect("built with $set")
                .insert("session", session.id().clone());
            self.checkpoints
                .update_one(doc! {"_id": &self.name}, update)
                .upsert(true)
                .session(&mut *session)
                .await?;
            Ok::<_, mongodb::error::Error>(())
        }
        .await;
        if let Err(e) = writes {
            let _ = session.abort_transaction().await;
            return Err(e);
        }
        // The driver retries a commit once itself; a commit whose outcome stays unknown is retried
        // a little more (committing twice is harmless), then reported. The batch is then written
        // again, and the duplicate-key path recognises it if the commit had in fact succeeded.
        let mut commits = 0;
        loop {
            commits += 1;
            match session.commit_transaction().await {
                Err(e) if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT) && commits < 3 => {
                    tracing::debug!(error = %compact(&e), "Retrying a MongoDB commit of unknown outcome.");
                }
                other => return other,
            }
        }
    }

    /// Standalone servers: unordered inserts, where duplicates of stored events are expected
    /// after a crash between the inserts and the checkpoint, and skipped.
    async fn insert_idempotently(
        &self,
        docs: &[RawDocumentBuf],
        events: &[Event],
    ) -> Result<Written> {
        let error = match self.raw_events.insert_many(docs).ordered(false).await {
            Ok(_) => {
                return Ok(Written {
                    inserted: docs.len(),
                    already_present: 0,
                })
            }
            Err(e) => e,
        };
        let duplicates = match error.kind.as_ref() {
            ErrorKind::InsertMany(failure)
                if failure.write_concern_error.is_none()
                    && failure
                        .write_errors
                        .as_ref()
                        .is_some_and(|w| w.iter().all(|w| w.code == DUPLICATE_KEY)) =>
            {
                failure.write_errors.as_ref().map_or(0, |w| w.len())
            }
            _ => {
                return Err(self.error(format!("insert {} events", docs.len()), error));
            }
        };
        // Every refused document must be the same event, already stored.
        let present = self.already_present(events).await?;
        if present.len() < duplicates {
            return Err(self.error(
                "insert events (duplicate keys the stored documents do not explain)",
                error,
            ));
        }
        Ok(Written {
            inserted: docs.len() - duplicates,
            already_present: duplicates,
        })
    }

    /// Which of `events` are already stored, checking that each stored document holds the same
    /// event (`event_id`); another event under one of our ids is an integrity error.
    async fn already_present(&self, events: &[Event]) -> Result<HashSet<i64>> {
        let ids: Vec<i64> = events.iter().map(|e| e.id()).collect();
        let mut cursor = self
            .events
            .find(doc! {"_id": {"$in": &ids}})
            .projection(doc! {"event_id": 1})
            .await
            .map_err(|e| self.error("look up already stored events", e))?;
        let expected: HashMap<i64, &Event> = events.iter().map(|e| (e.id(), e)).collect();
        let mut present = HashSet::new();
        while cursor
            .advance()
            .await
            .map_err(|e| self.error("look up already stored events", e))?
        {
            let stored: Document = cursor
                .deserialize_current()
                .map_err(|e| self.error("read a stored event", e))?;
            let Some(id) = stored.get("_id").and_then(bson_i64) else {
                continue;
            };
            let Some(event) = expected.get(&id) else {
                continue;
            };
            let same = match stored.get("event_id") {
                Some(Bson::Binary(b)) => b.bytes == event.event_id.as_bytes(),
                Some(Bson::String(s)) => *s == event.event_id.to_string(),
                _ => false,
            };
            if !same {
                return Err(Error::Integrity(format!(
                    "{} already holds a document with _id {id} that is not event {} (its \
                     event_id is {:?}): the collection holds events from another event store. \
                     Give this consumer a collection of its own (MONGODB_COLLECTION) or remove the \
                     foreign documents",
                    self.where_,
                    event.event_id,
                    stored.get("event_id")
                )));
            }
            present.insert(id);
        }
        Ok(present)
    }

    async fn write_checkpoint(&self, end: Position) -> Result<()> {
        self.checkpoints
            .update_one(
                doc! {"_id": &self.name},
                checkpoint_update(end, DateTime::now()),
            )
            .upsert(true)
            .await
            .map_err(|e| self.error(format!("store the checkpoint {end}"), e))?;
        Ok(())
    }

    fn error(&self, what: impl std::fmt::Display, e: mongodb::error::Error) -> Error {
        Error::mongo(format!("{what} ({})", self.where_), e)
    }
}

/// A clone of the client for `/healthz` probes.
#[derive(Clone)]
pub struct MongoProber {
    client: Client,
    where_: String,
}

impl MongoProber {
    pub async fn ping(&self) -> Result<()> {
        self.client
            .database("admin")
            .run_command(doc! {"ping": 1})
            .await
            .map_err(|e| Error::mongo(format!("ping {}", self.where_), e))?;
        Ok(())
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::InsertMany(f) => f
            .write_errors
            .as_ref()
            .is_some_and(|w| w.iter().any(|w| w.code == DUPLICATE_KEY)),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// The stored form of a batch, serialised (`received_at`: now, when the consumer has read them).
/// Fails only for a key BSON cannot hold (one containing NUL, which jsonb never stores).
pub fn encode(events: &[Event]) -> Result<Vec<RawDocumentBuf>> {
    let received_at = DateTime::now();
    events
        .iter()
        .map(|e| {
            RawDocumentBuf::from_document(&event_document(e, received_at)).map_err(|error| {
                Error::Integrity(format!(
                    "event {} cannot be stored as a MongoDB document: {error}",
                    e.position
                ))
            })
        })
        .collect()
}

/// The stored form of an event.
pub fn event_document(event: &Event, received_at: DateTime) -> Document {
    let optional = |s: &Option<String>| s.as_ref().map_or(Bson::Null, |s| Bson::String(s.clone()));
    doc! {
        "_id": event.id(),
        "event_id": Binary { subtype: BinarySubtype::Uuid, bytes: event.event_id.as_bytes().to_vec() },
        "topic": &event.topic,
        "key": optional(&event.key),
        "type": optional(&event.event_type),
        "payload": json_to_bson(&event.payload),
        "headers": json_to_bson(&event.headers),
        "created_at": DateTime::from_system_time(event.created_at),
        "received_at": received_at,
    }
}

/// JSON to BSON, value by value (no extended-JSON interpretation of `$`-keys).
pub fn json_to_bson(value: &serde_json::Value) -> Bson {
    use serde_json::Value;
    match value {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i32::try_from(i).map_or(Bson::Int64(i), Bson::Int32),
            None => Bson::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Bson::String(s.clone()),
        Value::Array(items) => Bson::Array(items.iter().map(json_to_bson).collect()),
        Value::Object(map) => Bson::Document(
            map.iter()
                .map(|(k, v)| (k.clone(), json_to_bson(v)))
                .collect(),
        ),
    }
}

/// The update that stores `end` as a checkpoint (also used by `eventsctl reset`, so both write the
/// same document shape).
pub fn checkpoint_update(end: Position, now: DateTime) -> Document {
    let tx_id = match i64::try_from(end.tx_id) {
        Ok(tx) => Bson::Int64(tx),
        Err(_) => Bson::String(end.tx_id.to_string()),
    };
    doc! {"$set": {"tx_id": tx_id, "id": end.id, "updated_at": now}}
}

fn bson_i64(value: &Bson) -> Option<i64> {
    match value {
        Bson::Int64(v) => Some(*v),
        Bson::Int32(v) => Some(i64::from(*v)),
        _ => None,
    }
}

/// Reads a checkpoint document back (accepting what an operator may have typed in a shell:
/// Int32/Int64 numbers, or a decimal string for `tx_id`).
pub fn checkpoint_position(doc: &Document, name: &str) -> Result<Position> {
    let bad = || {
        Error::Integrity(format!(
            "the checkpoint of consumer {name:?} in {CHECKPOINTS} is malformed ({doc}): expected \
             {{_id, tx_id: Int64 or decimal string, id: Int64}}"
        ))
    };
    let tx_id = match doc.get("tx_id") {
        Some(Bson::String(s)) => s.parse::<u64>().map_err(|_| bad())?,
        Some(other) => bson_i64(other)
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(bad)?,
        None => return Err(bad()),
    };
    let id = doc.get("id").and_then(bson_i64).ok_or_else(bad)?;
    Ok(Position::new(tx_id, id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_becomes_plain_bson_without_extended_json_magic() {
        let value = json!({"n": 1, "big": 5_000_000_000_i64, "huge": u64::MAX, "f": 1.5,
                           "s": "x", "a": [true, null], "$oid": "not an id", "o": {"k": "v"}});
        let Bson::Document(d) = json_to_bson(&value) else {
            panic!("an object becomes a document")
        };
        assert_eq!(d.get("n"), Some(&Bson::Int32(1)));
        assert_eq!(d.get("big"), Some(&Bson::Int64(5_000_000_000)));
        assert_eq!(d.get("huge"), Some(&Bson::Double(u64::MAX as f64)));
        assert_eq!(d.get("f"), Some(&Bson::Double(1.5)));
        assert_eq!(d.get("$oid"), Some(&Bson::String("not an id".into())));
        assert_eq!(
            d.get("a"),
            Some(&Bson::Array(vec![Bson::Boolean(true), Bson::Null]))
        );
        assert_eq!(d.get_document("o").unwrap().get_str("k"), Ok("v"));
        assert_eq!(json_to_bson(&json!([1])), Bson::Array(vec![Bson::Int32(1)]));
    }

    #[test]
    fn checkpoints_round_trip_tx_ids_as_u64() {
        for tx in [0, 3, 4_294_967_296, i64::MAX as u64, u64::MAX] {
            let set = checkpoint_update(Position::new(tx, 7), DateTime::now());
            let mut stored = set.get_document("$set").unwrap().clone();
            stored.insert("_id", "c");
            assert_eq!(
                checkpoint_position(&stored, "c").unwrap(),
                Position::new(tx, 7)
            );
        }
        let typed = doc! {"_id": "c", "tx_id": 5_i32, "id": 9_i32};
        assert_eq!(
            checkpoint_position(&typed, "c").unwrap(),
            Position::new(5, 9)
        );
        let bad = doc! {"_id": "c", "tx_id": -1_i64, "id": 9_i64};
        assert!(matches!(
            checkpoint_position(&bad, "c"),
            Err(Error::Integrity(_))
        ));
    }
}
