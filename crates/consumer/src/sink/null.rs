//! A sink that stores nothing: it keeps the position in memory (benchmarks; wrap it in
//! [`Observed`](super::Observed) to time deliveries).

use event_store::Position;

use super::{Checkpoint, Delivery, Encoder, Probe, Sink, Written};
use super::{SinkError, SinkResult};

#[derive(Debug, Default)]
pub struct NullSink {
    checkpoint: Option<Checkpoint>,
}

impl NullSink {
    pub fn new() -> NullSink {
        NullSink::default()
    }
}

impl Sink for NullSink {
    type Probe = NullProbe;
    const KIND: &'static str = "null";

    async fn open(&mut self) -> SinkResult<Option<Checkpoint>> {
        Ok(self.checkpoint.clone())
    }

    async fn write(&mut self, delivery: &Delivery) -> SinkResult<Written> {
        let position = self.checkpoint.as_ref().map(|c| c.position);
        if position.unwrap_or(Position::START) != delivery.start {
            return Err(SinkError::CheckpointMoved {
                expected: delivery.start,
                found: position,
            });
        }
        self.checkpoint = Some(delivery.checkpoint());
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
    async fn ping(&self) -> SinkResult<()> {
        Ok(())
    }
}
