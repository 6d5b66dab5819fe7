//! Where delivered events go. A sink writes a batch of events together with the position they
//! bring the consumer to, and gives that position back on start-up: the sink's own checkpoint is
//! the source of truth for where delivery resumes.
//!
//! - [`mongo`]: the product — MongoDB, the only module that talks to it.
//! - [`null`]: discards events and keeps the position in memory (benchmarks).

pub mod mongo;
pub mod null;

use event_store::{Event, Position};
use mongodb::bson::RawDocumentBuf;

use crate::error::Result;

pub use mongo::MongoSink;
pub use null::{Delivered, NullSink};

/// One batch for the sink: the wanted events (possibly none, when a topic filter skipped every
/// row) and the position after the last row scanned.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub events: Vec<Event>,
    pub end: Position,
    /// The events already in the sink's format ([`Encoder`]), or empty: the sink encodes them.
    pub documents: Vec<RawDocumentBuf>,
}

impl Delivery {
    pub fn new(events: Vec<Event>, end: Position) -> Delivery {
        Delivery {
            events,
            end,
            documents: Vec::new(),
        }
    }
}

/// Puts events into a sink's format ahead of the write. The fetcher does this, so that it runs
/// while the writer waits on the previous batch instead of in front of the next one.
#[derive(Debug, Clone, Copy)]
pub enum Encoder {
    Mongo,
    Null,
}

impl Encoder {
    pub fn delivery(self, events: Vec<Event>, end: Position) -> Delivery {
        let mut delivery = Delivery::new(events, end);
        if let Encoder::Mongo = self {
            // On failure the writer encodes again and reports the error.
            delivery.documents = mongo::encode(&delivery.events).unwrap_or_default();
        }
        delivery
    }
}

/// What a write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Events newly stored.
    pub inserted: usize,
    /// Events found already stored (a re-delivery after a crash or a lost acknowledgement).
    pub already_present: usize,
}

/// A sink. An enum rather than a trait object: there are two, and the benchmarks need to reach
/// the null sink's observer.
pub enum Sink {
    Mongo(Box<MongoSink>),
    Null(NullSink),
}

impl Sink {
    /// Connects (when needed) and returns the stored checkpoint, `None` for a new consumer.
    pub async fn open(&mut self) -> Result<Option<Position>> {
        match self {
            Sink::Mongo(s) => s.open().await,
            Sink::Null(s) => Ok(s.checkpoint()),
        }
    }

    /// Stores `delivery` and its end position, all or nothing as far as anyone restarting from the
    /// checkpoint can tell.
    pub async fn write(&mut self, delivery: &Delivery) -> Result<Written> {
        match self {
            Sink::Mongo(s) => s.write(delivery).await,
            Sink::Null(s) => Ok(s.write(delivery)),
        }
    }

    /// How the fetcher should prepare batches for this sink.
    pub fn encoder(&self) -> Encoder {
        match self {
            Sink::Mongo(_) => Encoder::Mongo,
            Sink::Null(_) => Encoder::Null,
        }
    }

    /// A cheap handle for health probes, usable while a write is in progress.
    pub fn prober(&self) -> Prober {
        match self {
            Sink::Mongo(s) => Prober::Mongo(s.prober()),
            Sink::Null(_) => Prober::Null,
        }
    }

    /// Which health check this sink reports under.
    pub fn describe(&self) -> String {
        match self {
            Sink::Mongo(s) => s.describe(),
            Sink::Null(_) => "the null sink".into(),
        }
    }
}

/// Probes a sink's reachability for `/healthz`.
#[derive(Clone)]
pub enum Prober {
    Mongo(mongo::MongoProber),
    Null,
}

impl Prober {
    pub async fn ping(&self) -> Result<()> {
        match self {
            Prober::Mongo(p) => p.ping().await,
            Prober::Null => Ok(()),
        }
    }
}
