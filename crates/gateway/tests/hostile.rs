//! Hostile clients: connections that never become requests, other sites' pages opening
//! WebSockets, DNS rebinding (a foreign `Host`), `*` and `null` origins, and what a reset tells a
//! client about topics it did not ask for.

mod common;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const TOKEN: &str = "hostile-token-0123456789";

fn tokens_file() -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "{TOKEN} courses").unwrap();
    file
}

/// A TCP connection to `addr` from the loopback address `from` (all of 127/8 is this machine).
async fn connect_from(from: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

/// Whether the server closed `stream` (EOF or reset) within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // e.g. a 408 answer before the close
        }
    }
}

/// One request on a fresh connection, written by hand (so `Host` is exactly what we say); the
/// status code and the whole answer.
async fn raw_get(addr: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {answer:?}"));
    (status, answer)
}

/// 500 connections that never send a whole request (half of them idle, half stopped in the middle
/// of a header), from one address past its cap and from the stream's own address below it, leave
/// a new authenticated stream and /healthz answered within a second; the header-read timeout then
/// closes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_leave_new_streams_served_and_are_closed() {
    let env = setup().await;
    let tokens = tokens_file();
    let mut config = env.config();
    config.open = false;
    config.tokens_file = Some(tokens.path().to_path_buf());
    config.header_read_timeout = Duration::from_secs(3);
    let gw = start(config).await;
    let addr = gw.addr;
    let attacker: IpAddr = "127.0.0.2".parse().unwrap();
    let neighbour: IpAddr = "127.0.0.1".parse().unwrap();

    let flood_started = Instant::now();
    let mut held = Vec::new();
    for i in 0..500 {
        // 300 from an attacker's address (its last 44 are past the per-address cap of 256), 200
        // from the address the real client shares.
        let from = if i < 300 { attacker } else { neighbour };
        let mut stream = connect_from(from, addr).await.expect("connect");
        if i % 2 == 1 {
            stream
                .write_all(b"GET /v1/topics/courses/events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ")
                .await
                .unwrap();
        }
        held.push(stream);
    }

    let started = Instant::now();
    let (status, _) = tokio::time::timeout(Duration::from_secs(1), get(addr, "/healthz", &[]))
        .await
        .expect("/healthz answers within a second")
        .unwrap();
    assert_eq!(status, 200);
    let bearer = format!("Bearer {TOKEN}");
    let mut sse = tokio::time::timeout(
        Duration::from_secs(1),
        Sse::open(
            addr,
            "/v1/topics/courses/events",
            &[("authorization", &bearer)],
        ),
    )
    .await
    .expect("a new authenticated stream is answered within a second");
    assert_eq!(sse.status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    produce(&env.admin, "courses", 1, 1).await;
    let live = sse.events(1).await;
    assert_eq!(event_ids(&live), env.positions(""));

    // Past the per-address cap a connection is closed at once; the rest once the header-read
    // timeout passes. The stream that was answered stays open.
    let mut closed_at_once = 0;
    for stream in held.iter_mut().take(300).skip(256) {
        if closed_within(stream, Duration::from_millis(200)).await {
            closed_at_once += 1;
        }
    }
    assert_eq!(closed_at_once, 44, "connections past the per-address cap");
    for (i, stream) in held.iter_mut().enumerate() {
        assert!(
            closed_within(stream, PATIENCE).await,
            "connection {i} is still open"
        );
    }
    assert!(
        flood_started.elapsed() >= Duration::from_millis(2900),
        "not closed before the timeout"
    );
    produce(&env.admin, "courses", 1, 1).await;
    let live = sse.events(1).await;
    assert_eq!(event_ids(&live), env.positions("")[1..].to_vec());
    gw.stop().await;
}

/// A keep-alive connection that sends nothing after its answer is closed after the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_timeout() {
    let env = setup().await;
    let mut config = env.config();
    config.header_read_timeout = Duration::from_secs(2);
    let gw = start(config).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", gw.addr).as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let idle = Instant::now();
    assert!(
        !closed_within(&mut stream, Duration::from_millis(1000)).await,
        "kept alive for a while"
    );
    assert!(closed_within(&mut stream, PATIENCE).await, "then closed");
    let waited = idle.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(20),
        "{waited:?}"
    );
    gw.stop().await;
}

/// DNS rebinding: a page of `evil.example` whose name now resolves to 127.0.0.1 sends
/// `Host: evil.example`. A loopback (or `--open`) gateway answers only loopback names and the
/// configured ones; `/healthz` answers any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_host_gets_403_so_dns_rebinding_cannot_reach_a_loopback_gateway() {
    let env = setup().await;
    let gw = start(env.config()).await;
    let addr = gw.addr;
    let port = addr.port();
    for path in ["/", "/v1/topics/courses/events?from=earliest", "/metrics"] {
        let (status, answer) = raw_get(addr, path, &format!("Host: evil.example:{port}\r\n")).await;
        assert_eq!(status, 403, "{path}: {answer}");
        assert!(answer.contains("--allowed-hosts"), "{answer}");
    }
    let (status, _) = raw_get(
        addr,
        "/v1/topics/courses/ws",
        &format!(
            "Host: evil.example:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        ),
    )
    .await;
    assert_eq!(status, 403, "WebSocket handshakes too");
    let (status, _) = raw_get(addr, "/healthz", &format!("Host: evil.example:{port}\r\n")).await;
    assert_eq!(status, 200, "/healthz is exempt");
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "LOCALHOST".to_string(),
    ] {
        let (status, answer) = raw_get(addr, "/", &format!("Host: {host}\r\n")).await;
        assert_eq!(status, 200, "{host}: {answer}");
    }
    gw.stop().await;

    // Configured names replace the defaults; `*` answers any.
    let mut config = env.config();
    config.allowed_hosts = vec!["events.example.com".into()];
    let gw = start(config).await;
    let (status, _) = raw_get(gw.addr, "/", "Host: events.example.com\r\n").await;
    assert_eq!(status, 200);
    let (status, _) = raw_get(gw.addr, "/", "Host: localhost\r\n").await;
    assert_eq!(status, 403);
    gw.stop().await;
    let mut config = env.config();
    config.allowed_hosts = vec!["*".into()];
    let gw = start(config).await;
    let (status, _) = raw_get(gw.addr, "/", "Host: evil.example\r\n").await;
    assert_eq!(status, 200);
    gw.stop().await;
}

/// The handshake's status: 101 when upgraded, else the refusal's.
async fn ws_status(addr: SocketAddr, origin: Option<&str>) -> u16 {
    let mut request = format!("ws://{addr}/v1/topics/courses/ws?from=earliest")
        .into_client_request()
        .unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// CORS does not cover WebSockets: the gateway checks `Origin` on the handshake itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_handshakes_from_other_origins_get_403_even_when_open() {
    let env = setup().await;
    produce(&env.admin, "courses", 2, 1).await;
    // `env.config()` is `gateway --open`, as compose runs it.
    let gw = start(env.config()).await;
    let addr = gw.addr;
    assert!(env.config().open);
    assert_eq!(ws_status(addr, Some("https://evil.example")).await, 403);
    assert_eq!(ws_status(addr, Some("null")).await, 403);
    assert_eq!(
        ws_status(addr, Some(&format!("http://localhost:{}", addr.port()))).await,
        403,
        "another origin, though the same machine"
    );
    assert_eq!(ws_status(addr, Some(&format!("http://{addr}"))).await, 101);
    assert_eq!(ws_status(addr, None).await, 101, "not a browser");
    gw.stop().await;

    let mut config = env.config();
    config.allowed_origins = vec!["https://app.example".into()];
    let gw = start(config).await;
    assert_eq!(ws_status(gw.addr, Some("https://app.example")).await, 101);
    assert_eq!(ws_status(gw.addr, Some("https://evil.example")).await, 403);
    gw.stop().await;

    let mut config = env.config();
    config.allowed_origins = vec!["*".into()];
    let gw = start(config).await;
    assert_eq!(ws_status(gw.addr, Some("https://evil.example")).await, 101);
    assert_eq!(ws_status(gw.addr, Some("null")).await, 403, "never null");
    gw.stop().await;
}

/// `--allowed-origins '*'`: `Access-Control-Allow-Origin: *` without credentials, and never for
/// `null`; a listed origin is echoed with credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn star_allows_any_origin_without_credentials_and_never_null() {
    let env = setup().await;
    let tokens = tokens_file();
    let mut config = env.config();
    config.open = false;
    config.tokens_file = Some(tokens.path().to_path_buf());
    config.allowed_origins = vec!["*".into(), "https://app.example".into()];
    let gw = start(config).await;
    let addr = gw.addr;
    // A refused stream (no token) still carries the CORS answer: the page may read the refusal.
    let path = "/v1/topics/courses/events";
    let (status, headers, _) = get_full(addr, path, &[("origin", "https://evil.example")])
        .await
        .unwrap();
    assert_eq!(status, 401);
    assert_eq!(headers["access-control-allow-origin"], "*");
    assert!(headers.get("access-control-allow-credentials").is_none());
    let (_, headers, _) = get_full(addr, path, &[("origin", "null")]).await.unwrap();
    assert!(headers.get("access-control-allow-origin").is_none());
    assert!(headers.get("access-control-allow-credentials").is_none());
    let (_, headers, _) = get_full(addr, path, &[("origin", "https://app.example")])
        .await
        .unwrap();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(headers["access-control-allow-credentials"], "true");
    // The preflight answers the same way.
    let (status, answer) = raw_options(addr, path, "null").await;
    assert_eq!(status, 204);
    assert!(
        !answer
            .to_ascii_lowercase()
            .contains("access-control-allow-origin"),
        "{answer}"
    );
    let (_, answer) = raw_options(addr, path, "https://evil.example").await;
    let answer = answer.to_ascii_lowercase();
    assert!(
        answer.contains("access-control-allow-origin: *"),
        "{answer}"
    );
    assert!(
        !answer.contains("access-control-allow-credentials"),
        "{answer}"
    );
    gw.stop().await;
}

async fn raw_options(addr: SocketAddr, path: &str, origin: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "OPTIONS {path} HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}\r\n\
         Access-Control-Request-Method: GET\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.split(' ').nth(1).unwrap().parse().unwrap();
    (status, answer)
}

/// A reset names the newest position of the topics asked for, not the head of every topic (which
/// would tell a client how busy topics it cannot read are).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_names_the_newest_position_of_the_requested_topics_only() {
    let env = setup().await;
    produce(&env.admin, "courses", 3, 1).await;
    produce(&env.admin, "secrets", 5, 1).await;
    let tokens = tokens_file();
    let mut config = env.config();
    config.open = false;
    config.tokens_file = Some(tokens.path().to_path_buf());
    let gw = start(config).await;
    let bearer = format!("Bearer {TOKEN}");
    for last_event_id in ["not-a-position", "999999999999/1"] {
        produce(&env.admin, "secrets", 2, 1).await;
        let courses = env.positions("WHERE topic = 'courses'");
        let everything = env.positions("");
        assert_ne!(courses.last(), everything.last());
        let mut sse = Sse::open(
            gw.addr,
            "/v1/topics/courses/events",
            &[("authorization", &bearer), ("last-event-id", last_event_id)],
        )
        .await;
        assert_eq!(sse.status, 200);
        let reset = sse.expect().await;
        assert_eq!(reset.event, "reset", "{reset:?}");
        assert_eq!(
            reset.id.as_deref(),
            courses.last().map(String::as_str),
            "{last_event_id}: the newest courses event, not the newest of all"
        );
        assert!(
            !reset.data.contains(everything.last().unwrap()),
            "{reset:?}"
        );
        // And the stream goes on from now: the next courses event, nothing older.
        produce(&env.admin, "courses", 1, 1).await;
        let live = sse.events(1).await;
        assert_eq!(
            event_ids(&live),
            vec![env.positions("WHERE topic = 'courses'").pop().unwrap()]
        );
    }
    // A topic with no events yet: the start, which tells nothing.
    let mut open = env.config();
    open.allowed_origins = vec![];
    let gw2 = start(open).await;
    let mut sse = Sse::open(
        gw2.addr,
        "/v1/topics/empty/events",
        &[("last-event-id", "garbage")],
    )
    .await;
    let reset = sse.expect().await;
    assert_eq!(reset.id.as_deref(), Some("0/0"), "{reset:?}");
    gw2.stop().await;
    gw.stop().await;
}
