//! The HTTP webhook sink: each batch is POSTed to one URL as JSON, signed, with an idempotency
//! key; the checkpoint and the dead letters live in PostgreSQL (`event_store::sink_state`).
//!
//! **Delivery is at least once.** A receiver offers no transaction to join, so the checkpoint
//! moves after its 2xx. Each request is recorded before it is sent (its end position, in
//! `sink_checkpoints.pending_*`); after a crash between the 2xx and the checkpoint the same
//! events go out again as the same request — same body, same `Idempotency-Key` — so a receiver
//! that keeps the keys it has seen drops the repeat. That is the only duplicate there can be.
//!
//! **What the receiver's answer means.**
//! - 2xx: delivered.
//! - 408, 429, 5xx, a timeout, a refused connection: retried with the shared policy, waiting at
//!   least what `Retry-After` asks (capped at [`RETRY_AFTER_CAP`]).
//! - 401, 403, 404, 405, 407, 421, 426 and redirects: the receiver refuses *every* request (wrong
//!   secret, wrong URL); retried at the slowest pace with the answer on `/healthz`, never turned
//!   into dead letters.
//! - Any other 4xx: the request holds an event the receiver will not take. The batch is split in
//!   halves until the refused event is alone; it becomes a dead letter (the status and the first
//!   KiB of the answer) and the stream goes on.
//!
//! **Signature** (Stripe's and Svix's scheme): header `Pgevents-Signature: t=<unix seconds>,
//! v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`; a receiver recomputes it over the raw body and
//! rejects old timestamps (replays).

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use event_store::position::Origin;
use event_store::retry::Decision;
use event_store::sink_state::{self, DeadLetterRow, SinkCheckpoint};
use event_store::{Event, Position};
use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::{replay, SinkError, SinkResult};
use super::{Checkpoint, DeadLetter, Delivery, Encoder, OnPoison, Probe, Sink, Written};

/// The longest `Retry-After` honoured; a receiver asking for more is asked again after this.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(600);
/// How much of a refusing answer's body a dead letter keeps.
const ANSWER_BYTES: usize = 1024;
/// The header names, for receivers (documented in docs/consumer.md).
pub const SIGNATURE_HEADER: &str = "pgevents-signature";
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// The webhook sink's settings (`--http-*`).
#[derive(Clone)]
pub struct HttpConfig {
    pub url: reqwest::Url,
    /// Events per request (at most).
    pub batch: usize,
    pub timeout: Duration,
    /// The signing secret (never logged; `Debug` hides it).
    pub secret: Arc<[u8]>,
    /// PEM file of the CA that signed the receiver's certificate; default: the public roots.
    pub tls_ca: Option<std::path::PathBuf>,
    /// The consumer's name: its checkpoint row and part of every idempotency key.
    pub name: String,
    pub on_poison: OnPoison,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("url", &describe_url(&self.url))
            .field("batch", &self.batch)
            .field("timeout", &self.timeout)
            .field("tls_ca", &self.tls_ca)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

pub struct HttpSink {
    config: HttpConfig,
    client: reqwest::Client,
    pool: Pool,
    /// The checkpoint as this sink last read or wrote it.
    stored: Option<SinkCheckpoint>,
    origin: Option<Origin>,
    metrics: SinkMetrics,
    /// When the replay requests were last looked for.
    replays_checked: std::time::Instant,
    /// Events refused one by one since the receiver last took a request.
    refused_in_a_row: usize,
}

/// Refused events in a row, nothing taken in between, after which the sink stops recording dead
/// letters and retries slowly: the receiver refuses everything.
pub const REFUSALS_IN_A_ROW: usize = 20;

impl HttpSink {
    /// Builds the client (reading the CA file now: a bad file is a start-up error). `pool`
    /// reaches the database that keeps the checkpoint: the stream's own.
    pub fn new(config: HttpConfig, pool: Pool) -> SinkResult<HttpSink> {
        let tls = tls_config(config.tls_ca.as_deref())?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            // A redirect would send signed events somewhere the operator did not name.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pgevents-consumer/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SinkError::Config(format!("cannot build the HTTP client: {e}")))?;
        let metrics = SinkMetrics::new(&config.name, "http");
        Ok(HttpSink {
            config,
            client,
            pool,
            stored: None,
            origin: None,
            metrics,
            replays_checked: std::time::Instant::now(),
            refused_in_a_row: 0,
        })
    }

    async fn db(&self) -> SinkResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| {
            let e = event_store::Error::Pool {
                context: "reach PostgreSQL for the webhook checkpoint".into(),
                source: e,
            };
            let decision = e.decision();
            SinkError::failed(e.to_string(), decision, e)
        })
    }

    /// Sends the events `range` of `delivery` as the request (from, to], splitting it when the
    /// receiver refuses one of them; returns with the checkpoint at `to`.
    async fn send(
        &mut self,
        delivery: &Delivery,
        range: Range<usize>,
        from: Position,
        to: Position,
        written: &mut Written,
    ) -> SinkResult<()> {
        // Iterative, halves kept on a stack: the refused event is found in log2(batch) steps.
        let mut stack = vec![(range, from, to)];
        while let Some((range, from, to)) = stack.pop() {
            let events = &delivery.events[range.clone()];
            let mut refused = None;
            if !events.is_empty() {
                self.begin(from, to).await?;
                match self.post(from, to, events).await? {
                    Answer::Delivered => {
                        self.refused_in_a_row = 0;
                        written.inserted += events.len()
                    }
                    Answer::Refused { status, answer } if events.len() == 1 => {
                        // A receiver that refuses everything (a bad deploy) must not turn the
                        // whole stream into dead letters: past a run of refused events with
                        // nothing taken in between, wait for an operator instead.
                        self.refused_in_a_row += 1;
                        if self.refused_in_a_row > REFUSALS_IN_A_ROW {
                            return Err(SinkError::Failed {
                                message: format!(
                                    "the receiver refused the last {REFUSALS_IN_A_ROW} events one \
                                     by one and took none ({status}: {}); it seems to refuse \
                                     everything: retrying slowly instead of recording more dead \
                                     letters (fix the receiver; `eventsctl dead-letters replay` \
                                     sends the recorded ones again)",
                                    answer.trim().escape_debug()
                                ),
                                decision: Decision::Slowly,
                                source: None,
                            });
                        }
                        let detail = format!(
                            "the receiver answered {status}: {}",
                            answer.trim().escape_debug()
                        );
                        let letter = DeadLetter::of(&events[0], "refused_by_receiver", detail);
                        if self.config.on_poison == OnPoison::Stop {
                            return Err(SinkError::Poison(Box::new(letter)));
                        }
                        warn!(id = letter.id(), position = %letter.position, status = status.as_u16(),
                              "The receiver refused an event; recorded as a dead letter.");
                        refused = Some(letter);
                    }
                    Answer::Refused { status, .. } => {
                        let mid = range.start + range.len() / 2;
                        let split = delivery.events[mid - 1].position;
                        info!(
                            events = range.len(),
                            status = status.as_u16(),
                            "The receiver refused a batch; sending it in halves to find the event."
                        );
                        stack.push((mid..range.end, split, to));
                        stack.push((range.start..mid, from, split));
                        continue;
                    }
                }
            }
            // The delivery's own dead letters (undecodable rows) in this request's range go with
            // its checkpoint: the checkpoint never passes an event that is recorded nowhere.
            let mut letters: Vec<&DeadLetter> = delivery
                .dead_letters
                .iter()
                .filter(|l| l.position > from && l.position <= to)
                .collect();
            letters.extend(refused.as_ref());
            let event_id = if to == delivery.end {
                delivery.end_event_id
            } else {
                events.last().map(|e| e.event_id)
            };
            self.commit(from, to, event_id, &letters).await?;
            written.dead_letters.extend(letters.into_iter().cloned());
        }
        Ok(())
    }

    async fn begin(&mut self, from: Position, to: Position) -> SinkResult<()> {
        let client = self.db().await?;
        let begun = sink_state::begin_request(&client, &self.config.name, "http", from, to)
            .await
            .map_err(store_error)?;
        match begun {
            Ok(()) => {
                let stored = self.stored.get_or_insert(SinkCheckpoint {
                    position: from,
                    event_id: None,
                    origin: None,
                    pending: None,
                });
                stored.pending = Some(to);
                Ok(())
            }
            Err(found) => Err(SinkError::CheckpointMoved {
                expected: from,
                found,
            }),
        }
    }

    async fn commit(
        &mut self,
        from: Position,
        to: Position,
        event_id: Option<uuid::Uuid>,
        letters: &[&DeadLetter],
    ) -> SinkResult<()> {
        let rows: Vec<DeadLetterRow> = letters.iter().map(|l| row(l)).collect();
        let mut client = self.db().await?;
        if self.stored.is_none() {
            // A delivery without events (every row skipped by the topic filter, or a dead
            // letter) from the very start: the checkpoint row is made here.
            sink_state::begin_request(&client, &self.config.name, "http", from, to)
                .await
                .map_err(store_error)?
                .map_err(|found| SinkError::CheckpointMoved {
                    expected: from,
                    found,
                })?;
        }
        let committed = sink_state::commit_request(
            &mut client,
            &self.config.name,
            from,
            to,
            event_id,
            self.origin.as_ref(),
            &rows,
        )
        .await
        .map_err(store_error)?;
        match committed {
            Ok(()) => {
                self.stored = Some(SinkCheckpoint {
                    position: to,
                    event_id,
                    origin: self.origin.clone(),
                    pending: None,
                });
                Ok(())
            }
            Err(found) => Err(SinkError::CheckpointMoved {
                expected: from,
                found,
            }),
        }
    }

    /// One POST of `events` as the request (from, to].
    async fn post(&self, from: Position, to: Position, events: &[Event]) -> SinkResult<Answer> {
        self.post_as(&self.config.name, from, to, events).await
    }

    /// [`HttpSink::post`] with the idempotency key made from `key_name`.
    async fn post_as(
        &self,
        key_name: &str,
        from: Position,
        to: Position,
        events: &[Event],
    ) -> SinkResult<Answer> {
        let body = body(events);
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let key = idempotency_key(key_name, from, to);
        headers.insert(IDEMPOTENCY_HEADER, header_value(&key));
        let signature = sign(&self.config.secret, unix_now(), &body);
        headers.insert(SIGNATURE_HEADER, header_value(&signature));
        headers.insert("pgevents-consumer", header_value(&self.config.name));
        headers.insert("pgevents-position", header_value(&format!("{from}..{to}")));
        self.metrics.in_flight.increment(1.0);
        let sent = self
            .client
            .post(self.config.url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await;
        self.metrics.in_flight.decrement(1.0);
        let url = describe_url(&self.config.url);
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                self.metrics.outcome("retried");
                // Connection refused, reset, timed out: the receiver may be back soon. reqwest's
                // text would name the URL with its query string (often a token): drop it, ours
                // names the URL without credentials or query.
                let e = e.without_url();
                let what = if e.is_timeout() {
                    format!("POST to {url} timed out after {:?}", self.config.timeout)
                } else {
                    format!("POST to {url} failed: {}", error_chain(&e))
                };
                return Err(SinkError::failed(what, Decision::Soon, e));
            }
        };
        let status = response.status();
        if status.is_success() {
            self.metrics.outcome("delivered");
            return Ok(Answer::Delivered);
        }
        let retry_after = retry_after(response.headers());
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            // Shown like --http-url: without credentials or query.
            .map(|to| match self.config.url.join(to) {
                Ok(to) => describe_url(&to),
                Err(_) => "an unparseable location".to_string(),
            });
        let answer = first_bytes(response, ANSWER_BYTES).await;
        let message = format!(
            "the receiver at {url} answered {status}: {}",
            answer.trim().escape_debug()
        );
        match classify(status) {
            Class::Retry => {
                self.metrics.outcome("retried");
                Err(match retry_after {
                    Some(after) => SinkError::Throttled { message, after },
                    None => SinkError::Failed {
                        message,
                        decision: Decision::Soon,
                        source: None,
                    },
                })
            }
            Class::Misconfigured => {
                self.metrics.outcome("retried");
                let hint = match location {
                    Some(to) => format!(" (redirect to {to}: point --http-url at it)"),
                    None => " (check --http-url and the receiver's settings)".into(),
                };
                Err(SinkError::Failed {
                    message: format!("{message}{hint}"),
                    decision: Decision::Slowly,
                    source: None,
                })
            }
            Class::Refused => {
                self.metrics.outcome("refused");
                Ok(Answer::Refused { status, answer })
            }
        }
    }
}

impl HttpSink {
    /// Sends the events whose dead letters an operator asked to replay (`eventsctl dead-letters
    /// replay`), each alone, read anew from PostgreSQL: taken → the dead letter goes; refused →
    /// the new answer is recorded (and the request cleared); a retryable failure → next time.
    async fn replay_requested(&mut self) -> SinkResult<()> {
        let client = self.db().await?;
        for (letter, event) in replay::requested(&client, &self.config.name).await? {
            let position = letter.position;
            let Some(event) = event else {
                replay::not_taken(
                    &client,
                    &self.config.name,
                    &letter,
                    &letter.reason,
                    replay::PURGED,
                )
                .await?;
                continue;
            };
            let key_name = format!("{}/replay", self.config.name);
            match self
                .post_as(&key_name, replay::before(position), position, &[event])
                .await?
            {
                Answer::Delivered => replay::taken(&client, &self.config.name, position).await?,
                Answer::Refused { status, answer } => {
                    let detail = format!(
                        "replay refused: the receiver answered {status}: {}",
                        answer.trim().escape_debug()
                    );
                    replay::not_taken(
                        &client,
                        &self.config.name,
                        &letter,
                        "refused_by_receiver",
                        &detail,
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }
}

impl Sink for HttpSink {
    type Probe = HttpProbe;
    const KIND: &'static str = "http";

    async fn open(&mut self) -> SinkResult<Option<Checkpoint>> {
        let client = self.db().await?;
        let stored = sink_state::load(&**client, &self.config.name)
            .await
            .map_err(store_error)?;
        if self.origin.is_none() {
            self.origin = event_store::position::origin(&client)
                .await
                .map(Some)
                .map_err(store_error)?;
        }
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
        let mut written = Written::default();
        let events = &delivery.events;
        let mut from = delivery.start;
        let mut next = 0;
        // After a crash: the request that was in flight goes out again exactly as it was.
        if let Some(pending) = self
            .stored
            .as_ref()
            .filter(|s| s.position == delivery.start)
            .and_then(|s| s.pending)
            .filter(|p| *p > delivery.start && *p <= delivery.end)
        {
            let upto = events.partition_point(|e| e.position <= pending);
            self.send(delivery, 0..upto, from, pending, &mut written)
                .await?;
            from = pending;
            next = upto;
        }
        loop {
            let upto = (next + self.config.batch).min(events.len());
            let to = if upto == events.len() {
                delivery.end
            } else {
                events[upto - 1].position
            };
            if from == to {
                break;
            }
            self.send(delivery, next..upto, from, to, &mut written)
                .await?;
            from = to;
            next = upto;
        }
        Ok(written)
    }

    fn encoder(&self) -> Encoder {
        Delivery::plain
    }

    async fn housekeeping(&mut self) -> SinkResult<()> {
        if self.replays_checked.elapsed() < replay::CHECK_INTERVAL {
            return Ok(());
        }
        self.replays_checked = std::time::Instant::now();
        self.replay_requested().await
    }

    fn batch_rows(&self) -> Option<usize> {
        Some(self.config.batch)
    }

    fn probe(&self) -> HttpProbe {
        HttpProbe {
            url: self.config.url.clone(),
            timeout: self.config.timeout,
        }
    }

    fn describe(&self) -> String {
        format!("the webhook {}", describe_url(&self.config.url))
    }
}

enum Answer {
    Delivered,
    Refused { status: StatusCode, answer: String },
}

#[derive(Debug, PartialEq, Eq)]
enum Class {
    /// Worth retrying soon.
    Retry,
    /// Every request would get the same answer: an operator must act.
    Misconfigured,
    /// The receiver will not take (one of) these events.
    Refused,
}

fn classify(status: StatusCode) -> Class {
    match status.as_u16() {
        408 | 425 | 429 | 500..=599 => Class::Retry,
        300..=399 | 401 | 403 | 404 | 405 | 407 | 421 | 426 => Class::Misconfigured,
        400..=499 => Class::Refused,
        // 1xx cannot end a request; anything else is not HTTP we know.
        _ => Class::Retry,
    }
}

/// The request body: `{"events":[…]}`, each event in the shape every reader prints
/// (`Event::to_json`: the payload exactly as PostgreSQL stores it).
pub fn body(events: &[Event]) -> Vec<u8> {
    let size: usize = events
        .iter()
        .map(|e| 200 + e.payload.len() + e.headers.len())
        .sum();
    let mut out = Vec::with_capacity(size + 16);
    out.extend_from_slice(b"{\"events\":[");
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(event.to_json().as_bytes());
    }
    out.extend_from_slice(b"]}");
    out
}

/// The same for every attempt at the request (from, to] of consumer `name`: a hash, so it says
/// nothing about the stream and fits any receiver's key column.
pub fn idempotency_key(name: &str, from: Position, to: Position) -> String {
    let digest = Sha256::digest(format!("{name}\n{from}\n{to}").as_bytes());
    hex(&digest[..16])
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn sign(secret: &[u8], unix_seconds: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(unix_seconds.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={unix_seconds},v1={}", hex(&mac.finalize().into_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn header_value(text: &str) -> HeaderValue {
    // Our own ASCII (hex, digits, names checked by validate_name): always valid.
    HeaderValue::from_str(text).expect("an ASCII header value")
}

/// `Retry-After` as seconds or as an HTTP date, capped.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let after = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    };
    Some(after.min(RETRY_AFTER_CAP))
}

/// The first `max` bytes of the answer's body (a receiver's error page can be large).
async fn first_bytes(mut response: reqwest::Response, max: usize) -> String {
    let mut kept = Vec::new();
    while kept.len() < max {
        match response.chunk().await {
            Ok(Some(chunk)) => kept.extend_from_slice(&chunk[..chunk.len().min(max - kept.len())]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// The URL for logs: scheme, host, port and path; never user, password or query (where tokens
/// hide).
pub fn describe_url(url: &reqwest::Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or("?"));
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    shown
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A PostgreSQL failure of a sink that keeps its state there, with the store's decision.
pub(super) fn store_error(e: event_store::Error) -> SinkError {
    let decision = e.decision();
    SinkError::failed(e.to_string(), decision, e)
}

pub(super) fn row<'a>(letter: &'a DeadLetter) -> DeadLetterRow<'a> {
    DeadLetterRow {
        position: letter.position,
        event_id: letter.event_id,
        topic: letter.topic.as_deref(),
        key: letter.key.as_deref(),
        event_type: letter.event_type.as_deref(),
        payload: letter.payload.as_deref().unwrap_or(""),
        reason: letter.code,
        detail: &letter.detail,
    }
}

/// The TLS client settings: ring (the one crypto provider of the binaries), the public roots or
/// the named CA, and nothing weaker than rustls' defaults.
fn tls_config(ca: Option<&std::path::Path>) -> SinkResult<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            use rustls::pki_types::pem::PemObject;
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    SinkError::Config(format!(
                        "--http-tls-ca {}: cannot read PEM certificates: {e}",
                        path.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(SinkError::Config(format!(
                    "--http-tls-ca {}: no certificate in the file",
                    path.display()
                )));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    SinkError::Config(format!("--http-tls-ca {}: {e}", path.display()))
                })?;
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SinkError::Config(format!("TLS settings: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// `/healthz`: can the receiver's address be reached (a TCP connection; a webhook need not
/// answer anything but its POSTs).
#[derive(Clone)]
pub struct HttpProbe {
    url: reqwest::Url,
    timeout: Duration,
}

impl Probe for HttpProbe {
    async fn ping(&self) -> SinkResult<()> {
        let host = self.url.host_str().unwrap_or("").to_string();
        let port = self.url.port_or_known_default().unwrap_or(80);
        let connect = tokio::net::TcpStream::connect((host.as_str(), port));
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(SinkError::failed(
                format!("cannot connect to {host}:{port}: {e}"),
                Decision::Soon,
                e,
            )),
            Err(_) => Err(SinkError::Failed {
                message: format!("connecting to {host}:{port} timed out"),
                decision: Decision::Soon,
                source: None,
            }),
        }
    }
}

/// The sink's own series, labelled with the consumer and the sink.
#[derive(Clone)]
pub struct SinkMetrics {
    consumer: String,
    sink: &'static str,
    pub in_flight: metrics::Gauge,
}

impl SinkMetrics {
    pub fn new(consumer: &str, sink: &'static str) -> SinkMetrics {
        services::ops::metrics();
        metrics::describe_counter!(
            "consumer_sink_requests_total",
            metrics::Unit::Count,
            "Requests to the sink by outcome: delivered, retried, refused (an event became a \
             dead letter)."
        );
        metrics::describe_gauge!(
            "consumer_sink_in_flight",
            "Requests (or publishes) sent to the sink and not yet acknowledged."
        );
        SinkMetrics {
            consumer: consumer.to_string(),
            sink,
            in_flight: metrics::gauge!("consumer_sink_in_flight",
                "consumer" => consumer.to_string(), "sink" => sink),
        }
    }

    pub fn outcome(&self, outcome: &'static str) {
        metrics::counter!("consumer_sink_requests_total",
            "consumer" => self.consumer.clone(), "sink" => self.sink, "outcome" => outcome)
        .increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_documented_scheme() {
        // HMAC-SHA256("secret", "1700000000.{}"), as `openssl dgst -sha256 -hmac secret` prints.
        let signature = sign(b"secret", 1_700_000_000, b"{}");
        assert!(signature.starts_with("t=1700000000,v1="), "{signature}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
        mac.update(b"1700000000.{}");
        mac.verify_slice(
            &(0..32)
                .map(|i| u8::from_str_radix(&signature[16 + 2 * i..18 + 2 * i], 16).unwrap())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert_ne!(sign(b"other", 1_700_000_000, b"{}"), signature);
    }

    #[test]
    fn idempotency_keys_depend_on_the_request_only() {
        let a = Position::new(10, 1);
        let b = Position::new(12, 7);
        assert_eq!(idempotency_key("c", a, b), idempotency_key("c", a, b));
        assert_ne!(idempotency_key("c", a, b), idempotency_key("d", a, b));
        assert_ne!(
            idempotency_key("c", a, b),
            idempotency_key("c", Position::START, b)
        );
        assert_eq!(idempotency_key("c", a, b).len(), 32);
    }

    #[test]
    fn answers_are_classified() {
        assert_eq!(classify(StatusCode::TOO_MANY_REQUESTS), Class::Retry);
        assert_eq!(classify(StatusCode::BAD_GATEWAY), Class::Retry);
        assert_eq!(classify(StatusCode::REQUEST_TIMEOUT), Class::Retry);
        assert_eq!(classify(StatusCode::UNAUTHORIZED), Class::Misconfigured);
        assert_eq!(classify(StatusCode::NOT_FOUND), Class::Misconfigured);
        assert_eq!(
            classify(StatusCode::MOVED_PERMANENTLY),
            Class::Misconfigured
        );
        assert_eq!(classify(StatusCode::UNPROCESSABLE_ENTITY), Class::Refused);
        assert_eq!(classify(StatusCode::BAD_REQUEST), Class::Refused);
        assert_eq!(classify(StatusCode::PAYLOAD_TOO_LARGE), Class::Refused);
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("99999"));
        assert_eq!(retry_after(&headers), Some(RETRY_AFTER_CAP));
        let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&soon).unwrap());
        let after = retry_after(&headers).unwrap();
        assert!(
            after > Duration::from_secs(25) && after <= Duration::from_secs(30),
            "{after:?}"
        );
        headers.insert(RETRY_AFTER, HeaderValue::from_static("whenever"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn urls_are_shown_without_credentials_or_query() {
        let url = reqwest::Url::parse("https://user:pw@hooks.example:8443/in?token=abc").unwrap();
        assert_eq!(describe_url(&url), "https://hooks.example:8443/in");
    }
}
