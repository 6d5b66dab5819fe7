//! The `purger` binary: options and their environment twins, `--once`, `--dry-run`, exit codes,
//! warnings on stderr, `/metrics` and `/healthz`, SIGTERM.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{Db, DAY};
use event_store::position::Position;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const PURGER: &str = env!("CARGO_BIN_EXE_purger");

fn purger(url: &str) -> Command {
    let mut cmd = Command::new(PURGER);
    cmd.env_clear()
        .env("DATABASE_URL", url)
        .env("LOG_LEVEL", "info")
        .env("NO_COLOR", "1");
    cmd
}

fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("run purger");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out, stdout, stderr)
}

/// A running purger whose stderr lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn spawn(cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `text` (a liveness limit, not a timing assertion).
    fn wait_for(&mut self, text: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no stderr line containing {text:?}; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Every stderr line of the next `span`.
    fn lines_for(&mut self, span: Duration) -> Vec<String> {
        let end = std::time::Instant::now() + span;
        let mut lines = Vec::new();
        while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    lines.push(line);
                }
                Err(_) => break,
            }
        }
        lines
    }

    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        let status = self.child.wait().unwrap();
        let mut stdout = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        (status, stdout)
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal HTTP GET: (status line, body).
fn get(port: u16, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

#[tokio::test]
async fn once_purges_then_exits_and_dry_run_only_counts() {
    let db = Db::start().await;
    let all = db.append(10).await;
    db.backdate(&all[..6], 10 * DAY).await;
    db.consume("reader", Position::START, 4).await;

    let (out, stdout, stderr) =
        run(purger(&db.purger_url()).args(["--once", "--dry-run", "--retention", "7d"]));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "would purge 4 events");
    assert!(stderr.contains("Dry run: nothing deleted."), "{stderr}");
    assert_eq!(db.remaining().await, all, "a dry run deletes nothing");

    // The environment twins work the same way.
    let (out, stdout, stderr) = run(purger(&db.purger_url())
        .env("PURGER_ONCE", "true")
        .env("PURGER_RETENTION", "7d")
        .env("PURGER_BATCH_SIZE", "3"));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "purged 4 events");
    assert_eq!(db.remaining().await, all[4..].to_vec());
    let summary = stderr
        .lines()
        .find(|l| l.contains("Purge pass finished."))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(summary.contains("deleted=4"), "{summary}");
    assert!(summary.contains("batches=2"), "{summary}");
    assert!(summary.contains("oldest="), "{summary}");
    assert!(
        summary.contains("held_back_by=consumer \"reader\""),
        "the pass names who holds it back: {summary}"
    );
    assert!(
        stderr.contains("a consumer has not read them yet"),
        "{stderr}"
    );
}

#[tokio::test]
async fn expired_consumers_and_forced_purges_are_announced_loudly() {
    let db = Db::start().await;
    let all = db.append(8).await;
    db.backdate(&all, 10 * DAY).await;
    db.consume("gone", Position::START, 2).await;
    db.consume("live", Position::START, 5).await;
    db.idle("gone", 3 * DAY).await;

    let (out, stdout, stderr) =
        run(purger(&db.purger_url()).args(["--once", "--consumer-expiry", "1d"]));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "purged 5 events");
    let warning = stderr
        .lines()
        .find(|l| l.contains("WARN") && l.contains("\"gone\""))
        .unwrap_or_else(|| panic!("no warning naming the expired consumer:\n{stderr}"));
    assert!(
        warning.contains("no longer holds purging back") && warning.contains("3 unread events"),
        "{warning}"
    );

    let (out, stdout, stderr) = run(purger(&db.purger_url())
        .args(["--once"])
        .env("PURGER_FORCE", "true"));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "purged 3 events");
    let warning = stderr
        .lines()
        .find(|l| l.contains("WARN") && l.contains("Forced purge") && l.contains("\"live\""))
        .unwrap_or_else(|| panic!("no forced-purge warning:\n{stderr}"));
    assert!(warning.contains("loses 3 unread events"), "{warning}");
    assert!(db.watermark().await.unwrap().forced);
}

#[test]
fn bad_configuration_exits_non_zero_with_one_clear_error() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&["--retention", "seven days"], &[], "--retention"),
        (&["--retention", "10"], &[], "expected a duration"),
        (&[], &[("PURGER_INTERVAL", "soon")], "--interval"),
        (&["--interval", "0s"], &[], "longer than zero"),
        (
            &["--consumer-expiry", "three days"],
            &[],
            "--consumer-expiry",
        ),
        (&["--batch-size", "0"], &[], "--batch-size"),
        (&["--batch-size", "many"], &[], "--batch-size"),
    ];
    for (args, env, expected) in cases {
        let mut cmd = purger("postgres://u@127.0.0.1:1/db");
        cmd.args(*args).envs(env.iter().copied());
        let (out, _, stderr) = run(&mut cmd);
        assert!(!out.status.success(), "{args:?} {env:?} was accepted");
        assert!(
            stderr.starts_with("error:") && stderr.contains(expected),
            "{args:?} {env:?}: {stderr}"
        );
    }

    let (out, _, stderr) = run(purger("not a url ://").arg("--once"));
    assert!(!out.status.success());
    assert!(
        stderr.contains("error: invalid configuration: DATABASE_URL is not a valid"),
        "{stderr}"
    );
    let (out, _, stderr) =
        run(purger("postgres://u@127.0.0.1:1/db").args(["--http-addr", "not-an-address"]));
    assert!(!out.status.success());
    assert!(stderr.contains("--http-addr"), "{stderr}");
}

#[tokio::test]
async fn a_missing_schema_or_grant_is_a_clear_start_up_error() {
    let db = Db::start().await;
    db.admin
        .batch_execute("CREATE ROLE nobody LOGIN")
        .await
        .unwrap();
    let (out, _, stderr) = run(purger(&db.pg.url_for("nobody", None)).arg("--once"));
    assert!(!out.status.success());
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        error.contains("lacks DELETE on \"events\"") && error.contains("GRANT events_purger"),
        "{error}"
    );

    let bare = testbed::Postgres::start();
    let (out, _, stderr) = run(purger(&bare.url()).arg("--once"));
    assert!(!out.status.success());
    assert!(
        stderr.contains("error:") && stderr.contains("run `migrate`"),
        "{stderr}"
    );
}

#[tokio::test]
async fn serves_metrics_and_health_and_exits_zero_on_sigterm() {
    let db = Db::start().await;
    let old = db.append(6).await;
    db.backdate(&old, 10 * DAY).await;
    db.consume("reader", Position::START, 4).await;
    let port = free_port();
    let mut running = Running::spawn(purger(&db.purger_url()).args([
        "--interval",
        "1h",
        "--http-addr",
        &format!("127.0.0.1:{port}"),
    ]));
    running.wait_for("Purge pass finished.");

    let (status, body) = get(port, "/healthz");
    assert!(status.contains("200"), "{status}: {body}");
    let (status, metrics) = get(port, "/metrics");
    assert!(status.contains("200"), "{status}");
    for expected in [
        "purger_events_purged_total{forced=\"false\"} 4",
        "purger_passes_total{outcome=\"ok\"} 1",
        "purger_last_pass_duration_seconds",
        "purger_held_back 1",
        "purger_held_back_by_consumer{consumer=\"reader\"} 1",
        "purger_oldest_event_age_seconds",
    ] {
        assert!(
            metrics.contains(expected),
            "{expected} missing from:\n{metrics}"
        );
    }

    let (status, stdout) = running.terminate();
    assert!(status.success(), "SIGTERM is a clean exit: {status}");
    assert_eq!(stdout.trim(), "purged 4 events");
}

#[test]
fn sigterm_while_the_database_is_unreachable_exits_zero() {
    // Port 1: nothing listens; the purger keeps retrying rather than exiting.
    let mut running = Running::spawn(&mut purger("postgres://u@127.0.0.1:1/db"));
    let line = running.wait_for("Purge pass failed; retrying.");
    assert!(line.contains("attempt=1"), "{line}");
    assert!(
        line.contains("cannot connect to PostgreSQL at 127.0.0.1:1"),
        "{line}"
    );
    running.wait_for("attempt=2");
    let (status, stdout) = running.terminate();
    assert!(status.success(), "{status}");
    assert_eq!(stdout.trim(), "purged 0 events");
}

/// Start-up failures that retrying cannot fix end the run at once with exit code 1, the
/// server's words (SQLSTATE included) and what to do.
#[tokio::test(flavor = "multi_thread")]
async fn start_up_failures_exit_1_with_the_cause_and_the_fix() {
    let pg = testbed::Postgres::start_tls();
    let ca = pg.tls_ca().display().to_string();
    let url = |user: &str, database: &str| {
        format!(
            "postgres://{user}@localhost:{}/{database}?sslmode=verify-full&sslrootcert={ca}",
            pg.port()
        )
    };
    pg.psql("CREATE DATABASE events_db");
    pg.psql("CREATE DATABASE empty_db");
    let mut admin = common::connect(&url("postgres", "events_db")).await;
    event_store::migrations::run(&mut admin).await.unwrap();
    pg.psql("CREATE ROLE retention LOGIN PASSWORD 'Right-Pass-1' IN ROLE events_purger");

    let cases = [
        (
            url("retention:Wrong-Pass-2", "events_db"),
            [
                "SQLSTATE 28P01",
                "password authentication failed",
                "fix the password in DATABASE_URL",
            ],
        ),
        (
            url("retention:Right-Pass-1", "no_such_db"),
            [
                "SQLSTATE 3D000",
                "does not exist",
                "check the database name",
            ],
        ),
        (
            url("postgres", "empty_db"),
            [
                "the schema is not migrated",
                "this purger needs V",
                "run `migrate`",
            ],
        ),
        (
            format!(
                "postgres://retention:Right-Pass-1@localhost:{}/events_db?sslmode=disable",
                pg.port()
            ),
            ["SQLSTATE 28000", "no encryption", "sslmode=verify-full"],
        ),
    ];
    for (url, expected) in cases {
        let (out, _, stderr) = run(purger(&url).arg("--once"));
        assert_eq!(out.status.code(), Some(1), "{url}: {stderr}");
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("{stderr}"));
        for text in expected {
            assert!(error.contains(text), "{text:?} missing: {error}");
        }
        assert!(!stderr.contains("retrying"), "not retried: {stderr}");
        assert!(
            !stderr.contains("Pass-"),
            "no password in the output: {stderr}"
        );
    }
}

/// A grant revoked under a running purger: the log says "permission denied" with the SQLSTATE,
/// `/healthz` says the same, and the retries wait the longest pause at once instead of a storm.
#[tokio::test]
async fn a_revoked_privilege_is_reported_and_retried_slowly() {
    let db = Db::start().await;
    let port = free_port();
    let mut running = Running::spawn(purger(&db.purger_url()).args([
        "--interval",
        "100ms",
        "--http-addr",
        &format!("127.0.0.1:{port}"),
    ]));
    running.wait_for("Purge pass finished.");
    db.admin
        .batch_execute("REVOKE DELETE ON events FROM events_purger")
        .await
        .unwrap();
    let first = running.wait_for("Purge pass failed; retrying.");
    assert!(
        first.contains("permission denied for table events")
            && first.contains("SQLSTATE 42501")
            && first.contains("attempt=1")
            && first.contains("permanent=true"),
        "{first}"
    );
    let (status, body) = get(port, "/healthz");
    assert!(status.contains("503"), "{status}");
    assert!(
        body.contains("postgres:") && body.contains("permission denied for table events"),
        "{body}"
    );
    // At 100 ms passes the old behaviour logged dozens of lines here; the cap (30 s, jittered
    // down to no less than 15 s) leaves at most one more.
    let later: Vec<String> = running
        .lines_for(Duration::from_secs(8))
        .into_iter()
        .filter(|l| l.contains("Purge pass failed"))
        .collect();
    assert!(later.len() <= 1, "retries must slow down: {later:#?}");
    let (status, _) = running.terminate();
    assert!(status.success(), "{status}");
}

/// `--once` in a cron job must end: an unreachable database is retried for `--give-up-after`,
/// then the run fails.
#[test]
fn once_gives_up_after_a_bounded_time() {
    let started = std::time::Instant::now();
    let (out, _, stderr) =
        run(purger("postgres://u@127.0.0.1:1/db").args(["--once", "--give-up-after", "2s"]));
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("gave up after 2s") && stderr.contains("cannot connect to PostgreSQL"),
        "{stderr}"
    );
    assert!(stderr.contains("attempt=2"), "it retried first: {stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "bounded: {:?}",
        started.elapsed()
    );
}
