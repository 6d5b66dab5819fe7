//! The HTTP side: routes, who may open a stream, where it starts, CORS, request logs, and the
//! two transports (SSE and WebSocket) over a session's queue.
//!
//! Every request but `/healthz` first passes the `Host` check (403 for a host not in
//! `--allowed-hosts`, so a DNS-rebinding page cannot talk to a loopback gateway). A WebSocket
//! handshake then passes the `Origin` check (403 for a page of another origin that
//! `--allowed-origins` does not list; browsers send `Origin` on every handshake and CORS does not
//! apply to WebSockets, so this is what keeps other sites' pages out).
//!
//! Order of checks for a stream: topic names (400) → token (401) → topics granted (403) → start
//! position (`?from=` that is not `earliest|latest|TX/ID` is 400; a malformed `Last-Event-ID` is
//! not refused, see [`Start::Malformed`]) → shutting down or caps (503 with `Retry-After`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::{Bytes, BytesMut};
use event_store::event::Topic;
use event_store::Position;
use futures_util::stream;
use services::ops::{self, Health};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use crate::auth::{self, Denied, Tokens};
use crate::config::host_name;
use crate::connections::Held;
use crate::limits::{Full, Limits, Slot};
use crate::session::{self, Shared, Start, Subscription};
use crate::wire::{self, Frame};

/// The demo page: plain HTML and JavaScript, no build step.
const DEMO_PAGE: &str = include_str!("../static/index.html");

/// Frames queued for an SSE client are sent together up to this many bytes.
const SSE_CHUNK: usize = 64 * 1024;

/// What the handlers share.
pub struct App {
    pub shared: Arc<Shared>,
    pub tokens: Tokens,
    pub limits: Arc<Limits>,
    pub allowed_origins: Vec<String>,
    /// `None`: any host.
    pub allowed_hosts: Option<Vec<String>>,
    pub client_buffer: usize,
    pub tasks: TaskTracker,
}

pub fn router(app: Arc<App>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(DEMO_PAGE) }))
        // OPTIONS is the CORS preflight, answered by the `cors` layer.
        .route(
            "/v1/topics/{topic}/events",
            get(topic_sse).options(preflight),
        )
        .route("/v1/topics/{topic}/ws", get(topic_ws).options(preflight))
        .route("/v1/events", get(multi_sse).options(preflight))
        .route_layer(middleware::from_fn_with_state(app.clone(), cors))
        .with_state(app.clone())
        .merge(ops::router(health))
        .layer(middleware::from_fn_with_state(app, check_host))
        .layer(middleware::from_fn(log_request))
}

async fn preflight() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// The query parameters a stream understands (repeated `topic` allowed).
#[derive(Debug, Default)]
struct Params {
    topics: Vec<String>,
    key: Option<String>,
    from: Option<String>,
    access_token: Option<String>,
    typed: bool,
}

impl Params {
    fn parse(pairs: Vec<(String, String)>) -> Params {
        let mut params = Params {
            typed: true,
            ..Params::default()
        };
        for (name, value) in pairs {
            match name.as_str() {
                "topic" => params.topics.push(value),
                "key" => params.key = Some(value),
                "from" => params.from = Some(value),
                "access_token" => params.access_token = Some(value),
                "typed" => params.typed = !matches!(value.as_str(), "false" | "0" | "no"),
                _ => {}
            }
        }
        params
    }
}

async fn topic_sse(
    State(app): State<Arc<App>>,
    Path(topic): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let mut params = Params::parse(pairs);
    params.topics = vec![topic];
    sse(app, params, headers)
}

async fn multi_sse(
    State(app): State<Arc<App>>,
    Query(pairs): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    sse(app, Params::parse(pairs), headers)
}

fn sse(app: Arc<App>, params: Params, headers: HeaderMap) -> Response {
    let (sub, slot) = match admit(&app, params, &headers) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal,
    };
    let typed = sub.typed;
    let rx = app.open(sub, slot);
    let metrics = app.shared.metrics.clone();
    let preamble =
        stream::once(async { Ok::<Bytes, std::convert::Infallible>(wire::sse_preamble()) });
    // Whatever is queued when the connection is ready goes out as one chunk (one write instead of
    // one per event): a client catching up, or a burst, costs a few syscalls per batch.
    let frames = stream::unfold((rx, metrics), move |(mut rx, metrics)| async move {
        let first = rx.recv().await?;
        let mut chunk = BytesMut::new();
        let mut frame = Some(first);
        while let Some(next) = frame.take() {
            match next {
                Frame::Event(event) => {
                    metrics.sent(event.created_at);
                    chunk.extend_from_slice(&event.sse(typed));
                }
                Frame::Stored(event) => {
                    metrics.sent_stored();
                    chunk.extend_from_slice(&event.sse(typed));
                }
                Frame::Control(control) => chunk.extend_from_slice(&control.sse()),
                Frame::Heartbeat => chunk.extend_from_slice(wire::SSE_HEARTBEAT),
            }
            if chunk.len() < SSE_CHUNK {
                frame = rx.try_recv().ok();
            }
        }
        Some((Ok(chunk.freeze()), (rx, metrics)))
    });
    let body = Body::from_stream(futures_util::StreamExt::chain(preamble, frames));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache, no-transform"),
            // nginx and friends: do not buffer a stream.
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        body,
    )
        .into_response()
}

async fn topic_ws(
    State(app): State<Arc<App>>,
    Path(topic): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
    request: Request,
) -> Response {
    let (mut parts, _) = request.into_parts();
    if !ws_origin_allowed(&app.allowed_origins, &parts.headers) {
        app.shared.metrics.refused(false);
        return plain(
            StatusCode::FORBIDDEN,
            "this page's origin may not open the stream: add it to --allowed-origins \
             (GATEWAY_ALLOWED_ORIGINS)"
                .into(),
        );
    }
    // The connection's place (see `connections`): an upgraded socket keeps it while it lives.
    let place = parts.extensions.get::<Held>().cloned();
    let mut params = Params::parse(pairs);
    params.topics = vec![topic];
    let (sub, slot) = match admit(&app, params, &parts.headers) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal,
    };
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &app).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let tasks = app.tasks.clone();
    upgrade.on_upgrade(move |socket| {
        let rx = app.open(sub, slot);
        let metrics = app.shared.metrics.clone();
        tasks.track_future(async move {
            ws_forward(socket, rx, metrics).await;
            drop(place);
        })
    })
}

/// Drains a session's queue into a WebSocket: one text message per event (the same JSON object as
/// SSE's `data:`), control messages as objects with a `control` field, heartbeats as pings.
async fn ws_forward(
    mut socket: WebSocket,
    mut rx: mpsc::Receiver<Frame>,
    metrics: crate::metrics::Metrics,
) {
    loop {
        tokio::select! {
            frame = rx.recv() => {
                let message = match frame {
                    Some(Frame::Stored(event)) => {
                        metrics.sent_stored();
                        Message::Text(event.json().into())
                    }
                    Some(Frame::Event(event)) => {
                        metrics.sent(event.created_at);
                        Message::Text(event.json().into())
                    }
                    Some(Frame::Control(control)) => Message::Text(control.ws_json().into()),
                    Some(Frame::Heartbeat) => Message::Ping(Bytes::from_static(b"hb")),
                    None => {
                        let _ = socket.send(Message::Close(None)).await;
                        return;
                    }
                };
                if socket.send(message).await.is_err() {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                // Clients have nothing to say; pings are answered by the library.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    }
}

impl App {
    /// Starts a session for an admitted stream; the receiver is its queue.
    fn open(self: &Arc<App>, sub: Subscription, slot: Slot) -> mpsc::Receiver<Frame> {
        let (tx, rx) = mpsc::channel(self.client_buffer);
        self.tasks
            .spawn(session::run(self.shared.clone(), sub, tx, slot));
        rx
    }
}

/// Every check before a stream opens; the refusal is a complete response.
// The error is the response to send, built once per refused request: its size costs nothing.
#[allow(clippy::result_large_err)]
fn admit(app: &App, params: Params, headers: &HeaderMap) -> Result<(Subscription, Slot), Response> {
    for topic in &params.topics {
        if let Err(e) = Topic::new(topic.as_str()) {
            return Err(plain(StatusCode::BAD_REQUEST, format!("{e}")));
        }
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    let token = auth::token_from(authorization, params.access_token.as_deref());
    let principal = match app.tokens.authorize(token, &params.topics) {
        Ok(principal) => principal,
        Err(Denied::Unauthenticated) => {
            app.shared.metrics.refused(false);
            let mut response = plain(
                StatusCode::UNAUTHORIZED,
                "a valid access token is required: send `Authorization: Bearer TOKEN` or \
                 `?access_token=TOKEN`"
                    .into(),
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"pgevents\""),
            );
            return Err(response);
        }
        Err(Denied::Forbidden { topic }) => {
            app.shared.metrics.refused(false);
            let what = if topic == "*" {
                "every topic (name the topics with ?topic=)".to_string()
            } else {
                format!("topic {topic:?}")
            };
            return Err(plain(
                StatusCode::FORBIDDEN,
                format!("this token does not grant {what}"),
            ));
        }
    };
    let start = match headers.get("last-event-id") {
        Some(value) => match value.to_str().ok().map(Position::parse) {
            Some(Ok(position)) => Start::After(position),
            Some(Err(e)) => Start::Malformed(format!("Last-Event-ID {e}")),
            None => Start::Malformed("Last-Event-ID is not text".into()),
        },
        None => match params.from.as_deref() {
            None | Some("latest") => Start::Latest,
            Some("earliest") => Start::Earliest,
            Some(text) => match Position::parse(text) {
                Ok(position) => Start::After(position),
                Err(e) => {
                    return Err(plain(
                        StatusCode::BAD_REQUEST,
                        format!("from: {e}, or earliest or latest"),
                    ))
                }
            },
        },
    };
    if app.shared.shutdown.is_cancelled() {
        return Err(unavailable("the gateway is shutting down".into()));
    }
    let per_token = match app.tokens {
        Tokens::Open => None,
        Tokens::File(_) => Some(principal.label.as_str()),
    };
    let slot = match app.limits.admit(per_token) {
        Ok(slot) => slot,
        Err(full) => {
            app.shared.metrics.refused(true);
            let what = match full {
                Full::Total => "the gateway has --max-clients streams open",
                Full::Token => "this token has --max-clients-per-token streams open",
            };
            return Err(unavailable(format!("{what}; try again later")));
        }
    };
    let topics = (!params.topics.is_empty()).then_some(params.topics);
    Ok((
        Subscription {
            topics,
            key: params.key,
            start,
            typed: params.typed,
        },
        slot,
    ))
}

fn plain(status: StatusCode, message: String) -> Response {
    (status, message + "\n").into_response()
}

/// 503 with a jittered `Retry-After`, so refused clients do not all return at once.
fn unavailable(message: String) -> Response {
    let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, message);
    let seconds = rand::random_range(5..15u32);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// What CORS answers a request's `Origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CorsAnswer {
    /// A listed origin: echoed, with credentials.
    Origin(String),
    /// `--allowed-origins '*'`: any page may read, without credentials.
    Any,
}

/// The CORS answer for `origin`. `null` (sandboxed frames, `file:` pages, some redirects) is
/// never allowed, not even by `*`: any page can make its requests come from `null`.
fn cors_answer(allowed: &[String], origin: Option<&str>) -> Option<CorsAnswer> {
    let origin = origin.filter(|o| !o.eq_ignore_ascii_case("null"))?;
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
        return Some(CorsAnswer::Origin(origin.to_string()));
    }
    allowed.iter().any(|a| a == "*").then_some(CorsAnswer::Any)
}

/// Whether a WebSocket handshake may go on: no `Origin` (not a browser), the same origin as the
/// `Host` it was sent to, or an origin `--allowed-origins` lists (`*`: any but `null`).
fn ws_origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if cors_answer(allowed, Some(origin)).is_some() {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (origin.split_once("://"), host) {
        (Some((scheme, authority)), Some(host)) => {
            matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https")
                && authority.eq_ignore_ascii_case(host)
        }
        _ => false,
    }
}

/// CORS for the stream routes: an allowed `Origin` is echoed back (with credentials and
/// `Vary: Origin`), any origin but `null` gets `*` (without credentials) when `*` is allowed, and a
/// preflight from one is answered here. Other origins get no CORS headers, so browsers keep their
/// pages from reading the stream.
async fn cors(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok());
    let answer = cors_answer(&app.allowed_origins, origin);
    if request.method() == Method::OPTIONS {
        let mut response = StatusCode::NO_CONTENT.into_response();
        if let Some(answer) = &answer {
            add_cors(response.headers_mut(), answer);
            let h = response.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, last-event-id, cache-control"),
            );
            h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(600));
        }
        return response;
    }
    let mut response = next.run(request).await;
    if let Some(answer) = &answer {
        add_cors(response.headers_mut(), answer);
    }
    response
}

fn add_cors(headers: &mut HeaderMap, answer: &CorsAnswer) {
    match answer {
        CorsAnswer::Any => {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        }
        CorsAnswer::Origin(origin) => {
            if let Ok(value) = HeaderValue::from_str(origin) {
                headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
                headers.insert(
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
                headers.append(header::VARY, HeaderValue::from_static("origin"));
            }
        }
    }
}

/// The `Host` check (see `--allowed-hosts`): a request naming another host gets 403. `/healthz`
/// is exempt, so probes that address the gateway by IP or service name keep working.
async fn check_host(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if let Some(allowed) = &app.allowed_hosts {
        let host = request
            .headers()
            .get(header::HOST)
            .map(|h| h.to_str().map(host_name).unwrap_or_default())
            .or_else(|| request.uri().authority().map(|a| host_name(a.as_str())));
        if let Some(host) = host {
            if request.uri().path() != "/healthz" && !allowed.contains(&host) {
                return plain(
                    StatusCode::FORBIDDEN,
                    format!(
                        "host {host:?} is not served here: add it to --allowed-hosts \
                         (GATEWAY_ALLOWED_HOSTS)"
                    ),
                );
            }
        }
    }
    next.run(request).await
}

/// One log line per request, with `access_token` redacted from the query.
async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().map(auth::redact_query);
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let query = query.unwrap_or_default();
    if path == "/healthz" || path == "/metrics" {
        debug!(%method, %path, %query, status, "Request.");
    } else {
        info!(%method, %path, %query, status, "Request.");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn star_answers_star_without_credentials_and_null_is_never_allowed() {
        let star = vec!["*".to_string()];
        assert_eq!(
            cors_answer(&star, Some("https://evil.example")),
            Some(CorsAnswer::Any)
        );
        assert_eq!(cors_answer(&star, Some("null")), None);
        let listed = vec!["https://app.example".to_string(), "*".to_string()];
        assert_eq!(
            cors_answer(&listed, Some("https://APP.example")),
            Some(CorsAnswer::Origin("https://APP.example".into()))
        );
        assert_eq!(cors_answer(&[], Some("https://app.example")), None);
        assert_eq!(cors_answer(&star, None), None);
    }

    #[test]
    fn websocket_handshakes_need_the_same_origin_or_a_listed_one() {
        let none: Vec<String> = Vec::new();
        assert!(ws_origin_allowed(
            &none,
            &headers(&[("host", "127.0.0.1:8084")])
        ));
        assert!(ws_origin_allowed(
            &none,
            &headers(&[
                ("host", "127.0.0.1:8084"),
                ("origin", "http://127.0.0.1:8084")
            ])
        ));
        assert!(!ws_origin_allowed(
            &none,
            &headers(&[
                ("host", "127.0.0.1:8084"),
                ("origin", "https://evil.example")
            ])
        ));
        assert!(!ws_origin_allowed(
            &none,
            &headers(&[("host", "127.0.0.1:8084"), ("origin", "null")])
        ));
        let listed = vec!["https://app.example".to_string()];
        assert!(ws_origin_allowed(
            &listed,
            &headers(&[
                ("host", "events.example"),
                ("origin", "https://app.example")
            ])
        ));
        let star = vec!["*".to_string()];
        assert!(!ws_origin_allowed(
            &star,
            &headers(&[("host", "events.example"), ("origin", "null")])
        ));
    }
}
