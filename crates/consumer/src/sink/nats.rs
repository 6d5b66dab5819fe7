//! The NATS JetStream sink: every event published to `<prefix>.<topic>` of one stream, the
//! payload exactly as PostgreSQL stores it, `Nats-Msg-Id` = the event's `event_id`.
//!
//! **Exactly once in the stream, also past the de-duplication window.** JetStream drops a
//! repeated `Nats-Msg-Id` only within the stream's duplicate window (two minutes by default); a
//! consumer that crashed after publishing and restarts an hour later must know by itself what it
//! already published. Two records together tell it:
//! - a checkpoint in PostgreSQL (`sink_checkpoints`), moved after *every* publish of a batch was
//!   acknowledged: everything up to it is in the stream;
//! - the stream itself: each message carries `Pgevents-Consumer` and `Pgevents-Position`. On
//!   start and after any failure the sink walks the stream back from its last message to the
//!   checkpoint and collects the positions it finds, each with its `Nats-Msg-Id`; an event at
//!   one of them with that same `event_id` is not published again (a position that now holds
//!   another event, after a restore or failover reused it, is published).
//!
//! The walk, not just "the last message's position", because pipelined publishes can be stored
//! with a hole (a message lost in a leader change while the next reached the new leader): the
//! set of stored positions is exact where a single high-water mark is not.
//!
//! **Poison events** (a message over the server's `max_payload`, a topic that is no valid subject
//! such as `a..b`) become dead letters in PostgreSQL (`sink_dead_letters`) and the stream goes
//! on.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_nats::{ConnectErrorKind, HeaderMap};
use bytes::Bytes;
use deadpool_postgres::Pool;
use event_store::position::Origin;
use event_store::retry::Decision;
use event_store::sink_state::{self, DeadLetterRow, SinkCheckpoint};
use event_store::{Event, Position};
use futures_util::stream::{FuturesOrdered, StreamExt};
use tracing::{info, warn};

use super::http::{store_error, SinkMetrics};
use super::{replay, SinkError, SinkResult};
use super::{Checkpoint, DeadLetter, Delivery, Encoder, OnPoison, Probe, Sink, Written};

/// Header names (documented in docs/consumer.md).
pub const CONSUMER_HEADER: &str = "Pgevents-Consumer";
pub const POSITION_HEADER: &str = "Pgevents-Position";
/// How far back the recovery walk goes at most (messages of other publishers included).
const WALK_LIMIT: u64 = 1_000_000;

/// The JetStream sink's settings (`--nats-*`).
#[derive(Clone)]
pub struct NatsConfig {
    /// Comma-separated server URLs.
    pub urls: String,
    pub stream: String,
    pub subject_prefix: String,
    pub creds: Option<PathBuf>,
    /// The token (read from --nats-token-file; never logged).
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
    /// Replicas of a stream this sink creates; `None`: 3 when the cluster has 3 nodes or more,
    /// else 1.
    pub replicas: Option<usize>,
    /// Publishes awaiting their acknowledgement at most.
    pub max_in_flight: usize,
    pub name: String,
    pub on_poison: OnPoison,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("urls", &describe_urls(&self.urls))
            .field("stream", &self.stream)
            .field("subject_prefix", &self.subject_prefix)
            .field("creds", &self.creds)
            .field("tls_ca", &self.tls_ca)
            .finish_non_exhaustive()
    }
}

struct Connected {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
}

pub struct NatsSink {
    config: NatsConfig,
    pool: Pool,
    connected: Option<Connected>,
    stored: Option<SinkCheckpoint>,
    /// Positions of this consumer's messages past the checkpoint found in the stream (published,
    /// checkpoint not yet moved), with their `Nats-Msg-Id`.
    in_stream: BTreeMap<Position, String>,
    origin: Option<Origin>,
    metrics: SinkMetrics,
    /// Shared with the probe: the client once connected.
    probe: Arc<std::sync::Mutex<Option<async_nats::Client>>>,
    /// When the replay requests were last looked for.
    replays_checked: std::time::Instant,
}

impl NatsSink {
    pub fn new(config: NatsConfig, pool: Pool) -> NatsSink {
        let metrics = SinkMetrics::new(&config.name, "nats");
        NatsSink {
            config,
            pool,
            connected: None,
            stored: None,
            in_stream: BTreeMap::new(),
            origin: None,
            replays_checked: std::time::Instant::now(),
            metrics,
            probe: Default::default(),
        }
    }

    async fn connect(&mut self) -> SinkResult<()> {
        if self.connected.is_some() {
            return Ok(());
        }
        let shown = describe_urls(&self.config.urls);
        let mut options = match &self.config.creds {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| {
                    SinkError::Config(format!(
                        "--nats-creds {}: cannot read the credentials ({e})",
                        path.display()
                    ))
                })?,
            None => async_nats::ConnectOptions::new(),
        };
        options = options
            .name(format!("pgevents-consumer:{}", self.config.name))
            .connection_timeout(Duration::from_secs(5));
        if let Some(token) = &self.config.token {
            options = options.token(token.clone());
        }
        if let Some(ca) = &self.config.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let addrs: Vec<async_nats::ServerAddr> = self
            .config
            .urls
            .split(',')
            .map(|u| u.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|e| SinkError::Config(format!("--nats-url {shown}: {e}")))?;
        let client = options.connect(addrs).await.map_err(|e| {
            let decision = match e.kind() {
                ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
                    Decision::Slowly
                }
                ConnectErrorKind::ServerParse => Decision::Never,
                _ => Decision::Soon,
            };
            let hint = if decision == Decision::Slowly {
                " (check --nats-creds / --nats-token-file)"
            } else {
                ""
            };
            SinkError::Failed {
                message: format!("cannot connect to NATS at {shown}: {e}{hint}"),
                decision,
                source: None,
            }
        })?;
        let js = jetstream::new(client.clone());
        let stream = self.ensure_stream(&client, &js).await?;
        *self.probe.lock().unwrap() = Some(client.clone());
        self.connected = Some(Connected { client, js, stream });
        Ok(())
    }

    /// The stream, created when missing; one that exists must take `<prefix>.>` into file
    /// storage, or start-up stops naming what differs.
    async fn ensure_stream(
        &self,
        client: &async_nats::Client,
        js: &jetstream::Context,
    ) -> SinkResult<stream::Stream> {
        let name = &self.config.stream;
        let wanted = format!("{}.>", self.config.subject_prefix);
        match js.get_stream(name).await {
            Ok(mut stream) => {
                let info = stream
                    .info()
                    .await
                    .map_err(|e| soon("read the stream", e))?;
                let config = &info.config;
                let covers = config.subjects.iter().any(|s| s == &wanted || s == ">");
                if !covers || config.storage != stream::StorageType::File {
                    return Err(SinkError::Config(format!(
                        "JetStream stream {name:?} exists with subjects {:?} and {:?} storage; \
                         this consumer publishes to {wanted:?} and needs file storage: add the \
                         subject and use file storage (nats stream edit {name}), or name another \
                         stream with --nats-stream",
                        config.subjects, config.storage
                    )));
                }
                // The walk back finds what was published only where the stream keeps it: a
                // work queue or interest stream removes messages once read.
                if config.retention != stream::RetentionPolicy::Limits {
                    return Err(SinkError::Config(format!(
                        "JetStream stream {name:?} has {:?} retention; this consumer needs limits \
                         retention (messages stay until a limit removes them), or it could not \
                         tell after a crash what it already published: use a stream with limits \
                         retention, or name another with --nats-stream",
                        config.retention
                    )));
                }
                let limited = !config.max_age.is_zero()
                    || config.max_messages > 0
                    || config.max_bytes > 0
                    || config.max_messages_per_subject > 0;
                if limited {
                    warn!(stream = %name, max_age = ?config.max_age, max_messages = config.max_messages,
                          max_bytes = config.max_bytes,
                          "The stream removes messages by age or size: a message removed before the \
                           checkpoint moved past it is published again after a crash.");
                }
                Ok(stream)
            }
            Err(e) if is_stream_not_found(&e) => {
                let nodes = client.server_info().connect_urls.len().max(1);
                let replicas = self
                    .config
                    .replicas
                    .unwrap_or(if nodes >= 3 { 3 } else { 1 });
                info!(stream = %name, subjects = %wanted, replicas, "Creating the JetStream stream.");
                js.create_stream(stream::Config {
                    name: name.clone(),
                    subjects: vec![wanted.clone()],
                    storage: stream::StorageType::File,
                    num_replicas: replicas,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .map_err(|e| SinkError::Failed {
                    message: format!(
                        "cannot create the JetStream stream {name:?} with {replicas} replica(s): \
                         {e} (a cluster needs as many JetStream nodes as replicas; see \
                         --nats-replicas)"
                    ),
                    decision: Decision::Slowly,
                    source: None,
                })
            }
            Err(e) => Err(soon(&format!("look up the JetStream stream {name:?}"), e)),
        }
    }

    async fn db(&self) -> SinkResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| {
            let e = event_store::Error::Pool {
                context: "reach PostgreSQL for the JetStream checkpoint".into(),
                source: e,
            };
            store_error(e)
        })
    }

    /// The positions of this consumer's messages past `after`, walking the stream back from
    /// its last message.
    async fn walk_back(&self, after: Position) -> SinkResult<BTreeMap<Position, String>> {
        let connected = self.connected.as_ref().expect("connected");
        let mut stream = connected.stream.clone();
        let info = stream
            .info()
            .await
            .map_err(|e| soon("read the stream", e))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut found = BTreeMap::new();
        if info.state.messages == 0 {
            return Ok(found);
        }
        let mut seq = last;
        let mut walked = 0u64;
        while seq >= first.max(1) && walked < WALK_LIMIT {
            walked += 1;
            match connected.stream.get_raw_message(seq).await {
                Ok(message) => {
                    let ours = message
                        .headers
                        .get(CONSUMER_HEADER)
                        .is_some_and(|v| v.as_str() == self.config.name);
                    if ours {
                        let position = message
                            .headers
                            .get(POSITION_HEADER)
                            .and_then(|v| Position::parse(v.as_str()).ok());
                        match position {
                            Some(p) if p <= after => break,
                            Some(p) => {
                                let id = message
                                    .headers
                                    .get("Nats-Msg-Id")
                                    .map(|v| v.as_str().to_string())
                                    .unwrap_or_default();
                                found.insert(p, id);
                            }
                            None => {}
                        }
                    }
                }
                // A deleted message leaves its sequence empty.
                Err(e) if e.to_string().contains("no message found") => {}
                Err(e) => return Err(soon("read the stream back", e)),
            }
            seq -= 1;
        }
        if walked >= WALK_LIMIT {
            warn!(
                walked,
                "The stream walk stopped at its limit; events past the checkpoint \
                           further back are published again (de-duplicated within the window)."
            );
        }
        if !found.is_empty() {
            info!(found = found.len(), after = %after,
                  "Found events in the stream past the checkpoint; they are not published again.");
        }
        Ok(found)
    }

    /// Publishes each dead letter an operator asked to replay, alone (after the events that
    /// followed it: a replay is out of order by nature), and removes it once acknowledged.
    async fn replay_requested(&mut self) -> SinkResult<()> {
        let client = self.db().await?;
        let name = self.config.name.clone();
        for (letter, event) in replay::requested(&client, &name).await? {
            let Some(event) = event else {
                replay::not_taken(&client, &name, &letter, &letter.reason, replay::PURGED).await?;
                continue;
            };
            let Some(subject) = self.subject(&event.topic) else {
                let detail = format!(
                    "replay failed: topic {:?} still makes no valid NATS subject",
                    event.topic
                );
                replay::not_taken(&client, &name, &letter, "subject_refused", &detail).await?;
                continue;
            };
            let connected = self.connected.as_ref().expect("connected");
            let headers = self.headers(&event);
            let payload = Bytes::copy_from_slice(event.payload.as_str().as_bytes());
            let acked = match connected
                .js
                .publish_with_headers(subject, headers, payload)
                .await
            {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(_) => replay::taken(&client, &name, letter.position).await?,
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    let detail = format!("replay failed: {e}");
                    replay::not_taken(&client, &name, &letter, "too_large", &detail).await?;
                }
                // The server is away: the request stays, the next tick tries again.
                Err(e) => return Err(publish_error(&event, e)),
            }
        }
        Ok(())
    }

    fn subject(&self, topic: &str) -> Option<String> {
        // Topics allow '.', which NATS reads as a token separator: an empty token (`a..b`,
        // `a.`) is no valid subject.
        topic
            .split('.')
            .all(|t| !t.is_empty())
            .then(|| format!("{}.{topic}", self.config.subject_prefix))
    }

    fn headers(&self, event: &Event) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", event.event_id.to_string());
        headers.insert(CONSUMER_HEADER, self.config.name.as_str());
        headers.insert(POSITION_HEADER, event.position.to_string());
        headers.insert("Pgevents-Topic", event.topic.as_str());
        if let Some(key) = &event.key {
            headers.insert("Pgevents-Key", escape_header(key));
        }
        if let Some(kind) = &event.event_type {
            headers.insert("Pgevents-Type", escape_header(kind));
        }
        headers.insert(
            "Pgevents-Created-At",
            humantime::format_rfc3339_micros(event.created_at).to_string(),
        );
        headers
    }
}

impl Sink for NatsSink {
    type Probe = NatsProbe;
    const KIND: &'static str = "nats";

    async fn open(&mut self) -> SinkResult<Option<Checkpoint>> {
        self.connect().await?;
        let client = self.db().await?;
        let stored = sink_state::load(&**client, &self.config.name)
            .await
            .map_err(store_error)?;
        if self.origin.is_none() {
            self.origin = Some(
                event_store::position::origin(&client)
                    .await
                    .map_err(store_error)?,
            );
        }
        let after = stored.as_ref().map_or(Position::START, |s| s.position);
        self.in_stream = self.walk_back(after).await?;
        self.stored = stored.clone();
        Ok(stored.map(|s| Checkpoint {
            position: s.position,
            event_id: s.event_id,
            origin: s.origin,
        }))
    }

    async fn write(&mut self, delivery: &Delivery) -> SinkResult<Written> {
        if let Some(origin) = &delivery.origin {
            self.origin = Some(Origin::clone(origin));
        }
        self.connect().await?;
        let (from, to) = (delivery.start, delivery.end);
        {
            let client = self.db().await?;
            sink_state::begin_request(&client, &self.config.name, "nats", from, to)
                .await
                .map_err(store_error)?
                .map_err(|found| SinkError::CheckpointMoved {
                    expected: from,
                    found,
                })?;
        }
        let connected = self.connected.as_ref().expect("connected");
        let max_payload = connected.client.server_info().max_payload;
        let mut written = Written::default();
        let mut letters: Vec<DeadLetter> = delivery.dead_letters.clone();
        let mut acks = FuturesOrdered::new();
        let mut behind = 0usize;
        let stops = |letters: &[DeadLetter]| {
            self.config.on_poison == OnPoison::Stop
                && letters.iter().any(|l| l.code != "undecodable")
        };
        for event in &delivery.events {
            // --on-poison stop: nothing after the poison event is published (it would be in
            // the stream before the poison once the cause is fixed).
            if stops(&letters) {
                break;
            }
            match self.in_stream.get(&event.position) {
                Some(id) if *id == event.event_id.to_string() => {
                    written.already_present += 1;
                    continue;
                }
                Some(id) => {
                    warn!(position = %event.position, in_stream = %id, event_id = %event.event_id,
                                  "The stream holds another event at this position (a restore or failover \
                                   reused it): publishing this one.")
                }
                // Later positions are already in the stream: this event's publish was lost (a
                // leader change) while the next ones were stored. It goes after them.
                None if self
                    .in_stream
                    .range(Position::new(event.position.tx_id, event.position.id + 1)..)
                    .next()
                    .is_some() =>
                {
                    behind += 1
                }
                None => {}
            }
            let Some(subject) = self.subject(&event.topic) else {
                letters.push(DeadLetter::of(
                    event,
                    "subject_refused",
                    format!(
                        "topic {:?} makes no valid NATS subject (an empty token between dots)",
                        event.topic
                    ),
                ));
                continue;
            };
            let headers = self.headers(event);
            let size = event.payload.len() + header_bytes(&headers);
            if size > max_payload {
                letters.push(DeadLetter::of(
                    event,
                    "too_large",
                    format!(
                        "{size} bytes with headers, over the server's max_payload of {max_payload}"
                    ),
                ));
                continue;
            }
            let payload = Bytes::copy_from_slice(event.payload.as_str().as_bytes());
            let ack = connected
                .js
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| publish_error(event, e))?;
            self.metrics.in_flight.increment(1.0);
            acks.push_back(async move { (event, ack.await) });
            while acks.len() >= self.config.max_in_flight {
                let (event, ack) = acks.next().await.expect("not empty");
                self.acked(event, ack, &mut written, &mut letters)?;
            }
        }
        if behind > 0 {
            warn!(
                events = behind,
                "Published events whose first publish was lost while later ones were stored (a \
                 leader change): on their subjects they follow those later events."
            );
        }
        while let Some((event, ack)) = acks.next().await {
            self.acked(event, ack, &mut written, &mut letters)?;
        }
        for letter in &letters {
            if self.config.on_poison == OnPoison::Stop && letter.code != "undecodable" {
                return Err(SinkError::Poison(Box::new(letter.clone())));
            }
        }
        let rows: Vec<DeadLetterRow> = letters.iter().map(super::http::row).collect();
        let mut client = self.db().await?;
        sink_state::commit_request(
            &mut client,
            &self.config.name,
            from,
            to,
            delivery.end_event_id,
            self.origin.as_ref(),
            &rows,
        )
        .await
        .map_err(store_error)?
        .map_err(|found| SinkError::CheckpointMoved {
            expected: from,
            found,
        })?;
        self.stored = Some(SinkCheckpoint {
            position: to,
            event_id: delivery.end_event_id,
            origin: self.origin.clone(),
            pending: None,
        });
        self.in_stream = self
            .in_stream
            .split_off(&Position::new(to.tx_id, to.id + 1));
        written.dead_letters = letters;
        Ok(written)
    }

    fn encoder(&self) -> Encoder {
        Delivery::plain
    }

    async fn housekeeping(&mut self) -> SinkResult<()> {
        if self.connected.is_none() || self.replays_checked.elapsed() < replay::CHECK_INTERVAL {
            return Ok(());
        }
        self.replays_checked = std::time::Instant::now();
        self.replay_requested().await
    }

    fn probe(&self) -> NatsProbe {
        NatsProbe {
            client: self.probe.clone(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "JetStream stream {:?} at {} (subjects {}.<topic>)",
            self.config.stream,
            describe_urls(&self.config.urls),
            self.config.subject_prefix
        )
    }
}

impl NatsSink {
    fn acked(
        &self,
        event: &Event,
        ack: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
        written: &mut Written,
        letters: &mut Vec<DeadLetter>,
    ) -> SinkResult<()> {
        self.metrics.in_flight.decrement(1.0);
        match ack {
            Ok(ack) if ack.duplicate => {
                self.metrics.outcome("duplicate");
                written.already_present += 1;
                Ok(())
            }
            Ok(_) => {
                self.metrics.outcome("delivered");
                written.inserted += 1;
                Ok(())
            }
            Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                self.metrics.outcome("refused");
                letters.push(DeadLetter::of(event, "too_large", e.to_string()));
                Ok(())
            }
            Err(e) => {
                self.metrics.outcome("retried");
                Err(publish_error(event, e))
            }
        }
    }
}

fn publish_error(event: &Event, e: jetstream::context::PublishError) -> SinkError {
    let decision = match e.kind() {
        PublishErrorKind::StreamNotFound => Decision::Slowly,
        _ => Decision::Soon,
    };
    SinkError::Failed {
        message: format!(
            "publishing event {} to JetStream failed: {e}",
            event.position
        ),
        decision,
        source: None,
    }
}

fn is_stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    match e.kind() {
        jetstream::context::GetStreamErrorKind::JetStream(js) => {
            js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
        }
        _ => false,
    }
}

fn soon(what: &str, e: impl std::fmt::Display) -> SinkError {
    SinkError::Failed {
        message: format!("cannot {what}: {e}"),
        decision: Decision::Soon,
        source: None,
    }
}

/// The bytes headers take on the wire (`NATS/1.0\r\n`, `Name: value\r\n` each, `\r\n`).
fn header_bytes(headers: &HeaderMap) -> usize {
    let mut n = 12;
    for (name, values) in headers.iter() {
        for value in values {
            n += name.to_string().len() + value.as_str().len() + 4;
        }
    }
    n
}

/// A header value keeps printable ASCII; anything else (CR, LF, non-ASCII) is percent-encoded,
/// as is `%` itself, so a key with a line break cannot forge headers.
pub fn escape_header(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The server URLs for logs, without user or password.
pub fn describe_urls(urls: &str) -> String {
    urls.split(',')
        .map(|u| {
            let u = u.trim();
            match (u.find("://"), u.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => {
                    format!("{}{}", &u[..scheme + 3], &u[at + 1..])
                }
                (None, Some(at)) => u[at + 1..].to_string(),
                _ => u.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `/healthz`: is the client connected.
#[derive(Clone)]
pub struct NatsProbe {
    client: Arc<std::sync::Mutex<Option<async_nats::Client>>>,
}

impl Probe for NatsProbe {
    async fn ping(&self) -> SinkResult<()> {
        let state = self
            .client
            .lock()
            .unwrap()
            .as_ref()
            .map(|c| c.connection_state());
        match state {
            Some(async_nats::connection::State::Connected) => Ok(()),
            Some(state) => Err(soon("reach NATS", format!("connection {state}"))),
            None => Err(soon("reach NATS", "not connected yet")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_cannot_break_lines() {
        assert_eq!(escape_header("order-1"), "order-1");
        assert_eq!(escape_header("a\r\nX-Evil: 1"), "a%0D%0AX-Evil: 1");
        assert_eq!(escape_header("100%"), "100%25");
        assert_eq!(escape_header("é"), "%C3%A9");
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(
            describe_urls("nats://u:secret@h1:4222, nats://h2:4222"),
            "nats://h1:4222,nats://h2:4222"
        );
        assert_eq!(describe_urls("tok@h1:4222"), "h1:4222");
    }
}
