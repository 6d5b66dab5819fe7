//! The `producer` binary against a real PostgreSQL: exact counts, outages, signals, bad
//! configuration.

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use testbed::Postgres;

const PRODUCER: &str = env!("CARGO_BIN_EXE_producer");

/// A migrated cluster with a producer login `p`.
fn migrated() -> Postgres {
    let pg = Postgres::start();
    run_migrations(&pg);
    pg.psql("CREATE ROLE p LOGIN IN ROLE events_producer");
    pg
}

fn run_migrations(pg: &Postgres) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let config = event_store::db::config(&pg.url(), "test").unwrap();
        let mut admin = event_store::db::connect_spawned(&config).await.unwrap();
        event_store::migrations::run(&mut admin).await.unwrap();
    });
}

fn producer(url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(PRODUCER);
    cmd.env_clear()
        .env("DATABASE_URL", url)
        .env("LOG_LEVEL", "info")
        .env("PRODUCER_PROGRESS_INTERVAL", "1s")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// The N of the `produced <N> events` line.
fn produced(output: &Output) -> u64 {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("produced "))
        .unwrap_or_else(|| {
            panic!(
                "no `produced` line in {stdout:?}\nstderr: {}",
                stderr(output)
            )
        });
    line.strip_prefix("produced ")
        .and_then(|rest| rest.strip_suffix(" events"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("malformed line {line:?}"))
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn count(pg: &Postgres) -> u64 {
    pg.psql("SELECT count(*) FROM events").parse().unwrap()
}

/// Waits (bounded) for the child to exit and collects its output.
fn wait(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_end(&mut stdout)
                .unwrap();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_end(&mut stderr)
                .unwrap();
            return Output {
                status,
                stdout,
                stderr,
            };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "the producer did not exit within {limit:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&output.stdout),
                stderr(&output)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until at least `n` events are stored (bounded).
fn wait_for_events(pg: &Postgres, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(pg) < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} events after 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn count_appends_exactly_n_and_exits_0() {
    let pg = migrated();
    let url = pg.url_for("p", None);
    // Batches that do not divide N, several tasks, no rate limit.
    let output = wait(
        producer(
            &url,
            &[
                "--count",
                "1037",
                "--rate",
                "0",
                "--batch-size",
                "50",
                "--concurrency",
                "4",
            ],
        )
        .spawn()
        .unwrap(),
        Duration::from_secs(60),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(produced(&output), 1037);
    assert_eq!(count(&pg), 1037);
    assert_eq!(
        pg.psql("SELECT count(DISTINCT payload->>'seq') FROM events"),
        "1037"
    );
    assert_eq!(
        pg.psql("SELECT string_agg(DISTINCT topic, ',' ORDER BY topic) FROM events"),
        "courses,policies"
    );
}

#[test]
fn count_in_transaction_mode_with_options_from_the_environment() {
    let pg = migrated();
    let output = wait(
        producer(&pg.url_for("p", None), &[])
            .env("PRODUCER_COUNT", "120")
            .env("PRODUCER_RATE", "0")
            .env("PRODUCER_CONCURRENCY", "3")
            .env("PRODUCER_NOTIFY_MODE", "in-transaction")
            .env("PRODUCER_TOPICS", "alpha")
            .env("PRODUCER_PAYLOAD_BYTES", "2000")
            .spawn()
            .unwrap(),
        Duration::from_secs(60),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(produced(&output), 120);
    assert_eq!(count(&pg), 120);
    assert_eq!(
        pg.psql(
            "SELECT min(length(payload::text)) >= 1900 AND bool_and(topic = 'alpha') FROM events"
        ),
        "t"
    );
}

#[test]
fn sigterm_finishes_in_flight_work_and_prints_the_committed_total() {
    let pg = migrated();
    let child = producer(
        &pg.url_for("p", None),
        &["--rate", "2000", "--batch-size", "10", "--concurrency", "4"],
    )
    .spawn()
    .unwrap();
    wait_for_events(&pg, 500);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let output = wait(child, Duration::from_secs(30));
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = produced(&output);
    assert!(printed >= 500, "{printed}");
    assert_eq!(printed, count(&pg));
}

#[test]
fn sigint_stops_a_producer_running_flat_out() {
    let pg = migrated();
    let child = producer(
        &pg.url_for("p", None),
        &["--rate", "0", "--concurrency", "8"],
    )
    .spawn()
    .unwrap();
    wait_for_events(&pg, 200);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let output = wait(child, Duration::from_secs(30));
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(produced(&output), count(&pg));
}

#[test]
fn keeps_going_across_postgres_restarts_and_counts_exactly() {
    let mut pg = migrated();
    let child = producer(
        &pg.url_for("p", None),
        &[
            "--count",
            "3000",
            "--rate",
            "600",
            "--batch-size",
            "5",
            "--concurrency",
            "3",
        ],
    )
    .spawn()
    .unwrap();
    wait_for_events(&pg, 300);
    // A clean restart (connections closed by the server)…
    pg.restart();
    wait_for_events(&pg, count(&pg) + 300);
    // …and a crash: SIGKILL to the postmaster, crash recovery on restart.
    pg.kill();
    std::thread::sleep(Duration::from_millis(500));
    pg.restart();
    let output = wait(child, Duration::from_secs(120));
    let log = stderr(&output);
    assert!(output.status.success(), "{log}");
    assert_eq!(produced(&output), 3000, "{log}");
    assert_eq!(count(&pg), 3000, "{log}");
    assert_eq!(
        pg.psql("SELECT count(DISTINCT payload->>'seq') FROM events"),
        "3000",
        "no event stored twice"
    );
    assert!(log.contains("reconnecting to PostgreSQL"), "{log}");
}

#[test]
fn sigterm_during_an_outage_exits_0_with_the_committed_total() {
    let mut pg = migrated();
    let child = producer(
        &pg.url_for("p", None),
        &["--rate", "500", "--concurrency", "2"],
    )
    .spawn()
    .unwrap();
    wait_for_events(&pg, 100);
    pg.stop();
    std::thread::sleep(Duration::from_millis(500));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let output = wait(child, Duration::from_secs(30));
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = produced(&output);
    pg.restart();
    assert_eq!(printed, count(&pg), "{}", stderr(&output));
}

fn assert_config_error(output: &Output, needle: &str) {
    let err = stderr(output);
    assert!(!output.status.success(), "expected a failure: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no `error:` line in {err}"));
    assert!(line.contains(needle), "{line:?} should mention {needle:?}");
}

#[test]
fn bad_configuration_exits_non_zero_with_a_clear_message() {
    let pg = Postgres::start();
    let run = |url: &str| {
        wait(
            producer(url, &["--count", "1"]).spawn().unwrap(),
            Duration::from_secs(30),
        )
    };

    let output = run("postgres://p@127.0.0.1:notaport/db");
    assert_config_error(
        &output,
        "DATABASE_URL is not a valid PostgreSQL connection string",
    );

    // Not migrated yet.
    let output = run(&pg.url());
    assert_config_error(&output, "run `migrate`");

    run_migrations(&pg);
    // A login without the producer group role.
    pg.psql("CREATE ROLE nobody LOGIN");
    let output = run(&pg.url_for("nobody", None));
    assert_config_error(&output, "GRANT events_producer");

    // A role that does not exist: authentication fails, retrying cannot help.
    let output = run(&pg.url_for("ghost", None));
    assert_config_error(&output, "ghost");
    assert_eq!(count(&pg), 0);

    // Bad options are refused by the parser (exit code 2, clap's message).
    let output = wait(
        producer(&pg.url(), &["--rate", "-5"]).spawn().unwrap(),
        Duration::from_secs(10),
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}

#[test]
fn help_documents_every_option_with_its_environment_variable() {
    let output = Command::new(PRODUCER).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for env in [
        "DATABASE_URL",
        "PRODUCER_TOPICS",
        "PRODUCER_RATE",
        "PRODUCER_COUNT",
        "PRODUCER_BATCH_SIZE",
        "PRODUCER_CONCURRENCY",
        "PRODUCER_PAYLOAD_BYTES",
        "PRODUCER_NOTIFY_MODE",
        "NOTIFY_CHANNEL",
        "LOG_LEVEL",
        "HTTP_ADDR",
    ] {
        assert!(
            help.contains(&format!("[env: {env}")),
            "--help lacks {env}:\n{help}"
        );
    }
    assert!(help.contains("after-commit"), "{help}");
}

/// A plain HTTP/1.1 GET; returns the status line and the body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.lines().next().unwrap_or_default().to_string();
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

#[test]
fn serves_health_and_metrics() {
    let pg = migrated();
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let child = producer(
        &pg.url_for("p", None),
        &["--rate", "500", "--http-addr", &addr],
    )
    .spawn()
    .unwrap();
    wait_for_events(&pg, 100);
    let (status, body) = http_get(&addr, "/healthz");
    assert!(status.contains("200"), "{status} {body}");
    // The counter lags the table by at most the batches in flight; wait for it to show.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(&addr, "/metrics");
        assert!(status.contains("200"), "{status}");
        if body.contains("producer_events_total") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no producer_events_total in {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let output = wait(child, Duration::from_secs(30));
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(produced(&output), count(&pg));
}
