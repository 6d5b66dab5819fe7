//! What goes over the wire: one JSON object per event, encoded once (by whoever read the event)
//! and shared by every client that receives it, and the framing of Server-Sent Events.
//!
//! The event object is `{position, id, event_id, topic, key, type, created_at, payload, headers}`.
//! SSE sends it as `id: POSITION`, `event: TYPE` (or `message`), `data: JSON`; WebSocket sends the
//! object itself as one text message. Control messages (`gap`, `goodbye`, `reset`) are named SSE
//! events, and WebSocket objects with a `"control"` field.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use event_store::{Event, Position};
use serde_json::json;

/// An event ready to send.
#[derive(Debug)]
pub struct Encoded {
    pub position: Position,
    pub topic: String,
    pub key: Option<String>,
    pub created_at: SystemTime,
    /// The complete SSE frame: `event: TYPE`, `id`, `data: JSON`, blank line. The JSON object
    /// (what WebSocket sends) is a slice of it, so an event is encoded into one buffer, once.
    sse: Bytes,
    /// Where `id:` starts in `sse`: the frame without its `event:` line (a plain `message`).
    untyped_from: usize,
    /// Where the JSON object lies in `sse`.
    json: std::ops::Range<usize>,
}

impl Encoded {
    pub fn new(event: Event) -> Arc<Encoded> {
        use std::fmt::Write;
        let name = sse_event_name(event.event_type.as_deref());
        // `event:` first, so the untyped frame is a zero-copy slice of the typed one.
        let mut sse = String::with_capacity(name.len() + 48 + event.json_len_hint());
        sse.push_str("event: ");
        sse.push_str(name);
        sse.push('\n');
        let untyped_from = sse.len();
        // Writing to a String cannot fail.
        let _ = write!(sse, "id: {}\ndata: ", event.position);
        let json_from = sse.len();
        // The shape every reader prints, payload and headers as PostgreSQL printed them (exact:
        // jsonb numbers such as 1e400 or 40-digit integers survive, where a round trip through
        // f64 would not).
        event.write_json(&mut sse);
        one_line(&mut sse, json_from);
        let json = json_from..sse.len();
        sse.push_str("\n\n");
        Arc::new(Encoded {
            position: event.position,
            topic: event.topic,
            key: event.key,
            created_at: event.created_at,
            sse: Bytes::from(sse),
            untyped_from,
            json,
        })
    }

    /// The SSE frame: named after the event's type, or (`typed` false) as a plain `message`, for
    /// pages that want every event through EventSource's one `onmessage` handler.
    pub fn sse(&self, typed: bool) -> Bytes {
        if typed {
            self.sse.clone()
        } else {
            self.sse.slice(self.untyped_from..)
        }
    }

    /// The JSON object, one line (a WebSocket text message).
    pub fn json(&self) -> &str {
        std::str::from_utf8(&self.sse[self.json.clone()]).expect("encoded from a String")
    }
}

/// The JSON text from `from` on one line. PostgreSQL's jsonb text has no raw line breaks (they
/// are escaped inside strings), so this only guards the framing should one ever appear between
/// tokens, where JSON allows whitespace (a space is as good there).
fn one_line(text: &mut String, from: usize) {
    if memchr::memchr2(b'\n', b'\r', &text.as_bytes()[from..]).is_some() {
        let flat = text[from..].replace(['\n', '\r'], " ");
        text.truncate(from);
        text.push_str(&flat);
    }
}

/// The SSE `event:` name for an event type. A type that would break the framing (a line break),
/// or is empty, is sent as the default `message`; the JSON carries the real type either way.
fn sse_event_name(event_type: Option<&str>) -> &str {
    match event_type {
        Some(t) if !t.is_empty() && !t.contains(['\r', '\n']) && t.len() <= 200 => t,
        _ => "message",
    }
}

/// A control message: what happened, and (for SSE) the position the browser should resume from
/// (sent as the frame's `id:`, so EventSource's next `Last-Event-ID` is right).
#[derive(Debug, Clone)]
pub struct Control {
    pub name: &'static str,
    pub resume: Option<Position>,
    pub body: serde_json::Value,
}

impl Control {
    /// Events after `after` up to `up_to` were purged before this client got them.
    pub fn gap(after: Position, up_to: Position, resumed_at: Option<Position>) -> Control {
        Control {
            name: "gap",
            resume: None,
            body: json!({
                "missing_after": after.to_string(),
                "missing_up_to": up_to.to_string(),
                "resumed_at": resumed_at.map(|p| p.to_string()),
                "message": format!(
                    "events after {after} up to and including {up_to} were purged before this \
                     stream could send them"
                ),
            }),
        }
    }

    /// The stream ends; reconnect from `resume`.
    pub fn goodbye(reason: &'static str, resume: Position) -> Control {
        Control {
            name: "goodbye",
            resume: Some(resume),
            body: json!({"reason": reason, "resume": resume.to_string()}),
        }
    }

    /// The requested start could not be used; the stream starts from now instead.
    pub fn reset(reason: String, from: Position) -> Control {
        Control {
            name: "reset",
            resume: Some(from),
            body: json!({"reason": reason, "from": from.to_string()}),
        }
    }

    pub fn sse(&self) -> Bytes {
        let mut frame = String::new();
        if let Some(resume) = self.resume {
            frame.push_str(&format!("id: {resume}\n"));
        }
        frame.push_str(&format!("event: {}\ndata: {}\n\n", self.name, self.body));
        Bytes::from(frame)
    }

    pub fn ws_json(&self) -> String {
        let mut body = self.body.clone();
        if let Some(object) = body.as_object_mut() {
            object.insert("control".into(), self.name.into());
        }
        body.to_string()
    }
}

/// What a client's queue holds.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A live event.
    Event(Arc<Encoded>),
    /// A stored event read for a client that is catching up: its age is no live latency.
    Stored(Arc<Encoded>),
    Control(Control),
    /// Keeps idle connections open (an SSE comment, a WebSocket ping).
    Heartbeat,
}

/// The first bytes of every SSE stream: the reconnect delay, jittered so that clients dropped
/// together do not all come back in the same instant.
pub fn sse_preamble() -> Bytes {
    let retry_ms = rand::random_range(1000..3000);
    Bytes::from(format!(": pgevents gateway\nretry: {retry_ms}\n\n"))
}

pub const SSE_HEARTBEAT: &[u8] = b": heartbeat\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: Option<&str>) -> Event {
        Event {
            position: Position::new(10, 3),
            event_id: uuid::Uuid::nil(),
            topic: "courses".into(),
            key: Some("k".into()),
            event_type: event_type.map(Into::into),
            payload: r#"{"big": 1234567890123456789012345678901234567890, "text": "two\nlines"}"#
                .to_string()
                .into(),
            headers: "{}".to_string().into(),
            created_at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn sse_frames_carry_position_type_and_one_line_of_json() {
        let e = Encoded::new(event(Some("created")));
        let sse = e.sse(true);
        let text = std::str::from_utf8(&sse).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "event: created");
        assert_eq!(lines[1], "id: 10/3");
        assert!(lines[2].starts_with("data: {"), "{text}");
        assert_eq!(lines.len(), 4, "one data line, then the blank line: {text}");
        assert_eq!(lines[3], "");
        let v: serde_json::Value = serde_json::from_str(&lines[2][6..]).unwrap();
        assert_eq!(v["position"], "10/3");
        assert_eq!(v["id"], 3);
        assert_eq!(v["payload"]["text"], "two\nlines");
        assert!(
            lines[2].contains(r#""big": 1234567890123456789012345678901234567890"#),
            "exact numbers: {text}"
        );
        assert_eq!(v["key"], "k");
        assert_eq!(v["type"], "created");
        assert_eq!(v["created_at"], "1970-01-01T00:00:00.000000Z");
        let plain = e.sse(false);
        assert_eq!(std::str::from_utf8(&plain).unwrap(), &text[15..]);
        assert!(plain.starts_with(b"id: 10/3\ndata: {"));
    }

    #[test]
    fn types_that_would_break_the_framing_become_message() {
        for t in [None, Some(""), Some("evil\ndata: forged"), Some("a\rb")] {
            let e = Encoded::new(event(t));
            let sse = e.sse(true);
            let text = std::str::from_utf8(&sse).unwrap();
            assert_eq!(text.lines().next(), Some("event: message"), "{t:?}");
            assert_eq!(text.lines().count(), 4, "{text}");
        }
    }

    #[test]
    fn line_breaks_between_tokens_never_reach_the_framing() {
        let mut e = event(Some("created"));
        e.payload = "{\"a\":\r\n1}".to_string().into();
        let e = Encoded::new(e);
        let sse = e.sse(true);
        let text = std::str::from_utf8(&sse).unwrap();
        assert_eq!(text.lines().count(), 4, "{text}");
        assert_eq!(text.lines().nth(2).unwrap(), format!("data: {}", e.json()));
        let v: serde_json::Value = serde_json::from_str(e.json()).unwrap();
        assert_eq!(v["payload"]["a"], 1);
        assert!(text.ends_with("}\n\n"), "{text}");
    }

    #[test]
    fn goodbye_sets_the_resume_id() {
        let g = Control::goodbye("shutdown", Position::new(5, 6));
        assert!(std::str::from_utf8(&g.sse())
            .unwrap()
            .starts_with("id: 5/6\nevent: goodbye\n"));
        let ws: serde_json::Value = serde_json::from_str(&g.ws_json()).unwrap();
        assert_eq!(ws["control"], "goodbye");
        assert_eq!(ws["resume"], "5/6");
    }
}
