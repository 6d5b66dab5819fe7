//! The demo page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`,
//! which scripts/test installs), driven over the WebDriver protocol by `chromedriver`. The page
//! receives events, the gateway restarts while events keep committing, and the page resumes by
//! itself: the positions it received are exactly the stored ones, in order, once each.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const TOKEN: &str = "browser-token-0123456789";

/// A chromedriver process and one browser session, ended on drop.
struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        for path in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(path).exists(),
                "{path} is missing: apt-get install -y chromium chromium-driver (scripts/test does)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let profile = tempfile::Builder::new()
            .prefix("gateway-browser-")
            .tempdir()
            .unwrap();
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
            &format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let created = browser
            .call(
                "POST",
                "/session",
                json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
                }}}),
            )
            .await;
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        browser
    }

    /// One WebDriver command; the answer's `value`.
    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .body(Full::new(if body.is_null() {
                Bytes::new()
            } else {
                Bytes::from(body.to_string())
            }))
            .unwrap();
        let response = tokio::time::timeout(PATIENCE, sender.send_request(request))
            .await
            .expect("chromedriver answers in time")
            .unwrap();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let answer: Value = serde_json::from_slice(&bytes).expect("JSON from chromedriver");
        answer["value"].clone()
    }

    async fn open(&self, url: &str) {
        let path = format!("/session/{}/url", self.session);
        self.call("POST", &path, json!({"url": url})).await;
    }

    async fn eval(&self, script: &str) -> Value {
        let path = format!("/session/{}/execute/sync", self.session);
        self.call("POST", &path, json!({"script": script, "args": []}))
            .await
    }

    /// A PNG of the page, saved where a person can look at it.
    async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let route = format!("/session/{}/screenshot", self.session);
        let png = self.call("GET", &route, Value::Null).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("base64 PNG"))
            .expect("valid base64");
        std::fs::write(path, bytes).expect("write the screenshot");
    }

    /// The positions the page has received so far.
    async fn received(&self) -> Vec<String> {
        let value = self.eval("return window.received || [];").await;
        value
            .as_array()
            .unwrap_or_else(|| panic!("not a list: {value}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }

    async fn wait_for(&self, count: usize) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let received = self.received().await;
            if received.len() >= count {
                return received;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page has {} of {count} events; notices: {}",
                received.len(),
                self.eval("return window.notices;").await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session closes the browser (killing chromedriver alone would orphan it).
        // Plain blocking I/O: this also runs while a failed test unwinds.
        if !self.session.is_empty() {
            if let Ok(mut stream) = std::net::TcpStream::connect(self.addr) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
                let request = format!(
                    "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                    self.session, self.addr
                );
                if stream.write_all(request.as_bytes()).is_ok() {
                    let _ = std::io::Read::read_to_end(&mut stream, &mut Vec::new());
                }
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_resumes_after_a_gateway_restart_without_gaps_or_duplicates() {
    let env = setup().await;
    let mut tokens = tempfile::NamedTempFile::new().unwrap();
    writeln!(tokens, "{TOKEN} courses").unwrap();
    let mut config = env.config();
    config.open = false;
    config.tokens_file = Some(tokens.path().to_path_buf());
    let gw = start(config.clone()).await;
    let addr = gw.addr;
    produce(&env.admin, "courses", 5, 1).await;

    let browser = Browser::start().await;
    browser
        .open(&format!(
            "http://{addr}/?topic=courses&from=earliest&access_token={TOKEN}"
        ))
        .await;
    assert_eq!(browser.wait_for(5).await, env.positions(""));

    // Events keep committing through the restart.
    let writer = connect(&env.pg.url()).await;
    let producing = tokio::spawn(async move {
        for _ in 0..150 {
            produce(&writer, "courses", 2, 1).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    browser.wait_for(25).await;
    gw.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    config.http_addr = addr;
    let gw = start(config).await;
    producing.await.unwrap();

    let expected = env.positions("");
    assert_eq!(expected.len(), 305);
    let received = browser.wait_for(expected.len()).await;
    assert_eq!(
        received, expected,
        "no gap, no duplicate, in position order"
    );
    let notices = browser.eval("return window.notices;").await;
    assert!(
        notices.to_string().contains("goodbye (shutdown)"),
        "the page saw the goodbye: {notices}"
    );
    // Settle: nothing more arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(browser.received().await.len(), expected.len());
    let shown = browser
        .eval("return document.getElementById('count').textContent;")
        .await;
    assert_eq!(
        shown,
        expected.len().to_string(),
        "the page shows the count"
    );
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("gateway-demo-page.png");
    browser.screenshot(&shot).await;
    eprintln!("screenshot of the demo page: {}", shot.display());
    gw.stop().await;
}

/// Opens a WebSocket from the current page to `url`; the page records its events in `window.ws`
/// and the socket's fate in `window.wsState` (`open`, `error`, `closed`).
const OPEN_WS: &str = "window.ws = []; window.wsState = 'connecting';
    const s = new WebSocket(arguments[0]);
    s.onopen = () => { window.wsState = 'open'; };
    s.onerror = () => { window.wsState = 'error'; };
    s.onclose = () => { if (window.wsState !== 'error') window.wsState = 'closed'; };
    s.onmessage = (m) => { const o = JSON.parse(m.data); if (o.position) window.ws.push(o.position); };
    return true;";

impl Browser {
    async fn open_ws(&self, url: &str) {
        let path = format!("/session/{}/execute/sync", self.session);
        self.call("POST", &path, json!({"script": OPEN_WS, "args": [url]}))
            .await;
    }

    /// Waits until `window.wsState` is no longer `connecting` (or has `count` events); returns it.
    async fn ws_outcome(&self, count: usize) -> (String, Vec<String>) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let state = self.eval("return window.wsState;").await;
            let events: Vec<String> = self
                .eval("return window.ws || [];")
                .await
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            let state = state.as_str().unwrap_or("").to_string();
            if (state == "open" && events.len() >= count) || state == "error" || state == "closed" {
                return (state, events);
            }
            assert!(tokio::time::Instant::now() < deadline, "state {state}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The Origin rule on WebSocket handshakes, as a browser meets it: a page of the gateway's own
/// origin opens the stream; a page of another origin (`http://localhost:PORT` is another origin
/// than `http://127.0.0.1:PORT`) is refused by an `--open` gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_origin_page_opens_a_websocket_and_another_origin_cannot() {
    let env = setup().await;
    let gw = start(env.config()).await;
    let addr = gw.addr;
    produce(&env.admin, "courses", 3, 1).await;
    let browser = Browser::start().await;

    browser.open(&format!("http://{addr}/healthz")).await;
    browser
        .open_ws(&format!("ws://{addr}/v1/topics/courses/ws?from=earliest"))
        .await;
    let (state, events) = browser.ws_outcome(3).await;
    assert_eq!(state, "open");
    assert_eq!(
        events,
        env.positions(""),
        "the same-origin page reads the stream"
    );

    browser
        .open(&format!("http://localhost:{}/healthz", addr.port()))
        .await;
    browser
        .open_ws(&format!("ws://{addr}/v1/topics/courses/ws?from=earliest"))
        .await;
    let (state, events) = browser.ws_outcome(3).await;
    assert_eq!(state, "error", "another origin's handshake is refused");
    assert!(events.is_empty(), "{events:?}");
    gw.stop().await;
}
