//! What an event is, and the validation producers apply before the database sees it.

pub use crate::error::InvalidEvent;

use serde_json::Value;
use uuid::Uuid;

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
    fn payload_text_must_be_json() {
        let topic = Topic::new("t").unwrap();
        assert!(NewEvent::from_json_text(topic.clone(), r#"{"a":1}"#).is_ok());
        assert!(matches!(
            NewEvent::from_json_text(topic, "{not json"),
            Err(InvalidEvent::PayloadNotJson(_))
        ));
    }
}
