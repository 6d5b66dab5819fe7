//! Where delivered events go. A sink writes a batch of events, the dead letters among them and
//! the position they bring the consumer to, all or nothing; and gives that position back: the
//! sink's own checkpoint is the truth about where delivery resumes.
//!
//! - [`mongo`]: MongoDB, the only module that talks to it; events, dead letters and checkpoint in
//!   one transaction.
//! - [`nats`]: NATS JetStream — pipelined publishes, exactly once in the stream (checkpoint in
//!   PostgreSQL after the acknowledgements, and what the stream itself holds past it).
//! - [`http`]: webhooks — a signed POST per batch, checkpoint and dead letters in PostgreSQL.
//! - [`null`]: discards events and keeps the position in memory (benchmarks).
//! - [`Observed`]: wraps either and reports each stored batch (benchmarks time delivery with it).
//!
//! A [`Sink`] is a trait with the two as its implementations; the delivery loop is generic over
//! it, so a new sink is one module, its configuration and an `impl Sink`.

mod error;
pub mod http;
pub mod mongo;
pub mod nats;
pub mod null;
mod observed;
mod replay;

use std::future::Future;

use std::sync::Arc;

use event_store::position::{Batch, Origin, Undecodable};
use event_store::{Event, Position};
use mongodb::bson::RawDocumentBuf;

pub use error::{SinkError, SinkResult};

pub use http::HttpSink;
pub use mongo::MongoSink;
pub use nats::NatsSink;
pub use null::NullSink;
pub use observed::{Delivered, Observed};

/// The `--on-poison` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnPoison {
    /// Record the event in `deadLetters` and go on.
    DeadLetter,
    /// Stop with an error naming the event.
    Stop,
}

/// A destination for events.
pub trait Sink: Send + 'static {
    /// A cheap handle for `/healthz` probes, usable while a write is in progress.
    type Probe: Probe;

    /// What kind of sink this is (`mongodb`, `http`, …): the `/healthz` check and log wording.
    const KIND: &'static str;

    /// Connects (when needed) and reads the stored checkpoint, `None` for a new consumer. Called
    /// at start and again after any failure: the checkpoint, not our memory, says where to go on.
    fn open(&mut self) -> impl Future<Output = SinkResult<Option<Checkpoint>>> + Send;

    /// Stores `delivery`: its events, its dead letters and its end position, atomically as far as
    /// anyone restarting from the checkpoint can tell. Fails with
    /// [`SinkError::CheckpointMoved`] when the stored checkpoint is not
    /// `delivery.start` (the sink lost writes it had acknowledged, or an operator moved it).
    fn write(&mut self, delivery: &Delivery) -> impl Future<Output = SinkResult<Written>> + Send;

    /// How the fetcher prepares batches for this sink, ahead of the write.
    fn encoder(&self) -> Encoder;

    fn probe(&self) -> Self::Probe;

    /// Work the sink does between batches and while the stream is idle (a webhook sends the
    /// dead letters an operator asked to replay). Called often: the sink paces itself. A failure
    /// is logged and tried again later; it never stops delivery.
    fn housekeeping(&mut self) -> impl Future<Output = SinkResult<()>> + Send {
        async { Ok(()) }
    }

    /// The most events this sink takes in one write, when it is smaller than `--batch-size`
    /// (a webhook's `--http-batch`: one write is one request).
    fn batch_rows(&self) -> Option<usize> {
        None
    }

    /// Where events go, for logs (never with credentials).
    fn describe(&self) -> String;
}

/// A stored checkpoint: where delivery resumes, and what it was taken from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    pub position: Position,
    /// The event at `position` when the checkpoint was written; absent in checkpoints written
    /// before this was recorded, or by `eventsctl reset`.
    pub event_id: Option<uuid::Uuid>,
    /// The database the events were read from.
    pub origin: Option<Origin>,
}

/// Reachability of a sink, for `/healthz`.
pub trait Probe: Clone + Send + Sync + 'static {
    fn ping(&self) -> impl Future<Output = SinkResult<()>> + Send;
}

/// Prepares a fetched batch in a sink's format. A plain function, so the fetcher can run it while
/// the writer waits on the previous batch instead of in front of the next one.
pub type Encoder = fn(Batch, Position, Position) -> Delivery;

/// One batch for the sink.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    /// The checkpoint this batch follows (the end of the previous one).
    pub start: Position,
    /// The position after the last row scanned.
    pub end: Position,
    /// The events to store, in position order (possibly none, when a topic filter skipped every
    /// row or every event was a dead letter).
    pub events: Vec<Event>,
    /// `events` in the sink's format ([`Encoder`]), or empty when the sink needs none.
    pub documents: Vec<RawDocumentBuf>,
    /// Events that cannot be stored, recorded instead of them.
    pub dead_letters: Vec<DeadLetter>,
    /// Which rewind of the fetcher this batch belongs to (see the writer).
    pub generation: u64,
    /// The `event_id` of the row at `end`, and the database it was read from: the checkpoint
    /// records both, for the divergence check.
    pub end_event_id: Option<uuid::Uuid>,
    pub origin: Option<Arc<Origin>>,
}

impl Delivery {
    /// The checkpoint this delivery leaves behind.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            position: self.end,
            event_id: self.end_event_id,
            origin: self.origin.as_deref().cloned(),
        }
    }
}

impl Delivery {
    /// A batch with nothing prepared: events as fetched, undecodable rows as dead letters.
    pub fn plain(batch: Batch, start: Position, end: Position) -> Delivery {
        Delivery {
            start,
            end,
            end_event_id: batch.end_event_id,
            dead_letters: batch
                .undecodable
                .into_iter()
                .map(DeadLetter::from)
                .collect(),
            events: batch.events,
            ..Delivery::default()
        }
    }
}

/// An event set aside because it cannot be stored, with why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub position: Position,
    pub event_id: Option<uuid::Uuid>,
    pub topic: Option<String>,
    pub key: Option<String>,
    pub event_type: Option<String>,
    /// The payload text as stored in PostgreSQL (the sink keeps a bounded prefix).
    pub payload: Option<String>,
    /// A short stable code (`number_out_of_range`, `too_deep`, `too_large`, `undecodable`,
    /// `rejected_by_server`, …): the `reason` label of the metric.
    pub code: &'static str,
    /// What exactly was wrong.
    pub detail: String,
}

impl DeadLetter {
    pub fn of(event: &Event, code: &'static str, detail: impl Into<String>) -> DeadLetter {
        DeadLetter {
            position: event.position,
            event_id: Some(event.event_id),
            topic: Some(event.topic.clone()),
            key: event.key.clone(),
            event_type: event.event_type.clone(),
            payload: Some(event.payload.as_str().to_string()),
            code,
            detail: detail.into(),
        }
    }

    /// The event's `id`.
    pub fn id(&self) -> i64 {
        self.position.id
    }
}

impl From<Undecodable> for DeadLetter {
    fn from(row: Undecodable) -> DeadLetter {
        DeadLetter {
            position: row.position,
            event_id: row.event_id,
            topic: row.topic,
            key: row.key,
            event_type: row.event_type,
            payload: row.payload,
            code: "undecodable",
            detail: row.reason,
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, Default)]
pub struct Written {
    /// Events newly stored.
    pub inserted: usize,
    /// Events found already stored (a re-delivery after a crash or a lost acknowledgement).
    pub already_present: usize,
    /// Dead letters recorded with this batch: the delivery's own, and events the server refused.
    pub dead_letters: Vec<DeadLetter>,
}
