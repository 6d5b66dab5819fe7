//! MongoDB: the only module that talks to it.
//!
//! Each event becomes one document in `<database>.<collection>` ([`document`] has the mapping):
//!
//! ```text
//! { _id: <events.id, Int64>, event_id: <UUID>, topic, key, type,
//!   payload: <BSON value>, headers: <BSON document>, created_at: <date>, received_at: <date> }
//! ```
//!
//! An event that cannot be stored (see [`document`]; or one the server refuses as invalid) is
//! recorded in `deadLetters` instead, in the same write as the batch and the checkpoint:
//!
//! ```text
//! { _id: <events.id>, event_id, topic, key, type, position: "<tx_id>/<id>", consumer,
//!   reason: <code>, detail, payload_text: <first 64 KiB>, payload_bytes, payload_sha256,
//!   first_seen_at, last_seen_at }
//! ```
//!
//! A batch the server refuses as invalid is split in halves, each written with its own end
//! position, until the refused event is alone; the events around it are delivered.
//!
//! The consumer's checkpoint is `{ _id: <name>, tx_id, id, updated_at }` in `checkpoints` of the
//! same database. `tx_id` is stored as Int64 (an xid8 only exceeds it after 2^31 wraparound
//! epochs) and as a decimal string should one ever not fit; both read back as the same `u64`.
//!
//! **The checkpoint is the truth.** Every write moves the checkpoint *from* the position the batch
//! follows: the update matches `{_id, tx_id, id}` of that position. When it matches nothing, the
//! server no longer holds what we wrote last (it acknowledged writes and lost them in a crash or a
//! failover rollback, or an operator moved the checkpoint), and the write fails with
//! [`SinkError::CheckpointMoved`]: the consumer reads the checkpoint again and delivers from there.
//! Writes use write concern `majority` with journaling unless the URI says otherwise (`w=`,
//! `journal=`), so an acknowledged batch survives a crash of the server.
//!
//! How a batch is written depends on the deployment, detected with `hello`:
//! - **Transactions** (a replica set, single-node included, or a sharded cluster): the documents,
//!   the dead letters and the checkpoint are written in one transaction.
//! - **Standalone server**: the documents first (unordered inserts; duplicates of already-stored
//!   events are recognised and skipped), then the dead letters, then the checkpoint. A crash in
//!   between leaves documents past the checkpoint, which the restarted consumer writes again —
//!   recognised as present.
//!
//! Either way `_id` is the event's id, so a re-delivery can never create a second document. When
//! an insert meets an `_id` that is already taken, the stored document must hold the *same*
//! event (`event_id`); if it holds another one, the collection is shared with a different event
//! store, and the consumer stops rather than skip or overwrite an event.

mod error;
pub mod mirror;

pub use error::{compact, failed};
pub use mirror::Mirror;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use event_store::position::Batch;
use event_store::{Event, Position};
use mongodb::bson::{doc, Bson, DateTime, Document, RawDocumentBuf};
use mongodb::error::{ErrorKind, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::options::{Acknowledgment, ClientOptions, WriteConcern, WriteModel};
use mongodb::{Client, ClientSession, Collection};

use super::{Checkpoint, DeadLetter, Delivery, Encoder, Probe, Sink, Written};
use crate::sink::{OnPoison, SinkError, SinkResult};

pub use mongo_format::checkpoint::{self, CHECKPOINTS};
pub use mongo_format::dead_letter::{self, DEAD_LETTERS};
pub use mongo_format::event as document;

const DUPLICATE_KEY: i32 = 11000;
/// Retries of a transaction the server asks us to retry (write conflicts), before backing off.
const TRANSACTION_ATTEMPTS: usize = 3;

/// Where and how the MongoDB sink writes.
#[derive(Debug, Clone)]
pub struct MongoConfig {
    pub uri: String,
    pub database: String,
    pub collection: String,
    /// The consumer's name: its checkpoint's `_id`.
    pub name: String,
    pub transactions: Transactions,
    pub on_poison: OnPoison,
    /// Collections kept equal to captured tables, by topic ([`mirror`]).
    pub mirrors: Vec<Mirror>,
    /// Connections to keep at most, when the URI does not say (`maxPoolSize`): a group member's
    /// partitions share one client. `None`: the driver's default.
    pub max_pool_size: Option<u32>,
}

/// The `--mongodb-transactions` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transactions {
    /// Use them when the server has them.
    Auto,
    /// Never: idempotent inserts, then the checkpoint.
    Off,
}

pub struct MongoSink {
    client: Client,
    events: Collection<Document>,
    /// The same collection, for writing documents encoded ahead of time.
    raw_events: Collection<RawDocumentBuf>,
    checkpoints: Collection<Document>,
    dead_letters: Collection<Document>,
    database: String,
    mirrors: Vec<Mirror>,
    name: String,
    where_: String,
    on_poison: OnPoison,
    /// `--mongodb-transactions auto`.
    allow_transactions: bool,
    /// The mode last logged, to log changes only.
    logged_mode: Option<bool>,
    /// `None` until detected, and again after any failure (the deployment may have changed).
    transactions: Option<bool>,
    session: Option<ClientSession>,
    /// A consumer group's partition: the epoch of this member's ownership, which every
    /// checkpoint update requires (see [`MongoSink::claim`]).
    epoch: Option<i64>,
}

/// A contiguous part of a delivery, written with its own end position (splitting isolates events
/// the server refuses).
struct Part {
    start: Position,
    /// The checkpoint the part leaves behind.
    to: Checkpoint,
    events: Vec<Event>,
    docs: Vec<RawDocumentBuf>,
    dead_letters: Vec<DeadLetter>,
}

impl MongoSink {
    /// Parses the URI (an unparseable one is a configuration error) and prepares a client; no
    /// connection is made until [`Sink::open`].
    pub async fn new(config: MongoConfig) -> SinkResult<MongoSink> {
        let MongoConfig {
            uri,
            database,
            collection,
            name,
            transactions,
            on_poison,
            mirrors,
            max_pool_size,
        } = config;
        let mut options = ClientOptions::parse(&uri)
            .await
            .map_err(|e| match *e.kind {
                ErrorKind::InvalidArgument { .. } => SinkError::Config(format!(
                    "MONGODB_URI is not a valid MongoDB connection string ({}); expected e.g. \
                 mongodb://host:27017/?replicaSet=rs0",
                    event_store::redact::scrub(&compact(&e), &uri)
                )),
                _ => failed("resolve MONGODB_URI", e),
            })?;
        if options.app_name.is_none() {
            options.app_name = Some(format!("events-consumer:{name}"));
        }
        // Acknowledged must mean durable: a majority of the replica set, journaled. A `w` or
        // `journal` in the URI wins (a user who knows their deployment may trade this away).
        if options.write_concern.is_none() {
            let mut durable = WriteConcern::default();
            durable.w = Some(Acknowledgment::Majority);
            durable.journal = Some(true);
            options.write_concern = Some(durable);
        }
        // The driver's 30 s default would hold a write (and a health probe) that long while the
        // server is down; our own retry loop is the patient one.
        if options.server_selection_timeout.is_none() {
            options.server_selection_timeout = Some(Duration::from_secs(10));
        }
        if options.connect_timeout.is_none() {
            options.connect_timeout = Some(Duration::from_secs(10));
        }
        if options.max_pool_size.is_none() {
            options.max_pool_size = max_pool_size.map(|n| n.max(10));
        }
        let hosts: Vec<String> = options.hosts.iter().map(|h| h.to_string()).collect();
        let where_ = format!(
            "MongoDB at {} (collection {database}.{collection})",
            hosts.join(",")
        );
        let client = Client::with_options(options).map_err(|e| {
            SinkError::Config(format!(
                "MONGODB_URI cannot be used: {}",
                event_store::redact::scrub(&compact(&e), &uri)
            ))
        })?;
        let db = client.database(&database);
        Ok(MongoSink {
            events: db.collection(&collection),
            raw_events: db.collection(&collection),
            checkpoints: db.collection(CHECKPOINTS),
            dead_letters: db.collection(DEAD_LETTERS),
            database: database.clone(),
            mirrors,
            client,
            name,
            where_,
            on_poison,
            allow_transactions: transactions == Transactions::Auto,
            transactions: None,
            logged_mode: None,
            session: None,
            epoch: None,
        })
    }

    /// The same MongoDB, for partition `name` of a consumer group owned at `epoch`: the client
    /// (and its connection pool) is shared, the checkpoint is the partition's.
    pub fn partition(&self, name: String, epoch: i64) -> MongoSink {
        MongoSink {
            client: self.client.clone(),
            events: self.events.clone(),
            raw_events: self.raw_events.clone(),
            checkpoints: self.checkpoints.clone(),
            dead_letters: self.dead_letters.clone(),
            database: self.database.clone(),
            mirrors: self.mirrors.clone(),
            name,
            where_: self.where_.clone(),
            on_poison: self.on_poison,
            allow_transactions: self.allow_transactions,
            logged_mode: None,
            transactions: None,
            session: None,
            epoch: Some(epoch),
        }
    }

    /// Stamps this partition's epoch on its checkpoint, fencing off every earlier owner: their
    /// next checkpoint update (which requires their epoch) matches nothing, in the same
    /// transaction as their events. A partition without a checkpoint yet starts from the
    /// checkpoint of consumer `takes_over` (the consumer the group replaced), or from the start.
    /// Fails with [`SinkError::Fenced`] when a newer owner already claimed it.
    pub async fn claim(&self, takes_over: &str) -> SinkResult<()> {
        let epoch = self.epoch.expect("claim is for partitions");
        // A previous owner killed mid-transaction holds the checkpoint's lock until its
        // transaction is aborted: end it first, or the stamp would wait for the server's limit.
        let previous = self
            .checkpoints
            .find_one(doc! {"_id": &self.name})
            .await
            .map_err(|e| self.error("read the partition's checkpoint", e))?;
        if let Some(session) = previous
            .as_ref()
            .and_then(|p| p.get_document("session").ok())
        {
            self.end_orphaned_transaction(session).await;
        }
        loop {
            let stamped = self
                .checkpoints
                .update_one(
                    doc! {"_id": &self.name, "$or": [
                        {"epoch": {"$exists": false}},
                        {"epoch": {"$lt": epoch}},
                    ]},
                    doc! {"$set": {"epoch": epoch}},
                )
                .await
                .map_err(|e| self.error("claim the partition's checkpoint", e))?;
            if stamped.matched_count > 0 {
                return Ok(());
            }
            let found = self
                .checkpoints
                .find_one(doc! {"_id": &self.name})
                .await
                .map_err(|e| self.error("read the partition's checkpoint", e))?;
            if let Some(found) = found {
                return Err(self.fenced(&found));
            }
            // The partition's first owner: start where the consumer it replaces stopped.
            let base = self
                .checkpoints
                .find_one(doc! {"_id": takes_over})
                .await
                .map_err(|e| self.error("read the checkpoint the group takes over", e))?;
            let mut first = doc! {"_id": &self.name, "tx_id": 0_i64, "id": 0_i64};
            if let Some(base) = base {
                for field in ["tx_id", "id", "event_id", "origin"] {
                    if let Some(value) = base.get(field) {
                        first.insert(field, value.clone());
                    }
                }
                tracing::info!(partition = %self.name, consumer = %takes_over,
                    "Taking over the checkpoint of the consumer this group replaces.");
            }
            first.insert("epoch", epoch);
            first.insert("updated_at", DateTime::now());
            match self.checkpoints.insert_one(first).await {
                Ok(_) => return Ok(()),
                Err(e) if is_duplicate_key(&e) => continue, // claimed by someone meanwhile
                Err(e) => return Err(self.error("create the partition's checkpoint", e)),
            }
        }
    }

    /// The error for a checkpoint whose epoch is not ours: a newer owner took the partition.
    fn fenced(&self, found: &Document) -> SinkError {
        SinkError::Fenced {
            partition: self.name.clone(),
            epoch: self.epoch.unwrap_or_default(),
            found: found.get("epoch").and_then(checkpoint::bson_i64),
        }
    }

    /// The filter and update that move this sink's checkpoint from `start` to `to` (for a
    /// partition, only while its epoch is ours).
    fn checkpoint_move(&self, start: Position, to: &Checkpoint) -> (Document, Document) {
        let (mut filter, update) = checkpoint::moved(
            &self.name,
            start,
            to.position,
            to.event_id,
            to.origin.as_ref(),
        );
        if let Some(epoch) = self.epoch {
            filter.insert("epoch", epoch);
        }
        (filter, update)
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

    async fn detect(&mut self) -> SinkResult<bool> {
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
        if self.epoch.is_some() && !transactions {
            return Err(SinkError::Config(format!(
                "consumer groups (--partitions) need MongoDB transactions, and {} has none (a \
                 standalone server): run it as a replica set (a single-node one works)",
                self.where_
            )));
        }
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

    /// Writes a delivery, splitting it around events the server refuses as invalid.
    async fn write_isolating(&mut self, delivery: &Delivery) -> SinkResult<Written> {
        let encoded;
        let docs: &[RawDocumentBuf] = if delivery.documents.len() == delivery.events.len() {
            &delivery.documents
        } else {
            let batch = Batch {
                events: delivery.events.clone(),
                ..Batch::default()
            };
            encoded = encode(batch, delivery.start, delivery.end);
            if let Some(first) = encoded.dead_letters.first() {
                // Only when the fetcher did not encode (it always does): keep the contract.
                return Err(SinkError::Poison(Box::new(first.clone())));
            }
            &encoded.documents
        };
        let mut written = Written::default();
        let whole = Part {
            start: delivery.start,
            to: delivery.checkpoint(),
            events: delivery.events.clone(),
            docs: docs.to_vec(),
            dead_letters: delivery.dead_letters.clone(),
        };
        // `--on-poison stop`: deliver what comes before the first poison (through the same
        // splitting, so a refused event there stops too), then stop at it.
        let mut stop_at = None;
        let mut whole = whole;
        if self.on_poison == OnPoison::Stop {
            if let Some(first) = delivery.dead_letters.first() {
                let keep = whole
                    .events
                    .iter()
                    .take_while(|e| e.position < first.position)
                    .count();
                whole = Part {
                    start: whole.start,
                    to: match keep {
                        0 => Checkpoint {
                            position: whole.start,
                            ..whole.to.clone()
                        },
                        _ => event_checkpoint(&whole.events[keep - 1], &whole.to),
                    },
                    events: whole.events[..keep].to_vec(),
                    docs: whole.docs[..keep].to_vec(),
                    dead_letters: Vec::new(),
                };
                stop_at = Some(first.clone());
            }
        }
        // Parts still to write, the next one last: halves are pushed right, then left.
        let mut parts = if stop_at.is_some() && whole.events.is_empty() {
            Vec::new()
        } else {
            vec![whole]
        };
        while let Some(part) = parts.pop() {
            match self.write_part(&part).await {
                Ok(done) => {
                    written.inserted += done.inserted;
                    written.already_present += done.already_present;
                    written.dead_letters.extend(part.dead_letters);
                }
                Err(e) if error::source(&e).is_some_and(is_rejected) => {
                    let reason = error::source(&e).map(compact).unwrap_or_default();
                    if part.events.len() <= 1 {
                        let (Some(event), Some(doc)) = (part.events.first(), part.docs.first())
                        else {
                            return Err(e);
                        };
                        let mut letter = DeadLetter::of(event, "rejected_by_server", reason);
                        // The encoder kept only the document; the payload comes back from it.
                        letter.payload = doc
                            .get("payload")
                            .ok()
                            .flatten()
                            .and_then(|p| Bson::try_from(p).ok())
                            .map(|p| p.into_relaxed_extjson().to_string());
                        if self.on_poison == OnPoison::Stop {
                            return Err(SinkError::Poison(Box::new(letter)));
                        }
                        let mut dead_letters = part.dead_letters;
                        dead_letters.push(letter);
                        parts.push(Part {
                            events: Vec::new(),
                            docs: Vec::new(),
                            dead_letters,
                            ..part
                        });
                    } else {
                        tracing::debug!(events = part.events.len(), error = %reason,
                            "The server refused a batch as invalid; splitting it to find the event.");
                        let (left, right) = split(part);
                        parts.push(right);
                        parts.push(left);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        match stop_at {
            Some(poison) => Err(SinkError::Poison(Box::new(poison))),
            None => Ok(written),
        }
    }

    /// Writes one part: documents, dead letters and the checkpoint move from `start` to `end`.
    async fn write_part(&mut self, part: &Part) -> SinkResult<Written> {
        let transactions = self.detect().await?;
        if !transactions {
            let written = if part.docs.is_empty() {
                Written::default()
            } else {
                self.insert_idempotently(&part.docs, &part.events).await?
            };
            // Before the checkpoint: a crash in between applies the same events again, to the
            // same state.
            let mirrored =
                mirror::operations(&self.database, &self.mirrors, &part.events, &part.docs);
            if !mirrored.is_empty() {
                self.client
                    .bulk_write(mirrored)
                    .await
                    .map_err(|e| self.error("apply events to the mirrors", e))?;
            }
            for letter in &part.dead_letters {
                self.dead_letters
                    .update_one(doc! {"_id": letter.id()}, self.dead_letter_update(letter))
                    .upsert(true)
                    .await
                    .map_err(|e| self.error("record a dead letter", e))?;
            }
            self.move_checkpoint(part.start, &part.to).await?;
            return Ok(written);
        }
        let mirrored = mirror::operations(&self.database, &self.mirrors, &part.events, &part.docs);
        match self.transaction(part, &mirrored).await {
            Ok(()) => Ok(Written {
                inserted: part.docs.len(),
                ..Written::default()
            }),
            Err(e) if is_duplicate_key_tx(&e) => {
                // A re-delivery (the previous commit's acknowledgement was lost, or another
                // consumer writes the same collection): store only what is missing.
                let present = self.already_present(&part.events).await?;
                let mut rest = Part {
                    start: part.start,
                    to: part.to.clone(),
                    events: Vec::new(),
                    docs: Vec::new(),
                    dead_letters: part.dead_letters.clone(),
                };
                for (doc, event) in part.docs.iter().zip(&part.events) {
                    if !present.contains(&event.id()) {
                        rest.docs.push(doc.clone());
                        rest.events.push(event.clone());
                    }
                }
                // The mirrors get all of the part's events, also those the change log already
                // holds: each operation sets a key to the state the stream gives it, so applying
                // one again is harmless, while skipping one could leave a state the checkpoint
                // has passed.
                if let Err(e) = self.transaction(&rest, &mirrored).await {
                    return Err(self
                        .transaction_error("write the rest of a re-delivered batch", e, part.start)
                        .await);
                }
                Ok(Written {
                    inserted: rest.docs.len(),
                    already_present: present.len(),
                    ..Written::default()
                })
            }
            Err(e) => {
                let what = format!(
                    "write {} events and the checkpoint in a transaction",
                    part.docs.len()
                );
                Err(self.transaction_error(what, e, part.start).await)
            }
        }
    }

    /// The documents, dead letters and the checkpoint in one transaction, retried when the server
    /// labels the failure transient (a write conflict).
    async fn transaction(
        &mut self,
        part: &Part,
        mirrored: &[WriteModel],
    ) -> std::result::Result<(), TxError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.transaction_once(part, mirrored).await {
                Err(TxError::Mongo(e))
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

    /// `mirrored`: the part's events as operations on the mirrors ([`mirror::operations`]).
    async fn transaction_once(
        &mut self,
        part: &Part,
        mirrored: &[WriteModel],
    ) -> std::result::Result<(), TxError> {
        if self.session.is_none() {
            self.session = Some(self.client.start_session().await?);
        }
        let letters: Vec<(i64, Document)> = part
            .dead_letters
            .iter()
            .map(|l| (l.id(), self.dead_letter_update(l)))
            .collect();
        let (filter, mut update) = self.checkpoint_move(part.start, &part.to);
        let session = self.session.as_mut().expect("just set");
        session.start_transaction().await?;
        let writes = async {
            if !part.docs.is_empty() {
                self.raw_events
                    .insert_many(&part.docs)
                    .session(&mut *session)
                    .await?;
            }
            if !mirrored.is_empty() {
                self.client
                    .bulk_write(mirrored.iter().cloned())
                    .session(&mut *session)
                    .await?;
            }
            for (id, update) in letters {
                self.dead_letters
                    .update_one(doc! {"_id": id}, update)
                    .upsert(true)
                    .session(&mut *session)
                    .await?;
            }
            update
                .get_document_mut("$set")
                .expect("built with $set")
                .insert("session", session.id().clone());
            let moved = self
                .checkpoints
                .update_one(filter, update)
                .upsert(part.start == Position::START)
                .session(&mut *session)
                .await
                .map_err(|e| {
                    if is_duplicate_key(&e) {
                        TxError::CheckpointMoved
                    } else {
                        TxError::Mongo(e)
                    }
                })?;
            if moved.matched_count == 0 && moved.upserted_id.is_none() {
                return Err(TxError::CheckpointMoved);
            }
            Ok::<_, TxError>(())
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
                other => return other.map_err(TxError::Mongo),
            }
        }
    }

    async fn transaction_error(
        &self,
        what: impl std::fmt::Display,
        e: TxError,
        start: Position,
    ) -> SinkError {
        match e {
            TxError::Mongo(e) => self.error(what, e),
            TxError::CheckpointMoved => self.checkpoint_moved(start).await,
        }
    }

    /// Standalone servers: unordered inserts, where duplicates of stored events are expected
    /// after a crash between the inserts and the checkpoint, and skipped.
    async fn insert_idempotently(
        &self,
        docs: &[RawDocumentBuf],
        events: &[Event],
    ) -> SinkResult<Written> {
        let error = match self.raw_events.insert_many(docs).ordered(false).await {
            Ok(_) => {
                return Ok(Written {
                    inserted: docs.len(),
                    ..Written::default()
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
            ..Written::default()
        })
    }

    /// Which of `events` are already stored, checking that each stored document holds the same
    /// event (`event_id`); another event under one of our ids is an integrity error.
    async fn already_present(&self, events: &[Event]) -> SinkResult<HashSet<i64>> {
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
            let Some(id) = stored.get("_id").and_then(checkpoint::bson_i64) else {
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
                return Err(SinkError::Integrity(format!(
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

    /// Moves the checkpoint from `start` to `end` outside a transaction.
    async fn move_checkpoint(&self, start: Position, to: &Checkpoint) -> SinkResult<()> {
        let (filter, update) = self.checkpoint_move(start, to);
        let moved = self
            .checkpoints
            .update_one(filter, update)
            .upsert(start == Position::START)
            .await;
        match moved {
            Ok(moved) if moved.matched_count > 0 || moved.upserted_id.is_some() => Ok(()),
            Ok(_) => Err(self.checkpoint_moved(start).await),
            Err(e) if is_duplicate_key(&e) => Err(self.checkpoint_moved(start).await),
            Err(e) => Err(self.error(format!("store the checkpoint {}", to.position), e)),
        }
    }

    async fn checkpoint_moved(&self, expected: Position) -> SinkError {
        SinkError::CheckpointMoved {
            expected,
            found: self.read_checkpoint().await.ok().flatten(),
        }
    }

    async fn read_checkpoint(&self) -> SinkResult<Option<Position>> {
        Ok(self.read_full_checkpoint().await?.map(|c| c.position))
    }

    async fn read_full_checkpoint(&self) -> SinkResult<Option<Checkpoint>> {
        let found = self
            .checkpoints
            .find_one(doc! {"_id": &self.name})
            .await
            .map_err(|e| self.error("read the checkpoint", e))?;
        found
            .map(|found| checkpoint_from(&found, &self.name))
            .transpose()
    }

    fn dead_letter_update(&self, letter: &DeadLetter) -> Document {
        dead_letter::upsert(
            &dead_letter::Fields {
                position: letter.position,
                event_id: letter.event_id,
                topic: letter.topic.as_deref(),
                key: letter.key.as_deref(),
                event_type: letter.event_type.as_deref(),
                payload: letter.payload.as_deref().unwrap_or(""),
                code: letter.code,
                detail: &letter.detail,
            },
            &self.name,
            DateTime::now(),
        )
    }

    fn error(&self, what: impl std::fmt::Display, e: mongodb::error::Error) -> SinkError {
        failed(format!("{what} ({})", self.where_), e)
    }
}

impl Sink for MongoSink {
    type Probe = MongoProbe;
    const KIND: &'static str = "mongodb";

    /// Detects whether transactions are available and reads the checkpoint.
    async fn open(&mut self) -> SinkResult<Option<Checkpoint>> {
        self.session = None;
        self.transactions = None;
        self.detect().await?;
        let found = self
            .checkpoints
            .find_one(doc! {"_id": &self.name})
            .await
            .map_err(|e| self.error("read the checkpoint", e))?;
        let Some(found) = found else { return Ok(None) };
        if let Some(epoch) = self.epoch {
            if found.get("epoch").and_then(checkpoint::bson_i64) != Some(epoch) {
                return Err(self.fenced(&found));
            }
        }
        if let Ok(session) = found.get_document("session") {
            self.end_orphaned_transaction(session).await;
        }
        checkpoint_from(&found, &self.name).map(Some)
    }

    async fn write(&mut self, delivery: &Delivery) -> SinkResult<Written> {
        let result = self.write_isolating(delivery).await;
        match result {
            Err(e @ SinkError::CheckpointMoved { .. }) => {
                self.session = None;
                Err(e)
            }
            Err(e) => {
                // Start clean next time: a new session, and a fresh look at the deployment.
                self.session = None;
                self.transactions = None;
                Err(e)
            }
            ok => ok,
        }
    }

    fn encoder(&self) -> Encoder {
        encode
    }

    fn probe(&self) -> MongoProbe {
        MongoProbe {
            client: self.client.clone(),
            where_: self.where_.clone(),
        }
    }

    fn describe(&self) -> String {
        self.where_.clone()
    }
}

/// Why a transaction did not commit.
enum TxError {
    Mongo(mongodb::error::Error),
    /// The checkpoint was not at the batch's start position.
    CheckpointMoved,
}

impl From<mongodb::error::Error> for TxError {
    fn from(e: mongodb::error::Error) -> TxError {
        TxError::Mongo(e)
    }
}

fn is_duplicate_key_tx(e: &TxError) -> bool {
    matches!(e, TxError::Mongo(e) if is_duplicate_key(e))
}

/// A clone of the client for `/healthz` probes.
#[derive(Clone)]
pub struct MongoProbe {
    client: Client,
    where_: String,
}

impl Probe for MongoProbe {
    async fn ping(&self) -> SinkResult<()> {
        self.client
            .database("admin")
            .run_command(doc! {"ping": 1})
            .await
            .map_err(|e| failed(format!("ping {}", self.where_), e))?;
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

/// Server error codes that mean "this document is invalid", never "try again": the event is
/// isolated and set aside. 2 BadValue, 9 FailedToParse, 15 Overflow, 22 InvalidBSON,
/// 52 DollarPrefixedFieldName, 56 EmptyFieldName, 57 DottedFieldName, 121 DocumentValidationFailure,
/// 10334 BSONObjectTooLarge, 17280 KeyTooLong, 17419 document grew too large.
const INVALID_DOCUMENT_CODES: &[i32] = &[2, 9, 15, 22, 52, 56, 57, 121, 10334, 17280, 17419];

/// The server (or the driver, before sending) refused the documents themselves.
pub fn is_rejected(e: &mongodb::error::Error) -> bool {
    let invalid = |code: i32| INVALID_DOCUMENT_CODES.contains(&code);
    match e.kind.as_ref() {
        ErrorKind::InsertMany(f) => f
            .write_errors
            .as_ref()
            .is_some_and(|w| w.iter().any(|w| invalid(w.code))),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => invalid(w.code),
        ErrorKind::Command(c) => invalid(c.code),
        ErrorKind::BsonSerialization(_) => true,
        _ => false,
    }
}

/// Splits a part in two halves of its events; the left one ends at its last event.
fn split(part: Part) -> (Part, Part) {
    let mid = part.events.len() / 2;
    let left_last = part.events[mid - 1].clone();
    let left_end = left_last.position;
    let mut events = part.events;
    let mut docs = part.docs;
    let right_events = events.split_off(mid);
    let right_docs = docs.split_off(mid);
    let (left_letters, right_letters) = part
        .dead_letters
        .into_iter()
        .partition(|l| l.position <= left_end);
    (
        Part {
            start: part.start,
            to: event_checkpoint(&left_last, &part.to),
            events,
            docs,
            dead_letters: left_letters,
        },
        Part {
            start: left_end,
            to: part.to,
            events: right_events,
            docs: right_docs,
            dead_letters: right_letters,
        },
    )
}

/// The checkpoint at `event`, read from the same database as `like`.
fn event_checkpoint(event: &Event, like: &Checkpoint) -> Checkpoint {
    Checkpoint {
        position: event.position,
        event_id: Some(event.event_id),
        origin: like.origin.clone(),
    }
}

/// The fetcher's [`Encoder`] for MongoDB: each event as its stored document, or a dead letter.
pub fn encode(batch: Batch, start: Position, end: Position) -> Delivery {
    let mut delivery = Delivery::plain(
        Batch {
            events: Vec::new(),
            ..batch
        },
        start,
        end,
    );
    let received_at = DateTime::now();
    delivery.events.reserve(batch.events.len());
    delivery.documents.reserve(batch.events.len());
    for event in batch.events {
        match document::event_document(&event, received_at) {
            Ok(doc) => {
                // The document holds the data now; the text would only double the memory a
                // batch takes (three are in flight).
                let mut event = event;
                event.payload = Default::default();
                event.headers = Default::default();
                delivery.documents.push(doc);
                delivery.events.push(event);
            }
            Err(poison) => {
                delivery
                    .dead_letters
                    .push(DeadLetter::of(&event, poison.code, poison.detail))
            }
        }
    }
    delivery.dead_letters.sort_by_key(|l| l.position);
    delivery
}

/// Reads a checkpoint document back with what it records about its origin (see
/// [`event_store::divergence`]).
pub fn checkpoint_from(doc: &Document, name: &str) -> SinkResult<Checkpoint> {
    let stored = checkpoint::read(doc, name).map_err(|e| SinkError::Integrity(e.to_string()))?;
    Ok(Checkpoint {
        position: stored.position,
        event_id: stored.event_id,
        origin: stored.origin,
    })
}
