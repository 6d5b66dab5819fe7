//! Checkpoints: one document per consumer in the `checkpoints` collection, next to the events.
//!
//! `{_id: <consumer name>, tx_id: Int64, id: Int64, event_id: "<uuid>", origin: {system_id,
//! database}, updated_at}`. `tx_id` is a PostgreSQL xid8, unsigned; it is stored as Int64 while it
//! fits and as a decimal string past that (never before 2^63 transactions). `event_id` and
//! `origin` let a consumer tell that the database behind its checkpoint is still the one it read
//! from (see `event_store::divergence`).

use event_store::position::Origin;
use event_store::Position;
use mongodb::bson::{doc, Bson, DateTime, Document};

/// The checkpoints collection, next to the events collection.
pub const CHECKPOINTS: &str = "checkpoints";

/// What a checkpoint document records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub position: Position,
    /// The event at `position` when the checkpoint was written (absent after a reset).
    pub event_id: Option<uuid::Uuid>,
    pub origin: Option<Origin>,
}

/// A checkpoint document that does not have the documented shape.
#[derive(Debug, thiserror::Error)]
#[error(
    "the checkpoint of consumer {name:?} in {CHECKPOINTS} is malformed ({document}): expected \
     {{_id, tx_id: Int64 or decimal string, id: Int64}}"
)]
pub struct Malformed {
    pub name: String,
    pub document: String,
}

/// Reads a checkpoint document back, accepting what an operator may have typed in a shell
/// (Int32 or Int64 numbers, a decimal string for `tx_id`).
pub fn read(doc: &Document, name: &str) -> Result<Stored, Malformed> {
    let position = position(doc, name)?;
    let event_id = doc
        .get_str("event_id")
        .ok()
        .and_then(|id| uuid::Uuid::parse_str(id).ok());
    let origin = doc.get_document("origin").ok().and_then(|o| {
        Some(Origin {
            system_id: o.get_str("system_id").ok()?.to_string(),
            database: o.get_str("database").ok()?.to_string(),
        })
    });
    Ok(Stored {
        position,
        event_id,
        origin,
    })
}

/// The position a checkpoint document records.
pub fn position(doc: &Document, name: &str) -> Result<Position, Malformed> {
    let bad = || Malformed {
        name: name.to_string(),
        document: doc.to_string(),
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

/// The update that stores `end` as a checkpoint (the consumer and `eventsctl reset` both use it,
/// so both write the same shape).
///
/// The event id recorded for the previous position no longer applies, so it is removed: the
/// divergence check skips a checkpoint without one.
pub fn update(end: Position, now: DateTime) -> Document {
    doc! {
        "$set": {"tx_id": tx_id_bson(end.tx_id), "id": end.id, "updated_at": now},
        "$unset": {"event_id": ""},
    }
}

/// The filter and update that move consumer `name`'s checkpoint from `start` to `to` (recording
/// the event there and the origin, when known). The filter matches only a checkpoint still at
/// `start`: a write that finds none knows another writer moved it.
pub fn moved(
    name: &str,
    start: Position,
    to: Position,
    event_id: Option<uuid::Uuid>,
    origin: Option<&Origin>,
) -> (Document, Document) {
    // Either form of tx_id: an operator may have typed it as a decimal string.
    let filter = doc! {
        "_id": name,
        "tx_id": {"$in": [tx_id_bson(start.tx_id), start.tx_id.to_string()]},
        "id": start.id,
    };
    let mut update = update(to, DateTime::now());
    if let Some(event_id) = event_id {
        let set = update.get_document_mut("$set").expect("built with $set");
        set.insert("event_id", event_id.to_string());
        update.remove("$unset");
    }
    if let Some(origin) = origin {
        let set = update.get_document_mut("$set").expect("built with $set");
        set.insert(
            "origin",
            doc! {"system_id": &origin.system_id, "database": &origin.database},
        );
    }
    (filter, update)
}

/// A transaction id as stored: Int64 while it fits.
pub fn tx_id_bson(tx_id: u64) -> Bson {
    match i64::try_from(tx_id) {
        Ok(tx) => Bson::Int64(tx),
        Err(_) => Bson::String(tx_id.to_string()),
    }
}

/// An integer as MongoDB stores it, whichever width an operator typed.
pub fn bson_i64(value: &Bson) -> Option<i64> {
    match value {
        Bson::Int64(v) => Some(*v),
        Bson::Int32(v) => Some(i64::from(*v)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_tx_ids_as_u64() {
        for tx in [0, 3, 4_294_967_296, i64::MAX as u64, u64::MAX] {
            let set = update(Position::new(tx, 7), DateTime::now());
            let mut stored = set.get_document("$set").unwrap().clone();
            stored.insert("_id", "c");
            assert_eq!(position(&stored, "c").unwrap(), Position::new(tx, 7));
        }
        let typed = doc! {"_id": "c", "tx_id": 5_i32, "id": 9_i32};
        assert_eq!(position(&typed, "c").unwrap(), Position::new(5, 9));
        let bad = doc! {"_id": "c", "tx_id": -1_i64, "id": 9_i64};
        let err = position(&bad, "c").unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");
    }

    #[test]
    fn a_moved_checkpoint_records_the_event_and_origin_and_reads_back() {
        let id = uuid::Uuid::new_v4();
        let origin = Origin {
            system_id: "7".into(),
            database: "db".into(),
        };
        let (filter, update) = moved(
            "c",
            Position::new(1, 2),
            Position::new(3, 4),
            Some(id),
            Some(&origin),
        );
        assert_eq!(filter.get_str("_id").unwrap(), "c");
        assert!(update.get("$unset").is_none());
        let mut stored = update.get_document("$set").unwrap().clone();
        stored.insert("_id", "c");
        let back = read(&stored, "c").unwrap();
        assert_eq!(
            back,
            Stored {
                position: Position::new(3, 4),
                event_id: Some(id),
                origin: Some(origin),
            }
        );
    }
}
