//! A wrapper that reports every batch its sink has stored, with the time the write returned: the
//! benchmarks time delivery this way (commit → stored in MongoDB, or → handed to the null sink)
//! without a second code path inside either sink.

use std::time::Instant;

use event_store::Position;
use tokio::sync::mpsc::UnboundedSender;

use super::SinkResult;
use super::{Checkpoint, Delivery, Encoder, Sink, Written};

/// One batch as stored.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub ids: Vec<i64>,
    pub end: Position,
    /// When the sink's write returned (for MongoDB: committed with the sink's write concern).
    pub at: Instant,
}

/// `S`, reporting each stored batch to an observer.
pub struct Observed<S> {
    sink: S,
    observer: UnboundedSender<Delivered>,
}

impl<S: Sink> Observed<S> {
    pub fn new(sink: S, observer: UnboundedSender<Delivered>) -> Observed<S> {
        Observed { sink, observer }
    }
}

impl<S: Sink> Sink for Observed<S> {
    type Probe = S::Probe;
    const KIND: &'static str = S::KIND;

    async fn open(&mut self) -> SinkResult<Option<Checkpoint>> {
        self.sink.open().await
    }

    async fn write(&mut self, delivery: &Delivery) -> SinkResult<Written> {
        let written = self.sink.write(delivery).await?;
        // A closed observer only means nobody is timing any more.
        let _ = self.observer.send(Delivered {
            ids: delivery.events.iter().map(|e| e.id()).collect(),
            end: delivery.end,
            at: Instant::now(),
        });
        Ok(written)
    }

    fn encoder(&self) -> Encoder {
        self.sink.encoder()
    }

    async fn housekeeping(&mut self) -> SinkResult<()> {
        self.sink.housekeeping().await
    }

    fn batch_rows(&self) -> Option<usize> {
        self.sink.batch_rows()
    }

    fn probe(&self) -> S::Probe {
        self.sink.probe()
    }

    fn describe(&self) -> String {
        self.sink.describe()
    }
}
