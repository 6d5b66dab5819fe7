//! What an event is, and the validation producers apply before the database sees it.

use std::time::SystemTime;

use serde_json::Value;
use uuid::Uuid;

use crate::position::Position;

/// The longest topic the schema accepts.
pub const MAX_TOPIC_LEN: usize = 128;

/// A validated topic: 1 to 128 characters of `A-Z a-z 0-9 _ . -`, starting with a letter or digit.
/// The same rule is the CHECK constraint `events_topic_format`, so a topic that passes here is
/// never rejected by the database, and a bad one never costs a round trip.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(String);

impl Topic {
    pub fn new(topic: impl Into<String>) -> Result<Topic, InvalidEvent> {
        let topic = topic.into();
        validate_name(&topic).map_err(|reason| InvalidEvent::Topic {
            topic: topic.clone(),
            reason,
        })?;
        Ok(Topic(topic))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Topic {
    type Err = InvalidEvent;
    fn from_str(s: &str) -> Result<Topic, InvalidEvent> {
        Topic::new(s)
    }
}

/// The naming rule shared by topics and consumer names (both have the same CHECK in the schema).
pub fn validate_name(name: &str) -> Result<(), &'static str> {
    let mut chars = name.chars();
    match chars.next() {
        None => return Err("it is empty"),
        Some(c) if !c.is_ascii_alphanumeric() => {
            return Err("it must start with a letter or digit")
        }
        _ => {}
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err("it is longer than 128 characters");
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err("only letters, digits, '_', '.' and '-' are allowed");
    }
    Ok(())
}

/// Why an event was refused before reaching the database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    #[error("bad topic {topic:?}: {reason}")]
    Topic { topic: String, reason: &'static str },
    #[error("payload is not valid JSON: {0}")]
    PayloadNotJson(String),
    #[error("payload is {size} bytes, over the limit of {limit} bytes")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("headers must be a JSON object")]
    HeadersNotObject,
}

/// An event to append. `payload` and `headers` are JSON; `event_id` is generated when absent
/// (set it to make retries of the same business fact idempotent: the column is UNIQUE).
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub topic: Topic,
    pub key: Option<String>,
    pub event_type: Option<String>,
    pub payload: Value,
    pub headers: Value,
    pub event_id: Option<Uuid>,
}

impl NewEvent {
    pub fn new(topic: Topic, payload: Value) -> NewEvent {
        NewEvent {
            topic,
            key: None,
            event_type: None,
            payload,
            headers: Value::Object(Default::default()),
            event_id: None,
        }
    }

    /// From a JSON text, for callers holding bytes from elsewhere.
    pub fn from_json_text(topic: Topic, payload: &str) -> Result<NewEvent, InvalidEvent> {
        let payload = serde_json::from_str(payload)
            .map_err(|e| InvalidEvent::PayloadNotJson(e.to_string()))?;
        Ok(NewEvent::new(topic, payload))
    }

    pub fn with_key(mut self, key: impl Into<String>) -> NewEvent {
        self.key = Some(key.into());
        self
    }

    pub fn with_type(mut self, event_type: impl Into<String>) -> NewEvent {
        self.event_type = Some(event_type.into());
        self
    }

    pub fn with_headers(mut self, headers: Value) -> NewEvent {
        self.headers = headers;
        self
    }

    pub fn with_event_id(mut self, event_id: Uuid) -> NewEvent {
        self.event_id = Some(event_id);
        self
    }
}

/// An event as read back from the `events` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub position: Position,
    pub event_id: Uuid,
    pub topic: String,
    pub key: Option<String>,
    pub event_type: Option<String>,
    /// The payload as PostgreSQL prints it (`jsonb::text`): exact, whatever it holds.
    pub payload: RawJson,
    /// The headers object, likewise.
    pub headers: RawJson,
    pub created_at: SystemTime,
}

/// JSON text exactly as PostgreSQL stored it. Kept as text rather than parsed into a
/// `serde_json::Value`: jsonb numbers are arbitrary-precision (`1e400`, 40-digit integers) and
/// nesting is limited only by the server's stack, so a general-purpose parse can fail or round
/// where the stored value is perfectly valid. Readers that want a value parse it and handle the
/// error ([`RawJson::parse`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawJson(String);

impl RawJson {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// As a `serde_json::Value`; fails on what serde_json cannot hold (numbers beyond `f64`,
    /// nesting deeper than 128).
    pub fn parse(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(&self.0)
    }
}

impl From<String> for RawJson {
    fn from(text: String) -> RawJson {
        RawJson(text)
    }
}

impl std::fmt::Display for RawJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Event {
    /// The event as one line of JSON, the shape every reader prints (`eventsctl tail`, the
    /// gateway): `{position, id, event_id, topic, key, type, created_at, payload, headers}`, with
    /// payload and headers spliced in exactly as PostgreSQL printed them (no parse, no rounding).
    pub fn to_json(&self) -> String {
        let text = |s: &str| serde_json::to_string(s).expect("a string serialises");
        let optional = |s: &Option<String>| s.as_deref().map_or_else(|| "null".into(), text);
        let created_at = humantime::format_rfc3339_micros(self.created_at).to_string();
        format!(
            r#"{{"position":{},"id":{},"event_id":"{}","topic":{},"key":{},"type":{},"created_at":"{}","payload":{},"headers":{}}}"#,
            text(&self.position.to_string()),
            self.position.id,
            self.event_id,
            text(&self.topic),
            optional(&self.key),
            optional(&self.event_type),
            created_at,
            self.payload.as_str(),
            if self.headers.is_empty() {
                "{}"
            } else {
                self.headers.as_str()
            },
        )
    }

    /// The event's `id` column (its place in the commit-independent sequence).
    pub fn id(&self) -> i64 {
        self.position.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_the_schema_rule() {
        for ok in [
            "courses",
            "a",
            "Orders.v2",
            "x_y-z",
            "9lives",
            &"a".repeat(128),
        ] {
            assert!(Topic::new(ok).is_ok(), "{ok} should be accepted");
        }
        for bad in [
            "",
            "-x",
            ".x",
            "has space",
            "é",
            "a/b",
            &"a".repeat(129),
            "semi;colon",
        ] {
            assert!(
                matches!(Topic::new(bad), Err(InvalidEvent::Topic { .. })),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn events_print_as_exact_json() {
        let event = Event {
            position: Position::new(7, 42),
            event_id: Uuid::nil(),
            topic: "orders".into(),
            key: Some("k\"1".into()),
            event_type: None,
            payload: RawJson::from(r#"{"n": 1e400, "d": [1, 2]}"#.to_string()),
            headers: RawJson::default(),
            created_at: SystemTime::UNIX_EPOCH,
        };
        let line = event.to_json();
        assert!(
            line.contains(r#""payload":{"n": 1e400, "d": [1, 2]}"#),
            "{line}"
        );
        let parsed: Value = serde_json::from_str(&line.replace("1e400", "1")).unwrap();
        assert_eq!(parsed["position"], "7/42");
        assert_eq!(parsed["id"], 42);
        assert_eq!(parsed["key"], "k\"1");
        assert_eq!(parsed["type"], Value::Null);
        assert_eq!(parsed["created_at"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(parsed["headers"], serde_json::json!({}));
    }

    #[test]
    fn payload_text_must_be_json() {
        let topic = Topic::new("t").unwrap();
        assert!(NewEvent::from_json_text(topic.clone(), r#"{"a":1}"#).is_ok());
        assert!(matches!(
            NewEvent::from_json_text(topic, "{not json"),
            Err(InvalidEvent::PayloadNotJson(_))
        ));
    }
}
