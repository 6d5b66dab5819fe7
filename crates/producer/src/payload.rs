//! Generated events for the load generator.

use std::time::{SystemTime, UNIX_EPOCH};

use event_store::{NewEvent, Topic};
use serde_json::{json, Value};
use uuid::Uuid;

/// Makes events with JSON payloads of about `payload_bytes` (never less than the few fields every
/// payload carries), round-robin over `topics`. Each gets a fresh `event_id`, so a batch whose
/// COMMIT outcome is unknown can be looked up afterwards.
#[derive(Debug, Clone)]
pub struct Generator {
    topics: Vec<Topic>,
    payload_bytes: usize,
}

impl Generator {
    pub fn new(topics: Vec<Topic>, payload_bytes: usize) -> Generator {
        assert!(!topics.is_empty(), "at least one topic");
        Generator {
            topics,
            payload_bytes,
        }
    }

    /// The event numbered `seq` (numbers are unique per process run).
    pub fn event(&self, seq: u64) -> NewEvent {
        let topic = &self.topics[(seq % self.topics.len() as u64) as usize];
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut payload = json!({ "seq": seq, "at_ms": at_ms, "pad": "" });
        // The JSON text without padding, to pad up to the target size.
        let bare = serde_json::to_string(&payload)
            .map(|s| s.len())
            .unwrap_or(0);
        if self.payload_bytes > bare {
            payload["pad"] = Value::String("x".repeat(self.payload_bytes - bare));
        }
        NewEvent::new(topic.clone(), payload)
            .with_key(format!("key-{}", seq % 1000))
            .with_type(format!("{topic}.generated"))
            .with_event_id(Uuid::new_v4())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_have_about_the_requested_size_and_topics_alternate() {
        let topics = vec![Topic::new("a").unwrap(), Topic::new("b").unwrap()];
        let generator = Generator::new(topics, 1000);
        let e0 = generator.event(0);
        let e1 = generator.event(1);
        assert_eq!((e0.topic.as_str(), e1.topic.as_str()), ("a", "b"));
        assert_ne!(e0.event_id, e1.event_id);
        let size = serde_json::to_string(&e0.payload).unwrap().len();
        assert_eq!(size, 1000);
        let tiny = Generator::new(vec![Topic::new("a").unwrap()], 0).event(5);
        assert_eq!(tiny.payload["seq"], 5);
    }
}
