//! Mirrors: a collection that holds a captured table's rows, by key, rather than its change log.
//!
//! `--mirror TOPIC[=COLLECTION]` applies every captured event of `TOPIC` to `COLLECTION` (default:
//! the topic's name), in stream order, in the same MongoDB write as the batch's events and the
//! checkpoint (one transaction when the server has them):
//!
//! | event type | applied as |
//! |---|---|
//! | `insert`, `read`, `update` | replace the document `_id = key` with the row's captured columns (`new`), upserting |
//! | `delete` | delete the document `_id = key` |
//! | `truncate` | delete every document of the collection |
//!
//! `_id` is the key's value for a one-column key (`{"id":42}` → `_id: 42`), else the key object
//! in key-column order (`{"order_id":7,"line":2}` → `_id: {order_id: 7, line: 2}`). Values map as
//! in the change log (`mongo_format::event`: exact numbers, Decimal128 where a double would
//! round). A key change arrives as a delete of the old key and an insert of the new one, so no
//! stale document stays behind. A column called `_id` is overwritten by the key.
//!
//! Re-applying a batch (after a crash before its checkpoint, without transactions) gives the same
//! state: every operation sets a document to a state or removes it, in stream order. Because the
//! stream is causal per key (V8, and backfills read under row locks, V10), the last event of a key
//! is the row as the table holds it.
//!
//! Events of a mirrored topic that are not captured changes (another `type`, no key, no `new`)
//! are kept in the change log and not applied, with a warning.

use std::str::FromStr;

use event_store::event::Topic;
use event_store::Event;
use mongodb::bson::{doc, Bson, Document, RawDocumentBuf};
use mongodb::options::{DeleteManyModel, DeleteOneModel, ReplaceOneModel, WriteModel};
use mongodb::Namespace;

use mongo_format::event::json_text_to_bson;

/// One `--mirror TOPIC[=COLLECTION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub topic: String,
    pub collection: String,
}

impl FromStr for Mirror {
    type Err = String;

    fn from_str(s: &str) -> Result<Mirror, String> {
        let (topic, collection) = match s.split_once('=') {
            Some((topic, collection)) => (topic.trim(), collection.trim()),
            None => (s.trim(), s.trim()),
        };
        Topic::new(topic).map_err(|e| format!("--mirror {s:?}: {e}"))?;
        if collection.is_empty()
            || collection.starts_with("system.")
            || collection.contains(['$', '\0'])
        {
            return Err(format!(
                "--mirror {s:?}: {collection:?} is not a usable MongoDB collection name"
            ));
        }
        Ok(Mirror {
            topic: topic.to_string(),
            collection: collection.to_string(),
        })
    }
}

/// The write operations that apply a batch's events to the mirrors of `database`, in stream
/// order. `docs` are the events' stored documents (the encoder keeps the payload only there, as
/// BSON already converted the change log's way).
pub fn operations(
    database: &str,
    mirrors: &[Mirror],
    events: &[Event],
    docs: &[RawDocumentBuf],
) -> Vec<WriteModel> {
    let mut ops = Vec::new();
    if mirrors.is_empty() {
        return ops;
    }
    for (event, stored) in events.iter().zip(docs) {
        let Some(mirror) = mirrors.iter().find(|m| m.topic == event.topic) else {
            continue;
        };
        let namespace = Namespace::new(database, &mirror.collection);
        match operation(namespace, event, stored) {
            Ok(op) => ops.push(op),
            Err(why) => tracing::warn!(
                id = event.id(),
                topic = %event.topic,
                collection = %mirror.collection,
                reason = %why,
                "An event of a mirrored topic is not a captured change; kept in the change log, not applied to the mirror."
            ),
        }
    }
    ops
}

fn operation(
    namespace: Namespace,
    event: &Event,
    stored: &RawDocumentBuf,
) -> Result<WriteModel, String> {
    let kind = event.event_type.as_deref().unwrap_or("");
    if kind == "truncate" {
        return Ok(DeleteManyModel::builder()
            .namespace(namespace)
            .filter(doc! {})
            .build()
            .into());
    }
    let key = event.key.as_deref().ok_or("no key")?;
    // `_id` is a field of the mirror document (level 1), so its value sits at level 2.
    let id = match json_text_to_bson(key, 2).map_err(|p| format!("key: {p}"))? {
        Bson::Document(mut parts) if parts.len() == 1 => {
            let (_, value) = parts.iter_mut().next().expect("one part");
            std::mem::replace(value, Bson::Null)
        }
        Bson::Document(parts) => Bson::Document(parts),
        _ => return Err("the key is not a JSON object".into()),
    };
    match kind {
        "insert" | "read" | "update" => {
            let new = stored
                .get_document("payload")
                .ok()
                .and_then(|p| p.get_document("new").ok())
                .ok_or_else(|| format!("a captured {kind} carries the row under \"new\""))?;
            let mut replacement = Document::new();
            replacement.insert("_id", id.clone());
            for field in new {
                let (column, value) = field.map_err(|e| format!("payload: {e}"))?;
                if column != "_id" {
                    let value =
                        Bson::try_from(value.to_raw_bson()).map_err(|e| format!("payload: {e}"))?;
                    replacement.insert(column, value);
                }
            }
            Ok(ReplaceOneModel::builder()
                .namespace(namespace)
                .filter(doc! {"_id": id})
                .replacement(replacement)
                .upsert(true)
                .build()
                .into())
        }
        "delete" => Ok(DeleteOneModel::builder()
            .namespace(namespace)
            .filter(doc! {"_id": id})
            .build()
            .into()),
        other => Err(format!("type {other:?} is not a captured operation")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_parse_with_and_without_a_collection() {
        assert_eq!(
            "orders".parse::<Mirror>().unwrap(),
            Mirror {
                topic: "orders".into(),
                collection: "orders".into()
            }
        );
        assert_eq!(
            "order-items=items".parse::<Mirror>().unwrap().collection,
            "items"
        );
        for bad in ["", "bad topic", "t=", "t=a$b", "t=system.x"] {
            assert!(bad.parse::<Mirror>().is_err(), "{bad:?}");
        }
    }
}
