//! A sink that stores nothing: it keeps the position in memory and, when asked, reports each
//! batch to an observer (the wake-up latency benchmark timestamps deliveries this way).

use std::time::Instant;

use event_store::Position;
use tokio::sync::mpsc::UnboundedSender;

use super::{Checkpoint, Delivery, Encoder, Probe, Sink, Written};
use crate::error::{Error, Result};

/// One batch as the null sink saw it.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub ids: Vec<i64>,
    pub end: Position,
    pub at: Instant,
}

#[derive(Debug, Default)]
pub struct NullSink {
    checkpoint: Option<Checkpoint>,
    observer: Option<UnboundedSender<Delivered>>,
}

impl NullSink {
    pub fn new() -> NullSink {
        NullSink::default()
    }

    /// Reports every batch to `observer`.
    pub fn observed(observer: UnboundedSender<Delivered>) -> NullSink {
        NullSink {
            checkpoint: None,
            observer: Some(observer),
        }
    }
}

impl Sink for NullSink {
    type Probe = NullProbe;

    async fn open(&mut self) -> Result<Option<Checkpoint>> {
        Ok(self.checkpoint.clone())
    }

    async fn write(&mut self, delivery: &Delivery) -> Result<Written> {
        let position = self.checkpoint.as_ref().map(|c| c.position);
        if position.unwrap_or(Position::START) != delivery.start {
            return Err(Error::CheckpointMoved {
                expected: delivery.start,
                found: position,
            });
        }
        self.checkpoint = Some(delivery.checkpoint());
        if let Some(observer) = &self.observer {
            let _ = observer.send(Delivered {
                ids: delivery.events.iter().map(|e| e.id()).collect(),
                end: delivery.end,
                at: Instant::now(),
            });
        }
        Ok(Written {
            inserted: delivery.events.len(),
            already_present: 0,
            dead_letters: delivery.dead_letters.clone(),
        })
    }

    fn encoder(&self) -> Encoder {
        Delivery::plain
    }

    fn probe(&self) -> NullProbe {
        NullProbe
    }

    fn describe(&self) -> String {
        "the null sink".into()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct NullProbe;

impl Probe for NullProbe {
    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}
