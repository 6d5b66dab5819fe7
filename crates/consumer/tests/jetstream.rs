//! The JetStream sink against real nats-server nodes (testbed) and real PostgreSQL: every event
//! exactly once in the stream (distinct Msg-Ids = events = messages) through node kills and
//! consumer kills, also after the duplicate window has passed; poison events become dead letters
//! in PostgreSQL; bad settings stop start-up with one clear line.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use common::{sink_binary, wait_until};
use event_store::migrations::Role;
use event_store::testing::{connect, TestDatabase};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use testbed::Nats;

const USER: &str = "nats_sink";
const STREAM: &str = "EVENTS";

struct Env {
    db: TestDatabase,
}

async fn setup() -> Env {
    common::init_logging();
    Env {
        db: TestDatabase::start(&[(USER, Role::Consumer)]).await,
    }
}

impl Env {
    fn consumer(&self, name: &str, urls: &str) -> Command {
        sink_binary::command(
            &self.db,
            USER,
            name,
            &[
                ("CONSUMER_SINK", "nats"),
                ("CONSUMER_NATS_URL", urls),
                ("CONSUMER_NATS_STREAM", STREAM),
                ("CONSUMER_BATCH_SIZE", "200"),
            ],
        )
    }

    fn spawn(&self, name: &str, urls: &str) -> Child {
        sink_binary::spawn(self.consumer(name, urls))
    }

    fn psql(&self, sql: &str) -> String {
        self.db.pg.psql(sql)
    }

    fn checkpoint(&self, name: &str) -> String {
        sink_binary::checkpoint(&self.db, name)
    }

    fn last_position(&self) -> String {
        sink_binary::last_position(&self.db)
    }

    /// event_id → position, of every event a stream should hold (all topics but the poison).
    fn expected(&self) -> BTreeMap<String, String> {
        self.psql(
            "SELECT string_agg(event_id || ' ' || tx_id || '/' || id, ',') FROM events
              WHERE topic NOT LIKE '%..%'",
        )
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (id, position) = s.split_once(' ').unwrap();
            (id.to_string(), position.to_string())
        })
        .collect()
    }
}

fn stop(mut child: Child) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success(), "SIGTERM stops cleanly");
}

/// A stream the operator made beforehand, with `config` (its name is [`STREAM`]).
async fn operator_stream(urls: &str, config: stream::Config) {
    let client = async_nats::connect(urls).await.unwrap();
    jetstream::new(client)
        .create_stream(stream::Config {
            name: STREAM.into(),
            ..config
        })
        .await
        .unwrap();
}

/// `events.>` into file storage, as the consumer wants it, with this duplicate window.
fn events_stream(duplicate_window: Duration) -> stream::Config {
    stream::Config {
        subjects: vec!["events.>".into()],
        storage: stream::StorageType::File,
        duplicate_window,
        ..Default::default()
    }
}

/// Runs the consumer against `urls`, asserts that start-up fails, and returns its log.
fn refused_at_start(env: &Env, urls: &str) -> String {
    let output = env
        .consumer("bad", urls)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "start-up must fail: {log}");
    log
}

fn parse(position: &str) -> (u64, i64) {
    let (tx, id) = position.split_once('/').unwrap();
    (tx.parse().unwrap(), id.parse().unwrap())
}

/// Every message of the stream: (subject, Nats-Msg-Id, Pgevents-Position), in stream order.
async fn messages(urls: &str) -> Vec<(String, String, String)> {
    let client = async_nats::connect(urls.split(',').next().unwrap())
        .await
        .unwrap();
    let js = jetstream::new(client);
    let mut stream = js.get_stream(STREAM).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            let header = |name: &str| {
                m.headers
                    .get(name)
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default()
            };
            out.push((
                m.subject.to_string(),
                header("Nats-Msg-Id"),
                header("Pgevents-Position"),
            ));
        }
    }
    out
}

/// Asserts the stream holds every expected event exactly once, in position order per subject.
async fn assert_exactly_once(env: &Env, urls: &str) {
    let expected = env.expected();
    let messages = messages(urls).await;
    let ids: BTreeSet<&String> = messages.iter().map(|(_, id, _)| id).collect();
    assert_eq!(
        messages.len(),
        ids.len(),
        "a Msg-Id appears twice in the stream"
    );
    let wanted: BTreeSet<&String> = expected.keys().collect();
    assert_eq!(ids, wanted, "the stream's Msg-Ids are not the events' ids");
    for (_, id, position) in &messages {
        assert_eq!(&expected[id], position, "the position header of {id}");
    }
    let mut last: BTreeMap<&str, (u64, i64)> = BTreeMap::new();
    for (subject, _, position) in &messages {
        let p = parse(position);
        if let Some(before) = last.insert(subject, p) {
            assert!(before < p, "{subject}: {before:?} stored before {p:?}");
        }
    }
}

/// Appends events at about `rate` per second for `seconds`, over two topics.
async fn produce(url: String, rate: u64, seconds: u64) {
    let client = connect(&url).await;
    let ticks = rate * seconds / 10;
    for i in 0..ticks {
        client
            .execute(
                "INSERT INTO events (topic, key, payload)
                 SELECT CASE WHEN g % 2 = 0 THEN 'orders' ELSE 'orders.audit' END,
                        'key-' || (g % 17), jsonb_build_object('i', $1::bigint, 'g', g)
                   FROM generate_series(1, 10) g",
                &[&(i as i64)],
            )
            .await
            .unwrap();
        client
            .execute("SELECT pg_notify('events', '')", &[])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The node leading the stream (its index), from the stream's cluster info.
async fn leader(urls: &str, nats: &Nats) -> Option<usize> {
    for i in 0..nats.nodes() {
        let Ok(client) = async_nats::connect(format!("nats://127.0.0.1:{}", nats.port(i))).await
        else {
            continue;
        };
        let Ok(mut stream) = jetstream::new(client).get_stream(STREAM).await else {
            continue;
        };
        if let Ok(info) = stream.info().await {
            let name = info.cluster.as_ref().and_then(|c| c.leader.clone())?;
            return name.strip_prefix("node").and_then(|n| n.parse().ok());
        }
    }
    let _ = urls;
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_once_in_an_r3_stream_through_node_and_consumer_kills() {
    let env = setup().await;
    let mut nats = Nats::start_cluster();
    let urls = nats.url();
    // One event no subject can carry: a dead letter, and the stream goes on.
    env.psql("INSERT INTO events (topic, payload) VALUES ('bad..topic', '{}')");
    let mut consumer = env.spawn("to-nats", &urls);
    wait_until("the stream exists", Duration::from_secs(60), || async {
        leader(&urls, &nats).await.is_some()
    })
    .await;
    let producing = tokio::spawn(produce(env.db.pg.url(), 500, 12));

    tokio::time::sleep(Duration::from_secs(2)).await;
    let lead = leader(&urls, &nats).await.expect("a leader");
    let follower = (lead + 1) % 3;
    nats.kill(follower);
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart(follower);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lead = leader(&urls, &nats).await.expect("a leader");
    nats.kill(lead);
    tokio::time::sleep(Duration::from_secs(3)).await;
    kill(Pid::from_raw(consumer.id() as i32), Signal::SIGKILL).unwrap();
    consumer.wait().unwrap();
    nats.restart(lead);
    consumer = env.spawn("to-nats", &urls);
    producing.await.unwrap();

    let last = env.last_position();
    wait_until(
        "the JetStream checkpoint reaches the last event",
        Duration::from_secs(120),
        || async { env.checkpoint("to-nats") == last },
    )
    .await;
    stop(consumer);
    assert_exactly_once(&env, &urls).await;
    let letter = env.psql("SELECT reason FROM sink_dead_letters WHERE topic = 'bad..topic'");
    assert_eq!(letter, "subject_refused");
    let replicas = {
        let client = async_nats::connect(urls.split(',').next().unwrap())
            .await
            .unwrap();
        let mut stream = jetstream::new(client).get_stream(STREAM).await.unwrap();
        stream.info().await.unwrap().config.num_replicas
    };
    assert_eq!(replicas, 3, "created with 3 replicas on a 3-node cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_events_are_not_published_again_after_the_duplicate_window() {
    let env = setup().await;
    let nats = Nats::start();
    let urls = nats.url();
    // A stream made by the operator with a 1-second duplicate window: the server's own
    // de-duplication cannot help after a pause of a few seconds.
    operator_stream(&urls, events_stream(Duration::from_secs(1))).await;
    env.psql(
        "INSERT INTO events (topic, payload) SELECT 'orders', jsonb_build_object('g', g)
           FROM generate_series(1, 500) g",
    );
    let consumer = env.spawn("window", &urls);
    let last = env.last_position();
    wait_until("published", Duration::from_secs(60), || async {
        env.checkpoint("window") == last
    })
    .await;
    stop(consumer);
    // As if the consumer had died after the acknowledgements and before its checkpoint: the
    // checkpoint is back at the start, the events are in the stream.
    env.psql("UPDATE sink_checkpoints SET tx_id = '0', id = 0, event_id = NULL WHERE consumer = 'window'");
    tokio::time::sleep(Duration::from_secs(3)).await; // past the duplicate window
    env.psql(
        "INSERT INTO events (topic, payload) SELECT 'orders', jsonb_build_object('h', g)
           FROM generate_series(1, 50) g",
    );
    let consumer = env.spawn("window", &urls);
    let last = env.last_position();
    wait_until("caught up again", Duration::from_secs(60), || async {
        env.checkpoint("window") == last
    })
    .await;
    stop(consumer);
    assert_exactly_once(&env, &urls).await;
    assert_eq!(messages(&urls).await.len(), 550);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jetstream_settings_stop_start_up_with_one_clear_line() {
    let env = setup().await;
    env.psql("INSERT INTO events (topic, payload) VALUES ('orders', '{}')");

    // Wrong password: an operator must act; start-up ends naming the cause, not the password.
    let guarded = Nats::start_with_password("app", "right-password");
    let url = format!("nats://app:wrong-password@127.0.0.1:{}", guarded.port(0));
    let output = env
        .consumer("bad", &url)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{log}");
    assert!(
        log.contains("cannot connect to NATS") && log.contains("--nats-creds"),
        "{log}"
    );
    assert!(
        !log.contains("wrong-password"),
        "the password leaked: {log}"
    );

    // A stream that exists with other settings.
    let nats = Nats::start();
    operator_stream(
        &nats.url(),
        stream::Config {
            subjects: vec!["other.>".into()],
            storage: stream::StorageType::Memory,
            ..Default::default()
        },
    )
    .await;
    let log = refused_at_start(&env, &nats.url());
    assert!(
        log.contains("\"EVENTS\" exists") && log.contains("events.>"),
        "{log}"
    );

    // A work queue removes what was read: the consumer could not tell what it published.
    let queue = Nats::start();
    operator_stream(
        &queue.url(),
        stream::Config {
            subjects: vec!["events.>".into()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        },
    )
    .await;
    let log = refused_at_start(&env, &queue.url());
    assert!(
        log.contains("WorkQueue retention") && log.contains("limits retention"),
        "{log}"
    );

    // Unreachable: retried (the servers may be starting), with the address in the log.
    let closed = testbed::secrets::closed_port();
    let mut waiting = env
        .consumer("bad", &format!("nats://127.0.0.1:{closed}"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "an unreachable server is waited for"
    );
    kill(Pid::from_raw(waiting.id() as i32), Signal::SIGTERM).unwrap();
    let output = waiting.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        log.contains(&format!(
            "cannot connect to NATS at nats://127.0.0.1:{closed}"
        )),
        "{log}"
    );

    // Missing stream name, an empty token file.
    let output = env
        .consumer("bad", &nats.url())
        .env_remove("CONSUMER_NATS_STREAM")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("--nats-stream"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "\n").unwrap();
    let output = env
        .consumer("bad", &nats.url())
        .env("CONSUMER_NATS_TOKEN_FILE", dir.path().join("token"))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("--nats-token-file"));
}

/// `eventsctl dead-letters replay` marks a row; the running JetStream consumer publishes the
/// event again, alone, and removes the row once acknowledged, or keeps it with the new reason
/// when the cause is still there (a topic that is no valid subject).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_replays_are_published_by_the_running_consumer() {
    use event_store::sink_state::{record_dead_letter, request_replay, DeadLetterRow};
    let env = setup().await;
    let nats = Nats::start();
    let urls = nats.url();
    // A 1-second duplicate window: the replay is a new message, not a duplicate.
    operator_stream(&urls, events_stream(Duration::from_secs(1))).await;
    env.psql(
        "INSERT INTO events (topic, payload) SELECT 'orders', jsonb_build_object('g', g)
           FROM generate_series(1, 3) g;
         INSERT INTO events (topic, payload) VALUES ('bad..topic', '{}')",
    );
    let consumer = env.spawn("replays", &urls);
    let last = env.last_position();
    wait_until("delivered", Duration::from_secs(60), || async {
        env.checkpoint("replays") == last
    })
    .await;
    let refused: i64 = env
        .psql("SELECT id FROM sink_dead_letters WHERE reason = 'subject_refused'")
        .parse()
        .expect("the bad topic is a dead letter");
    // As if the server had refused the second event earlier.
    let (second, event_id): (i64, String) = {
        let row = env.psql("SELECT id || ' ' || event_id FROM events WHERE topic = 'orders' ORDER BY id OFFSET 1 LIMIT 1");
        let (id, event_id) = row.split_once(' ').unwrap();
        (id.parse().unwrap(), event_id.to_string())
    };
    tokio::time::sleep(Duration::from_secs(2)).await; // past the duplicate window
    let login = connect(&env.db.pg.url_for(USER, None)).await;
    let tx: u64 = env
        .psql(&format!("SELECT tx_id FROM events WHERE id = {second}"))
        .parse()
        .unwrap();
    record_dead_letter(
        &login,
        "replays",
        &DeadLetterRow {
            position: event_store::Position::new(tx, second),
            event_id: None,
            topic: Some("orders"),
            key: None,
            event_type: None,
            payload: "{}",
            reason: "too_large",
            detail: "refused earlier",
        },
    )
    .await
    .unwrap();
    assert!(request_replay(&login, "replays", second).await.unwrap());
    assert!(request_replay(&login, "replays", refused).await.unwrap());

    wait_until("both replays answered", Duration::from_secs(30), || async {
        env.psql("SELECT count(*) FROM sink_dead_letters WHERE replay_requested_at IS NOT NULL")
            == "0"
    })
    .await;
    stop(consumer);
    assert_eq!(
        env.psql(&format!(
            "SELECT count(*) FROM sink_dead_letters WHERE id = {second}"
        )),
        "0",
        "the replayed event was taken"
    );
    assert!(
        env.psql(&format!(
            "SELECT detail FROM sink_dead_letters WHERE id = {refused}"
        ))
        .contains("still makes no valid NATS subject"),
        "the refused replay says why"
    );
    let published = messages(&urls).await;
    assert_eq!(published.len(), 4, "{published:?}");
    assert_eq!(published[3].1, event_id, "the replay is the last message");
}

/// `--on-poison stop`: the consumer stops at the first event it cannot publish, and nothing after
/// it reaches the stream (it would sit before the poison event once the cause is fixed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_poison_stop_publishes_nothing_past_the_poison_event() {
    let env = setup().await;
    let nats = Nats::start();
    let urls = nats.url();
    env.psql(
        "INSERT INTO events (topic, payload) VALUES ('orders', '{\"n\": 1}'), ('orders', '{\"n\": 2}');
         INSERT INTO events (topic, payload) VALUES ('bad..topic', '{}');
         INSERT INTO events (topic, payload) VALUES ('orders', '{\"n\": 3}'), ('orders', '{\"n\": 4}');",
    );
    let output = env
        .consumer("strict", &urls)
        .env("CONSUMER_ON_POISON", "stop")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "it stops: {log}");
    assert!(log.contains("bad..topic"), "the log names the event: {log}");
    let published = messages(&urls).await;
    assert_eq!(
        published.len(),
        2,
        "only the events before the poison: {published:?}"
    );
    assert_eq!(env.psql("SELECT count(*) FROM sink_dead_letters"), "0");
}
