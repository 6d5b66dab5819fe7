//! A sink that stores nothing: it keeps the position in memory and, when asked, reports each
//! batch to an observer (the wake-up latency benchmark timestamps deliveries this way).

use std::time::Instant;

use event_store::Position;
use tokio::sync::mpsc::UnboundedSender;

use super::{Delivery, Written};

/// One batch as the null sink saw it.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub ids: Vec<i64>,
    pub end: Position,
    pub at: Instant,
}

#[derive(Debug, Default)]
pub struct NullSink {
    position: Option<Position>,
    observer: Option<UnboundedSender<Delivered>>,
}

impl NullSink {
    pub fn new() -> NullSink {
        NullSink::default()
    }

    /// Reports every batch to `observer`.
    pub fn observed(observer: UnboundedSender<Delivered>) -> NullSink {
        NullSink {
            position: None,
            observer: Some(observer),
        }
    }

    pub fn checkpoint(&self) -> Option<Position> {
        self.position
    }

    pub fn write(&mut self, delivery: &Delivery) -> Written {
        self.position = Some(delivery.end);
        if let Some(observer) = &self.observer {
            let _ = observer.send(Delivered {
                ids: delivery.events.iter().map(|e| e.id()).collect(),
                end: delivery.end,
                at: Instant::now(),
            });
        }
        Written {
            inserted: delivery.events.len(),
            already_present: 0,
        }
    }
}
