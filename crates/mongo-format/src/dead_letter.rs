//! Dead letters: events a sink could not write, one document per event and consumer in the
//! `deadLetters` collection, kept (bounded) so an operator can see what was skipped and why.

use event_store::Position;
use mongodb::bson::{doc, Bson, DateTime, Document};

/// The dead letters collection, next to the events collection.
pub const DEAD_LETTERS: &str = "deadLetters";
// The same bounds and cuts as the dead letters kept in PostgreSQL: one definition of what a
// dead letter keeps, whichever store holds it.
use event_store::sink_state::{prefix, sha256_hex};
pub use event_store::sink_state::{FIELD_BYTES, PAYLOAD_BYTES};

/// What a dead letter records about the event.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    pub position: Position,
    pub event_id: Option<uuid::Uuid>,
    pub topic: Option<&'a str>,
    pub key: Option<&'a str>,
    pub event_type: Option<&'a str>,
    /// The payload as PostgreSQL printed it ("" when it could not be read).
    pub payload: &'a str,
    /// Why, as a stable code (`too_large`, `number_out_of_range`, …).
    pub code: &'a str,
    pub detail: &'a str,
}

/// The upsert (by `{position, consumer}` in the caller's filter) that records `letter` for
/// `consumer`: `first_seen_at` stays, `last_seen_at` moves on each attempt.
pub fn upsert(letter: &Fields, consumer: &str, now: DateTime) -> Document {
    let kept = prefix(letter.payload, PAYLOAD_BYTES);
    let optional = |s: Option<&str>| s.map_or(Bson::Null, |s| Bson::String(prefix(s, FIELD_BYTES)));
    doc! {
        "$set": {
            "event_id": letter.event_id.map_or(Bson::Null, |id| Bson::String(id.to_string())),
            "topic": optional(letter.topic),
            "key": optional(letter.key),
            "type": optional(letter.event_type),
            "position": letter.position.to_string(),
            "consumer": consumer,
            "reason": letter.code,
            "detail": prefix(letter.detail, FIELD_BYTES),
            "payload_truncated": kept.len() < letter.payload.len(),
            "payload_text": kept,
            "payload_bytes": letter.payload.len() as i64,
            "payload_sha256": sha256_hex(letter.payload.as_bytes()),
            "last_seen_at": now,
        },
        "$setOnInsert": {"first_seen_at": now},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_fields_are_cut_on_a_character_boundary_and_the_payload_is_hashed_whole() {
        let payload = "é".repeat(PAYLOAD_BYTES); // 2 bytes each: twice the bound
        let key = "ü".repeat(FIELD_BYTES);
        let letter = Fields {
            position: Position::new(5, 6),
            event_id: None,
            topic: Some("t"),
            key: Some(&key),
            event_type: None,
            payload: &payload,
            code: "too_large",
            detail: "d",
        };
        let update = upsert(&letter, "c", DateTime::now());
        let set = update.get_document("$set").unwrap();
        assert_eq!(set.get_str("payload_text").unwrap().len(), PAYLOAD_BYTES);
        assert!(set.get_bool("payload_truncated").unwrap());
        assert_eq!(
            set.get_i64("payload_bytes").unwrap(),
            2 * PAYLOAD_BYTES as i64
        );
        assert_eq!(set.get_str("key").unwrap().len(), FIELD_BYTES);
        assert_eq!(set.get_str("position").unwrap(), "5/6");
        assert!(set.get("type").unwrap() == &Bson::Null);
        assert_eq!(set.get_str("payload_sha256").unwrap().len(), 64);
    }
}
