//! The append API against a real PostgreSQL, as a least-privilege producer login (`p`, holding
//! only `events_producer`), in both wake-up modes.

use std::collections::HashSet;
use std::time::Duration;

use event_store::db::Database as Config;
use event_store::event::InvalidEvent;
use event_store::{db, migrations, NewEvent, Topic};
use futures_util::StreamExt;
use producer::{AppendError, Channel, Notifier, NotifierTask, NotifyMode, Producer, Receipt};
use serde_json::json;
use testbed::Postgres;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client};
use uuid::Uuid;

/// A migrated cluster and the producer login's connection settings.
async fn setup() -> (Postgres, Config) {
    let pg = Postgres::start();
    let mut admin = db::connect_spawned(&db::config(&pg.url(), "test").unwrap())
        .await
        .unwrap();
    migrations::run(&mut admin).await.unwrap();
    admin
        .batch_execute("CREATE ROLE p LOGIN IN ROLE events_producer")
        .await
        .unwrap();
    let config = db::config(&pg.url_for("p", None), "producer-test").unwrap();
    (pg, config)
}

async fn connect(config: &Config) -> Client {
    db::connect_spawned(config).await.unwrap()
}

/// A connection LISTENing on the default channel, driven by its own task.
struct Listener {
    _client: Client,
    payloads: mpsc::UnboundedReceiver<String>,
}

impl Listener {
    async fn start(pg: &Postgres) -> Listener {
        let config = db::config(&pg.url(), "listener").unwrap();
        let (client, mut connection) = db::connect(&config).await.unwrap();
        let (tx, payloads) = mpsc::unbounded_channel();
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        tokio::spawn(async move {
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    let _ = tx.send(n.payload().to_string());
                }
            }
        });
        client.batch_execute("LISTEN events").await.unwrap();
        Listener {
            _client: client,
            payloads,
        }
    }

    /// The next payload (bounded, so that a failing test cannot hang).
    async fn next(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.payloads.recv())
            .await
            .expect("a notification within 10 s")
            .expect("the listener is running")
    }

    /// Payloads until each of `topics` has been seen (in any order, possibly coalesced).
    async fn until_seen(&mut self, topics: &[&str]) -> Vec<String> {
        let mut seen = Vec::new();
        while !topics.iter().all(|t| seen.iter().any(|s| s == t)) {
            seen.push(self.next().await);
        }
        seen
    }
}

/// Sends a marker NOTIFY as superuser. Notifications arrive in commit order, so when the marker
/// is the next thing a listener receives, nothing was notified before it.
fn marker(pg: &Postgres) {
    pg.psql("SELECT pg_notify('events', 'marker')");
}

fn topic(name: &str) -> Topic {
    Topic::new(name).unwrap()
}

fn count(pg: &Postgres) -> i64 {
    pg.psql("SELECT count(*) FROM events").parse().unwrap()
}

/// Both wake-up modes (the after-commit one with its notifier task).
fn producers(config: &Config) -> Vec<(Producer, Option<NotifierTask>)> {
    let (notifier, task) =
        Notifier::spawn(config.clone(), Channel::default(), Duration::from_millis(1));
    vec![
        (Producer::after_commit(notifier), Some(task)),
        (Producer::in_transaction(Channel::default()), None),
    ]
}

#[tokio::test]
async fn a_rolled_back_transaction_leaves_no_event_and_no_wake_up() {
    let (pg, config) = setup().await;
    let mut listener = Listener::start(&pg).await;
    let mut client = connect(&config).await;
    for (producer, _task) in producers(&config) {
        let tx = client.transaction().await.unwrap();
        let appended = producer
            .append_in(&tx, &NewEvent::new(topic("orders"), json!({"n": 1})))
            .await
            .unwrap();
        let batch = producer
            .append_batch_in(
                &tx,
                &[
                    NewEvent::new(topic("orders"), json!({"n": 2})),
                    NewEvent::new(topic("refunds"), json!({"n": 3})),
                ],
            )
            .await
            .unwrap();
        assert!(appended.receipts().id > 0);
        assert_eq!(batch.receipts().len(), 2);
        tx.rollback().await.unwrap();
        drop((appended, batch)); // rolled back: nobody says "committed"
        assert_eq!(count(&pg), 0, "{:?} mode", producer.notify_mode());
        marker(&pg);
        assert_eq!(
            listener.next().await,
            "marker",
            "{:?} mode: a wake-up was sent for a rolled-back transaction",
            producer.notify_mode()
        );
    }
}

#[tokio::test]
async fn a_commit_makes_the_events_visible_and_wakes_a_listener() {
    let (pg, config) = setup().await;
    let mut listener = Listener::start(&pg).await;
    let mut client = connect(&config).await;
    for (producer, _task) in producers(&config) {
        let mode = producer.notify_mode();
        let before = count(&pg);
        // Statements prepared on this connection serve its transactions too.
        let prepared = producer.prepare(&client).await.unwrap();
        let tx = client.transaction().await.unwrap();
        let one = producer
            .append_in(
                &tx,
                &NewEvent::new(topic("courses"), json!({"mode": mode.to_string()})),
            )
            .await
            .unwrap();
        let more = prepared
            .append_batch_in(
                &tx,
                &[
                    NewEvent::new(topic("policies"), json!({"i": 0})).with_key("k"),
                    NewEvent::new(topic("courses"), json!({"i": 1})).with_type("t"),
                ],
            )
            .await
            .unwrap();
        // Not visible to others before the commit.
        assert_eq!(count(&pg), before);
        tx.commit().await.unwrap();
        let one = one.committed();
        let more = more.committed();
        assert_eq!(count(&pg), before + 3, "{mode:?}");
        // The receipts name the stored rows.
        for receipt in std::iter::once(&one).chain(&more) {
            let stored = pg.psql(&format!(
                "SELECT id FROM events WHERE event_id = '{}'",
                receipt.event_id
            ));
            assert_eq!(stored, receipt.id.to_string(), "{mode:?}");
        }
        let woken = listener.until_seen(&["courses", "policies"]).await;
        assert!(
            woken.iter().all(|p| p == "courses" || p == "policies"),
            "{mode:?}: wake-up payloads are topics, got {woken:?}"
        );
    }
}

#[tokio::test]
async fn commit_helper_commits_then_wakes() {
    let (pg, config) = setup().await;
    let mut listener = Listener::start(&pg).await;
    let mut client = connect(&config).await;
    for (producer, _task) in producers(&config) {
        let tx = client.transaction().await.unwrap();
        let appended = producer
            .append_in(&tx, &NewEvent::new(topic("payments"), json!({})))
            .await
            .unwrap();
        let receipt: Receipt = producer.commit(tx, appended).await.unwrap();
        assert_eq!(
            pg.psql(&format!(
                "SELECT topic FROM events WHERE id = {}",
                receipt.id
            )),
            "payments"
        );
        assert_eq!(listener.next().await, "payments");
    }
}

#[tokio::test]
async fn a_batch_is_stored_in_input_order_with_matching_receipts() {
    let (pg, config) = setup().await;
    let client = connect(&config).await;
    for ((producer, _task), prepare) in producers(&config).into_iter().flat_map(|p| {
        let again = (p.0.clone(), None);
        [(p, false), (again, true)]
    }) {
        pg.psql("TRUNCATE events");
        let chosen = Uuid::new_v4();
        let events: Vec<NewEvent> = (0..500)
            .map(|i| {
                let event = NewEvent::new(topic(["a", "b", "c"][i % 3]), json!({ "i": i }))
                    .with_headers(json!({ "h": i }));
                if i == 7 {
                    event.with_event_id(chosen)
                } else {
                    event
                }
            })
            .collect();
        let receipts = if prepare {
            let prepared = producer.prepare(&client).await.unwrap();
            prepared.append(&client, &events).await.unwrap()
        } else {
            producer.append(&client, &events).await.unwrap()
        };
        assert_eq!(receipts.len(), 500);
        assert_eq!(receipts[7].event_id, chosen, "a caller's event_id is kept");
        assert!(
            receipts.windows(2).all(|w| w[0].id < w[1].id),
            "ids ascend in input order"
        );
        // Each receipt names the row holding that input's payload, headers and topic.
        let rows = pg.psql(
            "SELECT id || ' ' || event_id || ' ' || (payload->>'i') || ' ' || (headers->>'h') \
             || ' ' || topic FROM events ORDER BY id",
        );
        let expected: Vec<String> = receipts
            .iter()
            .enumerate()
            .map(|(i, r)| format!("{} {} {i} {i} {}", r.id, r.event_id, ["a", "b", "c"][i % 3]))
            .collect();
        assert_eq!(rows.lines().collect::<Vec<_>>(), expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_concurrent_appends_land_exactly_once() {
    let (pg, config) = setup().await;
    let pool = db::pool(config.clone(), 16).unwrap();
    let both = producers(&config);
    const TASKS: usize = 32;
    const PER_TASK: usize = 125; // 4000 events
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let producer = both[t % 2].0.clone();
        let pool = pool.clone();
        tasks.spawn(async move {
            let mut receipts = Vec::new();
            if t % 4 < 2 {
                // One event per transaction of its own.
                for i in 0..PER_TASK {
                    let event = NewEvent::new(topic("load"), json!({ "t": t, "i": i }));
                    receipts.extend(producer.append_pooled(&pool, &[event]).await.unwrap());
                }
            } else {
                // Batches of 25 inside the caller's transactions.
                let mut client = pool.get().await.unwrap();
                for chunk in 0..PER_TASK / 25 {
                    let events: Vec<NewEvent> = (0..25)
                        .map(|i| {
                            NewEvent::new(topic("load"), json!({ "t": t, "i": chunk * 25 + i }))
                        })
                        .collect();
                    let tx = client.transaction().await.unwrap();
                    let appended = producer.append_batch_in(&*tx, &events).await.unwrap();
                    tx.commit().await.unwrap();
                    receipts.extend(appended.committed());
                }
            }
            receipts
        });
    }
    let mut receipts = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        receipts.extend(joined.unwrap());
    }
    let total = TASKS * PER_TASK;
    assert_eq!(receipts.len(), total);
    let ids: HashSet<i64> = receipts.iter().map(|r| r.id).collect();
    let event_ids: HashSet<Uuid> = receipts.iter().map(|r| r.event_id).collect();
    assert_eq!(ids.len(), total, "ids are unique");
    assert_eq!(event_ids.len(), total, "event_ids are unique");
    assert_eq!(count(&pg), total as i64);
    assert_eq!(
        pg.psql("SELECT count(DISTINCT (payload->>'t', payload->>'i')) FROM events"),
        total.to_string(),
        "every (task, index) pair is stored once"
    );
    let stored: HashSet<i64> = pg
        .psql("SELECT id FROM events")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(stored, ids, "the receipts name exactly the stored rows");
}

#[tokio::test]
async fn invalid_input_is_refused_before_the_database_is_touched() {
    let (mut pg, config) = setup().await;
    let producer = Producer::in_transaction(Channel::default()).with_max_payload_bytes(100);
    let mut client = connect(&config).await;

    // Topics and JSON text are checked when the event is built.
    assert!(matches!(
        Topic::new("bad topic"),
        Err(InvalidEvent::Topic { .. })
    ));
    assert!(matches!(
        "-starts-badly".parse::<Topic>(),
        Err(InvalidEvent::Topic { .. })
    ));
    assert!(matches!(
        NewEvent::from_json_text(topic("t"), "{\"unterminated\": "),
        Err(InvalidEvent::PayloadNotJson(_))
    ));

    let ok = || NewEvent::new(topic("t"), json!({"small": true}));
    let oversized = NewEvent::new(topic("t"), json!({ "big": "x".repeat(200) }));
    let array_headers = ok().with_headers(json!(["not", "an", "object"]));
    let id = Uuid::new_v4();

    // Inside a transaction: a refused append sends nothing, so the transaction stays usable
    // (any statement error would have aborted it).
    let tx = client.transaction().await.unwrap();
    let err = producer.append_in(&tx, &oversized).await.unwrap_err();
    assert!(
        matches!(
            err,
            AppendError::Invalid {
                index: 0,
                source: InvalidEvent::PayloadTooLarge { limit: 100, .. }
            }
        ),
        "{err:?}"
    );
    assert!(err.is_invalid() && !err.is_transient());
    let appended = producer.append_in(&tx, &ok()).await.unwrap();
    tx.commit().await.unwrap();
    appended.committed();
    assert_eq!(count(&pg), 1);

    // With the server gone, refusals still come back typed: they never needed it.
    pg.stop();
    let err = producer
        .append(&client, &[ok(), ok(), array_headers.clone()])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AppendError::Invalid {
                index: 2,
                source: InvalidEvent::HeadersNotObject
            }
        ),
        "{err:?}"
    );
    let err = producer
        .append(&client, &[ok().with_event_id(id), ok().with_event_id(id)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, AppendError::DuplicateEventId { index: 1, event_id } if event_id == id),
        "{err:?}"
    );
    let err = producer.append(&client, &[oversized]).await.unwrap_err();
    assert!(matches!(err, AppendError::Invalid { .. }), "{err:?}");
    // …whereas a valid event does reach for the (stopped) server.
    let err = producer.append(&client, &[ok()]).await.unwrap_err();
    assert!(matches!(err, AppendError::Database { .. }), "{err:?}");
    assert!(err.is_transient() && err.outcome_unknown(), "{err:?}");
    assert!(err.to_string().starts_with("append events: "), "{err}");
}

#[tokio::test]
async fn an_event_id_is_stored_once() {
    let (pg, config) = setup().await;
    let client = connect(&config).await;
    let producer = Producer::in_transaction(Channel::default());
    let event = NewEvent::new(topic("t"), json!({})).with_event_id(Uuid::new_v4());
    let first = producer
        .append(&client, std::slice::from_ref(&event))
        .await
        .unwrap();
    assert_eq!(first[0].event_id, event.event_id.unwrap());
    let err = producer.append(&client, &[event]).await.unwrap_err();
    assert!(err.is_duplicate() && !err.is_transient(), "{err:?}");
    assert_eq!(count(&pg), 1);

    // An `id` clash (a sequence left behind, e.g. after a restore) is not a duplicate event: the
    // binary must not treat it as "already stored" and retry it forever.
    pg.psql("SELECT setval('events_id_seq', 1, false)");
    let clash = producer
        .append(&client, &[NewEvent::new(topic("t"), json!({}))])
        .await
        .unwrap_err();
    assert!(!clash.is_duplicate() && !clash.is_transient(), "{clash:?}");
}

#[tokio::test]
async fn an_empty_batch_sends_nothing() {
    let (mut pg, config) = setup().await;
    let client = connect(&config).await;
    pg.stop();
    for (producer, _task) in producers(&config) {
        assert_eq!(producer.append(&client, &[]).await.unwrap(), vec![]);
    }
}

#[tokio::test]
async fn the_notifier_reconnects_when_its_connection_is_killed() {
    let (pg, config) = setup().await;
    let mut listener = Listener::start(&pg).await;
    let mut notifier_config = config.clone();
    notifier_config.application_name("the-notifier");
    let (notifier, task) = Notifier::spawn(
        notifier_config,
        Channel::default(),
        Duration::from_millis(1),
    );
    let producer = Producer::after_commit(notifier);
    assert_eq!(producer.notify_mode(), NotifyMode::AfterCommit);
    let client = connect(&config).await;
    let event = || NewEvent::new(topic("courses"), json!({}));

    producer.append(&client, &[event()]).await.unwrap();
    assert_eq!(listener.next().await, "courses");

    let killed = pg.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = 'the-notifier'",
    );
    assert_eq!(killed, "1");
    producer.append(&client, &[event()]).await.unwrap();
    assert_eq!(
        listener.next().await,
        "courses",
        "woken again after the notifier reconnected"
    );

    // Dropping the last handle ends the task after sending what is pending.
    producer
        .append(&client, &[NewEvent::new(topic("last"), json!({}))])
        .await
        .unwrap();
    drop(producer);
    tokio::time::timeout(Duration::from_secs(10), task.finished())
        .await
        .expect("the notifier ends once no producer is left");
    assert_eq!(listener.next().await, "last");
}
