//! Test support: a real PostgreSQL with a read-only gateway login, the gateway run in-process on a
//! real port, and real HTTP clients (hyper for SSE, tokio-tungstenite for WebSocket). Expected
//! results come from psql, never from the gateway's own code.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use event_store::migrations::Role;
#[allow(unused_imports)] // not every test file connects
pub use event_store::testing::connect;
use event_store::testing::TestDatabase;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use testbed::Postgres;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// The login the gateway runs as: only what `events_consumer` grants, and it writes nothing.
pub const GATEWAY_USER: &str = "live_gateway";

/// Generous: the tests run on a loaded 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct Env {
    pub pg: Postgres,
    pub admin: Client,
}

pub fn init_logging() {
    let _ = services::telemetry::init(
        &std::env::var("TEST_LOG").unwrap_or_else(|_| "info,gateway=debug".into()),
    );
}

/// Migrated PostgreSQL with the gateway's login.
pub async fn setup() -> Env {
    init_logging();
    let TestDatabase { pg, admin } = TestDatabase::start(&[(GATEWAY_USER, Role::Gateway)]).await;
    Env { pg, admin }
}

impl Env {
    /// Defaults (`--open`), this database, port 0 (any free one).
    pub fn config(&self) -> gateway::Config {
        let mut config = gateway::Config::new(self.pg.url_for(GATEWAY_USER, None));
        config.http_addr = "127.0.0.1:0".parse().unwrap();
        config.shutdown_grace = Duration::from_secs(10);
        config
    }

    /// Every stored event's position `tx/id`, in position order, per psql. `filter`: a WHERE clause
    /// or empty.
    pub fn positions(&self, filter: &str) -> Vec<String> {
        self.pg
            .psql(&format!(
                "SELECT tx_id::text || '/' || id FROM events e {filter} ORDER BY e.tx_id, e.id"
            ))
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }
}

/// Inserts `n` events of `topic` in one transaction (keys `k1`..`kn` cycling over `keys`), then
/// sends a wake-up.
pub async fn produce(client: &Client, topic: &str, n: i64, keys: i64) {
    client
        .execute(
            "INSERT INTO events (topic, key, type, payload)
             SELECT $1, 'k' || (1 + (g - 1) % $3::bigint), 'created', jsonb_build_object('n', g)
               FROM generate_series(1, $2::bigint) AS g",
            &[&topic, &n, &keys.max(1)],
        )
        .await
        .expect("insert events");
    client
        .execute("SELECT pg_notify('events', '')", &[])
        .await
        .expect("notify");
}

/// A gateway running in-process.
pub struct Gateway {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<anyhow::Result<()>>,
}

pub async fn start(config: gateway::Config) -> Gateway {
    let bound = gateway::bind(config).await.expect("bind the gateway");
    let addr = bound.local_addr();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(bound.run(shutdown.clone()));
    // Serving starts once the live reader is connected; /healthz says so.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(Ok((status, _))) =
            tokio::time::timeout(Duration::from_secs(5), get(addr, "/healthz", &[])).await
        {
            if status == StatusCode::OK {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway did not become healthy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Gateway {
        addr,
        shutdown,
        handle,
    }
}

impl Gateway {
    /// SIGTERM's equivalent; the gateway must stop cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.handle)
            .await
            .expect("the gateway stops in time")
            .expect("no panic")
            .expect("the gateway stops without an error");
    }
}

async fn request(
    stream: TcpStream,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> hyper::Result<hyper::Response<Incoming>> {
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = Request::get(path).header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    sender
        .send_request(request.body(Empty::<Bytes>::new()).unwrap())
        .await
}

/// A plain GET: status and body text.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(StatusCode, String)> {
    let (status, _, body) = get_full(addr, path, headers).await?;
    Ok((status, body))
}

pub async fn get_full(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(StatusCode, hyper::HeaderMap, String)> {
    let stream = TcpStream::connect(addr).await?;
    let response = request(stream, addr, path, headers)
        .await
        .map_err(std::io::Error::other)?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// One SSE message (comments and the `retry:` preamble are skipped).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl Message {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).expect("data is JSON")
    }
    pub fn is_event(&self) -> bool {
        !matches!(self.event.as_str(), "gap" | "goodbye" | "reset")
    }
}

/// An SSE stream read over a real HTTP/1.1 connection.
pub struct Sse {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    body: Incoming,
    buffer: String,
    pub heartbeats: usize,
}

impl Sse {
    pub async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Sse::open_on(stream, addr, path, headers).await
    }

    /// Over a socket with a tiny receive buffer: a client that reads slowly fills up fast.
    pub async fn open_small_buffer(addr: SocketAddr, path: &str) -> Sse {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.expect("connect");
        Sse::open_on(stream, addr, path, &[]).await
    }

    async fn open_on(
        stream: TcpStream,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Sse {
        let response = tokio::time::timeout(PATIENCE, request(stream, addr, path, headers))
            .await
            .expect("response headers in time")
            .expect("HTTP request");
        let (parts, body) = response.into_parts();
        Sse {
            status: parts.status,
            headers: parts.headers,
            body,
            buffer: String::new(),
            heartbeats: 0,
        }
    }

    /// The next message; `None` when the stream ends.
    pub async fn next(&mut self) -> Option<Message> {
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut message = Message {
                    id: None,
                    event: "message".into(),
                    data: String::new(),
                };
                let mut has_data = false;
                for line in block.lines() {
                    if line == ": heartbeat" {
                        self.heartbeats += 1;
                    }
                    if let Some(v) = line.strip_prefix("id: ") {
                        message.id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        message.event = v.to_string();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        has_data = true;
                        message.data.push_str(v);
                    }
                }
                if has_data {
                    return Some(message);
                }
            }
            let frame = self.body.frame().await?.ok()?;
            if let Ok(data) = frame.into_data() {
                self.buffer
                    .push_str(std::str::from_utf8(&data).expect("UTF-8"));
            }
        }
    }

    /// The next message, failing the test if none comes in time.
    pub async fn expect(&mut self) -> Message {
        tokio::time::timeout(PATIENCE, self.next())
            .await
            .expect("a message in time")
            .expect("the stream is still open")
    }

    /// Reads until `n` events (not control messages) arrived; returns every message read.
    pub async fn events(&mut self, n: usize) -> Vec<Message> {
        let mut messages = Vec::new();
        let mut events = 0;
        while events < n {
            let message = self.expect().await;
            if message.is_event() {
                events += 1;
            }
            messages.push(message);
        }
        messages
    }

    /// Reads to the end of the stream (within the test's patience).
    pub async fn rest(&mut self) -> Vec<Message> {
        let mut messages = Vec::new();
        tokio::time::timeout(PATIENCE, async {
            while let Some(message) = self.next().await {
                messages.push(message);
            }
        })
        .await
        .expect("the stream ends in time");
        messages
    }
}

/// The positions of the event messages among `messages`.
pub fn event_ids(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m.is_event())
        .map(|m| m.id.clone().expect("events carry an id"))
        .collect()
}

/// The Prometheus value of a series (name with labels as rendered), 0 when absent.
pub async fn metric(addr: SocketAddr, series: &str) -> f64 {
    let (_, text) = get(addr, "/metrics", &[]).await.expect("GET /metrics");
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}
