//! The `gateway` binary as operators run it: options, start-up errors, heartbeats, redacted logs,
//! and SIGTERM closing every stream with its resume position.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_gateway");
const TOKEN: &str = "service-token-0123456789";

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn help_documents_every_option_with_its_environment_variable() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (option, env) in [
        ("--database-url", "DATABASE_URL"),
        ("--http-addr", "HTTP_ADDR"),
        ("--tokens-file", "GATEWAY_TOKENS_FILE"),
        ("--open", "GATEWAY_OPEN"),
        ("--allowed-origins", "GATEWAY_ALLOWED_ORIGINS"),
        ("--max-clients", "GATEWAY_MAX_CLIENTS"),
        ("--max-clients-per-token", "GATEWAY_MAX_CLIENTS_PER_TOKEN"),
        ("--allowed-hosts", "GATEWAY_ALLOWED_HOSTS"),
        ("--max-connections", "GATEWAY_MAX_CONNECTIONS"),
        (
            "--max-connections-per-address",
            "GATEWAY_MAX_CONNECTIONS_PER_ADDRESS",
        ),
        ("--header-read-timeout", "GATEWAY_HEADER_READ_TIMEOUT"),
        ("--client-buffer", "GATEWAY_CLIENT_BUFFER"),
        ("--slow-client-timeout", "GATEWAY_SLOW_CLIENT_TIMEOUT"),
        ("--catch-up-concurrency", "GATEWAY_CATCH_UP_CONCURRENCY"),
        ("--batch-size", "GATEWAY_BATCH_SIZE"),
        ("--heartbeat-interval", "GATEWAY_HEARTBEAT_INTERVAL"),
        ("--max-stream-age", "GATEWAY_MAX_STREAM_AGE"),
        ("--poll-interval", "GATEWAY_POLL_INTERVAL"),
        ("--notify-channel", "NOTIFY_CHANNEL"),
        ("--shutdown-grace", "GATEWAY_SHUTDOWN_GRACE"),
        ("--log-level", "LOG_LEVEL"),
    ] {
        assert!(help.contains(option), "{option} missing from --help");
        assert!(
            help.contains(&format!("env: {env}")),
            "{env} missing from --help"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_errors_name_the_cause_and_the_fix() {
    let env = setup().await;
    // No tokens and not --open.
    let out = Command::new(BIN)
        .env("DATABASE_URL", env.pg.url_for(GATEWAY_USER, None))
        .env_remove("GATEWAY_TOKENS_FILE")
        .env_remove("GATEWAY_OPEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("GATEWAY_TOKENS_FILE"), "{err}");

    // A login without the reader's grants.
    env.admin
        .batch_execute("CREATE ROLE nobody_special LOGIN")
        .await
        .unwrap();
    let out = Command::new(BIN)
        .env("DATABASE_URL", env.pg.url_for("nobody_special", None))
        .env("GATEWAY_OPEN", "true")
        .env("HTTP_ADDR", free_addr().to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lacks SELECT") && err.contains("events_consumer"),
        "{err}"
    );
    // The password never shows, even when the URL has one.
    let out = Command::new(BIN)
        .env("DATABASE_URL", "postgres://u:hunter2@127.0.0.1:1/db")
        .env("GATEWAY_TOKENS_FILE", "/nonexistent/tokens")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/nonexistent/tokens"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_streams_with_their_resume_position_and_logs_no_token() {
    let env = setup().await;
    let mut tokens = tempfile::NamedTempFile::new().unwrap();
    writeln!(tokens, "{TOKEN} courses").unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let addr = free_addr();
    let mut child = Command::new(BIN)
        .env("DATABASE_URL", env.pg.url_for(GATEWAY_USER, None))
        .env("GATEWAY_TOKENS_FILE", tokens.path())
        .env("HTTP_ADDR", addr.to_string())
        .env("GATEWAY_HEARTBEAT_INTERVAL", "300ms")
        .env("LOG_LEVEL", "info")
        .stderr(Stdio::from(log.reopen().unwrap()))
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(Ok((status, _))) =
            tokio::time::timeout(Duration::from_secs(5), get(addr, "/healthz", &[])).await
        {
            if status == 200 {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "never healthy");
        assert!(child.try_wait().unwrap().is_none(), "exited early");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    produce(&env.admin, "courses", 3, 1).await;
    let mut sse = Sse::open(
        addr,
        &format!("/v1/topics/courses/events?from=earliest&access_token={TOKEN}"),
        &[],
    )
    .await;
    assert_eq!(sse.status, 200);
    let events = sse.events(3).await;
    // A percent-encoded parameter name is decoded by the handlers (the token is used: 403 for a
    // topic it does not grant), so the log must redact it too.
    let (status, _) = get(
        addr,
        &format!("/v1/topics/secrets/events?access%5Ftoken={TOKEN}"),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "the encoded name is read as access_token");
    // Idle now: heartbeats keep the stream open.
    let idle = tokio::time::timeout(Duration::from_secs(2), sse.next()).await;
    assert!(idle.is_err(), "no message expected while idle: {idle:?}");
    assert!(sse.heartbeats >= 1, "heartbeat comments on an idle stream");
    let (_, metrics) = get(addr, "/metrics", &[]).await.unwrap();
    assert!(metrics.contains("gateway_clients 1"), "{metrics}");
    assert!(metrics.contains("gateway_events_sent_total 3"), "{metrics}");

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let rest = sse.rest().await;
    let goodbye = rest.last().expect("a goodbye");
    assert_eq!(goodbye.event, "goodbye");
    assert_eq!(goodbye.json()["reason"], "shutdown");
    assert_eq!(goodbye.id, events[2].id);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status:?}");

    let logged = std::fs::read_to_string(log.path()).unwrap();
    assert!(logged.contains("access_token=REDACTED"), "{logged}");
    assert!(logged.contains("access%5Ftoken=REDACTED"), "{logged}");
    assert!(
        !logged.contains(TOKEN),
        "the token leaked into the log:\n{logged}"
    );
}
