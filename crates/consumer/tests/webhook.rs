//! The HTTP webhook sink against a real receiver on loopback (tests/common/receiver.rs checks
//! every signature itself) and real PostgreSQL: every event arrives in position order through
//! server errors, stalls, throttling and kills; a refused event becomes a dead letter in
//! PostgreSQL; duplicates happen only with the same idempotency key; bad settings stop start-up
//! with one clear line.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::receiver::{Faults, Receiver};
use common::{sink_binary, wait_until};
use event_store::migrations::Role;
use event_store::testing::{connect, TestDatabase};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const USER: &str = "webhook_sink";
const SECRET: &str = "whsec-0123456789-never-in-logs";

struct Env {
    db: TestDatabase,
    dir: tempfile::TempDir,
}

async fn setup() -> Env {
    common::init_logging();
    let db = TestDatabase::start(&[(USER, Role::Consumer)]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), format!("{SECRET}\n")).unwrap();
    Env { db, dir }
}

impl Env {
    fn secret_file(&self) -> PathBuf {
        self.dir.path().join("secret")
    }

    fn consumer(&self, name: &str, url: &str, extra: &[(&str, &str)]) -> Command {
        let secret = self.secret_file();
        let mut command = sink_binary::command(
            &self.db,
            USER,
            name,
            &[
                ("CONSUMER_SINK", "http"),
                ("CONSUMER_HTTP_URL", url),
                ("CONSUMER_HTTP_SECRET_FILE", secret.to_str().unwrap()),
                ("CONSUMER_HTTP_TIMEOUT", "1s"),
                ("CONSUMER_HTTP_BATCH", "20"),
                ("CONSUMER_BATCH_SIZE", "50"),
            ],
        );
        command.envs(extra.iter().copied());
        command
    }

    fn spawn(&self, name: &str, url: &str) -> Child {
        sink_binary::spawn(self.consumer(name, url, &[]))
    }

    fn psql(&self, sql: &str) -> String {
        self.db.pg.psql(sql)
    }

    /// The stored checkpoint, "tx/id", or "" before the first request.
    fn checkpoint(&self, name: &str) -> String {
        sink_binary::checkpoint(&self.db, name)
    }

    fn last_position(&self) -> String {
        sink_binary::last_position(&self.db)
    }

    /// `n` events on topic `orders`, payloads `{"n": 1}` … `{"n": n}`, in one transaction.
    async fn orders(&self, n: i64) {
        self.db
            .admin
            .execute(
                "INSERT INTO events (topic, payload) SELECT 'orders', jsonb_build_object('n', g)
                   FROM generate_series(1, $1::bigint) g",
                &[&n],
            )
            .await
            .unwrap();
    }
}

fn parse(position: &str) -> (u64, i64) {
    let (tx, id) = position.split_once('/').expect("tx/id");
    (tx.parse().unwrap(), id.parse().unwrap())
}

/// Writers appending `transactions` small transactions each (one event in the middle marked
/// for the receiver to refuse), with wake-ups.
async fn produce(url: String, writers: usize, transactions: usize) {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = connect(&url).await;
        tasks.push(tokio::spawn(async move {
            for t in 0..transactions {
                let refuse = w == 0 && t == transactions / 2;
                client
                    .execute(
                        "INSERT INTO events (topic, key, payload)
                         SELECT 'orders', 'key-' || $1::int || '-' || g,
                                jsonb_build_object('writer', $1::int, 'n', $2::int, 'g', g,
                                                   'refuse', $3::bool AND g = 1)
                           FROM generate_series(1, 1 + ($2::int % 3)) g",
                        &[&(w as i32), &(t as i32), &refuse],
                    )
                    .await
                    .unwrap();
                client
                    .execute("SELECT pg_notify('events', '')", &[])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_arrives_in_order_through_receiver_faults_and_kills() {
    let env = setup().await;
    let receiver = Receiver::start(
        SECRET,
        Faults {
            server_errors: 0.3,
            throttles: 0.05,
            stalls: 0.05,
            stall_for: Duration::from_millis(1500),
            refuse_marked: true,
            ..Faults::default()
        },
    )
    .await;
    let url = receiver.url("http");
    let mut consumer = env.spawn("hooks", &url);
    let producing = tokio::spawn(produce(env.db.pg.url(), 4, 250));
    // Three kill -9 during the run, each at a different moment of the request cycle.
    for pause in [1500u64, 2300, 3100] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        kill(Pid::from_raw(consumer.id() as i32), Signal::SIGKILL).unwrap();
        consumer.wait().unwrap();
        consumer = env.spawn("hooks", &url);
    }
    producing.await.unwrap();
    let last = env.last_position();
    wait_until(
        "the webhook checkpoint reaches the last event",
        Duration::from_secs(180),
        || async { env.checkpoint("hooks") == last },
    )
    .await;
    kill(Pid::from_raw(consumer.id() as i32), Signal::SIGTERM).unwrap();
    assert!(consumer.wait().unwrap().success(), "SIGTERM stops cleanly");

    assert_eq!(receiver.bad_signatures(), 0, "every request is signed");
    let refused: i64 = env
        .psql("SELECT id FROM events WHERE (payload->>'refuse')::bool")
        .parse()
        .unwrap();
    let expected: BTreeSet<i64> = env
        .psql("SELECT string_agg(id::text, ',') FROM events")
        .split(',')
        .map(|s| s.parse().unwrap())
        .filter(|id| *id != refused)
        .collect();

    // Every event once per idempotency key; an event seen twice only under the same key.
    let accepted = receiver.accepted();
    let mut keys_of: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    for request in &accepted {
        for id in &request.ids {
            keys_of.entry(*id).or_default().insert(request.key.clone());
        }
    }
    let delivered: BTreeSet<i64> = keys_of.keys().copied().collect();
    assert_eq!(
        delivered, expected,
        "every event except the refused one arrived"
    );
    let under_two_keys: Vec<_> = keys_of.iter().filter(|(_, k)| k.len() > 1).collect();
    assert!(
        under_two_keys.is_empty(),
        "events delivered under different idempotency keys: {under_two_keys:?}"
    );
    let duplicates = accepted.len()
        - accepted
            .iter()
            .map(|r| &r.key)
            .collect::<BTreeSet<_>>()
            .len();
    eprintln!(
        "{} requests, {} accepted, {duplicates} accepted again under the same key, {} refused",
        receiver.requests(),
        accepted.len(),
        receiver.refused()
    );

    // In position order: the requests, each counted at its first acceptance.
    let mut seen = BTreeSet::new();
    let order: Vec<(u64, i64)> = accepted
        .iter()
        .filter(|r| seen.insert(r.key.clone()))
        .flat_map(|r| r.positions.iter().map(|p| parse(p)))
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "events arrived out of position order"
    );

    // The refused event is a dead letter in PostgreSQL, with the receiver's answer.
    let letter = env.psql(&format!(
        "SELECT reason || '|' || detail FROM sink_dead_letters WHERE consumer = 'hooks' AND id = {refused}"
    ));
    assert!(letter.starts_with("refused_by_receiver|"), "{letter}");
    assert!(
        letter.contains("422") && letter.contains("not acceptable"),
        "{letter}"
    );
    assert_eq!(env.psql("SELECT count(*) FROM sink_dead_letters"), "1");
    // The purger keeps what the consumer still needs: it published its position.
    assert_eq!(
        env.psql("SELECT tx_id || '/' || id FROM consumer_positions WHERE consumer = 'hooks'"),
        last
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_refusing_every_request_gets_retries_not_dead_letters() {
    let env = setup().await;
    let receiver = Receiver::start(
        SECRET,
        Faults {
            always: Some(401),
            ..Faults::default()
        },
    )
    .await;
    env.orders(30).await;
    let http_addr = free_addr();
    let mut consumer = env
        .consumer(
            "strict",
            &receiver.url("http"),
            &[("HTTP_ADDR", &http_addr)],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_until(
        "the receiver saw a request",
        Duration::from_secs(30),
        || async { receiver.requests() > 0 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // /metrics counts the sink's requests by outcome, per consumer and sink.
    let retried = sink_requests(&http_addr, "strict", "retried");
    assert!(retried >= 1.0, "retries are counted: {retried}");
    assert_eq!(env.psql("SELECT count(*) FROM sink_dead_letters"), "0");
    assert!(
        env.checkpoint("strict").is_empty() || env.checkpoint("strict") == "0/0",
        "nothing counts as delivered"
    );
    // Fixed on the receiver's side: delivery goes on by itself.
    receiver.set_faults(Faults::default());
    let last = env.last_position();
    wait_until(
        "everything is delivered once the receiver accepts",
        Duration::from_secs(90),
        || async { env.checkpoint("strict") == last },
    )
    .await;
    let delivered = sink_requests(&http_addr, "strict", "delivered");
    assert_eq!(
        delivered as usize,
        receiver.accepted().len(),
        "one delivered request per accepted one"
    );
    kill(Pid::from_raw(consumer.id() as i32), Signal::SIGTERM).unwrap();
    consumer.wait().unwrap();
    let ids: usize = receiver.accepted().iter().map(|r| r.ids.len()).sum();
    assert_eq!(ids, 30);
}

/// A loopback address nobody listens on (for the consumer's /metrics).
fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// `consumer_sink_requests_total` of `consumer` with `outcome`, read from its /metrics.
fn sink_requests(addr: &str, consumer: &str, outcome: &str) -> f64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("consumer_sink_requests_total{")
                && l.contains(&format!("consumer=\"{consumer}\""))
                && l.contains("sink=\"http\"")
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_receivers_are_verified_against_the_named_ca() {
    let env = setup().await;
    let ca = testbed::Ca::new("webhook test CA");
    let ca_file = env.dir.path().join("ca.pem");
    ca.write(&ca_file);
    let receiver = Receiver::start_tls(SECRET, Faults::default(), &ca).await;
    env.db
        .admin
        .execute(
            "INSERT INTO events (topic, payload) VALUES ('orders', '{\"n\": 1}')",
            &[],
        )
        .await
        .unwrap();
    let url = receiver.url("https");

    // Without the CA, the receiver's certificate does not verify against the public roots.
    let unverified = env
        .consumer("tls", &url, &[("HTTP_ADDR", "127.0.0.1:0")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        receiver.accepted().len(),
        0,
        "an unverified receiver got events"
    );
    kill(Pid::from_raw(unverified.id() as i32), Signal::SIGTERM).unwrap();
    let output = unverified.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        log.contains("certificate"),
        "the log names the cause: {log}"
    );
    assert!(!log.contains(SECRET), "the secret leaked into the log");

    let ca_path = ca_file.to_str().unwrap();
    let mut verified = env
        .consumer("tls", &url, &[("CONSUMER_HTTP_TLS_CA", ca_path)])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let last = env.last_position();
    wait_until(
        "delivered over verified TLS",
        Duration::from_secs(60),
        || async { env.checkpoint("tls") == last },
    )
    .await;
    kill(Pid::from_raw(verified.id() as i32), Signal::SIGTERM).unwrap();
    verified.wait().unwrap();
    assert_eq!(receiver.accepted().len(), 1);
}

#[tokio::test]
async fn bad_webhook_settings_stop_start_up_with_one_clear_line() {
    let env = setup().await;
    std::fs::write(env.dir.path().join("empty"), "\n").unwrap();
    let missing = env.dir.path().join("no-such-secret");
    let empty = env.dir.path().join("empty");
    // (settings, what the error says, what it names)
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![("CONSUMER_HTTP_SECRET_FILE", missing.to_str().unwrap())],
            "--http-secret-file",
            "no-such-secret",
        ),
        (
            vec![("CONSUMER_HTTP_SECRET_FILE", empty.to_str().unwrap())],
            "is empty",
            "empty",
        ),
        (
            vec![("CONSUMER_HTTP_URL", "ftp://files.example/x")],
            "http:// or https://",
            "ftp",
        ),
        (
            vec![("CONSUMER_HTTP_URL", "not a url")],
            "--http-url",
            "not a URL",
        ),
    ];
    for (extra, says, names) in cases {
        let output = env
            .consumer("bad", "http://127.0.0.1:9/hook", &extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{extra:?} must stop start-up");
        assert!(
            log.contains(says) && log.contains(names),
            "{extra:?}: {log}"
        );
        assert!(!log.contains(SECRET), "the secret leaked: {log}");
    }
    // Without a secret file at all.
    let output = env
        .consumer("bad", "http://127.0.0.1:9/hook", &[])
        .env_remove("CONSUMER_HTTP_SECRET_FILE")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--http-secret-file"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_replayed_on_request_is_sent_again_by_the_consumer() {
    let env = setup().await;
    let receiver = Receiver::start(
        SECRET,
        Faults {
            refuse_marked: true,
            ..Faults::default()
        },
    )
    .await;
    env.db
        .admin
        .execute(
            "INSERT INTO events (topic, payload)
             SELECT 'orders', jsonb_build_object('n', g, 'refuse', g = 3) FROM generate_series(1, 5) g",
            &[],
        )
        .await
        .unwrap();
    let refused = env.psql("SELECT id FROM events WHERE (payload->>'refuse')::bool");
    let mut consumer = env.spawn("replays", &receiver.url("http"));
    let last = env.last_position();
    wait_until("delivered", Duration::from_secs(60), || async {
        env.checkpoint("replays") == last
    })
    .await;
    let delivered: Vec<i64> = receiver
        .accepted()
        .iter()
        .flat_map(|r| r.ids.clone())
        .collect();
    assert_eq!(delivered.len(), 4, "{delivered:?}");

    // Asked again while the receiver still refuses: the refusal is recorded anew, the request
    // cleared, the row kept.
    let request = format!(
        "UPDATE sink_dead_letters SET replay_requested_at = now() WHERE consumer = 'replays' AND id = {refused}"
    );
    env.psql(&request);
    wait_until("the replay was tried", Duration::from_secs(30), || async {
        env.psql(&format!(
            "SELECT replay_requested_at IS NULL AND detail LIKE 'replay refused%' FROM sink_dead_letters WHERE id = {refused}"
        )) == "t"
    })
    .await;

    // Fixed on the receiver's side, asked again: sent, taken, the dead letter gone.
    receiver.set_faults(Faults::default());
    env.psql(&request);
    wait_until(
        "the replayed event was taken",
        Duration::from_secs(30),
        || async { env.psql("SELECT count(*) FROM sink_dead_letters") == "0" },
    )
    .await;
    let replayed: Vec<_> = receiver
        .accepted()
        .into_iter()
        .filter(|r| r.ids == [refused.parse::<i64>().unwrap()])
        .collect();
    assert_eq!(replayed.len(), 1, "sent once, alone");
    assert_eq!(
        env.checkpoint("replays"),
        last,
        "the checkpoint did not move"
    );
    kill(Pid::from_raw(consumer.id() as i32), Signal::SIGTERM).unwrap();
    consumer.wait().unwrap();
}

/// A receiver nobody answers at, with a token in the URL's query: the consumer retries and says
/// why, and neither its log nor /healthz shows the token (or the URL's password).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_receiver_is_retried_without_its_token_in_logs_or_health() {
    use std::io::{Read, Write};
    let env = setup().await;
    env.db
        .admin
        .execute(
            "INSERT INTO events (topic, payload) VALUES ('orders', '{}')",
            &[],
        )
        .await
        .unwrap();
    let http_addr = free_addr();
    let nobody = free_addr();
    let url = format!("http://hook:hunter2-pw@{nobody}/in?token=tok-s3cr3t");
    let consumer = env
        .consumer("unreachable", &url, &[("HTTP_ADDR", &http_addr)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut stream = std::net::TcpStream::connect(&http_addr).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut health = String::new();
    stream.read_to_string(&mut health).unwrap();
    kill(Pid::from_raw(consumer.id() as i32), Signal::SIGTERM).unwrap();
    let output = consumer.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(health.contains("503"), "the sink is failing: {health}");
    assert!(log.contains(&nobody), "the log names the receiver: {log}");
    for secret in ["tok-s3cr3t", "hunter2-pw", SECRET] {
        assert!(!log.contains(secret), "{secret} leaked into the log: {log}");
        assert!(
            !health.contains(secret),
            "{secret} leaked into /healthz: {health}"
        );
    }
}

/// A receiver that refuses every event (422 to everything, a bad deploy) does not turn the stream
/// into dead letters: after 20 refused events in a row the consumer retries slowly instead, and
/// goes on by itself once the receiver takes events again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_refusing_everything_stops_the_dead_letters_after_a_run() {
    let env = setup().await;
    let receiver = Receiver::start(
        SECRET,
        Faults {
            always: Some(422),
            ..Faults::default()
        },
    )
    .await;
    env.orders(60).await;
    let mut consumer = env.spawn("refused", &receiver.url("http"));
    let limit = consumer::sink::http::REFUSALS_IN_A_ROW.to_string();
    wait_until("the run of refusals", Duration::from_secs(60), || async {
        env.psql("SELECT count(*) FROM sink_dead_letters") == limit
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.psql("SELECT count(*) FROM sink_dead_letters"),
        limit,
        "no more dead letters while everything is refused"
    );
    receiver.set_faults(Faults::default());
    let last = env.last_position();
    wait_until("the rest is delivered", Duration::from_secs(90), || async {
        env.checkpoint("refused") == last
    })
    .await;
    kill(Pid::from_raw(consumer.id() as i32), Signal::SIGTERM).unwrap();
    consumer.wait().unwrap();
    let taken: usize = receiver.accepted().iter().map(|r| r.ids.len()).sum();
    assert_eq!(taken, 60 - consumer::sink::http::REFUSALS_IN_A_ROW);
}
